"""LEMON's advice for training an expanded model on (``lemon_schedule.json``).

The numbers and their sources are from docs lemon-math.md, "After expansion: the training
recipe": the paper (Wang et al., ICLR 2024) keeps the large model's usual maximum learning rate
and decays it faster than training from scratch; the small-scale measurement (byte-level GPT-2,
2x64 -> 4x128) found that a warmup is needed, half the scratch-best learning rate did best, and a
cosine over about half the scratch horizon reached the scratch run's final loss in 52-61% fewer
steps.  ``lr_factor`` is that schedule as a multiplier of the peak learning rate.
"""

from __future__ import annotations

import math

SOURCE = ("Wang et al., \"LEMON: Lossless model expansion\", ICLR 2024 (arXiv 2310.07999); "
          "lemon-onnx docs lemon-math.md, \"After expansion: the training recipe\"")

WARMUP_FRACTION = 0.05
HORIZON_FRACTION = 0.5
PEAK_LR_RANGE = (0.5, 1.0)  # times the large model's scratch-best maximum learning rate


def advice(plan: dict | None, notes: list[str]) -> dict:
    out = {
        "recipe": "keep the large model's maximum learning rate, decay faster (a shorter "
                  "cosine), keep a warmup",
        "source": SOURCE,
        "optimizer": "the one you would train the large architecture with from scratch "
                     "(AdamW in the measurements)",
        "peak_lr": {
            "relative_to_scratch_best": list(PEAK_LR_RANGE),
            "why": "LEMON keeps the large model's usual maximum learning rate; a too small one "
                   "gives a worse final model. At small scale half of the scratch-best rate "
                   "did best (61% of the steps saved, against 52% at the scratch-best rate).",
        },
        "warmup": {
            "fraction_of_horizon": WARMUP_FRACTION,
            "why": "without warmup the first update destroys the inherited function (loss "
                   "1.48 -> 4.2 in one step); with it the loss still rises to 1.8-2.0 before "
                   "recovering, faster than from scratch",
        },
        "decay": {
            "shape": "cosine to 0",
            "horizon_fraction_of_scratch": HORIZON_FRACTION,
            "why": "LEMON decays faster than training from scratch: ViT(6, 384) -> ViT(12, 768) "
                   "reached the scratch accuracy with 56.7% less compute (130 vs 300 epochs), "
                   "BERT(6, 384) -> BERT(12, 768) with 33.2% less",
        },
        "measured": {
            "paper": {"vit_compute_saved": 0.567, "bert_compute_saved": 0.332},
            "small_scale": {
                "setup": "byte-level GPT-2 on the Python standard library's source, 2x64 -> "
                         "4x128 (width 2, depth 2), AdamW, 2 CPU cores; the small model trained "
                         "near its plateau first",
                "scratch": {"best_lr": 6e-3, "steps": 1000, "final_val_loss": 1.413},
                "expanded": {"horizon": 500, "warmup_fraction": 0.05,
                             "steps_to_scratch_final": {"lr 6e-3": 482, "lr 3e-3": 388}},
                "caveat": "a small model trained for only a quarter as long gave no saving; "
                          "measure with more than one seed",
            },
        },
        "notes": list(notes),
    }
    if plan:
        out["expansion"] = {k: plan.get(k) for k in ("source", "target", "stream_form",
                                                     "depth_placement", "depth_init", "exact")}
    else:
        out["expansion"] = None
        out["notes"].append("this model carries no lemon-onnx plan: it was not expanded, so "
                            "the advice above does not apply to it")
    return out


def plan_notes(plan: dict | None) -> list[str]:
    """What the plan says a trainer should know, in the schedule's words."""
    if not plan:
        return []
    notes = list(plan.get("notes") or [])
    if plan.get("depth_init") == "zero":
        notes.append("twin blocks start with all-zero attention output and MLP down "
                     "projections (--depth-init zero): their units get gradients only through "
                     "those projections at first")
    if plan.get("exact") is False:
        notes.append("the expansion is approximate (see the notes above): expect a small loss "
                     "difference at step 0")
    if plan.get("rounded"):
        notes.append("constants rounded in the storage dtype: " + "; ".join(plan["rounded"]))
    return notes


def lr_factor(step: int, horizon: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from 1 to 0 at ``horizon``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step >= horizon:
        return 0.0
    t = (step - warmup) / max(1, horizon - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def steps_for(scratch_steps: int) -> tuple[int, int]:
    """(horizon, warmup) for a run that would take ``scratch_steps`` from scratch."""
    horizon = max(1, round(scratch_steps * HORIZON_FRACTION))
    return horizon, max(1, round(horizon * WARMUP_FRACTION))

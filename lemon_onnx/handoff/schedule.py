"""LEMON's advice for training an expanded model on (``lemon_schedule.json``).

Two sources, both in reach of the reader: the paper (Wang et al., "LEMON: Lossless model
expansion", ICLR 2024, arXiv 2310.07999), which keeps the large model's usual maximum
learning rate and decays it faster than training from scratch; and this repository's own
measurement, ``benchmarks/training_payoff.py`` (figures in ``benchmarks/payoff/results.json``,
the README's "Does it pay?"): a byte-level GPT-2 2x64 expanded to 4x128 (width 2, depth 2),
handed off, and trained with this schedule at the scratch-best learning rate and at half of
it.  ``BENCHMARK`` holds that run's figures (a test compares them with the results file).
``lr_factor`` is the schedule as a multiplier of the peak learning rate.
"""

from __future__ import annotations

import math

SOURCE = ("Wang et al., \"LEMON: Lossless model expansion\", ICLR 2024 (arXiv 2310.07999); "
          "lemon-onnx benchmarks/training_payoff.py, figures in "
          "benchmarks/payoff/results.json (README: \"Does it pay?\")")

WARMUP_FRACTION = 0.05
HORIZON_FRACTION = 0.5
PEAK_LR_RANGE = (0.5, 1.0)  # times the large model's scratch-best maximum learning rate

#: benchmarks/payoff/results.json, rounded as the README gives them
BENCHMARK = {
    "setup": "byte-level GPT-2 on the Python 3.11 standard library's source, 2x64 (trained "
             "6000 steps) expanded to 4x128 (width 2, depth 2) by lemon-onnx and handed off; "
             "batch 16 x 64 bytes, AdamW (betas 0.9/0.95, weight decay 0.1, clip 1), one seed",
    "scratch": {"steps": 3000, "warmup": 150,
                "final_val_loss_by_peak_lr": {"1.5e-3": 1.750, "3e-3": 1.728, "6e-3": 1.736},
                "best_peak_lr": 3e-3, "steps_to_its_final_loss": 2950},
    "expanded": {"horizon": 1500, "warmup": 75, "start_val_loss": 1.7525,
                 "steps_to_scratch_final_loss": {"3e-3": 1150, "1.5e-3": 1100},
                 "steps_saved_fraction": {"3e-3": 0.617, "1.5e-3": 0.633},
                 "final_val_loss": {"3e-3": 1.695, "1.5e-3": 1.695},
                 "warmup_peak_val_loss": {"3e-3": 2.0, "1.5e-3": 1.92}},
    "caveat": "one seed, one small model: measure on your own model before relying on the "
              "numbers",
}


def advice(plan: dict | None, notes: list[str]) -> dict:
    b = BENCHMARK
    out = {
        "recipe": "keep the large model's maximum learning rate (or half of it), keep a short "
                  "warmup, decay faster than from scratch (a cosine over about half the "
                  "scratch horizon)",
        "source": SOURCE,
        "optimizer": "the one you would train the large architecture with from scratch "
                     "(AdamW in the measurements)",
        "peak_lr": {
            "relative_to_scratch_best": list(PEAK_LR_RANGE),
            "why": "LEMON keeps the large model's usual maximum learning rate; a too small one "
                   "gives a worse final model. In the benchmark the scratch-best rate (3e-3) "
                   "reached the scratch run's final loss in 62% fewer steps and half of it "
                   "in 63% fewer, both ending at 1.695 (scratch: 1.728)",
        },
        "warmup": {
            "fraction_of_horizon": WARMUP_FRACTION,
            "why": "the first updates move the inherited function: in the benchmark the loss "
                   "rose from 1.75 to 2.0 during warmup at the scratch-best rate (1.92 at half "
                   "of it) before falling below the scratch run's",
        },
        "decay": {
            "shape": "cosine to 0",
            "horizon_fraction_of_scratch": HORIZON_FRACTION,
            "why": "LEMON decays faster than training from scratch: ViT(6, 384) -> ViT(12, 768) "
                   "reached the scratch accuracy with 56.7% less compute (130 vs 300 epochs), "
                   "BERT(6, 384) -> BERT(12, 768) with 33.2% less; the benchmark's 1500-step "
                   "cosine is half its 3000-step scratch run",
        },
        "measured": {
            "paper": {"vit_compute_saved": 0.567, "bert_compute_saved": 0.332},
            "benchmark": b,
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

"""LEMON's advice for training an expanded model on (``lemon_schedule.json``).

Two sources, both in reach of the reader: the paper (Wang et al., "LEMON: Lossless model
expansion", ICLR 2024, arXiv 2310.07999), which keeps the large model's usual maximum
learning rate and decays it faster than training from scratch; and this repository's own
measurement, ``benchmarks/training_payoff.py`` (its first version's one-seed figures in
``benchmarks/payoff/v1-results.json``, the README's "Does it pay?"): a byte-level GPT-2 2x64
expanded to 4x128 (width 2, depth 2), handed off, and trained with this schedule at the
scratch-best learning rate and at half of it.  ``BENCHMARK`` holds that run's figures (a test
compares them with the results file).  ``lr_factor`` is the schedule as a multiplier of the
peak learning rate.

``remedy`` (lemon_schedule.json's ``remedy``) is what keeps the inherited loss when training
starts: the loss spike after expansion, and the measurements behind the choice, are in the
README ("Keeping the inherited loss") and ``benchmarks/payoff/remedy_exploration.json``;
``param_groups``, ``optimizer``, ``warm_start``, ``scheduler`` (``remedy_lr_factor``,
``remedy_warmup``) and ``trainer_callback`` apply it (torch and transformers are imported when
they are called, not with this module).
"""

from __future__ import annotations

import math

SOURCE = ("Wang et al., \"LEMON: Lossless model expansion\", ICLR 2024 (arXiv 2310.07999); "
          "lemon-onnx benchmarks/training_payoff.py, figures of its first version in "
          "benchmarks/payoff/v1-results.json (README: \"Does it pay?\")")

WARMUP_FRACTION = 0.05
HORIZON_FRACTION = 0.5
PEAK_LR_RANGE = (0.5, 1.0)  # times the large model's scratch-best maximum learning rate

#: benchmarks/payoff/v1-results.json (the benchmark's first version: one seed, GPT-2, the
#: splits of the release before the exact arithmetic), rounded as the README gives them
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


#: the remedy for the loss spike after expansion (``remedy`` in lemon_schedule.json); the
#: figures behind each value: benchmarks/payoff/remedy_exploration2.json (README: "Keeping the
#: inherited loss")
WARM_START_STEPS = 0  # measured worth 0.1 point or nothing once the warmup is long (warm_start
#: still fills Adam's statistics when given steps)
REMEDY_PEAK_LR = 0.5  # times the large model's scratch-best maximum learning rate
REMEDY_WARMUP_STEPS = 200  # linear from 0 to the peak, at most half the horizon
#: the remedy's cosine reaches 0 after this fraction of the scratch run's steps: the plain
#: schedule's (half the rate over a third of the steps kept the loss by hardly learning)
REMEDY_HORIZON_FRACTION = HORIZON_FRACTION
FACTOR_HOLD_STEPS = None  # the 1/k factors: held this many steps, then ramped to 1
FACTOR_RAMP_STEPS = 0  # (None: held for the whole run)


def remedy(plan: dict | None, tensors: list[dict] | None) -> dict:
    """What a training script applies against the loss spike (``param_groups``, ``warm_start``,
    ``optimizer``, ``remedy_lr_factor`` and ``scheduler`` below read it; the README shows
    them in a loop and with ``Trainer``)."""
    return {
        "what": "per-parameter learning-rate factors d/D for weights whose input units were "
                "copied (1/k for k copies: Adam moves every copy the same way, so the "
                "function moves k times as far per step), kept for the whole run unless "
                "lr_factor_hold_steps says otherwise; Adam's moment estimates filled on "
                "adam_warm_start_steps batches at learning rate 0 before the first update (0: "
                "none, the warmup's first small steps fill them); a linear warmup from 0 over "
                "warmup_steps (at most half the horizon) to peak_lr_relative_to_scratch_best "
                "times the scratch-best rate, then a cosine to 0 at "
                "horizon_fraction_of_scratch of the scratch run's steps: the small model ended "
                "its own cosine at rate 0, and any rate near its training rate pushes it back "
                "up its valley (the small model itself, continued at the scratch-best rate, "
                "rises as much), so the rate comes back slowly and only to half the "
                "scratch-best; it keeps the inherited loss at some cost in progress (the "
                "plain schedule rises 10-14% and gets further in the benchmark)",
        "lr_factors": lr_factors(plan, tensors or []),
        "adam_warm_start_steps": WARM_START_STEPS,
        "peak_lr_relative_to_scratch_best": REMEDY_PEAK_LR,
        "warmup_steps": REMEDY_WARMUP_STEPS,
        "horizon_fraction_of_scratch": REMEDY_HORIZON_FRACTION,
        "lr_factor_hold_steps": FACTOR_HOLD_STEPS,
        "lr_factor_ramp_steps": FACTOR_RAMP_STEPS,
        "apply": "lemon_onnx.handoff.schedule: optimizer(model, DIR, lr) or param_groups(model, "
                 "DIR, lr), warm_start(model, opt, batches, schedule=DIR) before training, "
                 "scheduler(opt, DIR, horizon) for the rate, horizon = remedy_horizon(DIR, "
                 "scratch_steps) (remedy_lr_factor: its multiplier "
                 "of the peak); trainer_callback(DIR) for a transformers Trainer",
        "measured": "benchmarks/payoff/results.json (training_payoff.py at its defaults: "
                    "2x64 trained 6000 steps, expanded to 4x128, 3 seeds, GPT-2 and "
                    "Llama-style; cosine over 1500 steps, half the 3000-step scratch run): "
                    "worst rise in the first 200 steps 3.5% mean, 4.0% max (GPT-2) and 2.5%, "
                    "3.1% (Llama-style), at most 4.8% over the whole run; plain 12.8%/13.8% and "
                    "11.2%/12.9%; at the full rate with the same factors 6.8%/7.3% and 4.9%/"
                    "5.6% (remedy_seeds.json). Scratch's best loss reached at step 1150 on 2 of "
                    "the 3 GPT-2 seeds (61-62% fewer steps; plain 54-57% on the same 2), on no "
                    "Llama-style seed (nor plain)",
        "source": "benchmarks/training_payoff.py; the searches in "
                  "benchmarks/payoff/remedy_exploration.json, remedy_exploration2.json, "
                  "remedy_exploration3.json and remedy_seeds.json "
                  "(README: \"Keeping the inherited loss\")",
    }


def advice(plan: dict | None, notes: list[str], tensors: list[dict] | None = None) -> dict:
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
                   "of it) before falling below the scratch run's; \"remedy\" below keeps "
                   "the inherited loss",
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
    out["remedy"] = remedy(plan, tensors)
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


def remedy_warmup(schedule, horizon: int) -> int:
    """The remedy's warmup in steps for a run of ``horizon`` steps: its ``warmup_steps``, at
    most half the horizon (at least 1)."""
    r = load(schedule).get("remedy") or {}
    w = int(r.get("warmup_steps") or 0) or round(horizon * WARMUP_FRACTION)
    return max(1, min(w, horizon // 2))


def remedy_horizon(schedule, scratch_steps: int) -> int:
    """The remedy's run length for a model that would train ``scratch_steps`` from scratch:
    its ``horizon_fraction_of_scratch`` of them (the plain schedule's fraction when absent)."""
    r = load(schedule).get("remedy") or {}
    frac = r.get("horizon_fraction_of_scratch") or HORIZON_FRACTION
    return max(1, round(scratch_steps * float(frac)))


def remedy_lr_factor(step: int, horizon: int, schedule, factor: float = 1.0) -> float:
    """The remedy's multiplier of the peak rate at ``step`` for a parameter group whose
    ``lemon_lr_factor`` is ``factor``: ``lr_factor`` with the remedy's warmup, times the
    factor, which is held ``lr_factor_hold_steps`` steps and then ramped linearly to 1 over
    ``lr_factor_ramp_steps`` (held for the whole run when the hold is None)."""
    r = load(schedule).get("remedy") or {}
    base = lr_factor(step, horizon, remedy_warmup(schedule, horizon))
    hold, ramp = r.get("lr_factor_hold_steps"), int(r.get("lr_factor_ramp_steps") or 0)
    if hold is None or step < hold:
        return base * factor
    if ramp <= 0 or step >= hold + ramp:
        return base
    return base * (factor + (1.0 - factor) * (step - hold) / ramp)


def scheduler(optimizer, schedule, horizon: int):
    """A ``torch.optim.lr_scheduler.LambdaLR`` that follows ``remedy_lr_factor`` for every
    group of ``param_groups`` (their initial rates already carry the factors: the lambdas
    divide them out).  Pass it to a transformers ``Trainer`` as ``optimizers=(opt, sched)``."""
    import torch

    sched = load(schedule)
    lambdas = []
    for g in optimizer.param_groups:
        f = float(g.get("lemon_lr_factor", 1.0))
        lambdas.append(lambda s, f=f: remedy_lr_factor(s, horizon, sched, f) / f)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# --------------------------------------------------------------------------- the spike's remedy
#: fan-in roles (lemon-onnx's description keys) and the axis of the source/target sizes their
#: input has: a weight reading a stream whose units were copied k times moves the function k
#: times as far per Adam step as the source's weight did (every copy takes the same step)
_FAN_IN = {"q": "hidden", "k": "hidden", "v": "hidden", "qkv": "hidden", "kv": "hidden",
           "up": "hidden", "gate": "hidden", "gate_up": "hidden", "out": "attention",
           "down": "ffn", "linear": "hidden"}


def _input_ratio(plan: dict, axis: str) -> float | None:
    src, tgt = plan.get("source") or {}, plan.get("target") or {}
    if axis == "attention":
        try:
            s = src["heads"] * src.get("head_dim", src["hidden"] // src["heads"])
            t = tgt["heads"] * tgt.get("head_dim", tgt["hidden"] // tgt["heads"])
        except (KeyError, TypeError, ZeroDivisionError):
            return None
        return s / t
    if src.get(axis) and tgt.get(axis):
        return src[axis] / tgt[axis]
    return None


def _role(key: str) -> str | None:
    """``blocks[0].attention.qkv.bias_node@1`` -> ``qkv``; ``head.linear.node@1`` -> ``linear``."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("attention", "mlp", "head") and i + 1 < len(parts):
            return parts[i + 1]
    return None


def lr_factors(plan: dict | None, tensors: list[dict]) -> dict[str, float]:
    """Per-parameter multipliers of the learning rate: d/D for a weight matrix whose input axis
    was widened from d to D units (1/k when every unit has k copies), 1 for everything else
    (vectors, embeddings: their updates reach the function once whatever the width).  A
    parameter with several sources (a tied embedding and head) takes the smallest.  Empty
    without a plan or a widening."""
    if not plan:
        return {}
    out = {}
    for t in tensors:
        if len(t.get("shape") or ()) != 2 or not isinstance(t.get("from"), list):
            continue
        f = 1.0
        for src in t["from"]:
            role = _role(src.get("key", "")) if isinstance(src, dict) else None
            if role is None or src["key"].rsplit(".", 1)[-1] == "bias":
                continue
            r = _input_ratio(plan, _FAN_IN.get(role, "hidden"))
            if r is not None and r < 1.0:
                f = min(f, r)
        if f < 1.0:
            out[t["name"]] = round(f, 6)
    return out


def load(schedule) -> dict:
    """``lemon_schedule.json`` as a dict: from a hand-off folder, the file, or the dict itself."""
    if isinstance(schedule, dict):
        return schedule
    import json
    from pathlib import Path

    p = Path(schedule)
    if p.is_dir():
        p = p / "lemon_schedule.json"
    return json.loads(p.read_text())


def param_groups(model, schedule, lr: float, **group_options) -> list[dict]:
    """The model's trainable parameters in optimizer groups, one per learning-rate factor of
    ``schedule["remedy"]["lr_factors"]`` (1 for a parameter it does not name): each group's
    ``lr`` is ``lr`` times its factor, and ``lemon_lr_factor`` keeps the factor.  A scheduler
    that multiplies each group's initial rate (``LambdaLR``, transformers' schedules) keeps the
    factors.  Tied parameters appear once.  No torch import: any ``named_parameters()``."""
    factors = (load(schedule).get("remedy") or {}).get("lr_factors") or {}
    groups: dict[float, list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        f = float(factors.get(name, 1.0))
        groups.setdefault(f, []).append(p)
    return [dict(group_options, params=ps, lr=lr * f, lemon_lr_factor=f)
            for f, ps in sorted(groups.items(), reverse=True)]


def optimizer(model, schedule, lr: float, *, betas=(0.9, 0.95), weight_decay: float = 0.1,
              **adamw_options):
    """``torch.optim.AdamW`` over ``param_groups`` (pass it to a transformers ``Trainer`` as
    ``optimizers=(opt, None)``: Trainer's scheduler then scales each group's rate)."""
    import torch

    return torch.optim.AdamW(param_groups(model, schedule, lr), lr=lr, betas=betas,
                             weight_decay=weight_decay, **adamw_options)


def warm_start(model, optimizer, batches, steps: int | None = None, *, schedule=None,
               loss=None, max_grad_norm: float | None = 1.0) -> int:
    """Fill Adam's moment estimates on ``steps`` batches (``schedule["remedy"]
    ["adam_warm_start_steps"]`` when None) with every learning rate at 0, so that the first
    real updates are m/sqrt(v) of measured statistics instead of sign-sized steps from empty
    ones.  The weights do not move (AdamW's decay is lr x weight_decay: 0); the optimizer's step
    count advances, so its bias correction stays right.  ``batches``: an iterable of keyword
    dicts for the model (``input_ids``, ``labels``...) or of tensors (``input_ids=labels=x``);
    ``loss(model, batch)`` overrides how a batch gives its loss.  Returns the steps taken."""
    import torch

    if steps is None:
        steps = int((load(schedule).get("remedy") or {}).get("adam_warm_start_steps") or 0)
    saved = [g["lr"] for g in optimizer.param_groups]
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    done = 0
    try:
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        for batch in batches:
            if done >= steps:
                break
            if loss is not None:
                value = loss(model, batch)
            elif isinstance(batch, torch.Tensor):
                batch = batch.to(device)
                value = model(input_ids=batch, labels=batch).loss
            else:
                value = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                 for k, v in dict(batch).items()}).loss
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            done += 1
        optimizer.zero_grad(set_to_none=True)
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr
        model.train(was_training)
    return done


def trainer_callback(schedule, steps: int | None = None):
    """A ``transformers.TrainerCallback`` that runs ``warm_start`` on the trainer's own data
    loader when training begins (build the optimizer with ``optimizer`` for the factors and
    the rate with ``scheduler`` for the remedy's warmup)."""
    from transformers import TrainerCallback

    class LemonWarmStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None,
                           train_dataloader=None, **kwargs):
            if state.global_step == 0 and optimizer is not None and train_dataloader is not None:
                warm_start(model, optimizer, train_dataloader, steps, schedule=schedule,
                           max_grad_norm=args.max_grad_norm)

    return LemonWarmStart()

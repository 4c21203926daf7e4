#!/usr/bin/env python
"""The search behind lemon_schedule.json's ``remedy`` (figures: benchmarks/payoff/remedy_exploration.json).

    python benchmarks/remedy_search.py HANDOFF_DIR --kfac 0.5 --inherit-fac 0.5 --prefill 50

Trains a handed-off model (``HANDOFF_DIR``: export-torch's folder, e.g. the ``work-gpt2-0/
handoff`` that training_payoff.py leaves in its --out folder) with training_payoff.py's data
and loop and prints the worst validation-loss rise above step 0's in the first 200 steps.
Options: ``--kfac`` multiplies the rate of every weight matrix except the embeddings (1/k for
width k), ``--inherit-fac`` the rate of every parameter, ``--vecfac`` that of the vectors
(biases, norms), ``--prefill N`` fills Adam's statistics on N batches at rate ``--prefill-lr``
(0) first; ``--warmup``/``--horizon``: the schedule.  The curve goes to ``--out`` (JSON).
``--schedule-factors`` takes the hand-off's own ``lr_factors`` (lemon_schedule.json) instead
of ``--kfac``; ``--kfac-hold H --kfac-ramp R`` keep those factors for H steps, then ramp them
linearly to 1 over R steps; ``--fanout-fac F`` multiplies the rate of every block's attention
output and MLP down projections (a twin block's copy of them moves with its source's);
``--eps``/``--beta2``: AdamW's.  ``--record FILE --label L --what
W`` appends the run (arguments, curve, rises) to FILE's ``runs`` (benchmarks/payoff/
remedy_exploration2.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_payoff as tp  # noqa: E402
from lemon_onnx.handoff.schedule import load, lr_factor  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("handoff")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--horizon", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--kfac", type=float, default=1.0)
    ap.add_argument("--inherit-fac", type=float, default=1.0)
    ap.add_argument("--vecfac", type=float, default=1.0)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--prefill-lr", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--schedule-factors", action="store_true")
    ap.add_argument("--kfac-hold", type=int, default=None)
    ap.add_argument("--kfac-ramp", type=int, default=0)
    ap.add_argument("--fanout-fac", type=float, default=1.0,
                    help="multiplies the rate of every block's attention output and MLP down "
                         "projections (a twin block's copy of them moves with its source's)")
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--record", default=None)
    ap.add_argument("--label", default=None)
    ap.add_argument("--what", default=None)
    a = ap.parse_args(argv)
    import transformers as tf

    torch.set_num_threads(a.threads)
    tr, va = tp.corpus(a.corpus_mb)
    data = tp.Batches(tr, va, 16, 64, a.seed, 256)
    m = tf.AutoModelForCausalLM.from_pretrained(a.handoff, attn_implementation="eager")
    factors = {}
    if a.schedule_factors:
        factors = (load(a.handoff).get("remedy") or {}).get("lr_factors") or {}
    groups: dict[tuple, list] = {}
    seen = set()
    for n, p in m.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        f, k = a.inherit_fac, 1.0
        if a.schedule_factors:
            k = float(factors.get(n, 1.0))
        elif p.ndim == 2 and not any(e in n for e in ("wte", "wpe", "embed_tokens")):
            k = a.kfac
        if p.ndim == 1:
            f *= a.vecfac
        elif any(e in n for e in ("attn.c_proj", "mlp.c_proj", "o_proj", "down_proj")):
            f *= a.fanout_fac
        groups.setdefault((f, k), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "base": f, "k": k} for (f, k), ps in groups.items()],
                            lr=a.lr, betas=(0.9, a.beta2), eps=a.eps, weight_decay=0.1)

    def kf(k: float, step: int) -> float:  # the 1/k factor, held then ramped to 1
        if a.kfac_hold is None or step < a.kfac_hold:
            return k
        if a.kfac_ramp <= 0 or step >= a.kfac_hold + a.kfac_ramp:
            return 1.0
        return k + (1.0 - k) * (step - a.kfac_hold) / a.kfac_ramp

    for g in opt.param_groups:
        g["fac"] = g["base"] * g["k"]
    torch.manual_seed(a.seed)
    for i in range(a.prefill):  # the batches no run trains on
        for g in opt.param_groups:
            g["lr"] = a.prefill_lr * g["fac"]
        x = data(tp.WARM_START_OFFSET + i)
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    curve = [(0, tp.val_loss(m, data))]
    t0 = time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = (a.lr * g["base"] * kf(g["k"], step) *
                       lr_factor(step, a.horizon, a.warmup))
        x = data(step)
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if (step + 1) % a.eval_every == 0:
            curve.append((step + 1, tp.val_loss(m, data)))
    v0 = curve[0][1]
    first = max(v for s, v in curve if s <= 200)
    print(f"v0 {v0:.4f}, worst in the first 200 steps {first:.4f} "
          f"({100 * (first / v0 - 1):.1f}%), overall {100 * (max(v for _, v in curve) / v0 - 1):.1f}%,"
          f" end {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "curve": curve}) + "\n")
    if a.record:
        rec = Path(a.record)
        doc = json.loads(rec.read_text()) if rec.exists() else {"runs": []}
        doc["runs"].append({
            "label": a.label, "what": a.what, "handoff": a.handoff,
            "args": {k: v for k, v in vars(a).items() if k not in ("record", "out")},
            "rise_first_200_steps": first / v0 - 1,
            "rise_overall": max(v for _, v in curve) / v0 - 1,
            "end": curve[-1][1], "seconds": round(time.perf_counter() - t0, 1), "curve": curve})
        rec.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

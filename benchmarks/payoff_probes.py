#!/usr/bin/env python
"""Four probes of why the handed-off model does not reach the scratch-best loss sooner
(figures: benchmarks/payoff/probes.json; README, "Does it pay?").

    python benchmarks/payoff_probes.py longer-small ARCH --seed 0 --small-steps 12000 \\
        --target T --record benchmarks/payoff/probes.json
    python benchmarks/payoff_probes.py resplit HANDOFF_DIR --arch ARCH --seed 0 --target T \\
        --record benchmarks/payoff/probes.json
    python benchmarks/payoff_probes.py horizon HANDOFF_DIR --arch ARCH --fraction 0.75 ...
    python benchmarks/payoff_probes.py anneal HANDOFF_DIR --arch ARCH --at 1250,1500 \\
        --anneal-steps 250 --target T --record benchmarks/payoff/probes.json

``longer-small``: the small 2 x 64 model trained longer than the benchmark's 6000 steps (a
sunk cost), handed off as training_payoff.py does (width 2, depth 2, verified), then continued
plain (the scratch-best rate 3e-3, the schedule's 5% warmup, a cosine over 1500 steps) and with
lemon_schedule.json's remedy over its horizon: does a small model closer to the target give
the expanded one a shorter way to it?

``resplit``: a hand-off (export-torch's folder) whose copied MLP units get their fan-out split
again per element instead of lemon-onnx's one random share per copy (the function is unchanged:
each copy set's rows still sum to the source row).  With one share per copy the fan-in
gradients of two copies are proportional at the first step, and Adam, which normalises each
element, moves the copies identically; per-element shares make the gradients differ from the
first step.  Continued like ``longer-small``: does that symmetry hold the expanded model back?

``horizon``: a hand-off continued plain and with the remedy, both over ``--fraction`` of
scratch's steps instead of half: how many steps does it take where half is not enough?

``anneal``: the large architecture from scratch (the hand-off's config.json, the benchmark's
initialisation, data and rate), its cosine over scratch's steps cut at each ``--at`` step and
brought linearly to 0 over ``--anneal-steps`` instead: the loss scratch's model has once its
rate is annealed away, as the small model's was.  Where that annealed loss meets the
handed-off loss says how many scratch steps the small model is worth in the same (annealed)
terms; the benchmark's equal-pace count compares against scratch mid-schedule, whose loss still
carries its rate's noise.

TARGET is the scratch-best validation loss of the same architecture and seed
(training_payoff.py's results.json: ``target_val_loss``).  One thread, training_payoff.py's
data, loop and evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_payoff as tp  # noqa: E402
from lemon_onnx.handoff.schedule import load  # noqa: E402

SCRATCH_STEPS, SCRATCH_BEST_LR = 3000, 3e-3


def copy_sets(units: torch.Tensor) -> list[list[int]]:
    """Rows of ``units`` (one per unit: its fan-in and bias) that are equal, bit for bit."""
    seen: dict[bytes, list[int]] = {}
    for i, row in enumerate(units.detach()):
        seen.setdefault(row.numpy().tobytes(), []).append(i)
    return [g for g in seen.values() if len(g) > 1]


@torch.no_grad()
def resplit_rows(rows: torch.Tensor, sets: list[list[int]], gen: torch.Generator,
                 jitter: float = 0.5) -> None:
    """Each copy set's rows of ``rows`` (unit-major: [units, out]) replaced by per-element
    random shares (1 + jitter * u, u uniform in [-1, 1], normalised) of their sum."""
    for g in sets:
        total = rows[g].sum(0)
        w = 1 + jitter * (2 * torch.rand((len(g),) + total.shape, generator=gen,
                                         dtype=torch.float64) - 1)
        rows[g] = (w / w.sum(0, keepdim=True) * total.double()).to(rows.dtype)


def resplit_mlp(model, arch: str, seed: int) -> int:
    """Per-element fan-out shares for every copied MLP unit; returns the copy sets done."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for blk in (model.transformer.h if arch == "gpt2" else model.model.layers):
        if arch == "gpt2":  # Conv1D: c_fc [in, units], c_proj [units, out]
            sets = copy_sets(torch.cat([blk.mlp.c_fc.weight.T, blk.mlp.c_fc.bias[:, None]], 1))
            resplit_rows(blk.mlp.c_proj.weight.data, sets, gen)
        else:  # Linear [out, in]: a unit is a row of gate and of up, a column of down
            sets = copy_sets(torch.cat([blk.mlp.gate_proj.weight, blk.mlp.up_proj.weight], 1))
            down = blk.mlp.down_proj.weight.data.T.contiguous()
            resplit_rows(down, sets, gen)
            blk.mlp.down_proj.weight.data.copy_(down.T)
        n += len(sets)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    a1 = sub.add_parser("longer-small")
    a1.add_argument("arch", choices=["gpt2", "llama"])
    a1.add_argument("--small-steps", type=int, default=12000)
    a1.add_argument("--work", default=None, help="where the hand-off goes (default: a temp dir)")
    a2 = sub.add_parser("resplit")
    a3 = sub.add_parser("horizon")
    a3.add_argument("--fraction", type=float, default=0.75)
    a4 = sub.add_parser("anneal")
    a4.add_argument("--at", default="1250,1500,1750",
                    help="scratch steps at which its cosine is cut and annealed")
    a4.add_argument("--anneal-steps", type=int, default=250)
    for a in (a2, a3, a4):
        a.add_argument("handoff")
        a.add_argument("--arch", choices=["gpt2", "llama"], required=True)
    for a in (a1, a2, a3, a4):
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--target", type=float, required=True)
        a.add_argument("--record", default=None, help="JSON file whose 'runs' this run joins")
    args = ap.parse_args(argv)
    import transformers as tf

    torch.set_num_threads(1)
    tr, va = tp.corpus(8.0)
    data = tp.Batches(tr, va, 16, 64, args.seed, 256)
    rec = {"probe": args.probe, "arch": args.arch, "seed": args.seed, "target": args.target,
           "command": "python benchmarks/payoff_probes.py " + " ".join(
               argv if argv is not None else sys.argv[1:])}
    if args.probe == "longer-small":
        import tempfile

        work = Path(args.work or tempfile.mkdtemp(prefix="lemon-probe-"))
        torch.manual_seed(args.seed)
        small = tp.small_model(args.arch, 64)
        r0 = tp.train(small, data, steps=args.small_steps, peak_lr=6e-3,
                      horizon=args.small_steps, warmup=max(1, args.small_steps // 20),
                      eval_every=max(50, args.small_steps // 20), label="small 2 x 64")
        large, sched, info = tp.handoff(small, args.arch, args.seed, work, 64)
        rec.update(small_steps=args.small_steps, small_final=r0["final"],
                   handoff_verified=info["verify_passed"],
                   handed_off_val_loss=tp.val_loss(large, data))
        label = f"expanded from a {args.small_steps}-step small model"
    else:
        large = tf.AutoModelForCausalLM.from_pretrained(args.handoff,
                                                        attn_implementation="sdpa")
        sched = load(args.handoff)
    if args.probe == "anneal":
        rec.update(handed_off_val_loss=tp.val_loss(large, data), anneal_steps=args.anneal_steps,
                   runs=[anneal_scratch(large, data, args.seed, c, args.anneal_steps,
                                        args.target) for c in map(int, args.at.split(","))])
        return record(rec, args.record)
    if args.probe == "horizon":
        rec["fraction_of_scratch"] = args.fraction
        label = f"expanded, over {args.fraction:g} of scratch's steps"
    elif args.probe == "resplit":
        before = tp.val_loss(large, data)
        n = resplit_mlp(large, args.arch, args.seed)
        after = tp.val_loss(large, data)
        print(f"per-element shares on {n} copy sets: val loss {before:.6f} -> {after:.6f}")
        if abs(after - before) > 1e-4 * before:
            raise SystemExit("the re-split changed the function")
        rec.update(copy_sets=n, val_loss_before=before, val_loss_after=after)
        label = "expanded, MLP fan-out re-split per element"
    runs = tp.continue_handoff(large, sched, data, target=args.target, seed=args.seed,
                               scratch_steps=SCRATCH_STEPS, scratch_lr=SCRATCH_BEST_LR,
                               fraction=getattr(args, "fraction", None), label=label)
    rec["runs"] = [{"variant": r["variant"], "peak_lr": r["peak_lr"], "horizon": r["horizon"],
                    "final": r["final"], "rises": r["rises"], "reach": r["reach"],
                    "curve": [(s, round(v, 5)) for s, v, _ in r["curve"]]} for r in runs]
    return record(rec, args.record)


def record(rec: dict, path: str | None) -> int:
    """``rec`` joins the 'runs' of the JSON file at ``path`` (made when missing)."""
    if path:
        path = Path(path)
        doc = json.loads(path.read_text()) if path.exists() else {"what": __doc__, "runs": []}
        doc["runs"].append(rec)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def anneal_scratch(large, data, seed: int, cut: int, anneal_steps: int, target: float,
                   scratch_steps: int = SCRATCH_STEPS, lr: float = SCRATCH_BEST_LR) -> dict:
    """Scratch as the benchmark trains it (seed, data, the scratch-best rate ``lr``, 5%
    warmup, a cosine over ``scratch_steps``) up to step ``cut``, then its rate brought
    linearly from there to 0 over ``anneal_steps``; the curve, and the loss before and after
    the annealing."""
    warmup = tp.scratch_warmup(scratch_steps)
    at_cut = tp.lr_factor(cut, scratch_steps, warmup)

    def lr_at(step: int) -> float:
        if step < cut:
            return tp.lr_factor(step, scratch_steps, warmup)
        return at_cut * max(0.0, 1 - (step - cut) / anneal_steps)

    torch.manual_seed(seed)
    m = type(large)(large.config)
    r = tp.train(m, data, steps=cut + anneal_steps, peak_lr=lr,
                 horizon=scratch_steps, warmup=warmup, eval_every=math.gcd(cut, anneal_steps),
                 lr_at=lr_at,
                 label=f"scratch, cut at {cut}, annealed over {anneal_steps}")
    before = next(v for s, v, _ in r["curve"] if s == cut)
    print(f"    at step {cut}: {before:.4f} (rate {at_cut:.3f} of the peak); annealed: "
          f"{r['final']:.4f} (target {target:.4f})", flush=True)
    return {"cut": cut, "rate_at_cut": at_cut, "loss_at_cut": before,
            "annealed": r["final"], "steps": cut + anneal_steps,
            "curve": [(s, round(v, 5)) for s, v, _ in r["curve"]]}


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Does starting from an expanded model save training?  LEMON's claim, measured end to end.

    pip install -e '.[test,payoff]'
    python benchmarks/training_payoff.py --out benchmarks/payoff [--quick]
    python benchmarks/training_payoff.py --report benchmarks/payoff/results.json  # no training

For each architecture (a byte-level GPT-2, and a Llama-style model: RMSNorm, SwiGLU, GQA with 2
KV heads, RoPE) and each seed (the seed sets the data order, the initialisations and the
expansion's random splits):

1. A 2 x 64 model trains on the Python standard library's own source (a sunk cost, as in
   LEMON: reported, not compared).
2. It is exported to ONNX (TorchScript, opset 17), expanded with lemon-onnx (width 2, depth 2:
   4 x 128; ``lemon-onnx verify``'s verdict is recorded), and handed off with export-torch
   (safetensors, config.json, lemon_schedule.json); transformers loads it and its validation
   loss must equal the small model's (relative 1e-4), or the run stops.
3. The large architecture (the hand-off's config.json) trains from scratch: a learning-rate
   sweep on the first seed, its best rate on the others (warmup, cosine over the full
   horizon); the best final validation loss is the seed's target.
4. The handed-off model continues twice: plain, with lemon_schedule.json's schedule (cosine
   over half the scratch horizon, 5% warmup) at the scratch-best rate; and with the
   schedule's ``remedy`` (per-parameter rate factors, its warmup, its peak relative to the
   scratch-best rate, its own horizon: ``remedy_horizon``; an Adam warm start when it asks for
   one).
Reported (results.json): per run the curves, the worst validation-loss rise in the first 200
steps and overall, the steps (warm-start steps counted), training seconds and compute
(6 x parameters x tokens) to the target, the saving against scratch's own steps to its best
loss; the steps scratch itself needs from the handed-off loss to its best (where its curve
first reaches that loss) and the saving a hand-off would have at that pace (``equal_pace``:
a hand-off saves more only by going down faster than scratch from the same loss), and each
run's steps over those; per architecture their mean and spread over the seeds.  A small
model that already starts at or below the target is flagged (its "saving" is the sunk
cost's).  payoff.png (with matplotlib) shows every curve.  Every large run of a seed sees
the same batches in the same order.  Each (architecture, seed) runs in its own one-thread
process, as many at a time as there are CPUs (``--jobs``); an architecture's other seeds
start once its first seed's rate sweep is done.  Default sizes: small 6000 steps (at 2000 the
small model ends 0.16 above the scratch loss and nothing reaches it in the expanded run's
horizon; at 5000 it is already below a 2000-step scratch run, so scratch runs 3000), scratch
3000 at 3e-3 and 6e-3 on the first seed, the plain hand-off 1500 steps, the remedy its own
horizon (1500).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lemon_onnx import io  # noqa: E402
from lemon_onnx.expansion import expand_model  # noqa: E402
from lemon_onnx.handoff import export_torch  # noqa: E402
from lemon_onnx.handoff.schedule import (lr_factor, param_groups,  # noqa: E402
                                         remedy_horizon, remedy_lr_factor, remedy_warmup,
                                         warm_start)
from lemon_onnx.verification import verify  # noqa: E402


# --------------------------------------------------------------------------- data
#: warm-start batches are drawn at these step indices: no run trains on them
WARM_START_OFFSET = 10_000_000


def corpus(megabytes: float) -> tuple[np.ndarray, np.ndarray]:
    """The standard library's .py files as bytes, in a fixed order; the last 5% is validation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    buf, total = [], 0
    for p in files:
        data = p.read_bytes()
        buf.append(data)
        total += len(data)
        if total >= megabytes * 1e6:
            break
    arr = np.frombuffer(b"\n".join(buf), dtype=np.uint8)
    cut = int(len(arr) * 0.95)
    return arr[:cut], arr[cut:]


class Batches:
    """Step ``k``'s batch depends only on (seed, k): every run sees the same data."""

    def __init__(self, train: np.ndarray, val: np.ndarray, batch: int, ctx: int, seed: int,
                 val_windows: int):
        self.train = torch.from_numpy(train.astype(np.int64))
        self.batch, self.ctx, self.seed = batch, ctx, seed
        rng = np.random.default_rng(seed + 1)
        starts = rng.integers(0, len(val) - ctx - 1, size=val_windows)
        v = torch.from_numpy(val.astype(np.int64))
        self.val = torch.stack([v[s:s + ctx] for s in starts])

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.ctx - 1, (self.batch,), generator=g)
        return torch.stack([self.train[s:s + self.ctx] for s in starts])


@torch.no_grad()
def val_loss(model, data: Batches, chunk: int = 32) -> float:
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.item() * len(x)
              for x in torch.split(data.val, chunk)]
    model.train()
    return float(sum(losses) / len(data.val))


# --------------------------------------------------------------------------- training
def gpt2_config(hidden: int, layers: int, heads: int, ctx: int):
    import transformers as tf

    return tf.GPT2Config(vocab_size=256, n_positions=ctx, n_embd=hidden, n_layer=layers,
                         n_head=heads, n_inner=4 * hidden, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
                         attn_implementation="eager")


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, ctx: int):
    """Llama-style: RMSNorm, SwiGLU, grouped-query attention, RoPE; untied head."""
    import transformers as tf

    return tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, max_position_embeddings=ctx,
                          attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                          tie_word_embeddings=False, use_cache=False,
                          attn_implementation="eager")


def small_model(arch: str, ctx: int):
    """The 2 x 64 model of each architecture (the large one is what the hand-off writes)."""
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2LMHeadModel(gpt2_config(64, 2, 4, ctx))
    if arch == "llama":  # SwiGLU at 2/3 of GPT-2's 4x MLP width, rounded to 16; 2 KV heads
        return tf.LlamaForCausalLM(llama_config(64, 2, 4, 2, 176, ctx))
    raise SystemExit(f"unknown architecture {arch!r} (gpt2, llama)")


ARCH_NAMES = {"gpt2": "byte-level GPT-2", "llama": "Llama-style (RMSNorm, SwiGLU, GQA, RoPE)"}


def train(model, data: Batches, *, steps: int, peak_lr: float, horizon: int, warmup: int,
          eval_every: int, label: str, log=print, schedule=None, warm_start_steps: int = 0,
          early_eval_every: int | None = None, early_steps: int = 200,
          lr_at=None) -> dict:
    """AdamW with linear warmup and a cosine to 0 at ``horizon``; validation loss every
    ``eval_every`` steps (every ``early_eval_every`` during the first ``early_steps``; step 0
    included).  With ``schedule`` (lemon_schedule.json) the parameters take its remedy: the
    per-parameter learning-rate factors, its warmup (``warmup`` is ignored) and Adam's
    statistics filled on ``warm_start_steps`` batches at learning rate 0 first (batches the
    run itself never sees).  ``lr_at(step)``, when given, is the multiplier of ``peak_lr``
    instead of the warmup and cosine (no ``schedule`` then).  Wall time counts training steps
    and warm-start steps."""
    groups = (param_groups(model, schedule, peak_lr) if schedule is not None else
              [{"params": list(model.parameters()), "lr": peak_lr, "lemon_lr_factor": 1.0}])
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    if schedule is not None:
        warmup = remedy_warmup(schedule, horizon)
    spent = 0.0
    if warm_start_steps:
        t0 = time.perf_counter()
        warm_start(model, opt, (data(WARM_START_OFFSET + i) for i in range(warm_start_steps)),
                   warm_start_steps)
        spent += time.perf_counter() - t0
    curve = [(0, val_loss(model, data), spent)]
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak_lr * (
                remedy_lr_factor(step, horizon, schedule, group["lemon_lr_factor"])
                if schedule is not None else lr_at(step) if lr_at is not None
                else lr_factor(step, horizon, warmup))
        t0 = time.perf_counter()
        x = data(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        spent += time.perf_counter() - t0
        every = (early_eval_every if early_eval_every and step + 1 <= early_steps
                 else eval_every)
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, val_loss(model, data), spent))
    log(f"  {label}: val loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} in {steps} steps "
        f"({spent:.0f} s)")
    return {"label": label, "peak_lr": peak_lr, "horizon": horizon, "warmup": warmup,
            "steps": steps, "warm_start_steps": warm_start_steps, "curve": curve,
            "final": curve[-1][1], "seconds": spent}


def rises(run: dict, early_steps: int = 200) -> dict:
    """The worst validation loss relative to step 0's: within ``early_steps`` and overall."""
    v0 = run["curve"][0][1]
    early = max(v for s, v, _ in run["curve"] if s <= early_steps)
    worst = max(v for _, v, _ in run["curve"])
    return {"start": v0, "worst_first_steps": early, "rise_first_steps": early / v0 - 1,
            "worst": worst, "rise_overall": worst / v0 - 1}


def scratch_warmup(scratch_steps: int) -> int:
    """The from-scratch runs' linear warmup: 5% of their steps."""
    return max(1, round(scratch_steps * 0.05))


def reach(run: dict, target: float) -> dict:
    """The first evaluated step (and training seconds) at which ``run`` is at or below target."""
    for step, loss, secs in run["curve"]:
        if loss <= target:
            return {"step": step, "seconds": round(secs, 1), "loss": loss}
    return {"step": None, "seconds": None, "loss": None}


def equal_pace(scratch_run: dict, start_loss: float, scratch_to: int | None) -> dict:
    """What scratch itself needs from the small model's loss on: the first evaluated step of
    ``scratch_run`` at or below ``start_loss``, the steps from there to its own reach of the
    target (``scratch_to``), and the saving a hand-off starting at ``start_loss`` would have
    if it went down from there at scratch's pace, mid-schedule and without a rewarm
    (``1 - remaining / scratch_to``).  A hand-off saves more only by going down faster than
    scratch does from the same loss."""
    at = reach(scratch_run, start_loss)["step"]
    if at is None or scratch_to is None:
        return {"scratch_at_start_loss": at, "scratch_steps_from_start_loss": None,
                "equal_pace_saving": None}
    remaining = max(0, scratch_to - at)
    return {"scratch_at_start_loss": at, "scratch_steps_from_start_loss": remaining,
            "equal_pace_saving": 1 - remaining / scratch_to}


def continue_handoff(model, sched: dict, data: Batches, *, target: float, seed: int,
                     scratch_steps: int, scratch_lr: float, scratch_to: int | None = None,
                     tokens: int | None = None, plain_lr_factor: float = 1.0,
                     remedy_peak_factor: float | None = None,
                     warm_start_steps: int | None = None, fraction: float | None = None,
                     eval_every: int = 50, early_eval_every: int | None = 25,
                     early_steps: int = 200, label: str = "expanded") -> list[dict]:
    """The handed-off ``model`` trained twice from the same state: plain (lemon_schedule.json's
    schedule at ``plain_lr_factor`` x the scratch-best rate) and with the schedule's remedy
    (its peak relative to the scratch-best rate unless ``remedy_peak_factor``, its warm start
    unless ``warm_start_steps``); over the schedule's horizons, or both over ``fraction`` of
    scratch's steps.  Each run gets its worst rises, its reach of ``target`` and, with
    ``scratch_to`` (scratch's own steps to its best loss), its saving; warm-start steps count
    as steps.  ``model`` is left with the last run's weights."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    remedy = sched["remedy"]
    horizon = max(1, round(scratch_steps * (fraction or
                                            sched["decay"]["horizon_fraction_of_scratch"])))
    warmup = max(1, round(horizon * sched["warmup"]["fraction_of_horizon"]))
    r_horizon = (horizon if fraction else remedy_horizon(sched, scratch_steps))
    rf = (remedy["peak_lr_relative_to_scratch_best"] if remedy_peak_factor is None
          else remedy_peak_factor)
    ws = remedy["adam_warm_start_steps"] if warm_start_steps is None else warm_start_steps
    runs = []
    for name, lr, use, n_ws, hz in (("plain", scratch_lr * plain_lr_factor, None, 0, horizon),
                                    ("remedy", scratch_lr * rf, sched, ws, r_horizon)):
        model.load_state_dict(state)
        torch.manual_seed(seed)
        r = train(model, data, steps=hz, peak_lr=lr, horizon=hz, warmup=warmup,
                  eval_every=eval_every, schedule=use, warm_start_steps=n_ws,
                  early_eval_every=early_eval_every, early_steps=early_steps,
                  label=f"{label}, {name}, lr {lr:g}")
        got = reach(r, target)
        updates = got["step"]
        steps = None if updates is None else updates + n_ws
        r.update(variant=name, reach=got, rises=rises(r, early_steps), steps_to_target=steps,
                 steps_saved_fraction=(None if steps is None or scratch_to is None
                                       else 1 - steps / scratch_to),
                 flops_to_target=(None if steps is None or tokens is None
                                  else flops(model, steps, tokens)))
        runs.append(r)
        print(f"    worst rise in the first {early_steps} steps "
              f"{100 * r['rises']['rise_first_steps']:.1f}%, overall "
              f"{100 * r['rises']['rise_overall']:.1f}%; final {r['final']:.4f}; " +
              ("target not reached" if steps is None else
               f"target {target:.4f} at {updates} + {n_ws} warm-start steps" +
               ("" if scratch_to is None else
                f" ({100 * r['steps_saved_fraction']:.0f}% fewer than scratch's "
                f"{scratch_to})")), flush=True)
    return runs


# --------------------------------------------------------------------------- ONNX round trip
class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          return_dict=True).logits


def export_onnx(model, path: Path, ctx: int) -> None:
    import warnings

    model.eval()
    x = torch.randint(0, 256, (2, min(ctx, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"batch": 0, "sequence": 1}
        torch.onnx.export(_LogitsOnly(model), (x, torch.ones_like(x)), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"],
                          dynamic_axes={n: {i: a for a, i in axes.items()}
                                        for n in ("input_ids", "attention_mask", "logits")})
    model.train()


# --------------------------------------------------------------------------- main
def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops(model, steps: int, tokens: int) -> float:
    """6 x parameters x tokens per forward+backward step (attention's own terms left out)."""
    return 6.0 * n_params(model) * tokens * steps


def handoff(small, arch: str, seed: int, out: Path, ctx: int, log=print):
    """small -> ONNX -> lemon-onnx expand (width 2, depth 2, ``seed``'s random splits) ->
    verify -> export-torch -> transformers; stops unless it starts where the small one ended."""
    import transformers as tf

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(small, out / "small.onnx", ctx)
    model, plan, _ = expand_model(out / "small.onnx", width=2, depth=2, seed=seed)
    io.save(model, out / "large.onnx")
    del model
    # verified separately so that its verdict is recorded, not fatal: the float32 outputs and
    # the validation loss after the hand-off are what training depends on
    vrep = verify(out / "small.onnx", out / "large.onnx", provider="cpu")
    worst = max(o.max_abs for c in vrep.cases for o in c["outputs"])
    small.config.to_json_file(out / "small_config.json")
    if (out / "handoff").exists():
        import shutil

        shutil.rmtree(out / "handoff")
    res = export_torch(out / "large.onnx", out / "handoff", config=out / "small_config.json")
    # the large runs use PyTorch's fused attention (the same arithmetic as eager, about 7%
    # faster a step here); the small model stays eager for the ONNX export
    large = tf.AutoModelForCausalLM.from_pretrained(out / "handoff",
                                                    attn_implementation="sdpa")
    info = {"verify_passed": vrep.passed, "verify_max_abs_error": worst,
            "seconds": round(time.perf_counter() - t0, 1), "notes": res.notes,
            "source": plan.source, "target": plan.target}
    return large, res.schedule, info


def mean_spread(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    return {"mean": float(np.mean(xs)), "min": float(min(xs)), "max": float(max(xs)),
            "std": float(np.std(xs)), "n": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "payoff"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the CPU count over --jobs)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes side by side, one per (architecture, seed) at a time "
                         "(default: the CPU count); their results are merged")
    ap.add_argument("--archs", default="gpt2,llama")
    ap.add_argument("--seeds", default="0,1,2",
                    help="each seed: data order, initialisations, the expansion's random splits")
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--small-steps", type=int, default=6000)
    ap.add_argument("--small-lr", type=float, default=6e-3)
    ap.add_argument("--scratch-steps", type=int, default=3000)
    ap.add_argument("--scratch-lrs", default="3e-3,6e-3",
                    help="swept on the first seed of each architecture; the other seeds train "
                         "from scratch at its best")
    ap.add_argument("--baseline-lr-factor", type=float, default=1.0,
                    help="the plain hand-off (no remedy), times the scratch-best rate")
    ap.add_argument("--remedy-lr-factor", type=float, default=None,
                    help="the hand-off with lemon_schedule.json's remedy, times the scratch-best "
                         "rate (default: the schedule's remedy.peak_lr_relative_to_scratch_best)")
    ap.add_argument("--warm-start-steps", type=int, default=None,
                    help="default: the schedule's remedy.adam_warm_start_steps")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--early-eval-every", type=int, default=25,
                    help="evaluation interval during the first --early-steps steps")
    ap.add_argument("--early-steps", type=int, default=200)
    ap.add_argument("--max-rise", type=float, default=0.05,
                    help="the no-spike bound checked (and asserted with --quick)")
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--report", metavar="RESULTS_JSON", default=None,
                    help="no training: summarise, report and plot (next to it) an existing "
                         "results.json again")
    ap.add_argument("--quick", action="store_true",
                    help="CI: GPT-2, one seed, reduced sizes; asserts the no-spike property")
    args = ap.parse_args(argv)
    if args.quick:
        args.archs, args.seeds = "gpt2", "0"
        args.small_steps, args.scratch_steps, args.scratch_lrs = 400, 200, "3e-3"
        args.eval_every, args.early_eval_every, args.val_windows = 20, 10, 64
        args.early_steps = 100
        args.corpus_mb = 1.0
    if args.report:
        return report_again(Path(args.report), args.early_steps, args.max_rise)
    archs = args.archs.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    cpus, units = os.cpu_count() or 1, len(archs) * len(seeds)
    jobs = min(units, cpus) if args.jobs is None else max(1, min(args.jobs, units))
    if args.threads is None:
        args.threads = max(1, cpus // jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        return side_by_side(args, argv if argv is not None else sys.argv[1:], archs, seeds,
                            jobs, out)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    train_b, val_b = corpus(args.corpus_mb)
    tokens = args.batch * args.ctx
    print(f"corpus: {len(train_b) / 1e6:.1f} MB train, {len(val_b) / 1e6:.2f} MB validation "
          f"(the standard library's .py files); batch {args.batch} x {args.ctx} bytes; "
          f"{args.threads} threads")
    results = {"command": "python benchmarks/training_payoff.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "settings": vars(args), "torch_threads": torch.get_num_threads(), "runs": []}
    best_lr = {}
    for arch in archs:
        for i, seed in enumerate(seeds):
            print(f"\n== {ARCH_NAMES.get(arch, arch)}, seed {seed}")
            data = Batches(train_b, val_b, args.batch, args.ctx, seed, args.val_windows)
            # 1. the small model (sunk cost)
            torch.manual_seed(seed)
            small = small_model(arch, args.ctx)
            small_run = train(small, data, steps=args.small_steps, peak_lr=args.small_lr,
                              horizon=args.small_steps, warmup=max(1, args.small_steps // 20),
                              eval_every=max(args.eval_every, args.small_steps // 20),
                              label="small 2 x 64")
            small_run["flops"] = flops(small, args.small_steps, tokens)
            # 2. ONNX -> lemon-onnx expand (verified) -> export-torch -> transformers
            large, sched, info = handoff(small, arch, seed, out / f"work-{arch}-{seed}",
                                         args.ctx)
            v_small, v_large = val_loss(small, data), val_loss(large, data)
            info.update(val_loss_small=v_small, val_loss_handed_off=v_large)
            print(f"hand-off: {info['source']['layers']}x{info['source']['hidden']} -> "
                  f"{info['target']['layers']}x{info['target']['hidden']}, lemon-onnx verify "
                  f"{'PASS' if info['verify_passed'] else 'FAIL'} (max abs error "
                  f"{info['verify_max_abs_error']:.1e}); val loss small {v_small:.4f}, "
                  f"handed-off {v_large:.4f} ({info['seconds']} s)")
            if not math.isclose(v_small, v_large, rel_tol=1e-4):
                raise SystemExit("the handed-off model does not start where the small model "
                                 "stopped")
            # 3. the large architecture from scratch (the hand-off's own config.json)
            lrs = ([float(x) for x in args.scratch_lrs.split(",")] if i == 0 else
                   [best_lr[arch]])
            scratch = []
            for lr in lrs:
                torch.manual_seed(seed)
                m = type(large)(large.config)
                scratch.append(train(m, data, steps=args.scratch_steps, peak_lr=lr,
                                     horizon=args.scratch_steps,
                                     warmup=scratch_warmup(args.scratch_steps),
                                     eval_every=args.eval_every, label=f"scratch lr {lr:g}"))
            best = min(scratch, key=lambda r: r["final"])
            best_lr.setdefault(arch, best["peak_lr"])
            target = best["final"]
            # scratch's own steps to its best loss: its curve can touch the final loss before
            # the last step, and the saving is counted against that, not the steps it ran
            scratch_reach = reach(best, target)
            scratch_to = scratch_reach["step"]
            sunk = v_small <= target
            if sunk:  # nothing to measure: the expansion starts at the target
                print(f"    NOTE: the small model ({v_small:.4f}) is already at or below the "
                      f"target ({target:.4f}): its steps saved say nothing about the expansion")
            pace = equal_pace(best, v_large, scratch_to)
            if pace["equal_pace_saving"] is not None:
                print(f"    scratch is at the handed-off loss {v_large:.4f} at step "
                      f"{pace['scratch_at_start_loss']} and needs "
                      f"{pace['scratch_steps_from_start_loss']} more to its best: at scratch's "
                      f"pace from there a hand-off saves {100 * pace['equal_pace_saving']:.0f}%")
            # 4. the handed-off model: plain schedule advice, then with the remedy
            expanded = continue_handoff(
                large, sched, data, target=target, seed=seed,
                scratch_steps=args.scratch_steps, scratch_lr=best["peak_lr"],
                scratch_to=scratch_to, tokens=tokens,
                plain_lr_factor=args.baseline_lr_factor,
                remedy_peak_factor=args.remedy_lr_factor,
                warm_start_steps=args.warm_start_steps, eval_every=args.eval_every,
                early_eval_every=args.early_eval_every, early_steps=args.early_steps)
            horizon, warmup = expanded[0]["horizon"], expanded[0]["warmup"]
            r_horizon, remedy = expanded[1]["horizon"], sched["remedy"]
            step_s = float(np.median([r["seconds"] / (r["steps"] + r["warm_start_steps"])
                                      for r in scratch + expanded]))
            results["runs"].append({
                "arch": arch, "seed": seed, "small": {**small_run, "sunk_cost": True},
                "handoff": info, "scratch": scratch, "scratch_best_lr": best["peak_lr"],
                "target_val_loss": target,
                # the small model already at the target: the savings are the sunk cost's
                "small_at_or_below_target": sunk,
                # what scratch needs from the handed-off loss on (the saving at its pace)
                "scratch_equal_pace": pace,
                "scratch_reach": {**scratch_reach, "steps_run": best["steps"],
                                  "flops": flops(large, scratch_to, tokens)},
                "schedule": {"horizon": horizon, "warmup": warmup, "remedy_horizon": r_horizon,
                             "remedy": {
                    k: v for k, v in remedy.items() if k != "lr_factors"},
                    "lr_factors": remedy["lr_factors"]},
                "expanded": expanded, "median_step_seconds": round(step_s, 4),
                "params": {"small": n_params(small), "large": n_params(large)}})
            (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["summary"] = summarize(results, args.early_steps, args.max_rise)
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    plot(results, out / "payoff.png")
    if args.quick:
        bad = [(r["arch"], r["seed"], e["rises"]["rise_first_steps"])
               for r in results["runs"] for e in r["expanded"] if e["variant"] == "remedy"
               and e["rises"]["rise_first_steps"] > args.max_rise]
        if bad:
            print(f"FAIL: with the remedy the loss rose more than {100 * args.max_rise:g}%: {bad}")
            return 1
    return 0


def side_by_side(args, argv: list, archs: list, seeds: list, jobs: int, out: Path) -> int:
    """Each (architecture, seed) in its own process, ``jobs`` at a time (``args.threads``
    torch threads each; results in ``out/part-ARCH-SEED``): an architecture's first seed
    sweeps the scratch rates, its other seeds start once that one is done and take its best
    rate.  Then one results.json, report and plot of them all; ``total_seconds`` is the wall
    time of the whole."""
    import subprocess

    t_all = time.perf_counter()
    per_process = ("--archs", "--seeds", "--scratch-lrs", "--jobs", "--threads", "--out")
    base, skip = [], False  # the command line less the options set per process
    for a in argv:
        if skip:
            skip = False
        elif a.split("=", 1)[0] in per_process:
            skip = "=" not in a
        else:
            base.append(a)
    units = [(arch, seed) for seed in seeds for arch in archs]  # first seeds first
    pending, running, done = list(units), [], {}
    part = {u: out / f"part-{u[0]}-{u[1]}" for u in units}
    while pending or running:
        ready = [u for u in pending if u[1] == seeds[0] or (u[0], seeds[0]) in done]
        while ready and len(running) < jobs:
            u = ready.pop(0)
            pending.remove(u)
            arch, seed = u
            lrs = (args.scratch_lrs if seed == seeds[0] else
                   repr(done[(arch, seeds[0])]["runs"][0]["scratch_best_lr"]))
            part[u].mkdir(parents=True, exist_ok=True)
            log = open(part[u] / "log.txt", "w")
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--archs", arch,
                   "--seeds", str(seed), "--scratch-lrs", lrs, "--jobs", "1",
                   "--threads", str(args.threads), "--out", str(part[u])]
            print(f"{arch} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            running.append((u, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1)
        for item in list(running):
            u, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode:
                for _, other, _ in running:
                    other.kill()
                print((part[u] / "log.txt").read_text()[-3000:])
                raise SystemExit(f"{u[0]} seed {u[1]}: exit {proc.returncode}")
            done[u] = json.loads((part[u] / "results.json").read_text())
            print(f"{u[0]} seed {u[1]}: done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    order = [(arch, seed) for arch in archs for seed in seeds]
    results = {"command": "python benchmarks/training_payoff.py " + " ".join(argv),
               "settings": {**vars(args), "jobs": jobs},
               "torch_threads": args.threads,
               "runs": [r for u in order for r in done[u]["runs"]],
               "seconds_per_process": {f"{a}-{s}": done[(a, s)]["total_seconds"]
                                       for a, s in order}}
    results["summary"] = summarize(results, args.early_steps, args.max_rise)
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    print(f"\nwall time {results['total_seconds']:.0f} s ({jobs} processes at a time, "
          f"{args.threads} thread(s) each)")
    plot(results, out / "payoff.png")
    return 0


def report_again(path: Path, early_steps: int, max_rise: float) -> int:
    """``--report``: an existing results.json's summary recomputed from its runs (so a summary
    field added since is filled in), written back, reported and plotted."""
    if not path.is_file():
        raise SystemExit(f"--report: {path} is not a file (a results.json of this benchmark)")
    results = json.loads(path.read_text())
    s = results.get("settings", {})
    results["summary"] = summarize(results, s.get("early_steps", early_steps),
                                   s.get("max_rise", max_rise))
    path.write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    plot(results, path.with_name("payoff.png"))
    return 0


def scratch_best(run: dict) -> dict:
    """The scratch run of one results.json run at its scratch-best rate."""
    return next(s for s in run["scratch"] if s["peak_lr"] == run["scratch_best_lr"])


def run_equal_pace(run: dict) -> dict:
    """``equal_pace`` of one results.json run: its scratch-best curve from the handed-off loss."""
    return equal_pace(scratch_best(run), run["handoff"]["val_loss_handed_off"],
                      run["scratch_reach"]["step"])


def summarize(results: dict, early_steps: int, max_rise: float) -> dict:
    out = {}
    for arch in dict.fromkeys(r["arch"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["arch"] == arch]
        paces = [run_equal_pace(r) for r in runs]
        a = {"seeds": [r["seed"] for r in runs], "scratch_best_lr": runs[0]["scratch_best_lr"],
             "target_val_loss": mean_spread([r["target_val_loss"] for r in runs]),
             "scratch_steps": runs[0]["scratch_reach"]["steps_run"],
             "scratch_steps_to_target": mean_spread([r["scratch_reach"]["step"] for r in runs]),
             "scratch_seconds_to_target": mean_spread([r["scratch_reach"]["seconds"]
                                                       for r in runs]),
             "small_seconds_sunk": mean_spread([r["small"]["seconds"] for r in runs]),
             "small_flops_sunk": runs[0]["small"]["flops"],
             "seeds_small_at_or_below_target": [r["seed"] for r in runs
                                                if r.get("small_at_or_below_target")],
             "scratch_flops_to_target": mean_spread([r["scratch_reach"]["flops"]
                                                     for r in runs]),
             "scratch_steps_from_start_loss": mean_spread(
                 [p["scratch_steps_from_start_loss"] for p in paces]),
             "equal_pace_saving": mean_spread([p["equal_pace_saving"] for p in paces])}
        for variant in ("plain", "remedy"):
            es = [e for r in runs for e in r["expanded"] if e["variant"] == variant]
            a[variant] = {
                "peak_lr": [e["peak_lr"] for e in es],
                "warm_start_steps": es[0]["warm_start_steps"],
                "steps_to_target": mean_spread([e["steps_to_target"] for e in es]),
                "reached": sum(e["steps_to_target"] is not None for e in es),
                "steps_saved_fraction": mean_spread([e["steps_saved_fraction"] for e in es]),
                "rise_first_steps": mean_spread([e["rises"]["rise_first_steps"] for e in es]),
                "rise_overall": mean_spread([e["rises"]["rise_overall"] for e in es]),
                "seconds_to_target": mean_spread([e["reach"]["seconds"] for e in es]),
                "flops_to_target": mean_spread([e["flops_to_target"] for e in es]),
                # steps to the target over the steps scratch needs from the same loss
                "steps_over_scratch_from_start_loss": mean_spread([
                    e["steps_to_target"] / p["scratch_steps_from_start_loss"]
                    for r, p in zip(runs, paces) for e in r["expanded"]
                    if e["variant"] == variant and e["steps_to_target"] is not None
                    and p["scratch_steps_from_start_loss"]]),
                "final": mean_spread([e["final"] for e in es]),
                "no_spike_all_seeds": all(e["rises"]["rise_first_steps"] <= max_rise
                                          for e in es),
            }
        out[arch] = a
    return out


def report(results: dict) -> None:
    for arch, a in results["summary"].items():
        print(f"\n{ARCH_NAMES.get(arch, arch)}, seeds {a['seeds']}: scratch-best lr "
              f"{a['scratch_best_lr']:g}, target {a['target_val_loss']['mean']:.4f} (mean), "
              f"scratch {a['scratch_steps']} steps (at its best loss after "
              f"{a['scratch_steps_to_target']['mean']:.0f}), "
              f"{a['scratch_seconds_to_target']['mean']:.0f} "
              f"s; small model (sunk) {a['small_seconds_sunk']['mean']:.0f} s")
        ep, fr = a.get("equal_pace_saving"), a.get("scratch_steps_from_start_loss")
        if ep and ep["mean"] is not None:
            print(f"  from the handed-off loss scratch needs {fr['mean']:.0f} more steps (mean; "
                  f"{fr['min']:.0f}-{fr['max']:.0f}): a hand-off going down at scratch's pace "
                  f"saves {100 * ep['mean']:.1f}% (min {100 * ep['min']:.0f}%, max "
                  f"{100 * ep['max']:.0f}%); more only by going down faster than scratch")
        if a.get("seeds_small_at_or_below_target"):
            print(f"  NOTE: on seeds {a['seeds_small_at_or_below_target']} the small model "
                  "already starts at or below the target: those savings are not the expansion's")
        for variant in ("plain", "remedy"):
            v = a[variant]
            sv, r1, ro = v["steps_saved_fraction"], v["rise_first_steps"], v["rise_overall"]
            saved = ("not reached" if sv["mean"] is None else
                     f"{100 * sv['mean']:.0f}% fewer steps (min {100 * sv['min']:.0f}%, max "
                     f"{100 * sv['max']:.0f}%, {v['reached']}/{len(a['seeds'])} reached)")
            tt = v["seconds_to_target"]["mean"]
            po = v.get("steps_over_scratch_from_start_loss") or {"mean": None}
            if po["mean"] is not None:
                saved += (f", {po['mean']:.1f}x the steps scratch needs from the same loss")
            print(f"  {variant:6s} lr {v['peak_lr'][0]:g}: worst rise first steps "
                  f"{100 * r1['mean']:.1f}% (max {100 * r1['max']:.1f}%), overall "
                  f"{100 * ro['mean']:.1f}% (max {100 * ro['max']:.1f}%); {saved}; "
                  + ("" if tt is None else f"{tt:.0f} s to the target"))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    archs = list(results["summary"])
    fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.4), dpi=110,
                             squeeze=False)
    colors = {"plain": "tab:red", "remedy": "tab:blue"}
    for ax, arch in zip(axes[0], archs):
        runs = [r for r in results["runs"] if r["arch"] == arch]
        lo, hi = [], []
        for j, r in enumerate(runs):
            best = scratch_best(r)
            s, v = zip(*[(c[0], c[1]) for c in best["curve"]])
            ax.plot(s, v, color="tab:gray", lw=1.2, alpha=0.8,
                    label=f"from scratch, lr {best['peak_lr']:g}" if j == 0 else None)
            ax.axhline(r["target_val_loss"], color="black", ls=":", lw=0.8)
            for e in r["expanded"]:
                s, v = zip(*[(c[0], c[1]) for c in e["curve"]])
                kind = "with the remedy" if e["variant"] == "remedy" else "plain"
                ax.plot(s, v, color=colors[e["variant"]], lw=1.2, alpha=0.85,
                        label=f"expanded, {kind}, lr {e['peak_lr']:g}" if j == 0 else None)
                lo.append(min(v))
                hi.append(max(v))
        ax.set_ylim(min(lo) - 0.05, max(hi) + 0.1)
        ax.set_xlabel("training steps of the 4 x 128 model")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_title(f"{ARCH_NAMES.get(arch, arch)}: 2x64 expanded to 4x128, seeds "
                     f"{[r['seed'] for r in runs]}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())

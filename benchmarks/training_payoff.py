#!/usr/bin/env python
"""Does starting from an expanded model save training?  LEMON's claim, measured end to end.

    pip install -e '.[test,payoff]'
    python benchmarks/training_payoff.py --out benchmarks/payoff [--quick]

1. A byte-level GPT-2 (2 layers x 64) trains on the Python standard library's own source (a
   sunk cost, as in LEMON: reported, not compared).
2. It is exported to ONNX (TorchScript, opset 17), expanded with lemon-onnx (width 2, depth 2:
   4 x 128; ``lemon-onnx verify``'s verdict is recorded), and handed off with export-torch
   (safetensors, config.json, lemon_schedule.json); transformers loads it and its validation
   loss must equal the small model's (relative 1e-4), or the run stops.
3. The large architecture trains from scratch at a small sweep of learning rates (warmup, cosine
   over the full horizon); the best final validation loss is the target.
4. The handed-off model continues with lemon_schedule.json's advice: cosine over half the
   scratch horizon with a 5% warmup, at the scratch-best learning rate and at half of it.
Reported: the steps and the training wall time each large run needs to reach the target
(results.json), and both curves (payoff.png, when matplotlib is installed).  Every large run
sees the same batches in the same order.  Default sizes run in about 20 minutes on 2 idle CPU
cores (wall times are also reported at the median step time, which discounts other processes).
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
from lemon_onnx.expand import expand_model  # noqa: E402
from lemon_onnx.handoff import export_torch  # noqa: E402
from lemon_onnx.handoff.schedule import lr_factor  # noqa: E402
from lemon_onnx.verify import verify  # noqa: E402


# --------------------------------------------------------------------------- data
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


def train(model, data: Batches, *, steps: int, peak_lr: float, horizon: int, warmup: int,
          eval_every: int, label: str, log=print) -> dict:
    """AdamW with linear warmup and a cosine to 0 at ``horizon``; validation loss every
    ``eval_every`` steps (step 0 included).  Wall time counts training steps only."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    curve = [(0, val_loss(model, data), 0.0)]
    spent = 0.0
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak_lr * lr_factor(step, horizon, warmup)
        t0 = time.perf_counter()
        x = data(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        spent += time.perf_counter() - t0
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, val_loss(model, data), spent))
    log(f"  {label}: val loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} in {steps} steps "
        f"({spent:.0f} s)")
    return {"label": label, "peak_lr": peak_lr, "horizon": horizon, "warmup": warmup,
            "steps": steps, "curve": curve, "final": curve[-1][1], "seconds": spent}


def reach(run: dict, target: float) -> dict:
    """The first evaluated step (and training seconds) at which ``run`` is at or below target."""
    for step, loss, secs in run["curve"]:
        if loss <= target:
            return {"step": step, "seconds": round(secs, 1), "loss": loss}
    return {"step": None, "seconds": None, "loss": None}


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
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "payoff"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--small-steps", type=int, default=6000)
    ap.add_argument("--small-lr", type=float, default=6e-3)
    ap.add_argument("--scratch-steps", type=int, default=3000)
    ap.add_argument("--scratch-lrs", default="1.5e-3,3e-3,6e-3")
    ap.add_argument("--expanded-lr-factors", default="1,0.5",
                    help="peak learning rates of the expanded runs, times the scratch-best")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    args = ap.parse_args(argv)
    if args.quick:
        args.small_steps, args.scratch_steps, args.scratch_lrs = 60, 40, "6e-3"
        args.expanded_lr_factors, args.eval_every, args.val_windows = "0.5", 10, 32
        args.corpus_mb = 1.0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers as tf

    t_all = time.perf_counter()
    train_b, val_b = corpus(args.corpus_mb)
    data = Batches(train_b, val_b, args.batch, args.ctx, args.seed, args.val_windows)
    print(f"corpus: {len(train_b) / 1e6:.1f} MB train, {len(val_b) / 1e6:.2f} MB validation "
          f"(the standard library's .py files); batch {args.batch} x {args.ctx} bytes; "
          f"{args.threads} threads")

    # 1. the small model (sunk cost)
    torch.manual_seed(args.seed)
    small_cfg = gpt2_config(64, 2, 4, args.ctx)
    small = tf.GPT2LMHeadModel(small_cfg)
    print("small model 2 x 64:")
    small_run = train(small, data, steps=args.small_steps, peak_lr=args.small_lr,
                      horizon=args.small_steps, warmup=max(1, args.small_steps // 20),
                      eval_every=max(args.eval_every, args.small_steps // 50), label="small")

    # 2. ONNX -> lemon-onnx expand (verified) -> export-torch -> transformers
    t0 = time.perf_counter()
    export_onnx(small, out / "small.onnx", args.ctx)
    # verified separately so that its verdict is recorded, not fatal: the float32 outputs and
    # the validation loss after the hand-off are what training depends on
    model, plan, _ = expand_model(out / "small.onnx", width=2, depth=2)
    io.save(model, out / "large.onnx")
    del model
    vrep = verify(out / "small.onnx", out / "large.onnx", provider="cpu")
    worst = max(o.max_abs for c in vrep.cases for o in c["outputs"])
    small_cfg.to_json_file(out / "small_config.json")
    res = export_torch(out / "large.onnx", out / "handoff", config=out / "small_config.json")
    sched = res.schedule
    large = tf.GPT2LMHeadModel.from_pretrained(out / "handoff", attn_implementation="eager")
    t_handoff = time.perf_counter() - t0
    v_small, v_large = val_loss(small, data), val_loss(large, data)
    print(f"hand-off: {plan.source['layers']}x{plan.source['hidden']} -> "
          f"{plan.target['layers']}x{plan.target['hidden']}, lemon-onnx verify "
          f"{'PASS' if vrep.passed else 'FAIL'} (max abs error {worst:.1e}); val loss small "
          f"{v_small:.4f}, handed-off large {v_large:.4f} ({t_handoff:.1f} s)")
    if not math.isclose(v_small, v_large, rel_tol=1e-4):
        raise SystemExit("the handed-off model does not start where the small model stopped")
    state = {k: v.clone() for k, v in large.state_dict().items()}

    # 3. the large architecture from scratch, a small learning-rate sweep
    print("large model 4 x 128 from scratch:")
    large_cfg = gpt2_config(128, 4, 8, args.ctx)
    scratch = []
    for lr in (float(x) for x in args.scratch_lrs.split(",")):
        torch.manual_seed(args.seed)
        m = tf.GPT2LMHeadModel(large_cfg)
        scratch.append(train(m, data, steps=args.scratch_steps, peak_lr=lr,
                             horizon=args.scratch_steps,
                             warmup=max(1, round(args.scratch_steps * 0.05)),
                             eval_every=args.eval_every, label=f"scratch lr {lr:g}"))
    best = min(scratch, key=lambda r: r["final"])
    target = best["final"]

    # 4. the handed-off model with LEMON's schedule
    horizon = max(1, round(args.scratch_steps * sched["decay"]["horizon_fraction_of_scratch"]))
    warmup = max(1, round(horizon * sched["warmup"]["fraction_of_horizon"]))
    print(f"handed-off large model, lemon_schedule.json: cosine over {horizon} steps, warmup "
          f"{warmup}:")
    expanded = []
    for f in (float(x) for x in args.expanded_lr_factors.split(",")):
        large.load_state_dict(state)
        torch.manual_seed(args.seed)
        expanded.append(train(large, data, steps=horizon, peak_lr=best["peak_lr"] * f,
                              horizon=horizon, warmup=warmup, eval_every=args.eval_every,
                              label=f"expanded lr {best['peak_lr'] * f:g}"))

    # every large run has the same architecture and batch, so a step costs the same in each;
    # the median step time over all of them discounts other processes' bursts on the machine
    step_s = float(np.median([r["seconds"] / r["steps"] for r in scratch + expanded]))
    summary = {"target_val_loss": target, "scratch_best_lr": best["peak_lr"],
               "median_step_seconds": round(step_s, 4),
               "scratch": {**reach(best, target), "steps_run": best["steps"],
                           "seconds_run": round(best["seconds"], 1),
                           "seconds_at_median_step": round(best["steps"] * step_s, 1)},
               "expanded": []}
    for r in expanded:
        got = reach(r, target)
        saved = (None if got["step"] is None else round(1 - got["step"] / best["steps"], 3))
        summary["expanded"].append({
            "peak_lr": r["peak_lr"], **got, "final": r["final"], "steps_saved_fraction": saved,
            "seconds_at_median_step": None if got["step"] is None else round(got["step"] * step_s, 1)})
    results = {
        "command": "python benchmarks/training_payoff.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args), "torch_threads": torch.get_num_threads(),
        "small": {**small_run, "sunk_cost": True},
        "handoff": {"val_loss_small": v_small, "val_loss_handed_off": v_large,
                    "verify_passed": vrep.passed, "verify_max_abs_error": worst,
                    "verify_report": vrep.format(), "seconds": round(t_handoff, 1),
                    "notes": res.notes},
        "schedule": {"horizon": horizon, "warmup": warmup, "source": sched["source"]},
        "scratch": scratch, "expanded": expanded, "summary": summary,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\ntarget (scratch-best final val loss, lr {best['peak_lr']:g}, {best['steps']} "
          f"steps, {best['seconds']:.0f} s; {best['steps'] * step_s:.0f} s at the median step "
          f"time {step_s:.3f} s): {target:.4f}")
    for e in summary["expanded"]:
        if e["step"] is None:
            print(f"  expanded lr {e['peak_lr']:g}: did not reach it (final {e['final']:.4f})")
        else:
            print(f"  expanded lr {e['peak_lr']:g}: reached it at step {e['step']} "
                  f"({e['seconds']} s of training, {e['seconds_at_median_step']} s at the median "
                  f"step time), {100 * e['steps_saved_fraction']:.0f}% fewer steps; final "
                  f"{e['final']:.4f}")
    print(f"small model (sunk cost): {small_run['steps']} steps, {small_run['seconds']:.0f} s; "
          f"total {results['total_seconds']:.0f} s")
    plot(results, out / "payoff.png")
    return 0


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    best = results["summary"]["scratch_best_lr"]
    for r in results["scratch"]:
        s, v = zip(*[(c[0], c[1]) for c in r["curve"]])
        is_best = r["peak_lr"] == best
        ax.plot(s, v, color="tab:gray", lw=2 if is_best else 1, alpha=1 if is_best else 0.4,
                label=f"from scratch, lr {r['peak_lr']:g}" + (" (best)" if is_best else ""))
    colors = ["tab:red", "tab:orange", "tab:purple"]
    for r, col in zip(results["expanded"], colors):
        s, v = zip(*[(c[0], c[1]) for c in r["curve"]])
        ax.plot(s, v, color=col, lw=2, label=f"expanded by lemon-onnx, lr {r['peak_lr']:g}")
    target = results["summary"]["target_val_loss"]
    ax.axhline(target, color="black", ls=":", lw=1, label=f"scratch final {target:.3f}")
    lo = min(min(c[1] for c in r["curve"]) for r in results["scratch"] + results["expanded"])
    ax.set_ylim(lo - 0.05, max(lo + 1.5, target + 0.8))
    ax.set_xlabel("training steps of the 4 x 128 model")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title("Byte-level GPT-2 on the Python stdlib: 2x64 expanded to 4x128 vs scratch",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())

"""Numerics of expansion, for the README: per model and expansion, the four figures of issue 9.

    python benchmarks/numerics.py [--real | --real-only] [--seeds N] [--quick] [--json FILE]

For every runnable fixture (TorchScript opset 17 and dynamo opset 18 exports of each family,
plus the edge-case fixtures) at its valid widths and depth 1 to 3, with cancel-init and
zero-init twins, and with --real both real models: expand in memory (no verification), save,
then ``verify`` (CPU) and report

- the source's own float32 error: max |source f32 - source f64| over the outputs;
- the expanded model's float32 error against the source's float64 output, and its ratio to
  the source's own (the float32 rule allows 4x plus a floor of 8 epsilons x max|output|);
- the float64 difference, expanded vs source, relative to max |output| (exact: <= 1e-9;
  fractional widths round sqrt(kd/D) norm scales, allowed 32 epsilons);
- the verdict (and, with --seeds N, whether any of N expansion seeds failed).
Everything is measured in one run; nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lemon_onnx import io  # noqa: E402
from lemon_onnx.errors import LemonError  # noqa: E402
from lemon_onnx.expansion import expand_model  # noqa: E402
from lemon_onnx.verification import verify  # noqa: E402

#: valid width factors per family (Post-LN BERT: integer factors only)
WIDTHS = {"bert": (2,), "gpt2": (1.5, 2), "vit": (1.5, 2), "llama": (1.5, 2)}
EDGE = {"llama-ts17-mqa": (2,), "llama-dy18-g3tied": (2,), "gpt2-dy18-h3": (2,)}


def jobs(real: bool, quick: bool, fixtures: bool = True):
    manifest = json.loads((ROOT / "models/fixtures/manifest.json").read_text())
    depths = (1, 2) if quick else (1, 2, 3)
    for e in manifest if fixtures else ():
        stem = e["file"].removesuffix(".onnx")
        if not e["ort"]["runs"]:
            continue
        if e["variant"] == "main" and e["tag"] in ("ts17", "dy18"):
            widths = WIDTHS[e["arch"]]
        elif stem in EDGE:
            widths = EDGE[stem]
        else:
            continue
        for w in widths:
            for dp in depths:
                for init in (("cancel", "zero") if dp > 1 else ("cancel",)):
                    yield ROOT / "models/fixtures" / e["file"], dict(width=w, depth=dp,
                                                                     depth_init=init)
    rm = ROOT / "models/real/manifest.json"
    if real and rm.exists():
        for e in json.loads(rm.read_text()):
            path = ROOT / "models/real" / e["file"]
            if e["name"] == "minilm":
                for dp in (1, 2):
                    yield path, dict(width=2, depth=dp)
            elif e["file"].startswith("smollm2-ts17"):
                for dp in (1, 2):
                    yield path, dict(hidden=768, heads=12, depth=dp)
                    yield path, dict(width=2, depth=dp)


def measure(path: Path, kw: dict, seed: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    model, plan, _ = expand_model(path, seed=seed, **kw)
    out = io.save(model, tmp / "big.onnx")
    del model
    rep = verify(path, out, provider="cpu", float64="on")
    rows = [o for c in rep.cases for o in c["outputs"]]
    own = max(o.own_error or 0.0 for o in rows)
    err = max(o.error or 0.0 for o in rows)
    s, t = plan.source, plan.target
    return {"model": path.name, "expansion": f"{s['layers']}x{s['hidden']} -> "
            f"{t['layers']}x{t['hidden']}", "init": plan.depth_init or "-",
            "exact": plan.exact, "rounded": bool(plan.rounded), "own": own, "err": err,
            "ratio": rep.max_ratio, "f64": rep.max_alg_rel, "passed": rep.passed,
            "caught_by": rep.caught_by(), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="also the real models (models/real)")
    ap.add_argument("--seeds", type=int, default=1, help="expansion seeds per case")
    ap.add_argument("--real-only", action="store_true", help="only the real models")
    ap.add_argument("--quick", action="store_true", help="depth 1 and 2 only")
    ap.add_argument("--json", help="write the rows as JSON")
    a = ap.parse_args()
    rows = []
    print("| model | expansion | twins | source f32 err | expanded f32 err (worst ratio) | "
          "f64 diff (rel) | verdict |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path, kw in jobs(a.real or a.real_only, a.quick, not a.real_only):
            results = []
            for seed in range(a.seeds):
                try:
                    results.append(measure(path, kw, seed, Path(tmp)))
                except LemonError as exc:
                    results.append({"model": path.name, "expansion": str(kw), "init": "-",
                                    "refused": str(exc)})
                    break
            r = results[0]
            if "refused" in r:
                print(f"| {r['model']} | {kw} | - | - | - | - | refused: {r['refused'][:80]} |")
                rows.append(r)
                continue
            worst = max(results, key=lambda x: x["ratio"] or 0)
            fails = sum(not x["passed"] for x in results)
            verdict = ("PASS" if not fails else f"FAIL x{fails}/{len(results)} "
                       f"({', '.join(worst['caught_by'])})")
            kind = ("approximate (Post-LN depth)" if not r["exact"] else
                    "rounded constants" if r["rounded"] else "exact")
            f64 = max(x["f64"] or 0 for x in results)
            print(f"| {r['model']} | {r['expansion']} | {r['init']} | {r['own']:.2e} | "
                  f"{worst['err']:.2e} ({worst['ratio']:.2f}x) | {f64:.1e} {kind} | {verdict}"
                  f"{f' ({len(results)} seeds)' if len(results) > 1 else ''} |", flush=True)
            rows.extend(results)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Verification figures for the README: every runnable fixture (and the real models when
exported) expanded and verified on the chosen provider; prints a Markdown table.

    python benchmarks/verify_figures.py [--provider auto|cpu|cuda] [--real]
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
from lemon_onnx.expansion import expand_model  # noqa: E402
from lemon_onnx.verification import verify  # noqa: E402

WIDTH = {"bert": 2, "gpt2": 1.5, "vit": 1.5, "llama": 1.5}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--real", action="store_true")
    a = ap.parse_args()
    jobs = []
    for e in json.loads((ROOT / "models/fixtures/manifest.json").read_text()):
        if e["variant"] == "main" and e["ort"]["runs"]:
            jobs.append((ROOT / "models/fixtures" / e["file"], dict(width=WIDTH[e["arch"]], depth=2)))
    real = ROOT / "models/real/manifest.json"
    if a.real and real.exists():
        for e in json.loads(real.read_text()):
            kw = dict(width=2, depth=2) if e["name"] == "minilm" else dict(hidden=768, heads=12, layers=45)
            jobs.append((ROOT / "models/real" / e["file"], kw))
    print("| model | expansion | provider | max abs error | verify s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path, kw in jobs:
            model, plan, _ = expand_model(path, **kw)
            out = io.save(model, Path(tmp) / "big.onnx")
            t0 = time.perf_counter()
            rep = verify(path, out, provider=a.provider)
            dt = time.perf_counter() - t0
            s, t = plan.source, plan.target
            exp = f"{s['layers']}x{s['hidden']} -> {t['layers']}x{t['hidden']}"
            print(f"| {path.name} | {exp} | {rep.provider_used} | {rep.max_abs:.2e}"
                  f"{'' if rep.passed else ' FAIL'} | {dt:.2f} |", flush=True)


if __name__ == "__main__":
    main()

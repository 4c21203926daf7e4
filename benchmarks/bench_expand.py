"""Expansion cost as ratios measured in one run (never as timed unit tests).

    python benchmarks/bench_expand.py MODEL [--width F] [--depth F] [--hidden N --heads N ...]

Prints, for one model: the I/O baseline (onnx-ir load + save of the source, seconds), then
recognise, expand (width/depth passes), save and verify times as multiples of that baseline,
and the peak resident memory relative to the size of the output.  Targets (tracked, not
asserted): recognise+expand within 5x the I/O baseline, peak memory within 2x the output size
when saving with external data.  SmolLM2-135M -> hidden 768 / 45 layers (1.4 GB): expand 7.2x
before the reshape fast paths in lemon_math, 4.1-4.6x after; large tensors are computed lazily
at save time, so with --external-data the peak is 2.3 GB (1.7x the output; eager: 6.1 GB),
while a single-file save must hold the whole protobuf (5.0 GB peak).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lemon_onnx import io  # noqa: E402
from lemon_onnx.expansion import expand_model  # noqa: E402
from lemon_onnx.verification import verify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--width", type=float)
    ap.add_argument("--depth", type=float)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--external-data", action="store_true",
                    help="save the output with one .data file (streamed tensor by tensor)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        io.save(io.load(a.model), Path(tmp) / "copy.onnx")
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, plan, desc = expand_model(a.model, width=a.width, depth=a.depth, hidden=a.hidden,
                                         heads=a.heads, ffn=a.ffn, layers=a.layers)
        t_expand = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = io.save(model, Path(tmp) / "big.onnx", external_data=a.external_data or None)
        t_save = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("big.onnx*"))
        t_verify = None
        if not a.no_verify:
            t0 = time.perf_counter()
            rep = verify(a.model, out)
            t_verify = time.perf_counter() - t0
            assert rep.passed, rep.format()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"model {a.model}: {desc.family}, {plan.source} -> {plan.target}")
    print(f"I/O baseline (load+save source): {base:.2f}s")
    print(f"recognise+expand: {t_expand:.2f}s = {t_expand / base:.2f}x baseline")
    print(f"save output ({size / 2**20:.0f} MiB): {t_save:.2f}s = {t_save / base:.2f}x baseline")
    if t_verify is not None:
        print(f"verify (ONNX Runtime, 2 cases): {t_verify:.2f}s = {t_verify / base:.2f}x baseline")
    print(f"peak RSS {peak / 2**20:.0f} MiB = {peak / size:.2f}x output size")


if __name__ == "__main__":
    main()

"""Estimated vs measured peak memory of ``expand`` (the README's estimate table).

    python benchmarks/estimate_check.py [--verify] MODEL:WIDTH:DEPTH ...

For each job the estimate is computed as ``expand`` computes it (load, recognise, plan,
``estimate.estimate``), then ``python -m lemon_onnx expand`` runs in a child process under
``/usr/bin/time -v`` (``--no-verify`` unless ``--verify``), and its maximum resident set size
and wall time are compared with the estimate: the expansion's peak (``peak_bytes``), or with
``--verify`` the larger of it and the verification's with its float64 level (``verify_peak_bytes``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lemon_onnx


def estimated(src: str, width: float | None, depth: float | None, dest: Path):
    from lemon_onnx import estimate
    from lemon_onnx.expansion import _prepare
    from lemon_onnx.progress import Progress

    model, rec, desc, plan = _prepare(src, width=width, depth=depth, hidden=None, ffn=None,
                                      heads=None, layers=None, placement="interleave",
                                      depth_init="cancel", seed=0, keep_tie=False,
                                      progress=Progress(0))
    return estimate.estimate(desc, plan, model, src=src, dest=dest)


def measured(src: str, width, depth, dest: Path, verify: bool):
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lemon_onnx", "expand", src, "-o",
           str(dest), "-q"]
    cmd += ["--width", str(width)] if width else []
    cmd += ["--depth", str(depth)] if depth else []
    report = dest.with_name("report.json")
    cmd += ["--report", str(report)] if verify else ["--no-verify"]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    how = ""
    if verify and report.exists():  # how the float64 level ran: the peak depends on it
        import json

        level = json.loads(report.read_text())["levels"]["float64"]
        how = ("float64 " + ("by segments" if level.get("segments") else "whole")
               if level["ran"] else f"no float64 ({level['why']})")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", r.stderr).group(1)
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
    return r.returncode, rss * 1024, seconds, (r.stderr.splitlines()[0] if r.returncode
                                               else how)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", nargs="+", help="MODEL:WIDTH:DEPTH (empty for none)")
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    print("| model | expansion | estimated peak | measured peak RSS | ratio | estimated time | "
          "measured time | exit |")
    print("|---|---|---|---|---|---|---|---|")
    for job in args.jobs:
        src, w, d = job.split(":")
        width, depth = (float(w) if w else None), (float(d) if d else None)
        with tempfile.TemporaryDirectory(prefix="lemon-est-") as tmp:
            dest = Path(tmp) / "out.onnx"
            est = estimated(src, width, depth, dest)
            peak = max(est.peak_bytes, est.verify_peak_bytes) if args.verify \
                else est.peak_bytes
            rc, rss, seconds, err = measured(src, width, depth, dest, args.verify)
        print(f"| {Path(src).name} | w{w or 1} d{d or 1}{' +verify' if args.verify else ''} "
              f"| {peak / 1e9:.2f} GB | {rss / 1e9:.2f} GB | {peak / rss:.2f}x | "
              f"{est.seconds:.0f} s | {seconds:.0f} s | {rc}{' ' + err if err else ''} |",
              flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

#!/usr/bin/env python
"""The family matrix: inspect and expand every exported family, classify each outcome.

    python models/export_families.py                  # models/families/*.onnx + manifest.json
    python benchmarks/family_matrix.py [--models models/families] [--out benchmarks/families]
                                       [--workers 1] [--only FAMILY ...] [--timeout 300]

For every model in ``<models>/manifest.json`` (an exporter failure there is carried into the
matrix as ``export failed``) it runs the command line exactly as a user would, through
``python -m lemon_onnx`` with this interpreter (so the checkout's lemon_onnx is used):

* ``inspect MODEL --json``: what was recognised (family, layout, sizes, unrecognised parts);
* ``expand MODEL -o OUT --width W --depth D --inputs <reference npz>`` for (2, 2), (2, 3) and
  (1.5, 2) where width 1.5 gives whole head and KV-head counts; when (2, 2) fails after
  recognition, also width 2 alone and depth 2 alone, to tell which pass is at fault; when
  (2, 2) fails on a model with a head, the trunk probe: the same graph with its ``logits``
  output and the nodes only it needed removed, at (2, 2) -- a diagnostic that tells a head
  problem from a trunk problem (it does not change the model's outcome).

Each run's exit code is classified by the contract (``lemon_onnx.errors.EXIT_CODES``):
0 supported, 1 mismatch, 2 refused, 3 runtime failure, 4 bug, anything else other (a timeout
is ``timeout``).  Recorded: the exit code, the ``wrote`` line or the first line of the error,
the last progress lines, the run time; for exit 4 the run is repeated with
``LEMON_ONNX_DEBUG=1`` and the last traceback frames are kept.

Writes ``<out>/table.md`` (the README's table), ``<out>/results.json`` (every run) and
``<out>/results.md`` (family x exporter ->
outcome (reason), then every run).  Each job works in its own temporary folder, so
``--workers N`` is safe; the default is 1 (the machine's cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTCOME = {0: "supported", 1: "mismatch", 2: "refused", 3: "runtime failure", 4: "bug"}
RUNS = ((2.0, 2.0), (2.0, 3.0), (1.5, 2.0))
ISOLATE = ((2.0, None), (None, 2.0))


def _env(debug=False):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("LEMON_ONNX_DEBUG", None)
    if debug:
        env["LEMON_ONNX_DEBUG"] = "1"
    return env


def lemon(args, timeout, debug=False):
    """(exit code, stdout, stderr, seconds) of ``python -m lemon_onnx ARGS``."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "lemon_onnx", *args], cwd=ROOT,
                           env=_env(debug), capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    return rc, out, err, round(time.perf_counter() - t0, 2)


def classify(rc):
    if rc == "timeout":
        return "timeout"
    return OUTCOME.get(rc, f"other (exit {rc})")


def error_line(err):
    for ln in err.splitlines():
        if ln.startswith("lemon-onnx: error:"):
            return ln[len("lemon-onnx: error:"):].strip()
    return ""


def progress_tail(err, n=4):
    lines = [ln for ln in err.splitlines()
             if ln.startswith("lemon-onnx:") and not ln.startswith("lemon-onnx: error:")]
    return lines[-n:]


def traceback_tail(err, n=12):
    lines = err.splitlines()
    start = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), default=None)
    if start is None:
        return []
    tb = [ln for ln in lines[start:] if not ln.startswith("lemon-onnx:")]
    return tb[-n:]


def width_valid(desc, w):
    """Width ``w`` keeps whole numbers of heads, KV heads, hidden and FFN units."""
    if not desc:  # not recognised: let expand say why
        return True
    keys = ("heads", "hidden", "ffn") if desc.get("kv_heads") == 1 else (
        "heads", "kv_heads", "hidden", "ffn")  # multi-query attention keeps its one KV head
    vals = [desc.get(k) for k in keys]
    return all(isinstance(v, int) and float(v * w).is_integer() for v in vals if v)


def describe(desc):
    """The part of ``inspect --json`` the matrix keeps."""
    keys = ("family", "layout", "norm_type", "norm_form", "num_layers", "hidden", "heads",
            "kv_heads", "head_dim", "ffn", "activation", "vocab", "tie", "rotary")
    d = {k: desc.get(k) for k in keys if k in desc}
    emb = desc.get("embeddings") or {}
    d["embeddings"] = sorted(k for k, v in emb.items() if v)
    head = desc.get("head") or {}
    d["head"] = head.get("kind")
    blocks = desc.get("blocks") or []
    if blocks:
        a = blocks[0].get("attention") or {}
        d["attention"] = a.get("expressed")
        d["fused_qkv"] = bool(a.get("qkv"))
        d["gated_mlp"] = bool((blocks[0].get("mlp") or {}).get("gate"))
    d["outputs"] = [(o.get("name"), o.get("kind")) for o in desc.get("outputs") or []]
    d["unrecognised"] = desc.get("unrecognised") or []
    d["blockers"] = desc.get("blockers") or []
    d["extra_heads"] = desc.get("extra_heads") or []
    return d


def expand_run(src, npz, width, depth, tmp, timeout):
    out = Path(tmp) / f"w{width}-d{depth}.onnx"
    args = ["expand", str(src), "-o", str(out)]
    if width:
        args += ["--width", f"{width:g}"]
    if depth:
        args += ["--depth", f"{depth:g}"]
    if npz:
        args += ["--inputs", str(npz)]
    rc, so, se, dt = lemon(args, timeout)
    rec = {"width": width, "depth": depth, "exit": rc, "outcome": classify(rc), "seconds": dt}
    if rc == 0:
        rec["wrote"] = next((ln for ln in so.splitlines() if ln.startswith("wrote")), "")
    else:
        rec["error"] = error_line(se) or (se.strip().splitlines() or [""])[-1]
        rec["progress"] = progress_tail(se)
        if rc == 4:
            rec["traceback"] = traceback_tail(lemon(args, timeout, debug=True)[2])
    for p in Path(tmp).glob(out.name + "*"):
        p.unlink()
    return rec


def trunk_only(src, dst):
    """A copy of ``src`` without its ``logits`` output (and the nodes only it needed): the
    trunk probe, telling a head problem from a trunk problem.  Diagnostic only."""
    import onnx

    m = onnx.load(str(src))
    g = m.graph
    keep = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    g.output.extend(keep)
    need = {o.name for o in keep}
    nodes = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output):
            nodes.append(n)
            need.update(i for i in n.input if i)
            for a in n.attribute:  # values a subgraph reads from the outer graph
                for sg in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    need.update(i for sn in sg.node for i in sn.input if i)
    del g.node[:]
    g.node.extend(reversed(nodes))
    inits = [i for i in g.initializer if i.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    onnx.save(m, str(dst))
    return dst


def run_model(entry, models, timeout):
    name = f"{entry['family']}-{entry['tag']}"
    res = {"name": name, "family": entry["family"], "kind": entry.get("kind"),
           "tag": entry["tag"], "exporter": entry.get("exporter"), "covers": entry.get("covers"),
           "file": entry.get("file")}
    if entry.get("export_error"):
        res["export_error"] = entry["export_error"]
        res["outcome"] = "export failed"
        return res
    src = models / entry["file"]
    npz = models / entry["reference"] if entry.get("reference") else None
    t0 = time.perf_counter()
    rc, so, se, dt = lemon(["inspect", str(src), "--json"], timeout)
    desc = None
    res["inspect"] = {"exit": rc, "outcome": classify(rc), "seconds": dt}
    if rc == 0:
        try:
            desc = json.loads(so)
            res["inspect"]["description"] = describe(desc)
        except json.JSONDecodeError as e:
            res["inspect"]["error"] = f"inspect --json printed no JSON: {e}"
    else:
        res["inspect"]["error"] = error_line(se)
        if rc == 4:
            res["inspect"]["traceback"] = traceback_tail(
                lemon(["inspect", str(src), "--json"], timeout, debug=True)[2])
    tmp = tempfile.mkdtemp(prefix=f"lemon-matrix-{name}-")
    try:
        runs = []
        for w, d in RUNS:
            if w != 2.0 and not width_valid(desc, w):
                runs.append({"width": w, "depth": d, "outcome": "skipped",
                             "error": f"width {w:g} gives a fractional head/KV-head count"})
                continue
            runs.append(expand_run(src, npz, w, d, tmp, timeout))
        first = runs[0]
        if first["exit"] != 0 and rc == 0:
            for w, d in ISOLATE:
                r = expand_run(src, npz, w, d, tmp, timeout)
                r["isolation"] = True
                runs.append(r)
        res["runs"] = runs
        if first["exit"] != 0 and "logits" in (entry.get("outputs") or []):
            # trunk probe: the same model without its head, at width 2 / depth 2
            trunk = trunk_only(src, Path(tmp) / "trunk.onnx")
            r = expand_run(trunk, npz, 2.0, 2.0, tmp, timeout)
            r["probe"] = "trunk (logits output and head removed)"
            res["trunk_probe"] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    main = [r for r in res["runs"] if not r.get("isolation") and r["outcome"] != "skipped"]
    # supported: every integer-width run passes; a fractional width may be refused (exit 2,
    # e.g. Post-LN models have no exact fractional stream), never fail otherwise
    failing = [r for r in main if r["exit"] != 0 and not (r["exit"] == 2 and r["width"] % 1)]
    res["outcome"] = "supported" if not failing else failing[0]["outcome"]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _short(text, n=150):
    text = re.sub(r"\s+", " ", text or "").strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(res):
    if res is None:
        return "-"
    if res["outcome"] == "export failed":
        x = res["export_error"]
        return f"**export failed** ({x['exporter']}: {x['type']}: {_short(x['message'], 100)})"
    if res["outcome"] == "supported":
        done = [f"w{r['width']:g}d{r['depth']:g}" for r in res["runs"]
                if r["outcome"] == "supported" and not r.get("isolation")]
        frac = [f"; w{r['width']:g}: refused ({_short(r.get('error'), 110)})"
                for r in res["runs"] if not r.get("isolation") and r.get("exit") == 2]
        return "supported (" + ", ".join(done) + ")" + "".join(frac)
    bad = next(r for r in res["runs"] if not r.get("isolation") and r["outcome"]
               not in ("supported", "skipped") and not (r.get("exit") == 2 and r["width"] % 1
                                                         and res["outcome"] != "refused"))
    others = [r for r in res["runs"] if not r.get("isolation") and r is not bad
              and r["outcome"] != "skipped" and r["outcome"] != bad["outcome"]]
    extra = "".join(f"; w{r['width']:g}d{r['depth']:g}: {r['outcome']}" for r in others)
    iso = [r for r in res["runs"] if r.get("isolation")]
    if iso:
        extra += "; " + ", ".join(
            f"{'width' if r['width'] else 'depth'} alone: {r['outcome']}" for r in iso)
    if res.get("trunk_probe"):
        tp = res["trunk_probe"]
        extra += f"; without the head: {tp['outcome']}" + (
            f" ({_short(tp.get('error'), 90)})" if tp["exit"] != 0 else "")
    return (f"**{bad['outcome']}** (exit {bad['exit']}, w{bad['width']:g}d{bad['depth']:g}: "
            f"{_short(bad.get('error'))}){extra}")


#: why a family is refused, in the README's words (the runs' messages are in results.md)
WHY = [("GatherND", "k and v picked with GatherND (the TorchScript export works)"),
       ("sum of head counts", "fused QKV viewed as (heads + 2) rows: a sum of head counts"),
       ("Q, K and V projections apart", "disentangled attention (Q/K weights reused)"),
       ("neither part of a block nor a head", "disentangled attention (Q/K weights reused)"),
       ("No token embedding", "no token or patch embedding (conv feature encoder)"),
       ("could not tie it", "table reshaped by run-time sizes (dynamo export works)"),
       ("computed at run time", "q/k/v cut at bounds computed at run time (dynamo export works)"),
       ("Post-LN", "Post-LN"), ("LayerNorm on the embeddings", "embedding LayerNorm"),
       ("normalises over all", "q/k norm over all heads"),
       ("sits between the patch convolution", "activation after the conv stem"),
       ("lossless only with 'avg'-form", "pooler LayerNorm")]


def _why(text: str) -> str:
    for needle, words in WHY:
        if needle in (text or ""):
            return words
    return _short(text, 80)


def _readme_cell(res) -> str:
    if res is None:
        return "-"
    runs = [r for r in res.get("runs") or [] if not r.get("isolation")]
    if res["outcome"] == "supported":
        frac = [r for r in runs if r.get("exit") == 2]
        return "supported" + (f" (w1.5 refused: {_why(frac[0].get('error'))})" if frac else "")
    bad = next((r for r in runs if r.get("exit") not in (0, None)), None)
    text = bad.get("error") if bad else res.get("inspect", {}).get("error", "")
    return f"{res['outcome']}: {_why(text)}"


def readme_table(results) -> str:
    """family x exporter -> supported / refused (why): the README's table."""
    tags = sorted({r["tag"] for r in results}, key=lambda t: ("ts" not in t, t))
    by = {(r["family"], r["tag"]): r for r in results}
    lines = ["| family | kind | components it brings | " + " | ".join(tags) + " |",
             "|---|---|---|" + "---|" * len(tags)]
    for f in dict.fromkeys(r["family"] for r in results):
        any_r = next(by[(f, t)] for t in tags if (f, t) in by)
        covers = "; ".join(any_r.get("covers") or []).replace("|", "\\|")
        lines.append(f"| {f} | {any_r.get('kind') or ''} | {_short(covers, 160)} | "
                     + " | ".join(_readme_cell(by.get((f, t))) for t in tags) + " |")
    return "\n".join(lines) + "\n"


def markdown(results, total_s):
    tags = sorted({r["tag"] for r in results}, key=lambda t: ("ts" not in t, t))
    fams = list(dict.fromkeys(r["family"] for r in results))
    by = {(r["family"], r["tag"]): r for r in results}
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = ["# Family matrix", "",
             f"Generated by `python benchmarks/family_matrix.py` in {total_s:.0f} s "
             f"({len(results)} models; " + ", ".join(f"{k}: {v}" for k, v in
                                                     sorted(counts.items())) + ").",
             "Runs: expand at width 2 / depth 2, width 2 / depth 3, width 1.5 / depth 2 "
             "(where 1.5 gives whole head counts), checked on the reference inputs; when "
             "w2d2 fails after recognition, width alone and depth alone tell the pass apart; "
             "\"without the head\" is the trunk probe (the graph less its logits output, at "
             "w2d2), a diagnostic that does not change the cell's outcome.",
             "", "| family | kind | " + " | ".join(tags) + " |",
             "|---|---|" + "---|" * len(tags)]
    for f in fams:
        any_r = next(by[(f, t)] for t in tags if (f, t) in by)
        lines.append(f"| {f} | {any_r.get('kind') or ''} | "
                     + " | ".join(_cell(by.get((f, t))) for t in tags) + " |")
    lines += ["", "## Components per family", "", "| family | chosen for |", "|---|---|"]
    for f in fams:
        any_r = next(by[(f, t)] for t in tags if (f, t) in by)
        lines.append(f"| {f} | " + "; ".join(any_r.get("covers") or []) + " |")
    lines += ["", "## What inspect recognised", "",
              "| model | inspect | family | layout | norm | attention | embeddings | head | "
              "unrecognised |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ins = r.get("inspect")
        if not ins:
            continue
        d = ins.get("description") or {}
        lines.append(
            f"| {r['name']} | {ins['outcome']} | {d.get('family', '')} | {d.get('layout', '')} "
            f"| {d.get('norm_type', '')}/{d.get('norm_form', '')} | {d.get('attention', '')}"
            f"{' fused' if d.get('fused_qkv') else ''} | {', '.join(d.get('embeddings', []))} "
            f"| {d.get('head', '')} | {_short('; '.join(d.get('unrecognised', [])), 120)} "
            f"{_short(ins.get('error', ''), 120)} |")
    lines += ["", "## Every run", "", "| model | width | depth | exit | outcome | s | "
              "wrote / error |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for x in r.get("runs") or []:
            what = x.get("wrote") or x.get("error") or ""
            tag = " (isolation)" if x.get("isolation") else ""
            lines.append(f"| {r['name']}{tag} | {x['width'] or '-'} | {x['depth'] or '-'} | "
                         f"{x.get('exit', '-')} | {x['outcome']} | {x.get('seconds', '-')} | "
                         f"{_short(what, 220)} |")
        if r.get("trunk_probe"):
            x = r["trunk_probe"]
            lines.append(f"| {r['name']} (trunk probe, no head) | 2 | 2 | {x['exit']} | "
                         f"{x['outcome']} | {x['seconds']} | "
                         f"{_short(x.get('wrote') or x.get('error'), 220)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=str(ROOT / "models" / "families"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "families"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--only", action="append", help="family (repeatable)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per command")
    args = ap.parse_args(argv)
    models = Path(args.models)
    manifest = json.loads((models / "manifest.json").read_text())
    if args.only:
        manifest = [e for e in manifest if e["family"] in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()

    def job(entry):
        r = run_model(entry, models, args.timeout)
        print(f"  {r['name']:24s} {r['outcome']:16s} {r.get('seconds', 0):6.1f}s  "
              f"{_short(_cell(r), 140)}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = list(pool.map(job, manifest))
    total = time.perf_counter() - t0
    meta = {"seconds": round(total, 1), "workers": args.workers, "runs": [list(r) for r in RUNS],
            "python": sys.version.split()[0]}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1)
                                      + "\n")
    (out / "results.md").write_text(markdown(results, total))
    (out / "table.md").write_text(readme_table(results))
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"\n{len(results)} models in {total:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Layerwise comparison: the hidden state leaving every block, small vs big.

Both models are recognised; the values leaving every block (``blocks[i].output``) are
fetched as extra outputs of in-memory copies of both graphs (nothing is written; external
data is read from the models' own folders), in the model's dtype and, with the float64
level, from the float64 copies.  Small block ``i`` is compared with big block
``plan["blocks"][str(i)]`` (identity by default) on the first ``d`` coordinates of the last
axis, by the same two-level rule as the outputs.  The verdict of ``verify`` is taken on the
untouched models' outputs only (extra outputs can change ONNX Runtime's fusions);
``first_divergent_block`` is the first small block whose hidden state fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import LemonError
from . import compare as cmp
from .models import describe, first_float_dtype
from .runtime import make_session, prepare, run_session
from ..errors import one_line


def block_pairs(small_ir, big_ir, plan: dict, notes: list, cache: dict | None = None):
    """[(small block, big block, small value, big value)], or None if recognition failed."""
    descs = []
    for which, m in (("small", small_ir), ("big", big_ir)):
        try:
            descs.append(describe(m, cache))
        except Exception as exc:  # recognition is best effort here: the outputs still count
            why = str(exc) if isinstance(exc, LemonError) else f"{type(exc).__name__}: {exc}"
            notes.append(f"layerwise skipped: the {which} model was not recognised "
                         f"({one_line(why, 300)})")
            return None
    ds, db = descs
    bmap = plan.get("blocks") or {str(i): i for i in range(len(ds.blocks))}
    pairs = []
    for i, b in enumerate(ds.blocks):
        j = bmap.get(str(i), bmap.get(i))
        if j is None or not (0 <= int(j) < len(db.blocks)):
            notes.append(f"layerwise: block {i} of the small model has no counterpart in the "
                         f"big model (map gives {j!r}, the big model has {len(db.blocks)} "
                         "blocks)")
            continue
        pairs.append((i, int(j), b.output, db.blocks[int(j)].output))
    return pairs


def layerwise_rows(small_path, big_path, small_ir, big_ir, pairs, cases, provider: str,
                   rule: cmp.Rule, ref64, got64, plan: dict, big_cases=None):
    """One row per block pair (worst over cases) and the first divergent small block
    (``big_cases``: the big model's inputs, where the plan maps some: a KV cache)."""
    import onnx

    if not pairs:
        return [], None
    elem = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
            "bfloat16": onnx.TensorProto.BFLOAT16,
            "float64": onnx.TensorProto.DOUBLE}[first_float_dtype(small_ir)]
    results = {}
    for side, path, ir_model, names, feeds in (
            ("small", small_path, small_ir, {p[2] for p in pairs}, cases),
            ("big", big_path, big_ir, {p[3] for p in pairs}, big_cases or cases)):
        names = sorted(names)
        data, fetch = prepare(path, ir_model, names, elem)
        label = f"{path} (with block outputs added)"
        sess, _ = make_session(data, provider, label=label,
                               external_data_dir=Path(path).resolve().parent)
        fetch = {n: fetch[n] for n in names}
        results[side] = [run_session(sess, f, label, fetch) for f in feeds]
        del sess
    hidden = int((plan.get("source") or {}).get("hidden") or 0)
    rows, first = [], None
    for i, j, vs, vb in pairs:
        reps = []
        for k in range(len(cases)):
            a = results["small"][k][vs]
            bb = results["big"][k][vb]
            mapping = {"compare": "prefix", "axis": -1, "size": a.shape[-1]} \
                if (bb.ndim and a.ndim and bb.shape[-1] != a.shape[-1]) else None
            reps.append(cmp.compare_output(vs, a, bb, mapping, rule,
                                           small64=ref64[k][vs] if ref64 else None,
                                           big64=got64[k][vb] if got64 else None))
        agg = cmp.aggregate(reps)
        row = {"block": i, "big_block": j, "value_small": vs, "value_big": vb}
        row.update({k: v for k, v in dataclasses.asdict(agg).items()
                    if k not in ("name", "shape_small", "shape_big")})
        if hidden and a.ndim and a.shape[-1] != hidden:
            row["message"] = (f"block {i}'s hidden state has last axis {a.shape[-1]}, not the "
                              f"source hidden size {hidden}")
        rows.append(row)
        if not agg.passed and first is None:
            first = i
    return rows, first

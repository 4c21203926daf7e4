"""Rules for the contractions: MatMul (with its batch axes broadcast), Gemm and Conv."""

from __future__ import annotations

import onnx_ir as ir

from ..analysis import AxisAnalysis
from ..atoms import size_of
from ..closed_world import rule


@rule("MatMul")
def matmul(an: AxisAnalysis, node: ir.Node) -> None:
    a, b = an.get(node.inputs[0]), an.get(node.inputs[1])
    if a is None or b is None:
        return
    if len(a) == 1:
        a = [[]] + a
    if len(b) == 1:
        b = b + [[]]
    an.try_unify(a[-1], b[-2], f"MatMul {node.name}")
    ba, bb = a[:-2], b[:-2]
    rank = max(len(ba), len(bb))
    batch = []
    for k in range(rank):
        xa = ba[k - rank + len(ba)] if k - rank + len(ba) >= 0 else []
        xb = bb[k - rank + len(bb)] if k - rank + len(bb) >= 0 else []
        if size_of(xa) == 1:
            batch.append(list(xb))
        elif size_of(xb) == 1:
            batch.append(list(xa))
        else:
            an.try_unify(xa, xb, f"MatMul batch {node.name}")
            batch.append(list(xa))
    an.axes[node.outputs[0]] = batch + [list(a[-2]), list(b[-1])]


@rule("Gemm")
def gemm(an: AxisAnalysis, node: ir.Node) -> None:
    a, b = an.get(node.inputs[0]), an.get(node.inputs[1])
    if a is None or b is None:
        return
    ta = node.attributes["transA"].value if "transA" in node.attributes else 0
    tb = node.attributes["transB"].value if "transB" in node.attributes else 0
    m, ka = (a[1], a[0]) if ta else (a[0], a[1])
    kb, n = (b[1], b[0]) if tb else (b[0], b[1])
    an.try_unify(ka, kb, f"Gemm {node.name}")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = an.get(node.inputs[2])
        if c and size_of(c[-1]) != 1:
            an.try_unify(n, c[-1], f"Gemm bias {node.name}")
    an.axes[node.outputs[0]] = [list(m), list(n)]


@rule("Conv")
def conv(an: AxisAnalysis, node: ir.Node) -> None:
    x, w = an.get(node.inputs[0]), an.get(node.inputs[1])
    if x is None or w is None:
        return
    if size_of(x[1]) is not None:  # a symbolic channel axis (optimum's pixel_values) is
        # the weight's, which the input synthesis reads; group=1 assumed for unification
        an.try_unify(x[1], w[1], f"Conv {node.name}")
    out = an.fresh_axes_from_shape(node.outputs[0], "conv")
    if out is None:
        return
    out[0] = list(x[0])
    out[1] = list(w[0])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        an.try_unify(w[0], an.get(node.inputs[2])[0], f"Conv bias {node.name}")
    an.axes[node.outputs[0]] = out

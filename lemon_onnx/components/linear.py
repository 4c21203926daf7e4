"""Component: linear layers (MatMul, or Gemm with any transB; weights reached through
Identity, Transpose or Cast; an optional constant bias Add right after).

match: ``match_all`` finds every one; blocks and heads then say what each one is for.
widen: ``widen`` applies a unit map to the output axis and lemon_math's input-side rule to
the input axis; ``widen_fused`` does it for a fused projection whose output axis holds several
unit axes side by side (q|k|v).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .. import lemon_math as lm
from ..graph import const_array, const_shape, const_source, is_const, nm


@dataclasses.dataclass
class Linear:
    node: str
    op: str  # MatMul | Gemm
    input: str
    output: str  # after the bias, if any
    weight: str  # initializer name
    weight_layout: str  # "in,out" (MatMul/Gemm) or "out,in" (Gemm transB=1, or a Transpose)
    in_features: int
    out_features: int
    bias: str | None = None
    bias_node: str | None = None
    weight_via: str | None = None  # a Transpose/Identity node between initializer and MatMul


def match_all(ctx) -> dict[ir.Node, Linear]:
    out: dict[ir.Node, Linear] = {}
    for n in ctx.graph:
        if n.op_type not in ("MatMul", "Gemm") or len(n.inputs) < 2:
            continue
        x, w = n.inputs[0], n.inputs[1]
        src, hops = const_source(w)
        if src is None or is_const(x) or src.const_value is None and not hops:
            continue
        shape = const_shape(src)
        if shape is None or len(shape) != 2:
            continue
        transposed = sum(1 for h in hops if h.op_type == "Transpose") % 2 == 1
        if n.op_type == "Gemm":
            tb = n.attributes["transB"].value if "transB" in n.attributes else 0
            transposed ^= bool(tb)
        layout = "out,in" if transposed else "in,out"
        fin, fout = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        lin = Linear(n.name, n.op_type, nm(x), nm(n.outputs[0]), nm(src), layout,
                     int(fin), int(fout),
                     weight_via=hops[0].name if hops and hops[0].op_type != "Constant" else None)
        y = n.outputs[0]
        if n.op_type == "Gemm" and len(n.inputs) > 2 and n.inputs[2] is not None:
            b, _ = const_source(n.inputs[2])
            lin.bias = nm(b)
            lin.bias_node = n.name
        else:
            cons = y.consumers()
            if len(cons) == 1 and cons[0].op_type == "Add":
                other = [i for i in cons[0].inputs if i is not y]
                arr = const_array(other[0]) if other else None
                if arr is not None and arr.ndim == 1 and arr.shape[0] == fout:
                    b, _ = const_source(other[0])
                    lin.bias = nm(b)
                    lin.bias_node = cons[0].name
                    lin.output = nm(cons[0].outputs[0])
        out[n] = lin
    return out


def widen(wp, lin: Linear, in_map, out_map, *, tag: str, break_symmetry: bool = True,
           prescale: np.ndarray | None = None):
    node = wp.node(lin.node)
    in_axis, out_axis = (0, 1) if lin.weight_layout == "in,out" else (1, 0)

    def fw(w, in_map=in_map, out_map=out_map):
        rng = wp.ed.rng(tag, "w")  # here, so that a lazy re-evaluation gives the same
        if prescale is not None:  # a layer scale folded into the output columns
            shape = [1, 1]
            shape[out_axis] = -1
            w = (w * prescale.reshape(shape)).astype(w.dtype)
        if out_map is not None:
            w = out_map.apply(w, out_axis)
        if in_map is not None:
            w = lm.expand_in(w, in_axis, in_map, rng=rng, break_symmetry=break_symmetry,
                             noise_scale=wp.plan.noise_scale)
        return w

    def shape(sh, in_map=in_map, out_map=out_map):
        sh = list(sh)
        if out_map is not None:
            sh[out_axis] = out_map.D
        if in_map is not None:
            sh[in_axis] = in_map.D
        return tuple(sh)

    wp.ed.edit(node, 1, f"{tag}:w", fw, shape)
    if lin.bias and out_map is not None:
        bnode, idx = bias_input(wp, lin)
        wp.ed.edit(bnode, idx, f"{tag}:b", lambda b, m=out_map: m.apply(
            b if prescale is None else (b * prescale).astype(b.dtype), -1))


def widen_fused(wp, lin: Linear, in_map, tag: str, out_fn, out_size: int):
    """A fused projection: ``out_fn(arr, axis)`` lays out its output axis (several unit axes
    side by side: the attention component knows how), ``out_size`` is the new output width."""
    node = wp.node(lin.node)
    in_axis, out_axis = (0, 1) if lin.weight_layout == "in,out" else (1, 0)

    def fw(w):
        rng = wp.ed.rng(tag, "w")
        w = out_fn(w, out_axis)
        return (lm.expand_in(w, in_axis, in_map, rng=rng, noise_scale=wp.plan.noise_scale)
                if in_map is not None else w)

    def shape(sh):
        sh = list(sh)
        sh[out_axis] = out_size
        if in_map is not None:
            sh[in_axis] = in_map.D
        return tuple(sh)

    wp.ed.edit(node, 1, f"{tag}:w", fw, shape)
    if lin.bias:
        bnode, idx = bias_input(wp, lin)
        wp.ed.edit(bnode, idx, f"{tag}:b", lambda b: out_fn(b, -1))


def bias_input(wp, lin: Linear) -> tuple[ir.Node, int]:
    """The node that adds the bias of ``lin``, and the input index the bias sits at."""
    bnode = wp.node(lin.bias_node)
    idx = next(i for i, x in enumerate(bnode.inputs)
               if x is not None and const_source(x)[0] is wp.values[lin.bias])
    return bnode, idx

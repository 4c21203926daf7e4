"""Helpers for residual branches, shared by the components that match them: the linear layers
that read a branch's input, and the linear (and layer scale) that ends a branch."""

from __future__ import annotations

import onnx_ir as ir

from ..graph import back_pass, const_array, is_const
from .linear import Linear


def linears_reading(ctx, x: ir.Value, within: set) -> list[Linear]:
    res = []
    for node, lin in ctx.linears.items():
        if node in within and back_pass(node.inputs[0]) is back_pass(x):
            res.append(lin)
        elif node in within and back_pass(node.inputs[0]).producer() is not None \
                and back_pass(node.inputs[0]).producer().op_type == "Reshape" \
                and back_pass(back_pass(node.inputs[0]).producer().inputs[0]) is back_pass(x):
            res.append(lin)  # Gemm on a 2-D view of x (GPT-2)
    return sorted(res, key=lambda l: ctx.order[ctx.node(l.node)])


def branch_tail(ctx, branch_out: ir.Value) -> tuple[ir.Value, ir.Node | None, object]:
    """Walk back from a branch output to the linear that produced it, through Reshape, a
    per-channel Mul by a constant vector (layer scale), a Mul or Div by a scalar constant and
    a norm applied to the branch output (OLMo-2, Gemma-2).  Returns (value, scale node,
    output norm)."""
    v = back_pass(branch_out)
    scale = out_norm = None
    while v not in ctx.lin_by_out and v.producer() is not None:
        p = v.producer()
        if p.op_type == "Reshape":
            v = back_pass(p.inputs[0])
        elif v in ctx.norms and out_norm is None and scale is None:
            out_norm = ctx.norms[v]
            v = back_pass(ctx.values[out_norm.input])
        elif p.op_type in ("Mul", "Div") and len(p.inputs) == 2 and \
                sum(is_const(i) for i in p.inputs) == 1:
            c = next(i for i in p.inputs if is_const(i))
            arr = const_array(c)
            if arr is not None and arr.size == 1 and is_const(p.inputs[1]):
                # a scalar multiplier (Granite's residual_multiplier): the same on every
                # channel, so it holds in any layout and needs no rule
                v = back_pass(p.inputs[0])
                continue
            if p.op_type != "Mul" or scale is not None or arr is None or arr.ndim != 1 \
                    or arr.size <= 1:
                break
            scale = p
            v = back_pass(next(i for i in p.inputs if not is_const(i)))
        else:
            break
    return v, scale, out_norm


def out_linear(ctx, branch_out: ir.Value) -> Linear:
    return ctx.lin_by_out[branch_tail(ctx, branch_out)[0]]


def output_norm(ctx, branch_out: ir.Value):
    """The norm applied to a branch's output before it joins the stream, or None."""
    return branch_tail(ctx, branch_out)[2]


def layer_scale(ctx, branch_out: ir.Value) -> str | None:
    node = branch_tail(ctx, branch_out)[1]
    return node.name if node is not None else None


_VIEWS = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast", "Dropout")


def axis_readers(ctx, y: ir.Value) -> list:
    """The nodes that read the last axis of ``y`` (a fused projection's output) as such: followed through views
    that keep that axis whole (a Gemm's 2-D output reshaped back to 3-D); Shape reads only
    the shape."""
    axis = ctx.leaves(y)
    out, todo, seen = [], [y], set()
    while todo:
        v = todo.pop()
        for c in v.consumers():
            if c in seen or c.op_type == "Shape":
                continue
            seen.add(c)
            if c.op_type in _VIEWS and c.outputs and ctx.leaves(c.outputs[0]) == axis:
                todo.append(c.outputs[0])
            else:
                out.append(c)
    return out

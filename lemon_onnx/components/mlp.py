"""Component: the MLP (feed-forward) branch.

match: one input projection (up) or two (gate and up: the gate passes through the
nonlinearity before meeting up), any elementwise activation, and the down projection.
widen: up/gate by the FFN unit map, down from it to the stream.
twin: the down projection's fan-out cancels (or is zero).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .. import dims

from ..errors import UnsupportedModelError
from . import linear
from .linear import Linear
from .branch import axis_readers, linears_reading, out_linear


@dataclasses.dataclass
class MLP:
    up: Linear
    down: Linear
    gate: Linear | None
    activation: str
    #: one projection computes [gate | up] side by side (Phi-3's gate_up_proj), cut in two
    fused_gate_up: bool = False


def match(ctx, x: ir.Value, branch_out: ir.Value, idx: int) -> MLP:
    nodes = ctx.branch_nodes(x, branch_out)
    down = out_linear(ctx, branch_out)
    ins = [l for l in linears_reading(ctx, x, nodes) if l is not down]
    if not ins:
        raise UnsupportedModelError(f"Block {idx}: the MLP branch has no input projection.")
    ops = {n.op_type for n in nodes}
    act = ("gelu" if ("Erf" in ops or "Gelu" in ops or "BiasGelu" in ops) else
           "gelu_tanh" if ("Tanh" in ops or "FastGelu" in ops) else
           "silu" if "Sigmoid" in ops else "relu" if "Relu" in ops else "unknown")
    if "Gelu" in ops:
        gn = min((n for n in nodes if n.op_type == "Gelu"), key=lambda n: ctx.order.get(n, 0))
        if "approximate" in gn.attributes and gn.attributes["approximate"].value == "tanh":
            act = "gelu_tanh"
    gate = None
    up = ins[0]
    if len(ins) == 2:
        # the gate passes through the nonlinearity before meeting the up projection
        nl = [n for n in nodes if n.op_type in ("Sigmoid", "Erf", "Tanh", "Gelu", "Relu")]
        a, b = ins
        a_nl = any(ctx.depends_on(n.outputs[0], ctx.values[a.output]) for n in nl)
        b_nl = any(ctx.depends_on(n.outputs[0], ctx.values[b.output]) for n in nl)
        gate, up = (a, b) if a_nl and not b_nl else (b, a)
        act = "swiglu" if act == "silu" else f"{act}-glu"
    elif len(ins) > 2:
        raise UnsupportedModelError(f"Block {idx}: the MLP branch has {len(ins)} input "
                                    "projections; expected one (up) or two (gate, up).")
    fused = False
    if gate is None and up.out_features == 2 * down.in_features:
        # [gate | up] in one projection: its output must be cut in two along that axis, and
        # the down projection reads half of it
        readers = axis_readers(ctx, ctx.values[up.output])
        if readers and all(n.op_type in ("Split", "Slice") for n in readers):
            fused = True
            act = "swiglu" if act == "silu" else f"{act}-glu"
            ffn_atoms = {dims.find(a) for a in ctx.leaves(ctx.node(down.node).inputs[0])}
            for a in ctx.leaves(ctx.values[up.output]):
                ctx.roles.name(a, ("ffn" if dims.find(a) in ffn_atoms else "gate_up_parts"))
    for a in ctx.leaves(ctx.values[up.output]):
        ctx.roles.name(a, "ffn")
    return MLP(up, down, gate, act, fused)


def widen(wp, m: MLP, branch_in, stream_map, *, tag: str, prescale=None) -> None:
    if m.gate is not None:
        linear.widen(wp, m.gate, branch_in, wp.ffn_map, tag=f"{tag}.gate")
    if m.fused_gate_up:
        ffn = wp.ffn_map

        def halves(arr, axis):
            return np.concatenate([ffn.apply(p, axis) for p in np.split(arr, 2, axis=axis)],
                                  axis=axis)

        linear.widen_fused(wp, m.up, branch_in, f"{tag}.gate_up", halves, 2 * ffn.D)
    else:
        linear.widen(wp, m.up, branch_in, wp.ffn_map, tag=f"{tag}.up")
    linear.widen(wp, m.down, wp.ffn_map, stream_map, tag=f"{tag}.down", prescale=prescale)


def twin(dp, m: MLP, mapping, init: str, tag: str) -> None:
    # a fused [gate | up] projection has its units paired in each half
    dp.zero_branch(m.down, mapping, init, unit="ffn",
                   fanin=[x for x in (m.up, m.gate) if x], tag=tag + ".mlp")

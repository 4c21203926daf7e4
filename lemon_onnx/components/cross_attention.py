"""Component: cross-attention (encoder-decoder attention), in the decoder of an encoder-decoder.

match: an attention branch of the decoder stream whose queries are computed from the stream
and whose keys and values are not: they come from a *memory* (the encoder's output, a graph
input of the decoder file) through their own K and V projections, or arrive ready-made per
head as graph inputs (the encoder cache of a decoder that runs with past key values, which
reads them instead of recomputing them).  Told apart from self-attention by where the score's
keys come from, never by a name.
widen: q by the query-head map from the branch input, k and v by the KV-head map from the
*memory's* layout (the encoder's output map: its final norm's output, ``zero``/``copies``,
or the stream itself in a Post-LN encoder), the output projection from the query-head map to
the stream.  The memory input and the cache inputs grow with their atoms (hidden, heads).
twin: the output projection's fan-out cancels (or is zero), as in self-attention; the twin's
own K and V projections (or cache inputs) are cloned with the block.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ..errors import PlanError, UnsupportedModelError
from ..graph import back_pass, nm, scalar_scaled
from . import attention, linear
from .branch import linears_reading, out_linear
from .linear import Linear

#: ops that carry K or V from where they are made to the scores without mixing elements
#: across the head axes (views, a scalar scale: BART's sqrt(scale) on k)
_CARRY = ("Reshape", "Transpose", "Identity", "Cast", "Unsqueeze", "Squeeze", "Mul", "Div")


@dataclasses.dataclass
class CrossAttention:
    heads: int
    kv_heads: int
    head_dim: int
    q: Linear
    k: Linear | None  # the K projection of the memory; None where K arrives as a graph input
    v: Linear | None
    out: Linear
    memory: str | None  # the value the K and V projections read: the encoder's output
    key_input: str | None  # the graph input holding K per head (the encoder cache), or None
    value_input: str | None
    score_node: str
    #: the nodes that make K and V from the memory (or carry them from the cache inputs) up to
    #: the scores, off the decoder stream, in graph order: a twin block clones them too
    memory_nodes: list = dataclasses.field(default_factory=list)


def keys_off_stream(ctx, x: ir.Value, branch_out: ir.Value) -> bool:
    """Whether the attention on this branch takes its keys from somewhere else than the
    branch input ``x``: the mark of cross-attention."""
    nodes = ctx.branch_nodes(x, branch_out)
    ordered = sorted(nodes, key=lambda n: ctx.order.get(n, 0))
    if not any(n.op_type in ("Softmax", "Attention") for n in ordered):
        return False
    try:
        _op, _score, _q, k_t, v_t = attention.find_scores(ctx, ordered, -1)
    except UnsupportedModelError:
        return False
    # by values: a Reshape's shape may well be read off the stream (the batch size)
    return not ctx.data_depends_on(k_t, x) and not ctx.data_depends_on(v_t, x)


def _source(ctx, t: ir.Value, idx: int, what: str):
    """Walk back from the keys (or values) the attention reads to where they are made: a
    linear layer's output (returns (Linear, None, nodes)) or a graph input (None, input,
    nodes), through ops that only carry them."""
    nodes = []
    v = t
    for _ in range(32):
        if v in ctx.lin_by_out:
            return ctx.lin_by_out[v], None, nodes
        p = v.producer()
        if p is None:
            if v.is_graph_input():
                return None, v, nodes
            break
        if p.op_type not in _CARRY or not p.inputs or p.inputs[0] is None:
            break
        data = p.inputs[0]  # the data; a Reshape's shape is computed, not carried
        if p.op_type in ("Mul", "Div"):
            data = scalar_scaled(p)
            if data is None:
                break
        nodes.append(p)
        v = data
    raise UnsupportedModelError(
        f"Block {idx}: the cross-attention's {what} ({t.name}) are neither projected from one "
        "value by a linear layer nor read from a graph input (through views and a scalar "
        "scale), so lemon-onnx cannot tell how to widen them.")


def match(ctx, x: ir.Value, branch_out: ir.Value, idx: int) -> CrossAttention:
    nodes = ctx.branch_nodes(x, branch_out)
    ordered = sorted(nodes, key=lambda n: ctx.order.get(n, 0))
    out = out_linear(ctx, branch_out)
    attn_op, score, q_t, k_t, v_t = attention.find_scores(ctx, ordered, idx)
    if attn_op is not None:
        raise UnsupportedModelError(
            f"Block {idx}: cross-attention written as an ONNX Attention op ({attn_op.name}) is "
            "not supported yet.")
    ins = [l for l in linears_reading(ctx, x, nodes) if l is not out]
    if len(ins) != 1 or not ctx.depends_on(q_t, ctx.values[ins[0].output]):
        raise UnsupportedModelError(
            f"Block {idx}: the cross-attention should have one projection of the decoder "
            f"stream (the queries); found {len(ins)}.")
    q = ins[0]
    k, key_in, k_nodes = _source(ctx, k_t, idx, "keys")
    v, value_in, v_nodes = _source(ctx, v_t, idx, "values")
    memory = None
    mem_nodes = set(k_nodes) | set(v_nodes)
    if (k is None) != (v is None):
        raise UnsupportedModelError(
            f"Block {idx}: the cross-attention projects one of its keys and values from the "
            "memory and reads the other from a graph input; lemon-onnx expects both one way.")
    if k is not None:
        if k is v:
            raise UnsupportedModelError(
                f"Block {idx}: the cross-attention's keys and values come out of one fused "
                f"projection ({k.node}); lemon-onnx widens separate K and V projections only.")
        mk, mv = back_pass(ctx.values[k.input]), back_pass(ctx.values[v.input])
        if not mk.is_graph_input():
            raise UnsupportedModelError(
                f"Block {idx}: the cross-attention's keys and values are projected from "
                f"{mk.name}, which is computed in this graph, not given as a graph input (the "
                "encoder's output, as optimum's decoder files take it); lemon-onnx does not "
                "know that value's layout at the new width.",
                hint="Export the encoder and the decoder as separate files (optimum's "
                     "text2text-generation tasks).")
        if mk is not mv:
            raise UnsupportedModelError(
                f"Block {idx}: the cross-attention's K and V projections read different values "
                f"({mk.name}, {mv.name}); expected one memory (the encoder's output).")
        memory = mk
        for lin in (k, v):
            mem_nodes |= ctx.branch_nodes(memory, ctx.values[lin.output])
    heads_l, kv_l, hd_leaves, heads, head_dim, kv_heads = attention.read_heads(
        ctx, None, score, q_t, k_t, k, k, idx)
    if not heads or not head_dim or heads * head_dim != q.out_features:
        raise UnsupportedModelError(
            f"Block {idx}: could not read the cross-attention's head count and head_dim from "
            f"its reshapes (found heads={heads}, head_dim={head_dim}, projection width "
            f"{q.out_features}).")
    attention.roles_attention(ctx, heads_l, [] if kv_heads == 1 else kv_l, hd_leaves)
    attention.name_value_head_dim(ctx, v_t)
    if memory is not None:
        # the memory's last axis is the encoder's hidden width: one hidden map on both sides
        for a in ctx.leaves(memory, -1):
            ctx.roles.name(a, "hidden")
    return CrossAttention(heads, kv_heads, head_dim, q, k, v, out, nm(memory) or None,
                          nm(key_in) or None, nm(value_in) or None, score.name,
                          [n.name for n in sorted(mem_nodes, key=lambda n: ctx.order.get(n, 0))])


def widen(wp, a: CrossAttention, branch_in, stream_map, *, tag: str) -> None:
    """q from the branch input, k and v from the memory's layout (the encoder's output map,
    ``wp.memory_map``), the output projection to the stream."""
    src = wp.plan.source
    if (a.heads, a.kv_heads) != (src["heads"], src["kv_heads"]):
        raise PlanError(f"{tag}: the cross-attention has {a.heads} heads ({a.kv_heads} KV), the "
                        f"self-attention {src['heads']} ({src['kv_heads']} KV); lemon-onnx plans "
                        "one head count per stack.")
    linear.widen(wp, a.q, branch_in, wp.q_map, tag=f"{tag}.q")
    if a.k is not None:
        linear.widen(wp, a.k, wp.memory_map, wp.kv_map, tag=f"{tag}.k")
        linear.widen(wp, a.v, wp.memory_map, wp.kv_map, tag=f"{tag}.v")
    linear.widen(wp, a.out, wp.q_map, stream_map, tag=f"{tag}.o")


def twin(dp, a: CrossAttention, mapping, init: str, tag: str) -> None:
    """The twin's cross-attention adds nothing: its output projection's rows cancel per head
    (pairs of heads made equal through their q, k and v fan-in), or are zero."""
    dp.zero_branch(a.out, mapping, init, unit="head",
                   fanin=[x for x in (a.q, a.k, a.v) if x], tag=tag + ".xattn")


def memory_inputs(desc) -> list[str]:
    """The graph inputs the cross-attentions read as their memory (the encoder's output)."""
    return sorted({b.cross_attention.memory for b in desc.blocks
                   if b.cross_attention is not None and b.cross_attention.memory})


def plan_inputs(desc, memory_map) -> dict:
    """How verification feeds a decoder's encoder output (the plan's ``inputs``): the
    source's, laid out in the encoder's output layout (``memory_map``'s source index; -1 a
    zero slot); ``memory`` marks it, so that a folder can check it against its encoder's
    output layout."""
    return {name: {"from": name, "axis": -1, "memory": True,
                   "index": [int(i) for i in memory_map.src_index]}
            for name in memory_inputs(desc)}

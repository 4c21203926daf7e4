"""Rules for the fused ops of Transformer blocks: the norms (LayerNormalization,
RMSNormalization and ONNX Runtime's SimplifiedLayerNormalization), Attention (its head-count
attributes split the packed axes into heads and head_dim) and RotaryEmbedding."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from ..analysis import AxisAnalysis
from ..atoms import Atom, Axis, UnifyError, leaves, size_of, unify
from ..closed_world import rule
from ..elements import LiteralUse


def _norm(an: AxisAnalysis, node: ir.Node, params: Sequence[int]) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    for i in params:
        if len(node.inputs) > i and node.inputs[i] is not None:
            p = an.get(node.inputs[i])
            if p:
                an.try_unify(x[-1], p[-1], f"{node.op_type} {node.name}")
    an.axes[node.outputs[0]] = [list(a) for a in x]


@rule("LayerNormalization")
def layer_norm(an: AxisAnalysis, node: ir.Node) -> None:
    _norm(an, node, (1, 2))


@rule("RMSNormalization", "SimplifiedLayerNormalization")
def rms_norm(an: AxisAnalysis, node: ir.Node) -> None:
    _norm(an, node, (1,))


def _heads_attr(an: AxisAnalysis, node: ir.Node, axis: Axis, attr: str) -> Atom | None:
    """Split a packed (heads*head_dim) axis by a head-count attribute."""
    if attr not in node.attributes or not node.attributes[attr].value:
        return None
    n = int(node.attributes[attr].value)
    heads, hd = Atom(n, origin=attr), Atom((size_of(axis) or 0) // max(n, 1), origin="head_dim")
    try:
        unify(axis, [heads, hd])
    except UnifyError as e:
        an.conflicts.append(f"{node.op_type} {node.name}: {e}")
        return None
    an.literals.append(LiteralUse(("attr", node.name, attr, 0), n, [heads], node.name,
                                  node.op_type))
    return heads


@rule("Attention")
def attention(an: AxisAnalysis, node: ir.Node) -> None:
    q, k, v = (an.get(node.inputs[i]) if len(node.inputs) > i else None for i in range(3))
    if q is None:
        return
    mask = an.get(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if mask is not None and len(mask) >= 2 and k is not None:
        seq_q, seq_k = q[-2], k[-2]  # the sequence axis: [B, S, H*hd] and [B, H, S, hd] alike
        for m_ax, s_ax in ((mask[-2], seq_q), (mask[-1], seq_k)):
            if size_of(m_ax) != 1 and size_of(s_ax) != 1:
                an.try_unify(m_ax, s_ax, f"Attention mask {node.name}")
    if node.domain in ("", "ai.onnx") and len(q) == 3:
        qh = _heads_attr(an, node, q[-1], "q_num_heads")
        if k is not None:
            kh = _heads_attr(an, node, k[-1], "kv_num_heads")
            if qh is not None and kh is not None and qh.size == kh.size:
                # as many K heads as query heads: the same heads (K and V repeated for
                # the query groups before the op, or plain multi-head attention)
                an.try_unify([qh], [kh], f"Attention heads {node.name}")
            if v is not None:
                vh = _heads_attr(an, node, v[-1], "kv_num_heads")
                if kh is not None and vh is not None:
                    an.try_unify([kh], [vh], f"Attention kv heads {node.name}")
            # head_dim of q and k agree
            hq, hk = leaves(q[-1]), leaves(k[-1])
            if hq and hk:
                an.try_unify([hq[-1]], [hk[-1]], f"Attention {node.name}")
        out = [list(a) for a in q]
        if v is not None:
            out[-1] = list(leaves(q[-1])[:-1]) + list(leaves(v[-1])[-1:]) \
                if len(leaves(q[-1])) > 1 else list(q[-1])
        an.axes[node.outputs[0]] = out
    elif node.domain in ("", "ai.onnx") and len(q) == 4:
        if k is not None:
            an.try_unify(q[-1], k[-1], f"Attention {node.name}")
            if size_of(q[1]) == size_of(k[1]):
                an.try_unify(q[1], k[1], f"Attention heads {node.name}")
            if v is not None:
                an.try_unify(k[1], v[1], f"Attention kv heads {node.name}")
        out = [list(a) for a in q]
        if v is not None:
            out[-1] = list(v[-1])
        an.axes[node.outputs[0]] = out
    else:
        out = an.fresh_axes_from_shape(node.outputs[0], "attention")
        if out is not None:
            an.axes[node.outputs[0]] = out


@rule("RotaryEmbedding")
def rotary_embedding(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    if len(x) == 3:
        _heads_attr(an, node, x[-1], "num_heads")
    elif len(x) == 4 and "num_heads" in node.attributes and node.attributes["num_heads"].value \
            and size_of(x[1]) == node.attributes["num_heads"].value:
        an.literals.append(LiteralUse(("attr", node.name, "num_heads", 0),
                                      int(node.attributes["num_heads"].value), list(x[1]),
                                      node.name, node.op_type))
    an.axes[node.outputs[0]] = [list(a) for a in x]
    cos = an.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if cos is not None and len(x) >= 3:
        hd = leaves(x[-1])[-1:] if len(x) == 3 else x[-1]
        rot = node.attributes["rotary_embedding_dim"].value \
            if "rotary_embedding_dim" in node.attributes else 0
        if not rot and size_of(hd) and size_of(cos[-1]) and 2 * size_of(cos[-1]) == size_of(hd):
            two, half = Atom(2, origin="half-count"), Atom(size_of(hd) // 2, origin="half")
            try:
                unify(hd, [two, half])
                unify(cos[-1], [half])
            except UnifyError as e:
                an.conflicts.append(f"RotaryEmbedding {node.name}: {e}")

"""Attention (com.microsoft): self-attention with one packed QKV projection.

``Attention(input, weights, bias?, mask_index?)`` with ``num_heads``, optional
``qkv_hidden_sizes``, ``unidirectional``, ``scale`` (default 1/sqrt(head_size)) and
``mask_filter_value`` (default -10000): q|k|v = input @ weights + bias, split in heads, softmax(q
k^T scale + mask) v, heads merged.  The mask is additive: ``mask_filter_value`` where a key is
masked (a 1-D ``mask_index`` holds each row's end position, a 2-D one is the raw 0/1 mask), and
again above the diagonal when ``unidirectional``, as ONNX Runtime's kernel adds them.

Unfused as the fused-projection attention the exporters write for GPT-2 (MatMul, Add, Split,
Reshape to heads, Transpose, MatMul, Mul by the scale, Add the mask, Softmax, MatMul, Transpose,
Reshape back), which the attention component widens and twins.  Fused again with
``num_heads`` and the q/k/v sizes read off the widened group.  Refused: a past or present
state, an attention bias, rotary embedding, 3-D/4-D masks.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import convert_attribute

from .. import graph as G
from . import Builder, FusedOp, refuse_form

OPS = tuple(map(FusedOp, ("Attention", "MultiHeadAttention")))

#: the pseudo fused inputs that hold MultiHeadAttention's packed bias, split in q, k, v
_BIAS_PARTS = (100, 101, 102)


def decompose(b: Builder, node: ir.Node) -> dict:
    if node.op_type == "MultiHeadAttention":
        return _decompose_mha(b, node)
    ins = list(node.inputs) + [None] * 7
    x, w, bias, mask = ins[:4]
    for i, what in ((4, "a past state input"), (5, "an attention bias input"),
                    (6, "a past sequence length input")):
        if ins[i] is not None:
            raise refuse_form(node, f"it has {what}")
    if node.attributes.get_int("do_rotary", 0) or \
            node.attributes.get_int("past_present_share_buffer", 0):
        raise refuse_form(node, "it applies rotary embedding or shares a past buffer")
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        raise refuse_form(node, "its present state is used")
    heads = node.attributes.get_int("num_heads")
    wshape = G.const_shape(G.const_source(w)[0])
    if wshape is None or len(wshape) != 2:
        raise refuse_form(node, f"its weights {w.name} are not a constant matrix")
    sizes = list(node.attributes.get_ints("qkv_hidden_sizes", ()) or [wshape[1] // 3] * 3)
    if sum(sizes) != wshape[1] or any(s % heads for s in sizes) or sizes[0] != sizes[1]:
        raise refuse_form(node, f"its q/k/v sizes {sizes} do not fit {heads} heads and weights "
                                f"{list(wshape)}")
    hd, hd_v = sizes[0] // heads, sizes[2] // heads
    scale = node.attributes.get_float("scale")
    scale = float(scale) if scale else 1.0 / math.sqrt(hd)
    filt = node.attributes.get_float("mask_filter_value", -10000.0)
    dt = b.dtype(x)

    qkv = b.op("MatMul", [x, w], role="qkv")
    if bias is not None:
        qkv = b.op("Add", [qkv, bias], role="qkv_bias")
    q, k, v = _split(b, qkv, sizes)

    out = _attend(b, node, q, k, v, heads, hd, hd_v, scale, x, x, mask, filt, dt)
    for i, val in enumerate(ins[:4]):
        if val is not None:
            b.port_in(val, i)
    return {0: out}


def _decompose_mha(b: Builder, node: ir.Node) -> dict:
    """MultiHeadAttention(query, key, value, bias?, key_padding_mask?): q, k and v projected
    outside the op (3-D), their biases packed in one input (split here into three weights the
    width pass widens, packed again when fused)."""
    ins = list(node.inputs) + [None] * 10
    query, key, value, bias, mask = ins[:5]
    for i, what in ((6, "a past key input"),
                    (7, "a past value input"), (8, "a past sequence length input"),
                    (9, "a cache indirection input")):
        if ins[i] is not None:
            raise refuse_form(node, f"it has {what}")
    if key is None or value is None:
        raise refuse_form(node, "its query packs q, k and v (or k and v) in one input")
    for t in (query, key, value):
        if t.shape is not None and len(t.shape) != 3:
            raise refuse_form(node, f"its input {t.name} is not 3-D (batch, positions, hidden)")
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        raise refuse_form(node, "its present key or value is used")
    heads = node.attributes.get_int("num_heads")
    dq, dk, dv = (_last_dim(t, node) for t in (query, key, value))
    if dq != dk or dq % heads or dv % heads:
        raise refuse_form(node, f"its q/k/v sizes {dq}/{dk}/{dv} do not fit {heads} heads")
    hd, hd_v = dq // heads, dv // heads
    scale = node.attributes.get_float("scale")
    scale = float(scale) if scale else 1.0 / math.sqrt(hd)
    filt = node.attributes.get_float("mask_filter_value", -10000.0)
    dt = b.dtype(query)
    q, k, v = query, key, value
    if bias is not None:
        arr = G.const_array(bias)
        if arr is None or arr.shape != (dq + dk + dv,):
            raise refuse_form(node, f"its bias {bias.name} is not a constant of {dq + dk + dv}")
        parts = np.split(arr, [dq, dq + dk])
        pieces = []
        for part, t, role, idx in zip(parts, (query, key, value), ("q", "k", "v"), _BIAS_PARTS):
            w = b.initializer(part, f"bias_{role}")
            pieces.append(b.op("Add", [t, w], role=f"bias_{role}"))
            b.port_in(w, idx)
        q, k, v = pieces
    attn_bias = ins[5]
    if attn_bias is not None and (attn_bias.shape is None or len(attn_bias.shape) != 4):
        raise refuse_form(node, f"its attention bias {attn_bias.name} is not 4-D (batch, heads, "
                                "queries, keys)")
    out = _attend(b, node, q, k, v, heads, hd, hd_v, scale, query, key, mask, filt, dt,
                  attn_bias)
    for i, val in ((0, query), (1, key), (2, value), (4, mask), (5, attn_bias)):
        if val is not None:
            b.port_in(val, i)
    return {0: out}


def _last_dim(t: ir.Value, node: ir.Node) -> int:
    """The size of ``t``'s last axis: declared, or the output width of the constant-weight
    MatMul that makes it."""
    if t.shape is not None and isinstance(t.shape[-1], int):
        return int(t.shape[-1])
    p = t.producer()
    if p is not None and p.op_type == "MatMul":
        w = G.const_shape(G.const_source(p.inputs[1])[0])
        if w is not None and len(w) == 2:
            return int(w[1])
    raise refuse_form(node, f"the size of {t.name}'s last axis is unknown")


def fused_inputs(group, ins: dict, graph: ir.Graph) -> dict:
    """MultiHeadAttention's packed bias, from its three widened pieces."""
    if _BIAS_PARTS[0] not in ins:
        return ins
    arrs = [G.const_array(ins.pop(i)) for i in _BIAS_PARTS]
    name = group.role("bias_q").name.split("/unfused/")[0] + "/bias"
    while name in graph.initializers:
        name += "_"
    v = ir.Value(name=name, const_value=ir.tensor(np.concatenate(arrs), name=name))
    graph.register_initializer(v)
    return {**ins, 3: v}


def _attend(b: Builder, node, q, k, v, heads, hd, hd_v, scale, q_src, k_src, mask, filt, dt,
            attn_bias=None):
    """q, k, v (batch, positions, heads*head_dim) to the merged heads' output: the
    decomposed attention the attention component knows."""
    def heads_of(t, size, perm, role):
        r = b.op("Reshape", [t, b.const(np.array([0, 0, heads, size], np.int64))], role=role)
        return b.op("Transpose", [r], {"perm": perm})

    qh = heads_of(q, hd, [0, 2, 1, 3], "heads_q")
    kt = heads_of(k, hd, [0, 2, 3, 1], "heads_k")
    vh = heads_of(v, hd_v, [0, 2, 1, 3], "heads_v")
    scores = b.op("Mul", [b.op("MatMul", [qh, kt]), b.const(np.array(scale), dt)], role="scale")
    add = _mask(b, node, q_src, k_src, mask, filt, dt)
    if add is not None:
        scores = b.op("Add", [scores, add], role="mask")
    if attn_bias is not None:  # added as given, (batch or 1, heads or 1, queries, keys)
        scores = b.op("Add", [scores, attn_bias], role="attention_bias")
    probs = b.op("Softmax", [scores], {"axis": -1} if b.opset >= 13 else {"axis": 3})
    ctx = b.op("Transpose", [b.op("MatMul", [probs, vh])], {"perm": [0, 2, 1, 3]})
    return b.op("Reshape", [ctx, b.const(np.array([0, 0, heads * hd_v], np.int64))],
                role="merge")


def _split(b: Builder, t: ir.Value, sizes: list[int]):
    if b.opset >= 13:
        return b.op("Split", [t, b.const(np.array(sizes, np.int64))], {"axis": -1}, outputs=3,
                    role="split")
    return b.op("Split", [t], {"axis": -1, "split": sizes}, outputs=3, role="split")


def _positions(b: Builder, t: ir.Value) -> ir.Value:
    """0 .. t's axis 1 length - 1 (int64)."""
    one = b.const(np.array(1, np.int64))
    n = b.op("Gather", [b.op("Shape", [t]), one], {"axis": 0})
    return b.op("Range", [b.const(np.array(0, np.int64)), n, one])


def _mask(b: Builder, node: ir.Node, q_src: ir.Value, k_src: ir.Value, mask, filt: float,
          dt) -> ir.Value | None:
    """The additive mask, broadcast over (batch, heads, query, key), or None (``q_src`` and
    ``k_src``: tensors whose axis 1 is the query and the key positions)."""
    add = None
    if mask is None and not node.attributes.get_int("unidirectional", 0):
        return None  # (no constants made: a node nothing reads would be dropped as dead)
    zero, masked = b.const(np.array(0.0), dt), b.const(np.array(filt), dt)
    if mask is not None:
        rank = len(mask.shape) if mask.shape is not None else None
        if rank == 1:  # each row's end position: keys at or after it are masked
            keys = _positions(b, k_src)
            end = b.unsqueeze(b.op("Cast", [mask], {"to": int(ir.DataType.INT64)}), [1])
            keep = b.op("Less", [keys, end])
        elif rank == 2:  # the raw mask: 0 masks a key
            keep = b.op("Greater", [mask, b.const(np.array(0), mask.dtype)])
        else:
            raise refuse_form(node, f"its mask {mask.name} has rank {rank} (1 or 2 are unfused)")
        add = b.unsqueeze(b.op("Where", [keep, zero, masked]), [1, 2])
    if node.attributes.get_int("unidirectional", 0):
        keys, queries = _positions(b, k_src), _positions(b, q_src)
        above = b.op("Greater", [keys, b.unsqueeze(queries, [1])])  # key > query
        causal = b.op("Where", [above, masked, zero])
        add = causal if add is None else b.op("Add", [add, causal])
    return add


def fused_attrs(group, attrs: dict, ins: dict) -> dict:
    """``num_heads`` and the q/k/v sizes as the passes left them (the heads Reshape, the
    Split), the scale written out when the head size changed."""
    shape = G.const_array(group.role("heads_q").inputs[1])
    heads, hd = int(shape[2]), int(shape[3])
    attrs = dict(attrs)
    attrs["num_heads"] = convert_attribute("num_heads", heads)
    split = group.role("split")  # Attention's packed projection (MultiHeadAttention has none)
    if split is not None:
        sizes = [int(s) for s in G.const_array(split.inputs[1])] if len(split.inputs) > 1 \
            else list(split.attributes["split"].value)
        if "qkv_hidden_sizes" in attrs or len(set(sizes)) > 1:
            attrs["qkv_hidden_sizes"] = convert_attribute("qkv_hidden_sizes", sizes)
    scale = float(G.const_array(group.role("scale").inputs[1]))
    if "scale" not in attrs and not np.isclose(scale, 1.0 / math.sqrt(hd), rtol=1e-7, atol=0):
        attrs["scale"] = convert_attribute("scale", scale)
    return attrs

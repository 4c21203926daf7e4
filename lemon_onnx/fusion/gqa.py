"""GroupQueryAttention and RotaryEmbedding (com.microsoft): the decoder attention of ONNX
Runtime GenAI's model builder, and the rotary op ONNX Runtime's optimizer fuses.

``GroupQueryAttention(query, key?, value?, past_key?, past_value?, seqlens_k,
total_sequence_length, cos_cache?, sin_cache?)`` with ``num_heads``, ``kv_num_heads``,
``scale`` (default 1/sqrt(head_size)), ``softcap``, ``do_rotary``: query packs q | k | v
(``num_heads + 2 kv_num_heads`` heads of ``head_size``) when key and value are absent; the past
keys and values are (batch, kv_num_heads, past, head_size), the present ones the past with the
current tokens appended.  What ONNX Runtime's CPU kernel computes, measured against it
(``tests/test_fusion.py``): row b has ``seqlens_k[b] + 1`` tokens in all; its past is ``0`` on
a first prompt (``sequence_length == total_sequence_length``), else ``seqlens_k[b] + 1 -
sequence_length``; query i sits at position ``past_b + i`` (its rotary angle) and attends to
the keys at or before ``min(past_b + i, seqlens_k[b])``; the KV heads are shared by
``num_heads / kv_num_heads`` query heads each.

Unfused as the decoder attention exporters write for Llama: Split of the packed projection,
heads Reshape and Transpose, rotate-half rotary from the cos/sin tables at those positions
(Gather, the tables doubled, Slice, Neg, Concat, Mul, Add), ``Concat(past, current)`` for
the present keys and values (the KV-cache component's join), ``repeat_kv`` (Unsqueeze,
Expand, Reshape), scaled scores, the mask above as ``Where``, Softmax, the weighted sum, heads
merged.  The join is exact where every row's past is the whole past input (a first prompt,
padded or not; generation with unpadded rows: what the tool's checks feed such a model); with
rows of different lengths after the first prompt the kernel writes each row's tokens at its
own position, which a ``Concat`` does not, so a GroupQueryAttention is never left decomposed
in a written model (``leave_decomposed=False`` in its ``OPS`` record).  Fused again with
``num_heads`` and ``kv_num_heads`` read off the widened group.  Refused: interleaved rotary, a
local window, smooth softmax, position ids, an attention bias or head sinks, the QK output.

``RotaryEmbedding(input, position_ids, cos_cache, sin_cache)``: the same rotation on a
(batch, positions, hidden) or (batch, heads, positions, head_size) input, at the given
positions (a (batch, positions) tensor, or one offset added to 0..positions-1).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import convert_attribute

from .. import graph as G
from . import Builder, FusedOp, refuse_form

OPS = (
    # past key -> present key, past value -> present value; the join is exact only on the
    # inputs the tool's checks feed, so never written decomposed
    FusedOp("GroupQueryAttention", joins={3: 1, 4: 2}, leave_decomposed=False),
    FusedOp("RotaryEmbedding"),
)

I64 = np.int64


def decompose(b: Builder, node: ir.Node) -> dict:
    if node.op_type == "RotaryEmbedding":
        return _decompose_rotary(b, node)
    return _decompose_gqa(b, node)


# --------------------------------------------------------------------------- GroupQueryAttention

def _decompose_gqa(b: Builder, node: ir.Node) -> dict:
    ins = list(node.inputs) + [None] * 12
    query, key, value, past_k, past_v, seqlens, total, cos, sin = ins[:9]
    for i, what in ((9, "position ids"), (10, "an attention bias"), (11, "head sinks")):
        if ins[i] is not None:
            raise refuse_form(node, f"it has {what}")
    a = node.attributes
    for attr, what in (("rotary_interleaved", "interleaved rotary"),
                       ("smooth_softmax", "smooth softmax"), ("qk_output", "a QK output")):
        if a.get_int(attr, 0):
            raise refuse_form(node, f"it computes {what}")
    if a.get_int("local_window_size", -1) != -1:
        raise refuse_form(node, "it attends over a local window")
    if len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output()):
        raise refuse_form(node, "its QK output is used")
    if (past_k is None) != (past_v is None) or (key is None) != (value is None):
        raise refuse_form(node, "it has only one of its key/value (or past key/value) inputs")
    heads, kv_heads = a.get_int("num_heads"), a.get_int("kv_num_heads")
    if not heads or not kv_heads or heads % kv_heads:
        raise refuse_form(node, f"its {heads} heads are not a multiple of its {kv_heads} KV heads")
    width = _last_dim(query, node)
    if key is None:
        if width % (heads + 2 * kv_heads):
            raise refuse_form(node, f"its packed query width {width} is not {heads} + 2 x "
                                    f"{kv_heads} heads")
        hd = width // (heads + 2 * kv_heads)
    else:
        if width % heads:
            raise refuse_form(node, f"its query width {width} is not a multiple of {heads} heads")
        hd = width // heads
    rot = None
    if a.get_int("do_rotary", 0):
        rot = _table_width(node, cos, sin) * 2
        if rot > hd:
            raise refuse_form(node, f"its rotary tables cover {rot} dims of a {hd}-dim head")
    scale = a.get_float("scale", 0.0)
    scale = float(scale) if scale else 1.0 / math.sqrt(hd)
    softcap = a.get_float("softcap", 0.0)
    dt = b.dtype(query)

    if key is None:
        sizes = [heads * hd, kv_heads * hd, kv_heads * hd]
        q, k, v = b.op("Split", [query, b.const(np.array(sizes, I64))], {"axis": -1},
                       outputs=3, role="split")
    else:
        q, k, v = query, key, value
    qh = _heads(b, q, heads, hd, "heads_q")
    kh = _heads(b, k, kv_heads, hd, "heads_k")
    vh = _heads(b, v, kv_heads, hd, "heads_v")

    # positions: row b's past is 0 on a first prompt, else seqlens_k[b] + 1 - S
    one = b.const(np.array(1, I64))
    s_len = b.op("Gather", [b.op("Shape", [query]), one], {"axis": 0})
    sk = b.op("Cast", [seqlens], {"to": int(ir.DataType.INT64)})
    tot = b.op("Cast", [total], {"to": int(ir.DataType.INT64)})
    first = b.op("Equal", [s_len, b.op("Reshape", [tot, b.const(np.array([], I64))])])
    past = b.op("Where", [first, b.const(np.array(0, I64)),
                          b.op("Sub", [b.op("Add", [sk, one]), s_len])])
    steps = b.op("Range", [b.const(np.array(0, I64)), s_len, one])
    qpos = b.op("Add", [b.unsqueeze(past, [1]), steps])  # (batch, S)

    if rot is not None:
        c = b.unsqueeze(b.op("Gather", [cos, qpos], {"axis": 0}), [1])  # (batch, 1, S, rot/2)
        s = b.unsqueeze(b.op("Gather", [sin, qpos], {"axis": 0}), [1])
        qh = _rotate(b, qh, c, s, rot, hd, "rotary_q")
        kh = _rotate(b, kh, c, s, rot, hd, "rotary_k")

    kc, vc = kh, vh
    for t in (past_k, past_v, *node.outputs[1:3]):
        _declare_head_size(t, kv_heads, hd)
    if past_k is not None:
        kc = b.op("Concat", [past_k, kh], {"axis": 2}, role="join_k")
        vc = b.op("Concat", [past_v, vh], {"axis": 2}, role="join_v")
    kr, vr = kc, vc
    if heads != kv_heads:
        kr = _repeat_kv(b, kc, heads // kv_heads, heads, hd, "repeat_k")
        vr = _repeat_kv(b, vc, heads // kv_heads, heads, hd, "repeat_v")

    kt = b.op("Transpose", [kr], {"perm": [0, 1, 3, 2]})
    scores = b.op("Mul", [b.op("MatMul", [qh, kt]), b.const(np.array(scale), dt)], role="scale")
    if softcap:
        cap = b.const(np.array(softcap), dt)
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, cap])]), cap], role="softcap")
    # query i of row b sees the keys at or before min(past_b + i, seqlens_k[b])
    last = b.op("Min", [qpos, b.unsqueeze(sk, [1])])
    t_len = b.op("Gather", [b.op("Shape", [kc]), b.const(np.array(2, I64))], {"axis": 0})
    keys = b.op("Range", [b.const(np.array(0, I64)), t_len, one])
    seen = b.unsqueeze(b.op("LessOrEqual", [keys, b.unsqueeze(last, [2])]), [1])
    lowest = b.const(np.array(_lowest(dt)), dt)
    scores = b.op("Where", [seen, scores, lowest], role="mask")
    probs = b.op("Softmax", [scores], {"axis": -1})
    ctx = b.op("Transpose", [b.op("MatMul", [probs, vr])], {"perm": [0, 2, 1, 3]})
    out = b.op("Reshape", [ctx, b.const(np.array([0, 0, heads * hd], I64))], role="merge")

    for i, val in enumerate(ins[:9]):
        if val is not None:
            b.port_in(val, i)
    outs = {0: out}
    if past_k is not None or any(o.uses() or o.is_graph_output() for o in node.outputs[1:3]):
        outs.update({1: kc, 2: vc})
    return outs


def _lowest(dt: ir.DataType) -> float:
    """The most negative finite value of a float type (bfloat16's from ml_dtypes)."""
    try:
        return float(np.finfo(dt.numpy()).min)
    except (TypeError, ValueError):
        import ml_dtypes

        return float(ml_dtypes.finfo(dt.numpy()).min)


def _declare_head_size(t: ir.Value | None, kv_heads: int, hd: int) -> None:
    """The model builder declares the caches' head axis by name (``kv_cache_dim``): the op
    fixes it to the head size (and the KV-head axis to ``kv_num_heads``), so the declaration
    says so (a named dim of a graph input is one that varies between runs)."""
    if t is None or t.shape is None or len(t.shape) != 4:
        return
    dims = list(t.shape.dims)
    for k, size in ((1, kv_heads), (3, hd)):
        if not isinstance(dims[k], int):
            dims[k] = size
    t.shape = ir.Shape(dims)


def _heads(b: Builder, t: ir.Value, heads: int, hd: int, role: str) -> ir.Value:
    r = b.op("Reshape", [t, b.const(np.array([0, 0, heads, hd], I64))], role=role)
    return b.op("Transpose", [r], {"perm": [0, 2, 1, 3]})


def _repeat_kv(b: Builder, t: ir.Value, groups: int, heads: int, hd: int, role: str):
    """transformers' ``repeat_kv`` as the exporters write it: each KV head shared by
    ``groups`` query heads, (batch, kv, T, hd) -> (batch, kv, groups, T, hd) -> (batch, heads,
    T, hd), the batch and T read off the tensor's shape."""
    def dim(i):
        if b.opset >= 15:
            return b.op("Shape", [t], {"start": i, "end": i + 1})
        return b.unsqueeze(b.op("Gather", [b.op("Shape", [t]), b.const(np.array(i, I64))],
                                {"axis": 0}), [0])
    batch, length = dim(0), dim(2)
    kv = b.const(np.array([heads // groups], I64))
    size = b.const(np.array([hd], I64))
    grown = b.op("Concat", [batch, kv, b.const(np.array([groups], I64)), length, size],
                 {"axis": 0})
    x = b.op("Expand", [b.unsqueeze(t, [2]), grown], role=role + "_expand")
    merged = b.op("Concat", [batch, b.const(np.array([heads], I64)), length, size], {"axis": 0})
    return b.op("Reshape", [x, merged], role=role)


def _rotate(b: Builder, x: ir.Value, c: ir.Value, s: ir.Value, rot: int, hd: int, role: str):
    """Rotate-half rotary on the first ``rot`` dims of ``x``'s last axis, as transformers
    writes it: x * [cos, cos] + [-x2, x1] * [sin, sin], i.e. (x1 cos - x2 sin, x2 cos + x1 sin)
    (the same products and sums), the rest split off first and passed through."""
    def part(t, lo, hi):
        return b.op("Slice", [t, b.const(np.array([lo], I64)), b.const(np.array([hi], I64)),
                              b.const(np.array([-1], I64))])
    xr = part(x, 0, rot) if rot < hd else x
    x1, x2 = part(xr, 0, rot // 2), part(xr, rot // 2, rot)
    turned = b.op("Concat", [b.op("Neg", [x2]), x1], {"axis": -1})
    cos2 = b.op("Concat", [c, c], {"axis": -1})
    sin2 = b.op("Concat", [s, s], {"axis": -1})
    y = b.op("Add", [b.op("Mul", [xr, cos2]), b.op("Mul", [turned, sin2])],
             role=role if rot == hd else "")
    if rot < hd:
        y = b.op("Concat", [y, part(x, rot, hd)], {"axis": -1}, role=role)
    return y


def _table_width(node: ir.Node, cos, sin) -> int:
    shapes = [G.const_shape(G.const_source(t)[0]) if t is not None else None for t in (cos, sin)]
    if shapes[0] is None or shapes[0] != shapes[1] or len(shapes[0]) != 2:
        raise refuse_form(node, "its rotary cos/sin caches are not two constant tables of one "
                                "shape")
    return int(shapes[0][1])


def _last_dim(t: ir.Value, node: ir.Node) -> int:
    """The width of ``t``'s last axis: declared, or read off the projection that makes it (a
    constant-weight MatMul, through the Add of its constant bias)."""
    if t.shape is not None and len(t.shape) == 3 and isinstance(t.shape[-1], int):
        return int(t.shape[-1])
    p = t.producer()
    if p is not None and p.op_type == "Add":
        for a, other in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
            bias = G.const_shape(G.const_source(other)[0])
            if bias is not None and len(bias) == 1 and bias[0] > 1:
                return int(bias[0])
    if p is not None and p.op_type == "MatMul":
        w = G.const_shape(G.const_source(p.inputs[1])[0])
        if w is not None and len(w) == 2:
            return int(w[1])
    raise refuse_form(node, f"its input {t.name} is not a (batch, positions, hidden) tensor of "
                            "known width")


# --------------------------------------------------------------------------- RotaryEmbedding

def _decompose_rotary(b: Builder, node: ir.Node) -> dict:
    ins = list(node.inputs) + [None] * 4
    x, pos, cos, sin = ins[:4]
    a = node.attributes
    if a.get_int("interleaved", 0):
        raise refuse_form(node, "it rotates interleaved pairs")
    if a.get_int("is_packed_batching", 0):
        raise refuse_form(node, "it works on packed batches")
    if a.get_float("scale", 1.0) != 1.0:
        raise refuse_form(node, "it scales the positions")
    half = _table_width(node, cos, sin)
    rank = len(x.shape) if x.shape is not None else None
    rot = a.get_int("rotary_embedding_dim", 0) or 2 * half
    if rot != 2 * half:
        raise refuse_form(node, f"its rotary_embedding_dim {rot} is not its tables' 2 x {half}")
    heads = a.get_int("num_heads", 0)
    if rank == 4:
        hd = x.shape[3] if isinstance(x.shape[3], int) else None
        xh = x
    elif rank == 3 and isinstance(x.shape[2], int):
        hd = rot if not heads else x.shape[2] // heads
        heads = x.shape[2] // hd
        xh = b.op("Transpose", [b.op("Reshape", [x, b.const(np.array([0, 0, heads, hd], I64))],
                                     role="heads")], {"perm": [0, 2, 1, 3]})
    else:
        raise refuse_form(node, f"its input {x.name} has no known (batch, positions, hidden) or "
                                "(batch, heads, positions, head_size) shape")
    if hd is None or rot > hd:
        raise refuse_form(node, f"its rotary tables cover {rot} dims of a {hd}-dim head")
    p = b.op("Cast", [pos], {"to": int(ir.DataType.INT64)})
    if pos.shape is not None and len(pos.shape) == 1:  # one offset: offset + 0..S-1
        one = b.const(np.array(1, I64))
        s_len = b.op("Gather", [b.op("Shape", [xh]), b.const(np.array(2, I64))], {"axis": 0})
        p = b.op("Add", [b.unsqueeze(b.op("Range", [b.const(np.array(0, I64)), s_len, one]),
                                     [0]), b.unsqueeze(p, [1])])
    elif pos.shape is None or len(pos.shape) != 2:
        raise refuse_form(node, f"its position ids {pos.name} are not (batch, positions) or one "
                                "offset")
    c = b.unsqueeze(b.op("Gather", [cos, p], {"axis": 0}), [1])
    s = b.unsqueeze(b.op("Gather", [sin, p], {"axis": 0}), [1])
    y = _rotate(b, xh, c, s, rot, hd, "rotary")
    if rank == 3:
        y = b.op("Reshape", [b.op("Transpose", [y], {"perm": [0, 2, 1, 3]}),
                             b.const(np.array([0, 0, heads * hd], I64))], role="merge")
    for i, val in enumerate(ins[:4]):
        if val is not None:
            b.port_in(val, i)
    return {0: y}


# --------------------------------------------------------------------------- fusing again

def fused_attrs(group, attrs: dict, ins: dict) -> dict:
    """The head counts as the passes left them (the heads Reshapes), the scale written out
    when it is no longer the default of the head size."""
    attrs = dict(attrs)
    if group.meta["op"] == "RotaryEmbedding":
        merge = group.role("heads")
        if merge is not None and "num_heads" in attrs:
            attrs["num_heads"] = convert_attribute(
                "num_heads", int(G.const_array(merge.inputs[1])[2]))
        return attrs
    q = G.const_array(group.role("heads_q").inputs[1])
    kv = G.const_array(group.role("heads_k").inputs[1])
    heads, hd = int(q[2]), int(q[3])
    attrs["num_heads"] = convert_attribute("num_heads", heads)
    attrs["kv_num_heads"] = convert_attribute("kv_num_heads", int(kv[2]))
    scale = float(G.const_array(group.role("scale").inputs[1]))
    if "scale" in attrs or not np.isclose(scale, 1.0 / math.sqrt(hd), rtol=1e-7, atol=0):
        attrs["scale"] = convert_attribute("scale", scale)
    return attrs

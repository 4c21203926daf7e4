"""Component: self-attention, in the dialects exporters write.

match: a branch whose Softmax sits between a Q.K^T MatMul and a P.V MatMul (or an ONNX
``Attention`` op); separate q/k/v projections or one fused projection; MHA, GQA and MQA; heads
and head_dim read from the atoms of the attention's axes; rotary embeddings.
widen: q (and a fused qkv) by the query-head map, k and v by the KV-head map, the output
projection from the query-head map to the stream.
twin: the output projection's fan-out cancels (or is zero), so the twin adds nothing.
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import onnx_ir as ir

from .. import dims, lemon_math as lm
from ..errors import PlanError, UnsupportedModelError
from ..graph import const_tensor, is_const
from ..tensors import read_array
from . import linear, norm
from .linear import Linear
from .norm import Norm
from .branch import axis_readers, linears_reading, out_linear


@dataclasses.dataclass
class Attention:
    expressed: str  # decomposed | onnx-attention | fused-qkv
    heads: int
    kv_heads: int
    head_dim: int
    q: Linear | None
    k: Linear | None
    v: Linear | None
    qkv: Linear | None
    split_node: str | None
    out: Linear
    score_node: str | None
    rotary: bool
    #: a fused projection's output axis: "segments" ([q | k | v], heads*hd, kv*hd, kv*hd: GPT-2,
    #: GPT-BigCode, Falcon) or "interleaved" (per KV head, its g query heads then k and v:
    #: GPT-NeoX, Bloom, Falcon-40B)
    qkv_layout: str | None = None
    #: norms on the q / k projections' outputs (OLMo-2: over all heads; Qwen3's per-head
    #: norms over head_dim need no rule, head_dim does not change)
    q_norm: Norm | None = None
    k_norm: Norm | None = None


def match(ctx, x: ir.Value, branch_out: ir.Value, idx: int) -> Attention:
    nodes = ctx.branch_nodes(x, branch_out)
    ordered = sorted(nodes, key=lambda n: ctx.order.get(n, 0))  # never a set's whim
    out = out_linear(ctx, branch_out)
    ins = [l for l in linears_reading(ctx, x, nodes) if l is not out]
    attn_op, score, q_t, k_t, v_t = find_scores(ctx, ordered, idx)

    def reaches(lin_out: ir.Value, target: ir.Value) -> bool:
        # by values: a scale computed from q's shape (SDPA's sqrt(scale) on q and on k)
        # does not make k a function of q
        return ctx.data_depends_on(target, lin_out)

    q = k = v = qkv = None
    split_node = None
    if len(ins) == 1:
        qkv = ins[0]
        y = ctx.values[qkv.output]
        sp = [n for n in ordered if n.op_type == "Split" and ctx.depends_on(n.inputs[0], y)]
        split_node = sp[0].name if sp else None
    else:
        for lin in ins:
            y = ctx.values[lin.output]
            if reaches(y, q_t) and not reaches(y, k_t):
                q = lin
            elif reaches(y, k_t) and not reaches(y, q_t):
                k = lin
            elif reaches(y, v_t):
                v = lin
        if q is None or k is None or v is None:
            reused = sorted({lin.weight for lin in ctx.linears.values()
                             if lin.weight in {x.weight for x in ins}
                             and ctx.node(lin.node) not in nodes})
            why = (f" The weights {', '.join(reused)} are also applied outside this branch "
                   "(DeBERTa's disentangled attention projects the relative position "
                   "embeddings with the same Q and K weights): scores that mix content and "
                   "position terms have no exact width rule in lemon-onnx."
                   if reused else "")
            raise UnsupportedModelError(
                f"Block {idx}: could not tell the Q, K and V projections apart "
                f"({len(ins)} projections read the attention input, and each reaches more "
                f"than one of the score's and the values' inputs).{why}")
    heads_l, kv_l, hd_leaves, heads, head_dim, kv_heads = read_heads(
        ctx, attn_op, score, q_t, k_t, k, k or qkv, idx)
    layout = None
    if qkv is not None:
        kv_heads, layout = _fused_layout(ctx, qkv, heads, head_dim, heads_l, kv_l, idx)
        att_width = heads * head_dim
        if kv_heads not in (1, heads):
            kv_l = _kv_atoms(ctx, k_t, q_t, heads_l) or kv_l
    else:
        att_width = q.out_features
    if not heads or not head_dim or heads * head_dim != att_width:
        raise UnsupportedModelError(
            f"Block {idx}: could not read the head count and head_dim from the attention "
            f"reshapes (found heads={heads}, head_dim={head_dim}, projection width "
            f"{att_width}).")
    # angles from Sin/Cos, or cos/sin tables gathered at the positions (ORT GenAI's caches)
    tables = any(n.op_type == "Gather" and is_const(n.inputs[0]) and
                 any(u.node.op_type == "Unsqueeze" or u.node.op_type == "Mul"
                     for u in n.outputs[0].uses()) for n in nodes)
    rotary = (tables or any(n.op_type in ("RotaryEmbedding", "Sin", "Cos") for n in ctx.graph)) and (
        any(n.op_type == "RotaryEmbedding" for n in nodes) or
        any(n.op_type == "Slice" for n in nodes if ctx.depends_on(q_t, n.outputs[0])))
    # multi-query attention (one KV head: a size-1 axis, no atom of its own) keeps its one KV
    # head; the query heads' atom is the heads atom (the repeat of K and V grows with it)
    roles_attention(ctx, heads_l, [] if kv_heads == 1 else kv_l, hd_leaves)
    if qkv is not None:
        fused = ctx.leaves(ctx.values[qkv.output])
        if len(fused) == 1 and ctx.roles.of(fused[0]) is None:
            # the fused axis was never factored into heads: it is the whole q|k|v width,
            # which grows with the heads (the width pass computes it)
            ctx.roles.name(fused[0], "qkv_width", replace=True)
        for a in fused:  # what is left once heads and head_dim are named: the q/k/v parts
            ctx.roles.name(a, "qkv_parts")
    name_value_head_dim(ctx, v_t)
    q_norm = _projection_norm(ctx, q, nodes)
    k_norm = _projection_norm(ctx, k, nodes)
    expressed = "onnx-attention" if attn_op is not None else ("fused-qkv" if qkv else "decomposed")
    return Attention(expressed, heads, kv_heads, head_dim, q, k, v, qkv, split_node, out,
                     score.name if score is not None else attn_op.name, bool(rotary), layout,
                     q_norm, k_norm)


def find_scores(ctx, ordered: list, idx: int):
    """The attention inside a branch's nodes (in graph order): an ONNX ``Attention`` op, or
    the Softmax between a Q.K^T MatMul and a P.V MatMul.  Returns (Attention op or None,
    score MatMul or None, q, k, v): the values the scores and the weighted sum read."""
    attn_op = next((n for n in ordered if n.op_type == "Attention"), None)
    if attn_op is not None:
        return attn_op, None, attn_op.inputs[0], attn_op.inputs[1], attn_op.inputs[2]
    softmax = next((n for n in ordered if n.op_type == "Softmax"), None)
    if softmax is None:
        raise UnsupportedModelError(
            f"Block {idx}: the first residual branch has no Softmax and no Attention op; "
            "it is not a recognisable self-attention.")
    score = pv = None
    for n in ordered:
        if n.op_type == "MatMul" and not is_const(n.inputs[1]) and not is_const(n.inputs[0]):
            if ctx.depends_on(n.inputs[0], softmax.outputs[0]):
                pv = n
            elif ctx.depends_on(softmax.inputs[0], n.outputs[0]):
                score = n
    if score is None or pv is None:
        raise UnsupportedModelError(f"Block {idx}: attention found a Softmax but not the "
                                    "Q.K^T and P.V MatMuls around it.")
    return None, score, score.inputs[0], score.inputs[1], pv.inputs[1]


def read_heads(ctx, attn_op, score, q_t: ir.Value, k_t: ir.Value, k: Linear | None,
               kproj: Linear | None, idx: int):
    """Heads and head_dim from the atoms of the attention's axes: (query-head atoms, KV-head
    atoms, head_dim atoms, heads, head_dim, KV heads).  ``k``: the K projection when it is
    one of its own (its width counts the KV heads), ``kproj``: the projection K comes from
    (a fused one included), None when K arrives from outside (a cache input)."""
    hd_leaves = ctx.leaves(q_t, -1)
    if attn_op is not None and len(ctx.ax.get(q_t) or []) == 3:
        qa = ctx.leaves(q_t, -1)
        heads_l = _attr_heads(ctx, attn_op, "q_num_heads", qa)
        hd_leaves = qa[len(heads_l):]
        kv_l = _attr_heads(ctx, attn_op, "kv_num_heads", ctx.leaves(k_t, -1))
    else:
        so = (score.outputs[0] if score is not None else attn_op.outputs[0])
        sax = ctx.ax.get(so) or []
        heads_l = dims.leaves(sax[-3]) if len(sax) >= 4 else []
        kax = ctx.ax.get(k_t) or []
        kv_l = dims.leaves(kax[-3]) if len(kax) >= 4 else []
        if len(sax) == 3:
            # batch and heads merged on one axis (Bloom's baddbmm, DeBERTa's bmm): the heads
            # are that axis's static atoms (the batch is dynamic)
            heads_l = [a for a in dims.leaves(sax[0]) if a.size is not None]
            kv_l = [a for a in dims.leaves(kax[0]) if a.size is not None] if len(kax) == 3 \
                else []
        if score is None and len(ctx.ax.get(q_t) or []) == 4:
            heads_l = dims.leaves(ctx.ax.get(q_t)[1])
        if attn_op is not None and len(kax) == 4:
            kv_l = dims.leaves(kax[1])
    # GQA: the K heads axis after repeat_kv is (kv_heads, groups); K before repeat is kv_heads
    if kproj is not None:
        k_out = ctx.leaves(ctx.values[kproj.output], -1)
        k_hd = [a for a in ctx.leaves(k_t, -1) if a not in kv_l]  # K's own head_dim atoms
        kv_from_proj = [a for a in k_out if a not in hd_leaves and a not in k_hd]
        if k is not None and kv_from_proj:
            kv_l = kv_from_proj
    unknown = [a for a in list(heads_l) + list(hd_leaves) if a.size is None]
    if unknown:
        raise UnsupportedModelError(
            f"Block {idx}: the attention's head axes have sizes the shape reasoning cannot "
            f"read ({q_t.name}: {ctx.ax.get(q_t)}), e.g. because q, k and v are cut apart with "
            "bounds computed at run time.",
            hint="Export with the dynamo exporter (torch.onnx.export(..., dynamo=True)), which "
                 "writes these bounds as constants.")
    heads = int(np.prod([a.size for a in heads_l])) if heads_l else 0
    head_dim = int(np.prod([a.size for a in hd_leaves])) if hd_leaves else 0
    # the K projection's width says how many KV heads there are (a single KV head has no
    # atom of its own: size-1 axes vanish in the atom algebra)
    if k is not None and head_dim and k.out_features % head_dim == 0:
        kv_heads = k.out_features // head_dim
    else:
        kv_heads = int(np.prod([a.size for a in kv_l])) if kv_l else heads
    return heads_l, kv_l, hd_leaves, heads, head_dim, kv_heads


def name_value_head_dim(ctx, v_t: ir.Value) -> None:
    """The last axis of the values the weighted sum reads is head_dim."""
    v_l = ctx.leaves(v_t, -1)
    if len(v_l) == 1 and ctx.roles.of(v_l[0]) is None:
        ctx.roles.name(v_l[0], "head_dim", replace=True)


def _projection_norm(ctx, lin: Linear | None, nodes: set):
    """A norm inside the attention branch whose input is a projection's whole output."""
    if lin is None:
        return None
    y = ctx.values[lin.output]
    for nrm in ctx.norm_by_in.get(y, []):
        if ctx.node(nrm.nodes[0]) in nodes:
            return nrm
    return None


def _kv_atoms(ctx, k_t: ir.Value, q_t: ir.Value, heads_l: list) -> list:
    """The KV-head atoms of grouped-query attention with a fused projection: on the path that
    only K takes (no Q), before K is repeated for the query groups, its head axis carries the
    KV heads alone; after the repeat, KV heads and the group.  The smallest non-empty set of
    query-head atoms seen on that path is the KV heads'."""
    hset = {dims.find(a) for a in heads_l}
    q_anc = ctx.ancestors(q_t)
    best = None
    for n in ctx.ancestors(k_t) - q_anc:
        for o in n.outputs:
            seen = {dims.find(a) for ax in ctx.ax.get(o) or [] for a in dims.leaves(ax)} & hset
            if seen and (best is None or len(seen) < len(best)):
                best = seen
    if not best or best == hset:
        return []
    return [a for a in heads_l if dims.find(a) in best]


def _rows_view(ctx, qkv: Linear, readers: list, rows: int, head_dim: int) -> bool:
    """Falcon: the fused output viewed as (heads + 2 kv_heads, head_dim) rows, q the first
    heads rows, k and v the last ones.  The rows atom is a sum of head counts; it gets its own
    role, whose new size the width pass computes from the plan's head counts."""
    named = []
    for r in readers:
        axes = ctx.ax.get(r.outputs[0]) or []
        if len(axes) < 2:
            return False
        row_atoms, hd_atoms = dims.leaves(axes[-2]), dims.leaves(axes[-1])
        if len(row_atoms) != 1 or row_atoms[0].size != rows or \
                int(np.prod([a.size or 0 for a in hd_atoms])) != head_dim:
            return False
        named.append(row_atoms[0])
    for a in named:
        ctx.roles.name(a, "qkv_rows", replace=True)
    return True


def _fused_layout(ctx, qkv: Linear, heads: int, head_dim: int, heads_l: list, kv_l: list,
                  idx: int) -> tuple[int, str]:
    """KV heads and layout of a fused projection's output axis, from its atoms: when the
    outermost atom is the (KV) heads atom, each KV head's group sits together (interleaved);
    otherwise q, k and v are segments one after the other, and the KV head count is what the
    width leaves for k and v."""
    if not heads or not head_dim or qkv.out_features % head_dim:
        raise UnsupportedModelError(
            f"Block {idx}: the fused projection {qkv.node} has {qkv.out_features} outputs, "
            f"not a multiple of head_dim {head_dim}.")
    total = qkv.out_features // head_dim
    lead = ctx.leaves(ctx.values[qkv.output])[:1]
    lead_roots = {dims.find(a) for a in lead}
    if lead_roots and lead_roots <= {dims.find(a) for a in list(heads_l) + list(kv_l)}:
        n_lead = int(np.prod([a.size for a in lead]))
        g = heads // n_lead if n_lead and heads % n_lead == 0 else 0
        if g and total == n_lead * (g + 2):
            return n_lead, "interleaved"
    kv2 = total - heads
    if kv2 > 0 and kv2 % 2 == 0 and heads % (kv2 // 2) == 0:
        # q, k and v one after the other must be cut apart by a Split along the fused axis
        # (its part sizes are size literals with atoms); a Reshape of the fused axis into
        # heads + 2 rows (Falcon) holds a size that is a sum, which no atom can grow
        readers = axis_readers(ctx, ctx.values[qkv.output])
        if readers and all(c.op_type == "Reshape" for c in readers) and \
                _rows_view(ctx, qkv, readers, heads + kv2, head_dim):
            return kv2 // 2, "segments"
        if not readers or any(c.op_type not in ("Split", "Slice") for c in readers):
            ops = ", ".join(sorted({c.op_type for c in readers}))
            raise UnsupportedModelError(
                f"Block {idx}: the fused projection {qkv.node} ({total} x head_dim {head_dim}: "
                f"{heads} query heads and {kv2 // 2} KV head(s) one after the other) is read by "
                f"{ops}, not cut into q, k and v by a Split or Slice: its shape then holds a "
                "sum of head counts, which lemon-onnx cannot rewrite.")
        return kv2 // 2, "segments"
    raise UnsupportedModelError(
        f"Block {idx}: the fused projection {qkv.node} has {qkv.out_features} outputs, which "
        f"do not split into {heads} query heads and equal K and V parts of head_dim {head_dim}.")


def _attr_heads(ctx, node: ir.Node, attr: str, leaves_: list) -> list:
    if attr not in node.attributes:
        return []
    n = int(node.attributes[attr].value)
    acc, prod = [], 1
    for a in leaves_:
        if prod >= n:
            break
        acc.append(a)
        prod *= a.size or 1
    return acc


def roles_attention(ctx, heads_l, kv_l, hd_leaves) -> None:
    """Name the atoms: heads (or KV heads and the group size for GQA) and head_dim; head_dim
    split into parts (rotate_half's halves, a partial rotary slice) names each part by its
    position, never by its size."""
    ctx.add_size_group("head_dim", [dims.find(a) for a in hd_leaves])
    ctx.add_size_group("heads", [dims.find(a) for a in heads_l])
    kvset, hset = set(kv_l), set(heads_l)
    if not kv_l or kvset == hset:
        for a in heads_l:
            ctx.roles.name(a, "heads", replace=True)
    elif not kvset & hset:
        # the query heads and the KV heads are counted apart (an ONNX Attention's
        # q_num_heads and kv_num_heads on packed 3-D inputs): no group atom to name
        for a in heads_l:
            ctx.roles.name(a, "heads", replace=True)
        kv_size = int(np.prod([a.size for a in kv_l]))
        q_size = int(np.prod([a.size for a in heads_l]))
        for a in kv_l:
            ctx.roles.name(a, "heads" if kv_size == q_size else "kv_heads", replace=True)
    else:
        for a in kv_l:
            ctx.roles.name(a, "kv_heads", replace=True)
        for a in heads_l:
            if a not in kvset:
                ctx.roles.name(a, "kv_groups", replace=True)
    if len(hd_leaves) == 1:
        ctx.roles.name(hd_leaves[0], "head_dim", replace=True)
    else:
        for i, a in enumerate(hd_leaves):
            ctx.roles.name(a, f"head_dim[{i}]")


def widen(wp, a: Attention, branch_in, stream_map, *, tag: str, prescale=None) -> None:
    """Projections of one attention branch: inputs laid out by ``branch_in``, the output
    projection writes the stream laid out by ``stream_map`` (``prescale``: a layer scale
    folded into it)."""
    if a.qkv is not None:
        out_fn, size = fused_output_map(wp, a)
        linear.widen_fused(wp, a.qkv, branch_in, f"{tag}.qkv", out_fn, size)
        if a.qkv_layout == "segments":
            _widen_segment_bounds(wp, a, tag)
    else:
        linear.widen(wp, a.q, branch_in, wp.q_map, tag=f"{tag}.q")
        linear.widen(wp, a.k, branch_in, wp.kv_map, tag=f"{tag}.k")
        linear.widen(wp, a.v, branch_in, wp.kv_map, tag=f"{tag}.v")
    for nrm, lin, units, t in ((a.q_norm, a.q, wp.q_map, "qn"), (a.k_norm, a.k, wp.kv_map, "kn")):
        if nrm is not None and nrm.gamma and lin is not None and \
                read_array(wp.values[nrm.gamma]).size == lin.out_features:
            norm.widen_units(wp, nrm, units, tag=f"{tag}.{t}")
    linear.widen(wp, a.out, wp.q_map, stream_map, tag=f"{tag}.o", prescale=prescale)


def _widen_segment_bounds(wp, a: Attention, tag: str) -> None:
    """Slices that cut q, k and v out of a fused projection (Phi-3): their bounds are the
    segments' boundaries (0, q, q+k, q+k+v), sums the size literals cannot express; each
    boundary moves to the new one.  A bound that is not a boundary is refused."""
    from ..graph import const_array

    q_map, kv_map = wp.q_map, wp.kv_map
    old = [0, q_map.d, q_map.d + kv_map.d, q_map.d + 2 * kv_map.d]
    new = [0, q_map.D, q_map.D + kv_map.D, q_map.D + 2 * kv_map.D]
    explained = {lu.via for lu in wp.rec.ax.literals if lu.via}
    for node in axis_readers(wp.rec, wp.values[a.qkv.output]):
        if node.op_type != "Slice":
            continue
        for idx in (1, 2):
            v = node.inputs[idx] if len(node.inputs) > idx else None
            arr = const_array(v)
            if arr is None or (node.name, idx) in explained:
                continue
            vals = [int(x) for x in arr.reshape(-1)]
            if any(x not in old and x < 2**31 - 1 for x in vals):
                raise PlanError(f"{node.op_type} {node.name} cuts the fused projection "
                                f"{a.qkv.node} at {vals}, not at the boundaries {old} of its "
                                "q, k and v parts.")

            def fn(x, old=old, new=new):
                return np.array([new[old.index(int(e))] if int(e) in old else e
                                 for e in x.reshape(-1)], dtype=x.dtype).reshape(x.shape)

            wp.ed.edit(node, idx, f"{tag}.qkv-bounds", fn)


def fused_output_map(wp, a: Attention):
    """(function laying out a fused projection's output axis, new width)."""
    q_map, kv_map = wp.q_map, wp.kv_map
    if a.qkv_layout == "interleaved":
        # each KV head's block (its g query heads, then k and v) is one unit of the KV map
        g = a.heads // a.kv_heads
        units = lm.UnitMap(a.kv_heads, kv_map.N_units, (g + 2) * a.head_dim)
        return units.apply, units.D
    cuts = [q_map.d, q_map.d + kv_map.d]
    maps = (q_map, kv_map, kv_map)

    def apply(arr, axis):
        parts = np.split(arr, cuts, axis=axis)
        return np.concatenate([m.apply(p, axis) for m, p in zip(maps, parts)], axis=axis)

    return apply, q_map.D + 2 * kv_map.D


def twin(dp, a: Attention, mapping, init: str, tag: str) -> None:
    """The twin's attention adds nothing: its output projection's rows cancel per head (pairs
    of heads made equal through their fan-in), or are zero where the fan-in cannot be paired
    (a fused projection other than equal q|k|v segments)."""
    if a.qkv is not None and (a.qkv_layout != "segments" or a.kv_heads != a.heads):
        init = "zero"
    if init != "zero" and has_head_tables(dp):
        # per-head score terms (relative position buckets, ALiBi): paired heads add different
        # terms to their scores, so they would not compute the same, and their rows not cancel
        init = "zero"
        note = ("twin blocks start with zero attention fan-out: per-head score terms (relative "
                "position or ALiBi tables) keep paired heads from computing the same")
        dp.note(note)
    dp.zero_branch(a.out, mapping, init, unit="head",
                   fanin=[x for x in (a.q, a.k, a.v, a.qkv) if x], tag=tag + ".attn")


#: depth pass -> whether its model has per-head score tables (``has_head_tables``)
_HEAD_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def has_head_tables(dp) -> bool:
    """Whether a constant other than a projection's weights carries a heads axis into the
    attention scores (computed once per depth pass)."""
    if dp not in _HEAD_TABLES:
        rec = dp.rec
        weights = set()
        for lin in rec.linears.values():
            weights.update(x for x in (lin.weight, lin.bias) if x)
        found = False
        for v in rec.constants():  # initializers and Constant nodes (MPT's ALiBi table)
            if v.name in weights or not v.uses():
                continue
            # an axis of heads alone (heads with head_dim on one axis is a width: CLIP ties
            # the stream to heads x head_dim)
            roles = set()
            for ax in rec.ax.axes.get(v) or []:
                on_axis = {dp.desc.roles.of(a) for a in dims.leaves(ax)}
                if "head_dim" not in on_axis:
                    roles |= on_axis
            # a table the shape reasoning could not tie to anything, with an axis of the
            # head count, counts too (BEiT's interpolated bias table in a TorchScript export)
            t = const_tensor(v)
            untied = t is not None and t.dtype.is_floating_point() and \
                not any(u.node.op_type in ("Conv", "MatMul", "Gemm", "Gather")
                        for u in v.uses()) and \
                any(t.shape[k] == dp.desc.heads for k in rec.unnamed_axes(v))
            if (roles & {"heads", "kv_heads"} or untied) and rec.reaches_heads(v):
                found = True
                break
        _HEAD_TABLES[dp] = found
    return _HEAD_TABLES[dp]


def widen_head_tables(wp) -> None:
    """Per-head constants on the attention scores (T5's relative position buckets, ALiBi
    slopes, a per-head bias): a constant whose only growing axis is the heads axis (heads
    outermost on it) and which reaches a Softmax's input.  Each new head is a copy of a source
    head, so its row of the table is that head's row: the head map with unit size the rest of
    the axis."""
    rec = wp.rec
    counts = {role: (wp.plan.source[role], wp.plan.target[role]) for role in ("heads", "kv_heads")}
    for v in rec.constants():
        if v in wp.ed.requests or not v.uses():
            continue
        changed = wp.changed_axes(v)
        if len(changed) != 1:
            continue
        k, atoms = changed[0]
        role = wp.desc.roles.of(atoms[0]) if atoms else None
        if role not in counts or any(wp.new_size(a) != a.size for a in atoms[1:]):
            continue
        if not rec.reaches_heads(v):
            continue
        n, N = counts[role]
        unit = int(np.prod([a.size for a in atoms[1:]])) if atoms[1:] else 1
        heads_map = lm.UnitMap(n, N, unit)
        for u in list(v.uses()):
            wp.ed.edit(u.node, u.idx, f"headtable:{v.name}",
                       lambda a, m=heads_map, ax=k: m.apply(a, ax),
                       lambda sh, ax=k, size=heads_map.D: tuple(
                           size if i == ax else d for i, d in enumerate(sh)))

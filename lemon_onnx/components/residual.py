"""Component: the residual topology, which pairs branches into blocks.

match: residual Adds (a computed tensor plus a branch computed from it that ends in a linear,
possibly reshaped and scaled per channel by a layer scale); the chain they form from the
embeddings to the last block; pre-norm (a norm on each branch input) or post-norm (a norm after
each Add); consecutive (attention, MLP) branches form a block.
widen: a block's norms, its attention and MLP (components ``attention`` and ``mlp``), and layer
scales (tiled, or folded into the projection for an ``avg`` stream).
twin: both branch outputs of the twin are made zero (``attention.twin``, ``mlp.twin``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .. import dims, lemon_math as lm
from ..errors import UnsupportedModelError
from ..graph import back_pass, back_view, const_source, is_const, nm
from ..errors import PlanError
from ..tensors import read_array, write_array
from . import attention, cross_attention, embedding, mlp, norm
from .attention import Attention
from .cross_attention import CrossAttention
from .embedding import Embeddings
from .branch import branch_tail, layer_scale, output_norm
from .mlp import MLP
from .norm import Norm


@dataclasses.dataclass
class Block:
    index: int
    attention_norm: Norm | None  # pre-norm input norm
    attention: Attention
    attention_residual: str  # Add node
    attention_post_norm: Norm | None  # post-LN: norm after the residual add
    mlp_norm: Norm | None
    mlp: MLP
    mlp_residual: str
    mlp_post_norm: Norm | None
    input: str  # stream value entering the block
    output: str  # stream value leaving the block
    attention_scale: str | None = None  # layer-scale Mul node on the branch output
    mlp_scale: str | None = None
    #: "sequential" (x + attn, then + mlp) or "parallel" (x + attn(.) + mlp(.), one Add
    #: joins both branches: GPT-J, GPT-NeoX, Falcon, Phi)
    topology: str = "sequential"
    attention_out_norm: Norm | None = None  # a norm on the branch output (OLMo-2, Gemma-2)
    mlp_out_norm: Norm | None = None
    #: a decoder block of an encoder-decoder: the cross-attention branch between the two
    #: (its pre-norm, the attention, its residual Add, its post-norm)
    cross_attention_norm: Norm | None = None
    cross_attention: CrossAttention | None = None
    cross_attention_residual: str | None = None
    cross_attention_post_norm: Norm | None = None


def match_residuals(ctx) -> list[tuple[ir.Node, ir.Value, list]]:
    """Residual joins: (node, skip input, [branch outputs]).  A branch is computed from the
    skip and ends in a linear (possibly reshaped, normalised or scaled per channel); a join of
    two such branches summed first is a parallel block."""
    out = []
    for n in ctx.graph:
        if n.op_type not in ("Add", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
            continue
        if len(n.inputs) < 2 or is_const(n.inputs[0]) or is_const(n.inputs[1]):
            continue
        a, b = n.inputs[0], n.inputs[1]
        for skip, branch in ((a, b), (b, a)):
            if _is_branch(ctx, branch, skip):
                out.append((n, skip, [branch]))
                break
            parts = _parallel_parts(ctx, branch, skip)
            if parts:
                out.append((n, skip, parts))
                break
    return out


def _is_branch(ctx, branch: ir.Value, skip: ir.Value) -> bool:
    end = branch_tail(ctx, branch)[0]
    return end in ctx.lin_by_out and ctx.depends_on(end, skip)


def _parallel_parts(ctx, branch: ir.Value, skip: ir.Value) -> list | None:
    """``branch`` = u + v with u and v both branches of ``skip`` and neither computed from
    the other: attention and MLP side by side."""
    p = back_pass(branch).producer()
    if p is None or p.op_type != "Add" or len(p.inputs) != 2 or any(is_const(i) for i in p.inputs):
        return None
    u, v = p.inputs
    if not (_is_branch(ctx, u, skip) and _is_branch(ctx, v, skip)):
        return None
    if ctx.depends_on(u, v) or ctx.depends_on(v, u):
        return None
    return [u, v]


def match_blocks(ctx, emb: Embeddings, residuals):
    """Walk the residual chain and pair branches into blocks: two consecutive joins
    (attention, then MLP), or one join of both side by side."""
    # keyed by the stream value under any re-view (OPT runs its MLP on a 2-D view)
    res_by_skip: dict[ir.Value, tuple] = {}
    for r in residuals:
        res_by_skip.setdefault(back_view(r[1]), r)
    first = residuals[0]
    stream = back_view(first[1])
    # a norm whose output is the stream start (embedding LayerNorm), perhaps scaled per token
    embedding.match_end(ctx, emb, stream,
                        ctx.norms.get(stream) or ctx.norms.get(_token_scaled(ctx, stream)))
    chain = []
    post = None
    cur = stream
    while back_view(cur) in res_by_skip:
        node, skip, branches = res_by_skip[back_view(cur)]
        add_out = node.outputs[0] if node.op_type == "Add" else node.outputs[
            3 if len(node.outputs) > 3 else 0]
        nxt = add_out
        post_norm = None
        # post-norm: the Add output is normalised and the norm output continues the stream
        for nrm in ctx.norm_by_in.get(add_out, []):
            nv = ctx.values[nrm.output]
            if back_pass(nv) in res_by_skip or nv in res_by_skip:
                post_norm, nxt = nrm, nv
        if node.op_type.startswith("Skip"):
            nrm = ctx.norms.get(node.outputs[0])
            if nrm is not None and nrm.output and node.outputs[0] in res_by_skip:
                post_norm, nxt = nrm, node.outputs[0]
        if post is None:
            post = post_norm is not None
        nxt = _view_back(nxt, res_by_skip)
        chain.append((node, skip, branches, post_norm, nxt, cur))
        cur = back_pass(nxt)
    # the last post-norm block ends with a norm that feeds no further residual
    if chain and post:
        node, s, br, pn, nx, c = chain[-1]
        if pn is None:
            add_out = node.outputs[0]
            cands = ctx.norm_by_in.get(add_out, [])
            if cands:
                chain[-1] = (node, s, br, cands[0], ctx.values[cands[0].output], c)
                cur = ctx.values[cands[0].output]
    layout = "post-norm" if post else "pre-norm"
    blocks: list[Block] = []
    i = 0
    while i < len(chain):
        entry = chain[i]
        if len(entry[2]) == 2:
            blocks.append(_parallel_block(ctx, len(blocks), entry, layout))
            i += 1
            continue
        if i + 1 >= len(chain) or len(chain[i + 1][2]) != 1:
            raise UnsupportedModelError(
                f"Residual join {entry[0].name} (block {len(blocks)}) has one branch but no "
                "second branch follows it on the main path: lemon-onnx expects an attention "
                "branch followed by an MLP branch, or both joined side by side.")
        if i + 2 < len(chain) and len(chain[i + 2][2]) == 1 and \
                _is_cross(ctx, chain[i + 1], layout):
            # a decoder block of an encoder-decoder: self-attention, cross-attention, MLP
            a, x, m = entry, chain[i + 1], chain[i + 2]
            blocks.append(_sequential_block(ctx, len(blocks), a, m, layout, cross=x))
            i += 3
            continue
        a, m = entry, chain[i + 1]
        blocks.append(_sequential_block(ctx, len(blocks), a, m, layout))
        i += 2
    return blocks, cur, layout


def _token_scaled(ctx, v: ir.Value) -> ir.Value | None:
    """``x`` where ``v`` = x * m with one factor per token (m's last axis has size 1:
    DeBERTa's padding mask on the embeddings), else None.  Such a factor acts on every hidden
    unit of a token alike, so it keeps any stream form."""
    p = v.producer()
    if p is None or p.op_type != "Mul" or len(p.inputs) != 2:
        return None
    for x, m in (p.inputs, reversed(p.inputs)):
        m_axes, x_axes = ctx.ax.get(m), ctx.ax.get(x)
        if m_axes and x_axes and dims.size_of(m_axes[-1]) == 1 and \
                dims.size_of(x_axes[-1]) != 1:
            return x
    return None


def _view_back(v: ir.Value, res_by_skip: dict) -> ir.Value:
    """Past a join's output, through the views that give the stream its shape back (OPT runs
    its MLP on a 2-D view and views the sum back to 3-D): blocks start and end on the stream
    in its own shape, so a twin can read a block's output as that block read its input."""
    while True:
        cons = v.consumers()
        if len(cons) != 1 or cons[0].op_type not in ("Reshape", "Flatten", "Squeeze",
                                                      "Unsqueeze") or not cons[0].outputs:
            return v
        v = cons[0].outputs[0]


def _branch_input(ctx, stream: ir.Value, branch_out: ir.Value, layout: str):
    """The norm a branch reads (pre-norm: one whose input is the stream and whose output the
    branch is computed from), and the value the branch's projections read."""
    stream = back_pass(stream)  # the value before any Cast/Identity the join adds
    nrm = _branch_norm(ctx, stream, branch_out, layout)
    return nrm, (stream if nrm is None else ctx.values[nrm.output])


def _is_cross(ctx, entry, layout: str) -> bool:
    """Whether a chain entry's branch is a cross-attention (keys from outside the stream)."""
    _norm, x_in = _branch_input(ctx, entry[1], entry[2][0], layout)
    return cross_attention.keys_off_stream(ctx, x_in, entry[2][0])


def _sequential_block(ctx, idx: int, a, m, layout: str, cross=None) -> Block:
    a_norm, a_in = _branch_input(ctx, a[1], a[2][0], layout)
    m_norm, m_in = _branch_input(ctx, m[1], m[2][0], layout)
    att = attention.match(ctx, a_in, a[2][0], idx)
    ff = mlp.match(ctx, m_in, m[2][0], idx)
    b = Block(idx, a_norm, att, a[0].name, a[3], m_norm, ff, m[0].name, m[3], nm(a[5]),
              nm(m[4]), layer_scale(ctx, a[2][0]), layer_scale(ctx, m[2][0]),
              attention_out_norm=output_norm(ctx, a[2][0]),
              mlp_out_norm=output_norm(ctx, m[2][0]))
    if cross is not None:
        if layer_scale(ctx, cross[2][0]) or output_norm(ctx, cross[2][0]):
            raise UnsupportedModelError(
                f"Block {idx}: the cross-attention branch has a layer scale or a norm on its "
                "output, which lemon-onnx does not widen yet.")
        x_norm, x_in = _branch_input(ctx, cross[1], cross[2][0], layout)
        b.cross_attention_norm = x_norm
        b.cross_attention = cross_attention.match(ctx, x_in, cross[2][0], idx)
        b.cross_attention_residual = cross[0].name
        b.cross_attention_post_norm = cross[3]
    return b


def _parallel_block(ctx, idx: int, entry, layout: str) -> Block:
    node, stream, (u, v), post_norm, nxt, _cur = entry
    if layout == "post-norm":
        raise UnsupportedModelError(
            f"Block {idx}: attention and MLP side by side with a norm after the join "
            f"({node.name}): no exact depth or width rule is implemented for this topology.")
    # the attention branch is the one with the Softmax (or Attention op) on it
    att_first = any(n.op_type in ("Softmax", "Attention")
                    for n in ctx.branch_nodes(stream, u))
    a_out, m_out = (u, v) if att_first else (v, u)
    a_norm, a_in = _branch_input(ctx, stream, a_out, layout)
    m_norm, m_in = _branch_input(ctx, stream, m_out, layout)
    att = attention.match(ctx, a_in, a_out, idx)
    ff = mlp.match(ctx, m_in, m_out, idx)
    return Block(idx, a_norm, att, node.name, None, m_norm, ff, node.name, post_norm,
                 nm(stream), nm(nxt), layer_scale(ctx, a_out), layer_scale(ctx, m_out),
                 topology="parallel", attention_out_norm=output_norm(ctx, a_out),
                 mlp_out_norm=output_norm(ctx, m_out))


def _branch_norm(ctx, stream: ir.Value, branch_out: ir.Value, layout: str) -> Norm | None:
    if layout == "post-norm":
        return None
    cands = ctx.norm_by_in.get(stream, [])
    reads = [c for c in cands if ctx.depends_on(branch_out, ctx.values[c.output])]
    return reads[0] if reads else None


def widen_layer_scale(wp, node_name: str | None, tag: str) -> np.ndarray | None:
    """A per-channel constant on a branch output (layer scale).  ``copies``/``zero``
    streams tile it (leftover slots of ``zero`` carry 0, any value is exact); an ``avg``
    stream needs the leftover to be the mean of the *scaled* rows, which no per-channel
    constant gives, so the scale is folded into the projection and becomes ones."""
    if node_name is None:
        return None
    node = wp.node(node_name)
    idx = next(i for i, x in enumerate(node.inputs) if const_source(x)[0] is not None)
    ls = read_array(const_source(node.inputs[idx])[0])
    if wp.s_map.form == "avg":
        wp.ed.edit(node, idx, f"{tag}:ones", lambda a: np.ones(wp.D, dtype=a.dtype))
        return ls
    wp.ed.edit(node, idx, f"{tag}:tile",
                 lambda a: lm.StreamMap(wp.d, wp.D, "circ").apply(a, -1))
    return None


def widen(wp, b: Block, branch_in, stream_map) -> None:
    """One block: its norms (on the stream), attention and MLP (reading ``branch_in``, writing
    the stream in ``stream_map``'s layout), and norms on branch outputs (whose output joins the
    stream, so it must come out in the stream's layout)."""
    t = f"b{b.index}"
    if b.attention_norm is not None:
        norm.widen(wp, b.attention_norm, stream_map, tag=f"{t}.ln1")
    attention.widen(wp, b.attention, branch_in, stream_map, tag=t,
                    prescale=widen_layer_scale(wp, b.attention_scale, f"{t}.ls1"))
    if b.attention_post_norm is not None:
        norm.widen(wp, b.attention_post_norm, stream_map, tag=f"{t}.ln1post")
    if b.cross_attention is not None:
        if b.cross_attention_norm is not None:
            norm.widen(wp, b.cross_attention_norm, stream_map, tag=f"{t}.lnx")
        cross_attention.widen(wp, b.cross_attention, branch_in, stream_map, tag=f"{t}.x")
        if b.cross_attention_post_norm is not None:
            norm.widen(wp, b.cross_attention_post_norm, stream_map, tag=f"{t}.lnxpost")
    if b.mlp_norm is not None and b.mlp_norm is not b.attention_norm:  # parallel: one shared
        norm.widen(wp, b.mlp_norm, stream_map, tag=f"{t}.ln2")
    mlp.widen(wp, b.mlp, branch_in, stream_map, tag=t,
              prescale=widen_layer_scale(wp, b.mlp_scale, f"{t}.ls2"))
    if b.mlp_post_norm is not None:
        norm.widen(wp, b.mlp_post_norm, stream_map, tag=f"{t}.ln2post")
    for out_norm, tag in ((b.attention_out_norm, "ln1out"), (b.mlp_out_norm, "ln2out")):
        if out_norm is not None:
            if lm.norm_output_map(stream_map).form != stream_map.form:
                raise PlanError(
                    f"block {b.index}: the norm {out_norm.output} on a branch output writes the "
                    f"stream, and its output layout ({lm.norm_output_map(stream_map).form}) is "
                    f"not the stream's ({stream_map.form}) at this width.",
                    hint="Use an integer width factor (--width 2).")
            norm.widen(wp, out_norm, stream_map, tag=f"{t}.{tag}")


def owned_off_stream(b: Block) -> list[str]:
    """Nodes of the block that are not on a path from its input to its output: its
    cross-attention's K and V, made from the encoder output (or read from cache inputs)."""
    return list(b.cross_attention.memory_nodes) if b.cross_attention is not None else []


def twin(dp, b: Block, mapping, tag: str) -> None:
    """The twin of ``b`` computes the identity: both its branches add exactly zero.  A branch
    whose output is normalised starts from zero fan-out (cancelling rows sum to zero only up to
    rounding, and the norm would scale that rounding up by 1/sqrt(epsilon)); the norm's shift
    is zeroed so norm(0) = 0."""
    init = dp.plan.depth_init or "cancel"
    attention.twin(dp, b.attention, mapping,
                   "zero" if b.attention_out_norm is not None else init, tag)
    if b.cross_attention is not None:
        cross_attention.twin(dp, b.cross_attention, mapping, init, tag)
    mlp.twin(dp, b.mlp, mapping, "zero" if b.mlp_out_norm is not None else init, tag)
    for out_norm in (b.attention_out_norm, b.mlp_out_norm):
        if out_norm is not None and out_norm.beta:
            v = mapping[dp.rec.values[out_norm.beta]]
            write_array(v, np.zeros_like(read_array(v)))

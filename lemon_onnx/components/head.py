"""Component: heads, the linear layers that read the final stream.

match: an LM head (output size = vocab; tied when it shares, or copies, the token table), BERT's
MLM head (transform dense, activation, LayerNorm, then the decoder), classifiers, and extra
heads (poolers, second classifiers).
widen: an untied head takes the stream on its input axis; a tied one is laid out like the
token table (the final norm then splits its gamma exactly over the k copies); the MLM
transform's output is replicated so its LayerNorm sees copies.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .. import lemon_math as lm
from ..errors import PlanError
from ..graph import back_pass, back_view, const_array, is_const, nm, scalar_scaled
from . import embedding, linear, norm
from .embedding import Embeddings
from .linear import Linear
from .norm import Norm


@dataclasses.dataclass
class Head:
    kind: str  # lm | classifier | mlm | norm (a norm alone, its output a graph output) | none
    linear: Linear | None
    transform: Linear | None = None
    transform_activation: str | None = None
    transform_norm: Norm | None = None
    tie: str | None = None  # shared | transposed-copy | None
    reads: str = ""  # the stream value it reads
    #: norms between the stream and the head's first linear (a pooler's LayerNorm: BEiT)
    pool_norms: list = dataclasses.field(default_factory=list)
    #: copies of the stream side by side on the first linear's input (DINOv2: cls token and
    #: the patches' mean concatenated)
    segments: int = 1
    #: the MLM transform maps the stream back to the embeddings' width (ELECTRA's generator
    #: where embedding_size < hidden_size): its output, its norm and the decoder keep their
    #: sizes, and a tie with the token table stays as it is
    narrow: bool = False


#: how the plan's notes begin when the widening untied a tied head (a folder's config.json
#: then says tie_word_embeddings=false)
UNTIED_NOTE = "The tied head was untied: "

_VIEW_OPS = ("Identity", "Cast", "Dropout", "Gather", "Slice", "Squeeze", "Unsqueeze",
             "Reshape", "Flatten")


def match(ctx, x: ir.Value, emb: Embeddings) -> tuple[Head, list]:
    """Linears reading the final stream value ``x`` (through token selection, pooling over
    tokens, norms and concatenation along the hidden axis): the main head (LM, MLM or
    classifier, with an inner dense layer where it has one) and any extra heads (a pooler, a
    second classifier)."""
    paths = {}
    for node, lin in ctx.linears.items():
        path = stream_path(ctx, node.inputs[0], x)
        if path is not None:
            paths[lin.node] = (lin, path)
    readers = sorted((lin for lin, _ in paths.values()),
                     key=lambda l: ctx.order[ctx.node(l.node)])
    norm_heads = _norm_heads(ctx, x, [n for _, (norms, _) in paths.values() for n in norms])
    if not readers:
        return Head("none", None, reads=nm(x)), norm_heads
    tok = ctx.values[emb.token] if emb.token else None
    vocab = tok.const_value.shape[0] if tok is not None else None
    heads = []
    for r in readers:
        norms, segments = paths[r.node][1]
        after = [lin for node, lin in ctx.linears.items()
                 if lin is not r and ctx.depends_on(node.inputs[0], ctx.values[r.output])]
        if vocab is not None and len(after) == 1 and after[0].out_features == vocab:
            h = _mlm_head(ctx, r, after[0], x, tok)
            # only past a projection is the embedding width not the stream's
            h.narrow = emb.projection is not None and not set(
                ctx.leaves(ctx.values[r.output])) <= set(embedding.hidden_leaves(ctx, emb))
        elif vocab is not None and r.out_features == vocab:
            h = Head("lm", r, reads=nm(x), tie=_tie(ctx, r, tok))
        elif len(after) == 1 and _elementwise_between(ctx, r, after[0]):
            # an inner dense layer and an activation, then the output projection
            h = Head("classifier", after[0], transform=r, reads=nm(x),
                     transform_activation=_activation(ctx, r, after[0]))
        else:
            h = Head("classifier", r, reads=nm(x))
        h.pool_norms, h.segments = norms, segments
        heads.append(h)
    main = next((h for h in heads if h.kind in ("lm", "mlm")), heads[-1])
    return main, [h for h in heads if h is not main] + norm_heads


def _norm_heads(ctx, x: ir.Value, claimed: list) -> list:
    """Norms over tokens picked from the final stream whose output is a graph output, with no
    linear after them (CLIP's vision tower: post_layernorm on the cls token gives
    ``pooler_output``): each is a head of kind ``norm``."""
    outs = {back_view(o) for o in ctx.graph.outputs}
    found = []
    for v, nrm in ctx.norms.items():
        if nrm.output != v.name or v not in outs or nrm in claimed or \
                ctx.values[nrm.input] is x:
            continue
        path = stream_path(ctx, v, x)
        if path is not None and path[0] == [nrm] and path[1] == 1:
            found.append(Head("norm", None, reads=nm(x), pool_norms=[nrm]))
    return found


#: ops on a head's path that act on each element alone (activations, dropout, casts), and
#: those that act on the token axes only
_ELEMENTWISE = {"Tanh", "Relu", "Gelu", "Erf", "Sigmoid", "Div", "Mul", "Add", "Identity",
                "Cast", "Dropout", "Pow", "Sqrt", "FastGelu", "Softplus", "Elu", "LeakyRelu"}


def stream_path(ctx, v: ir.Value, x: ir.Value, depth: int = 0):
    """How ``v`` is computed from the stream ``x`` by a head: ``(norms, segments)`` when only
    token selection and views, means over the token axes, norms over hidden, and a
    concatenation of such paths along hidden lie between; else None."""
    norms: list = []
    seen = 0
    while v is not x:
        seen += 1
        p = v.producer()
        if p is None or seen > 64 or depth > 4:
            return None
        if v in ctx.norms and ctx.norms[v].output == v.name:
            nrm = ctx.norms[v]
            norms.append(nrm)
            v = ctx.values[nrm.input]
            continue
        if p.op_type in _VIEW_OPS and p.inputs:
            v = p.inputs[0]
            continue
        scaled = scalar_scaled(p)
        if scaled is not None:  # T5's tied head reads the stream times d_model^-0.5
            v = scaled
            continue
        if p.op_type == "ReduceMean" and not _reduces_last(ctx, p):
            v = p.inputs[0]
            continue
        if p.op_type == "Concat" and not norms and _concat_last(ctx, p):
            subs = [stream_path(ctx, i, x, depth + 1) for i in p.inputs]
            if any(sp is None or sp[0] for sp in subs):
                return None
            return [], sum(sp[1] for sp in subs)
        return None
    return norms, 1


def _rank(ctx, v: ir.Value) -> int:
    return len(ctx.ax.get(v) or (v.shape or []))


def _reduces_last(ctx, node: ir.Node) -> bool:
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].value)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            return True  # unknown axes: not a pooling over tokens
        axes = [int(a) for a in arr.reshape(-1)]
    else:
        return True  # all axes
    rank = _rank(ctx, node.inputs[0])
    return not rank or any(a % rank == rank - 1 for a in axes)


def _concat_last(ctx, node: ir.Node) -> bool:
    rank = _rank(ctx, node.outputs[0])
    axis = node.attributes["axis"].value if "axis" in node.attributes else None
    return bool(rank) and axis is not None and axis % rank == rank - 1


def _between(ctx, r: Linear, a: Linear) -> set:
    return ctx.branch_nodes(ctx.values[r.output], ctx.node(a.node).inputs[0]) - {
        ctx.node(a.node)}


def _elementwise_between(ctx, r: Linear, a: Linear) -> bool:
    """Only elementwise ops (with scalar constants) between two linears: the inner layer's
    units can be replicated and the next layer's input split over the replicas."""
    for n in _between(ctx, r, a):
        if n.op_type == "ReduceMean" and not _reduces_last(ctx, n):
            continue  # a mean over the tokens acts on each unit alone too (Whisper's pooling)
        if n.op_type not in _ELEMENTWISE and n.op_type not in _VIEW_OPS:
            return False
        for i in n.inputs:
            if i is not None and is_const(i):
                arr = const_array(i)
                if arr is None or arr.size != 1:
                    return False
    return True


def _activation(ctx, r: Linear, a: Linear) -> str | None:
    ops = {n.op_type for n in _between(ctx, r, a)}
    return ("gelu" if {"Erf", "Gelu"} & ops else "tanh" if "Tanh" in ops else
            "relu" if "Relu" in ops else "sigmoid" if "Sigmoid" in ops else None)


def _mlm_head(ctx, t: Linear, dec: Linear, x: ir.Value, tok) -> Head:
    """BERT's MLM head: transform (dense, activation, LayerNorm), then the decoder."""
    dec_in = ctx.node(dec.node).inputs[0]
    tn = [nrm for nrm in ctx.norms.values()
          if ctx.depends_on(ctx.values[nrm.input], ctx.values[t.output])
          and (ctx.depends_on(dec_in, ctx.values[nrm.output])
               or ctx.values[nrm.output] is back_pass(dec_in))]
    ops = {n.op_type for n in ctx.ancestors(dec_in)
           if ctx.depends_on(n.outputs[0], ctx.values[t.output])}
    act = ("gelu" if {"Erf", "Gelu"} & ops else "gelu_tanh" if "Tanh" in ops else
           "relu" if "Relu" in ops else None)
    return Head("mlm", dec, transform=t, transform_activation=act,
                transform_norm=tn[0] if tn else None, tie=_tie(ctx, dec, tok), reads=nm(x))


def _tie(ctx, lin: Linear, tok: ir.Value) -> str | None:
    if lin.weight == tok.name:
        return "shared"
    w = ctx.values[lin.weight].const_value
    t = tok.const_value
    if w is None or t is None:
        return None
    wa = w.numpy()
    if lin.weight_layout == "in,out":
        wa = wa.T
    if wa.shape == tuple(t.shape) and np.array_equal(wa, t.numpy()):
        return "transposed-copy" if lin.weight_layout == "in,out" else "copy"
    return None


def untie_reason(rec, desc) -> str | None:
    """Why widening must untie the tied head, or None: the norm that feeds it is also a
    graph output, and the split of its gamma over the k copies (or LEMON's 1/k scaling) that
    the tie needs would change that output."""
    head = desc.head
    head_norm = head.transform_norm if head.kind == "mlm" else desc.final_norm
    if head.tie and head.kind == "lm" and head_norm is None and not head.narrow:
        return ("no norm sits between the residual stream and the head (a Post-LN model), so "
                "nothing can share out the copies of the stream that the tied table would "
                "add up.")
    if head.tie and head_norm is not None and not head.narrow:
        nv = rec.values[head_norm.output]
        if any(back_view(o) is nv for o in rec.graph.outputs):
            return ("the norm that feeds it is also a graph output, so rescaling its gamma "
                    "for the tied copies would change that output.")
        if head.kind == "lm" and desc.extra_heads:
            return ("another head (a pooler or classifier) also reads the norm that feeds it, "
                    "and rescaling that norm's gamma for the tied copies would change what "
                    "that head reads.")
    return None


def widen(wp, desc, head_in, *, untie: bool) -> str | None:
    """The final norm and every head.  ``head_in``: the layout of what the heads read (the
    final norm's output for pre-norm, the stream for post-norm).  Returns the tie kept."""
    head = desc.head
    tied = bool(head.tie) and not untie
    if desc.final_norm is None:
        head_in = wp.s_map  # the heads read the stream itself (BEiT pools it first)
    if desc.final_norm is not None:
        norm.widen(wp, desc.final_norm, wp.s_map, tag="final", tied=tied and head.kind == "lm")
    branch_in = head_in
    if head.kind == "mlm" and head.narrow:  # back to the embeddings' width, which stays
        linear.widen(wp, head.transform, head_in, None, tag="head.transform")
        for i, extra in enumerate(desc.extra_heads):
            _widen_untied(wp, desc, extra, branch_in, f"head{i + 1}")
        return head.tie
    if head.kind == "mlm":
        tr = head.transform
        circ = lm.UnitMap(wp.d, wp.D, 1)
        linear.widen(wp, tr, head_in, circ if wp.D % wp.d == 0 else None, tag="head.transform")
        if head.transform_norm is not None:
            norm.widen(wp, head.transform_norm, lm.StreamMap(wp.d, wp.D, "copies"),
                       tag="head.norm", tied=tied)
        head_in = lm.StreamMap(wp.d, wp.D, "copies")
    kept = None
    if head.linear is not None:
        if tied:
            lin = head.linear
            node = wp.node(lin.node)
            hid_axis = 0 if lin.weight_layout == "in,out" else 1
            if head.tie == "shared":
                # the same tensor as the embedding: one transform serves both roles
                wp.stream_axis(node, 1, "tok:emb", 1)
            else:
                wp.stream_axis(node, 1, "head:tiedcopy", hid_axis)
            kept = head.tie
        else:
            _widen_untied(wp, desc, head, head_in, "head")
    for i, extra in enumerate(desc.extra_heads):  # poolers etc.: read the stream, untied
        _widen_untied(wp, desc, extra, branch_in, f"head{i + 1}")
    return kept


def _widen_untied(wp, desc, h: Head, layout, tag: str) -> None:
    """A classifier (or pooler): norms on its path, its first linear's input in the stream's
    layout (per segment), an inner dense layer's units replicated, the output kept."""
    first = h.transform if h.kind == "classifier" and h.transform is not None else h.linear
    for k, nrm in enumerate(h.pool_norms if h.kind != "mlm" else []):
        if nrm is desc.final_norm or nrm is h.transform_norm:
            continue
        norm.widen(wp, nrm, layout, tag=f"{tag}.pool{k}")
        layout = lm.norm_output_map(layout)
    if first is None:  # a norm head: its output (a graph output) keeps the norm's layout
        return
    inner = None
    if first is not h.linear:  # inner dense layer: replicate its units (elementwise activation)
        inner = lm.UnitMap(first.out_features, first.out_features * wp.D // wp.d) \
            if (first.out_features * wp.D) % wp.d == 0 else None
    if h.segments > 1:
        _widen_segments(wp, first, layout, inner, h.segments, tag)
    else:
        linear.widen(wp, first, layout, inner, tag=f"{tag}.in" if inner else tag)
    if first is not h.linear:
        linear.widen(wp, h.linear, inner, None, tag=tag)


def _widen_segments(wp, lin: Linear, layout, out_map, segments: int, tag: str) -> None:
    """The first linear of a head that reads several copies of the stream side by side: the
    input rule applied to each segment of its input axis."""
    node = wp.node(lin.node)
    in_axis, out_axis = (0, 1) if lin.weight_layout == "in,out" else (1, 0)

    def fw(w):
        rng = wp.ed.rng(tag, "w")
        if out_map is not None:
            w = out_map.apply(w, out_axis)
        parts = np.split(w, segments, axis=in_axis)
        return np.concatenate([lm.expand_in(p, in_axis, layout, rng=rng,
                                            noise_scale=wp.plan.noise_scale) for p in parts],
                              axis=in_axis)

    def shape(sh):
        sh = list(sh)
        sh[in_axis] = segments * layout.D
        if out_map is not None:
            sh[out_axis] = out_map.D
        return tuple(sh)

    if lin.in_features % segments:
        raise PlanError(f"head {lin.node}: {lin.in_features} inputs do not split into "
                        f"{segments} copies of the stream")
    wp.ed.edit(node, 1, f"{tag}:w", fw, shape)
    if lin.bias and out_map is not None:
        bnode, idx = linear.bias_input(wp, lin)
        wp.ed.edit(bnode, idx, f"{tag}:b", lambda b: out_map.apply(b, -1))

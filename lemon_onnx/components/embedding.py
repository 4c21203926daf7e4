"""Component: embeddings, everything that writes the residual stream before the first block.

match: the token table (a Gather from a constant [vocab, hidden] table indexed by a graph
input) or a patch embedding (a Conv on a graph input); then every other table gathered and
added onto the stream (positions, token types), told apart by how their rows are chosen, never
by their row count; constant [1, n, hidden] tensors added (positions) or concatenated (cls and
extra tokens); and a norm whose output starts the stream.
widen: every one of them along its hidden axis in the stream form.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from .. import dims, lemon_math as lm
from ..errors import PlanError, UnsupportedModelError
from ..graph import back_pass, back_view, const_shape, const_source, is_const, nm
from ..tensors import read_array
from .linear import Linear
from .norm import Norm


@dataclasses.dataclass
class Embeddings:
    token: str | None = None  # initializer [vocab, hidden]
    token_node: str | None = None
    position: str | None = None  # initializer [positions, hidden] or [1, positions, hidden]
    token_type: str | None = None
    #: every table gathered and added onto the stream besides the token table, in graph order:
    #: [name, how its rows are chosen] with "input" (a graph input's values), "sequence"
    #: (indices that run along the sequence: Range, an arange buffer), "constant" (one row for
    #: every token: a type embedding whose ids are not an input)
    tables: list = dataclasses.field(default_factory=list)
    patch_conv: str | None = None  # Conv node
    patch_weight: str | None = None
    patch_bias: str | None = None
    #: convolutions before the one that writes the stream (Whisper's conv1), each followed by
    #: an elementwise activation: [Conv node, weight, bias or None]
    stem: list = dataclasses.field(default_factory=list)
    #: an elementwise activation sits between the patch Conv and the stream (Whisper's GELU)
    patch_activation: str | None = None
    cls_token: str | None = None
    #: every constant [1, n, hidden] token put before the sequence (cls, DeiT's distillation
    #: token, registers), in graph order; ``cls_token`` is the first
    extra_tokens: list = dataclasses.field(default_factory=list)
    #: pieces of a position table that reach the stream through reshapes, transposes and
    #: interpolation along the other axes (DINOv2 as TorchScript traces it: the patch
    #: positions resampled to the image's grid, the class position beside them), in order
    position_parts: list = dataclasses.field(default_factory=list)
    norm: Norm | None = None  # a norm applied to the embeddings (its output is the stream)
    #: a linear layer from the embeddings to the stream (ELECTRA's embeddings_project,
    #: ALBERT's embedding_hidden_mapping_in, where embedding_size != hidden_size): the tables,
    #: and a norm before it, keep their width; only its output side grows
    projection: Linear | None = None
    output: str = ""
    #: a norm on the token embedding alone, before the other tables are added
    #: (BlenderbotSmall's decoder): its output is not the stream, but a LayerNorm output the
    #: stream adds up, so it has the stream's layout only at integer widths
    token_norm: Norm | None = None


def untranspose_tables(model: ir.Model) -> list[str]:
    """A token table stored transposed (ORT GenAI's model builder ties Gemma's embedding to
    the LM head's (hidden, vocab) weight and gathers rows from ``Transpose(weight)``) is
    stored the way the components read tables, (vocab, hidden): the initializer becomes its
    transpose, the Gather reads it directly and every other reader (the head's MatMul) reads
    it through a new Transpose.  Exact (a transpose moves values); one weight still serves
    both.  Returns the tables restored."""
    import numpy as np

    g = model.graph
    done = []
    for n in list(g):
        if n.op_type != "Gather" or len(n.inputs) != 2 or n.inputs[0] is None:
            continue
        t = n.inputs[0].producer()
        w = t.inputs[0] if t is not None and t.op_type == "Transpose" else None
        perm = t.attributes.get_ints("perm", None) if w is not None else None
        if w is None or w.const_value is None or w.name not in g.initializers or \
                len(w.const_value.shape) != 2 or list(perm or [1, 0]) != [1, 0] or \
                n.attributes.get_int("axis", 0) != 0:
            continue
        arr = np.ascontiguousarray(w.const_value.numpy().T)
        w.const_value = ir.tensor(arr, name=w.name)
        w.shape = ir.Shape(arr.shape)
        back = ir.Node("", "Transpose", [w], [ir.AttrInt64s("perm", [1, 0])],
                       name=f"{t.name}/untransposed")
        back.outputs[0].name = f"{w.name}/transposed"
        back.outputs[0].dtype, back.outputs[0].shape = w.dtype, ir.Shape(arr.shape[::-1])
        g.insert_before(next(iter(g)), back)
        for use in list(w.uses()):
            if use.node is t or use.node is back:
                continue
            use.node.replace_input_with(use.idx, back.outputs[0])
        t.outputs[0].replace_all_uses_with(w)
        if not t.outputs[0].uses():
            g.remove(t, safe=True)
        done.append(w.name)
    return done


def match(ctx) -> Embeddings:
    g = ctx.graph
    emb = Embeddings()
    graph_inputs = set(g.inputs)
    tables = []  # Gathers of a constant [rows, hidden] table indexed by a graph input
    for n in g:
        if n.op_type == "Gather" and len(n.inputs) == 2:
            table = const_source(n.inputs[0])[0]
            idx = back_view(n.inputs[1])
            if table is not None and table.const_value is not None and \
                    len(table.const_value.shape) == 2 and idx in graph_inputs:
                tables.append((n, table))
        if n.op_type == "Conv" and emb.patch_conv is None:
            x = back_pass(n.inputs[0])
            w = const_source(n.inputs[1])[0]
            if x in graph_inputs and w is not None:
                emb.patch_conv, emb.patch_weight = n.name, w.name
                if len(n.inputs) > 2 and n.inputs[2] is not None:
                    emb.patch_bias = nm(const_source(n.inputs[2])[0])
    if tables:  # the token table, not the token types': the one a head reads too (tied),
        # else the one with the most rows; graph order does not decide (ONNX Runtime's
        # optimizer may put the token-type Gather first)
        def rank(nt):
            n, table = nt
            tied = any(u.node is not n and u.node.op_type in ("MatMul", "Gemm", "Transpose")
                       for u in table.uses())
            return (tied, table.const_value.shape[0], -ctx.order[n])

        n, table = max(tables, key=rank)
        emb.token, emb.token_node = table.name, n.name
    if emb.token is None and emb.patch_conv is not None:
        _conv_stem(ctx, emb)
    if emb.token is None and emb.patch_conv is None:
        kinds = sorted({n.op_type for n in g})
        raise UnsupportedModelError(
            "No token embedding (a Gather from a constant [vocab, hidden] table indexed by a "
            "graph input) and no patch embedding (a Conv on a graph input) was found, so this "
            "is not a Transformer lemon-onnx can expand. Ops present: "
            + ", ".join(kinds[:30]) + (" ..." if len(kinds) > 30 else "") + ".")
    return emb


#: activations a conv stem may have between its convolutions: f(0) = 0 for each
_STEM_ACTS = {"Gelu": "gelu", "Erf": "gelu", "Relu": "relu", "Tanh": "tanh"}
_STEM_OPS = {"Gelu", "Erf", "Relu", "Tanh", "Div", "Mul", "Add", "Identity", "Cast"}


def _conv_stem(ctx, emb: Embeddings) -> None:
    """Convolutions that follow the first one through elementwise activations only: the last
    writes the stream (the patch embedding proper), the others are the stem."""
    from ..graph import const_array

    first = ctx.node(emb.patch_conv)
    chain = [first]
    while True:
        cur = chain[-1].outputs[0]
        nxt = [n for n in ctx.graph if n.op_type == "Conv" and n not in chain
               and const_source(n.inputs[1])[0] is not None and ctx.depends_on(n.inputs[0], cur)]
        if not nxt:
            break
        n2 = min(nxt, key=lambda n: ctx.order[n])
        between = ctx.branch_nodes(cur, n2.inputs[0]) - {n2}
        ok = all(b.op_type in _STEM_OPS and all(
            i is None or not is_const(i) or (const_array(i) is not None and const_array(i).size == 1)
            for i in b.inputs) for b in between)
        if not ok:
            break
        chain.append(n2)
    if len(chain) > 1:
        for c in chain[:-1]:
            b = c.inputs[2] if len(c.inputs) > 2 else None
            emb.stem.append([c.name, const_source(c.inputs[1])[0].name,
                             nm(const_source(b)[0]) if b is not None else None])
        last = chain[-1]
        emb.patch_conv, emb.patch_weight = last.name, const_source(last.inputs[1])[0].name
        b = last.inputs[2] if len(last.inputs) > 2 else None
        emb.patch_bias = nm(const_source(b)[0]) if b is not None else None
        for a in dims.leaves(ctx.ax.axes[const_source(first.inputs[1])[0]][0]):
            ctx.roles.name(a, "hidden")  # stem channels grow with the stream (replicated)


def embedding_leaves(ctx, emb: Embeddings) -> list:
    """The atoms of the embeddings' width (the token table's, or the patch Conv's channels)."""
    if emb.token:
        return dims.leaves(ctx.ax.axes[ctx.values[emb.token]][1])
    return dims.leaves(ctx.ax.axes[ctx.values[emb.patch_weight]][0])


def hidden_leaves(ctx, emb: Embeddings) -> list:
    """The atoms of the stream's width: the embeddings', or a projection's output."""
    if emb.projection is not None:
        return ctx.leaves(ctx.values[emb.projection.output])
    return embedding_leaves(ctx, emb)


def match_end(ctx, emb: Embeddings, stream: ir.Value, norm) -> None:
    """Where the embedding ends, once the residual chain is found (``residual.match_blocks``):
    the stream's start, a linear projection onto it, and ``norm``, a norm whose output is the
    stream's start (an embedding LayerNorm), or None."""
    emb.output = nm(stream)
    match_projection(ctx, emb, stream)
    if norm is not None:
        emb.norm = norm


def match_projection(ctx, emb: Embeddings, stream: ir.Value) -> None:
    """A linear layer whose output is the stream's start and whose input is computed from
    the token table (or the patch Conv) without passing another linear layer."""
    lin = next((l for l in ctx.linears.values() if l.output == stream.name), None)
    if lin is None:
        return
    x = ctx.values[lin.input]
    src = ctx.node(emb.token_node).outputs[0] if emb.token else \
        ctx.node(emb.patch_conv).outputs[0]
    if ctx.depends_on(x, src) and not any(ctx.computes(ctx.node(l.node), x)
                                          for l in ctx.linears.values()):
        emb.projection = lin


def match_extras(ctx, emb: Embeddings) -> None:
    """Position / token-type tables and ViT cls token: constants added onto the embeddings
    (before a projection to the stream, where there is one)."""
    hid = set(embedding_leaves(ctx, emb))
    stream = ctx.values[emb.output] if emb.output else None
    if stream is None:
        return
    anc = ctx.ancestors(stream)
    for n in sorted(anc, key=lambda n: ctx.order[n]):
        if n.op_type == "Gather" and emb.token_node != n.name:
            t = const_source(n.inputs[0])[0]
            shape = const_shape(t)  # an initializer or a Constant node (XGLM's sinusoids)
            if shape is not None and len(shape) == 2 and t in ctx.ax.axes \
                    and set(dims.leaves(ctx.ax.axes[t][1])) <= hid \
                    and t.name not in [x[0] for x in emb.tables]:
                emb.tables.append([t.name, _index_kind(n.inputs[1], set(ctx.graph.inputs))])
        if n.op_type in ("Add", "Concat", "Expand"):
            for i in n.inputs:
                t = const_source(i)[0] if i is not None else None
                shape = const_shape(t)
                if shape is None or len(shape) not in (1, 2, 3):
                    continue
                last = ctx.ax.axes.get(t)
                if not last or not set(dims.leaves(last[-1])) <= hid or \
                        (len(shape) == 2 and n.op_type != "Add") or \
                        (len(shape) == 1 and n.op_type != "Expand"):
                    # [positions, hidden] tables added (Whisper's sliced positions); a [hidden]
                    # vector is a token only when broadcast to one (CLIP's class_embedding)
                    continue
                if n.op_type == "Add" and emb.position is None:
                    emb.position = t.name
                elif n.op_type in ("Concat", "Expand") and t.name not in emb.extra_tokens:
                    emb.extra_tokens.append(t.name)
                    emb.cls_token = emb.cls_token or t.name
    _position_parts(ctx, emb, anc, hid)
    _label_tables(ctx, emb)
    if emb.token_node and emb.norm is None:
        tok = ctx.node(emb.token_node).outputs[0]
        inside = [nrm for v, nrm in ctx.norms.items()
                  if ctx.depends_on(ctx.values[nrm.input], tok)
                  and ctx.depends_on(stream, v) and v is not stream]
        if len(inside) == 1:
            emb.token_norm = inside[0]


#: operators a position table may pass on its way to the stream that act on every hidden
#: channel alone and linearly (a view, a cast, interpolation along the other axes)
_PER_CHANNEL = ("Reshape", "Transpose", "Cast", "Identity", "Unsqueeze", "Squeeze", "Resize",
                "Slice", "Concat", "Expand")


def _position_parts(ctx, emb: Embeddings, anc: set, hid: set) -> None:
    """Float tables with a hidden last axis that are added onto the stream through per-channel
    linear operators only: widened along that axis in the stream form like a position table
    (the stream form's extra slots, copies, means or zeros, pass through such operators).
    Where an operator on the way moves the hidden axis (a Resize along it), the axis analysis
    has not tied the table to the hidden atoms and the closed world refuses it."""
    known = {emb.position, emb.token_type, *emb.extra_tokens, *(t for t, _ in emb.tables)}
    for n in sorted(anc, key=lambda n: ctx.order[n]):
        if n.op_type != "Add":
            continue
        stack = [i for i in n.inputs if i is not None and const_source(i)[0] is None]
        seen: set = set()
        while stack:
            v = stack.pop()
            p = v.producer()
            if p is None or p in seen or p.op_type not in _PER_CHANNEL:
                continue
            seen.add(p)
            data = p.inputs if p.op_type == "Concat" else p.inputs[:1]
            for i in data:
                t = const_source(i)[0] if i is not None else None
                if t is None:
                    if i is not None:
                        stack.append(i)
                    continue
                shape, axes = const_shape(t), ctx.ax.axes.get(t)
                if t.name in known or not shape or len(shape) < 2 or not axes or \
                        not set(dims.leaves(axes[-1])) <= hid or not dims.leaves(axes[-1]):
                    continue
                emb.position_parts.append(t.name)
                known.add(t.name)


def _label_tables(ctx, emb: Embeddings) -> None:
    """Name the gathered tables by how their rows are chosen, never by their row count.

    Positions: indices that run along the sequence; failing that, the one table indexed
    by a graph input (position ids given as an input).  Token types: a table whose row is
    a constant for every token, or an input-indexed table beside a position table."""
    by_kind: dict = defaultdict(list)
    for name, kind in emb.tables:
        by_kind[kind].append(name)
    seq, inp, const = by_kind["sequence"], by_kind["input"], by_kind["constant"]
    if emb.position is None:
        if seq:
            emb.position = seq[0]
        elif len(inp) == 1 and not const:
            emb.position = inp[0]
    if emb.token_type is None:
        rest = [x for x in const + inp if x != emb.position]
        if len(rest) == 1:
            emb.token_type = rest[0]
    init = ctx.graph.initializers
    for name, role in ((emb.position, "max_positions"), (emb.token_type, "token_types")):
        if name and name in init:
            for a in dims.leaves(ctx.ax.axes[init[name]][0]):
                ctx.roles.name(a, role)


_INDEX_HOPS = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Expand", "Flatten",
               "Slice", "Transpose", "Gather", "GatherElements", "Tile")


def _index_kind(v: ir.Value, graph_inputs: set) -> str:
    """How a Gather's indices are chosen: "input", "sequence" or "constant" (see
    ``Embeddings.tables``).  Followed back through layout-only ops; a constant buffer (the
    exporters' ``position_ids``/``token_type_ids`` buffers) is judged by its values: all equal
    means one row for every token, anything else runs along the sequence."""
    seen = 0
    while v is not None and seen < 64:
        seen += 1
        if v in graph_inputs:
            return "input"
        src, _ = const_source(v)
        if src is not None:
            arr = np.asarray(src.const_value.numpy() if src.const_value is not None
                             else _constant_node_value(src))
            return "constant" if arr.size and np.all(arr == arr.reshape(-1)[0]) else "sequence"
        p = v.producer()
        if p is None:
            return "input"
        if p.op_type == "Range":
            return "sequence"
        if p.op_type in _INDEX_HOPS and p.inputs:
            v = p.inputs[0]
            continue
        if p.op_type == "ConstantOfShape":
            return "constant"
        # arithmetic on indices (Add of an offset, CumSum of a mask): they run along the sequence
        return "sequence"
    return "sequence"


def _constant_node_value(v: ir.Value):
    p = v.producer()
    attr = p.attributes.get("value") if p is not None else None
    return attr.value.numpy() if attr is not None else np.zeros(0)


def widen(wp, emb: Embeddings) -> None:
    """Every table and constant that writes the stream, along its hidden axis in the stream
    form (the token table is left to the head when the head shares it); with a projection to
    the stream, only the projection's output side."""
    if emb.projection is not None:
        from . import linear

        linear.widen(wp, emb.projection, None, wp.s_map, tag="emb.proj")
        return
    if emb.token:
        wp.stream_axis(wp.node(emb.token_node), 0, "tok:emb", 1)
    tables = [name for name, _ in emb.tables]
    for name in dict.fromkeys(tables + [emb.position, emb.token_type] + emb.extra_tokens
                              + emb.position_parts):
        if name:
            wp.embedding_param(name, -1, f"emb:{name}")
    if emb.patch_conv:
        conv = wp.node(emb.patch_conv)
        if emb.stem:
            _widen_stem(wp, emb)
        else:
            wp.stream_axis(conv, 1, "patch:w", 0)
        if emb.patch_bias:
            wp.stream_axis(conv, 2, "patch:b", 0)
    for nrm, tag in ((emb.norm, "emb-norm"), (emb.token_norm, "tok-norm")):
        if nrm is not None:
            from . import norm

            norm.widen(wp, nrm, lm.StreamMap(wp.d, wp.D, "copies"), tag=tag)


def _widen_stem(wp, emb: Embeddings) -> None:
    """A conv stem: every stem convolution's output channels replicated (the activation after
    it acts on each channel alone), the next one's input channels split over the replicas, the
    last one's output channels in the stream form.  An activation between the last one and the
    stream needs a stream whose extra slots are copies or zeros (f(0) = 0), not means."""
    if emb.output:
        between = wp.rec.branch_nodes(wp.node(emb.patch_conv).outputs[0], wp.values[emb.output])
        acts = sorted({_STEM_ACTS[n.op_type] for n in between if n.op_type in _STEM_ACTS})
        emb.patch_activation = acts[0] if acts else None
    prev = None
    for k, (name, _w, bias) in enumerate(emb.stem):
        node = wp.node(name)
        c = read_array(wp.values[_w]).shape[0]
        units = lm.UnitMap(c, c * wp.D // wp.d) if (c * wp.D) % wp.d == 0 else None
        if units is None:
            raise PlanError(f"the stem convolution {name} has {c} channels, which the width "
                            f"{wp.D}/{wp.d} does not scale to a whole number")
        _conv_edit(wp, node, f"stem{k}", prev, units)
        if bias:
            wp.ed.edit(node, 2, f"stem{k}:b", lambda b, m=units: m.apply(b, -1),
                       lambda sh, m=units: (m.D,))
        prev = units
    last = wp.node(emb.patch_conv)
    _conv_edit(wp, last, "patch", prev, wp.s_map)
    if emb.patch_activation and wp.s_map.form == "avg":
        raise PlanError(
            f"a {emb.patch_activation} sits between the patch convolution and the stream; the "
            "stream's extra slots at this width are means of the others, which it does not "
            "keep.", hint="Use an integer width factor (--width 2).")


def _conv_edit(wp, node, tag: str, in_units, out_map) -> None:
    """A Conv weight [out, in, ...]: output channels by ``out_map`` (unit or stream map),
    input channels split over ``in_units``' replicas."""
    def fw(w, in_units=in_units, out_map=out_map):
        w = out_map.apply(w, 0) if not isinstance(out_map, lm.StreamMap) else \
            lm.expand_embedding(w, 0, out_map)
        if in_units is not None:
            w = lm.expand_in(w, 1, in_units, rng=wp.ed.rng(tag, "w"),
                             noise_scale=wp.plan.noise_scale)
        return w

    def shape(sh, in_units=in_units, out_map=out_map):
        sh = list(sh)
        sh[0] = out_map.D
        if in_units is not None:
            sh[1] = in_units.D
        return tuple(sh)

    wp.ed.edit(node, 1, f"{tag}:w", fw, shape)

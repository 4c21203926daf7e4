"""Component: the KV cache of a decoder exported for generation (optimum's
``past_key_values.N.key/value`` in, ``present.N.key/value`` out).

Found by structure, never by name: a cache is a float graph input that joins, through ops that
only re-type it, a ``Concat`` with the keys or values the attention computes from the current
tokens, and whose joined value leaves the graph as an output (through the same kind of ops).
The attention whose scores read the joined keys (or whose weighted sum reads the joined
values) owns it; which one tells the layer and whether it holds keys or values.

An encoder-decoder's decoder files have caches that are only half of that (``_unjoined``):
the decoder without past key values returns each layer's keys and values (self- and
cross-attention) as graph outputs, views of its K and V projections, with no input to join;
the decoder with past reads the cross-attention's keys and values from graph inputs (the
encoder cache), which no output returns (they do not change).  Such a slot has only an output
or only an input; it is owned by the block whose projection makes it or whose attention
reads it, and twinned, renumbered and mapped like a joined one.

widen: the cache's head axis carries the KV heads (or the heads, without grouped queries), so
its declared shape grows with them (the width pass computes it from the atoms, like any
output's); what a runtime feeds is the source's cache with each KV head repeated as the KV-head
map repeats it (head_dim unchanged: lemon-math.md, "Caches, cross-attention and stored forms").
twin: a twin layer caches its own keys and values: the nodes between the cache input, its
Concat and its output are cloned with the block onto a new input and a new output.
renumber: names follow the new layer order in the style the source uses (``past_key_values.i``
belongs to layer i); the number in a name that counts the layers is found by comparing the
names with the layers that own them, and a style that cannot be read that way is refused.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from .. import dims
from ..errors import PlanError, UnsupportedModelError

__all__ = ["CacheSlot", "find_joins", "match", "naming", "plan_maps", "renumber",
           "twin_inputs", "twin_outputs"]

#: ops that carry a cache tensor unchanged (only its dtype or a view) to or from its Concat
_CARRIERS = ("Cast", "Identity", "CastLike")


@dataclasses.dataclass
class CacheSlot:
    """One cache tensor of one layer: the graph input it arrives in and the graph output that
    returns it grown by the current tokens (an encoder-decoder's: only one of the two)."""

    input: str | None  # graph input: the cache of past tokens (None: output only)
    output: str | None  # graph output: past + current tokens (None: input only)
    kind: str  # "key" | "value"
    block: int  # the block whose attention reads it
    concat: str | None  # the Concat that appends the current tokens (None: not joined)
    axis: int  # the sequence axis of the cache tensor (the Concat's axis, non-negative)
    heads_axis: int | None  # the axis carrying the (KV) heads; None for one KV head
    #: nodes from the input to the Concat and from the Concat to the output (the Concat
    #: included), in graph order: what a twin layer clones for its own cache
    nodes: list = dataclasses.field(default_factory=list)
    #: whose keys or values: the block's "self" attention or its "cross" attention
    attention: str = "self"


def _follow(v: ir.Value, limit: int = 8) -> list[ir.Node]:
    """Consumers of ``v`` reached through carrier ops (Cast, Identity): the first non-carrier
    readers, with the carriers on the way first."""
    out, frontier = [], [v]
    for _ in range(limit):
        nxt = []
        for x in frontier:
            for c in x.consumers():
                if c.op_type in _CARRIERS and c.domain in ("", "ai.onnx"):
                    out.append(c)
                    nxt.extend(c.outputs)
                else:
                    out.append(c)
        if not nxt:
            break
        frontier = nxt
    return out


def find_joins(graph: ir.Graph) -> list[tuple[ir.Value, ir.Node, ir.Value, list]]:
    """(cache input, its Concat, cache output, nodes on the way) for every float graph input
    that a Concat joins to other values and whose joined value leaves the graph as an output
    through carrier ops only.  Structure only: usable on any model (verification pairs each
    model's outputs with its inputs this way)."""
    inits = set(graph.initializers)
    outputs = set(graph.outputs)
    found = []
    for v in graph.inputs:
        if v.name in inits or v.dtype is None or not v.dtype.is_floating_point():
            continue
        readers = _follow(v)
        joins = [n for n in readers if n.op_type == "Concat" and n.domain in ("", "ai.onnx")]
        if len(joins) != 1:
            continue
        cat = joins[0]
        path_in = [n for n in readers if n.op_type in _CARRIERS and _reaches(n, cat)]
        out, path_out = _output_of(cat.outputs[0], outputs)
        if out is None:
            continue
        found.append((v, cat, out, path_in + [cat] + path_out))
    return found


def _reaches(n: ir.Node, target: ir.Node, limit: int = 8) -> bool:
    frontier = [n]
    for _ in range(limit):
        nxt = []
        for m in frontier:
            for o in m.outputs:
                for c in o.consumers():
                    if c is target:
                        return True
                    if c.op_type in _CARRIERS:
                        nxt.append(c)
        frontier = nxt
    return False


def _output_of(v: ir.Value, outputs: set, limit: int = 8):
    """The graph output ``v`` leaves as (itself, or through carriers), and the carriers."""
    path: list = []
    for _ in range(limit):
        if v in outputs:
            return v, path
        carriers = [c for c in v.consumers() if c.op_type in _CARRIERS]
        if len(carriers) != 1:
            return None, path
        path.append(carriers[0])
        v = carriers[0].outputs[0]
    return None, path


def match(ctx, blocks: list) -> list[CacheSlot]:
    """The cache slots of a recognised model.  A join belongs to the last block whose K, V
    (or fused) projection computes the tokens' part of it, and holds keys when that block's
    attention scores read it, values when only its weighted sum does.  A join no block's
    attention reads is refused: expanding around it would break it."""
    slots = []
    for v, cat, out, nodes in find_joins(ctx.graph):
        joined = cat.outputs[0]
        carried = {v} | {o for n in nodes if n is not cat for o in n.outputs}
        fresh = [x for x in cat.inputs if x is not None and x not in carried]
        owner = None
        for b in blocks:
            a = b.attention
            projs = [ctx.values[p.output] for p in (a.k, a.v, a.qkv) if p is not None]
            if any(ctx.depends_on(x, y) for x in fresh for y in projs):
                owner = b
        kind = None
        if owner is not None and owner.attention.score_node:
            a = owner.attention
            score = ctx.node(a.score_node)
            if score.op_type == "Attention":  # the ONNX op: K and V are its inputs 1 and 2
                kind = ("key" if ctx.depends_on(score.inputs[1], joined) else
                        "value" if ctx.depends_on(score.inputs[2], joined) else None)
            elif any(ctx.depends_on(i, joined) for i in score.inputs if i is not None):
                kind = "key"
            elif ctx.depends_on(ctx.values[a.out.output], joined):
                kind = "value"
        if kind is None:
            raise UnsupportedModelError(
                f"The graph input {v.name} is joined by Concat {cat.name} and returned as "
                f"{out.name} like a KV cache, but no attention layer's keys or values are "
                "what it joins: lemon-onnx cannot tell which layer's cache it is.",
                hint="Export the decoder with one cache tensor per layer (optimum's "
                     "text-generation-with-past), or without a cache.")
        axes = ctx.ax.get(joined) or []
        rank = len(axes) or len(v.shape or [])
        axis = int(cat.attributes["axis"].value) % rank if rank else 0
        slots.append(CacheSlot(input=v.name, output=out.name, kind=kind, block=owner.index,
                               concat=cat.name, axis=axis, heads_axis=_heads_axis(ctx, fresh),
                               nodes=[n.name for n in sorted(nodes, key=ctx.order.get)]))
    slots += _unjoined(ctx, blocks, {s.output for s in slots})
    # within a layer, the order the source declares them in (runtimes pair by position)
    place = {v.name: k for k, v in enumerate(list(ctx.graph.inputs) + list(ctx.graph.outputs))}
    return sorted(slots, key=lambda s: (s.block, place.get(s.input or s.output, 0)))


#: ops that carry keys or values to a graph output (or from a cache input) as views
_VIEWS = ("Reshape", "Transpose", "Cast", "Identity", "Unsqueeze", "Squeeze")


def _unjoined(ctx, blocks: list, joined: set) -> list[CacheSlot]:
    """An encoder-decoder's half caches (module docstring): graph outputs that are views of a
    K or V projection (its output reshaped into heads), and a cross-attention's graph inputs
    of keys and values."""
    outputs = {v for v in ctx.graph.outputs if v.name not in joined}
    slots = []
    for b in blocks:
        x = b.cross_attention
        sources = [(b.attention.k, "key", "self"), (b.attention.v, "value", "self")]
        if x is not None:
            sources += [(x.k, "key", "cross"), (x.v, "value", "cross")]
        for lin, kind, which in sources:
            if lin is None:
                continue
            for out, path in _views_to_outputs(ctx.values[lin.output], outputs):
                slots.append(CacheSlot(input=None, output=out.name, kind=kind, block=b.index,
                                       concat=None, axis=_sequence_axis(ctx, out),
                                       heads_axis=_heads_axis(ctx, [out]),
                                       nodes=[n.name for n in path], attention=which))
        if x is not None and x.key_input:
            for name, kind in ((x.key_input, "key"), (x.value_input, "value")):
                v = ctx.values[name]
                slots.append(CacheSlot(input=name, output=None, kind=kind, block=b.index,
                                       concat=None, axis=_sequence_axis(ctx, v),
                                       heads_axis=_heads_axis(ctx, [v]), attention="cross"))
    return slots


def _views_to_outputs(v: ir.Value, outputs: set) -> list:
    """Graph outputs reached from ``v`` through view ops only: [(output, the ops)]."""
    found, frontier = [], [(v, [])]
    while frontier:
        x, path = frontier.pop()
        if x in outputs and path:
            found.append((x, path))
        for c in x.consumers():
            if c.op_type in _VIEWS and c.domain in ("", "ai.onnx") and c.inputs[0] is x and \
                    len(path) < 8:
                frontier.append((c.outputs[0], path + [c]))
    return found


def _sequence_axis(ctx, v: ir.Value) -> int:
    """The tokens axis of a cache tensor [batch, heads, tokens, head_dim]: the axis before
    the last (head_dim), read from the atoms where they name it."""
    axes = ctx.ax.get(v) or []
    for k, axis in enumerate(axes[:-1]):
        atoms = dims.leaves(axis)
        if atoms and all(a.size is None for a in atoms) and k > 0:
            return k
    return max(len(axes) - 2, 0)


def _heads_axis(ctx, fresh: list) -> int | None:
    """The axis of the joined cache whose atoms the attention named heads or KV heads, read
    from the tokens' own keys or values (the cache input may declare it symbolically)."""
    for x in fresh:
        for k, axis in enumerate(ctx.ax.get(x) or []):
            if ctx.roles.named(axis) & {"heads", "kv_heads", "kv_groups"}:
                return k
    return None


# --------------------------------------------------------------------------- depth
def twin_inputs(dp, slots: list, tag: str) -> dict:
    """New graph inputs for a twin's caches (shape and type of the source's, which the width
    pass already declared at the new size): {source input value: new input value}.  The
    twin's clone reads them (``DepthPass.clone_block``'s seed)."""
    g = dp.graph
    seed = {}
    for s in slots:
        if s.input is None:
            continue
        src = dp.rec.values[s.input]
        new = ir.Value(name=f"{s.input}__{tag}", shape=src.shape, type=src.type)
        g.inputs.append(new)
        seed[src] = new
    return seed


def twin_outputs(dp, slots: list, mapping: dict) -> list:
    """The twin's own cache outputs (the clones of the source's), declared like the source's;
    returns [(slot, new input name, new output name)]."""
    g = dp.graph
    vals = dp.rec.values
    made = []
    for s in slots:
        new_in = mapping.get(vals[s.input]) if s.input else None
        new_out = None
        if s.output:
            src_out = vals[s.output]
            new_out = mapping.get(src_out)
            if new_out is not None:
                new_out.shape = src_out.shape
                g.outputs.append(new_out)
        if (s.input and new_in is None) or (s.output and new_out is None):
            raise PlanError(f"the twin of block {s.block} did not clone the cache {s.input} -> "
                            f"{s.output} (Concat {s.concat}).")
        made.append((s, new_in.name if new_in else None, new_out.name if new_out else None))
    return made


def renumber(dp, slots: list, twins: dict, order: list) -> dict:
    """Give every cache input and output the number of its layer in the new order, in the
    names' own style, and put them in that order among the graph's inputs and outputs (keys
    before values as the source has them: runtimes pair inputs and outputs by position).
    ``twins``: {(source block, copy number): [(slot, input name, output name)]}.  Returns
    {old name: new name} for every cache tensor."""
    g = dp.graph
    vals = {v.name: v for v in list(g.inputs) + list(g.outputs)}
    in_style, out_style = naming(slots)
    by_block: dict = {}
    for s in slots:
        by_block.setdefault(s.block, []).append(s)
    new_in, new_out = [], []  # (value, new name) in the new layer order
    for pos, (src, copy) in enumerate(order):
        if copy == 0:
            entries = [(s, s.input, s.output) for s in by_block.get(src, [])]
        else:
            entries = twins.get((src, copy), [])
        for s, name_in, name_out in entries:
            if name_in:
                new_in.append((vals[name_in], in_style(s.input, pos)))
            if name_out:
                new_out.append((vals[name_out], out_style(s.output, pos)))
    moving = {id(v) for v, _ in new_in + new_out}
    others = {v.name for v in g.inputs if id(v) not in moving} | {
        o.name for n in g for o in n.outputs if id(o) not in moving}
    wanted = [new for _, new in new_in + new_out]
    clash = sorted(set(wanted) & others) or sorted({n for n in wanted if wanted.count(n) > 1})
    if clash:
        raise PlanError(f"renumbering the cache tensors for the new layers would give "
                        f"{clash[0]} to two values.")
    old = {id(v): v.name for v, _ in new_in + new_out}
    for v, _ in new_in + new_out:  # two steps: a new name may be another one's old name
        v.name = f"{v.name}__lemon_renumber"
    for v, new in new_in + new_out:
        v.name = new
    if new_in:
        _reorder(g.inputs, [v for v, _ in new_in])
    if new_out:
        _reorder(g.outputs, [v for v, _ in new_out])
    return {old[id(v)]: new for v, new in new_in + new_out}


def _reorder(seq, ordered: list) -> None:
    """Put ``ordered`` (a subset of ``seq``) in that order where its first member was."""
    members = {id(v) for v in ordered}
    first = next(k for k, v in enumerate(seq) if id(v) in members)
    new = list(seq)[:first] + ordered + [v for v in list(seq)[first:] if id(v) not in members]
    seq.clear()
    seq.extend(new)


def naming(slots: list):
    """(input renamer, output renamer) for the cache tensors' own style; refused (exit 2)
    when no number in the names counts the layers.  Called before any rewriting."""
    ins = [(s.input, s.block) for s in slots if s.input]
    outs = [(s.output, s.block) for s in slots if s.output]
    return (_style(ins) if ins else None), (_style(outs) if outs else None)


_NUM = re.compile(r"(\d+)")


def _style(named: list):
    """From (name, layer) pairs, a function (name, new layer) -> new name: the number in the
    names that is the layer plus one offset for all of them (``past_key_values.3.key`` is
    layer 3; ``past.4`` of layer 3 is offset 1).  Refused when no number is."""
    choices = None
    for name, layer in named:
        nums = [int(t) for t in _NUM.findall(name)]
        mine = {(k, n - layer) for k, n in enumerate(nums)}
        choices = mine if choices is None else choices & mine
    if not choices:
        sample = ", ".join(n for n, _ in named[:4])
        raise PlanError(f"the cache tensors ({sample}) must be renumbered for the new layers, "
                        "but no number in their names counts the layers.",
                        hint="Expand only in width (--width/--hidden/--heads), which keeps the "
                             "names, or name the cache tensors by layer number.")
    offset = min((off for _, off in choices), key=abs)
    where = [k for k, off in choices if off == offset]  # every number that counts the layers

    def rename(name: str, layer: int) -> str:
        parts = _NUM.split(name)  # text, number, text, number, ...
        for k in where:
            parts[2 * k + 1] = str(layer + offset)
        return "".join(parts)

    return rename


# --------------------------------------------------------------------------- plan
def plan_maps(slots: list, renamed: dict, twins: list, kv_index: list | None) -> tuple[dict, dict]:
    """What verification needs to feed and compare caches (recorded in the plan): each source
    cache output compared with the expanded model's output of its layer, the source's KV heads
    taken as the KV-head map repeats them (``take``); each expanded cache input fed from the
    source's of its layer the same way, a twin's with zeros of that shape (no map of the
    source's cache gives a twin's keys and values; a twin's attention adds nothing whatever
    they are).  Returns the plan's ``outputs`` and ``inputs`` entries for them."""
    outputs, inputs = {}, {}
    for s in slots:
        new_out, new_in = renamed.get(s.output, s.output), renamed.get(s.input, s.input)
        m: dict = {"compare": "whole"}
        feed: dict = {"from": s.input}
        if kv_index is not None and s.heads_axis is not None:
            m = {"compare": "take", "axis": s.heads_axis, "index": list(kv_index)}
            feed.update(axis=s.heads_axis, index=list(kv_index))
        if new_out != s.output:
            m["name"] = new_out
        if s.output:
            outputs[s.output] = m
        if s.input and (len(feed) > 1 or new_in != s.input):
            inputs[new_in] = feed
    for s, name_in, _name_out in twins:
        if not name_in:
            continue  # a twin's own output: only the expanded model has it
        feed = {"from": s.input, "zeros": True}
        if kv_index is not None and s.heads_axis is not None:
            feed.update(axis=s.heads_axis, index=list(kv_index))
        inputs[name_in] = feed
    return outputs, inputs

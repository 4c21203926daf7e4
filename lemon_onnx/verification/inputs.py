"""Inputs: synthesised (deterministic, realistic) or the user's .npz, checked against the graph."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .models import as_ir, describe
from ..errors import one_line

DEFAULT_CASES = ((2, 7), (3, 11))
FALLBACK_VOCAB = 100

def _recognised_facts(ir_model, cache: dict | None = None
                      ) -> tuple[int | None, int | None, str | None]:
    """(vocab, token-type rows, reason recognition failed)."""
    try:
        desc = describe(ir_model, cache)
    except Exception as exc:  # any failure: fall back, and say so
        return None, None, one_line(str(exc) or type(exc).__name__, 200)
    rows = None
    tt = desc.embeddings.token_type
    if tt and tt in ir_model.graph.initializers:
        shape = ir_model.graph.initializers[tt].shape
        if shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
            rows = int(shape[0])
    return desc.vocab, rows, None


#: ops that carry index values unchanged (only their layout or dtype) to a Gather
_INDEX_CARRIERS = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Expand", "Flatten",
                   "Transpose"}


def roles_from_graph(ir_model, desc) -> dict:
    """Input name -> role, read from the graph: an integer input whose values reach a Gather
    as indices (through layout-only ops) into the recognised token table is ``ids``, into the
    token-type table ``token_type``, into any other constant table (position embeddings,
    rotary cos/sin caches) ``position``; any other integer input (it feeds arithmetic: the
    attention mask) ``mask``; float inputs ``float``."""

    g = ir_model.graph
    emb = desc.embeddings
    tables = {}
    for name, role in ((emb.token, "ids"), (emb.token_type, "token_type"),
                       (emb.position, "position")):
        if name and name in g.initializers:
            tables[g.initializers[name]] = role
    inits = set(g.initializers)
    # a joined cache holds the past (empty in the plain runs); an encoder-decoder's encoder
    # cache, read but never returned, holds keys and values like any float input
    caches = {s.input for s in getattr(desc, "caches", None) or [] if s.concat}
    roles = {}
    for v in g.inputs:
        if v.name in inits or v.dtype is None:
            continue
        if v.name in caches:
            roles[v.name] = "cache"
            continue
        if v.dtype.is_floating_point():
            roles[v.name] = "float"
            continue
        found = {tables.get(t, "position") for t in _gathered_tables(v)}
        for role in ("ids", "token_type", "position"):
            if role in found:
                roles[v.name] = role
                break
        else:
            roles[v.name] = "position" if _position_values(v) else "mask"
    return roles


@dataclasses.dataclass
class ImageInput:
    """What the graph says about an input its patch convolution reads: its channel count and,
    per spatial axis, the patches the embeddings hold positions for (None where no constant
    fixes them: any size fits) and the convolutions' (kernel, stride, padding, dilation)."""

    name: str
    channels: int
    grid: tuple | None
    convs: list  # per Conv in order: [(kernel, stride, pads total, dilation) per spatial axis]
    how: str

    def dims(self, s: int) -> dict[int, int]:
        """Axis -> size: channels, and the smallest spatial size that gives the grid (a square
        grid of ceil(sqrt(s)) patches a side where the graph fixes none)."""
        rank = len(self.convs[0])
        grid = self.grid or (math.ceil(s ** (1 / rank)),) * rank
        out = {1: self.channels}
        for k in range(rank):
            n = grid[k]
            for conv in reversed(self.convs):  # out = (in + pads - dil*(kernel-1) - 1)//stride + 1
                kernel, stride, pads, dil = conv[k]
                n = max(1, (n - 1) * stride + dil * (kernel - 1) + 1 - pads)
            out[2 + k] = n
        return out


def image_inputs(ir_model, desc) -> dict[str, ImageInput]:
    """Image (or other signal) inputs read by the recognised patch convolution, sized from the
    graph, never from names: channels from the first Conv's weight (its input channels per
    group times the groups); the number of patches from the embeddings' constants: the rows of
    the [..., n, hidden] constants added onto the tokens (a position table, or its pieces
    where it is interpolated: DINOv2) less the rows of those concatenated with them (cls and
    distillation tokens); the patches laid out in the most nearly square grid, each side
    through the convolutions' arithmetic back to pixels."""
    from ..graph import back_pass, const_shape, const_source

    emb = desc.embeddings
    if not emb.patch_conv or not emb.patch_weight:
        return {}
    g = ir_model.graph
    nodes = {n.name: n for n in g}
    chain = [nodes.get(c[0]) for c in emb.stem] + [nodes.get(emb.patch_conv)]
    if any(c is None for c in chain):
        return {}
    x = back_pass(chain[0].inputs[0])
    w_first = const_shape(const_source(chain[0].inputs[1])[0])
    w_last = const_shape(const_source(chain[-1].inputs[1])[0])
    if not x.is_graph_input() or not w_first or not w_last or len(w_first) < 3:
        return {}
    group = chain[0].attributes["group"].value if "group" in chain[0].attributes else 1
    rank = len(w_first) - 2
    convs = [_conv_arith(c, rank) for c in chain]
    if any(c is None for c in convs):
        return {}
    patches, how = _patch_count(g, x, emb.output, int(w_last[0]))
    grid = _grid(patches, rank) if patches else None
    return {x.name: ImageInput(x.name, int(w_first[1]) * int(group), grid, convs, how)}


def _conv_arith(node, rank: int) -> list | None:
    """(kernel, stride, pads total, dilation) per spatial axis of a Conv; None for padding
    the graph leaves to the runtime (auto_pad SAME_*), which is still sized by stride 1."""
    a = node.attributes
    w = node.inputs[1].shape if node.inputs[1] is not None else None
    kernel = list(a["kernel_shape"].value) if "kernel_shape" in a else \
        ([int(d) for d in list(w)[2:]] if w is not None and all(isinstance(d, int)
                                                                for d in list(w)[2:]) else None)
    if kernel is None or len(kernel) != rank:
        return None
    strides = list(a["strides"].value) if "strides" in a else [1] * rank
    dil = list(a["dilations"].value) if "dilations" in a else [1] * rank
    pads = list(a["pads"].value) if "pads" in a else [0] * (2 * rank)
    auto = a["auto_pad"].value if "auto_pad" in a else "NOTSET"
    if auto not in ("NOTSET", "VALID"):
        return None
    return [(int(kernel[k]), int(strides[k]), int(pads[k] + pads[rank + k]), int(dil[k]))
            for k in range(rank)]


def _patch_count(g, x, output: str, hidden: int) -> tuple[int | None, str]:
    """(patches, how it was read): positions added onto the tokens less the tokens
    concatenated with the patches, counted in rows of [..., n, hidden] float constants
    among the data ancestors of the embeddings' output; None where nothing fixes it."""
    from ..graph import const_shape, const_source, data_ancestors

    out = next((o for n in g for o in n.outputs if o.name == output), None)
    if out is None:
        return None, "the embeddings' output was not found"
    order = {n: i for i, n in enumerate(g)}
    anc = sorted(data_ancestors(out) | ({out.producer()} if out.producer() else set()),
                 key=lambda n: order.get(n, 0))
    from_x: set = set()  # values computed from the image's values
    for n in anc:
        if n.op_type not in ("Shape", "Size") and any(
                i is x or i in from_x for i in n.inputs if i is not None):
            from_x.update(n.outputs)

    def rows(v, min_rank: int) -> int:
        """Rows of the hidden-wide float constants ``v``'s values come from (a token
        concatenated may be a bare [hidden] vector: CLIP's class embedding)."""
        vals = [v] + [i for n in data_ancestors(v) if n.op_type not in ("Shape", "Size")
                      for i in n.inputs if i is not None]
        total, seen = 0, set()
        for i in vals:
            c = const_source(i)[0]
            t = c.const_value if c is not None else None
            if c is None or c in seen:
                continue
            seen.add(c)
            shape = const_shape(c)
            dtype = t.dtype if t is not None else c.dtype
            if shape and len(shape) >= min_rank and shape[-1] == hidden and dtype is not None and \
                    dtype.is_floating_point():
                total += int(np.prod(shape[:-1]))
        return total

    positions = tokens = 0
    for n in anc:
        if not any(o in from_x for o in n.outputs):
            continue
        others = [i for i in n.inputs if i is not None and i not in from_x and i is not x]
        if n.op_type == "Add":  # a [hidden] vector added (a bias) is no position
            positions += sum(rows(i, 2) for i in others)
        elif n.op_type == "Concat":
            tokens += sum(rows(i, 1) for i in others)
    if positions == 0:
        return None, "no position table fixes the number of patches"
    if positions <= tokens:
        return None, (f"the positions ({positions}) do not outnumber the extra tokens "
                      f"({tokens})")
    return positions - tokens, (f"{positions} positions less {tokens} extra token(s)")


def _grid(n: int, rank: int) -> tuple:
    """``n`` as a product of ``rank`` factors, as nearly equal as divisors allow (largest
    last)."""
    sides = []
    for k in range(rank, 1, -1):
        side = max(d for d in range(1, int(round(n ** (1 / k))) + 1) if n % d == 0)
        sides.append(side)
        n //= side
    return tuple(sides + [n])


def _gathered_tables(v) -> list:
    """The constant tables ``v``'s values index (Gather indices, through layout-only ops)."""
    from ..graph import const_source

    found, frontier, seen = [], [v], set()
    while frontier:
        x = frontier.pop()
        for use in x.uses():
            n = use.node
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Gather" and use.idx == 1:
                table, _ = const_source(n.inputs[0])
                if table is not None:
                    found.append(table)
            elif n.op_type in _INDEX_CARRIERS and use.idx == 0:
                frontier.extend(n.outputs)
    return found


def index_bounds(ir_model) -> dict[str, int]:
    """Integer input -> the fewest rows among the tables its values index: every value drawn
    for it stays below (a token-type table of 2 rows that recognition could not tell from a
    position table, RoFormer's; LayoutLM's)."""
    from ..graph import const_shape

    bounds = {}
    for v in ir_model.graph.inputs:
        if v.dtype is None or v.dtype.is_floating_point():
            continue
        rows = [shape[0] for shape in map(const_shape, _gathered_tables(v))
                if shape and isinstance(shape[0], int)]
        if rows:
            bounds[v.name] = min(rows)
    return bounds


def _role_by_name(name: str, dtype: np.dtype) -> str:
    """Only when the model is not recognised: guess from the input's name."""
    n = name.lower()
    if "token_type" in n or "segment" in n:
        return "token_type"
    if "position" in n:
        return "position"
    if "mask" in n:
        return "mask"
    if dtype.kind in "iu" and ("input_ids" in n or n == "ids" or n.endswith("_ids")
                               or n.endswith("tokens")):
        return "ids"
    if dtype.kind == "f":
        return "float"
    return "other"


def _dim_values(ir_model, b: int, s: int, known: dict | None = None) -> dict:
    """Symbolic dim name -> size, shared by all inputs; ``known``: sizes read from the graph
    (``graph_dims``), which names never override; a dim that is a sum of others is the sum."""
    sizes: dict = dict(known or {})
    order = 0
    for v in ir_model.graph.inputs:
        if v.shape is None:
            continue
        for ax, d in enumerate(v.shape.dims):
            if isinstance(d, int):
                continue
            key = getattr(d, "value", None)
            if key is None or key in sizes or _sum_terms(key):
                continue
            k = key.lower()
            if "batch" in k:
                sizes[key] = b
            elif any(t in k for t in ("seq", "len", "token", "time", "position", "total")):
                sizes[key] = s
            else:
                sizes[key] = b if (ax == 0 and order == 0) else s
                order += 1
    return _with_sums(ir_model, sizes)


_TERM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _sum_terms(key: str) -> list | None:
    """``past_sequence_length + sequence_length`` -> its terms; None for a plain name."""
    if "+" not in key:
        return None
    terms = [t.strip() for t in key.split("+")]
    return terms if all(_TERM.match(t) or t.isdigit() for t in terms) else None


def _with_sums(ir_model, sizes: dict) -> dict:
    """Dims declared as sums of other dims (optimum's attention mask over past + current
    tokens) get the sum of their terms' sizes; a term no input declares on its own counts as
    the sequence it stands beside, never guessed from its name: such a sum is left out."""
    for v in ir_model.graph.inputs:
        for d in (v.shape.dims if v.shape is not None else ()):
            key = getattr(d, "value", None)
            terms = _sum_terms(key) if isinstance(key, str) else None
            if not terms or key in sizes:
                continue
            vals = [int(t) if t.isdigit() else sizes.get(t) for t in terms]
            if all(x is not None for x in vals):
                sizes[key] = sum(vals)
    return sizes


def _position_values(v) -> bool:
    """Positions the walk above does not see: values that become rotary angles (they reach a
    Sin or Cos through arithmetic and layout ops only), or that pick rows of a table computed
    from constants alone (GPT-J's sin/cos rows, by GatherElements on a tiled table), perhaps
    shifted by a constant first (OPT's offset of 2)."""
    def angles(n, idx):
        return n.op_type in _ANGLE_OPS and not (n.op_type == "Gather" and idx == 1)

    def carries(n, idx):
        return (n.op_type in _INDEX_CARRIERS | {"Tile"} and idx == 0) or _constant_offset(n)

    def picks_rows(n, idx):
        return n.op_type in ("Gather", "GatherElements") and idx == 1 and \
            _from_constants(n.inputs[0])

    return _reaches(v, angles, lambda n, idx: n.op_type in ("Sin", "Cos")) or \
        _reaches(v, carries, picks_rows)


def _reaches(v, through, target, limit: int = 64) -> bool:
    """Whether a walk from ``v`` along its uses, through nodes ``through(node, input index)``
    accepts, comes to a node ``target(node, input index)`` accepts."""
    frontier, seen = [v], set()
    while frontier and len(seen) < limit:
        x = frontier.pop()
        for use in x.uses():
            n = use.node
            if target(n, use.idx):
                return True
            if id(n) not in seen and through(n, use.idx):
                seen.add(id(n))
                frontier.extend(n.outputs)
    return False


def _from_constants(v, limit: int = 64) -> bool:
    """Whether ``v`` is computed from constants alone (a table tiled or expanded), reading no
    graph input's values (their shapes may size it)."""
    stack, seen = [v], set()
    while stack and len(seen) < limit:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        p = x.producer()
        if p is None:
            if x.is_graph_input():
                return False
            continue
        if p.op_type == "Shape":
            continue
        stack.extend(p.inputs)
    return not stack


def _constant_offset(n) -> bool:
    """An index plus or minus a constant (OPT's positions start at 2) is still an index."""
    from ..graph import is_const

    return n.op_type in ("Add", "Sub") and len(n.inputs) == 2 and \
        sum(is_const(i) for i in n.inputs) == 1


#: what rotary embeddings do to positions before their Sin and Cos (angles = positions times
#: inverse frequencies), and layout ops; a CumSum is not among them (positions computed from
#: the mask are the mask's business)
_ANGLE_OPS = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity",
              "Concat", "MatMul", "Mul", "Div", "Add", "Sub", "Gather", "Slice", "Flatten"}


def graph_dims(ir_model, roles: dict, cache: dict | None, b: int, s: int,
               past: int = 0) -> dict:
    """Symbolic dims read from where the inputs' values go: the token ids' axes are the batch
    and the sequence; a KV cache's joined axis is the past (``past`` tokens: 0, an empty
    cache, for the plain runs; role "cache", zeros) and its first axis the batch.  ``cache``:
    recognition's (``models.describe``)."""
    try:
        desc = describe(ir_model, cache)
    except Exception:  # not recognised: no structure to read the dims from
        desc = None
    sizes: dict = {}

    def put(v, axis: int, size: int) -> None:
        if v.shape is not None and -len(v.shape) <= axis < len(v.shape):
            key = getattr(v.shape[axis], "value", None)
            if isinstance(key, str) and key not in sizes:
                sizes[key] = size

    by_name = {v.name: v for v in ir_model.graph.inputs}
    for name, role in roles.items():
        v = by_name.get(name)
        if v is not None and role == "ids" and v.shape is not None and len(v.shape) == 2:
            put(v, 0, b)
            put(v, 1, s)
    for slot in getattr(desc, "caches", None) or []:
        if not slot.concat:  # not joined: its tokens are the encoder's, no past
            continue
        v = by_name.get(slot.input)
        if v is not None:
            put(v, slot.axis, past)
            put(v, 0, b)
    return sizes


def positions_from_mask(mask: np.ndarray, length: int) -> np.ndarray:
    """Position ids as generation derives them from the attention mask: the running count of
    attended tokens minus one (1 where the mask is 0), the last ``length`` of them."""
    m = np.asarray(mask).astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    pos[m == 0] = 1
    return pos[..., -length:] if length <= pos.shape[-1] else pos


def synthesize(ir_model, *, seed: int, vocab: int | None, cases,
                cache: dict | None = None) -> tuple[list, list]:
    notes: list = []
    inits = set(ir_model.graph.initializers)
    inputs = [v for v in ir_model.graph.inputs if v.name not in inits]
    specs = []
    for v in inputs:
        if v.dtype is None or v.shape is None:
            raise InputError(f"input {v.name!r} has no declared {'dtype' if v.dtype is None else 'shape'}"
                             ", so inputs cannot be synthesised for it.",
                             hint="Pass your own inputs with --inputs FILE.npz.")
        try:
            npdt = np.dtype(v.dtype.numpy())
        except Exception:
            raise InputError(f"input {v.name!r} has dtype {v.dtype}, which numpy cannot "
                             "represent.", hint="Pass your own inputs with --inputs FILE.npz."
                             ) from None
        specs.append((v, npdt))
    images: dict = {}
    try:
        desc = describe(ir_model, cache)
        roles = roles_from_graph(ir_model, desc)
        images = image_inputs(ir_model, desc)
    except Exception as exc:  # not recognised: names are all there is, and we say so
        roles = {v.name: _role_by_name(v.name, npdt) for v, npdt in specs}
        notes.append("input roles guessed from their names (the model was not recognised: "
                     f"{one_line(str(exc) or type(exc).__name__, 200)})")
    for im in images.values():
        notes.append(f"{im.name}: {im.channels} channel(s) from the patch Conv's weight; "
                     + (f"a {'x'.join(map(str, im.grid))} patch grid ({im.how})" if im.grid
                        else f"any patch grid fits ({im.how}): a square one"))
    specs = [(v, npdt, roles.get(v.name, "other")) for v, npdt in specs]
    tt_rows = None
    if any(r in ("ids", "token_type") for _, _, r in specs):
        rec_vocab, tt_rows, why = _recognised_facts(ir_model, cache)
        if vocab is None:
            vocab = rec_vocab
            if vocab is None:
                vocab = FALLBACK_VOCAB
                notes.append(f"vocabulary size not recognised ({why or 'no token embedding'}); "
                             f"token ids drawn from [0, {FALLBACK_VOCAB})")
    bounds = index_bounds(ir_model)
    from ..fusion import unpadded_decoding

    unpadded = unpadded_decoding(ir_model.graph)
    if unpadded:
        notes.append(f"the first case's rows are not padded: it is the prefix of cached "
                     f"decoding, and {unpadded}'s decomposition (the float64 level) appends "
                     "each row's new tokens after the whole past, as the kernel does only for "
                     "rows of equal length")
    out = []
    for k, (b, s) in enumerate(cases):
        rng = np.random.default_rng([int(seed), k])
        sizes = _dim_values(ir_model, int(b), int(s),
                            graph_dims(ir_model, roles, cache, int(b), int(s)))
        feeds = {}
        for v, npdt, role in specs:
            shape = []
            fixed = images[v.name].dims(int(s)) if v.name in images else {}
            for ax, d in enumerate(v.shape.dims):
                if isinstance(d, int):
                    shape.append(d)
                elif ax in fixed:
                    shape.append(fixed[ax])
                else:
                    key = getattr(d, "value", None)
                    shape.append(sizes[key] if key in sizes else (b if ax == 0 else s))
            shape = tuple(shape)
            if role == "ids":
                a = rng.integers(0, vocab, size=shape)
            elif role == "mask":
                a = np.ones(shape)
                if a.ndim == 2 and shape[0] >= 1 and shape[1] >= 2 and not (unpadded and k == 0):
                    pad = min(shape[1] - 1, max(1, shape[1] // 4))
                    a[-1, shape[1] - pad:] = 0
            elif role == "token_type":
                a = np.zeros(shape)
                n_types = 2 if tt_rows is None else min(2, tt_rows)
                if n_types >= 2 and a.ndim >= 1 and shape[-1] >= 2:
                    a[..., shape[-1] // 2:] = 1
            elif role == "position":
                a = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).copy() \
                    if shape else np.zeros(())
            elif role == "float":
                a = rng.standard_normal(shape)
            else:
                a = np.zeros(shape)
            feeds[v.name] = np.ascontiguousarray(a.astype(npdt))
        _positions_from_masks(feeds, specs)
        for name, rows in bounds.items():  # last: no value may index past its table
            if name in feeds:
                feeds[name] = np.ascontiguousarray(np.mod(feeds[name], rows))
        out.append(feeds)
    return out, notes


def _positions_from_masks(feeds: dict, specs: list) -> None:
    """Position ids follow the attention mask when there is one of rank 2 (generation's rule,
    ``positions_from_mask``), so that they agree with its padding and its past tokens."""
    masks = [v.name for v, _, role in specs if role == "mask" and feeds[v.name].ndim == 2]
    if len(masks) != 1:
        return
    mask = feeds[masks[0]]
    for v, npdt, role in specs:
        a = feeds[v.name]
        if role == "position" and a.ndim == 2 and a.shape[0] == mask.shape[0] \
                and a.shape[1] <= mask.shape[1]:
            feeds[v.name] = positions_from_mask(mask, a.shape[1]).astype(npdt)


def synthesize_inputs(model_path_or_proto, *, seed: int = 0, vocab: int | None = None,
                      cases: Iterable = DEFAULT_CASES) -> list[dict[str, np.ndarray]]:
    """Deterministic realistic inputs for the model's graph inputs, one dict per
    (batch, sequence) case; see the module docstring for the rules."""
    ir_model, _ = as_ir(model_path_or_proto)
    feeds, _ = synthesize(ir_model, seed=seed, vocab=vocab, cases=tuple(cases))
    return feeds


_CASE_KEY = re.compile(r"^case(\d+)/(.+)$")


def load_inputs(path) -> list[dict[str, np.ndarray]]:
    """Cases from an .npz: keys ``<input>`` (one case) or ``case<k>/<input>`` (the fixtures'
    ``case<k>/in/<input>`` layout too; ``case<k>/out/...`` is ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such inputs file.", hint="Pass an .npz made by numpy.savez.")
    try:
        data = np.load(p, allow_pickle=False)
        keys = list(data.files)
        arrays = {k: data[k] for k in keys}
    except Exception as exc:
        raise InputError(f"{p} is not a readable .npz file ({one_line(exc, 200)}).",
                         hint="Write it with numpy.savez(path, **{'case0/input_ids': ...}).") \
            from None
    if not arrays:
        raise InputError(f"{p} contains no arrays.", hint="Write at least one input.")
    matched = {k: _CASE_KEY.match(k) for k in keys}
    if all(matched.values()):
        rests = [m.group(2) for m in matched.values()]
        io_layout = all(r.startswith(("in/", "out/")) for r in rests)
        cases: dict[int, dict] = {}
        for k, m in matched.items():
            rest = m.group(2)
            if io_layout:
                if rest.startswith("out/"):
                    continue
                rest = rest[3:]
            cases.setdefault(int(m.group(1)), {})[rest] = arrays[k]
        return [cases[i] for i in sorted(cases)]
    if any(matched.values()):
        raise InputError(f"{p} mixes case<k>/<input> keys with plain <input> keys.",
                         hint="Use one layout for all keys.")
    return [arrays]


def save_inputs_npz(cases: Sequence[Mapping[str, np.ndarray]], path) -> Path:
    """Write cases as ``case<k>/<input>`` (no '.npz' suffix is added to ``path``)."""
    p = Path(path)
    flat = {f"case{k}/{n}": np.asarray(a) for k, c in enumerate(cases) for n, a in c.items()}
    with open(p, "wb") as f:
        np.savez(f, **flat)
    return p


def conform(cases: list, ir_model, label: str, notes: list) -> list:
    """Check user inputs against the graph inputs; cast within a kind (int32->int64)."""
    inits = set(ir_model.graph.initializers)
    decl = {v.name: v for v in ir_model.graph.inputs if v.name not in inits}
    out = []
    for k, case in enumerate(cases):
        feeds = dict(case)
        missing = [n for n in decl if n not in feeds]
        if missing:
            raise InputError(f"inputs case {k} lacks {', '.join(missing)}, which {label} needs "
                             f"(given: {', '.join(sorted(feeds)) or 'nothing'}).",
                             hint="Add them to the .npz under case<k>/<input name>.")
        for n, v in decl.items():
            a = np.asarray(feeds[n])
            if v.shape is not None and a.ndim != len(v.shape):
                raise InputError(f"inputs case {k}: {n!r} has shape {list(a.shape)} but the "
                                 f"model declares rank {len(v.shape)} ({v.shape}).",
                                 hint="Fix the array in the .npz.")
            try:
                want = np.dtype(v.dtype.numpy()) if v.dtype is not None else a.dtype
            except Exception:
                want = a.dtype
            if a.dtype != want:
                if a.dtype.kind == want.kind or (a.dtype.kind in "iub" and want.kind in "iub"):
                    notes.append(f"case {k}: {n} cast from {a.dtype} to {want}")
                    a = a.astype(want)
                else:
                    raise InputError(f"inputs case {k}: {n!r} is {a.dtype} but the model wants "
                                     f"{want}.", hint="Fix the array's dtype in the .npz.")
            feeds[n] = np.ascontiguousarray(a)
        out.append(feeds)
    return out

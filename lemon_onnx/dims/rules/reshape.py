"""Rules that regroup or repeat the units of axes: Reshape (the input's atoms regrouped
row-major by the target shape, an atom split where a literal ends inside it), Expand and Tile
(broadcast and repeated axes) and Resize (resampled axes are new, the others kept)."""

from __future__ import annotations

import onnx_ir as ir

from ..analysis import AxisAnalysis
from ..atoms import Atom, Axis, UnifyError, find, leaves, size_of, split_atom, unify
from ..closed_world import rule
from ..elements import UNK, Elem, const_floats


@rule("Reshape")
def reshape(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    el = an.elems.get(node.inputs[1])
    if node.inputs[0] in an.elems and el is not None:
        an.elems[node.outputs[0]] = list(an.elems[node.inputs[0]])
    if x is None:
        return
    if el is None:
        _reshape_fallback(an, node, x)
        return
    out = reshape_axes(an, node, x, el)
    if out is None:
        _reshape_fallback(an, node, x)
    else:
        an.axes[node.outputs[0]] = out


def _reshape_fallback(an: AxisAnalysis, node: ir.Node, x: list[Axis]) -> None:
    ax = an.fresh_axes_from_shape(node.outputs[0], "reshape")
    if ax is not None:
        an.axes[node.outputs[0]] = ax
        an.mark_opaque(node.outputs[0], range(len(ax)))
    el = an.elems.get(node.inputs[1]) or []
    for e in el:
        if e.kind == "lit" and e.value not in (0, -1, 1):
            an.unexplained_lit(e, node)


def reshape_axes(an: AxisAnalysis, node: ir.Node, x: list[Axis],
                 el: list[Elem]) -> list[Axis] | None:
    """Regroup the input's atoms (row-major order is preserved) by the target shape."""
    allowzero = node.attributes["allowzero"].value if "allowzero" in node.attributes else 0
    flat = leaves([a for ax in x for a in ax])
    # resolve 0 (copy input dim) entries first
    entries: list[tuple[str, object, Elem]] = []
    for k, e in enumerate(el):
        known = e.kind in ("lit", "fixed")
        if known and e.value == 0 and not allowzero:
            if k >= len(x):
                return None
            entries.append(("atoms", list(x[k]), e))
        elif known and e.value == -1:
            entries.append(("infer", None, e))
        elif known:
            entries.append(("lit", e.value, e))
        elif e.kind == "dim":
            entries.append(("atoms", list(e.atoms), e))
        else:
            entries.append(("unk", None, e))
    n_free = sum(1 for t, _, _ in entries if t in ("infer", "unk"))
    if n_free > 1:
        return None
    result: list[Axis | None] = [None] * len(entries)
    pending: list[tuple[int, Elem, list]] = []

    ties: list[tuple] = []

    def merged(seq: list[Atom], want: list[Atom], reverse: bool) -> list[Atom] | None:
        """The whole atoms at the front (back) of seq whose sizes multiply to the size of
        ``want``, when they are not ``want``'s sizes one by one: the entry regroups them
        (its size only is read from ``want``); None if no such run of atoms exists."""
        total = size_of(want)
        n = len(want)
        took = seq[-n:] if reverse else seq[:n]
        sizes = [find(a).size for a in took]
        if total is None or (len(took) == n and None not in sizes
                             and sizes == [find(a).size for a in want]):
            return None
        run = list(reversed(seq)) if reverse else list(seq)
        prod, m = 1, 0
        while m < len(run) and prod < total:
            if find(run[m]).size is None:
                return None
            prod *= find(run[m]).size
            m += 1
        if prod != total or m == 0:
            return None
        took = run[:m]
        if reverse:
            took.reverse()
            del seq[-m:]
        else:
            del seq[:m]
        return took

    def consume(seq: list[Atom], kind: str, val, reverse: bool) -> list[Atom] | None:
        """Take atoms from the front (or back) of seq matching the entry."""
        if kind == "atoms":
            want = leaves(val)
            n = len(want)
            if n == 0:
                return []
            got = merged(seq, want, reverse)
            if got is not None:
                ties.append((got, want))
                return got
            took = seq[-n:] if reverse else seq[:n]
            if len(took) < n:
                return None
            if reverse:
                del seq[-n:]
            else:
                del seq[:n]
            try:
                unify(took, want)
            except UnifyError:
                return None
            return took
        # literal: product of consecutive atoms equal to val (splitting the last one)
        target = int(val)
        if target == 1:
            return []
        took: list[Atom] = []
        prod = 1
        while prod < target:
            if not seq:
                return None
            a = seq.pop() if reverse else seq.pop(0)
            if a.size is None:
                return None
            if prod * a.size <= target:
                took.append(a)
                prod *= a.size
            else:
                need = target // prod
                if target % prod or a.size % need:
                    return None
                an.reshape_splits.append((node, a))
                if reverse:
                    rest, part = split_atom(a, [a.size // need, need])
                    seq.append(rest)
                else:
                    part, rest = split_atom(a, [need, a.size // need])
                    seq.insert(0, rest)
                took.append(part)
                prod *= need
        if reverse:
            took.reverse()
        return took if prod == target else None

    seq = list(flat)
    free = next((k for k, (t, _, _) in enumerate(entries) if t in ("infer", "unk")),
                len(entries))
    for k in range(free):
        t, val, e = entries[k]
        got = consume(seq, t, val, False)
        if got is None:
            return None
        result[k] = got
        if t == "lit":
            pending.append((k, e, got))
    for k in range(len(entries) - 1, free, -1):
        t, val, e = entries[k]
        got = consume(seq, t, val, True)
        if got is None:
            return None
        result[k] = got
        if t == "lit":
            pending.append((k, e, got))
    if free < len(entries):
        result[free] = list(seq)
    elif seq:
        return None
    for _, e, got in pending:
        if e.kind == "fixed":
            an.fixed_sizes.append((node, list(got)))
        else:
            an.lit(e, got, node)
    for got, want in ties:
        k = next(k for k, r in enumerate(result) if r is got)
        an.size_ties.append((node, k, list(got), list(want)))
    return [list(r) for r in result]  # type: ignore[arg-type]


@rule("Expand")
def expand(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    el = an.elems.get(node.inputs[1])
    if x is None:
        return
    if el is None:
        ax = an.fresh_axes_from_shape(node.outputs[0], "expand")
        if ax is not None:
            # keep the input's atoms where sizes agree
            off = len(ax) - len(x)
            kept = set()
            for k, a in enumerate(x):
                if off + k >= 0 and size_of(a) == size_of(ax[off + k]) and size_of(a) != 1:
                    ax[off + k] = list(a)
                    kept.add(off + k)
            an.mark_opaque(node.outputs[0], [
                k for k in range(len(ax)) if k not in kept and k - off >= 0
                and size_of(x[k - off]) != 1])  # size-1 axes are broadcast
            an.axes[node.outputs[0]] = ax
        return
    rank = max(len(x), len(el))
    out = []
    for k in range(rank):
        xi = k - (rank - len(x))
        ei = k - (rank - len(el))
        xa = x[xi] if xi >= 0 else []
        e = el[ei] if ei >= 0 else Elem("lit", 1)
        if e.kind == "dim":
            if size_of(xa) not in (1,):
                an.try_unify(xa, e.atoms, f"Expand {node.name}")
            out.append(list(e.atoms) if size_of(xa) == 1 else list(xa))
        elif e.kind == "lit":
            if e.value in (1, -1):
                out.append(list(xa))
            elif size_of(xa) == 1:
                new = [Atom(e.value, origin="expand")]
                an.lit(e, new, node)
                out.append(new)
            else:
                if size_of(xa) == e.value:
                    an.lit(e, xa, node)
                out.append(list(xa))
        else:
            out.append(list(xa) if size_of(xa) != 1 else
                       an.fresh_from_inferred(node.outputs[0], k, "expand",
                                              broadcast=True))
    an.axes[node.outputs[0]] = out


@rule("Tile")
def tile(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    el = an.elems.get(node.inputs[1])
    if x is None:
        return
    out = []
    for k, a in enumerate(x):
        e = el[k] if el and k < len(el) else UNK
        if e.kind == "lit" and e.value == 1:
            out.append(list(a))
        else:
            ax = an.fresh_from_inferred(node.outputs[0], k, "tile",
                                        broadcast=size_of(a) == 1)
            if e.kind == "lit":
                rep = Atom(e.value, origin="tile")
                an.lit(e, [rep], node)
            out.append(ax)
    an.axes[node.outputs[0]] = out


@rule("Resize")
def resize(an: AxisAnalysis, node: ir.Node) -> None:
    """Resize (interpolation) keeps every axis it does not resample: a scale of 1 or an
    unchanged size (a channel axis: interpolated position tables); the others are new."""
    x = an.get(node.inputs[0])
    if x is None:
        return
    ins = list(node.inputs) + [None] * (4 - len(node.inputs))
    scales = const_floats(ins[2])
    sizes = an.elems.get(ins[3]) if ins[3] is not None else None
    out = []
    for k, a in enumerate(x):
        keep = scales is not None and k < len(scales) and scales[k] == 1.0
        if sizes and k < len(sizes) and sizes[k].kind == "lit":
            keep = sizes[k].value == size_of(a)
        elif sizes and k < len(sizes) and sizes[k].kind == "dim":
            keep = leaves(sizes[k].atoms) == leaves(a)  # the input's own size, read back
        out.append(list(a) if keep else an.fresh_from_inferred(node.outputs[0], k,
                                                               "resize"))
    an.axes[node.outputs[0]] = out

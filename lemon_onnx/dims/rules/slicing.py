"""Rules that cut an axis or write into parts of it: Slice (whole halves, torch.chunk's
parts, literal bounds and bounds computed at run time), Split and ScatterND."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..analysis import AxisAnalysis
from ..atoms import Atom, Axis, UnifyError, leaves, size_of, unify
from ..closed_world import rule
from ..elements import INT_BIG, UNK, Elem


@rule("Slice")
def slice_(an: AxisAnalysis, node: ir.Node) -> None:
    data = node.inputs[0]
    x = an.get(data)
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = an.elems.get(ins[1]), an.elems.get(ins[2])
    axes_el = an.elems.get(ins[3]) if ins[3] is not None else None
    steps = an.elems.get(ins[4]) if ins[4] is not None else None
    if "starts" in node.attributes:  # opset < 10
        starts = [Elem("lit", int(v)) for v in node.attributes["starts"].value]
        ends = [Elem("lit", int(v)) for v in node.attributes["ends"].value]
        if "axes" in node.attributes:
            axes_el = [Elem("lit", int(v)) for v in node.attributes["axes"].value]
    if starts is None or ends is None:
        if x is not None:
            _slice_fallback(an, node, x, axes_el)
        return
    n = len(starts)
    axes = ([e.value for e in axes_el] if axes_el and all(e.kind == "lit" for e in axes_el)
            else list(range(n)))
    # slicing a shape vector
    if data in an.elems and len(axes) == 1:
        el = an.elems[data]
        s, e_ = starts[0], ends[0]
        step = steps[0].value if steps and steps[0].kind == "lit" else 1
        if s.kind == "lit" and e_.kind == "lit" and step == 1:
            lo = s.value
            hi = e_.value if e_.value < INT_BIG else len(el)
            an.elems[node.outputs[0]] = el[slice(lo, hi)]
        ax = an.fresh_axes_from_shape(node.outputs[0], "slice")
        if ax is not None:
            an.axes[node.outputs[0]] = ax
        return
    if x is None:
        return
    out = [list(a) for a in x]
    for k, ax in enumerate(axes):
        ax %= len(x)
        size = size_of(x[ax])
        s, e_ = starts[k], ends[k]
        step = steps[k].value if steps and k < len(steps) and steps[k].kind == "lit" else 1
        if step != 1:
            if not (steps and k < len(steps) and steps[k].kind == "lit"):
                an.runtime_cuts.append((node, data, ax))
            out[ax] = an.fresh_from_inferred(node.outputs[0], ax, "slice")
            continue
        if s.kind == "lit" and e_.kind == "lit":
            lo, hi = s.value, e_.value
            if lo == 0 and (hi >= INT_BIG or (size is not None and hi >= size)):
                continue  # whole axis
            if size is not None and lo >= 0 and hi > 0:
                hi = min(hi, size)
                halves = _cut_in_two(an, node, data, ax, size)
                if 2 * lo == size and hi == size and lo > 0 and halves:  # second half
                    out[ax] = _halve(an, node, x[ax], s)
                    continue
                if lo == 0 and 2 * hi == size and halves:  # first half
                    out[ax] = _halve(an, node, x[ax], e_)
                    continue
            if lo < 0 and size is not None and hi >= INT_BIG and 2 * -lo == size \
                    and _cut_in_two(an, node, data, ax, size):
                out[ax] = _halve(an, node, x[ax], s)
                continue
            out[ax] = an.fresh_from_inferred(node.outputs[0], ax, "slice",
                                             cut=(s.value, e_.value, step))
            for lit in (s, e_):
                if data not in an.elems and lit.value > 0 and lit.value < INT_BIG:
                    an.lit(lit, out[ax], node) if lit is e_ and lo == 0 else \
                        an.unexplained_lit(lit, node)
        elif s.kind == "lit" and s.value == 0 and e_.kind == "dim":
            out[ax] = list(e_.atoms)
        elif (part := _parts_slice(x[ax], s, e_)) is not None:
            out[ax] = part
        else:  # a bound computed at run time
            an.runtime_cuts.append((node, data, ax))
            out[ax] = an.fresh_from_inferred(node.outputs[0], ax, "slice")
    an.axes[node.outputs[0]] = out


def _parts_slice(axis: Axis, start: Elem, end: Elem) -> Axis | None:
    """Bounds that are whole multiples a*P, b*P of a run-time size P that ends the sliced
    axis, (count, P) row-major: torch.chunk as TorchScript traces it (P the axis's size
    divided by the count, the bounds P times literal factors).  The slice takes parts a
    to b whatever P becomes: its output axis is P (b = a + 1) or (b - a, P); None where
    the bounds are not such multiples."""
    xl = leaves(axis)
    part = None
    mult = []
    for e in (start, end):
        if e.kind == "lit" and e.value == 0:
            mult.append(0)
            continue
        if e.kind != "dim":
            return None
        el = leaves(e.atoms)
        # literal factors (a Mul by a literal) are fresh atoms; the rest is P
        factors = [a for a in el if a.origin == "mul" and a.size is not None]
        p = [a for a in el if a not in factors]
        if not p or (part is not None and p != part):
            return None
        part = p
        mult.append(int(np.prod([a.size for a in factors])) if factors else 1)
    if part is None or len(xl) <= len(part) or xl[-len(part):] != part:
        return None
    count = size_of(xl[:-len(part)])
    a, b = mult
    if count is None or not 0 <= a < b <= count:
        return None
    return list(part) if b - a == 1 else [Atom(b - a, origin="parts")] + list(part)


def _cut_in_two(an: AxisAnalysis, node: ir.Node, data: ir.Value, axis: int, size: int) -> bool:
    """Whether ``data`` is cut in two halves along ``axis``: this Slice takes one half and
    another Slice of the same value takes the other (rotate_half, a chunk(2)).  A single
    slice that happens to end at the middle is just a slice."""
    spans = set()
    rank = len(an.get(data) or []) or 1
    for c in data.consumers():
        if c.op_type != "Slice":
            continue
        ins = list(c.inputs) + [None] * (5 - len(c.inputs))
        st, en = an.elems.get(ins[1]), an.elems.get(ins[2])
        axes = an.elems.get(ins[3]) if ins[3] is not None else None
        if not st or not en or len(st) != 1 or len(en) != 1 or \
                st[0].kind != "lit" or en[0].kind != "lit":
            continue
        a = axes[0].value if axes and axes[0].kind == "lit" else 0
        if a % rank != axis:
            continue
        lo, hi = st[0].value, en[0].value
        lo = lo + size if lo < 0 else lo
        hi = size if hi >= INT_BIG else (hi + size if hi < 0 else min(hi, size))
        spans.add((lo, hi))
    return {(0, size // 2), (size // 2, size)} <= spans


def _halve(an: AxisAnalysis, node: ir.Node, axis: Axis, lit: Elem):
    """x[..., :n/2] or x[..., n/2:]: the axis is (2, n/2) row-major; return the half atom."""
    two, half = Atom(2, origin="half-count"), Atom(size_of(axis) // 2, origin="half")
    try:
        unify(axis, [two, half])
    except UnifyError:
        return [Atom(size_of(axis) // 2, origin="slice")]
    half_leaves = leaves([half])
    an.lit(lit, half_leaves, node)
    return list(half_leaves)


def _slice_fallback(an: AxisAnalysis, node: ir.Node, x: list[Axis], axes_el) -> None:
    """Bounds computed at run time: the sliced axes are new; when the axes are constants,
    every other axis is the input's own."""
    if axes_el and all(e.kind == "lit" for e in axes_el):
        sliced = {e.value % len(x) for e in axes_el}
        an.runtime_cuts.extend((node, node.inputs[0], k) for k in sorted(sliced))
        an.axes[node.outputs[0]] = [
            an.fresh_from_inferred(node.outputs[0], k, "slice") if k in sliced
            else list(a) for k, a in enumerate(x)]
        return
    ax = an.fresh_axes_from_shape(node.outputs[0], "slice")
    if ax is None:
        return
    for k, a in enumerate(x):
        if k < len(ax) and size_of(a) == size_of(ax[k]):
            ax[k] = list(a)
        else:
            an.runtime_cuts.append((node, node.inputs[0], k))
            an.mark_opaque(node.outputs[0], [k])
    an.axes[node.outputs[0]] = ax


@rule("Split")
def split(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
    axis %= len(x)
    n_out = len(node.outputs)
    el = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        el = an.elems.get(node.inputs[1])
    elif "split" in node.attributes:
        vals = list(node.attributes["split"].value)
        el = [Elem("lit", int(v), ("attr", node.name, "split", i)) for i, v in enumerate(vals)]
    total = size_of(x[axis])
    sizes = [e.value if e.kind == "lit" else None for e in el] if el else None
    if sizes is None and total is not None and total % n_out == 0:
        sizes = [total // n_out] * n_out
    if sizes and None not in sizes and len(set(sizes)) == 1 and total == sum(sizes):
        count, part = Atom(n_out, origin="split-count"), Atom(sizes[0], origin="split")
        an.try_unify(x[axis], [count, part], f"Split {node.name}")
        for k, o in enumerate(node.outputs):
            ax = [list(a) for a in x]
            ax[axis] = [part]
            an.axes[o] = ax
            if el:
                an.lit(el[k], [part], node)
        return
    for k, o in enumerate(node.outputs):
        ax = [list(a) for a in x]
        e = el[k] if el and k < len(el) else UNK
        if e.kind == "lit" and e.value >= 1:
            # the part's size is the literal itself (an inferred dim may be a symbol that
            # stands for another size elsewhere: GPT-J's sin/cos halves)
            ax[axis] = [] if e.value == 1 else [Atom(e.value, origin="split")]
        else:
            ax[axis] = an.fresh_from_inferred(o, axis, "split")
        an.axes[o] = ax
        if e.kind == "lit":
            an.lit(e, ax[axis], node)


@rule("ScatterND")
def scatter_nd(an: AxisAnalysis, node: ir.Node) -> None:
    """ScatterND(data, indices, updates): the output is ``data`` with some elements
    replaced, so it has data's axes (a causal mask of shape [B, 1, S, T] stays broadcast
    over the heads: its size-1 axis is no heads axis).  Where it writes along the first
    q axes (q = the indices' last axis) is read from values at run time: those axes are
    recorded as mixed (exact only if they keep their size); the updates' trailing axes
    are data's axes past q."""
    data, idx, upd = (list(node.inputs) + [None] * 3)[:3]
    x = an.get(data)
    if x is None:
        return
    an.axes[node.outputs[0]] = [list(a) for a in x]
    iax = an.get(idx)
    q = size_of(iax[-1]) if iax else None
    if q is None or not 0 <= q <= len(x):
        an.axis_ops.append((node, data, None))
        return
    for k in range(q):
        an.axis_ops.append((node, data, k))
    u = an.get(upd)
    if u is not None and len(u) == len(iax) - 1 + len(x) - q:
        for ua, xa in zip(u[len(iax) - 1:], x[q:]):
            if size_of(ua) != 1 and size_of(xa) != 1:
                an.try_unify(ua, xa, f"ScatterND {node.name}")

"""Rules for the ops that work element by element: unary ops, casts and Dropout (the output
has the input's axes and elements), binary ops with broadcasting (and the integer arithmetic
exporters do on shape vectors: a size times, plus or divided by a literal), and the reductions
(Reduce*: the reduced axes are kept as size 1 or dropped)."""

from __future__ import annotations

import onnx_ir as ir

from ..analysis import AxisAnalysis
from ..atoms import Atom, Axis, UnifyError, leaves, size_of, unify
from ..closed_world import BINARY, UNARY, rule
from ..elements import UNK, Elem, int_array


def same_as(an: AxisAnalysis, node: ir.Node, i: int) -> None:
    src = node.inputs[i] if len(node.inputs) > i else None
    ax = an.get(src)
    if ax is not None and node.outputs:
        an.axes[node.outputs[0]] = [list(a) for a in ax]
    if src in an.elems and node.outputs:
        an.elems[node.outputs[0]] = list(an.elems[src])


@rule(*UNARY)
def unary(an: AxisAnalysis, node: ir.Node) -> None:
    same_as(an, node, 0)


@rule("Cast", "Identity", "CastLike")
def cast(an: AxisAnalysis, node: ir.Node) -> None:
    same_as(an, node, 0)


@rule("Dropout")
def dropout(an: AxisAnalysis, node: ir.Node) -> None:
    same_as(an, node, 0)


@rule(*(BINARY - {"Div"}))  # Div: ``div`` below
def broadcast(an: AxisAnalysis, node: ir.Node) -> None:
    ins = [an.get(v) for v in node.inputs if v is not None]
    if any(a is None for a in ins) or not node.outputs:
        return
    rank = max(len(a) for a in ins)
    out: list[Axis] = []
    for k in range(rank):
        cands = [a[len(a) - rank + k] for a in ins if len(a) - rank + k >= 0]
        real = [c for c in cands if size_of(c) != 1]
        if not real:
            out.append([])
            continue
        for c in real[1:]:
            an.try_unify(real[0], c, f"{node.op_type} {node.name}")
        out.append(list(real[0]))
    an.axes[node.outputs[0]] = out
    # integer arithmetic on shape vectors
    if node.op_type == "Mul" and len(node.inputs) == 2:
        ea, eb = an.elems.get(node.inputs[0]), an.elems.get(node.inputs[1])
        if ea and eb and len(ea) == len(eb):
            res = []
            for x, y in zip(ea, eb):
                if x.kind == "dim" and y.kind == "dim":
                    res.append(Elem("dim", atoms=list(x.atoms) + list(y.atoms)))
                elif {x.kind, y.kind} == {"dim", "lit"}:
                    # a size times a literal factor (GQA: kv_heads * n_rep)
                    dim, lit = (x, y) if x.kind == "dim" else (y, x)
                    if lit.value == 1:
                        res.append(dim)
                    elif lit.value > 1:
                        factor = Atom(lit.value, origin="mul")
                        an.lit(lit, [factor], node)
                        res.append(Elem("dim", atoms=list(dim.atoms) + [factor]))
                    else:
                        res.append(UNK)
                else:
                    res.append(UNK)
            an.elems[node.outputs[0]] = res
    if node.op_type == "Add" and len(node.inputs) == 2:
        _add_elems(an, node)
    if node.op_type == "Where" and len(node.inputs) == 3:
        _where_elems(an, node)


def _add_elems(an: AxisAnalysis, node: ir.Node) -> None:
    """A run-time size plus a literal (``dim+``): only a division by a literal can make a
    size of it again (``div``)."""
    ea, eb = an.elems.get(node.inputs[0]), an.elems.get(node.inputs[1])
    if not ea or not eb or len(ea) != len(eb):
        return
    res = []
    for x, y in zip(ea, eb):
        dim, lit = (x, y) if x.kind == "dim" else (y, x)
        if dim.kind == "dim" and lit.kind == "lit" and lit.value >= 0:
            res.append(dim if lit.value == 0 else
                       Elem("dim+", value=lit.value, atoms=list(dim.atoms)))
        else:
            res.append(UNK)
    if any(e.kind != "unk" for e in res):
        an.elems[node.outputs[0]] = res


def _where_elems(an: AxisAnalysis, node: ir.Node) -> None:
    """Exporters write ``Where(Equal(shape, -1), ones, shape)`` before an Expand: the
    result keeps every known size of ``shape`` (those are never -1)."""
    cond, a, b = node.inputs
    eb = an.elems.get(b)
    p = cond.producer() if cond is not None else None
    if eb is None or p is None or p.op_type != "Equal" or b not in p.inputs:
        return
    an.elems[node.outputs[0]] = [e if (e.kind == "dim" or (e.kind == "lit" and e.value >= 0))
                                 else UNK for e in eb]


@rule("Div")
def div(an: AxisAnalysis, node: ir.Node) -> None:
    broadcast(an, node)
    ea, eb = an.elems.get(node.inputs[0]), an.elems.get(node.inputs[1])
    if ea and eb and len(eb) == 1 and eb[0].kind == "lit" and eb[0].value > 1:
        n = eb[0].value
        res = []
        for x in ea:
            if x.kind == "dim+" and x.value < n:
                # (dim + c) // n with 0 <= c < n is dim // n wherever n divides dim:
                # below, the axis becomes (n, dim/n), so it divides at every new size
                x = Elem("dim", atoms=x.atoms)
            sz = size_of(x.atoms) if x.kind == "dim" else None
            lv = leaves(x.atoms) if x.kind == "dim" else []
            ends = [k for k in (0, -1) if lv and lv[k].size == n] if len(lv) > 1 else []
            if len(ends) == 1:
                # dim // n where n is one end factor of dim (Bloom's (batch*heads) // heads):
                # the quotient is the other factors, and n is that factor's size
                k = ends[0]
                an.lit(eb[0], [lv[k]], node)
                res.append(Elem("dim", atoms=lv[1:] if k == 0 else lv[:-1]))
                continue
            if sz is not None and sz % n == 0:
                # dim // n: the axis is (n, dim/n) row-major, as in rotate_half
                count, part = Atom(n, origin="div-count"), Atom(sz // n, origin="div")
                try:
                    unify(x.atoms, [count, part])
                    res.append(Elem("dim", atoms=leaves([part])))
                    continue
                except UnifyError:
                    pass
            res.append(UNK)
        an.elems[node.outputs[0]] = res


@rule(prefix="Reduce")
def reduce(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    axes = None
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].value)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = int_array(node.inputs[1])
        axes = None if arr is None else arr.tolist()
    keep = node.attributes["keepdims"].value if "keepdims" in node.attributes else 1
    r = len(x)
    noop = node.attributes["noop_with_empty_axes"].value \
        if "noop_with_empty_axes" in node.attributes else 0
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = list(range(r))  # axes computed at run time: any of them
    elif axes is None and noop:
        axes = []
    axes = list(range(r)) if axes is None else [a % r for a in axes]
    an.reductions.append((node, node.inputs[0], axes))
    out = []
    for k, a in enumerate(x):
        if k in axes:
            if keep:
                out.append([])
        else:
            out.append(list(a))
    an.axes[node.outputs[0]] = out

"""Rules for shape vectors and axis bookkeeping: Constant, Shape, Range, ConstantOfShape,
Gather, Unsqueeze, Squeeze, Transpose, Flatten and Concat (of shape vectors, or of tensors: a
value cut by constant slices and concatenated back in order keeps its source's axis)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ..analysis import AxisAnalysis
from ..atoms import Atom, size_of
from ..closed_world import rule
from ..elements import Elem, int_array


@rule("Constant")
def constant(an: AxisAnalysis, node: ir.Node) -> None:
    out = node.outputs[0]
    attr = node.attributes.get("value")
    if attr is None:
        for k in ("value_int", "value_ints"):
            if k in node.attributes:
                vals = np.atleast_1d(np.asarray(node.attributes[k].value, dtype=np.int64))
                an.axes[out] = [] if k == "value_int" else [[Atom(len(vals))]]
                an.elems[out] = [Elem("lit", int(x), ("attr", node.name, k, i))
                                 for i, x in enumerate(vals)]
        return
    an.init_const(out, attr.value, ("value", out.name))
    # a Constant node's literal is addressed by the node (its output name may be renamed)
    if out in an.elems:
        an.elems[out] = [dataclasses.replace(e, ref=("node", node.name, e.ref[2]))
                         for e in an.elems[out]]


@rule("Shape")
def shape(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    start = node.attributes["start"].value if "start" in node.attributes else 0
    end = node.attributes["end"].value if "end" in node.attributes else len(x)
    sel = x[slice(start, end)]
    an.elems[node.outputs[0]] = [Elem("dim", atoms=list(a)) for a in sel]
    an.axes[node.outputs[0]] = [[Atom(len(sel))]] if len(sel) != 1 else [[]]


@rule("Range")
def range_(an: AxisAnalysis, node: ir.Node) -> None:
    start, limit, delta = (an.elems.get(v) for v in node.inputs[:3])
    if start and limit and delta and limit[0].kind == "dim" and start[0].kind == "lit" \
            and start[0].value == 0 and delta[0].kind == "lit" and delta[0].value == 1:
        an.axes[node.outputs[0]] = [list(limit[0].atoms)]


@rule("ConstantOfShape")
def constant_of_shape(an: AxisAnalysis, node: ir.Node) -> None:
    el = an.elems.get(node.inputs[0])
    if el is None:
        return
    out = []
    for k, e in enumerate(el):
        if e.kind == "dim":
            out.append(list(e.atoms))
        else:
            ax = an.fresh_from_inferred(node.outputs[0], k, "constantofshape",
                                        broadcast=True)
            if e.kind == "lit" and e.value not in (0, 1):
                an.lit(e, ax, node)
            out.append(ax)
    an.axes[node.outputs[0]] = out


@rule("Gather")
def gather(an: AxisAnalysis, node: ir.Node) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
    dax, iax = an.get(data), an.get(idx)
    if data in an.elems:
        arr = int_array(idx)
        if arr is not None:
            el = an.elems[data]
            try:
                picked = [el[int(i)] for i in arr.reshape(-1)]
            except IndexError:
                picked = None
            if picked is not None:
                an.elems[node.outputs[0]] = picked
    if dax is None or iax is None:
        return
    axis %= len(dax)
    if data not in an.elems:
        # picks units along ``axis`` by index values: their order under expansion is
        # unknown (a permutation, a selection), so that axis must keep its size
        an.gathers.append((node, data, axis))
    an.axes[node.outputs[0]] = ([list(a) for a in dax[:axis]] + [list(a) for a in iax]
                                + [list(a) for a in dax[axis + 1:]])


@rule("Unsqueeze")
def unsqueeze(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].value)
    else:
        arr = int_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if arr is None:  # axes computed at run time: not modelled (the closed world decides)
            an.unhandled.append(node)
            return
        axes = arr.tolist()
    if node.inputs[0] in an.elems:
        an.elems[node.outputs[0]] = list(an.elems[node.inputs[0]])
    if x is None:
        return
    r = len(x) + len(axes)
    axes = sorted(a % r for a in axes)
    out, it = [], iter(x)
    for k in range(r):
        out.append([] if k in axes else list(next(it)))
    an.axes[node.outputs[0]] = out


@rule("Squeeze")
def squeeze(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if node.inputs[0] in an.elems:
        an.elems[node.outputs[0]] = list(an.elems[node.inputs[0]])
    if x is None:
        return
    axes = None
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].value)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = int_array(node.inputs[1])
        if arr is None:  # axes computed at run time: not modelled (the closed world decides)
            an.unhandled.append(node)
            return
        axes = arr.tolist()
    if axes is None:
        an.axes[node.outputs[0]] = [list(a) for a in x if size_of(a) != 1]
    else:
        axes = [a % len(x) for a in axes]
        an.axes[node.outputs[0]] = [list(a) for k, a in enumerate(x) if k not in axes]


@rule("Transpose")
def transpose(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    perm = (list(node.attributes["perm"].value) if "perm" in node.attributes
            else list(reversed(range(len(x)))))
    an.axes[node.outputs[0]] = [list(x[p]) for p in perm]


@rule("Flatten")
def flatten(an: AxisAnalysis, node: ir.Node) -> None:
    x = an.get(node.inputs[0])
    if x is None:
        return
    axis = node.attributes["axis"].value if "axis" in node.attributes else 1
    axis %= len(x) + 1 if axis < 0 else len(x) + 1
    an.axes[node.outputs[0]] = [[a for ax in x[:axis] for a in ax],
                                  [a for ax in x[axis:] for a in ax]]


@rule("Concat")
def concat(an: AxisAnalysis, node: ir.Node) -> None:
    ins = [v for v in node.inputs if v is not None]
    if all(v in an.elems for v in ins):
        res = []
        for i, v in enumerate(node.inputs):  # the same constant may feed two inputs
            el = an.saved.get(v, an.elems[v]) if v is not None else []
            res += [dataclasses.replace(e, via=(node.name, i))
                    if e.kind == "lit" and e.via is None else e for e in el]
        an.elems[node.outputs[0]] = res
    axs = [an.get(v) for v in ins]
    if any(a is None for a in axs) or not axs:
        return
    axis = node.attributes["axis"].value % len(axs[0])
    out = []
    for k in range(len(axs[0])):
        if k == axis:
            parts = [a[k] for a in axs if size_of(a[k]) != 0]
            whole = _rejoined(an, ins, axis)
            if len(parts) == 1:
                out.append(list(parts[0]))
            elif whole is not None:
                out.append(whole)
            else:
                out.append(an.fresh_from_inferred(node.outputs[0], k, "concat"))
        else:
            real = [a[k] for a in axs if size_of(a[k]) != 1]
            for c in real[1:]:
                an.try_unify(real[0], c, f"Concat {node.name}")
            out.append(list(real[0]) if real else [])
    an.axes[node.outputs[0]] = out


_ELEMENTWISE_BACK = ("Mul", "Add", "Sub", "Neg", "Cast", "Identity", "Div")


def _slice_source(an: AxisAnalysis, v: ir.Value, axis: int):
    """``v`` traced back through elementwise ops (the first non-constant input) to a Slice
    along ``axis`` with constant bounds: (source value, start, end) or None."""
    for _ in range(16):
        p = v.producer() if v is not None else None
        if p is None:
            return None
        if p.op_type == "Slice":
            ins = list(p.inputs) + [None] * (5 - len(p.inputs))
            st, en = an.elems.get(ins[1]), an.elems.get(ins[2])
            ax = an.elems.get(ins[3]) if ins[3] is not None else None
            step = an.elems.get(ins[4]) if ins[4] is not None else None
            src = an.get(ins[0])
            if not (st and en and len(st) == 1 and len(en) == 1 and src) or \
                    st[0].kind != "lit" or en[0].kind != "lit":
                return None
            if step and (len(step) != 1 or step[0].kind != "lit" or step[0].value != 1):
                return None
            a = ax[0].value % len(src) if ax and ax[0].kind == "lit" else (0 if not ax else None)
            if a != axis % len(src):
                return None
            return ins[0], st[0].value, en[0].value
        if p.op_type not in _ELEMENTWISE_BACK:
            return None
        nxt = [i for i in p.inputs if i is not None and i.const_value is None and
               (i.producer() is None or i.producer().op_type != "Constant")]
        if not nxt:
            return None
        v = nxt[0]
    return None


def _rejoined(an: AxisAnalysis, ins: list, axis: int):
    """Concat of pieces of one value cut by constant slices along the same axis, in order
    and covering it (x[..., :r] transformed, then x[..., r:]: partial rotary): the output
    axis is the source's own, or None."""
    srcs = [_slice_source(an, v, axis) for v in ins]
    if len(srcs) < 2 or any(s is None for s in srcs) or len({id(s[0]) for s in srcs}) != 1:
        return None
    src_axes = an.get(srcs[0][0])
    size = size_of(src_axes[axis]) if src_axes else None
    if size is None:
        return None
    pos = 0
    for _src, lo, hi in srcs:
        hi = min(hi, size) if hi >= 0 else size + hi
        lo = lo if lo >= 0 else size + lo
        if lo != pos or hi <= lo:
            return None
        pos = hi
    return list(src_axes[axis]) if pos == size else None

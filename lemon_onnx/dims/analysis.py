"""The analysis driver: one pass over a graph in topological order, the axes and elements of
every value, and what each operator rule records (literals, conflicts, opaque axes, ...)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import onnx_ir as ir

from .atoms import Atom, Axis, UnifyError, leaves, size_of, split_atom, unify, find
from .closed_world import AXIS_OPS, BINARY, DOMAINS, FOLD, UNARY
from .elements import INT_BIG, UNK, Elem, LiteralUse, const_floats, int_array


class AxisAnalysis:
    """Runs over a (shape-inferred) onnx-ir graph once, in topological order."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.axes: dict[ir.Value, list[Axis]] = {}
        self.elems: dict[ir.Value, list[Elem]] = {}
        self.literals: list[LiteralUse] = []
        self.unexplained: list[LiteralUse] = []
        self.conflicts: list[str] = []
        #: nodes whose axes the analysis does not model (unknown ops, other domains, model-local
        #: functions, control flow): their outputs get fresh atoms from the inferred shapes
        self.unhandled: list[ir.Node] = []
        #: (node, value, axis): ops that mix the elements along one axis (CumSum, Softmax, ...):
        #: exact under expansion only if that axis keeps its size
        self.axis_ops: list[tuple] = []
        #: (node, value, axis): Slices along ``axis`` with bounds computed at run time; exact
        #: under expansion only if that axis keeps its size (where it is cut is unknown)
        self.runtime_cuts: list[tuple] = []
        #: (node, atoms): sizes computed from constants alone (``Elem`` kind "fixed") that a
        #: Reshape splits these atoms by; exact only if the atoms keep their sizes
        self.fixed_sizes: list[tuple] = []
        #: (node, value, axis, cut): output axes a handler could not derive from its inputs
        #: atoms (fresh atoms from the inferred shape): where each unit of such an axis came
        #: from is unknown, so it must not carry a size the plan changes, and (for ops whose
        #: output axis k is their inputs' axis k: Slice, Concat, Tile, Resize, Pad, Expand,
        #: Split) neither may the inputs' axis k.  ``cut`` is (start, end, step) for a Slice
        #: with literal bounds (a prefix of the original units keeps its place), else None
        self.opaque: list[tuple] = []
        #: (node, value, axes): reductions (Reduce*) and their reduced axes; over an axis the
        #: plan changes they are exact only inside a recognised norm
        self.reductions: list[tuple] = []
        #: (node, atom): Reshapes that split an atom by a literal (its parts are the atom's)
        self.reshape_splits: list[tuple] = []
        #: (node, data, axis): Gathers of tensor data (not of shape vectors) along ``axis``
        self.gathers: list[tuple] = []
        #: (node, k, took, want): Reshapes whose output axis ``k`` regroups the input's atoms
        #: ``took`` (row-major, so the units keep their order) while its size is read at run
        #: time from other atoms ``want`` (a Shape of another tensor: CLIP's attention output
        #: reshaped to the stream's width, RoFormer's interleaved rotary pairs reshaped to
        #: head_dim).  The two are equal sizes, not the same units: exact under expansion only
        #: if both products get the same new size
        self.size_ties: list[tuple] = []
        #: values computed from constants alone by ``_fold``: small numpy arrays
        self._folded: dict = {}
        self._syms: dict[str, Atom] = {}
        self._saved: dict = {}

    # ------------------------------------------------------------------ helpers
    def sym_atom(self, name: str, origin: str = "inferred") -> Atom:
        if name not in self._syms:
            self._syms[name] = Atom(None, sym=name, origin=origin)
        return self._syms[name]

    def fresh_axes_from_shape(self, value: ir.Value, origin: str) -> list[Axis] | None:
        shape = value.shape
        if shape is None:
            return None
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append([] if d == 1 else [Atom(d, origin=origin)])
            else:
                out.append([self.sym_atom(str(d.value) if d.value else f"?{id(d)}",
                                          "input" if origin == "input" else "inferred")])
        return out

    def get(self, value: ir.Value | None) -> list[Axis] | None:
        if value is None:
            return None
        if value not in self.axes:
            ax = self.fresh_axes_from_shape(value, "unknown")
            if ax is None:
                return None
            self.axes[value] = ax
            if value.producer() is not None:
                self._mark_opaque(value, range(len(ax)))
        return self.axes[value]

    def _mark_opaque(self, value: ir.Value, ks, cut: tuple | None = None) -> None:
        node = value.producer()
        if node is not None:
            self.opaque += [(node, value, k, cut) for k in ks]

    def try_unify(self, x: Axis, y: Axis, where: str) -> None:
        try:
            unify(x, y)
        except UnifyError as e:
            self.conflicts.append(f"{where}: {e}")

    def lit(self, e: Elem, atoms: list, node: ir.Node) -> None:
        if e.ref is not None:
            self.literals.append(LiteralUse(e.ref, int(e.value), list(atoms), node.name or "",
                                            node.op_type, e.via))

    def unexplained_lit(self, e: Elem, node: ir.Node) -> None:
        if e.ref is not None:
            self.unexplained.append(LiteralUse(e.ref, int(e.value), [], node.name or "",
                                               node.op_type))

    # ------------------------------------------------------------------ driver
    def run(self) -> "AxisAnalysis":
        g = self.graph
        for v in g.inputs:
            ax = self.fresh_axes_from_shape(v, "input") or []
            self.axes[v] = ax
        for v in g.initializers.values():
            self._init_const(v, v.const_value, ("value", v.name))
        for node in g:  # onnx-ir iterates in graph order (exporters emit topological order)
            try:
                self.visit(node)
            except UnifyError as e:
                self.conflicts.append(f"{node.op_type} {node.name}: {e}")
            for out in node.outputs:
                if out not in self.axes:
                    ax = self.fresh_axes_from_shape(out, node.op_type)
                    if ax is not None:
                        self.axes[out] = ax
                        self._mark_opaque(out, range(len(ax)))
        return self

    def _init_const(self, v: ir.Value, const, ref: tuple) -> None:
        if const is None:
            return
        self.axes[v] = [[] if d == 1 else [Atom(int(d), origin="const")] for d in const.shape]
        arr = int_array(None, const)
        if arr is not None and arr.ndim <= 1:
            self.elems[v] = [Elem("lit", int(x), (ref[0], ref[1], i))
                             for i, x in enumerate(arr.reshape(-1))]

    # ------------------------------------------------------------------ ops
    def visit(self, node: ir.Node) -> None:
        op = node.op_type
        # literals leaving a constant tensor remember which input read them, so that a
        # constant shared by sites of different sizes can be split per consumer later
        saved = {}
        for i, v in enumerate(node.inputs):
            el = self.elems.get(v) if v is not None else None
            if el and v not in saved and any(e.kind == "lit" and e.via is None for e in el):
                saved[v] = el
                self.elems[v] = [dataclasses.replace(e, via=(node.name, i))
                                 if e.kind == "lit" and e.via is None else e for e in el]
        self._saved = saved
        try:
            if node.domain not in DOMAINS:
                self.unhandled.append(node)
                return
            if op in AXIS_OPS:
                self._axis_op(node)
            handler = getattr(self, f"op_{op}", None)
            if handler is not None:
                handler(node)
            elif op in UNARY:
                self.same_as(node, 0)
            elif op in BINARY:
                self.broadcast(node)
            elif op.startswith("Reduce"):
                self.reduce(node)
            else:
                self.unhandled.append(node)
            if op in FOLD:
                self._fold(node)
        finally:
            self.elems.update(saved)

    def _const_array(self, v: ir.Value | None) -> np.ndarray | None:
        """A small constant's values: an initializer, a Constant node, or folded."""
        if v is None:
            return None
        if v in self._folded:
            return self._folded[v]
        t = v.const_value
        p = v.producer()
        if t is None and p is not None and p.op_type == "Constant" and "value" in p.attributes:
            t = p.attributes["value"].value
        if t is None or t.size > 16:
            return None
        try:
            return np.asarray(t.numpy())
        except Exception:  # pragma: no cover - unreadable constant
            return None

    def _fold(self, node: ir.Node) -> None:
        """Arithmetic on constants alone (no graph input, no Shape): the result is a number
        no expansion changes; integer results become ``fixed`` elements."""
        out = node.outputs[0] if node.outputs else None
        if out is None or any(e.kind != "unk" for e in self.elems.get(out) or []):
            return
        args = [self._const_array(v) for v in node.inputs]
        if not args or any(a is None for a in args):
            return
        try:
            if node.op_type == "Cast":
                res = args[0].astype(ir.DataType(node.attributes["to"].value).numpy())
            elif node.op_type == "Div" and all(a.dtype.kind in "iu" for a in args):
                res = np.trunc(np.true_divide(*args)).astype(args[0].dtype)
            else:
                with np.errstate(all="raise"):
                    res = np.asarray(FOLD[node.op_type](*args)).astype(args[0].dtype)
        except Exception:  # noqa: BLE001 - not foldable: the value stays unknown
            return
        if res.size > 16:
            return
        self._folded[out] = res
        if res.dtype.kind in "iu" and res.ndim <= 1:
            self.elems[out] = [Elem("fixed", int(x)) for x in res.reshape(-1)]

    def _axis_op(self, node: ir.Node) -> None:
        """Remember the axis an element-mixing op works along (its attribute, or CumSum's
        constant input); an axis that cannot be read is recorded as None (unknown)."""
        x = node.inputs[0] if node.inputs else None
        if x is None:
            return
        if node.op_type == "CumSum":
            el = self.elems.get(node.inputs[1]) if len(node.inputs) > 1 else None
            axis = el[0].value if el and len(el) == 1 and el[0].kind == "lit" else None
        elif node.op_type == "Trilu":  # keeps a triangle of the last two axes: positional
            self.axis_ops.append((node, x, -2))
            axis = -1
        else:
            attr = node.attributes.get("axis")
            axis = int(attr.value) if attr is not None else AXIS_OPS[node.op_type]
        self.axis_ops.append((node, x, axis))

    def same_as(self, node: ir.Node, i: int) -> None:
        src = node.inputs[i] if len(node.inputs) > i else None
        ax = self.get(src)
        if ax is not None and node.outputs:
            self.axes[node.outputs[0]] = [list(a) for a in ax]
        if src in self.elems and node.outputs:
            self.elems[node.outputs[0]] = list(self.elems[src])

    def op_Constant(self, node: ir.Node) -> None:
        out = node.outputs[0]
        attr = node.attributes.get("value")
        if attr is None:
            for k in ("value_int", "value_ints"):
                if k in node.attributes:
                    vals = np.atleast_1d(np.asarray(node.attributes[k].value, dtype=np.int64))
                    self.axes[out] = [] if k == "value_int" else [[Atom(len(vals))]]
                    self.elems[out] = [Elem("lit", int(x), ("attr", node.name, k, i))
                                       for i, x in enumerate(vals)]
            return
        self._init_const(out, attr.value, ("value", out.name))
        # a Constant node's literal is addressed by the node (its output name may be renamed)
        if out in self.elems:
            self.elems[out] = [dataclasses.replace(e, ref=("node", node.name, e.ref[2]))
                               for e in self.elems[out]]

    def broadcast(self, node: ir.Node) -> None:
        ins = [self.get(v) for v in node.inputs if v is not None]
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
                self.try_unify(real[0], c, f"{node.op_type} {node.name}")
            out.append(list(real[0]))
        self.axes[node.outputs[0]] = out
        # integer arithmetic on shape vectors
        if node.op_type == "Mul" and len(node.inputs) == 2:
            ea, eb = self.elems.get(node.inputs[0]), self.elems.get(node.inputs[1])
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
                            self.lit(lit, [factor], node)
                            res.append(Elem("dim", atoms=list(dim.atoms) + [factor]))
                        else:
                            res.append(UNK)
                    else:
                        res.append(UNK)
                self.elems[node.outputs[0]] = res
        if node.op_type == "Add" and len(node.inputs) == 2:
            self._add_elems(node)
        if node.op_type == "Where" and len(node.inputs) == 3:
            self._where_elems(node)

    def _add_elems(self, node: ir.Node) -> None:
        """A run-time size plus a literal (``dim+``): only a division by a literal can make a
        size of it again (``op_Div``)."""
        ea, eb = self.elems.get(node.inputs[0]), self.elems.get(node.inputs[1])
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
            self.elems[node.outputs[0]] = res

    def _where_elems(self, node: ir.Node) -> None:
        """Exporters write ``Where(Equal(shape, -1), ones, shape)`` before an Expand: the
        result keeps every known size of ``shape`` (those are never -1)."""
        cond, a, b = node.inputs
        eb = self.elems.get(b)
        p = cond.producer() if cond is not None else None
        if eb is None or p is None or p.op_type != "Equal" or b not in p.inputs:
            return
        self.elems[node.outputs[0]] = [e if (e.kind == "dim" or (e.kind == "lit" and e.value >= 0))
                                       else UNK for e in eb]

    def op_Div(self, node: ir.Node) -> None:
        self.broadcast(node)
        ea, eb = self.elems.get(node.inputs[0]), self.elems.get(node.inputs[1])
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
                    self.lit(eb[0], [lv[k]], node)
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
            self.elems[node.outputs[0]] = res

    def reduce(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
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
        self.reductions.append((node, node.inputs[0], axes))
        out = []
        for k, a in enumerate(x):
            if k in axes:
                if keep:
                    out.append([])
            else:
                out.append(list(a))
        self.axes[node.outputs[0]] = out

    def op_Shape(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if x is None:
            return
        start = node.attributes["start"].value if "start" in node.attributes else 0
        end = node.attributes["end"].value if "end" in node.attributes else len(x)
        sel = x[slice(start, end)]
        self.elems[node.outputs[0]] = [Elem("dim", atoms=list(a)) for a in sel]
        self.axes[node.outputs[0]] = [[Atom(len(sel))]] if len(sel) != 1 else [[]]

    def op_Gather(self, node: ir.Node) -> None:
        data, idx = node.inputs[0], node.inputs[1]
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        dax, iax = self.get(data), self.get(idx)
        if data in self.elems:
            arr = int_array(idx)
            if arr is not None:
                el = self.elems[data]
                try:
                    picked = [el[int(i)] for i in arr.reshape(-1)]
                except IndexError:
                    picked = None
                if picked is not None:
                    self.elems[node.outputs[0]] = picked
        if dax is None or iax is None:
            return
        axis %= len(dax)
        if data not in self.elems:
            # picks units along ``axis`` by index values: their order under expansion is
            # unknown (a permutation, a selection), so that axis must keep its size
            self.gathers.append((node, data, axis))
        self.axes[node.outputs[0]] = ([list(a) for a in dax[:axis]] + [list(a) for a in iax]
                                      + [list(a) for a in dax[axis + 1:]])

    def op_Unsqueeze(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if "axes" in node.attributes:
            axes = list(node.attributes["axes"].value)
        else:
            arr = int_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if arr is None:  # axes computed at run time: not modelled (the closed world decides)
                self.unhandled.append(node)
                return
            axes = arr.tolist()
        if node.inputs[0] in self.elems:
            self.elems[node.outputs[0]] = list(self.elems[node.inputs[0]])
        if x is None:
            return
        r = len(x) + len(axes)
        axes = sorted(a % r for a in axes)
        out, it = [], iter(x)
        for k in range(r):
            out.append([] if k in axes else list(next(it)))
        self.axes[node.outputs[0]] = out

    def op_Squeeze(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if node.inputs[0] in self.elems:
            self.elems[node.outputs[0]] = list(self.elems[node.inputs[0]])
        if x is None:
            return
        axes = None
        if "axes" in node.attributes:
            axes = list(node.attributes["axes"].value)
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = int_array(node.inputs[1])
            if arr is None:  # axes computed at run time: not modelled (the closed world decides)
                self.unhandled.append(node)
                return
            axes = arr.tolist()
        if axes is None:
            self.axes[node.outputs[0]] = [list(a) for a in x if size_of(a) != 1]
        else:
            axes = [a % len(x) for a in axes]
            self.axes[node.outputs[0]] = [list(a) for k, a in enumerate(x) if k not in axes]

    def op_Transpose(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if x is None:
            return
        perm = (list(node.attributes["perm"].value) if "perm" in node.attributes
                else list(reversed(range(len(x)))))
        self.axes[node.outputs[0]] = [list(x[p]) for p in perm]

    def op_Concat(self, node: ir.Node) -> None:
        ins = [v for v in node.inputs if v is not None]
        if all(v in self.elems for v in ins):
            res = []
            for i, v in enumerate(node.inputs):  # the same constant may feed two inputs
                el = self._saved.get(v, self.elems[v]) if v is not None else []
                res += [dataclasses.replace(e, via=(node.name, i))
                        if e.kind == "lit" and e.via is None else e for e in el]
            self.elems[node.outputs[0]] = res
        axs = [self.get(v) for v in ins]
        if any(a is None for a in axs) or not axs:
            return
        axis = node.attributes["axis"].value % len(axs[0])
        out = []
        for k in range(len(axs[0])):
            if k == axis:
                parts = [a[k] for a in axs if size_of(a[k]) != 0]
                whole = self._rejoined(ins, axis)
                if len(parts) == 1:
                    out.append(list(parts[0]))
                elif whole is not None:
                    out.append(whole)
                else:
                    out.append(self._fresh_from_inferred(node.outputs[0], k, "concat"))
            else:
                real = [a[k] for a in axs if size_of(a[k]) != 1]
                for c in real[1:]:
                    self.try_unify(real[0], c, f"Concat {node.name}")
                out.append(list(real[0]) if real else [])
        self.axes[node.outputs[0]] = out

    _ELEMENTWISE_BACK = ("Mul", "Add", "Sub", "Neg", "Cast", "Identity", "Div")

    def _slice_source(self, v: ir.Value, axis: int):
        """``v`` traced back through elementwise ops (the first non-constant input) to a Slice
        along ``axis`` with constant bounds: (source value, start, end) or None."""
        for _ in range(16):
            p = v.producer() if v is not None else None
            if p is None:
                return None
            if p.op_type == "Slice":
                ins = list(p.inputs) + [None] * (5 - len(p.inputs))
                st, en = self.elems.get(ins[1]), self.elems.get(ins[2])
                ax = self.elems.get(ins[3]) if ins[3] is not None else None
                step = self.elems.get(ins[4]) if ins[4] is not None else None
                src = self.get(ins[0])
                if not (st and en and len(st) == 1 and len(en) == 1 and src) or \
                        st[0].kind != "lit" or en[0].kind != "lit":
                    return None
                if step and (len(step) != 1 or step[0].kind != "lit" or step[0].value != 1):
                    return None
                a = ax[0].value % len(src) if ax and ax[0].kind == "lit" else (0 if not ax else None)
                if a != axis % len(src):
                    return None
                return ins[0], st[0].value, en[0].value
            if p.op_type not in self._ELEMENTWISE_BACK:
                return None
            nxt = [i for i in p.inputs if i is not None and i.const_value is None and
                   (i.producer() is None or i.producer().op_type != "Constant")]
            if not nxt:
                return None
            v = nxt[0]
        return None

    def _rejoined(self, ins: list, axis: int):
        """Concat of pieces of one value cut by constant slices along the same axis, in order
        and covering it (x[..., :r] transformed, then x[..., r:]: partial rotary): the output
        axis is the source's own, or None."""
        srcs = [self._slice_source(v, axis) for v in ins]
        if len(srcs) < 2 or any(s is None for s in srcs) or len({id(s[0]) for s in srcs}) != 1:
            return None
        src_axes = self.get(srcs[0][0])
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

    def _fresh_from_inferred(self, value: ir.Value, k: int, origin: str,
                             cut: tuple | None = None, broadcast: bool = False) -> Axis:
        """A new axis for output axis ``k`` of ``value`` from its inferred shape, recorded as
        opaque (the handler does not know where its units come from) unless ``broadcast``:
        every unit is a copy of one (a size-1 axis expanded, a constant filled in)."""
        if not broadcast:
            self._mark_opaque(value, [k], cut)
        shape = value.shape
        if shape is not None and k < len(shape):
            d = shape[k]
            if isinstance(d, int):
                return [] if d == 1 else [Atom(d, origin=origin)]
            if d.value:
                return [self.sym_atom(str(d.value))]
        return [Atom(None, origin=origin)]

    def op_Cast(self, node: ir.Node) -> None:
        self.same_as(node, 0)

    op_Identity = op_Cast
    op_CastLike = op_Cast

    def op_Dropout(self, node: ir.Node) -> None:
        self.same_as(node, 0)

    def op_Range(self, node: ir.Node) -> None:
        start, limit, delta = (self.elems.get(v) for v in node.inputs[:3])
        if start and limit and delta and limit[0].kind == "dim" and start[0].kind == "lit" \
                and start[0].value == 0 and delta[0].kind == "lit" and delta[0].value == 1:
            self.axes[node.outputs[0]] = [list(limit[0].atoms)]

    def op_ConstantOfShape(self, node: ir.Node) -> None:
        el = self.elems.get(node.inputs[0])
        if el is None:
            return
        out = []
        for k, e in enumerate(el):
            if e.kind == "dim":
                out.append(list(e.atoms))
            else:
                ax = self._fresh_from_inferred(node.outputs[0], k, "constantofshape",
                                               broadcast=True)
                if e.kind == "lit" and e.value not in (0, 1):
                    self.lit(e, ax, node)
                out.append(ax)
        self.axes[node.outputs[0]] = out

    def op_Flatten(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if x is None:
            return
        axis = node.attributes["axis"].value if "axis" in node.attributes else 1
        axis %= len(x) + 1 if axis < 0 else len(x) + 1
        self.axes[node.outputs[0]] = [[a for ax in x[:axis] for a in ax],
                                      [a for ax in x[axis:] for a in ax]]

    def op_Reshape(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        el = self.elems.get(node.inputs[1])
        if node.inputs[0] in self.elems and el is not None:
            self.elems[node.outputs[0]] = list(self.elems[node.inputs[0]])
        if x is None:
            return
        if el is None:
            self._reshape_fallback(node, x)
            return
        out = self.reshape_axes(node, x, el)
        if out is None:
            self._reshape_fallback(node, x)
        else:
            self.axes[node.outputs[0]] = out

    def _reshape_fallback(self, node: ir.Node, x: list[Axis]) -> None:
        ax = self.fresh_axes_from_shape(node.outputs[0], "reshape")
        if ax is not None:
            self.axes[node.outputs[0]] = ax
            self._mark_opaque(node.outputs[0], range(len(ax)))
        el = self.elems.get(node.inputs[1]) or []
        for e in el:
            if e.kind == "lit" and e.value not in (0, -1, 1):
                self.unexplained_lit(e, node)

    def reshape_axes(self, node: ir.Node, x: list[Axis], el: list[Elem]) -> list[Axis] | None:
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
                    self.reshape_splits.append((node, a))
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
                self.fixed_sizes.append((node, list(got)))
            else:
                self.lit(e, got, node)
        for got, want in ties:
            k = next(k for k, r in enumerate(result) if r is got)
            self.size_ties.append((node, k, list(got), list(want)))
        return [list(r) for r in result]  # type: ignore[arg-type]

    def op_Expand(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        el = self.elems.get(node.inputs[1])
        if x is None:
            return
        if el is None:
            ax = self.fresh_axes_from_shape(node.outputs[0], "expand")
            if ax is not None:
                # keep the input's atoms where sizes agree
                off = len(ax) - len(x)
                kept = set()
                for k, a in enumerate(x):
                    if off + k >= 0 and size_of(a) == size_of(ax[off + k]) and size_of(a) != 1:
                        ax[off + k] = list(a)
                        kept.add(off + k)
                self._mark_opaque(node.outputs[0], [
                    k for k in range(len(ax)) if k not in kept and k - off >= 0
                    and size_of(x[k - off]) != 1])  # size-1 axes are broadcast
                self.axes[node.outputs[0]] = ax
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
                    self.try_unify(xa, e.atoms, f"Expand {node.name}")
                out.append(list(e.atoms) if size_of(xa) == 1 else list(xa))
            elif e.kind == "lit":
                if e.value in (1, -1):
                    out.append(list(xa))
                elif size_of(xa) == 1:
                    new = [Atom(e.value, origin="expand")]
                    self.lit(e, new, node)
                    out.append(new)
                else:
                    if size_of(xa) == e.value:
                        self.lit(e, xa, node)
                    out.append(list(xa))
            else:
                out.append(list(xa) if size_of(xa) != 1 else
                           self._fresh_from_inferred(node.outputs[0], k, "expand",
                                                     broadcast=True))
        self.axes[node.outputs[0]] = out

    def op_Resize(self, node: ir.Node) -> None:
        """Resize (interpolation) keeps every axis it does not resample: a scale of 1 or an
        unchanged size (a channel axis: interpolated position tables); the others are new."""
        x = self.get(node.inputs[0])
        if x is None:
            return
        ins = list(node.inputs) + [None] * (4 - len(node.inputs))
        scales = const_floats(ins[2])
        sizes = self.elems.get(ins[3]) if ins[3] is not None else None
        out = []
        for k, a in enumerate(x):
            keep = scales is not None and k < len(scales) and scales[k] == 1.0
            if sizes and k < len(sizes) and sizes[k].kind == "lit":
                keep = sizes[k].value == size_of(a)
            elif sizes and k < len(sizes) and sizes[k].kind == "dim":
                keep = leaves(sizes[k].atoms) == leaves(a)  # the input's own size, read back
            out.append(list(a) if keep else self._fresh_from_inferred(node.outputs[0], k,
                                                                      "resize"))
        self.axes[node.outputs[0]] = out

    def op_Tile(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        el = self.elems.get(node.inputs[1])
        if x is None:
            return
        out = []
        for k, a in enumerate(x):
            e = el[k] if el and k < len(el) else UNK
            if e.kind == "lit" and e.value == 1:
                out.append(list(a))
            else:
                ax = self._fresh_from_inferred(node.outputs[0], k, "tile",
                                               broadcast=size_of(a) == 1)
                if e.kind == "lit":
                    rep = Atom(e.value, origin="tile")
                    self.lit(e, [rep], node)
                out.append(ax)
        self.axes[node.outputs[0]] = out

    def op_ScatterND(self, node: ir.Node) -> None:
        """ScatterND(data, indices, updates): the output is ``data`` with some elements
        replaced, so it has data's axes (a causal mask of shape [B, 1, S, T] stays broadcast
        over the heads: its size-1 axis is no heads axis).  Where it writes along the first
        q axes (q = the indices' last axis) is read from values at run time: those axes are
        recorded as mixed (exact only if they keep their size); the updates' trailing axes
        are data's axes past q."""
        data, idx, upd = (list(node.inputs) + [None] * 3)[:3]
        x = self.get(data)
        if x is None:
            return
        self.axes[node.outputs[0]] = [list(a) for a in x]
        iax = self.get(idx)
        q = size_of(iax[-1]) if iax else None
        if q is None or not 0 <= q <= len(x):
            self.axis_ops.append((node, data, None))
            return
        for k in range(q):
            self.axis_ops.append((node, data, k))
        u = self.get(upd)
        if u is not None and len(u) == len(iax) - 1 + len(x) - q:
            for ua, xa in zip(u[len(iax) - 1:], x[q:]):
                if size_of(ua) != 1 and size_of(xa) != 1:
                    self.try_unify(ua, xa, f"ScatterND {node.name}")

    def op_Split(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if x is None:
            return
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        axis %= len(x)
        n_out = len(node.outputs)
        el = None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            el = self.elems.get(node.inputs[1])
        elif "split" in node.attributes:
            vals = list(node.attributes["split"].value)
            el = [Elem("lit", int(v), ("attr", node.name, "split", i)) for i, v in enumerate(vals)]
        total = size_of(x[axis])
        sizes = [e.value if e.kind == "lit" else None for e in el] if el else None
        if sizes is None and total is not None and total % n_out == 0:
            sizes = [total // n_out] * n_out
        if sizes and None not in sizes and len(set(sizes)) == 1 and total == sum(sizes):
            count, part = Atom(n_out, origin="split-count"), Atom(sizes[0], origin="split")
            self.try_unify(x[axis], [count, part], f"Split {node.name}")
            for k, o in enumerate(node.outputs):
                ax = [list(a) for a in x]
                ax[axis] = [part]
                self.axes[o] = ax
                if el:
                    self.lit(el[k], [part], node)
            return
        for k, o in enumerate(node.outputs):
            ax = [list(a) for a in x]
            e = el[k] if el and k < len(el) else UNK
            if e.kind == "lit" and e.value >= 1:
                # the part's size is the literal itself (an inferred dim may be a symbol that
                # stands for another size elsewhere: GPT-J's sin/cos halves)
                ax[axis] = [] if e.value == 1 else [Atom(e.value, origin="split")]
            else:
                ax[axis] = self._fresh_from_inferred(o, axis, "split")
            self.axes[o] = ax
            if e.kind == "lit":
                self.lit(e, ax[axis], node)

    def op_Slice(self, node: ir.Node) -> None:
        data = node.inputs[0]
        x = self.get(data)
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts, ends = self.elems.get(ins[1]), self.elems.get(ins[2])
        axes_el = self.elems.get(ins[3]) if ins[3] is not None else None
        steps = self.elems.get(ins[4]) if ins[4] is not None else None
        if "starts" in node.attributes:  # opset < 10
            starts = [Elem("lit", int(v)) for v in node.attributes["starts"].value]
            ends = [Elem("lit", int(v)) for v in node.attributes["ends"].value]
            if "axes" in node.attributes:
                axes_el = [Elem("lit", int(v)) for v in node.attributes["axes"].value]
        if starts is None or ends is None:
            if x is not None:
                self._slice_fallback(node, x, axes_el)
            return
        n = len(starts)
        axes = ([e.value for e in axes_el] if axes_el and all(e.kind == "lit" for e in axes_el)
                else list(range(n)))
        # slicing a shape vector
        if data in self.elems and len(axes) == 1:
            el = self.elems[data]
            s, e_ = starts[0], ends[0]
            step = steps[0].value if steps and steps[0].kind == "lit" else 1
            if s.kind == "lit" and e_.kind == "lit" and step == 1:
                lo = s.value
                hi = e_.value if e_.value < INT_BIG else len(el)
                self.elems[node.outputs[0]] = el[slice(lo, hi)]
            ax = self.fresh_axes_from_shape(node.outputs[0], "slice")
            if ax is not None:
                self.axes[node.outputs[0]] = ax
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
                    self.runtime_cuts.append((node, data, ax))
                out[ax] = self._fresh_from_inferred(node.outputs[0], ax, "slice")
                continue
            if s.kind == "lit" and e_.kind == "lit":
                lo, hi = s.value, e_.value
                if lo == 0 and (hi >= INT_BIG or (size is not None and hi >= size)):
                    continue  # whole axis
                if size is not None and lo >= 0 and hi > 0:
                    hi = min(hi, size)
                    halves = self._cut_in_two(node, data, ax, size)
                    if 2 * lo == size and hi == size and lo > 0 and halves:  # second half
                        out[ax] = self._halve(node, x[ax], s, second=True)
                        continue
                    if lo == 0 and 2 * hi == size and halves:  # first half
                        out[ax] = self._halve(node, x[ax], e_, second=False)
                        continue
                if lo < 0 and size is not None and hi >= INT_BIG and 2 * -lo == size \
                        and self._cut_in_two(node, data, ax, size):
                    out[ax] = self._halve(node, x[ax], s, second=True, neg=True)
                    continue
                out[ax] = self._fresh_from_inferred(node.outputs[0], ax, "slice",
                                                    cut=(s.value, e_.value, step))
                for lit in (s, e_):
                    if data not in self.elems and lit.value > 0 and lit.value < INT_BIG:
                        self.lit(lit, out[ax], node) if lit is e_ and lo == 0 else \
                            self.unexplained_lit(lit, node)
            elif s.kind == "lit" and s.value == 0 and e_.kind == "dim":
                out[ax] = list(e_.atoms)
            elif (part := self._parts_slice(x[ax], s, e_)) is not None:
                out[ax] = part
            else:  # a bound computed at run time
                self.runtime_cuts.append((node, data, ax))
                out[ax] = self._fresh_from_inferred(node.outputs[0], ax, "slice")
        self.axes[node.outputs[0]] = out

    @staticmethod
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

    def _cut_in_two(self, node: ir.Node, data: ir.Value, axis: int, size: int) -> bool:
        """Whether ``data`` is cut in two halves along ``axis``: this Slice takes one half and
        another Slice of the same value takes the other (rotate_half, a chunk(2)).  A single
        slice that happens to end at the middle is just a slice."""
        spans = set()
        rank = len(self.get(data) or []) or 1
        for c in data.consumers():
            if c.op_type != "Slice":
                continue
            ins = list(c.inputs) + [None] * (5 - len(c.inputs))
            st, en = self.elems.get(ins[1]), self.elems.get(ins[2])
            axes = self.elems.get(ins[3]) if ins[3] is not None else None
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

    def _halve(self, node: ir.Node, axis: Axis, lit: Elem, second: bool, neg: bool = False):
        """x[..., :n/2] or x[..., n/2:]: the axis is (2, n/2) row-major; return the half atom."""
        two, half = Atom(2, origin="half-count"), Atom(size_of(axis) // 2, origin="half")
        try:
            unify(axis, [two, half])
        except UnifyError:
            return [Atom(size_of(axis) // 2, origin="slice")]
        half_leaves = leaves([half])
        self.lit(lit, half_leaves, node)
        return list(half_leaves)

    def _slice_fallback(self, node: ir.Node, x: list[Axis], axes_el) -> None:
        """Bounds computed at run time: the sliced axes are new; when the axes are constants,
        every other axis is the input's own."""
        if axes_el and all(e.kind == "lit" for e in axes_el):
            sliced = {e.value % len(x) for e in axes_el}
            self.runtime_cuts += [(node, node.inputs[0], k) for k in sorted(sliced)]
            self.axes[node.outputs[0]] = [
                self._fresh_from_inferred(node.outputs[0], k, "slice") if k in sliced
                else list(a) for k, a in enumerate(x)]
            return
        ax = self.fresh_axes_from_shape(node.outputs[0], "slice")
        if ax is None:
            return
        for k, a in enumerate(x):
            if k < len(ax) and size_of(a) == size_of(ax[k]):
                ax[k] = list(a)
            else:
                self.runtime_cuts.append((node, node.inputs[0], k))
                self._mark_opaque(node.outputs[0], [k])
        self.axes[node.outputs[0]] = ax

    def op_MatMul(self, node: ir.Node) -> None:
        a, b = self.get(node.inputs[0]), self.get(node.inputs[1])
        if a is None or b is None:
            return
        if len(a) == 1:
            a = [[]] + a
        if len(b) == 1:
            b = b + [[]]
        self.try_unify(a[-1], b[-2], f"MatMul {node.name}")
        ba, bb = a[:-2], b[:-2]
        rank = max(len(ba), len(bb))
        batch = []
        for k in range(rank):
            xa = ba[k - rank + len(ba)] if k - rank + len(ba) >= 0 else []
            xb = bb[k - rank + len(bb)] if k - rank + len(bb) >= 0 else []
            if size_of(xa) == 1:
                batch.append(list(xb))
            elif size_of(xb) == 1:
                batch.append(list(xa))
            else:
                self.try_unify(xa, xb, f"MatMul batch {node.name}")
                batch.append(list(xa))
        self.axes[node.outputs[0]] = batch + [list(a[-2]), list(b[-1])]

    def op_Gemm(self, node: ir.Node) -> None:
        a, b = self.get(node.inputs[0]), self.get(node.inputs[1])
        if a is None or b is None:
            return
        ta = node.attributes["transA"].value if "transA" in node.attributes else 0
        tb = node.attributes["transB"].value if "transB" in node.attributes else 0
        m, ka = (a[1], a[0]) if ta else (a[0], a[1])
        kb, n = (b[1], b[0]) if tb else (b[0], b[1])
        self.try_unify(ka, kb, f"Gemm {node.name}")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = self.get(node.inputs[2])
            if c and size_of(c[-1]) != 1:
                self.try_unify(n, c[-1], f"Gemm bias {node.name}")
        self.axes[node.outputs[0]] = [list(m), list(n)]

    def op_Conv(self, node: ir.Node) -> None:
        x, w = self.get(node.inputs[0]), self.get(node.inputs[1])
        if x is None or w is None:
            return
        if size_of(x[1]) is not None:  # a symbolic channel axis (optimum's pixel_values) is
            # the weight's, which the input synthesis reads; group=1 assumed for unification
            self.try_unify(x[1], w[1], f"Conv {node.name}")
        out = self.fresh_axes_from_shape(node.outputs[0], "conv")
        if out is None:
            return
        out[0] = list(x[0])
        out[1] = list(w[0])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.try_unify(w[0], self.get(node.inputs[2])[0], f"Conv bias {node.name}")
        self.axes[node.outputs[0]] = out

    def _norm(self, node: ir.Node, params: Sequence[int]) -> None:
        x = self.get(node.inputs[0])
        if x is None:
            return
        for i in params:
            if len(node.inputs) > i and node.inputs[i] is not None:
                p = self.get(node.inputs[i])
                if p:
                    self.try_unify(x[-1], p[-1], f"{node.op_type} {node.name}")
        for k, o in enumerate(node.outputs):
            if k == 0 or (node.op_type.startswith("Skip") and k == 3):
                self.axes[o] = [list(a) for a in x]

    def op_LayerNormalization(self, node: ir.Node) -> None:
        self._norm(node, (1, 2))

    def op_RMSNormalization(self, node: ir.Node) -> None:
        self._norm(node, (1,))

    op_SimplifiedLayerNormalization = op_RMSNormalization

    def op_SkipLayerNormalization(self, node: ir.Node) -> None:
        x, s = self.get(node.inputs[0]), self.get(node.inputs[1])
        if x is not None and s is not None:
            self.try_unify(x[-1], s[-1], f"SkipLayerNormalization {node.name}")
        self._norm(node, (2, 3, 4))

    op_SkipSimplifiedLayerNormalization = op_SkipLayerNormalization

    def _heads_attr(self, node: ir.Node, axis: Axis, attr: str) -> Atom | None:
        """Split a packed (heads*head_dim) axis by a head-count attribute."""
        if attr not in node.attributes or not node.attributes[attr].value:
            return None
        n = int(node.attributes[attr].value)
        heads, hd = Atom(n, origin=attr), Atom((size_of(axis) or 0) // max(n, 1), origin="head_dim")
        try:
            unify(axis, [heads, hd])
        except UnifyError as e:
            self.conflicts.append(f"{node.op_type} {node.name}: {e}")
            return None
        self.literals.append(LiteralUse(("attr", node.name, attr, 0), n, [heads], node.name,
                                        node.op_type))
        return heads

    def op_Attention(self, node: ir.Node) -> None:
        q, k, v = (self.get(node.inputs[i]) if len(node.inputs) > i else None for i in range(3))
        if q is None:
            return
        mask = self.get(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if mask is not None and len(mask) >= 2 and k is not None:
            seq_q, seq_k = (q[-2], k[-2]) if len(q) == 4 else (q[-2], k[-2])
            for m_ax, s_ax in ((mask[-2], seq_q), (mask[-1], seq_k)):
                if size_of(m_ax) != 1 and size_of(s_ax) != 1:
                    self.try_unify(m_ax, s_ax, f"Attention mask {node.name}")
        if node.domain in ("", "ai.onnx") and len(q) == 3:
            qh = self._heads_attr(node, q[-1], "q_num_heads")
            if k is not None:
                kh = self._heads_attr(node, k[-1], "kv_num_heads")
                if qh is not None and kh is not None and qh.size == kh.size:
                    # as many K heads as query heads: the same heads (K and V repeated for
                    # the query groups before the op, or plain multi-head attention)
                    self.try_unify([qh], [kh], f"Attention heads {node.name}")
                if v is not None:
                    vh = self._heads_attr(node, v[-1], "kv_num_heads")
                    if kh is not None and vh is not None:
                        self.try_unify([kh], [vh], f"Attention kv heads {node.name}")
                # head_dim of q and k agree
                hq, hk = leaves(q[-1]), leaves(k[-1])
                if hq and hk:
                    self.try_unify([hq[-1]], [hk[-1]], f"Attention {node.name}")
            out = [list(a) for a in q]
            if v is not None:
                out[-1] = list(leaves(q[-1])[:-1]) + list(leaves(v[-1])[-1:]) \
                    if len(leaves(q[-1])) > 1 else list(q[-1])
            self.axes[node.outputs[0]] = out
        elif node.domain in ("", "ai.onnx") and len(q) == 4:
            if k is not None:
                self.try_unify(q[-1], k[-1], f"Attention {node.name}")
                if size_of(q[1]) == size_of(k[1]):
                    self.try_unify(q[1], k[1], f"Attention heads {node.name}")
                if v is not None:
                    self.try_unify(k[1], v[1], f"Attention kv heads {node.name}")
            out = [list(a) for a in q]
            if v is not None:
                out[-1] = list(v[-1])
            self.axes[node.outputs[0]] = out
        else:
            out = self.fresh_axes_from_shape(node.outputs[0], "attention")
            if out is not None:
                self.axes[node.outputs[0]] = out

    def op_RotaryEmbedding(self, node: ir.Node) -> None:
        x = self.get(node.inputs[0])
        if x is None:
            return
        if len(x) == 3:
            self._heads_attr(node, x[-1], "num_heads")
        elif len(x) == 4 and "num_heads" in node.attributes and node.attributes["num_heads"].value \
                and size_of(x[1]) == node.attributes["num_heads"].value:
            self.literals.append(LiteralUse(("attr", node.name, "num_heads", 0),
                                            int(node.attributes["num_heads"].value), list(x[1]),
                                            node.name, node.op_type))
        self.axes[node.outputs[0]] = [list(a) for a in x]
        cos = self.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if cos is not None and len(x) >= 3:
            hd = leaves(x[-1])[-1:] if len(x) == 3 else x[-1]
            rot = node.attributes["rotary_embedding_dim"].value \
                if "rotary_embedding_dim" in node.attributes else 0
            if not rot and size_of(hd) and size_of(cos[-1]) and 2 * size_of(cos[-1]) == size_of(hd):
                two, half = Atom(2, origin="half-count"), Atom(size_of(hd) // 2, origin="half")
                try:
                    unify(hd, [two, half])
                    unify(cos[-1], [half])
                except UnifyError as e:
                    self.conflicts.append(f"RotaryEmbedding {node.name}: {e}")


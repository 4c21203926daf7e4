"""The analysis driver: one pass over a graph in topological order, the axes and elements of
every value, and what each operator rule records (literals, conflicts, opaque axes, ...)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .atoms import Atom, Axis, UnifyError, unify
from .closed_world import AXIS_OPS, DOMAINS, FOLD, rule_for
from .elements import Elem, LiteralUse, int_array


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
        #: (node, value, axis, cut): output axes a rule could not derive from its inputs
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
        #: while a rule runs: its inputs' elements as they were before ``visit`` marked their
        #: literals with the input that reads them (``via``); Concat marks them per input
        self.saved: dict = {}

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
                self.mark_opaque(value, range(len(ax)))
        return self.axes[value]

    def mark_opaque(self, value: ir.Value, ks, cut: tuple | None = None) -> None:
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

    def fresh_from_inferred(self, value: ir.Value, k: int, origin: str,
                            cut: tuple | None = None, broadcast: bool = False) -> Axis:
        """A new axis for output axis ``k`` of ``value`` from its inferred shape, recorded as
        opaque (the rule does not know where its units come from) unless ``broadcast``:
        every unit is a copy of one (a size-1 axis expanded, a constant filled in)."""
        if not broadcast:
            self.mark_opaque(value, [k], cut)
        shape = value.shape
        if shape is not None and k < len(shape):
            d = shape[k]
            if isinstance(d, int):
                return [] if d == 1 else [Atom(d, origin=origin)]
            if d.value:
                return [self.sym_atom(str(d.value))]
        return [Atom(None, origin=origin)]

    # ------------------------------------------------------------------ driver
    def run(self) -> "AxisAnalysis":
        g = self.graph
        for v in g.inputs:
            ax = self.fresh_axes_from_shape(v, "input") or []
            self.axes[v] = ax
        for v in g.initializers.values():
            self.init_const(v, v.const_value, ("value", v.name))
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
                        self.mark_opaque(out, range(len(ax)))
        return self

    def init_const(self, v: ir.Value, const, ref: tuple) -> None:
        if const is None:
            return
        self.axes[v] = [[] if d == 1 else [Atom(int(d), origin="const")] for d in const.shape]
        arr = int_array(None, const)
        if arr is not None and arr.ndim <= 1:
            self.elems[v] = [Elem("lit", int(x), (ref[0], ref[1], i))
                             for i, x in enumerate(arr.reshape(-1))]

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
        self.saved = saved
        try:
            if node.domain not in DOMAINS:
                self.unhandled.append(node)
                return
            if op in AXIS_OPS:
                self._axis_op(node)
            rule = rule_for(op)
            if rule is not None:
                rule(self, node)
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

"""Graph helpers shared by recognition and the passes: constants behind a value, walks
through pass-through ops, and ``GraphIndex`` (values and nodes by name, ancestry, axis atoms).

Nothing here gives a tensor a meaning; that is the components' job (``components/``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, ShapeInferencePass

from . import dims

_PASS = {"Identity", "Dropout", "Cast"}


def const_source(v: ir.Value | None) -> tuple[ir.Value | None, list[ir.Node]]:
    """The initializer behind ``v`` through Identity/Cast/Transpose/Constant, and the hops."""
    hops: list[ir.Node] = []
    while v is not None:
        if v.const_value is not None and (v.is_initializer() or v.producer() is None):
            return v, hops
        p = v.producer()
        if p is None:
            return None, hops
        if p.op_type == "Constant":
            return v, hops + [p]
        if p.op_type in ("Identity", "Transpose", "Cast") and p.inputs:
            hops.append(p)
            v = p.inputs[0]
            continue
        return None, hops
    return None, hops


def const_array(v: ir.Value | None) -> np.ndarray | None:
    src, hops = const_source(v)
    if src is None:
        return None
    if src.const_value is not None:
        return src.const_value.numpy()
    p = src.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value.numpy()
    return None


def const_tensor(src: ir.Value | None):
    """The tensor of a constant (an initializer, or a Constant node's output), unread."""
    if src is None:
        return None
    if src.const_value is not None:
        return src.const_value
    p = src.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value
    return None


def const_shape(src: ir.Value | None) -> tuple | None:
    """The shape of a constant (an initializer, or a Constant node's output), unread."""
    t = const_tensor(src)
    return None if t is None else tuple(t.shape)


def is_const(v: ir.Value | None) -> bool:
    return v is None or const_source(v)[0] is not None


def scalar_const(v: ir.Value | None) -> float | None:
    arr = const_array(v)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def skip_pass(v: ir.Value) -> ir.Value:
    """Follow Identity/Dropout/Cast forward when they are the only consumer."""
    while True:
        cons = v.consumers()
        if len(cons) == 1 and cons[0].op_type in _PASS:
            v = cons[0].outputs[0]
            continue
        return v


def back_pass(v: ir.Value) -> ir.Value:
    while v.producer() is not None and v.producer().op_type in _PASS and v.producer().inputs:
        v = v.producer().inputs[0]
    return v


def back_view(v: ir.Value) -> ir.Value:
    """Follow data through ops that only re-view it (Reshape, Cast, Unsqueeze, ...)."""
    while v.producer() is not None and v.producer().op_type in (
            "Identity", "Cast", "Reshape", "Flatten", "Unsqueeze", "Squeeze") and v.producer().inputs:
        v = v.producer().inputs[0]
    return v


def nm(v: ir.Value | None) -> str:
    return "" if v is None else (v.name or "")


class GraphIndex:
    """One graph, indexed: values and nodes by name, graph order, ancestry and the axis
    analysis (``dims.AxisAnalysis``) every component reads sizes from."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        # the description refers to nodes and values by name: onnx-ir's NameFixPass gives
        # unnamed or clashing ones unique names (ONNX allows both; exporters write neither)
        NameFixPass()(model)
        ShapeInferencePass(strict_mode=False)(model)
        self.ax = dims.AxisAnalysis(self.graph).run()
        self.order = {n: i for i, n in enumerate(self.graph)}
        self._anc_cache: dict[ir.Value, set] = {}
        self._values: dict[str, ir.Value] = {}
        for v in list(self.graph.inputs) + list(self.graph.initializers.values()):
            self._values[v.name] = v
        for n in self.graph:
            for o in n.outputs:
                self._values[o.name] = o
        self._nodes = {n.name: n for n in self.graph}

    def value(self, name: str) -> ir.Value:
        return self._values[name]

    graph_value = value

    def _node(self, name: str) -> ir.Node:
        return self._nodes[name]

    node = _node

    # ----------------------------------------------------------------- basic finders
    def ancestors(self, v: ir.Value) -> set:
        """Nodes that ``v`` is computed from (transitively)."""
        if v in self._anc_cache:
            return self._anc_cache[v]
        seen: set = set()
        stack = [v.producer()] if v.producer() is not None else []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for i in n.inputs:
                if i is not None and i.producer() is not None:
                    stack.append(i.producer())
        self._anc_cache[v] = seen
        return seen

    def depends_on(self, v: ir.Value, src: ir.Value) -> bool:
        if v is src:
            return True
        anc = self.ancestors(v)
        p = src.producer()
        if p is not None:
            return p in anc
        return any(src in n.inputs for n in anc)

    def leaves(self, v: ir.Value, axis: int = -1) -> list:
        a = self.ax.get(v)
        if not a:
            return []
        try:
            return dims.leaves(a[axis])
        except IndexError:
            return []

    def constants(self) -> list[ir.Value]:
        """Every constant: initializers, then Constant nodes' outputs."""
        return list(self.graph.initializers.values()) + [
            n.outputs[0] for n in self.graph
            if n.op_type == "Constant" and n.outputs and "value" in n.attributes]

    def score_inputs(self) -> list[ir.Value]:
        """The inputs of every Softmax (attention scores), computed once."""
        if not hasattr(self, "_score_inputs"):
            self._score_inputs = [n.inputs[0] for n in self.graph if n.op_type == "Softmax"]
        return self._score_inputs

    def reaches_scores(self, v: ir.Value) -> bool:
        return any(self.depends_on(x, v) for x in self.score_inputs())

    def unnamed_axes(self, v: ir.Value) -> list[int]:
        """Axes of ``v`` whose atoms no component named (all of them where the shape
        reasoning has no axes for ``v``)."""
        axes = self.ax.axes.get(v) or []
        shape = v.shape if v.shape is not None else const_shape(v)
        rank = len(shape) if shape is not None else len(axes)
        return [k for k in range(rank)
                if k >= len(axes) or all(a.role is None for a in dims.leaves(axes[k]))]

    def _branch_nodes(self, x: ir.Value, branch_out: ir.Value) -> set:
        """Nodes on paths from ``x`` to ``branch_out``: a forward walk from x kept inside the
        ancestors of branch_out (linear in the branch size)."""
        anc = self.ancestors(branch_out)
        if x.producer() is None and not x.is_graph_input():
            return set(anc)
        seen: set = set()
        stack = [n for n in x.consumers() if n in anc]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for o in n.outputs:
                stack.extend(c for c in o.consumers() if c in anc and c not in seen)
        return seen


def shape_of(v: ir.Value) -> list:
    if v.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value or "?") for d in v.shape]

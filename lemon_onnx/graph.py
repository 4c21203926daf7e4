"""Graph helpers shared by recognition and the passes: constants behind a value, walks
through pass-through ops, and ``GraphIndex`` (values and nodes by name, ancestry, axis atoms).

Nothing here gives a tensor a meaning; that is the components' job (``components/``).
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, ShapeInferencePass

from . import dims

_PASS = {"Identity", "Dropout", "Cast"}
#: operators whose output depends on their input's shape, never on its values
_SHAPE_ONLY = {"Shape", "Size"}


def copy_attr(a: ir.Attr) -> ir.Attr:
    """A node attribute for another node (a clone): the same name, type and value."""
    return ir.Attr(a.name, a.type, a.value)


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


def scalar_scaled(node: ir.Node) -> ir.Value | None:
    """The data input of a Mul (or Div) by a scalar constant, else None: the same factor on
    every channel, so it holds in any layout (T5's tied head reads the stream times
    d_model^-0.5; BART scales k by sqrt(scale))."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    data, other = (b, a) if node.op_type == "Mul" and is_const(a) else (a, b)
    arr = const_array(other)
    return data if arr is not None and arr.size == 1 and not is_const(data) else None


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


#: models whose value shapes were inferred on the protobuf before it became a graph
#: (``infer_shapes_early``): the first ``GraphIndex`` of such a model skips its own inference
_SHAPES_INFERRED: weakref.WeakSet = weakref.WeakSet()
#: inferring on the protobuf pays where its tensors are external (the protobuf is small); with
#: large tensors inside, onnx-ir's pass, which leaves them out, is cheaper
_EARLY_INFERENCE_MAX_BYTES = 64 << 20


def infer_shapes_early(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shape inference on a freshly parsed protobuf (the same settings as ``GraphIndex``'s
    pass), which spares the pass's round trip through a second protobuf; None where the
    protobuf holds large tensors or inference fails (the pass then runs as usual)."""
    inline = sum(len(t.raw_data) for t in proto.graph.initializer)
    if inline > _EARLY_INFERENCE_MAX_BYTES:
        return None
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False,
                                                 data_prop=True)
    except Exception:  # noqa: BLE001 - the pass will try again and leave the model as it is
        return None


def mark_shapes_inferred(model: ir.Model) -> None:
    _SHAPES_INFERRED.add(model)


def forget_shapes_inferred(model: ir.Model) -> None:
    """The model changed since it was loaded (its fused ops unfused): infer again."""
    _SHAPES_INFERRED.discard(model)


class _Unsorted(Exception):
    """A node reads a value produced later in the graph's order."""


class GraphIndex:
    """One graph, indexed: values and nodes by name, graph order, ancestry and the axis
    analysis (``dims.AxisAnalysis``) every component reads sizes from."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        # the description refers to nodes and values by name: onnx-ir's NameFixPass gives
        # unnamed or clashing ones unique names (ONNX allows both; exporters write neither)
        NameFixPass()(model)
        if model in _SHAPES_INFERRED:  # at load time; later indexes see rewritten graphs
            _SHAPES_INFERRED.discard(model)
        else:
            ShapeInferencePass(strict_mode=False)(model)
        self.ax = dims.AxisAnalysis(self.graph).run()
        #: what size each atom is, named by the components as they match (``dims.Roles``);
        #: the description carries it to the passes
        self.roles = dims.Roles()
        self.order = {n: i for i, n in enumerate(self.graph)}
        self._anc_cache: dict[ir.Value, set] = {}
        self.values: dict[str, ir.Value] = {}
        for v in list(self.graph.inputs) + list(self.graph.initializers.values()):
            self.values[v.name] = v
        for n in self.graph:
            for o in n.outputs:
                self.values[o.name] = o
        self._nodes = {n.name: n for n in self.graph}
        #: named groups of axis atoms that move together (attention's heads and head_dim),
        #: for the size literals' labels
        self.size_groups: list[tuple[str, list]] = []

    def add_size_group(self, name: str, atoms: list) -> None:
        self.size_groups.append((name, atoms))

    def value(self, name: str) -> ir.Value:
        return self.values[name]

    graph_value = value

    def node(self, name: str) -> ir.Node:
        return self._nodes[name]

    # ----------------------------------------------------------------- basic finders
    def ancestors(self, v: ir.Value) -> set:
        """Nodes that ``v`` is computed from (transitively)."""
        if v not in self._anc_cache:
            self._anc_cache[v] = _walk_back(v, data=False)
        return self._anc_cache[v]

    def depends_on(self, v: ir.Value, src: ir.Value) -> bool:
        """Whether ``v`` is computed from ``src`` (or is it)."""
        if v is src:
            return True
        p = src.producer()
        if p is not None:
            return self.computes(p, v)
        reached = self._reached(src, v)
        if reached is None:
            return any(src in n.inputs for n in self.ancestors(v))
        return reached

    def computes(self, n: ir.Node, v: ir.Value) -> bool:
        """Whether node ``n`` is among those ``v`` is computed from."""
        reached = self._reached(n, v)
        return n in self.ancestors(v) if reached is None else reached

    def data_depends_on(self, v: ir.Value, src: ir.Value) -> bool:
        """Whether the *values* of ``v`` are computed from those of ``src``: like
        ``depends_on``, but a path through an operator that reads only its input's shape
        (Shape, Size) does not count.  transformers' SDPA attention, as exported, scales q
        and k by sqrt(1/sqrt(head_dim)) with head_dim read from q's shape: k's values do not
        come from the q projection, though k's scale is computed from q's shape."""
        if v is src:
            return True
        key = src.producer() if src.producer() is not None else src
        reached = self._reached(key, v, data=True)
        if reached is not None:
            return reached
        anc = data_ancestors(v)  # the graph is not in order: walk
        if key is not src:
            return key in anc
        return any(src in n.inputs for n in anc if n.op_type not in _SHAPE_ONLY)

    def _reached(self, key, v: ir.Value, data: bool = False) -> bool | None:
        """The bit test: whether ``key`` (a node, or a value no node produces) is in ``v``'s
        reach set (its data reach set with ``data``); None where either came after the index
        was built (walk instead)."""
        a = self._reach_bits()[1 if data else 0].get(v)
        b = self._bit.get(key)
        return None if a is None or b is None else bool(a >> b & 1)

    def _reach_bits(self) -> tuple[dict, dict]:
        """For each value, the set of nodes and source values (inputs, initializers) it is
        computed from, as the bits of one integer, in one walk in graph order: ``depends_on``
        is then a bit test instead of a walk per call (recognition asks thousands of times).
        Beside it the data reach set, which a shape-only operator does not pass on."""
        if not hasattr(self, "_reach"):
            self._bit: dict = {}
            reach: dict = {}
            data: dict = {}

            def of(x: ir.Value, table: dict) -> int:
                r = table.get(x)
                if r is None:  # a graph input, an initializer or a value from outside
                    if x.producer() is not None:  # not in graph order: no bits, walk instead
                        raise _Unsorted
                    r = reach[x] = data[x] = 1 << self._bit.setdefault(x, len(self._bit))
                return r

            try:
                for n in self.graph:
                    mine = mine_data = 1 << self._bit.setdefault(n, len(self._bit))
                    for i in n.inputs:
                        if i is not None:
                            mine |= of(i, reach)
                            if n.op_type not in _SHAPE_ONLY:
                                mine_data |= of(i, data)
                    for o in n.outputs:
                        reach[o] = mine
                        data[o] = mine_data
            except _Unsorted:
                reach, data = {}, {}
            self._reach = (reach, data)
        return self._reach

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

    def attention_values(self) -> list[ir.Value]:
        """The values the attention probabilities weigh: the other input of every MatMul
        that reads a Softmax's output, computed once."""
        if not hasattr(self, "_attention_values"):
            probs = {n.outputs[0] for n in self.graph if n.op_type == "Softmax"}
            self._attention_values = [n.inputs[1] for n in self.graph
                                      if n.op_type == "MatMul" and n.inputs[0] in probs]
        return self._attention_values

    def reaches_heads(self, v: ir.Value) -> bool:
        """Whether ``v`` reaches the attention per head: its scores or the values they weigh
        (DeBERTa's q and v biases added after the split into heads)."""
        return self.reaches_scores(v) or any(self.depends_on(x, v)
                                             for x in self.attention_values())

    def unnamed_axes(self, v: ir.Value) -> list[int]:
        """Axes of ``v`` whose atoms no component named (all of them where the shape
        reasoning has no axes for ``v``)."""
        axes = self.ax.axes.get(v) or []
        shape = v.shape if v.shape is not None else const_shape(v)
        rank = len(shape) if shape is not None else len(axes)
        return [k for k in range(rank)
                if k >= len(axes) or not self.roles.named(axes[k])]

    def branch_nodes(self, x: ir.Value, branch_out: ir.Value) -> set:
        """Nodes on paths from ``x`` to ``branch_out``: a forward walk from x kept inside the
        ancestors of branch_out (linear in the branch size)."""
        if x.producer() is None and not x.is_graph_input():
            return set(self.ancestors(branch_out))
        seen: set = set()
        stack = [n for n in x.consumers() if self.computes(n, branch_out)]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for o in n.outputs:
                stack.extend(c for c in o.consumers()
                             if c not in seen and self.computes(c, branch_out))
        return seen


def data_ancestors(v: ir.Value) -> set:
    """Nodes whose outputs' values ``v``'s values are computed from: the ancestors, except
    behind an operator that reads only its input's shape (that operator is included, what
    it reads is not)."""
    return _walk_back(v, data=True)


def _walk_back(v: ir.Value, data: bool) -> set:
    """The nodes ``v`` is computed from (``data``: not through a shape-only operator)."""
    seen: set = set()
    stack = [v.producer()] if v.producer() is not None else []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not data or n.op_type not in _SHAPE_ONLY:
            stack.extend(i.producer() for i in n.inputs
                         if i is not None and i.producer() is not None)
    return seen


def shape_of(v: ir.Value) -> list:
    if v.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value or "?") for d in v.shape]

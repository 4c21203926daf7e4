"""Keys for the stored constants of a recognised graph: the same key names the same tensor in
two exports of one architecture (the expanded model, and the probe that transformers builds
from the new config, ``probe.py``).

A key is (block, path).  Two sources, in this order:

1. **The description**: every string of the recognised description that names a stored
   constant (an initializer or a Constant node's output) is keyed by its place in the
   description (``blocks[3].attention.q.weight`` -> (3, ``attention.q.weight``)); a string that
   names a node keys the node's constant inputs (``(3, "attention_scale@1")``: a layer-scale
   vector).  Numbers the description holds (a norm's epsilon) are kept beside, by key.
2. **Position**, for constants the description does not name (Qwen3's per-head q/k norm
   weights, T5's relative position bias table, a scale on the embeddings, ALiBi slopes): the
   node that reads the constant, its input slot, the nearest described value or node upstream
   and downstream of that node, and the constant's rank in graph order among those with the
   same signature.  The epsilon attribute of a node keyed this way is kept with the numbers
   (a LayerNormalization over each head: Persimmon's q/k norms).

No name is read for meaning: exporters name initializers as they please.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import onnx_ir as ir

from ..graph import const_source, const_tensor

#: description fields that hold no tensor of the model (or facts of the whole graph)
_SKIP = frozenset({"size_literals", "unrecognised", "inputs", "outputs", "shared_initializers",
                   "lemon_plan", "blockers", "family", "layout", "norm_type", "norm_form",
                   "producer", "activation", "expressed", "kind", "form", "qkv_layout",
                   "weight_layout", "op", "topology", "transform_activation", "tie",
                   "patch_activation", "epsilon_at"})
_DEPTH = 16  # nodes walked from a constant's reader to find a described anchor
_COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "Equal", "And", "Or"})


@dataclasses.dataclass(frozen=True, order=True)
class Key:
    block: int  # -1: outside the blocks
    path: str

    def __str__(self) -> str:
        return self.path if self.block < 0 else f"blocks[{self.block}].{self.path}"


@dataclasses.dataclass
class Refs:
    consts: dict  # Key -> ir.Value (the stored constant)
    numbers: dict  # Key -> float (epsilons and other numbers the description holds)
    readers: dict  # Key -> (ir.Node, input slot) that reads the constant, where known
    anchors: dict = dataclasses.field(default_factory=dict)  # Key -> described value/node name
    #: positional signatures -> how many constants share them (their ranks)
    groups: dict = dataclasses.field(default_factory=dict)
    #: Key -> the axes permutation from the stored constant to the tensor its reader computes
    #: with (a Transpose between them, Gemm's transB, a linear weight stored [out, in]): two
    #: exporters store one parameter in different layouts (TorchScript folds the transpose
    #: of nn.Linear's weight, dynamo keeps a Transpose node), so keys compare what is read
    views: dict = dataclasses.field(default_factory=dict)

    def read(self, key: "Key", arr):
        """``arr`` (the stored constant of ``key``) as its reader computes with it."""
        import numpy as np

        perm = self.views.get(key)
        return np.transpose(arr, perm) if perm is not None else arr


def _is_float_const(v: ir.Value | None) -> bool:
    t = const_tensor(v)
    return t is not None and t.dtype.is_floating_point()


def collect(model: ir.Model, desc) -> Refs:
    """Every stored float constant of ``model`` that ``desc`` (its description) or its position
    keys."""
    g = model.graph
    values: dict[str, ir.Value] = {v.name: v for v in g.inputs}
    nodes: dict[str, ir.Node] = {}
    for n in g:
        nodes[n.name] = n
        for o in n.outputs:
            values[o.name] = o
    values.update(g.initializers)
    refs = Refs({}, {}, {})
    anchor_values: dict[str, Key] = {}
    anchor_nodes: dict[str, Key] = {}

    def walk(obj, block: int, path: str) -> None:
        if dataclasses.is_dataclass(obj):
            if type(obj).__name__ == "Linear" and obj.weight_layout == "out,in":
                refs.views[Key(block, f"{path}.weight")] = (1, 0)  # read as [in, out]
            for f in dataclasses.fields(obj):
                if f.name in _SKIP:
                    continue
                sub = f"{path}.{f.name}" if path else f.name
                if not path and f.name == "blocks":
                    for i, b in enumerate(getattr(obj, f.name)):
                        walk(b, i, "")
                    continue
                walk(getattr(obj, f.name), block, sub)
        elif isinstance(obj, (list, tuple)):
            for i, x in enumerate(obj):
                walk(x, block, f"{path}[{i}]")
        elif isinstance(obj, float):
            refs.numbers[Key(block, path)] = obj
        elif isinstance(obj, str) and obj:
            v = values.get(obj)
            if v is not None and _is_float_const(v) and (v.is_initializer() or v.producer()
                                                         is None or v.producer().op_type
                                                         == "Constant"):
                refs.consts.setdefault(Key(block, path), v)
            elif obj in nodes:
                node = nodes[obj]
                anchor_nodes.setdefault(obj, Key(block, path))
                for k, inp in enumerate(node.inputs):
                    src, hops = const_source(inp)
                    if _is_float_const(src):
                        key = Key(block, f"{path}@{k}")
                        refs.consts.setdefault(key, src)
                        refs.readers.setdefault(key, (node, k))
                        _view(refs, key, src, hops, node, k)
            elif v is not None:
                anchor_values.setdefault(obj, Key(block, path))

    walk(desc, -1, "")
    refs.anchors = {k: name for name, k in {**anchor_nodes, **anchor_values}.items()}
    _by_position(g, refs, anchor_values, anchor_nodes)
    return refs


def _view(refs: Refs, key: Key, src: ir.Value, hops: list, node: ir.Node, slot: int) -> None:
    """The permutation from ``src`` to what ``node`` computes with at ``slot``: the Transpose
    hops between them, then Gemm's transA/transB."""
    t = const_tensor(src)
    rank = len(t.shape)
    perm = list(range(rank))
    for h in reversed(hops):  # hops run from the reader back to the constant
        if h.op_type == "Transpose":
            p = list(h.attributes["perm"].value) if "perm" in h.attributes else \
                list(range(rank))[::-1]
            perm = [perm[i] for i in p]
    if node.op_type == "Gemm" and slot in (0, 1) and rank == 2:
        attr = node.attributes.get("transA" if slot == 0 else "transB")
        if attr is not None and attr.value:
            perm = perm[::-1]
    if perm != list(range(rank)):
        refs.views[key] = tuple(perm)


def _anchor_of(node: ir.Node, anchor_nodes: dict, anchor_values: dict) -> Key | None:
    if node.name in anchor_nodes:
        return anchor_nodes[node.name]
    for o in node.outputs:
        if o.name in anchor_values:
            return anchor_values[o.name]
    return None


def _data(v: ir.Value | None) -> bool:
    """A value that carries the model's numbers (a float tensor), not a shape or an index:
    anchors are found along data only, which both exporters compute alike (shapes and slice
    bounds are folded by one and computed by the other)."""
    return v is not None and (v.dtype is None or v.dtype.is_floating_point())


def _upstream(node: ir.Node, skip: int, anchor_nodes, anchor_values) -> Key | None:
    start = [x for k, x in enumerate(node.inputs) if k != skip and _data(x)]
    queue = deque((x, 0) for x in start)
    seen: set[int] = set()
    while queue:
        v, d = queue.popleft()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.name in anchor_values:
            return anchor_values[v.name]
        p = v.producer()
        if p is None or d >= _DEPTH:
            continue
        if p.name in anchor_nodes:
            return anchor_nodes[p.name]
        queue.extend((x, d + 1) for x in p.inputs if _data(x))
    return None


def _downstream(node: ir.Node, anchor_nodes, anchor_values) -> list[Key]:
    """The nearest described anchors downstream of ``node``: the first met on each path, one
    per block (a value the expansion shares between a block and its twin reaches both)."""
    for o in node.outputs:
        if o.name in anchor_values:
            return [anchor_values[o.name]]
    queue = deque((use.node, 1) for o in node.outputs if _data(o) for use in o.uses())
    seen: set[int] = set()
    found: dict[int, Key] = {}
    while queue:
        n, d = queue.popleft()
        if id(n) in seen:
            continue
        seen.add(id(n))
        a = _anchor_of(n, anchor_nodes, anchor_values)
        if a is not None:
            found.setdefault(a.block, a)
            continue
        if d < _DEPTH:
            queue.extend((use.node, d + 1) for o in n.outputs if _data(o) for use in o.uses())
    return list(found.values())


def _by_position(g: ir.Graph, refs: Refs, anchor_values: dict, anchor_nodes: dict) -> None:
    for node in g:  # graph order
        if node.name in anchor_nodes:
            continue  # its constant inputs have their keys in the description
        for k, inp in enumerate(node.inputs):
            src, hops = const_source(inp)
            if not _is_float_const(src):
                continue
            up = _upstream(node, k, anchor_nodes, anchor_values)
            downs = _downstream(node, anchor_nodes, anchor_values)
            slot = "c" if node.op_type in _COMMUTATIVE else k  # exporters order these freely
            for down in (downs[:1] if up is not None else downs) or [None]:
                block = up.block if up is not None else (down.block if down else -1)
                rel = ""
                if down is not None:
                    rel = down.path if down.block < 0 or block < 0 else \
                        f"{down.path}{down.block - block:+d}"
                sig = Key(block, f"~{node.op_type}@{slot}<{up.path if up else ''}>{rel}")
                n = refs.groups.get(sig, 0)
                refs.groups[sig] = n + 1
                key = Key(block, f"{sig.path}#{n}")
                refs.consts[key] = src
                refs.readers[key] = (node, k)
                _view(refs, key, src, hops, node, k)
                eps = node.attributes.get("epsilon")  # a norm the description does not
                if eps is not None and eps.type == ir.AttributeType.FLOAT:  # name (per head)
                    refs.numbers[Key(block, f"{key.path}.epsilon")] = float(eps.value)

"""ONNX Runtime's fused ops (``com.microsoft`` contrib ops): unfused before recognition, fused
again after the passes.

A graph that went through ONNX Runtime's transformer optimizer (or optimum's O1-O4) holds
contrib ops such as ``SkipLayerNormalization``, ``BiasGelu``, ``Attention`` and
``EmbedLayerNormalization``.  Each such op has one module here (``REGISTRY``) that knows two
things:

- ``decompose(b, node)``: the op as a subgraph of standard ONNX ops, written through a
  ``Builder`` that tags every node it makes (metadata ``lemon.fused``: the group, the op and
  its attributes, which node input and output slots stand for the fused op's inputs and
  outputs, and the node's role);
- ``fused_attrs(group, attrs)`` (optional): the fused op's attributes once the passes have run
  (``Attention``'s ``num_heads`` follows the widened heads, read off the group's own nodes).

``UnfusePass`` replaces every contrib op by its decomposition, so recognition, the width and
depth passes and the float64 level see only standard ops (the components know those).
``RefusePass`` then finds each tagged group (the source's and the twins' clones, which carry the
tags along), checks that it is whole (every node of the decomposition still there, nothing
outside reading its inner values) and puts one fused op back in its place, reading the inputs
at the tagged slots: the widened weights, the twins' own.  A group that is not whole stays
decomposed (exact, only less fused) and the pass says so.

The decompositions are checked against ONNX Runtime's float32 kernels in
``tests/test_fusion.py``; a contrib op whose attributes or inputs take a form a module does not
decompose is refused (exit 2) naming the node and what to do.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import convert_attributes
from onnx_ir.passes import InPlacePass, PassResult

from ..errors import UnsupportedModelError
from ..graph import copy_attr

MS = "com.microsoft"
TAG = "lemon.fused"


@dataclasses.dataclass(frozen=True)
class FusedOp:
    """One contrib op a module unfuses (its ``OPS`` lists one record per op), and what the
    layer around the module needs to know of it:

    - ``joins``: fused input slot -> the output slot that returns that cache with the current
      tokens appended (what the decomposition's ``Concat`` joins: a GroupQueryAttention's past
      key -> present key), so the KV-cache component pairs them while the op is fused;
    - ``leave_decomposed``: whether a group that cannot be fused again may be written
      decomposed; False where the decomposition is exact only on the inputs the tool's checks
      feed (the pass then refuses instead)."""

    op_type: str
    joins: dict[int, int] = dataclasses.field(default_factory=dict)
    leave_decomposed: bool = True


class Builder:
    """Makes the standard-op nodes of one fused op's decomposition, tagged as one group."""

    def __init__(self, node: ir.Node, group: int, attrs: dict, opset: int,
                 names: set | None = None, graph: ir.Graph | None = None):
        self.node = node
        self.graph = graph
        self._names = names if names is not None else set()  # node names taken in the graph
        self.opset = opset  # the model's default-domain opset: the forms the nodes take
        self.group = group
        self.attrs = attrs
        self.nodes: list[ir.Node] = []
        self._ports: dict[ir.Node, dict] = {}
        self._inputs: list[tuple[ir.Value, int]] = []
        self._k = 0

    def dtype(self, v: ir.Value) -> ir.DataType:
        """``v``'s element type; undeclared (an earlier unfused op's output), the float type
        the fused op computes in."""
        return v.dtype if v.dtype is not None else self.float_type()

    def float_type(self) -> ir.DataType:
        """The float type the fused op computes in: its first float input's (undeclared, the
        type its producers compute in: an earlier contrib op's output read through a MatMul
        has no declared type until recognition infers shapes)."""
        for x in self.node.inputs:
            t = _float_type_of(x)
            if t is not None:
                return t
        raise UnsupportedModelError(f"{self.node.op_type} {self.node.name}: none of its inputs "
                                    "has a declared float type, so it cannot be unfused.",
                                    hint="Run ONNX shape inference on the model first.")

    def op(self, op_type: str, inputs, attrs: dict | None = None, *, outputs: int = 1,
           role: str = "", domain: str = ""):
        self._k += 1
        attributes = convert_attributes(attrs or {})
        name = f"{self.node.name or self.node.op_type}/unfused/{op_type}_{self._k}"
        while name in self._names:
            name += "_"
        self._names.add(name)
        n = ir.Node(domain, op_type, list(inputs), attributes, num_outputs=outputs, name=name)
        self.nodes.append(n)
        self._ports[n] = {"r": role, "in": [], "out": []}
        return n.outputs[0] if outputs == 1 else tuple(n.outputs)

    def const(self, arr, dtype: ir.DataType | None = None, role: str = "") -> ir.Value:
        """A Constant node (in the group, so it goes when the group is fused again)."""
        a = np.asarray(arr)
        if dtype is not None:
            a = a.astype(dtype.numpy())
        return self.op("Constant", [], {"value": ir.tensor(a)}, role=role)

    def initializer(self, arr, name: str) -> ir.Value:
        """A weight of the decomposition (a piece of a packed bias): an initializer, so the
        width pass widens it and the depth pass gives twins their own."""
        name = f"{self.node.name or self.node.op_type}/{name}"
        while name in self.graph.initializers:
            name += "_"
        v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arr), name=name))
        self.graph.register_initializer(v)
        return v

    def reduce(self, op_type: str, x: ir.Value, axes: list[int], keepdims: int = 1, role=""):
        """A Reduce* op over ``axes`` (an attribute before opset 18, an input since)."""
        if self.opset >= 18 or op_type == "ReduceSum" and self.opset >= 13:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64))],
                           {"keepdims": keepdims}, role=role)
        return self.op(op_type, [x], {"axes": axes, "keepdims": keepdims}, role=role)

    def unsqueeze(self, x: ir.Value, axes: list[int]):
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array(axes, np.int64))])
        return self.op("Unsqueeze", [x], {"axes": axes})

    def scalar(self, value: float, like: ir.Value) -> ir.Value:
        """A scalar constant in ``like``'s float type."""
        return self.const(np.array(value), self.dtype(like))

    def port_in(self, v: ir.Value, fused_index: int) -> None:
        """``v`` stands for input ``fused_index`` of the fused op (every slot of the group's
        nodes that reads it, resolved when the group is finished)."""
        self._inputs.append((v, fused_index))

    def _prune(self) -> None:
        """Drop nodes nothing reads (a constant a form did not need): the passes would
        remove them as dead code and the group would no longer be whole."""
        ported = {n for n in self.nodes if self._ports[n]["out"]}
        while True:
            dead = [n for n in self.nodes if n not in ported
                    and not any(o.uses() for o in n.outputs)]
            if not dead:
                return
            for n in dead:
                for i in range(len(n.inputs)):
                    n.replace_input_with(i, None)
                self.nodes.remove(n)
                del self._ports[n]

    def port_out(self, v: ir.Value, fused_index: int) -> None:
        n = v.producer()
        self._ports[n]["out"].append([v.index(), fused_index])

    def finish(self) -> None:
        self._prune()
        index = {n: k for k, n in enumerate(self.nodes)}
        for n in self.nodes:  # the wiring inside the decomposition, checked when fusing again
            self._ports[n]["k"] = index[n]
            self._ports[n]["e"] = [[slot, index[x.producer()], x.index()]
                                   for slot, x in enumerate(n.inputs)
                                   if x is not None and x.producer() in index]
        for v, i in self._inputs:
            for n in self.nodes:
                for slot, x in enumerate(n.inputs):
                    if x is v:
                        self._ports[n]["in"].append([slot, i])
        meta = {"g": self.group, "op": self.node.op_type, "dom": self.node.domain,
                "attrs": {k: _plain(a) for k, a in self.attrs.items()}, "n": len(self.nodes),
                "nout": len(self.node.outputs),
                "sig": _signature(self.nodes)}
        for n in self.nodes:
            n.metadata_props[TAG] = json.dumps({**meta, **self._ports[n]})


def _float_type_of(v: ir.Value | None, depth: int = 64) -> ir.DataType | None:
    """``v``'s float type: declared, or (through ops that compute in their float inputs'
    type) its producer's first float input's; a Cast's target type.  None if not a float."""
    while v is not None and depth > 0:
        if v.dtype is not None:
            return v.dtype if v.dtype.is_floating_point() else None
        p = v.producer()
        if p is None:
            return None
        if p.op_type == "Cast" and p.domain == "":
            t = ir.DataType(p.attributes["to"].value)
            return t if t.is_floating_point() else None
        if p.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin") or \
                p.op_type.startswith(("Equal", "Less", "Greater", "And", "Or", "Not", "Is")):
            return None
        for x in p.inputs:
            t = _float_type_of(x, depth - 1) if x is not None else None
            if t is not None:
                return t
        return None
    return None


def _signature(nodes) -> str:
    """The decomposition's node kinds, as a multiset."""
    return ",".join(sorted(n.op_type for n in nodes))


def _plain(a: ir.Attr):
    return [a.type.name, list(a.value) if isinstance(a.value, (list, tuple)) else a.value]


def _restore(name: str, plain) -> ir.Attr:
    kind, value = plain
    if kind == "INT":
        return ir.AttrInt64(name, int(value))
    if kind == "FLOAT":
        return ir.AttrFloat32(name, float(value))
    if kind == "STRING":
        return ir.AttrString(name, value)
    if kind == "INTS":
        return ir.AttrInt64s(name, [int(x) for x in value])
    if kind == "FLOATS":
        return ir.AttrFloat32s(name, [float(x) for x in value])
    raise UnsupportedModelError(f"a fused op's attribute {name} of type {kind} cannot be restored")


def refuse_form(node: ir.Node, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{node.op_type} {node.name}: {what}; lemon-onnx does not unfuse this form of the op.",
        hint="Expand the exporter's unoptimised .onnx, then run ONNX Runtime's optimizer on the "
             "expanded model.")


# --------------------------------------------------------------------------- the registry

def _modules():
    from . import activations, attention, embedding, gqa, norms

    return (norms, activations, attention, embedding, gqa)


def registry() -> dict[str, object]:
    """op_type -> the module that unfuses it (every module lists its ``OPS``)."""
    return {op.op_type: m for m in _modules() for op in m.OPS}


def fused_ops() -> dict[str, FusedOp]:
    """op_type -> its record in its module's ``OPS``."""
    return {op.op_type: op for m in _modules() for op in m.OPS}


def claimed() -> frozenset:
    return frozenset(registry())


# --------------------------------------------------------------------------- passes

@dataclasses.dataclass
class UnfuseResult(PassResult):
    ops: dict = dataclasses.field(default_factory=dict)  # op_type -> count


class UnfusePass(InPlacePass):
    """Replace every registered contrib op by its tagged standard-op decomposition."""

    def call(self, model: ir.Model) -> UnfuseResult:
        reg = registry()
        graph = model.graph
        counts: dict[str, int] = {}
        nodes = [n for n in graph if n.domain == MS and n.op_type in reg]
        if any(x is not None and x.dtype is None for n in nodes for x in n.inputs):
            # the optimizer's output often declares no intermediate types: infer them (the
            # contrib ops' own outputs stay undeclared; each decomposition types its outputs)
            from onnx_ir.passes.common import ShapeInferencePass

            ShapeInferencePass(strict_mode=False)(model)
        names = {n.name for n in graph}
        for gid, node in enumerate(nodes):
            module = reg[node.op_type]
            b = Builder(node, gid, dict(node.attributes), model.opset_imports.get("", 1), names,
                        graph)
            outs = module.decompose(b, node)  # {fused output index: value}
            for i, v in outs.items():  # all of them: a twin may read one the source did not
                b.port_out(v, i)
            for i, v in enumerate(node.outputs):
                if i not in outs and (v.uses() or v.is_graph_output()):
                    raise refuse_form(node, f"its output {i} ({v.name}) is used")
            outs = {i: v for i, v in outs.items() if i < len(node.outputs)}
            b.finish()
            graph.insert_before(node, b.nodes)
            for i, v in outs.items():
                old = node.outputs[i]
                new = v
                new.shape = new.shape or old.shape
                new.type = new.type or old.type
                if new.type is None and i == 0:
                    new.dtype = b.float_type()
                # the new value takes the old one's name (a graph output's, and any other:
                # layerwise verification asks the fused file for the names recognition saw)
                _take_place(graph, old, new)
            graph.remove(node, safe=True)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if counts:  # the fused ops come back after the passes
            model.opset_imports.setdefault(MS, 1)
        return UnfuseResult(model, modified=bool(counts), ops=counts)


def _take_place(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


@dataclasses.dataclass
class RefuseResult(PassResult):
    fused: dict = dataclasses.field(default_factory=dict)  # op_type -> groups fused again
    left: list = dataclasses.field(default_factory=list)  # reasons groups stayed decomposed


class RefusePass(InPlacePass):
    """Put one fused op back in place of every whole tagged group."""

    def call(self, model: ir.Model) -> RefuseResult:
        reg, ops = registry(), fused_ops()
        graph = model.graph
        fused: dict[str, int] = {}
        left: list[str] = []
        groups = _groups(graph)
        adopted = [g for g in groups if g.whole() is not None
                   and hasattr(reg[g.meta["op"]], "adopt") and reg[g.meta["op"]].adopt(g)]
        if adopted:
            groups = _groups(graph)
        for group in groups:
            meta = group.meta
            why = group.whole()
            if why is None:
                module = reg[meta["op"]]
                try:
                    _fuse(graph, group, module)
                except UnsupportedModelError as e:
                    why = str(e)
            if why is not None:
                if not ops[meta["op"]].leave_decomposed:
                    raise UnsupportedModelError(
                        f"{meta['op']} (group {meta['g']}) could not be fused again after the "
                        f"rewrite: {why}.  Its decomposition is exact only on the inputs the "
                        "checks feed, so lemon-onnx does not write it decomposed.",
                        hint="Expand the exporter's unoptimised .onnx, or report the model.")
                left.append(f"{meta['op']} (group {meta['g']}): {why}")
                for n in group.nodes:
                    n.metadata_props.pop(TAG, None)
                continue
            fused[meta["op"]] = fused.get(meta["op"], 0) + 1
        if fused:
            graph.sort()
        return RefuseResult(model, modified=bool(fused), fused=fused, left=left)


@dataclasses.dataclass
class Group:
    """The nodes of one decomposition (the source's, a twin's clone, or one the depth pass
    put together from two: a Skip norm's Adds ending one block and the norm starting the
    twin after it), in graph order."""
    nodes: list
    meta: dict  # the tag of the node that makes the fused op's first output
    parsed: dict  # node -> its tag, read once (``_groups``)

    def tags(self, n: ir.Node) -> dict:
        return self.parsed[n]

    def tag(self, n: ir.Node, k: int, wired: list, ins: list, outs: list, role: str) -> None:
        """Make ``n`` (a node the passes made, or a clone of another op's) node ``k`` of this
        group's decomposition."""
        meta = {key: self.meta[key] for key in ("g", "op", "dom", "attrs", "n", "sig", "nout")
                if key in self.meta}
        self.parsed[n] = {**meta, "r": role, "k": k, "e": wired, "in": ins, "out": outs}
        n.metadata_props[TAG] = json.dumps(self.parsed[n])

    def untag(self, n: ir.Node) -> None:
        n.metadata_props.pop(TAG, None)
        self.parsed.pop(n, None)

    def role(self, role: str) -> ir.Node | None:
        for n in self.nodes:
            if self.tags(n)["r"] == role:
                return n
        return None

    def whole(self) -> str | None:
        """None when the group is its decomposition, node for node and edge for edge (the
        passes changed weights and constants, nothing else); else why not."""
        if _signature(self.nodes) != self.meta["sig"]:
            return (f"its {len(self.nodes)} nodes after the passes are not the "
                    f"{self.meta['n']} of its decomposition")
        by_k = {self.tags(n)["k"]: n for n in self.nodes}
        if sorted(by_k) != list(range(self.meta["n"])):
            return "its nodes are not those of one decomposition"
        for n in self.nodes:
            t = self.tags(n)
            wired = {slot: (k, out) for slot, k, out in t["e"]}
            ports = {slot for slot, _ in t["in"]}
            for slot, x in enumerate(n.inputs):
                p = x.producer() if x is not None else None
                if slot in wired:
                    k, out = wired[slot]
                    if p is not by_k[k] or x.index() != out:
                        return f"{n.name} no longer reads its decomposition's node {k}"
                elif slot not in ports and p in by_k.values():
                    return f"{n.name} reads a node of the group it did not read"
        inside = set(self.nodes)
        outs = {(n, s) for n in self.nodes for s, _ in self.tags(n)["out"]}
        for n in self.nodes:
            for slot, v in enumerate(n.outputs):
                if (n, slot) in outs:
                    continue
                if v.is_graph_output() or any(u.node not in inside for u in v.uses()):
                    return f"{v.name} is read outside the group"
        return None


def _groups(graph: ir.Graph) -> list[Group]:
    """The tagged nodes joined along the edges inside a decomposition: node u feeds node v of
    the same fused op at a slot where v's decomposition read one of its own nodes.  (Tag ids
    are not used: a twin's clone carries its source's tags.)  A decomposition whose parts are
    not connected (a side output) is one group when its tag id is found only once."""
    tagged = [n for n in graph if TAG in n.metadata_props]
    tags = {n: json.loads(n.metadata_props[TAG]) for n in tagged}
    _unshare(graph, tags)
    tagged = list(tags)
    parent = {n: n for n in tagged}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for v_node in tagged:
        wired = {slot for slot, _, _ in tags[v_node]["e"]}
        for slot, x in enumerate(v_node.inputs):
            u = x.producer() if x is not None else None
            if u in tags and slot in wired and tags[u]["op"] == tags[v_node]["op"]:
                parent[find(u)] = find(v_node)
    comps: dict = {}
    for n in tagged:
        comps.setdefault(find(n), []).append(n)
    parts = list(comps.values())
    by_id: dict = {}
    for comp in parts:
        by_id.setdefault(tags[comp[0]]["g"], []).append(comp)
    groups = []
    for comps_of_id in by_id.values():
        nodes = [n for c in comps_of_id for n in c]
        meta = tags[nodes[0]]
        if len(comps_of_id) > 1 and _signature(nodes) == meta["sig"]:
            comps_of_id = [nodes]  # never cloned, parts not connected
        for comp in comps_of_id:
            first = next((n for n in comp if any(i == 0 for _, i in tags[n]["out"])), comp[0])
            groups.append(Group(comp, tags[first], tags))
    return groups


def _unshare(graph: ir.Graph, tags: dict) -> None:
    """A tagged node read by several copies of one consumer (a twin's clone reads what its
    source's decomposition computes outside the cloned block: a mask's Cast, a Constant):
    one copy of the node per reader, so that every group owns its nodes.  Consumers first
    (reverse graph order), so a copied node's producers are then shared in turn."""
    for u in reversed([n for n in graph if n in tags]):
        k = tags[u]["k"]
        for o, out in enumerate(u.outputs):
            # decomposition node k -> the readers standing for it, each with the slots it
            # reads ``out`` at (a node may read it twice: Concat(c, c))
            by_k: dict[int, dict] = {}
            for use in out.uses():
                v = use.node
                if v in tags and tags[v]["op"] == tags[u]["op"] and \
                        [use.idx, k, o] in tags[v]["e"]:
                    by_k.setdefault(tags[v]["k"], {}).setdefault(v, []).append(use.idx)
            extra = max((len(x) for x in by_k.values()), default=1)
            for j in range(1, extra):
                c = ir.Node(u.domain, u.op_type, list(u.inputs),
                            [copy_attr(a) for a in u.attributes.values()],
                            num_outputs=len(u.outputs), name=f"{u.name}__{j}",
                            metadata_props=dict(u.metadata_props))
                graph.insert_before(u, c)
                for a, b in zip(u.outputs, c.outputs):
                    b.type, b.shape = a.type, a.shape
                tags[c] = tags[u]
                for readers in by_k.values():
                    if len(readers) > j:
                        reader, slots = list(readers.items())[j]
                        for slot in slots:
                            reader.replace_input_with(slot, c.outputs[o])


def tagged_groups(graph: ir.Graph) -> dict:
    """{group key: (op_type, node)} of the unfused groups in ``graph``: the node that makes
    the fused op's first output."""
    return {k: (g.meta["op"], n) for k, g in enumerate(_groups(graph)) for n in g.nodes
            if any(i == 0 for _, i in g.tags(n)["out"])}


def _fuse(graph: ir.Graph, group: Group, module) -> None:
    meta = group.meta
    ins: dict[int, ir.Value] = {}
    outs: dict[int, ir.Value] = {}
    for n in group.nodes:
        t = group.tags(n)
        for slot, i in t["in"]:
            v = n.inputs[slot]
            if i in ins and ins[i] is not v:
                raise UnsupportedModelError(f"its input {i} is no longer one value")
            ins[i] = v
        for slot, i in t["out"]:
            outs[i] = n.outputs[slot]
    attrs = {k: _restore(k, p) for k, p in meta["attrs"].items()}
    if hasattr(module, "fused_attrs"):
        attrs = module.fused_attrs(group, attrs, ins)
    if hasattr(module, "fused_inputs"):  # a packed input rebuilt from its widened pieces
        ins = module.fused_inputs(group, ins, graph)
    n_in = max(ins) + 1 if ins else 0
    n_out = max(max(outs) + 1, meta.get("nout", 0))  # the op's outputs, used or not
    node = ir.Node(meta["dom"], meta["op"], [ins.get(i) for i in range(n_in)],
                   list(attrs.values()),
                   num_outputs=n_out, name=_fused_name(group.nodes[-1].name))
    graph.insert_after(group.nodes[-1], node)  # RefusePass sorts the graph once at the end
    for i, v in outs.items():
        new = node.outputs[i]
        new.shape, new.type = v.shape, v.type
        _take_place(graph, v, new)
    graph.remove(group.nodes, safe=True)


def _fused_name(name: str) -> str:
    """The fused op's name from a decomposed node's (``op/unfused/Add_3``, or a twin's clone
    ``op/unfused/Add_3__twin1``): ``op``, with the clone's suffix."""
    base, _, rest = (name or "").partition("/unfused/")
    return base + (rest[rest.index("__"):] if "__" in rest else "")


def fused_joins(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """(graph input, graph output) for every cache a fused op joins itself (a
    GroupQueryAttention's past key in, present key out): the pairs ``components.cache.
    find_joins`` finds by their ``Concat`` in an unfused graph."""
    ops = fused_ops()
    inputs, outputs = set(graph.inputs), set(graph.outputs)
    pairs = []
    for n in graph:
        op = ops.get(n.op_type) if n.domain == MS else None
        for i, o in (op.joins if op is not None else {}).items():
            if i < len(n.inputs) and o < len(n.outputs) and n.inputs[i] in inputs \
                    and n.outputs[o] in outputs:
                pairs.append((n.inputs[i], n.outputs[o]))
    return pairs


def unpadded_decoding(graph: ir.Graph) -> str | None:
    """The first fused op in ``graph`` (fused, or unfused and tagged) whose decomposition is
    exact in cached decoding only when every row has the same length
    (``FusedOp.leave_decomposed`` false); None when there is none."""
    ops = fused_ops()
    for n in graph:
        op = n.op_type if n.domain == MS else None
        if op is None and TAG in n.metadata_props:
            op = json.loads(n.metadata_props[TAG])["op"]
        if op in ops and not ops[op].leave_decomposed:
            return op
    return None


def unfuse(model: ir.Model) -> UnfuseResult:
    """Unfuse every registered contrib op; refuse (exit 2) a contrib op no module knows."""
    layouts = sorted({f"{n.domain}:{n.op_type}" for n in model.graph
                      if n.domain.startswith(MS + ".")})
    if layouts:
        raise UnsupportedModelError(
            "This graph holds ONNX Runtime's hardware-specific ops (" + ", ".join(layouts)
            + "), written when a session saves its optimised graph at the 'all' level; they "
            "are tied to this machine's kernels and lemon-onnx does not rewrite them.",
            hint="Save the optimised model at opt_level 1 or 2 (ORT_ENABLE_EXTENDED), or "
                 "expand the exporter's .onnx.")
    unknown = sorted({n.op_type for n in model.graph if n.domain == MS} - claimed())
    if unknown:
        raise UnsupportedModelError(
            "This graph holds ONNX Runtime contrib ops (com.microsoft) lemon-onnx does not "
            "unfuse: " + ", ".join(unknown) + ".",
            hint="Expand the exporter's unoptimised .onnx, then run ONNX Runtime's optimizer on "
                 "the expanded model.")
    return UnfusePass()(model)

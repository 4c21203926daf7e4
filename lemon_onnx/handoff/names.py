"""PyTorch parameter names for the tensors of a recognised (expanded) graph.

Every tensor the description knows is a *slot*: a role (``block.attention.q.weight``), the block
it belongs to (its position in the expanded graph, which is the new layer order), the
initializer and the node that reads it for that role.  Its name is recovered, in this order:

1. the initializer's own name, where the exporter kept the parameter's name (``model.model.
   layers.0.input_layernorm.weight``) -- unless the node reading it sits in an unrelated module:
   exporters merge equal-valued tensors (one zero bias serving every layer) and keep a tie as
   one tensor under one of its names, so the name then belongs to another role;
2. ``pkg.onnxscript.optimizer.folded_from`` on the initializer (dynamo: a weight whose transpose
   was folded names the parameter it came from), with the same check;
3. the module of the node that reads it: dynamo's ``pkg.torch.onnx.name_scopes`` (or
   ``namespace``), or TorchScript's node name (``/model/layers.0/self_attn/q_proj/MatMul``),
   plus the role's parameter (``weight``, ``bias``).  TorchScript scopes are relative to the
   exported module's child, so they are first aligned with the initializer names;
Nothing is inferred from shapes.  A tensor none of these names is an error that names it.

Then each block's names get the block's new index: twin blocks carry their source block's
names, and original blocks moved when twins were spliced in.

This is the hand-off's fallback where transformers cannot be imported (``export.py``): the
names are the exporter's, wrapper prefix included, and the folder is not verified.  With
transformers, the names come from the target architecture itself (``probe.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import Counter

import onnx_ir as ir

from ..graph import const_tensor
from ..recognize import Linear, ModelDescription, Norm, const_source
from .errors import HandoffError

#: suffixes lemon-onnx's passes (and the recogniser's node naming) append to copied names
_LEMON_SUFFIX = re.compile(r"__(twin\d+_b\d+|lemon\w*|identity\d+|before_\w+).*$")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def base_name(name: str) -> str:
    return _LEMON_SUFFIX.sub("", name)


def param_like(name: str) -> bool:
    """A dotted module path (``a.b.0.weight``), not an exporter's ``val_12`` / ``onnx::MatMul_3``."""
    return bool(_PARAM.fullmatch(name))


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


@dataclasses.dataclass
class Slot:
    role: str  # "block.attention.q.weight", "embeddings.token", "head.weight", ...
    value: ir.Value  # the initializer
    consumer: ir.Node | None  # the node that reads it in this role
    leaf: str | None  # the parameter's name in its module, when the role says it
    block: int | None = None  # position in the expanded graph
    layout: str | None = None  # linear weights: "in,out" | "out,in" as the op reads them
    name: str = ""
    source: str = ""  # initializer | folded_from | node | structure
    verbatim: bool = False  # the stored tensor is the parameter itself (not a folded copy)
    module_class: str | None = None  # the consumer's module class (dynamo metadata)
    parts: list | None = None  # a fused tensor split back: [(name, start, stop)] on the out axis


# ----------------------------------------------------------------------- node scopes
def _scope_dynamo(node: ir.Node) -> tuple[str, str | None] | None:
    md = node.metadata_props
    scopes = md.get("pkg.torch.onnx.name_scopes")
    classes = md.get("pkg.torch.onnx.class_hierarchy")
    if scopes:
        try:
            s = ast.literal_eval(scopes)
            c = ast.literal_eval(classes) if classes else []
        except (ValueError, SyntaxError):
            s, c = [], []
        if len(s) >= 2:
            return s[-2], (c[-2] if len(c) == len(s) else None)  # the last entry is the op
    ns = md.get("namespace")
    if ns:
        pairs = [p.split(": ", 1) for p in ns.split("/") if ": " in p]
        if len(pairs) >= 2:
            return pairs[-2][0].strip(), pairs[-2][1].strip()
    return None


def _scope_torchscript(node: ir.Node) -> str | None:
    name = base_name(node.name or "")
    if not name.startswith("/"):
        return None
    parts = name.split("/")[1:-1]
    return ".".join(parts) if parts else None


class NameResolver:
    def __init__(self, desc: ModelDescription, graph: ir.Graph):
        self.desc, self.graph = desc, graph
        self.nodes = {n.name: n for n in graph}
        self.values = dict(graph.initializers)
        for n in graph:  # Constant nodes' outputs can hold parameters too
            for o in n.outputs:
                self.values.setdefault(o.name, o)
        self.notes: list[str] = []

    # ------------------------------------------------------------------ collecting slots
    def slots(self) -> list[Slot]:
        d = self.desc
        out: list[Slot] = []
        e = d.embeddings
        if e.token:
            out.append(self._slot("embeddings.token", e.token, self.nodes.get(e.token_node), "weight"))
        for role, name in (("embeddings.position", e.position),
                           ("embeddings.token_type", e.token_type),
                           ("embeddings.cls_token", e.cls_token)):
            if name:
                node = self._reader(self.values[name])
                # an nn.Embedding is read by a Gather; a bare parameter by the module's own op
                leaf = "weight" if node is not None and node.op_type == "Gather" else None
                out.append(self._slot(role, name, node, leaf))
        if e.patch_conv:
            conv = self.nodes[e.patch_conv]
            out.append(self._slot("embeddings.patch.weight", e.patch_weight, conv, "weight"))
            if e.patch_bias:
                out.append(self._slot("embeddings.patch.bias", e.patch_bias, conv, "bias"))
        out += self._norm("embeddings.norm", e.norm)
        for pos, b in enumerate(d.blocks):
            mine: list[Slot] = []
            a, m = b.attention, b.mlp
            mine += self._norm("block.attention_norm", b.attention_norm)
            for role, lin in (("q", a.q), ("k", a.k), ("v", a.v), ("qkv", a.qkv), ("out", a.out)):
                mine += self._linear(f"block.attention.{role}", lin)
            mine += self._norm("block.attention_post_norm", b.attention_post_norm)
            mine += self._norm("block.mlp_norm", b.mlp_norm)
            for role, lin in (("gate", m.gate), ("up", m.up), ("down", m.down)):
                mine += self._linear(f"block.mlp.{role}", lin)
            mine += self._norm("block.mlp_post_norm", b.mlp_post_norm)
            for role, node_name in (("block.attention_scale", b.attention_scale),
                                    ("block.mlp_scale", b.mlp_scale)):
                if node_name:
                    node = self.nodes[node_name]
                    src = next(const_source(i)[0] for i in node.inputs
                               if const_source(i)[0] is not None)
                    mine.append(Slot(role, src, node, None))
            for s in mine:
                s.block = pos
            out += mine
        out += self._norm("final_norm", d.final_norm)
        h = d.head
        if h.linear is not None:
            out += self._linear("head.transform", h.transform)
            out += self._norm("head.transform_norm", h.transform_norm)
            out += [s for s in self._linear("head", h.linear)
                    if not (h.tie and s.role == "head.weight")]  # a tie stays one tensor
        for k, x in enumerate(d.extra_heads):
            out += self._linear(f"extra_head{k}", x.linear)
        return out

    def _slot(self, role: str, name: str, node: ir.Node | None, leaf: str | None,
              layout: str | None = None) -> Slot:
        return Slot(role, self.values[name], node, leaf, layout=layout)

    def _reader(self, v: ir.Value) -> ir.Node | None:
        """The first node that computes with ``v`` (past Identity/Cast/Transpose hops)."""
        seen = 0
        while seen < 8:
            uses = list(v.uses())
            if not uses:
                return None
            node = uses[0].node
            if node.op_type in ("Identity", "Cast", "Transpose") and len(uses) == 1:
                v = node.outputs[0]
                seen += 1
                continue
            return node
        return None

    def _linear(self, role: str, lin: Linear | None) -> list[Slot]:
        if lin is None:
            return []
        out = [self._slot(f"{role}.weight", lin.weight, self.nodes[lin.node], "weight",
                          lin.weight_layout)]
        if lin.bias:
            out.append(self._slot(f"{role}.bias", lin.bias, self.nodes[lin.bias_node], "bias"))
        return out

    def _norm(self, role: str, nrm: Norm | None) -> list[Slot]:
        if nrm is None:
            return []
        out = []
        nodes = [self.nodes[n] for n in nrm.nodes if n in self.nodes]
        for suffix, name in (("weight", nrm.gamma), ("bias", nrm.beta)):
            if not name:
                continue
            v = self.values[name]
            reader = next((n for n in nodes if any(const_source(i)[0] is v for i in n.inputs
                                                   if i is not None)), None)
            out.append(self._slot(f"{role}.{suffix}", name, reader, suffix))
        return out

    # ------------------------------------------------------------------ naming
    def resolve(self) -> list[Slot]:
        slots = self.slots()
        ts_prefix = self._align_torchscript(slots)
        for s in slots:
            self._name(s, ts_prefix)
        self._renumber(slots)
        seen: dict[str, Slot] = {}
        for s in slots:
            for name in ([p[0] for p in s.parts] if s.parts else [s.name]):
                if name in seen:
                    raise HandoffError(
                        f"two tensors got the PyTorch name {name}: {seen[name].value.name} "
                        f"({seen[name].role}) and {s.value.name} ({s.role}).",
                        hint="The graph's names are inconsistent; install torch and "
                             "transformers, which name the tensors from the architecture.")
                seen[name] = s
        return slots

    def _module_of(self, node: ir.Node | None, ts_prefix: str) -> tuple[str | None, str | None, str]:
        """(module path in the initializers' namespace, module class, where from)."""
        if node is None:
            return None, None, ""
        dyn = _scope_dynamo(node)
        if dyn is not None and dyn[0]:
            return dyn[0], dyn[1], "node metadata"
        ts = _scope_torchscript(node)
        if ts is not None:
            return ts_prefix + ts, None, "node name"
        return None, None, ""

    def _align_torchscript(self, slots: list[Slot]) -> str:
        """TorchScript's scopes omit the exported module's own attribute names (a wrapper's
        ``model.``); the prefix that maps them onto the initializer names, by majority over
        the tensors that have both."""
        votes: Counter = Counter()
        for s in slots:
            if s.consumer is None or _scope_dynamo(s.consumer) is not None:
                continue
            ts = _scope_torchscript(s.consumer)
            name = base_name(s.value.name)
            if ts is None or not param_like(name):
                continue
            mod = _module(name)
            if mod == ts:
                votes[""] += 1
            elif mod.endswith("." + ts):
                votes[mod[: len(mod) - len(ts)]] += 1
        return votes.most_common(1)[0][0] if votes else ""

    def _name(self, s: Slot, ts_prefix: str) -> None:
        module, cls, where = self._module_of(s.consumer, ts_prefix)
        s.module_class = cls
        own = base_name(s.value.name)
        folded = self._folded_from(s.value)

        def agrees(name: str) -> bool:
            m = _module(name)
            return module is None or m == module or module.startswith(m + ".")

        if param_like(own) and agrees(own):
            s.name, s.source = own, "initializer"
        elif folded and agrees(folded):
            s.name, s.source = folded, "folded_from"
        elif module and s.leaf:
            s.name, s.source = f"{module}.{s.leaf}", where
        else:
            s.name, s.source = self._structure(s), "structure"
        # a named initializer is a parameter stored as PyTorch stores it, whichever role's
        # name it ends up with (a tie, or equal values merged by the exporter)
        s.verbatim = param_like(own)

    @staticmethod
    def _folded_from(v: ir.Value) -> str | None:
        text = v.metadata_props.get(FOLDED_FROM) if v.metadata_props else None
        if not text:
            return None
        try:
            names = [n for n in ast.literal_eval(text) if isinstance(n, str) and param_like(n)]
        except (ValueError, SyntaxError):
            return None
        return names[0] if len(names) == 1 else None

    def _structure(self, s: Slot) -> str:
        raise HandoffError(
            f"cannot recover the PyTorch name of tensor {s.value.name} ({s.role}"
            + (f", block {s.block}" if s.block is not None else "") + ") from the graph: the "
            "initializer has no parameter name and no node reading it carries a module scope "
            "(pkg.torch.onnx.name_scopes, namespace or a TorchScript node name).",
            hint="Install torch and transformers: export-torch then names every tensor from "
                 "the target architecture itself.")

    # ------------------------------------------------------------------ namespace
    def _renumber(self, slots: list[Slot]) -> None:
        """Block names read from the graph carry the source block's index (a twin has its
        source's names): the last index in the block's common module prefix becomes the
        block's position."""
        by_block: dict[int, list[Slot]] = {}
        for s in slots:
            if s.block is not None and s.source != "structure":
                by_block.setdefault(s.block, []).append(s)
        for pos, mine in by_block.items():
            parts = [s.name.split(".")[:-1] for s in mine]
            common = parts[0]
            for p in parts[1:]:
                k = 0
                while k < min(len(common), len(p)) and common[k] == p[k]:
                    k += 1
                common = common[:k]
            idx = max((k for k, c in enumerate(common) if c.isdigit()), default=None)
            if idx is None:
                raise HandoffError(
                    f"block {pos}: its tensors' names ({', '.join(s.name for s in mine[:3])}"
                    f"{' ...' if len(mine) > 3 else ''}) share no layer index, so the block "
                    "cannot be renumbered.",
                    hint="Install torch and transformers: export-torch then names every "
                         "tensor from the target architecture itself.")
            for s in mine:
                comps = s.name.split(".")
                comps[idx] = str(pos)
                s.name = ".".join(comps)


def graph_tensors(desc: ModelDescription, graph: ir.Graph) -> tuple[list, list[str]]:
    """[(name, produce, dtype, shape, entry)] for every recognised tensor, named from the
    graph (this module's rules), and the resolver's notes."""
    import numpy as np

    resolver = NameResolver(desc, graph)
    out = []
    for s in resolver.resolve():
        t = const_tensor(s.value)
        dtype, shape = t.dtype.numpy(), tuple(int(d) for d in t.shape)
        # a kept parameter is stored as PyTorch stores it; a folded linear weight as the op
        # reads it ([in, out]), which nn.Linear stores as [out, in] (GPT-2's Conv1D: [in, out])
        conv1d = (s.module_class or "").endswith("Conv1D")
        transpose = (s.layout is not None and not s.verbatim
                     and s.layout != ("in,out" if conv1d else "out,in"))

        def produce(t=t, transpose=transpose):
            a = np.asarray(t.numpy())
            return a.T if transpose else a

        out.append((s.name, produce, dtype, shape[::-1] if transpose else shape,
                    {"role": s.role, "block": s.block, "onnx": s.value.name,
                     "name_from": s.source, "form": "transposed" if transpose else "as stored"}))
    return out, resolver.notes

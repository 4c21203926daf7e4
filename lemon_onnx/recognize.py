"""Recognise an exported Transformer: a typed, serialisable description of the graph.

Recognition is organised by component (``components/``): embeddings, norms, linear layers,
attention, MLP, the residual topology that pairs branches into blocks, and heads.  Each
component module matches its part of the graph and returns a typed description of it (or
raises a mismatch with the reason and the value at fault); this module runs them in order and
assembles the ``ModelDescription``, the only thing the passes read.

Everything is found by structure and shape reasoning (``dims.AxisAnalysis``); no initializer
or node name is ever read for meaning, and no number is searched for.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir

from . import dims, fusion
from .components import cache, embedding, head as head_c, linear, norm, residual
from .components.attention import Attention
from .components.embedding import Embeddings
from .components.head import Head
from .components.linear import Linear
from .components.mlp import MLP
from .components.norm import NORM_OPS, Norm
from .components.residual import Block
from .errors import UnsupportedModelError
from .graph import (GraphIndex, back_pass, forget_shapes_inferred, back_view, const_array, const_source, is_const,
                    scalar_const, shape_of, skip_pass)

__all__ = ["Attention", "Block", "Embeddings", "Head", "Linear", "MLP", "ModelDescription",
           "Norm", "Recognizer", "SizeLiteral", "back_pass", "back_view", "const_array",
           "const_source", "is_const", "recognize", "scalar_const", "skip_pass"]


# --------------------------------------------------------------------------- description types

@dataclasses.dataclass
class SizeLiteral:
    where: list  # ["value", tensor, index] | ["node", Constant node, index] | ["attr", node, attr, i]
    value: int
    label: str
    consumer: str
    op: str
    via: list | None = None  # [node, input index]: the node that reads the constant



@dataclasses.dataclass
class ModelDescription:
    family: str
    layout: str  # pre-norm | post-norm
    norm_type: str  # layernorm | rmsnorm
    norm_form: str  # op | decomposed | skip
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int | None
    tie: str | None
    activation: str
    gated_mlp: bool
    rotary: bool
    embeddings: Embeddings
    blocks: list
    final_norm: Norm | None
    head: Head
    inputs: list
    outputs: list  # [{name, shape, kind}] kind: hidden | logits | cache | other
    size_literals: list
    shared_initializers: dict  # name -> number of consuming nodes (exporter dedup)
    unrecognised: list
    opset: int
    ir_version: int
    producer: str
    lemon_plan: dict | None = None  # present when the model was expanded by lemon-onnx
    extra_heads: list = dataclasses.field(default_factory=list)  # poolers, second classifiers
    blockers: list = dataclasses.field(default_factory=list)  # why expand must refuse
    #: the KV cache of a decoder exported for generation: one slot per cache input/output
    caches: list = dataclasses.field(default_factory=list)
    #: ONNX Runtime's fused ops the graph held, unfused for recognition and fused again after
    #: the passes (``fusion``): {"block 0": {op: count}, ..., "outside blocks": {...}}
    fused: dict = dataclasses.field(default_factory=dict)
    #: what size each atom of the shape reasoning is (``dims.Roles``: hidden, heads, kv_heads,
    #: head_dim, ffn, vocab, ...), named by the components as they matched; the width pass
    #: lays axes out by it.  In memory only: ``to_dict`` leaves it out
    roles: dims.Roles = dataclasses.field(default_factory=dims.Roles, repr=False,
                                          compare=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(dataclasses.replace(self, roles=None))
        del out["roles"]
        return out

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def config(self) -> dict:
        return {k: getattr(self, k) for k in (
            "num_layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "tie")}



class Recognizer(GraphIndex):
    """Runs the components over one graph and assembles the description."""

    def __init__(self, model: ir.Model):
        _refuse_hidden_reads(model.graph)
        _refuse_quantised(model.graph)
        #: ONNX Runtime's fused ops, unfused in place (``fusion``): the components see their
        #: standard-op form; op_type -> count
        self.unfused = fusion.unfuse(model).ops
        #: token tables stored transposed, put back in (vocab, hidden) form (``embedding``)
        self.untransposed = embedding.untranspose_tables(model)
        if self.unfused or self.untransposed:
            forget_shapes_inferred(model)
        super().__init__(model)
        self.notes: list[str] = []

    def run(self) -> ModelDescription:
        self.linears = linear.match_all(self)
        self.lin_by_out = {self.values[l.output]: l for l in self.linears.values()}
        self.norms = norm.match_all(self)
        self.norm_by_in: dict[ir.Value, list[Norm]] = defaultdict(list)
        for nv, nrm in self.norms.items():
            self.norm_by_in[self.values[nrm.input]].append(nrm)

        emb = embedding.match(self)
        residuals = residual.match_residuals(self)
        if not residuals:
            found = (f"a token embedding ({emb.token})" if emb.token else
                     f"a Conv on the input ({emb.patch_conv})")
            raise UnsupportedModelError(
                f"Found {found}, {len(self.linears)} linear layer(s) and {len(self.norms)} "
                "normalisation layer(s), but no residual connection (an Add that joins a branch "
                "with a linear layer back onto its input), so this is not a Transformer "
                "lemon-onnx can expand (BERT, GPT-2, ViT and Llama families are supported).")
        blocks, stream_end, layout = residual.match_blocks(self, emb, residuals)
        final_norm = None
        if layout == "pre-norm":
            cands = self.norm_by_in.get(stream_end, [])
            final_norm = cands[0] if cands else None
        head_in = self.values[final_norm.output] if final_norm else stream_end
        head, extra = head_c.match(self, head_in, emb)
        desc = self.describe(emb, blocks, final_norm, head, layout)
        desc.extra_heads = extra
        desc.blockers = self._blockers(emb, blocks, [head] + extra)
        desc.unrecognised += desc.blockers
        desc.caches = cache.match(self, blocks)  # a decoder's KV cache (components/cache.py)
        for o in desc.outputs:
            if any(o["name"] == s.output for s in desc.caches):
                o["kind"] = "cache"
        return desc

    def _blockers(self, emb, blocks, heads) -> list[str]:
        """Linear layers that are neither in a block nor a head: expanding around them would
        break them, so ``expand`` refuses (``inspect`` lists them)."""
        known = {emb.projection.node} if emb.projection is not None else set()
        for b in blocks:
            a, m = b.attention, b.mlp
            known |= {l.node for l in (a.q, a.k, a.v, a.qkv, a.out, m.up, m.gate, m.down) if l}
            x = b.cross_attention
            if x is not None:
                known |= {l.node for l in (x.q, x.k, x.v, x.out) if l}
        for h in heads:
            known |= {l.node for l in (h.linear, h.transform) if l}
        found = [f"linear {lin.node} [{lin.in_features}->{lin.out_features}] (weight "
                 f"{lin.weight}) is neither part of a block nor a head reading the final stream"
                 for lin in self.linears.values() if lin.node not in known]
        if found and blocks:
            # the chain of blocks stopped early: name what reads the stream where it stopped
            # (an operator between two blocks that no component recognises)
            last = self.values.get(blocks[-1].output)
            ops = sorted({f"{u.node.op_type} {u.node.name}" for u in (last.uses() if last else [])
                          if u.node.op_type not in NORM_OPS})
            if ops:
                found.insert(0, f"the stream leaving block {blocks[-1].index} "
                                f"({blocks[-1].output}) is read by {', '.join(ops[:4])}, which "
                                "no component recognises as the next block, a norm or the head")
        return found

    def describe(self, emb, blocks, final_norm, head, layout) -> ModelDescription:
        g = self.graph
        hid = embedding.hidden_leaves(self, emb)
        for a in hid:
            # a graph that reshapes the attention's output to the stream's own width (CLIP:
            # ``reshape(hidden_states.shape)``) ties the stream to heads x head_dim: those
            # atoms keep their names, and the plan keeps hidden = heads x head_dim
            self.roles.name(a, "hidden")
        if emb.token:
            for a in dims.leaves(self.ax.axes[self.values[emb.token]][0]):
                self.roles.name(a, "vocab")
        stream_ax = self.ax.get(self.values[emb.output]) if emb.output else None
        if stream_ax and len(stream_ax) == 3:
            for a in dims.leaves(stream_ax[1]):
                if a.size is not None:
                    self.roles.name(a, "tokens")  # a static sequence (ViT: patches + cls)
        if emb.patch_conv:
            conv_out = self.ax.get(self.node(emb.patch_conv).outputs[0]) or []
            for k, ax in enumerate(conv_out[2:]):
                for a in dims.leaves(ax):
                    self.roles.name(a, ("patch_rows" if k == 0 else "patch_cols"))
        embedding.match_extras(self, emb)
        b0 = blocks[0]
        att = b0.attention
        nrm = b0.attention_norm or b0.attention_post_norm or final_norm
        ffn = b0.mlp.down.in_features
        vocab = int(self.values[emb.token].const_value.shape[0]) if emb.token else None
        if head.linear is not None and head.kind == "classifier":
            for a in self.leaves(self.values[head.linear.output]):
                self.roles.name(a, "num_labels")
        literals = self.size_literals()
        shared = {}
        for v in g.initializers.values():
            n = len(v.uses())
            if n > 1:
                shared[v.name] = n
        inputs = [{"name": v.name, "dtype": str(v.dtype), "shape": shape_of(v)} for v in g.inputs]
        hid_size = int(np.prod([a.size for a in hid]))
        outputs = []
        for v in g.outputs:
            lv = self.leaves(v)
            kind = "hidden" if lv and lv == hid else ("logits" if head.linear is not None and
                                                      back_pass(v) is self.values[head.linear.output]
                                                      else "other")
            outputs.append({"name": v.name, "shape": shape_of(v), "kind": kind})
        unrec = list(self.notes)
        if self.ax.conflicts:
            unrec += [f"shape reasoning conflict: {c}" for c in self.ax.conflicts[:10]]
        for u in self.ax.unexplained:
            unrec.append(f"integer literal {u.value} at {u.ref} in {u.op} {u.node}: not explained "
                         "by any size")
        family = self._family(layout, nrm, b0, emb, head)
        opset = g.opset_imports.get("", 0)
        self.roles.check()  # the table the passes read: every named atom still findable
        return ModelDescription(
            family=family, layout=layout, norm_type=nrm.kind if nrm else "none",
            norm_form=nrm.form if nrm else "none", num_layers=len(blocks), hidden=hid_size,
            heads=att.heads, kv_heads=att.kv_heads, head_dim=att.head_dim, ffn=ffn, vocab=vocab,
            tie=head.tie, activation=b0.mlp.activation, gated_mlp=b0.mlp.gate is not None,
            rotary=att.rotary, embeddings=emb, blocks=blocks, final_norm=final_norm, head=head,
            inputs=inputs, outputs=outputs, size_literals=literals, shared_initializers=shared,
            unrecognised=unrec, opset=int(opset), ir_version=int(self.model.ir_version),
            producer=f"{self.model.producer_name or ''} {self.model.producer_version or ''}".strip(),
            lemon_plan=_plan_of(self.model), fused=self._fused_by_block(blocks),
            roles=self.roles)

    def _fused_by_block(self, blocks) -> dict:
        """The unfused ops per block (a group counts for the block whose nodes hold it)."""
        if not self.unfused:
            return {}
        from .graph import data_ancestors

        groups = fusion.tagged_groups(self.graph)
        out: dict = {}
        placed: set = set()
        for b in blocks:
            region = data_ancestors(self.values[b.output]) - data_ancestors(self.values[b.input])
            for key, (op, node) in groups.items():
                if key not in placed and node in region:
                    placed.add(key)
                    ops = out.setdefault(f"block {b.index}", {})
                    ops[op] = ops.get(op, 0) + 1
        for key, (op, _) in groups.items():
            if key not in placed:
                ops = out.setdefault("outside blocks", {})
                ops[op] = ops.get(op, 0) + 1
        return out

    def _family(self, layout, nrm, b0, emb, head) -> str:
        if emb.patch_conv:
            return "vit"
        if layout == "post-norm":
            return "bert"
        if nrm is not None and nrm.kind == "rmsnorm":
            return "llama"
        if b0.attention.qkv is not None:
            return "gpt2"
        return "pre-norm transformer"

    def size_literals(self) -> list:
        groups = [(name, [dims.find(a) for a in grp]) for name, grp in self.size_groups
                  if len(grp) > 1]
        return [SizeLiteral(list(lu.ref), lu.value, label_with_groups(dims.leaves(lu.atoms), groups,
                                                              self.roles),
                            lu.node, lu.op, list(lu.via) if lu.via else None)
                for lu in self.ax.literals]


def label_with_groups(lv: list, groups: list, roles: dims.Roles) -> str:
    """Name the atoms; a run of atoms that makes up a whole named group gets the group's name."""
    names = []
    i = 0
    while i < len(lv):
        for name, grp in groups:
            if lv[i:i + len(grp)] == [dims.find(a) for a in grp]:
                names.append(name)
                i += len(grp)
                break
        else:
            a = lv[i]
            names.append(roles.of(a) or (f"?{a.size}" if a.sym is None else a.sym))
            i += 1
    return "*".join(names) if names else "1"



def _plan_of(model: ir.Model) -> dict | None:
    text = model.metadata_props.get("lemon.plan")
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None



#: operators of quantised graphs (ONNX's and ONNX Runtime's): integer weights, their scales and
#: zero points, and the kernels that compute with them
QUANTISED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "ConvInteger", "QLinearMatMul", "QLinearConv", "QLinearAdd", "QLinearMul", "QGemm",
    "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention",
    "GatherBlockQuantized", "MatMulBnb4", "QOrderedMatMul", "QOrderedAttention",
    "DynamicQuantizeLSTM",
})


def _refuse_quantised(graph: ir.Graph) -> None:
    """A quantised graph (integer weights with scales, or kernels that take them): the exact
    splits of an expansion are not on the quantisation grid, so expanding it would either
    change its numbers or its quantisation.  Refused (exit 2), naming the ops."""
    found: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in QUANTISED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    if found:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(found.items()))
        raise UnsupportedModelError(
            f"This graph is quantised ({ops}); lemon-onnx expands float models (float32, "
            "float16, bfloat16): the new weights of a lossless expansion are exact splits "
            "of the old ones, which a quantisation grid does not hold. Nothing was written.",
            hint="Expand the float model, then quantise the expanded model (for example "
                 "onnxruntime.quantization.quantize_dynamic).")


def _refuse_hidden_reads(graph: ir.Graph) -> None:
    """Control flow (If, Loop, Scan) whose subgraph reads values of the main graph: the
    components and the passes see the main graph only, so those reads are uses nobody
    accounts for (a subgraph's Add taken for a bias, a weight widened under a reader that is
    not rewritten).  Refused (exit 2), naming the node (found by tests/test_fuzz.py: exit 4).
    A subgraph that reads only its own inputs is an operator like another: the closed world
    refuses it where it meets a size the expansion changes.  A merged decoder's If never
    comes here: ``merged.py`` splits it into its two decoders first."""
    hidden = []
    for node in graph:
        reads = set()
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = list(attr.as_graphs())
            else:
                continue
            for sub in subs:
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    reads |= {v.name for v in inner.inputs if v is not None and v.graph is graph}
                reads |= {v.name for v in sub.outputs if v.graph is graph}
        if reads:
            hidden.append((node, sorted(reads)))
    if hidden:
        node, reads = hidden[0]
        more = f" (and {len(hidden) - 1} other control-flow node(s))" if len(hidden) > 1 else ""
        raise UnsupportedModelError(
            f"operator {node.op_type} {node.name or '(unnamed)'} is control flow whose subgraph "
            f"reads {len(reads)} value(s) of the main graph ({', '.join(reads[:3])}"
            f"{', ...' if len(reads) > 3 else ''}){more}; lemon-onnx analyses and rewrites the "
            "main graph only, so it cannot tell how the subgraph uses the sizes an expansion "
            "changes. Nothing was written.",
            hint="Export the model without control flow (a fixed-shape export, or the "
                 "exporter's option to unroll loops and fold conditions).")


def recognize(model: ir.Model) -> ModelDescription:
    """Describe ``model`` (an onnx-ir Model).  Raises UnsupportedModelError with a reason."""
    return Recognizer(model).run()

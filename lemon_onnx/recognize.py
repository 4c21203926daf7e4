"""Recognise an exported Transformer: a typed, serialisable description of the graph.

Everything is found by structure and shape reasoning (``dims.AxisAnalysis``):
- norms: LayerNormalization / RMSNormalization / SkipLayerNormalization ops, or their
  decomposed forms (ReduceMean, Sub, Pow, Add(eps), Sqrt, Div/Reciprocal, Mul(gamma), Add(beta));
- linears: MatMul or Gemm with a constant 2-D weight, plus an optional constant bias Add;
- the residual stream: Adds of two computed tensors where one side is computed from the other
  through a branch that contains a linear; blocks are consecutive (attention, MLP) pairs;
- attention: the score MatMul feeding Softmax (or an ONNX ``Attention`` op); Q, K and V are
  the projections that reach its inputs; heads and head_dim are the atoms of the score's axes;
- every literal that encodes a size, labelled with the sizes it is made of.
No initializer name is ever read for meaning, and no number is searched for.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from . import dims
from .errors import UnsupportedModelError


# --------------------------------------------------------------------------- description types
@dataclasses.dataclass
class Linear:
    node: str
    op: str  # MatMul | Gemm
    input: str
    output: str  # after the bias, if any
    weight: str  # initializer name
    weight_layout: str  # "in,out" (MatMul/Gemm) or "out,in" (Gemm transB=1, or a Transpose)
    in_features: int
    out_features: int
    bias: str | None = None
    bias_node: str | None = None
    weight_via: str | None = None  # a Transpose/Identity node between initializer and MatMul


@dataclasses.dataclass
class Norm:
    kind: str  # layernorm | rmsnorm
    form: str  # op | decomposed | skip
    input: str
    output: str
    gamma: str | None
    beta: str | None
    epsilon: float
    epsilon_at: list  # ["attr", node, "epsilon"] or ["value", name] or ["node", name]
    nodes: list


@dataclasses.dataclass
class Attention:
    expressed: str  # decomposed | onnx-attention | fused-qkv
    heads: int
    kv_heads: int
    head_dim: int
    q: Linear | None
    k: Linear | None
    v: Linear | None
    qkv: Linear | None
    split_node: str | None
    out: Linear
    score_node: str | None
    rotary: bool


@dataclasses.dataclass
class MLP:
    up: Linear
    down: Linear
    gate: Linear | None
    activation: str


@dataclasses.dataclass
class Block:
    index: int
    attention_norm: Norm | None  # pre-norm input norm
    attention: Attention
    attention_residual: str  # Add node
    attention_post_norm: Norm | None  # post-LN: norm after the residual add
    mlp_norm: Norm | None
    mlp: MLP
    mlp_residual: str
    mlp_post_norm: Norm | None
    input: str  # stream value entering the block
    output: str  # stream value leaving the block
    attention_scale: str | None = None  # layer-scale Mul node on the branch output
    mlp_scale: str | None = None


@dataclasses.dataclass
class Embeddings:
    token: str | None = None  # initializer [vocab, hidden]
    token_node: str | None = None
    position: str | None = None  # initializer [positions, hidden] or [1, positions, hidden]
    token_type: str | None = None
    #: every table gathered and added onto the stream besides the token table, in graph order:
    #: [name, how its rows are chosen] with "input" (a graph input's values), "sequence"
    #: (indices that run along the sequence: Range, an arange buffer), "constant" (one row for
    #: every token: a type embedding whose ids are not an input)
    tables: list = dataclasses.field(default_factory=list)
    patch_conv: str | None = None  # Conv node
    patch_weight: str | None = None
    patch_bias: str | None = None
    cls_token: str | None = None
    norm: Norm | None = None  # a norm applied to the embeddings (its output is the stream)
    output: str = ""


@dataclasses.dataclass
class Head:
    kind: str  # lm | classifier | mlm | none
    linear: Linear | None
    transform: Linear | None = None
    transform_activation: str | None = None
    transform_norm: Norm | None = None
    tie: str | None = None  # shared | transposed-copy | None
    reads: str = ""  # the stream value it reads


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
    outputs: list  # [{name, shape, kind}] kind: hidden | logits | other
    size_literals: list
    shared_initializers: dict  # name -> number of consuming nodes (exporter dedup)
    unrecognised: list
    opset: int
    ir_version: int
    producer: str
    lemon_plan: dict | None = None  # present when the model was expanded by lemon-onnx
    extra_heads: list = dataclasses.field(default_factory=list)  # poolers, second classifiers
    blockers: list = dataclasses.field(default_factory=list)  # why expand must refuse

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def config(self) -> dict:
        return {k: getattr(self, k) for k in (
            "num_layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "tie")}


# --------------------------------------------------------------------------- graph helpers
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


def _name_nodes(graph: ir.Graph) -> None:
    """The description refers to nodes by name: give unnamed or clashing nodes unique names
    (ONNX allows both; exporters' graphs have neither)."""
    seen: set = set()
    k = 0
    for n in graph:
        if not n.name or n.name in seen:
            while f"lemon_node_{k}" in seen:
                k += 1
            n.name = f"{n.name or n.op_type}__lemon{k}" if n.name else f"lemon_node_{k}"
            k += 1
        seen.add(n.name)


def back_view(v: ir.Value) -> ir.Value:
    """Follow data through ops that only re-view it (Reshape, Cast, Unsqueeze, ...)."""
    while v.producer() is not None and v.producer().op_type in (
            "Identity", "Cast", "Reshape", "Flatten", "Unsqueeze", "Squeeze") and v.producer().inputs:
        v = v.producer().inputs[0]
    return v


def _nm(v: ir.Value | None) -> str:
    return "" if v is None else (v.name or "")


class Recognizer:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        _name_nodes(self.graph)
        ShapeInferencePass(strict_mode=False)(model)
        self.ax = dims.AxisAnalysis(self.graph).run()
        self.notes: list[str] = []
        self.order = {n: i for i, n in enumerate(self.graph)}
        self._anc_cache: dict[ir.Value, set] = {}

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

    def find_linears(self) -> dict[ir.Node, Linear]:
        out: dict[ir.Node, Linear] = {}
        for n in self.graph:
            if n.op_type not in ("MatMul", "Gemm") or len(n.inputs) < 2:
                continue
            x, w = n.inputs[0], n.inputs[1]
            src, hops = const_source(w)
            if src is None or is_const(x) or src.const_value is None and not hops:
                continue
            shape = self._const_shape(src, hops)
            if shape is None or len(shape) != 2:
                continue
            transposed = sum(1 for h in hops if h.op_type == "Transpose") % 2 == 1
            if n.op_type == "Gemm":
                tb = n.attributes["transB"].value if "transB" in n.attributes else 0
                transposed ^= bool(tb)
            layout = "out,in" if transposed else "in,out"
            fin, fout = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
            lin = Linear(n.name, n.op_type, _nm(x), _nm(n.outputs[0]), _nm(src), layout,
                         int(fin), int(fout),
                         weight_via=hops[0].name if hops and hops[0].op_type != "Constant" else None)
            y = n.outputs[0]
            if n.op_type == "Gemm" and len(n.inputs) > 2 and n.inputs[2] is not None:
                b, _ = const_source(n.inputs[2])
                lin.bias = _nm(b)
                lin.bias_node = n.name
            else:
                cons = y.consumers()
                if len(cons) == 1 and cons[0].op_type == "Add":
                    other = [i for i in cons[0].inputs if i is not y]
                    arr = const_array(other[0]) if other else None
                    if arr is not None and arr.ndim == 1 and arr.shape[0] == fout:
                        b, _ = const_source(other[0])
                        lin.bias = _nm(b)
                        lin.bias_node = cons[0].name
                        lin.output = _nm(cons[0].outputs[0])
            out[n] = lin
        return out

    @staticmethod
    def _const_shape(src: ir.Value, hops: list) -> tuple | None:
        if src.const_value is not None:
            return tuple(src.const_value.shape)
        p = src.producer()
        if p is not None and p.op_type == "Constant" and "value" in p.attributes:
            return tuple(p.attributes["value"].value.shape)
        return None

    # ----------------------------------------------------------------- norms
    def find_norms(self) -> dict[ir.Value, Norm]:
        """Norms keyed by their output value."""
        norms: dict[ir.Value, Norm] = {}
        for n in self.graph:
            if n.op_type in ("LayerNormalization", "RMSNormalization",
                             "SimplifiedLayerNormalization", "SkipLayerNormalization",
                             "SkipSimplifiedLayerNormalization"):
                kind = "layernorm" if n.op_type in ("LayerNormalization",
                                                    "SkipLayerNormalization") else "rmsnorm"
                skip = n.op_type.startswith("Skip")
                gi = 2 if skip else 1
                g = const_source(n.inputs[gi])[0] if len(n.inputs) > gi else None
                b = None
                bi = gi + 1
                if kind == "layernorm" and len(n.inputs) > bi and n.inputs[bi] is not None:
                    b = const_source(n.inputs[bi])[0]
                eps = n.attributes["epsilon"].value if "epsilon" in n.attributes else 1e-5
                norms[n.outputs[0]] = Norm(kind, "skip" if skip else "op", _nm(n.inputs[0]),
                                           _nm(n.outputs[0]), _nm(g) or None, _nm(b) or None,
                                           float(eps), ["attr", n.name, "epsilon"], [n.name])
            elif n.op_type == "Sqrt":
                got = self._decomposed_norm(n)
                if got is not None:
                    norms[self.graph_value(got.output)] = got
        return norms

    def graph_value(self, name: str) -> ir.Value:
        return self._values[name]

    def _decomposed_norm(self, sqrt: ir.Node) -> Norm | None:
        add = sqrt.inputs[0].producer()
        if add is None or add.op_type != "Add":
            return None
        eps_v = [i for i in add.inputs if is_const(i)]
        var_v = [i for i in add.inputs if not is_const(i)]
        if len(eps_v) != 1 or len(var_v) != 1:
            return None
        eps = scalar_const(eps_v[0])
        rm = var_v[0].producer()
        if eps is None or rm is None or rm.op_type != "ReduceMean":
            return None
        pw = rm.inputs[0].producer()
        sq_in = None
        if pw is not None and pw.op_type == "Pow" and scalar_const(pw.inputs[1]) == 2.0:
            sq_in = pw.inputs[0]
        elif pw is not None and pw.op_type == "Mul" and pw.inputs[0] is pw.inputs[1]:
            sq_in = pw.inputs[0]
        if sq_in is None:
            return None
        nodes = [sqrt, add, rm, pw]
        centred = back_pass(sq_in)
        sub = centred.producer()
        kind = "rmsnorm"
        x = back_pass(sq_in)
        if sub is not None and sub.op_type == "Sub":
            mean = sub.inputs[1].producer()
            if mean is not None and mean.op_type == "ReduceMean" and \
                    back_pass(mean.inputs[0]) is back_pass(sub.inputs[0]):
                kind = "layernorm"
                x = back_pass(sub.inputs[0])
                nodes += [sub, mean]
        # forward: normalised = centred / sqrt  or  x * (1 / sqrt) or x * Reciprocal(sqrt)
        y = None
        for c in sqrt.outputs[0].consumers():
            if c.op_type == "Div" and c.inputs[1] is sqrt.outputs[0]:
                if scalar_const(c.inputs[0]) == 1.0:
                    y = self._mul_with(c.outputs[0], centred if kind == "layernorm" else x, nodes + [c])
                else:
                    y = c.outputs[0]
                    nodes.append(c)
            elif c.op_type == "Reciprocal":
                y = self._mul_with(c.outputs[0], centred if kind == "layernorm" else x, nodes + [c])
        if y is None:
            return None
        if isinstance(y, tuple):
            y, nodes = y
        # optional Cast, then Mul by gamma, then Add beta
        y = skip_pass(y)
        gamma = beta = None
        cons = y.consumers()
        if len(cons) == 1 and cons[0].op_type == "Mul":
            other = [i for i in cons[0].inputs if i is not y]
            arr = const_array(other[0]) if other else None
            if arr is not None and arr.ndim == 1:
                gamma = const_source(other[0])[0]
                nodes.append(cons[0])
                y = cons[0].outputs[0]
                cons = skip_pass(y).consumers()
        if kind == "layernorm" and len(cons) == 1 and cons[0].op_type == "Add":
            other = [i for i in cons[0].inputs if i is not y]
            arr = const_array(other[0]) if other else None
            if arr is not None and arr.ndim == 1:
                beta = const_source(other[0])[0]
                nodes.append(cons[0])
                y = cons[0].outputs[0]
        eps_src = const_source(eps_v[0])[0]
        p = eps_src.producer() if eps_src is not None else None
        where = ["node", p.name] if p is not None and p.op_type == "Constant" else ["value", _nm(eps_src)]
        return Norm(kind, "decomposed", _nm(x), _nm(y), _nm(gamma) or None, _nm(beta) or None,
                    float(eps), where, [n.name for n in nodes if n is not None])

    @staticmethod
    def _mul_with(v: ir.Value, x: ir.Value, nodes: list):
        for c in v.consumers():
            if c.op_type == "Mul" and any(back_pass(i) is x for i in c.inputs if i is not v):
                return c.outputs[0], nodes + [c]
        return None

    # ----------------------------------------------------------------- main
    def run(self) -> ModelDescription:
        g = self.graph
        self._values = {}
        for v in list(g.inputs) + list(g.initializers.values()):
            self._values[v.name] = v
        for n in g:
            for o in n.outputs:
                self._values[o.name] = o
        fused = sorted({n.op_type for n in g if n.domain == "com.microsoft"})
        if fused:
            raise UnsupportedModelError(
                "This graph was fused by ONNX Runtime's transformer optimizer (com.microsoft ops: "
                + ", ".join(fused) + "); lemon-onnx does not rewrite fused graphs yet.",
                hint="Expand the exporter's unoptimised .onnx, then run the optimizer on the "
                     "expanded model.")
        self.linears = self.find_linears()
        self.lin_by_out = {self._values[l.output]: l for l in self.linears.values()}
        self.norms = self.find_norms()
        self.norm_by_in: dict[ir.Value, list[Norm]] = defaultdict(list)
        for nv, nrm in self.norms.items():
            self.norm_by_in[self._values[nrm.input]].append(nrm)

        emb = self.find_embeddings()
        residuals = self.find_residuals()
        if not residuals:
            found = (f"a token embedding ({emb.token})" if emb.token else
                     f"a Conv on the input ({emb.patch_conv})")
            raise UnsupportedModelError(
                f"Found {found}, {len(self.linears)} linear layer(s) and {len(self.norms)} "
                "normalisation layer(s), but no residual connection (an Add that joins a branch "
                "with a linear layer back onto its input), so this is not a Transformer "
                "lemon-onnx can expand (BERT, GPT-2, ViT and Llama families are supported).")
        blocks, stream_end, layout = self.build_blocks(emb, residuals)
        final_norm = None
        if layout == "pre-norm":
            cands = self.norm_by_in.get(stream_end, [])
            final_norm = cands[0] if cands else None
        head_in = self._values[final_norm.output] if final_norm else stream_end
        head, extra = self.find_heads(head_in, emb)
        desc = self.describe(emb, blocks, final_norm, head, layout)
        desc.extra_heads = extra
        desc.blockers = self._blockers(blocks, [head] + extra)
        desc.unrecognised += desc.blockers
        return desc

    def _blockers(self, blocks, heads) -> list[str]:
        """Linear layers that are neither in a block nor a head: expanding around them would
        break them, so ``expand`` refuses (``inspect`` lists them)."""
        known = set()
        for b in blocks:
            a, m = b.attention, b.mlp
            known |= {l.node for l in (a.q, a.k, a.v, a.qkv, a.out, m.up, m.gate, m.down) if l}
        for h in heads:
            known |= {l.node for l in (h.linear, h.transform) if l}
        return [f"linear {lin.node} [{lin.in_features}->{lin.out_features}] (weight "
                f"{lin.weight}) is neither part of a block nor a head reading the final stream"
                for lin in self.linears.values() if lin.node not in known]

    def find_embeddings(self) -> Embeddings:
        g = self.graph
        emb = Embeddings()
        graph_inputs = set(g.inputs)
        for n in g:
            if n.op_type == "Gather" and len(n.inputs) == 2:
                table = const_source(n.inputs[0])[0]
                idx = back_view(n.inputs[1])
                if table is not None and table.const_value is not None and \
                        len(table.const_value.shape) == 2 and idx in graph_inputs and emb.token is None:
                    emb.token, emb.token_node = table.name, n.name
            if n.op_type == "Conv" and emb.patch_conv is None:
                x = back_pass(n.inputs[0])
                w = const_source(n.inputs[1])[0]
                if x in graph_inputs and w is not None:
                    emb.patch_conv, emb.patch_weight = n.name, w.name
                    if len(n.inputs) > 2 and n.inputs[2] is not None:
                        emb.patch_bias = _nm(const_source(n.inputs[2])[0])
        if emb.token is None and emb.patch_conv is None:
            kinds = sorted({n.op_type for n in g})
            raise UnsupportedModelError(
                "No token embedding (a Gather from a constant [vocab, hidden] table indexed by a "
                "graph input) and no patch embedding (a Conv on a graph input) was found, so this "
                "is not a Transformer lemon-onnx can expand. Ops present: "
                + ", ".join(kinds[:30]) + (" ..." if len(kinds) > 30 else "") + ".")
        return emb

    def hidden_leaves(self, emb: Embeddings) -> list:
        if emb.token:
            return dims.leaves(self.ax.axes[self._values[emb.token]][1])
        return dims.leaves(self.ax.axes[self._values[emb.patch_weight]][0])

    def find_residuals(self) -> list[tuple[ir.Node, ir.Value, ir.Value]]:
        """Adds (node, skip input, branch output) where the branch is computed from the skip."""
        lin_outs = set(self.lin_by_out)
        out = []
        for n in self.graph:
            if n.op_type not in ("Add", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
                continue
            if len(n.inputs) < 2 or is_const(n.inputs[0]) or is_const(n.inputs[1]):
                continue
            a, b = n.inputs[0], n.inputs[1]
            for skip, branch in ((a, b), (b, a)):
                # the branch must end in a linear (possibly reshaped back from 2-D, possibly
                # scaled per channel by a layer-scale constant)
                end, _ = self._branch_tail(branch)
                if end in lin_outs and self.depends_on(end, skip):
                    out.append((n, skip, branch))
                    break
        return out

    def build_blocks(self, emb: Embeddings, residuals):
        """Walk the residual chain and pair (attention, MLP) branches into blocks."""
        res_by_skip: dict[ir.Value, tuple] = {}
        for r in residuals:
            res_by_skip.setdefault(back_pass(r[1]), r)
        first = residuals[0]
        stream = back_pass(first[1])
        emb.output = _nm(stream)
        # a norm whose output is the stream start (embedding LayerNorm)
        p = self.norms.get(stream)
        if p is not None:
            emb.norm = p
        chain = []
        post = None
        cur = stream
        while cur in res_by_skip:
            node, skip, branch = res_by_skip[cur]
            add_out = node.outputs[0] if node.op_type == "Add" else node.outputs[
                3 if len(node.outputs) > 3 else 0]
            nxt = add_out
            post_norm = None
            # post-norm: the Add output is normalised and the norm output continues the stream
            for nrm in self.norm_by_in.get(add_out, []):
                nv = self._values[nrm.output]
                if back_pass(nv) in res_by_skip or nv in res_by_skip:
                    post_norm, nxt = nrm, nv
            if node.op_type.startswith("Skip"):
                nrm = self.norms.get(node.outputs[0])
                if nrm is not None and nrm.output and node.outputs[0] in res_by_skip:
                    post_norm, nxt = nrm, node.outputs[0]
            if post is None:
                post = post_norm is not None
            chain.append((node, cur, branch, post_norm, nxt))
            cur = back_pass(nxt)
        # the last post-norm block ends with a norm that feeds no further residual
        if chain and post:
            node, s, br, pn, nx = chain[-1]
            if pn is None:
                add_out = node.outputs[0]
                cands = self.norm_by_in.get(add_out, [])
                if cands:
                    chain[-1] = (node, s, br, cands[0], self._values[cands[0].output])
                    cur = self._values[cands[0].output]
        layout = "post-norm" if post else "pre-norm"
        if len(chain) % 2:
            raise UnsupportedModelError(
                f"Found {len(chain)} residual branches on the main path, an odd number: lemon-onnx "
                "expects each block to be an attention branch followed by an MLP branch.")
        blocks = []
        for i in range(0, len(chain), 2):
            a, m = chain[i], chain[i + 1]
            a_norm = self._branch_norm(a[1], layout)
            m_norm = self._branch_norm(m[1], layout)
            att = self.find_attention(a[1] if a_norm is None else self._values[a_norm.output], a[2], i // 2)
            mlp = self.find_mlp(m[1] if m_norm is None else self._values[m_norm.output], m[2], i // 2)
            blocks.append(Block(i // 2, a_norm, att, a[0].name, a[3], m_norm, mlp, m[0].name,
                                m[3], _nm(a[1]), _nm(m[4]), self._layer_scale(a[2]),
                                self._layer_scale(m[2])))
        return blocks, cur, layout

    def _branch_norm(self, stream: ir.Value, layout: str) -> Norm | None:
        if layout == "post-norm":
            return None
        c = self.norm_by_in.get(stream, [])
        return c[0] if c else None

    def _linears_reading(self, x: ir.Value, within: set) -> list[Linear]:
        res = []
        for node, lin in self.linears.items():
            if node in within and back_pass(node.inputs[0]) is back_pass(x):
                res.append(lin)
            elif node in within and back_pass(node.inputs[0]).producer() is not None \
                    and back_pass(node.inputs[0]).producer().op_type == "Reshape" \
                    and back_pass(back_pass(node.inputs[0]).producer().inputs[0]) is back_pass(x):
                res.append(lin)  # Gemm on a 2-D view of x (GPT-2)
        return sorted(res, key=lambda l: self.order[self._node(l.node)])

    def _node(self, name: str) -> ir.Node:
        if not hasattr(self, "_nodes"):
            self._nodes = {n.name: n for n in self.graph}
        return self._nodes[name]

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

    def _branch_tail(self, branch_out: ir.Value) -> tuple[ir.Value, ir.Node | None]:
        """Walk back from a branch output to the linear that produced it, through Reshape and
        a per-channel Mul by a constant vector (layer scale).  Returns (value, scale node)."""
        v = back_pass(branch_out)
        scale = None
        while v not in self.lin_by_out and v.producer() is not None:
            p = v.producer()
            if p.op_type == "Reshape":
                v = back_pass(p.inputs[0])
            elif p.op_type == "Mul" and scale is None and len(p.inputs) == 2 and \
                    sum(is_const(i) for i in p.inputs) == 1:
                c = next(i for i in p.inputs if is_const(i))
                arr = const_array(c)
                if arr is None or arr.ndim != 1 or arr.size <= 1:
                    break
                scale = p
                v = back_pass(next(i for i in p.inputs if not is_const(i)))
            else:
                break
        return v, scale

    def _out_linear(self, branch_out: ir.Value) -> Linear:
        return self.lin_by_out[self._branch_tail(branch_out)[0]]

    def _layer_scale(self, branch_out: ir.Value) -> str | None:
        node = self._branch_tail(branch_out)[1]
        return node.name if node is not None else None

    def find_attention(self, x: ir.Value, branch_out: ir.Value, idx: int) -> Attention:
        nodes = self._branch_nodes(x, branch_out)
        out = self._out_linear(branch_out)
        ins = [l for l in self._linears_reading(x, nodes) if l is not out]
        attn_op = next((n for n in nodes if n.op_type == "Attention"), None)
        score = pv = None
        if attn_op is None:
            softmax = next((n for n in nodes if n.op_type == "Softmax"), None)
            if softmax is None:
                raise UnsupportedModelError(
                    f"Block {idx}: the first residual branch has no Softmax and no Attention op; "
                    "it is not a recognisable self-attention.")
            for n in nodes:
                if n.op_type == "MatMul" and not is_const(n.inputs[1]) and not is_const(n.inputs[0]):
                    if softmax in self.ancestors(n.outputs[0]) and self.depends_on(n.inputs[0], softmax.outputs[0]):
                        pv = n
                    elif softmax.inputs[0] is n.outputs[0] or n in self.ancestors(softmax.inputs[0]):
                        score = n
            if score is None or pv is None:
                raise UnsupportedModelError(f"Block {idx}: attention found a Softmax but not the "
                                            "Q.K^T and P.V MatMuls around it.")
            q_t, k_t, v_t = score.inputs[0], score.inputs[1], pv.inputs[1]
        else:
            q_t, k_t, v_t = attn_op.inputs[0], attn_op.inputs[1], attn_op.inputs[2]

        def reaches(lin_out: ir.Value, target: ir.Value) -> bool:
            return self.depends_on(target, lin_out)

        q = k = v = qkv = None
        split_node = None
        if len(ins) == 1:
            qkv = ins[0]
            y = self._values[qkv.output]
            sp = [n for n in nodes if n.op_type == "Split" and self.depends_on(n.inputs[0], y)]
            split_node = sp[0].name if sp else None
        else:
            for lin in ins:
                y = self._values[lin.output]
                if reaches(y, q_t) and not reaches(y, k_t):
                    q = lin
                elif reaches(y, k_t) and not reaches(y, q_t):
                    k = lin
                elif reaches(y, v_t):
                    v = lin
            if q is None or k is None or v is None:
                raise UnsupportedModelError(
                    f"Block {idx}: could not tell the Q, K and V projections apart "
                    f"({len(ins)} projections read the attention input).")
        # heads and head_dim from the atoms of the attention's axes
        hd_leaves = self.leaves(q_t, -1)
        if attn_op is not None and len(self.ax.get(q_t) or []) == 3:
            qa = self.leaves(q_t, -1)
            heads_l = self._attr_heads(attn_op, "q_num_heads", qa)
            hd_leaves = qa[len(heads_l):]
            kv_l = self._attr_heads(attn_op, "kv_num_heads", self.leaves(k_t, -1))
        else:
            so = (score.outputs[0] if score is not None else attn_op.outputs[0])
            sax = self.ax.get(so) or []
            heads_l = dims.leaves(sax[-3]) if len(sax) >= 4 else []
            kax = self.ax.get(k_t) or []
            kv_l = dims.leaves(kax[-3]) if len(kax) >= 4 else []
            if score is None and len(self.ax.get(q_t) or []) == 4:
                heads_l = dims.leaves(self.ax.get(q_t)[1])
            if attn_op is not None and len(kax) == 4:
                kv_l = dims.leaves(kax[1])
        # GQA: the K heads axis after repeat_kv is (kv_heads, groups); K before repeat is kv_heads
        kproj = k or qkv
        k_out = self.leaves(self._values[kproj.output], -1)
        kv_from_proj = [a for a in k_out if a not in hd_leaves]
        if k is not None and kv_from_proj:
            kv_l = kv_from_proj
        heads = int(np.prod([a.size for a in heads_l])) if heads_l else 0
        head_dim = int(np.prod([a.size for a in hd_leaves])) if hd_leaves else 0
        # the K projection's width says how many KV heads there are (a single KV head has no
        # atom of its own: size-1 axes vanish in the atom algebra)
        if k is not None and head_dim and k.out_features % head_dim == 0:
            kv_heads = k.out_features // head_dim
        else:
            kv_heads = int(np.prod([a.size for a in kv_l])) if kv_l else heads
        qproj = q or qkv
        att_width = qproj.out_features // (3 if qkv else 1)
        if not heads or not head_dim or heads * head_dim != att_width:
            raise UnsupportedModelError(
                f"Block {idx}: could not read the head count and head_dim from the attention "
                f"reshapes (found heads={heads}, head_dim={head_dim}, projection width "
                f"{att_width}).")
        rotary = any(n.op_type in ("RotaryEmbedding", "Sin", "Cos") for n in self.graph) and (
            any(n.op_type == "RotaryEmbedding" for n in nodes) or
            any(n.op_type == "Slice" for n in nodes if self.depends_on(q_t, n.outputs[0])))
        if kv_heads == 1 and heads > 1:
            # multi-query attention: one KV head (a size-1 axis, no atom); the query heads'
            # atom is the group (repeat) size, which stays when the model is widened
            for a in heads_l:
                a.role = "kv_groups"
            kv_l = []
        self._roles_attention(heads_l, kv_l, hd_leaves, mqa=kv_heads == 1 and heads > 1)
        if qkv is not None:
            for a in self.leaves(self._values[qkv.output]):
                if a.role is None and a.size == 3:
                    a.role = "3"
        v_l = self.leaves(v_t, -1)
        if len(v_l) == 1 and v_l[0].role is None:
            v_l[0].role = "head_dim"
        expressed = "onnx-attention" if attn_op is not None else ("fused-qkv" if qkv else "decomposed")
        return Attention(expressed, heads, kv_heads, head_dim, q, k, v, qkv, split_node, out,
                         score.name if score is not None else attn_op.name, bool(rotary))

    def _attr_heads(self, node: ir.Node, attr: str, leaves_: list) -> list:
        if attr not in node.attributes:
            return []
        n = int(node.attributes[attr].value)
        acc, prod = [], 1
        for a in leaves_:
            if prod >= n:
                break
            acc.append(a)
            prod *= a.size or 1
        return acc

    def _roles_attention(self, heads_l, kv_l, hd_leaves, mqa: bool = False) -> None:
        self._groups = getattr(self, "_groups", [])
        self._groups.append(("head_dim", [dims.find(a) for a in hd_leaves]))
        if not mqa:
            self._groups.append(("heads", [dims.find(a) for a in heads_l]))
        kvset, hset = set(kv_l), set(heads_l)
        if mqa:
            pass  # roles set by the caller
        elif not kv_l or kvset == hset:
            for a in heads_l:
                a.role = "heads"
        else:
            for a in kv_l:
                a.role = "kv_heads"
            for a in heads_l:
                if a not in kvset:
                    a.role = "kv_groups"
        if len(hd_leaves) == 1:
            hd_leaves[0].role = "head_dim"
        else:
            for a in hd_leaves:
                a.role = a.role or ("rotary_halves" if a.size == 2 else "head_dim/2")

    def find_mlp(self, x: ir.Value, branch_out: ir.Value, idx: int) -> MLP:
        nodes = self._branch_nodes(x, branch_out)
        down = self._out_linear(branch_out)
        ins = [l for l in self._linears_reading(x, nodes) if l is not down]
        if not ins:
            raise UnsupportedModelError(f"Block {idx}: the MLP branch has no input projection.")
        ops = {n.op_type for n in nodes}
        act = ("gelu" if ("Erf" in ops or "Gelu" in ops or "BiasGelu" in ops) else
               "gelu_tanh" if ("Tanh" in ops or "FastGelu" in ops) else
               "silu" if "Sigmoid" in ops else "relu" if "Relu" in ops else "unknown")
        if "Gelu" in ops:
            gn = next(n for n in nodes if n.op_type == "Gelu")
            if "approximate" in gn.attributes and gn.attributes["approximate"].value == "tanh":
                act = "gelu_tanh"
        gate = None
        up = ins[0]
        if len(ins) == 2:
            # the gate passes through the nonlinearity before meeting the up projection
            nl = [n for n in nodes if n.op_type in ("Sigmoid", "Erf", "Tanh", "Gelu", "Relu")]
            a, b = ins
            a_nl = any(self.depends_on(n.outputs[0], self._values[a.output]) for n in nl)
            b_nl = any(self.depends_on(n.outputs[0], self._values[b.output]) for n in nl)
            gate, up = (a, b) if a_nl and not b_nl else (b, a)
            act = "swiglu" if act == "silu" else f"{act}-glu"
        elif len(ins) > 2:
            raise UnsupportedModelError(f"Block {idx}: the MLP branch has {len(ins)} input "
                                        "projections; expected one (up) or two (gate, up).")
        for a in self.leaves(self._values[up.output]):
            a.role = a.role or "ffn"
        return MLP(up, down, gate, act)

    _VIEW_OPS = ("Identity", "Cast", "Dropout", "Gather", "Slice", "Squeeze", "Unsqueeze",
                 "Reshape", "Flatten")

    def _reads_directly(self, v: ir.Value, x: ir.Value) -> bool:
        """``v`` is ``x`` seen through selections and views (a cls-token Gather, a Reshape)."""
        while v is not x:
            p = v.producer()
            if p is None or p.op_type not in self._VIEW_OPS or not p.inputs:
                return False
            v = p.inputs[0]
        return True

    def find_heads(self, x: ir.Value, emb: Embeddings) -> tuple[Head, list]:
        """Linears reading the final stream value ``x``: the main head (LM, MLM or classifier)
        and any extra heads (a pooler, a second classifier)."""
        readers = sorted((lin for node, lin in self.linears.items()
                          if self._reads_directly(node.inputs[0], x)),
                         key=lambda l: self.order[self._node(l.node)])
        if not readers:
            return Head("none", None, reads=_nm(x)), []
        tok = self._values[emb.token] if emb.token else None
        vocab = tok.const_value.shape[0] if tok is not None else None
        heads = []
        for r in readers:
            after = [lin for node, lin in self.linears.items()
                     if lin is not r and self.depends_on(node.inputs[0], self._values[r.output])]
            if vocab is not None and len(after) == 1 and after[0].out_features == vocab:
                heads.append(self._mlm_head(r, after[0], x, tok))
            elif vocab is not None and r.out_features == vocab:
                heads.append(Head("lm", r, reads=_nm(x), tie=self._tie(r, tok)))
            else:
                heads.append(Head("classifier", r, reads=_nm(x)))
        main = next((h for h in heads if h.kind in ("lm", "mlm")), heads[-1])
        return main, [h for h in heads if h is not main]

    def _mlm_head(self, t: Linear, dec: Linear, x: ir.Value, tok) -> Head:
        """BERT's MLM head: transform (dense, activation, LayerNorm), then the decoder."""
        dec_in = self._node(dec.node).inputs[0]
        tn = [nrm for nrm in self.norms.values()
              if self.depends_on(self._values[nrm.input], self._values[t.output])
              and (self.depends_on(dec_in, self._values[nrm.output])
                   or self._values[nrm.output] is back_pass(dec_in))]
        ops = {n.op_type for n in self.ancestors(dec_in)
               if self.depends_on(n.outputs[0], self._values[t.output])}
        act = ("gelu" if {"Erf", "Gelu"} & ops else "gelu_tanh" if "Tanh" in ops else
               "relu" if "Relu" in ops else None)
        return Head("mlm", dec, transform=t, transform_activation=act,
                    transform_norm=tn[0] if tn else None, tie=self._tie(dec, tok), reads=_nm(x))

    def _tie(self, lin: Linear, tok: ir.Value) -> str | None:
        if lin.weight == tok.name:
            return "shared"
        w = self._values[lin.weight].const_value
        t = tok.const_value
        if w is None or t is None:
            return None
        wa = w.numpy()
        if lin.weight_layout == "in,out":
            wa = wa.T
        if wa.shape == tuple(t.shape) and np.array_equal(wa, t.numpy()):
            return "transposed-copy" if lin.weight_layout == "in,out" else "copy"
        return None

    # ----------------------------------------------------------------- result
    def describe(self, emb, blocks, final_norm, head, layout) -> ModelDescription:
        g = self.graph
        hid = self.hidden_leaves(emb)
        for a in hid:
            a.role = "hidden"
        if emb.token:
            for a in dims.leaves(self.ax.axes[self._values[emb.token]][0]):
                a.role = a.role or "vocab"
        stream_ax = self.ax.get(self._values[emb.output]) if emb.output else None
        if stream_ax and len(stream_ax) == 3:
            for a in dims.leaves(stream_ax[1]):
                if a.size is not None:
                    a.role = a.role or "tokens"  # a static sequence (ViT: patches + cls)
        if emb.patch_conv:
            conv_out = self.ax.get(self._node(emb.patch_conv).outputs[0]) or []
            for k, ax in enumerate(conv_out[2:]):
                for a in dims.leaves(ax):
                    a.role = a.role or ("patch_rows" if k == 0 else "patch_cols")
        self._embedding_extras(emb)
        b0 = blocks[0]
        att = b0.attention
        nrm = b0.attention_norm or b0.attention_post_norm or final_norm
        ffn = b0.mlp.up.out_features
        vocab = int(self._values[emb.token].const_value.shape[0]) if emb.token else None
        if head.linear is not None and head.kind == "classifier":
            for a in self.leaves(self._values[head.linear.output]):
                a.role = a.role or "num_labels"
        literals = self.size_literals()
        shared = {}
        for v in g.initializers.values():
            n = len(v.uses())
            if n > 1:
                shared[v.name] = n
        inputs = [{"name": v.name, "dtype": str(v.dtype), "shape": _shape(v)} for v in g.inputs]
        hid_size = int(np.prod([a.size for a in hid]))
        outputs = []
        for v in g.outputs:
            lv = self.leaves(v)
            kind = "hidden" if lv and lv == hid else ("logits" if head.linear is not None and
                                                      back_pass(v) is self._values[head.linear.output]
                                                      else "other")
            outputs.append({"name": v.name, "shape": _shape(v), "kind": kind})
        unrec = list(self.notes)
        if self.ax.conflicts:
            unrec += [f"shape reasoning conflict: {c}" for c in self.ax.conflicts[:10]]
        for u in self.ax.unexplained:
            unrec.append(f"integer literal {u.value} at {u.ref} in {u.op} {u.node}: not explained "
                         "by any size")
        family = self._family(layout, nrm, b0, emb, head)
        opset = g.opset_imports.get("", 0)
        return ModelDescription(
            family=family, layout=layout, norm_type=nrm.kind if nrm else "none",
            norm_form=nrm.form if nrm else "none", num_layers=len(blocks), hidden=hid_size,
            heads=att.heads, kv_heads=att.kv_heads, head_dim=att.head_dim, ffn=ffn, vocab=vocab,
            tie=head.tie, activation=b0.mlp.activation, gated_mlp=b0.mlp.gate is not None,
            rotary=att.rotary, embeddings=emb, blocks=blocks, final_norm=final_norm, head=head,
            inputs=inputs, outputs=outputs, size_literals=literals, shared_initializers=shared,
            unrecognised=unrec, opset=int(opset), ir_version=int(self.model.ir_version),
            producer=f"{self.model.producer_name or ''} {self.model.producer_version or ''}".strip(),
            lemon_plan=_plan_of(self.model))

    def _embedding_extras(self, emb: Embeddings) -> None:
        """Position / token-type tables and ViT cls token: constants added onto the stream."""
        hid = set(self.hidden_leaves(emb))
        stream = self._values[emb.output] if emb.output else None
        if stream is None:
            return
        anc = self.ancestors(stream)
        for n in sorted(anc, key=lambda n: self.order[n]):
            if n.op_type == "Gather" and emb.token_node != n.name:
                t = const_source(n.inputs[0])[0]
                if t is not None and t.const_value is not None and len(t.const_value.shape) == 2 \
                        and set(dims.leaves(self.ax.axes[t][1])) <= hid \
                        and t.name not in [x[0] for x in emb.tables]:
                    emb.tables.append([t.name, _index_kind(n.inputs[1], set(self.graph.inputs))])
            if n.op_type in ("Add", "Concat", "Expand"):
                for i in n.inputs:
                    t = const_source(i)[0] if i is not None else None
                    if t is None or t.const_value is None or len(t.const_value.shape) != 3:
                        continue
                    if n.op_type == "Add" and emb.position is None:
                        emb.position = t.name
                    elif n.op_type in ("Concat", "Expand") and emb.cls_token is None:
                        emb.cls_token = t.name
        self._label_tables(emb)

    def _label_tables(self, emb: Embeddings) -> None:
        """Name the gathered tables by how their rows are chosen, never by their row count.

        Positions: indices that run along the sequence; failing that, the one table indexed
        by a graph input (position ids given as an input).  Token types: a table whose row is
        a constant for every token, or an input-indexed table beside a position table."""
        by_kind: dict = defaultdict(list)
        for name, kind in emb.tables:
            by_kind[kind].append(name)
        seq, inp, const = by_kind["sequence"], by_kind["input"], by_kind["constant"]
        if emb.position is None:
            if seq:
                emb.position = seq[0]
            elif len(inp) == 1 and not const:
                emb.position = inp[0]
        if emb.token_type is None:
            rest = [x for x in const + inp if x != emb.position]
            if len(rest) == 1:
                emb.token_type = rest[0]
        init = self.graph.initializers
        for name, role in ((emb.position, "max_positions"), (emb.token_type, "token_types")):
            if name and name in init:
                for a in dims.leaves(self.ax.axes[init[name]][0]):
                    a.role = a.role or role

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
        groups = [(name, [dims.find(a) for a in grp]) for name, grp in getattr(self, "_groups", [])
                  if len(grp) > 1]
        return [SizeLiteral(list(lu.ref), lu.value, label_with_groups(dims.leaves(lu.atoms), groups),
                            lu.node, lu.op, list(lu.via) if lu.via else None)
                for lu in self.ax.literals]


#: ops whose output values are taken from their first input (layout, type, extent or a
#: selection of its elements): indices keep their kind through them
_INDEX_HOPS = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Expand", "Flatten",
               "Slice", "Transpose", "Gather", "GatherElements", "Tile")


def _index_kind(v: ir.Value, graph_inputs: set) -> str:
    """How a Gather's indices are chosen: "input", "sequence" or "constant" (see
    ``Embeddings.tables``).  Followed back through layout-only ops; a constant buffer (the
    exporters' ``position_ids``/``token_type_ids`` buffers) is judged by its values: all equal
    means one row for every token, anything else runs along the sequence."""
    seen = 0
    while v is not None and seen < 64:
        seen += 1
        if v in graph_inputs:
            return "input"
        src, _ = const_source(v)
        if src is not None:
            arr = np.asarray(src.const_value.numpy() if src.const_value is not None
                             else _constant_node_value(src))
            return "constant" if arr.size and np.all(arr == arr.reshape(-1)[0]) else "sequence"
        p = v.producer()
        if p is None:
            return "input"
        if p.op_type == "Range":
            return "sequence"
        if p.op_type in _INDEX_HOPS and p.inputs:
            v = p.inputs[0]
            continue
        if p.op_type == "ConstantOfShape":
            return "constant"
        # arithmetic on indices (Add of an offset, CumSum of a mask): they run along the sequence
        return "sequence"
    return "sequence"


def _constant_node_value(v: ir.Value):
    p = v.producer()
    attr = p.attributes.get("value") if p is not None else None
    return attr.value.numpy() if attr is not None else np.zeros(0)


def label_with_groups(lv: list, groups: list) -> str:
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
            names.append(a.role or (f"?{a.size}" if a.sym is None else a.sym))
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


def _shape(v: ir.Value) -> list:
    if v.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value or "?") for d in v.shape]


def recognize(model: ir.Model) -> ModelDescription:
    """Describe ``model`` (an onnx-ir Model).  Raises UnsupportedModelError with a reason."""
    return Recognizer(model).run()

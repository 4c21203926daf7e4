"""SkipLayerNormalization and SkipSimplifiedLayerNormalization (com.microsoft).

``SkipLayerNormalization(input, skip, gamma, beta?, bias?)`` = LayerNorm(input + bias + skip)
over the last axis; output 3 is the sum itself.  Unfused as ``Add(input, bias)``, ``Add(.,
skip)`` and a ``LayerNormalization`` (opset 17 and later) or its decomposed form (earlier
opsets): the residual Add and the norm the components know.  The Simplified form is RMSNorm
(no mean, no beta): its norm a ``SimplifiedLayerNormalization``.  Outputs 1 and 2 (mean,
inverse std) must be unused.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.convenience import convert_attribute

from .. import graph as G
from . import TAG, Builder, FusedOp

OPS = tuple(map(FusedOp, ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")))


def decompose(b: Builder, node: ir.Node) -> dict:
    ins = list(node.inputs) + [None] * 5
    x, skip, gamma = ins[0], ins[1], ins[2]
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    beta, bias = (None, ins[3]) if simplified else (ins[3], ins[4])
    eps = node.attributes.get_float("epsilon", 1e-5)
    s = x
    if bias is not None:
        s = b.op("Add", [x, bias], role="bias")
    s = b.op("Add", [s, skip], role="skip")
    b.port_in(x, 0)
    b.port_in(skip, 1)
    b.port_in(gamma, 2)
    if bias is not None:
        b.port_in(bias, 3 if simplified else 4)
    if simplified:
        y = rms_norm(b, s, gamma, eps)
    else:
        y = layer_norm(b, s, gamma, beta, eps)
        if beta is not None:
            b.port_in(beta, 3)
    return {0: y, 3: s}


def fused_attrs(group, attrs: dict, ins: dict) -> dict:
    """The epsilon as the passes left it (the width pass rescales it with the norm's
    width when the stream keeps leftover slots)."""
    return {**attrs, "epsilon": convert_attribute("epsilon", norm_epsilon(group))}


def norm_epsilon(group) -> float:
    """The epsilon of the group's norm: the LayerNormalization's attribute, or the constant
    added to the variance (the decomposed forms, role ``eps``)."""
    norm = group.role("norm")
    if norm is not None and norm.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
        return norm.attributes.get_float("epsilon", 1e-5)
    return float(G.const_array(group.role("eps").inputs[1]).reshape(-1)[0])


def adopt(group) -> bool:
    """A Skip norm's Adds whose norm is a plain one (depth: the Adds end a block, the twin
    after it starts with its clone of the block's first norm, a plain LayerNormalization or
    SimplifiedLayerNormalization):
    make that norm the group's, so the pair is fused again.  True when adopted."""
    ks = {group.tags(n)["k"]: n for n in group.nodes}
    skip = next((n for n in group.nodes if group.tags(n)["r"] == "skip"), None)
    if skip is None or group.role("norm") is not None or len(ks) != group.meta["n"] - 1:
        return False
    kind = {"SkipLayerNormalization": "LayerNormalization",
            "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}[group.meta["op"]]
    readers = [u for u in skip.outputs[0].uses() if u.node.op_type == kind
               and u.node.domain == "" and u.idx == 0
               and TAG not in u.node.metadata_props]
    if not readers:
        return False
    norm = readers[0].node  # a parallel block's two norms read the sum: either one fuses
    if norm.attributes.get_int("axis", -1) not in (-1, len(norm.inputs[0].shape or ()) - 1):
        return False
    k = max(ks) + 1
    if k != group.meta["n"] - 1:
        return False
    beta = kind == "LayerNormalization" and len(norm.inputs) > 2 and norm.inputs[2] is not None
    group.tag(norm, k, [[0, group.tags(skip)["k"], 0]], [[1, 2]] + ([[2, 3]] if beta else []),
              [[0, 0]], "norm")
    group.nodes.append(norm)
    if group.whole() is not None:  # not the decomposition after all: leave it as it was
        group.untag(norm)
        group.nodes.remove(norm)
        return False
    return True


def layer_norm(b: Builder, x: ir.Value, gamma, beta, eps: float) -> ir.Value:
    if b.opset >= 17:
        ins = [x, gamma] + ([beta] if beta is not None else [])
        return b.op("LayerNormalization", ins, {"axis": -1, "epsilon": eps}, role="norm")
    mean = b.reduce("ReduceMean", x, [-1])
    d = b.op("Sub", [x, mean])
    var = b.reduce("ReduceMean", b.op("Pow", [d, b.scalar(2.0, x)]), [-1])
    std = b.op("Sqrt", [b.op("Add", [var, b.scalar(eps, x)], role="eps")])
    y = b.op("Mul", [b.op("Div", [d, std]), gamma])
    return b.op("Add", [y, beta]) if beta is not None else y


def rms_norm(b: Builder, x: ir.Value, gamma, eps: float) -> ir.Value:
    """RMSNorm as ONNX Runtime's ``SimplifiedLayerNormalization`` (a contrib op of the default
    domain, with float and double kernels, computing in float32 for half types as the Skip
    form does): the op form the norm component widens, and the one a twin's clone of a
    block's first norm has, so a Skip pair across a block boundary fuses again."""
    return b.op("SimplifiedLayerNormalization", [x, gamma],
                {"axis": -1, "epsilon": eps, "stash_type": 1}, role="norm")

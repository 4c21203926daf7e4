"""Fused activations (com.microsoft): BiasGelu, FastGelu, GemmFastGelu, Gelu, QuickGelu,
BiasAdd.

``BiasGelu(A, B)`` = Gelu(A + B) with erf; ``Gelu(X)`` the same without a bias; ``FastGelu(X,
bias?)`` the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of x = X + bias;
``GemmFastGelu(X, W, bias?)`` = FastGelu(X @ W + bias) (the projection inside the op);
``QuickGelu(X)`` = x sigmoid(alpha x); ``BiasAdd(X, bias, skip)`` = X + bias + skip.  Unfused
as the elementwise forms exporters write (the bias an Add after the projection), which the MLP
and residual components know.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from . import Builder, FusedOp

OPS = tuple(map(FusedOp, ("BiasGelu", "FastGelu", "GemmFastGelu", "Gelu", "QuickGelu", "BiasAdd")))


def decompose(b: Builder, node: ir.Node) -> dict:
    ins = list(node.inputs) + [None] * 3
    x = ins[0]
    if node.op_type == "GemmFastGelu":  # the up projection, then FastGelu with its bias
        x = b.op("MatMul", [x, ins[1]], role="gemm")
        b.port_in(ins[0], 0)
        b.port_in(ins[1], 1)
        if ins[2] is not None:
            x = b.op("Add", [x, ins[2]], role="bias")
            b.port_in(ins[2], 2)
        return {0: _fast_gelu(b, x)}
    b_in = ins[1] if node.op_type in ("BiasGelu", "FastGelu", "BiasAdd") else None
    if b_in is not None:
        x = b.op("Add", [x, b_in], role="bias")
    if node.op_type == "BiasAdd":
        y = b.op("Add", [x, ins[2]], role="skip")
    elif node.op_type in ("BiasGelu", "Gelu"):
        t = b.op("Erf", [b.op("Div", [x, b.scalar(math.sqrt(2.0), x)])])
        y = b.op("Mul", [b.op("Mul", [x, b.op("Add", [t, b.scalar(1.0, x)])]),
                         b.scalar(0.5, x)])
    elif node.op_type == "FastGelu":
        y = _fast_gelu(b, x)
    else:  # QuickGelu
        alpha = node.attributes.get_float("alpha", 1.702)
        y = b.op("Mul", [x, b.op("Sigmoid", [b.op("Mul", [x, b.scalar(alpha, x)])])])
    b.port_in(ins[0], 0)
    if b_in is not None:
        b.port_in(b_in, 1)
    if node.op_type == "BiasAdd":
        b.port_in(ins[2], 2)
    return {0: y}


def _fast_gelu(b: Builder, x: ir.Value) -> ir.Value:
    cube = b.op("Pow", [x, b.scalar(3.0, x)])
    inner = b.op("Add", [x, b.op("Mul", [cube, b.scalar(0.044715, x)])])
    t = b.op("Tanh", [b.op("Mul", [inner, b.scalar(math.sqrt(2.0 / math.pi), x)])])
    return b.op("Mul", [b.op("Mul", [x, b.scalar(0.5, x)]), b.op("Add", [t, b.scalar(1.0, x)])])

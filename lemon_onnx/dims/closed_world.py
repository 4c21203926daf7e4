"""The closed world of the axis analysis: which operator domains and ops it models.

The ops are those with a rule: a function of ``rules/`` registered for its op types by the
``rule`` decorator below (``RULES``); the elementwise rules are registered for the lists here
(``UNARY``, ``BINARY``).  An op of another domain or without a rule is *unhandled*
(``AxisAnalysis.unhandled``): its outputs get fresh atoms from the inferred shapes, and the
expansion passes refuse it where it touches an axis whose size the plan changes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: operator domains whose ops the analysis models (com.microsoft: the fused ops that
#: are recognised, so that fused graphs are described before they are refused)
DOMAINS = ("", "ai.onnx", "com.microsoft")
#: ops that combine the elements along one axis, with the default of their ``axis`` attribute
#: (opset 13+; CumSum takes its axis as an input)
AXIS_OPS = {"CumSum": None, "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "ArgMax": 0,
            "ArgMin": 0, "TopK": -1, "LpNormalization": -1, "Trilu": None}
#: ops whose output has their first input's axes (``rules.elementwise.unary``)
UNARY = {
    "Abs", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
    "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Not", "Cos", "Sin", "Softplus", "HardSigmoid",
    "Mish", "Elu", "Selu", "LeakyRelu", "FastGelu", "BiasGelu", "QuickGelu", "Trilu", "Round",
    "Floor", "Ceil", "Sign", "HardSwish", "Celu", "ThresholdedRelu", "Clip", "CumSum",
}
#: arithmetic the analysis's ``_fold`` evaluates on constants alone
FOLD = {"Pow": np.power, "Sqrt": np.sqrt, "Mul": np.multiply, "Div": np.true_divide,
        "Add": np.add, "Sub": np.subtract, "Floor": np.floor, "Ceil": np.ceil, "Cast": None}
#: elementwise ops of broadcast inputs (``rules.elementwise.broadcast``)
BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Mod", "Where", "BitShift", "PRelu",
    "Sum", "Mean",
}

#: op type -> the rule that models it: ``rule(analysis, node)``, registered with ``rule``
RULES: dict[str, Callable] = {}
#: (prefix, rule): the rule for every op type that starts with the prefix and has no rule of
#: its own (Reduce*)
PREFIX_RULES: list[tuple[str, Callable]] = []


def rule(*op_types: str, prefix: str | None = None) -> Callable:
    """Register the decorated function as the rule for ``op_types`` (and, with ``prefix``,
    for the op types that start with it); an op type has one rule."""
    def register(fn: Callable) -> Callable:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"two rules for {op}: {RULES[op].__name__} and {fn.__name__}")
            RULES[op] = fn
        if prefix is not None:
            PREFIX_RULES.append((prefix, fn))
        return fn
    return register


def rule_for(op_type: str) -> Callable | None:
    """The rule for ``op_type``: its own, else its prefix's, else None (unhandled)."""
    fn = RULES.get(op_type)
    if fn is None:
        fn = next((f for p, f in PREFIX_RULES if op_type.startswith(p)), None)
    return fn

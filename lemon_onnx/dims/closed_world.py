"""The closed world of the axis analysis: which operator domains and ops it models.

An op outside them is *unhandled* (``AxisAnalysis.unhandled``): its outputs get fresh atoms
from the inferred shapes, and the expansion passes refuse it where it touches an axis whose
size the plan changes.
"""

import numpy as np

#: operator domains whose ops the analysis models (com.microsoft: the fused ops that
#: are recognised, so that fused graphs are described before they are refused)
DOMAINS = ("", "ai.onnx", "com.microsoft")
#: ops that combine the elements along one axis, with the default of their ``axis`` attribute
#: (opset 13+; CumSum takes its axis as an input)
AXIS_OPS = {"CumSum": None, "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "ArgMax": 0,
            "ArgMin": 0, "TopK": -1, "LpNormalization": -1, "Trilu": None}

UNARY = {
    "Abs", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
    "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Not", "Cos", "Sin", "Softplus", "HardSigmoid",
    "Mish", "Elu", "Selu", "LeakyRelu", "FastGelu", "BiasGelu", "QuickGelu", "Trilu", "Round",
    "Floor", "Ceil", "Sign", "HardSwish", "Celu", "ThresholdedRelu", "Clip", "CumSum",
}
#: arithmetic the analysis's ``_fold`` evaluates on constants alone
FOLD = {"Pow": np.power, "Sqrt": np.sqrt, "Mul": np.multiply, "Div": np.true_divide,
        "Add": np.add, "Sub": np.subtract, "Floor": np.floor, "Ceil": np.ceil, "Cast": None}
BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Mod", "Where", "BitShift", "PRelu",
    "Sum", "Mean",
}

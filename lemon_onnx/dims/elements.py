"""Elements of the small integer tensors that may hold sizes, and the literals they explain.

``Elem`` follows one element of a shape vector (a literal stored in the graph, a number
computed from constants alone, the run-time size of an axis, ...); ``LiteralUse`` records a
literal in a size position together with the atoms it stands for.  ``int_array`` and
``const_floats`` read small constants.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

INT_BIG = 2**31 - 1  # Slice ends at or above this are "to the end", not sizes


@dataclasses.dataclass
class Elem:
    """One element of a small integer tensor that may hold sizes.

    kind "lit": a literal stored in the graph (``ref`` says where); kind "fixed": a number
    computed from constants alone (DINOv2's int(num_patches ** 0.5) as Pow and Cast of float
    constants), which no expansion changes; kind "dim": the runtime
    size of an axis (``atoms``), e.g. from Shape; kind "dim+": such a size plus a literal
    ``value`` (torch.chunk's ceiling division, traced as ``(n + k - 1) // k``); kind "unk":
    anything else.
    """

    kind: str
    value: int | None = None
    ref: tuple | None = None
    atoms: list | None = None
    via: tuple | None = None  # (node name, input index): where it left its constant tensor


UNK = Elem("unk")


@dataclasses.dataclass
class LiteralUse:
    """A literal in a size position, the atoms it stands for, and the node that consumes it."""

    ref: tuple  # ("value", value_name, flat_index) or ("attr", node_name, attr_name)
    value: int
    atoms: list
    node: str
    op: str
    via: tuple | None = None  # (node name, input index) that reads the constant tensor


def int_array(value: ir.Value | None, const: ir.TensorProtocol | None = None) -> np.ndarray | None:
    if const is None and value is not None:
        const = value.const_value
        if const is None and value.producer() is not None and value.producer().op_type == "Constant":
            attr = value.producer().attributes.get("value")
            const = attr.value if attr is not None else None
    if const is None:
        return None
    if const.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    if const.size > 64:
        return None
    try:
        return np.asarray(const.numpy()).astype(np.int64)
    except Exception:  # pragma: no cover - unreadable constant
        return None


def const_floats(value: ir.Value | None) -> list | None:
    """A small constant float vector (Resize scales), or None."""
    if value is None:
        return None
    v, p = value, value.producer()
    t = v.const_value
    if t is None and p is not None and p.op_type == "Constant" and "value" in p.attributes:
        t = p.attributes["value"].value
    if t is None:
        return None
    arr = np.asarray(t.numpy()).reshape(-1)
    return [float(a) for a in arr] if arr.size and arr.size <= 16 else None

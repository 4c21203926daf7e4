"""Reading and writing constant tensors of an onnx-ir graph: initializers and Constant nodes,
eagerly or lazily (computed from the memory-mapped source when the model is saved)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: tensors at least this large are transformed lazily (at save time)
LAZY_BYTES = 1 << 20


def apply_fn(fn, arr: np.ndarray) -> np.ndarray:
    new = np.ascontiguousarray(fn(arr))
    if new.dtype != arr.dtype:  # weights keep the model's dtype (fp16/bf16 too)
        new = new.astype(arr.dtype)
    return new


def lazy_tensor(orig, fn, shape: tuple, name: str) -> ir.LazyTensor:
    """``fn(orig)`` computed when the tensor is read (saved), not now."""
    def compute():
        from .passes.streaming import read, release

        out = apply_fn(fn, np.asarray(read(orig)))
        release(orig)  # unmap the source's pages (passes/streaming.py, rule 2)
        return ir.tensor(out, name=name)

    return ir.LazyTensor(compute, dtype=orig.dtype, shape=ir.Shape(shape), name=name)


def with_axis(shape: tuple, axis: int, n: int) -> tuple:
    out = list(shape)
    out[axis] = n
    return tuple(out)


def write_tensor(v: ir.Value, t) -> None:
    v.const_value = t
    v.shape = ir.Shape(tuple(t.shape))


def read_array(v: ir.Value) -> np.ndarray:
    if v.const_value is not None:
        return np.asarray(v.const_value.numpy())
    p = v.producer()
    return np.asarray(p.attributes["value"].value.numpy())


def write_array(v: ir.Value, arr: np.ndarray) -> None:
    t = ir.tensor(arr, name=v.name)
    p = v.producer()
    if v.const_value is None and p is not None and p.op_type == "Constant":
        p.attributes["value"] = ir.AttrTensor("value", t)
        v.shape = ir.Shape(arr.shape)
        return
    v.const_value = t
    v.shape = ir.Shape(arr.shape)

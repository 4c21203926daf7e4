"""Facts about the two models: loading, the lemon plan, output dtype, recognition (cached)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..plan import PLAN_KEY


def as_ir(model_path_or_proto):
    """(onnx-ir model, path or None) from a path, an onnx.ModelProto, bytes or an ir.Model."""
    import onnx
    import onnx_ir as ir

    from .. import io

    if isinstance(model_path_or_proto, ir.Model):
        return model_path_or_proto, None
    if isinstance(model_path_or_proto, (bytes, bytearray)):
        model_path_or_proto = onnx.load_from_string(bytes(model_path_or_proto))
    if isinstance(model_path_or_proto, onnx.ModelProto):
        return ir.serde.deserialize_model(model_path_or_proto), None
    return io.load(model_path_or_proto), Path(model_path_or_proto)


def read_plan(ir_model, notes: list) -> dict:
    text = ir_model.metadata_props.get(PLAN_KEY)
    if not text:
        return {}
    try:
        plan = json.loads(text)
        if not isinstance(plan, dict):
            raise ValueError("not an object")
        return plan
    except ValueError as exc:
        notes.append(f"the big model's metadata {PLAN_KEY} is not valid JSON ({exc}); "
                     "outputs are compared whole")
        return {}


def first_float_dtype(ir_model) -> str:
    """The precision the model computes in: its outputs' float type, or its weights' where
    they are stored in a half type."""
    import onnx_ir as ir

    names = {ir.DataType.FLOAT: "float32", ir.DataType.DOUBLE: "float64",
             ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    half = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    counts: dict = {}
    for v in ir_model.graph.initializers.values():
        if v.dtype in names and v.shape is not None and all(isinstance(d, int) for d in v.shape):
            counts[v.dtype] = counts.get(v.dtype, 0) + math.prod(v.shape)
    stored = max(counts, key=counts.get) if counts else None
    if stored in half:  # half weights behind float32 inputs and outputs (keep_io_types):
        return names[stored]  # the model computes, and rounds, in the half type
    for v in ir_model.graph.outputs:
        if v.dtype in names:
            return names[v.dtype]
    return "float32"


def describe(ir_model, cache: dict | None = None):
    """recognize(ir_model), remembered in ``cache`` (also a failure, as the exception)."""
    key = id(ir_model)
    if cache is not None and key in cache:
        result = cache[key]
    else:
        from ..recognize import recognize

        from ..passes.streaming import release_all

        try:
            result = recognize(ir_model)
        except Exception as exc:  # reported by the callers
            result = exc
        release_all(ir_model)  # the weights recognition read stay mapped otherwise
        if cache is not None:
            cache[key] = result
    if isinstance(result, Exception):
        raise result
    return result




def take(a, index, axis: int):
    """``a`` laid out along ``axis`` as ``index`` says: entry j is ``a``'s entry ``index[j]``,
    or 0 where ``index[j]`` is -1 (a stream's leftover slot in the ``zero`` form:
    ``lemon_math.StreamMap.src_index``)."""
    import numpy as np

    idx = np.asarray(index, dtype=np.int64)
    out = np.take(a, np.maximum(idx, 0), axis=axis)
    if (idx < 0).any():
        shape = [1] * out.ndim
        shape[axis] = -1
        out = np.where((idx >= 0).reshape(shape), out, np.zeros((), dtype=out.dtype))
    return out


def big_feeds(plan: dict, case: dict, big_ir) -> dict:
    """The big model's inputs for one case of the small model's: an input the plan maps (a KV
    cache, ``plan["inputs"]``) comes from the source's input it names, its KV heads taken as
    the map repeats them (a twin layer's: zeros of that shape), or laid out in a stream form
    (a decoder's encoder output: ``take``); any other input by its name.  Inputs neither
    gives are left out (the caller says which are missing)."""
    import numpy as np

    maps = plan.get("inputs") or {}
    inits = set(big_ir.graph.initializers)
    out = {}
    for v in big_ir.graph.inputs:
        if v.name in inits:
            continue
        m = maps.get(v.name)
        if m is None:
            if v.name in case:
                out[v.name] = case[v.name]
            continue
        src = case.get(m.get("from"))
        if src is None:
            continue
        a = np.asarray(src)
        if m.get("index") is not None:
            a = take(a, m["index"], int(m.get("axis", 0)))
        out[v.name] = np.zeros_like(a) if m.get("zeros") else np.ascontiguousarray(a)
    return out

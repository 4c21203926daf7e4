"""Float64 copies of a model: the arithmetic of the graph as stored, in double precision.

The algebraic level of verification runs both models with every floating-point tensor
widened to float64 (lemon-math.md, "Exact in the storage dtype" and "Verification levels"):
the stored weights are used exactly as they are (widening is exact), only the arithmetic is
done in double.  If the expansion is lossless as stored, the two float64 models agree to
float64 rounding.

Rules of the copy (``to_float64``):

1. Every float initializer (float32, float16, bfloat16) becomes float64; large ones lazily,
   cast tensor by tensor from the memory-mapped source when the copy is serialised.
2. Every float tensor attribute (``Constant``'s ``value``, ``ConstantOfShape``'s ``value``)
   becomes float64; ``Constant``'s ``value_float(s)`` become a float64 ``value`` tensor.
3. ``Cast``/``EyeLike``/``RandomNormal``-style ``to``/``dtype`` attributes naming a float
   type name ``DOUBLE`` instead (a cast *to* float32 is a rounding the copy must not do).
4. Every graph input, output and intermediate value of a float type is typed float64.
Scalar float attributes (epsilon, alpha) stay as they are: they are part of what is stored.
``stash_type`` is left alone: ONNX Runtime's and onnx's double LayerNormalization compute in
double whatever it says (measured: 5e-16 relative agreement with onnx's reference).

Running: ONNX Runtime when it has double kernels for every op; otherwise (``Erf``, ``Conv``,
``RotaryEmbedding`` have none on the CPU) onnx's reference evaluator, which computes with
numpy in the arrays' dtype.  ``run_float64`` says which engine ran.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir

from .. import io
from ..errors import RuntimeFailure
from .runtime import make_session, run_session
from ..errors import one_line

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype",
                "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                "RandomUniformLike": "dtype", "Bernoulli": "dtype", "Multinomial": "dtype"}
#: Copies whose float64 weights exceed this are written to a temporary folder for ONNX
#: Runtime instead of being serialised in memory (protobuf's 2 GB limit; bounded memory).
IN_MEMORY_BYTES = 1 << 30


def float64_bytes(model: ir.Model) -> int:
    """Bytes of the model's float initializers once widened to float64."""
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            total += t.nbytes * (8 // t.dtype.itemsize) if t.dtype in FLOAT_TYPES else t.nbytes
    return total


def _widen(t) -> ir.TensorProtocol:
    def compute(t=t):
        return ir.tensor(np.asarray(t.numpy()).astype(np.float64), name=t.name)

    return ir.LazyTensor(compute, dtype=ir.DataType.DOUBLE, shape=t.shape, name=t.name)


def _widen_attr_tensor(t) -> ir.TensorProtocol:
    return ir.tensor(np.asarray(t.numpy()).astype(np.float64), name=t.name)


def _graphs(graph: ir.Graph):
    yield graph
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def to_float64(model: ir.Model) -> ir.Model:
    """Widen ``model`` to float64 in place (rules in the module docstring); returns it.

    Tensors stored as external data that stay as they are (integers, booleans) are read into
    memory: the copy is serialised or handed to onnx's reference evaluator without the
    source's folder, so nothing in it may point at a file (whatever layout the model's
    external data has: one file, one per tensor, small tensors outside too).

    ONNX Runtime's fused ops (com.microsoft) have no float64 kernels in ONNX Runtime nor in
    onnx's reference evaluator: the copy holds their standard-op decompositions
    (``fusion.unfuse``, checked against the float32 kernels in tests/test_fusion.py)."""
    from ..fusion import unfuse

    unfuse(model)
    double = int(ir.DataType.DOUBLE)
    floats = {int(t) for t in FLOAT_TYPES}
    for graph in _graphs(model.graph):
        for v in graph.initializers.values():
            if v.const_value is not None and v.const_value.dtype in FLOAT_TYPES:
                v.const_value = _widen(v.const_value)
            elif isinstance(v.const_value, ir.ExternalTensor):
                t = v.const_value
                v.const_value = ir.tensor(np.array(t.numpy()), dtype=t.dtype, name=t.name)
        values = list(graph.inputs) + list(graph.initializers.values())
        for node in graph:
            values.extend(node.outputs)
            attr_name = _DTYPE_ATTRS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if attr_name and attr_name in node.attributes \
                    and node.attributes[attr_name].value in floats:
                node.attributes[attr_name] = ir.AttrInt64(attr_name, double)
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in FLOAT_TYPES:
                    node.attributes[name] = ir.AttrTensor(name, _widen_attr_tensor(attr.value))
            if node.op_type == "Constant":
                for name in ("value_float", "value_floats"):
                    if name in node.attributes:
                        arr = np.asarray(node.attributes.pop(name).value, dtype=np.float64)
                        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(arr))
        for v in values:
            if v.dtype in FLOAT_TYPES:
                v.dtype = ir.DataType.DOUBLE
    return model


@dataclass
class Float64Run:
    outputs: list  # one {name: array} per case
    engine: str  # "onnxruntime" | "onnx.reference"
    provider: str | None  # the ONNX Runtime provider, for engine "onnxruntime"
    note: str | None = None  # why the reference evaluator was needed
    #: a decoding chain's steps after the first case (decoding.py), and why it stopped
    chain: list | None = None
    chain_error: str | None = None


def float64_feeds(cases: Sequence[dict]) -> list[dict]:
    """The cases with their float inputs widened to float64 (the others as they are)."""
    return [{k: (np.asarray(a).astype(np.float64) if np.asarray(a).dtype.kind == "f" else a)
             for k, a in c.items()} for c in cases]


def float64_level(rule) -> dict:
    """The float64 level's description in a report, before it runs (``ran`` False)."""
    return {"ran": False, "engine": None, "rtol": rule.alg_rtol,
            "decides": rule.algebraic_decides, "why": None}


def run_float64(path: str | os.PathLike, cases: Sequence[dict], fetch: Sequence[str],
                provider: str, *, label: str, chain=None) -> Float64Run:
    """Run the float64 copy of the model at ``path`` on ``cases`` (float inputs widened) and
    return the values named in ``fetch`` (graph outputs or intermediate values).  ``chain``:
    a ``decoding.Chain`` run after the first case, fed the float64 copy's own cache."""
    model = io.load(path)
    known = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for o in node.outputs:
            known[o.name] = o
    outs = {v.name for v in model.graph.outputs}
    for n in fetch:
        if n not in outs:
            if n not in known:
                raise RuntimeFailure(f"{label} has no value named {n!r} to compare.")
            model.graph.outputs.append(known[n])
            outs.add(n)
    to_float64(model)
    feeds = float64_feeds(cases)
    big = float64_bytes(model) > IN_MEMORY_BYTES
    with tempfile.TemporaryDirectory(prefix="lemon-f64-") as tmp:
        if big:
            target = Path(tmp) / "model64.onnx"
            ir.save(model, target, external_data="model64.onnx.data")
            source: object = str(target)
        else:
            source = ir.to_proto(model).SerializeToString()
        try:
            sess, used = make_session(source, provider, label=f"{label} (float64 copy)")
        except RuntimeFailure as exc:
            why = one_line(exc.message, 300)
            sess = None
        if sess is not None:
            def run(f):
                return run_session(sess, f, f"{label} (float64 copy)", {n: n for n in fetch})
            result = Float64Run([run(f) for f in feeds], "onnxruntime", used)
        else:
            run = reference_evaluator(model, fetch, label)
            result = Float64Run([run(f) for f in feeds], "onnx.reference", None,
                                note=f"ONNX Runtime cannot run {label} in float64 ({why}); "
                                     "onnx's reference evaluator computed the float64 outputs")
        if chain is not None and result.outputs:
            result.chain, result.chain_error = chain.run(run, result.outputs[0], widen=True)
        return result


def _reference_fixes() -> list:
    """Replacements for two of onnx's reference kernels: ``Erf`` rounds to float32
    (``np.vectorize(erf, otypes=["f"])``), so BERT's GELU would leave float64; ``GatherElements``
    fails on indices of another shape than the data (``reshape`` of a wrongly sized list),
    which the type-id buffers of sentence-embedding exports have."""
    import math

    from onnx.reference.op_run import OpRun
    from onnx.reference.ops._op import OpRunUnaryNum

    class Erf(OpRunUnaryNum):
        op_domain = ""

        def _run(self, x):
            x = np.asarray(x)
            return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)

    class GatherElements(OpRun):
        op_domain = ""

        def _run(self, data, indices, axis=None):
            axis = int(axis or 0) % data.ndim
            idx = np.where(indices < 0, indices + data.shape[axis], indices)
            # the other axes of the output are those of the indices (a leading block of data)
            block = tuple(slice(None) if k == axis else slice(0, n)
                          for k, n in enumerate(idx.shape))
            return (np.take_along_axis(data[block], idx, axis=axis),)

    return [Erf, GatherElements]


def reference_evaluator(model: ir.Model, fetch: Sequence[str], label: str):
    """onnx's reference evaluator on the float64 copy: a function feeds -> {name: array}."""
    from onnx.reference import ReferenceEvaluator

    def failed(exc):  # an op neither engine computes in float64
        return RuntimeFailure(f"neither ONNX Runtime nor onnx's reference evaluator can run "
                              f"{label} in float64: {one_line(exc, 300)}")

    proto = ir.to_proto(model)  # lazy float64 tensors are computed here
    try:
        ev = ReferenceEvaluator(proto, new_ops=_reference_fixes())
    except Exception as exc:
        raise failed(exc) from None
    inputs = [i.name for i in proto.graph.input]

    def run(f: dict) -> dict:
        try:
            out = ev.run(list(fetch), {n: f[n] for n in inputs if n in f})
        except Exception as exc:
            raise failed(exc) from None
        return dict(zip(fetch, out))

    return run

"""Loading and saving models with onnx-ir.

Weights stay where they are: external data is memory-mapped by onnx-ir and only read when a
pass asks for it.  Saving is atomic: the model (and its external data) is written under a
temporary name beside the target and renamed into place only when complete, so a failed run
never leaves a partial file at the destination.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from . import datafile, graph
from .errors import InputError

#: Above this size (bytes of tensor data) a model is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Threads that compute tensors (lazy tensors: numpy releases the GIL) while the calling
#: thread writes the data file (``datafile``), and the bytes of computed tensors not yet
#: written (one tensor larger than that is admitted alone): the save streams, its memory does
#: not grow with the model.
SAVE_WORKERS = max(1, min(2, os.cpu_count() or 1))
MAX_IN_FLIGHT_BYTES = 256 << 20


def load(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` as an onnx-ir model; external weights are memory-mapped, not read."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file.", hint="Check the path to the .onnx model.")
    if p.is_dir():
        raise InputError(f"{p} is a directory, not an ONNX model file.",
                         hint="Pass the path of the .onnx file inside it.")
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes).", hint="Re-export the model.")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf gives DecodeError and others
        raise InputError(
            f"{p} is not a readable ONNX model: the protobuf could not be parsed "
            f"({type(exc).__name__}: {str(exc).strip() or 'no detail'}). The file may be "
            "truncated or not an ONNX file at all.",
            hint="Re-export or re-download the model and try again.") from None
    if not proto.graph.node:
        raise InputError(f"{p} parsed as ONNX but its graph has no nodes; the file is probably "
                         "truncated or not an ONNX model.", hint="Re-export the model.")
    _check_external_data(proto, p)
    _check_declared_sizes(proto, p)
    inferred = graph.infer_shapes_early(proto)
    try:
        model = ir.serde.deserialize_model(proto if inferred is None else inferred)
    except Exception as exc:
        raise InputError(f"{p} could not be read as an ONNX graph: {exc}.",
                         hint="Run onnx.checker.check_model on it to see what is wrong.") from None
    # Tell onnx-ir where external data lives so tensors are memory-mapped lazily.
    ir.external_data.set_base_dir(model.graph, str(p.parent.resolve()))
    if inferred is not None:
        graph.mark_shapes_inferred(model)
    return model


def _external_tensors(g: onnx.GraphProto):
    """Every tensor of ``g`` and its subgraphs stored as external data."""
    for sub in _graphs(g):
        tensors = list(sub.initializer) + [t for n in sub.node for a in n.attribute
                                           for t in ([a.t] if a.HasField("t") else [])
                                           + list(a.tensors)]
        yield from (t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)


#: The longest axis a model may declare (inputs, outputs, value_info).  The largest in the
#: exported corpus is a vocabulary of 49152; ONNX's shape inference (data propagation) spends
#: time and memory in proportion to a declared 1-D length (2**40 ran out of 23 GB after five
#: minutes: found by tests/test_fuzz.py), so a longer one is refused before it runs.
MAX_DECLARED_DIM = 1 << 24


#: element types stored several to a byte (``_nbytes`` would count one byte each)
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
           if hasattr(onnx.TensorProto, n)}


def _graphs(g: onnx.GraphProto):
    """``g`` and its subgraphs."""
    yield g
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graphs(sub)


def _check_declared_sizes(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse (exit 2) before shape inference a declared axis longer than
    ``MAX_DECLARED_DIM``, and an initializer whose dims claim more (or fewer) bytes than its
    data holds: a hostile or corrupt file, never a model to expand (nor one to spend minutes
    and gigabytes on)."""
    for g in _graphs(proto.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            shape = v.type.tensor_type.shape.dim
            dims = [d.dim_value for d in shape if d.HasField("dim_value")]
            if any(d > MAX_DECLARED_DIM for d in dims):
                said = ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                                 (d.dim_param or "?") for d in shape)
                raise InputError(
                    f"{path}: {v.name} is declared with an axis of length {max(dims)} "
                    f"([{said}]), beyond the {MAX_DECLARED_DIM} lemon-onnx accepts: "
                    "no Transformer's tensor has such an axis, so the file is corrupt. Nothing "
                    "was read further.", hint="Re-export the model.")
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") \
                    or t.data_type in _PACKED:
                continue  # external data: _check_external_data; typed fields: onnx's checker
            want = _nbytes(t)
            if want is not None and want != len(t.raw_data):
                raise InputError(
                    f"{path}: initializer {t.name!r} declares dims {list(t.dims)} "
                    f"({want} bytes) but holds {len(t.raw_data)} bytes of data: the file is "
                    "corrupt. Nothing was read further.", hint="Re-export the model.")


def _nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes of an external tensor's data, from its dims and type (None: not fixed-size)."""
    import math

    import numpy as np

    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # strings, 4-bit types: no fixed item size to check against
        return None
    if t.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
        return None
    return math.prod(t.dims) * itemsize


def external_location_problem(folder: Path, loc: str) -> str | None:
    """Why the external data ``location`` may not be read, or None: it must name a file inside
    the model's folder (relative, no ``..`` leading out, no symbolic link pointing out)."""
    if not loc:
        return "has no location"
    if "\0" in loc:
        return "has a NUL byte in its location"
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        return f"names the absolute path {loc!r}"
    base = os.path.realpath(folder)
    if os.path.normpath(loc).replace("\\", "/").split("/")[0] == "..":
        return f"names {loc!r}, outside the model's folder"
    target = os.path.realpath(os.path.join(base, loc))
    if os.path.commonpath([base, target]) != base:
        return (f"names {loc!r}, which leads outside the model's folder (to {target}, through "
                "a symbolic link)")
    return None


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """External data must be files beside the model, inside its folder: a location that is
    absolute, leads out with ``..`` or through a symbolic link is refused (exit 2) before
    anything (onnx-ir, ONNX Runtime) reads it."""
    missing, outside, short = set(), {}, []
    sizes: dict = {}
    for t in _external_tensors(proto.graph):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        problem = external_location_problem(path.parent, loc)
        if problem is not None:
            outside.setdefault(loc, (t.name, problem))
            continue
        if not (path.parent / loc).is_file():
            missing.add(loc)
            continue
        if loc not in sizes:
            sizes[loc] = (path.parent / loc).stat().st_size
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") else _nbytes(t)
        except ValueError:
            offset, length = -1, None
        if offset < 0 or (length is not None and (length < 0 or offset + length > sizes[loc])):
            short.append((t.name, loc, offset, length))
    if outside:
        loc, (name, problem) = next(iter(outside.items()))
        more = f" (and {len(outside) - 1} other location(s))" if len(outside) > 1 else ""
        raise InputError(
            f"{path}: the external data of tensor {name!r} {problem}{more}; lemon-onnx reads "
            "external data only from files inside the model's folder, and nothing was read.",
            hint="Keep the model's .data file(s) in its folder and name them by a relative "
                 "path (onnx.save_model(..., save_as_external_data=True) does).")
    if missing:
        raise InputError(
            f"{path} refers to external weight files that are not beside it: "
            f"{', '.join(sorted(missing))}.",
            hint="Copy the model's .data file(s) into the same folder as the .onnx file.")
    if short:
        name, loc, offset, length = short[0]
        more = f" (and {len(short) - 1} other tensor(s))" if len(short) > 1 else ""
        raise InputError(
            f"{path}: tensor {name!r} lies at bytes {offset}..{offset + (length or 0)} of "
            f"{loc}, which has {sizes[loc]} bytes{more}: the data file is truncated or belongs "
            "to another model.", hint="Copy the model's complete .data file(s) beside it.")


def source_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the model file (not of its external data), for the expansion plan."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
         on_progress=None) -> Path:
    """Save atomically.  With external data, tensors go to ``<name>.data`` beside the model.

    ``external_data=None`` chooses external data when the weights exceed ~1.8 GB (protobuf's
    2 GB limit).  Everything is written into a temporary folder beside the destination and then
    renamed, data file first, so an interrupted save leaves nothing at ``path``.
    ``on_progress(bytes written, bytes in all)``: called as the data file is written.
    """
    dest = Path(path).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp_model = tmpdir / dest.name
        data_name = dest.name + ".data"
        if external_data:
            previous = datafile.write(model, tmpdir, data_name, workers=SAVE_WORKERS,
                                      max_in_flight=MAX_IN_FLIGHT_BYTES,
                                      on_progress=on_progress)
            try:
                ir.save(model, tmp_model)  # the tensors now refer to the data file
            finally:
                datafile.restore(previous)
            os.replace(tmpdir / data_name, dest.parent / data_name)
        else:
            # tensors still referring to the source's external files are read in, so the
            # single-file output does not point at files beside the input
            if any(isinstance(v.const_value, ir.ExternalTensor)
                   for v in model.graph.initializers.values()):
                ir.external_data.load_to_model(model)
            ir.save(model, tmp_model)
        os.replace(tmp_model, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return dest

"""ONNX Runtime sessions: provider choice, runs, extra outputs for layerwise checks."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from ..errors import InputError, RuntimeFailure, one_line

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: ONNX Runtime's own log lines (coloured ``[E:onnxruntime:...]`` on stderr) are silenced:
#: what went wrong reaches the user inside lemon-onnx's one-paragraph message, from the
#: exception ONNX Runtime raises (4: fatal only)
ORT_LOG_SEVERITY = 4


def quiet_onnxruntime():
    """onnxruntime, its default logger silenced (``ORT_LOG_SEVERITY``)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(ORT_LOG_SEVERITY)
    return ort


def session_options(ort):
    """SessionOptions whose session and run logs are silenced like the default logger."""
    so = ort.SessionOptions()
    so.log_severity_level = ORT_LOG_SEVERITY
    return so


def _cuda_installed(ort) -> bool:
    return CUDA in ort.get_available_providers()


def make_session(path_or_bytes, provider: str = "auto", *, label: str | None = None,
                 external_data_dir: str | os.PathLike | None = None, lean: bool = False,
                 initializers: dict | None = None):
    """An ONNX Runtime session on ``provider`` ("auto" | "cuda" | "cpu").

    Returns ``(session, provider_used)`` where ``provider_used`` is what ONNX Runtime really
    runs on (``session.get_providers()[0]``).  ``external_data_dir``: where the external data of
    a model given as bytes lives.  ``lean``: no CPU memory arena and no memory pattern (a
    short-lived session run on few inputs: what they would keep cached is not reused).
    ``initializers``: {name: numpy array} for initializers the model declares as external
    data, handed to ONNX Runtime as they are (no protobuf holds their bytes).  Raises ``RuntimeFailure`` (exit 3) when CUDA is forced but
    unusable, or when ONNX Runtime cannot load the model.
    """
    ort = quiet_onnxruntime()
    if provider not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown provider {provider!r}.", hint="Use auto, cuda or cpu.")
    if label is None:
        label = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) \
            else "<in-memory model>"
    model = str(path_or_bytes) if isinstance(path_or_bytes, os.PathLike) else path_or_bytes

    def options():
        so = session_options(ort)
        if lean:
            so.enable_cpu_mem_arena = False
            so.enable_mem_pattern = False
        if external_data_dir is not None and isinstance(model, (bytes, bytearray)):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(external_data_dir))
        if initializers:
            so.add_external_initializers(
                list(initializers),
                [ort.OrtValue.ortvalue_from_numpy(a) for a in initializers.values()])
        return so

    def create(providers):
        try:
            return ort.InferenceSession(model, options(), providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeFailure(
                f"ONNX Runtime could not load {label}: {one_line(exc)}",
                hint="Check that the model is valid (onnx.checker) and that this onnxruntime "
                     "supports its opset and operators.") from None

    cuda_providers = [(CUDA, {"use_tf32": "0"}), CPU]
    if provider == "cpu":
        sess = create([CPU])
        return sess, sess.get_providers()[0]
    if provider == "cuda":
        if not _cuda_installed(ort):
            raise RuntimeFailure(
                "--provider cuda was requested but this onnxruntime has no CUDA execution "
                f"provider (available: {', '.join(ort.get_available_providers())}).",
                hint="Install onnxruntime-gpu matching your CUDA version, or use --provider "
                     "cpu or auto.")
        sess = create(cuda_providers)
        used = sess.get_providers()[0]
        if used != CUDA:
            raise RuntimeFailure(
                f"--provider cuda was requested but ONNX Runtime could not start CUDA for "
                f"{label} and fell back to {used} (no GPU visible, or a driver/CUDA/cuDNN "
                "library mismatch).",
                hint="Check nvidia-smi and the onnxruntime-gpu CUDA requirements, or use "
                     "--provider cpu or auto.")
        return sess, used
    # auto
    if _cuda_installed(ort):
        try:
            sess = create(cuda_providers)
        except RuntimeFailure:
            sess = None  # maybe CUDA itself; the CPU attempt below tells
        if sess is not None:  # on the GPU, or ONNX Runtime already fell back to the CPU
            return sess, sess.get_providers()[0]
    sess = create([CPU])
    return sess, sess.get_providers()[0]


def run_session(sess, feeds: dict, label: str, fetch: Mapping[str, str] | None = None) -> dict:
    """Run and return {wanted name: array}; ``fetch`` maps wanted names to session outputs."""
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise InputError(f"{label} needs input(s) {', '.join(missing)} that the inputs do not "
                         "provide.", hint="Add them to the .npz (keys case<k>/<input name>).")
    if fetch is None:
        fetch = {o.name: o.name for o in sess.get_outputs()}
    names = list(fetch)
    try:
        out = sess.run([fetch[n] for n in names], {n: feeds[n] for n in wanted},
                       _run_options())
    except Exception as exc:
        raise RuntimeFailure(f"ONNX Runtime could not run {label}: {one_line(exc)}",
                             hint="Check the inputs' shapes and dtypes against the model's "
                                  "inputs.") from None
    return dict(zip(names, out))


def _run_options():
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.log_severity_level = ORT_LOG_SEVERITY
    return ro


_F32_SUFFIX = "__lemon_f32"


def prepare(path, ir_model, extra: Sequence[str] = (), fallback_elem: int | None = None):
    """What to give ONNX Runtime for ``path``: ``(path_or_bytes, fetch)``.

    ``fetch`` maps each wanted value name (the graph outputs, then ``extra``) to the name the
    session produces.  The model file is used as is unless values must be added as outputs
    (layerwise) or an output is bfloat16, which numpy cannot hold: then an in-memory copy
    (external data left where it is) gets the extra outputs and an exact ``Cast`` to float32
    after each bfloat16 one.  Nothing is written to disk.
    """
    import onnx
    import onnx_ir as ir

    outs = [(v.name, v.dtype) for v in ir_model.graph.outputs]
    bf16 = ir.DataType.BFLOAT16
    if not extra and not any(dt == bf16 for _, dt in outs):
        return str(path), {n: n for n, _ in outs}
    proto = onnx.load(str(path), load_external_data=False)
    values = {}
    for node in ir_model.graph:
        for o in node.outputs:
            values[o.name] = o
    vi = {v.name: v for v in proto.graph.value_info}
    fetch: dict = {}
    graph_outputs = {o.name: o for o in proto.graph.output}
    cast_nodes = []

    def cast(name: str) -> str:
        new = name + _F32_SUFFIX
        cast_nodes.append(onnx.helper.make_node("Cast", [name], [new], to=onnx.TensorProto.FLOAT,
                                                name="lemon_verify_cast_" + name))
        return new

    for o in list(proto.graph.output):
        if o.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
            new = cast(o.name)
            proto.graph.output.append(onnx.helper.make_tensor_value_info(
                new, onnx.TensorProto.FLOAT, None))
            fetch[o.name] = new
        else:
            fetch[o.name] = o.name
    for n in extra:
        if n in fetch:
            continue
        elem = None
        v = values.get(n)
        if v is not None and v.dtype is not None:
            elem = int(v.dtype)
        elif n in vi and vi[n].type.tensor_type.elem_type:
            elem = vi[n].type.tensor_type.elem_type
        elem = elem or fallback_elem or onnx.TensorProto.FLOAT
        if elem == onnx.TensorProto.BFLOAT16:
            fetch[n] = cast(n)
            proto.graph.output.append(onnx.helper.make_tensor_value_info(
                fetch[n], onnx.TensorProto.FLOAT, None))
        else:
            fetch[n] = n
            if n not in graph_outputs:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(n, elem, None))
    proto.graph.node.extend(cast_nodes)
    return proto.SerializeToString(), fetch


def available_providers() -> list:
    import onnxruntime as ort

    return ort.get_available_providers()

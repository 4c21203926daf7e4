"""Numerical equivalence of an expanded model and its source, measured with ONNX Runtime.

``verify(small, big)`` runs both models on the same inputs and compares every output of the
small model with the output of the same name in the big one.

Inputs
    Deterministic and realistic (``synthesize_inputs``), seeded: token ids drawn in
    ``[0, vocab)`` with the vocabulary read from the recognised embedding table (100 when it
    cannot be recognised), attention masks of ones with trailing padding in the last row (never
    an all-zero row), token type ids half 0 / half 1 (only values below the row count of the
    token-type table), position ids ``arange``, float inputs (pixel values) standard normal.
    Dynamic axes take two (batch, sequence) cases: (2, 7) and (3, 11).  Or the user's own
    ``.npz``: keys ``<input name>`` (one case) or ``case<k>/<input name>`` (several cases; the
    fixtures' ``case<k>/in/<input name>`` layout is read too).  ``save_inputs`` writes the
    ``case<k>/<input name>`` layout.

Which outputs are compared, and how
    By name.  The big model's ``metadata_props["lemon.plan"]`` (JSON, written by ``expand``)
    may map an output: ``{"compare": "prefix", "axis": -1, "size": d}`` compares
    ``big[..., :d]`` with the small output, ``{"compare": "whole"}`` (or no entry) compares whole
    arrays, which must have the same shape.  An output whose shapes differ without a prefix map is
    never sliced silently: it fails, and the report says why.

The element rule (Polygraphy's)
    An element fails only if ``|big - small| > atol`` AND ``|big - small| > rtol * |small|``;
    the small model is the reference.  Errors are computed in float64.  NaN or Inf at the same
    position with the same value in both count as equal; a NaN/Inf in one model only always
    fails (and makes ``min_atol``/``min_rtol`` infinite).  Statistics are over the elements
    finite in both models:

    - ``max_abs``, ``mean_abs``: of ``|big - small|``;
    - ``max_rel``: ``max |big - small| / |small|``, where ``0/0 = 0`` and ``x/0 = inf``
      (so an exact zero in the reference with any difference gives ``inf``: honest, and the
      reason the element rule also has an ``atol``);
    - ``min_atol``: the smallest atol with which every element passes at the given rtol,
      ``max(|d| over elements with |d| > rtol*|ref|)`` (0 if none);
    - ``min_rtol``: the smallest rtol with which every element passes at the given atol,
      ``max(|d|/|ref| over elements with |d| > atol)`` (0 if none; inf if such an element
      has ``ref == 0``).

Default tolerances (``default_tolerances``), chosen from the small model's first float output:

    ========  ======  ======
    dtype     atol    rtol
    ========  ======  ======
    float32   1e-4    1e-3
    float64   1e-4    1e-3
    float16   1e-2    1e-2
    bfloat16  5e-2    5e-2
    ========  ======  ======

    A float32 LEMON expansion matches at rounding level (max abs error ~1e-6 on the fixtures),
    so the float32 defaults leave a margin of about 100x while still catching a single wrong
    weight.  Half precision rounds at ~1e-3 (fp16) and ~8e-3 (bf16) relative.

Providers
    ``auto``: CUDA when onnxruntime-gpu is installed *and* a session really runs on the GPU
    (``session.get_providers()[0]``; ONNX Runtime silently falls back to the CPU when CUDA
    cannot start), else CPU.  ``cuda``: CUDA or ``RuntimeFailure`` (exit 3).  ``cpu``: CPU.
    TF32 is disabled on CUDA (``use_tf32=0``).  The report names the provider that really ran.
    A model ONNX Runtime cannot load or run raises ``RuntimeFailure`` naming the model and
    ONNX Runtime's message on one line.

Layerwise (``layerwise=True``)
    Both models are recognised; in-memory copies of both graphs get the values leaving every
    block (``ModelDescription.blocks[i].output``) as extra graph outputs (nothing is written to
    disk; external data is read from the models' own folders).  Small block ``i`` is compared
    with big block ``plan["blocks"][str(i)]`` (identity by default) on the first ``d``
    coordinates of the last axis (``d`` = ``plan["source"]["hidden"]``, default the small
    model's hidden size), with the same atol/rtol.  ``first_divergent_block`` is the first
    small block whose hidden state fails.  The main pass/fail verdict is taken on the
    untouched models' outputs only (extra outputs can change ONNX Runtime's fusions); a
    layerwise divergence with matching outputs is reported in ``notes``.

Files
    Nothing is written except ``save_inputs``.

JSON report (``VerifyReport.to_dict()`` / ``to_json()``); non-finite floats are the strings
``"inf"``, ``"-inf"``, ``"nan"``::

    {
      "passed": bool,                     # every output of every case passed
      "small": str, "big": str,           # model paths (or "<in-memory>")
      "provider_requested": "auto"|"cuda"|"cpu",
      "provider_used": str,               # e.g. "CPUExecutionProvider", "CUDAExecutionProvider"
      "atol": float, "rtol": float,
      "dtype": "float32"|"float16"|"bfloat16"|"float64",   # of the small model's outputs
      "cases": [                          # one per input case
        {"shapes": {input_name: [int, ...]},
         "outputs": [                     # one per output of the small model
           {"name": str, "shape_small": [int], "shape_big": [int] | null,
            "compared": "whole" | "prefix:<d>" | "prefix:<d>@axis<k>" | "not compared",
            "max_abs": float, "mean_abs": float, "max_rel": float,
            "nan_small": int, "nan_big": int, "inf_small": int, "inf_big": int,
            "min_atol": float, "min_rtol": float,
            "failed_elements": int, "elements": int, "passed": bool,
            "message": str | null}]}],     # why an output failed without numbers
      "first_divergent_block": int | null,
      "layerwise": null | [               # null unless layerwise=True and recognition worked
        {"block": int, "big_block": int, "value_small": str, "value_big": str,
         "compared": "prefix:<d>" | "whole", "max_abs": float, "mean_abs": float,
         "max_rel": float, "min_atol": float, "min_rtol": float,
         "failed_elements": int, "elements": int, "passed": bool, "message": str | null}],
      "seconds": float,                   # wall time of the whole verification
      "timings": {phase: seconds},        # load, sessions, runs, compare, layerwise
      "notes": [str]
    }
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError, LemonError, RuntimeFailure

PLAN_KEY = "lemon.plan"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_CASES = ((2, 7), (3, 11))
FALLBACK_VOCAB = 100

_TOLERANCES = {
    "float32": (1e-4, 1e-3),
    "float64": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "float32": "float32", "single": "float32",
    "fp64": "float64", "double": "float64", "float64": "float64",
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


# --------------------------------------------------------------------------- report types
@dataclasses.dataclass
class OutputReport:
    """Comparison of one output (or one block's hidden state) in one input case."""

    name: str
    shape_small: list | None
    shape_big: list | None
    compared: str  # "whole" | "prefix:<d>" | "prefix:<d>@axis<k>" | "not compared"
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    nan_small: int = 0
    nan_big: int = 0
    inf_small: int = 0
    inf_big: int = 0
    min_atol: float = 0.0
    min_rtol: float = 0.0
    failed_elements: int = 0
    elements: int = 0
    passed: bool = True
    message: str | None = None


@dataclasses.dataclass
class VerifyReport:
    passed: bool
    provider_requested: str
    provider_used: str
    atol: float
    rtol: float
    dtype: str
    cases: list  # [{"shapes": {name: [..]}, "outputs": [OutputReport]}]
    first_divergent_block: int | None = None
    layerwise: list | None = None
    seconds: float = 0.0
    notes: list = dataclasses.field(default_factory=list)
    small: str = ""
    big: str = ""
    timings: dict = dataclasses.field(default_factory=dict)

    # -- worst numbers over all cases, handy for one-line summaries
    @property
    def max_abs(self) -> float:
        return max((o.max_abs for c in self.cases for o in c["outputs"]), default=0.0)

    def failed_outputs(self) -> list:
        return sorted({o.name for c in self.cases for o in c["outputs"] if not o.passed})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return _jsonable(d)

    def to_json(self, **kw: Any) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    def format(self) -> str:
        """A human-readable table."""
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"verify {self.small or '?'} -> {self.big or '?'}: {verdict}",
                 f"  provider {self.provider_used} (requested {self.provider_requested}), "
                 f"{self.dtype}, atol {self.atol:g}, rtol {self.rtol:g}, {self.seconds:.2f}s"]
        head = (f"  {'output':<24} {'compared':<12} {'max_abs':>9} {'mean_abs':>9} "
                f"{'max_rel':>9} {'min_atol':>9} {'min_rtol':>9} {'nan s/b':>8} "
                f"{'inf s/b':>8} {'failed':>9}  result")
        for k, case in enumerate(self.cases):
            shapes = ", ".join(f"{n}{list(s)}" for n, s in case["shapes"].items())
            lines.append(f"  case {k}: {shapes}")
            lines.append(head)
            for o in case["outputs"]:
                lines.append(_row(o.name, o))
                if o.message:
                    lines.append(f"      {o.message}")
        if self.layerwise is not None:
            lines.append("  layerwise (hidden state leaving each block, worst over cases):")
            lines.append(head.replace("output  ", "block   ", 1))
            for b in self.layerwise:
                label = f"{b['block']} -> {b['big_block']}"
                lines.append(_row(label, _Obj(b)))
                if b.get("message"):
                    lines.append(f"      {b['message']}")
            fdb = self.first_divergent_block
            lines.append("  first divergent block: " + ("none" if fdb is None else str(fdb)))
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


class _Obj:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def _g(x: float) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.2e}"


def _row(label: str, o) -> str:
    result = "ok" if o.passed else "FAIL"
    failed = f"{o.failed_elements}/{o.elements}" if o.elements else str(o.failed_elements)
    return (f"  {label:<24} {o.compared:<12} {_g(o.max_abs):>9} {_g(o.mean_abs):>9} "
            f"{_g(o.max_rel):>9} {_g(o.min_atol):>9} {_g(o.min_rtol):>9} "
            f"{f'{o.nan_small}/{o.nan_big}':>8} {f'{o.inf_small}/{o.inf_big}':>8} "
            f"{failed:>9}  {result}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# --------------------------------------------------------------------------- tolerances
def _dtype_name(dtype) -> str:
    """Canonical float dtype name from a string, numpy dtype, onnx elem type or onnx-ir type."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        import onnx

        return {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64",
                onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16"}.get(int(dtype), "float32")
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    key = str(name).lower().replace("datatype.", "")
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    raise ValueError(f"no default tolerances for dtype {dtype!r}; use one of "
                     f"{', '.join(sorted(_TOLERANCES))}")


def default_tolerances(dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of ``dtype``: float32/float64 (1e-4, 1e-3), float16
    (1e-2, 1e-2), bfloat16 (5e-2, 5e-2).  Accepts names ("fp16", "bf16", "float32"), numpy
    dtypes, ONNX elem types and onnx-ir data types."""
    return _TOLERANCES[_dtype_name(dtype)]


# --------------------------------------------------------------------------- comparison
def compare_arrays(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float, *,
                   name: str = "", compared: str = "whole") -> OutputReport:
    """Compare ``got`` (big) with ``ref`` (small) of equal shape by Polygraphy's rule."""
    ref = _as_f64(ref)
    got = _as_f64(got)
    rep = OutputReport(name=name, shape_small=list(ref.shape), shape_big=list(got.shape),
                       compared=compared, elements=int(ref.size))
    nan_r, nan_g = np.isnan(ref), np.isnan(got)
    inf_r, inf_g = np.isinf(ref), np.isinf(got)
    rep.nan_small, rep.nan_big = int(nan_r.sum()), int(nan_g.sum())
    rep.inf_small, rep.inf_big = int(inf_r.sum()), int(inf_g.sum())
    finite = ~(nan_r | nan_g | inf_r | inf_g)
    same_nonfinite = (nan_r & nan_g) | (inf_r & inf_g & (ref == got))
    bad_nonfinite = int((~finite & ~same_nonfinite).sum())
    r, g = ref[finite], got[finite]
    diff = np.abs(g - r)
    absr = np.abs(r)
    if diff.size:
        rep.max_abs = float(diff.max())
        rep.mean_abs = float(diff.mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(diff == 0, 0.0, diff / absr)
        rep.max_rel = float(rel.max())
        over_atol = diff > atol
        over_rtol = diff > rtol * absr
        failed = over_atol & over_rtol
        rep.failed_elements = int(failed.sum()) + bad_nonfinite
        rep.min_atol = float(diff[over_rtol].max()) if over_rtol.any() else 0.0
        rep.min_rtol = float(rel[over_atol].max()) if over_atol.any() else 0.0
    else:
        rep.failed_elements = bad_nonfinite
    if bad_nonfinite:
        rep.min_atol = rep.min_rtol = math.inf
        rep.message = (f"{bad_nonfinite} element(s) are NaN/Inf in one model but not the "
                       "other")
    rep.passed = rep.failed_elements == 0
    return rep


def _as_f64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # raw bfloat16 bits
        a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if a.dtype.name == "bfloat16":  # ml_dtypes
        a = a.astype(np.float32)
    return a.astype(np.float64)


def compare_output(name: str, small: np.ndarray, big: np.ndarray | None, mapping: dict | None,
                   atol: float, rtol: float) -> OutputReport:
    """Apply the plan's output map (or none) and compare."""
    ss = list(np.shape(small))
    if big is None:
        return OutputReport(name=name, shape_small=ss, shape_big=None, compared="not compared",
                            passed=False, elements=int(np.size(small)),
                            message=f"the big model has no output named {name!r}")
    sb = list(np.shape(big))
    kind = (mapping or {}).get("compare", "whole")
    if kind == "prefix":
        axis = int(mapping.get("axis", -1))
        size = mapping.get("size")
        nd = len(sb)
        if not -nd <= axis < nd or len(ss) != nd:
            return _not_compared(name, ss, sb, f"the plan maps {name!r} by prefix on axis "
                                 f"{axis}, which does not fit shapes {ss} (small) and {sb} (big)")
        ax = axis % nd
        size = ss[ax] if size is None else int(size)
        others_ok = all(sb[i] == ss[i] for i in range(nd) if i != ax)
        if size != ss[ax] or sb[ax] < size or not others_ok:
            return _not_compared(name, ss, sb, f"the plan compares {name!r} on the first {size} "
                                 f"entries of axis {axis}, but the shapes are {ss} (small) and "
                                 f"{sb} (big)")
        sl = [slice(None)] * nd
        sl[ax] = slice(0, size)
        label = f"prefix:{size}" if ax == nd - 1 else f"prefix:{size}@axis{ax}"
        rep = compare_arrays(small, np.asarray(big)[tuple(sl)], atol, rtol, name=name,
                             compared=label)
        rep.shape_big = sb
        return rep
    if kind != "whole":
        return _not_compared(name, ss, sb, f"the plan's output map for {name!r} has an unknown "
                             f"compare mode {kind!r} (expected 'whole' or 'prefix')")
    if ss != sb:
        if len(ss) == len(sb) and ss[:-1] == sb[:-1] and sb[-1] > ss[-1]:
            why = (f"shapes differ: {ss} (small) vs {sb} (big). The big model's last axis is "
                   f"larger, but its metadata (lemon.plan) has no prefix map for {name!r}, so "
                   "it is not compared (never sliced silently); models expanded by lemon-onnx "
                   "carry that map")
        else:
            why = f"shapes differ: {ss} (small) vs {sb} (big)"
        return _not_compared(name, ss, sb, why)
    return compare_arrays(small, big, atol, rtol, name=name, compared="whole")


def _not_compared(name, ss, sb, message) -> OutputReport:
    n = int(np.prod(ss)) if ss else 1
    return OutputReport(name=name, shape_small=ss, shape_big=sb, compared="not compared",
                        max_abs=math.inf, mean_abs=math.inf, max_rel=math.inf,
                        min_atol=math.inf, min_rtol=math.inf, failed_elements=n, elements=n,
                        passed=False, message=message)


def _aggregate(reps: Sequence[OutputReport]) -> OutputReport:
    """Worst case over input cases (mean weighted by element count)."""
    first = reps[0]
    n = sum(r.elements for r in reps)
    mean = (sum(r.mean_abs * r.elements for r in reps) / n) if n else 0.0
    msgs = [r.message for r in reps if r.message]
    return OutputReport(
        name=first.name, shape_small=first.shape_small, shape_big=first.shape_big,
        compared=first.compared, max_abs=max(r.max_abs for r in reps), mean_abs=mean,
        max_rel=max(r.max_rel for r in reps), nan_small=sum(r.nan_small for r in reps),
        nan_big=sum(r.nan_big for r in reps), inf_small=sum(r.inf_small for r in reps),
        inf_big=sum(r.inf_big for r in reps), min_atol=max(r.min_atol for r in reps),
        min_rtol=max(r.min_rtol for r in reps),
        failed_elements=sum(r.failed_elements for r in reps), elements=n,
        passed=all(r.passed for r in reps), message=msgs[0] if msgs else None)


# --------------------------------------------------------------------------- sessions
def _one_line(msg: str, limit: int = 600) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cuda_installed(ort) -> bool:
    return CUDA in ort.get_available_providers()


def make_session(path_or_bytes, provider: str = "auto", *, label: str | None = None,
                 external_data_dir: str | os.PathLike | None = None):
    """An ONNX Runtime session on ``provider`` ("auto" | "cuda" | "cpu").

    Returns ``(session, provider_used)`` where ``provider_used`` is what ONNX Runtime really
    runs on (``session.get_providers()[0]``).  ``external_data_dir``: where the external data of
    a model given as bytes lives.  Raises ``RuntimeFailure`` (exit 3) when CUDA is forced but
    unusable, or when ONNX Runtime cannot load the model.
    """
    import onnxruntime as ort

    if provider not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown provider {provider!r}.", hint="Use auto, cuda or cpu.")
    if label is None:
        label = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) \
            else "<in-memory model>"
    model = str(path_or_bytes) if isinstance(path_or_bytes, os.PathLike) else path_or_bytes

    def options():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if external_data_dir is not None and isinstance(model, (bytes, bytearray)):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(external_data_dir))
        return so

    def create(providers):
        try:
            return ort.InferenceSession(model, options(), providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeFailure(
                f"ONNX Runtime could not load {label}: {_one_line(exc)}",
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


def _run(sess, feeds: dict, label: str, fetch: Mapping[str, str] | None = None) -> dict:
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
        out = sess.run([fetch[n] for n in names], {n: feeds[n] for n in wanted})
    except Exception as exc:
        raise RuntimeFailure(f"ONNX Runtime could not run {label}: {_one_line(exc)}",
                             hint="Check the inputs' shapes and dtypes against the model's "
                                  "inputs.") from None
    return dict(zip(names, out))


# --------------------------------------------------------------------------- model facts
def _as_ir(model_path_or_proto):
    """(onnx-ir model, path or None) from a path, an onnx.ModelProto, bytes or an ir.Model."""
    import onnx
    import onnx_ir as ir

    from . import io

    if isinstance(model_path_or_proto, ir.Model):
        return model_path_or_proto, None
    if isinstance(model_path_or_proto, (bytes, bytearray)):
        model_path_or_proto = onnx.load_from_string(bytes(model_path_or_proto))
    if isinstance(model_path_or_proto, onnx.ModelProto):
        return ir.serde.deserialize_model(model_path_or_proto), None
    return io.load(model_path_or_proto), Path(model_path_or_proto)


def _plan(ir_model, notes: list) -> dict:
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


def _first_float_dtype(ir_model) -> str:
    import onnx_ir as ir

    names = {ir.DataType.FLOAT: "float32", ir.DataType.DOUBLE: "float64",
             ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    for v in ir_model.graph.outputs:
        if v.dtype in names:
            return names[v.dtype]
    return "float32"


# --------------------------------------------------------------------------- inputs
def _describe(ir_model, cache: dict | None = None):
    """recognize(ir_model), remembered in ``cache`` (also a failure, as the exception)."""
    key = id(ir_model)
    if cache is not None and key in cache:
        result = cache[key]
    else:
        from .recognize import recognize

        try:
            result = recognize(ir_model)
        except Exception as exc:  # reported by the callers
            result = exc
        if cache is not None:
            cache[key] = result
    if isinstance(result, Exception):
        raise result
    return result


def _recognised_facts(ir_model, cache: dict | None = None
                      ) -> tuple[int | None, int | None, str | None]:
    """(vocab, token-type rows, reason recognition failed)."""
    try:
        desc = _describe(ir_model, cache)
    except Exception as exc:  # any failure: fall back, and say so
        return None, None, _one_line(str(exc) or type(exc).__name__, 200)
    rows = None
    tt = desc.embeddings.token_type
    if tt and tt in ir_model.graph.initializers:
        shape = ir_model.graph.initializers[tt].shape
        if shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
            rows = int(shape[0])
    return desc.vocab, rows, None


def _role(name: str, dtype: np.dtype) -> str:
    n = name.lower()
    if "token_type" in n or "segment" in n:
        return "token_type"
    if "position" in n:
        return "position"
    if "mask" in n:
        return "mask"
    if dtype.kind in "iu" and ("input_ids" in n or n == "ids" or n.endswith("_ids")
                               or n.endswith("tokens")):
        return "ids"
    if dtype.kind == "f":
        return "float"
    return "other"


def _dim_values(ir_model, b: int, s: int) -> dict:
    """Symbolic dim name -> size, shared by all inputs."""
    sizes: dict = {}
    order = 0
    for v in ir_model.graph.inputs:
        if v.shape is None:
            continue
        for ax, d in enumerate(v.shape.dims):
            if isinstance(d, int):
                continue
            key = getattr(d, "value", None)
            if key is None or key in sizes:
                continue
            k = key.lower()
            if "past" in k:
                sizes[key] = 0
            elif "batch" in k:
                sizes[key] = b
            elif any(t in k for t in ("seq", "len", "token", "time", "position", "total")):
                sizes[key] = s
            else:
                sizes[key] = b if (ax == 0 and order == 0) else s
                order += 1
    return sizes


def _synthesize(ir_model, *, seed: int, vocab: int | None, cases,
                cache: dict | None = None) -> tuple[list, list]:
    notes: list = []
    inits = set(ir_model.graph.initializers)
    inputs = [v for v in ir_model.graph.inputs if v.name not in inits]
    specs = []
    for v in inputs:
        if v.dtype is None or v.shape is None:
            raise InputError(f"input {v.name!r} has no declared {'dtype' if v.dtype is None else 'shape'}"
                             ", so inputs cannot be synthesised for it.",
                             hint="Pass your own inputs with --inputs FILE.npz.")
        try:
            npdt = np.dtype(v.dtype.numpy())
        except Exception:
            raise InputError(f"input {v.name!r} has dtype {v.dtype}, which numpy cannot "
                             "represent.", hint="Pass your own inputs with --inputs FILE.npz."
                             ) from None
        specs.append((v, npdt, _role(v.name, npdt)))
    tt_rows = None
    if any(r in ("ids", "token_type") for _, _, r in specs):
        rec_vocab, tt_rows, why = _recognised_facts(ir_model, cache)
        if vocab is None:
            vocab = rec_vocab
            if vocab is None:
                vocab = FALLBACK_VOCAB
                notes.append(f"vocabulary size not recognised ({why or 'no token embedding'}); "
                             f"token ids drawn from [0, {FALLBACK_VOCAB})")
    out = []
    for k, (b, s) in enumerate(cases):
        rng = np.random.default_rng([int(seed), k])
        sizes = _dim_values(ir_model, int(b), int(s))
        feeds = {}
        for v, npdt, role in specs:
            shape = []
            for ax, d in enumerate(v.shape.dims):
                if isinstance(d, int):
                    shape.append(d)
                else:
                    key = getattr(d, "value", None)
                    shape.append(sizes[key] if key in sizes else (b if ax == 0 else s))
            shape = tuple(shape)
            if role == "ids":
                a = rng.integers(0, vocab, size=shape)
            elif role == "mask":
                a = np.ones(shape)
                if a.ndim == 2 and shape[0] >= 1 and shape[1] >= 2:
                    pad = min(shape[1] - 1, max(1, shape[1] // 4))
                    a[-1, shape[1] - pad:] = 0
            elif role == "token_type":
                a = np.zeros(shape)
                n_types = 2 if tt_rows is None else min(2, tt_rows)
                if n_types >= 2 and a.ndim >= 1 and shape[-1] >= 2:
                    a[..., shape[-1] // 2:] = 1
            elif role == "position":
                a = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).copy() \
                    if shape else np.zeros(())
            elif role == "float":
                a = rng.standard_normal(shape)
            else:
                a = np.zeros(shape)
            feeds[v.name] = np.ascontiguousarray(a.astype(npdt))
        out.append(feeds)
    return out, notes


def synthesize_inputs(model_path_or_proto, *, seed: int = 0, vocab: int | None = None,
                      cases: Iterable = DEFAULT_CASES) -> list[dict[str, np.ndarray]]:
    """Deterministic realistic inputs for the model's graph inputs, one dict per
    (batch, sequence) case; see the module docstring for the rules."""
    ir_model, _ = _as_ir(model_path_or_proto)
    feeds, _ = _synthesize(ir_model, seed=seed, vocab=vocab, cases=tuple(cases))
    return feeds


_CASE_KEY = re.compile(r"^case(\d+)/(.+)$")


def load_inputs(path) -> list[dict[str, np.ndarray]]:
    """Cases from an .npz: keys ``<input>`` (one case) or ``case<k>/<input>`` (the fixtures'
    ``case<k>/in/<input>`` layout too; ``case<k>/out/...`` is ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such inputs file.", hint="Pass an .npz made by numpy.savez.")
    try:
        data = np.load(p, allow_pickle=False)
        keys = list(data.files)
        arrays = {k: data[k] for k in keys}
    except Exception as exc:
        raise InputError(f"{p} is not a readable .npz file ({_one_line(exc, 200)}).",
                         hint="Write it with numpy.savez(path, **{'case0/input_ids': ...}).") \
            from None
    if not arrays:
        raise InputError(f"{p} contains no arrays.", hint="Write at least one input.")
    matched = {k: _CASE_KEY.match(k) for k in keys}
    if all(matched.values()):
        rests = [m.group(2) for m in matched.values()]
        io_layout = all(r.startswith(("in/", "out/")) for r in rests)
        cases: dict[int, dict] = {}
        for k, m in matched.items():
            rest = m.group(2)
            if io_layout:
                if rest.startswith("out/"):
                    continue
                rest = rest[3:]
            cases.setdefault(int(m.group(1)), {})[rest] = arrays[k]
        return [cases[i] for i in sorted(cases)]
    if any(matched.values()):
        raise InputError(f"{p} mixes case<k>/<input> keys with plain <input> keys.",
                         hint="Use one layout for all keys.")
    return [arrays]


def save_inputs_npz(cases: Sequence[Mapping[str, np.ndarray]], path) -> Path:
    """Write cases as ``case<k>/<input>`` (no '.npz' suffix is added to ``path``)."""
    p = Path(path)
    flat = {f"case{k}/{n}": np.asarray(a) for k, c in enumerate(cases) for n, a in c.items()}
    with open(p, "wb") as f:
        np.savez(f, **flat)
    return p


def _conform(cases: list, ir_model, label: str, notes: list) -> list:
    """Check user inputs against the graph inputs; cast within a kind (int32->int64)."""
    inits = set(ir_model.graph.initializers)
    decl = {v.name: v for v in ir_model.graph.inputs if v.name not in inits}
    out = []
    for k, case in enumerate(cases):
        feeds = dict(case)
        missing = [n for n in decl if n not in feeds]
        if missing:
            raise InputError(f"inputs case {k} lacks {', '.join(missing)}, which {label} needs "
                             f"(given: {', '.join(sorted(feeds)) or 'nothing'}).",
                             hint="Add them to the .npz under case<k>/<input name>.")
        for n, v in decl.items():
            a = np.asarray(feeds[n])
            if v.shape is not None and a.ndim != len(v.shape):
                raise InputError(f"inputs case {k}: {n!r} has shape {list(a.shape)} but the "
                                 f"model declares rank {len(v.shape)} ({v.shape}).",
                                 hint="Fix the array in the .npz.")
            try:
                want = np.dtype(v.dtype.numpy()) if v.dtype is not None else a.dtype
            except Exception:
                want = a.dtype
            if a.dtype != want:
                if a.dtype.kind == want.kind or (a.dtype.kind in "iub" and want.kind in "iub"):
                    notes.append(f"case {k}: {n} cast from {a.dtype} to {want}")
                    a = a.astype(want)
                else:
                    raise InputError(f"inputs case {k}: {n!r} is {a.dtype} but the model wants "
                                     f"{want}.", hint="Fix the array's dtype in the .npz.")
            feeds[n] = np.ascontiguousarray(a)
        out.append(feeds)
    return out


# --------------------------------------------------------------------------- layerwise
_F32_SUFFIX = "__lemon_f32"


def _prepare(path, ir_model, extra: Sequence[str] = (), fallback_elem: int | None = None):
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


def _layerwise(small_path, big_path, small_ir, big_ir, plan: dict, feeds_list: list,
               provider: str, atol: float, rtol: float, notes: list, cache: dict | None = None):
    import onnx

    descs = []
    for which, m in (("small", small_ir), ("big", big_ir)):
        try:
            descs.append(_describe(m, cache))
        except Exception as exc:  # recognition is best effort here: the outputs still count
            why = str(exc) if isinstance(exc, LemonError) else f"{type(exc).__name__}: {exc}"
            notes.append(f"layerwise skipped: the {which} model was not recognised "
                         f"({_one_line(why, 300)})")
            return None, None
    ds, db = descs
    bmap = plan.get("blocks") or {str(i): i for i in range(len(ds.blocks))}
    hidden = int((plan.get("source") or {}).get("hidden") or ds.hidden)
    pairs = []
    for i, b in enumerate(ds.blocks):
        j = bmap.get(str(i), bmap.get(i))
        if j is None or not (0 <= int(j) < len(db.blocks)):
            notes.append(f"layerwise: block {i} of the small model has no counterpart in the "
                         f"big model (map gives {j!r}, the big model has {len(db.blocks)} "
                         "blocks)")
            continue
        pairs.append((i, int(j), b.output, db.blocks[int(j)].output))
    if not pairs:
        return [], None
    elem = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
            "bfloat16": onnx.TensorProto.BFLOAT16,
            "float64": onnx.TensorProto.DOUBLE}[_first_float_dtype(small_ir)]
    s_names = sorted({p[2] for p in pairs})
    b_names = sorted({p[3] for p in pairs})
    results = {}
    for side, path, ir_model, names in (("small", small_path, small_ir, s_names),
                                        ("big", big_path, big_ir, b_names)):
        data, fetch = _prepare(path, ir_model, names, elem)
        label = f"{path} (with block outputs added)"
        sess, _ = make_session(data, provider, label=label,
                               external_data_dir=Path(path).resolve().parent)
        fetch = {n: fetch[n] for n in names}
        results[side] = [_run(sess, f, label, fetch) for f in feeds_list]
        del sess
    rows = []
    first = None
    for i, j, vs, vb in pairs:
        reps = []
        for k in range(len(feeds_list)):
            a = results["small"][k][vs]
            bb = results["big"][k][vb]
            d = a.shape[-1] if a.ndim else hidden
            mapping = {"compare": "prefix", "axis": -1, "size": d} \
                if (bb.ndim and a.ndim and bb.shape[-1] != a.shape[-1]) else None
            reps.append(compare_output(vs, a, bb, mapping, atol, rtol))
        agg = _aggregate(reps)
        if a.ndim and a.shape[-1] != hidden:
            notes.append(f"layerwise: block {i}'s hidden state has last axis {a.shape[-1]}, "
                         f"not the source hidden size {hidden}")
        rows.append({"block": i, "big_block": j, "value_small": vs, "value_big": vb,
                     "compared": agg.compared, "max_abs": agg.max_abs,
                     "mean_abs": agg.mean_abs, "max_rel": agg.max_rel,
                     "nan_small": agg.nan_small, "nan_big": agg.nan_big,
                     "inf_small": agg.inf_small, "inf_big": agg.inf_big,
                     "min_atol": agg.min_atol, "min_rtol": agg.min_rtol,
                     "failed_elements": agg.failed_elements, "elements": agg.elements,
                     "passed": agg.passed, "message": agg.message})
        if not agg.passed and first is None:
            first = i
    return rows, first


# --------------------------------------------------------------------------- verify
def verify(small_path, big_path, *, inputs=None, atol: float | None = None,
           rtol: float | None = None, provider: str = "auto", layerwise: bool = False,
           save_inputs=None, seed: int = 0) -> VerifyReport:
    """Run ``small_path`` and ``big_path`` with ONNX Runtime on the same inputs and compare.

    ``inputs``: None (synthesised, seeded by ``seed``), a list of {input name: array} dicts
    (one per case), one dict, or the path of an .npz.  Returns a ``VerifyReport``; raises
    ``InputError`` (exit 2) for unreadable models or inputs and ``RuntimeFailure`` (exit 3)
    when ONNX Runtime cannot load or run a model.  A mismatch is *reported*
    (``report.passed``), not raised: the caller decides (the CLI exits 1).
    """
    t_start = time.perf_counter()
    timings: dict = {}
    notes: list = []
    if provider not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown provider {provider!r}.", hint="Use auto, cuda or cpu.")

    cache: dict = {}
    t = time.perf_counter()
    small_ir, _ = _as_ir(small_path)
    big_ir, _ = _as_ir(big_path)
    plan = _plan(big_ir, notes)
    dtype = _first_float_dtype(small_ir)
    big_dtype = _first_float_dtype(big_ir)
    if big_dtype != dtype:
        notes.append(f"the models' outputs differ in precision ({dtype} small, {big_dtype} big); "
                     f"tolerances follow the small model")
    d_atol, d_rtol = default_tolerances(dtype)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if atol < 0 or rtol < 0:
        raise InputError(f"tolerances must be non-negative (atol {atol:g}, rtol {rtol:g}).")

    # inputs
    if inputs is None:
        cases, syn_notes = _synthesize(small_ir, seed=seed, vocab=None, cases=DEFAULT_CASES,
                                       cache=cache)
        notes.extend(syn_notes)
        source = "synthesised"
    else:
        if isinstance(inputs, (str, os.PathLike)):
            cases = load_inputs(inputs)
            source = f"from {inputs}"
        elif isinstance(inputs, Mapping):
            cases = [dict(inputs)]
            source = "given"
        else:
            cases = [dict(c) for c in inputs]
            source = "given"
        if not cases:
            raise InputError("no input cases were given.", hint="Give at least one case.")
        cases = _conform(cases, small_ir, str(small_path), notes)
        declared = {v.name for v in small_ir.graph.inputs} | {v.name for v in big_ir.graph.inputs}
        unused = sorted({n for c in cases for n in c} - declared)
        if unused:
            notes.append(f"inputs not used by either model: {', '.join(unused)}")
    inits_b = set(big_ir.graph.initializers)
    big_only = [v.name for v in big_ir.graph.inputs
                if v.name not in inits_b and v.name not in cases[0]]
    if big_only:
        raise InputError(f"{big_path} has input(s) {', '.join(big_only)} that {small_path} "
                         "does not have, so the two cannot be fed the same inputs.",
                         hint="Compare models with the same graph inputs.")
    if save_inputs is not None:
        save_inputs_npz(cases, save_inputs)
    timings["load"] = time.perf_counter() - t

    # run: one session at a time keeps peak memory at the larger model
    small_label, big_label = str(small_path), str(big_path)
    t = time.perf_counter()
    src, fetch = _prepare(small_path, small_ir)
    sess, used = make_session(src, provider, label=small_label,
                              external_data_dir=Path(small_path).resolve().parent)
    timings["session_small"] = time.perf_counter() - t
    # "auto" may end on the CPU: the big model then runs on the same provider
    forced = "cuda" if used == CUDA else "cpu"
    t = time.perf_counter()
    ref = [_run(sess, c, small_label, fetch) for c in cases]
    timings["run_small"] = time.perf_counter() - t
    small_outputs = list(fetch)
    del sess
    t = time.perf_counter()
    src, fetch = _prepare(big_path, big_ir)
    sess, used_big = make_session(src, forced, label=big_label,
                                  external_data_dir=Path(big_path).resolve().parent)
    timings["session_big"] = time.perf_counter() - t
    t = time.perf_counter()
    got = [_run(sess, c, big_label, fetch) for c in cases]
    timings["run_big"] = time.perf_counter() - t
    big_outputs = list(fetch)
    del sess
    if provider == "auto" and used != CUDA and CUDA in _available():
        notes.append("onnxruntime-gpu is installed but CUDA could not run the model; ran on "
                     "the CPU")

    t = time.perf_counter()
    out_maps = plan.get("outputs") or {}
    report_cases = []
    for case, r, g in zip(cases, ref, got):
        outs = [compare_output(n, r[n], g.get(n), out_maps.get(n), atol, rtol)
                for n in small_outputs]
        report_cases.append({"shapes": {n: list(a.shape) for n, a in case.items()},
                             "outputs": outs})
    extra = [n for n in big_outputs if n not in small_outputs]
    if extra:
        notes.append(f"outputs only in the big model, not compared: {', '.join(extra)}")
    timings["compare"] = time.perf_counter() - t
    passed = all(o.passed for c in report_cases for o in c["outputs"])

    rows, first = None, None
    if layerwise:
        t = time.perf_counter()
        rows, first = _layerwise(small_path, big_path, small_ir, big_ir, plan, cases, forced,
                                 atol, rtol, notes, cache)
        timings["layerwise"] = time.perf_counter() - t
        if first is not None and passed:
            notes.append(f"the outputs match but block {first}'s hidden state diverges")
    notes.insert(0, f"inputs: {source}, {len(cases)} case(s)")
    return VerifyReport(passed=passed, provider_requested=provider, provider_used=used_big,
                        atol=atol, rtol=rtol, dtype=dtype, cases=report_cases,
                        first_divergent_block=first, layerwise=rows,
                        seconds=time.perf_counter() - t_start, notes=notes,
                        small=str(small_path), big=str(big_path), timings=timings)


def _available() -> list:
    import onnxruntime as ort

    return ort.get_available_providers()

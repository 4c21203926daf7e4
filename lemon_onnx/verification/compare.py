"""Comparing outputs: the two levels of verification, Polygraphy's element rule, output maps.

Two levels, per output (docs/lemon-math.md, "Verification levels"):

* **Algebraic** (float64): both models run with every float tensor widened to float64
  (``precision.py``).  The rewrite is lossless as stored when the expanded model's float64
  output equals the source's to ``ALGEBRAIC_RTOL`` relative to ``max |source output|``.
  A plan that had to round constants in the storage dtype (fractional widths, which no
  standard norm over the new width reproduces exactly) is held to ``ROUNDED_ULPS``
  epsilons of that dtype instead, and the report lists those constants.
* **Storage dtype** (float32, float16, bfloat16): the expanded model's error against the
  source's float64 output must stay within ``FACTOR`` times the source's *own* error (its
  model-dtype output against its float64 output), plus a floor of ``FLOOR_ULPS`` units of the
  dtype's epsilon times ``max |source output|`` for outputs the source reproduces exactly.
  ``rule`` in the report says whether the ratio or the floor set the bound.

Where no float64 run is available (it does not fit in memory, or no engine can run an op in
float64), the dtype level falls back to comparing the two model-dtype outputs directly with a
bound of ``FALLBACK_ULPS`` epsilons times ``max |source output|`` (rule ``fallback``), and the
report says so.  With explicit ``atol``/``rtol`` the dtype level is Polygraphy's element rule
instead (an element fails only if it exceeds both, the source model is the reference; rule
``fixed``), and the float64 level is reported but does not decide.  Models whose plan is
approximate by design (Post-LN depth) are held to ``APPROXIMATE_RTOL`` at the float64 level
instead; their float64 difference is the measured approximation error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


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
    # the two levels (compare.py); None where that level did not run
    ref_max: float | None = None  # max |source output| (float64 run, else model dtype)
    own_error: float | None = None  # max |source, model dtype - source, float64|
    error: float | None = None  # max |expanded, model dtype - source, float64| (fallback: - source)
    ratio: float | None = None  # error / own_error
    bound: float | None = None  # what error had to stay within
    rule: str | None = None  # "ratio" | "floor" | "fallback" | "fixed": what set the verdict
    alg_max_abs: float | None = None  # max |expanded, float64 - source, float64|
    alg_rel: float | None = None  # alg_max_abs / ref_max
    alg_passed: bool | None = None  # alg_rel <= ALGEBRAIC_RTOL
    nonfinite_mismatch: int = 0  # elements NaN/Inf in one model only (or at another value)
    caught_by: str | None = None  # failing level: "float64", "<dtype>", "float64+<dtype>", "shape"



#: float64 outputs must agree to this, relative to max |source output|
ALGEBRAIC_RTOL = 1e-9
#: ... or, when the plan lists constants rounded in the storage dtype (fractional widths:
#: norm scales sqrt(k*d/D), avg means; passes/width.py ``rounded_constants``), to this many
#: epsilons of that dtype (measured: 0.3 to 2 epsilons on the fixtures and SmolLM2)
ROUNDED_ULPS = 32
#: ... or, for a plan that is approximate by design (Post-LN depth: LEMON's recipe is exact
#: up to O(epsilon / variance), ~1e-12 relative at BERT's epsilon 1e-12), to this
APPROXIMATE_RTOL = 1e-6
#: the expanded model may have at most this many times the source's own rounding error
FACTOR = 4.0
#: ... plus this many epsilons of the dtype times max |source output|
FLOOR_ULPS = 8
#: without a float64 run: bound on |expanded - source| in epsilons times max |source output|
#: (calibration: benchmarks/numerics.py; the sources' own float32 errors on the fixtures and
#: both real models are 2 to 30 epsilons times max |output|)
FALLBACK_ULPS = 256
EPSILON = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7,
           "float64": 2.0 ** -52}

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


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the dtype-level verdict is taken (see the module docstring)."""

    mode: str  # "relative" | "fixed" | "fallback" | "float64-only" (no storage level)
    dtype: str
    atol: float  # Polygraphy's rule in "fixed" mode; the min_atol/min_rtol statistics otherwise
    rtol: float
    algebraic_decides: bool = True
    alg_rtol: float = ALGEBRAIC_RTOL
    factor: float = FACTOR
    floor_ulps: float = FLOOR_ULPS
    fallback_ulps: float = FALLBACK_ULPS

    @property
    def eps(self) -> float:
        return EPSILON[self.dtype]


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
    bad_nonfinite = _nonfinite_mismatches(ref, got)
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
    rep.nonfinite_mismatch = bad_nonfinite
    if bad_nonfinite:
        rep.min_atol = rep.min_rtol = math.inf
        rep.message = (f"{bad_nonfinite} element(s) are NaN/Inf in one model but not the "
                       "other")
    rep.passed = rep.failed_elements == 0
    return rep


def _nonfinite_mismatches(ref: np.ndarray, got: np.ndarray) -> int:
    """Elements that are NaN/Inf in one model but not at the same place/value in the other."""
    nan_r, nan_g = np.isnan(ref), np.isnan(got)
    inf_r, inf_g = np.isinf(ref), np.isinf(got)
    finite = ~(nan_r | nan_g | inf_r | inf_g)
    same = (nan_r & nan_g) | (inf_r & inf_g & (ref == got))
    return int((~finite & ~same).sum())


def _as_f64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # raw bfloat16 bits
        a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if a.dtype.name == "bfloat16":  # ml_dtypes
        a = a.astype(np.float32)
    return a.astype(np.float64)




def map_big(name: str, small_shape: list, big: np.ndarray, mapping: dict | None):
    """Apply the plan's output map to ``big``: ``(array, label)`` or ``(None, why)``."""
    ss, sb = list(small_shape), list(np.shape(big))
    kind = (mapping or {}).get("compare", "whole")
    if kind == "prefix":
        axis = int(mapping.get("axis", -1))
        size = mapping.get("size")
        nd = len(sb)
        if not -nd <= axis < nd or len(ss) != nd:
            return None, (f"the plan maps {name!r} by prefix on axis {axis}, which does not fit "
                          f"shapes {ss} (small) and {sb} (big)")
        ax = axis % nd
        size = ss[ax] if size is None else int(size)
        others_ok = all(sb[i] == ss[i] for i in range(nd) if i != ax)
        if size != ss[ax] or sb[ax] < size or not others_ok:
            return None, (f"the plan compares {name!r} on the first {size} entries of axis "
                          f"{axis}, but the shapes are {ss} (small) and {sb} (big)")
        sl = [slice(None)] * nd
        sl[ax] = slice(0, size)
        label = f"prefix:{size}" if ax == nd - 1 else f"prefix:{size}@axis{ax}"
        return np.asarray(big)[tuple(sl)], label
    if kind not in ("whole", "take"):  # take: the small side was taken (take_small)
        return None, (f"the plan's output map for {name!r} has an unknown compare mode "
                      f"{kind!r} (expected 'whole', 'prefix' or 'take')")
    if ss != sb:
        if len(ss) == len(sb) and ss[:-1] == sb[:-1] and sb[-1] > ss[-1]:
            return None, (f"shapes differ: {ss} (small) vs {sb} (big). The big model's last "
                          f"axis is larger, but its metadata (lemon.plan) has no prefix map for "
                          f"{name!r}, so it is not compared (never sliced silently); models "
                          "expanded by lemon-onnx carry that map")
        return None, f"shapes differ: {ss} (small) vs {sb} (big)"
    if kind == "take":
        return np.asarray(big), f"kv-map@axis{int(mapping.get('axis', 0)) % max(len(ss), 1)}"
    return np.asarray(big), "whole"


def take_small(small: np.ndarray | None, mapping: dict | None):
    """A ``take`` map (a KV cache: the expanded model's KV head j is the source's head
    ``index[j]``) applied to a source output, so that it compares whole with the big one."""
    if small is None or (mapping or {}).get("compare") != "take":
        return small
    a = np.asarray(small)
    axis = int(mapping.get("axis", 0))
    if not -a.ndim <= axis < a.ndim:
        return a
    index = np.asarray(mapping.get("index") or [], dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= a.shape[axis]):
        return a  # the shapes then differ, and the comparison says so
    return np.take(a, index, axis=axis)


def big_name(name: str, mapping: dict | None) -> str:
    """The name of the big model's output that the plan compares with source output ``name``
    (a KV cache follows its layer to the layer's new number)."""
    return (mapping or {}).get("name", name)


def _finite_max_abs(a: np.ndarray, mask: np.ndarray) -> float:
    return float(np.max(np.abs(a[mask]), initial=0.0))


def compare_output(name: str, small: np.ndarray, big: np.ndarray | None, mapping: dict | None,
                   rule: Rule, *, small64: np.ndarray | None = None,
                   big64: np.ndarray | None = None) -> OutputReport:
    """Both levels for one output of one case (``small64``/``big64``: the float64 runs)."""
    small, small64 = take_small(small, mapping), take_small(small64, mapping)
    ss = list(np.shape(small))
    if big is None:
        return OutputReport(name=name, shape_small=ss, shape_big=None, compared="not compared",
                            passed=False, elements=int(np.size(small)), caught_by="shape",
                            message=f"the big model has no output named "
                                    f"{big_name(name, mapping)!r}")
    big_m, label = map_big(name, ss, big, mapping)
    if big_m is None:
        return not_compared(name, ss, list(np.shape(big)), label)
    rep = compare_arrays(small, big_m, rule.atol, rule.rtol, name=name, compared=label)
    rep.shape_big = list(np.shape(big))
    s, b = _as_f64(small), _as_f64(big_m)
    finite = np.isfinite(s) & np.isfinite(b)
    bad_nonfinite = _nonfinite_mismatches(s, b)  # NaN/Inf must sit where the source has them
    if small64 is not None:
        ref = _as_f64(small64)
        finite &= np.isfinite(ref)
        rep.ref_max = _finite_max_abs(ref, finite)
        rep.own_error = _finite_max_abs(s - ref, finite)
        dev = np.abs(b - ref)
        rep.error = float(np.max(dev[finite], initial=0.0))
        if big64 is not None:
            b64, why = map_big(name, ss, big64, mapping)
            if b64 is not None:
                rep.alg_max_abs = _finite_max_abs(_as_f64(b64) - ref, finite)
                rep.alg_rel = _ratio(rep.alg_max_abs, rep.ref_max)
                rep.alg_passed = rep.alg_rel <= rule.alg_rtol
    else:
        rep.ref_max = _finite_max_abs(s, finite)
        dev = np.abs(b - s)
        rep.error = float(np.max(dev[finite], initial=0.0))
    rep.ratio = _ratio(rep.error, rep.own_error) if small64 is not None else None
    if rule.mode == "float64-only":  # the storage level did not run (core.py): none here
        rep.rule, rep.ratio, rep.own_error = "float64 only", None, None
        dtype_ok = True
    elif rule.mode == "fixed":
        rep.rule = "fixed"
        dtype_ok = rep.passed
    else:
        floor = rule.floor_ulps * rule.eps * rep.ref_max
        if small64 is None or rule.mode == "fallback":
            rep.rule, rep.bound = "fallback", rule.fallback_ulps * rule.eps * rep.ref_max
        else:
            by_ratio = rule.factor * rep.own_error
            rep.rule = "ratio" if by_ratio >= floor else "floor"
            rep.bound = by_ratio + floor
        over = finite & (dev > rep.bound)
        rep.failed_elements = int(over.sum()) + bad_nonfinite
        dtype_ok = not bad_nonfinite and rep.error <= rep.bound
    alg_ok = rep.alg_passed is not False or not rule.algebraic_decides
    rep.passed = dtype_ok and alg_ok
    if not dtype_ok:
        rep.caught_by = rule.dtype if alg_ok else f"float64+{rule.dtype}"
    elif not alg_ok:
        rep.caught_by = "float64"
    return rep


def _ratio(num: float, den: float) -> float:
    if num == 0:
        return 0.0
    return math.inf if den == 0 else num / den


def not_compared(name, ss, sb, message, caught_by: str = "shape") -> OutputReport:
    n = int(np.prod(ss)) if ss else 1
    return OutputReport(name=name, shape_small=ss, shape_big=sb, compared="not compared",
                        max_abs=math.inf, mean_abs=math.inf, max_rel=math.inf,
                        min_atol=math.inf, min_rtol=math.inf, failed_elements=n, elements=n,
                        passed=False, caught_by=caught_by, message=message)


def _worst(vals):
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def aggregate(reps: Sequence[OutputReport]) -> OutputReport:
    """Worst case over input cases (mean weighted by element count)."""
    first = reps[0]
    n = sum(r.elements for r in reps)
    mean = (sum(r.mean_abs * r.elements for r in reps) / n) if n else 0.0
    msgs = [r.message for r in reps if r.message]
    caught = [r.caught_by for r in reps if r.caught_by]
    worst = max(reps, key=lambda r: (r.ratio is not None and r.ratio) or 0.0)
    algs = [r.alg_passed for r in reps if r.alg_passed is not None]
    return OutputReport(
        name=first.name, shape_small=first.shape_small, shape_big=first.shape_big,
        compared=first.compared, max_abs=max(r.max_abs for r in reps), mean_abs=mean,
        max_rel=max(r.max_rel for r in reps), nan_small=sum(r.nan_small for r in reps),
        nan_big=sum(r.nan_big for r in reps), inf_small=sum(r.inf_small for r in reps),
        inf_big=sum(r.inf_big for r in reps), min_atol=max(r.min_atol for r in reps),
        min_rtol=max(r.min_rtol for r in reps),
        failed_elements=sum(r.failed_elements for r in reps), elements=n,
        passed=all(r.passed for r in reps), message=msgs[0] if msgs else None,
        nonfinite_mismatch=sum(r.nonfinite_mismatch for r in reps), ref_max=_worst(r.ref_max for r in reps), own_error=_worst(r.own_error for r in reps),
        error=_worst(r.error for r in reps), ratio=worst.ratio, bound=worst.bound,
        rule=worst.rule, alg_max_abs=_worst(r.alg_max_abs for r in reps),
        alg_rel=_worst(r.alg_rel for r in reps), alg_passed=all(algs) if algs else None,
        caught_by=caught[0] if caught else None)

"""Verification reports: per-output statistics, the human table, the JSON form."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np


#: version of the JSON report's layout; bumped when a field changes meaning or goes away
SCHEMA_VERSION = 2


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
    levels: dict = dataclasses.field(default_factory=dict)
    #: the cached-decoding check of a decoder with a KV cache (decoding.py), None without one:
    #: {"ran", "why", "float64", "steps": [{"step", "tokens", "attended", "outputs"}]}
    decoding: dict | None = None
    schema_version: int = SCHEMA_VERSION

    # -- worst numbers over all cases (and decoding steps), handy for one-line summaries
    def rows(self) -> list:
        """Every output comparison: the cases', then the decoding steps'."""
        steps = (self.decoding or {}).get("steps") or []
        return [o for c in self.cases for o in c["outputs"]] + \
            [o for st in steps for o in st["outputs"]]

    @property
    def max_abs(self) -> float:
        """Largest |expanded - source| over outputs and cases, both in the model's dtype."""
        return max((o.max_abs for o in self.rows()), default=0.0)

    def _worst(self, field: str):
        vals = [getattr(o, field) for o in self.rows()]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    @property
    def max_ratio(self) -> float | None:
        """Largest (expanded error) / (source's own error) against the float64 source."""
        return self._worst("ratio")

    @property
    def max_alg_rel(self) -> float | None:
        """Largest float64 difference relative to max |source output|."""
        return self._worst("alg_rel")

    def caught_by(self) -> list:
        """The levels that failed (``float64``, the dtype, ``shape``, ``cache``), in order of
        appearance."""
        seen: list = []
        for o in self.rows():
            for part in (o.caught_by or "").split("+"):
                if part and part not in seen:
                    seen.append(part)
        return seen

    def dtype_missing(self) -> str | None:
        """Why the storage-dtype level did not run (no kernel for the dtype on the
        provider), or None when it ran."""
        dt = self.levels.get("dtype") or {}
        if dt.get("ran") is not False:
            return None
        kernel = re.search(r"implementation for (\S+\(\d+\))", dt.get("why") or "")
        return f"no {self.provider_used} kernel for {kernel.group(1)}" if kernel else dt.get("why")

    def summary(self) -> str:
        """One line: the verdict and the figures that decided it."""
        if self.dtype_missing():
            parts = [f"float64 only: the {self.dtype} level did not run "
                     f"({self.dtype_missing()[:160]})"]
        else:
            parts = [f"max abs error {self.max_abs:.2e}"]
        if self.max_ratio is not None:
            own = self._worst("own_error")
            ratio = "inf" if math.isinf(self.max_ratio) else f"{self.max_ratio:.2f}"
            parts.append(f"{ratio}x the source's own {self.dtype} error ({_g(own)})")
        if self.max_alg_rel is not None:
            allowed = (self.levels.get("float64") or {}).get("rtol")
            parts.append(f"float64 difference {_g(self.max_alg_rel)} relative"
                         + (f" (allowed {allowed:.1e})" if allowed else ""))
        dec = self.decoding or {}
        if dec.get("ran"):
            steps = dec.get("steps") or []
            bad = [st["step"] for st in steps if not all(o.passed for o in st["outputs"])]
            parts.append(f"cached decoding {len(steps) - 1} steps "
                         + (f"FAIL from step {bad[0]}" if bad else "ok"))
        elif dec:
            parts.append("cached decoding not checked")
        if not self.passed and self.caught_by():
            parts.append("caught by " + " and ".join(self.caught_by()))
        missing = self.float64_missing()
        if missing:
            parts.append(f"NO float64 proof ({missing})")
        return ", ".join(parts)

    def float64_missing(self) -> str | None:
        """Why the float64 level (the algebraic proof) did not run, or None when it ran (or
        a report without levels, as older callers build)."""
        alg = self.levels.get("float64")
        if not alg or alg.get("ran"):
            return None
        return alg.get("why") or "not run"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return _jsonable(d)

    def to_json(self, **kw: Any) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    def format(self) -> str:
        """A human-readable table."""
        verdict = "PASS" if self.passed else "FAIL"
        alg = self.levels.get("float64") or {}
        dt = self.levels.get("dtype") or {}
        missing = self.float64_missing()
        if missing:
            verdict += " (without the float64 proof: the float64 level did not run)"
        lines = [f"verify {self.small or '?'} -> {self.big or '?'}: {verdict}",
                 f"  provider {self.provider_used} (requested {self.provider_requested}), "
                 f"{self.dtype}, {self.seconds:.2f}s"]
        if alg.get("ran"):
            lines.append(f"  float64 level: {alg.get('engine')}; the float64 outputs must agree "
                         f"to {alg.get('rtol'):g} x max|output|"
                         + ("" if alg.get("decides") else " (reported, does not decide)"))
        else:
            lines.append(f"  float64 level: not run ({alg.get('why') or 'not requested'})")
        fixed = dt.get("rule") == "fixed"
        if fixed:
            lines.append(f"  {self.dtype} level: fixed tolerances, an element fails if |big - "
                         f"small| > atol {self.atol:g} and > rtol {self.rtol:g} x |small|")
        elif dt.get("rule") == "fallback":
            lines.append(f"  {self.dtype} level: |big - small| <= {dt.get('fallback_ulps'):g} "
                         f"eps x max|small| (no float64 run to measure the source's own error)")
        else:
            lines.append(f"  {self.dtype} level: |big - small64| <= {dt.get('factor'):g} x "
                         f"|small - small64| (the source's own error) + "
                         f"{dt.get('floor_ulps'):g} eps x max|small64|")
        head = _header(fixed)
        for k, case in enumerate(self.cases):
            shapes = ", ".join(f"{n}{list(s)}" for n, s in case["shapes"].items())
            lines.append(f"  case {k}: {shapes}")
            lines.append(head)
            for o in case["outputs"]:
                lines.append(_row(o.name, o, fixed))
                if o.message:
                    lines.append(f"      {o.message}")
        lines += _decoding_lines(self.decoding, head, fixed)
        if self.layerwise is not None:
            lines.append("  layerwise (hidden state leaving each block, worst over cases):")
            lines.append(head.replace("output  ", "block   ", 1))
            for b in self.layerwise:
                label = f"{b['block']} -> {b['big_block']}"
                lines.append(_row(label, _Obj(b), fixed))
                if b.get("message"):
                    lines.append(f"      {b['message']}")
            fdb = self.first_divergent_block
            lines.append("  first divergent block: " + ("none" if fdb is None else str(fdb)))
        lines.append("  columns: " + (_LEGEND_FIXED if fixed else _LEGEND))
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


_LEGEND = ("own err = |small - small64| (the source's own rounding), error = |big - small64|, "
           "ratio = error / own err, bound = what error had to stay within (set by the ratio, "
           "the floor, or the fallback rule), f64 rel = |big64 - small64| / max|small64|, "
           "nonfinite = NaN/Inf in one model only; all maxima over the output")
_LEGEND_FIXED = ("max_abs/mean_abs/max_rel of |big - small|, min_atol (min_rtol) = the smallest "
                 "atol (rtol) with which every element passes at the given rtol (atol), "
                 "nan s/b and inf s/b = NaN and Inf counts in small/big, f64 rel = "
                 "|big64 - small64| / max|small64| (reported only)")


def _decoding_lines(dec: dict | None, head: str, fixed: bool) -> list:
    """The cached-decoding check, one block per step: every output that is not a cache, and
    the caches in one row (the worst of them; the JSON report has each)."""
    if not dec:
        return []
    if not dec.get("ran"):
        return [f"  cached decoding: not checked ({dec.get('why')})"]
    lines = ["  cached decoding: the first case as prefix, then one token per step, each model "
             "fed the cache it returned" + ("" if dec.get("float64") else
                                            " (float64 level: not run)")]
    from .compare import aggregate

    for st in dec.get("steps") or []:
        where = "prefix" if st["step"] == 0 else f"step {st['step']}"
        attended = st.get("attended")  # None: no mask over the decoded tokens (a decoder
        # that attends to an encoder: its mask covers the encoder's tokens)
        lines.append(f"  {where}: {st.get('tokens')} new token(s)"
                     + (f", {attended} attended" if attended is not None else ""))
        lines.append(head)
        caches = [o for o in st["outputs"] if o.compared.startswith("kv-map")]
        said: set = set()  # a step that stopped says why once
        for o in st["outputs"]:
            if o in caches:
                continue
            lines.append(_row(o.name, o, fixed))
            if o.message and o.message not in said:
                said.add(o.message)
                lines.append(f"      {o.message}")
        if caches:
            worst = aggregate(caches)
            lines.append(_row(f"caches ({len(caches)})", worst, fixed))
            if worst.message and worst.message not in said:
                lines.append(f"      {worst.message}")
    return lines


class _Obj:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def _g(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.2e}"


def _header(fixed: bool) -> str:
    if fixed:
        return (f"  {'output':<24} {'compared':<12} {'max_abs':>9} {'mean_abs':>9} "
                f"{'max_rel':>9} {'min_atol':>9} {'min_rtol':>9} {'nan s/b':>8} "
                f"{'inf s/b':>8} {'f64 rel':>9} {'failed':>9}  result")
    return (f"  {'output':<24} {'compared':<12} {'own err':>9} {'error':>9} {'ratio':>7} "
            f"{'bound':>9} {'rule':>8} {'f64 rel':>9} {'nonfinite':>9} {'failed':>11}  result")


def _row(label: str, o, fixed: bool = False) -> str:
    if o.passed:
        result = "ok"
    else:
        result = "FAIL" + (f" ({o.caught_by})" if getattr(o, "caught_by", None) else "")
    failed = f"{o.failed_elements}/{o.elements}" if o.elements else str(o.failed_elements)
    f64 = _g(getattr(o, "alg_rel", None))
    if fixed:
        return (f"  {label:<24} {o.compared:<12} {_g(o.max_abs):>9} {_g(o.mean_abs):>9} "
                f"{_g(o.max_rel):>9} {_g(o.min_atol):>9} {_g(o.min_rtol):>9} "
                f"{f'{o.nan_small}/{o.nan_big}':>8} {f'{o.inf_small}/{o.inf_big}':>8} "
                f"{f64:>9} {failed:>9}  {result}")
    ratio = "-" if o.ratio is None else ("inf" if math.isinf(o.ratio) else f"{o.ratio:.2f}")
    return (f"  {label:<24} {o.compared:<12} {_g(o.own_error):>9} {_g(o.error):>9} "
            f"{ratio:>7} {_g(o.bound):>9} {o.rule or '-':>8} {f64:>9} "
            f"{o.nonfinite_mismatch:>9} {failed:>11}  {result}")


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

"""Does a hand-off folder compute the expanded model?  transformers loads it and runs the
inputs the ONNX verification uses; the outputs are compared as ``verify`` compares an
expansion with its source (``verification/compare.py``):

* **loading**: ``from_pretrained(DIR)`` of the class in ``config.json``'s ``architectures``
  reports no missing, unexpected or mismatched key and no error;
* **float32** (the model's dtype): the torch model's error against the expanded ONNX model's
  float64 output stays within ``FACTOR`` times the ONNX model's own float32 error plus
  ``FLOOR_ULPS`` epsilons of max |output| (the same rule as an expansion against its source);
* **float64**: ``model.double()`` against the expanded ONNX model's float64 copy, where the
  two fit in memory.  transformers computes a few tables in float32 whatever the model's
  dtype (RoPE's cos/sin), so this level allows ``TORCH64_ULPS`` float32 epsilons of
  max |output| (measured: 1e-16 to 3e-8 relative on the family matrix).

Outputs are matched by what the recogniser says they are: ``logits`` with the torch model's
``logits``, the hidden state with the ``last_hidden_state`` of the transformers model inside
it, any other by name.  An output neither model names is reported as not compared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .. import io
from ..estimate import available_memory
from ..verification import compare as cmp
from ..verification.inputs import DEFAULT_CASES, synthesize as synthesize_feeds
from ..verification.precision import float64_bytes, run_float64
from ..verification.runtime import make_session, run_session
from .errors import HandoffError
from .probe import Outputs, forward_kwargs, quiet

#: torch's float64 run against ONNX Runtime's float64 copy: this many float32 epsilons of
#: max |output| (tables transformers computes in float32 even in double)
TORCH64_ULPS = 32
#: run the float64 level when both copies take at most this share of the available memory
FLOAT64_MEMORY_SHARE = 0.4


@dataclasses.dataclass
class CheckReport:
    passed: bool
    cls_name: str
    loading: dict  # missing_keys, unexpected_keys, mismatched_keys, error_msgs
    outputs: list  # OutputReport per compared output (worst case over the inputs)
    float64: dict  # {"ran": bool, "why": str | None, "rtol": float}
    notes: list
    cases: int
    #: the folder's tensors against the ones the expanded model gives (``compare_weights``),
    #: None when not compared (export-torch checks what it has just written by loading it)
    weights: dict | None = None

    @property
    def strict(self) -> bool:
        return not any(self.loading.values())

    def worst_relative(self) -> float:
        """max |torch - onnx| / max |onnx| over the compared outputs (float32 runs)."""
        return max((o.max_abs / o.ref_max if o.ref_max else o.max_abs for o in self.outputs),
                   default=math.inf)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "class": self.cls_name, "loading": self.loading,
                "strict": self.strict, "float64": self.float64, "cases": self.cases,
                "outputs": [{k: v for k, v in dataclasses.asdict(o).items()
                             if k in ("name", "compared", "max_abs", "max_rel", "ref_max",
                                      "own_error", "error", "bound", "rule", "alg_max_abs",
                                      "alg_rel", "alg_passed", "passed", "message")}
                            for o in self.outputs],
                "worst_relative": self.worst_relative(), "weights": self.weights,
                "notes": self.notes}

    def summary(self) -> str:
        if not self.strict:
            bad = {k: v[:4] for k, v in self.loading.items() if v}
            return f"{self.cls_name} does not load the folder strictly: {bad}"
        w = self.weights
        if w is not None and not weights_ok(w):
            bits = [f"{k} {', '.join(str(x) for x in w[k][:3])}" for k in
                    ("missing", "unexpected", "differ") if w[k]]
            return ("the folder's tensors are not the expanded model's: " + "; ".join(bits))
        parts = []
        for o in self.outputs:
            rel = o.max_abs / o.ref_max if o.ref_max else o.max_abs
            f64 = f", float64 {o.alg_rel:.1e}" if o.alg_rel is not None else ""
            parts.append(f"{o.name} {rel:.1e} relative{f64}"
                         + ("" if o.passed else f" (FAILED: {o.message or o.caught_by})"))
        return (f"{self.cls_name} loads every tensor (strict) and matches the expanded ONNX "
                f"model on {self.cases} input case(s): " + "; ".join(parts)) if self.passed \
            else (f"{self.cls_name} loads the folder but does not compute the expanded ONNX "
                  "model: " + "; ".join(parts))


def check(folder, expanded, *, cases: list | None = None, float64: str = "auto",
          provider: str = "cpu", loaded=None) -> CheckReport:
    """Load ``folder`` with transformers and compare it with ``expanded`` (an .onnx path or an
    onnx-ir model).  ``loaded``: (the expanded model as loaded, its description), when the
    caller has them.  Raises ImportError without torch/transformers, HandoffError (exit 2)
    when the folder or the inputs cannot be used."""
    import torch
    import transformers

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HandoffError(f"{folder} has no config.json, so transformers cannot build a model "
                           "from it.", hint="Give the folder export-torch wrote.")
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise HandoffError(f"{cfg_path} names no transformers class in 'architectures' "
                           f"({archs}).", hint="Give the folder export-torch wrote.")
    with quiet():
        model, info = cls.from_pretrained(str(folder), output_loading_info=True,
                                          attn_implementation="eager", dtype=torch.float32)
    loading = {k: sorted(str(x) for x in (info.get(k) or [])) for k in
               ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    model.eval()
    with tempfile.TemporaryDirectory(prefix="lemon-check-") as tmp:
        path = expanded
        if isinstance(expanded, ir.Model):
            path = Path(tmp) / "expanded.onnx"
            io.save(expanded, path)
        m, desc = loaded if loaded is not None else (io.load(path), None)
        if desc is None:
            from ..recognize import recognize

            desc = recognize(m)
        if cases is None:
            cases = synthesize(m, desc)
        kinds = {o["name"]: o["kind"] for o in desc.outputs}
        names = [v.name for v in m.graph.outputs]
        notes: list[str] = []
        discrete = _float_to_int(m)
        rule = cmp.Rule("relative", "float32", *cmp.default_tolerances("float32"),
                        alg_rtol=TORCH64_ULPS * cmp.EPSILON["float32"],
                        algebraic_decides=not discrete)
        if discrete:
            notes.append(f"the float64 level is reported, not decisive: the graph computes "
                         f"integers from floating-point values ({discrete}), which float64 "
                         "arithmetic can move where transformers computes them in float32 "
                         "(T5's relative position buckets)")
        if not all(not v for v in loading.values()):
            return CheckReport(False, cls.__name__, loading, [], {"ran": False, "why":
                               "not loaded strictly"}, notes, len(cases))
        sess, _ = make_session(str(path), provider, label=str(path))
        fetch = {n: n for n in names}
        ref32 = [run_session(sess, c, str(path), fetch) for c in cases]
        del sess
        f64 = {"ran": False, "why": None, "rtol": rule.alg_rtol, "decides": not discrete}
        ref64 = None
        need = 2 * float64_bytes(m)
        avail = available_memory()
        if float64 == "off":
            f64["why"] = "turned off"
        elif float64 == "auto" and avail is not None and need > FLOAT64_MEMORY_SHARE * avail:
            f64["why"] = (f"the float64 copies need {need / 1e9:.1f} GB and {avail / 1e9:.1f} "
                          "GB is available")
        else:
            ref64 = run_float64(str(path), cases, names, provider, label=str(path)).outputs
    got32 = _run_torch(model, cases, names, kinds, notes)
    got64 = None
    if ref64 is not None:
        model.double()
        got64 = _run_torch(model, [_widen(c) for c in cases], names, kinds, notes)
        f64["ran"] = True
    if ref64 is None:
        rule = cmp.Rule("fallback", "float32", rule.atol, rule.rtol)
        notes.append(f"float64 level not run ({f64['why']}): the float32 level uses the "
                     "fallback bound")
    outputs = []
    for n in names:
        if got32[0].get(n) is None:
            notes.append(f"output {n} ({kinds.get(n, 'other')}): the torch model has no "
                         "output of that name or kind; not compared")
            continue
        reps = [cmp.compare_output(n, r[n], g[n], None, rule,
                                   small64=ref64[k][n] if ref64 else None,
                                   big64=got64[k][n] if got64 else None)
                for k, (r, g) in enumerate(zip(ref32, got32))]
        outputs.append(cmp.aggregate(reps))
    if not outputs:
        raise HandoffError("none of the expanded model's outputs "
                           f"({', '.join(names)}) has a counterpart in {cls.__name__}'s "
                           "outputs, so the folder cannot be checked.")
    passed = all(o.passed for o in outputs)
    return CheckReport(passed, cls.__name__, loading, outputs, f64, notes, len(cases))


def weights_ok(w: dict) -> bool:
    return not (w["missing"] or w["unexpected"] or w["differ"])


def compare_weights(folder, expected: list) -> dict:
    """The folder's safetensors against ``expected`` (TensorOut: name, produce), one tensor at
    a time: names missing or unexpected, and tensors that differ in any element (exactly:
    both sides are computed the same way from the same stored values)."""
    from safetensors import safe_open

    folder = Path(folder)
    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                where[k] = f
    want = {t.name: t for t in expected}
    out = {"compared": 0, "missing": sorted(set(want) - set(where)),
           "unexpected": sorted(set(where) - set(want)), "differ": []}
    for name in sorted(set(want) & set(where)):
        with safe_open(str(where[name]), framework="np") as st:
            got = st.get_tensor(name)
        ref = np.asarray(want[name].produce())
        out["compared"] += 1
        if got.shape != ref.shape or got.dtype != ref.dtype:
            out["differ"].append(f"{name} ({got.dtype}{list(got.shape)}, expected "
                                 f"{ref.dtype}{list(ref.shape)})")
        elif not np.array_equal(got, ref, equal_nan=True):
            d = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
            out["differ"].append(f"{name} (max |difference| {d:.3g})")
    return out


def _float_to_int(m: ir.Model) -> str | None:
    """A Cast from a float to an integer type in the graph (its node's name), if any."""
    ints = {ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
            ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64}
    for n in m.graph:
        if n.op_type == "Cast" and n.inputs and n.inputs[0] is not None and \
                n.inputs[0].dtype is not None and n.inputs[0].dtype.is_floating_point() and \
                "to" in n.attributes and ir.DataType(n.attributes["to"].value) in ints:
            return f"Cast node {n.name}"
    return None


def synthesize(model: ir.Model, desc, cases=DEFAULT_CASES) -> list:
    """The inputs ``verify`` synthesises for ``model`` (its description already known)."""
    feeds, _ = synthesize_feeds(model, seed=0, vocab=None, cases=tuple(cases),
                                cache={id(model): desc})
    return feeds


def _widen(case: dict) -> dict:
    return {k: (np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v)
            for k, v in case.items()}


def _run_torch(model, cases, names, kinds, notes) -> list[dict]:
    """{ONNX output name: torch value} per case."""
    import torch

    results = []
    with Outputs(model) as picker:
        for case in cases:
            fnames, extra, ignored = forward_kwargs(model, case)
            kw = {n: torch.from_numpy(np.ascontiguousarray(case[n])) for n in fnames}
            try:
                with torch.no_grad():
                    out = model(**kw, **extra)
            except Exception as exc:  # noqa: BLE001 - said in words
                raise HandoffError(
                    f"{type(model).__name__} could not run the expanded model's inputs "
                    f"({', '.join(f'{n} {list(np.shape(case[n]))}' for n in fnames)}): "
                    f"{' '.join(str(exc).split())[:300]}",
                    hint="Check the folder with the inputs the model is used with.") from None
            if ignored:
                msg = (f"inputs {', '.join(ignored)} are no arguments of "
                       f"{type(model).__name__}.forward; not fed")
                if msg not in notes:
                    notes.append(msg)
            picked = picker.pick(out, [(n, kinds.get(n, "other")) for n in names])
            results.append({n: None if v is None else v.detach().cpu().numpy()
                            for n, v in zip(names, picked)})
    return results

"""verify(): run both models on the same inputs, in their dtype and in float64, and compare."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Mapping

from ..errors import Float64Unavailable, InputError, LemonError, RuntimeFailure
from ..estimate import FLOAT64_MEMORY_SHARE, RUNTIME_FACTOR
from ..estimate import VERIFY_MEMORY_SHARE as BLOCKWISE_MEMORY_SHARE
from ..estimate import available_memory as _available_memory
from . import compare as cmp
from .decoding import chains, check, fixed_inputs, lengths, returns_of
from .inputs import (DEFAULT_CASES, conform, synthesize, load_inputs, roles_from_graph,
                     save_inputs_npz)
from .layerwise import block_pairs, layerwise_rows
from .models import as_ir, big_feeds, describe, first_float_dtype, read_plan
from .precision import float64_bytes, float64_level, run_float64
from .report import VerifyReport
from .runtime import CUDA, available_providers, make_session, prepare, run_session
from ..errors import one_line

FLOAT64_MODES = ("auto", "on", "off")


def verify(small_path, big_path, *, inputs=None, atol: float | None = None,
           rtol: float | None = None, provider: str = "auto", layerwise: bool = False,
           save_inputs=None, seed: int = 0, float64: str = "auto",
           blockwise: bool | None = None) -> VerifyReport:
    """Run ``small_path`` and ``big_path`` with ONNX Runtime on the same inputs and compare.

    Two levels (``compare.py``): the float64 copies of both graphs must agree to float64
    rounding, and the expanded model's error in its own dtype must stay close to the source's
    own.  ``atol``/``rtol``: Polygraphy's fixed rule instead of the second level (the float64
    level is then only reported).  ``float64``: "auto" (run the float64 level when it fits
    in memory), "on", "off".  ``inputs``: None (synthesised, seeded by ``seed``), a list of
    {input name: array} dicts (one per case), one dict, or the path of an .npz.
    ``blockwise``: run both models segment by segment (``blockwise.py``: one block's weights
    in memory at a time, every block's hidden state compared); None chooses it when the
    whole models would need more than ``BLOCKWISE_MEMORY_SHARE`` of the available memory.
    Returns a ``VerifyReport``; raises ``InputError`` (exit 2) for unreadable models or
    inputs and ``RuntimeFailure`` (exit 3) when ONNX Runtime cannot load or run a model.  A
    mismatch is *reported* (``report.passed``), not raised: the caller decides (the CLI
    exits 1).
    """
    t_start = time.perf_counter()
    timings: dict = {}
    notes: list = []
    if provider not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown provider {provider!r}.", hint="Use auto, cuda or cpu.")
    if float64 not in FLOAT64_MODES:
        raise InputError(f"unknown float64 mode {float64!r}.", hint="Use auto, on or off.")

    if isinstance(small_path, (str, os.PathLike)) and Path(small_path).is_dir():
        from ..folder import verify_folder  # export folders: every file, then the pipeline

        return verify_folder(small_path, big_path, atol=atol, rtol=rtol, provider=provider,
                             layerwise=layerwise, seed=seed, float64=float64,
                             blockwise=blockwise)
    cache: dict = {}
    t = time.perf_counter()
    small_ir, _ = as_ir(small_path)
    big_ir, _ = as_ir(big_path)
    from ..merged import is_merged, verify_merged

    if is_merged(small_ir) and is_merged(big_ir):  # merged decoders: branch by branch
        return verify_merged(small_path, big_path, inputs=inputs, atol=atol, rtol=rtol,
                             provider=provider, layerwise=layerwise, seed=seed,
                             float64=float64, blockwise=blockwise)
    _check_order(small_path, big_path, small_ir, big_ir)
    plan = read_plan(big_ir, notes)
    dtype = first_float_dtype(small_ir)
    big_dtype = first_float_dtype(big_ir)
    if big_dtype != dtype:
        notes.append(f"the models' outputs differ in precision ({dtype} small, {big_dtype} big); "
                     f"tolerances follow the small model")
    rule = _rule(dtype, atol, rtol, approximate=plan.get("exact") is False, notes=notes)
    if plan.get("rounded"):
        rule = dataclasses.replace(rule, alg_rtol=cmp.ROUNDED_ULPS * rule.eps)
        notes.append("rounded in " + dtype + " by the expansion (so the float64 level allows "
                     f"{cmp.ROUNDED_ULPS} epsilons): " + "; ".join(plan["rounded"]))

    cases, source = _inputs(inputs, small_ir, big_ir, small_path, seed, notes, cache)
    # the big model's inputs: the same, except the caches the plan maps (decoding.py)
    big_cases = [big_feeds(plan, c, big_ir) for c in cases]
    inits_b = set(big_ir.graph.initializers)
    big_only = [v.name for v in big_ir.graph.inputs
                if v.name not in inits_b and v.name not in big_cases[0]]
    if big_only:
        raise InputError(f"{big_path} has input(s) {', '.join(big_only)} that {small_path} "
                         "does not have, so the two cannot be fed the same inputs.",
                         hint="Compare models with the same graph inputs.")
    if save_inputs is not None:
        save_inputs_npz(cases, save_inputs)
    timings["load"] = time.perf_counter() - t

    if blockwise is None:
        blockwise = _too_big_for_memory(small_path, big_path, notes)
    if blockwise and _fused(small_ir, big_ir):
        raise InputError(
            "block-by-block verification cuts the models at each block's hidden state, and in "
            "a graph fused by ONNX Runtime's optimizer that value can sit inside a fused op "
            "(a SkipLayerNormalization's sum), so it cannot run on these models.",
            hint="Verify the whole models (on a machine with the memory), or expand and verify "
                 "the unoptimised export and optimise the expanded model afterwards.")
    dec = _decoding_setup(small_ir, big_ir, cases[0], seed, cache, big_cases[0], plan)
    if blockwise:
        return _verify_blockwise(small_path, big_path, small_ir, big_ir, plan, cases,
                                 big_cases, source, provider, rule, dtype, notes, cache,
                                 timings, t_start, float64, dec)

    pairs = block_pairs(small_ir, big_ir, plan, notes, cache) if layerwise else None
    if pairs and _fused(small_ir, big_ir):
        pairs = _pairs_in_files(pairs, small_path, big_path, notes)
    # the model's own dtype: one session at a time keeps peak memory at the larger model
    try:
        ref, small_outputs, used, small_steps = _run_model(small_path, small_ir, cases,
                                                           provider, "small", timings,
                                                           dec.small)
    except RuntimeFailure as exc:
        if not storage_level_missing(exc, dtype) or float64 == "off" or dec.small is not None:
            raise
        return _verify_float64_only(small_path, big_path, small_ir, big_ir, plan, cases,
                                    big_cases, source, provider, rule, dtype, notes, cache,
                                    timings, t_start, exc)
    forced = "cuda" if used == CUDA else "cpu"  # "auto" may end on the CPU: same for both
    try:
        got, big_outputs, used_big, big_steps = _run_model(big_path, big_ir, big_cases, forced,
                                                           "big", timings, dec.big)
    except RuntimeFailure as exc:
        raise _explain_big_failure(exc, small_ir, big_ir, small_path, big_path, cache) from None
    if provider == "auto" and used != CUDA and CUDA in available_providers():
        notes.append("onnxruntime-gpu is installed but CUDA could not run the model; ran on "
                     "the CPU")

    # float64: the same graphs with every float tensor widened
    t = time.perf_counter()
    want_small = list(small_outputs) + sorted({p[2] for p in pairs or []})
    want_big = list(big_outputs) + sorted({p[3] for p in pairs or []})
    levels_f64, ref64, got64, steps64 = _float64_level(
        float64, small_path, big_path, small_ir, big_ir, cases, big_cases, want_small,
        want_big, forced, rule, notes, dec, cache)
    timings["float64"] = time.perf_counter() - t
    if ref64 is None and rule.mode == "relative":
        rule = cmp.Rule("fallback", dtype, rule.atol, rule.rtol)

    t = time.perf_counter()
    out_maps = plan.get("outputs") or {}
    report_cases = []
    for k, (case, r, g) in enumerate(zip(cases, ref, got)):
        outs = [cmp.compare_output(n, r[n], g.get(cmp.big_name(n, out_maps.get(n))),
                                   out_maps.get(n), rule,
                                   small64=ref64[k].get(n) if ref64 else None,
                                   big64=(got64[k].get(cmp.big_name(n, out_maps.get(n)))
                                          if got64 else None))
                for n in small_outputs]
        report_cases.append({"shapes": {n: list(a.shape) for n, a in case.items()},
                             "outputs": outs})
    compared = {cmp.big_name(n, out_maps.get(n)) for n in small_outputs}
    extra = [n for n in big_outputs if n not in compared]
    if extra:
        notes.append(f"outputs only in the big model, not compared: {', '.join(extra)}")
    decoding_report = _decoding_report(dec, ref, got, small_steps, big_steps, ref64, got64,
                                       steps64, small_outputs, out_maps, rule, notes)
    timings["compare"] = time.perf_counter() - t
    passed = _all_passed(report_cases, decoding_report)

    rows, first = None, None
    if pairs is not None:
        t = time.perf_counter()
        rows, first = layerwise_rows(small_path, big_path, small_ir, big_ir, pairs, cases,
                                     forced, rule, ref64, got64, plan, big_cases)
        timings["layerwise"] = time.perf_counter() - t
        if first is not None and passed:
            notes.append(f"the outputs match but block {first}'s hidden state diverges")
    notes.insert(0, f"inputs: {source}, {len(cases)} case(s)")
    atol_used, rtol_used = rule.atol, rule.rtol
    levels = {"float64": levels_f64,
              "dtype": {"dtype": dtype, "rule": "fixed" if rule.mode == "fixed" else rule.mode,
                        "factor": rule.factor, "floor_ulps": rule.floor_ulps,
                        "fallback_ulps": rule.fallback_ulps, "eps": rule.eps}}
    return VerifyReport(passed=passed, provider_requested=provider, provider_used=used_big,
                        atol=atol_used, rtol=rtol_used, dtype=dtype, cases=report_cases,
                        first_divergent_block=first, layerwise=rows,
                        seconds=time.perf_counter() - t_start, notes=notes,
                        small=str(small_path), big=str(big_path), timings=timings,
                        levels=levels, decoding=decoding_report)


def _fused(*models) -> bool:
    """Whether a model held ONNX Runtime's fused ops (recognition unfuses them in memory)."""
    return any(n.domain == "com.microsoft" or "lemon.fused" in n.metadata_props
               for m in models for n in m.graph)


def _pairs_in_files(pairs, small_path, big_path, notes: list) -> list:
    """The block pairs whose hidden states the model files produce: in a fused graph a
    block can end inside a fused op (a SkipLayerNormalization's sum the source never
    outputs); those blocks are not compared, and the notes say so."""
    import onnx

    made = []
    for path in (small_path, big_path):
        proto = onnx.load(str(path), load_external_data=False)
        made.append({o for n in proto.graph.node for o in n.output}
                    | {i.name for i in proto.graph.input})
    kept = [p for p in pairs if p[2] in made[0] and p[3] in made[1]]
    if len(kept) < len(pairs):
        skipped = [str(p[0]) for p in pairs if p not in kept]
        notes.append(f"layerwise: block(s) {', '.join(skipped)} end inside a fused op of the "
                     "files (no output carries their hidden state): not compared")
    return kept


def storage_level_missing(exc: RuntimeFailure, dtype: str) -> bool:
    """ONNX Runtime has no kernel on this provider for one of a half-precision model's ops
    (bfloat16 on the CPU: Where, Softmax, ...), or for a fused op lemon-onnx unfuses in the
    float64 copy (GemmFastGelu, BiasAdd: CUDA only): the storage level cannot run there, the
    float64 level can."""
    import re

    from ..fusion import claimed

    if "NOT_IMPLEMENTED" not in exc.message and \
            "Could not find an implementation" not in exc.message:
        return False
    op = re.search(r"implementation for (\w+)\(", exc.message)
    return dtype in ("bfloat16", "float16") or (op is not None and op.group(1) in claimed())


def _verify_float64_only(small_path, big_path, small_ir, big_ir, plan, cases, big_cases,
                         source, provider, rule, dtype, notes, cache, timings, t_start,
                         failure) -> VerifyReport:
    """The storage level cannot run on this provider (``storage_level_missing``): the float64
    level alone decides, and the report says the other level is missing (never a pass)."""
    why = one_line(failure.message, 300)
    small_outputs = [v.name for v in small_ir.graph.outputs]
    out_maps = plan.get("outputs") or {}
    big_of = {n: cmp.big_name(n, out_maps.get(n)) for n in small_outputs}
    want_big = [b for b in big_of.values() if b in {v.name for v in big_ir.graph.outputs}]
    t = time.perf_counter()
    level, ref64, got64, _ = _float64_level("on", small_path, big_path, small_ir, big_ir,
                                            cases, big_cases, small_outputs, want_big,
                                            "cpu" if provider == "auto" else provider, rule,
                                            notes, _Decoding(), cache)
    timings["float64"] = time.perf_counter() - t
    only = dataclasses.replace(rule, mode="float64-only")
    report_cases = []
    for k, case in enumerate(cases):
        outs = [cmp.compare_output(n, ref64[k][n], got64[k].get(big_of[n]), out_maps.get(n), only,
                                   small64=ref64[k][n], big64=got64[k].get(big_of[n]))
                for n in small_outputs]
        report_cases.append({"shapes": {n: list(a.shape) for n, a in case.items()},
                             "outputs": outs})
    passed = _all_passed(report_cases, None)
    notes.insert(0, f"inputs: {source}, {len(cases)} case(s)")
    notes.append(f"the {dtype} level did not run: {why}; the float64 level alone decides "
                 "(run verify where ONNX Runtime has the kernels, e.g. on CUDA, for the "
                 f"{dtype} level)")
    levels = {"float64": level,
              "dtype": {"dtype": dtype, "ran": False, "why": why, "rule": "not run"}}
    return VerifyReport(passed=passed, provider_requested=provider,
                        provider_used=level.get("provider") or "CPUExecutionProvider",
                        atol=rule.atol, rtol=rule.rtol, dtype=dtype, cases=report_cases,
                        first_divergent_block=None, layerwise=None,
                        seconds=time.perf_counter() - t_start, notes=notes,
                        small=str(small_path), big=str(big_path), timings=timings,
                        levels=levels, decoding=None)


def _model_bytes(path) -> int:
    """The model file and the external data files beside it that it names."""
    import onnx

    p = Path(path)
    total = p.stat().st_size
    proto = onnx.load(str(p), load_external_data=False)
    files = {e.value for t in proto.graph.initializer for e in t.external_data
             if e.key == "location"}
    return total + sum((p.parent / f).stat().st_size for f in files if (p.parent / f).exists())


def _too_big_for_memory(small_path, big_path, notes: list) -> bool:
    if not isinstance(big_path, (str, os.PathLike)) or not isinstance(small_path,
                                                                       (str, os.PathLike)):
        return False
    need = RUNTIME_FACTOR * max(_model_bytes(small_path), _model_bytes(big_path))
    avail = _available_memory()
    if avail is None or need <= BLOCKWISE_MEMORY_SHARE * avail:
        return False
    notes.append(f"blockwise: the whole models would need about {need / 1e9:.1f} GB of memory "
                 f"and {avail / 1e9:.1f} GB is available")
    return True


def _verify_blockwise(small_path, big_path, small_ir, big_ir, plan, cases, big_cases, source,
                      provider, rule, dtype, notes, cache, timings, t_start, float64,
                      dec) -> VerifyReport:
    from .blockwise import compare_blockwise

    t = time.perf_counter()
    chains = {"small": dec.small, "big": dec.big} if dec.small is not None else None
    report_cases, rows, first, used, _, level_f64, rule, decoded = compare_blockwise(
        small_path, big_path, small_ir, big_ir, plan, cases, provider, rule, notes, cache,
        float64, big_cases, chains)
    timings["blockwise"] = time.perf_counter() - t
    ref = got = steps64 = ref64 = got64 = None
    small_steps = big_steps = (None, None)
    if decoded:
        (ref0, small_steps), (got0, big_steps) = decoded["small"], decoded["big"]
        ref, got = [ref0], [got0]
        if "small64" in decoded:
            (r64, s64), (g64, b64) = decoded["small64"], decoded["big64"]
            ref64, got64, steps64 = [r64], [g64], (s64, b64)
    out_maps = plan.get("outputs") or {}
    decoding_report = _decoding_report(dec, ref, got, small_steps, big_steps, ref64, got64,
                                       steps64, [v.name for v in small_ir.graph.outputs],
                                       out_maps, rule, notes)
    passed = _all_passed(report_cases, decoding_report)
    if first is not None and passed:
        notes.append(f"the outputs match but block {first}'s hidden state diverges")
    notes.insert(0, f"inputs: {source}, {len(cases)} case(s)")
    levels = {"float64": level_f64,
              "dtype": {"dtype": dtype, "rule": "fixed" if rule.mode == "fixed" else rule.mode,
                        "factor": rule.factor, "floor_ulps": rule.floor_ulps,
                        "fallback_ulps": rule.fallback_ulps, "eps": rule.eps}}
    return VerifyReport(passed=passed, provider_requested=provider, provider_used=used,
                        atol=rule.atol, rtol=rule.rtol, dtype=dtype, cases=report_cases,
                        first_divergent_block=first, layerwise=rows,
                        seconds=time.perf_counter() - t_start, notes=notes,
                        small=str(small_path), big=str(big_path), timings=timings,
                        levels=levels, decoding=decoding_report)


def _rule(dtype: str, atol, rtol, *, approximate: bool, notes: list) -> cmp.Rule:
    d_atol, d_rtol = cmp.default_tolerances(dtype)
    fixed = atol is not None or rtol is not None
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if atol < 0 or rtol < 0:
        raise InputError(f"tolerances must be non-negative (atol {atol:g}, rtol {rtol:g}).")
    if fixed:
        return cmp.Rule("fixed", dtype, atol, rtol, algebraic_decides=False)
    if approximate:
        notes.append("the expansion is approximate by design (its plan says exact=false): the "
                     f"float64 level allows {cmp.APPROXIMATE_RTOL:g} of max|output| for the "
                     "approximation (give --atol/--rtol to accept more)")
        return cmp.Rule("relative", dtype, atol, rtol, alg_rtol=cmp.APPROXIMATE_RTOL)
    return cmp.Rule("relative", dtype, atol, rtol)


def _inputs(inputs, small_ir, big_ir, small_path, seed, notes, cache):
    if inputs is None:
        cases, syn_notes = synthesize(small_ir, seed=seed, vocab=None, cases=DEFAULT_CASES,
                                       cache=cache)
        notes.extend(syn_notes)
        return cases, "synthesised"
    if isinstance(inputs, (str, os.PathLike)):
        cases, source = load_inputs(inputs), f"from {inputs}"
    elif isinstance(inputs, Mapping):
        cases, source = [dict(inputs)], "given"
    else:
        cases, source = [dict(c) for c in inputs], "given"
    if not cases:
        raise InputError("no input cases were given.", hint="Give at least one case.")
    cases = conform(cases, small_ir, str(small_path), notes)
    declared = {v.name for v in small_ir.graph.inputs} | {v.name for v in big_ir.graph.inputs}
    unused = sorted({n for c in cases for n in c} - declared)
    if unused:
        notes.append(f"inputs not used by either model: {', '.join(unused)}")
    return cases, source


def _run_model(path, ir_model, cases, provider, which, timings, chain=None):
    """Run the model file as it is (plus bfloat16 casts); returns (outputs, names, provider,
    (decoding steps, why they stopped)) with ``chain`` (decoding.py) run after the first
    case, on the same session."""
    label = str(path)
    t = time.perf_counter()
    src, fetch = prepare(path, ir_model)
    sess, used = make_session(src, provider, label=label,
                              external_data_dir=Path(path).resolve().parent)
    timings[f"session_{which}"] = time.perf_counter() - t
    t = time.perf_counter()
    out = [run_session(sess, c, label, fetch) for c in cases]
    timings[f"run_{which}"] = time.perf_counter() - t
    steps = (None, None)
    if chain is not None:
        t = time.perf_counter()
        steps = chain.run(lambda f: run_session(sess, f, label, fetch), out[0])
        timings[f"decode_{which}"] = time.perf_counter() - t
    return out, list(fetch), used, steps


@dataclasses.dataclass
class _Decoding:
    small: object = None  # decoding.Chain, or None: no check
    big: object = None
    sizes: list = dataclasses.field(default_factory=list)
    why: str | None = None  # why a model with a cache gets no check


def _decoding_setup(small_ir, big_ir, prefix: dict, seed: int, cache: dict,
                    big_prefix: dict | None = None, plan: dict | None = None) -> _Decoding:
    """The decoding chains of both models (decoding.py), when the source has a KV cache."""
    if not returns_of(small_ir):
        return _Decoding()
    try:
        desc = describe(small_ir, cache)
        roles = roles_from_graph(small_ir, desc)
    except Exception as exc:  # the check needs the inputs' roles
        return _Decoding(why="the source model was not recognised, so its inputs' roles are "
                             f"unknown ({one_line(str(exc), 200)})")
    fixed = fixed_inputs(small_ir, desc, roles)
    small, big, why = chains(small_ir, big_ir, prefix, roles, desc.vocab, seed,
                             fixed=tuple(fixed), big_prefix=big_prefix, plan=plan)
    if small is None:
        return _Decoding(why=why)
    growing = {n: r for n, r in roles.items() if n not in fixed}  # an encoder's mask stays
    return _Decoding(small, big, lengths(prefix, growing, len(small.steps)))


def _all_passed(report_cases: list, decoding_report: dict | None) -> bool:
    """Every output of every case, and of every decoding step, passed."""
    steps = (decoding_report or {}).get("steps") or []
    return all(o.passed for c in list(report_cases) + steps for o in c["outputs"])


def _decoding_report(dec: _Decoding, ref, got, small_steps, big_steps, ref64, got64, steps64,
                     outputs, out_maps, rule, notes) -> dict | None:
    """The cached-decoding check, step by step (step 0: the prefix, the first case)."""
    if dec.small is None:
        if dec.why is None:
            return None
        notes.append(f"cached decoding not checked: {dec.why}")
        return {"ran": False, "why": dec.why, "steps": []}
    s_runs, s_err = small_steps
    if s_err is not None:  # the source cannot decode with its own cache: no check
        notes.append(f"cached decoding not checked: the source stopped at {s_err}")
        return {"ran": False, "why": f"the source stopped at {s_err}", "steps": []}
    b_runs, b_err = big_steps
    s64 = b64 = None
    if steps64 is not None:
        (s64_runs, s64_err), (b64_runs, b64_err) = steps64
        if s64_err is None:
            s64 = [ref64[0]] + s64_runs
            b64 = [got64[0]] + b64_runs
        else:
            notes.append(f"cached decoding: the float64 level stopped at {s64_err}")
    steps = check([ref[0]] + s_runs, [got[0]] + b_runs, s64, b64, outputs, out_maps, rule,
                  dec.sizes, b_err)
    return {"ran": True, "why": None, "steps": steps, "float64": s64 is not None}


def _float64_by_segments(small_path, big_path, small_ir, big_ir, cases, big_cases, want_small,
                         want_big, provider, rule, notes, cache, dec, why):
    """The float64 level one segment at a time (``blockwise.py``) when the whole float64
    copies do not fit: the same figures in the memory of one block.  None when the models
    cannot be cut into blocks, a segment does not fit either, or a decoding chain is to be
    checked (its steps are not run in float64 this way)."""
    from .blockwise import float64_by_segments

    if dec.small is not None:
        return None
    try:
        ds, db = describe(small_ir, cache), describe(big_ir, cache)
    except LemonError:
        return None
    if not ds.blocks or not db.blocks:
        return None
    sides = (("small", small_path, ds, want_small), ("big", big_path, db, want_big))
    quiet: list = []
    level, runs = float64_by_segments("auto", sides, {"small": cases, "big": big_cases},
                                      provider, rule, quiet)
    if runs is None:
        return None
    notes.append(f"float64 level run one segment at a time ({why})")
    notes.extend(quiet)
    return level, runs["small"], runs["big"], None


def _float64_level(mode, small_path, big_path, small_ir, big_ir, cases, big_cases, want_small,
                   want_big, provider, rule, notes, dec, cache):
    """Run both float64 copies; returns (level description, small runs, big runs, the
    decoding chains' float64 steps or None)."""
    level = float64_level(rule)
    if mode == "off":
        level["why"] = "turned off (float64=off)"
        return level, None, None, None
    need = max(float64_bytes(small_ir), float64_bytes(big_ir))
    avail = _available_memory()
    if mode == "auto" and avail is not None and need > FLOAT64_MEMORY_SHARE * avail:
        level["why"] = (f"the float64 copy needs {need / 1e9:.1f} GB of weights and "
                        f"{avail / 1e9:.1f} GB of memory is available")
        segmented = _float64_by_segments(small_path, big_path, small_ir, big_ir, cases,
                                         big_cases, want_small, want_big, provider, rule,
                                         notes, cache, dec, level["why"])
        if segmented is not None:
            return segmented
        notes.append(f"float64 level skipped: {level['why']}; the {rule.dtype} level uses the "
                     "fallback bound (verify --float64 on forces it)")
        return level, None, None, None
    try:
        s64 = run_float64(small_path, cases, want_small, provider, label=str(small_path),
                          chain=dec.small)
        b64 = run_float64(big_path, big_cases, want_big, provider, label=str(big_path),
                          chain=dec.big)
    except RuntimeFailure as exc:
        level["why"] = one_line(exc.message, 300)
        if mode == "on":
            raise Float64Unavailable(f"the float64 level could not run (--float64 on): "
                                     f"{level['why']}") from None
        notes.append(f"float64 level skipped: {level['why']}")
        return level, None, None, None
    level.update(ran=True, engine=s64.engine if s64.engine == b64.engine
                 else f"{s64.engine} (small), {b64.engine} (big)",
                 provider=b64.provider)
    for run in (s64, b64):
        if run.note:
            notes.append(run.note)
    steps64 = None
    if dec.small is not None:
        steps64 = ((s64.chain or [], s64.chain_error), (b64.chain or [], b64.chain_error))
    return level, s64.outputs, b64.outputs, steps64


def _check_order(small_path, big_path, small_ir, big_ir) -> None:
    """Refuse SMALL and BIG given the wrong way round, in words."""
    small_plan = read_plan(small_ir, [])
    big_plan = read_plan(big_ir, [])
    if small_plan and not big_plan:
        src, tgt = small_plan.get("source", {}), small_plan.get("target", {})
        raise InputError(
            f"the arguments look swapped: {small_path} is an expanded model (hidden "
            f"{src.get('hidden')} -> {tgt.get('hidden')}, layers {src.get('layers')} -> "
            f"{tgt.get('layers')}) and {big_path} is not.",
            hint=f"Give the source first: lemon-onnx verify {big_path} {small_path}.")


def _explain_big_failure(exc: RuntimeFailure, small_ir, big_ir, small_path, big_path,
                         cache) -> LemonError:
    """The big model failed on inputs the small one ran: say why in words when we can."""
    try:
        ds, db = describe(small_ir, cache), describe(big_ir, cache)
    except Exception:  # recognition is only a diagnosis here
        return exc
    if ds.vocab and db.vocab and ds.vocab != db.vocab:
        return InputError(
            f"the models have different vocabularies: {small_path} embeds {ds.vocab} tokens, "
            f"{big_path} {db.vocab}, so token ids valid for one are not valid for the other "
            "and the two do not compute the same function.",
            hint="Compare a model with its own expansion (lemon-onnx expand keeps the "
                 "vocabulary).")
    if ds.hidden > db.hidden or ds.num_layers > db.num_layers:
        return InputError(
            f"{big_path} is smaller than {small_path} (hidden {db.hidden} vs {ds.hidden}, "
            f"layers {db.num_layers} vs {ds.num_layers}): the arguments look swapped.",
            hint=f"Give the source first: lemon-onnx verify {big_path} {small_path}.")
    return exc

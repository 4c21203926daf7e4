"""Numerical equivalence of an expanded model and its source, measured with ONNX Runtime.

``verify(small, big)`` runs both models on the same inputs and compares every output of the
small model with the output of the same name in the big one, at two levels: the float64
copies of both graphs (the rewrite is lossless as stored) and the models' own dtype (the
expanded model's rounding error stays close to the source's own).  The rules are in
``compare.py``; the float64 copies in ``precision.py``.

Modules: ``inputs`` (synthesised or user inputs), ``runtime`` (ONNX Runtime sessions and
providers), ``precision`` (float64 copies, onnx's reference evaluator where ONNX Runtime has
no double kernel), ``compare`` (the rules), ``layerwise`` (per-block hidden states),
``report`` (the report and its JSON form, schema below), ``core`` (``verify`` itself).

Inputs
    Deterministic and realistic (``synthesize_inputs``), seeded: token ids drawn in
    ``[0, vocab)`` with the vocabulary read from the recognised embedding table (100 when it
    cannot be recognised), attention masks of ones with trailing padding in the last row (never
    an all-zero row), token type ids half 0 / half 1 (only values below the row count of the
    token-type table), position ids ``arange``, float inputs (pixel values) standard normal.
    Dynamic axes take two (batch, sequence) cases: (2, 7) and (3, 11), read from where the
    inputs go (the token ids' axes; a KV cache's joined axis is the past: 0, an empty cache;
    a dim declared as a sum is the sum of its terms); position ids follow the mask (running
    count of attended tokens minus one) where there is one.  Or the user's own
    ``.npz``: keys ``<input name>`` (one case) or ``case<k>/<input name>`` (several cases; the
    fixtures' ``case<k>/in/<input name>`` layout is read too).  ``save_inputs`` writes the
    ``case<k>/<input name>`` layout.

Which outputs are compared, and how
    By name.  The big model's ``metadata_props["lemon.plan"]`` (JSON, written by ``expand``)
    may map an output: ``{"compare": "prefix", "axis": -1, "size": d}`` compares
    ``big[..., :d]`` with the small output, ``{"compare": "whole"}`` (or no entry) compares whole
    arrays, which must have the same shape; ``{"compare": "take", "axis": k, "index": [...]}``
    (a KV cache) compares the big output whole with the small one taken along axis k by the
    index (big head j is source head index[j]); ``"name"`` names the big model's output when it
    differs (a cache renumbered with its layer).  An output whose shapes differ without a map is
    never sliced silently: it fails, and the report says why.

Cached decoding (``decoding.py``)
    For a source with a KV cache: the first case as prefix, then ``decoding.STEPS`` steps of
    one token, each model fed its own returned cache (float64 copies too); logits and the
    source's caches compared at every step.  The expanded model's inputs come from the
    source's through ``plan["inputs"]`` (a cache of the layer it belongs to, KV heads taken;
    a twin layer's: zeros of that shape).

Providers
    ``auto``: CUDA when onnxruntime-gpu is installed *and* a session really runs on the GPU
    (``session.get_providers()[0]``; ONNX Runtime silently falls back to the CPU when CUDA
    cannot start), else CPU.  ``cuda``: CUDA or ``RuntimeFailure`` (exit 3).  ``cpu``: CPU.
    TF32 is disabled on CUDA (``use_tf32=0``).  The report names the provider that really ran.

JSON report (``VerifyReport.to_dict()`` / ``to_json()``, ``schema_version`` 2); non-finite
floats are the strings ``"inf"``, ``"-inf"``, ``"nan"``::

    {
      "schema_version": 2,
      "passed": bool,                     # every output of every case passed
      "small": str, "big": str,           # model paths (or "<in-memory>")
      "provider_requested": "auto"|"cuda"|"cpu",
      "provider_used": str,               # e.g. "CPUExecutionProvider"
      "atol": float, "rtol": float,       # the fixed rule's tolerances (rule "fixed"), else
                                          # the dtype defaults behind min_atol/min_rtol
      "dtype": "float32"|"float16"|"bfloat16"|"float64",   # of the small model's outputs
      "levels": {
        "float64": {"ran": bool, "engine": "onnxruntime"|"onnx.reference"|null,
                    "rtol": 1e-9, "decides": bool, "why": str|null},
        "dtype": {"dtype": str, "rule": "relative"|"fixed"|"fallback", "factor": 4.0,
                  "floor_ulps": 8, "fallback_ulps": 256, "eps": float}},
      "cases": [                          # one per input case
        {"shapes": {input_name: [int, ...]},
         "outputs": [                     # one per output of the small model
           {"name": str, "shape_small": [int], "shape_big": [int] | null,
            "compared": "whole" | "prefix:<d>" | "prefix:<d>@axis<k>" | "kv-map@axis<k>"
                        | "not compared",     # kv-map: the source's KV heads taken by the map
            "max_abs": float, "mean_abs": float, "max_rel": float,  # |big - small|, dtype
            "nan_small": int, "nan_big": int, "inf_small": int, "inf_big": int,
            "min_atol": float, "min_rtol": float,
            "failed_elements": int, "elements": int, "passed": bool,
            "message": str | null,        # why an output failed without numbers
            "ref_max": float|null,        # max |small64| (fallback: max |small|)
            "own_error": float|null,      # max |small - small64|
            "error": float|null,          # max |big - small64| (fallback: |big - small|)
            "ratio": float|null,          # error / own_error
            "bound": float|null,          # what error had to stay within
            "rule": "ratio"|"floor"|"fallback"|"fixed",
            "alg_max_abs": float|null,    # max |big64 - small64|
            "alg_rel": float|null,        # alg_max_abs / ref_max
            "alg_passed": bool|null,
            "nonfinite_mismatch": int,    # NaN/Inf in one model only
            "caught_by": "float64"|"<dtype>"|"float64+<dtype>"|"shape"|"cache"|null}]}],
      "decoding": null | {                # null: the source has no KV cache
        "ran": bool, "why": str|null,     # why it did not run (blockwise, unknown roles, ...)
        "float64": bool,                  # the float64 level ran for the steps
        "steps": [{"step": int,           # 0: the prefix (the first case)
                   "tokens": int,         # new tokens at this step
                   "attended": int|null,  # the attention mask's length (past + new)
                   "outputs": [ ... as in a case ... ]}]},
      "first_divergent_block": int | null,
      "layerwise": null | [               # null unless layerwise=True and recognition worked
        {"block": int, "big_block": int, "value_small": str, "value_big": str,
         ... the fields of an output above except name and shapes ...}],
      "seconds": float,                   # wall time of the whole verification
      "timings": {phase: seconds},        # load, session_*, run_*, float64, compare, layerwise
      "notes": [str]
    }
"""

from __future__ import annotations

from .compare import (ALGEBRAIC_RTOL, FACTOR, FALLBACK_ULPS, FLOOR_ULPS, Rule, compare_arrays,
                      compare_output, default_tolerances)
from .core import FLOAT64_MODES, verify
from .inputs import DEFAULT_CASES, load_inputs, save_inputs_npz, synthesize_inputs
from .models import PLAN_KEY
from .precision import run_float64, to_float64
from .compare import OutputReport
from .report import SCHEMA_VERSION, VerifyReport
from .runtime import CPU, CUDA, make_session

__all__ = [
    "ALGEBRAIC_RTOL", "CPU", "CUDA", "DEFAULT_CASES", "FACTOR", "FALLBACK_ULPS", "FLOAT64_MODES",
    "FLOOR_ULPS", "OutputReport", "PLAN_KEY", "Rule", "SCHEMA_VERSION", "VerifyReport",
    "compare_arrays", "compare_output", "default_tolerances", "load_inputs", "make_session",
    "run_float64", "save_inputs_npz", "synthesize_inputs", "to_float64", "verify",
]

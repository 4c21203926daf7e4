"""An encoder-decoder export folder checked the way runtimes run it (optimum's
``ORTModelForSeq2SeqLM``): the source folder's pipeline against the expanded folder's.

1. the encoder once on source tokens with a padded attention mask; its output is compared on
   the coordinates the plan maps (the first d);
2. the decoder without past key values on a prefix of decoder tokens, each pipeline's
   cross-attention reading its *own* encoder's output: logits compared;
3. steps of cached decoding with the decoder with past key values: each step feeds one token
   (the source's greedy choice, the same to both, so the steps stay comparable) and each
   pipeline's own returned caches (the self-attention cache grows step by step; the
   encoder cache is what the decoder without past returned): logits compared at every step,
   and whether both choose the same greedy token;
4. a merged decoder runs the same sequence, its first step in the branch without past (the
   cache inputs it does not read given empty), the others in the branch with past.

The files are found by optimum's file names and fed by its input names (``input_ids``,
``encoder_attention_mask``, ``encoder_hidden_states``, ``past_key_values.<i>.<...>`` from
``present.<i>.<...>``, ``use_cache_branch``): that is its loader's contract.  Each comparison
allows ``FALLBACK_ULPS`` epsilons of the dtype times max |source logits| (the float32 level
without float64 copies, ``compare.py``), or ``compare.APPROXIMATE_RTOL`` relative for a plan
that is approximate by design (Post-LN depth); the per-file verification holds each file to
the two full levels.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from . import compare as cmp

ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
WITH_PAST = "decoder_with_past_model.onnx"
MERGED = "decoder_model_merged.onnx"
#: (batch, encoder tokens, decoder prefix tokens) and the cached steps after the prefix
SHAPE = (2, 7, 3)
STEPS = 3

_PAST = re.compile(r"^past_key_values\.(.+)$")


@dataclasses.dataclass
class Row:
    """One comparison of the pipeline: which run, which output, how far apart."""

    run: str
    output: str
    max_abs: float
    ref_max: float
    rel: float
    bound: float
    passed: bool
    same_token: bool | None = None  # greedy choice of the last position, where logits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PipelineReport:
    """The pipeline check of an encoder-decoder folder (module docstring)."""

    rows: list
    notes: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def worst_logits_rel(self) -> float:
        return max((r.rel for r in self.rows if r.output == "logits"), default=0.0)

    def summary(self) -> str:
        steps = sum(1 for r in self.rows if r.output == "logits")
        tokens = [r.same_token for r in self.rows if r.same_token is not None]
        return (f"pipeline {'PASS' if self.passed else 'FAIL'}: encoder, {steps} decoder "
                f"step(s) compared, worst logits difference {self.worst_logits_rel:.2g} of max "
                f"|logits|, greedy tokens {sum(tokens)}/{len(tokens)} the same")

    def format(self) -> str:
        lines = [self.summary()]
        for r in self.rows:
            tok = "" if r.same_token is None else (" same token" if r.same_token
                                                    else " OTHER TOKEN")
            lines.append(f"  {r.run:<34} {r.output:<22} max|diff| {r.max_abs:.3g}  rel "
                         f"{r.rel:.3g} (bound {r.bound:.3g}) "
                         f"{'ok' if r.passed else 'FAIL'}{tok}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "rows": [r.to_dict() for r in self.rows],
                "notes": list(self.notes)}

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)


def _find(folder: Path, name: str) -> Path | None:
    """The model file of that name, at the top of the folder or in onnx/ (Transformers.js)."""
    for sub in (".", "onnx"):
        if (folder / sub / name).is_file():
            return folder / sub / name
    return None


def applies(folder) -> bool:
    """Whether the folder holds an encoder and a decoder this check can run."""
    f = Path(folder)
    return _find(f, ENCODER) is not None and any(_find(f, n) for n in (DECODER, MERGED))


class _Pipeline:
    """One folder's sessions, run as optimum runs them."""

    def __init__(self, folder: Path, provider: str):
        from .runtime import make_session

        self.folder = folder
        self.sessions, self.paths = {}, {}
        for name in (ENCODER, DECODER, WITH_PAST, MERGED):
            path = _find(folder, name)
            if path is not None:
                self.paths[name] = path
                self.sessions[name], self.provider = make_session(str(path), provider,
                                                                  label=str(path))

    def run(self, name: str, feeds: dict) -> dict:
        from .runtime import run_session

        sess = self.sessions[name]
        return run_session(sess, {i.name: feeds[i.name] for i in sess.get_inputs()},
                           str(self.paths[name]))

    def inputs(self, name: str) -> list:
        return self.sessions[name].get_inputs()


def _past_feeds(presents: dict, enc_presents: dict | None = None) -> dict:
    """``past_key_values.<x>`` fed from ``present.<x>``: the returned caches; the encoder's
    from the run without past (the run with past does not return them)."""
    out = {}
    for src in (enc_presents or {}, presents):
        for k, a in src.items():
            if k.startswith("present."):
                out["past_key_values." + k[len("present."):]] = a
    return out


def _empty_past(inputs: list, batch: int, dtype=np.float32) -> dict:
    """Caches a branch without past does not read: declared static axes, batch, 0 tokens."""
    out = {}
    for i in inputs:
        if not _PAST.match(i.name):
            continue
        shape = [d if isinstance(d, int) else None for d in i.shape]
        shape[0] = batch
        shape = [0 if d is None else d for d in shape]
        out[i.name] = np.zeros(shape, dtype=dtype)
    return out


def _compare(run: str, name: str, ref: np.ndarray, got: np.ndarray, rtol: float,
             token: bool) -> Row:
    """``got`` against ``ref``; a wider last axis (the encoder's output) on its first
    coordinates, where an expansion keeps the source's (whatever the steps of a chain)."""
    if got.ndim == ref.ndim and got.shape[:-1] == ref.shape[:-1] and \
            got.shape[-1] > ref.shape[-1]:
        got = got[..., :ref.shape[-1]]
    if got.shape != ref.shape:
        return Row(run, name, float("inf"), float(np.abs(ref).max()), float("inf"), rtol,
                   False)
    r, g = ref.astype(np.float64), got.astype(np.float64)
    diff = float(np.abs(g - r).max()) if r.size else 0.0
    ref_max = float(np.abs(r).max()) if r.size else 0.0
    rel = diff / ref_max if ref_max else diff
    same = None
    if token and r.ndim == 3:
        same = bool(np.array_equal(r[:, -1].argmax(-1), g[:, -1].argmax(-1)))
    ok = bool(np.isfinite(g).all() == np.isfinite(r).all() and rel <= rtol)
    return Row(run, name, diff, ref_max, rel, rtol, ok, same)


def check(src_dir, out_dir, *, provider: str = "auto", seed: int = 0,
          approximate: bool = False, steps: int = STEPS, shape: tuple = SHAPE
          ) -> PipelineReport:
    """Run the source folder's pipeline and the expanded folder's side by side (module
    docstring) and compare them; ``approximate``: the expansion is approximate by design."""
    from .inputs import synthesize_inputs
    from .models import as_ir, describe

    src, out = Path(src_dir), Path(out_dir)
    a, b = _Pipeline(src, provider), _Pipeline(out, provider)
    rtol = cmp.APPROXIMATE_RTOL if approximate else cmp.FALLBACK_ULPS * cmp.EPSILON["float32"]
    batch, n_enc, n_dec = shape
    rows: list[Row] = []
    notes = [f"batch {batch}, {n_enc} encoder tokens (the last row padded), a prefix of "
             f"{n_dec} decoder tokens, then {steps} cached step(s); each step's token is the "
             "source's greedy choice"]
    enc_feeds = synthesize_inputs(str(a.paths[ENCODER]), seed=seed, cases=((batch, n_enc),))[0]
    mask = enc_feeds.get("attention_mask")  # synthesised with the last row padded
    enc_a, enc_b = a.run(ENCODER, enc_feeds), b.run(ENCODER, enc_feeds)
    for name, ref in enc_a.items():
        rows.append(_compare("encoder", name, ref, enc_b[name], rtol, False))
    hidden_a, hidden_b = next(iter(enc_a.values())), next(iter(enc_b.values()))
    vocab = describe(as_ir(str(a.paths[ENCODER]))[0]).vocab
    rng = np.random.default_rng([int(seed), 17])
    ids = rng.integers(0, vocab, size=(batch, n_dec)).astype(np.int64)
    common = {"encoder_attention_mask": mask if mask is not None else
              np.ones((batch, n_enc), np.int64)}
    lacking = [n for n in a.sessions if n not in b.sessions]
    for name in lacking:  # a file the source folder runs and the expanded one lacks
        rows.append(Row(f"{name} (missing in {out})", "logits", float("inf"), 0.0,
                        float("inf"), rtol, False))
    runs = [(DECODER, False)] if DECODER in a.sessions and DECODER in b.sessions else []
    if MERGED in a.sessions and MERGED in b.sessions:
        runs.append((MERGED, True))
    for first, merged in runs:
        label = "merged, " if merged else ""
        feeds_a = {**common, "input_ids": ids, "encoder_hidden_states": hidden_a}
        feeds_b = {**common, "input_ids": ids, "encoder_hidden_states": hidden_b}
        if merged:
            feeds_a.update(_empty_past(a.inputs(MERGED), batch),
                           use_cache_branch=np.array([False]))
            feeds_b.update(_empty_past(b.inputs(MERGED), batch),
                           use_cache_branch=np.array([False]))
        out_a, out_b = a.run(first, feeds_a), b.run(first, feeds_b)
        rows.append(_compare(f"{label}decoder, {n_dec} tokens, no past", "logits",
                             out_a["logits"], out_b["logits"], rtol, True))
        step_model = MERGED if merged else WITH_PAST
        if step_model not in a.sessions or step_model not in b.sessions or steps <= 0:
            continue
        enc_cache_a = {k: v for k, v in out_a.items() if k.startswith("present.")}
        enc_cache_b = {k: v for k, v in out_b.items() if k.startswith("present.")}
        pres_a, pres_b, tok = enc_cache_a, enc_cache_b, out_a["logits"][:, -1].argmax(-1)
        for step in range(1, steps + 1):
            tok_ids = tok.reshape(batch, 1).astype(np.int64)
            fa = {**common, "input_ids": tok_ids, **_past_feeds(pres_a, enc_cache_a)}
            fb = {**common, "input_ids": tok_ids, **_past_feeds(pres_b, enc_cache_b)}
            if merged:
                fa.update(encoder_hidden_states=hidden_a, use_cache_branch=np.array([True]))
                fb.update(encoder_hidden_states=hidden_b, use_cache_branch=np.array([True]))
            sa, sb = a.run(step_model, fa), b.run(step_model, fb)
            rows.append(_compare(f"{label}cached step {step}", "logits", sa["logits"],
                                 sb["logits"], rtol, True))
            # what a step returns besides the logits is its cache (a merged decoder's branch
            # with past returns empty placeholders for the encoder cache: left out)
            pres_a = {k: v for k, v in sa.items() if k.startswith("present.") and v.size}
            pres_b = {k: v for k, v in sb.items() if k.startswith("present.") and v.size}
            tok = sa["logits"][:, -1].argmax(-1)
    return PipelineReport(rows, notes)

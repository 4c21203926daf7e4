"""Encoder-decoders exported for generation (optimum's text2text-generation-with-past): the
T5 and BART folders of ``models/optimum`` (``models/export_optimum.py``) expand as one model
(encoder, decoder without and with past key values, merged decoder) at width 2 (and 1.5 for
T5; BART is Post-LN: refused with the reason) and depth 2, every file verifies, the pipeline
check (``verification/seq2seq.py``) passes step by step, and optimum's own client,
``ORTModelForSeq2SeqLM``, generates the same 24 greedy tokens from the expanded folder as from
the source, merged and unmerged, with first-step logits within 1e-3 relative.  Every other
encoder-decoder of the manifest (T5 v1.1, mT5, mBART, Marian, Pegasus, BART with stacks of
different depths) is held to the same at width 2, depth 2.  A folder whose encoder cache is
broken fails the pipeline check.

The folders and optimum's virtualenv (``.venv-optimum``: optimum-onnx pins transformers 4.57)
are generated, not committed; CI makes both (``.ci/run``) and sets ``LEMON_REQUIRE_OPTIMUM=1``,
so a missing folder or interpreter fails there instead of skipping.  Optimum runs once, in one
subprocess, for every expanded folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lemon_onnx
from lemon_onnx import merged
from lemon_onnx.errors import LemonError
from lemon_onnx.verification import seq2seq

# the module's fixtures expand every folder once: its tests stay on one xdist worker
pytestmark = pytest.mark.xdist_group("seq2seq")

ROOT = Path(__file__).resolve().parent.parent
OPTIMUM = ROOT / "models" / "optimum"
OPTIMUM_PY = ROOT / ".venv-optimum" / "bin" / "python"
REQUIRED = os.environ.get("LEMON_REQUIRE_OPTIMUM") == "1"
FOLDERS = ("t5-s2s", "bart-s2s")
#: refused by design, with these words in the reason: LongT5's encoder attends within blocks
#: of tokens (local attention), not through one Q.K^T product
REFUSED = {"longt5-s2s": "not the Q.K^T and P.V MatMuls"}


def _others() -> list:
    """The manifest's other encoder-decoders (exported: an export error is recorded there)."""
    path = OPTIMUM / "manifest.json"
    if not path.exists():
        return []
    return [e["name"] for e in json.loads(path.read_text())
            if e.get("task") == "text2text-generation-with-past" and not e.get("export_error")
            and e["name"] not in FOLDERS and e["name"] not in REFUSED]


#: name -> (source folder, expand options)
EXPANSIONS = {
    "t5-w2-d2": ("t5-s2s", dict(width=2, depth=2)),
    "t5-w1.5-d2": ("t5-s2s", dict(width=1.5, depth=2)),
    "bart-w2-d2": ("bart-s2s", dict(width=2, depth=2)),
    **{f"{n.removesuffix('-s2s')}-w2-d2": (n, dict(width=2, depth=2)) for n in _others()},
}


def _folder(name: str) -> Path:
    path = OPTIMUM / name
    if not (path / "encoder_model.onnx").exists():
        if REQUIRED:
            raise FileNotFoundError(f"{path}: run .venv-optimum/bin/python "
                                    "models/export_optimum.py")
        pytest.skip(f"{path} is not exported (models/export_optimum.py)")
    return path


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """Each expansion of EXPANSIONS, verified (every file, then the pipeline): name ->
    FolderResult."""
    out = {}
    base = tmp_path_factory.mktemp("s2s")
    for name, (src, opts) in EXPANSIONS.items():
        out[name] = lemon_onnx.expand(_folder(src), base / name, **opts)
    return out


# --------------------------------------------------------------------------- recognition
@pytest.mark.parametrize("family", FOLDERS)
def test_every_decoder_block_has_a_cross_attention(family):
    """Recognised by structure: queries from the decoder stream, keys and values projected
    from the encoder output (a graph input), or read from the encoder cache inputs."""
    folder = _folder(family)
    plain = lemon_onnx.inspect(folder / "decoder_model.onnx")
    past = lemon_onnx.inspect(folder / "decoder_with_past_model.onnx")
    assert plain.num_layers == past.num_layers == 2
    for b in plain.blocks:
        x = b.cross_attention
        assert x is not None and x.k is not None and x.memory == "encoder_hidden_states"
        assert (x.heads, x.head_dim) == (4, 16)
    for b in past.blocks:
        x = b.cross_attention
        assert x is not None and x.k is None and x.key_input and x.value_input
    assert [b.cross_attention.key_input for b in past.blocks] == \
        [f"past_key_values.{i}.encoder.key" for i in range(2)]
    enc = lemon_onnx.inspect(folder / "encoder_model.onnx")
    assert all(b.cross_attention is None for b in enc.blocks)


# --------------------------------------------------------------------------- expansion
@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPANSIONS))
def test_folder_expands_verifies_and_runs_as_a_pipeline(expanded, name):
    res = expanded[name]
    src, opts = EXPANSIONS[name]
    assert res.verified, res.summary()
    assert set(res.files) == {"encoder_model.onnx", "decoder_model.onnx",
                              "decoder_with_past_model.onnx", "decoder_model_merged.onnx"}
    pipe = res.pipeline
    assert pipe is not None and pipe.passed
    logits = [r for r in pipe.rows if r.output == "logits"]
    assert len(logits) == 8 and all(r.same_token for r in logits)  # 2 x (prefix + 3 steps)
    assert pipe.worst_logits_rel < 1e-5
    source = json.loads((OPTIMUM / src / "config.json").read_text())
    cfg = json.loads((res.output / "config.json").read_text())
    hidden, heads = 64 * opts["width"], 4 * opts["width"]
    stacks = {stack: res.files[f].plan.target["layers"]
              for stack, f in (("encoder", "encoder_model.onnx"),
                               ("decoder", "decoder_model.onnx"))}
    # each stack twice as deep as the source's (T5 v1.1 and BART 3x2: different depths)
    enc_key = "num_layers" if "num_decoder_layers" in source else "encoder_layers"
    dec_key = "num_decoder_layers" if "num_decoder_layers" in source else "decoder_layers"
    assert (cfg[enc_key], cfg[dec_key]) == (2 * source[enc_key], 2 * source[dec_key]) == \
        (stacks["encoder"], stacks["decoder"])
    assert cfg["d_model"] == hidden
    assert cfg.get("num_heads", cfg.get("decoder_attention_heads")) == heads
    layers = stacks["decoder"]
    if any(n.startswith("The tied head was untied") for n in res.files["decoder_model.onnx"]
           .plan.notes):
        assert cfg["tie_word_embeddings"] is False  # Post-LN: the tied head was untied
    # what optimum feeds: the encoder output at the new width, one cache per layer, in order
    dec = onnx.load(str(res.output / "decoder_model.onnx"), load_external_data=False)
    ins = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
           for i in dec.graph.input}
    assert ins["encoder_hidden_states"][-1] == hidden
    presents = [o.name for o in dec.graph.output if o.name.startswith("present.")]
    assert presents == [f"present.{i}.{s}.{kv}" for i in range(layers)
                        for s in ("decoder", "encoder") for kv in ("key", "value")]
    past = onnx.load(str(res.output / "decoder_with_past_model.onnx"), load_external_data=False)
    cache_in = [(i.name, i.type.tensor_type.shape.dim[1].dim_value) for i in past.graph.input
                if i.name.startswith("past_key_values.")]
    assert [n for n, _ in cache_in] == [f"past_key_values.{i}.{s}.{kv}" for i in range(layers)
                                        for s in ("decoder", "encoder")
                                        for kv in ("key", "value")]
    assert {h for _, h in cache_in} == {heads}
    assert src != "bart-s2s" or cfg["tie_word_embeddings"] is False


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_the_reason(name, tmp_path):
    if not (OPTIMUM / name / "encoder_model.onnx").exists():
        if REQUIRED:
            raise FileNotFoundError(f"{OPTIMUM / name}: run models/export_optimum.py")
        pytest.skip(f"{name} is not exported")
    with pytest.raises(LemonError) as e:
        lemon_onnx.expand(OPTIMUM / name, tmp_path / "out", width=2, depth=2, verify=False)
    assert e.value.exit_code == 2 and REFUSED[name] in e.value.message
    assert not (tmp_path / "out").exists()


def test_post_ln_fractional_width_is_refused(tmp_path):
    with pytest.raises(LemonError) as e:
        lemon_onnx.expand(_folder("bart-s2s"), tmp_path / "out", width=1.5, depth=2)
    assert e.value.exit_code == 2 and "Post-LN" in e.value.message
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- optimum
@pytest.fixture(scope="module")
def generated(expanded):
    """optimum's ORTModelForSeq2SeqLM on every expanded folder and its source, in one
    subprocess of optimum's interpreter: name -> {way of loading: result}."""
    if not OPTIMUM_PY.exists():
        if REQUIRED:
            raise FileNotFoundError(f"{OPTIMUM_PY}: make optimum's virtualenv (.ci/run)")
        pytest.skip("optimum's virtualenv (.venv-optimum) is not there")
    jobs = [{"src": str(OPTIMUM / EXPANSIONS[n][0]), "big": str(r.output)}
            for n, r in expanded.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([str(OPTIMUM_PY), str(ROOT / "tests" / "optimum_generate.py")],
                         input=json.dumps(jobs), capture_output=True, text=True, timeout=900,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {n: r for n, r in zip(expanded, results)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPANSIONS))
def test_optimum_generates_the_same_24_tokens(generated, name):
    res = generated[name]
    ways = {k: v for k, v in res.items() if isinstance(v, dict)}
    # merged (what ORTModelForSeq2SeqLM loads by default) and the separate decoders
    assert {"merged", "unmerged", "merged, distinct", "unmerged, distinct"} <= set(ways)
    for way, r in ways.items():
        assert "error" not in r, (way, r.get("error"), r.get("trace"))
        assert r["new_tokens"] == 24
        assert r["same_tokens"], (way, r["tokens_src"], r["tokens_big"])
        assert r["logits_rel"] < 1e-3, (way, r["logits_rel"])
    # greedy with no token repeated picks by the logits' ranking: a varied sequence
    assert len(set(ways["merged, distinct"]["tokens_src"][0])) >= 20


# --------------------------------------------------------------------------- it can fail
def test_pipeline_check_catches_a_broken_encoder_cache(expanded, tmp_path):
    """Layer 0 and 2's encoder values (two source blocks' after depth 2) swapped in the
    expanded decoder's outputs: its own logits are untouched, so only the cached steps (which
    read the encoder cache it returned) can tell; the pipeline check must fail there and pass
    the run without past."""
    res = expanded["t5-w2-d2"]
    broken = tmp_path / "broken"
    shutil.copytree(res.output, broken)
    path = broken / "decoder_model.onnx"
    model = onnx.load(str(path))
    names = {"present.0.encoder.value": "present.2.encoder.value",
             "present.2.encoder.value": "present.0.encoder.value"}
    for n in model.graph.node:
        for k, o in enumerate(n.output):
            if o in names:
                n.output[k] = names[o] + ".tmp"
        for k, i in enumerate(n.input):
            if i in names:
                n.input[k] = names[i] + ".tmp"
    for n in model.graph.node:
        n.output[:] = [o.removesuffix(".tmp") for o in n.output]
        n.input[:] = [i.removesuffix(".tmp") for i in n.input]
    onnx.save(model, str(path))
    # the merged decoder gets the same broken branch
    like = onnx.load(str(broken / "decoder_model_merged.onnx"))
    parts = merged.split(like)
    onnx.save(merged.merge(parts.then_model, model, cond=parts.cond,
                           placeholders=parts.placeholders, like=like),
              str(broken / "decoder_model_merged.onnx"))
    rep = seq2seq.check(_folder("t5-s2s"), broken)
    assert not rep.passed
    rows = {r.run: r for r in rep.rows}
    for merged_ in ("", "merged, "):
        assert rows[f"{merged_}decoder, 3 tokens, no past"].passed
        assert not all(rows[f"{merged_}cached step {i}"].passed for i in (1, 2, 3))


# --------------------------------------------------------------------------- merged files
@pytest.mark.parametrize("family", FOLDERS)
def test_split_and_merge_round_trip(family, tmp_path):
    """The merged file's branches as standalone models compute what the separate decoder
    files compute, bit for bit, and merging them back gives the source's inputs, outputs and
    shared initializers."""
    import onnxruntime as ort

    folder = _folder(family)
    src = onnx.load(str(folder / "decoder_model_merged.onnx"))
    parts = merged.split(src)
    assert parts.cond == "use_cache_branch"
    assert parts.placeholders["else_branch"] == []
    assert parts.placeholders["then_branch"] == [f"present.{i}.encoder.{kv}" for i in range(2)
                                                 for kv in ("key", "value")]
    onnx.save(parts.else_model, str(tmp_path / "no_past.onnx"))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 128, (2, 3)),
             "encoder_attention_mask": np.ones((2, 5), np.int64),
             "encoder_hidden_states": rng.standard_normal((2, 5, 64)).astype(np.float32)}
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
            for p in (tmp_path / "no_past.onnx", folder / "decoder_model.onnx")]
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    again = merged.merge(parts.then_model, parts.else_model, cond=parts.cond,
                         placeholders=parts.placeholders, like=src)
    onnx.checker.check_model(again)
    assert [i.name for i in again.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in again.graph.output] == [o.name for o in src.graph.output]
    assert len(again.graph.initializer) == len(src.graph.initializer)


def test_a_merged_file_expands_alone(tmp_path):
    """BART in depth only: its branches' graphs, run inside the If, must compute bit for bit
    what they compute alone (ONNX Runtime's optimizations fuse them otherwise there: the
    merge check runs without them)."""
    res = lemon_onnx.expand(_folder("bart-s2s") / "decoder_model_merged.onnx",
                            tmp_path / "merged.onnx", depth=2)
    assert res.verified and set(res.verification.branches) == {"with past", "without past"}
    assert res.verification.merge_check.startswith("each branch equals")
    model = onnx.load(str(tmp_path / "merged.onnx"), load_external_data=False)
    assert merged.find_if(model) is not None
    with pytest.raises(LemonError) as e:  # in memory it cannot be: it is made of two files
        from lemon_onnx.expansion import expand_model

        expand_model(_folder("t5-s2s") / "decoder_model_merged.onnx", width=2)
    assert e.value.exit_code == 2


def test_inspect_describes_each_branch():
    run = subprocess.run([sys.executable, "-m", "lemon_onnx", "inspect",
                          str(_folder("t5-s2s") / "decoder_model_merged.onnx")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "merged decoder" in run.stdout
    assert "with past:" in run.stdout and "without past:" in run.stdout
    assert run.stdout.count("cross-attention") == 4  # 2 blocks x 2 branches

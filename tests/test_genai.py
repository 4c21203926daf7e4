"""Folders built by ONNX Runtime GenAI's model builder (``models/export_genai.py``): the
decoder graph holds GroupQueryAttention (packed QKV, KV cache, rotary inside) and
SkipSimplifiedLayerNormalization.  ``lemon-onnx expand DIR`` must verify (both levels, cached
decoding), keep the fused ops, rewrite ``genai_config.json`` with the new sizes, and the
expanded folder must run in ONNX Runtime GenAI itself: greedy generation gives the source's
tokens, and the first step's logits agree.

The folders are generated, not committed; CI builds them (``.ci/run``) and sets
``LEMON_REQUIRE_GENAI=1``, so a missing folder fails there instead of skipping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, run_cli
from lemon_onnx import hfconfig
from lemon_onnx.hfconfig import ConfigError

GENAI = ROOT / "models" / "genai"
REQUIRED = os.environ.get("LEMON_REQUIRE_GENAI") == "1"
FAMILIES = ("llama-fp32", "qwen2-fp32", "mistral-fp32", "gemma-fp32")


def _folder(name: str) -> Path:
    path = GENAI / name
    if not path.is_dir():
        assert not REQUIRED, f"{path} is missing: run python models/export_genai.py"
        pytest.skip("ORT GenAI folders are built by .ci/run (models/export_genai.py)")
    return path


def _ops(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    out: dict = {}
    for n in m.graph.node:
        if n.domain == "com.microsoft":
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _generate(folder: Path, steps: int = 10):
    """Greedy tokens and the first step's logits, as ONNX Runtime GenAI runs the folder."""
    og = pytest.importorskip("onnxruntime_genai") if not REQUIRED else \
        __import__("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=6 + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[5, 17, 33, 42, 9, 71]], dtype=np.int32))
    tokens, first = [], None
    while not gen.is_done():
        gen.generate_next_token()
        if first is None:
            first = np.array(gen.get_output("logits"), dtype=np.float64)
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, first


@pytest.mark.parametrize("name,width", [(f, 2) for f in FAMILIES] + [("llama-fp32", 1.5)])
def test_model_builder_folder_expands_and_runs_in_genai(tmp_path, name, width):
    src = _folder(name)
    out = tmp_path / "out"
    r = run_cli("expand", src, "-o", out, "--width", width, "--depth", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cached decoding 3 steps ok" in r.stdout
    assert "genai_config.json rewritten" in r.stdout
    before, after = _ops(src / "model.onnx"), _ops(out / "model.onnx")
    assert before["GroupQueryAttention"] == 2 and after["GroupQueryAttention"] == 4
    assert after.get("SkipSimplifiedLayerNormalization", 0) >= 2 * before[
        "SkipSimplifiedLayerNormalization"] - 1
    src_cfg = json.loads((src / "genai_config.json").read_text())["model"]["decoder"]
    cfg = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    hidden = int(round(src_cfg["hidden_size"] * width))
    assert cfg["hidden_size"] == hidden and cfg["num_hidden_layers"] == 4
    assert cfg["head_size"] == src_cfg["head_size"]
    assert cfg["num_attention_heads"] == hidden // cfg["head_size"]
    assert cfg["num_key_value_heads"] * src_cfg["num_attention_heads"] == \
        cfg["num_attention_heads"] * src_cfg["num_key_value_heads"]
    tokens, logits = _generate(src)
    tokens2, logits2 = _generate(out)
    assert tokens2 == tokens
    np.testing.assert_allclose(logits2, logits, atol=1e-4 * max(1.0, np.abs(logits).max()))


def test_a_changed_weight_in_a_builder_folder_fails_verification(tmp_path):
    """The check is live on this form: a weight changed after expanding is caught (exit 1)."""
    src = _folder("llama-fp32")
    out = tmp_path / "out"
    assert run_cli("expand", src, "-o", out, "--width", 2, "--depth", 2).returncode == 0
    m = onnx.load(str(out / "model.onnx"))
    w = next(t for t in m.graph.initializer if "o_proj" in t.name)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0, 0] += 0.05
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    r = run_cli("verify", src / "model.onnx", tmp_path / "bad.onnx")
    assert r.returncode == 1, r.stdout[-2000:]


def test_genai_config_rewrite_checks_the_source_sizes():
    cfg = {"model": {"decoder": {"hidden_size": 64, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "num_hidden_layers": 2,
                                 "head_size": 16, "filename": "model.onnx"},
                     "context_length": 64}, "search": {"max_length": 64}}
    plan = {"source": {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "head_dim": 16},
            "target": {"hidden": 96, "heads": 6, "kv_heads": 3, "layers": 4, "head_dim": 16}}
    out = hfconfig.expanded_genai_config(cfg, plan)
    assert out["model"]["decoder"] == {"hidden_size": 96, "num_attention_heads": 6,
                                       "num_key_value_heads": 3, "num_hidden_layers": 4,
                                       "head_size": 16, "filename": "model.onnx"}
    assert out["model"]["context_length"] == 64 and out["search"] == cfg["search"]
    assert cfg["model"]["decoder"]["hidden_size"] == 64  # the source's config is not touched
    other = {"model": {"decoder": {**cfg["model"]["decoder"], "num_hidden_layers": 3}}}
    with pytest.raises(ConfigError, match="num_hidden_layers=3"):
        hfconfig.expanded_genai_config(other, plan)
    with pytest.raises(ConfigError, match="model.decoder"):
        hfconfig.expanded_genai_config({"model": {}}, plan)


def test_inspect_reads_a_builder_folder():
    src = _folder("llama-fp32")
    r = run_cli("inspect", src)
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stdout.splitlines()[0]
    assert "model_type llama (genai_config.json)" in first, first
    assert "GroupQueryAttention" in r.stdout and "rotary yes" in r.stdout
    assert "KV cache: 4 tensors" in r.stdout

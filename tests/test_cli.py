"""The command line as users and CI jobs call it: exit codes and what is (not) written."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lemon_onnx import cli as cli_mod
from lemon_onnx import io
from lemon_onnx.recognize import recognize
from conftest import FIXTURES, run_cli


def test_readme_main_job(tmp_path):
    out = tmp_path / "gpt2-wide.onnx"
    rep = tmp_path / "report.json"
    res = run_cli("expand", FIXTURES / "gpt2-ts17.onnx", "-o", out, "--width", "1.5", "--depth", "2",
                  "--report", rep)
    assert res.returncode == 0, res.stderr
    assert "verified on CPUExecutionProvider" in res.stdout
    assert "width: hidden 64->96" in res.stderr  # progress on stderr
    # the plan's notes: on stderr, and summarised in the final line (issue 11: the untied
    # head used to be visible only in metadata_props)
    assert "note: The tied head was untied" in res.stderr
    assert "note(s): the tied head was untied" in res.stdout
    report = json.loads(rep.read_text())
    assert report["passed"] and report["provider_used"] == "CPUExecutionProvider"
    desc = recognize(io.load(out))
    assert (desc.num_layers, desc.hidden, desc.heads, desc.ffn) == (4, 96, 12, 384)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-wide.onnx", "report.json"]
    res = run_cli("inspect", out)
    assert "expanded by lemon-onnx: layers 2->4, hidden 64->96, stream form avg" in res.stdout


def test_mismatch_writes_nothing_and_exits_1(tmp_path, monkeypatch):
    """A broken rewrite (a weight off by 1e-2) must be caught by the built-in verification."""
    from lemon_onnx import lemon_math

    real = lemon_math.expand_in

    def broken(W, axis, in_map, **kw):
        out = real(W, axis, in_map, **kw)
        noise = 1e-2 * (np.arange(out.size).reshape(out.shape) % 3 - 1)
        return (out + noise).astype(out.dtype)

    monkeypatch.setattr(lemon_math, "expand_in", broken)
    out = tmp_path / "bad.onnx"
    res = CliRunner().invoke(cli_mod.cli, ["expand", str(FIXTURES / "llama-ts17.onnx"), "-o", str(out),
                                           "--width", "2", "-q"])
    assert res.exit_code == 1, res.output
    assert "does not reproduce" in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_verify_cli_catches_a_corrupted_block(tmp_path):
    src = FIXTURES / "gpt2-dy18.onnx"
    wide = tmp_path / "wide.onnx"
    assert run_cli("expand", src, "-o", wide, "--width", "2", "-q").returncode == 0
    desc = recognize(io.load(wide))
    m = onnx.load(str(wide))
    target = desc.blocks[1].mlp.down.weight
    for t in m.graph.initializer:
        if t.name == target:
            a = onnx.numpy_helper.to_array(t).copy()
            a += np.random.default_rng(0).choice([-1e-2, 1e-2], size=a.shape).astype(a.dtype)
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    res = run_cli("verify", src, bad, "--layerwise", "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL" in res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["first_divergent_block"] == 1
    ok = run_cli("verify", src, wide)
    assert ok.returncode == 0 and "PASS" in ok.stdout


def test_usage_errors_exit_2(tmp_path):
    res = run_cli("expand", FIXTURES / "gpt2-ts17.onnx", "-o", tmp_path / "x.onnx")
    assert res.returncode == 2 and "nothing to do" in res.stderr
    res = run_cli("expand", FIXTURES / "gpt2-ts17.onnx", "-o", tmp_path / "x.onnx", "--width", "2",
                  "--hidden", "128")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_runtime_that_cannot_run_exits_3_and_writes_nothing(tmp_path):
    """llama-dy23-implicitpos: ONNX Runtime cannot run the exporter's RotaryEmbedding with a
    batch-1 cos/sin cache on batch-2 inputs (recorded in the manifest)."""
    out = tmp_path / "x.onnx"
    res = run_cli("expand", FIXTURES / "llama-dy23-implicitpos.onnx", "-o", out, "--width", "2", "-q")
    assert res.returncode == 3, res.stderr
    assert "RotaryEmbedding" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
    # --no-verify still produces the model (the user takes responsibility)
    res = run_cli("expand", FIXTURES / "llama-dy23-implicitpos.onnx", "-o", out, "--width", "2",
                  "--no-verify", "-q")
    assert res.returncode == 0 and out.exists() and "NOT verified" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name,block", [("llama-ts17.onnx", 1), ("bert-dy18.onnx", 0), ("vit-ts14.onnx", 1)])
def test_one_element_off_by_1e2_is_caught(tmp_path, name, block):
    """The issue's corruption: a single weight of one block perturbed by 1e-2."""
    src = FIXTURES / name
    wide = tmp_path / "wide.onnx"
    assert run_cli("expand", src, "-o", wide, "--width", "2", "--depth", "2", "-q").returncode == 0
    desc = recognize(io.load(wide))
    target = desc.blocks[2 * block].attention.v.weight  # the source block (twins sit in between)
    m = onnx.load(str(wide))
    for t in m.graph.initializer:
        if t.name == target:
            a = onnx.numpy_helper.to_array(t).copy()
            a.flat[5] += 1e-2
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    res = run_cli("verify", src, bad, "--layerwise", "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["first_divergent_block"] == block


def test_output_paths_that_would_hurt(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((FIXTURES / "gpt2-ts17.onnx").read_bytes())
    res = run_cli("expand", src, "-o", src, "--width", "2")
    assert res.returncode == 2 and "destroy the source" in res.stderr
    assert src.read_bytes() == (FIXTURES / "gpt2-ts17.onnx").read_bytes()
    res = run_cli("expand", src, "-o", tmp_path, "--width", "2")
    assert res.returncode == 2 and "directory" in res.stderr
    # a folder that cannot exist (a file stands in the way): OSError, exit 2, no traceback
    res = run_cli("expand", src, "-o", src / "sub" / "x.onnx", "--width", "2", "-q")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "nothing was written" in res.stderr

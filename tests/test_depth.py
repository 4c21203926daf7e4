"""Depth expansion: twin blocks that leave every output unchanged."""
import numpy as np
import onnx
import pytest

from lemon_onnx import io
from lemon_onnx.expansion import expand_model
from lemon_onnx.passes.depth import plan_depth
from lemon_onnx.recognize import recognize
from conftest import FIXTURES, assert_equivalent, load_cases, manifest, run_ort

RUNNABLE = [e for e in manifest("main") if e["ort"]["runs"]]
DEPTHS = [(e, d) for e in RUNNABLE + manifest("edge") for d in (1.5, 2, 3)]
COMBINED = {"gpt2": 1.5, "vit": 1.5, "llama": 1.5, "bert": 2}


def _expand(entry, tmp_path, **kw):
    model, plan, _ = expand_model(FIXTURES / entry["file"], **kw)
    return io.save(model, tmp_path / "deep.onnx"), plan


def _unique_names(path):
    m = onnx.load(str(path))
    nodes = [n.name for n in m.graph.node]
    values = [o for n in m.graph.node for o in n.output] + [t.name for t in m.graph.initializer]
    assert len(nodes) == len(set(nodes))
    assert len(values) == len(set(values))


@pytest.mark.parametrize("entry,depth", DEPTHS,
                         ids=[f"{e['file'].removesuffix('.onnx')}-d{d}" for e, d in DEPTHS])
def test_depth_is_equivalent(tmp_path, entry, depth):
    out, plan = _expand(entry, tmp_path, depth=depth)
    onnx.checker.check_model(str(out), full_check=True)
    _unique_names(out)
    cases = load_cases(FIXTURES / entry["file"].replace(".onnx", ".npz"))
    assert_equivalent(FIXTURES / entry["file"], out, cases)
    L = entry["config"]["num_layers"]
    assert recognize(io.load(out)).num_layers == round(L * depth)
    assert plan.exact == (entry["arch"] != "bert")


@pytest.mark.parametrize("entry", RUNNABLE, ids=[e["file"].removesuffix(".onnx") for e in RUNNABLE])
def test_width_and_depth_together(tmp_path, entry):
    w = COMBINED[entry["arch"]]
    out, plan = _expand(entry, tmp_path, width=w, depth=2)
    onnx.checker.check_model(str(out), full_check=True)
    _unique_names(out)
    assert_equivalent(FIXTURES / entry["file"], out,
                      load_cases(FIXTURES / entry["file"].replace(".onnx", ".npz")))
    desc = recognize(io.load(out))
    assert desc.num_layers == 2 * entry["config"]["num_layers"]
    assert desc.hidden == round(entry["config"]["hidden"] * w)


def test_expanding_an_expanded_model_again(tmp_path):
    e = next(x for x in RUNNABLE if x["file"] == "gpt2-dy18.onnx")
    first, _ = _expand(e, tmp_path / "a", width=1.5, depth=2)
    model, plan, _ = expand_model(first, width=2, depth=1.5)
    second = io.save(model, tmp_path / "b" / "again.onnx")
    cases = load_cases(FIXTURES / "gpt2-dy18.npz")
    assert_equivalent(FIXTURES / e["file"], second, cases)
    assert recognize(io.load(second)).num_layers == 6


@pytest.mark.parametrize("name", ["llama-ts17.onnx", "gpt2-ts14.onnx", "bert-dy18.onnx"])
@pytest.mark.parametrize("width", [None, 2])
def test_cancel_twin_has_nonzero_weights_and_zero_branch(tmp_path, name, width):
    e = next(x for x in RUNNABLE if x["file"] == name)
    out, plan = _expand(e, tmp_path, depth=2, width=width)
    desc = recognize(io.load(out))
    twin = desc.blocks[1]  # interleave on 2 layers: b0, twin(b0), b1, twin(b1)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.abs(weights[twin.attention.out.weight]).max() > 1e-3
    assert np.abs(weights[twin.mlp.down.weight]).max() > 1e-3
    m = onnx.load(str(out))
    for lin in (twin.attention.out, twin.mlp.down):
        m.graph.output.append(onnx.helper.make_tensor_value_info(lin.output, onnx.TensorProto.FLOAT, None))
    probe = tmp_path / "probe.onnx"
    onnx.save(m, str(probe))
    case = load_cases(FIXTURES / name.replace(".onnx", ".npz"))[0]
    got = run_ort(probe, case["in"])
    for lin in (twin.attention.out, twin.mlp.down):
        branch = got[lin.output]
        assert np.abs(branch).max() <= 1e-6, (lin.output, np.abs(branch).max())


def test_zero_init_zeroes_projections(tmp_path):
    e = next(x for x in RUNNABLE if x["file"] == "llama-dy18.onnx")
    out, _ = _expand(e, tmp_path, depth=2, depth_init="zero")
    desc = recognize(io.load(out))
    w = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert not np.any(w[desc.blocks[1].attention.out.weight])
    assert not np.any(w[desc.blocks[1].mlp.down.weight])
    assert np.any(w[desc.blocks[0].mlp.down.weight])


@pytest.mark.parametrize("L,Lt,placement,expect", [
    (4, 6, "interleave", [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]),
    (2, 6, "interleave", [(0, 0), (0, 1), (1, 0), (1, 2), (1, 1), (1, 3)]),
    (3, 5, "top", [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]),
    (4, 6, "uniform", [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0)]),
])
def test_placements(L, Lt, placement, expect):
    order = plan_depth(L, Lt, placement)
    assert len(order) == Lt
    assert sorted(src for src, c in order if c == 0) == list(range(L))
    if expect is not None:
        assert order == expect


@pytest.mark.parametrize("placement", ["top", "uniform"])
@pytest.mark.parametrize("name,depth", [("llama-dy18.onnx", 2), ("gpt2-ts14.onnx", 1.5), ("bert-ts17.onnx", 3)])
def test_other_placements_are_equivalent(tmp_path, placement, name, depth):
    e = next(x for x in RUNNABLE if x["file"] == name)
    out, plan = _expand(e, tmp_path, depth=depth, placement=placement, width=2)
    _unique_names(out)
    assert_equivalent(FIXTURES / name, out, load_cases(FIXTURES / name.replace(".onnx", ".npz")))
    assert recognize(io.load(out)).num_layers == round(2 * depth)

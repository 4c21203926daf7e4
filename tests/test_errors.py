"""Bad input: exit 2, one clear paragraph, no traceback, nothing written."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES, run_cli


def _save(model, path):
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def small_cnn(path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 10])], [w1, w2])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def mlp_only(path):
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 16)), ("b2", (16,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], inits)
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def assert_clean_exit2(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("lemon-onnx: error: ")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for n in needles:
        assert n.lower() in res.stderr.lower(), res.stderr


def test_cnn_is_refused(tmp_path):
    res = run_cli("inspect", small_cnn(tmp_path / "cnn.onnx"))
    assert_clean_exit2(res, "not a transformer", "Conv")


def test_mlp_only_is_refused(tmp_path):
    res = run_cli("inspect", mlp_only(tmp_path / "mlp.onnx"))
    assert_clean_exit2(res, "embedding", "MatMul")


@pytest.mark.parametrize("cut", [0.02, 0.5, 0.97])
def test_truncated_file_is_refused(tmp_path, cut):
    data = (FIXTURES / "gpt2-ts17.onnx").read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: int(len(data) * cut)])
    res = run_cli("inspect", bad)
    assert_clean_exit2(res, "trunc")


def test_missing_and_non_onnx_files(tmp_path):
    assert_clean_exit2(run_cli("inspect", tmp_path / "nope.onnx"), "no such file")
    txt = tmp_path / "notes.onnx"
    txt.write_text("hello, I am not a model\n" * 20)
    assert_clean_exit2(run_cli("inspect", txt))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_clean_exit2(run_cli("inspect", empty), "empty")


def test_missing_external_data_is_named(tmp_path):
    import onnx_ir as ir
    m = ir.load(str(FIXTURES / "gpt2-ts17.onnx"))
    ir.save(m, str(tmp_path / "m.onnx"), external_data="m.onnx.data")
    (tmp_path / "m.onnx.data").unlink()
    assert_clean_exit2(run_cli("inspect", tmp_path / "m.onnx"), "m.onnx.data")


def _unknown_contrib_op(src, dst):
    """A com.microsoft op lemon-onnx does not unfuse (SkipGroupNorm, a diffusion model's) in
    place of a LayerNormalization: refused, naming it."""
    m = onnx.load(str(src))
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    ln.op_type, ln.domain = "SkipGroupNorm", "com.microsoft"
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, str(dst))


def test_contrib_ops_nobody_unfuses_are_refused_naming_them(tmp_path):
    path = tmp_path / "opt.onnx"
    _unknown_contrib_op(FIXTURES / "gpt2-ts17.onnx", path)
    res = run_cli("inspect", path)
    assert_clean_exit2(res, "com.microsoft", "SkipGroupNorm", "unoptimised")


def _qdq_weight(src, dst):
    """One MatMul weight stored as int8 with a scale and read through DequantizeLinear, the
    QDQ form static quantisation writes (made by hand: no calibration data needed)."""
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    mm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    w = numpy_helper.to_array(inits[mm.input[1]])
    scale = np.float32(np.abs(w).max() / 127)
    q = np.round(w / scale).astype(np.int8)
    name = mm.input[1]
    m.graph.initializer.remove(inits[name])
    m.graph.initializer.extend([numpy_helper.from_array(q, name + "_q"),
                                numpy_helper.from_array(np.array(scale), name + "_scale")])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", [name + "_q", name + "_scale"],
                                            [name], name="dq0"))
    onnx.save(m, str(dst))


@pytest.mark.parametrize("how", ["qdq", "dynamic"])
def test_quantised_graphs_are_refused_naming_the_ops(tmp_path, how):
    src = FIXTURES / "gpt2-ts17.onnx"
    path = tmp_path / "q.onnx"
    if how == "qdq":
        _qdq_weight(src, path)
        needles = ("quantised", "DequantizeLinear x1", "quantise the expanded model")
    else:  # what ONNX Runtime's dynamic quantisation writes
        quantization = pytest.importorskip("onnxruntime.quantization")
        quantization.quantize_dynamic(str(src), str(path))
        needles = ("quantised", "DynamicQuantizeLinear", "MatMulInteger",
                   "quantise the expanded model")
    assert_clean_exit2(run_cli("inspect", path), *needles)
    res = run_cli("expand", path, "-o", tmp_path / "out.onnx", "--width", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("lemon-onnx: error: ") and all(n.lower() in last.lower()
                                                          for n in needles), last
    assert not (tmp_path / "out.onnx").exists()

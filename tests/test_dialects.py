"""Dialects that Hugging Face optimum's exports brought, each on a small graph or a committed
fixture rewritten into it, so that they are tested without the generated exports:

- transformers' SDPA attention as exported: q and k each scaled by sqrt(1/sqrt(head_dim)),
  head_dim read from q's shape (k then depends on q's shape, never on its values), or the
  scale computed from a shape and applied after the Q.K^T MatMul;
- torch.chunk as TorchScript traces it (Phi-3's fused gate_up): bounds (n + 1) // 2 * i
  computed at run time from the cut axis's own size;
- sizes computed from constants alone (DINOv2's int(num_patches ** 0.5) reshaping its
  position table to the patch grid);
- inputs read from the graph: image channels and size from the patch Conv and the position
  table, integer inputs below the rows of the tables they index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import lemon_onnx
from lemon_onnx import dims, io
from lemon_onnx.graph import GraphIndex, data_ancestors
from lemon_onnx.verification import synthesize_inputs
from lemon_onnx.verification.inputs import ImageInput, index_bounds

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"


def _model(nodes, inputs, outputs, inits=(), opset=17) -> ir.Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return ir.serde.deserialize_model(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def _i64(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _const(g: ir.Graph, name: str, arr) -> ir.Value:
    arr = np.asarray(arr)
    v = ir.Value(name=name, shape=ir.Shape(arr.shape),
                 type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                 const_value=ir.tensor(arr, name=name))
    g.register_initializer(v)
    return v


def _replace_uses(g: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    for use in list(old.uses()):
        use.node.replace_input_with(use.idx, new)
    for j, o in enumerate(g.outputs):
        if o is old:
            g.outputs[j] = new


# ------------------------------------------------------------------ value dependence
def test_a_value_computed_from_a_shape_does_not_depend_on_the_values():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Shape", ["x"], ["s"], start=-1),
                    helper.make_node("Cast", ["s"], ["c"], to=TensorProto.FLOAT),
                    helper.make_node("Mul", ["y", "c"], ["out"])], [x, y], [out])
    idx = GraphIndex(model)
    mul_out, xv, yv = idx.value("out"), idx.value("x"), idx.value("y")
    assert idx.depends_on(mul_out, xv)  # through its shape
    assert not idx.data_depends_on(mul_out, xv)  # not through its values
    assert idx.data_depends_on(mul_out, yv)
    assert idx.data_depends_on(mul_out, idx.value("c"))
    assert {n.op_type for n in data_ancestors(mul_out)} == {"Mul", "Cast", "Shape"}


def _split_scaled(src: Path, dst: Path, where: str) -> Path:
    """The BERT fixture with its attention scaled as transformers' SDPA is exported: the
    constant 1/sqrt(head_dim) after Q.K^T is replaced by sqrt(1/sqrt(head_dim)) on q and on k
    (``split``) or by a division by sqrt(head_dim) after the MatMul (``after``), head_dim read
    from q's shape at run time.  The same numbers, a different graph."""
    model = ir.load(str(src))
    g = model.graph
    one = _const(g, "lemon_test_one", np.array(1.0, np.float32))
    desc = lemon_onnx.inspect(src)
    for k, block in enumerate(desc.blocks):
        score = next(n for n in g if n.name == block.attention.score_node)
        scale_mul = next(c for c in score.outputs[0].consumers() if c.op_type == "Mul")
        q, kt = score.inputs[0], score.inputs[1]
        shape = ir.node("Shape", [q], attributes={"start": -1}, name=f"t{k}_shape")
        hd = ir.node("Cast", [shape.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                     name=f"t{k}_cast")
        root = ir.node("Sqrt", [hd.outputs[0]], name=f"t{k}_sqrt")
        new = [shape, hd, root]
        if where == "split":
            inv = ir.node("Div", [one, root.outputs[0]], name=f"t{k}_inv")
            half = ir.node("Sqrt", [inv.outputs[0]], name=f"t{k}_half")
            mq = ir.node("Mul", [q, half.outputs[0]], name=f"t{k}_mq")
            mk = ir.node("Mul", [kt, half.outputs[0]], name=f"t{k}_mk")
            new += [inv, half, mq, mk]
            g.insert_before(score, new)
            score.replace_input_with(0, mq.outputs[0])
            score.replace_input_with(1, mk.outputs[0])
            _replace_uses(g, scale_mul.outputs[0], score.outputs[0])
        else:
            div = ir.node("Div", [score.outputs[0], root.outputs[0]], name=f"t{k}_div")
            g.insert_before(scale_mul, new + [div])
            _replace_uses(g, scale_mul.outputs[0], div.outputs[0])
        g.remove(scale_mul, safe=True)
    ir.save(model, str(dst))
    return dst


@pytest.mark.parametrize("where", ["split", "after"])
def test_attention_scaled_from_q_shape_expands_exactly(where, tmp_path):
    src = _split_scaled(FIXTURES / "bert-ts17.onnx", tmp_path / f"bert-{where}.onnx", where)
    desc = lemon_onnx.inspect(src)
    a = desc.blocks[0].attention
    assert len({a.q.weight, a.k.weight, a.v.weight}) == 3
    before = lemon_onnx.inspect(FIXTURES / "bert-ts17.onnx").blocks[0].attention
    assert (a.q.weight, a.k.weight, a.v.weight) == (before.q.weight, before.k.weight,
                                                    before.v.weight)
    wide = lemon_onnx.expand(src, tmp_path / "w2.onnx", width=2)
    assert wide.verification.passed and wide.verification.max_alg_rel <= 1e-12
    deep = lemon_onnx.expand(src, tmp_path / "w2d2.onnx", width=2, depth=2)
    assert deep.verification.passed, deep.verification.format()


# ------------------------------------------------------------------ torch.chunk at run time
def _chunk_graph(offset: int) -> ir.Model:
    """y = x W; g, u = chunk(y, 2) as TorchScript traces it, with (n + offset) // 2."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 12], np.zeros(48, np.float32))
    inits = [w, _i64("last", [-1]), _i64("off", [offset]), _i64("two", [2]), _i64("one", [1]),
             _i64("zero", [0])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("Gather", ["s", "last"], ["n"]),
             helper.make_node("Add", ["n", "off"], ["n1"]),
             helper.make_node("Div", ["n1", "two"], ["h"]),
             helper.make_node("Mul", ["h", "one"], ["b1"]),
             helper.make_node("Mul", ["h", "two"], ["b2"]),
             helper.make_node("Slice", ["y", "zero", "b1", "last"], ["gate"]),
             helper.make_node("Slice", ["y", "b1", "b2", "last"], ["up"]),
             helper.make_node("Sigmoid", ["gate"], ["act"]),
             helper.make_node("Mul", ["act", "up"], ["out"])]
    return _model(nodes, [x], [out], inits)


def test_chunk_at_run_time_cuts_the_axis_into_parts_that_follow_it():
    idx = GraphIndex(_chunk_graph(offset=1))
    assert idx.ax.runtime_cuts == []
    y = idx.leaves(idx.value("y"))
    gate, up = idx.leaves(idx.value("gate")), idx.leaves(idx.value("up"))
    assert [a.size for a in y] == [2, 6]  # (the two parts, one part)
    assert gate == up == y[1:]  # both halves are the part atom: they grow with it


def test_chunk_bounds_that_are_not_parts_stay_run_time_cuts():
    # (n + 2) // 2 is not n // 2 at every even n: no model of it, a run-time cut
    idx = GraphIndex(_chunk_graph(offset=2))
    cut = [(n.op_type, n.outputs[0].name) for n, _, _ in idx.ax.runtime_cuts]
    assert sorted(cut) == [("Slice", "gate"), ("Slice", "up")]


def _fused_gate_up(src: Path, dst: Path) -> Path:
    """The Llama fixture with each MLP's gate and up projections fused into one MatMul whose
    output is cut by torch.chunk's run-time bounds (Phi-3 as TorchScript exports it)."""
    model = ir.load(str(src))
    g = model.graph
    desc = lemon_onnx.inspect(src)
    last, one, two, zero = (_const(g, f"lemon_test_{n}", np.array([v], np.int64))
                            for n, v in (("last", -1), ("one", 1), ("two", 2), ("zero", 0)))
    for k, block in enumerate(desc.blocks):
        gate = next(n for n in g if n.name == block.mlp.gate.node)
        up = next(n for n in g if n.name == block.mlp.up.node)
        w = np.concatenate([g.initializers[block.mlp.gate.weight].const_value.numpy(),
                            g.initializers[block.mlp.up.weight].const_value.numpy()], axis=1)
        wv = _const(g, f"lemon_test_gate_up{k}", w)
        mm = ir.node("MatMul", [gate.inputs[0], wv], name=f"t{k}_gate_up")
        shape = ir.node("Shape", [mm.outputs[0]], name=f"t{k}_shape")
        n = ir.node("Gather", [shape.outputs[0], last], name=f"t{k}_n")
        n1 = ir.node("Add", [n.outputs[0], one], name=f"t{k}_n1")
        h = ir.node("Div", [n1.outputs[0], two], name=f"t{k}_h")
        b1 = ir.node("Mul", [h.outputs[0], one], name=f"t{k}_b1")
        b2 = ir.node("Mul", [h.outputs[0], two], name=f"t{k}_b2")
        s0 = ir.node("Slice", [mm.outputs[0], zero, b1.outputs[0], last], name=f"t{k}_gate")
        s1 = ir.node("Slice", [mm.outputs[0], b1.outputs[0], b2.outputs[0], last],
                     name=f"t{k}_up")
        g.insert_before(gate, [mm, shape, n, n1, h, b1, b2, s0, s1])
        _replace_uses(g, gate.outputs[0], s0.outputs[0])
        _replace_uses(g, up.outputs[0], s1.outputs[0])
        for old in (gate, up):
            g.remove(old, safe=True)
        for name in (block.mlp.gate.weight, block.mlp.up.weight):
            g.initializers.pop(name)
    ir.save(model, str(dst))
    return dst


def test_fused_gate_up_cut_at_run_time_expands_exactly(tmp_path):
    src = _fused_gate_up(FIXTURES / "llama-ts17.onnx", tmp_path / "llama-gate-up.onnx")
    desc = lemon_onnx.inspect(src)
    assert all(b.mlp.fused_gate_up and b.mlp.gate is None for b in desc.blocks)
    wide = lemon_onnx.expand(src, tmp_path / "w2.onnx", width=2)
    assert wide.verification.passed and wide.verification.max_alg_rel <= 1e-12
    frac = lemon_onnx.expand(src, tmp_path / "w15d2.onnx", width=1.5, depth=2)
    assert frac.verification.passed, frac.verification.format()
    deep = lemon_onnx.expand(src, tmp_path / "d2.onnx", depth=2)
    assert deep.verification.passed and deep.verification.max_alg_rel <= 1e-12
    # the twins' MLP units are paired across both halves, so they cancel instead of
    # starting silent
    assert not any("MLP units" in n for n in deep.notes), deep.notes


# ------------------------------------------------------------------ sizes from constants
def test_a_size_computed_from_constants_ties_a_resampled_table():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    table = helper.make_tensor("table", TensorProto.FLOAT, [1, 16, 8], np.zeros(128, np.float32))
    inits = [table, helper.make_tensor("n", TensorProto.FLOAT, [], [16.0]),
             helper.make_tensor("p", TensorProto.FLOAT, [], [0.5]), _i64("ax0", [0]),
             _i64("lead", [1]), _i64("last", [2])]
    nodes = [helper.make_node("Pow", ["n", "p"], ["root"]),
             helper.make_node("Cast", ["root"], ["side"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["side", "ax0"], ["side1"]),
             helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Gather", ["sx", "last"], ["d"]),
             helper.make_node("Concat", ["lead", "side1", "side1", "d"], ["grid"], axis=0),
             helper.make_node("Reshape", ["table", "grid"], ["out"])]
    idx = GraphIndex(_model(nodes, [x], [out], inits))
    assert idx.leaves(idx.value("table"))[0] is idx.leaves(idx.value("x"))[0]
    assert [[a.size for a in dims.leaves(at)] for _, at in idx.ax.fixed_sizes] == [[4], [4]]


# ------------------------------------------------------------------ inputs from the graph
@pytest.mark.parametrize("conv", [(8, 8, 0, 1), (7, 4, 6, 1), (3, 2, 2, 2), (16, 16, 0, 1)])
def test_image_size_inverts_the_convolution(conv):
    kernel, stride, pads, dil = conv
    for grid in ((4, 4), (3, 5), (1, 7)):
        im = ImageInput("x", 3, grid, [[conv, conv]], "")
        got = im.dims(7)
        assert got[1] == 3
        for k, n in enumerate(grid):
            size = got[2 + k]
            assert (size + pads - dil * (kernel - 1) - 1) // stride + 1 == n
            assert size == 1 or (size - 1 + pads - dil * (kernel - 1) - 1) // stride + 1 < n


def test_symbolic_image_axes_are_read_from_the_patch_conv_and_the_positions(tmp_path):
    """The ViT fixture with pixel_values declared [batch, num_channels, height, width] as
    optimum writes it: channels 3 from the Conv weight, 32x32 from 17 positions less the cls
    token at patch size 8."""
    model = io.load(FIXTURES / "vit-ts17.onnx")
    pv = model.graph.inputs[0]
    pv.shape = ir.Shape(["batch_size", "num_channels", "height", "width"])
    src = tmp_path / "vit-symbolic.onnx"
    ir.save(model, str(src))
    cases = synthesize_inputs(src)
    assert [c[pv.name].shape for c in cases] == [(2, 3, 32, 32), (3, 3, 32, 32)]
    result = lemon_onnx.expand(src, tmp_path / "w2d2.onnx", width=2, depth=2)
    assert result.verification.passed and result.verification.max_alg_rel <= 1e-12


def test_integer_inputs_stay_below_the_rows_of_the_tables_they_index():
    model = io.load(FIXTURES / "bert-ts17.onnx")
    desc = lemon_onnx.inspect(FIXTURES / "bert-ts17.onnx")
    rows = {name: model.graph.initializers[name].shape[0]
            for name in (desc.embeddings.token, desc.embeddings.token_type)}
    bounds = index_bounds(model)
    assert bounds == {"input_ids": rows[desc.embeddings.token],
                      "token_type_ids": rows[desc.embeddings.token_type]}
    for case in synthesize_inputs(FIXTURES / "bert-ts17.onnx"):
        for name, bound in bounds.items():
            assert 0 <= case[name].min() and case[name].max() < bound

"""ONNX's opset-23 ``Attention`` on packed 3-D inputs: the head counts live in the
``q_num_heads`` and ``kv_num_heads`` attributes, and both must follow the plan (an earlier
version rewrote only one attribute per node, and labelled the query heads as a GQA group).

The fixture is built from the Llama dy23 export (GQA, 8 query heads, 4 KV heads,
K and V repeated to 8 before the op): every
``Attention`` on 4-D [B, H, S, hd] inputs is rewritten to take [B, S, H*hd] inputs with the
head counts as attributes, which computes the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lemon_onnx
from lemon_onnx.recognize import recognize

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
SRC = FIXTURES / "llama-dy23.onnx"


def _const(graph: ir.Graph, name: str, values) -> ir.Value:
    arr = np.asarray(values, dtype=np.int64)
    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.INT64),
                 const_value=ir.tensor(arr, name=name))
    graph.register_initializer(v)
    return v


def _packed_attention(path: Path) -> Path:
    model = ir.load(str(SRC))
    g = model.graph
    flat = _const(g, "lemon_test_flat", [0, 0, -1])
    nodes = [n for n in g if n.op_type == "Attention"]
    assert nodes, "the dy23 fixture has no Attention op"
    for k, att in enumerate(nodes):
        heads = {}
        packed = []
        for i in range(3):
            x = att.inputs[i]
            t = ir.node("Transpose", [x], attributes={"perm": [0, 2, 1, 3]},
                        name=f"pack_t{k}_{i}")
            r = ir.node("Reshape", [t.outputs[0], flat], name=f"pack_r{k}_{i}")
            g.insert_before(att, [t, r])
            packed.append(r.outputs[0])
            heads[i] = x.shape[1] if x.shape is not None else None
        q_heads = 8
        kv_heads = 8  # the export repeats K and V for the query groups before the op
        head_dim = _const(g, f"lemon_test_unpack{k}", [0, 0, -1, 8])
        new = ir.node("Attention", packed + list(att.inputs[3:]),
                      attributes={**{a.name: a for a in att.attributes.values()},
                                  "q_num_heads": q_heads, "kv_num_heads": kv_heads},
                      name=f"packed_attention{k}", version=23)
        r = ir.node("Reshape", [new.outputs[0], head_dim], name=f"unpack_r{k}")
        t = ir.node("Transpose", [r.outputs[0]], attributes={"perm": [0, 2, 1, 3]},
                    name=f"unpack_t{k}")
        g.insert_before(att, [new, r, t])
        old = att.outputs[0]
        for use in list(old.uses()):
            use.node.replace_input_with(use.idx, t.outputs[0])
        for j, o in enumerate(g.outputs):
            if o is old:
                g.outputs[j] = t.outputs[0]
        g.remove(att, safe=True)
    ir.save(model, str(path))
    return path


def _feeds(sess) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [2 if not isinstance(d, int) else d for d in i.shape]
        if len(shape) >= 2:
            shape[1] = 5
        if "int" in i.type:
            feeds[i.name] = (rng.integers(1, 100, size=shape) if "ids" in i.name
                             else np.ones(shape)).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _packed_source(path):
    """The packed-attention rewrite of the fixture, checked to compute what the fixture does
    (a precondition of the tests below, not a test of lemon-onnx)."""
    path = _packed_attention(path)
    onnx.checker.check_model(str(path))
    a = ort.InferenceSession(str(SRC), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(a)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    return path


@pytest.mark.parametrize("width", [2, 1.5])
def test_both_head_attributes_follow_the_plan(tmp_path, width):
    path = _packed_source(tmp_path / "packed.onnx")
    desc = recognize(ir.load(str(path)))
    assert (desc.heads, desc.kv_heads) == (8, 4)
    out = tmp_path / "wide.onnx"
    res = lemon_onnx.expand(path, out, width=width, depth=2)
    assert res.verification.passed
    heads = kv = int(8 * width)
    atts = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Attention"]
    assert len(atts) == 4  # two blocks and their twins
    for n in atts:
        attrs = {a.name: a.i for a in n.attribute}
        assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (heads, kv)

"""ONNX Runtime's fused ops (lemon_onnx/fusion): each decomposition against ONNX Runtime's own
float32 kernel, the round trip back to the fused op, and expansions of graphs fused by ONNX
Runtime's transformer optimizer (run here on the fixtures), which must verify at both levels
and come back as fused as they went in."""
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES, run_cli
from lemon_onnx.fusion import MS, RefusePass, unfuse
from lemon_onnx.verification.precision import to_float64

F = TensorProto.FLOAT
RNG = np.random.default_rng(20)


def _w(name, *shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(node, inputs, outputs, inits, opset=17):
    g = helper.make_graph([node], "one", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                               helper.make_opsetid(MS, 1)])


def _run(model_proto, feeds):
    s = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _unfused(proto, f64=False):
    m = ir.serde.deserialize_model(proto)
    res = unfuse(m)
    assert res.ops == {proto.graph.node[0].op_type: 1}
    assert not any(n.domain == MS for n in m.graph)
    if f64:
        to_float64(m)
    return m


def _check(proto, feeds, want=None):
    """The decomposition computes what ONNX Runtime's kernel computes (float32 and the
    float64 copy), and fusing it again gives back the same op, bit for bit.  ``want``: the
    outputs where ONNX Runtime's CPU build has no kernel for the op (BiasAdd)."""
    kernel = want is None
    want = _run(proto, feeds) if kernel else want
    m = _unfused(proto)
    got = _run(ir.serde.serialize_model(m), feeds)
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())))
    m64 = _unfused(proto, f64=True)
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    proto64 = ir.serde.serialize_model(m64)
    try:  # ONNX Runtime's double kernels, else onnx's reference evaluator (Erf has none)
        got64 = _run(proto64, feeds64)
    except Exception:  # noqa: BLE001 - NOT_IMPLEMENTED for a double kernel
        from onnx.reference import ReferenceEvaluator

        got64 = ReferenceEvaluator(proto64).run(None, feeds64)
    assert all(g.dtype == np.float64 for g, w in zip(got64, want) if w.dtype == np.float32)
    for w, g in zip(want, got64):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())))
    res = RefusePass()(m)
    assert res.fused == {proto.graph.node[0].op_type: 1} and not res.left
    back = ir.serde.serialize_model(m)
    ops = [n for n in back.graph.node]
    assert [(n.op_type, n.domain) for n in ops] == [(proto.graph.node[0].op_type, MS)]
    orig = {a.name: helper.get_attribute_value(a) for a in proto.graph.node[0].attribute}
    again = {a.name: helper.get_attribute_value(a) for a in ops[0].attribute}
    for k, v in orig.items():
        assert again[k] == pytest.approx(v), k
    if kernel:
        for w, g in zip(want, _run(back, feeds)):
            np.testing.assert_array_equal(g, w)


def _x(*shape):
    return (RNG.standard_normal(shape)).astype(np.float32)


# --------------------------------------------------------------------------- norms

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("beta", [True, False])
@pytest.mark.parametrize("opset", [17, 14])
def test_skip_layer_norm(bias, beta, opset):
    d = 16
    ins = ["x", "skip", "gamma", "beta" if beta else "", "bias" if bias else ""]
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node("SkipLayerNormalization", ins, ["y", "", "", "sum"], domain=MS,
                            epsilon=1e-5)
    inits = [_w("gamma", d), _w("beta", d), _w("bias", d)]
    proto = _model(node, [helper.make_tensor_value_info(n, F, [2, 5, d]) for n in ("x", "skip")],
                   [helper.make_tensor_value_info("y", F, [2, 5, d]),
                    helper.make_tensor_value_info("sum", F, [2, 5, d])],
                   [i for i in inits if i.name in ins], opset=opset)
    _check(proto, {"x": _x(2, 5, d), "skip": _x(2, 5, d)})


@pytest.mark.parametrize("bias", [True, False])
def test_skip_simplified_layer_norm(bias):
    d = 16
    ins = ["x", "skip", "gamma"] + (["bias"] if bias else [])
    node = helper.make_node("SkipSimplifiedLayerNormalization", ins, ["y"], domain=MS,
                            epsilon=1e-6)
    proto = _model(node, [helper.make_tensor_value_info(n, F, [2, 5, d]) for n in ("x", "skip")],
                   [helper.make_tensor_value_info("y", F, [2, 5, d])],
                   [_w("gamma", d), _w("bias", d)][:len(ins) - 2])
    _check(proto, {"x": _x(2, 5, d), "skip": _x(2, 5, d)})


# --------------------------------------------------------------------------- activations

@pytest.mark.parametrize("op,bias,attrs", [
    ("BiasGelu", True, {}), ("Gelu", False, {}), ("FastGelu", True, {}), ("FastGelu", False, {}),
    ("QuickGelu", False, {}), ("QuickGelu", False, {"alpha": 1.0}), ("BiasAdd", True, {})])
def test_activation(op, bias, attrs):
    d = 24
    ins = ["x"] + (["bias"] if bias else []) + (["skip"] if op == "BiasAdd" else [])
    node = helper.make_node(op, ins, ["y"], domain=MS, **attrs)
    inputs = [helper.make_tensor_value_info("x", F, [2, 5, d])]
    feeds = {"x": _x(2, 5, d) * 3}
    if op == "BiasAdd":
        inputs.append(helper.make_tensor_value_info("skip", F, [2, 5, d]))
        feeds["skip"] = _x(2, 5, d)
    inits = [_w("bias", d)] if bias else []
    proto = _model(node, inputs, [helper.make_tensor_value_info("y", F, [2, 5, d])], inits)
    # ONNX Runtime's CPU build has no BiasAdd kernel (CUDA only): its definition instead
    want = [feeds["x"] + numpy_helper.to_array(inits[0]) + feeds["skip"]] \
        if op == "BiasAdd" else None
    _check(proto, feeds, want)


@pytest.mark.parametrize("bias", [True, False])
def test_gemm_fast_gelu(bias):
    """GemmFastGelu: no CPU kernel (CUDA only), so checked against its definition."""
    d, f = 16, 24
    ins = ["x", "w"] + (["bias"] if bias else [])
    node = helper.make_node("GemmFastGelu", ins, ["y"], domain=MS)
    inits = [_w("w", d, f), _w("bias", f)][:len(ins) - 1]
    proto = _model(node, [helper.make_tensor_value_info("x", F, [2, 5, d])],
                   [helper.make_tensor_value_info("y", F, [2, 5, f])], inits)
    feeds = {"x": _x(2, 5, d)}
    h = feeds["x"].astype(np.float64) @ numpy_helper.to_array(inits[0])
    if bias:
        h = h + numpy_helper.to_array(inits[1])
    want = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    _check(proto, feeds, [want.astype(np.float32)])


# --------------------------------------------------------------------------- attention

def _add_mask(inputs: list, feeds: dict, kind: str, batch: int, keys: int) -> None:
    """An int32 ``mask`` input: "1d", each row's end (the second row padded after 3 keys);
    "2d", the raw 0/1 mask (the second row padded after 3 keys, a hole in the first)."""
    if kind == "1d":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [batch]))
        feeds["mask"] = np.array([keys, 3], np.int32)
    else:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [batch, keys]))
        m = np.ones((batch, keys), np.int32)
        m[1, 3:] = 0
        m[0, 1] = 0
        feeds["mask"] = m


@pytest.mark.parametrize("mask", [None, "1d", "2d"])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("form", ["plain", "scale", "qkv-sizes"])
def test_attention(mask, causal, form):
    b, s, d, heads = 2, 6, 32, 4
    sizes = [32, 32, 48] if form == "qkv-sizes" else [32, 32, 32]
    attrs = {"num_heads": heads, "unidirectional": causal}
    if form == "scale":
        attrs["scale"] = 0.21
    if form == "qkv-sizes":
        attrs["qkv_hidden_sizes"] = sizes
    ins = ["x", "w", "bias"] + (["mask"] if mask else [])
    node = helper.make_node("Attention", ins, ["y"], domain=MS, **attrs)
    inputs = [helper.make_tensor_value_info("x", F, [b, s, d])]
    feeds = {"x": _x(b, s, d)}
    if mask:
        _add_mask(inputs, feeds, mask, b, s)
    proto = _model(node, inputs, [helper.make_tensor_value_info("y", F, [b, s, sizes[2]])],
                   [_w("w", d, sum(sizes)), _w("bias", sum(sizes))])
    _check(proto, feeds)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask", [None, "1d", "2d"])
@pytest.mark.parametrize("cross,causal", [(False, 0), (False, 1), (True, 0)])
def test_multi_head_attention(bias, mask, cross, causal):
    """q, k, v projected outside the op; a cross-attention's keys have their own length."""
    b, s, d, heads = 2, 5, 32, 4
    kv_len = 7 if cross else s
    attrs = {"num_heads": heads}
    if causal:
        attrs["unidirectional"] = 1
    ins = ["q", "k", "v", "bias" if bias else "", "mask" if mask else ""]
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node("MultiHeadAttention", ins, ["y"], domain=MS, **attrs)
    inputs = [helper.make_tensor_value_info("q", F, [b, s, d]),
              helper.make_tensor_value_info("k", F, [b, kv_len, d]),
              helper.make_tensor_value_info("v", F, [b, kv_len, d])]
    feeds = {"q": _x(b, s, d), "k": _x(b, kv_len, d), "v": _x(b, kv_len, d)}
    if mask:
        _add_mask(inputs, feeds, mask, b, kv_len)
    proto = _model(node, inputs, [helper.make_tensor_value_info("y", F, [b, s, d])],
                   [_w("bias", 3 * d)] if bias else [])
    _check(proto, feeds)


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (1, 1, 5, 5)], ids=["per-head", "broadcast"])
def test_multi_head_attention_with_an_attention_bias(shape):
    """An additive bias on the scores (ORT GenAI's float16 CPU graphs give the mask this way,
    tiled over the heads)."""
    b, s, d = 2, 5, 32
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["y"],
                            domain=MS, num_heads=4)
    bias = (RNG.standard_normal(shape) * 2).astype(np.float32)
    bias[..., 1, 3:] = -65504.0
    proto = _model(node, [helper.make_tensor_value_info(n, F, [b, s, d]) for n in "qkv"]
                   + [helper.make_tensor_value_info("bias", F, list(shape))],
                   [helper.make_tensor_value_info("y", F, [b, s, d])], [])
    _check(proto, {"q": _x(b, s, d), "k": _x(b, s, d), "v": _x(b, s, d), "bias": bias})


def test_attention_with_a_past_state_is_refused_naming_it():
    b, s, d = 1, 4, 16
    node = helper.make_node("Attention", ["x", "w", "bias", "", "past"], ["y", "present"],
                            domain=MS, num_heads=2, unidirectional=1)
    proto = _model(node, [helper.make_tensor_value_info("x", F, [b, s, d]),
                          helper.make_tensor_value_info("past", F, [2, b, 2, 3, 8])],
                   [helper.make_tensor_value_info("y", F, [b, s, d]),
                    helper.make_tensor_value_info("present", F, None)],
                   [_w("w", d, 3 * d), _w("bias", 3 * d)])
    from lemon_onnx.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="Attention.*past state"):
        unfuse(ir.serde.deserialize_model(proto))


# --------------------------------------------------------------------------- decoder attention

GQA_TABLE = 32  # rows of the rotary tables (positions)


def _gqa_case(heads, kv_heads, hd, packed, rotary, rot_dim, softcap, scale, batch, seq, past,
              seqlens):
    width = (heads + 2 * kv_heads) * hd if packed else heads * hd
    ins = ["query"] + (["", ""] if packed else ["key", "value"]) + \
        (["past_key", "past_value"] if past is not None else ["", ""]) + ["seqlens_k", "total"]
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": int(rotary)}
    if softcap:
        attrs["softcap"] = softcap
    if scale:
        attrs["scale"] = scale
    inits = []
    if rotary:
        ins += ["cos", "sin"]
        inits = [_w("cos", GQA_TABLE, rot_dim // 2, scale=1.0), _w("sin", GQA_TABLE, rot_dim // 2,
                                                                   scale=1.0)]
    node = helper.make_node("GroupQueryAttention", ins, ["y", "present_key", "present_value"],
                            domain=MS, **attrs)
    total = (past or 0) + seq
    inputs = [helper.make_tensor_value_info("query", F, ["B", "S", width])]
    feeds = {"query": _x(batch, seq, width)}
    if not packed:
        for n in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(n, F, ["B", "S", kv_heads * hd]))
            feeds[n] = _x(batch, seq, kv_heads * hd)
    if past is not None:
        for n in ("past_key", "past_value"):
            inputs.append(helper.make_tensor_value_info(n, F, ["B", kv_heads, "P", hd]))
            feeds[n] = _x(batch, kv_heads, past, hd)
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
               helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    feeds["seqlens_k"] = np.array(seqlens, np.int32)
    feeds["total"] = np.array(total, np.int32)
    outputs = [helper.make_tensor_value_info("y", F, ["B", "S", heads * hd]),
               helper.make_tensor_value_info("present_key", F, None),
               helper.make_tensor_value_info("present_value", F, None)]
    return _model(node, inputs, outputs, inits), feeds


@pytest.mark.parametrize("batch,seq,past,seqlens", [
    (2, 5, 0, [4, 4]),  # first prompt
    (2, 5, 0, [4, 2]),  # first prompt, the second row padded after 3 tokens
    (2, 1, 6, [6, 6]),  # generation
    (1, 3, 6, [8]),  # a later prompt
    (2, 4, None, [3, 1]),  # no past inputs
], ids=["prompt", "prompt-padded", "generation", "later-prompt", "no-past"])
@pytest.mark.parametrize("form", ["packed-rotary", "packed", "separate-rotary",
                                  "partial-rotary", "softcap-scale", "mha"])
def test_group_query_attention(batch, seq, past, seqlens, form):
    """ONNX Runtime GenAI's decoder attention, against ONNX Runtime's CPU kernel: first
    prompts (padded rows included), generation and later prompts, with past keys and values."""
    heads, kv_heads, hd = (4, 4, 16) if form == "mha" else (4, 2, 16)
    if form == "partial-rotary":  # the kernel wants table widths that are multiples of 8
        hd = 32
    rot_dim = 16 if form == "partial-rotary" else hd
    proto, feeds = _gqa_case(heads, kv_heads, hd, packed=not form.startswith("separate"),
                             rotary="rotary" in form, rot_dim=rot_dim,
                             softcap=3.0 if form == "softcap-scale" else 0.0,
                             scale=0.2 if form == "softcap-scale" else 0.0,
                             batch=batch, seq=seq, past=past, seqlens=seqlens)
    _check(proto, feeds)


def test_a_fused_cache_join_and_its_unpadded_decoding_come_from_the_ops_record():
    """GroupQueryAttention's record (``gqa.OPS``) says which past input its present output
    returns appended and that its decomposition is exact only in unpadded decoding: the fused
    graph's cache pairs and the decoding check's row lengths follow from it, fused or unfused."""
    from lemon_onnx.fusion import fused_joins, fused_ops, unpadded_decoding

    ops = fused_ops()
    assert ops["GroupQueryAttention"].joins == {3: 1, 4: 2}
    assert not ops["GroupQueryAttention"].leave_decomposed
    assert all(op.leave_decomposed and not op.joins for name, op in ops.items()
               if name != "GroupQueryAttention")
    proto, _ = _gqa_case(4, 2, 16, True, True, 16, 0.0, 0.0, 1, 2, 3, [4])
    model = ir.serde.deserialize_model(proto)
    pairs = [(i.name, o.name) for i, o in fused_joins(model.graph)]
    assert pairs == [("past_key", "present_key"), ("past_value", "present_value")]
    assert unpadded_decoding(model.graph) == "GroupQueryAttention"
    unfuse(model)  # the tagged decomposition still names its op
    assert unpadded_decoding(model.graph) == "GroupQueryAttention"
    assert fused_joins(model.graph) == []  # unfused, the Concat is the join
    norm = helper.make_node("SkipLayerNormalization", ["x", "x", "g"], ["y"], domain=MS)
    plain = _model(norm, [helper.make_tensor_value_info("x", F, [1, 2, 4])],
                   [helper.make_tensor_value_info("y", F, [1, 2, 4])], [_w("g", 4)])
    assert unpadded_decoding(ir.serde.deserialize_model(plain).graph) is None
    # a group that cannot be fused again: left decomposed where the record allows it, refused
    # for GroupQueryAttention
    from lemon_onnx.errors import UnsupportedModelError

    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    model.graph.outputs.append(softmax.outputs[0])  # an inner value read outside the group
    with pytest.raises(UnsupportedModelError, match="GroupQueryAttention.*fused again"):
        RefusePass()(model)
    gelu = _model(helper.make_node("FastGelu", ["x"], ["y"], domain=MS),
                  [helper.make_tensor_value_info("x", F, [1, 2, 4])],
                  [helper.make_tensor_value_info("y", F, [1, 2, 4])], [])
    gelu = ir.serde.deserialize_model(gelu)
    unfuse(gelu)
    gelu.graph.outputs.append(next(n for n in gelu.graph if n.op_type == "Tanh").outputs[0])
    res = RefusePass()(gelu)
    assert not res.fused and len(res.left) == 1 and "read outside the group" in res.left[0]


@pytest.mark.parametrize("attr,value", [("rotary_interleaved", 1), ("local_window_size", 4)])
def test_group_query_attention_forms_not_unfused_are_refused(attr, value):
    proto, _ = _gqa_case(4, 2, 16, True, True, 16, 0.0, 0.0, 1, 2, 3, [4])
    proto.graph.node[0].attribute.append(helper.make_attribute(attr, value))
    from lemon_onnx.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="GroupQueryAttention"):
        unfuse(ir.serde.deserialize_model(proto))


@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("positions", ["ids", "offset"])
@pytest.mark.parametrize("partial", [False, True])
def test_rotary_embedding(layout, positions, partial):
    b, s, heads, hd = 2, 5, 2, 16
    rot = 8 if partial else hd
    attrs = {}
    if layout == "3d" or partial:  # the kernel wants it with a partial rotation
        attrs["num_heads"] = heads
    if partial:
        attrs["rotary_embedding_dim"] = rot
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS,
                            **attrs)
    shape = [b, s, heads * hd] if layout == "3d" else [b, heads, s, hd]
    if positions == "ids":
        pos = np.stack([np.arange(s) + 3, np.arange(s)]).astype(np.int64)
    else:
        pos = np.array([4], np.int64)
    proto = _model(node, [helper.make_tensor_value_info("x", F, shape),
                          helper.make_tensor_value_info("pos", TensorProto.INT64, list(pos.shape))],
                   [helper.make_tensor_value_info("y", F, shape)],
                   [_w("cos", GQA_TABLE, rot // 2, scale=1.0),
                    _w("sin", GQA_TABLE, rot // 2, scale=1.0)])
    _check(proto, {"x": _x(*shape), "pos": pos})


# --------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("position_ids", [True, False])
def test_embed_layer_norm(segments, position_ids):
    b, s, d, vocab = 2, 5, 16, 30
    ins = ["ids", "seg" if segments else "", "word", "pos", "segw" if segments else "", "gamma",
           "beta", "mask"] + (["pos_ids"] if position_ids else [])
    node = helper.make_node("EmbedLayerNormalization", ins, ["y", "mask_index"], domain=MS,
                            epsilon=1e-12)
    I32 = TensorProto.INT32
    inputs = [helper.make_tensor_value_info("ids", I32, [b, s]),
              helper.make_tensor_value_info("mask", I32, [b, s])]
    m = np.ones((b, s), np.int32)
    m[1, 3:] = 0
    feeds = {"ids": RNG.integers(0, vocab, (b, s)).astype(np.int32), "mask": m}
    if segments:
        inputs.append(helper.make_tensor_value_info("seg", I32, [b, s]))
        feeds["seg"] = RNG.integers(0, 2, (b, s)).astype(np.int32)
    if position_ids:
        inputs.append(helper.make_tensor_value_info("pos_ids", I32, [b, s]))
        feeds["pos_ids"] = RNG.integers(0, 8, (b, s)).astype(np.int32)
    proto = _model(node, inputs, [helper.make_tensor_value_info("y", F, [b, s, d]),
                                  helper.make_tensor_value_info("mask_index", I32, [b])],
                   [_w("word", vocab, d), _w("pos", 8, d), _w("segw", 2, d), _w("gamma", d),
                    _w("beta", d)])
    _check(proto, feeds)


# --------------------------------------------------------------------------- optimizer outputs

def optimize(src, model_type, heads, hidden, dst, opt_level=0, **options):
    """ONNX Runtime's transformer optimizer (what users run before deploying) on ``src`` (a
    fixture's name, or a path), ``options`` set on its FusionOptions."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions(model_type)
    for key, value in options.items():
        setattr(opts, key, value)
    path = FIXTURES / src if isinstance(src, str) else src
    optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden,
                   opt_level=opt_level, optimization_options=opts).save_model_to_file(str(dst))
    return dst


def contrib_ops(path) -> dict:
    out: dict = {}
    for n in onnx.load(str(path)).graph.node:
        if n.domain == MS:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


#: (fixture, optimizer model type, heads, hidden, the fused ops it must hold)
OPTIMIZED = [
    ("bert-ts17.onnx", "bert", 4, 64, {"Attention", "EmbedLayerNormalization",
                                       "SkipLayerNormalization", "BiasGelu"}),
    ("bert-dy18.onnx", "bert", 4, 64, {"SkipLayerNormalization", "BiasGelu"}),
    ("bert-ts14.onnx", "bert", 4, 64, {"SkipLayerNormalization"}),
    ("gpt2-ts17.onnx", "gpt2", 8, 64, {"SkipLayerNormalization", "FastGelu"}),
    ("gpt2-dy18.onnx", "gpt2", 8, 64, {"SkipLayerNormalization", "FastGelu"}),
    ("vit-ts17.onnx", "vit", 8, 64, {"SkipLayerNormalization", "BiasGelu"}),
    ("vit-dy18.onnx", "vit", 8, 64, {"SkipLayerNormalization", "BiasGelu"}),
]
QUICK_OPTIMIZED = {"bert-ts17.onnx", "gpt2-dy18.onnx"}


def _params():
    out = []
    for case in OPTIMIZED:
        pre_ln = case[1] != "bert"
        for width in ([2, 1.5] if pre_ln else [2]):
            marks = [] if case[0] in QUICK_OPTIMIZED and width == 2 else [pytest.mark.slow]
            out.append(pytest.param(case, width, marks=marks, id=f"{case[0]}-w{width}"))
    return out


@pytest.mark.parametrize("case,width", _params())
def test_optimized_graph_expands_verifies_and_stays_fused(tmp_path, case, width):
    name, model_type, heads, hidden, must = case
    src = optimize(name, model_type, heads, hidden, tmp_path / "opt.onnx")
    before = contrib_ops(src)
    assert must <= set(before), before
    ins = run_cli("inspect", src, "--json")
    assert ins.returncode == 0, ins.stderr
    fused = json.loads(ins.stdout)["fused"]
    assert sum(sum(v.values()) for v in fused.values()) == sum(before.values())
    out = tmp_path / "big.onnx"
    report = tmp_path / "report.json"
    res = run_cli("expand", src, "-o", out, "--width", width, "--depth", 2, "--report", report)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["passed"] is True
    assert rep["levels"]["float64"]["ran"] is True, rep["levels"]
    after = contrib_ops(out)
    # every block's fused ops at least twice (depth 2), those outside blocks at least once (a
    # Pre-LN block's last residual Add and the next norm are one Skip norm: the twin after
    # the last block makes one more with the final norm)
    assert set(after) == set(before), (after, before)
    for where, ops in fused.items():
        for op, n in ops.items():
            assert after[op] >= n * (1 if where == "outside blocks" else 2), (after, fused)
    plan = json.loads(onnx.load(str(out)).metadata_props[0].value)
    assert not any("left unfused" in n for n in plan["notes"]), plan["notes"]
    assert any("fused ops put back" in n for n in plan["notes"]), plan["notes"]


@pytest.mark.slow
def test_gemm_fast_gelu_form_of_the_optimizer_is_proved_in_float64(tmp_path):
    """FusionOptions.enable_gemm_fast_gelu: the MLP's up projection inside GemmFastGelu, which
    ONNX Runtime runs on CUDA only; on the CPU the float64 level (unfused) alone decides."""
    src = optimize("gpt2-dy18.onnx", "gpt2", 8, 64, tmp_path / "opt.onnx",
                   enable_gemm_fast_gelu=True)
    assert contrib_ops(src).get("GemmFastGelu") == 2
    out, report = tmp_path / "big.onnx", tmp_path / "r.json"
    res = run_cli("expand", src, "-o", out, "--width", 1.5, "--depth", 2, "--report", report)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["levels"]["dtype"]["ran"] is False and rep["levels"]["float64"]["ran"] is True
    assert "float64 only" in res.stdout and "GemmFastGelu" in res.stdout
    assert contrib_ops(out)["GemmFastGelu"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("mask_format", [0, 2, 3], ids=["mask-index-end", "raw-mask", "no-mask"])
def test_attention_mask_formats_of_the_optimizer(tmp_path, mask_format):
    """FusionOptions.attention_mask_format: a 1-D mask index, the raw 2-D mask, or none."""
    src = optimize("bert-ts17.onnx", "bert", 4, 64, tmp_path / "opt.onnx",
                   attention_mask_format=mask_format)
    out = tmp_path / "big.onnx"
    res = run_cli("expand", src, "-o", out, "--width", 2, "--depth", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "left unfused" not in res.stdout + res.stderr
    assert contrib_ops(out)["Attention"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False])
def test_multi_head_attention_form_of_the_optimizer(tmp_path, bias):
    """FusionOptions.use_multi_head_attention: MultiHeadAttention on the q/k/v projections,
    with the packed bias in the op or (disable_multi_head_attention_bias) outside it."""
    src = optimize("bert-ts17.onnx", "bert", 4, 64, tmp_path / "opt.onnx",
                   use_multi_head_attention=True, disable_multi_head_attention_bias=not bias)
    before = contrib_ops(src)
    assert before.get("MultiHeadAttention") == 2, before
    out = tmp_path / "big.onnx"
    res = run_cli("expand", src, "-o", out, "--width", 2, "--depth", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "float64 difference" in res.stdout
    assert contrib_ops(out)["MultiHeadAttention"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("name,model_type,heads", [("bert-dy18.onnx", "bert", 4),
                                                   ("llama-dy18.onnx", "gpt2", 8)])
def test_optimizer_with_onnx_runtime_graph_optimizations_expands(tmp_path, name, model_type,
                                                                 heads):
    """opt_level 2: ONNX Runtime's own extended optimisations too (QuickGelu for SiLU; the
    nodes reordered, a BERT's token-type Gather before the word Gather)."""
    src = optimize(name, model_type, heads, 64, tmp_path / "opt.onnx", opt_level=2)
    out = tmp_path / "big.onnx"
    res = run_cli("expand", src, "-o", out, "--width", 2, "--depth", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "float64 difference" in res.stdout
    assert set(contrib_ops(out)) == set(contrib_ops(src))


def test_hardware_specific_layouts_are_refused_naming_them(tmp_path):
    """opt_level 99 adds the CPU's NCHWc convolution layout (com.microsoft.nchwc)."""
    src = optimize("vit-ts17.onnx", "vit", 8, 64, tmp_path / "opt.onnx", opt_level=99)
    res = run_cli("expand", src, "-o", tmp_path / "big.onnx", "--width", 2)
    assert res.returncode == 2, res.stderr
    assert "com.microsoft.nchwc:Conv" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "big.onnx").exists()


def test_inspect_lists_the_fused_ops_per_block(tmp_path):
    src = optimize("bert-ts17.onnx", "bert", 4, 64, tmp_path / "opt.onnx")
    res = run_cli("inspect", src)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "fused ops" in x)
    assert "block 0: Attention, BiasGelu, SkipLayerNormalization x2" in line
    assert "block 1: Attention, BiasGelu, SkipLayerNormalization x2" in line
    assert "outside blocks: BiasGelu, EmbedLayerNormalization" in line


# --------------------------------------------------------------------------- the family matrix

#: the family exports (models/export_families.py) the optimizer fuses and lemon-onnx expands
#: unoptimised, one exporter each (the other is in benchmarks' sweep), with the optimizer's
#: model type and the width (1.5 where the stream allows a fractional width, else 2)
FAMILY_CASES = [
    ("roberta-ts17", "bert", 2), ("electra-ts17", "bert", 2), ("distilbert-dy18", "bert", 2),
    ("t5-ts17", "t5", 1.5), ("gpt_neox-dy18", "gpt_neox", 1.5), ("gptj-dy18", "gpt2", 1.5),
    ("falcon-ts17", "gpt2", 1.5), ("bloom-ts17", "gpt2", 2), ("gpt_bigcode-dy18", "gpt2", 1.5),
    ("mistral-ts17", "gpt2", 1.5), ("qwen2-dy18", "gpt2", 1.5), ("qwen3-ts17", "gpt2", 1.5),
    ("olmo2-dy18", "gpt2", 2), ("gemma-ts17", "gpt2", 1.5), ("stablelm-dy18", "gpt2", 1.5),
    ("phi3-dy18", "gpt2", 1.5), ("starcoder2-ts17", "gpt2", 1.5), ("granite-dy18", "gpt2", 1.5),
    ("deit-ts17", "vit", 1.5), ("beit-dy18", "vit", 1.5), ("dinov2-ts17", "vit", 1.5),
]
FAMILIES = FIXTURES.parent / "families"


@pytest.mark.slow
@pytest.mark.parametrize("name,model_type,width", FAMILY_CASES,
                         ids=[c[0] for c in FAMILY_CASES])
def test_optimized_families_expand_and_stay_fused(tmp_path, name, model_type, width):
    import os

    manifest = FAMILIES / "manifest.json"
    if not manifest.exists():
        assert os.environ.get("LEMON_REQUIRE_FAMILIES") != "1", f"{manifest} is missing"
        pytest.skip("the family exports are made by models/export_families.py (CI does it)")
    entry = next(e for e in json.loads(manifest.read_text()) if e["file"] == f"{name}.onnx")
    cfg = entry["config"]
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("n_heads") or 0
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("dim") or 0
    src = optimize(FAMILIES / entry["file"], model_type, heads, hidden, tmp_path / "opt.onnx")
    before = contrib_ops(src)
    assert before, "the optimizer fused nothing"
    out, report = tmp_path / "big.onnx", tmp_path / "report.json"
    res = run_cli("expand", src, "-o", out, "--width", width, "--depth", 2, "--report", report)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["passed"] is True and rep["levels"]["float64"]["ran"] is True
    after = contrib_ops(out)
    assert set(after) == set(before), (after, before)
    assert all(after[op] >= before[op] for op in before), (after, before)
    plan = json.loads(onnx.load(str(out)).metadata_props[0].value)
    left = [n for n in plan["notes"] if "left unfused" in n]
    print(f"[ci] optimized {name} w{width} d2: {before} -> {after}, "
          f"{len(left)} group(s) left unfused")
    # only a Skip norm's residual Add may stay unfused: the last block's, when the twin after
    # it starts with no norm (OLMo-2 normalises branch outputs) or BEiT's layer scale sits
    # between; it is then a plain residual Add (exact)
    assert len(left) <= 1 and all("LayerNormalization (group" in n for n in left), left


# --------------------------------------------------------------------------- optimum's levels

OPTIMUM = FIXTURES.parent / "optimum"
OPTIMUM_PY = FIXTURES.parent.parent / ".venv-optimum" / "bin" / "python"
#: optimum export folders through `ORTOptimizer` at the levels that run on the CPU (O4 is
#: fp16 for CUDA): encoders, an image model, and decoders with their KV cache
OPTIMUM_CASES = [("bert-cls", "O2"), ("bert-cls", "O3"), ("vit-cls", "O3"), ("gpt2-gen", "O2"),
                 ("llama-gen", "O2"), ("roberta-mlm", "O2")]


@pytest.mark.slow
@pytest.mark.parametrize("folder,level", OPTIMUM_CASES, ids=[f"{a}-{b}" for a, b in OPTIMUM_CASES])
def test_optimum_optimized_folders_expand_and_stay_fused(tmp_path, folder, level):
    import os

    if not (OPTIMUM / folder).exists() or not OPTIMUM_PY.exists():
        assert os.environ.get("LEMON_REQUIRE_OPTIMUM") != "1", "optimum folders are missing"
        pytest.skip("optimum's folders and virtualenv are made by .ci/run")
    opt = tmp_path / "opt"
    run = subprocess.run([str(OPTIMUM_PY), str(Path(__file__).parent / "optimum_optimize.py"),
                          str(OPTIMUM / folder), level, str(opt)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    before = json.loads(run.stdout.strip().splitlines()[-1])
    (name, ops), = before.items()
    assert ops, f"optimum's {level} fused nothing in {folder}"
    out = tmp_path / "big"
    res = run_cli("expand", opt, "-o", out, "--width", 2, "--depth", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "verified" in res.stdout and "NO float64 proof" not in res.stdout, res.stdout
    after = contrib_ops(out / name)
    assert set(after) == set(ops) and all(after[o] >= ops[o] for o in ops), (after, ops)
    plan = json.loads({p.key: p.value for p in onnx.load(str(out / name),
                                                         load_external_data=False)
                       .metadata_props}["lemon.plan"])
    assert not any("left unfused" in n for n in plan["notes"]), plan["notes"]


def test_layerwise_and_blockwise_on_fused_graphs(tmp_path):
    """Layerwise compares the blocks whose hidden state the files carry (a Pre-LN block can
    end inside a SkipLayerNormalization: noted, not compared); block-by-block verification
    cannot cut there and is refused (exit 2) before any work."""
    src = optimize("gpt2-dy18.onnx", "gpt2", 8, 64, tmp_path / "opt.onnx")
    out = tmp_path / "big.onnx"
    assert run_cli("expand", src, "-o", out, "--width", 2, "--depth", 2, "-q").returncode == 0
    res = run_cli("verify", src, out, "--layerwise")
    assert res.returncode == 0 and "PASS" in res.stdout + res.stderr, res.stderr[-2000:]
    assert "end inside a fused op" in res.stdout + res.stderr
    res = run_cli("verify", src, out, "--blockwise")
    assert res.returncode == 2 and "fused" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("expand", src, "-o", tmp_path / "b2.onnx", "--width", 2, "--blockwise")
    assert res.returncode == 2 and not (tmp_path / "b2.onnx").exists(), res.stderr


@pytest.mark.slow
def test_optimized_real_minilm_expands_and_stays_fused(tmp_path):
    """all-MiniLM-L6-v2's pretrained weights (models/export_real.py), fully fused by the
    optimizer (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu)."""
    import os

    path = FIXTURES.parent / "real" / "minilm-ts17.onnx"
    if not path.exists():
        assert os.environ.get("LEMON_REQUIRE_REAL") != "1", f"{path} is missing"
        pytest.skip("the real exports are made by models/export_real.py (CI does it)")
    src = optimize(path, "bert", 12, 384, tmp_path / "opt.onnx")
    before = contrib_ops(src)
    assert before == {"EmbedLayerNormalization": 1, "Attention": 6,
                      "SkipLayerNormalization": 12, "BiasGelu": 6}, before
    out, report = tmp_path / "big.onnx", tmp_path / "r.json"
    res = run_cli("expand", src, "-o", out, "--width", 2, "--depth", 2, "--report", report)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["passed"] and rep["levels"]["float64"]["ran"]
    assert contrib_ops(out) == {"EmbedLayerNormalization": 1, "Attention": 12,
                                "SkipLayerNormalization": 24, "BiasGelu": 12}

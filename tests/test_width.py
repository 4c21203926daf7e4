"""Lossless width expansion on every fixture and exporter, checked with ONNX Runtime."""
import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

from lemon_onnx import io
from lemon_onnx.expansion import expand_model
from lemon_onnx.plan import PLAN_KEY, Plan
from lemon_onnx.recognize import recognize
from conftest import FIXTURES, assert_equivalent, load_cases, manifest, run_cli

WIDTHS = {"bert": [2, 3], "gpt2": [1.25, 1.5, 2], "vit": [1.25, 1.5, 2], "llama": [1.25, 1.5, 2]}
RUNNABLE = [e for e in manifest("main") + manifest("shared") if e["ort"]["runs"]]
CASES = [(e, w) for e in RUNNABLE for w in WIDTHS[e["arch"]]]
# regression shapes: one KV head, GQA groups of 3 with a tied head, 3 heads
EDGE_WIDTHS = {"llama-ts17-mqa.onnx": [2, 3], "llama-dy18-g3tied.onnx": [1.5, 2, 3],
               "gpt2-dy18-h3.onnx": [2, 3], "bert-ts17-2in.onnx": [2, 3],
               "bert-dy18-2in.onnx": [2], "bert-ts17-types20.onnx": [2]}
CASES += [(e, w) for e in manifest("edge") for w in EDGE_WIDTHS[e["file"]]]


def _expand(entry, tmp_path, **kw):
    model, plan, _ = expand_model(FIXTURES / entry["file"], **kw)
    out = io.save(model, tmp_path / "wide.onnx")
    return out, plan


@pytest.mark.parametrize("entry,width", CASES,
                         ids=[f"{e['file'].removesuffix('.onnx')}-w{w}" for e, w in CASES])
def test_width_is_lossless(tmp_path, entry, width):
    out, plan = _expand(entry, tmp_path, width=width, seed=3)
    onnx.checker.check_model(str(out), full_check=True)
    cases = load_cases(FIXTURES / entry["file"].replace(".onnx", ".npz"))
    assert_equivalent(FIXTURES / entry["file"], out, cases)
    desc = recognize(io.load(out))
    cfg = entry["config"]
    assert desc.hidden == round(cfg["hidden"] * width)
    assert desc.ffn == round(cfg["ffn"] * width)
    assert desc.heads == round(cfg["heads"] * width)
    # GQA keeps its group size; MQA keeps its one KV head (every query head reads it)
    assert desc.kv_heads == (1 if cfg["kv_heads"] == 1 else
                             desc.heads * cfg["kv_heads"] // cfg["heads"])
    assert desc.head_dim == cfg["head_dim"] and desc.num_layers == cfg["num_layers"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    stored = Plan.from_json(props[PLAN_KEY])
    assert stored.target["hidden"] == desc.hidden and stored.seed == 3
    assert stored.source_sha256 == hashlib.sha256((FIXTURES / entry["file"]).read_bytes()).hexdigest()


def test_seed_gives_identical_bytes(tmp_path):
    e = next(x for x in RUNNABLE if x["file"] == "llama-dy18.onnx")
    a, _ = _expand(e, tmp_path / "a", width=1.5, seed=7)
    b, _ = _expand(e, tmp_path / "b", width=1.5, seed=7)
    c, _ = _expand(e, tmp_path / "c", width=1.5, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def _weights(path):
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("name,width", [("gpt2-ts17.onnx", 2), ("llama-ts17.onnx", 1.5)])
def test_symmetry_is_broken_and_sums_kept(tmp_path, name, width):
    e = next(x for x in RUNNABLE if x["file"] == name)
    out, plan = _expand(e, tmp_path, width=width)
    src, dst = recognize(io.load(FIXTURES / name)), recognize(io.load(out))
    w0, w1 = _weights(FIXTURES / name), _weights(out)
    f, F = src.ffn, dst.ffn
    down0 = w0[src.blocks[0].mlp.down.weight]  # [ffn, hidden] (MatMul layout)
    down1 = w1[dst.blocks[0].mlp.down.weight]
    assert down0.shape == (f, src.hidden) and down1.shape == (F, dst.hidden)
    d = src.hidden
    # neuron j has copies j, j+f, ... (circ); their fan-out rows differ but sum to the original
    for j in range(3):
        copies = list(range(j, F, f))
        assert len(copies) >= 2
        rows = down1[copies][:, :d]
        assert not np.allclose(rows[0], rows[1])
        np.testing.assert_allclose(rows.sum(axis=0), down0[j], atol=1e-5)
    # heads: the out projection's rows of replicated heads differ and sum to the original
    hd = src.head_dim
    o0, o1 = w0[src.blocks[0].attention.out.weight], w1[dst.blocks[0].attention.out.weight]
    H = src.heads
    r0 = o1[0:hd, :d]
    r1 = o1[H * hd:(H + 1) * hd, :d]
    assert not np.allclose(r0, r1)
    np.testing.assert_allclose(r0 + r1, o0[0:hd], atol=1e-5)


@pytest.mark.parametrize("model,args,needles", [
    ("bert-ts17.onnx", ["--width", "1.5"], ["Post-LN", "whole multiple", "--width 2 (hidden 128"]),
    ("gpt2-ts17.onnx", ["--width", "1.1"], ["heads", "1.125"]),
    ("llama-ts17.onnx", ["--heads", "9", "--hidden", "72", "--ffn", "96"], ["multiple of 2", "--heads 10"]),
    ("gpt2-ts17.onnx", ["--width", "0.5"], ["shrink"]),
    ("vit-ts17.onnx", ["--hidden", "48"], ["smaller"]),
])
def test_refusals(tmp_path, model, args, needles):
    out = tmp_path / "x.onnx"
    res = run_cli("expand", FIXTURES / model, "-o", out, *args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n.lower() in res.stderr.lower(), res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,width", [("gpt2-ts17.onnx", 1.5), ("llama-dy18.onnx", 1.5), ("bert-ts14.onnx", 2)])
def test_fp16_models_expand_and_verify(tmp_path, name, width):
    """A model stored in fp16 keeps fp16 weights and verifies under the fp16 tolerance."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from lemon_onnx.verification import default_tolerances, verify

    src = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(FIXTURES / name)), keep_io_types=False), str(src))
    model, plan, _ = expand_model(src, width=width, depth=2)
    out = io.save(model, tmp_path / "wide16.onnx")
    dtypes = {t.data_type for t in onnx.load(str(out)).graph.initializer if t.dims and len(t.dims) == 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    rep = verify(src, out)
    assert rep.dtype == "float16" and (rep.atol, rep.rtol) == default_tolerances("float16")
    assert rep.passed, rep.format()


def _with_layer_scale(src, dst):
    """The fixture with LayerScale: a per-channel constant multiplies every branch output."""
    desc = recognize(io.load(src))
    m = onnx.load(str(src))
    rng = np.random.default_rng(5)
    for b in desc.blocks:
        for lin in (b.attention.out, b.mlp.down):
            scaled = lin.output + "_layerscale"
            for n in m.graph.node:
                n.input[:] = [scaled if i == lin.output else i for i in n.input]
            name = lin.output + "_ls"
            vec = (1 + 0.3 * rng.standard_normal(desc.hidden)).astype(np.float32)
            m.graph.initializer.append(onnx.numpy_helper.from_array(vec, name))
            m.graph.node.append(onnx.helper.make_node("Mul", [lin.output, name], [scaled]))
    m = onnx.utils.Extractor(m).model if False else m
    sorted_nodes = _toposort(m)
    del m.graph.node[:]
    m.graph.node.extend(sorted_nodes)
    onnx.save(m, str(dst))
    return desc


def _toposort(m):
    avail = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer} | {""}
    todo, done = list(m.graph.node), []
    while todo:
        rest = []
        for n in todo:
            if all(i in avail for i in n.input):
                done.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        assert len(rest) < len(todo)
        todo = rest
    return done


@pytest.mark.parametrize("name,width", [("gpt2-ts17.onnx", 1.5), ("gpt2-dy18.onnx", 2),
                                        ("llama-ts17.onnx", 1.5), ("bert-ts14.onnx", 2)])
def test_layer_scale_on_the_stream(tmp_path, name, width):
    src = tmp_path / "ls.onnx"
    _with_layer_scale(FIXTURES / name, src)
    desc = recognize(io.load(src))
    assert all(b.attention_scale and b.mlp_scale for b in desc.blocks)
    model, plan, _ = expand_model(src, width=width, depth=2)
    out = io.save(model, tmp_path / "wide.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert_equivalent(src, out, load_cases(FIXTURES / name.replace(".onnx", ".npz")))


@pytest.mark.parametrize("name", ["gpt2-ts17.onnx", "gpt2-dy18.onnx", "gpt2-ts17-shared.onnx",
                                  "gpt2-dy18.onnx:one-tensor"])
@pytest.mark.parametrize("width", [1.25, 2, 3])
def test_tied_head_stays_tied(tmp_path, name, width):
    """With only logits as output, the tie is kept: the table and the head stay one tensor (or
    a transposed copy of it) and the final norm's gamma is split exactly over the k copies, so
    the logits are exact in float64 for every k (LEMON's 1/k is not representable for k=3)."""
    name, _, variant = name.partition(":")
    m = onnx.load(str(FIXTURES / name))
    if variant == "one-tensor":  # the head reads Transpose(table), as dynamo leaves big models
        d = recognize(io.load(FIXTURES / name))
        m.graph.node.insert(0, onnx.helper.make_node("Transpose", [d.embeddings.token], ["tableT"],
                                                     perm=[1, 0], name="tie_transpose"))
        for n in m.graph.node:
            if n.name == d.head.linear.node:
                n.input[1] = "tableT"
    keep = [o for o in m.graph.output if o.name == "logits"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    src = tmp_path / "logits-only.onnx"
    onnx.save(m, str(src))
    before = recognize(io.load(src))
    assert before.tie == ("shared" if variant else "transposed-copy")
    model, plan, _ = expand_model(src, width=width)
    assert not plan.notes  # not untied
    out = io.save(model, tmp_path / "wide.onnx")
    after = recognize(io.load(out))
    assert after.tie == before.tie
    assert_equivalent(src, out, load_cases(FIXTURES / name.replace(".onnx", ".npz")))
    if width == int(width):
        from lemon_onnx.verification import verify

        assert verify(src, out, provider="cpu").max_alg_rel <= 1e-9


def _add_linear(src, dst, reads, name, out_dim=16, select_cls=True):
    """Add a pooler-like head (cls token -> MatMul -> Tanh) reading value ``reads``."""
    m = onnx.load(str(src))
    rng = np.random.default_rng(9)
    d = recognize(io.load(src)).hidden
    w = (rng.standard_normal((d, out_dim)) * 0.1).astype(np.float32)
    m.graph.initializer.append(onnx.numpy_helper.from_array(w, name + "_w"))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), name + "_idx"))
    x = reads
    if select_cls:
        m.graph.node.append(onnx.helper.make_node("Gather", [reads, name + "_idx"], [name + "_cls"], axis=1))
        x = name + "_cls"
    m.graph.node.append(onnx.helper.make_node("MatMul", [x, name + "_w"], [name + "_mm"]))
    m.graph.node.append(onnx.helper.make_node("Tanh", [name + "_mm"], [name]))
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(dst))


@pytest.mark.parametrize("name,width", [("bert-ts17.onnx", 2), ("vit-dy18.onnx", 1.5), ("llama-ts14.onnx", 1.25)])
def test_extra_head_on_the_final_stream(tmp_path, name, width):
    """A pooler beside the main head (BERT's pooler, a second classifier) is expanded too."""
    d = recognize(io.load(FIXTURES / name))
    reads = d.head.reads
    src = tmp_path / "pooled.onnx"
    _add_linear(FIXTURES / name, src, reads, "pooled")
    d2 = recognize(io.load(src))
    assert len(d2.extra_heads) == 1 and not d2.blockers and d2.head.kind == d.head.kind
    model, plan, _ = expand_model(src, width=width, depth=2)
    out = io.save(model, tmp_path / "wide.onnx")
    assert_equivalent(src, out, load_cases(FIXTURES / name.replace(".onnx", ".npz")))


def test_linear_on_an_inner_block_is_refused(tmp_path):
    d = recognize(io.load(FIXTURES / "gpt2-ts17.onnx"))
    src = tmp_path / "probe.onnx"
    _add_linear(FIXTURES / "gpt2-ts17.onnx", src, d.blocks[0].output, "probe", select_cls=False)
    res = subprocess.run([sys.executable, "-m", "lemon_onnx.cli", "expand", str(src), "-o",
                          str(tmp_path / "x.onnx"), "--width", "2"], capture_output=True, text=True)
    assert res.returncode == 2 and "neither part of a block nor a head" in res.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("name,kw", [("llama-dy18.onnx", dict(width=1.5, depth=2)),
                                     ("gpt2-ts17.onnx", dict(width=2, depth=3)),
                                     ("bert-ts14.onnx", dict(width=2, depth=2))])
def test_lazy_weights_give_the_same_model(tmp_path, monkeypatch, name, kw):
    """Large tensors are computed when saved (bounded memory); forced here for every tensor:
    the result is equivalent, and byte-identical to the eager computation."""

    from lemon_onnx.passes import width as width_mod

    eager, _, _ = expand_model(FIXTURES / name, **kw)
    a = io.save(eager, tmp_path / "eager.onnx")
    monkeypatch.setattr(width_mod, "LAZY_BYTES", 0)
    import lemon_onnx.passes.depth as depth_mod
    monkeypatch.setattr(depth_mod, "LAZY_BYTES", 0)
    lazy, _, _ = expand_model(FIXTURES / name, **kw)
    kinds = {type(v.const_value).__name__ for v in lazy.graph.initializers.values()}
    assert "LazyTensor" in kinds
    b = io.save(lazy, tmp_path / "lazy.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert_equivalent(FIXTURES / name, b, load_cases(FIXTURES / name.replace(".onnx", ".npz")))


def test_tied_lm_with_another_head_on_its_norm_is_untied(tmp_path):
    """The tie splits the final norm's gamma over the k copies; a second head reading that
    norm would see the split, so the head is untied (and --keep-tie refuses)."""
    from onnx import helper as h

    from lemon_onnx.errors import PlanError
    from lemon_onnx.verification import verify

    src = FIXTURES / "llama-dy18-g3tied.onnx"
    desc = recognize(io.load(src))
    m = onnx.load(str(src))
    w = np.random.default_rng(0).standard_normal((desc.hidden, 3)).astype(np.float32)
    m.graph.initializer.append(onnx.numpy_helper.from_array(w, "extra_cls_w"))
    m.graph.node.append(h.make_node("MatMul", [desc.final_norm.output, "extra_cls_w"],
                                    ["extra_cls"], name="extra_cls_head"))
    m.graph.output.append(h.make_tensor_value_info("extra_cls", onnx.TensorProto.FLOAT, None))
    keep = [o for o in m.graph.output if o.name in ("logits", "extra_cls")]
    del m.graph.output[:]
    m.graph.output.extend(keep)  # the final norm is no graph output: only the second head
    two = tmp_path / "two_heads.onnx"
    onnx.save(m, str(two))
    model, plan, d2 = expand_model(two, width=2)
    assert d2.tie and d2.extra_heads
    assert any("untied" in n and "another head" in n for n in plan.notes)
    big = io.save(model, tmp_path / "big.onnx")
    rep = verify(two, big, provider="cpu")
    assert rep.passed and rep.max_alg_rel <= 1e-9, rep.format()
    with pytest.raises(PlanError, match="keep-tie"):
        expand_model(two, width=2, keep_tie=True)

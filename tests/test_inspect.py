"""Recognition: exact configs for every fixture, size literals against an export oracle."""
import difflib
import json
import random
import subprocess
import sys

import onnx
import pytest

from lemon_onnx import io
from lemon_onnx.recognize import recognize
from conftest import FIXTURES, fixture_ids, manifest

MAIN = manifest("main") + manifest("shared") + manifest("edge")


def expected(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "ffn")}


@pytest.mark.parametrize("entry", MAIN, ids=fixture_ids(MAIN))
def test_inspect_reports_the_exported_config(entry):
    desc = recognize(io.load(FIXTURES / entry["file"]))
    cfg = entry["config"]
    got = {k: getattr(desc, k) for k in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "ffn")}
    assert got == expected(cfg)
    assert desc.vocab == (cfg["vocab"] if cfg["model_type"] != "vit" else None)
    assert bool(desc.tie) == bool(cfg["tie"])
    assert desc.family == cfg["model_type"]
    assert desc.layout == ("post-norm" if cfg["model_type"] == "bert" else "pre-norm")
    assert desc.norm_type == ("rmsnorm" if cfg["model_type"] == "llama" else "layernorm")
    assert len(desc.blocks) == cfg["num_layers"]
    assert not [u for u in desc.unrecognised if "conflict" in u]


def test_inspect_cli_json_and_text():
    path = FIXTURES / "llama-ts17.onnx"
    res = subprocess.run([sys.executable, "-m", "lemon_onnx.cli", "inspect", str(path), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["num_layers"] == 2 and data["kv_heads"] == 4 and data["heads"] == 8
    assert len(data["blocks"]) == 2 and data["blocks"][0]["mlp"]["gate"] is not None
    res = subprocess.run([sys.executable, "-m", "lemon_onnx.cli", "inspect", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "kv heads 4" in res.stdout and "block 1" in res.stdout


def _scramble_names(src, dst, seed=0):
    """Give every initializer, value and node a meaningless name."""
    m = onnx.load(str(src))
    rnd = random.Random(seed)
    keep = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    names = {}

    def new(n):
        if not n or n in keep:
            return n
        if n not in names:
            names[n] = f"t{rnd.randrange(10**9)}_{len(names)}"
        return names[n]

    for t in m.graph.initializer:
        t.name = new(t.name)
    for n in m.graph.node:
        n.name = f"n{rnd.randrange(10**9)}_{id(n) % 997}"
        n.input[:] = [new(i) for i in n.input]
        n.output[:] = [new(o) for o in n.output]
    for vi in m.graph.value_info:
        vi.name = new(vi.name)
    onnx.save(m, str(dst))


@pytest.mark.parametrize("name", ["gpt2-ts14.onnx", "llama-dy18.onnx", "bert-ts17.onnx", "vit-dy18.onnx"])
def test_recognition_ignores_names(tmp_path, name):
    a = recognize(io.load(FIXTURES / name))
    _scramble_names(FIXTURES / name, tmp_path / "x.onnx")
    b = recognize(io.load(tmp_path / "x.onnx"))
    assert a.config() == b.config()
    assert sorted((lit.value, lit.label) for lit in a.size_literals) == \
        sorted((lit.value, lit.label) for lit in b.size_literals)


# ------------------------------------------------------------------ size-literal oracle
def int_constants(model: onnx.ModelProto) -> dict:
    """Every integer literal, keyed by where it is read: (node index, input index, flat index)
    for constant inputs (initializers or Constant nodes), (node index, attribute) for integer
    attributes.  Keys by position, not by name, so exporters' naming and dedup do not matter."""
    consts = {}
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            consts[t.name] = onnx.numpy_helper.to_array(t).reshape(-1).tolist()
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                    consts[n.output[0]] = onnx.numpy_helper.to_array(a.t).reshape(-1).tolist()
    out = {}
    for k, n in enumerate(model.graph.node):
        for i, name in enumerate(n.input):
            for j, v in enumerate(consts.get(name, [])):
                out[("in", k, i, j)] = v
        for a in n.attribute:
            if a.type == onnx.AttributeProto.INT:
                out[("attr", k, a.name)] = a.i
    return out


def align(consts_b: dict, mb, ma) -> dict:
    """Re-key the alt graph's literals by the matching node of the main graph.  Exporters fold
    constants depending on tensor sizes (a tied head may become a Transpose node in one export
    and a pre-transposed initializer in the other), so nodes are matched by op-type sequence."""
    sa = [n.op_type for n in ma.graph.node]
    sb = [n.op_type for n in mb.graph.node]
    mapping = {}
    for blk in difflib.SequenceMatcher(a=sb, b=sa, autojunk=False).get_matching_blocks():
        for t in range(blk.size):
            mapping[blk.a + t] = blk.b + t
    out = {}
    for key, v in consts_b.items():
        if key[1] in mapping:
            out[(key[0], mapping[key[1]]) + key[2:]] = v
    return out


def ref_key(lit, model):
    """lemon-onnx's literal reference -> the oracle's key."""
    idx = {n.name: k for k, n in enumerate(model.graph.node)}
    if lit.where[0] == "attr":
        return ("attr", idx[lit.where[1]], lit.where[2])
    assert lit.via is not None, lit
    return ("in", idx[lit.via[0]], lit.via[1], lit.where[2])


def sizes(cfg):
    s = {"hidden": cfg["hidden"], "ffn": cfg["ffn"], "heads": cfg["heads"], "kv_heads": cfg["kv_heads"],
         # head_dim cut in two halves by rotate_half: parts named by position
         "head_dim": cfg["head_dim"], "head_dim[1]": cfg["head_dim"] // 2, "head_dim[0]": 2,
         # the fixtures' fused projections are equal q|k|v thirds
         "kv_groups": cfg["heads"] // cfg["kv_heads"], "qkv_parts": 3, "vocab": cfg.get("vocab"),
         "max_positions": cfg.get("max_positions"), "num_labels": cfg.get("num_labels"),
         "tokens": (cfg.get("image_size", 0) // max(cfg.get("patch_size", 1), 1)) ** 2 + 1,
         "patch_rows": cfg.get("image_size", 0) // max(cfg.get("patch_size", 1), 1),
         "patch_cols": cfg.get("image_size", 0) // max(cfg.get("patch_size", 1), 1)}
    return s


def evaluate(label, cfg):
    n = 1
    for part in label.split("*"):
        v = sizes(cfg).get(part)
        assert v is not None, f"label {label!r} has an unnamed part {part!r}"
        n *= v
    return n


PAIRS = [(e, a) for e in manifest("main") for a in manifest("alt")
         if a["arch"] == e["arch"] and a["tag"] == e["tag"]]


@pytest.mark.parametrize("main,alt", PAIRS, ids=[e["file"].removesuffix(".onnx") for e, _ in PAIRS])
def test_size_literals_match_the_export_oracle(main, alt):
    """Export the same architecture with other sizes: the integer constants that differ are the
    size literals.  The recogniser must report every one of them, with a label that evaluates to
    the literal in both graphs; anything else it reports must evaluate equally in both."""
    ma, mb = onnx.load(str(FIXTURES / main["file"])), onnx.load(str(FIXTURES / alt["file"]))
    ca, cb = int_constants(ma), align(int_constants(mb), mb, ma)
    differ = {k for k in ca if k in cb and ca[k] != cb[k]}
    assert differ, "the oracle found no size literal at all"
    desc = recognize(io.load(FIXTURES / main["file"]))
    reported = {}
    for lit in desc.size_literals:
        key = ref_key(lit, ma)
        reported.setdefault(key, set()).add(lit.label)
    missing = differ - set(reported)
    assert not missing, f"size literals not found: {sorted(missing)[:10]}"
    for key, labels in reported.items():
        for label in labels:
            assert evaluate(label, main["config"]) == ca[key], (key, label, ca[key])
            assert evaluate(label, alt["config"]) == cb[key], (key, label, cb[key])


@pytest.mark.parametrize("name", ["bert-ts17-2in.onnx", "bert-dy18-2in.onnx",
                                  "bert-ts17-types20.onnx", "bert-ts17.onnx"])
def test_embedding_tables_are_told_apart_by_how_rows_are_chosen(name):
    """Without a token_type_ids input the type row is gathered with a constant index (it
    used to be taken for the position table, and the real position table was not widened);
    a type table of 20 rows is still a type table (no row-count rule)."""
    desc = recognize(io.load(FIXTURES / name))
    e = desc.embeddings
    assert e.position.endswith("position_embeddings.weight")
    assert e.token_type.endswith("token_type_embeddings.weight")
    kinds = dict(e.tables)
    assert kinds[e.position] == "sequence"
    assert kinds[e.token_type] == ("constant" if "2in" in name else "input")

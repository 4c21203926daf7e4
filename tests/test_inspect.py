"""Recognition: exact configs for every fixture, size literals against an export oracle."""
import json
import random
import subprocess
import sys

import numpy as np
import onnx
import pytest

from lemon_onnx import io
from lemon_onnx.recognize import recognize
from conftest import FIXTURES, fixture_ids, manifest

MAIN = manifest("main") + manifest("shared")


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
    """Every integer literal of the graph: (kind, key, flat index) -> value."""
    out = {}
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            for i, v in enumerate(onnx.numpy_helper.to_array(t).reshape(-1).tolist()):
                out[("init", t.name, i)] = v
    for k, n in enumerate(model.graph.node):
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type in (
                    onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                for i, v in enumerate(onnx.numpy_helper.to_array(a.t).reshape(-1).tolist()):
                    out[("node", k, i)] = v
            elif a.type == onnx.AttributeProto.INT:
                out[("attr", k, a.name)] = a.i
            elif a.type == onnx.AttributeProto.INTS:
                for i, v in enumerate(a.ints):
                    out[("attr", k, f"{a.name}[{i}]")] = v
    return out


def ref_key(ref, model):
    """lemon-onnx's literal reference -> the oracle's key."""
    idx = {n.name: k for k, n in enumerate(model.graph.node)}
    out_of = {o: k for k, n in enumerate(model.graph.node) for o in n.output}
    kind = ref[0]
    if kind == "node":
        return ("node", idx[ref[1]], ref[2])
    if kind == "value":
        return ("node", out_of[ref[1]], ref[2]) if ref[1] in out_of else ("init", ref[1], ref[2])
    return ("attr", idx[ref[1]], ref[2])


def sizes(cfg):
    s = {"hidden": cfg["hidden"], "ffn": cfg["ffn"], "heads": cfg["heads"], "kv_heads": cfg["kv_heads"],
         "head_dim": cfg["head_dim"], "head_dim/2": cfg["head_dim"] // 2, "rotary_halves": 2,
         "kv_groups": cfg["heads"] // cfg["kv_heads"], "3": 3, "vocab": cfg.get("vocab"),
         "max_positions": cfg.get("max_positions"), "num_labels": cfg.get("num_labels")}
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
    ca, cb = int_constants(ma), int_constants(mb)
    assert len(ma.graph.node) == len(mb.graph.node), "the two exports must have the same topology"
    differ = {k for k in ca if k in cb and ca[k] != cb[k]}
    assert differ, "the oracle found no size literal at all"
    desc = recognize(io.load(FIXTURES / main["file"]))
    reported = {}
    for lit in desc.size_literals:
        key = ref_key(lit.where, ma)
        reported.setdefault(key, set()).add(lit.label)
    missing = differ - set(reported)
    assert not missing, f"size literals not found: {sorted(missing)[:10]}"
    for key, labels in reported.items():
        for label in labels:
            assert evaluate(label, main["config"]) == ca[key], (key, label, ca[key])
            assert evaluate(label, alt["config"]) == cb[key], (key, label, cb[key])

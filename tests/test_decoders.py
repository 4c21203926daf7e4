"""Decoders exported for generation with a KV cache (optimum's text-generation-with-past):
every ``*-gen`` folder of ``models/optimum`` (``models/export_optimum.py``) expands as a
folder at width 1.5 (2 where the layout has no fractional form) and depth 2, verifies (plain
runs with an empty cache, then cached decoding step by step), and optimum's own client,
``ORTModelForCausalLM``, generates the same 24 greedy tokens from the expanded folder as
from the source folder, with first-step logits within 1e-3 relative.  A model whose cache is
broken fails verification with exit 1.

The folders and optimum's virtualenv (``.venv-optimum``: optimum-onnx pins transformers 4.57)
are generated, not committed; CI makes both (``.ci/run``) and sets ``LEMON_REQUIRE_OPTIMUM=1``,
so a missing folder or interpreter fails there instead of skipping.  The optimum checks run
in one subprocess for all folders.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lemon_onnx
from lemon_onnx.components.cache import _style, find_joins
from lemon_onnx.errors import LemonError, PlanError
from lemon_onnx.plan import Plan, chained
from lemon_onnx.verification.inputs import _with_sums, positions_from_mask

# the module's fixtures expand every folder once: its tests stay on one xdist worker
pytestmark = pytest.mark.xdist_group("decoders")

ROOT = Path(__file__).resolve().parent.parent
OPTIMUM = ROOT / "models" / "optimum"
OPTIMUM_PY = ROOT / ".venv-optimum" / "bin" / "python"
REQUIRED = os.environ.get("LEMON_REQUIRE_OPTIMUM") == "1"

def _entries() -> list:
    path = OPTIMUM / "manifest.json"
    if not path.exists():
        if REQUIRED:
            raise FileNotFoundError(f"{path}: run .venv-optimum/bin/python "
                                    "models/export_optimum.py")
        return []
    return [e for e in json.loads(path.read_text())
            if e["task"] == "text-generation-with-past" and not e.get("export_error")]


GEN = _entries()
NAMES = [e["name"] for e in GEN]


def _require_optimum_python() -> None:
    if not OPTIMUM_PY.exists():
        if REQUIRED:
            raise FileNotFoundError(f"{OPTIMUM_PY}: make optimum's virtualenv (.ci/run)")
        pytest.skip("optimum's virtualenv (.venv-optimum) is not there")


# --------------------------------------------------------------------------- the folder
def _expand(src: Path, out: Path, report: Path):
    """The export folder expanded as a folder (config.json rewritten, the rest copied) at
    width 1.5, or 2 where the plan refuses a fractional width for this layout."""
    try:
        return lemon_onnx.expand(src, out, width=1.5, depth=2, report=report), 1.5
    except PlanError:
        return lemon_onnx.expand(src, out, width=2, depth=2, report=report), 2.0


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """name -> {"result" (model.onnx's), "width", "folder", "report"} or {"refused": (exit
    code, message)}."""
    if not GEN:
        pytest.skip("no optimum text-generation folders (models/export_optimum.py)")
    root = tmp_path_factory.mktemp("gen")
    done = {}
    for e in GEN:
        folder = root / e["name"]
        try:
            result, width = _expand(OPTIMUM / e["folder"], folder, root / "report.json")
        except LemonError as exc:
            done[e["name"]] = {"refused": (exc.exit_code, exc.message)}
            continue
        done[e["name"]] = {"result": result.files["model.onnx"], "width": width,
                           "folder": folder,
                           "report": json.loads((root / "report.model.json").read_text())}
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_expands_and_verifies_with_cached_decoding(expanded, name):
    got = expanded[name]
    assert "refused" not in got, got.get("refused")
    res = got["result"]
    assert res.verified
    dec = got["report"]["decoding"]
    assert dec["ran"] and dec["float64"], dec
    steps = dec["steps"]
    assert len(steps) >= 3 and [s["step"] for s in steps] == list(range(len(steps)))
    assert all(s["tokens"] == 1 for s in steps[1:])
    plan = res.plan
    kv_grows = plan.target["kv_heads"] != plan.source["kv_heads"]
    for s in steps:  # logits and every source cache, both levels, at every step
        assert {o["name"] for o in s["outputs"]} == {o["name"] for o in steps[0]["outputs"]}
        caches = [o for o in s["outputs"] if o["name"] != "logits"]
        assert len(caches) == 2 * plan.source["layers"]
        assert all(o["compared"] == ("kv-map@axis1" if kv_grows else "whole") for o in caches)
        for o in s["outputs"]:
            assert o["passed"] and o["alg_passed"] is not False, (s["step"], o)
            assert o["ratio"] is not None and o["alg_rel"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_layer_has_its_own_cache_in_layer_order(expanded, name):
    """2 x layers cache inputs and outputs, numbered 0..L'-1 in the graph's order, each output
    returning (by structure) the input of the same number, declared with the expanded KV
    head count; a twin's cache comes from its own Concat."""
    got = expanded[name]
    assert "refused" not in got, got.get("refused")
    res = got["result"]
    model = onnx.load(str(got["folder"] / "model.onnx"), load_external_data=False)
    import onnx_ir as ir

    joins = find_joins(ir.serde.deserialize_model(model).graph)
    layers, kv = res.plan.target["layers"], res.plan.target["kv_heads"]
    assert len(joins) == 2 * layers
    ins = [i.name for i in model.graph.input if i.name in {v.name for v, *_ in joins}]
    outs = [o.name for o in model.graph.output if o.name in {x.name for _, _, x, _ in joins}]
    pair = {v.name: out.name for v, _, out, _ in joins}
    assert [pair[n] for n in ins] == outs  # runtimes pair inputs and outputs by position
    numbers = [int(re.findall(r"\d+", n)[0]) for n in ins]
    assert numbers == sorted(numbers) and sorted(set(numbers)) == list(range(layers))
    assert all(re.findall(r"\d+", o) == re.findall(r"\d+", i) for i, o in zip(ins, outs))
    concats = {cat.name for _, cat, _, _ in joins}
    assert len(concats) == 2 * layers
    src_kv = res.plan.source["kv_heads"]
    for i in model.graph.input:
        if i.name in pair:
            d = i.type.tensor_type.shape.dim[1]
            assert d.dim_value == (kv if src_kv > 1 else 1), (i.name, d)


_GENERATE = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch
from optimum.onnxruntime import ORTModelForCausalLM
ids = torch.tensor([[1, 5, 17, 33, 8, 90, 4, 61], [0, 0, 1, 44, 12, 7, 101, 3]])
mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
out = {}
for name, src, dst in json.loads(sys.argv[1]):
    res = {}
    for tag, folder in (("src", src), ("dst", dst)):
        try:
            m = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
            g = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24,
                           min_new_tokens=24, do_sample=False, pad_token_id=0)
            res[tag] = (g[:, ids.shape[1]:].tolist(),
                        m(input_ids=ids, attention_mask=mask).logits.detach().numpy())
        except Exception as exc:
            out[name] = {tag + "_error": " ".join(str(exc).split())[:400]}
            break
    if name in out:
        continue
    ref, got = res["src"][1], res["dst"][1]
    out[name] = {"src": res["src"][0], "dst": res["dst"][0],
                 "rel": float(np.abs(got - ref).max() / np.abs(ref).max())}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def generated(expanded):
    """One optimum subprocess for every expanded folder: name -> tokens and logits diff."""
    _require_optimum_python()
    jobs = [(n, str(OPTIMUM / n), str(v["folder"])) for n, v in expanded.items()
            if "refused" not in v]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([str(OPTIMUM_PY), "-c", _GENERATE, json.dumps(jobs)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_optimum_generates_the_same_tokens(expanded, generated, name):
    assert "refused" not in expanded[name], expanded[name].get("refused")
    g = generated[name]
    if "src_error" in g:  # optimum 0.1.0 sizes some families' caches by the query heads
        pytest.skip(f"optimum cannot run the source folder itself: {g['src_error'][:200]}")
    assert "dst_error" not in g, g
    assert len(g["src"][0]) == 24 and len(g["src"]) == 2
    assert g["dst"] == g["src"]
    assert g["rel"] <= 1e-3


# --------------------------------------------------------------------------- broken caches
def _broken(src: Path, kind: str, out: Path) -> Path:
    """The expanded model with its cache broken: a twin's present output dropped, or one KV
    head sliced off a present output (a source layer's, or a twin's)."""
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    joins = {out_.name: v.name for v, _, out_, _ in
             find_joins(__import__("onnx_ir").serde.deserialize_model(m).graph)}
    outs = [o.name for o in g.output if o.name in joins]
    name = outs[2] if kind == "drop" else (outs[1] if kind == "head-source" else outs[3])
    o = next(x for x in g.output if x.name == name)
    if kind == "drop":
        g.output.remove(o)
    else:
        for n in g.node:
            for seq in (n.input, n.output):
                for i, y in enumerate(seq):
                    if y == name:
                        seq[i] = name + "_whole"
        g.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), f"cut_{k}")
                             for k, v in (("s", 0), ("e", -1), ("a", 1)))
        g.node.append(helper.make_node("Slice", [name + "_whole", "cut_s", "cut_e", "cut_a"],
                                       [name]))
        o.type.tensor_type.shape.dim[1].dim_value -= 1
    onnx.save(m, str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["drop", "head-source", "head-twin"])
def test_broken_cache_fails_with_exit_1(expanded, tmp_path, kind):
    name = "llama-gen"
    if name not in expanded or "refused" in expanded[name]:
        pytest.skip("llama-gen not expanded")
    big = _broken(expanded[name]["folder"] / "model.onnx", kind, tmp_path / f"{kind}.onnx")
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "lemon_onnx", "verify",
                          str(OPTIMUM / name / "model.onnx"), str(big), "--report", str(report)],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 1, run.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert not rep["passed"] and rep["decoding"]["ran"]
    steps = rep["decoding"]["steps"]
    failed = [s["step"] for s in steps if not all(o["passed"] for o in s["outputs"])]
    assert failed and failed[-1] == len(steps) - 1  # decoding from its own cache fails
    if kind == "head-source":  # the source layer's cache is compared in the plain runs too
        assert any(o["caught_by"] == "shape" for c in rep["cases"] for o in c["outputs"])


@pytest.mark.slow
def test_verify_a_decoder_pair_reports_each_step(expanded, tmp_path):
    name = "gpt2-gen"
    if name not in expanded or "refused" in expanded[name]:
        pytest.skip("gpt2-gen not expanded")
    rep = lemon_onnx.verify(OPTIMUM / name / "model.onnx",
                            expanded[name]["folder"] / "model.onnx", float64="off")
    assert rep.passed and rep.decoding["ran"] and not rep.decoding["float64"]
    text = rep.format()
    for k in range(1, len(rep.decoding["steps"])):
        assert f"step {k}: 1 new token(s)" in text
    assert "cached decoding 3 steps ok" in rep.summary()
    assert json.loads(rep.to_json())["decoding"]["steps"][3]["attended"] == \
        json.loads(rep.to_json())["decoding"]["steps"][0]["attended"] + 3


# --------------------------------------------------------------------------- small pieces
def test_positions_follow_the_mask_as_generation_derives_them():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert positions_from_mask(mask, 4).tolist() == [[0, 1, 2, 3], [1, 1, 0, 1]]
    assert positions_from_mask(mask, 1).tolist() == [[3], [1]]


def test_a_dim_that_is_a_sum_is_the_sum_of_its_terms():
    import onnx_ir as ir

    x = ir.Value(name="m", shape=ir.Shape(["b", "past + seq"]), type=ir.TensorType(ir.DataType.INT64))
    model = ir.Model(ir.Graph([x], [], nodes=[]), ir_version=8)
    assert _with_sums(model, {"past": 3, "seq": 4})["past + seq"] == 7
    assert "past + seq" not in _with_sums(model, {"seq": 4})  # a term nothing sizes: unknown


def test_cache_names_follow_the_layer_number_in_their_own_style():
    rename = _style([("past_key_values.0.key", 0), ("past_key_values.1.key", 1)])
    assert rename("past_key_values.1.key", 5) == "past_key_values.5.key"
    one_based = _style([("cache.1.k", 0), ("cache.2.k", 1)])  # numbered from 1
    assert one_based("cache.2.k", 3) == "cache.4.k"
    with pytest.raises(PlanError, match="no number in their names counts the layers"):
        _style([("k_cache_a", 0), ("k_cache_b", 1)])


def test_chained_plans_compose_cache_maps():
    """Two expansions of a decoder: the final cache of source layer 1 is found under its last
    name, its KV heads taken by the composed index; a twin's input stays zeros."""
    first = Plan(source={"hidden": 8, "ffn": 16, "heads": 2, "kv_heads": 2, "layers": 2},
                 target={"hidden": 12, "ffn": 24, "heads": 3, "kv_heads": 3, "layers": 4},
                 stream_form="zero", seed=0, blocks={"0": 1, "1": 3},
                 outputs={"present.1.key": {"compare": "take", "axis": 1, "index": [0, 1, 0],
                                            "name": "present.2.key"}},
                 inputs={"past.2": {"from": "past.1", "axis": 1, "index": [0, 1, 0]},
                         "past.1": {"from": "past.0", "axis": 1, "index": [0, 1, 0],
                                    "zeros": True}})
    step = Plan(source=dict(first.target), target={**first.target, "heads": 6, "kv_heads": 6},
                stream_form="copies", seed=0, blocks={str(i): i for i in range(4)},
                outputs={"present.2.key": {"compare": "take", "axis": 1,
                                           "index": [0, 1, 2, 0, 1, 2]}},
                inputs={"past.2": {"from": "past.2", "axis": 1, "index": [0, 1, 2, 0, 1, 2]},
                        "past.1": {"from": "past.1", "axis": 1, "index": [0, 1, 2, 0, 1, 2]}})
    prev = json.loads(first.to_json())
    both = chained(prev, step)
    assert both.outputs["present.1.key"] == {"compare": "take", "axis": 1,
                                             "index": [0, 1, 0, 0, 1, 0],
                                             "name": "present.2.key"}
    assert both.inputs["past.2"] == {"from": "past.1", "axis": 1, "index": [0, 1, 0, 0, 1, 0]}
    assert both.inputs["past.1"]["zeros"] and both.inputs["past.1"]["from"] == "past.0"


@pytest.mark.slow
def test_blockwise_verification_decodes_segment_by_segment(expanded):
    """Models too big for memory are verified segment by segment; the cached decoding check
    then runs each step as a pass through every segment, with the same figures."""
    name = "llama-gen"
    if name not in expanded or "refused" in expanded[name]:
        pytest.skip("llama-gen not expanded")
    big = expanded[name]["folder"] / "model.onnx"
    whole = lemon_onnx.verify(OPTIMUM / name / "model.onnx", big)
    parts = lemon_onnx.verify(OPTIMUM / name / "model.onnx", big, blockwise=True)
    assert parts.passed and parts.decoding["ran"] and parts.decoding["float64"]
    for a, b in zip(whole.decoding["steps"], parts.decoding["steps"]):
        assert [o.error for o in a["outputs"]] == pytest.approx([o.error for o in b["outputs"]],
                                                               rel=1e-3, abs=1e-9)

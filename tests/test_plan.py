"""Target sizes and refusals (pure planning, on recognised fixtures)."""
import pytest

from lemon_onnx import io
from lemon_onnx.errors import PlanError
from lemon_onnx.plan import Plan, make_plan
from lemon_onnx.recognize import recognize
from conftest import FIXTURES

_cache = {}


def desc(name):
    if name not in _cache:
        _cache[name] = recognize(io.load(FIXTURES / name))
    return _cache[name]


@pytest.mark.parametrize("name,kw,expect", [
    ("gpt2-ts17.onnx", dict(width=1.5), dict(hidden=96, ffn=384, heads=12, kv_heads=12, form="avg")),
    ("gpt2-ts17.onnx", dict(width=2), dict(hidden=128, ffn=512, heads=16, kv_heads=16, form="copies")),
    ("gpt2-ts17.onnx", dict(heads=12), dict(hidden=96, ffn=384, heads=12, kv_heads=12, form="avg")),
    ("llama-ts17.onnx", dict(width=1.25), dict(hidden=80, ffn=120, heads=10, kv_heads=5, form="zero")),
    ("llama-ts17.onnx", dict(hidden=96), dict(hidden=96, ffn=144, heads=12, kv_heads=6, form="zero")),
    ("llama-ts17.onnx", dict(ffn=200), dict(hidden=64, ffn=200, heads=8, kv_heads=4, form="copies")),
    ("bert-ts17.onnx", dict(width=3), dict(hidden=192, ffn=384, heads=12, kv_heads=12, form="copies")),
])
def test_targets(name, kw, expect):
    p = make_plan(desc(name), **kw)
    got = {k: p.target[k] for k in ("hidden", "ffn", "heads", "kv_heads")}
    got["form"] = p.stream_form
    assert got == expect
    assert Plan.from_json(p.to_json()) == p


@pytest.mark.parametrize("name,kw,needles", [
    ("bert-ts17.onnx", dict(width=1.5), ["Post-LN", "128 or 192"]),
    ("gpt2-ts17.onnx", dict(width=1.1), ["8.8 attention heads", "1.125 (9 heads)"]),
    ("gpt2-ts17.onnx", dict(hidden=100), ["multiple of head_dim 8", "96 or 104"]),
    ("llama-ts17.onnx", dict(heads=9, hidden=72, ffn=96), ["multiple of 2", "8 or 10"]),
    ("llama-ts17.onnx", dict(width=0.5), ["shrink"]),
    ("llama-ts17.onnx", dict(depth=1.25), ["2.5 layers", "--layers 2 or 3"]),
    ("llama-ts17.onnx", dict(layers=1), ["fewer"]),
    ("gpt2-ts17.onnx", dict(width=2, hidden=128), ["cannot be combined"]),
])
def test_refusals_name_the_nearest_valid_choice(name, kw, needles):
    with pytest.raises(PlanError) as e:
        make_plan(desc(name), **kw)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert e.value.exit_code == 2


def test_depth_targets():
    p = make_plan(desc("llama-ts17.onnx"), depth=3)
    assert p.target["layers"] == 6 and p.depth_placement == "interleave" and p.depth_init == "cancel"
    p = make_plan(desc("llama-ts17.onnx"), layers=3, placement="top", depth_init="zero")
    assert (p.target["layers"], p.depth_placement, p.depth_init) == (3, "top", "zero")

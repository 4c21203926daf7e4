"""Target sizes and refusals (pure planning, on recognised fixtures)."""
import re

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
    ("bert-ts17.onnx", dict(width=1.5), ["Post-LN", "--width 2 (hidden 128", "--width 3 (hidden 192"]),
    ("gpt2-ts17.onnx", dict(width=1.1), ["8.8 attention heads", "--width 1.125 (hidden 72, ffn 288, 9 heads)",
                                         "--heads 9"]),
    ("gpt2-ts17.onnx", dict(hidden=100), ["multiple of head_dim 8", "--hidden 96", "--hidden 104"]),
    ("llama-ts17.onnx", dict(heads=9, hidden=72, ffn=96), ["multiple of 2", "--heads 10 without --hidden",
                                                           "--hidden 80 without --heads"]),
    ("llama-ts17.onnx", dict(width=0.5), ["shrink", "--width 1.25"]),
    ("llama-ts17.onnx", dict(depth=1.25), ["2.5 layers", "--depth 1.5 (3 layers)", "--layers 3"]),
    ("llama-ts17.onnx", dict(layers=1), ["fewer", "--layers 3"]),
    ("gpt2-ts17.onnx", dict(width=2, hidden=128), ["cannot be combined"]),
    # the two cases: advice that the planner itself refuses, and a flag never given
    ("bert-ts17.onnx", dict(width=1.3), ["5.2 attention heads", "--width 2", "--heads 8"]),
    ("gpt2-ts17.onnx", dict(heads=7), ["--heads 7 is smaller than the model's 8", "--heads 9"]),
])
def test_refusals_name_the_nearest_valid_choice(name, kw, needles):
    with pytest.raises(PlanError) as e:
        make_plan(desc(name), **kw)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert e.value.exit_code == 2


_FLAG = re.compile(r"--(width|hidden|ffn|heads|depth|layers) ([0-9.]+)( without ((?:--\w+/?)+))?")


@pytest.mark.parametrize("name", ["bert-ts17.onnx", "gpt2-ts17.onnx", "llama-ts17.onnx",
                                  "llama-dy18-g3tied.onnx", "llama-ts17-mqa.onnx"])
@pytest.mark.parametrize("kw", [dict(width=1.3), dict(width=1.5), dict(width=1.1), dict(width=0.9),
                                dict(heads=7), dict(heads=9), dict(hidden=70), dict(hidden=100),
                                dict(heads=9, hidden=72, ffn=96), dict(ffn=50), dict(depth=1.25),
                                dict(depth=1.3), dict(layers=1)])
def test_every_suggestion_is_accepted(name, kw):
    """Advice is only advice if following it works: replan every suggested flag set."""
    try:
        make_plan(desc(name), **kw)
        return
    except PlanError as e:
        hint = e.hint or ""
    assert "--hidden 56" not in hint or "hidden" in kw
    for m in _FLAG.finditer(hint):
        flag, value, dropped = m.group(1), float(m.group(2)), m.group(4) or ""
        trial = {k: v for k, v in kw.items() if f"--{k}" not in dropped and k != flag}
        exclusive = {"width": {"hidden", "ffn", "heads"}, "depth": {"layers"}, "layers": {"depth"}}
        trial = {k: v for k, v in trial.items() if k not in exclusive.get(flag, set())
                 and not (k == "width" and flag in ("hidden", "ffn", "heads"))}
        trial[flag] = value if flag in ("width", "depth") else int(value)
        make_plan(desc(name), **trial)  # raises if the advice was wrong


def test_depth_targets():
    p = make_plan(desc("llama-ts17.onnx"), depth=3)
    assert p.target["layers"] == 6 and p.depth_placement == "interleave" and p.depth_init == "cancel"
    p = make_plan(desc("llama-ts17.onnx"), layers=3, placement="top", depth_init="zero")
    assert (p.target["layers"], p.depth_placement, p.depth_init) == (3, "top", "zero")

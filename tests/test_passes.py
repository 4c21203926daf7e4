"""The rewrite passes under onnx-ir's pass contract: options when built, the model in
``call``, composed by ``PassManager``; what they share travels with the model
(``lemon_onnx/passes/recognition.py``).  Checked against ONNX Runtime runs of the source."""
import numpy as np
import onnx_ir as ir
import pytest

from conftest import FIXTURES, load_cases, run_ort
from lemon_onnx import io
from lemon_onnx.passes.depth import DepthPass
from lemon_onnx.passes.maps import Maps
from lemon_onnx.passes.recognition import (RecognizePass, Recorded, recognized, remember,
                                           results)
from lemon_onnx.passes.width import WidthPass
from lemon_onnx.plan import make_plan
from lemon_onnx.recognize import Recognizer

SRC = FIXTURES / "llama-ts17.onnx"


def _recognised():
    model = io.load(SRC)
    rec = Recognizer(model)
    return model, rec, rec.run()


def test_a_pass_manager_composes_width_and_depth(tmp_path):
    """Built from the plan alone, run by onnx-ir's PassManager on a model that carries its
    recognition: the result computes what the source computes (the stream's first d
    features, the logits whole)."""
    model, rec, desc = _recognised()
    plan = make_plan(desc, width=2, depth=2)
    maps = Maps.of(plan, desc.layout)
    remember(model, rec, desc)
    ir.passes.PassManager([Recorded("width", WidthPass(plan, maps)),
                           RecognizePass(after="width"),
                           Recorded("depth", DepthPass(plan, maps))])(model)
    done = results(model)
    assert set(done) == {"width", "depth"} and done["width"].modified and done["depth"].modified
    assert done["depth"].layer_sources == [0, 0, 1, 1]
    out = io.save(model, tmp_path / "big.onnx")
    case = load_cases(str(SRC).replace(".onnx", ".npz"))[0]
    small, big = run_ort(SRC, case["in"]), run_ort(out, case["in"])
    for name, want in small.items():
        got = big[name]
        if got.shape != want.shape:  # a hidden-state output: the source's features first
            got = got[..., :want.shape[-1]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1, np.abs(want).max()))


@pytest.mark.parametrize("make", [lambda p, m: WidthPass(p, m), lambda p, m: DepthPass(p, m)],
                         ids=["width", "depth"])
def test_a_pass_refuses_a_model_that_carries_no_recognition(make):
    model, rec, desc = _recognised()
    plan = make_plan(desc, width=2, depth=2)
    with pytest.raises(ir.passes.PreconditionError, match="recognised first"):
        make(plan, Maps.of(plan, desc.layout))(model)
    other, _, _ = _recognised()
    remember(other, rec, desc)  # a recognition of another model object
    with pytest.raises(ir.passes.PreconditionError):
        recognized(other, "test")


def test_the_second_recognition_runs_only_after_copies():
    model, rec, desc = _recognised()
    remember(model, rec, desc)
    assert not RecognizePass(after="width")(model).modified  # no width result: nothing to do
    assert recognized(model, "test")[0] is rec
    RecognizePass()(model)
    assert recognized(model, "test")[0] is not rec


def test_roles_travel_in_the_description_and_nowhere_else():
    """The components name what size each atom is in the recognition's role table, which the
    description carries (``desc.roles``); an atom has no role of its own to write.  The width
    pass lays axes out by the description's table: handed a description whose table is empty,
    it refuses (exit 2) instead of finding roles elsewhere."""
    import dataclasses

    from lemon_onnx import dims
    from lemon_onnx.errors import PlanError

    model, rec, desc = _recognised()
    assert desc.roles is rec.roles and "roles" not in desc.to_dict()
    tok = rec.values[desc.embeddings.token]
    assert [desc.roles.label(dims.leaves(a)) for a in rec.ax.axes[tok]] == ["vocab", "hidden"]
    b = desc.blocks[0]

    def last_axis(lin):
        return desc.roles.label(dims.leaves(rec.ax.axes[rec.values[lin.output]][-1]))

    assert (desc.heads, desc.kv_heads) == (8, 4)  # GQA: the groups are named apart
    assert last_axis(b.attention.q) == "kv_heads*kv_groups*head_dim[0]*head_dim[1]"
    assert last_axis(b.attention.k) == "kv_heads*head_dim[0]*head_dim[1]"
    assert (last_axis(b.mlp.up), last_axis(b.mlp.down)) == ("ffn", "hidden")
    atom = dims.leaves(rec.ax.axes[tok][0])[0]
    with pytest.raises(AttributeError):
        atom.role = "heads"  # atoms hold no role
    plan = make_plan(desc, width=2, depth=2)
    remember(model, rec, dataclasses.replace(desc, roles=dims.Roles()))
    with pytest.raises(ir.passes.PassError) as got:
        ir.passes.PassManager([WidthPass(plan, Maps.of(plan, desc.layout))])(model)
    cause = got.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, PlanError) and "embed_tokens" in str(cause), cause


def test_a_role_named_before_a_later_unification_is_caught():
    """Roles are looked up through an atom's representative, so naming must come after the
    axis analysis's last unification; ``Roles.check`` (run where the description is made)
    refuses a table whose named atom was unified away, instead of losing its role."""
    from lemon_onnx import dims
    from lemon_onnx.dims.atoms import Atom, union

    roles = dims.Roles()
    a, b = Atom(64), Atom(64)
    roles.name(b, "hidden")
    roles.check()  # fine: b is its own representative
    assert roles.of(b) == "hidden" and roles.of(a) is None
    union(a, b)  # b now hangs under a: a lookup through find() no longer sees b's entry
    assert roles.of(b) is None
    with pytest.raises(RuntimeError, match="'hidden'"):
        roles.check()

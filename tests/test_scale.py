"""Scale (issue 12): the up-front estimate and its refusal, blockwise verification, external
data in and out.  Timing targets live in benchmarks/bench_scale.py, not here."""

import numpy as np
import onnx
import pytest

from lemon_onnx import estimate, io
from lemon_onnx.expansion import expand
from lemon_onnx.recognize import recognize
from lemon_onnx.verification import verify
from conftest import FIXTURES, assert_equivalent, load_cases, run_cli, run_ort


# --------------------------------------------------------------------------- estimate
def test_absurd_expansion_is_refused_at_once_with_the_figures(tmp_path):
    out = tmp_path / "huge.onnx"
    # (factors above 64 are refused before the model is read: tests/test_hostile.py)
    res = run_cli("expand", FIXTURES / "gpt2-ts17.onnx", "-o", out, "--hidden", "1048576",
                  "--layers", "1000")
    assert res.returncode == 2, res.stderr
    assert "--hidden 1048576 --layers 1000 cannot be done on this machine" in res.stderr
    assert "TB" in res.stderr and "free" in res.stderr  # the figures, not just a refusal
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_estimate_of_output_bytes_matches_what_is_written(tmp_path):
    """The estimate is within 2% of the bytes the expansion really writes (it counted the
    vocabulary twice for a head stored as its own copy: 5% over on these, 25% on GPT-2
    small)."""
    from lemon_onnx.expansion import _prepare
    from lemon_onnx.progress import Progress

    # a tied head stored as its own transposed copy (TorchScript) and one reading the token
    # table itself (dynamo): only the second gets a new table when widening unties it
    for name, kw in (("gpt2-ts17.onnx", dict(width=2, depth=2)),
                     ("gpt2-dy18.onnx", dict(width=2, depth=2)),
                     ("llama-ts17.onnx", dict(width=1.5, depth=1.5))):
        model, _, desc, plan = _prepare(FIXTURES / name, width=kw["width"], depth=kw["depth"],
                                        hidden=None, ffn=None, heads=None, layers=None,
                                        placement="interleave", depth_init="cancel", seed=0,
                                        keep_tie=False, progress=Progress(0))
        est = estimate.estimate(desc, plan, model, src=FIXTURES / name, dest=tmp_path / "x")
        out = expand(FIXTURES / name, tmp_path / name, verify=False, **kw).output
        written = io.tensor_bytes(io.load(out))
        assert abs(est.output_bytes - written) <= 0.02 * written, (name, est.output_bytes, written)


def test_refusal_when_the_disk_is_too_small(tmp_path, monkeypatch):
    from lemon_onnx.errors import ResourceError

    monkeypatch.setattr(estimate, "free_disk", lambda path: 1000)
    with pytest.raises(ResourceError) as exc:
        expand(FIXTURES / "gpt2-ts17.onnx", tmp_path / "out.onnx", width=2)
    assert exc.value.exit_code == 2
    assert "destination's file system has 0.0 GB free" in str(exc.value)
    assert not (tmp_path / "out.onnx").exists()


# --------------------------------------------------------------------------- blockwise
@pytest.mark.parametrize("name,kw", [("gpt2-ts17.onnx", dict(width=1.5, depth=2)),
                                     ("llama-ts17.onnx", dict(width=1.5, depth=2)),
                                     ("bert-ts17.onnx", dict(width=2, depth=2))])
def test_blockwise_verification_passes_and_reproduces_ort(tmp_path, name, kw):
    out = expand(FIXTURES / name, tmp_path / name, verify=False, **kw).output
    cases = [c["in"] for c in load_cases(FIXTURES / name.replace(".onnx", ".npz"))]
    rep = verify(FIXTURES / name, out, inputs=cases, blockwise=True)
    assert rep.passed, rep.format()
    assert any("blockwise" in n for n in rep.notes)
    # every block compared: small block i against its place in the big model
    assert [r["block"] for r in rep.layerwise] == list(range(recognize(io.load(
        FIXTURES / name)).num_layers))
    assert rep.first_divergent_block is None
    # the blockwise run of the source gives ONNX Runtime's whole-model numbers
    for case, rcase in zip(cases, rep.cases):
        ref = run_ort(FIXTURES / name, case)
        for o in rcase["outputs"]:
            assert o.max_abs <= 1e-4 * max(1.0, float(np.abs(ref[o.name]).max()))


def test_blockwise_verification_catches_a_corrupted_weight(tmp_path):
    name = "llama-ts17.onnx"
    out = expand(FIXTURES / name, tmp_path / "big.onnx", verify=False, width=2, depth=2).output
    m = onnx.load(str(out))
    big_desc = recognize(io.load(out))
    target = big_desc.blocks[2].mlp.down.weight  # a block after the first
    for t in m.graph.initializer:
        if t.name == target:
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[0, 0] += 0.5
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    rep = verify(FIXTURES / name, bad, blockwise=True)
    assert not rep.passed
    assert rep.first_divergent_block is not None
    res = run_cli("verify", FIXTURES / name, bad, "--blockwise")
    assert res.returncode == 1, res.stderr


@pytest.mark.parametrize("name,kw", [("gpt2-ts17.onnx", dict(width=1.5, depth=2)),
                                     ("llama-ts17.onnx", dict(width=2, depth=2))])
def test_blockwise_float64_level_gives_the_whole_models_figures(tmp_path, name, kw):
    """The float64 level block by block (float64 copies of each segment, float64 hidden
    states handed on) finds the whole-model float64 difference, and decides with the
    relative rule instead of the fallback bound."""
    out = expand(FIXTURES / name, tmp_path / name, verify=False, **kw).output
    cases = [c["in"] for c in load_cases(FIXTURES / name.replace(".onnx", ".npz"))]
    whole = verify(FIXTURES / name, out, inputs=cases, float64="on")
    block = verify(FIXTURES / name, out, inputs=cases, float64="on", blockwise=True)
    assert whole.passed and block.passed, block.format()
    assert block.levels["float64"]["ran"] and block.levels["dtype"]["rule"] == "relative"
    for cw, cb in zip(whole.cases, block.cases):
        for ow, ob in zip(cw["outputs"], cb["outputs"]):
            assert ob.alg_max_abs is not None
            assert abs(ob.alg_max_abs - ow.alg_max_abs) <= 1e-12 * ow.ref_max + 1e-300, ob.name
            assert ob.own_error == pytest.approx(ow.own_error, rel=1e-6, abs=1e-12)
    # every block's hidden state is compared in float64 too
    assert all(r["alg_rel"] is not None and r["alg_passed"] for r in block.layerwise)


def test_blockwise_float64_level_catches_what_the_fallback_bound_lets_through(tmp_path):
    """A weight off by 2e-4 of itself in one block moves the outputs by less than the
    fallback bound (256 epsilons of max|output|), so the dtype level alone passes it; the
    float64 level, block by block, does not, and names the block."""
    name = "llama-ts17.onnx"
    out = expand(FIXTURES / name, tmp_path / "big.onnx", verify=False, width=2, depth=2).output
    m = onnx.load(str(out))
    target = recognize(io.load(out)).blocks[2].mlp.down.weight
    for t in m.graph.initializer:
        if t.name == target:
            arr = onnx.numpy_helper.to_array(t).copy()
            k = np.unravel_index(np.argmax(np.abs(arr)), arr.shape)
            arr[k] *= 1 + 2e-4
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    off = verify(FIXTURES / name, bad, blockwise=True, float64="off")
    assert off.passed, "the corruption must be below the fallback bound for this test to mean"
    rep = verify(FIXTURES / name, bad, blockwise=True, float64="on")
    assert not rep.passed
    assert any(o.caught_by and "float64" in o.caught_by for c in rep.cases
               for o in c["outputs"])
    assert rep.first_divergent_block is not None


def test_blockwise_float64_is_skipped_when_a_segment_would_not_fit(tmp_path, monkeypatch):
    from lemon_onnx.verification import blockwise

    out = expand(FIXTURES / "gpt2-ts17.onnx", tmp_path / "big.onnx", verify=False,
                 width=2).output
    monkeypatch.setattr(blockwise, "available_memory", lambda: 10_000)
    rep = verify(FIXTURES / "gpt2-ts17.onnx", out, blockwise=True)
    assert rep.passed and not rep.levels["float64"]["ran"]
    assert rep.levels["dtype"]["rule"] == "fallback"
    assert any("float64 level skipped: a float64 segment needs" in n for n in rep.notes)


def test_blockwise_is_chosen_when_the_whole_models_do_not_fit(tmp_path, monkeypatch):
    from lemon_onnx.verification import core

    out = expand(FIXTURES / "gpt2-ts17.onnx", tmp_path / "big.onnx", verify=False,
                 width=2).output
    monkeypatch.setattr(core, "_available_memory", lambda: 10_000)
    rep = verify(FIXTURES / "gpt2-ts17.onnx", out)
    assert rep.passed and any("blockwise: the whole models would need" in n for n in rep.notes)


# --------------------------------------------------------------------------- external data
def _external(src, dest, one_file: bool):
    m = onnx.load(str(src))
    onnx.save(m, str(dest), save_as_external_data=True, all_tensors_to_one_file=one_file,
              location=dest.name + ".data" if one_file else None, size_threshold=0)
    return dest


@pytest.mark.parametrize("one_file", [True, False], ids=["one-data-file", "file-per-tensor"])
def test_external_data_inputs_and_outputs(tmp_path, monkeypatch, one_file):
    name = "llama-ts17.onnx"
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = _external(FIXTURES / name, src_dir / name, one_file)
    n_files = len(list(src_dir.iterdir()))
    assert n_files == 2 if one_file else n_files > 10  # the model and its weights file(s)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the output were above 2 GB
    out = expand(src, tmp_path / "out" / "big.onnx", width=2, depth=2).output
    data = out.with_name(out.name + ".data")
    assert data.exists()
    proto = onnx.load(str(out), load_external_data=False)
    lengths = [int({e.key: e.value for e in t.external_data}["length"])
               for t in proto.graph.initializer if t.external_data]
    assert data.stat().st_size >= sum(lengths) and sum(lengths) == io.tensor_bytes(io.load(out))
    assert_equivalent(FIXTURES / name, out, load_cases(FIXTURES / name.replace(".onnx", ".npz")))
    rep = verify(src, out, blockwise=True)
    assert rep.passed, rep.format()


def test_weights_recognition_read_are_unmapped_after_describe(tmp_path):
    """A tied head is compared with the embedding table while recognising: those pages of the
    external data would stay resident through a whole blockwise verification (issue 12)."""
    import onnx_ir as ir

    from lemon_onnx.verification.models import as_ir, describe

    src = _external(FIXTURES / "gpt2-ts17.onnx", tmp_path / "gpt2.onnx", True)

    def mapped(m):
        return [n for n, v in m.graph.initializers.items()
                if isinstance(v.const_value, ir.ExternalTensor)
                and v.const_value._array is not None]

    bare, _ = as_ir(src)
    recognize(bare)
    assert mapped(bare)  # recognition does read some weights
    m, _ = as_ir(src)
    describe(m, {})
    assert mapped(m) == []

"""Issue 21: bad input is exit 2 and checked first; the float64 proof is never skipped in
silence; ONNX Runtime's own log lines never reach stderr raw."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import FIXTURES, ROOT

BERT = FIXTURES / "bert-ts17.onnx"
BERT_DY = FIXTURES / "bert-dy18.onnx"


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lemon_onnx", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_paragraph(res, code, *needles):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "onnxruntime:" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("lemon-onnx: error: ")]
    assert len(errors) == 1, res.stderr
    for n in needles:
        assert n.lower() in errors[0].lower(), errors[0]


# --------------------------------------------------------------------------- factors
@pytest.mark.parametrize("flags, needle", [
    (["--width", "nan"], "not a finite number"), (["--width", "inf"], "not a finite number"),
    (["--width", "-1"], "not a positive factor"), (["--width", "0"], "not a positive factor"),
    (["--depth", "nan"], "not a finite number"), (["--depth", "inf"], "not a finite number"),
    (["--depth", "0"], "not a positive factor"), (["--width", "1000"], "factors up to 64"),
    (["--width", "1e300"], "factors up to 64"), (["--layers", "0"], "not a positive size"),
    (["--hidden", "99999999999"], "sizes up to")])
def test_bad_factors_are_exit_2_before_any_work(tmp_path, flags, needle):
    # the source does not exist: the factor is refused before anything is read
    res = run_cli("expand", tmp_path / "missing.onnx", "-o", tmp_path / "x.onnx", *flags)
    one_paragraph(res, 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_bad_factors_through_the_api(tmp_path):
    import lemon_onnx

    for kw in ({"width": float("nan")}, {"depth": float("inf")}, {"width": -1.0},
               {"layers": 2.5}):
        with pytest.raises(lemon_onnx.LemonError) as e:
            lemon_onnx.expand(BERT, tmp_path / "x.onnx", **kw)
        assert e.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- external data
def _external_copy(folder, location_of=None):
    """The BERT fixture with its weights in one external file; ``location_of``: what the
    location fields say instead (the file itself stays as it was written)."""
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(BERT))
    onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    if location_of is not None:
        p = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        for t in p.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location_of
        onnx.save(p, str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "truncated"])
@pytest.mark.parametrize("verify", [True, False])
def test_external_data_outside_the_folder_is_exit_2(tmp_path, kind, verify):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(1 << 20))
    folder = tmp_path / "model"
    if kind == "absolute":
        src, needle = _external_copy(folder, str(secret)), "absolute path"
    elif kind == "dotdot":
        src, needle = _external_copy(folder, "../secret.bin"), "outside the model's folder"
    elif kind == "symlink":
        src = _external_copy(folder, "link.data")
        os.symlink(secret, folder / "link.data")
        needle = "symbolic link"
    else:
        src = _external_copy(folder)
        data = folder / "m.onnx.data"
        data.write_bytes(data.read_bytes()[:100_000])
        needle = "truncated"
    out = tmp_path / "out" / "x.onnx"
    res = run_cli("expand", src, "-o", out, "--width", "2",
                  *([] if verify else ["--no-verify"]))
    one_paragraph(res, 2, needle)
    assert not (tmp_path / "out").exists()
    if verify:
        one_paragraph(run_cli("verify", BERT, src), 2, needle)


def test_external_data_inside_the_folder_still_works(tmp_path):
    src = _external_copy(tmp_path / "model")
    sub = tmp_path / "model" / "weights"
    sub.mkdir()
    os.replace(tmp_path / "model" / "m.onnx.data", sub / "m.onnx.data")
    p = onnx.load(str(src), load_external_data=False)
    for t in p.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "weights/../weights/m.onnx.data"  # '..' that stays inside
    onnx.save(p, str(src))
    res = run_cli("expand", src, "-o", tmp_path / "x.onnx", "--width", "2")
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- paths
def test_report_in_a_missing_folder_is_refused_before_any_work(tmp_path):
    t = time.perf_counter()
    res = run_cli("expand", BERT, "-o", tmp_path / "x.onnx", "--width", "2",
                  "--report", tmp_path / "nope" / "r.json")
    one_paragraph(res, 2, "does not exist")
    assert "loaded" not in res.stderr  # nothing was loaded
    assert list(tmp_path.iterdir()) == []
    res = run_cli("verify", BERT, BERT, "--report", tmp_path / "nope" / "r.json")
    one_paragraph(res, 2, "does not exist")
    assert "compared" not in res.stderr
    assert time.perf_counter() - t < 60


def test_output_folder_is_created_and_said_and_the_report_names_it(tmp_path):
    out = tmp_path / "new" / "deeper" / "x.onnx"
    res = run_cli("expand", BERT, "-o", out, "--width", "2", "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    assert f"created the output's folder {tmp_path / 'new'}" in res.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["big"] == str(out) and rep["small"] == str(BERT)
    assert out.is_file()


def test_a_refused_expansion_leaves_no_folder_behind(tmp_path):
    # fractional width on a Post-LN model: refused after loading, before the save
    res = run_cli("expand", BERT, "-o", tmp_path / "new" / "x.onnx", "--width", "1.5")
    one_paragraph(res, 2, "post-ln")
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_source_is_bad_input_and_a_valid_one_the_runtime_cannot_load_exit_3(
        tmp_path):
    """A node that reads a tensor nobody makes: onnx.checker rejects the source, so it is
    exit 2 with the checker's reason; an operator of a domain ONNX Runtime does not know is a
    valid model this runtime cannot load: exit 3."""
    m = onnx.load(str(BERT))
    m.graph.node.append(onnx.helper.make_node("Identity", ["nobody_makes_this"], ["extra"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT,
                                                             None))
    onnx.save(m, str(tmp_path / "dangling.onnx"))
    res = run_cli("expand", tmp_path / "dangling.onnx", "-o", tmp_path / "o" / "x.onnx",
                  "--width", "2")
    one_paragraph(res, 2, "not a valid ONNX model", "nobody_makes_this")
    m = onnx.load(str(BERT))
    n = next(n for n in m.graph.node if n.op_type == "Softmax")
    n.domain = "com.example.foreign"
    m.opset_import.append(onnx.helper.make_opsetid("com.example.foreign", 1))
    onnx.save(m, str(tmp_path / "foreign.onnx"))
    res = run_cli("expand", tmp_path / "foreign.onnx", "-o", tmp_path / "o" / "x.onnx",
                  "--width", "2")
    one_paragraph(res, 3, "could not load")
    assert not (tmp_path / "o").exists()


def test_onnxruntime_log_lines_do_not_reach_stderr(tmp_path):
    ids = np.full((2, 5), 100000, dtype=np.int64)  # out of the vocabulary: Gather fails
    np.savez(tmp_path / "bad.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             token_type_ids=np.zeros_like(ids))
    res = run_cli("verify", BERT, BERT, "--inputs", tmp_path / "bad.npz")
    one_paragraph(res, 3, "out of data bounds")  # ONNX Runtime's text, folded into ours
    assert "\x1b[" not in res.stderr and "[E:" not in res.stderr


# --------------------------------------------------------------------------- float64 proof
def _changed_external(expanded, folder, threshold):
    """``expanded`` written back by onnx's own external-data writer, one element of a block
    weight (the first MatMul weight after the embeddings) changed by 1e-3."""
    m = onnx.load(str(expanded))
    inits = {t.name: t for t in m.graph.initializer}
    w = next(inits[n.input[1]] for n in m.graph.node
             if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2)
    a = numpy_helper.to_array(w).copy()
    a.flat[a.size // 2] += 1e-3
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    folder.mkdir()
    onnx.save(m, str(folder / "big.onnx"), save_as_external_data=True,
              size_threshold=threshold)
    return folder / "big.onnx"


@pytest.mark.parametrize("src, threshold", [(BERT, 1024), (BERT_DY, 1024), (BERT_DY, 256)])
def test_a_changed_weight_in_external_data_is_caught(tmp_path, src, threshold):
    """threshold 256 puts the int64 position_ids buffer into the data file too, as onnx's
    default 1024 does for a real BERT's [1, 512] buffer: the float64 copy must read it."""
    good = tmp_path / "good.onnx"
    # width 2: an exact plan (Post-LN depth is approximate by design, held to 1e-6)
    assert run_cli("expand", src, "-o", good, "--width", "2", "-q").returncode == 0
    big = _changed_external(good, tmp_path / "ext", threshold)
    res = run_cli("verify", src, big, "--report", tmp_path / "r.json")
    assert res.returncode == 1, res.stdout + res.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["levels"]["float64"]["ran"], rep["levels"]["float64"]
    levels = {p for c in rep["cases"] for o in c["outputs"]
              for p in (o["caught_by"] or "").split("+")}
    assert "float64" in levels, levels
    # unchanged, written the same way: passes with the float64 level
    m = onnx.load(str(good))
    (tmp_path / "ext2").mkdir()
    onnx.save(m, str(tmp_path / "ext2" / "big.onnx"), save_as_external_data=True,
              size_threshold=threshold)
    res = run_cli("verify", src, tmp_path / "ext2" / "big.onnx", "-q")
    assert res.returncode == 0 and "without the float64 proof" not in res.stdout, res.stdout


def test_blockwise_float64_runs_segments_onnxruntime_cannot_in_the_reference_evaluator(tmp_path):
    """Block by block, BERT's GELU (Erf) has no double kernel in ONNX Runtime: those segments
    run in onnx's reference evaluator, and the proof is there (the report names both engines)."""
    big = tmp_path / "big.onnx"
    assert run_cli("expand", BERT, "-o", big, "--width", "2", "-q").returncode == 0
    res = run_cli("verify", BERT, big, "--blockwise", "-q", "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    assert "without the float64 proof" not in res.stdout, res.stdout
    level = json.loads((tmp_path / "r.json").read_text())["levels"]["float64"]
    assert level["ran"] is True and "onnx.reference" in level["engine"], level
    # and the level decides: one weight element of the expanded model off by 1e-3
    changed = _changed_external(big, tmp_path / "ext", 1024)
    res = run_cli("verify", BERT, changed, "--blockwise", "--report", tmp_path / "r2.json")
    assert res.returncode == 1, res.stdout + res.stderr
    rep = json.loads((tmp_path / "r2.json").read_text())
    assert any("float64" in (o["caught_by"] or "") for c in rep["cases"] for o in c["outputs"])


def test_a_missing_float64_level_is_said_and_on_makes_it_exit_3(tmp_path, monkeypatch):
    """When no engine can run a float64 segment, the proof is missing: the verdict line and
    the JSON say so, --float64 on is exit 3 and writes nothing."""
    from click.testing import CliRunner

    from lemon_onnx import cli as cli_mod
    from lemon_onnx.errors import RuntimeFailure
    from lemon_onnx.verification import blockwise

    big = tmp_path / "big.onnx"
    assert run_cli("expand", BERT, "-o", big, "--width", "2", "-q").returncode == 0

    def neither(data, folder, label):
        raise RuntimeFailure(f"neither ONNX Runtime nor onnx's reference evaluator can run "
                             f"{label} in float64: Erf (simulated)")
    monkeypatch.setattr(blockwise, "_reference_segment", neither)

    def run(*args):
        return CliRunner().invoke(cli_mod.cli, [str(a) for a in args])
    res = run("verify", BERT, big, "--blockwise", "-q", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "PASS (without the float64 proof" in res.output.splitlines()[0]
    level = json.loads((tmp_path / "r.json").read_text())["levels"]["float64"]
    assert level["ran"] is False and "Erf" in level["why"]
    res = run("verify", BERT, big, "--blockwise", "--float64", "on")
    assert res.exit_code == 3 and "float64 level could not run" in res.output, res.output
    res = run("expand", BERT, "-o", tmp_path / "again.onnx", "--width", "2", "--blockwise",
              "--float64", "on")
    assert res.exit_code == 3 and "float64 level could not run" in res.output, res.output
    assert not (tmp_path / "again.onnx").exists()
    res = run("expand", BERT, "-o", tmp_path / "again.onnx", "--width", "2", "--blockwise")
    assert res.exit_code == 0 and "NO float64 proof" in res.output.splitlines()[-1], res.output


def test_a_float64_copy_too_big_for_memory_runs_one_segment_at_a_time(tmp_path, monkeypatch):
    """Whole-model verification whose float64 copies do not fit (simulated: the share they may
    take is made tiny) runs the float64 level segment by segment: the same figures as the
    whole copies, and a weight off by 1e-3 is still caught by it."""
    import lemon_onnx
    from lemon_onnx.verification import core

    big = tmp_path / "big.onnx"
    assert run_cli("expand", BERT, "-o", big, "--width", "2", "-q").returncode == 0
    whole = lemon_onnx.verify(BERT, big)
    monkeypatch.setattr(core, "FLOAT64_MEMORY_SHARE", 1e-12)
    seg = lemon_onnx.verify(BERT, big)
    assert seg.passed and seg.levels["float64"]["ran"] and seg.levels["float64"]["segments"]
    assert seg.float64_missing() is None
    for a, b in zip(whole.rows(), seg.rows()):
        assert a.alg_max_abs is not None and b.alg_max_abs is not None
        assert abs(a.alg_max_abs - b.alg_max_abs) <= 1e-12 + 1e-6 * abs(a.alg_max_abs)
    changed = _changed_external(big, tmp_path / "ext", 1024)
    bad = lemon_onnx.verify(BERT, changed)
    assert not bad.passed and "float64" in bad.caught_by(), bad.summary()
    assert bad.levels["float64"].get("segments"), bad.levels

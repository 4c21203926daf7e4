"""The contract pipelines rely on (issue 11): every exit code (0, 1, 2, 3, 4, 130) from the
command line and from the Python API, notes, chains of expansions, --report -, progress."""
import io as stdio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import lemon_onnx
from lemon_onnx import cli as cli_mod
from lemon_onnx.errors import (EXIT_CODES, InputError, InternalError, Interrupted, MismatchError,
                               PlanError, RuntimeFailure)
from lemon_onnx.passes import depth as depth_mod
from lemon_onnx.progress import Progress
from conftest import FIXTURES, ROOT

GPT2 = FIXTURES / "gpt2-ts17.onnx"
LLAMA = FIXTURES / "llama-ts17.onnx"


def lemon(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lemon_onnx", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def invoke(*args):
    """In-process (monkeypatches apply), through the same error handling as the console."""
    return CliRunner().invoke(cli_mod.cli, [str(a) for a in args])


def only(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# --------------------------------------------------------------------------- 0
def test_exit_0_api_result_and_notes(tmp_path):
    out = tmp_path / "wide.onnx"
    res = lemon_onnx.expand(GPT2, out, width=1.5, depth=2)
    assert isinstance(res, lemon_onnx.ExpandResult) and res.output == out and res.verified
    assert isinstance(res.verification, lemon_onnx.VerifyReport)
    assert res.plan.target["hidden"] == 96 and res.plan.target["layers"] == 4
    assert any("untied" in n for n in res.notes)  # the README example's architecture change
    assert any("start with all-zero output weights" in n for n in res.notes)
    assert "the tied head was untied" in res.summary()
    only(tmp_path, "wide.onnx")
    desc = lemon_onnx.inspect(out)
    assert isinstance(desc, lemon_onnx.ModelDescription) and desc.lemon_plan["notes"] == res.notes
    assert lemon_onnx.verify(GPT2, out).passed


def test_python_m_and_help_document_every_exit_code():
    assert lemon("--version").stdout.startswith("lemon-onnx, version")
    for cmd in ([], ["inspect"], ["expand"], ["verify"]):
        res = lemon(*cmd, "--help")
        assert res.returncode == 0
        text = " ".join(res.stdout.split())
        for code, what in EXIT_CODES.items():
            assert f"{code} {' '.join(what.split()[:4])}" in text, (cmd, code, text)


# --------------------------------------------------------------------------- 1
def test_exit_1_api_mismatch_writes_report_not_model(tmp_path, monkeypatch):
    from lemon_onnx import lemon_math

    real = lemon_math.expand_in
    monkeypatch.setattr(lemon_math, "expand_in",
                        lambda W, axis, m, **kw: (real(W, axis, m, **kw) * 1.01).astype(W.dtype))
    rep = tmp_path / "r.json"
    with pytest.raises(MismatchError) as e:
        lemon_onnx.expand(LLAMA, tmp_path / "bad.onnx", width=2, report=rep)
    assert e.value.exit_code == 1
    assert json.loads(rep.read_text())["passed"] is False
    only(tmp_path, "r.json")


# --------------------------------------------------------------------------- 2
def test_exit_2_refusals(tmp_path):
    with pytest.raises(PlanError) as e:  # the tied GPT-2 head would be untied
        lemon_onnx.expand(GPT2, tmp_path / "x.onnx", width=1.5, keep_tie=True)
    assert e.value.exit_code == 2 and "untie" in str(e.value) and "Drop --keep-tie" in str(e.value)
    res = lemon("expand", GPT2, "-o", tmp_path / "x.onnx", "--width", "2", "--keep-tie")
    assert res.returncode == 2 and "--keep-tie" in res.stderr and "Traceback" not in res.stderr
    # depth alone keeps the tie, as the refusal says
    assert lemon("expand", GPT2, "-o", tmp_path / "d.onnx", "--depth", "2", "--keep-tie",
                 "-q").returncode == 0
    res = lemon("expand", FIXTURES / "bert-ts17.onnx", "-o", tmp_path / "x.onnx", "--width", "1.3")
    assert res.returncode == 2 and "--width 2" in res.stderr and "1.25" not in res.stderr
    with pytest.raises(InputError):
        lemon_onnx.expand(GPT2, tmp_path / "x.onnx", width=2, placement="sideways")
    only(tmp_path, "d.onnx")


# --------------------------------------------------------------------------- 3
def _ir_version_99(path):
    m = onnx.load(str(GPT2))
    m.ir_version = 99  # lemon-onnx reads it; ONNX Runtime refuses to load it
    onnx.save(m, str(path))
    return path


def test_exit_3_source_ort_cannot_load_is_found_before_expanding(tmp_path):
    src = _ir_version_99(tmp_path / "m.onnx")
    res = lemon("expand", src, "-o", tmp_path / "x.onnx", "--width", "2", "--depth", "2")
    assert res.returncode == 3, res.stderr
    assert "source model" in res.stderr and "IR version" in res.stderr
    assert "width:" not in res.stderr and "depth:" not in res.stderr  # nothing was expanded
    only(tmp_path, "m.onnx")
    with pytest.raises(RuntimeFailure) as e:
        lemon_onnx.expand(src, tmp_path / "x.onnx", width=2)
    assert e.value.exit_code == 3


def test_exit_3_missing_provider_fails_at_once(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    res = lemon("expand", GPT2, "-o", tmp_path / "x.onnx", "--width", "2", "--provider", "cuda")
    assert res.returncode == 3 and "cuda" in res.stderr
    assert "width:" not in res.stderr and "saved" not in res.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4
def _corrupt_after_depth(monkeypatch, how):
    real = depth_mod.DepthPass._run

    def run(self):
        out = real(self)
        how(self.rec.model.graph)
        return out

    monkeypatch.setattr(depth_mod.DepthPass, "_run", run)


def _dangling_input(graph):
    """A bug that breaks the graph's structure: onnx.checker must reject the output."""
    node = next(n for n in graph if n.op_type == "MatMul")
    node.replace_input_with(0, ir.Value(name="lemon_bug_dangling"))


def _wrong_weight_shape(graph):
    """A bug onnx.checker does not see: one weight one row too tall, so ONNX Runtime fails."""
    for n in graph:
        w = n.inputs[1] if n.op_type == "MatMul" and len(n.inputs) > 1 else None
        if w is not None and w.is_initializer() and w.const_value is not None:
            a = w.const_value.numpy()
            w.const_value = ir.tensor(np.zeros((a.shape[0] + 1, a.shape[1]), a.dtype), name=w.name)
            w.shape = ir.Shape(w.const_value.shape)
            return
    raise AssertionError("no MatMul weight found")


@pytest.mark.parametrize("bug,needle", [(_dangling_input, "onnx.checker"),
                                        (_wrong_weight_shape, "while it runs the source")])
def test_exit_4_invalid_graph_is_a_bug_not_the_runtime(tmp_path, monkeypatch, bug, needle):
    _corrupt_after_depth(monkeypatch, bug)
    with pytest.raises(InternalError) as e:
        lemon_onnx.expand(LLAMA, tmp_path / "x.onnx", width=2, depth=2)
    assert e.value.exit_code == 4 and needle in str(e.value)
    assert "LEMON_ONNX_DEBUG=1" in str(e.value)
    res = invoke("expand", LLAMA, "-o", tmp_path / "x.onnx", "--depth", "2", "-q")
    assert res.exit_code == 4, res.output
    assert "bug in lemon-onnx" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_exit_4_unexpected_exception(tmp_path, monkeypatch):
    def boom(self):
        raise ValueError("an index went astray")

    monkeypatch.setattr(depth_mod.DepthPass, "_run", boom)
    with pytest.raises(InternalError) as e:
        lemon_onnx.expand(GPT2, tmp_path / "x.onnx", depth=2)
    assert "unexpected ValueError" in str(e.value) and isinstance(e.value.__cause__, ValueError)
    res = invoke("expand", GPT2, "-o", tmp_path / "x.onnx", "--depth", "2")
    assert res.exit_code == 4 and "LEMON_ONNX_DEBUG=1" in res.output
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 130
@pytest.fixture(autouse=True)
def _default_sigint():
    """A background job of a non-interactive shell starts with SIGINT ignored, and the API
    rightly leaves a caller's choice of handler alone; these tests are about the default
    (an interactive shell, CI), so they set it for themselves."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _sigint_self(*_a, **_k):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # the handler runs at the next instruction
    raise AssertionError("the handler did not interrupt")


@pytest.mark.parametrize("where", ["lemon_onnx.io.save", "lemon_onnx.expansion._check_graph",
                                   "lemon_onnx.expansion.write_report"])
def test_130_api_signal_during_a_stage(tmp_path, monkeypatch, where):
    monkeypatch.setattr(where, _sigint_self)
    with pytest.raises(Interrupted) as e:
        lemon_onnx.expand(GPT2, tmp_path / "out" / "x.onnx", width=2, report=tmp_path / "r.json")
    assert e.value.exit_code == 130 and e.value.signum == signal.SIGINT
    # no output, no temporary folder, and not the folder expand created for the output
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_130_when_a_library_turns_the_interrupt_into_another_error(tmp_path, monkeypatch):
    """What the issue saw: Ctrl-C during the runtime import surfaced as 'unexpected
    ImportError ... report it'.  A signal that came decides, whatever it became."""
    def import_runtime(src, provider):
        try:
            _sigint_self()
        except KeyboardInterrupt as e:
            raise ImportError("initialization of onnxruntime_pybind11_state raised") from e

    monkeypatch.setattr("lemon_onnx.expansion._source_runs", import_runtime)
    with pytest.raises(Interrupted):
        lemon_onnx.expand(GPT2, tmp_path / "x.onnx", width=2)
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_the_commit_waits_and_the_run_completes(tmp_path, monkeypatch):
    from lemon_onnx import expansion as expand_mod

    real = os.replace
    calls = []

    def replace(a, b):
        # the commit's first rename (paths compared resolved: a symlinked temporary folder
        # must not let the test pass without its signal)
        if os.path.realpath(os.path.dirname(b)) == os.path.realpath(tmp_path) and not calls:
            os.kill(os.getpid(), signal.SIGINT)  # mid-commit: deferred, then ignored
            calls.append(b)
        return real(a, b)

    monkeypatch.setattr(expand_mod.os, "replace", replace)
    res = lemon_onnx.expand(GPT2, tmp_path / "x.onnx", depth=2, verify=False)
    assert calls, "the signal was never sent: the commit's rename was not seen"
    assert res.output.exists()
    only(tmp_path, "x.onnx")


def _wait_and_signal(proc, delay, sig):
    time.sleep(delay)
    proc.send_signal(sig)
    return proc.communicate(timeout=300)


def test_130_sigint_at_random_moments_of_a_real_expansion(tmp_path):
    """The README's run, interrupted after random delays spread over the whole run (import of
    ONNX Runtime, recognition, passes, save, verification, the final renames): exit 130 with
    nothing at OUT and no temporary beside it, or exit 0 with the finished output.

    The first ~0.1 s (the interpreter starting, before lemon-onnx's first instruction can
    install its handlers) is left out: there Python's own default applies (it exits by the
    signal, which a shell reports as 130, and nothing has been written)."""
    args = [sys.executable, "-m", "lemon_onnx", "expand", str(GPT2), "--width", "1.5",
            "--depth", "2"]
    t0 = time.perf_counter()
    full = subprocess.run(args + ["-o", str(tmp_path / "full.onnx")], capture_output=True,
                          text=True, timeout=300)
    run_time = time.perf_counter() - t0
    assert full.returncode == 0, full.stderr
    seed = int(os.environ.get("LEMON_SIGINT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    delays = sorted(rng.uniform(0.1, run_time) for _ in range(8))
    outcomes = []
    for k, delay in enumerate(delays):
        folder = tmp_path / f"run{k}"
        folder.mkdir()
        out = folder / "out.onnx"
        proc = subprocess.Popen(args + ["-o", str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        sig = signal.SIGTERM if k == len(delays) - 1 else signal.SIGINT
        stdout, stderr = _wait_and_signal(proc, delay, sig)
        what = f"seed {seed}, delay {delay:.3f}s of {run_time:.2f}s, {sig.name}: {stderr}"
        assert proc.returncode in (0, 130), what
        assert "Traceback" not in stderr, what
        if proc.returncode == 130:
            assert "interrupted" in stderr and not stdout, what
            assert list(folder.iterdir()) == [], what
        else:
            assert stdout.startswith(f"wrote {out}"), what
            only(folder, "out.onnx")
        outcomes.append(proc.returncode)
    assert 130 in outcomes, f"seed {seed}: no run was interrupted ({delays})"


# --------------------------------------------------------------------------- chains
@pytest.mark.parametrize("src,first,second", [
    (LLAMA, ["--width", "1.5"], ["--width", "2", "--depth", "2"]),
    (GPT2, ["--depth", "2"], ["--width", "1.5", "--placement", "top", "--depth", "1.5"]),
])
def test_chained_expansion_verifies_against_the_original(tmp_path, src, first, second):
    mid, final = tmp_path / "mid.onnx", tmp_path / "final.onnx"
    assert lemon("expand", src, "-o", mid, *first, "-q").returncode == 0
    res = lemon("expand", mid, "-o", final, *second, "-q")
    assert res.returncode == 0, res.stderr
    assert "expansion 2 of a chain" in res.stdout
    for small, big in ((src, final), (src, mid)):
        res = lemon("verify", small, big, "--layerwise")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "first divergent block: none" in res.stdout
    plan = lemon_onnx.inspect(final).lemon_plan
    first_plan = lemon_onnx.inspect(mid).lemon_plan
    orig = lemon_onnx.inspect(src)
    assert plan["source"]["hidden"] == orig.hidden and plan["source"]["layers"] == orig.num_layers
    del first_plan["chain"]  # chain entries do not repeat the chain before them
    assert plan["chain"] == [first_plan] and plan["source_sha256"] == first_plan["source_sha256"]
    assert sorted(plan["blocks"]) == [str(i) for i in range(orig.num_layers)]
    assert "2 expansions in a chain" in lemon("inspect", final).stdout


# --------------------------------------------------------------------------- reports, progress
def test_report_dash_puts_json_on_stdout_and_text_on_stderr(tmp_path):
    out = tmp_path / "w.onnx"
    res = lemon("expand", GPT2, "-o", out, "--width", "2", "--report", "-", "--atol", "1e-3",
                "--layerwise")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["passed"] and rep["atol"] == 1e-3 and rep["layerwise"]
    assert f"wrote {out}" in res.stderr
    res = lemon("verify", GPT2, out, "--report", "-", "--rtol", "1e-2")
    assert res.returncode == 0 and json.loads(res.stdout)["rtol"] == 1e-2
    assert "PASS" in res.stderr
    only(tmp_path, "w.onnx")


def test_expand_forwards_inputs_to_the_check(tmp_path):
    inputs = FIXTURES / "gpt2-ts17.npz"  # the fixture's own reference cases
    res = lemon_onnx.expand(GPT2, tmp_path / "w.onnx", width=2, inputs=inputs, rtol=1e-2)
    assert res.verification.rtol == 1e-2
    assert any(f"from {inputs}" in n for n in res.verification.notes)


def test_quiet_prints_only_the_result(tmp_path):
    res = lemon("expand", GPT2, "-o", tmp_path / "w.onnx", "--width", "1.5", "-q")
    assert res.returncode == 0 and res.stderr == ""
    assert "the tied head was untied" in res.stdout  # the final line still summarises notes
    res = lemon("verify", GPT2, tmp_path / "w.onnx", "-q")
    assert res.returncode == 0 and res.stdout.count("\n") == 1 and res.stderr == ""


class _Tty(stdio.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream,bar", [(_Tty(), True), (stdio.StringIO(), False)])
def test_progress_bar_on_a_terminal_plain_lines_elsewhere(stream, bar):
    p = Progress(1, stream=stream, total=2)
    with p:
        with p.stage("load") as st:
            st.summary = "loaded it"
        with p.stage("save") as st:
            st.summary = "saved it"
        p.note("the head was untied")
    text = stream.getvalue()
    assert ("stages" in text) == bar and ("lemon-onnx: loaded it" in text) != bar
    assert "lemon-onnx: note: the head was untied" in text
    quiet = stdio.StringIO()
    with Progress(0, stream=quiet) as p, p.stage("load") as st:
        st.summary = "x"
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- README
def test_readme_python_section_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    # the section's blocks (the hand-off's training snippets run in test_handoff.py)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's Python section has a python block"
    (tmp_path / "models" / "fixtures").mkdir(parents=True)
    (tmp_path / "models" / "fixtures" / GPT2.name).write_bytes(GPT2.read_bytes())
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})

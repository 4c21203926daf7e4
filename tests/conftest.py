import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# no network in tests: transformers and huggingface_hub never ask a hub (a path that does not
# exist would otherwise be retried as a repository name for half a minute)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models" / "fixtures"
REAL = ROOT / "models" / "real"


# --------------------------------------------------------------------------- the two tiers
#: modules of small tests (the rules, planning, recognition, the command line's contract and
#: errors on the committed fixtures): the quick tier, ``pytest -m "not slow"``, runs them whole
#: (their few long tests are marked slow where they are written)
UNIT_MODULES = {
    "test_lemon_math.py", "test_exact_math.py", "test_fast_math.py", "test_plan.py",
    "test_docs.py", "test_architecture.py", "test_errors.py", "test_io.py",
    "test_datafile.py", "test_inspect.py", "test_hfconfig.py", "test_cli.py",
    "test_attention_op.py", "test_fusion.py", "test_passes.py",
}
#: ... and from the end-to-end modules, one expansion per fixture architecture: every
#: component's match, widen and twin (token, position and patch embeddings; LayerNorm and
#: RMSNorm; multi-head and grouped-query attention; GELU and SwiGLU MLPs; Pre-LN and Post-LN
#: residuals; tied LM, MLM and classifier heads), width and depth together, checked against
#: ONNX Runtime runs of the source
QUICK = {
    f"tests/test_depth.py::test_width_and_depth_together[{arch}-ts17]"
    for arch in ("gpt2", "llama", "bert", "vit")
}


def pytest_collection_modifyitems(config, items):
    """Everything outside the quick tier is ``slow``: the full run (CI) has both."""
    for item in items:
        if item.path.name not in UNIT_MODULES and item.nodeid not in QUICK:
            item.add_marker(pytest.mark.slow)


def run_cli(*args):
    """``lemon-onnx ARGS`` in a fresh interpreter: (returncode, stdout, stderr) as text."""
    return subprocess.run([sys.executable, "-m", "lemon_onnx.cli", *map(str, args)],
                          capture_output=True, text=True)


def manifest(kind: str = "main") -> list[dict]:
    path = FIXTURES / "manifest.json"
    entries = json.loads(path.read_text())
    return [e for e in entries if e["variant"] == kind]


def real_manifest() -> list[dict]:
    """Real pretrained exports, made by models/export_real.py (CI does it in .ci/run)."""
    path = REAL / "manifest.json"
    if not path.exists():
        if os.environ.get("LEMON_REQUIRE_REAL"):
            raise RuntimeError(f"{path} is missing but LEMON_REQUIRE_REAL is set: run "
                               "python models/export_real.py --out models/real first")
        return []
    return json.loads(path.read_text())


def real_or_skip(name: str) -> dict:
    for e in real_manifest():
        if e["name"] == name:
            return e
    pytest.skip(f"real model {name} not exported (python models/export_real.py)")


def fixture_ids(entries):
    return [e["file"].removesuffix(".onnx") for e in entries]


def load_cases(npz_path) -> list[dict]:
    """Reference cases saved by models/export_fixtures.py: case<k>/in/<name>, case<k>/out/<name>."""
    import numpy as np

    data = np.load(npz_path)
    cases: dict[int, dict] = {}
    for key in data.files:
        case, kind, name = key.split("/", 2)
        k = int(case.removeprefix("case"))
        cases.setdefault(k, {"in": {}, "out": {}})[kind][name] = data[key]
    return [cases[k] for k in sorted(cases)]


def run_ort(path, feeds: dict) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def assert_equivalent(small, big, cases, bound=1e-4):
    """ONNX Runtime outputs of ``big`` match ``small``: max abs error <= bound*max(1, max|ref|);
    outputs whose last axis grew (hidden-size outputs) compare on [..., :d]."""
    import numpy as np

    worst = 0.0
    for case in cases:
        ref = run_ort(small, case["in"])
        got = run_ort(big, case["in"])
        assert ref.keys() == got.keys()
        for name, r in ref.items():
            g = got[name]
            if g.shape != r.shape:
                assert g.shape[:-1] == r.shape[:-1] and g.shape[-1] > r.shape[-1], (name, g.shape, r.shape)
                g = g[..., : r.shape[-1]]
            err = float(np.max(np.abs(g.astype(np.float64) - r)))
            tol = bound * max(1.0, float(np.max(np.abs(r))))
            assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
            worst = max(worst, err)
    return worst


@pytest.fixture
def ci_log(record_property):
    """``ci_log(line)``: a line for the end of the run's output (outcome counts of sweeps and
    fuzz runs), printed by ``pytest_terminal_summary`` below; it travels with the test's
    report, so it reaches the log from xdist's workers too, where ``print`` does not."""
    return lambda line: record_property("ci_log", str(line))


def pytest_terminal_summary(terminalreporter):
    lines = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for key, value in getattr(rep, "user_properties", ()):
                if key == "ci_log" and (rep.nodeid, value) not in lines:
                    lines.append((rep.nodeid, value))
    if lines:
        terminalreporter.section("lemon-onnx figures")
        for nodeid, value in lines:
            terminalreporter.write_line(f"{nodeid}: {value}")

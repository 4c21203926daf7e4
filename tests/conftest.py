import json
import os
from pathlib import Path

import pytest

# no network in tests: transformers and huggingface_hub never ask a hub (a path that does not
# exist would otherwise be retried as a repository name for half a minute)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "models" / "fixtures"
REAL = ROOT / "models" / "real"


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


def pytest_terminal_summary(terminalreporter):
    """The mutation fuzz's outcome counts (tests/mutants.py), so that they appear in CI logs."""
    import sys

    mutants = sys.modules.get("mutants")
    for text in getattr(mutants, "REPORTS", []):
        terminalreporter.write_line(text)

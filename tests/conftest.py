import json
import os
from pathlib import Path

import pytest

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

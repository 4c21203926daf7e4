"""The family matrix as tests: every random-config family export (``models/export_families.py``,
both exporters) expands at width 2 and depth 2 and verifies against the source in ONNX
Runtime, or is refused with exit 2 and its reason, writing nothing.

The exports are generated, not committed (about two minutes with torch): CI builds them in
``.ci/run`` and sets ``LEMON_REQUIRE_FAMILIES=1``, so a missing export fails there instead of
skipping.  ``benchmarks/family_matrix.py`` runs the wider sweep (depth 3, width 1.5) for the
README's table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lemon_onnx
from lemon_onnx import io
from lemon_onnx.errors import LemonError
from lemon_onnx.recognize import recognize

FAMILIES = Path(__file__).resolve().parent.parent / "models" / "families"
REQUIRED = os.environ.get("LEMON_REQUIRE_FAMILIES") == "1"

#: refusals the matrix expects: (family, exporter tag) -> words the reason must contain.
#: Everything else must expand and verify.
REFUSED = {
    # k and v are picked from the (heads + 2) rows with GatherND index tensors, an operator
    # the axis analysis does not model on a growing axis (the TorchScript export slices)
    ("falcon", "dy18"): "GatherND",
    # disentangled attention: Q and K weights also project the relative position embeddings
    ("deberta_v2", "ts17"): "could not tell the Q, K and V projections apart",
    ("deberta_v2", "dy18"): "could not tell the Q, K and V projections apart",
    # raw audio through a convolutional feature encoder, positions from a grouped Conv
    ("wav2vec2", "ts17"): "No token embedding",
    ("wav2vec2", "dy18"): "No token embedding",
    # TorchScript writes q/k/v cut points computed at run time (dynamo writes constants)
    ("gpt_neox", "ts17"): "computed at run time",
    ("phi3", "ts17"): "computed at run time",
    # TorchScript traces the relative position table's interpolation and index with sizes
    # computed at run time (ScatterND)
    ("beit", "ts17"): "could not tie it",
}


#: refusals that depend on the export run: torch's dynamo export of Falcon writes the k/v pick
#: as GatherND in one run and in a form the analysis models in another (both seen in CI);
#: what expands must verify (lemon_onnx.expand raises on a mismatch)
EXPORT_DEPENDENT = {("falcon", "dy18")}


def _manifest() -> list:
    path = FAMILIES / "manifest.json"
    if not path.exists():
        if REQUIRED:
            raise FileNotFoundError(f"{path}: run python models/export_families.py")
        return []
    return [e for e in json.loads(path.read_text()) if not e.get("export_error")]


ENTRIES = _manifest()


def _id(e) -> str:
    return e["file"].removesuffix(".onnx")


def _feeds(path: Path) -> list[dict]:
    """The reference inputs of an export (its .npz), as ONNX Runtime feeds."""
    data = np.load(path)
    cases: dict = {}
    for key in data.files:
        case, kind, name = key.split("/", 2)  # caseN/in/NAME
        if kind == "in":
            cases.setdefault(case, {})[name] = data[key]
    return list(cases.values())


def _run(path: Path, feeds: dict) -> list:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _assert_refused(src: Path, out: Path, reason: str, **kw) -> None:
    """Exit 2 with ``reason`` in the message, and nothing written beside ``out``."""
    with pytest.raises(LemonError) as e:
        lemon_onnx.expand(src, out, **kw)
    assert e.value.exit_code == 2, str(e.value)
    assert reason in str(e.value), str(e.value)
    assert list(out.parent.iterdir()) == [], "a refusal must write nothing"


@pytest.mark.skipif(not ENTRIES, reason="models/families not exported "
                                        "(python models/export_families.py)")
@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_family_expands_or_is_refused(entry, tmp_path):
    src = FAMILIES / entry["file"]
    npz = FAMILIES / entry["reference"]
    out = tmp_path / "wide.onnx"
    key = (entry["family"], entry["tag"])
    if key in REFUSED:
        if key in EXPORT_DEPENDENT:  # some exports of the family expand: then they must verify
            try:
                lemon_onnx.expand(src, tmp_path / "probe" / "w.onnx", width=2, depth=2,
                                  inputs=npz)
            except LemonError as exc:
                assert exc.exit_code == 2 and REFUSED[key] in str(exc), str(exc)
            return
        _assert_refused(src, out, REFUSED[key], width=2, depth=2, inputs=npz)
        return
    result = lemon_onnx.expand(src, out, width=2, depth=2, inputs=npz)
    assert result.verification is not None and result.verification.passed
    # sizes read back from the written file
    before, after = recognize(io.load(src)), recognize(io.load(out))
    assert after.hidden == 2 * before.hidden and after.ffn == 2 * before.ffn
    assert after.heads == 2 * before.heads and after.num_layers == 2 * before.num_layers
    # and the outputs, against ONNX Runtime runs of the source
    for feeds in _feeds(npz)[:1]:
        want, got = _run(src, feeds), _run(out, feeds)
        for name, w, g in zip([o["name"] for o in before.outputs], want, got):
            if g.shape != w.shape:  # a hidden-state output: the source's slots come first
                g = g[..., : w.shape[-1]]
            scale = max(float(np.abs(w).max()), 1e-6)
            assert float(np.abs(g - w).max()) <= 1e-4 * scale, name


#: refusals at depth alone: (family, exporter tag) -> words the reason must contain
DEPTH_REFUSED = {
    # the head axes come from sizes computed at run time: the twins cannot be laid out
    ("gpt_neox", "ts17"): "cannot read",
    ("phi3", "ts17"): "cannot read",
    ("deberta_v2", "ts17"): REFUSED[("deberta_v2", "ts17")],
    ("deberta_v2", "dy18"): REFUSED[("deberta_v2", "dy18")],
    ("wav2vec2", "ts17"): REFUSED[("wav2vec2", "ts17")],
    ("wav2vec2", "dy18"): REFUSED[("wav2vec2", "dy18")],
}


@pytest.mark.skipif(not ENTRIES, reason="models/families not exported "
                                        "(python models/export_families.py)")
@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_family_deepens_or_is_refused(entry, tmp_path):
    """Depth alone, cancelling twins: exports refused for width only (run-time cut points,
    untied tables, GatherND) deepen, and twins next to per-head score terms (ALiBi, relative
    position tables, held in initializers or in Constant nodes as MPT's TorchScript export
    does) start with zero attention, so the pairs need not compute the same."""
    src = FAMILIES / entry["file"]
    npz = FAMILIES / entry["reference"]
    out = tmp_path / "deep.onnx"
    key = (entry["family"], entry["tag"])
    if key in DEPTH_REFUSED:
        _assert_refused(src, out, DEPTH_REFUSED[key], depth=2, inputs=npz)
        return
    result = lemon_onnx.expand(src, out, depth=2, inputs=npz)
    assert result.verification is not None and result.verification.passed
    before, after = recognize(io.load(src)), recognize(io.load(out))
    assert after.num_layers == 2 * before.num_layers and after.hidden == before.hidden
    for feeds in _feeds(npz)[:1]:
        for name, w, g in zip([o["name"] for o in before.outputs], _run(src, feeds),
                              _run(out, feeds)):
            scale = max(float(np.abs(w).max()), 1e-6)
            assert float(np.abs(g - w).max()) <= 1e-4 * scale, name

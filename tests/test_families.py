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


def _one_block_weight_changed(path: Path, folder: Path) -> Path:
    """The model at ``path`` saved by onnx's own external-data writer, with the middle element
    of the first block weight (a MatMul or Gemm weight, read directly or through a Transpose)
    changed by 1e-3."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}

    def weight(name):
        if name in inits and len(inits[name].dims) == 2:
            return inits[name]
        n = producer.get(name)
        if n is not None and n.op_type == "Transpose" and n.input[0] in inits:
            return weight(n.input[0])
        return None
    w = next(w for n in m.graph.node if n.op_type in ("MatMul", "Gemm")
             for w in [weight(n.input[1])] if w is not None)
    a = numpy_helper.to_array(w).copy()
    a.flat[a.size // 2] += 1e-3
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    folder.mkdir()
    onnx.save(m, str(folder / "big.onnx"), save_as_external_data=True, size_threshold=1024)
    return folder / "big.onnx"


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
def test_family_expands_or_is_refused(entry, tmp_path, ci_log):
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
    rep = result.verification
    assert rep is not None and rep.passed
    # the float64 proof ran (issue 21: on every expansion of the matrix), and where it decides
    # (the plan is exact), one block weight element off by 1e-3, written back by onnx's own
    # external-data writer, is caught by it
    level = rep.levels["float64"]
    exact = level["decides"] and level["rtol"] <= 1e-9  # Post-LN depth is held to 1e-6 only
    ci_log(f"float64 level ran: {level['ran']} ({level['engine'] or level['why']}); "
           f"{'exact' if exact else 'approximate'} plan")
    assert level["ran"], level
    if exact:
        changed = _one_block_weight_changed(out, tmp_path / "changed")
        bad = lemon_onnx.verify(src, changed, inputs=npz)
        assert not bad.passed and "float64" in bad.caught_by(), bad.summary()
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

"""The export folders Hugging Face optimum writes (``models/export_optimum.py``), encoder and
image tasks: each folder's ``model.onnx`` expands at width 2 and depth 2 and verifies, with
the inputs synthesised from the graph alone (optimum declares every axis of ``pixel_values``
symbolic); the expanded model's outputs are checked against ONNX Runtime runs of the source;
width 2 alone is exact in float64; width 1.5 verifies, or is refused (exit 2) where the
layout has no fractional form (Post-LN, a LayerNorm on the embeddings).

The folders are generated, not committed (optimum-onnx in its own virtualenv, ``.ci/run``
makes them); with ``LEMON_REQUIRE_OPTIMUM=1`` (CI) a missing folder fails instead of skipping.
The decoder folders (KV cache) and the encoder-decoder ones are tested elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lemon_onnx
from lemon_onnx.errors import LemonError
from lemon_onnx.verification import synthesize_inputs

OPTIMUM = Path(__file__).resolve().parent.parent / "models" / "optimum"
REQUIRED = os.environ.get("LEMON_REQUIRE_OPTIMUM") == "1"
#: refused (exit 2) by the closed world's unit-order rules (issue 23) from their landing until
#: the Reshapes that take their sizes from another tensor were modelled (dims: size ties):
#: CLIP's attention output reshaped to the stream's own width, RoFormer's interleaved rotary
#: pairs reshaped to q's shape.  Won back: each must expand at width 2 / depth 2 and verify
#: with figures no worse than these bounds (float64 difference relative to max |output|, the
#: float32 error over the source's own); measured 1.3e-14 / 1.23x and 7.4e-16 / 1.18x
WON_BACK = {"roformer-features": (1e-12, 2.0), "clip-vision-features": (1e-14, 2.0)}

#: the tasks of encoders and image models (one model.onnx, no cache)
ENCODER_TASKS = {"feature-extraction", "text-classification", "fill-mask",
                 "token-classification", "question-answering", "multiple-choice",
                 "image-classification"}


def _manifest() -> list:
    path = OPTIMUM / "manifest.json"
    if not path.exists():
        if REQUIRED:
            raise FileNotFoundError(f"{path}: run .venv-optimum/bin/python "
                                    "models/export_optimum.py")
        return []
    entries = json.loads(path.read_text())
    if REQUIRED:
        failed = [e["name"] for e in entries if e.get("export_error")]
        assert not failed, f"optimum could not export {failed}"
    return [e for e in entries if e.get("task") in ENCODER_TASKS and not e.get("export_error")]


ENTRIES = _manifest()


def _run(path, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _assert_same_outputs(src: Path, out: Path, cases: list) -> None:
    """Every output of the expanded model equals the source's (a hidden-state output on its
    first d slots) to 1e-4 of the output's magnitude, run by ONNX Runtime itself."""
    for feeds in cases:
        want, got = _run(src, feeds), _run(out, feeds)
        assert want.keys() == got.keys()
        for name, w in want.items():
            g = got[name]
            if g.shape != w.shape:
                assert g.shape[:-1] == w.shape[:-1] and g.shape[-1] > w.shape[-1], name
                g = g[..., : w.shape[-1]]
            scale = max(float(np.abs(w).max()), 1e-6)
            assert float(np.abs(g.astype(np.float64) - w).max()) <= 1e-4 * scale, name


def _image_size(entry) -> tuple | None:
    """(channels, height, width) from the source transformers config: the oracle for the
    sizes the synthesis reads from the graph."""
    cfg = json.loads((OPTIMUM / "src" / entry["name"] / "config.json").read_text())
    if "image_size" not in cfg:
        return None
    size = cfg["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return cfg.get("num_channels", 3), h, w


@pytest.mark.slow
@pytest.mark.skipif(not ENTRIES, reason="models/optimum not exported "
                                        "(.venv-optimum/bin/python models/export_optimum.py)")
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["name"])
def test_optimum_encoder_expands_and_verifies(entry, tmp_path):
    src = OPTIMUM / entry["folder"] / "model.onnx"
    desc = lemon_onnx.inspect(src)
    cases = synthesize_inputs(src)
    image = _image_size(entry)
    if image is not None:
        shapes = {a.shape[1:] for c in cases for a in c.values() if a.dtype.kind == "f"}
        assert shapes == {image}, (shapes, image)

    out = tmp_path / "w2d2.onnx"
    result = lemon_onnx.expand(src, out, width=2, depth=2)
    report = result.verification
    assert result.verified and report.passed, report.format()
    if entry["name"] in WON_BACK:
        alg, ratio = WON_BACK[entry["name"]]
        assert report.max_alg_rel is not None and report.max_alg_rel <= alg, report.format()
        assert report.max_ratio is not None and report.max_ratio <= ratio, report.format()
    assert result.plan.target["hidden"] == 2 * desc.hidden
    assert result.plan.target["layers"] == 2 * desc.num_layers
    # pre-norm: exact; Post-LN depth follows LEMON's recipe, exact to O(eps / variance)
    assert report.max_alg_rel <= (1e-12 if desc.layout == "pre-norm" else 1e-6)
    _assert_same_outputs(src, out, cases)

    if desc.layout != "pre-norm":  # width alone is exact for Post-LN too
        wide = lemon_onnx.expand(src, tmp_path / "w2.onnx", width=2)
        assert wide.verification.passed and wide.verification.max_alg_rel <= 1e-12

    fractional = desc.layout == "pre-norm" and desc.embeddings.norm is None
    if fractional:
        r15 = lemon_onnx.expand(src, tmp_path / "w15.onnx", width=1.5, depth=2)
        assert r15.verification.passed, r15.verification.format()
        _assert_same_outputs(src, tmp_path / "w15.onnx", cases)
    else:
        with pytest.raises(LemonError) as e:
            lemon_onnx.expand(src, tmp_path / "w15.onnx", width=1.5, depth=2)
        assert e.value.exit_code == 2
        assert "Post-LN" in str(e.value) or "LayerNorm on the embeddings" in str(e.value)
        assert not (tmp_path / "w15.onnx").exists()

    if entry["family"] == "dinov2":
        # the position table is interpolated to the image's grid: another size runs the
        # Resize for real, and the widened table must still give the same numbers
        rng = np.random.default_rng(1)
        big = [{"pixel_values": rng.standard_normal((2, 3, 48, 40)).astype(np.float32)}]
        again = lemon_onnx.verify(src, out, inputs=big)
        assert again.passed and again.max_alg_rel <= 1e-12, again.format()
        _assert_same_outputs(src, out, big)

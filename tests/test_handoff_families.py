"""The family matrix handed off to transformers: every random-config family export
(``models/export_families.py``, both exporters) expanded at width 2 and at width 1.5 with
depth 2 (where ``expand`` accepts it) is written by export-torch, loaded back with
``from_pretrained`` (strict: nothing missing, unexpected or mismatched) and run on the
export's reference inputs: the class's own forward (its ``logits``: what training calls) and
its trunk (``last_hidden_state``) must match the expanded ONNX model in ONNX Runtime to 1e-5
relative; or export-torch refuses with exit 2 and the reason listed in ``REFUSED``.

Slow (about 8 minutes on 2 shared cores: 84 hand-offs, each with a probe of the architecture
and the check); ``test_handoff.py`` covers one family per stored form in the fast tier.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from lemon_onnx import io
from lemon_onnx.errors import LemonError
from lemon_onnx.expansion import expand_model
from lemon_onnx.handoff import HandoffError, export_torch
from conftest import ROOT, load_cases, run_ort
from test_families import ENTRIES, FAMILIES  # the exports (required in CI)

WIDTHS = (2, 1.5)

#: (family, width) -> words the refusal must contain; every other expansion must load and match
REFUSED = {
    # ALiBi slopes: the architecture computes them from the head count
    ("bloom", 2): "depth only", ("mpt", 2): "depth only", ("mpt", 1.5): "depth only",
    # sinusoidal positions computed from d_model
    ("xglm", 2): "depth only", ("xglm", 1.5): "depth only",
    # one epsilon in the config for norms that need two (Qwen3's q/k norms over head_dim keep
    # theirs), or an epsilon that is not in the config at all (OPT's LayerNorms)
    ("qwen3", 1.5): "integer width", ("opt", 1.5): "integer width",
    # the classifier's projector was widened; the config's classifier_proj_size is not
    ("whisper", 2): "classifier_proj_size=32",
}


CASES = [(e, w) for e in ENTRIES for w in WIDTHS]


@pytest.mark.slow
@pytest.mark.parametrize("entry,width", CASES, ids=[
    f"{e['file'].removesuffix('.onnx')}-w{w:g}" for e, w in CASES])
def test_family_hands_off(tmp_path, entry, width, ci_log):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformers as tf

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sys.path.insert(0, str(ROOT / "models"))
    import export_families as ef

    name = entry["family"]
    spec = ef.FAMILIES[name]
    try:
        model, _, _ = expand_model(FAMILIES / entry["file"], width=width, depth=2)
    except LemonError as exc:  # tests/test_families.py holds expand to its refusals
        pytest.skip(f"expand refuses this expansion: {exc.message[:120]}")
    big = io.save(model, tmp_path / "big.onnx")
    del model
    cfg = ef.make_config(spec).to_dict()
    want = REFUSED.get((name, width))
    if want is not None:
        with pytest.raises(HandoffError) as info:
            export_torch(big, tmp_path / "out", config=cfg)
        assert want in str(info.value), str(info.value)
        assert not (tmp_path / "out").exists()
        return
    res = export_torch(big, tmp_path / "out", config=cfg)
    assert res.cls_name == spec["model"], res.cls_name
    hf, loading = getattr(tf, spec["model"]).from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(loading.values()), loading
    hf.eval()
    trunk = getattr(hf, spec["base"]) if spec["base"] else hf
    worst = {}
    for case in load_cases(FAMILIES / entry["reference"]):
        ins = {n: torch.from_numpy(case["in"][n]) for n in spec["inputs"]}
        call = dict(spec.get("call") or {})
        with torch.no_grad():  # the class's own forward (what training calls) and its trunk
            outs = {"last_hidden_state": trunk(**ins, **call).last_hidden_state}
            if spec["head"] is not None:
                outs["logits"] = hf(**ins, **call).logits
        ref = run_ort(big, case["in"])
        for n, o in outs.items():
            r = ref[n].astype(np.float64)
            err = float(np.max(np.abs(o.numpy() - r)) / max(1e-30, float(np.max(np.abs(r)))))
            worst[n] = max(worst.get(n, 0.0), err)
    assert worst and all(e <= 1e-5 for e in worst.values()), worst
    ci_log(f"{entry['file']} w{width:g}: {res.cls_name}, max relative difference {worst}")

"""Half-precision exports of decoder families (issue 20): the families' random-config models
(``models/export_families.py``) cast to float16 and exported with both exporters at test time,
expanded at width 2 and 1.5 with depth 2, verified at both levels by lemon-onnx itself.  The
new weights stay float16 (computed in float32 and cast once, lemon-math.md, "Exact in the
storage dtype"); the float32 level compares against the source's own float16 error."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import lemon_onnx

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("LEMON_REQUIRE_FAMILIES") == "1"  # CI: torch must be there

pytestmark = pytest.mark.slow


def _export(family: str, exporter: str, dtype: str, out: Path) -> Path:
    torch = pytest.importorskip("torch") if not REQUIRED else __import__("torch")
    sys.path.insert(0, str(ROOT / "models"))
    try:
        import export_families as F
    finally:
        sys.path.remove(str(ROOT / "models"))
    spec = F.FAMILIES[family]
    wrapper, cfg = F.build_model(family)
    wrapper = wrapper.to(getattr(torch, dtype))
    ins = F.make_inputs(family, cfg, *F.CASES[0], seed=100)
    args = tuple(ins[n] for n in spec["inputs"])
    axes_in, axes_out = F._axes(spec)
    path = out / f"{family}-{exporter}-{dtype}.onnx"
    with F.ef._quiet():
        if exporter == "ts17":
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17,
                              input_names=spec["inputs"], output_names=F.output_names(spec),
                              dynamic_axes={**axes_in, **axes_out})
        else:
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=18,
                                     input_names=spec["inputs"],
                                     output_names=F.output_names(spec),
                                     dynamic_shapes=F._dynamic_shapes(spec, axes_in))
            prog.save(str(path), external_data=False)
    return path


@pytest.mark.parametrize("exporter", ["ts17", "dy18"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_float16_decoders_expand_and_verify(tmp_path, family, exporter):
    src = _export(family, exporter, "float16", tmp_path)
    def float_dtypes(path):  # the weights' storage (dynamo keeps rotary tables in float32)
        return {v.dtype for v in ir.load(str(path)).graph.initializers.values()
                if v.dtype.is_floating_point() and v.const_value is not None
                and len(v.shape) == 2}

    assert float_dtypes(src) == {ir.DataType.FLOAT16}
    for width in (2, 1.5):
        out = tmp_path / f"w{width}.onnx"
        res = lemon_onnx.expand(src, out, width=width, depth=2)
        rep = res.verification
        assert rep.passed and rep.dtype == "float16"
        assert rep.levels["float64"]["ran"], rep.levels
        big = ir.load(str(out))
        assert float_dtypes(out) == {ir.DataType.FLOAT16}
        hidden = next(int(v.shape[-1]) for v in big.graph.outputs if "hidden" in v.name)
        assert hidden == int(64 * width)
        worst = max(o.ratio for c in rep.cases for o in c["outputs"] if o.ratio is not None)
        assert np.isfinite(worst) and worst <= 4.0

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


@pytest.mark.parametrize("exporter", ["ts17", "dy18"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_bfloat16_decoders_expand_and_are_proved_in_float64(tmp_path, family, exporter):
    """ONNX Runtime's CPU build has no bfloat16 kernels for some ops (Where): the bfloat16
    level cannot run, the report says so, and the float64 level alone decides; it still
    catches a 1e-3 change of one weight."""
    import onnx
    from onnx import numpy_helper

    src = _export(family, exporter, "bfloat16", tmp_path)
    for width in (2, 1.5):
        out = tmp_path / f"w{width}.onnx"
        res = lemon_onnx.expand(src, out, width=width, depth=2)
        rep = res.verification
        assert rep.passed and rep.dtype == "bfloat16"
        assert rep.levels["dtype"]["ran"] is False and rep.levels["dtype"]["why"]
        assert rep.levels["float64"]["ran"] is True
        assert "float64 only" in rep.summary()
        assert {v.dtype for v in ir.load(str(out)).graph.initializers.values()
                if v.dtype.is_floating_point() and len(v.shape) == 2} == {ir.DataType.BFLOAT16}
    # one element of one block weight changed by 1e-3 (relative) in the exact expansion
    out = tmp_path / "w2.onnx"
    proto = onnx.load(str(out))
    t = next(t for t in proto.graph.initializer if len(t.dims) == 2 and "embed" not in t.name
             and "head" not in t.name
             and t.data_type == onnx.TensorProto.BFLOAT16
             and np.abs(numpy_helper.to_array(t).astype(np.float32)).max() > 0)  # not a twin's
    # zero output rows
    arr = numpy_helper.to_array(t).astype(np.float32)
    i = np.unravel_index(np.argmax(np.abs(arr)), arr.shape)
    arr[i] *= 1.01  # bfloat16 keeps 8 bits: 1% is its next representable step or two
    import ml_dtypes

    t.CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.bfloat16), t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    rep = lemon_onnx.verify(src, bad)
    assert not rep.passed and rep.levels["float64"]["ran"] is True

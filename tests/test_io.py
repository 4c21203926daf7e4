"""I/O on onnx-ir: memory-mapped external data, metadata kept, atomic save."""
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lemon_onnx import io
from conftest import FIXTURES

SRC = FIXTURES / "llama-dy18.onnx"


def _arrays(path):
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}, m


def test_roundtrip_single_file_keeps_versions_and_metadata(tmp_path):
    model = io.load(SRC)
    model.metadata_props["lemon.test"] = "kept"
    out = io.save(model, tmp_path / "out.onnx")
    a, ma = _arrays(SRC)
    b, mb = _arrays(out)
    assert mb.ir_version == ma.ir_version
    assert {o.domain: o.version for o in mb.opset_import} == {o.domain: o.version for o in ma.opset_import}
    assert {p.key: p.value for p in mb.metadata_props}["lemon.test"] == "kept"
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == [out]  # no temporary left behind


def test_external_data_one_file_is_memory_mapped(tmp_path):
    out = io.save(io.load(SRC), tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    assert out.stat().st_size < (tmp_path / "ext.onnx.data").stat().st_size
    model = io.load(out)
    consts = [v.const_value for v in model.graph.initializers.values()]
    assert any(isinstance(c, ir.ExternalTensor) for c in consts)  # lazy, not read into memory
    ref, _ = _arrays(SRC)
    m = onnx.load(str(out))  # onnx resolves the external file itself
    got = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_external_data_one_file_per_tensor(tmp_path):
    m = onnx.load(str(SRC))
    onnx.save(m, str(tmp_path / "per.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    files = [p for p in tmp_path.iterdir() if p.name != "per.onnx"]
    assert len(files) > 5
    model = io.load(tmp_path / "per.onnx")
    out = io.save(model, tmp_path / "out" / "again.onnx")
    ref, _ = _arrays(SRC)
    got, _ = _arrays(out)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = io.load(SRC)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(OSError):
        io.save(model, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_expand_reads_and_writes_external_data(tmp_path, monkeypatch):
    """A model with one .data file in; above the size threshold the output gets one too, is
    verified from there, and both files appear only together at the destination."""
    from lemon_onnx.expansion import expand
    from conftest import assert_equivalent, load_cases

    src = io.save(io.load(SRC), tmp_path / "in" / "m.onnx", external_data=True)
    assert (tmp_path / "in" / "m.onnx.data").exists()
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = tmp_path / "out" / "big.onnx"
    res = expand(src, out, width=2, depth=2)
    assert res.verified and res.output == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < (out.parent / "big.onnx.data").stat().st_size
    assert_equivalent(SRC, out, load_cases(SRC.with_suffix(".npz")))

"""Hostile inputs, fuzzed (issue 21): graphs mutated from the fixtures, truncated and random
files.  Every run of ``lemon-onnx expand`` must end in exit 0 (the model verified: expand
checks before it writes), 1, 2 or 3: never exit 4 or a traceback, and nothing at OUT unless
it exited 0 (no partial file, no temporary left beside it).

The generator is seeded (``LEMON_FUZZ_SEED``, default 0): case k of a run is always the
same mutation.  The fast tier runs ``FAST_CASES`` cases, the slow tier ``SLOW_CASES``; the
case and outcome counts are printed in the test summary (conftest.py).
"""
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import FIXTURES

SEED = int(os.environ.get("LEMON_FUZZ_SEED", "0"))
FAST_CASES = 30  # cases 0..29, in the fast tier
SLOW_CASES = 500  # cases 0..499 over both tiers: the slow tier runs 30..499 in chunks
CHUNK = 47  # (xdist spreads the chunks over the workers)
SOURCES = sorted(p for p in FIXTURES.glob("*.onnx") if "-alt" not in p.name)
ALLOWED = {0, 1, 2, 3}


# --------------------------------------------------------------------------- mutations
def _drop_node(m, rng):
    del m.graph.node[int(rng.integers(len(m.graph.node)))]
    return "node dropped"


def _rewire(m, rng):
    nodes = [n for n in m.graph.node if n.input]
    n = nodes[int(rng.integers(len(nodes)))]
    names = [o for x in m.graph.node for o in x.output] + [i.name for i in m.graph.input]
    slot = int(rng.integers(len(n.input)))
    n.input[slot] = names[int(rng.integers(len(names)))]  # may make a cycle
    return "node rewired"


def _input_shape(m, rng):
    dims = [d for i in m.graph.input for d in i.type.tensor_type.shape.dim]
    if not dims:
        return _drop_node(m, rng)
    d = dims[int(rng.integers(len(dims)))]
    d.Clear()
    d.dim_value = int(rng.choice([0, 1, 3, 7, 65]))
    return "input shape changed"


def _input_dtype(m, rng):
    i = m.graph.input[int(rng.integers(len(m.graph.input)))]
    i.type.tensor_type.elem_type = int(rng.choice([onnx.TensorProto.FLOAT, onnx.TensorProto.INT32,
                                                   onnx.TensorProto.DOUBLE,
                                                   onnx.TensorProto.FLOAT16]))
    return "input dtype changed"


def _initializers(m):
    return [t for t in m.graph.initializer if t.dims]


def _init_values(m, rng):
    from onnx import numpy_helper

    t = _initializers(m)[int(rng.integers(len(_initializers(m))))]
    a = numpy_helper.to_array(t).copy()
    if a.dtype.kind == "f":
        a.flat[int(rng.integers(a.size))] += 1e-3
    elif a.size:
        a.flat[int(rng.integers(a.size))] += 1
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return "initializer value changed"


def _init_shape(m, rng):
    from onnx import numpy_helper

    t = _initializers(m)[int(rng.integers(len(_initializers(m))))]
    a = numpy_helper.to_array(t)
    a = a.reshape(-1)[: max(a.size - 1, 0)] if rng.random() < 0.5 else a.reshape(-1)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    return "initializer shape changed"


def _init_dtype(m, rng):
    from onnx import numpy_helper

    t = _initializers(m)[int(rng.integers(len(_initializers(m))))]
    a = numpy_helper.to_array(t)
    to = np.float64 if a.dtype.kind != "f" or a.dtype == np.float32 else np.float32
    if rng.random() < 0.3:
        to = np.int64
    t.CopyFrom(numpy_helper.from_array(a.astype(to), t.name))
    return "initializer dtype changed"


def _init_swap(m, rng):
    inits = _initializers(m)
    a, b = (inits[int(i)] for i in rng.choice(len(inits), 2, replace=False))
    name_a, name_b = a.name, b.name
    tmp = onnx.TensorProto()
    tmp.CopyFrom(a)
    a.CopyFrom(b)
    b.CopyFrom(tmp)
    a.name, b.name = name_a, name_b
    return "initializers swapped"


def _foreign_op(m, rng):
    n = m.graph.node[int(rng.integers(len(m.graph.node)))]
    n.domain = "com.example.foreign"
    if not any(o.domain == n.domain for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid(n.domain, 1))
    return "foreign-domain op"


def _dangling_output(m, rng):
    o = m.graph.output[int(rng.integers(len(m.graph.output)))]
    o.name = o.name + "_dangling"
    return "dangling output"


GRAPH_MUTATIONS = [_drop_node, _rewire, _input_shape, _input_dtype, _init_values, _init_shape,
                   _init_dtype, _init_swap, _foreign_op, _dangling_output]


def make_case(k: int, folder: Path) -> tuple[str, Path]:
    """Case ``k``: (what it is, the model file written into ``folder``)."""
    rng = np.random.default_rng([SEED, k])
    src = SOURCES[int(rng.integers(len(SOURCES)))]
    path = folder / f"case{k}.onnx"
    roll = rng.random()
    if roll < 0.08:  # truncated file
        data = src.read_bytes()
        path.write_bytes(data[: int(rng.integers(1, len(data)))])
        return "truncated file", path
    if roll < 0.12:  # random bytes
        path.write_bytes(rng.bytes(int(rng.integers(1, 1 << 16))))
        return "random file", path
    m = onnx.load(str(src))
    what = GRAPH_MUTATIONS[int(rng.integers(len(GRAPH_MUTATIONS)))](m, rng)
    onnx.save(m, str(path))
    return what, path


# --------------------------------------------------------------------------- the runs
def run_case(k: int, tmp_path: Path, capfd) -> tuple[str, int]:
    from lemon_onnx.cli import main

    folder = tmp_path / f"k{k}"
    folder.mkdir()
    what, path = make_case(k, folder)
    out_dir = folder / "out"
    out_dir.mkdir()
    out = out_dir / "x.onnx"
    rng = np.random.default_rng([SEED, k, 1])
    flags = ["--width", "2"] + (["--depth", "2"] if rng.random() < 0.3 else [])
    with pytest.raises(SystemExit) as e:
        main(["expand", str(path), "-o", str(out), "-q", *flags])
    code = e.value.code
    err = capfd.readouterr().err
    where = f"case {k} ({what}, {path.name}, {' '.join(flags)}): exit {code}\n{err}"
    assert code in ALLOWED, where
    assert "Traceback" not in err and "[E:onnxruntime" not in err, where
    left = sorted(p.name for p in out_dir.iterdir())
    if code == 0:
        assert left == ["x.onnx"] or left == ["x.onnx", "x.onnx.data"], where
    else:
        assert left == [], where  # no output, no partial file, no temporary
    return what, code


def _fuzz(cases: range, tmp_path, capfd, ci_log) -> None:
    n = len(cases)
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    for k in cases:
        what, code = run_case(k, tmp_path, capfd)
        outcomes[code] += 1
        kinds[what] += 1
    ci_log(f"cases {cases.start}..{cases.stop - 1}: {n} cases; exit codes {dict(sorted(outcomes.items()))}; "
           f"mutations {dict(sorted(kinds.items()))}")
    assert sum(outcomes.values()) == n


def test_fuzz_fast(tmp_path, capfd, ci_log):
    _fuzz(range(FAST_CASES), tmp_path, capfd, ci_log)


@pytest.mark.slow
@pytest.mark.parametrize("start", range(FAST_CASES, SLOW_CASES, CHUNK))
def test_fuzz_slow(tmp_path, capfd, ci_log, start):
    _fuzz(range(start, min(start + CHUNK, SLOW_CASES)), tmp_path, capfd, ci_log)

"""Property tests (hypothesis): every rule of lemon_math is exact in the storage dtype
(issue 9): split parts sum bit for bit to the original, avg leftover rows and cancelling
fan-out rows sum to exactly zero, every value is representable, in float64, float32,
float16 and bfloat16, for any map and magnitude."""
import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lemon_onnx import lemon_math as lm

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16]
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def maps(draw):
    kind = draw(st.sampled_from(["avg", "zero", "circ", "copies", "units"]))
    d = draw(st.integers(1, 9))
    if kind == "units":
        n = draw(st.integers(1, 5))
        return lm.UnitMap(n, draw(st.integers(n, 3 * n)), draw(st.integers(1, 3)))
    if kind == "copies":
        return lm.StreamMap(d, d * draw(st.integers(1, 4)), "copies")
    return lm.StreamMap(d, draw(st.integers(d, 3 * d + 2)), kind)


@st.composite
def weights(draw, rows):
    dt = draw(st.sampled_from(DTYPES))
    cols = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    r = np.random.default_rng(seed)
    # magnitudes over many binades, zeros, and the dtype's subnormals
    tiny = float(np.finfo(np.float16).smallest_subnormal) if dt is np.float16 else 1e-38
    mag = np.exp(r.uniform(-12, 4, (rows, cols)))
    W = r.standard_normal((rows, cols)) * mag
    W[r.random((rows, cols)) < 0.1] = 0.0
    W[r.random((rows, cols)) < 0.05] = tiny
    return W.astype(dt), r


def sums_over_copies(W2, m):
    out = np.zeros((m.d,) + W2.shape[1:])
    for c, j in enumerate(m.src_index):
        if j >= 0:
            out[j] += W2[c].astype(np.float64)  # few terms of one dtype: exact in float64
    return out


@SETTINGS
@given(st.data())
def test_input_side_split_sums_bit_for_bit(data):
    m = data.draw(maps())
    W, r = data.draw(weights(m.d))
    noise = data.draw(st.sampled_from([0.0, 0.1, 0.5, 2.0]))
    W2 = lm.expand_in(W, 0, m, r, noise_scale=noise)
    assert W2.dtype == W.dtype and W2.shape[0] == m.D
    assert np.array_equal(sums_over_copies(W2, m), W.astype(np.float64))
    left = m.leftover_slots
    if left.size and m.form == "avg":
        assert np.array_equal(W2[left].astype(np.float64).sum(axis=0), np.zeros(W.shape[1]))
    # the same along axis 1 (Gemm transB / [out, in] layouts)
    W2t = lm.expand_in(W.T, 1, m, np.random.default_rng(0), noise_scale=noise)
    assert np.array_equal(sums_over_copies(W2t.T, m), W.astype(np.float64))


@SETTINGS
@given(st.data())
def test_cancelling_fanout_sums_to_exactly_zero(data):
    m = data.draw(maps())
    W, r = data.draw(weights(m.D))
    noise = data.draw(st.sampled_from([0.01, 0.1, 1.0]))
    Wc, fanin = lm.cancel_fanout(W, 0, m, r, noise_scale=noise)
    assert Wc.dtype == W.dtype and np.array_equal(fanin, np.arange(m.D))
    assert np.array_equal(sums_over_copies(Wc, m), np.zeros((m.d,) + W.shape[1:]))
    for C in m.copy_sets:
        if len(C) == 1:
            assert np.all(Wc[C[0]].astype(np.float64) == 0)


@SETTINGS
@given(st.data())
def test_pairs_without_width_are_exact_negatives(data):
    unit = data.draw(st.integers(1, 3))
    n = data.draw(st.integers(1, 7))
    W, r = data.draw(weights(n * unit))
    Wc, fanin = lm.cancel_fanout(W, 0, None, r, unit_size=unit)
    u = Wc.astype(np.float64).reshape(n, unit, -1)
    assert np.array_equal(u[0:2 * (n // 2):2], -u[1:2 * (n // 2):2])
    if n % 2:
        assert np.all(u[-1] == 0)


@SETTINGS
@given(st.data())
def test_split_layers_equal_the_source_in_float64(data):
    """A linear layer fed the expanded form of its input gives the source's output to float64
    rounding (copies/circ/zero forms: no rounded constant is involved)."""
    d = data.draw(st.integers(1, 8))
    form = data.draw(st.sampled_from(["zero", "circ", "copies"]))
    D = d * data.draw(st.integers(1, 3)) if form == "copies" else data.draw(st.integers(d, 3 * d))
    m = lm.StreamMap(d, D, form)
    W, r = data.draw(weights(d))
    W2 = lm.expand_in(W, 0, m, r)
    x = r.standard_normal((3, d))
    ref = x @ W.astype(np.float64)
    got = m.apply(x) @ W2.astype(np.float64)
    scale = np.abs(x).max() * np.abs(W.astype(np.float64)).sum(axis=0).max() + 1e-300
    assert np.max(np.abs(got - ref)) <= 1e-13 * scale

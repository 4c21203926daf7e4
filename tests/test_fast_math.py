"""The float32 paths of lemon_math (``FAST_FLOAT32``) and its chunked float64 std give the same
bits as the straightforward float64 computation they replace, on random inputs: zeros of both
signs, subnormals, values near the top of the range, every kind of map, both weight layouts,
several chunks per tensor, and the inputs that must fall back (inf, far-out draws)."""
import numpy as np
import pytest

from lemon_onnx import lemon_math as lm


def _weights(shape, r, extremes=True):
    W = r.standard_normal(shape) * np.exp(r.uniform(-12, 4, shape))
    W[r.random(shape) < 0.1] = 0.0
    W[r.random(shape) < 0.05] = -0.0
    if extremes:
        W[r.random(shape) < 0.05] = 1e-40  # float32 subnormals
        W[r.random(shape) < 0.02] = -3e-39
        W[r.random(shape) < 0.02] = 3e38
    return W.astype(np.float32)


def _map(r):
    kind = r.choice(["avg", "zero", "circ", "copies", "units"])
    d = int(r.integers(1, 40))
    if kind == "units":
        n = int(r.integers(1, 6))
        return lm.UnitMap(n, int(r.integers(n, 3 * n + 1)), int(r.integers(1, 4)))
    if kind == "copies":
        return lm.StreamMap(d, d * int(r.integers(1, 5)), "copies")
    return lm.StreamMap(d, int(r.integers(d, 3 * d + 3)), kind)


def _fast_and_reference(monkeypatch, fn):
    monkeypatch.setattr(lm, "FAST_FLOAT32", True)
    fast = fn()
    monkeypatch.setattr(lm, "FAST_FLOAT32", False)
    ref = fn()
    monkeypatch.setattr(lm, "FAST_FLOAT32", True)
    return fast, ref


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", range(4))
def test_std64_is_numpy_float64_std_bit_for_bit(monkeypatch, seed):
    r = np.random.default_rng(seed)
    monkeypatch.setattr(lm, "_LEAF", 128)  # many levels of halving on small arrays
    for _ in range(40):
        shape = tuple(int(s) for s in r.integers(1, 90, size=r.integers(1, 4)))
        W = (r.standard_normal(shape) * r.uniform(1e-3, 3) + r.uniform(-1, 1)).astype(
            r.choice([np.float32, np.float16, np.float64]))
        for ax in range(W.ndim):
            view = np.moveaxis(W, ax, 0)
            ref = np.moveaxis(W.astype(np.float64), ax, 0).std()
            assert np.float64(lm._std64(view)).tobytes() == ref.tobytes()
        assert np.float64(lm._std64(W[::2])).tobytes() == W[::2].astype(np.float64).std().tobytes()


def test_std64_at_full_leaf_size():
    W = (np.random.default_rng(9).standard_normal((1100, 333)) * 0.02).astype(np.float32)
    assert lm._std64(W) == float(W.astype(np.float64).std())
    assert lm._std64(W.T) == float(W.T.astype(np.float64).std())


@pytest.mark.parametrize("seed", range(6))
def test_expand_in_float32_path_equals_float64_reference(monkeypatch, seed):
    r = np.random.default_rng(100 + seed)
    monkeypatch.setattr(lm, "ROW_CHUNK_BYTES", 8 * 64 * int(r.integers(1, 4)))  # many chunks
    for _ in range(60):
        m = _map(r)
        ax = int(r.integers(0, 2))
        W = _weights((m.d, int(r.integers(1, 200))), r)
        if ax:
            W = np.ascontiguousarray(W.T)
        kw = dict(rng=int(r.integers(0, 1000)), noise_scale=float(r.choice([0.0, 0.1, 0.5, 2.0])),
                  break_symmetry=bool(r.random() < 0.8))
        with np.errstate(all="ignore"):  # std overflows on 3e38 entries, in both paths
            fast, ref = _fast_and_reference(monkeypatch, lambda: lm.expand_in(W, ax, m, **kw))
        assert _same_bits(fast, ref), (m, W.shape, ax, kw)


def test_expand_in_non_finite_weights_fall_back_to_float64(monkeypatch):
    r = np.random.default_rng(7)
    m = lm.UnitMap(8, 13, 1)
    W = _weights((8, 50), r)
    W[3, 7], W[5, 1] = np.inf, np.nan
    with np.errstate(all="ignore"):
        fast, ref = _fast_and_reference(monkeypatch, lambda: lm.expand_in(W, 0, m, rng=1))
    assert _same_bits(fast, ref)


@pytest.mark.parametrize("seed", range(4))
def test_cancel_fanout_float32_path_equals_float64_reference(monkeypatch, seed):
    r = np.random.default_rng(200 + seed)
    monkeypatch.setattr(lm, "ROW_CHUNK_BYTES", 8 * 100)
    for _ in range(50):
        m = _map(r)
        ax = int(r.integers(0, 2))
        W = _weights((m.D, int(r.integers(1, 200))), r, extremes=False)
        if ax:
            W = np.ascontiguousarray(W.T)
        kw = dict(rng=int(r.integers(0, 1000)), noise_scale=float(r.choice([0.1, 0.5, 2.0])))
        if r.random() < 0.3:
            kw["init_scale"] = float(r.uniform(1e-3, 1))
        fast, ref = _fast_and_reference(
            monkeypatch, lambda: lm.cancel_fanout(W, ax, m, **kw)[0])
        assert _same_bits(fast, ref), (m, W.shape, ax, kw)


def test_grid_normals_refuses_draws_float32_cannot_sum_exactly():
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    # a grid so fine that the rounded draws need more than 24 bits
    assert lm._grid_normals_f32(rng, (50, 40), 1.0, 2.0 ** -30, 2) is None
    assert rng.bit_generator.state == before  # the float64 path draws the same numbers
    g = lm._grid(1.0, 2, np.float32)
    got = lm._grid_normals_f32(rng, (50, 40), 1.0, g, 2)
    want = lm._on_grid(np.random.default_rng(3).standard_normal((50, 40)) * 1.0, g)
    assert _same_bits(got, want.astype(np.float32))
    assert np.array_equal(got.astype(np.float64), want)


@pytest.mark.parametrize("seed", range(3))
def test_apply_slices_and_chunked_mean_equal_take_and_whole_mean(monkeypatch, seed):
    r = np.random.default_rng(300 + seed)
    monkeypatch.setattr(lm, "ROW_CHUNK_BYTES", 8 * int(r.integers(50, 300)))
    for _ in range(50):
        m = _map(r)
        other = int(r.integers(1, 120))
        x = _weights((m.d, other), r, extremes=False)
        for view, ax in ((x, 0), (x.T, 1), (np.ascontiguousarray(x.T), 1), (x[:, ::2], 0)):
            fast, ref = _fast_and_reference(monkeypatch, lambda: m.apply(view, ax))
            assert _same_bits(fast, ref), (m, view.shape, ax)
    assert len(lm.StreamMap(5, 12, "circ").runs()) == 3

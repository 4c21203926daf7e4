"""Property tests of lemon_onnx.lemon_math against direct numpy computations (float64)."""

import math

import numpy as np
import pytest

import lemon_onnx.lemon_math as lm
from lemon_onnx.lemon_math import (
    StreamMap, UnitMap, cancel_fanout, expand_embedding, expand_in, expand_norm, expand_out,
    gqa_maps, norm_output_map, random_split_check, zero_fanout,
)

PAIRS = [(4, 5), (4, 6), (4, 8), (6, 9), (8, 10), (8, 24)]
FRACTIONAL = [p for p in PAIRS if p[1] % p[0]]
TOL = 1e-12


def rng_(seed=0):
    return np.random.default_rng(seed)


def forms_for(d, D):
    return ["avg", "zero", "circ"] + (["copies"] if D % d == 0 else [])


# ---- direct numpy reference layers -------------------------------------------------------
def layernorm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + (0 if b is None else b)


def rmsnorm(x, g, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * g


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1 + np.exp(-x))


def attention(x, Wq, bq, Wk, bk, Wv, bv, Wo, bo, n_q, n_kv, hd):
    T = x.shape[0]
    q = (x @ Wq + bq).reshape(T, n_q, hd).transpose(1, 0, 2)
    k = (x @ Wk + bk).reshape(T, n_kv, hd).transpose(1, 0, 2)
    v = (x @ Wv + bv).reshape(T, n_kv, hd).transpose(1, 0, 2)
    g = n_q // n_kv
    k, v = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)  # q head i reads kv head i // g
    s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    s = s + np.triu(np.full((T, T), -1e9), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(1, 0, 2).reshape(T, n_q * hd)
    return o @ Wo + bo


def err(a, b):
    return float(np.max(np.abs(a - b)))


# ---- maps ----------------------------------------------------------------------------------
def test_stream_map_layouts():
    x = np.array([1.0, 2.0, 3.0, 6.0])
    assert StreamMap(4, 6, "avg").apply(x).tolist() == [1, 2, 3, 6, 3, 3]
    assert StreamMap(4, 6, "zero").apply(x).tolist() == [1, 2, 3, 6, 0, 0]
    assert StreamMap(4, 6, "circ").apply(x).tolist() == [1, 2, 3, 6, 1, 2]
    assert StreamMap(4, 8, "copies").apply(x).tolist() == [1, 2, 3, 6] * 2
    m = StreamMap(4, 10, "avg")
    assert m.src_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, -1, -1]
    assert [c.tolist() for c in m.copy_sets] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert m.leftover_slots.tolist() == [8, 9] and m.scale == pytest.approx(0.8)
    assert [c.tolist() for c in StreamMap(4, 6, "circ").copy_sets] == [[0, 4], [1, 5], [2], [3]]
    assert np.array_equal(m.recover(m.apply(x)), x)
    X = rng_().standard_normal((3, 4, 5))
    assert np.array_equal(m.recover(m.apply(X, axis=1), axis=1), X)
    with pytest.raises(ValueError, match="nearest valid widths: 4 or 8"):
        StreamMap(4, 6, "copies")
    with pytest.raises(ValueError):
        StreamMap(4, 3, "avg")


def test_unit_map():
    m = UnitMap(3, 5, unit_size=2)
    assert m.unit_src.tolist() == [0, 1, 2, 0, 1]
    assert m.src_index.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert [c.tolist() for c in m.unit_copy_sets] == [[0, 3], [1, 4], [2]]
    assert [c.tolist() for c in m.copy_sets][:3] == [[0, 6], [1, 7], [2, 8]]
    assert m.leftover_slots.size == 0
    with pytest.raises(ValueError, match="group size 2"):
        UnitMap(4, 5, 2, group=2)


# ---- linear layers -------------------------------------------------------------------------
@pytest.mark.parametrize("d,D", PAIRS)
def test_linear_any_forms(d, D):
    """x in form F_in -> expanded linear -> exactly the F_out form of the original output."""
    r = rng_(d * 100 + D)
    dout, Dout = d + 2, D + 3
    W, b = r.standard_normal((d, dout)), r.standard_normal(dout)
    x = r.standard_normal((7, d)) + 0.5
    y = x @ W + b
    for fin in forms_for(d, D):
        for fout in forms_for(dout, Dout):
            im, om = StreamMap(d, D, fin), StreamMap(dout, Dout, fout)
            W2, b2 = expand_out(W, 1, om, b)
            W2 = expand_in(W2, 0, im, r)
            assert W2.shape == (D, Dout) and b2.shape == (Dout,)
            assert err(im.apply(x) @ W2 + b2, om.apply(y)) < TOL, (fin, fout)
            if fin != "avg":  # avg rows carry the leftover compensation
                assert random_split_check(W, W2[:, :dout], 0, im.copy_sets) < TOL


@pytest.mark.parametrize("d,D", PAIRS)
def test_linear_gemm_transb(d, D):
    r = rng_(1)
    W = r.standard_normal((d, d))  # Gemm transB: [out, in]
    b = r.standard_normal(d)
    x = r.standard_normal((5, d))
    im, om = StreamMap(d, D, "zero"), StreamMap(d, D, "avg")
    W2, b2 = expand_out(W, 0, om, b)
    W2 = expand_in(W2, 1, im, r)
    assert err(im.apply(x) @ W2.T + b2, om.apply(x @ W.T + b)) < TOL


@pytest.mark.parametrize("d,D", FRACTIONAL)
def test_avg_leftover_rows_are_exact_negative_pairs(d, D):
    """Rows reading an avg leftover slot (value mean(x)) add nothing: +R/-R pairs, an odd
    last row 0; the copy rows are an exact split with no correction."""
    r = rng_(2)
    W = r.standard_normal((d, 3))
    im = StreamMap(d, D, "avg")
    W2 = expand_in(W, 0, im, r)
    left = W2[im.leftover_slots]
    assert np.array_equal(left.sum(axis=0), np.zeros(3))
    assert (np.count_nonzero(left) > 0) == (len(im.leftover_slots) >= 2)
    assert random_split_check(W, W2, 0, im.copy_sets) == 0.0
    x = r.standard_normal((4, d)) + 3.0
    assert err(im.apply(x) @ W2, x @ W) < TOL
    W3 = expand_in(W, 0, im, break_symmetry=False)
    assert np.all(W3[im.leftover_slots] == 0)
    assert err(im.apply(x) @ W3, x @ W) < TOL


# ---- norms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d,D", PAIRS)
def test_layernorm_avg_to_zero(d, D):
    r = rng_(3)
    g, b, eps = r.standard_normal(d), r.standard_normal(d), 1e-5
    x = r.standard_normal((6, d)) * 2 + 1
    im = StreamMap(d, D, "avg")
    g2, b2, eps2 = expand_norm(g, b, eps, im, r)
    om = norm_output_map(im)
    assert om.form == ("copies" if D % d == 0 else "zero")
    assert eps2 == pytest.approx(im.scale * eps)
    assert err(layernorm(im.apply(x), g2, b2, eps2), om.apply(layernorm(x, g, b, eps))) < TOL


@pytest.mark.parametrize("d,D", PAIRS)
def test_rmsnorm_zero_to_zero(d, D):
    r = rng_(4)
    g, eps = r.standard_normal(d), 1e-6
    x = r.standard_normal((6, d)) + 1
    im = StreamMap(d, D, "zero")
    g2, b2, eps2 = expand_norm(g, None, eps, im, r)
    assert b2 is None
    assert err(rmsnorm(im.apply(x), g2, eps2), StreamMap(d, D, "zero").apply(rmsnorm(x, g, eps))) < TOL


@pytest.mark.parametrize("d,D", FRACTIONAL)
def test_rmsnorm_on_avg_is_not_lossless(d, D):
    r = rng_(5)
    g, eps = np.ones(d), 1e-6
    x = r.standard_normal((6, d)) + 1.0  # non-zero mean: the avg leftover slots are not 0
    g2, _, eps2 = expand_norm(g, None, eps, StreamMap(d, D, "zero"))  # same parameters
    avg = StreamMap(d, D, "avg")
    out = avg.recover(rmsnorm(avg.apply(x), g2, eps2))
    assert err(out, rmsnorm(x, g, eps)) > 1e-3
    with pytest.raises(ValueError, match="'zero'-form input"):
        expand_norm(g, None, eps, avg)


@pytest.mark.parametrize("d,D", FRACTIONAL)
def test_norm_refusals(d, D):
    g = np.ones(d)
    with pytest.raises(ValueError, match="'avg'-form input"):
        expand_norm(g, np.zeros(d), 1e-5, StreamMap(d, D, "zero"))
    with pytest.raises(ValueError, match="lossless only"):
        expand_norm(g, np.zeros(d), 1e-5, StreamMap(d, D, "circ"))
    with pytest.raises(ValueError, match="lossless only"):
        expand_norm(g, None, 1e-5, StreamMap(d, D, "zero"), kind="layernorm")
    expand_norm(g, None, 1e-5, StreamMap(d, D, "avg"), kind="layernorm")  # LN without bias: fine


@pytest.mark.parametrize("d,D", FRACTIONAL)
def test_eps_rescale_is_needed(d, D):
    r = rng_(6)
    g, b, eps = r.standard_normal(d), r.standard_normal(d), 1e-5
    x = 1e-3 * r.standard_normal((6, d)) + 0.2  # variance ~ 1e-6, comparable to eps
    im = StreamMap(d, D, "avg")
    g2, b2, eps2 = expand_norm(g, b, eps, im)
    ref = layernorm(x, g, b, eps)
    assert err(im.recover(layernorm(im.apply(x), g2, b2, eps2)), ref) < 1e-10
    assert err(im.recover(layernorm(im.apply(x), g2, b2, eps)), ref) > 1e-3


@pytest.mark.parametrize("d,D,form", [(4, 8, "copies"), (8, 24, "avg"), (6, 12, "zero")])
def test_norm_integer_factor_tiles(d, D, form):
    r = rng_(7)
    g, b = r.standard_normal(d), r.standard_normal(d)
    g2, b2, eps2 = expand_norm(g, b, 1e-5, StreamMap(d, D, form))
    assert np.array_equal(g2, np.tile(g, D // d)) and np.array_equal(b2, np.tile(b, D // d))
    assert eps2 == 1e-5
    # Post-LN at an integer factor: copies in, copies out
    x = r.standard_normal((3, d))
    m = StreamMap(d, D, "copies")
    assert err(layernorm(m.apply(x), g2, b2, eps2), m.apply(layernorm(x, g, b, 1e-5))) < TOL


# ---- MLP -----------------------------------------------------------------------------------
def _mlp_weights(r, d, h, gated):
    W1, b1 = r.standard_normal((d, h)) / math.sqrt(d), r.standard_normal(h) * 0.1
    Wg = r.standard_normal((d, h)) / math.sqrt(d) if gated else None
    W2, b2 = r.standard_normal((h, d)) / math.sqrt(h), r.standard_normal(d) * 0.1
    return W1, b1, Wg, W2, b2


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("out_form", ["avg", "zero"])
@pytest.mark.parametrize("d,D", PAIRS)
def test_mlp(d, D, out_form, gated):
    r = rng_(8)
    h, H = 2 * d + 1, 2 * D + 1
    W1, b1, Wg, W2, b2 = _mlp_weights(r, d, h, gated)
    x = r.standard_normal((5, d))
    ref = (silu(x @ Wg) * (x @ W1 + b1) if gated else gelu(x @ W1 + b1)) @ W2 + b2
    im, hm, om = StreamMap(d, D, "zero"), StreamMap(h, H, "circ"), StreamMap(d, D, out_form)
    W1e, b1e = expand_out(W1, 1, hm, b1)
    W1e = expand_in(W1e, 0, im, r)
    if gated:
        Wge = expand_in(expand_out(Wg, 1, hm)[0], 0, im, r)
    W2e, b2e = expand_out(W2, 1, om, b2)
    W2e = expand_in(W2e, 0, hm, r)
    xe = im.apply(x)
    a = silu(xe @ Wge) * (xe @ W1e + b1e) if gated else gelu(xe @ W1e + b1e)
    assert err(a @ W2e + b2e, om.apply(ref)) < TOL


# ---- attention -----------------------------------------------------------------------------
def _attn_weights(r, d, n_q, n_kv, hd):
    def lin(i, o):
        return r.standard_normal((i, o)) / math.sqrt(i), r.standard_normal(o) * 0.1
    return (*lin(d, n_q * hd), *lin(d, n_kv * hd), *lin(d, n_kv * hd), *lin(n_q * hd, d))


def _expand_attn(ws, r, im, om, q_map, kv_map):
    Wq, bq, Wk, bk, Wv, bv, Wo, bo = ws
    out = []
    for W, b, hm in ((Wq, bq, q_map), (Wk, bk, kv_map), (Wv, bv, kv_map)):
        W2, b2 = expand_out(W, 1, hm, b)
        out += [expand_in(W2, 0, im, r), b2]
    Wo2, bo2 = expand_out(Wo, 1, om, bo)
    return out + [expand_in(Wo2, 0, q_map, r), bo2]


@pytest.mark.parametrize("out_form", ["avg", "zero"])
@pytest.mark.parametrize("n,N,hd", [(2, 3, 4), (2, 4, 4), (3, 5, 2), (4, 6, 3)])
@pytest.mark.parametrize("d,D", [(4, 6), (8, 10), (8, 24)])
def test_attention_heads(d, D, n, N, hd, out_form):
    r = rng_(9)
    ws = _attn_weights(r, d, n, n, hd)
    x = r.standard_normal((6, d))
    ref = attention(x, *ws, n, n, hd)
    im, om = StreamMap(d, D, "zero"), StreamMap(d, D, out_form)
    hm = UnitMap(n, N, hd)
    we = _expand_attn(ws, r, im, om, hm, hm)
    assert err(attention(im.apply(x), *we, N, N, hd), om.apply(ref)) < TOL


@pytest.mark.parametrize("N_q,N_kv", [(10, 5), (12, 6), (16, 8), (8, 4)])
def test_gqa_attention(N_q, N_kv):
    r = rng_(10)
    d, D, hd, n_q, n_kv = 8, 10, 2, 8, 4
    q_map, kv_map = gqa_maps(n_q, n_kv, N_q, N_kv, hd)
    g = n_q // n_kv
    assert np.array_equal(q_map.unit_src // g, kv_map.unit_src[np.arange(N_q) // g])
    ws = _attn_weights(r, d, n_q, n_kv, hd)
    x = r.standard_normal((5, d))
    im, om = StreamMap(d, D, "zero"), StreamMap(d, D, "zero")
    we = _expand_attn(ws, r, im, om, q_map, kv_map)
    assert err(attention(im.apply(x), *we, N_q, N_kv, hd), om.apply(attention(x, *ws, n_q, n_kv, hd))) < TOL


@pytest.mark.parametrize("n_q,n_kv,N_q,N_kv,msg", [
    (4, 2, 5, 2, "nearest valid: 4 query / 2 KV heads or 6 query / 3 KV heads"),
    (4, 2, 5, 3, "not a multiple of the group size 2"),
    (8, 4, 16, 4, "changes the group size from 2 to 4"),
    (8, 4, 12, 5, "use 6 KV heads"),
    (6, 4, 12, 8, "not an integer group size"),
    (8, 4, 6, 3, "cannot shrink"),
])
def test_gqa_refusals(n_q, n_kv, N_q, N_kv, msg):
    with pytest.raises(ValueError, match=msg):
        gqa_maps(n_q, n_kv, N_q, N_kv, 4)


# ---- symmetry breaking ---------------------------------------------------------------------
def test_symmetry_is_broken():
    r = rng_(11)
    h, H, d = 6, 10, 4
    W2 = r.standard_normal((h, d))
    hm = StreamMap(h, H, "circ")
    W2e = expand_in(W2, 0, hm, r)
    for C in hm.copy_sets:
        if len(C) > 1:
            assert not np.allclose(W2e[C[0]], W2e[C[1]])
    assert random_split_check(W2, W2e, 0, hm.copy_sets) < TOL
    flat = expand_in(W2, 0, hm, break_symmetry=False)
    # as equal as the dtype allows (shares of ulp(W) granularity), and exact
    assert np.all(np.abs(flat[0] - W2[0] / 2) <= np.spacing(np.abs(W2[0])))
    assert np.array_equal(flat[0] + flat[6], W2[0])
    # heads: per-element copy sets of the out-projection input
    qm = UnitMap(2, 3, 4)
    Wo = r.standard_normal((8, d))
    Woe = expand_in(Wo, 0, qm, r)
    assert not np.allclose(Woe[0], Woe[8])
    assert random_split_check(Wo, Woe, 0, qm.copy_sets) < TOL


def test_deterministic_and_dtypes():
    W = np.random.default_rng(0).standard_normal((6, 4))
    m = StreamMap(6, 9, "avg")
    a = expand_in(W, 0, m, rng_(5))
    b = expand_in(W, 0, m, rng_(5))
    assert np.array_equal(a, b)
    for dt, tol in ((np.float32, 1e-5), (np.float16, 1e-2)):
        Wd = W.astype(dt)
        e = expand_in(Wd, 0, m, rng_(5))
        assert e.dtype == dt and expand_out(Wd, 1, StreamMap(4, 6, "avg"))[0].dtype == dt
        x = np.ones((1, 6))
        assert err(m.apply(x) @ e.astype(np.float64), x @ Wd.astype(np.float64)) < tol
        g2, b2, _ = expand_norm(np.ones(6, dt), np.zeros(6, dt), 1e-5, m)
        assert g2.dtype == dt and b2.dtype == dt


# ---- embeddings ----------------------------------------------------------------------------
@pytest.mark.parametrize("d,D", PAIRS)
def test_embedding_then_layernorm(d, D):
    r = rng_(12)
    E = r.standard_normal((11, d))
    m = StreamMap(d, D, "avg")
    E2 = expand_embedding(E, 1, m)
    assert np.allclose(E2[:, m.leftover_slots], E.mean(1, keepdims=True))
    ids = np.array([3, 1, 10, 3])
    g, b = r.standard_normal(d), r.standard_normal(d)
    g2, b2, eps2 = expand_norm(g, b, 1e-5, m)
    assert err(layernorm(E2[ids], g2, b2, eps2), norm_output_map(m).apply(layernorm(E[ids], g, b, 1e-5))) < TOL
    # Conv output channels [C_out, C_in, kh, kw]: axis 0
    K = r.standard_normal((d, 3, 2, 2))
    assert expand_embedding(K, 0, m).shape == (D, 3, 2, 2)


# ---- a whole pre-norm block ----------------------------------------------------------------
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("d,D", PAIRS)
def test_prenorm_block(d, D, norm):
    r = rng_(13)
    n, hd = 2, 3
    N = n * D // d if (n * D) % d == 0 else n + 1
    stream = StreamMap(d, D, "avg" if norm == "layernorm" else "zero")
    ws = _attn_weights(r, d, n, n, hd)
    W1, b1, _, W2, b2 = _mlp_weights(r, d, 4 * d, False)
    g1, g2 = r.standard_normal(d), r.standard_normal(d)
    be1, be2 = (r.standard_normal(d), r.standard_normal(d)) if norm == "layernorm" else (None, None)
    eps = 1e-5

    def nrm(x, g, b, e):
        return layernorm(x, g, b, e) if norm == "layernorm" else rmsnorm(x, g, e)

    def block(x, ws, W1, b1, W2, b2, g1, be1, e1, g2, be2, e2, heads):
        x = x + attention(nrm(x, g1, be1, e1), *ws, heads, heads, hd)
        return x + gelu(nrm(x, g2, be2, e2) @ W1 + b1) @ W2 + b2

    x = r.standard_normal((5, d)) + 0.3
    ref = block(x, ws, W1, b1, W2, b2, g1, be1, eps, g2, be2, eps, n)
    nm = norm_output_map(stream)
    hm, mm = UnitMap(n, N, hd), StreamMap(4 * d, 4 * D, "circ")
    we = _expand_attn(ws, r, nm, stream, hm, hm)
    W1e, b1e = expand_out(W1, 1, mm, b1)
    W1e = expand_in(W1e, 0, nm, r)
    W2e, b2e = expand_out(W2, 1, stream, b2)
    W2e = expand_in(W2e, 0, mm, r)
    G1, B1, E1 = expand_norm(g1, be1, eps, stream, r)
    G2, B2, E2 = expand_norm(g2, be2, eps, stream, r)
    out = block(stream.apply(x), we, W1e, b1e, W2e, b2e, G1, B1, E1, G2, B2, E2, N)
    assert err(out, stream.apply(ref)) < 1e-11


# ---- depth ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d,D", [(4, 6), (6, 9), (8, 24), (8, 8)])
def test_depth_cancel_with_width_map(d, D):
    r = rng_(14)
    h, H = 2 * d, 2 * D
    W1, b1, _, W2, b2 = _mlp_weights(r, d, h, False)
    im, hm, om = StreamMap(d, D, "zero"), StreamMap(h, H, "circ"), StreamMap(d, D, "avg")
    W1e, b1e = expand_out(W1, 1, hm, b1)
    W1e = expand_in(W1e, 0, im, r)
    W2e = expand_in(expand_out(W2, 1, om)[0], 0, hm, r)
    Wc, fanin = cancel_fanout(W2e, 0, hm, r)
    assert np.array_equal(fanin, np.arange(H))
    if D > d:
        assert np.count_nonzero(Wc) > 0
    x = im.apply(r.standard_normal((5, d)))
    assert err(gelu(x @ W1e + b1e) @ Wc, 0) < TOL
    # units with a single copy get zero rows
    for C in hm.copy_sets:
        if len(C) == 1:
            assert np.all(Wc[C[0]] == 0)
    assert np.all(zero_fanout(W2e) == 0) and zero_fanout(W2e).shape == W2e.shape


@pytest.mark.parametrize("h", [6, 7])
def test_depth_cancel_without_width_pairs_units(h):
    r = rng_(15)
    d = 4
    W1, b1, _, W2, _ = _mlp_weights(r, d, h, False)
    Wc, fanin = cancel_fanout(W2, 0, None, r)
    assert np.count_nonzero(Wc) >= 2 * (h // 2) * d
    W1p, b1p = W1[:, fanin], b1[fanin]  # the caller's side of the contract
    x = r.standard_normal((5, d))
    assert err(gelu(x @ W1p + b1p) @ Wc, 0) < TOL
    assert err(gelu(x @ W1 + b1) @ Wc, 0) > 1e-3  # without the fan-in pairing it does not cancel


def test_depth_cancel_attention_heads():
    r = rng_(16)
    d, n, hd = 8, 4, 2
    ws = list(_attn_weights(r, d, n, n, hd))
    Wo, fanin = cancel_fanout(ws[6], 0, None, r, unit_size=hd)
    assert fanin.tolist() == [0, 1, 0, 1, 4, 5, 4, 5]
    for i in range(6):  # q, k, v columns and biases of head 2i+1 copy head 2i
        ws[i] = ws[i][..., fanin]
    ws[6], ws[7] = Wo, np.zeros(d)
    assert np.count_nonzero(Wo) > 0
    assert err(attention(r.standard_normal((5, d)), *ws, n, n, hd), 0) < TOL
    # with a head map from width growth
    hm = UnitMap(2, 3, hd)
    ws = list(_attn_weights(r, d, 2, 2, hd))
    im = StreamMap(d, 10, "zero")
    we = _expand_attn(ws, r, im, StreamMap(d, 10, "zero"), hm, hm)
    we[6], _ = cancel_fanout(we[6], 0, hm, r)
    we[7] = np.zeros(10)
    assert np.count_nonzero(we[6]) > 0
    assert err(attention(im.apply(r.standard_normal((5, d))), *we, 3, 3, hd), 0) < TOL


@pytest.mark.parametrize("mk", [
    lambda: lm.StreamMap(4, 10, "avg"), lambda: lm.StreamMap(4, 10, "zero"),
    lambda: lm.StreamMap(4, 10, "circ"), lambda: lm.StreamMap(4, 12, "copies"),
    lambda: lm.UnitMap(3, 7, 4),
])
def test_fast_group_paths_match_the_definition(mk):
    """The reshape fast path of _group_sums against a plain loop; _exact_split's parts sum
    exactly to the base over every copy set."""
    m = mk()
    rng = np.random.default_rng(0)
    src = m.src_index
    vals = rng.standard_normal((len(src), 3))
    naive = np.zeros((m.d, 3))
    for c, j in enumerate(src):
        if j >= 0:
            naive[j] += vals[c]
    np.testing.assert_allclose(lm._group_sums(vals, src, m.d), naive, atol=1e-12)
    base = rng.standard_normal((m.d, 3)).astype(np.float32).astype(np.float64)
    out = lm._exact_split(m.d, src, base, np.float32, rng, 0.5)
    sums = np.zeros((m.d, 3))
    for c, j in enumerate(src):
        if j >= 0:
            sums[j] += out[c]
        else:
            assert np.all(out[c] == 0)
    assert np.array_equal(sums, base)
    assert np.array_equal(out.astype(np.float32).astype(np.float64), out)  # representable

"""LEMON's lossless expansion rules on plain numpy arrays (specification: docs/lemon-math.md).

No ONNX here.  A *map* says where each coordinate of a width-d axis goes in the expanded
width-D axis (``src_index[c]`` = source coordinate copied into slot ``c``, -1 = leftover slot);
the functions below expand weights so that a layer fed the expanded form of its original input
produces the expanded form of its original output.  Randomness (symmetry breaking) comes only
from the ``numpy.random.Generator`` passed in, so results are deterministic given it.  Every
function computes in float64 and casts back to the dtype of its input array; for float32
weights the same bits come from float32 arithmetic where that is exact (``FAST_FLOAT32``:
the splits from each value's exponent and significand, the grid-rounded random rows in
pieces), and float64 reductions go in cache-sized pieces summed the way numpy sums a whole
array, so no float64 copy of a weight is made (tests/test_fast_math.py checks the bits).

Errors are ``ValueError`` with a message that names the nearest valid sizes; callers translate
them into the project's error classes.

Exact in the storage dtype (lemon-math.md, "Exact in the storage dtype").  Every split and
every cancellation holds bit for bit in the array's own dtype (float64, float32, float16,
bfloat16), so the expanded model equals its source when both run in float64:

- input-side splits: the parts of W[j] over its copy set are integer multiples of ulp(W[j]),
  each truncated toward zero from a random positive share of W[j], and the last part is
  W[j] minus the others: every part is representable and their sum is W[j] exactly;
- rows reading an ``avg`` leftover slot come in exact negative pairs (+R, -R; an odd last
  row 0), so they add nothing and the copy rows need no correction;
- cancelling fan-out rows of twin blocks are multiples of a power of two small enough that
  the last row of each copy set, minus the sum of the others, is exact; pairs are +R/-R.

Not exact by nature, and left to the graph level (``passes/width.py``, ``rounded_constants``):
the norm scale sqrt(k*d/D) and epsilon k*d/D*eps of a fractional width (irrational or not
dyadic), and an ``avg`` leftover slot's mean (1/d times a sum).  Integer factors need neither.

``noise_scale`` (s, relative): split shares are (1 + min(s, 0.9)*u) normalised, u uniform in
[-1, 1]; random rows (leftover slots, cancelling fan-out) have standard deviation s times the
weights' own.
"""

from __future__ import annotations

import math

import numpy as np

FORMS = ("copies", "avg", "zero", "circ")

__all__ = [
    "FORMS", "StreamMap", "UnitMap", "gqa_maps", "norm_output_map", "expand_out", "expand_in",
    "expand_norm", "expand_embedding", "cancel_fanout", "zero_fanout", "random_split_check",
]


#: default of ``noise_scale`` (module docstring).  Measured on SmolLM2-135M at width 2 and
#: depth 2 (float32 error against the source's float64 output, as a multiple of the source's
#: own float32 error): 1.27x at 0.03, 1.49x at 0.1, 1.71x at 0.3, 1.47x at 0.5, 1.42x at 1.0,
#: all exact in float64 (<= 2e-14): the cost is flat, so the default keeps replicas well apart
#: (pair shares between 1/4 and 3/4, random rows at half the weights' std).
NOISE_SCALE = 0.5

#: float32 weights take the float32 paths (``_Split.rows_f32``, ``_grid_normals_f32``), and
#: float64 reductions and gathers go in cache-sized pieces (``_std64``, ``_mean64``, slice
#: copies in ``apply``): the same bits as the straightforward float64 computation on whole
#: arrays, at a fraction of its memory traffic.  False computes the straightforward way (the
#: reference tests/test_fast_math.py compares with).
FAST_FLOAT32 = True
#: float64 bytes of one chunk in those paths (kept in cache)
ROW_CHUNK_BYTES = 512 << 10


def _digits(dt) -> tuple[int, int]:
    """(significand bits, exponent of the smallest subnormal) of a float dtype."""
    dt = np.dtype(dt)
    if dt.name == "bfloat16":
        return 8, -133
    try:
        fi = np.finfo(dt)
    except (TypeError, ValueError):
        raise ValueError(f"not a float dtype: {dt}") from None
    return int(fi.nmant) + 1, int(fi.minexp) - int(fi.nmant)


def _ulp(a: np.ndarray, dt) -> np.ndarray:
    """ulp of each value of ``a`` (float64 holding values of ``dt``) in ``dt``."""
    p, sub = _digits(dt)
    _, e = np.frexp(a)
    return np.ldexp(1.0, np.maximum(e - p, sub))


def _grid(sigma: float, count: int, dt) -> float:
    """A power of two g such that sums of ``count`` multiples of g of size up to 8 sigma stay
    exactly representable in ``dt``."""
    p, sub = _digits(dt)
    need = 8.0 * max(sigma, 1e-30) * max(count, 1)
    return float(np.ldexp(1.0, max(int(np.ceil(np.log2(need))) - p + 1, sub)))


def _on_grid(R: np.ndarray, g: float) -> np.ndarray:
    """``rint(R / g) * g``, computed in place in ``R`` (float64; the same operations)."""
    np.divide(R, g, out=R)
    np.rint(R, out=R)
    return np.multiply(R, g, out=R)


#: elements of one leaf of ``_sum64`` (a power of two: the leaves are float64 copies that
#: stay in cache)
_LEAF = 1 << 16


def _sum64(x: np.ndarray, f, lo: int = 0, n: int | None = None) -> np.float64:
    """``np.add.reduce(f(x))`` for a 1-D ``x`` and an elementwise ``f`` giving float64, bit
    for bit, without ``f(x)`` in memory: numpy sums a contiguous float64 array pairwise
    (halves cut at a multiple of 8 down to 128 elements), so the same halving down to
    ``_LEAF`` elements, each leaf summed by numpy, gives the same tree of additions."""
    n = x.size if n is None else n
    if n <= max(_LEAF, 128):  # numpy does not halve 128 elements or fewer
        return np.add.reduce(f(x[lo:lo + n]))
    n2 = n // 2
    n2 -= n2 % 8
    return _sum64(x, f, lo, n2) + _sum64(x, f, lo + n2, n - n2)


def _std64(W: np.ndarray) -> float:
    """``W.astype(np.float64).std()`` bit for bit (with any axes moved: a whole-array
    reduction runs in memory order), in cache-sized pieces instead of float64 copies of W:
    the mean, then the mean of squared deviations, each summed as numpy sums (``_sum64``)."""
    x = np.ravel(W, order="K")
    n = x.size
    if n == 0:
        return float(W.astype(np.float64).std())
    mean = (np.float64(0.0) + _sum64(x, lambda c: c.astype(np.float64))) / n
    def dev2(c):
        y = np.subtract(c.astype(np.float64), mean)
        return np.square(y, out=y)

    sq = _sum64(x, dev2)
    return float(np.sqrt((np.float64(0.0) + sq) / n))


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def _axis(a: np.ndarray, axis: int) -> int:
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis {axis} out of range for an array of shape {a.shape}")
    return axis % a.ndim


def _multiples_near(n: int, m: int) -> str:
    lo, hi = (n // m) * m, (n // m + 1) * m
    return f"{lo} or {hi}" if lo > 0 else f"{hi}"


#: ``apply`` copies slices when a layout has at most this many runs (else one ``np.take``)
MAX_RUNS = 64


def _at(ndim: int, axis: int, index) -> tuple:
    """An index tuple selecting ``index`` along ``axis``."""
    idx = [slice(None)] * ndim
    idx[axis] = index
    return tuple(idx)


def _mean64(x: np.ndarray, ax: int) -> np.ndarray:
    """``x.astype(np.float64).mean(axis=ax, keepdims=True)`` bit for bit, a slab of the other
    axis at a time (each mean is reduced the same way in a slab as in the whole array: the
    slab keeps the memory layout), so no float64 copy of a whole table is made."""
    if x.ndim != 2 or not FAST_FLOAT32:
        return x.astype(np.float64).mean(axis=ax, keepdims=True)
    other = 1 - ax
    shape = list(x.shape)
    shape[ax] = 1
    out = np.empty(shape)
    per = max(1, ROW_CHUNK_BYTES // (8 * max(x.shape[ax], 1)))
    for a in range(0, x.shape[other], per):
        sl = _at(2, other, slice(a, a + per))
        out[sl] = x[sl].astype(np.float64).mean(axis=ax, keepdims=True)
    return out


class _IndexMap:
    """Shared behaviour of a layout ``src_index`` (length D, -1 for leftover slots)."""

    d: int
    D: int
    form: str
    src_index: np.ndarray

    @property
    def copy_sets(self) -> list[np.ndarray]:
        """For each source coordinate j, the target slots that hold a copy of x_j."""
        order = np.argsort(self.src_index, kind="stable")
        srt = self.src_index[order]
        starts = np.searchsorted(srt, np.arange(self.d))
        ends = np.searchsorted(srt, np.arange(self.d), side="right")
        return [order[a:b] for a, b in zip(starts, ends)]

    @property
    def leftover_slots(self) -> np.ndarray:
        """Slots that copy no coordinate (``avg``: hold mean(x); ``zero``: hold 0)."""
        return np.flatnonzero(self.src_index < 0)

    def apply(self, x, axis: int = -1) -> np.ndarray:
        """Lay the width-d ``x`` out in width D along ``axis`` (the table of forms in
        lemon-math.md, "Notation")."""
        x = np.asarray(x)
        ax = _axis(x, axis)
        if x.shape[ax] != self.d:
            raise ValueError(f"axis {axis} has size {x.shape[ax]}, the map expects {self.d}")
        # a gather in the storage dtype (exact); only an avg leftover needs arithmetic: its
        # mean is taken in float64 and rounded once
        runs = self.runs() if FAST_FLOAT32 else None
        if runs is not None and len(runs) <= MAX_RUNS:  # the same gather, as slice copies
            shape = list(x.shape)
            shape[ax] = self.D
            out = np.empty(shape, dtype=x.dtype)
            for c, j, n in runs:
                out[_at(x.ndim, ax, slice(c, c + n))] = x[_at(x.ndim, ax, slice(j, j + n))]
        else:
            out = np.take(x, np.where(self.src_index >= 0, self.src_index, 0), axis=ax)
        left = self.leftover_slots
        if left.size:
            out[_at(x.ndim, ax, left)] = (_mean64(x, ax).astype(x.dtype) if self.form == "avg"
                                          else 0)
        return out

    def runs(self) -> list[tuple[int, int, int]]:
        """(first slot, first source coordinate, length) of each run of consecutive source
        coordinates in ``src_index`` (a copy of the stream or of whole units is one run)."""
        src = self.src_index
        cut = np.flatnonzero((np.diff(src) != 1) | (src[1:] < 0) | (src[:-1] < 0)) + 1
        starts = np.concatenate([[0], cut]).astype(np.int64)
        ends = np.concatenate([cut, [len(src)]]).astype(np.int64)
        return [(int(a), int(src[a]), int(b - a)) for a, b in zip(starts, ends)
                if len(src) and src[a] >= 0]

    def recover(self, y, axis: int = -1) -> np.ndarray:
        """The original coordinates come first: ``y[..., :d]`` along ``axis``."""
        y = np.asarray(y)
        return np.take(y, np.arange(self.d), axis=_axis(y, axis))


class StreamMap(_IndexMap):
    """Layout of a width-d vector in width D: ``[x]*k`` then r leftover slots.

    form ``copies`` (r = 0 only), ``avg`` (leftover = mean(x)), ``zero`` (leftover = 0) or
    ``circ`` (leftover = x[:r]).  ``scale`` is s = k*d/D (lemon-math.md, "Notation").
    """

    def __init__(self, d: int, D: int, form: str):
        if form not in FORMS:
            raise ValueError(f"unknown stream form {form!r}; expected one of {FORMS}")
        if d <= 0 or D < d:
            raise ValueError(f"cannot lay width {d} out in width {D}: need 0 < d <= D")
        self.d, self.D, self.form = int(d), int(D), form
        self.k, self.r = D // d, D % d
        if form == "copies" and self.r:
            raise ValueError(f"form 'copies' needs an integer factor: {D} is not a multiple of "
                             f"{d}; nearest valid widths: {_multiples_near(D, d)}")
        tail = np.arange(self.r) if form == "circ" else np.full(self.r, -1)
        self.src_index = np.concatenate([np.tile(np.arange(d), self.k), tail]).astype(np.int64)
        self.scale = self.k * self.d / self.D

    def __repr__(self) -> str:
        return f"StreamMap(d={self.d}, D={self.D}, form={self.form!r})"


class UnitMap(_IndexMap):
    """``circ`` over whole units (attention heads): N = k*n + r units, i.e. k copies of all
    units, then units 0..r-1 once more; expanded to an element map of length N*unit_size
    (head_dim unchanged).  ``group``: the leftover unit count must be a multiple of it (GQA)."""

    form = "circ"

    def __init__(self, n_units: int, N_units: int, unit_size: int = 1, group: int = 1):
        if n_units <= 0 or unit_size <= 0 or N_units < n_units:
            raise ValueError(f"cannot expand {n_units} units of size {unit_size} to {N_units}")
        self.n_units, self.N_units, self.unit_size = int(n_units), int(N_units), int(unit_size)
        self.k, self.r = N_units // n_units, N_units % n_units
        if self.r % group:
            ok = [N for N in range(n_units, 2 * N_units + group * n_units)
                  if (N % n_units) % group == 0]
            near = sorted(ok, key=lambda N: (abs(N - N_units), N))[:2]
            raise ValueError(f"{N_units} units from {n_units}: the {self.r} leftover units are "
                             f"not a multiple of the group size {group}; nearest valid counts: "
                             f"{' or '.join(map(str, sorted(near)))}")
        self.d, self.D = n_units * unit_size, N_units * unit_size
        self.unit_src = np.arange(N_units, dtype=np.int64) % n_units
        self.src_index = (self.unit_src[:, None] * unit_size + np.arange(unit_size)).ravel()

    @property
    def unit_copy_sets(self) -> list[np.ndarray]:
        """For each source unit, the new units that are copies of it."""
        return [np.flatnonzero(self.unit_src == u) for u in range(self.n_units)]

    def __repr__(self) -> str:
        return f"UnitMap(n_units={self.n_units}, N_units={self.N_units}, unit_size={self.unit_size})"


def gqa_maps(n_q: int, n_kv: int, N_q: int, N_kv: int, head_dim: int) -> tuple[UnitMap, UnitMap]:
    """Head maps for grouped-query attention (lemon-math.md, "Attention heads", "GQA").

    New query head i copies source head ``qsrc[i] = i % n_q`` and sits in new group
    ``i // g`` (g = n_q // n_kv, unchanged) whose KV head copies source KV head
    ``(i // g) % n_kv == qsrc[i] // g``: every new query head reads a copy of the KV head its
    source head read.  Requires N_q = g * N_kv (so the q leftover is a multiple of g), except
    for one KV head kept as one (multi-query attention).
    """
    if min(n_q, n_kv, N_q, N_kv, head_dim) <= 0:
        raise ValueError("head counts and head_dim must be positive")
    if n_q % n_kv:
        raise ValueError(f"source model has {n_q} query heads and {n_kv} KV heads: not an "
                         f"integer group size")
    g = n_q // n_kv
    if N_q < n_q or N_kv < n_kv:
        raise ValueError(f"cannot shrink heads ({n_q}, {n_kv}) -> ({N_q}, {N_kv})")
    if n_kv == N_kv == 1:
        # multi-query attention stays multi-query: every query head, old or new, reads the one
        # KV head, so any query-head map is exact
        return UnitMap(n_q, N_q, head_dim), UnitMap(1, 1, head_dim)
    if N_q % g:
        lo, hi = (N_q // g) * g, (N_q // g + 1) * g
        opts = [f"{q} query / {q // g} KV heads" for q in (lo, hi) if q >= n_q]
        raise ValueError(f"{N_q} query heads is not a multiple of the group size {g} "
                         f"(= {n_q}/{n_kv}); nearest valid: {' or '.join(opts)}")
    if N_kv * g != N_q:
        raise ValueError(f"({N_q} query, {N_kv} KV) heads changes the group size from {g} to "
                         f"{N_q / N_kv:g}; with {N_q} query heads use {N_q // g} KV heads")
    q_map = UnitMap(n_q, N_q, head_dim, group=g)
    kv_map = UnitMap(n_kv, N_kv, head_dim)
    assert np.array_equal(q_map.unit_src // g, kv_map.unit_src[np.arange(N_q) // g])
    return q_map, kv_map


def norm_output_map(in_map: StreamMap) -> StreamMap:
    """Form of a norm's output given its input map: ``zero`` (``copies`` at integer factors)."""
    return StreamMap(in_map.d, in_map.D, "copies" if in_map.r == 0 else "zero")


def expand_out(W, axis: int, out_map: _IndexMap, bias=None):
    """Output side of a linear layer (lemon-math.md, "Linear layers", output side).

    ``axis`` is the output axis of ``W`` (1 for an ONNX MatMul weight [in, out], 0 for a Gemm
    with transB=1).  Copies/circ slots copy the source column; ``avg`` leftover columns are the
    mean of the original columns (the mean is linear, so they compute mean(y)); ``zero``
    leftover columns are 0.  ``bias`` (output axis last) follows the same map.
    Returns ``(W', b')`` (b' is None without bias).
    """
    W2 = out_map.apply(W, axis)
    b2 = None if bias is None else out_map.apply(bias, -1)
    return W2, b2


def _regular(src: np.ndarray, d: int) -> int:
    """k when ``src`` starts with k whole copies of arange(d) (the layouts LEMON uses), else 0."""
    k = len(src) // d
    return k if k and np.array_equal(src[:k * d], np.tile(np.arange(d), k)) else 0


def _group_sums(vals: np.ndarray, src: np.ndarray, d: int) -> np.ndarray:
    """Sum of ``vals[c]`` over the slots c of each copy set (src[c] = j >= 0)."""
    k = _regular(src, d)
    if k:
        # fast path: a reshape-sum instead of a sort and reduceat over the whole tensor
        out = vals[:k * d].reshape((k, d) + vals.shape[1:]).sum(axis=0)
        tail = src[k * d:]
        hit = tail >= 0
        if np.unique(tail[hit]).size == hit.sum():
            out[tail[hit]] += vals[k * d:][hit]
            return out
    keep = np.flatnonzero(src >= 0)
    order = keep[np.argsort(src[keep], kind="stable")]
    starts = np.searchsorted(src[order], np.arange(d))
    return np.add.reduceat(vals[order], starts, axis=0)


def _last_slots(src: np.ndarray, d: int) -> np.ndarray:
    """For each source coordinate j, the last slot of its copy set."""
    last = np.full(d, -1, dtype=np.int64)
    cp = np.flatnonzero(src >= 0)
    last[src[cp]] = cp  # later slots overwrite earlier ones
    if np.any(last < 0):
        raise ValueError("every source coordinate needs at least one copy")
    return last


class _Split:
    """The random shares of an input-side split (drawn once from ``rng``), applied to row
    blocks of any width: the columns of a weight are independent, so ``rows(base)`` on a
    slice of the columns gives that slice of the whole result, bit for bit."""

    def __init__(self, n_src: int, src: np.ndarray, dt, rng, jitter: float):
        cp = src >= 0
        self.n_src, self.src, self.dt, self.cp = n_src, src, dt, cp
        w = np.ones(len(src))
        if jitter > 0:
            w = 1.0 + min(jitter, 0.9) * rng.uniform(-1.0, 1.0, size=len(src))
        w[~cp] = 0.0
        self.share = w / _group_sums(w, src, n_src)[np.where(cp, src, 0)]
        self.last = _last_slots(src, n_src)
        rest = cp.copy()
        rest[self.last] = False
        self.idx = np.flatnonzero(rest)
        # one slot per source coordinate: the split is that coordinate itself, no arithmetic
        self.single = self.idx.size == 0
        self._groups = None

    def groups(self):
        """The copy sets by their number c of non-last slots: ``(js0, last0)`` for the
        coordinates with one slot, and per c ``(js, slots (c, len(js)), last, share23)``
        (``share23``: the slots' shares times 2**23, an exact scaling)."""
        if self._groups is None:
            counts = np.bincount(self.src[self.idx], minlength=self.n_src)
            order = self.idx[np.argsort(self.src[self.idx], kind="stable")]
            starts = np.cumsum(counts) - counts
            groups = []
            for c in np.unique(counts[counts > 0]):
                js = np.flatnonzero(counts == c)
                slots = order[starts[js][None, :] + np.arange(c)[:, None]]
                groups.append((js, slots, self.last[js], self.share[slots] * 2.0 ** 23))
            js0 = np.flatnonzero(counts == 0)
            self._groups = (js0, self.last[js0], groups)
        return self._groups

    def rows_f32(self, flat: np.ndarray, out: np.ndarray) -> bool:
        """``rows`` for float32 weights, computed in float32 and the one float64 product,
        equal bit for bit: fills the copy rows of ``out`` (float32, len(src) rows) from
        ``flat`` (float32, n_src rows), chunks of rows at a time.  False (``out`` partly
        written) when ``flat`` holds an inf or NaN: use ``rows`` then.

        Why it is the same: for b = flat[j] with biased exponent E (E' = max(E, 1)), the
        ulp is q = 2**(E'-150) and M = b/q is b's integer significand; ``rows`` computes
        trunc(fl64(share*b)/q)*q = trunc(fl64(share*M))*q (a power-of-two scaling commutes
        with rounding), here ``share23 * (b / 2**(E'-127))``.  Each part is n*q with
        |n| <= |M| < 2**24, so exact in float32; the parts of a copy set share b's sign and
        sum to at most |b|, so their sum and b minus it are exact in float32 too; the sum
        ``rows`` subtracts includes the last slot's +0.0, hence the ``+ 0`` (a sum of -0.0
        parts is +0.0 there)."""
        js0, last0, groups = self.groups()
        if js0.size:
            out[last0] = flat[js0]
        cols = flat.shape[1] if flat.ndim > 1 else 1
        step = max(1, ROW_CHUNK_BYTES // (8 * max(cols, 1)))
        for js, slots, last, share23 in groups:
            for a in range(0, len(js), step):
                sl = slice(a, a + step)
                base = flat[js[sl]]
                E = base.view(np.int32) >> 23
                E &= 0xFF
                if E.size and E.max() == 255:
                    return False
                np.maximum(E, 1, out=E)
                E <<= 23
                s = E.view(np.float32)  # 2**(E'-127)
                m = base / s  # exact: the significand over 2**23
                np.multiply(s, np.float32(2.0 ** -23), out=s)  # q, exact (subnormal too)
                total = None
                for i in range(len(slots)):
                    t = np.multiply(m, share23[i, sl, None])  # float64, as rows computes
                    np.trunc(t, out=t)
                    part = t.astype(np.float32)
                    part *= s
                    out[slots[i, sl]] = part
                    total = part if total is None else np.add(total, part, out=total)
                np.add(total, np.float32(0.0), out=total)
                np.subtract(base, total, out=total)
                out[last[sl]] = total
        return True

    def rows(self, base: np.ndarray) -> np.ndarray:
        """float64 rows (len(src), ...) for ``base`` (float64 values of ``dt``)."""
        out = np.zeros((len(self.src),) + base.shape[1:])
        if self.single:
            out[self.last] = base
            return out
        b = base[self.src[self.idx]]
        q = _ulp(b, self.dt)
        shape = (-1,) + (1,) * (base.ndim - 1)
        out[self.idx] = np.trunc(self.share[self.idx].reshape(shape) * b / q) * q
        out[self.last] = base - _group_sums(out, self.src, self.n_src)
        return out


def _exact_split(n_src: int, src: np.ndarray, base: np.ndarray, dt, rng, jitter: float
                 ) -> np.ndarray:
    """Rows whose parts over each copy set sum exactly (in ``dt``) to ``base[j]``; 0 on
    leftover slots.  ``base`` holds float64 values of ``dt``; the result too."""
    return _Split(n_src, src, dt, rng, jitter).rows(base)


#: float64 bytes of one column block in ``expand_in`` (the work is blockwise: bounded memory
#: and cache-friendly, with results identical to one pass over the whole tensor)
BLOCK_BYTES = 8 << 20


def _normal_rows(rng: np.random.Generator, out: np.ndarray, rows: np.ndarray,
                 sigma: float) -> None:
    """``out[rows] = (rng.standard_normal((len(rows), cols)) * sigma).astype(out.dtype)``,
    drawn in cache-sized pieces (consecutive draws continue one stream), without the
    float64 array."""
    cols = out.shape[1]
    per = max(1, ROW_CHUNK_BYTES // (8 * max(cols, 1)))
    buf = np.empty(min(per, len(rows)) * cols)
    for a in range(0, len(rows), per):
        b = buf[:min(per, len(rows) - a) * cols]
        rng.standard_normal(out=b)
        b *= sigma
        out[rows[a:a + per]] = b.reshape(-1, cols)


def expand_in(W, axis: int, in_map: _IndexMap, rng=None, break_symmetry: bool = True,
              init_scale: float | None = None, noise_scale: float = NOISE_SCALE) -> np.ndarray:
    """Input side of a linear layer (lemon-math.md, "Linear layers", input side).

    ``axis`` is the input axis of ``W`` (0 for ONNX MatMul [in, out]).  Lossless condition:
    for each source coordinate j with copy set C_j, sum_{c in C_j} W'[c] = W[j], here exactly
    in W's dtype (module docstring).  With ``break_symmetry`` (LEMON's point over Net2Net) the
    shares are random (jitter ``noise_scale``), so replicas differ; without it they are as
    equal as the dtype allows.  Rows reading a ``zero`` leftover slot are random (std
    ``noise_scale`` x ``init_scale``, default the std of W): they multiply an exact 0.  Rows
    reading an ``avg`` leftover slot (value mean(x)) are exact negative pairs +R/-R (an odd
    last one 0): they add nothing.  ``in_map`` may be a StreamMap or a UnitMap.

    Computed in column blocks of ``BLOCK_BYTES`` (float64) with the random draws made once,
    so the result does not depend on the block size; a coordinate with a single copy is
    copied without arithmetic.
    """
    W = np.asarray(W)
    ax = _axis(W, axis)
    if W.shape[ax] != in_map.d:
        raise ValueError(f"input axis has size {W.shape[ax]}, the map expects {in_map.d}")
    dt = W.dtype
    Wm = np.moveaxis(W, ax, 0)
    rng = _rng(rng)
    src = in_map.src_index
    split = _Split(in_map.d, src, dt, rng, noise_scale if break_symmetry else 0.0)
    left = in_map.leftover_slots
    flat = Wm.reshape(in_map.d, -1)
    cols = flat.shape[1]
    out = np.empty((len(src), cols), dtype=dt)
    R = None
    if left.size and break_symmetry:
        sigma = (_std64(W) if init_scale is None else float(init_scale)) * noise_scale
        if FAST_FLOAT32:  # drawn in pieces straight into the rows
            _normal_rows(rng, out, left, sigma)
            R = out[left] if in_map.form == "avg" else None
        else:
            R = rng.standard_normal((left.size,) + Wm.shape[1:])
            R *= sigma
            R = R.astype(dt).reshape(left.size, -1)
        if in_map.form == "avg":  # representable, so -R is its exact negative
            R[1::2] = -R[0::2][: left.size // 2]
            if left.size % 2:
                R[-1] = 0
        if R is not None:
            out[left] = R
    elif left.size:
        out[left] = 0
    if split.single:  # copies only: gather the rows in the storage dtype
        out[split.last] = flat
    elif not (FAST_FLOAT32 and dt == np.float32 and split.rows_f32(flat, out)):
        step = max(1, BLOCK_BYTES // (8 * len(src)))
        Rf = out[left] if left.size else None  # the leftover rows, as set above
        for a in range(0, max(cols, 1), step):
            block = split.rows(flat[:, a:a + step].astype(np.float64))
            if Rf is not None:
                block[left] = Rf[:, a:a + step]
            out[:, a:a + step] = block
    return np.moveaxis(out.reshape((len(src),) + Wm.shape[1:]), 0, ax)


def expand_norm(gamma, beta, eps: float, in_map: StreamMap, rng=None, kind: str | None = None):
    """LayerNorm / RMSNorm over the expanded axis (lemon-math.md, "Norm layers").

    ``kind`` defaults to "rmsnorm" when ``beta`` is None, else "layernorm" (pass
    kind="layernorm" for a LayerNorm without bias).  Integer factor (r = 0): gamma and beta
    tiled, eps unchanged.  Otherwise LayerNorm needs ``avg`` input (mean over D = mean(x),
    variance over D = s*var(x)) and RMSNorm needs ``zero`` input (mean square over D =
    s*ms(x)): gamma' = sqrt(s)*[gamma]*k + leftover, beta' = [beta]*k + [0]*r, eps' = s*eps.
    Leftover gamma entries multiply an exact 0 so any value is lossless: sqrt(s)*gamma at
    random source coordinates when ``rng`` is given, else sqrt(s)*gamma[:r].
    The output is in ``norm_output_map(in_map)`` form.  Returns ``(gamma', beta', eps')``.
    """
    kind = kind or ("rmsnorm" if beta is None else "layernorm")
    if kind not in ("layernorm", "rmsnorm"):
        raise ValueError(f"unknown norm kind {kind!r}")
    if not isinstance(in_map, StreamMap):
        raise ValueError("a norm's input axis needs a StreamMap")
    gamma = np.asarray(gamma)
    if gamma.shape != (in_map.d,):
        raise ValueError(f"gamma has shape {gamma.shape}, the map expects ({in_map.d},)")
    d, D, k, r = in_map.d, in_map.D, in_map.k, in_map.r
    g = gamma.astype(np.float64)
    b = None if beta is None else np.asarray(beta).astype(np.float64)
    if r == 0:
        g2, b2, eps2 = np.tile(g, k), None if b is None else np.tile(b, k), float(eps)
    else:
        need = "avg" if kind == "layernorm" else "zero"
        if in_map.form != need:
            why = ("its mean over D differs from mean(x)" if kind == "layernorm"
                   else "its mean square over D is not s*mean(x^2)")
            raise ValueError(
                f"{kind} over width {d} -> {D} (factor {D / d:g}) is lossless only with "
                f"'{need}'-form input, got '{in_map.form}': {why}. Use a '{need}' stream or an "
                f"integer factor (D = {_multiples_near(D, d)}).")
        s = in_map.scale
        pick = (_rng(rng).integers(0, d, size=r) if rng is not None else np.arange(r))
        g2 = math.sqrt(s) * np.concatenate([np.tile(g, k), g[pick]])
        b2 = None if b is None else np.concatenate([np.tile(b, k), np.zeros(r)])
        eps2 = float(s * eps)
    g2 = g2.astype(gamma.dtype, copy=False)
    b2 = None if b2 is None else b2.astype(np.asarray(beta).dtype, copy=False)
    return g2, b2, eps2


def expand_embedding(E, axis: int, stream_map: StreamMap) -> np.ndarray:
    """Hidden axis of an embedding table, cls token, position embedding or patch Conv output
    channels (lemon-math.md, "Embeddings"): the stream form; ``avg`` leftover = mean over the
    hidden axis of each row (the Conv bias follows the same map)."""
    return stream_map.apply(E, axis)


def _grid_normals_f32(rng: np.random.Generator, shape: tuple, sigma: float, g: float,
                      count: int) -> np.ndarray | None:
    """``_on_grid(rng.standard_normal(shape) * sigma, g)`` in float32, bit for bit, drawn and
    rounded in cache-sized pieces (consecutive draws continue one stream).  Every value is
    m*g with an integer |m| < 2**24 / ``count``, so the values and any sum of ``count`` of
    them are exact in float32, as they are in float64.  None, with ``rng`` put back, when a
    draw is too far out for that (beyond about 16 sigma): compute in float64 then."""
    state = rng.bit_generator.state
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1)
    limit = 2.0 ** 24 / max(count, 1)
    buf = np.empty(min(flat.size, ROW_CHUNK_BYTES // 8))
    for a in range(0, flat.size, max(buf.size, 1)):
        b = buf[:min(buf.size, flat.size - a)]
        rng.standard_normal(out=b)
        np.multiply(b, sigma, out=b)
        np.divide(b, g, out=b)
        np.rint(b, out=b)
        if max(b.max(), -b.min()) >= limit:
            rng.bit_generator.state = state
            return None
        np.multiply(b, g, out=b)
        flat[a:a + b.size] = b
    return out


def cancel_fanout(W_out, axis_in: int, in_map: _IndexMap | None = None, rng=None,
                  init_scale: float | None = None, unit_size: int = 1,
                  noise_scale: float = NOISE_SCALE):
    """Fan-out weights of a twin block whose branch output must be exactly zero
    (lemon-math.md, "Depth", sum-to-zero).  ``axis_in`` is the input axis of the out/down
    projection ``W_out``; the caller zeroes its bias.

    With ``in_map`` (the width map of the projection's input, len D = W_out.shape[axis_in]):
    replicas of one unit compute the same activation, so their rows sum to exactly 0 over the
    copy set (random rows on a power-of-two grid, the last one minus the sum of the others);
    units with one copy get zero rows, ``zero`` leftover slots (input 0) random rows.  The
    rows' std is ``noise_scale`` times the weights' (``init_scale``).  Returns
    ``(W', arange(D))``.

    Without ``in_map`` (no width growth) units of ``unit_size`` elements are paired: unit 2i
    gets +R, unit 2i+1 gets -R, an odd last unit 0.  This cancels only if paired units compute
    the same activation, so the caller MUST rebuild the twin's fan-in outputs (the columns and
    bias of the up/gate projection, or the V (and Q, K for whole heads) columns) with the
    returned ``fanin_src``: ``W_in' = take(W_in, fanin_src, axis=out_axis)``, which makes unit
    2i+1 a copy of unit 2i.  Returns ``(W', fanin_src)``.
    """
    W = np.asarray(W_out)
    dt = W.dtype
    ax = _axis(W, axis_in)
    shape = np.moveaxis(W, ax, 0).shape
    n = shape[0]
    sigma = _std64(W) if init_scale is None else float(init_scale)
    sigma = (sigma or 0.02) * noise_scale
    rng = _rng(rng)
    if in_map is not None:
        if n != in_map.D:
            raise ValueError(f"input axis has size {n}, the map gives {in_map.D}")
        src = in_map.src_index
        cnt = np.bincount(src[src >= 0], minlength=in_map.d)
        g = _grid(sigma, int(cnt.max()), dt)
        R = None
        if FAST_FLOAT32 and dt == np.float32:
            R = _grid_normals_f32(rng, shape, sigma, g, int(cnt.max()))
        if R is None:
            R = rng.standard_normal(shape)
            R = _on_grid(np.multiply(R, sigma, out=R), g)
        last = _last_slots(src, in_map.d)
        left = in_map.leftover_slots
        keep = R[left] if in_map.form == "zero" and left.size else None  # (a copy)
        out = R  # in place: leftover slots 0, the last slot of each copy set cancels
        out[src < 0] = 0.0
        out[last] = 0.0
        out[last] = -_group_sums(out, src, in_map.d)  # exact: multiples of the grid
        out[last[cnt == 1]] = 0.0  # a unit with one copy has nothing to cancel against
        if keep is not None:
            out[left] = keep
        fanin_src = np.arange(n)
    else:
        if n % unit_size:
            raise ValueError(f"input axis {n} is not a multiple of unit_size {unit_size}")
        nu = n // unit_size
        Ru = rng.standard_normal((nu // 2, unit_size) + shape[1:]) * sigma
        out = np.zeros((nu, unit_size) + shape[1:])
        out[0:2 * (nu // 2):2] = Ru
        out[1:2 * (nu // 2):2] = -Ru
        out = out.reshape(shape)
        usrc = np.arange(nu)
        usrc[1::2] = usrc[0:2 * (nu // 2):2]
        fanin_src = (usrc[:, None] * unit_size + np.arange(unit_size)).ravel()
    return np.moveaxis(out, 0, ax).astype(W.dtype, copy=False), fanin_src


def zero_fanout(W) -> np.ndarray:
    """All-zero fan-out weights for a twin block (lemon-math.md, "Depth"): the simple option."""
    return np.zeros_like(np.asarray(W))


def random_split_check(W_orig, W_new, axis: int, copy_sets) -> float:
    """max |sum_{c in C_j} W_new[c] - W_orig[j]| along ``axis``: the lossless condition of the
    input-side rule (0 up to rounding; for tests and reports)."""
    Wo = np.moveaxis(np.asarray(W_orig, dtype=np.float64), _axis(np.asarray(W_orig), axis), 0)
    Wn = np.moveaxis(np.asarray(W_new, dtype=np.float64), _axis(np.asarray(W_new), axis), 0)
    if len(copy_sets) != Wo.shape[0]:
        raise ValueError(f"{len(copy_sets)} copy sets for an axis of size {Wo.shape[0]}")
    worst = 0.0
    for j, C in enumerate(copy_sets):
        worst = max(worst, float(np.max(np.abs(Wn[np.asarray(C)].sum(axis=0) - Wo[j]), initial=0)))
    return worst

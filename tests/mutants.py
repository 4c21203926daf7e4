"""Mutation fuzz for the closed world (issue 23): one ordinary ONNX operation inserted inside
block 0 of an export, on an axis the expansion grows, then ``expand --no-verify``.

Places: ``stream`` (the residual stream leaving block 0), ``mlp`` (the MLP's hidden units
before the down projection), ``heads`` (the attention heads before the out projection).  Every
mutation acts on the last axis there, which is the axis that grows (hidden, ffn, heads *
head_dim).  ``classify`` expands a mutant without verification and says what came of it:

- ``refused``: exit 2, and the message names an inserted node (type and name);
- ``reproduced``: exit 0, and ONNX Runtime runs the expansion to the mutant's outputs;
- ``wrong``: exit 0 with different outputs; ``broken``: exit 0 with a model ONNX Runtime cannot
  load or run; ``exit4``: an internal error; ``other``: any other exit, or exit 2 without the
  operator's name.

The generator is seeded: constants (permutations, scales, cut points) come from
``numpy.random.default_rng(seed)``, so a failing case is rebuilt from its id.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
from onnx import helper as h, numpy_helper as nh

INT_MAX = 2**62

#: outcomes that close the issue, and those that must never happen
GOOD = ("refused", "reproduced")
BAD = ("wrong", "broken", "exit4", "other")


class _Builder:
    """Appends nodes and constants of one mutation; every name carries the ``mut_`` prefix."""

    def __init__(self, x: str, n: int, rank: int, rng: np.random.Generator, opset: int,
                 dtype=np.float32):
        self.x, self.n, self.rank, self.rng, self.dtype = x, n, rank, rng, dtype
        self.opset = opset
        self.nodes: list = []
        self.inits: list = []
        self._k = 0

    def name(self, tag: str) -> str:
        self._k += 1
        return f"mut_{tag}_{self._k}"

    def const(self, arr, tag: str = "c") -> str:
        name = self.name(tag)
        self.inits.append(nh.from_array(np.asarray(arr), name))
        return name

    def ints(self, *vals) -> str:
        return self.const(np.array(vals, np.int64), "i")

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(h.make_node(op_type, list(inputs), outs, name=self.name(op_type),
                                      **attrs))
        return outs[0] if n_out == 1 else outs

    def slice(self, x, lo, hi, step=1):
        return self.op("Slice", [x, self.ints(lo), self.ints(hi), self.ints(-1), self.ints(step)])

    def small(self, x):
        """x scaled down, so that a mixed-in term stays small against the stream."""
        return self.op("Mul", [x, self.const(np.array(0.125, self.dtype))])

    def index_like_x(self, idx: np.ndarray) -> str:
        """An int64 index tensor of x's shape whose last axis is ``idx``."""
        shape = self.op("Shape", [self.x])
        return self.op("Expand", [self.const(idx.astype(np.int64)), shape])


def _perm(b: _Builder) -> np.ndarray:
    return b.rng.permutation(b.n)


# each mutation: builder -> output value name (same shape and dtype as x)
def m_slice_reverse(b):
    return b.slice(b.x, -1, -INT_MAX, -1)


def m_slice_step2_interleave(b):
    return b.op("Concat", [b.slice(b.x, 0, INT_MAX, 2), b.slice(b.x, 1, INT_MAX, 2)], axis=-1)


def m_slice_negative_rotate(b):
    cut = int(b.rng.integers(1, b.n))
    return b.op("Concat", [b.slice(b.x, -cut, INT_MAX), b.slice(b.x, 0, -cut)], axis=-1)


def m_slice_half_twice(b):
    half = b.slice(b.x, 0, b.n // 2)
    return b.op("Concat", [half, half], axis=-1)


def m_slice_drop_last_pad(b):
    cut = b.slice(b.x, 0, -1)
    pads = [0] * (2 * b.rank)
    pads[2 * b.rank - 1] = 1
    return b.op("Pad", [cut, b.ints(*pads)])


def m_slice_prefix_pad(b):
    cut = b.slice(b.x, 0, b.n // 2)
    pads = [0] * (2 * b.rank)
    pads[2 * b.rank - 1] = b.n - b.n // 2
    return b.op("Pad", [cut, b.ints(*pads)])


def m_pad_shift(b):
    pads = [0] * (2 * b.rank)
    pads[b.rank - 1] = 2
    return b.slice(b.op("Pad", [b.x, b.ints(*pads)]), 0, b.n)


def m_pad_reflect(b):
    pads = [0] * (2 * b.rank)
    pads[2 * b.rank - 1] = 3
    return b.slice(b.op("Pad", [b.x, b.ints(*pads)], mode="reflect"), 3, INT_MAX)


def m_split_rotate(b):
    cut = int(b.rng.integers(1, b.n))
    a, c = b.op("Split", [b.x, b.ints(cut, b.n - cut)], n_out=2, axis=-1)
    return b.op("Concat", [c, a], axis=-1)


def m_split_halves_swap(b):
    a, c = b.op("Split", [b.x], n_out=2, axis=-1)  # equal halves, sizes implied
    return b.op("Concat", [c, a], axis=-1)


def m_gather_perm(b):
    return b.op("Gather", [b.x, b.const(_perm(b).astype(np.int64))], axis=-1)


def m_gather_elements(b):
    return b.op("GatherElements", [b.x, b.index_like_x(_perm(b))], axis=-1)


def m_scatter_elements(b):
    return b.op("ScatterElements", [b.x, b.index_like_x(_perm(b)), b.x], axis=-1)


def m_gather_nd(b):
    """Units picked by GatherND with every leading axis a batch axis."""
    idx = b.op("Unsqueeze", [b.index_like_x(_perm(b)), b.ints(-1)])
    return b.op("GatherND", [b.x, idx], batch_dims=b.rank - 1)


def m_scatter_nd(b):
    # ScatterND has no batch_dims: move the unit axis first, scatter, move it back
    perm = [b.rank - 1] + list(range(b.rank - 1))
    inv = list(range(1, b.rank)) + [0]
    t = b.op("Transpose", [b.x], perm=perm)
    ids = b.const(_perm(b).astype(np.int64).reshape(-1, 1))
    s = b.op("ScatterND", [t, ids, t])
    return b.op("Transpose", [s], perm=inv)


def _reduce_add(op_type):
    def m(b):
        if b.opset >= 18 or (op_type == "ReduceSum" and b.opset >= 13):
            r = b.op(op_type, [b.x, b.ints(-1)], keepdims=1)
        else:  # axes as an attribute before opset 18 (13 for ReduceSum)
            r = b.op(op_type, [b.x], keepdims=1, axes=[-1])
        return b.op("Add", [b.x, b.small(r)])
    m.__name__ = f"m_{op_type.lower()}_add"
    return m


def m_argmax_add(b):
    r = b.op("Cast", [b.op("ArgMax", [b.x], axis=-1, keepdims=1)], to=onnx.TensorProto.FLOAT)
    return b.op("Add", [b.x, b.small(b.small(r))])


def m_topk_add(b):
    vals, _ = b.op("TopK", [b.x, b.ints(2)], n_out=2, axis=-1)
    return b.op("Add", [b.x, b.small(b.op("ReduceSum", [vals, b.ints(-1)], keepdims=1))])


def m_topk_sorted(b):
    vals, _ = b.op("TopK", [b.x, b.ints(b.n)], n_out=2, axis=-1)
    return b.op("Add", [b.x, b.small(vals)])


def m_cumsum(b):
    return b.op("Add", [b.x, b.small(b.op("CumSum", [b.x, b.const(np.array(-1, np.int64))]))])


def m_cumsum_reverse(b):
    return b.op("Add", [b.x, b.small(b.op("CumSum", [b.x, b.const(np.array(-1, np.int64))],
                                          reverse=1))])


def m_softmax(b):
    return b.op("Mul", [b.x, b.op("Softmax", [b.x], axis=-1)])


def m_logsoftmax(b):
    return b.op("Add", [b.x, b.small(b.op("LogSoftmax", [b.x], axis=-1))])


def m_hardmax(b):
    return b.op("Add", [b.x, b.op("Hardmax", [b.x], axis=-1)])


def m_lpnorm(b):
    return b.op("Add", [b.x, b.op("LpNormalization", [b.x], axis=-1, p=2)])


def m_tile_rotate(b):
    reps = [1] * (b.rank - 1) + [2]
    t = b.op("Tile", [b.x, b.ints(*reps)])
    return b.slice(t, b.n // 2, b.n // 2 + b.n)


def m_expand_duplicate(b):
    """Each unit twice in a row ([x0, x0, x1, x1, ...]), the first n kept: an Expand along a
    new axis folded into the unit axis by a Reshape."""
    u = b.op("Unsqueeze", [b.x, b.ints(-1)])
    shape = b.op("Concat", [b.op("Shape", [b.x]), b.ints(2)], axis=0)
    e = b.op("Expand", [u, shape])
    flat = b.op("Reshape", [e, b.ints(*([0] * (b.rank - 1)), -1)])
    return b.slice(flat, 0, b.n)


def m_resize_linear(b):
    scales = b.const(np.array([1.0] * (b.rank - 1) + [2.0], np.float32))
    r = b.op("Resize", [b.x, "", scales], mode="linear")
    return b.slice(r, 0, b.n)


def m_resize_back(b):
    """Resize to twice the units and back by sizes read from x: the identity, but positions are
    resampled on the way (exact only if the rewrite knows where each unit lands)."""
    scales = b.const(np.array([1.0] * (b.rank - 1) + [2.0], np.float32))
    r = b.op("Resize", [b.x, "", scales], mode="nearest")
    return b.op("Resize", [r, "", "", b.op("Shape", [b.x])], mode="linear")


def m_transpose_interleave(b):
    """The unit axis viewed as (2, n/2), transposed to (n/2, 2) and flattened again."""
    r = b.op("Reshape", [b.x, b.ints(*([0] * (b.rank - 1)), 2, b.n // 2)])
    perm = list(range(b.rank - 1)) + [b.rank, b.rank - 1]
    t = b.op("Transpose", [r], perm=perm)
    return b.op("Reshape", [t, b.ints(*([0] * (b.rank - 1)), b.n)])


def m_reshape_fold_identity(b):
    """Flattened with the other axes and reshaped back to x's shape: the identity."""
    flat = b.op("Reshape", [b.x, b.ints(-1)])
    return b.op("Reshape", [flat, b.op("Shape", [b.x])])


def m_reshape_fold_rows(b):
    """The unit axis folded with the one before it and cut into rows of n again, shifted by
    one unit: a row's last unit moves to the next row's start."""
    flat = b.op("Reshape", [b.x, b.ints(-1)])
    rolled = b.op("Concat", [b.slice(flat, -1, INT_MAX), b.slice(flat, 0, -1)], axis=-1)
    return b.op("Reshape", [rolled, b.op("Shape", [b.x])])


def m_einsum_dot(b):
    e = b.op("Einsum", [b.x, b.x], equation="...i,...i->...")
    return b.op("Add", [b.x, b.small(b.small(b.op("Unsqueeze", [e, b.ints(-1)])))])


def m_einsum_matrix(b):
    w = b.const((np.eye(b.n) + 0.05 * b.rng.standard_normal((b.n, b.n))).astype(b.dtype))
    return b.op("Einsum", [b.x, w], equation="...i,ij->...j")


def m_einsum_identity(b):
    return b.op("Einsum", [b.x], equation="...i->...i")


def m_matmul_dot(b):
    """x . x over the unit axis by a MatMul of two activations (no weight in it)."""
    row = b.op("Unsqueeze", [b.x, b.ints(-2)])
    col = b.op("Unsqueeze", [b.x, b.ints(-1)])
    dot = b.op("Squeeze", [b.op("MatMul", [row, col]), b.ints(-1)])
    return b.op("Add", [b.x, b.small(b.small(dot))])


def m_trilu(b):
    return b.op("Trilu", [b.x], upper=1)


def m_channel_scale(b):
    return b.op("Mul", [b.x, b.const(b.rng.uniform(0.5, 1.5, b.n).astype(b.dtype))])


def m_channel_bias(b):
    return b.op("Add", [b.x, b.const(b.rng.uniform(-0.5, 0.5, b.n).astype(b.dtype))])


def m_relu(b):
    return b.op("Relu", [b.x])


MUTATIONS = {f.__name__[2:]: f for f in [
    m_slice_reverse, m_slice_step2_interleave, m_slice_negative_rotate, m_slice_half_twice,
    m_slice_drop_last_pad, m_slice_prefix_pad, m_pad_shift, m_pad_reflect, m_split_rotate,
    m_split_halves_swap, m_gather_perm, m_gather_elements, m_scatter_elements, m_gather_nd,
    m_scatter_nd,
    *[_reduce_add(o) for o in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1",
                                "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceProd")],
    m_argmax_add, m_topk_add, m_topk_sorted, m_cumsum, m_cumsum_reverse, m_softmax, m_logsoftmax,
    m_hardmax, m_lpnorm, m_tile_rotate, m_expand_duplicate, m_resize_linear, m_resize_back,
    m_transpose_interleave, m_reshape_fold_identity, m_reshape_fold_rows, m_einsum_dot,
    m_einsum_matrix, m_einsum_identity, m_matmul_dot, m_trilu, m_channel_scale, m_channel_bias,
    m_relu,
]}
PLACES = ("stream", "mlp", "heads")


def _site(src: Path, place: str) -> tuple[str | None, str | None, int]:
    """(value to mutate, or None: the one the node reads at input 0; that node, or None for
    every reader; the size of the value's last axis)."""
    from lemon_onnx import io
    from lemon_onnx.recognize import recognize

    desc = recognize(io.load(src))
    b = desc.blocks[0]
    if place == "mlp":
        return None, b.mlp.down.node, b.mlp.down.in_features
    if place == "heads":
        return None, b.attention.out.node, b.attention.out.in_features
    return b.output, None, desc.hidden


def make_mutant(src: Path, place: str, mutation: str, seed: int, dst: Path) -> set[str]:
    """Write the mutant of ``src`` to ``dst``; returns the op types inserted."""
    value, reader, n = _site(src, place)
    m = onnx.load(str(src))
    m = onnx.shape_inference.infer_shapes(m)
    if reader is not None:
        node = next(n for n in m.graph.node if n.name == reader)
        value = node.input[0]
    shapes = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.output)}
    dims = shapes[value].type.tensor_type.shape.dim
    assert dims[-1].dim_value in (0, n), (src, place, value)
    rng = np.random.default_rng([seed, sorted(MUTATIONS).index(mutation), PLACES.index(place)])
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    b = _Builder(value, n, len(dims), rng, opset)
    out = MUTATIONS[mutation](b)
    graph_nodes = list(m.graph.node)
    prod = next((k for k, nd in enumerate(graph_nodes) if value in nd.output), -1)
    readers = [nd for nd in graph_nodes if value in nd.input] if reader is None else [node]
    for nd in readers:
        for i, name in enumerate(nd.input):
            if name == value:
                nd.input[i] = out
    for k, nd in enumerate(b.nodes):
        m.graph.node.insert(prod + 1 + k, nd)
    m.graph.initializer.extend(b.inits)
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return {nd.op_type for nd in b.nodes}


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _outputs(path, feeds: dict) -> dict:
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def classify(mutant: Path, ops: set[str], out: Path, feeds: list[dict], width: float,
             depth: float = 2) -> tuple[str, str]:
    """Expand ``mutant`` without verification; (outcome, detail)."""
    import lemon_onnx
    from lemon_onnx.errors import LemonError

    try:
        lemon_onnx.expand(mutant, out, width=width, depth=depth, verify=False)
    except LemonError as e:
        msg = str(e)
        if e.exit_code == 2:
            named = any(f"{op} mut_{op}_" in msg for op in ops)  # the inserted node
            return ("refused" if named else "other"), msg[:300]
        return ("exit4" if e.exit_code == 4 else "other"), f"exit {e.exit_code}: {msg[:300]}"
    except Exception as e:  # noqa: BLE001 - the command line reports these as exit 4
        return "exit4", f"{type(e).__name__}: {e}"[:300]
    worst = 0.0
    for f in feeds:
        want = _outputs(mutant, f)
        try:
            got = _outputs(out, f)
        except Exception as e:  # noqa: BLE001 - a model ONNX Runtime cannot load or run
            return "broken", f"{type(e).__name__}: {e}"[:300]
        for name, w in want.items():
            g = got.get(name)
            if g is None:
                return "broken", f"output {name} missing"
            if g.shape != w.shape:
                if g.shape[:-1] != w.shape[:-1]:
                    return "wrong", f"{name}: shape {g.shape} vs {w.shape}"
                g = g[..., : w.shape[-1]]
            if not np.issubdtype(w.dtype, np.floating):
                if not np.array_equal(g, w):
                    return "wrong", f"{name}: integer output differs"
                continue
            scale = max(float(np.abs(w).max()), 1e-6)
            err = float(np.abs(g.astype(np.float64) - w).max()) / scale
            if not np.isfinite(err) or err > 1e-4:
                return "wrong", f"{name}: relative error {err:.3g}"
            worst = max(worst, err)
    return "reproduced", f"max relative error {worst:.2g}"


def feeds_of(npz: Path, limit: int = 2) -> list[dict]:
    data = np.load(npz)
    cases: dict = {}
    for key in data.files:
        case, kind, name = key.split("/", 2)
        if kind == "in":
            cases.setdefault(case, {})[name] = data[key]
    return [cases[k] for k in sorted(cases)][:limit]


def summary(results: list[tuple]) -> str:
    """Counts per outcome, per place, and the bad cases by name."""
    counts = collections.Counter(r[3] for r in results)
    lines = ["mutation fuzz (--no-verify): " + ", ".join(
        f"{k} {counts.get(k, 0)}" for k in GOOD + BAD) + f" of {len(results)}"]
    for place in PLACES:
        c = collections.Counter(r[3] for r in results if r[1] == place)
        if c:
            lines.append(f"  {place}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for model, place, mut, outcome, detail in results:
        if outcome in BAD:
            lines.append(f"  {outcome}: {model} {place} {mut}: {detail}")
    return "\n".join(lines)

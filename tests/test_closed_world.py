"""The closed world (issue 8): a tensor or operator that carries a size the plan changes and
that no rule handles makes expand refuse (exit 2, naming it), with or without verification,
and nothing is written."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper as h

from conftest import FIXTURES, ROOT
from lemon_onnx import io
from lemon_onnx.recognize import recognize


def _insert_before_down(dst, make_nodes):
    """llama-ts17 with extra nodes between block 0's activation and its down projection."""
    src = FIXTURES / "llama-ts17.onnx"
    down = recognize(io.load(src)).blocks[0].mlp.down.node
    m = onnx.load(str(src))
    node = next(n for n in m.graph.node if n.name == down)
    x = node.input[0]
    nodes, inits, out = make_nodes(x)
    node.input[0] = out
    pos = list(m.graph.node).index(node)
    for k, n in enumerate(nodes):
        m.graph.node.insert(pos + k, n)
    m.graph.initializer.extend(inits)
    onnx.save(m, str(dst))
    return dst


def _cumsum(x):
    axis = onnx.numpy_helper.from_array(np.array(-1, np.int64), "lemon_test_axis")
    return ([h.make_node("CumSum", [x, "lemon_test_axis"], ["lemon_test_cs"], name="odd_cumsum"),
             h.make_node("Add", [x, "lemon_test_cs"], ["lemon_test_out"])], [axis],
            "lemon_test_out")


def _unclaimed_constant(x):
    c = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 96, dtype=np.float32),
                                     "odd_channel_scale")
    return ([h.make_node("Mul", [x, "odd_channel_scale"], ["lemon_test_out"])], [c],
            "lemon_test_out")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lemon_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("make,needle", [(_cumsum, "CumSum odd_cumsum"),
                                         (_unclaimed_constant, "odd_channel_scale")])
@pytest.mark.parametrize("verify_flag", [[], ["--no-verify"]])
def test_unhandled_size_carriers_are_refused(tmp_path, make, needle, verify_flag):
    src = _insert_before_down(tmp_path / "odd.onnx", make)
    out = tmp_path / "out.onnx"
    res = _run("expand", src, "-o", out, "--width", "2", *verify_flag)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "ffn" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["odd.onnx"]


def test_the_same_graphs_still_grow_in_depth(tmp_path):
    """Depth alone changes no size: the unknown operator is no obstacle there."""
    src = _insert_before_down(tmp_path / "odd.onnx", _cumsum)
    res = _run("expand", src, "-o", tmp_path / "deep.onnx", "--depth", "2")
    assert res.returncode == 0, res.stderr


def test_unsqueeze_with_computed_axes_is_not_a_crash(tmp_path):
    """Unsqueeze/Squeeze whose axes are computed at run time: the axis analysis records the
    node as unmodelled instead of crashing; on a growing axis expand refuses naming it."""
    from lemon_onnx.dims import AxisAnalysis

    def make_nodes(x):
        one = onnx.numpy_helper.from_array(np.array([1], np.int64), "lemon_test_one")
        return ([h.make_node("Add", ["lemon_test_one", "lemon_test_one"], ["lemon_test_ax"]),
                 h.make_node("Unsqueeze", [x, "lemon_test_ax"], ["lemon_test_u"],
                             name="odd_unsqueeze"),
                 h.make_node("Squeeze", ["lemon_test_u", "lemon_test_ax"], ["lemon_test_out"],
                             name="odd_squeeze")], [one], "lemon_test_out")

    src = _insert_before_down(tmp_path / "odd.onnx", make_nodes)
    model = io.load(src)
    ax = AxisAnalysis(model.graph).run()
    assert "odd_unsqueeze" in {n.name for n in ax.unhandled}
    out = tmp_path / "out.onnx"
    res = _run("expand", src, "-o", out, "--width", "2", "--no-verify")
    assert res.returncode == 2 and "odd_" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_a_slice_ending_mid_axis_is_not_a_half(tmp_path):
    """A single slice of the hidden state that ends at its middle (an extra output of the
    first 32 of 64 coordinates) is a prefix, not one of two halves: it keeps its bound, and
    the output stays the source's (the original coordinates come first in every stream form).
    Read as a (2, hidden/2) split, the bound grew with the hidden size and the output changed."""
    import lemon_onnx

    src = FIXTURES / "gpt2-ts17.onnx"
    m = onnx.load(str(src))
    hidden = next(o.name for o in m.graph.output if o.name != "logits")
    consts = [onnx.numpy_helper.from_array(np.array([v], np.int64), n)
              for n, v in (("lemon_test_lo", 0), ("lemon_test_hi", 32), ("lemon_test_ax", -1))]
    m.graph.initializer.extend(consts)
    m.graph.node.append(h.make_node("Slice", [hidden, "lemon_test_lo", "lemon_test_hi",
                                              "lemon_test_ax"], ["first_32"], name="prefix"))
    m.graph.output.append(h.make_tensor_value_info("first_32", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "prefix.onnx"
    onnx.save(m, str(path))
    res = lemon_onnx.expand(path, tmp_path / "wide.onnx", width=2, depth=2)
    assert res.verification.passed
    import onnxruntime as ort

    feeds = {"input_ids": np.array([[5, 7, 11, 2]], np.int64),
             "attention_mask": np.ones((1, 4), np.int64)}
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        ["first_32"], {k: v for k, v in feeds.items()}) for p in (path, tmp_path / "wide.onnx")]
    assert runs[1][0].shape == runs[0][0].shape == (1, 4, 32)
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- size-only shapes
# Reshapes whose target sizes are read at run time from another tensor than the one they
# regroup (optimum's CLIP vision and RoFormer exports; regressed with issue 23): the output
# axis is the input's atoms regrouped in row-major order, its size a tie checked against the
# plan (dims.AxisAnalysis.size_ties)

def _bert_block0(m):
    """bert-ts17's block 0: (its attention input, the Reshape that merges the heads before the
    out projection, the query's [B, heads, S, head_dim] Transpose)."""
    desc = recognize(io.load(FIXTURES / "bert-ts17.onnx"))
    att = desc.blocks[0].attention
    by_out = {o: n for n in m.graph.node for o in n.output}
    merge = by_out[next(n for n in m.graph.node if n.name == att.out.node).input[0]]
    q_reshape = next(n for n in m.graph.node if n.op_type == "Reshape"
                     and n.input[0] == att.q.output)
    q_t = next(n for n in m.graph.node if n.op_type == "Transpose"
               and n.input[0] == q_reshape.output[0])
    assert merge.op_type == "Reshape"
    return att.q.input, merge, q_t


def _merge_to_width_of(dst, width_of: str, extra_inits=()):
    """bert-ts17 with block 0's heads merged by Reshape to [B, S, width_of.shape[-1]], the
    width read at run time (CLIP's attention output reshaped to the stream's own width)."""
    m = onnx.load(str(FIXTURES / "bert-ts17.onnx"))
    stream, merge, _ = _bert_block0(m)
    width_of = width_of or stream
    m.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), n)
                                for n, v in (("lemon_test_lo", [0]), ("lemon_test_two", [2]),
                                             ("lemon_test_last", [-1]),
                                             ("lemon_test_end", [2**62]))] + list(extra_inits))
    nodes = [h.make_node("Shape", [merge.input[0]], ["lemon_test_xs"]),
             h.make_node("Slice", ["lemon_test_xs", "lemon_test_lo", "lemon_test_two"],
                         ["lemon_test_bs"]),
             h.make_node("Shape", [width_of], ["lemon_test_ws"]),
             h.make_node("Slice", ["lemon_test_ws", "lemon_test_last", "lemon_test_end"],
                         ["lemon_test_w"]),
             h.make_node("Concat", ["lemon_test_bs", "lemon_test_w"], ["lemon_test_shape"],
                         axis=0)]
    merge.input[1] = "lemon_test_shape"
    pos = list(m.graph.node).index(merge)
    for k, n in enumerate(nodes):
        m.graph.node.insert(pos + k, n)
    onnx.save(m, str(dst))
    return dst, merge.name


def test_heads_merged_to_the_streams_width_expand(tmp_path):
    """The attention output reshaped to the width of the stream it reads (CLIP vision in
    transformers 4.57): heads * head_dim regrouped, the stream's width read at run time;
    both grow alike, so the expansion verifies, and the stream's width stays one atom (it
    was split into heads x head_dim by a failed unification, and CLIP's class embedding then
    claimed as a per-head table)."""
    import lemon_onnx
    from lemon_onnx import dims

    src, merge = _merge_to_width_of(tmp_path / "merge.onnx", "")
    desc = recognize(io.load(src))
    res = lemon_onnx.expand(src, tmp_path / "wide.onnx", width=2, depth=2)
    assert res.verified and res.verification.passed, res.verification.format()
    from lemon_onnx.recognize import Recognizer

    rec = Recognizer(io.load(src))
    rec.run()
    ties = [(n.name, [rec.roles.of(a) for a in dims.leaves(t)],
             [rec.roles.of(a) for a in dims.leaves(w)])
            for n, _k, t, w in rec.ax.size_ties]
    assert (merge, ["heads", "head_dim"], ["hidden"]) in ties, ties
    assert desc.hidden == 64


def test_heads_merged_to_a_width_that_does_not_grow_is_refused(tmp_path):
    """The same Reshape reading its width from a tensor whose size no rule grows: once the
    heads grow the reshape would fail at run time, so expand refuses, naming it."""
    width = onnx.numpy_helper.from_array(np.zeros((1, 64), np.int64), "lemon_test_width64")
    src, merge = _merge_to_width_of(tmp_path / "merge.onnx", "lemon_test_width64", [width])
    out = tmp_path / "out.onnx"
    res = _run("expand", src, "-o", out, "--width", "2", "--no-verify")
    assert res.returncode == 2, res.stderr
    assert f"Reshape {merge} regroups heads*head_dim" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_interleaved_rotary_pairs_keep_the_heads_axis(tmp_path):
    """RoFormer's rotary embedding: stack([-q[..., 1::2], q[..., ::2]], -1) reshaped back to
    q's shape (read at run time) interleaves pairs along head_dim only; the heads axis passes
    through, so the expansion verifies (it was refused: the Reshape's output axes were all
    made of unknown units).  The same interleave along the heads axis stays refused."""
    import lemon_onnx

    def rotary(m, axis: int):
        _, _, q_t = _bert_block0(m)
        q = q_t.output[0]
        uses = [(n, i) for n in m.graph.node for i, x in enumerate(n.input) if x == q]
        consts = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
            ("lemon_test_0", [0]), ("lemon_test_1", [1]), ("lemon_test_end", [2**62]),
            ("lemon_test_ax", [axis]), ("lemon_test_2", [2]), ("lemon_test_last", [-1]))] + [
            onnx.numpy_helper.from_array(np.array(v, np.float32), n)
            for n, v in (("lemon_test_cos", 0.8), ("lemon_test_sin", 0.6))]
        nodes = [
            h.make_node("Slice", [q, "lemon_test_1", "lemon_test_end", "lemon_test_ax",
                                  "lemon_test_2"], ["lemon_test_odd"]),
            h.make_node("Neg", ["lemon_test_odd"], ["lemon_test_nodd"]),
            h.make_node("Slice", [q, "lemon_test_0", "lemon_test_end", "lemon_test_ax",
                                  "lemon_test_2"], ["lemon_test_even"]),
            h.make_node("Unsqueeze", ["lemon_test_nodd", "lemon_test_last"], ["lemon_test_u0"]),
            h.make_node("Unsqueeze", ["lemon_test_even", "lemon_test_last"], ["lemon_test_u1"]),
            h.make_node("Concat", ["lemon_test_u0", "lemon_test_u1"], ["lemon_test_pairs"],
                        axis=-1),
            h.make_node("Shape", [q], ["lemon_test_qs"]),
            h.make_node("Reshape", ["lemon_test_pairs", "lemon_test_qs"], ["lemon_test_rot"],
                        name="odd_rotary"),
            h.make_node("Mul", [q, "lemon_test_cos"], ["lemon_test_qc"]),
            h.make_node("Mul", ["lemon_test_rot", "lemon_test_sin"], ["lemon_test_rs"]),
            h.make_node("Add", ["lemon_test_qc", "lemon_test_rs"], ["lemon_test_q"])]
        for n, i in uses:
            n.input[i] = "lemon_test_q"
        pos = list(m.graph.node).index(q_t) + 1
        for k, n in enumerate(nodes):
            m.graph.node.insert(pos + k, n)
        m.graph.initializer.extend(consts)

    m = onnx.load(str(FIXTURES / "bert-ts17.onnx"))
    rotary(m, -1)
    src = tmp_path / "rotary.onnx"
    onnx.save(m, str(src))
    res = lemon_onnx.expand(src, tmp_path / "wide.onnx", width=2, depth=2)
    assert res.verified and res.verification.passed, res.verification.format()
    assert res.verification.max_alg_rel <= 1e-6  # Post-LN depth: LEMON's recipe

    m = onnx.load(str(FIXTURES / "bert-ts17.onnx"))
    rotary(m, 1)  # pairs of heads: which head lands where once the heads grow is not modelled
    onnx.save(m, str(src))
    out = tmp_path / "heads.onnx"
    res = _run("expand", src, "-o", out, "--width", "2", "--no-verify")
    assert res.returncode == 2 and "heads" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not out.exists()

# --------------------------------------------------------------------------- mutation fuzz
# Issue 23: one ordinary operator inserted inside block 0, on an axis the expansion grows
# (the stream leaving the block, the MLP's hidden units, the attention heads), then
# ``expand --no-verify``: refused naming the operator, or reproduced; never wrong outputs, a
# model ONNX Runtime cannot run, or an internal error.  ``tests/mutants.py`` builds them.
import random

import mutants

FAMILIES = ROOT / "models" / "families"
#: (name, export, width): width 2 for BERT (Post-LN: integer factors only)
MUTATION_MODELS = [("gpt2-ts17", FIXTURES / "gpt2-ts17.onnx", 1.5),
                   ("llama-ts17", FIXTURES / "llama-ts17.onnx", 1.5),
                   ("bert-ts17", FIXTURES / "bert-ts17.onnx", 2),
                   ("vit-ts17", FIXTURES / "vit-ts17.onnx", 1.5)]
#: family exports of the same kinds (generated, not committed: slow sweep only): Llama-like
#: decoders, GPT-2-like decoders, BERT-like Post-LN encoders (integer widths), ViT-like
MUTATION_FAMILIES = [(stem, FAMILIES / f"{stem}.onnx", 2 if stem.startswith("roberta") else 1.5)
                     for stem in ("mistral-ts17", "qwen2-dy18", "opt-dy18", "roberta-ts17",
                                  "deit-dy18") if (FAMILIES / f"{stem}.onnx").exists()]
MUTATION_CASES = [(name, place, mut) for name, _, _ in MUTATION_MODELS
                  for place in mutants.PLACES for mut in mutants.MUTATIONS]
#: the fast tier's sample: a seeded choice of mutations, one per (model, place)
FAST_SAMPLE = [(name, place, random.Random(f"{name}/{place}").choice(sorted(mutants.MUTATIONS)))
               for name, _, _ in MUTATION_MODELS for place in mutants.PLACES] + [
    ("llama-ts17", "mlp", "slice_reverse"), ("gpt2-ts17", "heads", "reducemean_add"),
    ("vit-ts17", "mlp", "gather_perm"), ("bert-ts17", "mlp", "slice_half_twice"),
    ("gpt2-ts17", "stream", "channel_scale")]


def _mutation_outcomes(models, cases, tmp_path, seed: int = 0) -> list:
    by_name = {name: (path, width) for name, path, width in models}
    results = []
    for name, place, mut in cases:
        path, width = by_name[name]
        dst = tmp_path / f"{name}-{place}-{mut}.onnx"
        ops = mutants.make_mutant(path, place, mut, seed, dst)
        out = tmp_path / f"{name}-{place}-{mut}.wide.onnx"
        feeds = mutants.feeds_of(path.with_suffix(".npz"))
        outcome, detail = mutants.classify(dst, ops, out, feeds, width)
        results.append((name, place, mut, outcome, detail))
        for p in (dst, out):
            p.unlink(missing_ok=True)
    return results


def _report(title: str, results: list, ci_log) -> None:
    ci_log(f"{title}: " + mutants.summary(results))  # in the run's summary (conftest.py)
    bad = [r for r in results if r[3] in mutants.BAD]
    assert not bad, "\n".join(f"{r[0]} {r[1]} {r[2]}: {r[3]}: {r[4]}" for r in bad)


def test_mutants_are_refused_or_reproduced(tmp_path, ci_log):
    """The fast tier's sample of the sweep below."""
    _report("mutation sample", _mutation_outcomes(MUTATION_MODELS, FAST_SAMPLE, tmp_path),
            ci_log)


@pytest.mark.slow
def test_mutation_sweep(tmp_path, ci_log):
    """Every mutation in every place of the four committed fixtures."""
    _report("mutation sweep (fixtures)", _mutation_outcomes(MUTATION_MODELS, MUTATION_CASES,
                                                            tmp_path), ci_log)


@pytest.mark.slow
@pytest.mark.skipif(not MUTATION_FAMILIES, reason="models/families not exported")
def test_mutation_sweep_families(tmp_path, ci_log):
    """The same over family-matrix exports of the same kinds (Llama-like, GPT-2-like,
    BERT-like Post-LN at width 2, ViT-like; both exporters among them), with a second seed."""
    cases = [(name, place, mut) for name, _, _ in MUTATION_FAMILIES
             for place in mutants.PLACES for mut in mutants.MUTATIONS]
    _report("mutation sweep (families)", _mutation_outcomes(MUTATION_FAMILIES, cases, tmp_path,
                                                            seed=1), ci_log)

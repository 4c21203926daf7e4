"""What an expansion will cost, known before anything is computed: bytes written, peak memory,
time, and whether verification fits in memory whole or must go block by block.

``estimate(desc, plan, src_model, ...)`` works from the recognised description and the plan
(sizes only, no weights are read):

1. Bytes written: the source's block tensors (every initializer a block's linears and norms
   read) scale by the ratio of a block's parameter count at the target sizes to the source's
   (q, k, v, out, the MLP's two or three matrices and their biases), times the target layer
   count over the source's; everything else (embeddings, head, final norm) scales with the
   hidden size, plus one more vocabulary table when a tied head may be untied.
2. Peak memory of the expansion: the graph (about ``GRAPH_FACTOR`` times the model file
   without its weights, inline or external, grown with the layer count), the weights stored
   inside the model file (``INLINE_COPIES`` times: the parsed protobuf holds them), the
   save's bytes in flight (a single-file output: ``SINGLE_FILE_COPIES`` times the output),
   and the largest new tensor ``TENSOR_COPIES`` times (its float64
   working copy and the result).
3. Time: ``SECONDS_PER_GB`` per GB written (measured by ``benchmarks/bench_scale.py``) plus
   recognition.
4. Verification: a whole-model check holds each model's weights in ONNX Runtime (prepacked
   copies included, ``RUNTIME_FACTOR``), and its float64 level a float64 copy at a time
   (``FLOAT64_FACTOR``, ``FLOAT64_REFERENCE_FACTOR``: ``verify_peak_bytes``); block by block
   it holds one block (or the embeddings and head) at a time (``blockwise_bytes``).

``check`` refuses (``ResourceError``, exit 2) with the figures when the output does not fit
on the destination's file system or the expansion not in the available memory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .errors import ResourceError

GB = 1e9
#: memory of the in-memory graph per byte of model file without weights (onnx-ir objects)
GRAPH_FACTOR = 40
#: inline weights (inside the .onnx file) are held about this many times: the parsed
#: protobuf and onnx-ir's tensors over it
INLINE_COPIES = 1
#: a single-file output (below ``io.EXTERNAL_DATA_THRESHOLD``) is held about this many times
#: while it is saved: the computed tensors, the protobuf and its serialised bytes
SINGLE_FILE_COPIES = 3
#: the largest new tensor is held about this many times while it is computed
TENSOR_COPIES = 4
#: fixed cost of ONNX Runtime itself (its import and sessions' arenas), on top of BASE_BYTES
RUNTIME_BASE_BYTES = int(0.05 * GB)
#: fixed cost of the interpreter, numpy, onnx and onnx-ir
BASE_BYTES = int(0.13 * GB)
#: measured seconds per GB written and the fixed start-up (bench_scale.py --sizes-only on
#: 2 cores: 1.6 to 1.9 s/GB beyond about 1.5 s, more on a busy machine); a planning figure,
#: not a promise
SECONDS_PER_GB = 2.0
START_SECONDS = 1.5
#: ONNX Runtime holds a model's weights and, for MatMul, prepacked copies: the verification's
#: blockwise decision counts this many times the larger model (an upper bound: going blockwise
#: too early costs time, too late memory) ...
RUNTIME_FACTOR = 2.0
#: ... and the reported peak this many: measured 0.8x (GPT-2 medium w1.5 d2, 6.1 GB output,
#: 4.9 GB peak) to 1.1x (SmolLM2 w2 d2, 3.9 GB output, 4.2 GB peak) for external data, which
#: ONNX Runtime maps; inline weights are parsed and copied
RUNTIME_EXPECTED_EXTERNAL = 1.0
RUNTIME_EXPECTED_INLINE = 2.0
#: the float64 level one segment at a time (verification/blockwise.py, and verification/core.py when the
#: whole copies do not fit) holds about this many times the largest segment's weights in their
#: dtype (float32: the float64 tensors, their serialised model and ONNX Runtime's copy)
F64_SEGMENT_FACTOR = 6
#: the float64 level holds about this many times the larger model's float32 weights (the
#: widened tensors, the protobuf or file ONNX Runtime reads, the session's copy); in onnx's
#: reference evaluator (ops ONNX Runtime has no double kernel for) the arrays once more
FLOAT64_FACTOR = 6
FLOAT64_REFERENCE_FACTOR = 10
REFERENCE_OPS = ("Erf", "Conv", "RotaryEmbedding")
#: verification/core.py runs the float64 level (auto) on the whole models when its weights fit in
#: this share
FLOAT64_MEMORY_SHARE = 0.4
#: share of the available memory a whole-model verification may use before it goes blockwise
VERIFY_MEMORY_SHARE = 0.8


@dataclasses.dataclass
class Estimate:
    output_bytes: int
    peak_bytes: int  # of the expansion (recognise, rewrite, save)
    seconds: float
    largest_tensor_bytes: int
    verify_whole_bytes: int  # a whole-model verification (the larger of the two sessions)
    verify_block_bytes: int  # block by block
    free_disk: int | None
    available_memory: int | None
    #: a whole-model verification with its float64 level (where that level runs); reported,
    #: not a reason to refuse (verify skips the float64 level, or goes block by block, first)
    verify_peak_bytes: int = 0

    @property
    def blockwise(self) -> bool:
        """Whether verification must go block by block to fit in the available memory."""
        return (self.available_memory is not None
                and self.verify_whole_bytes > VERIFY_MEMORY_SHARE * self.available_memory)

    def summary(self) -> str:
        text = (f"estimate: writes {_gb(self.output_bytes)}, peak memory "
                f"{_gb(self.peak_bytes)}"
                + (f" ({_gb(self.verify_peak_bytes)} to verify)" if self.verify_peak_bytes
                   else "") + f", about {self.seconds:.0f} s")
        if self.free_disk is not None and self.available_memory is not None:
            text += (f" (free: {_gb(self.free_disk)} disk, {_gb(self.available_memory)} "
                     "memory)")
        return text


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n < 1e12 else f"{n / 1e12:.1f} TB"


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that will hold ``path`` (its nearest existing folder)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def block_params(s: dict, gated: bool, biased: bool) -> int:
    """Parameters of one block at sizes ``s`` (hidden, ffn, heads, kv_heads, head_dim)."""
    h, f, hd = s["hidden"], s["ffn"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    n = h * q + 2 * h * kv + q * h + (3 if gated else 2) * h * f + 4 * h  # + norms
    if biased:
        n += q + 2 * kv + h + f * (2 if gated else 1) + h
    return n


def _block_tensors(desc) -> set:
    names: set = set()
    for b in desc.blocks:
        a, m = b.attention, b.mlp
        for lin in (a.q, a.k, a.v, a.qkv, a.out, m.up, m.down, m.gate):
            if lin is not None:
                names.update(x for x in (lin.weight, lin.bias) if x)
        for nrm in (b.attention_norm, b.attention_post_norm, b.mlp_norm, b.mlp_post_norm):
            if nrm is not None:
                names.update(x for x in (nrm.gamma, nrm.beta) if x)
    return names


def inline_weight_bytes(model) -> int:
    """Bytes of the initializers stored inside the model file (not as external data)."""
    import onnx_ir as ir

    total = 0
    for g in (model.graph, *model.graph.subgraphs()):
        for v in g.initializers.values():
            t = v.const_value
            if t is not None and not isinstance(t, ir.ExternalTensor):
                total += t.nbytes
    return total


def graph_size(src, inline: int) -> int:
    """The model file's bytes without its weights: the graph itself (nodes, names,
    attributes), whether the weights are inline or external data."""
    p = Path(src)
    size = p.stat().st_size if p.is_file() else 0
    return max(size - inline, 0)


def estimate(desc, plan, model, *, src: str | os.PathLike, dest: str | os.PathLike) -> Estimate:
    """The figures for expanding ``model`` (recognised as ``desc``) by ``plan`` into ``dest``."""
    from .io import EXTERNAL_DATA_THRESHOLD, MAX_IN_FLIGHT_BYTES

    s, t = plan.source, plan.target
    in_blocks = _block_tensors(desc)
    block_bytes = other_bytes = 0
    itemsize, largest_other = 4, 0
    for name, v in model.graph.initializers.items():
        tensor = v.const_value
        if tensor is None:
            continue
        if name in in_blocks:
            block_bytes += tensor.nbytes
            itemsize = tensor.dtype.itemsize
        else:
            other_bytes += tensor.nbytes
            largest_other = max(largest_other, tensor.nbytes)
    first = desc.blocks[0] if desc.blocks else None
    gated = bool(first and first.mlp.gate is not None)
    biased = bool(first and first.mlp.up.bias)
    widen = t["hidden"] / s["hidden"]
    per_block_src = block_bytes / max(s["layers"], 1)
    ratio = block_params(t, gated, biased) / max(block_params(s, gated, biased), 1)
    per_block = per_block_src * ratio
    # a head that reads the token table itself gets its own copy when widening unties it (a
    # head stored as its own copy is counted among the other tensors already)
    untie = desc.head.tie == "shared" and t["hidden"] != s["hidden"]
    table = model.graph.initializers.get(desc.embeddings.token or "")
    vocab_bytes = table.const_value.nbytes if untie and table is not None and \
        table.const_value is not None else 0
    out_bytes = int((other_bytes + vocab_bytes) * widen + per_block * t["layers"])
    largest = int(max(largest_other * widen,
                      itemsize * t["hidden"] * max(t["ffn"], t["heads"] * t["head_dim"])))
    inline = inline_weight_bytes(model)
    graph_bytes = GRAPH_FACTOR * graph_size(src, inline) * t["layers"] / max(s["layers"], 1)
    # a single-file save holds the whole output as a protobuf; external data streams
    saving = min(MAX_IN_FLIGHT_BYTES, out_bytes) if out_bytes > EXTERNAL_DATA_THRESHOLD \
        else SINGLE_FILE_COPIES * out_bytes
    peak = int(BASE_BYTES + graph_bytes + INLINE_COPIES * inline + saving
               + TENSOR_COPIES * largest)
    seconds = START_SECONDS + SECONDS_PER_GB * out_bytes / GB
    src_bytes = other_bytes + block_bytes
    whole = int(RUNTIME_FACTOR * max(out_bytes, src_bytes) + BASE_BYTES)
    out_external = out_bytes > EXTERNAL_DATA_THRESHOLD
    expected_whole = int(max(
        (RUNTIME_EXPECTED_EXTERNAL if out_external else RUNTIME_EXPECTED_INLINE) * out_bytes,
        (RUNTIME_EXPECTED_INLINE if inline else RUNTIME_EXPECTED_EXTERNAL) * src_bytes)
        + BASE_BYTES)
    # the float64 level (verification/core.py runs it when the float64 weights fit in its share of
    # the memory): a float64 copy at a time, in ONNX Runtime or onnx's reference evaluator
    reference = any(n.op_type in REFERENCE_OPS for n in model.graph.all_nodes())
    mem = available_memory()
    larger = max(out_bytes, src_bytes)
    segment = max(per_block, largest_other * widen)
    if mem is None or 2 * larger <= FLOAT64_MEMORY_SHARE * mem:
        f64 = (FLOAT64_REFERENCE_FACTOR if reference else FLOAT64_FACTOR) * larger
    else:  # verification/core.py runs it one segment at a time
        f64 = F64_SEGMENT_FACTOR * segment
    verify_peak = int(max(expected_whole, f64 + BASE_BYTES) + RUNTIME_BASE_BYTES)
    blockwise = int(2 * segment + 1 * GB)
    return Estimate(output_bytes=out_bytes, peak_bytes=peak, seconds=seconds,
                    largest_tensor_bytes=largest, verify_whole_bytes=whole,
                    verify_block_bytes=blockwise, free_disk=free_disk(dest),
                    available_memory=mem, verify_peak_bytes=verify_peak)


def check(est: Estimate, *, verify: bool, flags: str) -> None:
    """Refuse (exit 2) an expansion that cannot fit, with the figures."""
    problems = []
    if est.free_disk is not None and est.output_bytes > est.free_disk:
        problems.append(f"the output needs {_gb(est.output_bytes)} and the destination's file "
                        f"system has {_gb(est.free_disk)} free")
    mem = est.available_memory
    if mem is not None and est.peak_bytes > mem:
        problems.append(f"expanding needs about {_gb(est.peak_bytes)} of memory (the largest "
                        f"new tensor alone is {_gb(est.largest_tensor_bytes)}) and "
                        f"{_gb(mem)} is available")
    if verify and mem is not None and est.blockwise and est.verify_block_bytes > mem:
        problems.append(f"verifying block by block needs about {_gb(est.verify_block_bytes)} "
                        f"of memory and {_gb(mem)} is available")
    if problems:
        raise ResourceError(
            f"{flags} cannot be done on this machine: " + "; ".join(problems)
            + f" ({est.summary()}). Nothing was written.",
            hint="Choose a smaller expansion, free space on the destination, or use a machine "
                 "with more memory.")

"""Block-by-block verification: models larger than memory, one block in memory at a time.

Each model is cut at its residual stream: the value entering the first block and the value
leaving every block (from recognition) split the graph into segments, the embeddings
(everything before the first cut), one segment per block, and the head (everything after
the last).  A node belongs to the segment of the latest cut it depends on, so side
computations (attention masks, rotary tables) that read only the graph inputs run in the
first segment and are handed on.  Nodes that read only constants (``Constant``, a transpose
of a weight) are repeated in each segment that reads them.

Every segment is its own small ONNX model whose weights stay in the source's external data
files (the session reads only that segment's), run for all cases before the next is built;
its outputs are kept only while a later segment reads them.  So at most one block's weights
(or the embeddings', or the head's) are in memory, and the hidden states recorded on both
sides are compared as ``--layerwise`` does: small block i against big block
``plan["blocks"][i]`` on the source's coordinates.  The graph outputs come from the last
segments and are compared as a whole-model run's would be.

The float64 level runs the same way on float64 copies of the segments (each segment is
widened on its own, so memory holds one block's float64 weights, about ``F64_SEGMENT_FACTOR``
times the segment's bytes, and the hidden states are handed on in float64).  It runs when
that fits (``float64="auto"``), or always (``"on"``); without it (``"off"``, no memory, or a
segment ONNX Runtime cannot run in float64) the dtype level uses the fallback bound
(``compare.FALLBACK_ULPS``) unless fixed tolerances were given.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np

from ..errors import Float64Unavailable, RuntimeFailure
from ..estimate import F64_SEGMENT_FACTOR, available_memory
from . import compare as cmp
from .models import describe
from .precision import float64_feeds, float64_level, reference_evaluator, to_float64
from .runtime import CUDA, make_session, run_session
from ..errors import one_line

#: the float64 level runs (``auto``) when that fits in this share of the available memory
F64_MEMORY_SHARE = 0.5

__all__ = ["Segment", "segments", "run_segments", "compare_blockwise"]


@dataclasses.dataclass
class Segment:
    index: int
    nodes: list  # onnx.NodeProto, in graph order (constant-only nodes repeated where read)
    inputs: list  # value names computed by earlier segments, or graph inputs
    outputs: list  # value names later segments read, graph outputs, or wanted values
    weight_bytes: int = 0


def _cut_values(desc) -> list:
    cuts = []
    for b in desc.blocks:
        for name in (b.input, b.output):
            if not cuts or cuts[-1] != name:
                cuts.append(name)
    return cuts


def segments(proto, desc, wanted=()) -> list:
    """Cut ``proto`` (an onnx.ModelProto, weights left external) at ``desc``'s blocks."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input} - set(inits)
    cut_stage = {name: k + 1 for k, name in enumerate(_cut_values(desc))}
    stage: dict = {n: 0 for n in graph_inputs}  # consumers' view of a value
    producer: dict = {}
    node_stage: list = []
    free: list = []  # nodes that read only constants
    for i, node in enumerate(g.node):
        ins = [x for x in node.input if x and x not in inits]
        deps = [stage[x] for x in ins if x in stage]
        is_free = all(x in producer and free[producer[x]] for x in ins) and not \
            any(x in graph_inputs for x in ins)
        s = max(deps, default=0)
        free.append(is_free)
        node_stage.append(s)
        for o in node.output:
            producer[o] = i
            if not is_free:
                stage[o] = cut_stage.get(o, s)
    n_seg = len(cut_stage) + 1
    outputs_of_graph = [o.name for o in g.output]
    # where each value is read: segments
    readers: dict = {}
    members: list = [[] for _ in range(n_seg)]
    for i, node in enumerate(g.node):
        if not free[i]:
            members[node_stage[i]].append(i)

    def with_free(idx: list) -> list:
        need, todo = set(idx), list(idx)
        while todo:
            j = todo.pop()
            for x in g.node[j].input:
                p = producer.get(x)
                if p is not None and free[p] and p not in need:
                    need.add(p)
                    todo.append(p)
        return sorted(need)

    seg_nodes = [with_free(m) for m in members]
    for s, idx in enumerate(seg_nodes):
        for j in idx:
            for x in g.node[j].input:
                if x and x not in inits:
                    readers.setdefault(x, set()).add(s)
    out = []
    for s, idx in enumerate(seg_nodes):
        if not idx:
            continue
        made = {o for j in idx for o in g.node[j].output}
        ins = sorted({x for j in idx for x in g.node[j].input
                      if x and x not in inits and x not in made})
        outs = sorted(o for o in made
                      if any(r > s for r in readers.get(o, ())) or o in outputs_of_graph
                      or o in wanted)
        wb = sum(_nbytes(inits[x]) for x in {x for j in idx for x in g.node[j].input}
                 if x in inits)
        out.append(Segment(s, [g.node[j] for j in idx], ins, outs, wb))
    return out


def _nbytes(t) -> int:
    import onnx

    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _elem_types(proto) -> dict:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    g = inferred.graph
    types = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _segment_model(proto, seg: Segment, types: dict, fallback: int) -> bytes:
    import onnx

    g = proto.graph
    read = {x for n in seg.nodes for x in n.input}
    sub = onnx.helper.make_graph(
        seg.nodes, f"segment{seg.index}",
        [onnx.helper.make_tensor_value_info(n, types.get(n, fallback), None) for n in seg.inputs],
        [onnx.helper.make_tensor_value_info(n, types.get(n, fallback), None)
         for n in seg.outputs],
        [t for t in g.initializer if t.name in read])
    m = onnx.helper.make_model(sub, opset_imports=list(proto.opset_import),
                               ir_version=proto.ir_version)
    m.functions.extend(proto.functions)
    return m.SerializeToString()


#: float tensors above this many bytes reach ONNX Runtime as arrays, not inside the protobuf
F64_ARRAY_BYTES = 1024
_PLACEHOLDER = "lemon-float64-placeholder.bin"


def _float64_segment(data: bytes, folder: Path):
    """The float64 copy of a segment model whose weights are in ``folder``'s external files:
    (serialised model, {name: float64 array}).  The large float tensors are declared as
    external data and handed to ONNX Runtime as arrays: no protobuf copies of them (their
    serialisation and parsing took half the float64 level's time)."""
    import onnx
    import onnx_ir as ir

    model = ir.serde.deserialize_model(onnx.load_from_string(data))
    ir.external_data.set_base_dir(model.graph, str(folder))
    to_float64(model)
    arrays = {}
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None and t.dtype == ir.DataType.DOUBLE and t.nbytes > F64_ARRAY_BYTES:
            arrays[v.name] = np.ascontiguousarray(t.numpy())
            v.const_value = ir.ExternalTensor(_PLACEHOLDER, 0, t.nbytes, t.dtype,
                                              shape=t.shape, name=v.name, base_dir=str(folder))
    return ir.to_proto(model).SerializeToString(), arrays


def _reference_segment(data: bytes, folder: Path, label: str):
    """The float64 copy of a segment in onnx's reference evaluator (a segment ONNX Runtime has
    no double kernel for: BERT's Erf, a Conv): a function feeds -> {name: array}.  Its weights
    are read from ``folder`` into memory first (the evaluator does not read external data);
    one segment's are small."""
    import onnx
    import onnx_ir as ir

    model = ir.serde.deserialize_model(onnx.load_from_string(data))
    ir.external_data.set_base_dir(model.graph, str(folder))
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            v.const_value = ir.Tensor(t.numpy(), name=v.name)
    to_float64(model)
    fetch = [v.name for v in model.graph.outputs]
    return reference_evaluator(model, fetch, label)


def run_segments(path, proto, desc, cases, provider: str, wanted, fallback_elem: int,
                 float64: bool = False, engines: set | None = None):
    """Run the model at ``path`` segment by segment on every case (``float64``: the float64
    copy of each segment, float inputs widened; a segment ONNX Runtime cannot run in float64
    runs in onnx's reference evaluator, and ``engines`` collects the engines that ran).

    Returns ({wanted or graph output name: [array per case]}, provider used, largest segment
    weight bytes).  A float64 segment neither engine can run raises ``RuntimeFailure``."""
    segs = segments(proto, desc, wanted)
    types = _elem_types(proto)
    keep = set(wanted) | {o.name for o in proto.graph.output}
    last_reader: dict = {}
    for seg in segs:
        for x in seg.inputs:
            last_reader[x] = seg.index
    values = float64_feeds(cases) if float64 else [dict(c) for c in cases]
    got: dict = {}
    used = None
    folder = Path(path).resolve().parent
    for seg in segs:
        data = _segment_model(proto, seg, types, fallback_elem)
        label = f"{path} (segment {seg.index} of {len(segs)}{', float64' if float64 else ''})"
        arrays = None
        source = data
        if float64:
            source, arrays = _float64_segment(data, folder)
        try:
            sess, used = make_session(source, provider, label=label, external_data_dir=folder,
                                      lean=True, initializers=arrays)
        except RuntimeFailure:
            if not float64:
                raise
            sess = None
        del source, arrays
        if sess is not None:
            def run(feeds, sess=sess, label=label, seg=seg):
                return run_session(sess, feeds, label, {o: o for o in seg.outputs})
            engine = "onnxruntime"
        else:
            run = _reference_segment(data, folder, label)
            engine = "onnx.reference"
        if engines is not None:
            engines.add(engine)
        del data
        for k, case in enumerate(values):
            feeds = {x: case[x] for x in seg.inputs}
            res = run(feeds)
            case.update(res)
            for o in seg.outputs:
                if o in keep:
                    got.setdefault(o, [None] * len(values))[k] = res[o]
            for x in list(case):  # drop what no later segment reads
                if last_reader.get(x, -1) <= seg.index and x not in cases[k]:
                    del case[x]
        del sess, run
        gc.collect()
    return got, used, max((s.weight_bytes for s in segs), default=0)


def compare_blockwise(small_path, big_path, small_ir, big_ir, plan: dict, cases,
                      provider: str, rule: cmp.Rule, notes: list, cache: dict,
                      float64: str = "auto", big_cases=None, chains=None):
    """Both models block by block, in their dtype and (``float64``: auto | on | off) in
    float64 (``big_cases``: the big model's inputs where the plan maps some: a KV cache;
    ``chains``: {"small": decoding.Chain, "big": ...} run after the first case, each step a
    pass through every segment).  Returns (report cases, layerwise rows, first divergent
    block, provider used, largest segment bytes, the float64 level's description, the rule
    applied, the decoding runs or None: {side: (first case's outputs, (steps, why they
    stopped))} for "small", "big", and "small64", "big64" when the float64 level ran)."""
    import onnx

    feeds = {"small": cases, "big": big_cases or cases}

    ds, db = describe(small_ir, cache), describe(big_ir, cache)
    bmap = plan.get("blocks") or {str(i): i for i in range(len(ds.blocks))}
    pairs = []
    for i, b in enumerate(ds.blocks):
        j = bmap.get(str(i), bmap.get(i))
        if j is not None and 0 <= int(j) < len(db.blocks):
            pairs.append((i, int(j), b.output, db.blocks[int(j)].output))
    elem = onnx.TensorProto.FLOAT
    runs = {}
    largest = 0
    used = None
    sides = (("small", small_path, ds, [p[2] for p in pairs]),
             ("big", big_path, db, [p[3] for p in pairs]))
    for side, path, desc, names in sides:
        proto = onnx.load(str(path), load_external_data=False)
        runs[side], used, seg_bytes = run_segments(path, proto, desc, feeds[side], provider,
                                                   names, elem)
        largest = max(largest, seg_bytes)
        del proto
    level, runs64 = _float64_runs(float64, sides, feeds, used, elem, largest, rule, notes)
    decoded = None
    if chains:
        forced = "cuda" if used == CUDA else "cpu"
        decoded = {}
        for side, path, desc, names in sides:
            decoded[side] = _decode(path, desc, chains[side], runs[side], forced, elem, False)
            if runs64:
                decoded[side + "64"] = _decode(path, desc, chains[side], runs64[side], forced,
                                               elem, True)
    if runs64 is None and rule.mode == "relative":  # no float64 runs: the fallback bound
        rule = cmp.Rule("fallback", rule.dtype, rule.atol, rule.rtol)

    def f64(side, name, k):
        return runs64[side].get(name, [None] * len(cases))[k] if runs64 else None
    small_outputs = [v.name for v in small_ir.graph.outputs]
    out_maps = plan.get("outputs") or {}
    report_cases = []
    for k, case in enumerate(cases):
        outs = []
        for n in small_outputs:
            m = out_maps.get(n)
            nb = cmp.big_name(n, m)
            outs.append(cmp.compare_output(n, runs["small"][n][k],
                                           runs["big"].get(nb, [None] * len(cases))[k], m,
                                           rule, small64=f64("small", n, k),
                                           big64=f64("big", nb, k)))
        report_cases.append({"shapes": {n: list(a.shape) for n, a in case.items()},
                             "outputs": outs})
    rows, first = [], None
    for i, j, vs, vb in pairs:
        reps = []
        for k in range(len(cases)):
            a, bb = runs["small"][vs][k], runs["big"][vb][k]
            mapping = {"compare": "prefix", "axis": -1, "size": a.shape[-1]} \
                if (bb.ndim and a.ndim and bb.shape[-1] != a.shape[-1]) else None
            reps.append(cmp.compare_output(vs, a, bb, mapping, rule, small64=f64("small", vs, k),
                                           big64=f64("big", vb, k)))
        agg = cmp.aggregate(reps)
        row = {"block": i, "big_block": j, "value_small": vs, "value_big": vb}
        row.update({k: v for k, v in dataclasses.asdict(agg).items()
                    if k not in ("name", "shape_small", "shape_big")})
        rows.append(row)
        if not agg.passed and first is None:
            first = i
    notes.append(f"blockwise: {len(ds.blocks)} + {len(db.blocks)} blocks run one segment at a "
                 f"time (largest segment's weights {largest / 1e9:.2f} GB)")
    return report_cases, rows, first, used, largest, level, rule, decoded


def _decode(path, desc, chain, runs: dict, provider: str, elem: int, float64: bool):
    """A decoding chain (decoding.py) segment by segment: each step one pass through every
    segment, fed the cache the step before returned.  (first case's outputs, (steps, why))."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    first = {n: v[0] for n, v in runs.items()}

    def run(f: dict) -> dict:
        got, _, _ = run_segments(path, proto, desc, [f], provider, [], elem, float64=float64)
        return {n: v[0] for n, v in got.items()}

    return first, chain.run(run, first, widen=float64)


def float64_by_segments(mode: str, sides, cases: dict, provider: str, rule: cmp.Rule,
                        notes: list):
    """The float64 level segment by segment for a whole-model verification whose float64
    copies do not fit in memory: ``sides`` is ((side, path, description, wanted names), ...),
    ``cases`` {side: inputs}.  Returns (level description, {side: [{name: array} per case]}
    or None when it could not run)."""
    import onnx

    largest = 0
    for _, path, desc, names in sides:
        proto = onnx.load(str(path), load_external_data=False)
        largest = max([largest] + [s.weight_bytes for s in segments(proto, desc, names)])
        del proto
    level, runs = _float64_runs(mode, sides, cases, provider, onnx.TensorProto.FLOAT, largest,
                                rule, notes)
    if runs is None:
        return level, None
    level["segments"] = True
    per_case = {side: [{n: v[k] for n, v in runs[side].items()}
                       for k in range(len(cases[side]))] for side in runs}
    return level, per_case


def _float64_runs(mode: str, sides, cases: dict, provider, elem, largest: int,
                  rule: cmp.Rule, notes: list):
    """The float64 level, segment by segment (``cases``: each side's inputs): (level
    description, {side: runs} or None)."""
    import onnx

    level = float64_level(rule)
    need, avail = F64_SEGMENT_FACTOR * largest, available_memory()
    if mode == "off":
        level["why"] = "turned off (float64=off)"
    elif mode == "auto" and avail is not None and need > F64_MEMORY_SHARE * avail:
        level["why"] = (f"a float64 segment needs about {need / 1e9:.1f} GB and "
                        f"{avail / 1e9:.1f} GB of memory is available")
    if level["why"] is not None:
        if mode != "off":
            notes.append(f"float64 level skipped: {level['why']}; the {rule.dtype} level uses "
                         "the fallback bound (--float64 on forces it)")
        return level, None
    runs64 = {}
    engines: set = set()
    forced = "cuda" if provider == CUDA else "cpu"
    try:
        for side, path, desc, names in sides:
            proto = onnx.load(str(path), load_external_data=False)
            runs64[side], used, _ = run_segments(path, proto, desc, cases[side], forced, names,
                                                 elem, float64=True, engines=engines)
            del proto
    except RuntimeFailure as exc:
        level["why"] = one_line(exc.message, 300)
        if mode == "on":
            raise Float64Unavailable(f"the float64 level could not run (--float64 on): "
                                     f"{level['why']}") from None
        notes.append(f"float64 level skipped: {level['why']}; the {rule.dtype} level uses the "
                     "fallback bound")
        return level, None
    level.update(ran=True, engine="+".join(sorted(engines)) or "onnxruntime", provider=used)
    if "onnx.reference" in engines:
        notes.append("float64 level: segments ONNX Runtime has no double kernel for ran in "
                      "onnx's reference evaluator")
    return level, runs64

"""Merged decoders: optimum's ``decoder_model_merged.onnx``, one file for both decoders.

optimum's ``merge_decoders`` puts the decoder without past key values and the decoder with
them into one graph: a single ``If`` whose condition is a boolean graph input (its loaders
feed ``use_cache_branch``) and whose two branches take no inputs of their own: they read the
outer graph's inputs and its initializers, which the merge de-duplicated across the two.  The
branch that runs with a cache returns placeholders (empty constants) for the outputs only the
other computes (an encoder-decoder's cross-attention cache, which does not change).

Such a file is expanded through its two decoders, so that both branches are rewritten
consistently (``expand_merged``):

1. ``split``: each branch becomes a standalone model (its nodes and outputs, the outer
   initializers and inputs it reads; the placeholders left out): the two decoders as the
   unmerged files hold them;
2. each is expanded (and verified against the standalone source branch) by ``expansion.expand``
   with the same options and seed: the same block gets the same weights in both (the random
   splits are keyed by seed, block and role);
3. ``merge``: the two expanded decoders are merged back as optimum merges them (identical
   initializers shared under one name, placeholders for the outputs the cached branch does
   not compute, at their new sizes);
4. the merged file must compute, in each branch, exactly what the expanded standalone decoder
   computes (the merge is checked on that decoder's own synthesised inputs), or it is our bug.

Recognised by structure (one If on a boolean graph input, branches without inputs), never by
a name.  The outputs and inputs keep their names: they are optimum's loader contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import InternalError, UnsupportedModelError

__all__ = ["BranchesReport", "MergedDecoder", "Split", "describe", "expand_merged", "find_if",
           "is_merged", "merge", "split", "verify_merged"]


class MergedDecoder(UnsupportedModelError):
    """Raised by the single-file pipeline when the file it loaded is a merged decoder: it is
    expanded through its branches instead (``expand_merged``, which writes files); only the
    in-memory form (``expansion.expand_model``) lets it through, as a refusal."""

    def __init__(self, path: str):
        super().__init__(f"{path} is a merged decoder (an If whose branches are the decoder "
                         "with and without past key values): it is expanded branch by branch "
                         "into a file, not in memory.",
                         hint="Use lemon-onnx expand (or lemon_onnx.expand) with an output "
                              "path.")


def is_merged(model) -> bool:
    """The onnx-ir model's graph is a merged decoder's (``find_if``'s rules, on the IR)."""
    import onnx_ir as ir

    g = model.graph
    nodes = list(g)
    if len(nodes) != 1 or nodes[0].op_type != "If" or nodes[0].domain not in ("", "ai.onnx"):
        return False
    node = nodes[0]
    cond = node.inputs[0] if node.inputs else None
    branches = [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
    return (cond is not None and cond.is_graph_input() and cond.dtype == ir.DataType.BOOL
            and len(branches) == 2 and not any(len(b.inputs) for b in branches))


def describe(path) -> dict:
    """Each branch of a merged decoder described, or why it cannot be expanded: {label:
    ModelDescription or the refusal's message}."""
    from .errors import LemonError
    from .io import load
    from .recognize import recognize

    parts = split(onnx.load(str(path)))
    out = {}
    with tempfile.TemporaryDirectory(prefix=".lemon-merged.") as tmp:
        for which, label in _labels(parts).items():
            p = Path(tmp) / f"{which}.onnx"
            onnx.save(parts.model(which), str(p))
            try:
                out[label] = recognize(load(p))
            except LemonError as exc:
                out[label] = exc.message
    return out


def find_if(proto: onnx.ModelProto) -> onnx.NodeProto | None:
    """The merge's If: the graph's only node, on a boolean graph input, with two branches that
    take no inputs and return the graph's outputs.  None when the graph is not merged."""
    g = proto.graph
    if len(g.node) != 1 or g.node[0].op_type != "If" or g.node[0].domain not in ("", "ai.onnx"):
        return None
    node = g.node[0]
    cond = {i.name: i for i in g.input}.get(node.input[0])
    if cond is None or cond.type.tensor_type.elem_type != onnx.TensorProto.BOOL:
        return None
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    if set(branches) != {"then_branch", "else_branch"} or any(b.input for b in branches.values()):
        return None
    if list(node.output) != [o.name for o in g.output]:
        return None
    return node


@dataclasses.dataclass
class Split:
    """The two branches of a merged decoder as standalone models."""

    cond: str  # the condition input
    then_model: onnx.ModelProto
    else_model: onnx.ModelProto
    #: names of outputs a branch fills with a placeholder (an empty constant), per branch
    placeholders: dict

    def model(self, which: str) -> onnx.ModelProto:
        """The standalone model of "then_branch" or "else_branch"."""
        return {"then_branch": self.then_model, "else_branch": self.else_model}[which]


def _refs(graph: onnx.GraphProto) -> set:
    """Every value name the graph's nodes read, subgraphs included."""
    out = set()
    for n in graph.node:
        out.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= _refs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    out |= _refs(sg)
    return out


def _placeholders(branch: onnx.GraphProto) -> set:
    """Outputs made by a Constant of an empty tensor: stand-ins the merge added."""
    found = set()
    for n in branch.node:
        if n.op_type == "Constant" and len(n.output) == 1 and n.output[0] in \
                {o.name for o in branch.output}:
            t = next((a.t for a in n.attribute if a.name == "value"), None)
            if t is not None and 0 in list(t.dims):
                found.add(n.output[0])
    return found


def _strip_suffix(name: str, graph_name: str) -> str:
    """The merge names a shared initializer ``<name>_<graph>_<n>``: give the name back."""
    return re.sub(rf"_{re.escape(graph_name)}_\d+$", "", name) if graph_name else name


def split(proto: onnx.ModelProto) -> Split:
    """Each branch of a merged decoder as a standalone model (see the module docstring)."""
    node = find_if(proto)
    if node is None:
        raise UnsupportedModelError("the graph is not a merged decoder (one If on a boolean "
                                    "graph input, with two branches).")
    g = proto.graph
    branches = {a.name: a.g for a in node.attribute}
    outer_inits = {t.name: t for t in g.initializer}
    inputs = {i.name: i for i in g.input}
    models, placeholders = {}, {}
    for which, br in branches.items():
        used = _refs(br)
        if node.input[0] in used:
            raise UnsupportedModelError(f"a branch of the merged decoder's If {node.name} "
                                        f"reads its condition {node.input[0]}.")
        holders = _placeholders(br)
        stripped = {n: _strip_suffix(n, g.name) for n in outer_inits}
        taken = list(stripped.values()) + list(outer_inits)
        rename = {n: s if taken.count(s) == 1 else n for n, s in stripped.items()}
        nodes = [onnx.NodeProto() for _ in br.node]
        for dst, src in zip(nodes, br.node):
            dst.CopyFrom(src)
            for k, name in enumerate(dst.input):
                if name in rename:
                    dst.input[k] = rename[name]
        nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in holders)]
        inits = [onnx.TensorProto() for n in outer_inits if n in used]
        for dst, name in zip(inits, [n for n in outer_inits if n in used]):
            dst.CopyFrom(outer_inits[name])
            dst.name = rename[name]
        inits += list(br.initializer)
        graph = onnx.helper.make_graph(
            nodes, br.name or which,
            [inputs[i.name] for i in g.input if i.name in used],
            [o for o in br.output if o.name not in holders], initializer=inits,
            value_info=list(br.value_info))
        m = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import),
                                   producer_name=proto.producer_name,
                                   producer_version=proto.producer_version)
        m.ir_version = proto.ir_version
        for p in proto.metadata_props:
            m.metadata_props.add(key=p.key, value=p.value)
        models[which] = m
        placeholders[which] = sorted(holders)
    return Split(node.input[0], models["then_branch"], models["else_branch"], placeholders)


def _digest(t: onnx.TensorProto) -> tuple:
    arr = onnx.numpy_helper.to_array(t)
    return t.data_type, tuple(t.dims), hashlib.sha512(np.ascontiguousarray(arr).tobytes()
                                                       ).hexdigest()


def _placeholder_node(out: onnx.ValueInfoProto, index: int) -> onnx.NodeProto:
    """An empty constant standing for ``out`` (optimum's rule: the first symbolic axis 0, the
    other symbolic axes 1, static axes as declared: the head count after expansion)."""
    dims, first = [], True
    for d in out.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        else:
            dims.append(0 if first else 1)
            first = False
    value = onnx.helper.make_tensor("const_tensor", out.type.tensor_type.elem_type, dims, [])
    return onnx.helper.make_node("Constant", [], [out.name], name=f"Constant_{index}",
                                 value=value)


def merge(then_model: onnx.ModelProto, else_model: onnx.ModelProto, *, cond: str,
          placeholders: dict, like: onnx.ModelProto) -> onnx.ModelProto:
    """The If of ``like`` (the source's merged file) rebuilt around two (expanded) decoders:
    initializers equal in both (dtype, shape, bytes) shared under one name, small integer
    ones kept in their branch (as optimum keeps them), the placeholders re-made at the new
    sizes, the outer graph's inputs in the source's order."""
    src_if = find_if(like)
    gname = like.graph.name
    models = {"then_branch": then_model, "else_branch": else_model}
    groups: dict = {}
    for which, m in models.items():
        for t in m.graph.initializer:
            if len(t.dims) == 0 or (len(t.dims) == 1 and t.data_type in (6, 7)):
                continue  # stays in its branch
            groups.setdefault(_digest(t), []).append((which, t.name))
    shared, rename, used = [], {}, {}
    for key, members in groups.items():
        base = members[0][1]
        used[base] = used.get(base, -1) + 1
        new = f"{base}_{gname}_{used[base]}" if gname else base
        for which, name in members:
            rename[(which, name)] = new
        which, name = members[0]
        t = next(x for x in models[which].graph.initializer if x.name == name)
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = new
        shared.append(c)
    # the outputs as the branch that computes all of them declares them (after a depth
    # expansion: more layers than the source's merged file has)
    full = max(models.values(), key=lambda m: len(m.graph.output))
    outputs = list(full.graph.output)
    out_names = [o.name for o in outputs]
    missing = [o.name for m in models.values() for o in m.graph.output if o.name not in out_names]
    if missing:
        raise InternalError(f"the expanded branches of the merged decoder return different "
                            f"outputs ({', '.join(missing[:4])} in one only).")
    branches = {}
    for which, m in models.items():
        g = m.graph
        nodes = []
        for n in g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for k, name in enumerate(c.input):
                if (which, name) in rename:
                    c.input[k] = rename[(which, name)]
            nodes.append(c)
        own = {o.name: o for o in g.output}
        holders = set(placeholders.get(which, []))
        decl = {o.name: o for o in outputs}
        outs = []
        for name in out_names:
            if name in own:
                outs.append(own[name])
            elif holders:  # the cached branch: a placeholder, at the new sizes
                nodes.append(_placeholder_node(decl[name], len(nodes) + 1))
                outs.append(onnx.helper.make_tensor_value_info(
                    name, decl[name].type.tensor_type.elem_type,
                    [d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in decl[name].type.tensor_type.shape.dim]))
            else:
                raise InternalError(f"the expanded {which} of the merged decoder lacks the "
                                    f"output {name}.")
        small = [t for t in g.initializer
                 if len(t.dims) == 0 or (len(t.dims) == 1 and t.data_type in (6, 7))]
        src_branch = next(a.g for a in src_if.attribute if a.name == which)
        branches[which] = onnx.helper.make_graph(nodes, src_branch.name, [], outs,
                                                 initializer=small)
    declared = outputs  # the If's outputs, as the branch that computes them all declares them
    ins, seen = [], set()
    for m in (models["else_branch"], models["then_branch"]):
        for i in m.graph.input:
            if i.name not in seen and i.name not in {t.name for t in m.graph.initializer}:
                seen.add(i.name)
                ins.append(i)
    cond_in = next(i for i in like.graph.input if i.name == cond)
    order = {i.name: k for k, i in enumerate(like.graph.input)}
    ins = sorted(ins, key=lambda i: order.get(i.name, len(order))) + [cond_in]
    if_node = onnx.helper.make_node("If", [cond], out_names, name=src_if.name,
                                    then_branch=branches["then_branch"],
                                    else_branch=branches["else_branch"])
    graph = onnx.helper.make_graph([if_node], gname, ins, declared, initializer=shared)
    merged = onnx.helper.make_model(graph, opset_imports=list(like.opset_import),
                                    producer_name=like.producer_name,
                                    producer_version=like.producer_version)
    merged.ir_version = like.ir_version
    return merged


@dataclasses.dataclass
class BranchesReport:
    """The verification of a merged decoder: one report per branch (each the branch's
    expansion against the source's branch), and the merge check."""

    branches: dict  # "with past" / "without past" -> VerifyReport
    merge_check: str = ""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.branches.values())

    @property
    def provider_used(self) -> str:
        return next(iter(self.branches.values())).provider_used

    @property
    def max_abs(self) -> float:
        return max(r.max_abs for r in self.branches.values())

    def summary(self) -> str:
        return "; ".join(f"{k}: {r.summary()}" for k, r in self.branches.items())

    def to_dict(self) -> dict:
        return {"passed": self.passed, "merge_check": self.merge_check,
                "branches": {k: r.to_dict() for k, r in self.branches.items()}}

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps({"passed": self.passed, "merge_check": self.merge_check,
                           "branches": {k: json.loads(r.to_json())
                                        for k, r in self.branches.items()}}, **kw)

    def format(self) -> str:
        return "\n".join(f"{k}:\n{r.format()}" for k, r in self.branches.items())


def _labels(s: Split) -> dict:
    """What each branch is, read from the graph: the branch that reads more graph inputs
    takes the cache (a label for reports only; nothing depends on it)."""
    n_then, n_else = len(s.then_model.graph.input), len(s.else_model.graph.input)
    if n_then == n_else:
        return {"then_branch": "then branch", "else_branch": "else branch"}
    cached = "then_branch" if n_then > n_else else "else_branch"
    return {cached: "with past", ("else_branch" if cached == "then_branch" else "then_branch"):
            "without past"}


def expand_merged(src, out, *, progress=None, report=None, **options):
    """Expand a merged decoder through its two branches (module docstring); ``options`` are
    ``expansion.expand``'s.  Returns an ``ExpandResult`` whose verification is a
    ``BranchesReport``; nothing is written at ``out`` unless every step passed."""
    from .expansion import output_folder
    from .progress import Progress

    if not isinstance(progress, Progress):
        progress = Progress(1 if progress else 0)
    src, dest = Path(src), Path(out)
    with output_folder(dest.resolve().parent, progress):
        return _expand_merged(src, dest, progress, report, options)


def _expand_merged(src: Path, dest: Path, progress, report, options: dict):
    from . import io
    from .expansion import ExpandResult, Staging, expand
    from .plan import PLAN_KEY, Plan
    from .progress import Progress

    like = onnx.load(str(src))
    parts = split(like)
    labels = _labels(parts)
    with tempfile.TemporaryDirectory(prefix=".lemon-merged.", dir=dest.resolve().parent) as tmp:
        tmp = Path(tmp)
        results, expanded = {}, {}
        for which, model in (("else_branch", parts.else_model), ("then_branch", parts.then_model)):
            label = labels[which]
            src_b, out_b = tmp / f"src_{which}.onnx", tmp / f"out_{which}.onnx"
            onnx.save(model, str(src_b), save_as_external_data=model.ByteSize() > (1 << 30))
            progress.log(f"{src.name}, {label}:")
            b_report = None if report is None else (
                report if str(report) == "-" else
                Path(report).with_name(f"{Path(report).stem}.{which}{Path(report).suffix}"))
            results[which] = expand(src_b, out_b, progress=Progress(
                progress.verbosity, stream=progress.stream, bar=progress.use_bar),
                report=b_report, config_beside=False, names_as=(src, dest), **options)
            expanded[which] = onnx.load(str(out_b))
        merged = merge(expanded["then_branch"], expanded["else_branch"], cond=parts.cond,
                       placeholders=parts.placeholders, like=like)
        sha = io.source_hash(src)
        names = {w: {i.name for i in m.graph.input} for w, m in expanded.items()}
        plan = _merged_plan({w: r.plan for w, r in results.items()}, sha, names)
        step = _merged_plan({w: r.step_plan for w, r in results.items()}, sha, names)
        del merged.metadata_props[:]
        for p in like.metadata_props:
            if p.key != PLAN_KEY:
                merged.metadata_props.add(key=p.key, value=p.value)
        merged.metadata_props.add(key=PLAN_KEY, value=plan.to_json())
        verify = options.get("verify", True)
        with Staging(dest) as staging:
            big = merged.ByteSize() > io.EXTERNAL_DATA_THRESHOLD
            onnx.save(merged, str(staging.path), save_as_external_data=big,
                      location=staging.path.name + ".data" if big else None)
            try:
                onnx.checker.check_model(str(staging.path))
            except Exception as exc:  # noqa: BLE001 - any checker failure is ours here
                raise InternalError(f"the merged decoder rebuilt from its expanded branches "
                                    f"fails onnx.checker: {exc}") from None
            check = _check_merge(staging.path, {w: tmp / f"out_{w}.onnx" for w in results},
                                 parts.cond, options.get("seed", 0))
            staging.commit()
    verification = None
    if verify:
        verification = BranchesReport({labels[w]: r.verification for w, r in results.items()},
                                      merge_check=check)
    notes = list(dict.fromkeys(n for r in results.values() for n in r.notes))
    return ExpandResult(output=dest, plan=Plan.from_json(plan.to_json()),
                        verification=verification, notes=notes,
                        step=Plan.from_json(step.to_json()))


def _merged_plan(plans: dict, sha: str, inputs: dict):
    """The plan of the merged file: the branches' (which agree on every size and the layer
    order; checked), with the outputs of both and each input's map from the branch that
    takes it (``inputs``: each branch's input names; a branch's plan composed over a chain
    still carries the other branch's earlier maps)."""
    a, b = plans["else_branch"], plans["then_branch"]
    for key in ("source", "target", "layer_sources", "stream_form"):
        if getattr(a, key) != getattr(b, key):
            raise InternalError(f"the two branches of the merged decoder were planned "
                                f"differently ({key}: {getattr(a, key)} vs {getattr(b, key)}).")
    return a.amended(outputs={**b.outputs, **a.outputs},
                     notes=list(dict.fromkeys(a.notes + b.notes)),
                     inputs={k: m for w, p in plans.items() for k, m in p.inputs.items()
                             if k in inputs[w]},
                     source_sha256=sha)


def _session(path: Path):
    """A CPU session with ONNX Runtime's graph optimizations off: they fuse a graph inside an
    If's branch otherwise than the same graph at the top (measured: 3.6e-7 apart on a BART
    decoder), and the merge check wants the graphs' own arithmetic, bit for bit."""
    from .verification.runtime import quiet_onnxruntime, session_options

    ort = quiet_onnxruntime()
    so = session_options(ort)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a file we wrote that ONNX Runtime cannot load
        raise InternalError(f"ONNX Runtime cannot load {path.name}: {exc}") from None


def _check_merge(merged_path: Path, branches: dict, cond: str, seed: int) -> str:
    """Each branch of the merged file computes exactly what the expanded standalone decoder
    computes, on that decoder's own synthesised inputs: otherwise the merge is our bug."""
    from .verification import synthesize_inputs

    merged = _session(merged_path)
    names = [o.name for o in merged.get_outputs()]
    flags = {"then_branch": True, "else_branch": False}
    feeds_of = {w: synthesize_inputs(str(p), seed=seed, cases=((2, 5),))[0]
                for w, p in branches.items()}
    # the merged graph asks for every input of both branches (one branch reads only its own)
    everything = {k: a for fs in feeds_of.values() for k, a in fs.items()}
    for which, path in branches.items():
        alone = _session(path)
        want = [o.name for o in alone.get_outputs()]
        ref = dict(zip(want, alone.run(None, feeds_of[which])))
        got = dict(zip(names, merged.run(None, {**everything, **feeds_of[which],
                                                cond: np.array([flags[which]])})))
        for n in want:
            if not np.array_equal(ref[n], got[n], equal_nan=True):
                raise InternalError(f"the merged decoder's {which} does not compute what the "
                                    f"expanded decoder it was built from computes (output "
                                    f"{n}).")
    return "each branch equals its expanded standalone decoder"


def verify_merged(small, big, **options) -> BranchesReport:
    """``verify`` for two merged decoders: each branch of ``big`` against the same branch of
    ``small`` (the branches carry the merged file's plan, which maps both's inputs);
    ``options`` are ``verification.verify``'s."""
    from .verification import verify

    a, b = split(onnx.load(str(small))), split(onnx.load(str(big)))
    labels = _labels(a)
    reports = {}
    with tempfile.TemporaryDirectory(prefix=".lemon-merged.") as tmp:
        for which in ("else_branch", "then_branch"):
            paths = []
            for tag, parts in (("small", a), ("big", b)):
                path = Path(tmp) / f"{tag}_{which}.onnx"
                model = parts.model(which)
                onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
                paths.append(path)
            reports[labels[which]] = verify(*paths, **options)
    return BranchesReport(reports)

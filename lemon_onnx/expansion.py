"""The expand pipeline: load -> recognise -> plan -> passes -> save -> check -> verify -> commit.

``expand(src, out, ...)`` is the public entry point (``lemon_onnx.expand``); ``expand_model``
expands in memory.  Whose fault a failure is decides its exit code (errors.py):

- with verification on, an ONNX Runtime session is created for the source on the requested
  provider *before* anything is expanded: a source ONNX Runtime cannot load, or a missing
  provider, is ``RuntimeFailure`` (3) within seconds;
- the saved output must pass ``onnx.checker`` (when the source fails it too, the output only
  inherits that: a note), and ONNX Runtime must load and run it where it runs the source (the
  source is tried alone on the same inputs when the pair fails): otherwise ``InternalError``
  (4), as is any exception lemon-onnx did not foresee;
- a mismatch is ``MismatchError`` (1), after the report was written;
- SIGINT/SIGTERM is ``Interrupted`` (130) at any moment (signals.py).

Nothing exists at ``out`` unless everything passed: the model is saved into a temporary folder
beside ``out`` and renamed into place, data file first, in a commit that a signal cannot split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from onnx_ir.passes.common import RemoveUnusedNodesPass

from . import atomic, estimate, io, signals
from .errors import (Float64Unavailable, InputError, InternalError, MismatchError, PlanError,
                     RuntimeFailure, UnsupportedModelError, contract_errors, one_line)
from .plan import PLAN_KEY, Plan, chained, make_plan
from .progress import Progress

if TYPE_CHECKING:  # verify imports numpy; the command line starts without it
    from .verification import VerifyReport

PLACEMENTS = ("interleave", "top", "uniform")
DEPTH_INITS = ("cancel", "zero")
PROVIDERS = ("auto", "cuda", "cpu")


@dataclasses.dataclass
class ExpandResult:
    """What ``expand`` did: the file written, the plan recorded in it, the verification."""

    output: Path
    plan: Plan  # as recorded in the output's metadata (composed over a chain of expansions)
    verification: VerifyReport | None  # None with verify=False
    notes: list[str]  # what changed beyond the sizes: untied head, approximate depth, ...
    #: this step's own plan, relative to its input (``plan`` itself unless the input was an
    #: expanded model): what a folder's config.json is rewritten by
    step: Plan | None = None

    @property
    def step_plan(self) -> Plan:
        return self.step or self.plan

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.passed

    def summary(self) -> str:
        """One line: the sizes before and after this step, the check, the notes in short."""
        s, t = self.plan.step_source, self.plan.target
        line = (f"wrote {self.output}: layers {s['layers']}->{t['layers']}, hidden "
                f"{s['hidden']}->{t['hidden']}, ffn {s['ffn']}->{t['ffn']}, heads "
                f"{s['heads']}->{t['heads']}")
        if self.plan.chain:
            o = self.plan.source
            line += (f" (expansion {len(self.plan.chain) + 1} of a chain from layers "
                     f"{o['layers']}, hidden {o['hidden']})")
        v = self.verification
        line += (f"; verified on {v.provider_used}: {v.summary()}"
                 if v is not None else "; NOT verified (--no-verify)")
        if self.notes:
            line += f"; {len(self.notes)} note(s): " + "; ".join(map(_gist, self.notes))
        return line


def _gist(note: str) -> str:
    """A note's first clause: 'The tied head was untied: ...' -> 'the tied head was untied'."""
    cut = min((i for i in (note.find(c) for c in ":;.(") if i > 0), default=len(note))
    gist = note[:cut].strip()
    return gist[:1].lower() + gist[1:]


# --------------------------------------------------------------------------- in memory
def expand_model(src: str | os.PathLike, *, width: float | None = None,
                 depth: float | None = None, hidden: int | None = None, ffn: int | None = None,
                 heads: int | None = None, layers: int | None = None,
                 placement: str = "interleave", depth_init: str = "cancel", seed: int = 0,
                 keep_tie: bool = False, noise_scale: float | None = None,
                 progress: Progress | None = None):
    """Expand in memory.  Returns (onnx-ir model, this step's plan, description of the source).

    The model's metadata holds this step's plan; ``plan.chained`` composes it with the plan
    the source carries, when the source was itself expanded (``expand`` records that)."""
    progress = progress or Progress(0)
    model, rec, desc, plan = _prepare(
        src, width=width, depth=depth, hidden=hidden, ffn=ffn, heads=heads, layers=layers,
        placement=placement, depth_init=depth_init, seed=seed, keep_tie=keep_tie,
        noise_scale=noise_scale, progress=progress)
    plan = _rewrite(model, rec, desc, plan, progress)
    return model, plan, desc


def _prepare(src, *, width: float | None, depth: float | None, hidden: int | None,
             ffn: int | None, heads: int | None, layers: int | None, placement: str,
             depth_init: str, seed: int, keep_tie: bool, progress: Progress,
             noise_scale: float | None = None):
    """Load, recognise and plan: every refusal (exit 2) comes from here, before any work."""
    from .components.head import untie_reason
    from .passes.streaming import release_all
    from .recognize import Recognizer

    with progress.stage("load") as st:
        model = io.load(src)
        st.done(f"loaded {src}")
    from .merged import MergedDecoder, is_merged

    if is_merged(model):  # expanded through its two decoders (merged.py)
        raise MergedDecoder(str(src))
    _check_inputs(model, src)
    with progress.stage("recognise") as st:
        rec = Recognizer(model)
        desc = rec.run()
        release_all(model)  # unmap the weights recognition read (a tied head's table)
        st.done(f"recognised {desc.family}: {desc.num_layers} layers, hidden "
                f"{desc.hidden}, heads {desc.heads}, ffn {desc.ffn}")
    if desc.blockers:
        raise UnsupportedModelError(
            "This graph has parts lemon-onnx cannot expand losslessly: " + "; ".join(desc.blockers)
            + ".", hint="Export the model without them (e.g. only the base model and its main "
                        "head), or report the architecture.")
    plan = make_plan(desc, width=width, hidden=hidden, ffn=ffn, heads=heads, layers=layers,
                     depth=depth, seed=seed, placement=placement, depth_init=depth_init,
                     noise_scale=noise_scale)
    if keep_tie and plan.widens and untie_reason(rec, desc):
        raise PlanError(f"--keep-tie: this expansion would untie the tied head, because "
                        f"{untie_reason(rec, desc)}",
                        hint="Drop --keep-tie to accept an untied head (it gets its own copy "
                             "of the embedding weights), or expand only in depth "
                             "(--depth/--layers), which keeps the tie.")
    outputs = {}
    for o in desc.outputs:
        if o["kind"] == "hidden" and plan.target["hidden"] != plan.source["hidden"]:
            outputs[o["name"]] = {"compare": "prefix", "axis": -1,
                                  "size": plan.source["hidden"]}
        else:
            outputs[o["name"]] = {"compare": "whole"}
    plan = plan.amended(source_sha256=io.source_hash(src), outputs=outputs,
                        blocks={str(i): i for i in range(desc.num_layers)},
                        layer_sources=list(range(desc.num_layers)))
    if desc.caches and plan.target["layers"] != plan.source["layers"]:
        from .components.cache import naming

        naming(desc.caches)  # refused now if the cache names cannot follow the new layers
    return model, rec, desc, plan


def _check_inputs(model, src) -> None:
    """A graph input declared with an axis of length 0 carries nothing to expand (found by
    tests/test_fuzz.py: the axis analysis divided by it): refused (exit 2)."""
    for v in model.graph.inputs:
        if v.name in model.graph.initializers or v.shape is None:
            continue
        if any(isinstance(d, int) and d == 0 for d in v.shape.dims):
            raise InputError(f"{src}: graph input {v.name} is declared with an axis of length "
                             f"0 ([{', '.join(str(d) for d in v.shape.dims)}]), so the model computes on empty "
                             "tensors.", hint="Re-export the model with the input's real "
                                              "sizes (or symbolic ones).")


def _rewrite(model, rec, desc, plan: Plan, progress: Progress) -> Plan:
    """The passes, composed with onnx-ir's ``PassManager`` (options at construction, the
    model in ``call``; what they share travels with the model: ``passes/recognition.py``),
    then the plan they complete into the metadata.  The plan given is not changed: the one
    returned adds what the passes report (notes, rounded constants, where each source block's
    hidden state is found, how caches are fed)."""
    import onnx_ir as ir

    from .passes.maps import Maps, output_layouts
    from .passes.recognition import RecognizePass, Recorded, remember, results

    maps = Maps.of(plan, desc.layout) if plan.widens else None
    s, t = plan.source, plan.target
    steps = []
    if plan.widens:
        from .passes.width import WidthPass

        steps.append(Recorded("width", WidthPass(plan, maps), progress, lambda r: (
            f"width: hidden {s['hidden']}->{t['hidden']}, ffn {s['ffn']}->{t['ffn']}, heads "
            f"{s['heads']}->{t['heads']} (stream form {plan.stream_form}); {r.literals} size "
            "literals rewritten")))
    if t["layers"] != s["layers"]:
        from .passes.depth import DepthPass

        if plan.widens:
            # the explicit second recognition, only where the width pass gave some consumers
            # their own copy of a shared tensor (names in the description no longer lead to
            # the tensors); otherwise every tensor kept its name and value object, and the
            # sizes the depth pass reads (head_dim, the heads/kv ratio) did not change
            steps.append(RecognizePass(after="width"))
        steps.append(Recorded("depth", DepthPass(plan, maps), progress, lambda r: (
            f"depth: {s['layers']}->{t['layers']} layers ({plan.depth_placement}, "
            f"{plan.depth_init})")))
    if desc.fused:  # ONNX Runtime's fused ops back in place of their widened decompositions
        # (before unused initializers go: a packed input is rebuilt from its pieces)
        from .fusion import RefusePass

        steps.append(Recorded("refuse", RefusePass()))
    steps.append(_DropUnused())
    remember(model, rec, desc)
    outputs = None
    if plan.widens:  # read off the source's recognition, before the passes change the graph
        outputs = {name: dict(m) for name, m in plan.outputs.items()}
        for name, layout in output_layouts(rec, desc, maps).items():
            outputs[name]["layout"] = layout  # what an encoder's decoder reads
    try:
        ir.passes.PassManager(steps)(model)
    except ir.passes.PassError as e:
        # the manager wraps what a pass raises; the pass's own error is the one to report
        # (a refusal is exit 2, a bug exit 4: errors.py)
        cause = e
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        raise cause
    done = results(model)
    width_res, depth_res = done.get("width"), done.get("depth")

    notes, changes = list(plan.notes), {}
    if width_res is not None:
        from .components.cross_attention import plan_inputs as memory_inputs

        notes += width_res.notes
        changes.update(outputs=outputs, rounded=width_res.rounded,
                       inputs={**plan.inputs, **memory_inputs(desc, maps.memory)})
    if depth_res is not None:
        notes += [n for n in depth_res.notes if n not in notes]
        changes.update(blocks=depth_res.blocks, layer_sources=depth_res.layer_sources,
                       exact=plan.exact and depth_res.exact)
    if desc.caches:  # how verification feeds and compares the caches
        from .components.cache import plan_maps

        outs, ins = plan_maps(desc.caches, depth_res.renamed if depth_res else {},
                              depth_res.twin_caches if depth_res else [],
                              maps.kv_index() if maps is not None else None)
        changes["outputs"] = {**changes.get("outputs", plan.outputs), **outs}
        changes["inputs"] = {**changes.get("inputs", plan.inputs), **ins}
    refused = done.get("refuse")
    if refused is not None:
        notes += [f"fused ops put back: "
                  f"{', '.join(f'{op} x{n}' for op, n in sorted(refused.fused.items()))}"]
        notes += [f"left unfused (exact, less optimised): {why}" for why in refused.left]
    plan = plan.amended(notes=notes, **changes)
    _check_unique_names(model)
    model.metadata_props[PLAN_KEY] = plan.to_json()
    return plan


class _DropUnused(RemoveUnusedNodesPass):
    """onnx-ir's ``RemoveUnusedNodesPass`` (initializers the passes replaced, copied before
    they diverged, and left unused), keeping every node's arity: the pass also drops
    trailing empty inputs, which a Loop whose optional cond is '' needs (its schema counts
    it: found by tests/test_fuzz.py)."""

    def call(self, model):
        import onnx_ir as ir

        arity = {n: len(n.inputs) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
        res = super().call(model)
        for n, k in arity.items():
            if len(n.inputs) < k and n.graph is not None:
                n.resize_inputs(k)
        return res


def _check_unique_names(model) -> None:
    seen_nodes, seen_values = set(), set()
    for n in model.graph:
        if n.name:
            if n.name in seen_nodes:
                raise InternalError(f"the expanded graph has two nodes named {n.name}.")
            seen_nodes.add(n.name)
        for o in n.outputs:
            if o.name in seen_values:
                raise InternalError(f"the expanded graph has two values named {o.name}.")
            seen_values.add(o.name)


# --------------------------------------------------------------------------- files
def expand(src: str | os.PathLike, out: str | os.PathLike, *, width: float | None = None,
           depth: float | None = None, hidden: int | None = None, ffn: int | None = None,
           heads: int | None = None, layers: int | None = None,
           placement: str = "interleave", depth_init: str = "cancel", seed: int = 0,
           verify: bool = True, provider: str = "auto", atol: float | None = None,
           rtol: float | None = None,
           inputs: str | os.PathLike | Mapping | Sequence[Mapping] | None = None,
           layerwise: bool = False, keep_tie: bool = False,
           report: str | os.PathLike | None = None, float64: str = "auto",
           noise_scale: float | None = None, blockwise: bool | None = None,
           progress: Progress | bool = False, config_beside: bool = True,
           names_as: tuple | None = None) -> ExpandResult:
    """Expand ``src`` into ``out``; nothing exists at ``out`` unless it passed.

    Sizes: ``width`` (a factor for hidden, FFN and heads) or ``hidden``/``ffn``/``heads``;
    ``depth`` (a factor) or ``layers``.  ``verify``: compare with the source in ONNX Runtime
    on ``provider`` ("auto" | "cuda" | "cpu") with ``atol``/``rtol`` (default by dtype) on
    ``inputs`` (an .npz path, one dict or a list of dicts; default synthesised from ``seed``),
    ``layerwise`` adds every block's hidden state, ``float64`` ("auto" | "on" | "off") runs the
    float64 level (verify's docstring), ``blockwise`` runs the check block by block (None:
    when the estimate says the whole models would not fit in memory).  Before any work the
    output's size, peak memory and time are estimated (``estimate.py``) and an expansion
    that cannot fit in the free disk or memory is refused (``ResourceError``, exit 2).
    ``noise_scale``: the symmetry-breaking noise,
    relative (default ``lemon_math.NOISE_SCALE``).  ``report``: where the verification report
    goes as JSON ("-": stdout), written before a mismatch is raised.  ``keep_tie``: refuse
    rather than untie a tied head.  ``progress``: True for the command line's report on
    stderr, or a ``Progress``.  Raises ``LemonError`` subclasses with ``exit_code`` (and
    ``Interrupted``, a ``KeyboardInterrupt``, with exit_code 130).

    ``src`` may be an export folder (``folder.py``): then ``out`` is a folder, every .onnx
    file is expanded with these options and one seed, config.json is rewritten and the other
    files are copied; the result is a ``FolderResult``.  A single file with a config.json
    beside it gets the rewritten config beside ``out`` (``config_beside``), unless a
    config.json is already there.  ``names_as``: the (source, output) paths the report
    names, where ``src`` and ``out`` are temporaries (a folder's files, a merged decoder's
    branches); by default ``src`` and ``out``."""
    check_sizes(width=width, depth=depth, hidden=hidden, ffn=ffn, heads=heads, layers=layers)
    check_output_paths(out, report)
    if Path(src).is_dir():  # an export folder: every .onnx in it, config.json rewritten
        from .folder import expand_folder

        return expand_folder(src, out, width=width, depth=depth, hidden=hidden, ffn=ffn,
                             heads=heads, layers=layers, placement=placement,
                             depth_init=depth_init, seed=seed, verify=verify,
                             provider=provider, atol=atol, rtol=rtol, inputs=inputs,
                             layerwise=layerwise, keep_tie=keep_tie, report=report,
                             float64=float64, noise_scale=noise_scale, blockwise=blockwise,
                             progress=progress)
    if not isinstance(progress, Progress):
        progress = Progress(1 if progress else 0)
    progress.expect(8 + 2 * bool(verify))  # the stages below
    src, dest = Path(src), Path(out)
    with signals.handling(), contract_errors("expanding", source=src), \
            contextlib.closing(progress):
        _check_request(src, dest, (width, depth, hidden, ffn, heads, layers),
                       placement=placement, depth_init=depth_init, provider=provider)
        from .merged import MergedDecoder, expand_merged

        try:
            model, rec, desc, plan = _prepare(
                src, width=width, depth=depth, hidden=hidden, ffn=ffn, heads=heads,
                layers=layers, placement=placement, depth_init=depth_init, seed=seed,
                keep_tie=keep_tie, noise_scale=noise_scale, progress=progress)
        except MergedDecoder:
            return expand_merged(src, dest, progress=progress, report=report, width=width,
                                 depth=depth, hidden=hidden, ffn=ffn, heads=heads,
                                 layers=layers, placement=placement, depth_init=depth_init,
                                 seed=seed, verify=verify, provider=provider, atol=atol,
                                 rtol=rtol, inputs=inputs, layerwise=layerwise,
                                 keep_tie=keep_tie, float64=float64, noise_scale=noise_scale,
                                 blockwise=blockwise)
        with progress.stage("estimate") as st:  # exit 2 now when it cannot fit
            est = estimate.estimate(desc, plan, model, src=src, dest=dest)
            estimate.check(est, verify=verify, flags=_flags(width, depth, hidden, ffn, heads,
                                                            layers))
            if verify and (blockwise or blockwise is None and est.blockwise) and desc.fused:
                raise InputError(
                    f"verifying this expansion needs about {est.verify_whole_bytes / 1e9:.1f} "
                    "GB of memory whole, and block by block it cannot run on a graph fused by "
                    "ONNX Runtime's optimizer (a block can end inside a fused op)."
                    if blockwise is None else
                    "--blockwise cannot run on a graph fused by ONNX Runtime's optimizer (a "
                    "block can end inside a fused op).",
                    hint="Expand and verify the unoptimised export, then optimise the expanded "
                         "model; or run on a machine with the memory.")
            if verify and blockwise is None and est.blockwise:
                blockwise = True
                progress.note("verification goes block by block: the whole models would need "
                              f"about {est.verify_whole_bytes / 1e9:.1f} GB of memory")
            st.done(est.summary())
        if verify:  # exit 3 before the work: ONNX Runtime must load the source on the provider
            with progress.stage("runtime") as st:
                st.done(_runtime_stage(src, provider, model, float64, progress))
        plan = _rewrite(model, rec, desc, plan, progress)
        recorded = chained(desc.lemon_plan, plan)
        for note in recorded.notes:
            progress.note(note)
        if recorded is not plan:  # verification needs this step's maps; the file the chain's
            model.metadata_props[PLAN_KEY] = (plan if verify else recorded).to_json()
        vreport = None
        with Staging(dest) as staging:
            with progress.stage("save") as st:
                io.save(model, staging.path,
                        on_progress=lambda done, total: progress.advance("save", done, total))
                st.done("saved")
            del model
            with progress.stage("check") as st:
                st.done(_check_graph(staging.path, src, progress))
            if verify:
                with progress.stage("verify") as st:
                    vreport = _verify(src, staging.path, inputs=inputs, atol=atol, rtol=rtol,
                                      provider=provider, layerwise=layerwise, seed=seed,
                                      float64=float64, blockwise=blockwise)
                    st.done(f"verified on {vreport.provider_used}: "
                            f"{'PASS' if vreport.passed else 'FAIL'}")
                small, big = (str(x) for x in (names_as or (src, dest)))
                vreport = dataclasses.replace(vreport, small=small, big=big)
                if report is not None:
                    write_report(vreport, report)
                if not vreport.passed:
                    raise MismatchError("the expanded model does not reproduce the original's "
                                        "outputs; nothing was written.\n" + vreport.format())
                if recorded is not plan:
                    _record_plan(staging.path, recorded)
            config_note = (_config_beside(src, dest, recorded, staging) if config_beside
                           else None)
            with progress.stage("commit") as st:
                staging.commit()
                st.done(f"committed {dest}")
            if staging.created:
                progress.note(f"created the output's folder {staging.created[0]}"
                              + (f" (and {len(staging.created) - 1} inside it)"
                                 if len(staging.created) > 1 else ""))
            if config_note:
                progress.note(config_note)
        return ExpandResult(output=dest, plan=recorded, verification=vreport,
                            notes=list(recorded.notes), step=plan)


def _config_beside(src: Path, dest: Path, plan: Plan, staging: "Staging") -> str | None:
    """The single-file form with a config.json beside the source: the output gets the
    rewritten config beside it, unless that would replace a config.json already there (the
    source's own, when the output goes into the source's folder)."""
    from . import hfconfig
    from .folder import CONFIG, read_config

    cfg = read_config(src.parent)
    if cfg is None:
        return None
    there = dest.resolve().parent / CONFIG
    if there.exists():
        return (f"{src.parent / CONFIG} was not rewritten beside the output: {there} already "
                "exists (expand the folder, lemon-onnx expand DIR -o OUT_DIR, to get a "
                "complete model folder)")
    new, _ = hfconfig.expanded_config(cfg, json.loads(plan.to_json()))
    (staging.dir / CONFIG).write_text(json.dumps(new, indent=2) + "\n")
    return f"wrote {there} with the new sizes (from {src.parent / CONFIG})"


def _check_request(src: Path, dest: Path, sizes: tuple, *, placement: str, depth_init: str,
                   provider: str) -> None:
    for name, value, allowed in (("placement", placement, PLACEMENTS),
                                 ("depth_init", depth_init, DEPTH_INITS),
                                 ("provider", provider, PROVIDERS)):
        if value not in allowed:
            raise InputError(f"unknown {name} {value!r}.", hint=f"Use one of {', '.join(allowed)}.")
    if all(x is None for x in sizes):
        raise PlanError("nothing to do: give --width/--depth or explicit sizes (--hidden, "
                        "--ffn, --heads, --layers).")
    if dest.resolve() == src.resolve():
        raise InputError(f"the output {dest} is the input model; expanding in place would "
                         "destroy the source.", hint="Choose another -o path.")
    if dest.is_dir():
        raise InputError(f"the output {dest} is a directory.",
                         hint=f"Give a file name, e.g. {dest / 'expanded.onnx'}.")


#: factors above this are refused before any work (no Transformer is grown 100x in one step;
#: the estimate would refuse them later anyway, after loading and recognising the model)
MAX_FACTOR = 64.0
#: explicit sizes above this are refused the same way
MAX_SIZE = 1 << 20


def check_sizes(*, width=None, depth=None, hidden=None, ffn=None, heads=None,
                layers=None) -> None:
    """Refuse (exit 2) sizes no expansion can have, before anything is read: factors that are
    not finite positive numbers or are absurdly large, explicit sizes that are not positive
    integers or are absurdly large."""
    import math
    import numbers

    for name, value in (("width", width), ("depth", depth)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError(f"--{name} must be a number, not {value!r}.")
        if not math.isfinite(value):
            raise InputError(f"--{name} {value} is not a finite number.",
                             hint=f"Give a factor such as --{name} 1.5 or --{name} 2.")
        if value <= 0:
            raise InputError(f"--{name} {value:g} is not a positive factor: lossless expansion "
                             "only grows a model.",
                             hint=f"Give a factor above 1, such as --{name} 1.5 or --{name} 2.")
        if value > MAX_FACTOR:
            raise PlanError(f"--{name} {value:g} is beyond what lemon-onnx accepts (factors up "
                            f"to {MAX_FACTOR:g}): the expanded model would be about "
                            f"{value if name == 'depth' else value * value:.3g} times the size "
                            "of the source.",
                            hint="Grow the model in steps that fit your machine, e.g. "
                                 f"--{name} 2.")
    for name, value in (("hidden", hidden), ("ffn", ffn), ("heads", heads),
                        ("layers", layers)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, numbers.Real) and math.isfinite(value) \
                    and float(value).is_integer():
                value = int(value)
            else:
                raise InputError(f"--{name} must be a whole number, not {value!r}.")
        if value <= 0:
            raise InputError(f"--{name} {value} is not a positive size.")
        if value > MAX_SIZE:
            raise PlanError(f"--{name} {value} is beyond what lemon-onnx accepts (sizes up to "
                            f"{MAX_SIZE}).", hint="Choose a size your machine can hold.")


def check_output_paths(out, report=None) -> None:
    """Refuse (exit 2) before any work a report path that cannot be written (``check_file``)
    or that is the output itself.  A missing folder of ``out`` is created when the output is
    committed (``Staging``, ``output_folder``) and said on stderr."""
    check_file(report, "--report")
    if report is not None and str(report) != "-" and out is not None \
            and Path(out).resolve() == Path(report).resolve():
        raise InputError(f"the report path {report} is the output path.",
                         hint="Give the report another name.")


def check_file(path, what: str) -> None:
    """A file to be written later (``-``: stdout): refused now (exit 2) when it is a folder
    or its folder does not exist, so that no work is lost to a path that cannot be written."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory; nothing was done.",
                         hint=f"Give a file name, e.g. {p / 'report.json'}.")
    if not p.resolve().parent.is_dir():
        raise InputError(f"{what} {p}: its folder {p.resolve().parent} does not exist; "
                         "nothing was done.",
                         hint=f"Create the folder first, or give {what} another path.")


def _flags(width, depth, hidden, ffn, heads, layers) -> str:
    """The sizes as the command line gave them: '--width 1000 --depth 100'."""
    given = (("width", width), ("depth", depth), ("hidden", hidden), ("ffn", ffn),
             ("heads", heads), ("layers", layers))
    return " ".join(f"--{k} {v}" if isinstance(v, int) else f"--{k} {v:g}"
                    for k, v in given if v is not None) or "this expansion"


def _runtime_stage(src: Path, provider: str, model, float64: str, progress) -> str:
    """The runtime check before the work (exit 3 when the source cannot run), except where
    only the storage dtype's kernels are missing (bfloat16 on the CPU): then the float64
    level alone will decide, and the user is told so now."""
    from .verification.core import storage_level_missing
    from .verification.models import first_float_dtype

    try:
        return f"ONNX Runtime loads the source on {_source_runs(src, provider)}"
    except RuntimeFailure as failure:
        dtype = first_float_dtype(model)
        if float64 == "off" or not storage_level_missing(failure, dtype):
            raise
        progress.note(f"ONNX Runtime cannot run the {dtype} source here "
                      f"({one_line(failure.message, 160)}): verification is float64 only")
        return f"the {dtype} level cannot run here; float64 only"


def _source_runs(src: Path, provider: str) -> str:
    """The provider ONNX Runtime loads the source on.  A source it cannot load is the
    runtime's limit (exit 3) only if the source is a valid model: one that onnx.checker's
    full check rejects is bad input (exit 2), with the checker's reason."""
    import onnx

    from .verification import make_session

    try:
        sess, used = make_session(src, provider, label=f"the source model {src}")
    except RuntimeFailure as failure:
        if _newer_than_onnx(src):  # a version this onnx does not know: not the model's fault
            raise
        try:
            onnx.checker.check_model(str(src), full_check=True)
        except Exception as exc:  # ValidationError, InferenceError, or a broken file
            raise InputError(f"{src} is not a valid ONNX model: {one_line(exc)} (and ONNX "
                             f"Runtime cannot load it: {failure.message})",
                             hint="Fix or re-export the model; onnx.checker.check_model("
                                  "path, full_check=True) shows the problem.") from None
        raise
    del sess
    return used


def _newer_than_onnx(src: Path) -> bool:
    """The model's IR version or default-domain opset is newer than the installed onnx's."""
    import onnx

    try:
        m = onnx.load(str(src), load_external_data=False)
    except Exception:  # unreadable: the checker below says so
        return False
    opsets = [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")]
    return m.ir_version > onnx.IR_VERSION or any(
        v > onnx.defs.onnx_opset_version() for v in opsets)


def _check_graph(path: Path, src: Path, progress: Progress) -> str:
    """``onnx.checker`` on the output; its failure is lemon-onnx's unless the source fails too."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        return "onnx.checker accepts the output"
    except Exception as exc:  # ValidationError, or what the checker raises on a bad file
        problem = one_line(exc)
    try:
        onnx.checker.check_model(str(src))
    except Exception as exc:
        progress.note(f"onnx.checker rejects the source itself ({one_line(exc)}); the output "
                      "inherits that and is not blamed for it.")
        return "onnx.checker rejects the source too"
    raise InternalError(f"the expanded model fails onnx.checker while the source passes: "
                        f"{problem}")


def _verify(src: Path, tmp: Path, *, inputs, atol: float | None, rtol: float | None,
            provider: str, layerwise: bool, seed: int, float64: str = "auto",
            blockwise: bool | None = None):
    """ONNX Runtime on both; when the pair fails, the source alone on the same inputs tells
    whose failure it is."""
    from .verification import verify as run_verify

    try:
        return run_verify(src, tmp, inputs=inputs, atol=atol, rtol=rtol, provider=provider,
                          layerwise=layerwise, seed=seed, float64=float64, blockwise=blockwise)
    except Float64Unavailable:
        raise  # --float64 on, and the float64 level cannot run: exit 3 as it is
    except RuntimeFailure as failure:
        try:
            run_verify(src, src, inputs=inputs, provider=provider, seed=seed, float64="off",
                       blockwise=blockwise)
        except RuntimeFailure:
            raise failure from None  # the source cannot run: exit 3
        raise InternalError("ONNX Runtime cannot load or run the expanded model, while it "
                            f"runs the source on the same inputs: {failure.message}") from None


def _record_plan(path: Path, plan: Plan) -> None:
    """Replace the plan in a saved model's metadata (a chain's: after verifying the step)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == PLAN_KEY:
            entry.value = plan.to_json()
    tmp = path.with_name(path.name + ".plan")
    onnx.save(proto, str(tmp))
    atomic.replace_file(tmp, path)


def write_report(report, where: str | os.PathLike) -> None:
    """A verification report as JSON: ``"-"`` prints it on stdout, a path gets it whole or
    not at all (a signal waits until the file is in place)."""
    text = report.to_json()
    if str(where) == "-":
        print(text, file=sys.stdout, flush=True)
        return
    atomic.write_text(Path(where), text)


class Staging:
    """A temporary folder beside ``dest``; ``commit()`` renames what was saved into place.

    The folder is created and removed with signals deferred, and the commit starts only if no
    signal came: an interrupted run leaves neither the output nor a temporary behind."""

    def __init__(self, dest: Path):
        self.dest = dest.resolve()
        self.dir: Path | None = None
        self.created: list[Path] = []  # folders made for the output (removed unless committed)
        self.committed = False

    @property
    def path(self) -> Path:
        return self.dir / self.dest.name

    def __enter__(self) -> "Staging":
        with signals.deferred():
            self.created = make_folders(self.dest.parent)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.",
                                             dir=self.dest.parent))
        return self

    def commit(self) -> None:
        files = sorted((p for p in self.dir.iterdir() if p.is_file()),
                       key=lambda p: (p.name == self.dest.name, p.name))  # the model last
        with signals.deferred():
            signals.check()
            signals.commit_started()
            done: list[Path] = []
            try:
                for p in files:
                    os.replace(p, self.dest.parent / p.name)
                    done.append(self.dest.parent / p.name)
                self.committed = True
            except OSError:
                for p in done:
                    p.unlink(missing_ok=True)
                raise

    def __exit__(self, *exc) -> None:
        with signals.deferred():
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            if not self.committed:
                remove_folders(self.created)


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    folder = Path(folder).resolve()
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


@contextlib.contextmanager
def output_folder(folder: Path, progress: Progress | None = None):
    """``folder`` created if missing for the time of the block; removed again (when empty)
    if the block fails, and said on stderr (``progress``) if it succeeds."""
    with signals.deferred():
        created = make_folders(folder)
    try:
        yield created
    except BaseException:
        with signals.deferred():
            remove_folders(created)
        raise
    if created and progress is not None:
        progress.note(f"created the output's folder {created[0]}"
                      + (f" (and {len(created) - 1} inside it)" if len(created) > 1 else ""))


def remove_folders(created: list[Path]) -> None:
    """Undo ``make_folders`` where the folders are still empty (innermost first)."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break

"""The expand pipeline: load -> recognise -> plan -> passes -> verify -> atomic save."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import io
from .errors import MismatchError, UnsupportedModelError
from .plan import PLAN_KEY, Plan, make_plan
from .recognize import Recognizer


def expand_model(src: str | os.PathLike, *, width=None, hidden=None, ffn=None, heads=None,
                 layers=None, depth=None, seed: int = 0, placement: str = "interleave",
                 depth_init: str = "cancel", log: Callable[[str], None] = lambda s: None):
    """Expand in memory.  Returns (onnx-ir model, plan, description of the source)."""
    from .passes.width import expand_width

    t0 = time.perf_counter()
    model = io.load(src)
    rec = Recognizer(model)
    desc = rec.run()
    used_before = {n for n, v in model.graph.initializers.items() if v.uses()}
    if desc.blockers:
        raise UnsupportedModelError(
            "This graph has parts lemon-onnx cannot expand losslessly: " + "; ".join(desc.blockers)
            + ".", hint="Export the model without them (e.g. only the base model and its main "
                        "head), or report the architecture.")
    log(f"recognised {desc.family}: {desc.num_layers} layers, hidden {desc.hidden}, heads "
        f"{desc.heads}, ffn {desc.ffn} ({time.perf_counter() - t0:.1f}s)")
    plan = make_plan(desc, width=width, hidden=hidden, ffn=ffn, heads=heads, layers=layers,
                     depth=depth, seed=seed, placement=placement, depth_init=depth_init)
    plan.source_sha256 = io.source_hash(src)
    for o in desc.outputs:
        if o["kind"] == "hidden" and plan.target["hidden"] != plan.source["hidden"]:
            plan.outputs[o["name"]] = {"compare": "prefix", "axis": -1,
                                       "size": plan.source["hidden"]}
        else:
            plan.outputs[o["name"]] = {"compare": "whole"}
    plan.blocks = {str(i): i for i in range(desc.num_layers)}
    maps = None
    if plan.widens:
        t1 = time.perf_counter()
        stats = expand_width(rec, desc, plan)
        maps = stats.pop("maps")
        log(f"width: hidden {plan.source['hidden']}->{plan.target['hidden']}, ffn "
            f"{plan.source['ffn']}->{plan.target['ffn']}, heads {plan.source['heads']}->"
            f"{plan.target['heads']} (stream form {plan.stream_form}); {stats['literals']} size "
            f"literals rewritten ({time.perf_counter() - t1:.1f}s)")
    if plan.target["layers"] != plan.source["layers"]:
        from .passes.depth import expand_depth

        t1 = time.perf_counter()
        if plan.widens:  # describe the widened graph afresh
            rec = Recognizer(model)
            desc_now = rec.run()
        else:
            desc_now = desc
        expand_depth(model, rec, desc_now, plan, maps)
        log(f"depth: {plan.source['layers']}->{plan.target['layers']} layers "
            f"({plan.depth_placement}, {plan.depth_init}) ({time.perf_counter() - t1:.1f}s)")
    _drop_orphans(model, used_before)
    _check_unique_names(model)
    model.metadata_props[PLAN_KEY] = plan.to_json()
    return model, plan, desc


def _drop_orphans(model, used_before: set) -> None:
    """Initializers our passes replaced (copied before they diverged) and left unused."""
    inits = model.graph.initializers
    outs = set(model.graph.outputs)
    for name in list(inits):
        v = inits[name]
        if name in used_before and not v.uses() and v not in outs:
            del inits[name]


def _check_unique_names(model) -> None:
    seen_nodes, seen_values = set(), set()
    for n in model.graph:
        if n.name:
            assert n.name not in seen_nodes, f"duplicate node name {n.name}"
            seen_nodes.add(n.name)
        for o in n.outputs:
            assert o.name not in seen_values, f"duplicate value name {o.name}"
            seen_values.add(o.name)


def expand_file(src, out, *, verify: bool = True, provider: str = "auto", report=None,
                log: Callable[[str], None] = lambda s: None, **kw) -> tuple[Plan, object]:
    """Expand ``src`` into ``out``; nothing exists at ``out`` unless verification passed."""
    model, plan, desc = expand_model(src, log=log, **kw)
    dest = Path(out).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    vreport = None
    try:
        tmp = tmpdir / dest.name
        io.save(model, tmp)
        if verify:
            from .verify import verify as run_verify

            t0 = time.perf_counter()
            vreport = run_verify(src, tmp, provider=provider)
            log(f"verified on {vreport.provider_used}: "
                f"{'PASS' if vreport.passed else 'FAIL'} ({time.perf_counter() - t0:.1f}s)")
            if report:
                Path(report).write_text(vreport.to_json())
            if not vreport.passed:
                raise MismatchError("the expanded model does not reproduce the original's "
                                    "outputs; nothing was written.\n" + vreport.format())
        for p in sorted(tmpdir.iterdir(), key=lambda p: p.suffix != ".data"):
            os.replace(p, dest.parent / p.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return plan, vreport

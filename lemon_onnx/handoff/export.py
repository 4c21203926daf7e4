"""export-torch: the expanded model as transformers loads it, checked before it is written.

DIR receives
- ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  above ``max_shard_size``) under the target architecture's own parameter names;
- ``config.json``: the source config with the expanded sizes (``hfconfig.py``) and the class
  in ``architectures``;
- ``lemon_tensors.json``: every tensor's name, shape, dtype, the expanded graph's constant(s)
  it comes from, their place in the description, their stored form, what was left out, and
  the check's figures;
- ``lemon_schedule.json``: the learning-rate advice (``schedule.py``).

How (with torch and transformers): the target architecture is built from the expanded config
and asked where each parameter sits in its own ONNX graph (``probe.py``); the expanded model's
constants at the same places become the parameters, stored forms inverted (``target.py``).
The folder is built aside, loaded back with ``from_pretrained`` and compared with the expanded
ONNX model (``check.py``): a mismatch is exit 1 and nothing is left at DIR; otherwise the
folder replaces DIR whole.  Without torch or transformers the names are read from the graph
(``names.py``) and the result says "not verified".

The config: ``config`` (a config.json, its folder, or a dict), else the config.json beside the
model (or in the model's folder); none: exit 2.  A config with the expanded sizes already (an
export folder written by ``expand``) is used as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from .. import atomic, hfconfig, io, signals
from ..graph import const_tensor
from ..recognize import recognize
from . import names, refs as refs_mod, safetensors_out, schedule
from .errors import HandoffError

TENSOR_MAP = "lemon_tensors.json"
SCHEDULE = "lemon_schedule.json"
CONFIG = "config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    files: list  # file names written into out_dir
    tensors: list  # the entries of lemon_tensors.json
    config: dict
    schedule: dict
    notes: list
    left_out: list
    verified: dict | None  # the check's report (CheckReport.to_dict()), None: not verified
    cls_name: str | None

    @property
    def total_bytes(self) -> int:
        return sum(t["bytes"] for t in self.tensors)


# ----------------------------------------------------------------------------- the config
def read_config(config) -> dict:
    """A config.json path, a folder holding one, or a dict (copied)."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    p = Path(config)
    if p.is_dir():
        p = p / CONFIG
    if not p.is_file():
        raise HandoffError(f"{p}: no such config file.",
                           hint="Pass the source model's config.json (or its folder).")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise HandoffError(f"{p} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise HandoffError(f"{p} does not hold a JSON object, so it is not a config.json.")
    return data


def find_config(config, model_path: Path | None) -> tuple[dict, str]:
    """(config, where it came from): the given one, else config.json beside the model."""
    if config is not None:
        return read_config(config), "given" if isinstance(config, dict) else str(config)
    if model_path is not None:
        beside = model_path.parent / CONFIG
        if beside.is_file():
            return read_config(beside), str(beside)
    raise HandoffError(
        "no config.json: export-torch needs the source model's config (its model_type and "
        "settings) to build the architecture transformers will load, and found none "
        + (f"beside {model_path}" if model_path else "for an in-memory model") + ".",
        hint="Pass --config with the config.json of the model that was exported to ONNX "
             "(or put it beside the .onnx file).")


def _plan(desc) -> dict:
    """The expanded model's plan, or an identity plan for a model lemon-onnx did not expand."""
    if desc.lemon_plan:
        return desc.lemon_plan
    sizes = {"hidden": desc.hidden, "ffn": desc.ffn, "heads": desc.heads,
             "kv_heads": desc.kv_heads, "layers": desc.num_layers, "head_dim": desc.head_dim,
             "vocab": desc.vocab}
    return {"source": sizes, "target": dict(sizes), "layer_sources": list(range(
        desc.num_layers)), "stream_form": None}


def target_config(cfg: dict, plan: dict, *, layers: int | None = None, tie=None,
                  dtype=None) -> tuple[dict, list[str]]:
    """The expanded config (``layers``: cut to that many layers, for the probe).  A config
    that already has the target sizes is taken as the expanded one."""
    try:
        hfconfig.check_source(cfg, plan["source"])
        base = plan
    except hfconfig.ConfigError as exc:
        try:
            hfconfig.check_source(cfg, plan["target"])
        except hfconfig.ConfigError:
            raise exc from None
        tgt = plan["target"]
        base = {"source": dict(tgt), "target": dict(tgt), "stream_form": None,
                "layer_sources": list(range(tgt["layers"]))}
    if layers is not None and layers < base["target"]["layers"]:
        base = dict(base, target=dict(base["target"], layers=layers),
                    layer_sources=list(base.get("layer_sources") or [])[:layers])
    return hfconfig.expanded_config(cfg, base, tie=tie, dtype=dtype)


# ----------------------------------------------------------------------------- export
def export_torch(expanded_onnx, out_dir, *, config=None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = True,
                 log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Write ``expanded_onnx`` (an .onnx path, its folder, or an onnx-ir model) into
    ``out_dir`` as transformers loads it, and check it (see the module docstring).

    Raises HandoffError (exit 2) for a model or config that cannot be written, MismatchError
    (exit 1) when the written folder does not compute the expanded model."""
    if safetensors_out.parse_size(max_shard_size) <= 0:
        raise HandoffError(f"--max-shard-size must be positive, got {max_shard_size!r}.")
    path = None
    if isinstance(expanded_onnx, ir.Model):
        model = expanded_onnx
    else:
        path = Path(expanded_onnx)
        if path.is_dir():
            path = path / "model.onnx"
        model = io.load(path)
    cfg, cfg_from = find_config(config, path)
    dest = Path(out_dir)
    _check_dest(dest)
    desc = recognize(model)
    plan = _plan(desc)
    dtype = _dtype(model)
    tie = bool(desc.tie) if desc.head.kind in ("lm", "mlm") and desc.head.linear else None
    try:
        from . import probe as _probe  # noqa: F401 - torch and transformers

        import torch  # noqa: F401
        import transformers  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    notes: list[str] = [f"config from {cfg_from}"]
    if have_torch:
        made = _from_architecture(model, desc, cfg, plan, tie, dtype, log)
    else:
        made = _from_graph(model, desc, cfg, plan, tie, dtype)
    outs, entries, new_cfg, more_notes, left_out, params, cls_name = made
    notes += more_notes
    advice = schedule.advice(desc.lemon_plan, schedule.plan_notes(desc.lemon_plan) + notes,
                             entries)
    with _Staging(dest) as stage:
        files = safetensors_out.write(stage.path, outs, max_shard_size)
        for e in entries:
            e["file"] = files[e["name"]]
        log(f"wrote {len(outs)} tensors ({sum(t.nbytes for t in outs) / 1e6:.1f} MB) in "
            f"{len(set(files.values()))} file(s)")
        rounded = sorted(n for n, p in params.items() if p.rounded)
        for n, p in params.items():
            if p.unset:
                notes.append(f"{p.unset} element(s) of {n} are in no constant of the expanded "
                             "graph (its forward does not read them): written as 0")
        (stage.path / CONFIG).write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        (stage.path / SCHEDULE).write_text(json.dumps(advice, indent=1) + "\n")
        report = None
        if have_torch and verify:
            from .check import check

            log("checking: transformers loads the folder and runs the expanded model's inputs")
            rep = check(stage.path, path if path is not None else model,
                        loaded=(model, desc) if path is not None else None)
            report = rep.to_dict()
            if not rep.passed:
                from ..errors import MismatchError

                raise MismatchError(
                    f"the folder export-torch built for {dest} does not compute the expanded "
                    f"model: {rep.summary()}. Nothing was written.",
                    hint="Report it with the .onnx file and the config.json.")
            log(rep.summary())
        elif have_torch:
            notes.append("not verified: the check was turned off")
        else:
            notes.append("not verified: torch and transformers are not importable here, so "
                         "the names are the exporter's (any wrapper prefix included) and "
                         "nothing loaded the folder; run lemon-onnx verify EXPANDED.onnx "
                         f"{dest} where they are installed")
        (stage.path / TENSOR_MAP).write_text(json.dumps(
            {"model_type": cfg.get("model_type"), "class": cls_name, "tensors": entries,
             "left_out": left_out, "rounded": rounded, "notes": notes, "check": report},
            indent=1, default=_json_default) + "\n")
        written = sorted(p.name for p in stage.path.iterdir())
        stage.commit()
    return ExportResult(dest, written, entries, new_cfg, advice, notes, left_out, report,
                        cls_name)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _check_dest(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise HandoffError(f"the output {dest} is a file, not a folder.",
                           hint="Give a folder for -o; it is created if missing.")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / TENSOR_MAP).is_file():
        raise HandoffError(
            f"the output folder {dest} holds files that export-torch did not write; the "
            "hand-off replaces its folder whole, so it does not write into that one.",
            hint="Give a new or empty folder (or one an earlier export-torch wrote).")


class _Staging:
    """The folder is built in a temporary folder beside ``dest`` and replaces ``dest`` whole
    (an earlier export's files do not survive next to new weights); signals wait for the
    renames, and an error or interruption leaves ``dest`` as it was."""

    def __init__(self, dest: Path):
        self.dest = dest.resolve()

    def __enter__(self) -> "_Staging":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        with signals.deferred():
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.",
                                             dir=self.dest.parent))
        self.path = self.dir / "new"
        self.path.mkdir()
        return self

    def commit(self) -> None:
        atomic.commit_folder(self.path, self.dest, self.dir / "old")  # removed with self.dir

    def __exit__(self, *exc) -> None:
        with signals.deferred():
            shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- checking a folder
def verify_folder(expanded_onnx, folder, *, inputs=None, float64: str = "auto",
                  provider: str = "cpu", log: Callable[[str], None] = lambda s: None):
    """Check a hand-off folder against the expanded model: transformers loads it strictly,
    its tensors are the ones the expanded model gives (every element), and it computes the
    expanded model's outputs (``check.py``).  Returns the CheckReport (``passed``); raises
    HandoffError (exit 2) when torch/transformers are missing or the folder is unusable."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise HandoffError("checking a hand-off folder needs torch and transformers, which "
                           "are not importable here.",
                           hint="pip install 'lemon-onnx[export]' (torch, transformers).") \
            from None
    from .check import check, compare_weights, weights_ok

    path = Path(expanded_onnx)
    if path.is_dir():
        path = path / "model.onnx"
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not any(folder.glob("*.safetensors")):
        raise HandoffError(f"{folder} has no config.json and safetensors weights, so it is not "
                           "a folder export-torch wrote (verify compares a folder of PyTorch "
                           "weights with the expanded .onnx they came from).",
                           hint="Give the folder export-torch wrote, or two .onnx models.")
    model = io.load(path)
    desc = recognize(model)
    cfg = read_config(folder)
    tie = bool(desc.tie) if desc.head.kind in ("lm", "mlm") and desc.head.linear else None
    outs = _from_architecture(model, desc, cfg, _plan(desc), tie, _dtype(model), log)[0]
    weights = compare_weights(folder, outs)
    cases = None
    if inputs is not None:
        from ..verification.inputs import load_inputs

        cases = load_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs
    rep = check(folder, path, cases=cases, float64=float64, provider=provider,
                loaded=(model, desc))
    return dataclasses.replace(rep, weights=weights, passed=rep.passed and weights_ok(weights))


def _dtype(model) -> str | None:
    dtypes = Counter(np.dtype(t.const_value.dtype.numpy()).name
                     for t in model.graph.initializers.values()
                     if t.const_value is not None and t.const_value.dtype.is_floating_point())
    return dtypes.most_common(1)[0][0] if dtypes else None


# ----------------------------------------------------------------------------- with transformers
def _fix_advice(plan: dict, cls_name: str):
    d, D = plan["source"]["hidden"], plan["target"]["hidden"]

    def words(kind: str) -> str:
        if kind == "epsilon" and D % d:
            return (f"An integer width (--width {max(2, math.ceil(D / d))}) keeps the norms "
                    f"exactly as {cls_name} computes them; or keep the expanded ONNX model.")
        return (f"{cls_name} can hold this model expanded in depth only (--depth without "
                "--width); or keep the expanded ONNX model.")

    return words


def _from_architecture(model, desc, cfg, plan, tie, dtype, log):
    from . import probe as pr

    feeds = _probe_feeds(model, desc)
    # which axes are dynamic (named alike for both exporters: the probe is cached by them)
    dyn = {v.name: {ax: ("batch", "sequence")[ax] if ax < 2 else f"axis{ax}"
                    for ax, dim in enumerate(v.shape.dims) if not isinstance(dim, int)}
           for v in model.graph.inputs if v.shape is not None}
    refs = refs_mod.collect(model, desc)
    n = min(len(desc.blocks), pr.PROBE_LAYERS)
    cands = pr.candidates(cfg.get("model_type"), desc.head.kind, cfg.get("architectures"))
    if not cands:
        raise HandoffError(f"transformers has no model class for model_type "
                           f"{cfg.get('model_type')!r}.",
                           hint="Pass the config.json of a model transformers implements.")
    try:
        return _assemble_any(model, desc, cfg, plan, tie, dtype, log, feeds, dyn, refs, n,
                             cands, untie=False)
    except _Untie:
        return _assemble_any(model, desc, cfg, plan, False, dtype, log, feeds, dyn, refs, n,
                             cands, untie=True)


class _Untie(Exception):
    pass


def _assemble_any(model, desc, cfg, plan, tie, dtype, log, feeds, dyn, refs, n, cands, *,
                  untie: bool):
    """The first candidate class whose probe has the expanded model's structure and places
    every parameter (TorchScript's probe first, dynamo's where TorchScript's leaves some)."""
    from . import probe as pr
    from .target import NeedsUntie, Unplaced, assemble

    new_cfg, notes = target_config(cfg, plan, tie=tie, dtype=dtype)
    probe_cfg, _ = target_config(cfg, plan, layers=n, tie=tie)
    reasons, fitting = [], None
    wanted = [(o["name"], o["kind"]) for o in desc.outputs]
    for cls_name in cands[:pr.MAX_CANDIDATES]:
        for exporter, opset in pr.exporters(desc.opset):
            try:
                probe = pr.build(probe_cfg, cls_name, feeds, dyn, wanted, exporter, opset)
            except HandoffError as exc:
                reasons.append(f"{cls_name}: {exc.message}")
                continue
            log(f"probed {cls_name} ({probe.exporter}, {probe.seconds:.1f} s)")
            p, e = probe.desc, desc
            if (p.head.kind, len(p.extra_heads), p.layout) != (e.head.kind, len(e.extra_heads),
                                                               e.layout):
                reasons.append(f"{cls_name}: a {p.layout} model with a {p.head.kind} head and "
                               f"{len(p.extra_heads)} extra head(s); the expanded model is "
                               f"{e.layout} with a {e.head.kind} head and "
                               f"{len(e.extra_heads)}")
                break
            expected = _expected(cls_name, new_cfg)
            try:
                asm = assemble(model, desc, refs, probe, expected, _fix_advice(plan, cls_name),
                               hfconfig.epsilon_factor(plan) if plan.get("stream_form") else 1.0)
            except Unplaced as exc:  # the other exporter's probe may place it
                fitting = fitting or exc
                reasons.append(f"{cls_name} ({exporter}): {exc.message}")
                continue
            except NeedsUntie:
                if untie:
                    raise HandoffError(f"{cls_name} ties its head to the embeddings, and the "
                                       "expanded embeddings need a scale the head must not "
                                       "get.", hint=_fix_advice(plan, cls_name)("hidden"))
                raise _Untie() from None
            new_cfg["architectures"] = [cls_name]
            if untie:
                notes.append("the head is untied (tie_word_embeddings=false): the embeddings "
                             "hold a scale the head must not get")
            outs, entries = _tensors(asm, dtype)
            return (outs, entries, new_cfg, notes + asm.notes, asm.left_out, asm.params,
                    cls_name)
    if fitting is not None:
        raise fitting
    raise HandoffError(
        f"no transformers class for model_type {cfg.get('model_type')!r} has the expanded "
        f"model's structure ({desc.layout}, {desc.head.kind} head): " + "; ".join(reasons[:4]),
        hint="Check that the config.json is the source model's, with the 'architectures' "
             "entry of the exported class.")


def _expected(cls_name: str, cfg: dict) -> dict:
    """{parameter name: shape} of the full target architecture (built on the meta device)."""
    import torch
    import transformers

    from . import probe as pr

    with pr.quiet(), torch.device("meta"):
        full = getattr(transformers, cls_name)(pr.config_object(cfg))
    return {k: tuple(p.shape) for k, p in full.named_parameters()}


def _tensors(asm, dtype) -> tuple[list, list]:
    from .target import produce

    outs, entries = [], []
    for name, par in asm.params.items():
        ddt = np.dtype(_piece_dtype(par) if par.pieces else (dtype or "float32"))
        outs.append(safetensors_out.TensorOut(name, ddt, par.shape,
                                              lambda par=par, ddt=ddt: produce(par, ddt)))
        entries.append({
            "name": name, "shape": list(par.shape), "dtype": ddt.name, "block": par.block,
            "bytes": outs[-1].nbytes,
            "from": _sources(par) or "transformers' initial value (not read by the "
                                     "forward)"})
    return outs, entries


def _sources(par) -> list:
    """Where a parameter's values come from: each stored constant once, with its place in
    the description and its stored form."""
    out, seen = [], set()
    for pc in par.pieces:
        form = pc.binding.form + (", times a norm's gamma" if pc.fold is not None else "")
        if (pc.value.name, form) in seen:
            continue
        seen.add((pc.value.name, form))
        out.append({"onnx": pc.value.name, "key": str(pc.key), "form": form})
    if par.ratio != 1.0:
        out.append({"factor": par.ratio})
    return out


def _piece_dtype(par) -> np.dtype:
    return const_tensor(par.pieces[0].value).dtype.numpy()


def _probe_feeds(model, desc) -> dict:
    from .check import synthesize

    return synthesize(model, desc, cases=((2, 7),))[0]


# ----------------------------------------------------------------------------- without
def _from_graph(model, desc, cfg, plan, tie, dtype):
    """Names read from the graph, for a machine without torch/transformers (not verified)."""
    tensors, notes = names.graph_tensors(desc, model.graph)
    new_cfg, cfg_notes = target_config(cfg, plan, tie=tie, dtype=dtype)
    outs, entries = [], []
    for name, produce, ddt, shape, entry in tensors:
        outs.append(safetensors_out.TensorOut(name, ddt, shape, produce))
        entries.append(dict(entry, name=name, shape=list(shape), dtype=np.dtype(ddt).name,
                            bytes=outs[-1].nbytes))
    return outs, entries, new_cfg, notes + cfg_notes, [], {}, None

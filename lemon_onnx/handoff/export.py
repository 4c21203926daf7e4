"""export-torch: PyTorch-named weights, config.json and LEMON's schedule for an expanded model.

DIR receives
- ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  above ``max_shard_size``), tensors written one at a time from the (memory-mapped) ONNX weights;
- ``config.json`` when the source config is given: its sizes, epsilon and tie flag updated so
  that ``AutoModel*.from_pretrained(DIR)`` builds the expanded architecture;
- ``lemon_tensors.json``: every tensor's name, shape, dtype, role, block, ONNX initializer, where
  its name came from and whether it was transposed (and what was left out, and why);
- ``lemon_schedule.json``: LEMON's learning-rate advice and the plan's notes.
Everything is written into a temporary folder beside DIR and moved in when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from .. import io
from ..recognize import recognize
from . import families, hf_config, safetensors_out, schedule
from .errors import HandoffError
from .names import NameResolver, Slot

TENSOR_MAP = "lemon_tensors.json"
SCHEDULE = "lemon_schedule.json"
CONFIG = "config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    files: list  # file names written into out_dir
    tensors: list  # the entries of lemon_tensors.json
    config: dict | None
    schedule: dict
    notes: list
    left_out: list

    @property
    def total_bytes(self) -> int:
        return sum(t["bytes"] for t in self.tensors)


def _array(v: ir.Value) -> np.ndarray:
    if v.const_value is not None:
        return np.asarray(v.const_value.numpy())
    p = v.producer()  # a Constant node's output
    return np.asarray(p.attributes["value"].value.numpy())


def _meta(v: ir.Value) -> tuple[np.dtype, tuple]:
    t = v.const_value if v.const_value is not None else v.producer().attributes["value"].value
    return t.dtype.numpy(), tuple(int(d) for d in t.shape)


def _torch_layout(s: Slot, fam) -> str:
    """How PyTorch stores this linear weight: nn.Linear [out, in]; GPT-2's Conv1D [in, out]."""
    role = s.role.rsplit(".", 1)[0]
    conv1d = (s.module_class or "").endswith("Conv1D") or (fam is not None and role in fam.conv1d)
    return "in,out" if conv1d else "out,in"


def _outputs(s: Slot, fam) -> list[tuple[str, Callable, np.dtype, tuple, bool]]:
    """(name, produce, dtype, shape, transposed) for a slot: one tensor, or a fused one split."""
    dtype, shape = _meta(s.value)
    transpose = False
    out_axis = 0
    if s.layout is not None:  # a linear weight
        torch_layout = _torch_layout(s, fam)
        # a kept parameter is stored as PyTorch stores it; a folded copy as the op reads it
        transpose = not s.verbatim and s.layout != torch_layout
        out_axis = 0 if (torch_layout == "out,in") else 1
        if s.verbatim:
            out_axis = 0 if s.layout == "out,in" else 1
    if transpose:
        shape = shape[::-1]

    def whole(v=s.value, t=transpose):
        a = _array(v)
        return a.T if t else a

    if not s.parts:
        return [(s.name, whole, dtype, shape, transpose)]
    res = []
    for name, lo, hi in s.parts:
        sub = list(shape)
        sub[out_axis] = hi - lo

        def part(lo=lo, hi=hi, ax=out_axis):
            return np.take(whole(), np.arange(lo, hi), axis=ax)

        res.append((name, part, dtype, tuple(sub), transpose))
    return res


def collect(model: ir.Model, config: dict | None):
    """(description, resolved slots, notes): recognition and names, nothing written."""
    desc = recognize(model)
    model_type = (config or {}).get("model_type")
    resolver = NameResolver(desc, model.graph, model_type)
    slots = resolver.resolve()
    return desc, slots, resolver.notes


def _left_out(model: ir.Model, slots: list[Slot], desc) -> list[dict]:
    """Float initializers no slot exports: a tie's second copy, buffers (RoPE inv_freq), or
    tensors the description does not know (reported, never guessed)."""
    used = {id(s.value) for s in slots}
    out = []
    tie_head = desc.head.linear.weight if desc.head.tie and desc.head.linear else None
    for name, v in model.graph.initializers.items():
        if id(v) in used or v.const_value is None or not v.uses():
            continue
        if not v.const_value.dtype.is_floating_point() or v.const_value.size <= 1:
            continue
        why = ("the tied head: the same tensor as the token embedding (tie_word_embeddings)"
               if name == tie_head else "not a parameter of any recognised role (a buffer or "
               "constant, e.g. RoPE frequencies or a mask)")
        out.append({"onnx": name, "shape": list(v.const_value.shape), "why": why})
    return out


def export_torch(expanded_onnx, out_dir, *, config=None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Write PyTorch weights (safetensors), config.json and the schedule for ``expanded_onnx``
    (a path or an onnx-ir model) into ``out_dir``.  ``config``: the source model's config.json
    (path, folder or dict); without it names come from the graph alone and no config.json is
    written.  Raises HandoffError (exit 2) naming any tensor whose name cannot be recovered."""
    model = expanded_onnx if isinstance(expanded_onnx, ir.Model) else io.load(expanded_onnx)
    cfg = hf_config.read(config)
    dest = Path(out_dir)
    if dest.exists() and not dest.is_dir():
        raise HandoffError(f"the output {dest} is a file, not a folder.",
                           hint="Give a folder for -o; it is created if missing.")
    desc, slots, notes = collect(model, cfg)
    plan = desc.lemon_plan
    fam = families.family((cfg or {}).get("model_type"))
    outs, entries = [], []
    for s in slots:
        for name, produce, dtype, shape, transposed in _outputs(s, fam):
            outs.append(safetensors_out.TensorOut(name, dtype, shape, produce))
            entries.append({"name": name, "shape": list(shape), "dtype": np.dtype(dtype).name,
                            "role": s.role, "block": s.block, "onnx": s.value.name,
                            "name_from": s.source, "transposed": transposed,
                            "bytes": outs[-1].nbytes})
    left_out = _left_out(model, slots, desc)
    dtypes = Counter(np.dtype(t.dtype).name for t in outs)
    new_cfg = None
    if cfg is not None:
        new_cfg, cfg_notes = hf_config.expanded_config(cfg, desc, plan,
                                                       dtype=dtypes.most_common(1)[0][0])
        notes += cfg_notes
    advice = schedule.advice(plan, schedule.plan_notes(plan) + notes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        files = safetensors_out.write(tmp, outs, max_shard_size)
        for e in entries:
            e["file"] = files[e["name"]]
        log(f"wrote {len(outs)} tensors ({sum(t.nbytes for t in outs) / 1e6:.1f} MB) in "
            f"{len(set(files.values()))} file(s)")
        (tmp / TENSOR_MAP).write_text(json.dumps(
            {"model_type": (cfg or {}).get("model_type"), "tensors": entries,
             "left_out": left_out, "notes": notes}, indent=1) + "\n")
        (tmp / SCHEDULE).write_text(json.dumps(advice, indent=1) + "\n")
        if new_cfg is not None:
            (tmp / CONFIG).write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        written = sorted(p.name for p in tmp.iterdir())
        _move_in(tmp, dest, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(dest, written, entries, new_cfg, advice, notes, left_out)


def _is_weights_file(name: str) -> bool:
    return name in (safetensors_out.SINGLE, safetensors_out.INDEX) or (
        name.startswith("model-") and name.endswith(".safetensors"))


def _move_in(tmp: Path, dest: Path, written: list[str]) -> None:
    """Move the finished files into ``dest``; weights of an earlier export there are removed
    first (transformers would read a stale model.safetensors before a new index)."""
    if not dest.exists():
        os.replace(tmp, dest)
        tmp.mkdir()  # for the caller's cleanup
        return
    for p in dest.iterdir():
        if p.is_file() and _is_weights_file(p.name) and p.name not in written:
            p.unlink()
    for name in written:
        os.replace(tmp / name, dest / name)

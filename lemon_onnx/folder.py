"""Export folders in, export folders out.

What conversion pipelines hand over is a folder: optimum's ``model.onnx`` (or
``encoder_model.onnx`` + ``decoder_model.onnx`` + ``decoder_with_past_model.onnx`` /
``decoder_model_merged.onnx``), ``config.json``, ``generation_config.json``, tokenizer or
processor files.  What reads the result back (optimum's ORTModel classes, ORT GenAI,
Transformers.js) takes the same layout and sizes the KV cache from ``config.json``.

``expand_folder(src_dir, out_dir, ...)``:

1. every ``.onnx`` file is one part of one model; the files are told apart by optimum's file
   names (its loaders' contract: ``encoder_model.onnx`` is the encoder stack, the
   ``decoder_*`` files the decoder stack, anything else the model's only stack).  A file
   lemon-onnx cannot expand stops the whole folder (exit 2): an output holding one expanded
   file beside an unexpanded one would be a broken model;
2. each file is expanded and verified by ``expansion.expand`` with the same options and seed, so
   the same block of two files (``decoder_model`` and ``decoder_with_past_model``) gets the same
   weights: the random splits are seeded by (seed, block, role), the maps by the sizes;
3. the plans of one stack must agree (sizes and layer order), and across stacks the hidden
   size: otherwise nothing is written;
4. ``config.json`` gets the new sizes (``hfconfig``); it must then agree with the graphs' own
   KV cache (layers, KV heads, head_dim: what optimum computes from it to size the cache);
5. every other file is copied; the folder is built beside ``out_dir`` and renamed into place
   whole (an existing ``out_dir`` is replaced only if it is an earlier model folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import atomic, hfconfig, signals
from .errors import InputError, InternalError, UnsupportedModelError, contract_errors
from .progress import Progress

CONFIG = "config.json"
ENCODER_FILE = "encoder_model.onnx"
#: optimum's decoder files (ORTModelForSeq2SeqLM; older causal-LM exports use them too)
DECODER_FILES = ("decoder_model.onnx", "decoder_with_past_model.onnx",
                 "decoder_model_merged.onnx")
#: files a model folder holds, besides .onnx: an existing output folder made only of these
#: may be replaced
MODEL_FOLDER_FILES = re.compile(r".*\.(onnx|onnx_data|data|json|txt|model|tiktoken|py|md)$|.*\.onnx\.data$")


@dataclasses.dataclass
class FolderResult:
    """What ``expand`` did with a folder: one ExpandResult per .onnx file, the config."""

    output: Path
    files: dict  # file name -> ExpandResult
    copied: list  # other files, copied unchanged
    config: dict | None  # the written config.json
    notes: list
    #: an encoder-decoder's pipeline check (verification/seq2seq.py), None where none ran
    pipeline: object = None
    #: the written genai_config.json (ONNX Runtime GenAI's model builder), None without one
    genai_config: dict | None = None

    @property
    def verified(self) -> bool:
        return all(r.verified for r in self.files.values()) and \
            (self.pipeline is None or self.pipeline.passed)

    @property
    def plan(self):
        return next(iter(self.files.values())).plan

    def summary(self) -> str:
        parts = []
        for name, r in self.files.items():
            v = r.verification
            parts.append(f"{name} " + (f"verified ({v.summary()})" if v is not None
                                       else "NOT verified (--no-verify)"))
        stacks = {}
        for name, r in self.files.items():  # an encoder-decoder: each stack's sizes
            stacks.setdefault(stack_of(Path(name).name), r.step_plan)
        sizes = []
        for stack, p in stacks.items():
            s, t = p.step_source, p.target
            sizes.append((f"{stack}: " if len(stacks) > 1 else "")
                         + f"layers {s['layers']}->{t['layers']}, hidden {s['hidden']}->"
                         f"{t['hidden']}, ffn {s['ffn']}->{t['ffn']}, heads {s['heads']}->"
                         f"{t['heads']}")
        line = (f"wrote {self.output}/: {len(self.files)} model file(s), " + "; ".join(sizes)
                + "; " + "; ".join(parts))
        if self.pipeline is not None:
            line += f"; {self.pipeline.summary()}"
        if self.config is not None:
            line += "; config.json rewritten"
        if self.genai_config is not None:
            line += f"; {hfconfig.GENAI_CONFIG} rewritten"
        if self.config is None and self.genai_config is None:
            line += f"; no config.json in the source, {len(self.copied)} file(s) copied"
        else:
            line += f", {len(self.copied)} other file(s) copied"
        return line


#: where a folder keeps its model files: at the top (optimum), or in onnx/ (Transformers.js)
MODEL_DIRS = (".", "onnx")


def model_files(src: Path) -> list[Path]:
    """The folder's .onnx files, as paths relative to it."""
    for sub in MODEL_DIRS:
        d = src / sub
        files = sorted(p.relative_to(src) for p in d.glob("*.onnx") if p.is_file()) \
            if d.is_dir() else []
        if files:
            return files
    raise InputError(f"{src} is a folder with no .onnx file in it (nor in {src / 'onnx'}).",
                     hint="Give an ONNX model file, or the folder optimum-cli export onnx "
                          "wrote.")


def stack_of(name: str) -> str:
    """Which stack of the model a file holds, by optimum's file names."""
    if name == ENCODER_FILE:
        return "encoder"
    if name in DECODER_FILES:
        return "decoder"
    return "model"


def read_config(src: Path, name: str = CONFIG) -> dict | None:
    p = src / name
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise InputError(f"{p} is not valid JSON ({e}).",
                         hint=f"Fix or remove the folder's {name}.") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{p} does not hold a JSON object, so it is not a {name}.")
    return cfg


def describe_folder(src) -> dict:
    """What ``inspect DIR`` reports: each model file's description (or why it cannot be
    expanded), its stack, the config's model_type, the files that would be copied."""
    from .errors import LemonError
    from .io import load
    from .merged import describe, is_merged
    from .recognize import recognize

    src = Path(src)
    files = model_files(src)
    cfg = read_config(src)
    genai = read_config(src, hfconfig.GENAI_CONFIG) if cfg is None else None
    model_type = (cfg or {}).get("model_type")
    if genai is not None:  # ORT GenAI's model builder: model.type
        model_type = (genai.get("model") or {}).get("type")
    out = {"folder": str(src), "model_type": model_type,
           "config": CONFIG if cfg is not None else
           (hfconfig.GENAI_CONFIG if genai is not None else None),
           "files": {}, "other_files": []}
    for f in files:
        entry = {"stack": stack_of(f.name)}
        try:
            model = load(src / f)
            if is_merged(model):  # each branch is a decoder of its own
                branches = describe(src / f)
                refused = {k: d for k, d in branches.items() if isinstance(d, str)}
                if refused:
                    entry["refused"] = "; ".join(f"{k} branch: {d}" for k, d in refused.items())
                else:
                    entry["branches"] = branches
            else:
                entry["description"] = recognize(model)
        except LemonError as exc:
            entry["refused"] = exc.message
        out["files"][str(f)] = entry
    out["other_files"] = [str(p) for p in _other_files(src, files)]
    return out


def _check_output(src: Path, dest: Path, files: list[Path]) -> None:
    if dest.resolve() == src.resolve():
        raise InputError(f"the output {dest} is the input folder; expanding in place would "
                         "destroy the source.", hint="Choose another -o folder.")
    if dest.exists() and not dest.is_dir():
        raise InputError(f"the input is a folder, but the output {dest} is a file.",
                         hint="Give a folder for -o (it is created).")
    if src.resolve() in dest.resolve().parents:
        raise InputError(f"the output folder {dest} is inside the input folder {src}.",
                         hint="Choose a folder outside the model's folder.")
    if dest.is_dir():
        subs = {f.parts[0] for f in files if len(f.parts) > 1}
        other = [p.name for p in dest.iterdir()
                 if not (p.is_file() and MODEL_FOLDER_FILES.fullmatch(p.name)
                         or p.is_dir() and p.name in subs)]
        if other:
            raise InputError(f"the output folder {dest} exists and holds {', '.join(other[:3])}"
                             f"{' ...' if len(other) > 3 else ''}, which is not part of a model "
                             "folder; lemon-onnx replaces an existing output folder whole and "
                             "will not delete them.",
                             hint="Choose a new or empty folder for -o.")


def expand_folder(src, out, *, progress: Progress | bool = False, **options) -> FolderResult:
    """Expand every model file of the export folder ``src`` into the folder ``out`` (the
    keyword options are ``expansion.expand``'s); nothing is at ``out`` unless all verified."""
    from .expansion import output_folder

    if not isinstance(progress, Progress):
        progress = Progress(1 if progress else 0)
    src, dest = Path(src), Path(out)
    report = options.pop("report", None)
    if options.get("inputs") is not None:
        raise InputError("--inputs names one model's inputs, and a folder holds several "
                         "models.", hint="Expand the .onnx files one by one to give inputs, or "
                                         "let lemon-onnx synthesise them.")
    with signals.handling(), contract_errors("expanding the folder"):
        if not src.is_dir():
            raise InputError(f"{src}: no such folder.")
        files = model_files(src)
        _check_output(src, dest, files)
        cfg = read_config(src)
        with output_folder(dest.resolve().parent, progress):
            return _expand_folder(src, dest, files, cfg, report, options, progress)


def _expand_folder(src: Path, dest: Path, files: list, cfg, report, options: dict,
                   progress: Progress) -> FolderResult:
    from .expansion import expand

    with signals.deferred():
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's 0700
    try:
        results = {}
        for f in files:
            progress.log(f"{f}:")
            file_report = None if report is None else (
                report if str(report) == "-" else
                Path(report).with_name(f"{Path(report).stem}.{f.stem}{Path(report).suffix}"))
            (stage / f).parent.mkdir(exist_ok=True)
            results[str(f)] = expand(src / f, stage / f, progress=_child(progress),
                                     report=file_report, config_beside=False,
                                     names_as=(src / f, dest / f), **options)
        plans = _stack_plans(results)
        pipeline = _pipeline(src, stage, results, options, report, progress)
        copied = _copy_others(src, stage, files)
        new_cfg, notes = None, []
        if cfg is not None:
            main = plans.get("model") or plans.get("encoder") or plans["decoder"]
            dec = plans.get("decoder") if "encoder" in plans else None
            from .components.head import UNTIED_NOTE

            untied = any(n.startswith(UNTIED_NOTE) for r in results.values()
                         for n in r.plan.notes)
            new_cfg, notes = hfconfig.expanded_config(cfg, main, decoder_plan=dec,
                                                      tie=False if untied else None)
            check_cache_config(new_cfg, stage, files)
            (stage / CONFIG).write_text(json.dumps(new_cfg, indent=2) + "\n")
        genai, new_genai = read_config(src, hfconfig.GENAI_CONFIG), None
        if genai is not None:
            main = plans.get("model") or plans.get("decoder") or next(iter(plans.values()))
            new_genai = hfconfig.expanded_genai_config(genai, main)
            check_genai_config(new_genai, stage)
            (stage / hfconfig.GENAI_CONFIG).write_text(json.dumps(new_genai, indent=4) + "\n")
            notes.append(f"{hfconfig.GENAI_CONFIG}: the decoder's sizes rewritten "
                         "(ONNX Runtime GenAI sizes its KV cache from them)")
        for n in notes:
            progress.note(n)
        _commit(stage, dest)
    finally:
        with signals.deferred():
            shutil.rmtree(stage, ignore_errors=True)
    return FolderResult(dest, results, copied, new_cfg, notes, pipeline, new_genai)


def _pipeline(src: Path, stage: Path, results: dict, options: dict, report, progress):
    """An encoder-decoder folder is also checked as its runtime runs it: the encoder once,
    the decoders without and with past, cached steps compared one by one
    (``verification/seq2seq.py``).  A mismatch stops the folder (exit 1), nothing written."""
    from .errors import MismatchError
    from .expansion import write_report
    from .verification import seq2seq

    if not options.get("verify", True) or not seq2seq.applies(src):
        return None
    with progress.stage("pipeline") as st:
        rep = seq2seq.check(src, stage, provider=options.get("provider", "auto"),
                            seed=options.get("seed", 0),
                            approximate=any(not r.plan.exact for r in results.values()))
        st.done(rep.summary())
    if report is not None:
        write_report(rep, report if str(report) == "-" else
                     Path(report).with_name(f"{Path(report).stem}.pipeline"
                                            f"{Path(report).suffix}"))
    if not rep.passed:
        raise MismatchError("the expanded folder's encoder-decoder pipeline does not reproduce "
                            "the source's; nothing was written.\n" + rep.format())
    return rep


def _child(progress: Progress) -> Progress:
    """Each file's stages are reported like a single file's, at the folder's verbosity."""
    return Progress(progress.verbosity, stream=progress.stream, bar=progress.use_bar)


def _stack_plans(results: dict) -> dict:
    """One plan per stack; the files of a stack must agree, the stacks on the hidden size."""
    plans: dict[str, dict] = {}
    first: dict[str, str] = {}
    for name, r in results.items():
        stack = stack_of(Path(name).name)
        p = json.loads(r.step_plan.to_json())  # relative to this step's input
        if stack not in plans:
            plans[stack], first[stack] = p, name
            continue
        q = plans[stack]
        for key in ("source", "target", "layer_sources", "stream_form"):
            if p.get(key) != q.get(key):
                raise UnsupportedModelError(
                    f"{name} and {first[stack]} hold the same {stack} stack, but lemon-onnx "
                    f"planned them differently ({key}: {p.get(key)} vs {q.get(key)}), so the "
                    "expanded files would not be one model; nothing was written.",
                    hint="Report this folder; expand its files one by one meanwhile.")
    hidden = {s: p["target"]["hidden"] for s, p in plans.items()}
    if len(set(hidden.values())) > 1:
        raise UnsupportedModelError(f"the stacks of this folder would get different hidden "
                                    f"sizes ({hidden}); nothing was written.")
    _check_memory_layout(results, plans)
    return plans


def _check_memory_layout(results: dict, plans: dict) -> None:
    """A decoder's cross-attention reads the encoder's output in the layout its fan-in was
    widened for (the plan's ``memory`` input map); the encoder must write that layout (its
    hidden output's ``layout``), or the pair would compute something else."""
    enc = plans.get("encoder")
    if enc is None:
        return
    layouts = [m["layout"] for m in (enc.get("outputs") or {}).values() if "layout" in m]
    for name, r in results.items():
        if stack_of(Path(name).name) != "decoder":
            continue
        for inp, m in (json.loads(r.step_plan.to_json()).get("inputs") or {}).items():
            if m.get("memory") and layouts and m.get("index") not in layouts:
                raise UnsupportedModelError(
                    f"{name}'s cross-attention reads {inp} in another layout than the encoder "
                    "writes its output in (e.g. a pre-norm decoder beside an encoder without a "
                    "final norm), so the expanded pair would not compute the same; nothing "
                    "was written.", hint="Report this folder with inspect DIR --json.")


def _other_files(src: Path, files: list[Path]) -> list[Path]:
    """Every file under ``src`` that is not a model file, its external data, config.json nor
    genai_config.json
    (relative paths)."""
    import onnx

    skip = {Path(CONFIG), Path(hfconfig.GENAI_CONFIG)} | set(files)
    for f in files:
        proto = onnx.load(str(src / f), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    skip.add(f.parent / e.value)
    return sorted(p.relative_to(src) for p in src.rglob("*")
                  if p.is_file() and p.relative_to(src) not in skip)


def _copy_others(src: Path, stage: Path, files: list[Path]) -> list[str]:
    copied = []
    for rel in _other_files(src, files):
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, stage / rel)
        copied.append(str(rel))
    return copied


#: how optimum and ONNX Runtime GenAI name a decoder's past keys (``%d``: the layer)
PAST_KEYS = "past_key_values.%d.key"


def past_keys(proto, template: str = PAST_KEYS) -> dict:
    """{layer: graph input} of the past keys a decoder graph declares, named by ``template``."""
    pattern = re.escape(template).replace("%d", r"(\d+)")
    return {int(m.group(1)): v for v in proto.graph.input
            if (m := re.fullmatch(pattern, v.name))}


def check_cache_config(cfg: dict, folder: Path, files: list[Path]) -> None:
    """The config must size the KV cache as the graphs declare it: optimum computes the
    layer count, KV heads and head_dim from config.json, and feeds a cache of that shape."""
    import onnx

    layers = _first(cfg, hfconfig.SIZE_KEYS["layers"] + hfconfig.DECODER_KEYS["layers"])
    for f in files:
        past = past_keys(onnx.load(str(folder / f), load_external_data=False))
        if not past:
            continue
        if stack_of(f.name) == "decoder":
            layers = _first(cfg, hfconfig.DECODER_KEYS["layers"]) or layers
        if layers is not None and len(past) != layers:
            raise InternalError(f"{f.name} has {len(past)} past_key_values pairs, but the "
                                f"rewritten config.json says {layers} layers.")


def check_genai_config(cfg: dict, folder: Path) -> None:
    """ONNX Runtime GenAI feeds the decoder file its config names a cache of
    (layers, KV heads, head size) from ``model.decoder``: the graph must declare the same."""
    import onnx

    dec = cfg["model"]["decoder"]
    f = folder / dec.get("filename", "model.onnx")
    if not f.is_file():
        raise InputError(f"{hfconfig.GENAI_CONFIG} names the decoder file {f.name}, which the "
                         "folder does not hold.")
    template = (dec.get("inputs") or {}).get("past_key_names", PAST_KEYS)
    past = past_keys(onnx.load(str(f), load_external_data=False), template)
    want = {"num_hidden_layers": len(past)}
    if past:
        dims = [d.dim_value or None for d in past[min(past)].type.tensor_type.shape.dim]
        if len(dims) == 4:
            want.update(num_key_value_heads=dims[1], head_size=dims[3])
    for key, n in want.items():
        if n is not None and key in dec and int(dec[key]) != int(n):
            raise InternalError(f"{f.name} declares {key.replace('num_', '')} {n} in its "
                                f"cache inputs, but the rewritten {hfconfig.GENAI_CONFIG} says "
                                f"{key}={dec[key]}.")


def _first(cfg: dict, keys) -> int | None:
    for k in keys:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def _commit(stage: Path, dest: Path) -> None:
    """Rename the finished folder into place; an earlier output folder is moved aside first
    and removed after."""
    old = atomic.commit_folder(stage, dest, dest.with_name(f".{dest.name}.old{os.getpid()}"))
    stage.mkdir()  # for the caller's cleanup
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class FolderReport:
    """``verify`` of two export folders: one report per model file, and the pipeline check
    of an encoder-decoder."""

    files: dict  # file -> VerifyReport (a merged decoder's: a BranchesReport)
    pipeline: object = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.files.values()) and \
            (self.pipeline is None or self.pipeline.passed)

    @property
    def provider_used(self) -> str:
        return next(iter(self.files.values())).provider_used

    def summary(self) -> str:
        parts = [f"{n}: {r.summary()}" for n, r in self.files.items()]
        if self.pipeline is not None:
            parts.append(self.pipeline.summary())
        return "; ".join(parts)

    def format(self) -> str:
        text = [f"{'PASS' if self.passed else 'FAIL'}: {len(self.files)} model file(s)"
                + (" and the encoder-decoder pipeline" if self.pipeline is not None else "")]
        for n, r in self.files.items():
            text.append(f"{n}:\n{r.format()}")
        if self.pipeline is not None:
            text.append(self.pipeline.format())
        return "\n".join(text)

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps({"passed": self.passed,
                           "files": {n: json.loads(r.to_json()) for n, r in self.files.items()},
                           "pipeline": None if self.pipeline is None
                           else self.pipeline.to_dict()}, **kw)


def verify_folder(small, big, **options) -> FolderReport:
    """``verify`` for export folders: each model file of ``big`` against the file of the same
    name in ``small`` (``verification.verify``'s ``options``), then an encoder-decoder's pipeline."""
    from .verification import seq2seq, verify

    small, big = Path(small), Path(big)
    if not big.is_dir():
        raise InputError(f"{small} is a folder but {big} is not: give two export folders, or "
                         "two model files.")
    files = model_files(small)
    missing = [str(f) for f in files if not (big / f).is_file()]
    if missing:
        raise InputError(f"{big} lacks {', '.join(missing)}, which {small} has.",
                         hint="Compare a folder with its own expansion (lemon-onnx expand DIR).")
    reports = {str(f): verify(small / f, big / f, **options) for f in files}
    pipeline = None
    if seq2seq.applies(small):
        pipeline = seq2seq.check(small, big, provider=options.get("provider", "auto"),
                                 seed=options.get("seed", 0),
                                 approximate=_approximate(big, files))
    return FolderReport(reports, pipeline)


def _approximate(folder: Path, files: list) -> bool:
    """Whether any file's recorded plan says the expansion is approximate by design."""
    import onnx

    from .plan import PLAN_KEY

    for f in files:
        proto = onnx.load(str(folder / f), load_external_data=False)
        for p in proto.metadata_props:
            if p.key == PLAN_KEY and json.loads(p.value).get("exact") is False:
                return True
    return False

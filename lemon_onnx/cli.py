"""Command line: ``lemon-onnx inspect | expand | verify`` (also ``python -m lemon_onnx``).

Exit codes (the contract other tools rely on, ``errors.EXIT_CODES``): 0 success, 1 not
equivalent, 2 bad input or refused, 3 the source cannot run in ONNX Runtime or the provider is
missing, 4 a lemon-onnx bug, 130 interrupted.  Errors are one paragraph on stderr, never a
traceback (``LEMON_ONNX_DEBUG=1`` shows one for bug reports).  Progress and notes go to
stderr; the result (the description, the ``wrote`` line, the verification table) to stdout,
or to stderr when ``--report -`` puts the JSON report on stdout.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import click

from . import __version__, signals
from .errors import UnsupportedModelError, as_contract_error, exit_codes_help
from .progress import Progress

EPILOG = exit_codes_help()


def _report_failure(exc: BaseException) -> int:
    """Print the one-paragraph message for ``exc``; return the contract's exit code."""
    if isinstance(exc, SystemExit):  # guarded() already said why
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if signals.received() is None or code == 130:
            return code
    if isinstance(exc, click.exceptions.Exit) and signals.received() is None:
        return exc.exit_code
    if isinstance(exc, click.ClickException) and signals.received() is None:
        click.echo(f"lemon-onnx: error: {exc.format_message()} (see lemon-onnx --help)",
                   err=True)
        return 2
    if isinstance(exc, click.Abort):  # click's name for a KeyboardInterrupt it caught
        exc = exc.__context__ or KeyboardInterrupt()
    err = as_contract_error(exc, signal_received=signals.received())
    if os.environ.get("LEMON_ONNX_DEBUG"):
        traceback.print_exception(exc)
    click.echo(f"lemon-onnx: error: {err}", err=True)
    return getattr(err, "exit_code", 4)


def _import_compiled() -> None:
    """Import the compiled libraries the commands use while signals wait, then raise a signal
    that came meanwhile (exit 130).  An interrupt raised inside a compiled module's own
    initialisation aborts the interpreter instead (onnx's nanobind or ONNX Runtime's pybind11
    init: measured exit -6 or -11 in about 1 of 100 runs when SIGINT came during those imports,
    tests/test_contract.py's random moments); imported here, the later imports find them."""
    with signals.deferred():
        import ml_dtypes  # noqa: F401
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxruntime  # noqa: F401


def guarded(fn):
    """Turn every failure into a one-paragraph message and the contract's exit code (also
    when the group is invoked without ``main``, e.g. by click's test runner)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _import_compiled()
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except BaseException as exc:
            sys.exit(_report_failure(exc))

    return wrapper


def verbosity_options(fn):
    fn = click.option("-v", "--verbose", is_flag=True,
                      help="Also every stage's summary and timing (and, for expand, the "
                           "verification table).")(fn)
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress, no notes: only the result and errors.")(fn)


def _progress(quiet: bool, verbose: bool, total: int | None = None) -> Progress:
    return Progress(0 if quiet else (2 if verbose else 1), total=total)


def _human(report) -> object:
    """Where human-readable results go: stdout, unless the JSON report took it."""
    return sys.stderr if report is not None and str(report) == "-" else sys.stdout


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="lemon-onnx")
def cli() -> None:
    """Lossless width/depth expansion (LEMON) of Transformers exported to ONNX."""


@cli.command(epilog=EPILOG)
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
@verbosity_options
@guarded
def inspect(model: str, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Show what was recognised in MODEL: family, layout, sizes, blocks, size literals.

    MODEL may be an export folder: each .onnx in it is described (or why it cannot be
    expanded), with the config's model_type and the files expand would copy."""
    from .io import load
    from .recognize import recognize

    if os.path.isdir(model):
        _inspect_folder(model, as_json)
        return

    progress = _progress(quiet, verbose, total=2)
    with progress:
        with progress.stage("load", level=2) as st:  # the description is the result
            m = load(model)
            st.done(f"loaded {model}")
        from .merged import describe, is_merged

        if is_merged(m):  # a merged decoder: each branch is a decoder of its own
            _inspect_branches(model, describe(model), as_json)
            return
        with progress.stage("recognise", level=2) as st:
            desc = recognize(m)
            st.done(f"recognised {desc.family}")
    click.echo(desc.to_json(indent=2) if as_json else format_description(desc, model))


def _inspect_branches(model: str, branches: dict, as_json: bool) -> None:
    """A merged decoder: each branch described (or why it cannot be expanded)."""
    import json

    if as_json:
        click.echo(json.dumps({"merged_decoder": {
            label: d if isinstance(d, str) else d.to_dict() for label, d in branches.items()}},
            indent=2, default=str))
    else:
        click.echo(f"{model}: merged decoder (an If on a boolean input; each branch is a "
                   "decoder, expanded on its own and merged back)")
        for label, d in branches.items():
            text = (f"{label}: cannot be expanded: {d}" if isinstance(d, str)
                    else format_description(d, label))
            click.echo("\n".join("  " + line for line in text.splitlines()))
    refused = [label for label, d in branches.items() if isinstance(d, str)]
    if refused:
        raise UnsupportedModelError(f"the merged decoder's {' and '.join(refused)} branch "
                                    "cannot be expanded, so expand would refuse it.")


def _inspect_folder(folder: str, as_json: bool) -> None:
    import json

    from .folder import describe_folder

    info = describe_folder(folder)
    refused = [n for n, e in info["files"].items() if "refused" in e]
    if as_json:
        data = dict(info, files={n: {"stack": e["stack"], "refused": e.get("refused"),
                                     "description": e["description"].to_dict()
                                     if "description" in e else None,
                                     **({"branches": {k: d.to_dict() for k, d in
                                                      e["branches"].items()}}
                                        if "branches" in e else {})}
                                 for n, e in info["files"].items()})
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(f"{folder}: export folder, model_type {info['model_type'] or '?'}"
                   f"{' (no config.json)' if not info['config'] else ''}"
                   f"{' (' + info['config'] + ')' if info['config'] not in (None, 'config.json') else ''}, "
                   f"{len(info['files'])} model file(s)")
        for name, e in info["files"].items():
            if "branches" in e:
                for label, d in e["branches"].items():
                    text = format_description(d, f"{name} [{e['stack']}, {label}]")
                    click.echo("\n".join("  " + line for line in text.splitlines()))
            elif "description" in e:
                text = format_description(e["description"], f"{name} [{e['stack']}]")
                click.echo("\n".join("  " + line for line in text.splitlines()))
            else:
                click.echo(f"  {name} [{e['stack']}]: cannot be expanded: {e['refused']}")
        click.echo(f"  copied unchanged by expand: {', '.join(info['other_files']) or 'nothing'}")
    if refused:
        raise UnsupportedModelError(f"{len(refused)} of {len(info['files'])} model file(s) in "
                                    f"{folder} cannot be expanded ({', '.join(refused)}), so "
                                    "expand would refuse the folder.")


REPORT_HELP = "Write the verification report as JSON to FILE ('-': stdout, text then on stderr)."


@cli.command(epilog=EPILOG)
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Where to write the expanded model (written only if it verifies); a "
                   "folder when MODEL is an export folder.")
@click.option("--width", type=float, help="Factor for hidden size, FFN size and head count.")
@click.option("--depth", type=float, help="Factor for the number of blocks.")
@click.option("--hidden", type=int, help="Target hidden size.")
@click.option("--ffn", type=int, help="Target FFN (intermediate) size.")
@click.option("--heads", type=int, help="Target attention head count (head_dim is kept).")
@click.option("--layers", type=int, help="Target number of blocks.")
@click.option("--placement", type=click.Choice(["interleave", "top", "uniform"]),
              default="interleave", show_default=True, help="Where new blocks go.")
@click.option("--depth-init", type=click.Choice(["cancel", "zero"]), default="cancel",
              show_default=True, help="How new blocks start as the identity.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the symmetry-breaking noise (and of synthesised check inputs).")
@click.option("--noise-scale", type=float, default=None,
              help="Symmetry-breaking noise relative to the weights (default 0.5; 0: none).")
@click.option("--keep-tie", is_flag=True,
              help="Refuse (exit 2) rather than untie a tied embedding/head.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime equivalence check.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Execution provider for verification.")
@click.option("--inputs", type=click.Path(dir_okay=False),
              help="Check inputs as .npz (keys <input> or case<k>/<input>); default: synthesised.")
@click.option("--atol", type=float, help="Absolute tolerance (default by dtype: fp32 1e-4).")
@click.option("--rtol", type=float, help="Relative tolerance (default by dtype: fp32 1e-3).")
@click.option("--layerwise", is_flag=True, help="Also compare the hidden state after every block.")
@click.option("--blockwise", is_flag=True, default=None,
              help="Verify block by block (bounded memory; chosen automatically when the "
                   "whole models would not fit in memory).")
@click.option("--float64", "float64", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="The float64 level of the check: both graphs in double "
              "precision (auto: when the copies fit in memory; block by block, one segment's "
              "copy at a time).")
@click.option("--report", type=click.Path(dir_okay=False, allow_dash=True), help=REPORT_HELP)
@verbosity_options
@guarded
def expand(model, out, width, depth, hidden, ffn, heads, layers, placement, depth_init, seed,
           noise_scale, keep_tie, no_verify, provider, inputs, atol, rtol, layerwise, blockwise,
           float64, report, quiet, verbose):
    """Expand MODEL wider and/or deeper so that it computes the same numbers.

    The plan's notes (an untied head, an approximate Post-LN depth expansion, units that
    start at zero) are printed on stderr and summarised in the final line."""
    from .expansion import expand as run_expand

    with _progress(quiet, verbose) as progress:
        result = run_expand(model, out, width=width, depth=depth, hidden=hidden, ffn=ffn,
                            heads=heads, layers=layers, placement=placement,
                            depth_init=depth_init, seed=seed, verify=not no_verify,
                            provider=provider, atol=atol, rtol=rtol, inputs=inputs,
                            layerwise=layerwise, keep_tie=keep_tie, report=report,
                            float64=float64, noise_scale=noise_scale,
                            blockwise=blockwise or None, progress=progress)
    for r in getattr(result, "files", {"": result}).values():
        if verbose and r.verification is not None:
            click.echo(r.verification.format(), err=True)
    click.echo(result.summary(), file=_human(report))
    if signals.late() is not None:
        click.echo("lemon-onnx: note: a signal arrived while the output was being put in "
                   "place; the run completed.", err=True)


@cli.command(epilog=EPILOG)
@click.argument("small", type=click.Path())
@click.argument("big", type=click.Path())
@click.option("--inputs", type=click.Path(dir_okay=False),
              help="Inputs as .npz (keys <input> or case<k>/<input>); default: synthesised.")
@click.option("--save-inputs", type=click.Path(dir_okay=False), help="Keep the inputs used (.npz).")
@click.option("--atol", type=float, help="Absolute tolerance (default by dtype: fp32 1e-4).")
@click.option("--rtol", type=float, help="Relative tolerance (default by dtype: fp32 1e-3).")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--layerwise", is_flag=True, help="Also find the first block whose hidden state diverges.")
@click.option("--blockwise", is_flag=True, default=None,
              help="Run the models block by block (bounded memory; chosen automatically when "
                   "the whole models would not fit in memory).")
@click.option("--float64", "float64", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="The float64 level of the check: both graphs in double "
              "precision (auto: when the copies fit in memory; block by block, one segment's "
              "copy at a time).")
@click.option("--report", type=click.Path(dir_okay=False, allow_dash=True), help=REPORT_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthesised inputs.")
@verbosity_options
@guarded
def verify(small, big, inputs, save_inputs, atol, rtol, provider, layerwise, blockwise, float64,
           report, seed, quiet, verbose):
    """Check that BIG computes the same outputs as SMALL (exit 0 same, 1 not equivalent).

    SMALL and BIG may be export folders: each model file is compared with its namesake (a
    merged decoder branch by branch), and an encoder-decoder is also run as its runtime runs
    it, step by step (the pipeline check).

    With SMALL an expanded .onnx file and BIG a folder written by export-torch: transformers
    must load the folder strictly, its tensors must be the ones SMALL gives (every element)
    and it must compute SMALL's outputs."""
    from .expansion import check_file, write_report
    from .verification import verify as run_verify

    check_file(report, "--report")  # before any work: files that could not be written
    check_file(save_inputs, "--save-inputs")
    if os.path.isdir(big) and not os.path.isdir(small):  # a hand-off folder
        _verify_folder(small, big, inputs, provider, float64, report, quiet, verbose)
        return

    with _progress(quiet, verbose, total=1) as progress:
        with progress.stage("verify") as st:
            rep = run_verify(small, big, inputs=inputs, atol=atol, rtol=rtol, provider=provider,
                             layerwise=layerwise, save_inputs=save_inputs, seed=seed,
                             float64=float64, blockwise=blockwise or None)
            st.done(f"compared on {rep.provider_used}")
    if report:
        write_report(rep, report)
    text = rep.format()
    click.echo(text if not quiet else text.splitlines()[0], file=_human(report))
    if not rep.passed:
        sys.exit(1)


def _verify_folder(small, big, inputs, provider, float64, report, quiet, verbose) -> None:
    import json

    from .handoff import verify_folder

    log = (lambda m: None) if quiet or not verbose else \
        (lambda m: click.echo(f"lemon-onnx: {m}", err=True))
    rep = verify_folder(small, big, inputs=inputs, float64=float64,
                        provider="cpu" if provider == "auto" else provider, log=log)
    if report:
        text = json.dumps(rep.to_dict(), indent=1, default=str)
        if str(report) == "-":
            click.echo(text)
        else:
            with open(report, "w") as f:
                f.write(text + "\n")
    verdict = "PASS" if rep.passed else "FAIL"
    click.echo(f"verify {small} -> {big}: {verdict}\n  {rep.summary()}", file=_human(report))
    if rep.weights is not None and not quiet:
        w = rep.weights
        click.echo(f"  tensors: {w['compared']} compared element by element, "
                   f"{len(w['missing'])} missing, {len(w['unexpected'])} unexpected, "
                   f"{len(w['differ'])} differ", file=_human(report))
    for n in rep.notes if not quiet else []:
        click.echo(f"  note: {n}", file=_human(report))
    if not rep.passed:
        sys.exit(1)


def format_description(d, path: str = "") -> str:
    lines = [f"{path}: {d.family} ({d.layout}, {d.norm_type} as {d.norm_form}), "
             f"opset {d.opset}, ir_version {d.ir_version}, producer {d.producer or '?'}"]
    kv = f", kv heads {d.kv_heads} (GQA groups of {d.heads // d.kv_heads})" \
        if d.kv_heads != d.heads else ""
    lines.append(f"  layers {d.num_layers}, hidden {d.hidden}, heads {d.heads}{kv}, "
                 f"head_dim {d.head_dim}, ffn {d.ffn} ({d.activation}), vocab {d.vocab}, "
                 f"tie {d.tie or 'no'}, rotary {'yes' if d.rotary else 'no'}")
    e = d.embeddings
    parts = [f"token {e.token}" if e.token else None,
             f"position {e.position}" if e.position else None,
             f"token type {e.token_type}" if e.token_type else None,
             f"patch conv {e.patch_conv}" if e.patch_conv else None,
             f"conv stem {', '.join(c[0] for c in e.stem)}" if e.stem else None,
             f"extra tokens {', '.join(e.extra_tokens)}" if e.extra_tokens else None,
             f"position parts {', '.join(e.position_parts)}" if e.position_parts else None,
             f"norm ({e.norm.kind})" if e.norm else None,
             f"projection {e.projection.weight} [{e.projection.in_features}->"
             f"{e.projection.out_features}]" if e.projection else None]
    lines.append("  embeddings: " + ", ".join(p for p in parts if p))
    for b in d.blocks:
        a, m = b.attention, b.mlp
        proj = (f"qkv {a.qkv.weight} [{a.qkv.in_features}->{a.qkv.out_features}]" if a.qkv else
                f"q {a.q.weight}, k {a.k.weight}, v {a.v.weight}")
        gate = f"gate {m.gate.weight}, " if m.gate else ""
        dialect = ", ".join(x for x in (
            a.expressed, a.qkv_layout, f"{a.kv_heads} KV heads" if a.kv_heads != a.heads else "",
            "q/k norms" if a.q_norm else "") if x)
        extra = ", ".join(x for x in (
            "parallel" if b.topology == "parallel" else "",
            "layer scale" if b.attention_scale or b.mlp_scale else "",
            "norms on branch outputs" if b.attention_out_norm or b.mlp_out_norm else "") if x)
        x = b.cross_attention
        cross = "" if x is None else (
            f"; cross-attention q {x.q.weight}, "
            + (f"k {x.k.weight}, v {x.v.weight} (from {x.memory})" if x.k else
               f"k/v from inputs {x.key_input}, {x.value_input}") + f", out {x.out.weight}")
        lines.append(f"  block {b.index}{f' ({extra})' if extra else ''}: attention ({dialect}) "
                     f"{proj}, out {a.out.weight}{cross}; mlp "
                     f"{gate}{'gate|up' if m.fused_gate_up else 'up'} {m.up.weight}, down "
                     f"{m.down.weight}")
    if d.final_norm:
        lines.append(f"  final norm: {d.final_norm.kind} (gamma {d.final_norm.gamma}, "
                     f"eps {d.final_norm.epsilon:g})")
    h = d.head
    if h.linear:
        extra = f", transform {h.transform.weight}" if h.transform else ""
        lines.append(f"  head: {h.kind} {h.linear.weight} [{h.linear.in_features}->"
                     f"{h.linear.out_features}]{extra}, tie {h.tie or 'no'}")
    else:
        lines.append("  head: none")
    for x in d.extra_heads:
        if x.kind == "norm":
            lines.append(f"  extra head: {x.pool_norms[0].kind} on the final stream, its output "
                         f"{x.pool_norms[0].output}")
    lines.append("  outputs: " + ", ".join(f"{o['name']} {o['shape']} ({o['kind']})"
                                          for o in d.outputs))
    if d.caches:
        first = d.caches[0]
        heads = "no head axis (one KV head)" if first.heads_axis is None else \
            f"KV heads on axis {first.heads_axis}"
        joined = [c for c in d.caches if c.concat]
        halves = len(d.caches) - len(joined)
        where = (f"{first.input} -> {first.output}" if first.concat else
                 f"{'returned as ' + first.output if first.output else 'read from ' + first.input}")
        lines.append(f"  KV cache: {len(d.caches)} tensors ({where}, ...), "
                     + (f"past on axis {first.axis}, " if joined else "")
                     + heads + (f"; {halves} of them an encoder-decoder's (only returned, or "
                                "only read: the encoder cache)" if halves else ""))
    if d.fused:
        lines.append("  fused ops (ONNX Runtime, unfused to recognise, fused again after "
                     "expanding): " + "; ".join(
                         f"{where}: " + ", ".join(f"{op}" + (f" x{n}" if n > 1 else "")
                                                  for op, n in sorted(ops.items()))
                         for where, ops in d.fused.items()))
    counts: dict = {}
    for lit in d.size_literals:
        counts[(lit.label, lit.value)] = counts.get((lit.label, lit.value), 0) + 1
    lines.append(f"  size literals: {len(d.size_literals)} "
                 + ("(" + ", ".join(f"{lab}={v} x{n}" for (lab, v), n in sorted(counts.items()))
                    + ")" if counts else ""))
    if d.shared_initializers:
        lines.append(f"  shared initializers: {len(d.shared_initializers)} (exporter dedup)")
    if d.lemon_plan:
        p = d.lemon_plan
        src, tgt = p.get("source", {}), p.get("target", {})
        steps = len(p.get("chain") or []) + 1
        lines.append(f"  expanded by lemon-onnx: layers {src.get('layers')}->{tgt.get('layers')}, "
                     f"hidden {src.get('hidden')}->{tgt.get('hidden')}, stream form "
                     f"{p.get('stream_form')}, seed {p.get('seed')}, "
                     f"{'exact' if p.get('exact') else 'approximate'}"
                     + (f", {steps} expansions in a chain" if steps > 1 else ""))
        lines.extend(f"    note: {n}" for n in p.get("notes") or [])
    if d.unrecognised:
        lines.append("  unrecognised:")
        lines.extend(f"    - {u}" for u in d.unrecognised)
    return "\n".join(lines)


@cli.command("export-torch", epilog=EPILOG)
@click.argument("model", type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for model.safetensors, config.json and lemon_schedule.json "
                   "(replaced whole; written only if transformers loads it and it matches).")
@click.option("--config", "config", type=click.Path(),
              help="The source model's config.json (or its folder); default: the config.json "
                   "beside MODEL.")
@click.option("--max-shard-size", default="5GB", show_default=True,  # DEFAULT_MAX_SHARD_SIZE
              help="Split the weights into shards above this size (5GB, 500MB, 2GiB, bytes).")
@click.option("--no-verify", is_flag=True,
              help="Write without loading the folder back into transformers and comparing it "
                   "with MODEL (the result then says 'not verified').")
@verbosity_options
@guarded
def export_torch_command(model, out, config, max_shard_size, no_verify, quiet, verbose):
    """Write MODEL (an expanded .onnx, or its folder) as transformers loads it: weights under
    the target architecture's own names (safetensors), the expanded config.json and LEMON's
    learning-rate advice; then load it with transformers and compare it with MODEL (exit 1
    and nothing written when they differ)."""
    from .handoff.export import export_torch

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"lemon-onnx: {m}", err=True))
    res = export_torch(model, out, config=config, max_shard_size=max_shard_size,
                       verify=not no_verify, log=log)
    shards = sorted({t["file"] for t in res.tensors})
    arch = ", ".join(res.config.get("architectures") or []) or res.config.get("model_type")
    click.echo(f"wrote {out}: {len(res.tensors)} tensors ({res.total_bytes / 1e6:.1f} MB) in "
               f"{len(shards)} safetensors file(s), config.json ({arch}), lemon_schedule.json")
    if res.verified is not None:
        click.echo(f"  verified: {res.verified['class']} loads it strictly and matches "
                   f"{model} to {res.verified['worst_relative']:.1e} relative")
    else:
        click.echo("  NOT VERIFIED (see the notes)")
    for n in res.notes:
        click.echo(f"  note: {n}")


def _quiet_libraries() -> None:
    """Libraries' log records (onnx-ir's shape-inference warnings come with a traceback) do
    not reach stderr beside the one-paragraph error: the command line has no handler for
    them, so Python's last-resort handler would print them.  LEMON_ONNX_DEBUG keeps them."""
    import logging

    root = logging.getLogger()
    if not os.environ.get("LEMON_ONNX_DEBUG") and not any(
            isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())


def main(argv: list[str] | None = None) -> None:
    """The console script: signals handled from the first instruction to the exit."""
    signals.install()  # (lemon_onnx.__main__ did it already, before importing click)
    _quiet_libraries()
    try:
        try:
            rc = cli.main(args=argv, prog_name="lemon-onnx", standalone_mode=False)
            code = rc if isinstance(rc, int) else 0
        except BaseException as exc:
            code = _report_failure(exc)
        if signals.received() is not None and code != 130:  # swallowed somewhere: still 130
            code = _report_failure(KeyboardInterrupt())
        signals.finish()
    except BaseException as exc:  # the signal came while a failure was being reported
        code = _report_failure(exc)
        signals.finish()
    sys.exit(code)


if __name__ == "__main__":
    main()

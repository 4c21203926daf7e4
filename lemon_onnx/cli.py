"""Command line: ``lemon-onnx inspect | expand | verify``.

Exit codes (the contract other tools rely on): 0 success, 1 numerical mismatch, 2 bad or
unsupported input or usage, 3 the runtime could not run the model.  Errors are one paragraph
on stderr, never a traceback (``LEMON_ONNX_DEBUG=1`` shows one for bug reports).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import click

from . import __version__
from .errors import LemonError


def _fail(message: str, code: int) -> None:
    click.echo(f"lemon-onnx: error: {message}", err=True)
    sys.exit(code)


def guarded(fn):
    """Turn every failure into a one-paragraph message and the contract's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LemonError as e:
            if os.environ.get("LEMON_ONNX_DEBUG"):
                traceback.print_exc()
            _fail(str(e), e.exit_code)
        except click.UsageError as e:
            _fail(e.format_message(), 2)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written.", 2)
        except MemoryError:
            _fail("ran out of memory. Try a machine with more RAM.", 3)
        except OSError as e:  # permissions, full disk, missing folders: the user's to fix
            _fail(f"{e.strerror or e} ({e.filename or 'file'}); nothing was written. Check the "
                  "path, its permissions and the free disk space.", 2)
        except Exception as e:  # a bug or an input we did not foresee: still no traceback
            if os.environ.get("LEMON_ONNX_DEBUG"):
                traceback.print_exc()
            _fail(f"unexpected {type(e).__name__} while processing the model: {e}. This is "
                  "either an input lemon-onnx does not understand or a bug; rerun with "
                  "LEMON_ONNX_DEBUG=1 for a traceback and report it.", 2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lemon-onnx")
def cli() -> None:
    """Lossless width/depth expansion (LEMON) of Transformers exported to ONNX."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
@guarded
def inspect(model: str, as_json: bool) -> None:
    """Show what was recognised in MODEL: family, layout, sizes, blocks, size literals."""
    from .io import load
    from .recognize import recognize

    desc = recognize(load(model))
    if as_json:
        click.echo(desc.to_json(indent=2))
    else:
        click.echo(format_description(desc, model))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the expanded model (written only if it verifies).")
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
              help="Seed of the symmetry-breaking noise; same seed, same bytes.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime equivalence check.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Execution provider for verification.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the verification report (JSON).")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@guarded
def expand(model, out, width, depth, hidden, ffn, heads, layers, placement, depth_init, seed,
           no_verify, provider, report, quiet):
    """Expand MODEL wider and/or deeper so that it computes the same numbers."""
    from .expand import expand_file

    if not any(x is not None for x in (width, depth, hidden, ffn, heads, layers)):
        raise click.UsageError("nothing to do: give --width/--depth or explicit sizes "
                               "(--hidden, --ffn, --heads, --layers).")
    from pathlib import Path

    from .errors import InputError

    if Path(out).resolve() == Path(model).resolve():
        raise InputError(f"the output {out} is the input model; expanding in place would "
                         "destroy the source.", hint="Choose another -o path.")
    if Path(out).is_dir():
        raise InputError(f"the output {out} is a directory.", hint="Give a file name, e.g. "
                         f"{Path(out) / 'expanded.onnx'}.")
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"lemon-onnx: {m}", err=True))
    plan, vrep = expand_file(model, out, verify=not no_verify, provider=provider, report=report,
                             log=log, width=width, depth=depth, hidden=hidden, ffn=ffn,
                             heads=heads, layers=layers, seed=seed, placement=placement,
                             depth_init=depth_init)
    s, t = plan.source, plan.target
    msg = (f"wrote {out}: layers {s['layers']}->{t['layers']}, hidden {s['hidden']}->"
           f"{t['hidden']}, ffn {s['ffn']}->{t['ffn']}, heads {s['heads']}->{t['heads']}")
    if vrep is not None:
        worst = max((o.max_abs for c in vrep.cases for o in c["outputs"]), default=0.0)
        msg += f"; verified on {vrep.provider_used}, max abs error {worst:.2e}"
    else:
        msg += "; NOT verified (--no-verify)"
    if not plan.exact:
        msg += " (approximate: " + " ".join(plan.notes) + ")"
    click.echo(msg)


@cli.command()
@click.argument("small", type=click.Path(dir_okay=False))
@click.argument("big", type=click.Path(dir_okay=False))
@click.option("--inputs", type=click.Path(dir_okay=False),
              help="Inputs as .npz (keys <input> or case<k>/<input>); default: synthesised.")
@click.option("--save-inputs", type=click.Path(dir_okay=False), help="Keep the inputs used (.npz).")
@click.option("--atol", type=float, help="Absolute tolerance (default by dtype: fp32 1e-4).")
@click.option("--rtol", type=float, help="Relative tolerance (default by dtype: fp32 1e-3).")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--layerwise", is_flag=True, help="Also find the first block whose hidden state diverges.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthesised inputs.")
@guarded
def verify(small, big, inputs, save_inputs, atol, rtol, provider, layerwise, report, seed):
    """Check that BIG computes the same outputs as SMALL (exit 0 same, 1 mismatch)."""
    from .verify import verify as run_verify

    rep = run_verify(small, big, inputs=inputs, atol=atol, rtol=rtol, provider=provider,
                     layerwise=layerwise, save_inputs=save_inputs, seed=seed)
    if report:
        from pathlib import Path

        Path(report).write_text(rep.to_json())
    click.echo(rep.format())
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
             f"cls token {e.cls_token}" if e.cls_token else None,
             f"norm ({e.norm.kind})" if e.norm else None]
    lines.append("  embeddings: " + ", ".join(p for p in parts if p))
    for b in d.blocks:
        a, m = b.attention, b.mlp
        proj = (f"qkv {a.qkv.weight} [{a.qkv.in_features}->{a.qkv.out_features}]" if a.qkv else
                f"q {a.q.weight}, k {a.k.weight}, v {a.v.weight}")
        gate = f"gate {m.gate.weight}, " if m.gate else ""
        lines.append(f"  block {b.index}: attention ({a.expressed}) {proj}, out {a.out.weight}; "
                     f"mlp {gate}up {m.up.weight}, down {m.down.weight}")
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
    lines.append("  outputs: " + ", ".join(f"{o['name']} {o['shape']} ({o['kind']})"
                                          for o in d.outputs))
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
        lines.append(f"  expanded by lemon-onnx: layers {src.get('layers')}->{tgt.get('layers')}, "
                     f"hidden {src.get('hidden')}->{tgt.get('hidden')}, stream form "
                     f"{p.get('stream_form')}, seed {p.get('seed')}, "
                     f"{'exact' if p.get('exact') else 'approximate'}")
    if d.unrecognised:
        lines.append("  unrecognised:")
        lines.extend(f"    - {u}" for u in d.unrecognised)
    return "\n".join(lines)


from .handoff.command import make_command as _export_torch  # noqa: E402  (own module)

cli.add_command(_export_torch(guarded))


def main() -> None:
    cli(prog_name="lemon-onnx")


if __name__ == "__main__":
    main()

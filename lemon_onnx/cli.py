"""Command line: ``lemon-onnx inspect | expand | verify``.

Exit codes (the contract other tools rely on): 0 success, 1 numerical mismatch, 2 bad or
unsupported input or usage, 3 the runtime could not run the model.  Errors are one paragraph
on stderr, never a traceback (``LEMON_ONNX_DEBUG=1`` shows one for bug reports).
"""

from __future__ import annotations

import functools
import json
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
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written.", 2)
        except MemoryError:
            _fail("ran out of memory. Try a machine with more RAM.", 3)
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
    if d.unrecognised:
        lines.append("  unrecognised:")
        lines.extend(f"    - {u}" for u in d.unrecognised)
    return "\n".join(lines)


def main() -> None:
    cli(prog_name="lemon-onnx")


if __name__ == "__main__":
    main()

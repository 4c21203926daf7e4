"""``lemon-onnx export-torch``: the command, registered on the group in ``cli.py``.

``make_command(guard)`` receives cli's error guard (one paragraph, the contract's exit codes):
importing ``cli`` from here would import it a second time under ``python -m lemon_onnx.cli``.
"""

from __future__ import annotations

from typing import Callable

import click

from .export import DEFAULT_MAX_SHARD_SIZE


def make_command(guard: Callable) -> click.Command:
    @click.command("export-torch")
    @click.argument("model", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
                  help="Folder for model.safetensors, config.json and lemon_schedule.json.")
    @click.option("--config", "config", type=click.Path(),
                  help="The source model's config.json (or its folder): written back with the "
                       "new sizes, and its model_type names what the graph does not.")
    @click.option("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, show_default=True,
                  help="Split the weights into shards above this size (5GB, 500MB, 2GiB, "
                       "bytes).")
    @click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
    @guard
    def export_torch(model, out, config, max_shard_size, quiet):
        """Write MODEL's weights under their PyTorch names (safetensors), the expanded
        config.json and LEMON's learning-rate advice into a folder that transformers loads."""
        run(model, out, config, max_shard_size, quiet)

    return export_torch


def run(model, out, config, max_shard_size, quiet) -> None:
    from .export import export_torch

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"lemon-onnx: {m}", err=True))
    res = export_torch(model, out, config=config, max_shard_size=max_shard_size, log=log)
    shards = sorted({t["file"] for t in res.tensors})
    msg = (f"wrote {out}: {len(res.tensors)} tensors ({res.total_bytes / 1e6:.1f} MB) in "
           f"{len(shards)} safetensors file(s)")
    if res.config is not None:
        arch = ", ".join(res.config.get("architectures") or []) or res.config.get("model_type")
        msg += f", config.json ({arch})"
    else:
        msg += ", lemon_tensors.json (names, shapes, roles; no --config, so no config.json)"
    click.echo(msg + ", lemon_schedule.json")
    for n in res.notes:
        click.echo(f"  note: {n}")
    if res.left_out:
        click.echo(f"  left out: {len(res.left_out)} tensor(s) that are not parameters of a "
                   "recognised role (listed in lemon_tensors.json)")

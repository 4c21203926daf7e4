#!/usr/bin/env python
"""Export optimum-style folders: what conversion pipelines hand us.

Usage (in optimum-onnx's own virtualenv: it pins transformers 4.57; ``.ci/run`` makes it)::

    .venv-optimum/bin/python models/export_optimum.py [--out models/optimum] [--only NAME ...]

Each entry below is a tiny random-config transformers model (hidden 64, 2 layers, vocab 128,
every parameter perturbed with seeded noise so that no two tensors are equal), saved with
``save_pretrained`` into ``<out>/src/<name>`` (the transformers folder, no hub) and exported
with optimum's own ``main_export`` into ``<out>/<name>`` exactly as ``optimum-cli export onnx
--task <task>`` writes it: ``model.onnx`` (or ``encoder_model.onnx`` + ``decoder_model_merged.onnx``
...), ``config.json``, ``generation_config.json``.  Decoders for generation take
``position_ids`` and a KV cache (``past_key_values.N.key/value`` in, ``present.N.key/value``
out); image models declare every input axis symbolic.

``manifest.json`` lists every entry: name, family (``model_type``), task, the ORTModel class
that loads the folder, the files written, or ``export_error`` when optimum failed (recorded,
never dropped).  Deterministic for equal arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

V = 128  # vocabulary
TEXT = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
            vocab_size=V, max_position_embeddings=128)
GQA = dict(TEXT, num_key_value_heads=2)
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
IMAGE = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
             image_size=32, patch_size=8, num_channels=3, num_labels=5)

GEN = "text-generation-with-past"
S2S = "text2text-generation-with-past"
#: T5's relatives and BART's (their configs share these keys)
T5_LIKE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               vocab_size=V, relative_attention_num_buckets=8, relative_attention_max_distance=32,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
BART_LIKE = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 vocab_size=V, max_position_embeddings=128, pad_token_id=1, eos_token_id=2,
                 decoder_start_token_id=2, forced_eos_token_id=None)

#: name -> (config class, config kwargs, model class, optimum task, ORTModel class)
ENTRIES = {
    # ---- decoders for generation (KV cache) ------------------------------------------
    "llama-gen": ("LlamaConfig", dict(GQA, head_dim=16, **SPECIAL), "LlamaForCausalLM", GEN,
                  "ORTModelForCausalLM"),
    "qwen2-gen": ("Qwen2Config", dict(GQA, **SPECIAL), "Qwen2ForCausalLM", GEN,
                  "ORTModelForCausalLM"),
    "qwen3-gen": ("Qwen3Config", dict(GQA, head_dim=16, **SPECIAL), "Qwen3ForCausalLM", GEN,
                  "ORTModelForCausalLM"),
    "mistral-gen": ("MistralConfig", dict(GQA, sliding_window=None, **SPECIAL),
                    "MistralForCausalLM", GEN, "ORTModelForCausalLM"),
    "gemma-gen": ("GemmaConfig", dict(TEXT, num_key_value_heads=1, head_dim=16, **SPECIAL),
                  "GemmaForCausalLM", GEN, "ORTModelForCausalLM"),
    "gpt2-gen": ("GPT2Config", dict(n_embd=64, n_head=4, n_layer=2, vocab_size=V,
                                    n_positions=128, bos_token_id=1, eos_token_id=2),
                 "GPT2LMHeadModel", GEN, "ORTModelForCausalLM"),
    "gptj-gen": ("GPTJConfig", dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, vocab_size=V,
                                    n_positions=128, bos_token_id=1, eos_token_id=2,
                                    tie_word_embeddings=False),
                 "GPTJForCausalLM", GEN, "ORTModelForCausalLM"),
    "phi-gen": ("PhiConfig", dict(TEXT, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                  embd_pdrop=0.0, **SPECIAL),
                "PhiForCausalLM", GEN, "ORTModelForCausalLM"),
    "phi3-gen": ("Phi3Config", dict(GQA, **SPECIAL), "Phi3ForCausalLM", GEN,
                 "ORTModelForCausalLM"),
    "falcon-gen": ("FalconConfig", dict(hidden_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=V, multi_query=True,
                                        parallel_attn=True, new_decoder_architecture=False,
                                        alibi=False, bias=False, bos_token_id=1,
                                        eos_token_id=2),
                   "FalconForCausalLM", GEN, "ORTModelForCausalLM"),
    "bloom-gen": ("BloomConfig", dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=V,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  "BloomForCausalLM", GEN, "ORTModelForCausalLM"),
    "olmo2-gen": ("Olmo2Config", dict(TEXT, **SPECIAL), "Olmo2ForCausalLM", GEN,
                  "ORTModelForCausalLM"),
    "opt-gen": ("OPTConfig", dict(hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                  num_hidden_layers=2, vocab_size=V, word_embed_proj_dim=64,
                                  max_position_embeddings=128, **SPECIAL),
                "OPTForCausalLM", GEN, "ORTModelForCausalLM"),
    "stablelm-gen": ("StableLmConfig", dict(GQA, partial_rotary_factor=0.25, **SPECIAL),
                     "StableLmForCausalLM", GEN, "ORTModelForCausalLM"),
    "granite-gen": ("GraniteConfig", dict(GQA, embedding_multiplier=2.0, residual_multiplier=0.5,
                                          logits_scaling=4.0, attention_multiplier=0.1,
                                          **SPECIAL),
                    "GraniteForCausalLM", GEN, "ORTModelForCausalLM"),
    "mpt-gen": ("MptConfig", dict(d_model=64, n_heads=4, n_layers=2, vocab_size=V,
                                  expansion_ratio=2, max_seq_len=128),
                "MptForCausalLM", GEN, "ORTModelForCausalLM"),
    "gpt_neox-gen": ("GPTNeoXConfig", dict(TEXT, rotary_pct=0.25, use_parallel_residual=True,
                                           tie_word_embeddings=False, bos_token_id=1,
                                           eos_token_id=2),
                     "GPTNeoXForCausalLM", GEN, "ORTModelForCausalLM"),
    "gpt_bigcode-gen": ("GPTBigCodeConfig", dict(n_embd=64, n_head=4, n_layer=2, vocab_size=V,
                                                 n_positions=128, multi_query=True,
                                                 bos_token_id=1, eos_token_id=2),
                        "GPTBigCodeForCausalLM", GEN, "ORTModelForCausalLM"),
    # ---- encoder-decoders for generation -----------------------------------------------
    "t5-s2s": ("T5Config", dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                num_heads=4, vocab_size=V, relative_attention_num_buckets=8,
                                relative_attention_max_distance=32, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1),
               "T5ForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    "bart-s2s": ("BartConfig", dict(d_model=64, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4,
                                    encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=V,
                                    max_position_embeddings=128, bos_token_id=0, pad_token_id=1,
                                    eos_token_id=2, decoder_start_token_id=2,
                                    forced_eos_token_id=None),
                 "BartForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    # T5 v1.1 / mT5: gated GELU, an untied head (no d_model^-0.5 before it), and stacks of
    # different depths
    "t5gated-s2s": ("T5Config", dict(T5_LIKE, num_layers=3, feed_forward_proj="gated-gelu",
                                     tie_word_embeddings=False),
                    "T5ForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    "mt5-s2s": ("MT5Config", dict(T5_LIKE), "MT5ForConditionalGeneration", S2S,
                "ORTModelForSeq2SeqLM"),
    # BART's relatives: mBART (pre-norm, a LayerNorm on the embeddings and after each stack),
    # Marian (Post-LN, sinusoidal positions, scaled embeddings), Pegasus (pre-norm, sinusoidal)
    "mbart-s2s": ("MBartConfig", dict(BART_LIKE, bos_token_id=0),
                  "MBartForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    "marian-s2s": ("MarianConfig", dict(BART_LIKE, decoder_start_token_id=1), "MarianMTModel", S2S,
                   "ORTModelForSeq2SeqLM"),
    "pegasus-s2s": ("PegasusConfig", dict(BART_LIKE, pad_token_id=0, eos_token_id=1,
                                          decoder_start_token_id=0),
                    "PegasusForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    # more of BART's relatives: M2M100 (pre-norm, sinusoidal, scaled embeddings), Blenderbot
    # (pre-norm), BlenderbotSmall (Post-LN, its decoder normalises the token embedding before
    # adding positions), BigBird-Pegasus with full attention (pre-norm)
    "m2m100-s2s": ("M2M100Config", dict(BART_LIKE), "M2M100ForConditionalGeneration", S2S,
                   "ORTModelForSeq2SeqLM"),
    "blenderbot-s2s": ("BlenderbotConfig", dict(BART_LIKE), "BlenderbotForConditionalGeneration",
                       S2S, "ORTModelForSeq2SeqLM"),
    "blenderbotsmall-s2s": ("BlenderbotSmallConfig", dict(BART_LIKE),
                            "BlenderbotSmallForConditionalGeneration", S2S,
                            "ORTModelForSeq2SeqLM"),
    "bigbirdpegasus-s2s": ("BigBirdPegasusConfig", dict(BART_LIKE, attention_type="original_full"),
                           "BigBirdPegasusForConditionalGeneration", S2S,
                           "ORTModelForSeq2SeqLM"),
    # LongT5: its encoder's local attention (blocks of tokens) is refused with the reason
    "longt5-s2s": ("LongT5Config", dict(T5_LIKE, local_radius=4),
                   "LongT5ForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    "bart3x2-s2s": ("BartConfig", dict(BART_LIKE, encoder_layers=3, decoder_ffn_dim=96,
                                       bos_token_id=0),
                    "BartForConditionalGeneration", S2S, "ORTModelForSeq2SeqLM"),
    # ---- encoders ---------------------------------------------------------------------
    "bert-features": ("BertConfig", dict(TEXT), "BertModel", "feature-extraction",
                      "ORTModelForFeatureExtraction"),
    "bert-cls": ("BertConfig", dict(TEXT, num_labels=3), "BertForSequenceClassification",
                 "text-classification", "ORTModelForSequenceClassification"),
    "roberta-mlm": ("RobertaConfig", dict(TEXT, max_position_embeddings=130, pad_token_id=1,
                                          type_vocab_size=1),
                    "RobertaForMaskedLM", "fill-mask", "ORTModelForMaskedLM"),
    "distilbert-cls": ("DistilBertConfig", dict(dim=64, n_heads=4, hidden_dim=128, n_layers=2,
                                                vocab_size=V, max_position_embeddings=128,
                                                num_labels=3),
                       "DistilBertForSequenceClassification", "text-classification",
                       "ORTModelForSequenceClassification"),
    "electra-features": ("ElectraConfig", dict(TEXT, embedding_size=64), "ElectraModel",
                         "feature-extraction", "ORTModelForFeatureExtraction"),
    "vit-cls": ("ViTConfig", dict(IMAGE), "ViTForImageClassification", "image-classification",
                "ORTModelForImageClassification"),
    "deit-cls": ("DeiTConfig", dict(IMAGE), "DeiTForImageClassification", "image-classification",
                 "ORTModelForImageClassification"),
    "dinov2-cls": ("Dinov2Config", dict(IMAGE, mlp_ratio=2), "Dinov2ForImageClassification",
                   "image-classification", "ORTModelForImageClassification"),
    # ---- encoders beyond the family matrix, each for a dialect it brought ------------------
    # DeBERTa without relative attention: a padding mask multiplies the embedding LayerNorm's
    # output, q and v biases are added after the split into heads
    "deberta-features": ("DebertaConfig", dict(TEXT), "DebertaModel", "feature-extraction",
                         "ORTModelForFeatureExtraction"),
    # rotary positions: the only gathered table beside the tokens is the 2-row token-type one
    "roformer-features": ("RoFormerConfig", dict(TEXT, embedding_size=64), "RoFormerModel",
                          "feature-extraction", "ORTModelForFeatureExtraction"),
    # the attention output reshaped to the stream's own shape; pooler_output a LayerNorm on cls
    "clip-vision-features": ("CLIPVisionConfig", dict(IMAGE), "CLIPVisionModel",
                             "feature-extraction", "ORTModelForFeatureExtraction"),
    # last_hidden_state declared with a static token count the graph computes at run time
    "dinov2-features": ("Dinov2Config", dict(IMAGE, mlp_ratio=2), "Dinov2Model",
                        "feature-extraction", "ORTModelForFeatureExtraction"),
    # embedding_size < hidden_size (ELECTRA's default): a projection from the embeddings to
    # the stream, and the generator's MLM head back to the embedding width, tied
    "electra-mlm": ("ElectraConfig", dict(TEXT, embedding_size=32), "ElectraForMaskedLM",
                    "fill-mask", "ORTModelForMaskedLM"),
    # the same projection, and one layer's weights shared by every layer
    "albert-cls": ("AlbertConfig", dict(TEXT, embedding_size=32, num_labels=3),
                   "AlbertForSequenceClassification", "text-classification",
                   "ORTModelForSequenceClassification"),
    # a rectangular image, 4 channels, and two heads (class and distillation) averaged
    "deit-distilled-cls": ("DeiTConfig", dict(IMAGE, image_size=(32, 48), num_channels=4),
                           "DeiTForImageClassificationWithTeacher", "image-classification",
                           "ORTModelForImageClassification"),
}


def perturb(model, scale: float = 0.02) -> None:
    """Seeded noise on every (deduplicated) parameter, growing with its index: no two equal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            p.add_(torch.randn_like(p) * scale * (1 + i * 1e-3))


def build(name: str):
    cfg_cls, kw, model_cls, _, _ = ENTRIES[name]
    cfg = getattr(tf, cfg_cls)(**kw)
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(cfg).eval()
    perturb(model)
    return model


def save_preprocessor(name: str, model, src: Path) -> None:
    """What a real folder carries beside the weights: an image processor (optimum's DINOv2
    export reads it for its dummy inputs) or a tokenizer (a word-level vocabulary of the
    model's size, built offline), which the folder form must copy to its output."""
    cfg = model.config
    if hasattr(cfg, "image_size"):
        h, w = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else \
            (cfg.image_size, cfg.image_size)
        proc = tf.BitImageProcessor(size={"shortest_edge": min(h, w)},
                                    crop_size={"height": h, "width": w})
        proc.save_pretrained(src)
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", pad_token="t0",
                                      bos_token="t1", eos_token="t2")
    fast.save_pretrained(src)


def export(name: str, out: Path) -> dict:
    from optimum.exporters.onnx import main_export

    cfg_cls, kw, model_cls, task, ort_cls = ENTRIES[name]
    entry = {"name": name, "task": task, "ort_class": ort_cls, "model_class": model_cls,
             "folder": name}
    src, dest = out / "src" / name, out / name
    for p in (src, dest):
        shutil.rmtree(p, ignore_errors=True)
    model = build(name)
    entry["family"] = model.config.model_type
    model.save_pretrained(src)
    save_preprocessor(name, model, src)
    try:
        main_export(str(src), output=str(dest), task=task, device="cpu", do_validation=False)
    except Exception as exc:  # recorded, never dropped
        entry["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        shutil.rmtree(dest, ignore_errors=True)
        return entry
    entry["files"] = sorted(p.name for p in dest.iterdir())
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "optimum")
    ap.add_argument("--only", nargs="*", help="names of entries to export (default: all)")
    args = ap.parse_args(argv)
    names = args.only or list(ENTRIES)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        ap.error(f"unknown entries: {', '.join(unknown)} (known: {', '.join(ENTRIES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    old = {e["name"]: e for e in json.loads(manifest_path.read_text())} \
        if manifest_path.exists() and args.only else {}
    t0 = time.time()
    for name in names:
        t = time.time()
        try:
            old[name] = export(name, args.out)
        except Exception:
            traceback.print_exc()
            old[name] = {"name": name, "export_error": "build failed (see the log)"}
        status = old[name].get("export_error", "ok")
        print(f"{name}: {status} ({time.time() - t:.1f}s)", flush=True)
    entries = [old[n] for n in ENTRIES if n in old]
    manifest_path.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    ok = sum("export_error" not in e for e in entries)
    print(f"{ok} of {len(entries)} exported in {time.time() - t0:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

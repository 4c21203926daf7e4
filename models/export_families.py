#!/usr/bin/env python
"""Export the family matrix: tiny random-config transformers models beyond bert/gpt2/vit/llama.

Usage::

    python models/export_families.py [--out models/families] [--only FAMILY ...] [--tags ts17 dy18]

No hub access: every model is built from a ``*Config`` object (``torch.manual_seed(0)``) and
every parameter is perturbed with seeded noise (``export_fixtures.perturb_parameters``), so no
two tensors are equal.  Sizes are small (hidden 64, 2 layers, vocab ~100-150) and chosen so that
width 1.5 is a whole number of heads/KV heads where the family allows it.

Each family is exported by two exporters (``export_fixtures.TAG_INFO``): ``ts17`` (TorchScript,
``dynamo=False``, opset 17) and ``dy18`` (dynamo, opset 18), eager attention, with the inputs a
real export has (text: ``input_ids`` + ``attention_mask``, plus ``token_type_ids`` where the
family uses them; vision: ``pixel_values``; speech: ``input_features`` / ``input_values``) and
the main outputs (``logits`` where the family has a head, ``last_hidden_state``).  Batch and
sequence axes are dynamic (vision and Whisper: batch only).

Outputs under ``--out`` (gitignored; CI regenerates them):

* ``<family>-<tag>.onnx`` + ``<family>-<tag>.npz`` (two reference cases, keys
  ``caseN/in/<input>`` and ``caseN/out/<output>``, torch float32 outputs; the layout of
  ``models/fixtures``, so ``lemon-onnx expand --inputs`` reads it).
* ``manifest.json``: one entry per (family, tag): file, components the family was chosen for,
  config summary, ``ort`` check against torch, or ``export_error`` (exporter, message) when the
  exporter failed -- such a family is recorded, not dropped.

Deterministic for equal arguments (seeded weights and inputs; stack traces stripped; the
manifest has no timings).  The total export time is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_fixtures as ef  # noqa: E402

TAGS = ("ts17", "dy18")
CASES = ((2, 7), (3, 11))  # (batch, seq) of the two reference cases; vision/whisper: batch only
MAX_SEQ = 64

# ----------------------------------------------------------------------------
# Heads: (model, base output) -> logits.  Written out per family, as the HF head does it.
# ----------------------------------------------------------------------------


def _lm(attr):
    return lambda m, o: getattr(m, attr)(o.last_hidden_state)


def _seq_cls(m, o):  # roberta / electra ClassificationHead: dense -> tanh|gelu -> out_proj on token 0
    return m.classifier(o.last_hidden_state)


def _distilbert_cls(m, o):  # pre_classifier -> ReLU -> classifier on token 0
    h = o.last_hidden_state[:, 0]
    return m.classifier(torch.nn.functional.relu(m.pre_classifier(h)))


def _deberta_cls(m, o):  # ContextPooler (dense + gelu on token 0) -> classifier
    return m.classifier(m.pooler(o.last_hidden_state))


def _deit_teacher(m, o):  # cls head and distillation head, averaged
    h = o.last_hidden_state
    return (m.cls_classifier(h[:, 0, :]) + m.distillation_classifier(h[:, 1, :])) / 2


def _beit_cls(m, o):  # mean pooling of the patch tokens (+ LayerNorm) -> classifier
    return m.classifier(o.pooler_output)


def _dinov2_cls(m, o):  # classifier on concat(cls token, mean of patch tokens)
    h = o.last_hidden_state
    return m.classifier(torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1))


def _whisper_cls(m, o):  # projector -> mean over frames -> classifier
    return m.classifier(m.projector(o.last_hidden_state).mean(dim=1))


# ----------------------------------------------------------------------------
# The families.  ``base``: attribute of the task model that runs the trunk (None: the model
# itself); ``head``: logits from (model, trunk output), None for a trunk-only export;
# ``covers``: the components (issue 8) the family was chosen for.
# ----------------------------------------------------------------------------

TEXT2 = ["input_ids", "attention_mask"]
TEXT3 = ["input_ids", "attention_mask", "token_type_ids"]
DEC = dict(kind="decoder", inputs=TEXT2, call=dict(use_cache=False), logits="token")

FAMILIES = {
    # ---- encoders ---------------------------------------------------------------------
    "roberta": dict(
        kind="encoder", model="RobertaForSequenceClassification", config="RobertaConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=120, max_position_embeddings=MAX_SEQ + 8,
                 type_vocab_size=1, pad_token_id=1, num_labels=3),
        inputs=TEXT2, base="roberta", head=_seq_cls, logits="pooled",
        covers=["classification head with inner dense (dense->tanh->out_proj)",
                "learned positions with padding offset (cumsum of ids != pad)",
                "constant-index token-type row (no token_type_ids input)", "post-norm"]),
    "electra": dict(
        kind="encoder", model="ElectraForSequenceClassification", config="ElectraConfig",
        cfg=dict(hidden_size=64, embedding_size=64, num_attention_heads=4,
                 intermediate_size=128, num_hidden_layers=2, vocab_size=120,
                 max_position_embeddings=MAX_SEQ + 8, type_vocab_size=2, num_labels=3),
        inputs=TEXT3, base="electra", head=_seq_cls, logits="pooled",
        covers=["classification head with inner dense (dense->gelu->out_proj)",
                "token_type_ids input", "post-norm"]),
    "distilbert": dict(
        kind="encoder", model="DistilBertForSequenceClassification", config="DistilBertConfig",
        cfg=dict(dim=64, n_heads=4, hidden_dim=128, n_layers=2, vocab_size=120,
                 max_position_embeddings=MAX_SEQ + 8, num_labels=3),
        inputs=TEXT2, base="distilbert", head=_distilbert_cls, logits="pooled",
        covers=["classification head with inner dense (pre_classifier->relu->classifier)",
                "no token-type embedding", "post-norm"]),
    "deberta_v2": dict(
        kind="encoder", model="DebertaV2ForSequenceClassification", config="DebertaV2Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=120, max_position_embeddings=MAX_SEQ + 8,
                 type_vocab_size=0, relative_attention=True, position_buckets=16,
                 max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                 position_biased_input=False, norm_rel_ebd="layer_norm",
                 share_att_key=True, num_labels=3, pooler_hidden_size=64),
        inputs=TEXT2, base="deberta", head=_deberta_cls, logits="pooled",
        covers=["relative position (disentangled c2p/p2c attention, log buckets)",
                "pooler head (dense->gelu) + classifier", "post-norm"]),
    "t5": dict(
        kind="encoder", model="T5EncoderModel", config="T5Config",
        cfg=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=120,
                 relative_attention_num_buckets=8, relative_attention_max_distance=32,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        inputs=TEXT2, base=None, head=None, logits=None,
        covers=["relative position bias (bucketed, shared from layer 0)",
                "RMSNorm without mean/bias (T5LayerNorm)", "gated-gelu MLP", "no head"]),
    # ---- decoders ---------------------------------------------------------------------
    "gpt_neox": dict(
        DEC, model="GPTNeoXForCausalLM", config="GPTNeoXConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=128, max_position_embeddings=MAX_SEQ,
                 use_parallel_residual=True,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                      partial_rotary_factor=0.25),
                 tie_word_embeddings=False),
        base="gpt_neox", head=_lm("lm_head"),
        covers=["parallel attention+MLP residual (two norms)", "fused QKV (per-head interleaved)",
                "partial rotary (25%)"]),
    "gptj": dict(
        DEC, model="GPTJForCausalLM", config="GPTJConfig",
        cfg=dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, vocab_size=128,
                 n_positions=MAX_SEQ, tie_word_embeddings=False,
                 bos_token_id=127, eos_token_id=127),
        base="transformer", head=_lm("lm_head"),
        covers=["parallel attention+MLP residual (one shared norm)",
                "partial interleaved rotary (rotary_dim 8 of 16)", "untied head with bias"]),
    "phi": dict(
        DEC, model="PhiForCausalLM", config="PhiConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=128, max_position_embeddings=MAX_SEQ,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                      partial_rotary_factor=0.5),
                 resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
        base="model", head=_lm("lm_head"),
        covers=["parallel attention+MLP residual (one shared norm)", "partial rotary (50%)",
                "LayerNorm final norm, head with bias"]),
    "falcon": dict(
        DEC, model="FalconForCausalLM", config="FalconConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                 multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                 alibi=False, bias=False, max_position_embeddings=MAX_SEQ),
        base="transformer", head=_lm("lm_head"),
        covers=["MQA (multi_query, 1 KV head)", "fused QKV", "parallel attention+MLP residual",
                "tied head"]),
    "bloom": dict(
        DEC, model="BloomForCausalLM", config="BloomConfig",
        cfg=dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=128),
        base="transformer", head=_lm("lm_head"),
        covers=["ALiBi slopes", "embedding LayerNorm", "fused QKV (per-head interleaved)",
                "tied head"]),
    "gpt_bigcode": dict(
        DEC, model="GPTBigCodeForCausalLM", config="GPTBigCodeConfig",
        cfg=dict(n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=MAX_SEQ,
                 multi_query=True, bos_token_id=127, eos_token_id=127),
        base="transformer", head=_lm("lm_head"),
        covers=["MQA (fused c_attn: q | k | v with one KV head)", "learned positions",
                "tied head"]),
    "mistral": dict(
        DEC, model="MistralForCausalLM", config="MistralConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, sliding_window=None,
                 tie_word_embeddings=False),
        base="model", head=_lm("lm_head"),
        covers=["GQA", "RMSNorm", "SwiGLU", "full rotary"]),
    "qwen2": dict(
        DEC, model="Qwen2ForCausalLM", config="Qwen2Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, tie_word_embeddings=True),
        base="model", head=_lm("lm_head"),
        covers=["GQA with q/k/v bias", "tied head"]),
    "qwen3": dict(
        DEC, model="Qwen3ForCausalLM", config="Qwen3Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, tie_word_embeddings=False),
        base="model", head=_lm("lm_head"),
        covers=["per-head q/k RMSNorm (q_norm/k_norm over head_dim)", "GQA"]),
    "olmo2": dict(
        DEC, model="Olmo2ForCausalLM", config="Olmo2Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, tie_word_embeddings=False,
                 pad_token_id=1, bos_token_id=None, eos_token_id=2),
        base="model", head=_lm("lm_head"),
        covers=["q/k RMSNorm over the whole projection", "norms applied to branch outputs "
                "(post-attention / post-feedforward norm)"]),
    "gemma": dict(
        DEC, model="GemmaForCausalLM", config="GemmaConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, hidden_activation="gelu_pytorch_tanh"),
        base="model", head=_lm("lm_head"),
        covers=["(1+w) RMSNorm", "embedding scaled by sqrt(hidden)", "GeGLU MLP", "tied head"]),
    "opt": dict(
        DEC, model="OPTForCausalLM", config="OPTConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, ffn_dim=128, num_hidden_layers=2,
                 vocab_size=128, max_position_embeddings=MAX_SEQ, word_embed_proj_dim=64,
                 do_layer_norm_before=True, bos_token_id=2, eos_token_id=2, pad_token_id=1,
                 dropout=0.0, attention_dropout=0.0),
        base="model", head=_lm("lm_head"),
        covers=["learned positions with offset 2 (from cumsum of the mask)", "ReLU MLP",
                "tied head"]),
    "stablelm": dict(
        DEC, model="StableLmForCausalLM", config="StableLmConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, use_qkv_bias=True,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                      partial_rotary_factor=0.25),
                 tie_word_embeddings=False),
        base="model", head=_lm("lm_head"),
        covers=["partial rotary (25%)", "LayerNorm with SwiGLU", "GQA with qkv bias"]),
    "phi3": dict(
        DEC, model="Phi3ForCausalLM", config="Phi3Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, original_max_position_embeddings=MAX_SEQ,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        base="model", head=_lm("lm_head"),
        covers=["fused QKV (q | k | v, GQA)", "fused gate_up MLP"]),
    # first tried as graphs the tool had not seen (each found a gap, now a regression case)
    "starcoder2": dict(
        DEC, model="Starcoder2ForCausalLM", config="Starcoder2Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, tie_word_embeddings=False),
        base="model", head=_lm("lm_head"),
        covers=["GQA with LayerNorm and biases", "plain GELU MLP"]),
    "granite": dict(
        DEC, model="GraniteForCausalLM", config="GraniteConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ, tie_word_embeddings=False,
                 embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0,
                 attention_multiplier=0.2),
        base="model", head=_lm("lm_head"),
        covers=["scalar multipliers on the embeddings, residual branches and logits"]),
    "mpt": dict(
        DEC, model="MptForCausalLM", config="MptConfig",
        cfg=dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=MAX_SEQ,
                 expansion_ratio=2),
        base="transformer", head=_lm("lm_head"),
        covers=["ALiBi", "fused QKV cut by chunk(3)", "no biases"]),
    "xglm": dict(
        DEC, model="XGLMForCausalLM", config="XGLMConfig",
        cfg=dict(d_model=64, attention_heads=4, ffn_dim=128, num_layers=2, vocab_size=128,
                 max_position_embeddings=MAX_SEQ),
        base="model", head=_lm("lm_head"),
        covers=["sinusoidal positions in a Constant node", "embedding scale"]),
    # ---- vision -----------------------------------------------------------------------
    "deit": dict(
        kind="vision", model="DeiTForImageClassificationWithTeacher", config="DeiTConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, image_size=32, patch_size=8, num_channels=3,
                 num_labels=5),
        inputs=["pixel_values"], base="deit", head=_deit_teacher, logits="pooled",
        covers=["extra token (distillation token beside cls)", "two heads averaged"]),
    "beit": dict(
        kind="vision", model="BeitForImageClassification", config="BeitConfig",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, image_size=32, patch_size=8, num_channels=3,
                 num_labels=5, use_relative_position_bias=True,
                 use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
                 use_mean_pooling=True),
        inputs=["pixel_values"], base="beit", head=_beit_cls, logits="pooled",
        covers=["relative position bias table per layer", "layer scale (lambda_1/lambda_2)",
                "mean pooling + LayerNorm head"]),
    "dinov2": dict(
        kind="vision", model="Dinov2ForImageClassification", config="Dinov2Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, mlp_ratio=2, num_hidden_layers=2,
                 image_size=32, patch_size=8, num_channels=3, num_labels=5,
                 layerscale_value=0.1),
        inputs=["pixel_values"], base="dinov2", head=_dinov2_cls, logits="pooled",
        covers=["layer scale", "classifier on concat(cls, mean patch)"]),
    # ---- speech -----------------------------------------------------------------------
    "whisper": dict(
        kind="speech", model="WhisperForAudioClassification", config="WhisperConfig",
        cfg=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                 decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                 num_mel_bins=16, max_source_positions=16, max_target_positions=16,
                 vocab_size=128, classifier_proj_size=32, num_labels=5,
                 pad_token_id=127, bos_token_id=127, eos_token_id=127,
                 decoder_start_token_id=126,
                 use_weighted_layer_sum=False),
        inputs=["input_features"], base="encoder", head=_whisper_cls, logits="pooled",
        covers=["speech encoder: conv1d frontend + sinusoidal positions",
                "projector -> mean -> classifier head"]),
    "wav2vec2": dict(
        kind="speech", model="Wav2Vec2ForCTC", config="Wav2Vec2Config",
        cfg=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=32, conv_dim=(32, 32), conv_stride=(5, 2),
                 conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4, feat_extract_norm="group",
                 do_stable_layer_norm=False, hidden_dropout=0.0, activation_dropout=0.0,
                 attention_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0),
        inputs=["input_values"], base="wav2vec2", head=_lm("lm_head"), logits="token",
        covers=["speech encoder: conv feature extractor + grouped positional conv",
                "feature projection with LayerNorm", "post-norm", "CTC head"]),
}

# ----------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------


class _Wrapper(torch.nn.Module):
    """Runs the trunk, then the family's head; returns (logits, last_hidden_state) or
    (last_hidden_state,)."""

    def __init__(self, model, spec):
        super().__init__()
        self.model = model
        self.base = spec["base"]
        self.head = spec["head"]
        self.names = list(spec["inputs"])
        self.call = dict(spec.get("call") or {})

    def forward(self, *args):
        trunk = getattr(self.model, self.base) if self.base else self.model
        out = trunk(**dict(zip(self.names, args)), return_dict=True, **self.call)
        if self.head is None:
            return (out.last_hidden_state,)
        return self.head(self.model, out), out.last_hidden_state


_Wrapper.__module__ = "export_families"  # stable namespace in dynamo's node metadata


def output_names(spec):
    return ["last_hidden_state"] if spec["head"] is None else ["logits", "last_hidden_state"]


def make_config(spec):
    import transformers as tf

    cfg = getattr(tf, spec["config"])(**spec["cfg"])
    cfg._attn_implementation = "eager"
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "dropout_rate",
              "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
              "hidden_dropout", "classifier_dropout"):
        if k == "classifier_dropout" or hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    return cfg


def build_model(family):
    """(wrapper, config): deterministic for a family."""
    import transformers as tf

    spec = FAMILIES[family]
    cfg = make_config(spec)
    torch.manual_seed(0)
    model = getattr(tf, spec["model"])(cfg)
    torch.manual_seed(1)
    ef.perturb_parameters(model)
    model.eval()
    w = _Wrapper(model, spec)
    w.eval()
    return w, cfg


def make_inputs(family, cfg, batch, seq, seed):
    spec = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    kind = spec["kind"]
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size,
                                            cfg.image_size, generator=g)}
    if family == "whisper":
        return {"input_features": torch.randn(batch, cfg.num_mel_bins,
                                              2 * cfg.max_source_positions, generator=g)}
    if family == "wav2vec2":
        return {"input_values": torch.randn(batch, 80 * seq, generator=g)}
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 2:] = 0  # trailing padding on row 1
    if batch > 2:
        mask[2, seq - 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec["inputs"]:
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2:] = 1
        inputs["token_type_ids"] = tt
    return inputs


def reference_cases(family, wrapper, cfg):
    spec = FAMILIES[family]
    cases = []
    for k, (b, s) in enumerate(CASES):
        ins = make_inputs(family, cfg, b, s, seed=100 + k)
        with torch.no_grad():
            outs = wrapper(*[ins[n] for n in spec["inputs"]])
        cases.append(({n: v.numpy() for n, v in ins.items()},
                      {n: o.detach().float().numpy() for n, o in zip(output_names(spec), outs)}))
    return cases


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def _axes(spec):
    """{value name: {axis: dim name}} for TorchScript; the dynamo shapes follow from it."""
    kind, outs = spec["kind"], {}
    if kind == "vision" or spec["inputs"] == ["input_features"]:
        ins = {n: {0: "batch"} for n in spec["inputs"]}
        outs = {n: {0: "batch"} for n in output_names(spec)}
        return ins, outs
    seq = "frames" if spec["inputs"] == ["input_values"] else "sequence"
    ins = {n: {0: "batch", 1: "samples" if seq == "frames" else "sequence"}
           for n in spec["inputs"]}
    outs["last_hidden_state"] = {0: "batch", 1: seq}
    if spec["head"] is not None:
        outs["logits"] = {0: "batch", 1: seq} if spec["logits"] == "token" else {0: "batch"}
    return ins, outs


def _dynamic_shapes(spec, ins):
    from torch.export import Dim

    dims = {"batch": Dim("batch", min=1, max=1024),
            "sequence": Dim("sequence", min=2, max=MAX_SEQ),
            "samples": Dim("samples", min=400, max=16000)}
    # forward(*args): one entry, the tuple of the positional inputs' shapes
    return (tuple({ax: dims[d] for ax, d in ins[n].items()} for n in spec["inputs"]),)


def export_one(family, tag, out_path):
    """Export one (family, tag); return its manifest entry (without ort/graph)."""
    spec = FAMILIES[family]
    exporter, opset = ef.TAG_INFO[tag]
    wrapper, cfg = build_model(family)
    inputs = make_inputs(family, cfg, *CASES[0], seed=100)
    args = tuple(inputs[n] for n in spec["inputs"])
    ins, outs = _axes(spec)
    names_out = output_names(spec)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with ef._quiet():
        if exporter == "torchscript":
            torch.onnx.export(wrapper, args, str(out_path), dynamo=False, opset_version=opset,
                              input_names=spec["inputs"], output_names=names_out,
                              dynamic_axes={**ins, **outs}, do_constant_folding=True)
        else:
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset,
                                     input_names=spec["inputs"], output_names=names_out,
                                     dynamic_shapes=_dynamic_shapes(spec, ins))
            prog.save(str(out_path), external_data=False)
    m = onnx.load(str(out_path), load_external_data=True)
    ef._strip_stack_traces(m.graph)
    onnx.save(m, str(out_path), save_as_external_data=False)
    return wrapper, cfg


def _summary(cfg):
    d = cfg.to_dict()
    keep = ("model_type", "hidden_size", "d_model", "n_embd", "dim", "num_attention_heads",
            "n_head", "num_heads", "encoder_attention_heads", "n_heads", "num_key_value_heads",
            "head_dim", "d_kv", "intermediate_size", "ffn_dim", "d_ff", "hidden_dim",
            "encoder_ffn_dim", "n_inner", "num_hidden_layers", "n_layer", "num_layers",
            "n_layers", "encoder_layers", "vocab_size", "tie_word_embeddings",
            "rope_parameters", "rotary_dim", "multi_query", "parallel_attn",
            "use_parallel_residual", "hidden_act", "hidden_activation", "activation_function",
            "feed_forward_proj", "num_labels")
    return {k: d[k] for k in keep if k in d and d[k] is not None}


def export_family(out, family, tag):
    spec = FAMILIES[family]
    exporter, opset = ef.TAG_INFO[tag]
    name = f"{family}-{tag}"
    path = out / f"{name}.onnx"
    entry = {"file": None, "family": family, "kind": spec["kind"], "tag": tag,
             "exporter": exporter, "opset": opset, "hf_class": spec["model"],
             "covers": spec["covers"], "inputs": list(spec["inputs"]),
             "outputs": output_names(spec)}
    t0 = time.perf_counter()
    try:
        wrapper, cfg = export_one(family, tag, path)
    except Exception as e:  # noqa: BLE001 - recorded, not dropped
        root = e  # the exporter wraps the cause ("Failed to export ... step 1/3")
        while root.__cause__ is not None:
            root = root.__cause__
        text = str(root).strip()
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        entry["export_error"] = {"exporter": exporter, "type": type(root).__name__,
                                 "message": first[:400],
                                 "wrapped_by": type(e).__name__ if root is not e else None}
        e = root
        path.unlink(missing_ok=True)
        print(f"  {name:24s} EXPORT FAILED ({time.perf_counter() - t0:5.1f}s): "
              f"{type(e).__name__}: {first[:200]}", flush=True)
        return entry, time.perf_counter() - t0
    cases = reference_cases(family, wrapper, cfg)
    ef.save_npz(out / f"{name}.npz", cases)
    entry.update(file=path.name, reference=f"{name}.npz", config=_summary(cfg),
                 size_bytes=path.stat().st_size, ort=ef.ort_check(path, cases),
                 graph=ef.graph_notes(path))
    o = entry["ort"]
    dt = time.perf_counter() - t0
    status = (f"ORT ok max_err={o['max_abs_err_vs_torch']:.2e}" if o["runs"]
              else f"ORT FAILED: {o['error'][:160]}")
    print(f"  {name:24s} {entry['size_bytes'] / 1024:7.1f} KiB {dt:5.1f}s  {status}", flush=True)
    return entry, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "families"))
    ap.add_argument("--only", choices=sorted(FAMILIES), action="append",
                    help="restrict to this family (repeatable); the manifest is merged")
    ap.add_argument("--tags", nargs="+", choices=TAGS, default=list(TAGS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    families = args.only or list(FAMILIES)

    t_all = time.perf_counter()
    entries = []
    for fam in families:
        for tag in args.tags:
            entry, _ = export_family(out, fam, tag)
            entries.append(entry)
    total = time.perf_counter() - t_all

    manifest_path = out / "manifest.json"
    if (args.only or set(args.tags) != set(TAGS)) and manifest_path.exists():
        done = {(e["family"], e["tag"]) for e in entries}
        entries = [e for e in json.loads(manifest_path.read_text())
                   if (e["family"], e["tag"]) not in done] + entries
    order = {f: i for i, f in enumerate(FAMILIES)}
    entries.sort(key=lambda e: (order.get(e["family"], 99), TAGS.index(e["tag"])))
    manifest_path.write_text(json.dumps(entries, indent=1) + "\n")

    failed = [e for e in entries if "export_error" in e]
    bad = [e for e in entries if e.get("ort") and not e["ort"]["runs"]]
    print(f"\n{len(entries)} exports in {total:.1f}s ({len(failed)} exporter failures, "
          f"{len(bad)} not runnable in ONNX Runtime)")
    for e in failed:
        x = e["export_error"]
        print(f"  EXPORT FAILED: {e['family']}-{e['tag']}: {x['type']}: {x['message'][:200]}")
    for e in bad:
        print(f"  NOT RUNNABLE: {e['file']}: {e['ort']['error'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

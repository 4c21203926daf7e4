"""hfconfig: the expanded model's config.json, checked two ways.

Pure cases (per-layer lists, index lists, epsilon, ratios, refusals), and, with transformers,
the real test: for each family, the rewritten config must build the architecture the expanded
graph has.  Source and target models are built on the meta device from the two configs; every
parameter of target layer i must have the shape of its source layer's parameter with every
growing size doubled (width 2) and every fixed size (vocabulary, head_dim, positions, labels,
image geometry) kept.  No naming table: names are only used to pair layer i with its source.
"""
import re

import pytest

from lemon_onnx.hfconfig import ConfigError, expanded_config


def plan(src: dict, tgt: dict, order: list, form: str = "copies") -> dict:
    return {"source": src, "target": tgt, "layer_sources": order, "stream_form": form}


SRC = dict(hidden=64, ffn=128, heads=4, kv_heads=2, layers=2, head_dim=16, vocab=99)
W2D2 = dict(hidden=128, ffn=256, heads=8, kv_heads=4, layers=4, head_dim=16, vocab=99)
INTERLEAVE = [0, 0, 1, 1]


def test_sizes_per_layer_lists_and_index_lists_follow_the_new_order():
    cfg = {"model_type": "x", "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"],
           "no_rope_layers": [1, 0], "full_attn_idxs": [1], "_name_or_path": "/somewhere",
           "vocab_size": 99}
    top = plan(SRC, W2D2, [0, 1, 0, 1])
    out, notes = expanded_config(cfg, top)
    assert (out["hidden_size"], out["intermediate_size"], out["num_attention_heads"],
            out["num_key_value_heads"], out["num_hidden_layers"], out["head_dim"]) == \
        (128, 256, 8, 4, 4, 16)
    assert out["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert out["no_rope_layers"] == [1, 0, 1, 0]
    assert out["full_attn_idxs"] == [1, 3]
    assert "_name_or_path" not in out and out["vocab_size"] == 99
    assert cfg["num_hidden_layers"] == 2  # the input is not changed


def test_max_window_layers_is_recounted_and_refused_when_no_longer_a_prefix():
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "max_window_layers": 1}
    out, _ = expanded_config(cfg, plan(SRC, W2D2, INTERLEAVE))
    assert out["max_window_layers"] == 2
    with pytest.raises(ConfigError, match="max_window_layers"):
        expanded_config(cfg, plan(SRC, W2D2, [0, 1, 0, 1]))


def test_fractional_width_rescales_epsilon_exactly():
    tgt = dict(W2D2, hidden=96, ffn=192, heads=6, kv_heads=3, layers=2)
    out, notes = expanded_config({"hidden_size": 64, "rms_norm_eps": 1e-6},
                                 plan(SRC, tgt, [0, 1], form="zero"))
    assert out["rms_norm_eps"] == 1e-6 * 64 / 96 and "x 0.666667" in notes[0]
    out, _ = expanded_config({"hidden_size": 64, "rms_norm_eps": 1e-6},
                             plan(SRC, W2D2, INTERLEAVE))
    assert out["rms_norm_eps"] == 1e-6  # integer factors keep it


def test_ratios_null_defaults_and_secondary_widths():
    gpt2 = {"n_embd": 64, "n_inner": None, "n_layer": 2, "n_head": 4}
    out, _ = expanded_config(gpt2, plan(dict(SRC, ffn=256), dict(W2D2, ffn=512), INTERLEAVE))
    assert out["n_inner"] is None and out["n_embd"] == 128  # still 4 x hidden
    out, _ = expanded_config(gpt2, plan(dict(SRC, ffn=256), dict(W2D2, ffn=384), INTERLEAVE))
    assert out["n_inner"] == 384
    vit = {"hidden_size": 64, "mlp_ratio": 2, "num_hidden_layers": 2}
    out, _ = expanded_config(vit, plan(SRC, dict(W2D2, ffn=320), INTERLEAVE))
    assert out["mlp_ratio"] == 2.5
    opt = {"hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 128, "num_hidden_layers": 2}
    out, _ = expanded_config(opt, plan(SRC, W2D2, INTERLEAVE))
    assert out["word_embed_proj_dim"] == 128 and out["ffn_dim"] == 256


def test_a_config_of_another_model_is_refused():
    with pytest.raises(ConfigError, match="hidden_size=32.*hidden 64"):
        expanded_config({"hidden_size": 32}, plan(SRC, W2D2, INTERLEAVE))


def test_encoder_decoder_stacks_keep_their_own_layer_counts():
    t5 = {"d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16, "num_layers": 2,
          "num_decoder_layers": None}
    dec = plan(SRC, dict(W2D2, layers=6), [0, 0, 0, 1, 1, 1])
    out, _ = expanded_config(t5, plan(SRC, W2D2, INTERLEAVE), decoder_plan=dec)
    assert (out["num_layers"], out["num_decoder_layers"], out["d_model"], out["d_ff"]) == \
        (4, 6, 128, 256)
    bart = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 3, "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "num_hidden_layers": 2}
    dec = plan(dict(SRC, layers=3), dict(W2D2, layers=6), [0, 0, 1, 1, 2, 2])
    out, _ = expanded_config(bart, plan(SRC, W2D2, INTERLEAVE), decoder_plan=dec)
    assert (out["encoder_layers"], out["decoder_layers"], out["num_hidden_layers"],
            out["decoder_ffn_dim"], out["decoder_attention_heads"]) == (4, 6, 4, 256, 8)


# ----------------------------------------------------------------- with transformers
TEXT = dict(hidden_size=64, num_attention_heads=4, intermediate_size=112, num_hidden_layers=2,
            vocab_size=99, max_position_embeddings=40)
GQA = dict(TEXT, num_key_value_heads=2)
IMG = dict(hidden_size=64, num_attention_heads=4, intermediate_size=112, num_hidden_layers=2,
           image_size=24, patch_size=8, num_channels=3)
#: config class, kwargs, source sizes (hidden, ffn, heads, kv_heads)
FAMILIES = {
    "llama": ("LlamaConfig", dict(GQA, head_dim=16), (64, 112, 4, 2)),
    "qwen2": ("Qwen2Config", GQA, (64, 112, 4, 2)),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=16, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=1), (64, 112, 4, 2)),
    "mistral": ("MistralConfig", GQA, (64, 112, 4, 2)),
    "gemma": ("GemmaConfig", dict(TEXT, num_key_value_heads=1, head_dim=16), (64, 112, 4, 1)),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=16), (64, 112, 4, 2)),
    "smollm3": ("SmolLM3Config", dict(GQA, pad_token_id=0), (64, 112, 4, 2)),
    "olmo2": ("Olmo2Config", TEXT, (64, 112, 4, 4)),
    "stablelm": ("StableLmConfig", dict(GQA, partial_rotary_factor=0.25), (64, 112, 4, 2)),
    "phi": ("PhiConfig", TEXT, (64, 112, 4, 4)),
    "phi3": ("Phi3Config", dict(GQA, pad_token_id=0), (64, 112, 4, 2)),
    "granite": ("GraniteConfig", GQA, (64, 112, 4, 2)),
    "starcoder2": ("Starcoder2Config", GQA, (64, 112, 4, 2)),
    "gpt_neox": ("GPTNeoXConfig", TEXT, (64, 112, 4, 4)),
    "cohere": ("CohereConfig", GQA, (64, 112, 4, 2)),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=64, num_heads=4, num_layers=2, vocab_size=99,
                                     max_position_embeddings=40, intermediate_size=112,
                                     attention_types=[[["global", "local"], 1]]),
                (64, 112, 4, 4)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_layer=2, vocab_size=99, n_positions=40,
                                n_inner=112), (64, 112, 4, 4)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_head=4, n_layer=2, vocab_size=99, n_positions=40,
                                rotary_dim=8, n_inner=112), (64, 112, 4, 4)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=64, n_head=4, n_layer=2, vocab_size=99,
                                             n_positions=40, n_inner=112, multi_query=True),
                    (64, 112, 4, 1)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=99),
              (64, 256, 4, 4)),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                    vocab_size=99, multi_query=True, new_decoder_architecture=False),
               (64, 256, 4, 1)),
    "opt": ("OPTConfig", dict(hidden_size=64, num_attention_heads=4, ffn_dim=112,
                              num_hidden_layers=2, vocab_size=99, word_embed_proj_dim=64,
                              max_position_embeddings=40), (64, 112, 4, 4)),
    "mpt": ("MptConfig", dict(d_model=64, n_heads=4, n_layers=2, vocab_size=99,
                              expansion_ratio=2, max_seq_len=40), (64, 128, 4, 4)),
    "bert": ("BertConfig", TEXT, (64, 112, 4, 4)),
    "roberta": ("RobertaConfig", dict(TEXT, max_position_embeddings=42), (64, 112, 4, 4)),
    "electra": ("ElectraConfig", dict(TEXT, embedding_size=64), (64, 112, 4, 4)),
    "distilbert": ("DistilBertConfig", dict(dim=64, n_heads=4, hidden_dim=112, n_layers=2,
                                            vocab_size=99, max_position_embeddings=40),
                   (64, 112, 4, 4)),
    "vit": ("ViTConfig", IMG, (64, 112, 4, 4)),
    "deit": ("DeiTConfig", IMG, (64, 112, 4, 4)),
    "dinov2": ("Dinov2Config", dict({k: v for k, v in IMG.items() if k != "intermediate_size"},
                                    mlp_ratio=2), (64, 128, 4, 4)),
}
#: sizes that no expansion changes: vocabulary, head_dim, positions, image geometry, 1
FIXED = {1, 2, 3, 8, 16, 99, 40, 42, 24, 9, 10, 11}


def _shapes(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _layer_of(name: str):
    """(name with the layer index replaced, index) for a parameter inside a layer list."""
    m = re.search(r"\.(\d+)\.", name)
    return (name[:m.start(1)] + "{i}" + name[m.end(1):], int(m.group(1))) if m else (name, None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_rewritten_config_builds_the_expanded_architecture(family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls_name, kw, (h, f, nh, kv) = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**kw)
    src = dict(hidden=h, ffn=f, heads=nh, kv_heads=kv, layers=2, head_dim=16)
    tgt = dict(hidden=2 * h, ffn=2 * f, heads=2 * nh, kv_heads=kv if kv == 1 else 2 * kv,
               layers=4, head_dim=16)
    new, _ = expanded_config(cfg.to_dict(), plan(src, tgt, INTERLEAVE))
    new_cfg = type(cfg).from_dict(new)
    with torch.device("meta"):
        small = transformers.AutoModel.from_config(cfg)
        big = transformers.AutoModel.from_config(new_cfg)
    s_shapes, b_shapes = _shapes(small), _shapes(big)
    by_template = {}
    for n, shape in s_shapes.items():
        by_template[_layer_of(n)] = shape
    assert len(b_shapes) > len(s_shapes), "the layers were not added"
    for n, shape in b_shapes.items():
        tmpl, i = _layer_of(n)
        src_shape = by_template.get((tmpl, None if i is None else INTERLEAVE[i]))
        assert src_shape is not None, f"{n} has no source parameter"
        # a fused q|k|v with one KV head (MQA): (heads + 2) x head_dim -> (2 heads + 2) x hd
        want = tuple(x if x in FIXED else (2 * nh + 2) * 16 if kv == 1 and x == (nh + 2) * 16
                     else 2 * x for x in src_shape)
        assert shape == want, f"{n}: {shape}, expected {want} (source {src_shape})"
    for k, v in cfg.to_dict().items():  # per-layer lists follow the new order
        if isinstance(v, list) and len(v) == 2 and "layer" in k:
            assert new[k] == [v[s] for s in INTERLEAVE], k

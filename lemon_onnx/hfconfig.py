"""A transformers ``config.json`` for an expanded model: the source's, with the new sizes.

Pure (no torch, no transformers): ``expanded_config(cfg, plan)`` takes the source model's
config (a dict) and the plan lemon-onnx recorded in the expanded model (``lemon.plan``: source
and target sizes, stream form, ``layer_sources``) and returns the new config and notes.  Both
ends of the product use it: export folders (``expand DIR``, read back by optimum's ORTModel
classes, which size the KV cache from it) and the hand-off to training (``export-torch``,
read by ``from_pretrained``).

What changes, under the keys the family's own config uses:

- sizes: hidden, FFN, attention heads, KV heads, layers, head_dim (each under every alias in
  ``SIZE_KEYS`` the config has); FFN sizes given as a ratio of the hidden size (``mlp_ratio``,
  ``expansion_ratio``) are recomputed; GPT-2's ``n_inner: null`` (4 x hidden) stays null
  while it still means that; secondary widths that equal the hidden size (OPT's
  ``word_embed_proj_dim``, ELECTRA's ``embedding_size``: no projection exists while they do)
  follow it;
- encoder-decoder configs keep one layer count per stack: ``decoder_plan`` gives the decoder's;
  without it (only the encoder was exported: Whisper's audio classifier) the encoder's keys
  follow the plan and the decoder's stay;
- per-layer lists (``layer_types``, ``no_rope_layers``, ...: a list with one entry per source
  layer) follow the new layer order, each new layer taking its source block's entry; lists
  of layer *indices* (``INDEX_LIST_KEYS``) are mapped to the new positions; per-layer lists
  written as [pattern, repeat] pairs (GPT-Neo's ``attention_types``) are re-laid one entry per
  layer; ``max_window_layers``
  (the first N layers attend fully) is recounted;
- the norms' epsilon of a fractional width: every norm over the stream has epsilon x s,
  s = k*d/D (lemon-math.md, "Norm layers"); the config gets the exact product;
- ``tie_word_embeddings`` and the dtype when given; ``_name_or_path`` is dropped.

A config whose sizes are not the plan's source sizes belongs to another model: ``ConfigError``.
"""

from __future__ import annotations

import math
from typing import Iterable

from .errors import InputError

#: the size a key holds -> the keys transformers' configs use for it
SIZE_KEYS = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size",
            "inner_dim"),
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv",
                 "multi_query_group_num"),
    "layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "head_dim": ("head_dim", "d_kv", "kv_channels", "attention_head_size"),
}
#: encoder-decoder configs: keys of one stack (T5's ``num_layers`` is the encoder's)
ENCODER_KEYS = {"layers": ("encoder_layers", "num_encoder_layers"),
                "heads": ("encoder_attention_heads",), "ffn": ("encoder_ffn_dim",)}
DECODER_KEYS = {"layers": ("decoder_layers", "num_decoder_layers"),
                "heads": ("decoder_attention_heads",), "ffn": ("decoder_ffn_dim",)}
#: widths that equal the hidden size unless the model projects between them
SECONDARY_HIDDEN_KEYS = ("word_embed_proj_dim", "embedding_size", "projection_dim",
                         "pooler_output_size")
#: FFN sizes written as a multiple of the hidden size
RATIO_KEYS = ("mlp_ratio", "expansion_ratio")
EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps",
            "layernorm_epsilon", "norm_epsilon", "rms_norm_epsilon")
#: lists with one entry per layer, besides any list of that length whose key names layers
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "layers_block_type", "sliding_window_layers",
                  "attention_types_per_layer", "block_types")
#: lists of layer indices
INDEX_LIST_KEYS = ("full_attn_idxs", "swa_layers", "global_attn_layers", "attn_layer_indices",
                   "layers_to_transform", "full_attention_layers", "moe_layer_indices")


class ConfigError(InputError):
    """The config does not describe the model that was expanded (exit 2)."""


def _present(cfg: dict, keys: Iterable[str]) -> list[str]:
    return [k for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)]


def check_source(cfg: dict, source: dict, *, decoder_source: dict | None = None) -> None:
    """The config must describe the model that was expanded (``source``: its sizes)."""
    stacks = [({k: v + ENCODER_KEYS.get(k, ()) for k, v in SIZE_KEYS.items()}, source)]
    if decoder_source is not None:
        stacks.append((DECODER_KEYS, decoder_source))
    for keys, sizes in stacks:
        for what, names in keys.items():
            if what not in sizes or sizes[what] is None:
                continue
            for key in _present(cfg, names):
                if what == "kv_heads" and int(cfg[key]) == int(sizes.get("heads") or -1):
                    continue  # a KV-head key the architecture ignores (Falcon's multi_query)
                if int(cfg[key]) != int(sizes[what]):
                    raise ConfigError(
                        f"the config says {key}={cfg[key]}, but the model lemon-onnx expanded "
                        f"has {what} {sizes[what]}: this config belongs to another model.",
                        hint="Use the config.json of the model that was exported to ONNX.")


def epsilon_factor(plan: dict) -> float:
    """s = k*d/D for a fractional width of a normalised stream, else 1."""
    d, D = int(plan["source"]["hidden"]), int(plan["target"]["hidden"])
    if D % d == 0 or plan.get("stream_form") not in ("avg", "zero"):
        return 1.0
    return (D // d) * d / D


def expanded_config(cfg: dict, plan: dict, *, decoder_plan: dict | None = None,
                    tie: bool | None = None, dtype: str | None = None) -> tuple[dict, list[str]]:
    """(the expanded model's config, notes).  ``plan``: the expanded model's ``lemon.plan``
    (for an encoder-decoder, the encoder's; ``decoder_plan`` the decoder's)."""
    src, tgt = plan["source"], plan["target"]
    check_source(cfg, src, decoder_source=decoder_plan["source"] if decoder_plan else None)
    out = {k: v for k, v in cfg.items() if k != "_name_or_path"}
    notes: list[str] = []

    def put(keys: Iterable[str], old, new) -> None:
        for k in _present(cfg, keys):
            if new is not None and int(cfg[k]) == int(old) and new != old:
                out[k] = int(new)

    stack_keys = dict(SIZE_KEYS)
    # the encoder's keys: its stack in an encoder-decoder, the whole model where only the
    # encoder was exported (Whisper's audio classifier)
    for what, keys in ENCODER_KEYS.items():
        put(keys, src[what], tgt[what])
    if decoder_plan is not None:
        dsrc, dtgt = decoder_plan["source"], decoder_plan["target"]
        for what, keys in DECODER_KEYS.items():
            put(keys, dsrc[what], dtgt[what])
        if dtgt["layers"] != tgt["layers"] and "num_decoder_layers" in cfg \
                and cfg["num_decoder_layers"] is None:  # T5: None means num_layers
            out["num_decoder_layers"] = int(dtgt["layers"])
    for what, keys in stack_keys.items():
        put(keys, src.get(what), tgt.get(what))
    # a KV-head key that holds the head count (ignored under Falcon's multi_query) follows it
    put(SIZE_KEYS["kv_heads"], src["heads"], tgt["heads"])
    if decoder_plan is not None and "num_decoder_layers" not in out and \
            decoder_plan["target"]["layers"] != tgt["layers"] and "num_layers" in cfg:
        out["num_decoder_layers"] = int(decoder_plan["target"]["layers"])
    _secondary_sizes(cfg, out, src, tgt, notes)
    _per_layer(cfg, out, plan, notes)
    _epsilon(cfg, out, plan, notes)
    if tie is not None and "tie_word_embeddings" in cfg or tie is False:
        out["tie_word_embeddings"] = bool(tie)
    if dtype:
        out["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = dtype
    return out, notes


def _secondary_sizes(cfg: dict, out: dict, src: dict, tgt: dict, notes: list[str]) -> None:
    d, D = src["hidden"], tgt["hidden"]
    for k in _present(cfg, SECONDARY_HIDDEN_KEYS):
        if cfg[k] == d and D != d:
            out[k] = D
    if "n_inner" in cfg and cfg["n_inner"] is None and tgt["ffn"] != 4 * D:
        out["n_inner"] = int(tgt["ffn"])  # GPT-2: None means 4 x hidden
    for k in RATIO_KEYS:
        r = cfg.get(k)
        if isinstance(r, (int, float)) and not isinstance(r, bool) and d and \
                math.isclose(r * d, src["ffn"]) and (tgt["ffn"], D) != (src["ffn"], d):
            ratio = tgt["ffn"] / D
            out[k] = int(ratio) if float(ratio).is_integer() and isinstance(r, int) else ratio
            if not math.isclose(out[k] * D, tgt["ffn"]):
                raise ConfigError(f"the config gives the FFN size as {k} x hidden, and "
                                  f"{tgt['ffn']} / {D} is not representable as {k}.")


def _per_layer(cfg: dict, out: dict, plan: dict, notes: list[str]) -> None:
    L, order = plan["source"]["layers"], plan.get("layer_sources") or []
    if plan["target"]["layers"] == L and order in ([], list(range(L))):
        return
    if len(order) != plan["target"]["layers"]:
        raise ConfigError("the expanded model's plan does not say which source layer each new "
                          "layer came from (an expansion chain recorded by an older "
                          "lemon-onnx), so per-layer config entries cannot be reordered.",
                          hint="Expand the original model again with this lemon-onnx.")
    for k, v in cfg.items():
        if not isinstance(v, list):
            continue
        if k in INDEX_LIST_KEYS:
            if all(isinstance(i, int) for i in v):
                old = {i % L for i in v}
                out[k] = [p for p, s in enumerate(order) if s in old]
            continue
        runs = _run_length(v)
        if runs is not None and len(runs) == L:  # GPT-Neo: [[["global", "local"], 2]]
            out[k] = [[[runs[s]], 1] for s in order]
        elif len(v) == L and (k in PER_LAYER_KEYS or "layer" in k):
            out[k] = [v[s] for s in order]
        elif "layer" in k and v:
            notes.append(f"config key {k} is a list of {len(v)} entries that mentions layers "
                         f"but has neither one entry per layer ({L}) nor layer indices that "
                         "lemon-onnx knows; it was left as it is")
    mwl = cfg.get("max_window_layers")
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        full = [s < mwl for s in order]
        n = sum(full)
        if full != [True] * n + [False] * (len(full) - n):
            raise ConfigError(
                f"max_window_layers={mwl} says the first layers attend fully, but in the new "
                f"layer order (sources {order}) those layers are not all first.",
                hint="Use --placement interleave or uniform, which keep the layers in order.")
        out["max_window_layers"] = n


def _run_length(v: list) -> list | None:
    """A per-layer list written as [pattern, repeat] pairs (GPT-Neo's ``attention_types``),
    expanded; None when ``v`` is not of that form."""
    if not v or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], list)
                        and isinstance(e[1], int) and not isinstance(e[1], bool) for e in v):
        return None
    return [x for pattern, n in v for _ in range(n) for x in pattern]


def _epsilon(cfg: dict, out: dict, plan: dict, notes: list[str]) -> None:
    s = epsilon_factor(plan)
    if s == 1.0:
        return
    for k in EPS_KEYS:
        v = cfg.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v) * s
            notes.append(f"{k} {v:g} -> {out[k]:g} (the norms' epsilon, rescaled by the "
                         f"fractional width: x {s:g})")


#: ONNX Runtime GenAI's ``genai_config.json``: the decoder's sizes under ``model.decoder``
GENAI_CONFIG = "genai_config.json"
_GENAI_KEYS = {"hidden_size": "hidden", "num_attention_heads": "heads",
               "num_key_value_heads": "kv_heads", "num_hidden_layers": "layers",
               "head_size": "head_dim"}


def expanded_genai_config(cfg: dict, plan: dict) -> dict:
    """ONNX Runtime GenAI's config for the expanded model: the decoder's sizes (hidden, heads,
    KV heads, layers, head size) follow the plan; everything else (file names, input and
    output name templates, context length, search options) stays.  A config whose sizes
    are not the plan's source sizes belongs to another model: ``ConfigError``."""
    import copy

    dec = (cfg.get("model") or {}).get("decoder") if isinstance(cfg, dict) else None
    if not isinstance(dec, dict):
        raise ConfigError(f"{GENAI_CONFIG} has no model.decoder section.",
                          hint="Use the genai_config.json ONNX Runtime GenAI's model builder "
                               "wrote for this model.")
    src, tgt = plan["source"], plan["target"]
    out = copy.deepcopy(cfg)
    for key, what in _GENAI_KEYS.items():
        if key not in dec or src.get(what) is None:
            continue
        if int(dec[key]) != int(src[what]):
            raise ConfigError(f"{GENAI_CONFIG} says {key}={dec[key]}, but the model "
                              f"lemon-onnx expanded has {what} {src[what]}: this config "
                              "belongs to another model.",
                              hint="Use the genai_config.json of the model that was built.")
        out["model"]["decoder"][key] = int(tgt[what])
    return out

"""config.json for the expanded model: the source config with the new sizes.

Sizes come from the expanded graph's description (what the weights really are), checked against
the source config through the plan's source sizes, so that a config of another model is refused.
Keys are updated where the config has them, under the names transformers' configs use
(``hidden_size`` or GPT-2's ``n_embd``, ...); head_dim only where the config has it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..recognize import ModelDescription
from . import families
from .errors import HandoffError

SIZE_KEYS = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "layers": ("num_hidden_layers", "n_layer"),
    "head_dim": ("head_dim",),
}
EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")


def read(config) -> dict | None:
    """A config.json path, a folder holding one, or a dict (copied)."""
    if config is None:
        return None
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise HandoffError(f"{p}: no such config file.",
                           hint="Pass the source model's config.json (or its folder).")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise HandoffError(f"{p} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise HandoffError(f"{p} does not hold a JSON object, so it is not a config.json.")
    return data


def sizes(desc: ModelDescription) -> dict:
    return {"hidden": desc.hidden, "ffn": desc.ffn, "heads": desc.heads,
            "kv_heads": desc.kv_heads, "layers": desc.num_layers, "head_dim": desc.head_dim}


def _present(cfg: dict, what: str) -> list[str]:
    return [k for k in SIZE_KEYS[what] if cfg.get(k) is not None]


def check_source(cfg: dict, source: dict) -> None:
    """The config must describe the model that was expanded (``source``: its sizes)."""
    for what in ("hidden", "heads", "layers", "ffn", "kv_heads"):
        for key in _present(cfg, what):
            if source.get(what) is not None and int(cfg[key]) != int(source[what]):
                raise HandoffError(
                    f"the config says {key}={cfg[key]}, but the model lemon-onnx expanded had "
                    f"{what} {source[what]}: this config belongs to another model.",
                    hint="Pass the config.json of the model that was exported to ONNX.")


def graph_epsilon(desc: ModelDescription) -> float | None:
    """The epsilon most of the block norms use (after expansion: possibly rescaled)."""
    eps = Counter()
    for b in desc.blocks:
        for n in (b.attention_norm, b.mlp_norm, b.attention_post_norm, b.mlp_post_norm):
            if n is not None:
                eps[n.epsilon] += 1
    return eps.most_common(1)[0][0] if eps else None


def expanded_config(cfg: dict, desc: ModelDescription, plan: dict | None, *,
                    dtype: str | None) -> tuple[dict, list[str]]:
    """(new config, notes)."""
    out = dict(cfg)
    notes: list[str] = []
    mt = cfg.get("model_type")
    if families.family(mt) and families.family(desc.family) and mt != desc.family:
        raise HandoffError(f"the config is for model_type {mt!r}, but the graph is a "
                           f"{desc.family} model.",
                           hint="Pass the config.json of the model that was exported to ONNX.")
    check_source(cfg, plan["source"] if plan else sizes(desc))
    new = sizes(desc)
    for what, value in new.items():
        keys = _present(cfg, what)
        for k in keys:
            out[k] = int(value)
        if not keys and what == "ffn" and "n_inner" in cfg and value != 4 * new["hidden"]:
            out["n_inner"] = int(value)  # GPT-2: None means 4 x hidden
        if not keys and what == "kv_heads" and value != new["heads"]:
            raise HandoffError("the expanded model has grouped-query attention but the config "
                               "has no num_key_value_heads key.")
    _epsilon(out, desc, plan, notes)
    head = desc.head.kind
    if head in ("lm", "mlm"):  # the expanded graph says whether the head is still tied
        out["tie_word_embeddings"] = bool(desc.tie)
        if cfg.get("tie_word_embeddings", True) and not desc.tie:  # transformers' default
            notes.append("the head is untied (its own weight, tie_word_embeddings=false)")
    fam = families.family(cfg.get("model_type"))
    if fam is not None and head in fam.classes:
        out["architectures"] = [fam.classes[head]]
    if dtype:
        key = "dtype" if "dtype" in cfg else "torch_dtype"
        out[key] = dtype
    out.pop("_name_or_path", None)
    return out, notes


def _epsilon(out: dict, desc: ModelDescription, plan: dict | None, notes: list[str]) -> None:
    """A fractional width rescales every norm's epsilon by s = k*d/D (lemon-math.md, "Norm
    layers"); the graph holds it as float32, the config gets the exact product."""
    eps_now = graph_epsilon(desc)
    keys = [k for k in EPS_KEYS if isinstance(out.get(k), (int, float))]
    if eps_now is None or not keys:
        return
    for k in keys:
        old = float(out[k])
        if math.isclose(eps_now, old, rel_tol=1e-6):
            continue
        value = eps_now
        if plan:
            d, D = plan["source"]["hidden"], plan["target"]["hidden"]
            s = (D // d) * d / D
            if math.isclose(old * s, eps_now, rel_tol=1e-6):
                value = old * s
        out[k] = value
        notes.append(f"{k} {old:g} -> {value:g} (the norms' epsilon, rescaled by the expansion)")

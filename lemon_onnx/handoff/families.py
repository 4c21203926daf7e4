"""transformers' parameter names by role, per ``model_type`` (the last resort for names).

Names are first read from the graph (``names.py``); this table is used only
1. to find the exporter's wrapper prefix (a module that held the transformers model while it
   was exported: ``model.model.layers.0...`` in a wrapper, ``model.layers.0...`` without), by
   matching the names read from the graph against it, and
2. for a tensor whose name the graph does not give at all (the recognised structure: block i,
   role), and
3. for the class transformers builds (``architectures``) and which modules store their
   weight as ``[in, out]`` (GPT-2's ``Conv1D``) rather than ``[out, in]`` (``nn.Linear``).

Roles are the description's (``recognize.py``): ``embeddings.token``, ``block.attention.q.weight``
... Names are in the namespace of the class with the model's head; ``{i}`` is the block index.
A model without a head (``BertModel``) uses the same names without ``base`` in front.
The names follow transformers 5 (ViT's layers moved from ``encoder.layer.{i}.attention.attention
.query`` to ``layers.{i}.attention.q_proj``; names read from an older export are kept as they
are, and transformers maps renamed checkpoint keys itself).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    base: str  # base_model_prefix
    classes: dict  # head kind ("lm", "mlm", "classifier", "none") -> transformers class
    names: dict  # role -> name (block roles relative to ``block``)
    block: str  # prefix of block i's parameters, with {i}
    conv1d: frozenset = frozenset()  # block roles whose module stores weight as [in, out]


def _linear(role: str, module: str, bias: bool = True) -> dict:
    out = {f"{role}.weight": f"{module}.weight"}
    if bias:
        out[f"{role}.bias"] = f"{module}.bias"
    return out


def _norm(role: str, module: str, bias: bool = True) -> dict:
    return _linear(role, module, bias)


def _llama_like() -> Family:
    names = {"embeddings.token": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    names.update(_norm("block.attention_norm", "input_layernorm", bias=False))
    names.update(_norm("block.mlp_norm", "post_attention_layernorm", bias=False))
    for role, mod in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "o_proj")):
        names.update(_linear(f"block.attention.{role}", f"self_attn.{mod}"))
    for role in ("gate", "up", "down"):
        names.update(_linear(f"block.mlp.{role}", f"mlp.{role}_proj"))
    return Family("model", {"lm": "LlamaForCausalLM", "none": "LlamaModel"}, names,
                  "model.layers.{i}")


def _gpt2() -> Family:
    names = {"embeddings.token": "transformer.wte.weight",
             "embeddings.position": "transformer.wpe.weight", "head.weight": "lm_head.weight"}
    names.update(_norm("final_norm", "transformer.ln_f"))
    names.update(_norm("block.attention_norm", "ln_1"))
    names.update(_norm("block.mlp_norm", "ln_2"))
    names.update(_linear("block.attention.qkv", "attn.c_attn"))
    names.update(_linear("block.attention.out", "attn.c_proj"))
    names.update(_linear("block.mlp.up", "mlp.c_fc"))
    names.update(_linear("block.mlp.down", "mlp.c_proj"))
    return Family("transformer", {"lm": "GPT2LMHeadModel", "none": "GPT2Model"}, names,
                  "transformer.h.{i}",
                  frozenset({"block.attention.qkv", "block.attention.out", "block.mlp.up",
                             "block.mlp.down"}))


def _bert() -> Family:
    e = "bert.embeddings"
    names = {"embeddings.token": f"{e}.word_embeddings.weight",
             "embeddings.position": f"{e}.position_embeddings.weight",
             "embeddings.token_type": f"{e}.token_type_embeddings.weight",
             "head.weight": "cls.predictions.decoder.weight", "head.bias": "cls.predictions.bias"}
    names.update(_norm("embeddings.norm", f"{e}.LayerNorm"))
    for role, mod in (("q", "attention.self.query"), ("k", "attention.self.key"),
                      ("v", "attention.self.value"), ("out", "attention.output.dense"),
                      ("up", "intermediate.dense"), ("down", "output.dense")):
        names.update(_linear(f"block.{'mlp' if role in ('up', 'down') else 'attention'}.{role}",
                             mod))
    names.update(_norm("block.attention_post_norm", "attention.output.LayerNorm"))
    names.update(_norm("block.mlp_post_norm", "output.LayerNorm"))
    names.update(_linear("head.transform", "cls.predictions.transform.dense"))
    names.update(_norm("head.transform_norm", "cls.predictions.transform.LayerNorm"))
    names.update(_linear("extra_head0", "bert.pooler.dense"))
    return Family("bert", {"mlm": "BertForMaskedLM", "none": "BertModel",
                           "classifier": "BertForSequenceClassification"}, names,
                  "bert.encoder.layer.{i}")


def _vit() -> Family:
    e = "vit.embeddings"
    names = {"embeddings.cls_token": f"{e}.cls_token",
             "embeddings.position": f"{e}.position_embeddings"}
    names.update(_linear("embeddings.patch", f"{e}.patch_embeddings.projection"))
    names.update(_norm("block.attention_norm", "layernorm_before"))
    names.update(_norm("block.mlp_norm", "layernorm_after"))
    for role, mod in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "o_proj")):
        names.update(_linear(f"block.attention.{role}", f"attention.{mod}"))
    names.update(_linear("block.mlp.up", "mlp.fc1"))
    names.update(_linear("block.mlp.down", "mlp.fc2"))
    names.update(_norm("final_norm", "vit.layernorm"))
    names.update(_linear("head", "classifier"))
    return Family("vit", {"classifier": "ViTForImageClassification", "none": "ViTModel"}, names,
                  "vit.layers.{i}")


FAMILIES: dict[str, Family] = {"llama": _llama_like(), "gpt2": _gpt2(), "bert": _bert(),
                               "vit": _vit()}


def family(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")


def template(fam: Family, role: str, head_kind: str) -> str | None:
    """The transformers name of ``role`` (block roles keep ``{i}``), in the namespace of the
    class for ``head_kind``: a model without a head drops the base prefix."""
    if role.startswith("block."):
        rel = fam.names.get(role)
        name = None if rel is None else f"{fam.block}.{rel}"
    else:
        name = fam.names.get(role)
    if name is None:
        return None
    if head_kind == "none":
        if not name.startswith(fam.base + "."):
            return None  # a head's parameter: a headless model has none
        name = name[len(fam.base) + 1:]
    return name

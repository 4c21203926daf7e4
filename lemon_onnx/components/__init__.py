"""Components: one module per kind of Transformer part, each matching, widening and twinning
itself.

Every module follows the same shape (ONNX Runtime's fusions and the onnxscript rewriter's rules
are the model: pattern, check with a reason, rewrite):

- a typed description (a dataclass: ``Norm``, ``Attention``, ``Block``, ...), the only thing the
  passes read;
- ``match(ctx, ...)`` (or ``match_all``): find the part by structure and shape reasoning over
  ``ctx`` (a ``graph.GraphIndex``: values, nodes, ancestry, the axis analysis).  A part that
  does not fit raises ``UnsupportedModelError`` with the reason and the value or node at fault;
  nothing is ever decided by an initializer's name or a number that happens to match;
- ``widen(wp, part, ...)``: ask the width pass's weight editor for the new tensors, with the
  rules of ``lemon_math`` and the maps the pass holds (stream, norm output, FFN units, query and
  KV heads);
- ``twin(dp, part, ...)`` where the part has a role in a twin block (depth): make it add exactly
  nothing.

Modules, in the order recognition runs them:

``linear``     MatMul/Gemm with constant weights (and fused projections' widening)
``norm``       LayerNorm/RMSNorm ops and decomposed forms; Post-LN twin recipe
``embedding``  token, position, token-type, patch tables; cls and extra tokens; embedding norm
``branch``     helpers: the linears that read a branch, the linear that ends it
``attention``  self-attention dialects (q/k/v or fused, MHA/GQA/MQA, ONNX Attention, rotary),
               per-head score tables (relative position buckets, ALiBi)
``mlp``        plain or gated MLPs, any elementwise activation
``residual``   residual topology: sequential or parallel blocks, pre/post-norm, layer scale,
               norms on branch outputs
``head``       LM heads (tied or not), MLM heads, classifiers (with an inner dense layer,
               pooling over tokens, a pooler norm, concatenated cls + mean), extra heads
``cache``      a decoder's KV cache (graph input -> Concat with the new keys or values ->
               graph output): its owner layer, a twin's own cache, renumbering

Whatever no component claims is refused by the width pass's closed-world check (a constant or
operator that carries a size the plan changes), so a new architecture is refused with the
tensor's name rather than expanded wrongly.  See the README, "Adding a component".

Registration: ``REGISTRY`` below is the one list of component modules, in the order
recognition runs them.  ONNX Runtime's contrib ops (``com.microsoft``: SkipLayerNormalization,
Attention, BiasGelu, ...) never reach them: ``lemon_onnx.fusion`` unfuses each into the
standard ops a component matches and fuses it again after the passes (its own registry, one
module per op family); a contrib op no fusion module knows is refused, naming it.
"""

from . import (attention, branch, cache, cross_attention, embedding, head, linear, mlp, norm,
               residual)

#: the components, in the order recognition runs them (one line each)
REGISTRY = (
    linear,
    norm,
    embedding,
    branch,
    attention,
    cross_attention,
    mlp,
    residual,
    head,
    cache,
)


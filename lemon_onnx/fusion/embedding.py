"""EmbedLayerNormalization (com.microsoft): BERT's embeddings and their LayerNorm in one op.

``EmbedLayerNormalization(input_ids, segment_ids?, word_embedding, position_embedding,
segment_embedding?, gamma, beta?, mask?, position_ids?)``: LayerNorm(word[ids] +
position[0..S-1 or position_ids] + segment[segment_ids]); output 1 (``mask_index``, int32 per
row) is the number of ones in the mask, the 1-D form the fused ``Attention`` reads; output 2
the sum before the norm.  Unfused as the Gathers, Adds and the norm the embedding component
knows, the mask sum as a ReduceSum.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_ir.convenience import convert_attribute

from . import Builder, FusedOp, refuse_form
from .norms import layer_norm, norm_epsilon

OPS = tuple(map(FusedOp, ("EmbedLayerNormalization",)))


def fused_attrs(group, attrs: dict, ins: dict) -> dict:
    return {**attrs, "epsilon": convert_attribute("epsilon", norm_epsilon(group))}


def decompose(b: Builder, node: ir.Node) -> dict:
    ins = list(node.inputs) + [None] * 9
    ids, seg_ids, word, pos, seg, gamma, beta, mask, pos_ids = ins[:9]
    if node.attributes.get_int("mask_index_type", 1) != 1:
        raise refuse_form(node, "its mask_index_type is not 1")
    eps = node.attributes.get_float("epsilon", 1e-12)
    w = b.op("Gather", [word, ids], role="word")
    if pos_ids is None:
        one = b.const(np.array(1, np.int64))
        seq = b.op("Gather", [b.op("Shape", [ids]), one], {"axis": 0})
        pos_ids = b.op("Range", [b.const(np.array(0, np.int64)), seq, one])
    p = b.op("Gather", [pos, pos_ids], role="position")
    s = b.op("Add", [w, p])
    if seg is not None and seg_ids is not None:
        s = b.op("Add", [s, b.op("Gather", [seg, seg_ids], role="segment")])
    y = layer_norm(b, s, gamma, beta, eps)
    for i, v in enumerate(ins[:9]):
        if v is not None:
            b.port_in(v, i)
    outs = {0: y, 2: s}
    used = len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output())
    if used:  # an unused mask index is not built (the passes would drop it as dead code)
        if mask is not None:
            outs[1] = b.op("Cast", [b.reduce("ReduceSum", mask, [1], keepdims=0)],
                           {"to": int(ir.DataType.INT32)})
        else:
            outs[1] = b.op("Cast", [b.reduce("ReduceSum", b.op("Mul", [ids, b.const(
                np.array(0, ids.dtype.numpy() if ids.dtype else np.int32))]), [1], keepdims=0)],
                {"to": int(ir.DataType.INT32)})
    if 1 in outs:
        outs[1].dtype = ir.DataType.INT32
        outs[1].shape = ir.Shape([ids.shape[0] if ids.shape is not None else None])
    return outs

"""The index maps of one plan: which source coordinate each new coordinate copies.

They are a pure function of the plan's sizes and stream form (``lemon_math``), made once when
the plan is made and handed to both passes as an option: the width pass lays every tensor out
with them, the depth pass pairs a twin's units with them, verification reads the KV-head map
to feed and compare a decoder's cache (lemon-math.md, "The maps of one expansion").
"""

from __future__ import annotations

import dataclasses

from .. import lemon_math as lm
from ..errors import PlanError
from ..graph import back_view

__all__ = ["Maps", "output_layouts"]


@dataclasses.dataclass(frozen=True)
class Maps:
    #: the residual stream (embedding rows, every linear reading or writing the stream)
    stream: lm.StreamMap
    #: a norm's output (pre-norm branches and heads read it)
    norm_out: lm.StreamMap
    #: an encoder's output that a decoder's cross-attention reads: the encoder's final norm
    #: output (pre-norm), or its stream (Post-LN, integer widths)
    memory: lm.StreamMap
    ffn: lm.UnitMap
    q: lm.UnitMap
    kv: lm.UnitMap

    @classmethod
    def of(cls, plan, layout: str) -> "Maps":
        """The maps of ``plan`` for a model of ``layout`` (pre-norm | post-norm)."""
        s, t = plan.source, plan.target
        stream = lm.StreamMap(s["hidden"], t["hidden"], plan.stream_form)
        norm_out = lm.norm_output_map(stream)
        try:
            q, kv = lm.gqa_maps(s["heads"], s["kv_heads"], t["heads"], t["kv_heads"],
                                s["head_dim"])
        except ValueError as e:
            raise PlanError(str(e)) from None
        return cls(stream=stream, norm_out=norm_out,
                   memory=norm_out if layout == "pre-norm" else stream,
                   ffn=lm.UnitMap(s["ffn"], t["ffn"], 1), q=q, kv=kv)

    def kv_index(self) -> list[int] | None:
        """The source KV head of each new KV head, where the KV heads grow (a decoder's cache
        is fed and compared through it); None where they keep their number."""
        kv = self.kv
        return [int(i) for i in kv.unit_src] if kv.N_units != kv.n_units else None


def output_layouts(rec, desc, maps: Maps) -> dict:
    """Each hidden-size output's layout (source index per coordinate, -1 a zero slot): a final
    norm's output is in the norm output's form, the stream in the stream's.  An encoder's
    output is what its decoder's cross-attention reads (``Maps.memory``).  ``rec``: the index
    of the source graph ``desc`` describes."""
    final = rec.values[desc.final_norm.output] if desc.final_norm else None
    out = {}
    for o in desc.outputs:
        if o["kind"] == "hidden":
            v = back_view(rec.values[o["name"]])
            m = maps.norm_out if final is not None and v is back_view(final) else maps.stream
            out[o["name"]] = [int(i) for i in m.src_index]
    return out

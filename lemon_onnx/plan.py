"""The expansion plan: target sizes, stream form, seed; validated against LEMON's rules.

A plan is plain data (JSON-serialisable) and is stored in the expanded model's
``metadata_props["lemon.plan"]`` so that ``verify`` knows how to compare without flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

from .errors import PlanError

PLAN_KEY = "lemon.plan"


@dataclasses.dataclass
class Plan:
    source: dict
    target: dict
    stream_form: str  # copies | avg | zero
    seed: int
    source_sha256: str = ""
    outputs: dict = dataclasses.field(default_factory=dict)  # name -> {"compare": ...}
    blocks: dict = dataclasses.field(default_factory=dict)  # "src index" -> target index
    depth_placement: str | None = None
    depth_init: str | None = None
    exact: bool = True
    #: constants the expansion had to round in the storage dtype (fractional widths: norm
    #: scales sqrt(k*d/D), avg means); empty when the expansion is exact as stored
    rounded: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})

    @property
    def widens(self) -> bool:
        return any(self.target[k] != self.source[k] for k in ("hidden", "ffn", "heads"))


def _fmt(x: float) -> str:
    return f"{x:g}"


def _scaled(n: int, factor: float, what: str) -> int:
    v = Fraction(n) * Fraction(factor).limit_denominator(10_000)
    if v.denominator != 1:
        raise PlanError(
            f"--width {_fmt(factor)} gives a fractional {what} ({n} x {_fmt(factor)} = {float(v):g}).",
            hint=f"Choose a factor that makes {what} an integer, or give explicit sizes "
                 f"(--hidden/--ffn/--heads).")
    return int(v)


def _nearest_multiples(n: int, m: int) -> str:
    """Integer expansions of m near n (at least 2x): the valid sizes to suggest."""
    lo = max(2 * m, (n // m) * m)
    hi = max(2 * m, -(-n // m) * m)
    cands = sorted({lo, hi, hi + m} - {n})
    return " or ".join(str(c) for c in cands[:2])


def make_plan(desc, *, width: float | None = None, hidden: int | None = None,
              ffn: int | None = None, heads: int | None = None, layers: int | None = None,
              depth: float | None = None, seed: int = 0, placement: str = "interleave",
              depth_init: str = "cancel") -> Plan:
    """Target sizes from factors or explicit sizes, refused with the nearest valid choices."""
    d, f, h, kv, hd = desc.hidden, desc.ffn, desc.heads, desc.kv_heads, desc.head_dim
    L = desc.num_layers
    if width is not None:
        if width < 1:
            raise PlanError(f"--width {_fmt(width)} would shrink the model; lossless expansion "
                            "only grows it.", hint="Use a factor of 1 or more.")
        if hidden is not None or ffn is not None or heads is not None:
            raise PlanError("--width cannot be combined with --hidden/--ffn/--heads.",
                            hint="Give either a factor or explicit sizes.")
        heads_t = h * width
        if abs(heads_t - round(heads_t)) > 1e-9:
            lo, hi = math.floor(heads_t), math.ceil(heads_t)
            raise PlanError(
                f"--width {_fmt(width)} gives {heads_t:g} attention heads ({h} x {_fmt(width)}); "
                "head counts must be whole numbers (head_dim stays {hd}).".replace("{hd}", str(hd)),
                hint=f"Nearest valid widths: {_fmt(lo / h)} ({lo} heads) or {_fmt(hi / h)} "
                     f"({hi} heads).")
        hidden = _scaled(d, width, "hidden size")
        ffn = _scaled(f, width, "FFN size")
        heads = int(round(heads_t))
    if hidden is None and heads is not None and d == h * hd:
        hidden = heads * hd  # --heads alone: the attention width is the hidden size here
    hidden = d if hidden is None else int(hidden)
    if heads is None:
        if d == h * hd and hidden % hd:
            lo = max(d, hidden // hd * hd)
            raise PlanError(f"--hidden {hidden} is not a multiple of head_dim {hd}, so it does "
                            "not give a whole number of heads.",
                            hint=f"Nearest valid hidden sizes: {lo} or {lo + hd}.")
        heads = h * hidden // d if (hidden * h) % d == 0 else None
        if heads is None:
            raise PlanError(f"--hidden {hidden} does not give a whole number of heads at "
                            f"head_dim {hd}.", hint="Also pass --heads N.")
    if ffn is None:
        ffn = f * hidden // d if (f * hidden) % d == 0 else None
        if ffn is None:
            raise PlanError(f"--hidden {hidden} does not scale the FFN size {f} to an integer.",
                            hint="Also pass --ffn N.")
    for name, new, old in (("hidden", hidden, d), ("ffn", ffn, f), ("heads", heads, h)):
        if new < old:
            raise PlanError(f"--{name} {new} is smaller than the model's {old}; lossless "
                            "expansion only grows a model.", hint=f"Use {old} or more.")
    # attention width follows the heads; if hidden == heads*head_dim originally, keep it so
    if d == h * hd and hidden != heads * hd:
        raise PlanError(
            f"hidden {hidden} and {heads} heads of head_dim {hd} disagree: this model has "
            f"hidden = heads x head_dim ({d} = {h} x {hd}).",
            hint=f"Use --heads {hidden // hd if hidden % hd == 0 else '?'} or a hidden size that "
                 f"is a multiple of {hd}.")
    # GQA: the group size (query heads per KV head) stays; leftover heads come in whole groups
    g = h // kv
    if heads % g:
        lo = (heads // g) * g
        raise PlanError(
            f"{heads} query heads cannot keep this model's grouped-query attention: each KV "
            f"head serves {g} query heads, so the head count must be a multiple of {g}.",
            hint=f"Nearest valid head counts: {lo} or {lo + g} (hidden {lo * hd} or "
                 f"{(lo + g) * hd}).")
    kv_t = heads // g
    # the residual stream's form
    integer = hidden % d == 0
    post = desc.layout == "post-norm" or desc.embeddings.norm is not None
    if post and not integer:
        why = ("a Post-LN model" if desc.layout == "post-norm"
               else "a LayerNorm on the embeddings")
        raise PlanError(
            f"hidden {hidden} is not a whole multiple of {d}: with {why} the residual stream "
            "is a LayerNorm output and no stream layout keeps a fractional expansion exact.",
            hint=f"Use an integer width factor: hidden {_nearest_multiples(hidden, d)}.")
    if integer:
        form = "copies"
    elif desc.norm_type == "rmsnorm":
        form = "zero"
    else:
        form = "avg"
    # depth
    if depth is not None:
        if layers is not None:
            raise PlanError("--depth cannot be combined with --layers.", hint="Give one of them.")
        if depth < 1:
            raise PlanError(f"--depth {_fmt(depth)} would remove blocks.", hint="Use 1 or more.")
        lt = L * depth
        if abs(lt - round(lt)) > 1e-9:
            raise PlanError(f"--depth {_fmt(depth)} gives {lt:g} layers from {L}.",
                            hint=f"Nearest: --layers {math.floor(lt)} or {math.ceil(lt)}.")
        layers = int(round(lt))
    layers = L if layers is None else int(layers)
    if layers < L:
        raise PlanError(f"--layers {layers} is fewer than the model's {L}.", hint=f"Use {L} or more.")
    src = dict(hidden=d, ffn=f, heads=h, kv_heads=kv, head_dim=hd, layers=L, vocab=desc.vocab)
    tgt = dict(hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_t, head_dim=hd, layers=layers,
               vocab=desc.vocab)
    return Plan(source=src, target=tgt, stream_form=form, seed=int(seed),
                depth_placement=placement if layers > L else None,
                depth_init=depth_init if layers > L else None)

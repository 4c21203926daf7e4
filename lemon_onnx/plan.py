"""The expansion plan: target sizes, stream form, seed; validated against LEMON's rules.

A plan is plain data (JSON-serialisable) and is stored in the expanded model's
``metadata_props["lemon.plan"]`` so that ``verify`` knows how to compare without flags.
Expanding an expanded model records the chain (``chained``): ``source``, ``outputs`` and
``blocks`` stay relative to the original model, so ``verify ORIGINAL FINAL`` needs no flags.

Refusals name only choices the planner accepts: the advice is computed by planning nearby
candidates (``_advice``), never by arithmetic that could disagree with the rules.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from fractions import Fraction

from .errors import PlanError

PLAN_KEY = "lemon.plan"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Immutable once made: the steps after planning return a new plan (``amended``) with
    what they add (the passes' notes and maps, a chain's composition)."""

    source: dict
    target: dict
    stream_form: str  # copies | avg | zero
    seed: int
    #: scale of the symmetry-breaking noise, relative (lemon_math's module docstring)
    noise_scale: float = 0.5  # lemon_math.NOISE_SCALE
    source_sha256: str = ""
    outputs: dict = dataclasses.field(default_factory=dict)  # name -> {"compare": ...}
    #: expanded-model input name -> how to feed it from the source's inputs (a KV cache:
    #: {"from": source input, "axis": k, "index": [...], "zeros": bool}); absent: same name
    inputs: dict = dataclasses.field(default_factory=dict)
    blocks: dict = dataclasses.field(default_factory=dict)  # "src index" -> target index
    #: for each layer of the expanded model, in order, the source block it was made from (a
    #: twin names its source); relative to the original model in a chain; empty when unknown
    #: (a chain whose earlier plan predates this field)
    layer_sources: list = dataclasses.field(default_factory=list)
    depth_placement: str | None = None
    depth_init: str | None = None
    exact: bool = True
    #: constants the expansion had to round in the storage dtype (fractional widths: norm
    #: scales sqrt(k*d/D), avg means); empty when the expansion is exact as stored
    rounded: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    # the plans recorded in the earlier models of a chain of expansions, oldest first (each
    # relative to the original model, without its own chain); empty for a first expansion
    chain: list = dataclasses.field(default_factory=list)
    version: int = 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def amended(self, **changes) -> "Plan":
        """A copy with ``changes`` (fields by name)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})

    @property
    def widens(self) -> bool:
        return any(self.target[k] != self.source[k] for k in ("hidden", "ffn", "heads"))

    @property
    def step_source(self) -> dict:
        """The sizes of this step's input: the source, or the previous model of a chain."""
        return self.chain[-1]["target"] if self.chain else self.source


def _fmt(x: float) -> str:
    return f"{x:g}"


SIZE_FLAGS = ("width", "hidden", "ffn", "heads")
DEPTH_FLAGS = ("depth", "layers")
_EXCLUSIVE = {"width": ("hidden", "ffn", "heads"), "hidden": ("width",), "ffn": ("width",),
              "heads": ("width",), "depth": ("layers",), "layers": ("depth",)}


class _Refusal(PlanError):
    """The raw planner's refusal; ``vary``: the flags whose nearby values the advice tries."""

    def __init__(self, message: str, *, vary: tuple = (), hint: str | None = None):
        super().__init__(message, hint=hint)
        self.vary = vary


def _asked(req: dict, *names: str) -> str:
    """The user's own flags, as typed: the subject of every refusal."""
    return " ".join(f"--{k} {_fmt(v)}" for k, v in req.items()
                    if v is not None and (not names or k in names))


def make_plan(desc, *, width: float | None = None, hidden: int | None = None,
              ffn: int | None = None, heads: int | None = None, layers: int | None = None,
              depth: float | None = None, seed: int = 0, placement: str = "interleave",
              depth_init: str = "cancel", noise_scale: float | None = None) -> Plan:
    """Target sizes from factors or explicit sizes; a refusal names the nearest choices that
    the planner accepts."""
    req = {"width": width, "hidden": hidden, "ffn": ffn, "heads": heads, "depth": depth,
           "layers": layers}
    if noise_scale is not None and not (0 <= noise_scale <= 10):
        raise PlanError(f"--noise-scale {_fmt(noise_scale)} is outside [0, 10].",
                        hint="Give a relative scale such as 0.5 (the default) or 0 for none.")
    try:
        tgt, form = _targets(desc, req)
    except _Refusal as r:
        raise PlanError(r.message, hint=_advice(desc, req, r)) from None
    src = dict(hidden=desc.hidden, ffn=desc.ffn, heads=desc.heads, kv_heads=desc.kv_heads,
               head_dim=desc.head_dim, layers=desc.num_layers, vocab=desc.vocab)
    deeper = tgt["layers"] > desc.num_layers
    from .lemon_math import NOISE_SCALE

    return Plan(source=src, target=tgt, stream_form=form, seed=int(seed),
                noise_scale=float(NOISE_SCALE if noise_scale is None else noise_scale),
                depth_placement=placement if deeper else None,
                depth_init=depth_init if deeper else None)


def _targets(desc, req: dict) -> tuple[dict, str]:
    """The raw planner: (target sizes, stream form), or a ``_Refusal``."""
    d, f, h, kv, hd = desc.hidden, desc.ffn, desc.heads, desc.kv_heads, desc.head_dim
    L = desc.num_layers
    width, hidden, ffn, heads = req["width"], req["hidden"], req["ffn"], req["heads"]
    if width is not None:
        if hidden is not None or ffn is not None or heads is not None:
            raise _Refusal("--width cannot be combined with --hidden/--ffn/--heads.",
                           hint="Give either a factor or explicit sizes.")
        if width < 1:
            raise _Refusal(f"--width {_fmt(width)} would shrink the model; lossless expansion "
                           "only grows it.", vary=("width",))
        heads_t = h * width
        if abs(heads_t - round(heads_t)) > 1e-9:
            raise _Refusal(f"--width {_fmt(width)} gives {heads_t:g} attention heads ({h} x "
                           f"{_fmt(width)}); head counts must be whole numbers (head_dim stays "
                           f"{hd}).", vary=("width", "heads"))
        hidden = _scaled(d, width, "hidden size")
        ffn = _scaled(f, width, "FFN size")
        heads = int(round(heads_t))
    else:
        for name, new, old in (("hidden", hidden, d), ("ffn", ffn, f), ("heads", heads, h)):
            if new is not None and new < old:
                raise _Refusal(f"--{name} {new} is smaller than the model's {old}; lossless "
                               "expansion only grows a model.", vary=(name,))
    if hidden is None and heads is not None and d == h * hd:
        hidden = heads * hd  # --heads alone: the attention width is the hidden size here
    hidden = d if hidden is None else int(hidden)
    if heads is None:
        if d == h * hd and hidden % hd:
            raise _Refusal(f"{_asked(req, 'hidden')}: {hidden} is not a multiple of head_dim "
                           f"{hd}, so it does not give a whole number of heads.",
                           vary=("hidden",))
        heads = h * hidden // d if (hidden * h) % d == 0 else None
        if heads is None:
            raise _Refusal(f"{_asked(req, 'hidden')} does not give a whole number of heads at "
                           f"head_dim {hd}.", vary=("hidden", "heads"))
    if ffn is None:
        ffn = f * hidden // d if (f * hidden) % d == 0 else None
        if ffn is None:
            raise _Refusal(f"{_asked(req, *SIZE_FLAGS)} gives hidden {hidden}, which does not "
                           f"scale the FFN size {f} to an integer.", vary=("hidden", "ffn"))
    # attention width follows the heads; if hidden == heads*head_dim originally, keep it so
    if d == h * hd and hidden != heads * hd:
        raise _Refusal(f"{_asked(req, *SIZE_FLAGS)}: hidden {hidden} and {heads} heads of "
                       f"head_dim {hd} disagree; this model has hidden = heads x head_dim "
                       f"({d} = {h} x {hd}).", vary=("heads", "hidden"))
    # GQA: the group size (query heads per KV head) stays; leftover heads come in whole groups.
    # MQA (one KV head) stays MQA: every new query head reads the one KV head.
    g = heads if kv == 1 else h // kv
    if heads % g:
        raise _Refusal(f"{_asked(req, *SIZE_FLAGS)} gives {heads} query heads, which cannot "
                       f"keep this model's grouped-query attention: each KV head serves {g} "
                       f"query heads, so the head count must be a multiple of {g}.",
                       vary=_given(req, ("heads", "width", "hidden")))
    # the residual stream's form
    integer = hidden % d == 0
    post = desc.layout == "post-norm" or desc.embeddings.norm is not None or \
        desc.embeddings.token_norm is not None
    if post and not integer:
        why = ("a Post-LN model" if desc.layout == "post-norm"
               else "a LayerNorm on the embeddings")
        raise _Refusal(f"{_asked(req, *SIZE_FLAGS)} gives hidden {hidden}, not a whole "
                       f"multiple of {d}: with {why} the residual stream is a LayerNorm output "
                       "and no stream layout keeps a fractional expansion exact.",
                       vary=_given(req, SIZE_FLAGS))
    form = "copies" if integer else ("zero" if desc.norm_type == "rmsnorm" else "avg")
    layers = _layers(L, req)
    tgt = dict(hidden=hidden, ffn=ffn, heads=heads, kv_heads=heads // g, head_dim=hd,
               layers=layers, vocab=desc.vocab)
    return tgt, form


def _given(req: dict, flags: tuple) -> tuple:
    return tuple(k for k in flags if req[k] is not None) or flags[:1]


def _layers(L: int, req: dict) -> int:
    depth, layers = req["depth"], req["layers"]
    if depth is not None:
        if layers is not None:
            raise _Refusal("--depth cannot be combined with --layers.", hint="Give one of them.")
        if depth < 1:
            raise _Refusal(f"--depth {_fmt(depth)} would remove blocks.", vary=("depth",))
        lt = L * depth
        if abs(lt - round(lt)) > 1e-9:
            raise _Refusal(f"--depth {_fmt(depth)} gives {lt:g} layers from {L}.",
                           vary=("depth", "layers"))
        return int(round(lt))
    layers = L if layers is None else int(layers)
    if layers < L:
        raise _Refusal(f"--layers {layers} is fewer than the model's {L}.", vary=("layers",))
    return layers


def _scaled(n: int, factor: float, what: str) -> int:
    v = Fraction(n) * Fraction(factor).limit_denominator(10_000)
    if v.denominator != 1:
        raise _Refusal(f"--width {_fmt(factor)} gives a fractional {what} ({n} x "
                       f"{_fmt(factor)} = {float(v):g}).", vary=("width", "heads"))
    return int(v)


# --------------------------------------------------------------------------- advice
def _candidates(desc, flag: str, asked: float) -> list:
    """Growing values of ``flag`` to try, as the user would type them (printed factors are
    parsed back, so a suggestion is exactly what the planner was given)."""
    base = {"width": desc.heads, "hidden": desc.hidden, "ffn": desc.ffn, "heads": desc.heads,
            "depth": desc.num_layers, "layers": desc.num_layers}[flag]
    top = max(4 * base, math.ceil(2 * asked * (base if flag in ("width", "depth") else 1)))
    if flag in ("width", "depth"):  # factors: k/base for whole counts k, and whole factors
        return sorted({float(_fmt(k / base)) for k in range(base + 1, top + 1)}
                      | {float(k) for k in range(2, top // base + 1)})
    return list(range(base + 1, top + 1))


def _advice(desc, req: dict, refusal: _Refusal) -> str | None:
    """The nearest requests the planner accepts, varying each flag of ``refusal.vary``: up to
    two per flag (the nearest below and above the asked value, else the two nearest)."""
    groups = []
    for flag in refusal.vary:
        asked = _equivalent(desc, req, flag)
        group = SIZE_FLAGS if flag in SIZE_FLAGS else DEPTH_FLAGS  # the other group is
        others = [k for k in group if req[k] is not None and k != flag  # planned apart
                  and k not in _EXCLUSIVE[flag]]
        ok: list = []
        for n in range(len(others), -1, -1):  # keep as many of the user's flags as possible
            for keep in itertools.combinations(others, n):
                trial = {**dict.fromkeys(req), **{k: req[k] for k in keep}}
                ok = _accepted(desc, trial, flag, _candidates(desc, flag, asked))
                if ok:
                    break
            if ok:
                break
        if not ok:
            continue
        dropped = sorted(set(others) - set(keep))
        below = [x for x in ok if x[0] < asked][-1:]
        above = [x for x in ok if x[0] > asked][:2 - len(below)]
        picks = below + above if below + above else ok[-2:]
        groups.append(" or ".join(_describe_choice(desc, flag, c, tgt, dropped)
                                  for c, tgt in picks))
    if not groups:
        return refusal.hint
    return "Nearest accepted: " + "; or ".join(groups) + "."


def _accepted(desc, trial: dict, flag: str, values: list) -> list:
    ok = []
    for v in values:
        try:
            ok.append((v, _targets(desc, {**trial, flag: v})[0]))
        except _Refusal:
            continue
    return ok


def _equivalent(desc, req: dict, flag: str) -> float:
    """The asked value of ``flag``, or what the user's other flags amount to in its terms
    (``--width 1.3`` asks for 10.4 heads of 8)."""
    if req[flag] is not None:
        return req[flag]
    size = {"width": 1, "hidden": desc.hidden, "ffn": desc.ffn, "heads": desc.heads}
    if flag in size:
        for k in SIZE_FLAGS:
            if req[k] is not None:
                return req[k] / size[k] * size[flag]
        return size[flag]
    L = desc.num_layers
    return req["depth"] * L if flag == "layers" and req["depth"] is not None else \
        (req["layers"] / L if req["layers"] is not None else 1)


def _describe_choice(desc, flag: str, value, tgt: dict, dropped: list) -> str:
    text = f"--{flag} {_fmt(value)}"
    if dropped:
        text += " without " + "/".join(f"--{k}" for k in dropped)
    if flag in DEPTH_FLAGS:
        return text if flag == "layers" else f"{text} ({tgt['layers']} layers)"
    gives = [f"hidden {tgt['hidden']}" if flag != "hidden" else None,
             f"ffn {tgt['ffn']}" if flag != "ffn" else None,
             f"{tgt['heads']} heads" if flag != "heads" else None]
    return f"{text} ({', '.join(g for g in gives if g)})"


# --------------------------------------------------------------------------- chains
def chained(previous: dict | None, step: Plan) -> Plan:
    """The plan to record when the source was itself expanded by lemon-onnx: ``step`` with
    ``source``, ``source_sha256``, ``outputs`` and ``blocks`` composed relative to the
    original model and the earlier plans kept in ``chain``.

    A previous plan whose target sizes are not the source's own (the model was changed after
    its expansion) cannot be composed: the step starts a new chain, with a note."""
    if not previous:
        return step
    here = {k: step.source[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers")}
    before = {k: (previous.get("target") or {}).get(k) for k in here}
    if here != before or not isinstance(previous.get("blocks"), dict):
        return step.amended(notes=step.notes + [
            f"The source carries a lemon.plan for sizes {before}, but it has {here}: it was "
            "changed after that expansion, so this plan starts a new chain (verify against "
            "this source, not the earlier one)."])
    before = previous.get("layer_sources") or []
    prev_out = previous.get("outputs") or {}
    outputs = {}
    for name in prev_out or step.outputs:  # the original model's outputs
        first = prev_out.get(name) or {"compare": "whole"}
        middle = first.get("name", name)
        outputs[name] = _compose_map(first, step.outputs.get(middle))
    prev_in = previous.get("inputs") or {}
    inputs = {}
    for name in list(step.inputs) + [n for n in prev_in if n not in step.inputs]:
        second = step.inputs.get(name) or {"from": name}
        first = prev_in.get(second["from"]) or {"from": second["from"]}
        inputs[name] = _compose_feed(first, second)
    return step.amended(
        notes=list(step.notes), source=dict(previous["source"]),
        source_sha256=previous.get("source_sha256", ""),
        exact=bool(previous.get("exact", True)) and step.exact,
        rounded=list(dict.fromkeys(list(previous.get("rounded") or []) + step.rounded)),
        chain=list(previous.get("chain") or []) + [
            {k: v for k, v in previous.items() if k != "chain"}],
        blocks={i: step.blocks[str(j)] for i, j in previous["blocks"].items()
                if str(j) in step.blocks},
        layer_sources=([before[j] for j in step.layer_sources]
                       if before and all(j < len(before) for j in step.layer_sources) else []),
        outputs=outputs, inputs=inputs)


def _compose_map(first: dict, second: dict | None) -> dict:
    """Original -> middle -> final output maps: the original coordinates stay first at every
    step, so a prefix of a prefix is the shorter prefix; KV heads taken twice are taken by
    the composed index; a renamed output keeps its last name."""
    second = second or {"compare": "whole"}
    kind1, kind2 = first.get("compare", "whole"), second.get("compare", "whole")
    if kind1 == "prefix":
        if kind2 == "prefix" and second.get("axis", -1) != first.get("axis", -1):
            raise PlanError(f"cannot compose output maps {first} and {second} (different axes)")
        out = {k: v for k, v in first.items() if k != "name"}
        if "layout" in first and "layout" in second:  # the final coordinates' sources
            out["layout"] = _compose_take({"index": first["layout"]},
                                          {"index": second["layout"]})["index"]
    elif kind1 == "take" or kind2 == "take":
        out = {"compare": "take", **_compose_take(first, second)}
    else:
        out = {k: v for k, v in second.items() if k != "name"}
    if "name" in second or "name" in first:
        out["name"] = second.get("name", first.get("name"))
    return out


def _compose_take(first: dict, second: dict) -> dict:
    """Indices along one axis, original -> middle (``first``) then middle -> final
    (``second``): final[j] = middle[i2[j]] = original[i1[i2[j]]]."""
    i1, i2 = first.get("index"), second.get("index")
    axis = first.get("axis", second.get("axis"))
    if i1 is not None and i2 is not None and first.get("axis") != second.get("axis"):
        raise PlanError(f"cannot compose maps {first} and {second} (different axes)")
    # -1: a zero slot (a stream's leftover in the zero form) stays one
    index = ([i1[j] if j >= 0 else -1 for j in i2] if i1 is not None and i2 is not None
             else (i2 if i1 is None else i1))
    return {"axis": axis, "index": list(index)} if index is not None else {}


def _compose_feed(first: dict, second: dict) -> dict:
    """Input maps (``plan.inputs``), original -> middle -> final: the final input comes from
    the original input the middle one came from, taken by both maps, zero if either is."""
    out = {"from": first["from"], **_compose_take(first, second)}
    for flag in ("zeros", "memory"):
        if first.get(flag) or second.get(flag):
            out[flag] = True
    return out

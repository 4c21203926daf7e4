"""Cached decoding: a decoder with a KV cache is checked the way it is used (README, "verify",
the verification standard).

The prefix is the first input case (an empty cache: past length 0, unless the user's inputs
hold one); then ``STEPS`` steps of one new token each, every step fed the cache the model
itself returned at the step before: the source its own, the expanded model its own, each in
its dtype and, for the float64 level, in float64.  The attention mask grows by one attended
token per step and the position ids are derived from it (``inputs.positions_from_mask``); the
new token ids are drawn within the vocabulary, the same for both models.  Every step's
outputs (the logits, and each source cache against its layer's in the expanded model through
the KV-head map, ``plan["outputs"]``) are compared by the same two-level rule as the plain
runs and reported step by step.

Which output returns which cache input is read from each model's own graph
(``components/cache.find_joins``: the Concat that appends the new tokens; a fused op that
appends them itself, ``fusion.fused_joins``), never from names.
An expanded model that does not return a cache it takes, or cannot take back what it
returned, fails the step (exit 1): its cache is broken.  When the source itself cannot run
its own cache, the check is reported as not run, with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import RuntimeFailure
from . import compare as cmp
from .inputs import positions_from_mask
from ..errors import one_line

#: decoding steps after the prefix (the standard asks for at least two)
STEPS = 3

__all__ = ["STEPS", "Chain", "chains", "check", "fixed_inputs", "lengths", "returns_of"]


@dataclasses.dataclass
class Chain:
    """One model's decoding: the inputs each step adds (token ids, mask, positions) and which
    output returns the cache each cache input takes."""

    steps: list  # [{input name: array}] for steps 1..n (the cache inputs excluded)
    returns: dict  # cache input name -> the output that returns it
    takes: list  # every input the model feeds from its own outputs
    #: inputs fed at every step as the prefix had them: an encoder-decoder's encoder side
    #: (its output, its cache, its attention mask), which decoding does not change
    fixed: dict = dataclasses.field(default_factory=dict)

    def run(self, run_fn, first: dict, widen: bool = False) -> tuple[list, str | None]:
        """Steps 1..n after the prefix whose outputs are ``first`` (``run_fn(feeds) ->
        {output: array}``): (outputs per step, why the chain stopped or None)."""
        outs, prev = [], first
        for k, new in enumerate(self.steps, start=1):
            lost = [n for n in self.takes if self.returns.get(n) not in prev]
            if lost:
                return outs, (f"step {k}: no output of the model returns the cache its "
                              f"input(s) {', '.join(lost[:4])}{' ...' if len(lost) > 4 else ''} "
                              "take (the Concat that appends the new tokens' keys or values, "
                              "then only a Cast or Identity), so it cannot go on decoding from "
                              "its own cache")
            feeds = {**self.fixed, **new}
            for name in self.takes:
                feeds[name] = prev[self.returns[name]]
            if widen:
                feeds = {n: (a.astype(np.float64) if np.asarray(a).dtype.kind == "f" else a)
                         for n, a in feeds.items()}
            try:
                prev = run_fn(feeds)
            except RuntimeFailure as exc:
                return outs, (f"step {k}: the model cannot run on the cache it returned "
                              f"({one_line(exc.message, 300)})")
            outs.append(prev)
        return outs, None


def _graph_inputs(ir_model) -> list:
    inits = set(ir_model.graph.initializers)
    return [v.name for v in ir_model.graph.inputs if v.name not in inits]


def returns_of(ir_model) -> dict:
    """{cache input: the output that returns it}, from the graph's structure."""
    from ..components.cache import find_joins
    from ..fusion import fused_joins

    joins = {v.name: out.name for v, _cat, out, _nodes in find_joins(ir_model.graph)}
    return {**joins, **{v.name: out.name for v, out in fused_joins(ir_model.graph)}}


def chains(small_ir, big_ir, prefix: dict, roles: dict, vocab: int | None, seed: int,
           steps: int = STEPS, fixed: tuple = (), big_prefix: dict | None = None,
           plan: dict | None = None):
    """(small chain, big chain, None), or (None, None, why the check does not apply).
    ``fixed``: the source's inputs that keep their prefix values at every step (``fixed_inputs``);
    the expanded model's are the inputs the plan feeds from them, from ``big_prefix``."""
    small_returns = returns_of(small_ir)
    if not small_returns:
        return None, None, None  # no KV cache: nothing to decode with
    fixed = set(fixed)
    ids = [n for n, r in roles.items() if r == "ids"]
    masks = [n for n, r in roles.items() if r == "mask" and n not in fixed]
    positions = [n for n, r in roles.items() if r == "position"]
    per_step = set(ids) | set(masks) | set(positions)
    others = [n for n in _graph_inputs(small_ir)
              if n not in per_step and n not in small_returns and n not in fixed]
    if len(ids) != 1 or len(masks) > 1 or others:
        why = (f"the inputs {', '.join(others)} have no rule for a decoding step" if others else
               "the token ids and the attention mask could not be told apart")
        return None, None, why
    ids_name, b = ids[0], np.asarray(prefix[ids[0]]).shape[0]
    rng = np.random.default_rng([int(seed), 17])
    mask = np.asarray(prefix[masks[0]]) if masks else None
    new_steps = []
    for _ in range(steps):
        feeds = {ids_name: rng.integers(0, vocab or 2, size=(b, 1)).astype(prefix[ids_name].dtype)}
        if mask is not None:
            mask = np.concatenate([mask, np.ones((b, 1), dtype=mask.dtype)], axis=-1)
            feeds[masks[0]] = mask
            for p in positions:
                feeds[p] = positions_from_mask(mask, 1).astype(np.asarray(prefix[p]).dtype)
        else:
            for p in positions:
                last = np.asarray(prefix[p])[:, -1:] + len(new_steps) + 1
                feeds[p] = last.astype(np.asarray(prefix[p]).dtype)
        new_steps.append(feeds)
    small = Chain(new_steps, small_returns, sorted(small_returns),
                  {n: prefix[n] for n in fixed if n in prefix})
    maps = (plan or {}).get("inputs") or {}
    big_fixed = {n for n in _graph_inputs(big_ir)
                 if (maps[n].get("from") if n in maps else n) in fixed}
    big_takes = [n for n in _graph_inputs(big_ir) if n not in per_step and n not in big_fixed]
    big = Chain(new_steps, returns_of(big_ir), big_takes,
                {n: (big_prefix or prefix)[n] for n in big_fixed if n in (big_prefix or prefix)})
    return small, big, None


def fixed_inputs(ir_model, desc, roles: dict) -> list:
    """The inputs decoding does not change, read from the structure: the memory that
    cross-attentions project (the encoder's output), the encoder cache they read instead
    (cache inputs no output returns), and an attention mask that reaches no self-attention's
    scores (it masks the encoder's tokens)."""
    from ..components.cross_attention import memory_inputs

    fixed = set(memory_inputs(desc))
    fixed |= {s.input for s in desc.caches if s.input and not s.concat}
    nodes = {n.name: n for n in ir_model.graph}
    selfs = set()
    for b in desc.blocks:
        score = nodes.get(b.attention.score_node)
        if score is not None:
            selfs |= _softmax_after(score)
    crossing = any(b.cross_attention is not None for b in desc.blocks)
    for name, role in roles.items():
        if crossing and role == "mask" and selfs and \
                not _reaches(_input(ir_model, name), selfs):
            fixed.add(name)
    return sorted(fixed)


def _input(ir_model, name: str):
    return next(v for v in ir_model.graph.inputs if v.name == name)


def _softmax_after(node, limit: int = 16) -> set:
    """The Softmax the scores of ``node`` flow into (through masks, casts, scales)."""
    frontier, seen = [node], set()
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for o in n.outputs:
                for c in o.consumers():
                    if c.op_type == "Softmax":
                        return {c}
                    if id(c) not in seen:
                        seen.add(id(c))
                        nxt.append(c)
        frontier = nxt
    return set()


def _reaches(v, targets: set) -> bool:
    """Whether the values of ``v`` reach one of the Softmax nodes ``targets`` as a term of
    its scores: not through another Softmax (a mask of the encoder's tokens reaches every
    later layer through the cross-attention's output), and not through its shape alone
    (Shape, Size: the batch size is read off any input)."""
    stack, seen = list(v.consumers()), set()
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if id(n) in seen or n.op_type in ("Shape", "Size", "Softmax"):
            continue
        seen.add(id(n))
        for o in n.outputs:
            stack.extend(o.consumers())
    return False


def lengths(prefix: dict, roles: dict, steps: int) -> list:
    """(tokens the step adds, tokens attended in all) per step, 0 the prefix; the total is
    the mask's length (None without a mask)."""
    ids = next((n for n, r in roles.items() if r == "ids"), None)
    mask = next((n for n, r in roles.items() if r == "mask"), None)
    s = int(np.shape(prefix[ids])[-1]) if ids in prefix else None
    total = int(np.shape(prefix[mask])[-1]) if mask in prefix else None
    return [(s if k == 0 else 1, None if total is None else total + k) for k in range(steps + 1)]


def check(small_runs: list, big_runs: list, small64: list | None, big64: list | None,
          outputs: list, out_maps: dict, rule: cmp.Rule, sizes: list,
          why_big: str | None) -> list:
    """One entry per step (0: the prefix): {"step", "tokens", "attended", "outputs":
    [OutputReport]} by the two-level rule; a step the expanded model did not reach fails
    with ``why_big``."""
    steps = []
    for k, ref in enumerate(small_runs):
        got = big_runs[k] if k < len(big_runs) else None
        tokens, attended = sizes[k] if k < len(sizes) else (None, None)
        entry = {"step": k, "tokens": tokens, "attended": attended, "outputs": []}
        if got is None:
            for name in outputs:
                entry["outputs"].append(cmp.not_compared(
                    name, list(np.shape(ref[name])), None,
                    why_big or "the expanded model stopped decoding", caught_by="cache"))
        else:
            for name in outputs:
                m = out_maps.get(name)
                entry["outputs"].append(cmp.compare_output(
                    name, ref[name], got.get(cmp.big_name(name, m)), m, rule,
                    small64=small64[k].get(name) if small64 and k < len(small64) else None,
                    big64=(big64[k].get(cmp.big_name(name, m))
                           if big64 and k < len(big64) else None)))
        steps.append(entry)
    return steps

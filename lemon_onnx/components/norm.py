"""Component: normalisation layers.

match: LayerNormalization / RMSNormalization (and ONNX Runtime's SimplifiedLayerNormalization)
ops, or their decomposed forms (ReduceMean, Sub, Pow or Mul, Add(eps), Sqrt, Div or Reciprocal,
Mul(gamma), Add(beta)), with or without gamma/beta.
widen: gamma/beta/epsilon for an input laid out by a stream map (lemon_math.expand_norm); a
norm feeding a tied head gets its k copies split exactly.
twin: LEMON's Post-LN recipe (the previous block's last norm becomes the identity affine and
its gamma/beta move to the twin's last norm; the twin's first norm is the identity affine).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .. import lemon_math as lm
from ..errors import PlanError
from ..graph import back_pass, const_array, const_source, is_const, nm, scalar_const, skip_pass
from ..tensors import read_array, write_array

#: the op forms, and the kind each computes
#: (the com.microsoft Skip forms are unfused into an Add and one of these: lemon_onnx/fusion)
NORM_OPS = {"LayerNormalization": "layernorm", "RMSNormalization": "rmsnorm",
            "SimplifiedLayerNormalization": "rmsnorm"}


@dataclasses.dataclass
class Norm:
    kind: str  # layernorm | rmsnorm
    form: str  # op | decomposed
    input: str
    output: str
    gamma: str | None
    beta: str | None
    epsilon: float
    epsilon_at: list  # ["attr", node, "epsilon"] or ["value", name] or ["node", name]
    nodes: list


def match_all(ctx) -> dict[ir.Value, Norm]:
    """Norms keyed by their output value."""
    norms: dict[ir.Value, Norm] = {}
    for n in ctx.graph:
        if n.op_type in NORM_OPS:
            kind = NORM_OPS[n.op_type]
            g = const_source(n.inputs[1])[0] if len(n.inputs) > 1 else None
            b = None
            if kind == "layernorm" and len(n.inputs) > 2 and n.inputs[2] is not None:
                b = const_source(n.inputs[2])[0]
            eps = n.attributes["epsilon"].value if "epsilon" in n.attributes else 1e-5
            norms[n.outputs[0]] = Norm(kind, "op", nm(n.inputs[0]),
                                       nm(n.outputs[0]), nm(g) or None, nm(b) or None,
                                       float(eps), ["attr", n.name, "epsilon"], [n.name])
        elif n.op_type == "Sqrt":
            got = match_decomposed(ctx, n)
            if got is not None:
                norms[ctx.graph_value(got.output)] = got
    return norms


def match_decomposed(ctx, sqrt: ir.Node) -> Norm | None:
    add = sqrt.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return None
    eps_v = [i for i in add.inputs if is_const(i)]
    var_v = [i for i in add.inputs if not is_const(i)]
    if len(eps_v) != 1 or len(var_v) != 1:
        return None
    eps = scalar_const(eps_v[0])
    rm = var_v[0].producer()
    if eps is None or rm is None or rm.op_type != "ReduceMean":
        return None
    pw = rm.inputs[0].producer()
    sq_in = None
    if pw is not None and pw.op_type == "Pow" and scalar_const(pw.inputs[1]) == 2.0:
        sq_in = pw.inputs[0]
    elif pw is not None and pw.op_type == "Mul" and pw.inputs[0] is pw.inputs[1]:
        sq_in = pw.inputs[0]
    if sq_in is None:
        return None
    nodes = [sqrt, add, rm, pw]
    centred = back_pass(sq_in)
    sub = centred.producer()
    kind = "rmsnorm"
    x = back_pass(sq_in)
    if sub is not None and sub.op_type == "Sub":
        mean = sub.inputs[1].producer()
        if mean is not None and mean.op_type == "ReduceMean" and \
                back_pass(mean.inputs[0]) is back_pass(sub.inputs[0]):
            kind = "layernorm"
            x = back_pass(sub.inputs[0])
            nodes += [sub, mean]
    # forward: normalised = centred / sqrt  or  x * (1 / sqrt) or x * Reciprocal(sqrt)
    y = None
    for c in sqrt.outputs[0].consumers():
        if c.op_type == "Div" and c.inputs[1] is sqrt.outputs[0]:
            if scalar_const(c.inputs[0]) == 1.0:
                y = _mul_with(c.outputs[0], centred if kind == "layernorm" else x, nodes + [c])
            else:
                y = c.outputs[0]
                nodes.append(c)
        elif c.op_type == "Reciprocal":
            y = _mul_with(c.outputs[0], centred if kind == "layernorm" else x, nodes + [c])
    if y is None:
        return None
    if isinstance(y, tuple):
        y, nodes = y
    # optional Cast, then Mul by gamma, then Add beta
    y = skip_pass(y)
    gamma = beta = None
    cons = y.consumers()
    if len(cons) == 1 and cons[0].op_type == "Mul":
        other = [i for i in cons[0].inputs if i is not y]
        arr = const_array(other[0]) if other else None
        if arr is not None and arr.ndim == 1:
            gamma = const_source(other[0])[0]
            nodes.append(cons[0])
            y = cons[0].outputs[0]
            cons = skip_pass(y).consumers()
    if kind == "layernorm" and len(cons) == 1 and cons[0].op_type == "Add":
        other = [i for i in cons[0].inputs if i is not y]
        arr = const_array(other[0]) if other else None
        if arr is not None and arr.ndim == 1:
            beta = const_source(other[0])[0]
            nodes.append(cons[0])
            y = cons[0].outputs[0]
    eps_src = const_source(eps_v[0])[0]
    p = eps_src.producer() if eps_src is not None else None
    where = ["node", p.name] if p is not None and p.op_type == "Constant" else ["value", nm(eps_src)]
    return Norm(kind, "decomposed", nm(x), nm(y), nm(gamma) or None, nm(beta) or None,
                float(eps), where, [n.name for n in nodes if n is not None])


def _mul_with(v: ir.Value, x: ir.Value, nodes: list):
    for c in v.consumers():
        if c.op_type == "Mul" and any(back_pass(i) is x for i in c.inputs if i is not v):
            return c.outputs[0], nodes + [c]
    return None


def widen(wp, nrm: Norm, in_map: lm.StreamMap, *, tag: str, tied: bool = False):
    """gamma/beta/epsilon of a norm whose input is laid out by ``in_map``.

    ``tied``: the norm feeds a tied head, whose k copies of every embedding row would make
    the logits k times too large.  LEMON scales gamma and beta by 1/k; here the k copies
    of gamma (and beta) are instead an exact random split of them (lemon_math's input-side
    rule on a vector), so the head's sum over the copies gives the source's logits exactly
    in the storage dtype for every k (1/k is not representable for k = 3, 5, ...)."""
    nodes = [wp.node(n) for n in nrm.nodes]
    rng = wp.ed.rng(tag, "gamma")
    kind = nrm.kind
    gamma0 = read_array(wp.values[nrm.gamma]) if nrm.gamma else np.ones(wp.d, np.float32)
    beta0 = read_array(wp.values[nrm.beta]) if nrm.beta else None
    try:
        g2, b2, eps2 = lm.expand_norm(gamma0, beta0, nrm.epsilon, in_map, rng=rng, kind=kind)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if tied and in_map.k > 1:
        g2 = _split_copies(wp, g2, in_map, wp.ed.rng(tag, "tie-gamma"))
        b2 = None if b2 is None else _split_copies(wp, b2, in_map,
                                                        wp.ed.rng(tag, "tie-beta"))
    if nrm.gamma:
        _edit_param(wp, nodes, nrm.gamma, f"{tag}:gamma", g2.astype(gamma0.dtype))
    elif tied or in_map.r:
        raise PlanError(f"norm {nrm.output} has no scale parameter to rescale")
    if nrm.beta:
        _edit_param(wp, nodes, nrm.beta, f"{tag}:beta", b2.astype(beta0.dtype))
    if eps2 != nrm.epsilon:
        set_epsilon(wp, nrm, eps2)


def _split_copies(wp, v: np.ndarray, in_map: lm.StreamMap, rng) -> np.ndarray:
    """The k tiled copies ``v[:k*d]`` of a norm parameter replaced by an exact split of one
    copy (the parts of each coordinate sum to it), leftover slots kept."""
    d, k = in_map.d, in_map.k
    parts = lm.expand_in(v[:d].reshape(d, 1), 0, lm.StreamMap(d, k * d, "copies"),
                         rng=rng, noise_scale=wp.plan.noise_scale)
    out = v.copy()
    out[:k * d] = parts[:, 0]
    return out


def _edit_param(wp, nodes, name, key, new):
    v = wp.values[name]
    for n in nodes:
        for i, x in enumerate(n.inputs):
            if x is not None and const_source(x)[0] is v:
                wp.ed.edit(n, i, key, lambda _a, new=new: new)
                return
    raise PlanError(f"could not find the consumer of norm parameter {name}")


def set_epsilon(wp, nrm: Norm, eps: float):
    where = nrm.epsilon_at
    if where[0] == "attr":
        node = wp.node(where[1])
        node.attributes["epsilon"] = ir.AttrFloat32("epsilon", float(eps))
        return
    # decomposed: the Add(ReduceMean(...), eps) among the norm's nodes, found by where it
    # sits (its other input is the mean square), not by the epsilon's value
    for n in (wp.node(x) for x in nrm.nodes):
        if n.op_type != "Add" or len(n.inputs) != 2:
            continue
        prods = [x.producer() if x is not None else None for x in n.inputs]
        for i, x in enumerate(n.inputs):
            src, _ = const_source(x)
            other = prods[1 - i]
            if src is not None and read_array(src).size == 1 and other is not None \
                    and other.op_type == "ReduceMean":
                dtype = read_array(src).dtype
                shape = read_array(src).shape
                wp.ed.edit(n, i, f"eps:{eps!r}",
                             lambda _a, e=eps, dt=dtype, sh=shape: np.full(sh, e, dtype=dt))
                return
    raise PlanError(f"could not find the epsilon constant of norm {nrm.output}")


def twin_post_norm(dp, b, mapping, prev_norm):
    """LEMON's Post-LN recipe: the previous block's last LayerNorm becomes the identity
    affine and its gamma/beta move to the twin's last LayerNorm; the twin's other LayerNorms
    (its first, and the one after cross-attention in a decoder block) are the identity affine
    too.  Returns the twin's last-norm record."""
    vals = dp.rec.values
    last, first = b.mlp_post_norm, b.attention_post_norm
    if last is None or first is None or prev_norm is None:
        raise PlanError("a Post-LN block without its two LayerNorms cannot take a twin")
    pg, pb, pnodes, pmap = prev_norm
    orig_g = read_array(pg).copy() if pg is not None else None
    orig_b = read_array(pb).copy() if pb is not None else None
    # the previous block's last norm -> identity (own tensors if shared)
    for v, fill in ((pg, 1.0), (pb, 0.0)):
        if v is not None:
            _set_param(dp, v, pnodes, pmap, fill)
    tg = mapping.get(vals.get(last.gamma)) if last.gamma else None
    tb = mapping.get(vals.get(last.beta)) if last.beta else None
    if tg is not None and orig_g is not None:
        write_array(tg, orig_g)
    if tb is not None and orig_b is not None:
        write_array(tb, orig_b)
    # the twin's norms before its last (after self-attention, and after cross-attention in
    # a decoder block) are identity affines: each sees a LayerNorm output plus zero
    inner = [first] + ([b.cross_attention_post_norm]
                       if getattr(b, "cross_attention_post_norm", None) else [])
    for nrm in inner:
        for name, fill in ((nrm.gamma, 1.0), (nrm.beta, 0.0)):
            if name:
                _set_param(dp, mapping[vals[name]], nrm.nodes, mapping, fill)
    return (tg, tb, last.nodes, mapping)


def _set_param(dp, v: ir.Value, node_names, mapping, fill: float) -> None:
    arr = read_array(v)
    users = {u.node for u in v.uses()}
    nodes = [dp.rec.node(n) for n in node_names]
    nodes = [mapping.get(n.outputs[0]).producer() if mapping and n.outputs[0] in mapping
             else n for n in nodes]
    mine = {n for n in nodes if n in users} | {
        u.node for u in v.uses() if u.node.op_type in ("Identity", "Cast")}
    if users <= mine:
        write_array(v, np.full_like(arr, fill))
        return
    new = np.full_like(arr, fill)
    name = f"{v.name}__identity{len(dp.graph.initializers)}"
    nv = ir.Value(name=name, shape=ir.Shape(new.shape), type=v.type,
                  const_value=ir.tensor(new, name=name))
    dp.graph.register_initializer(nv)
    for n in nodes:
        for i, x in enumerate(n.inputs):
            if x is v:
                n.replace_input_with(i, nv)


def widen_units(wp, nrm: Norm, units, *, tag: str) -> None:
    """A norm over a whole unit axis (OLMo-2's q/k norms over all heads): exact when the
    units come in whole copies (the mean over k copies is the mean over one), so gamma and
    beta follow the unit map and epsilon stays."""
    if units.r:
        raise PlanError(
            f"the norm {nrm.output} normalises over all {units.n_units} heads at once; "
            f"{units.N_units} heads are not whole copies of them, so its statistics would change.",
            hint=f"Use a width that multiplies the head count by an integer "
                 f"(--width {max(2, units.N_units // units.n_units)}).")
    nodes = [wp.node(n) for n in nrm.nodes]
    for name, key in ((nrm.gamma, "gamma"), (nrm.beta, "beta")):
        if name:
            new = units.apply(read_array(wp.values[name]), -1)
            _edit_param(wp, nodes, name, f"{tag}:{key}", new)

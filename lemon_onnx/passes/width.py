"""Width expansion pass: every weight, epsilon and size literal of a recognised Transformer.

The arithmetic lives in ``lemon_math`` (pure numpy); this module only decides which rule
applies to which tensor (from the recognised description) and writes the results into the
onnx-ir graph.  Weights shared between several consumers are rewritten in place when every
consumer needs the same result, and copied before they diverge otherwise.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Callable

import numpy as np
import onnx_ir as ir

from .. import dims, lemon_math as lm
from ..errors import PlanError
from ..recognize import Linear, Norm, Recognizer, back_view, const_source
from .streaming import release

NEW_SIZE_ROLES = ("hidden", "ffn", "heads", "kv_heads")


class WeightEditor:
    """Collects (initializer, consumer) -> transform; applies them once, sharing when equal."""

    def __init__(self, rec: Recognizer, seed: int):
        self.rec = rec
        self.seed = seed
        # init value -> list of (direct consumer node, input index, key, fn)
        self.requests: dict[ir.Value, list] = defaultdict(list)

    def rng(self, *parts) -> np.random.Generator:
        h = hashlib.sha256(repr((self.seed,) + parts).encode()).digest()
        return np.random.default_rng(int.from_bytes(h[:8], "little"))

    def edit(self, node: ir.Node, index: int, key: str, fn: Callable[[np.ndarray], np.ndarray],
             shape: Callable[[tuple], tuple] | None = None):
        """Transform the constant feeding ``node.inputs[index]`` (through Identity/Transpose).

        With ``shape`` (input shape -> output shape) a large result is not computed now: the
        initializer gets a lazy tensor that runs ``fn`` on the (memory-mapped) source when it is
        saved, so memory stays bounded by the largest tensor.  ``fn`` must then be a pure
        function of its input (seed its own generator)."""
        v = node.inputs[index]
        src, hops = const_source(v)
        if src is None:
            raise PlanError(f"expected a constant at input {index} of {node.op_type} {node.name}")
        direct, idx = (hops[-1], 0) if hops and hops[-1].op_type != "Constant" else (node, index)
        if hops and hops[-1].op_type == "Constant":
            # Constant node: edit its attribute through its output value
            direct, idx = (hops[-2], 0) if len(hops) > 1 else (node, index)
        self.requests[src].append((direct, idx, key, fn, shape))

    def apply(self) -> int:
        g = self.rec.graph
        n_new = 0
        for src, reqs in self.requests.items():
            by_key: dict[str, list] = defaultdict(list)
            fns, shapes = {}, {}
            for direct, idx, key, fn, shape in reqs:
                by_key[key].append((direct, idx))
                fns[key], shapes[key] = fn, shape
            edited_uses = {(d, i) for lst in by_key.values() for d, i in lst}
            all_uses = {(u.node, u.idx) for u in src.uses()}
            in_place = len(by_key) == 1 and all_uses <= edited_uses
            orig = src.const_value
            lazy_ok = orig is not None and orig.nbytes >= LAZY_BYTES
            for n, (key, uses) in enumerate(sorted(by_key.items())):
                name = src.name if in_place else f"{src.name}__lemon{n}"
                if lazy_ok and shapes[key] is not None:
                    new_t = _lazy(orig, fns[key], shapes[key](tuple(orig.shape)), name)
                else:
                    new_t = ir.tensor(_apply(fns[key], _read(src)), name=name)
                if in_place:
                    if orig is None:  # a Constant node: its attribute holds the value
                        _write(src, new_t.numpy())
                    else:
                        _write_tensor(src, new_t)
                    continue
                nv = ir.Value(name=name, shape=ir.Shape(new_t.shape),
                              type=ir.TensorType(new_t.dtype), const_value=new_t)
                g.register_initializer(nv)
                n_new += 1
                for direct, idx in set(uses):
                    direct.replace_input_with(idx, nv)
            if not in_place and not src.uses() and src.is_initializer():
                g.initializers.pop(src.name, None)
        return n_new


#: tensors at least this large are transformed lazily (at save time)
LAZY_BYTES = 1 << 20


def _apply(fn, arr: np.ndarray) -> np.ndarray:
    new = np.ascontiguousarray(fn(arr))
    if new.dtype != arr.dtype:  # weights keep the model's dtype (fp16/bf16 too)
        new = new.astype(arr.dtype)
    return new


def _lazy(orig, fn, shape: tuple, name: str) -> ir.LazyTensor:
    """``fn(orig)`` computed when the tensor is read (saved), not now."""
    def compute():
        out = _apply(fn, np.asarray(orig.numpy()))
        release(orig)  # unmap the source's pages (streaming.py, rule 2)
        return ir.tensor(out, name=name)

    return ir.LazyTensor(compute, dtype=orig.dtype, shape=ir.Shape(shape), name=name)


def _with_axis(shape: tuple, axis: int, n: int) -> tuple:
    out = list(shape)
    out[axis] = n
    return tuple(out)


def _write_tensor(v: ir.Value, t) -> None:
    v.const_value = t
    v.shape = ir.Shape(tuple(t.shape))


def _read(v: ir.Value) -> np.ndarray:
    if v.const_value is not None:
        return np.asarray(v.const_value.numpy())
    p = v.producer()
    return np.asarray(p.attributes["value"].value.numpy())


def _write(v: ir.Value, arr: np.ndarray) -> None:
    t = ir.tensor(arr, name=v.name)
    p = v.producer()
    if v.const_value is None and p is not None and p.op_type == "Constant":
        p.attributes["value"] = ir.AttrTensor("value", t)
        v.shape = ir.Shape(arr.shape)
        return
    v.const_value = t
    v.shape = ir.Shape(arr.shape)


def rounded_constants(s_map: lm.StreamMap) -> list[str]:
    """What a fractional width must round in the storage dtype (lemon-math.md, "Norm layers").

    A standard norm over D sees mean squares s = k*d/D times those over d, so its gamma must
    be sqrt(s)*gamma: irrational for most s (sqrt(3/4) for 576 -> 768), hence not storable
    exactly in any float dtype; an ``avg`` stream's leftover slots hold means (1/d times a
    sum), rounded too.  No exact construction keeps a standard norm over D: the leftover
    slots would have to carry a non-linear function of the stream.  Integer factors need
    none of this.  The float64 level of verification allows for these roundings."""
    out = [f"norm scales sqrt({s_map.k * s_map.d}/{s_map.D}) and epsilons x {s_map.k * s_map.d}"
           f"/{s_map.D}"]
    if s_map.form == "avg":
        out.append("avg leftover slots: means of the stream-writing weights' rows")
    return out


class WidthPass:
    def __init__(self, rec: Recognizer, desc, plan):
        self.rec, self.desc, self.plan = rec, desc, plan
        s, t = plan.source, plan.target
        self.d, self.D = s["hidden"], t["hidden"]
        self.s_map = lm.StreamMap(self.d, self.D, plan.stream_form)
        self.n_map = lm.norm_output_map(self.s_map)
        self.ffn_map = lm.UnitMap(s["ffn"], t["ffn"], 1)
        try:
            self.q_map, self.kv_map = lm.gqa_maps(s["heads"], s["kv_heads"], t["heads"],
                                                  t["kv_heads"], s["head_dim"])
        except ValueError as e:
            raise PlanError(str(e)) from None
        self.k = self.D // self.d
        self.ed = WeightEditor(rec, plan.seed)
        self.node = rec._node
        self.values = rec._values

    # ------------------------------------------------------------------ building blocks
    def linear(self, lin: Linear, in_map, out_map, *, tag: str, break_symmetry: bool = True,
               prescale: np.ndarray | None = None):
        node = self.node(lin.node)
        in_axis, out_axis = (0, 1) if lin.weight_layout == "in,out" else (1, 0)

        def fw(w, in_map=in_map, out_map=out_map):
            rng = self.ed.rng(tag, "w")  # here, so that a lazy re-evaluation gives the same
            if prescale is not None:  # a layer scale folded into the output columns
                shape = [1, 1]
                shape[out_axis] = -1
                w = (w * prescale.reshape(shape)).astype(w.dtype)
            if out_map is not None:
                w = out_map.apply(w, out_axis)
            if in_map is not None:
                w = lm.expand_in(w, in_axis, in_map, rng=rng, break_symmetry=break_symmetry,
                                 noise_scale=self.plan.noise_scale)
            return w

        def shape(sh, in_map=in_map, out_map=out_map):
            sh = list(sh)
            if out_map is not None:
                sh[out_axis] = out_map.D
            if in_map is not None:
                sh[in_axis] = in_map.D
            return tuple(sh)

        self.ed.edit(node, 1, f"{tag}:w", fw, shape)
        if lin.bias and out_map is not None:
            bnode = self.node(lin.bias_node)
            idx = next(i for i, x in enumerate(bnode.inputs)
                       if x is not None and const_source(x)[0] is self.values[lin.bias])
            self.ed.edit(bnode, idx, f"{tag}:b", lambda b, m=out_map: m.apply(
                b if prescale is None else (b * prescale).astype(b.dtype), -1))

    def qkv_fused(self, lin: Linear, in_map, tag: str):
        """GPT-2's c_attn: three head axes side by side; expand each third on its own."""
        node = self.node(lin.node)
        in_axis, out_axis = (0, 1) if lin.weight_layout == "in,out" else (1, 0)
        maps = (self.q_map, self.kv_map, self.kv_map)

        def fw(w):
            rng = self.ed.rng(tag, "w")
            parts = np.split(w, 3, axis=out_axis)
            w = np.concatenate([m.apply(p, out_axis) for m, p in zip(maps, parts)], axis=out_axis)
            return (lm.expand_in(w, in_axis, in_map, rng=rng, noise_scale=self.plan.noise_scale)
                    if in_map is not None else w)

        def fb(b):
            parts = np.split(b, 3, axis=-1)
            return np.concatenate([m.apply(p, -1) for m, p in zip(maps, parts)], axis=-1)

        def shape(sh):
            sh = list(sh)
            sh[out_axis] = sum(m.D for m in maps)
            if in_map is not None:
                sh[in_axis] = in_map.D
            return tuple(sh)

        self.ed.edit(node, 1, f"{tag}:w", fw, shape)
        if lin.bias:
            bnode = self.node(lin.bias_node)
            idx = next(i for i, x in enumerate(bnode.inputs)
                       if x is not None and const_source(x)[0] is self.values[lin.bias])
            self.ed.edit(bnode, idx, f"{tag}:b", fb)

    def norm(self, nrm: Norm, in_map: lm.StreamMap, *, tag: str, tied: bool = False):
        """gamma/beta/epsilon of a norm whose input is laid out by ``in_map``.

        ``tied``: the norm feeds a tied head, whose k copies of every embedding row would make
        the logits k times too large.  LEMON scales gamma and beta by 1/k; here the k copies
        of gamma (and beta) are instead an exact random split of them (lemon_math's input-side
        rule on a vector), so the head's sum over the copies gives the source's logits exactly
        in the storage dtype for every k (1/k is not representable for k = 3, 5, ...)."""
        nodes = [self.node(n) for n in nrm.nodes]
        rng = self.ed.rng(tag, "gamma")
        kind = nrm.kind
        gamma0 = _read(self.values[nrm.gamma]) if nrm.gamma else np.ones(self.d, np.float32)
        beta0 = _read(self.values[nrm.beta]) if nrm.beta else None
        try:
            g2, b2, eps2 = lm.expand_norm(gamma0, beta0, nrm.epsilon, in_map, rng=rng, kind=kind)
        except ValueError as e:
            raise PlanError(str(e)) from None
        if tied and in_map.k > 1:
            g2 = self._split_copies(g2, in_map, self.ed.rng(tag, "tie-gamma"))
            b2 = None if b2 is None else self._split_copies(b2, in_map,
                                                            self.ed.rng(tag, "tie-beta"))
        if nrm.gamma:
            self._edit_param(nodes, nrm.gamma, f"{tag}:gamma", g2.astype(gamma0.dtype))
        elif tied or in_map.r:
            raise PlanError(f"norm {nrm.output} has no scale parameter to rescale")
        if nrm.beta:
            self._edit_param(nodes, nrm.beta, f"{tag}:beta", b2.astype(beta0.dtype))
        if eps2 != nrm.epsilon:
            self.set_epsilon(nrm, eps2)

    def _split_copies(self, v: np.ndarray, in_map: lm.StreamMap, rng) -> np.ndarray:
        """The k tiled copies ``v[:k*d]`` of a norm parameter replaced by an exact split of one
        copy (the parts of each coordinate sum to it), leftover slots kept."""
        d, k = in_map.d, in_map.k
        parts = lm.expand_in(v[:d].reshape(d, 1), 0, lm.StreamMap(d, k * d, "copies"),
                             rng=rng, noise_scale=self.plan.noise_scale)
        out = v.copy()
        out[:k * d] = parts[:, 0]
        return out

    def _edit_param(self, nodes, name, key, new):
        v = self.values[name]
        for n in nodes:
            for i, x in enumerate(n.inputs):
                if x is not None and const_source(x)[0] is v:
                    self.ed.edit(n, i, key, lambda _a, new=new: new)
                    return
        raise PlanError(f"could not find the consumer of norm parameter {name}")

    def set_epsilon(self, nrm: Norm, eps: float):
        where = nrm.epsilon_at
        if where[0] == "attr":
            node = self.node(where[1])
            node.attributes["epsilon"] = ir.AttrFloat32("epsilon", float(eps))
            return
        # decomposed: the Add(ReduceMean(...), eps) among the norm's nodes, found by where it
        # sits (its other input is the mean square), not by the epsilon's value
        for n in (self.node(x) for x in nrm.nodes):
            if n.op_type != "Add" or len(n.inputs) != 2:
                continue
            prods = [x.producer() if x is not None else None for x in n.inputs]
            for i, x in enumerate(n.inputs):
                src, _ = const_source(x)
                other = prods[1 - i]
                if src is not None and _read(src).size == 1 and other is not None \
                        and other.op_type == "ReduceMean":
                    dtype = _read(src).dtype
                    shape = _read(src).shape
                    self.ed.edit(n, i, f"eps:{eps!r}",
                                 lambda _a, e=eps, dt=dtype, sh=shape: np.full(sh, e, dtype=dt))
                    return
        raise PlanError(f"could not find the epsilon constant of norm {nrm.output}")

    def layer_scale(self, node_name: str | None, tag: str) -> np.ndarray | None:
        """A per-channel constant on a branch output (layer scale).  ``copies``/``zero``
        streams tile it (leftover slots of ``zero`` carry 0, any value is exact); an ``avg``
        stream needs the leftover to be the mean of the *scaled* rows, which no per-channel
        constant gives, so the scale is folded into the projection and becomes ones."""
        if node_name is None:
            return None
        node = self.node(node_name)
        idx = next(i for i, x in enumerate(node.inputs) if const_source(x)[0] is not None)
        ls = _read(const_source(node.inputs[idx])[0])
        if self.s_map.form == "avg":
            self.ed.edit(node, idx, f"{tag}:ones", lambda a: np.ones(self.D, dtype=a.dtype))
            return ls
        self.ed.edit(node, idx, f"{tag}:tile",
                     lambda a: lm.StreamMap(self.d, self.D, "circ").apply(a, -1))
        return None

    def stream_axis(self, node: ir.Node, index: int, key: str, axis: int) -> None:
        """A constant whose ``axis`` is the residual stream (embedding tables, cls token,
        position embeddings, patch Conv channels, a tied head): laid out in the stream form."""
        self.ed.edit(node, index, key, lambda e: lm.expand_embedding(e, axis, self.s_map),
                     lambda sh: _with_axis(sh, axis, self.D))

    def embedding_param(self, name: str, axis: int, tag: str):
        for u in self.values[name].uses():
            self.stream_axis(u.node, u.idx, f"{tag}:emb", axis)

    # ------------------------------------------------------------------ the pass
    def run(self) -> dict:
        desc, plan = self.desc, self.plan
        emb = desc.embeddings
        s_map, n_map = self.s_map, self.n_map
        pre = desc.layout == "pre-norm"
        stats = {"tied_head": None}
        head = desc.head
        untie = untie_reason(self.rec, desc) is not None
        if untie:
            plan.notes.append("The tied head was untied: " + untie_reason(self.rec, desc))
        # embeddings (token table handled with the head when tied)
        if emb.token:
            self.stream_axis(self.node(emb.token_node), 0, "tok:emb", 1)
        tables = [name for name, _ in emb.tables]
        for name in dict.fromkeys(tables + [emb.position, emb.token_type, emb.cls_token]):
            if name:
                self.embedding_param(name, -1, f"emb:{name}")
        if emb.patch_conv:
            conv = self.node(emb.patch_conv)
            self.stream_axis(conv, 1, "patch:w", 0)
            if emb.patch_bias:
                self.stream_axis(conv, 2, "patch:b", 0)
        if emb.norm is not None:
            self.norm(emb.norm, lm.StreamMap(self.d, self.D, "copies"), tag="emb-norm")
        # blocks: branches (and later the heads) read a norm output (pre-norm) or the stream
        branch_in = n_map if pre else s_map
        for b in desc.blocks:
            t = f"b{b.index}"
            if b.attention_norm is not None:
                self.norm(b.attention_norm, s_map, tag=f"{t}.ln1")
            a = b.attention
            if a.qkv is not None:
                self.qkv_fused(a.qkv, branch_in, f"{t}.qkv")
            else:
                self.linear(a.q, branch_in, self.q_map, tag=f"{t}.q")
                self.linear(a.k, branch_in, self.kv_map, tag=f"{t}.k")
                self.linear(a.v, branch_in, self.kv_map, tag=f"{t}.v")
            self.linear(a.out, self.q_map, s_map, tag=f"{t}.o",
                        prescale=self.layer_scale(b.attention_scale, f"{t}.ls1"))
            if b.attention_post_norm is not None:
                self.norm(b.attention_post_norm, s_map, tag=f"{t}.ln1post")
            if b.mlp_norm is not None:
                self.norm(b.mlp_norm, s_map, tag=f"{t}.ln2")
            m = b.mlp
            if m.gate is not None:
                self.linear(m.gate, branch_in, self.ffn_map, tag=f"{t}.gate")
            self.linear(m.up, branch_in, self.ffn_map, tag=f"{t}.up")
            self.linear(m.down, self.ffn_map, s_map, tag=f"{t}.down",
                        prescale=self.layer_scale(b.mlp_scale, f"{t}.ls2"))
            if b.mlp_post_norm is not None:
                self.norm(b.mlp_post_norm, s_map, tag=f"{t}.ln2post")
        # final norm and head
        tied = bool(head.tie) and not untie
        if desc.final_norm is not None:
            self.norm(desc.final_norm, s_map, tag="final", tied=tied and head.kind == "lm")
        head_in = branch_in  # the final norm's output (pre-norm) or the stream (post-norm)
        if head.kind == "mlm":
            tr = head.transform
            circ = lm.UnitMap(self.d, self.D, 1)
            self.linear(tr, head_in, circ if self.D % self.d == 0 else None, tag="head.transform")
            if head.transform_norm is not None:
                self.norm(head.transform_norm, lm.StreamMap(self.d, self.D, "copies"),
                          tag="head.norm", tied=tied)
            head_in = lm.StreamMap(self.d, self.D, "copies")
        if head.linear is not None:
            if tied:
                lin = head.linear
                node = self.node(lin.node)
                hid_axis = 0 if lin.weight_layout == "in,out" else 1
                if head.tie == "shared":
                    # the same tensor as the embedding: one transform serves both roles
                    self.stream_axis(node, 1, "tok:emb", 1)
                else:
                    self.stream_axis(node, 1, "head:tiedcopy", hid_axis)
                stats["tied_head"] = head.tie
            else:
                self.linear(head.linear, head_in, None, tag="head")
        for i, extra in enumerate(desc.extra_heads):  # poolers etc.: read the stream, untied
            self.linear(extra.linear, branch_in, None, tag=f"head{i + 1}")
        if s_map.r:
            plan.rounded = rounded_constants(s_map)
        self.check_closed_world()
        n_new = self.ed.apply()
        n_lit = self.rewrite_literals()
        self.fix_shapes()
        stats.update(new_initializers=n_new, literals=n_lit,
                     maps={"q": self.q_map, "ffn": self.ffn_map})
        return stats

    # ------------------------------------------------------------------ closed world
    def check_closed_world(self) -> None:
        """Every constant whose shape carries a size the plan changes must have been claimed
        by a rule above (an edit request); otherwise refuse, naming it, before anything is
        rewritten: a constant left at the old size gives a graph that does not load, or worse,
        one that loads and computes something else."""
        claimed = set(self.ed.requests)
        consts = list(self.rec.graph.initializers.values())
        consts += [n.outputs[0] for n in self.rec.graph
                   if n.op_type == "Constant" and n.outputs and "value" in n.attributes]
        missed = []
        for v in consts:
            if v in claimed or not v.uses():
                continue
            ch = self._changed(v)
            if ch:
                k, atoms = ch[0]
                roles = "*".join(a.role or str(a.size) for a in atoms)
                shape = list(v.shape) if v.shape is not None else "?"
                users = ", ".join(sorted({f"{u.node.op_type} {u.node.name}"
                                          for u in v.uses()}))[:200]
                missed.append(f"constant {v.name} (shape {shape}, axis {k} carries {roles}; "
                              f"read by {users})")
        missed += self._unmodelled_ops()
        if missed:
            raise PlanError(
                f"{len(missed)} tensor(s) or operator(s) carry a size this expansion changes "
                "but no rule of lemon-onnx knows how to expand them: " + "; ".join(missed[:5])
                + ("; ..." if len(missed) > 5 else "") + ". Nothing was written.",
                hint="This architecture has a component lemon-onnx does not support yet; "
                     "report it with the model's `lemon-onnx inspect --json` output.")

    def _changed(self, value) -> list:
        """Axes of ``value`` whose size the plan changes: [(axis, atoms)]."""
        out = []
        for k, axis in enumerate(self.rec.ax.axes.get(value) or []):
            atoms = dims.leaves(axis)
            if any(self.new_size(a) != a.size for a in atoms if a.size is not None):
                out.append((k, atoms))
        return out

    def _unmodelled_ops(self) -> list:
        """Operators on the path of a changed size that the axis analysis does not model, and
        element-mixing ops (CumSum, Softmax, ...) along a changed axis."""
        found = []
        for node in self.rec.ax.unhandled:
            for v in list(node.inputs) + list(node.outputs):
                ch = self._changed(v) if v is not None else []
                if ch:
                    k, atoms = ch[0]
                    dom = f" (domain {node.domain})" if node.domain else ""
                    found.append(f"operator {node.op_type}{dom} {node.name} (its value {v.name}, "
                                 f"axis {k} carries {'*'.join(a.role or str(a.size) for a in atoms)}"
                                 "; lemon-onnx does not know how this operator acts on that axis)")
                    break
        for node, x, axis in self.rec.ax.axis_ops:
            ch = dict(self._changed(x))
            rank = len(self.rec.ax.axes.get(x) or [])
            if axis is None and ch:
                bad = next(iter(ch))
            elif axis is not None and rank and (axis % rank) in ch:
                bad = axis % rank
            else:
                continue
            found.append(f"operator {node.op_type} {node.name} combines the elements along axis "
                         f"{bad} of {x.name}, which carries "
                         f"{'*'.join(a.role or str(a.size) for a in ch[bad])}: not exact once that "
                         "axis grows")
        return found

    # ------------------------------------------------------------------ literals
    def new_size(self, atom: dims.Atom) -> int:
        role = atom.role
        if role == "hidden":
            return self.D
        if role == "ffn":
            return self.plan.target["ffn"]
        if role == "heads":
            return self.plan.target["heads"]
        if role == "kv_heads":
            return self.plan.target["kv_heads"]
        return atom.size

    def literal_value(self, lu: dims.LiteralUse) -> int:
        n = 1
        for a in dims.leaves(lu.atoms):
            n *= self.new_size(a)
        return n

    def rewrite_literals(self) -> int:
        """Recompute every size literal from its atoms; copy constants whose uses diverge."""
        rec = self.rec
        per_tensor: dict[tuple, list] = defaultdict(list)
        for lu in rec.ax.literals:
            new = self.literal_value(lu)
            per_tensor[lu.ref[:2]].append((lu, new))
        changed = 0
        for ref, items in per_tensor.items():
            if all(new == lu.value for lu, new in items):
                continue
            if ref[0] == "attr":
                node = self.node(ref[1])
                attr = items[0][0].ref[2]
                node.attributes[attr] = ir.AttrInt64(attr, int(items[0][1]))
                changed += 1
                continue
            v = self._literal_value_of(ref)
            wanted: dict[int, set] = defaultdict(set)
            for lu, new in items:
                wanted[lu.ref[2]].add(new)
            readers = {(u.node.name, u.idx) for u in v.uses()}
            vias = {lu.via for lu, _ in items}
            if all(len(s) == 1 for s in wanted.values()) and readers <= vias:
                # every reader of the constant reads it as these sizes: rewrite in place
                arr = _read(v).copy()
                flat = arr.reshape(-1)
                for i, s in wanted.items():
                    flat[i] = next(iter(s))
                _write(v, arr)
                changed += 1
                continue
            # the constant is shared with readers of other sizes, or with readers that use it
            # for something else (an axis index, a step): each size reader gets its own copy
            by_via: dict[tuple, list] = defaultdict(list)
            for lu, new in items:
                if lu.via is None:
                    raise PlanError(f"size literal {lu.ref} is shared by sites that need "
                                    "different values and cannot be split")
                by_via[lu.via].append((lu, new))
            for (node_name, idx), mine in sorted(by_via.items()):
                if all(new == lu.value for lu, new in mine):
                    continue
                a2 = _read(v).copy()
                f2 = a2.reshape(-1)
                for lu, new in mine:
                    f2[lu.ref[2]] = new
                name = f"{v.name}__lemon_{node_name}_{idx}"
                nv = ir.Value(name=name, shape=ir.Shape(a2.shape),
                              type=ir.TensorType(ir.DataType.from_numpy(a2.dtype)),
                              const_value=ir.tensor(a2, name=name))
                rec.graph.register_initializer(nv)
                self.node(node_name).replace_input_with(idx, nv)
                changed += 1
        return changed

    def _literal_value_of(self, ref: tuple) -> ir.Value:
        if ref[0] == "node":
            return self.node(ref[1]).outputs[0]
        return self.values[ref[1]]

    # ------------------------------------------------------------------ shapes
    def fix_shapes(self) -> None:
        """Drop stale inferred shapes; recompute graph output shapes from their atoms."""
        g = self.rec.graph
        outs = set(g.outputs)
        for n in g:
            for o in n.outputs:
                if o not in outs:
                    o.shape = None
        for o in g.outputs:
            ax = self.rec.ax.get(o)
            if ax is None or o.shape is None:
                continue
            dims_ = []
            for k, a in enumerate(ax):
                old = o.shape[k]
                if isinstance(old, int):
                    n = 1
                    for atom in dims.leaves(a):
                        n *= self.new_size(atom)
                    dims_.append(n)
                else:
                    dims_.append(old)
            o.shape = ir.Shape(dims_)


def untie_reason(rec: Recognizer, desc) -> str | None:
    """Why widening must untie the tied head, or None: the norm that feeds it is also a
    graph output, and the split of its gamma over the k copies (or LEMON's 1/k scaling) that
    the tie needs would change that output."""
    head = desc.head
    head_norm = head.transform_norm if head.kind == "mlm" else desc.final_norm
    if head.tie and head_norm is not None:
        nv = rec._values[head_norm.output]
        if any(back_view(o) is nv for o in rec.graph.outputs):
            return ("the norm that feeds it is also a graph output, so rescaling its gamma "
                    "for the tied copies would change that output.")
        if head.kind == "lm" and desc.extra_heads:
            return ("another head (a pooler or classifier) also reads the norm that feeds it, "
                    "and rescaling that norm's gamma for the tied copies would change what "
                    "that head reads.")
    return None


def expand_width(rec: Recognizer, desc, plan) -> dict:
    return WidthPass(rec, desc, plan).run()

"""Width expansion pass: every weight, epsilon and size literal of a recognised Transformer.

The arithmetic lives in ``lemon_math`` (pure numpy); this module only decides which rule
applies to which tensor (from the recognised description) and writes the results into the
onnx-ir graph.  Weights shared between several consumers are rewritten in place when every
consumer needs the same result, and copied before they diverge otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from typing import Callable

import numpy as np
import onnx_ir as ir

from .. import dims, lemon_math as lm
from ..errors import PlanError
from ..components import attention, embedding, head, residual
from ..components.cross_attention import memory_inputs
from ..components.head import untie_reason
from ..graph import const_source
from ..recognize import Recognizer
from .maps import Maps
from .recognition import recognized
from ..tensors import LAZY_BYTES, apply_fn, lazy_tensor, read_array, with_axis, write_array, write_tensor

__all__ = ["WidthPass", "WidthResult", "WeightEditor", "untie_reason", "LAZY_BYTES"]

#: the order in which the rules lay out the atoms of a head axis (outermost first)
_HEAD_ORDER = {"kv_heads": 0, "heads": 0, "kv_groups": 1, "head_dim": 2}
#: roles of fused axes that a component lays out itself, cuts included (Falcon's q|k|v rows,
#: a fused projection's width, a fused gate|up)
FUSED_ROLES = ("qkv_rows", "qkv_width", "qkv_parts", "gate_up_parts")


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
                    new_t = lazy_tensor(orig, fns[key], shapes[key](tuple(orig.shape)), name)
                else:
                    try:
                        new_t = ir.tensor(apply_fn(fns[key], read_array(src)), name=name)
                    except ValueError as exc:  # lemon_math: the tensor's shape is not the
                        # size the recognised description gives it (an inconsistent source)
                        raise PlanError(
                            f"constant {src.name} (shape {list(read_array(src).shape)}) does not "
                            f"have the size its rule {key} expects: {exc}. Nothing was "
                            "written.") from None
                if in_place:
                    if orig is None:  # a Constant node: its attribute holds the value
                        write_array(src, new_t.numpy())
                    else:
                        write_tensor(src, new_t)
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


def rounded_constants(s_map: lm.StreamMap) -> list[str]:
    """What a fractional width must round in the storage dtype (lemon-math.md,
    "Exact in the storage dtype"; the norms' rule: "Norm layers").

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


@dataclasses.dataclass
class WidthResult(ir.passes.PassResult):
    """What the width pass did, beside the model: counts for the progress line, and what the
    plan records of it (``notes``, ``rounded``)."""

    tied_head: str | None = None
    new_initializers: int = 0  # copies made where a shared tensor's consumers diverge
    literals: int = 0  # size literals rewritten
    notes: list = dataclasses.field(default_factory=list)
    #: constants rounded in the storage dtype (fractional widths)
    rounded: list = dataclasses.field(default_factory=list)


class WidthPass(ir.passes.InPlacePass):
    """Widens a recognised model in place (onnx-ir's pass protocol: ``WidthPass(...)(model)``).

    The components (``components/``) decide which rule applies to which tensor; this pass
    holds the maps they share (stream, norm output, FFN units, query and KV heads), the weight
    editor, and what is common to every component: the closed-world check, size literals and
    output shapes."""

    def __init__(self, plan, maps: Maps):
        """Options: the plan and its maps.  ``call`` takes a model that carries its
        recognition (``passes.recognition``: the index and the description it widens by)."""
        super().__init__()
        self.plan, self.maps = plan, maps
        self.d, self.D = plan.source["hidden"], plan.target["hidden"]
        self.k = self.D // self.d
        # the maps under the names the components use
        self.s_map, self.n_map, self.memory_map = maps.stream, maps.norm_out, maps.memory
        self.ffn_map, self.q_map, self.kv_map = maps.ffn, maps.q, maps.kv

    # ------------------------------------------------------------------ building blocks


    def stream_axis(self, node: ir.Node, index: int, key: str, axis: int) -> None:
        """A constant whose ``axis`` is the residual stream (embedding tables, cls token,
        position embeddings, patch Conv channels, a tied head): laid out in the stream form."""
        self.ed.edit(node, index, key, lambda e: lm.expand_embedding(e, axis, self.s_map),
                     lambda sh: with_axis(sh, axis, self.D))

    def embedding_param(self, name: str, axis: int, tag: str):
        for u in self.values[name].uses():
            self.stream_axis(u.node, u.idx, f"{tag}:emb", axis)

    # ------------------------------------------------------------------ the pass
    def requires(self, model: ir.Model) -> None:
        recognized(model, "WidthPass")

    def call(self, model: ir.Model) -> "WidthResult":
        """Every component widens itself; then the closed-world check, the edits, the size
        literals and the output shapes."""
        # this run's model: its index and description
        self.rec, self.desc = recognized(model, "WidthPass")
        self.node, self.values = self.rec.node, self.rec.values
        desc = self.desc
        self.ed = WeightEditor(self.rec, self.plan.seed)  # this run's edits
        s_map, n_map = self.s_map, self.n_map
        reason = untie_reason(self.rec, desc)
        embedding.widen(self, desc.embeddings)
        # branches (and later the heads) read a norm output (pre-norm) or the stream
        branch_in = n_map if desc.layout == "pre-norm" else s_map
        for b in desc.blocks:
            residual.widen(self, b, branch_in, s_map)
        tied = head.widen(self, desc, branch_in, untie=reason is not None)
        attention.widen_head_tables(self)
        self.check_closed_world()
        n_edits = sum(len(r) for r in self.ed.requests.values())
        n_new = self.ed.apply()
        n_lit = self.rewrite_literals()
        n_shapes = self.fix_shapes()
        return WidthResult(
            model, modified=bool(n_edits or n_lit or n_shapes), tied_head=tied,
            new_initializers=n_new, literals=n_lit,
            notes=[head.UNTIED_NOTE + reason] if reason is not None else [],
            rounded=rounded_constants(s_map) if s_map.r else [])

    # ------------------------------------------------------------------ closed world
    def check_closed_world(self) -> None:
        """Every constant whose shape carries a size the plan changes must have been claimed
        by a rule above (an edit request); otherwise refuse, naming it, before anything is
        rewritten: a constant left at the old size gives a graph that does not load, or worse,
        one that loads and computes something else."""
        claimed = set(self.ed.requests)
        missed = []
        for v in self.rec.constants():
            if v in claimed or not v.uses():
                continue
            ch = self.changed_axes(v)
            if ch:
                k, atoms = ch[0]
                roles = self._roles(atoms)
                shape = list(v.shape) if v.shape is not None else "?"
                users = ", ".join(sorted({f"{u.node.op_type} {u.node.name}"
                                          for u in v.uses()}))[:200]
                missed.append(f"constant {v.name} (shape {shape}, axis {k} carries {roles}; "
                              f"read by {users})")
            elif size := self._unattributed_hidden(v):
                users = ", ".join(sorted({f"{u.node.op_type} {u.node.name}"
                                          for u in v.uses()}))[:200]
                missed.append(f"constant {v.name} (shape {list(v.shape)}: an axis has the "
                              f"{size} size {self.plan.source[size]}, but the shape reasoning "
                              f"could not tie it to the {size} axis or to anything else, e.g. "
                              f"because it is reshaped by sizes computed at run time; read by "
                              f"{users})")
        missed += self._changed_inputs()
        missed += self._unmodelled_ops()
        missed += self._disagreements()
        if missed:
            raise PlanError(
                f"{len(missed)} tensor(s) or operator(s) carry a size this expansion changes "
                "but no rule of lemon-onnx knows how to expand them: " + "; ".join(missed[:5])
                + ("; ..." if len(missed) > 5 else "") + ". Nothing was written.",
                hint="This architecture has a component lemon-onnx does not support yet; "
                     "report it with the model's `lemon-onnx inspect --json` output.")

    def _changed_inputs(self) -> list:
        """Graph inputs with an axis of a size the plan changes: what a runtime must feed
        them is known only for a recognised KV cache (the source's, KV heads repeated) and a
        decoder's encoder output (the encoder's, in its output layout: ``memory_map``)."""
        g = self.rec.graph
        caches = {s.input for s in self.desc.caches} | set(memory_inputs(self.desc))
        found = []
        for v in g.inputs:
            if v.name in g.initializers or v.name in caches:
                continue
            ch = self.changed_axes(v)
            if ch:
                k, atoms = ch[0]
                found.append(f"graph input {v.name} (shape {list(v.shape or [])}, axis {k} "
                             f"carries {self._roles(atoms)}; "
                             "no rule says what to feed it once that axis grows)")
        return found

    def _disagreements(self) -> list:
        """Claimed constants whose new shape (the rule's) differs from what the axis analysis
        predicts from its atoms: the rest of the graph (reshapes, splits, size literals) is
        rewritten from the atoms, so the two must agree, or the graph would not fit together
        (a size that is a sum, such as Falcon's heads + 2, has no atoms to grow)."""
        found = []
        makers = {}  # atoms made by operators whose units lemon-onnx cannot place
        for node, value, k, _cut in self.rec.ax.opaque:
            for a in dims.leaves((self.rec.ax.axes.get(value) or [[]] * (k + 1))[k]):
                makers.setdefault(dims.find(a), node)
        for node, atom in self.rec.ax.reshape_splits:
            for a in dims.leaves([atom]):
                makers.setdefault(dims.find(a), node)
        for src, reqs in self.ed.requests.items():
            axes = self.rec.ax.axes.get(src)
            if not axes or src.shape is None:
                continue
            old = tuple(src.shape)
            for _direct, _idx, key, _fn, shape in reqs:
                if shape is None:
                    continue
                new = shape(old)
                for k, axis in enumerate(axes):
                    atoms = dims.leaves(axis)
                    if k >= len(new) or any(a.size is None or self.desc.roles.of(a) == "qkv_parts"
                                            for a in atoms):
                        continue  # the analysis cannot predict this axis
                    if any(self.desc.roles.of(a) is None for a in atoms) and (
                            new[k] == old[k] or key.startswith("head")):
                        # an unnamed atom on an axis kept; or a head's input (its linears
                        # read the stream through pooling the analysis does not always
                        # follow: the head component checks its own input)
                        continue
                    # an axis the rule grows must grow by its named atoms: an atom nothing
                    # named keeps its size, so a rule that grows it places units the graph
                    # around it does not (a permutation, a piece, a padded axis)
                    predicted = int(np.prod([self.new_size(a) for a in atoms]))
                    order = [_HEAD_ORDER.get((self.desc.roles.of(a) or "").split("[")[0])
                             for a in atoms]
                    order = [o for o in order if o is not None]
                    if new[k] != old[k] and order != sorted(order):
                        # the rules lay heads out before head_dim (KV heads before their
                        # groups): an axis holding them in another order was permuted
                        roles = self._roles(atoms)
                        by = self._makers_text(atoms, self._reorderers(atoms),
                                               "its units were reordered by")
                        found.append(f"constant {src.name} (shape {list(old)}): axis {k} holds "
                                     f"{roles} in an order the rule {key.split(':')[0]} does "
                                     f"not lay out{by}")
                        break
                    if predicted != new[k]:
                        roles = self._roles(atoms) or "1"
                        by = self._makers_text(atoms, makers, "that axis is cut or made by")
                        found.append(f"constant {src.name} (shape {list(old)}): the rule "
                                     f"{key.split(':')[0]} gives axis {k} size {new[k]}, but "
                                     f"the graph's other sizes on that axis ({roles}) give "
                                     f"{predicted}{by}")
                        break
        return found

    def _reorderers(self, atoms) -> dict:
        """Transposes that change the relative order of these atoms: {atom root: node}."""
        mine = [dims.find(a) for a in atoms]
        out = {}
        for n in self.rec.graph:
            if n.op_type != "Transpose" or not n.outputs:
                continue
            seqs = []
            for v in (n.inputs[0], n.outputs[0]):
                flat = [dims.find(a) for ax_ in self.rec.ax.axes.get(v) or [] for a in
                        dims.leaves(ax_)]
                seqs.append([a for a in flat if a in mine])
            if len(seqs[0]) > 1 and seqs[0] != seqs[1]:
                out.update({a: n for a in seqs[0]})
        return out

    def _makers_text(self, atoms, makers: dict, what: str) -> str:
        """The operators that cut or made these atoms, latest in the graph first."""
        made = list(dict.fromkeys(makers[dims.find(a)] for a in atoms if dims.find(a) in makers))
        if not made:
            return ""
        pos = {n: i for i, n in enumerate(self.rec.graph)}
        made.sort(key=lambda n: -pos.get(n, -1))
        return f"; {what} " + ", ".join(f"operator {n.op_type} {n.name}" for n in made[:3])

    def _unattributed_hidden(self, v) -> str | None:
        """A float weight with an axis of a size the plan changes (hidden on its last axis; the
        head count on any axis, for a table that reaches the attention scores) whose atom
        nothing named: the shape reasoning lost track of it (a table reshaped by sizes computed
        at run time).  It may well carry that size; refusing is safe, guessing is not.
        Returns the size's name, or None."""
        if v.shape is None or len(v.shape) < 2:
            return None
        t = v.const_value
        if t is None or not t.dtype.is_floating_point():
            return None
        unnamed = self.rec.unnamed_axes(v)
        s, tg = self.plan.source, self.plan.target
        if self.d != self.D and v.shape[-1] == self.d and len(v.shape) - 1 in unnamed:
            return "hidden"
        if s["heads"] != tg["heads"] and any(v.shape[k] == s["heads"] for k in unnamed) \
                and self.rec.reaches_heads(v):
            return "heads"
        return None

    def changed_axes(self, value) -> list:
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
                ch = self.changed_axes(v) if v is not None else []
                if ch:
                    k, atoms = ch[0]
                    dom = f" (domain {node.domain})" if node.domain else ""
                    found.append(f"operator {node.op_type}{dom} {node.name} (its value {v.name}, "
                                 f"axis {k} carries {self._roles(atoms)}"
                                 "; lemon-onnx does not know how this operator acts on that axis)")
                    break
        for node, x, axis in self.rec.ax.axis_ops:
            ch = dict(self.changed_axes(x))
            rank = len(self.rec.ax.axes.get(x) or [])
            if axis is None and ch:
                bad = next(iter(ch))
            elif axis is not None and rank and (axis % rank) in ch:
                bad = axis % rank
            else:
                continue
            found.append(f"operator {node.op_type} {node.name} combines the elements along axis "
                         f"{bad} of {x.name}, which carries "
                         f"{self._roles(ch[bad])}: not exact once that "
                         "axis grows")
        for node, atoms in self.rec.ax.fixed_sizes:
            if any(self.new_size(a) != a.size for a in dims.leaves(atoms)):
                found.append(f"operator {node.op_type} {node.name} splits "
                             f"{self._roles(dims.leaves(atoms))} "
                             "by a size computed from constants, which does not grow with it")
        found += self._unplaced_units()
        for node, k, took, want in self.rec.ax.size_ties:
            units, size = dims.leaves(took), dims.leaves(want)
            new_units = [self.new_size(a) for a in units]
            new_size = [self.new_size(a) for a in size]
            if None in new_units or None in new_size or \
                    int(np.prod(new_units)) != int(np.prod(new_size)):
                found.append(f"operator {node.op_type} {node.name} regroups {self._roles(units)} "
                             f"into axis {k} of {node.outputs[0].name} but reads that axis's "
                             f"size at run time from {self._roles(size) or '1'}: the plan makes "
                             f"the first {self._product(new_units)} and the second "
                             f"{self._product(new_size)}, so the reshape would fail")
        for node, x, axis in self.rec.ax.runtime_cuts:
            ch = dict(self.changed_axes(x))
            if axis in ch:
                found.append(f"operator {node.op_type} {node.name} cuts axis {axis} of {x.name}, "
                             f"which carries {self._roles(ch[axis])}, "
                             "at bounds computed at run time: where it cuts once that axis grows "
                             "is unknown")
        return found

    @staticmethod
    def _product(sizes) -> str:
        return "unknown" if None in sizes else str(int(np.prod(sizes, dtype=np.int64)))

    def _roles(self, axis_atoms) -> str:
        return self.desc.roles.label(axis_atoms)

    def _changed_axis(self, value, k: int):
        """The atoms of axis ``k`` of ``value`` if the plan changes that axis, else None."""
        for kk, atoms in self.changed_axes(value) if value is not None else []:
            if kk == k:
                return atoms
        return None

    def _keeps_prefix(self, atoms, cut) -> bool:
        """Whether a Slice [start:end:step] of an axis of these atoms reads the same source
        units once the axis grows: a step of 1, non-negative bounds inside the source size,
        and positions that stay in place (every unit map keeps the source units first, so
        position p keeps its unit iff its row-major index lands on the same position)."""
        lo, hi, step = cut
        old = [a.size for a in atoms]
        if step != 1 or lo < 0 or hi <= lo or None in old or hi > int(np.prod(old)):
            return False
        new = [self.new_size(a) for a in atoms]
        pos = np.arange(lo, hi)
        idx = np.unravel_index(pos, old)
        return bool(np.array_equal(np.ravel_multi_index(idx, new), pos))

    def _claimed_norm_nodes(self) -> set:
        """Nodes of the norms the components widen (reached from the description)."""
        from ..components.norm import Norm

        names, seen = set(), set()

        def walk(o):
            if id(o) in seen:
                return
            seen.add(id(o))
            if isinstance(o, Norm):
                names.update(o.nodes)
            elif dataclasses.is_dataclass(o) and not isinstance(o, type):
                for f in dataclasses.fields(o):
                    walk(getattr(o, f.name))
            elif isinstance(o, (list, tuple)):
                for x in o:
                    walk(x)
            elif isinstance(o, dict):
                for x in o.values():
                    walk(x)

        walk(self.desc)
        return names

    def _fused_cutters(self) -> set:
        """Split/Slice nodes that a component lays out itself: the fused QKV projection's
        Split, and Slices whose bounds the components rewrite."""
        names = {b.attention.split_node for b in self.desc.blocks
                 if getattr(b.attention, "split_node", None)}
        for src, reqs in self.ed.requests.items():
            for direct, idx, key, _fn, _shape in reqs:
                if direct.op_type == "Slice" and idx in (1, 2):
                    names.add(direct.name)
        h = self.desc.head
        if h is not None and h.segments > 1:
            # copies of the stream side by side on the head's input (DINOv2's cls token and
            # patch mean): the head component lays the segments out
            for lin in (h.transform, h.linear):
                v = self.values.get(lin.input) if lin is not None else None
                for _ in range(8):
                    p = v.producer() if v is not None else None
                    if p is None:
                        break
                    if p.op_type == "Concat":
                        names.add(p.name)
                        break
                    if p.op_type not in ("Identity", "Cast", "Reshape", "Flatten", "Squeeze",
                                         "Unsqueeze"):
                        break
                    v = p.inputs[0]
        return names

    def _unplaced_units(self) -> list:
        """Unit order (issue 23): every operator that reads or writes an axis the plan grows
        must say where each unit of that axis goes.  Elementwise ops, whole-axis moves and
        reshapes along the atoms do; refused here: an output axis built from fresh atoms
        (a Slice with a step or negative bounds, a Concat of pieces, Tile, Resize, Pad, an
        unmodelled Reshape) that carries or reads a growing axis, a reduction over one outside
        the norms the components widen, and a Split of one into parts no component lays out."""
        ax = self.rec.ax
        found, seen = [], set()
        cutters = self._fused_cutters()

        def add(node, msg):
            if node.name not in seen:
                seen.add(node.name)
                found.append(f"operator {node.op_type} {node.name} {msg}")

        def fused(v, k):  # an axis a component lays out itself (q|k|v rows, gate|up)
            atoms = self._changed_axis(v, k) if v is not None else None
            return atoms is not None and any(self.desc.roles.of(a) in FUSED_ROLES for a in atoms)

        for node, data, k in ax.gathers:
            rank = len(ax.axes.get(data) or [])
            atoms = self._changed_axis(data, k % rank) if rank else None
            if atoms is not None and not fused(data, k % rank):
                add(node, f"picks units along axis {k % rank} of {data.name}, which carries "
                          f"{self._roles(atoms)}, by index: which units those are once that "
                          "axis grows is not modelled")
        for node, value, k, cut in ax.opaque:
            if node.name in cutters or any(fused(v, k) for v in node.inputs[:1]
                                           if len(ax.axes.get(v) or []) > k):
                continue
            atoms = self._changed_axis(value, k)
            if atoms is not None:
                add(node, f"makes axis {k} of {value.name}, which carries {self._roles(atoms)}, "
                          "from units whose places lemon-onnx does not model")
                continue
            rank = len(ax.axes.get(value) or [])
            ins = node.inputs if node.op_type == "Concat" else node.inputs[:1]
            for v in ins:
                if v is None or len(ax.axes.get(v) or []) != rank:
                    continue
                atoms = self._changed_axis(v, k)
                if atoms is None:
                    continue
                if cut is not None and self._keeps_prefix(atoms, cut):
                    continue
                what = (f"cuts [{cut[0]}:{cut[1]}:{cut[2]}] out of" if cut is not None
                        else "moves or mixes the units of")
                add(node, f"{what} axis {k} of {v.name}, which carries {self._roles(atoms)}: "
                          "where those units go once that axis grows is not modelled")
        norms = None
        for node, x, axes in ax.reductions:
            bad = [k for k in axes if self._changed_axis(x, k) is not None]
            if not bad:
                continue
            norms = self._claimed_norm_nodes() if norms is None else norms
            if node.name not in norms:
                add(node, f"reduces axis {bad[0]} of {x.name}, which carries "
                          f"{self._roles(self._changed_axis(x, bad[0]))}: a reduction over "
                          "replicated units changes (only the norms' are rescaled)")
        claimed = set(self.ed.requests)
        for node in self.rec.graph:
            if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            # a contraction over a growing axis sums replicated units: exact only through
            # a weight the rules rewrite (the input-side rule), not between two activations
            ta = node.op_type == "Gemm" and "transA" in node.attributes and \
                node.attributes["transA"].value
            tb = node.op_type == "Gemm" and "transB" in node.attributes and \
                node.attributes["transB"].value
            a_, b_ = node.inputs[0], node.inputs[1]
            ra, rb = len(ax.axes.get(a_) or []), len(ax.axes.get(b_) or [])
            ka = (ra - 2 if ta else ra - 1) if ra else None
            kb = (rb - 1 if tb else rb - 2) if rb >= 2 else (0 if rb == 1 else None)
            for v, k, other in ((a_, ka, b_), (b_, kb, a_)):
                atoms = self._changed_axis(v, k) if k is not None and k >= 0 else None
                if atoms is not None and const_source(other)[0] not in claimed \
                        and const_source(v)[0] not in claimed:
                    add(node, f"contracts axis {k} of {v.name}, which carries "
                              f"{self._roles(atoms)}, with a computed tensor: a sum over "
                              "replicated units changes")
                    break
        for node in self.rec.graph:
            if node.op_type != "Split" or node.name in cutters or not node.inputs:
                continue
            x = node.inputs[0]
            rank = len(ax.axes.get(x) or [])
            if not rank:
                continue
            axis = node.attributes["axis"].value % rank if "axis" in node.attributes else 0
            atoms = self._changed_axis(x, axis)
            if atoms is None:
                continue
            src = {dims.find(a) for a in atoms}
            parts = [dims.leaves((ax.axes.get(o) or [[]] * rank)[axis]) for o in node.outputs]
            if not all(p and {dims.find(a) for a in p} <= src for p in parts):
                add(node, f"splits axis {axis} of {x.name}, which carries {self._roles(atoms)}, "
                          "into parts that do not grow with it")
        return found

    # ------------------------------------------------------------------ literals
    def new_size(self, atom: dims.Atom) -> int:
        role = self.desc.roles.of(atom)
        if role == "hidden":
            return self.D
        if role == "ffn":
            return self.plan.target["ffn"]
        if role == "heads":
            return self.plan.target["heads"]
        if role == "kv_heads":
            return self.plan.target["kv_heads"]
        if role == "qkv_rows":  # a fused projection viewed as (heads + 2 kv_heads) rows
            return self.plan.target["heads"] + 2 * self.plan.target["kv_heads"]
        if role == "qkv_width":  # a fused projection's whole output width
            return (self.plan.target["heads"] + 2 * self.plan.target["kv_heads"]) \
                * self.plan.source["head_dim"]
        return atom.size

    def literal_value(self, lu: dims.LiteralUse) -> int:
        atoms = dims.leaves(lu.atoms)
        sizes = [self.new_size(a) for a in atoms]
        if None in sizes:  # a size known only at run time among the literal's atoms
            if all(n == a.size for n, a in zip(sizes, atoms)):
                return lu.value  # none of them changes
            raise PlanError(f"the size literal {lu.value} at {lu.ref[1]} (read by {lu.op} "
                            f"{lu.node}) stands for "
                            f"{self._roles(atoms)}, a product with "
                            "a size known only at run time; lemon-onnx cannot tell what it "
                            "becomes.", hint="Report the model with its `lemon-onnx inspect "
                                             "--json` output.")
        return int(np.prod(sizes, dtype=np.int64))

    def rewrite_literals(self) -> int:
        """Recompute every size literal from its atoms; copy constants whose uses diverge."""
        rec = self.rec
        per_tensor: dict[tuple, list] = defaultdict(list)
        for lu in rec.ax.literals:
            new = self.literal_value(lu)
            was = dims.size_of(lu.atoms)
            if new != lu.value and was != lu.value:
                # the shape reasoning tied the literal to atoms of another size: recomputing
                # it from them would write a size that was never there
                raise PlanError(f"the size literal {lu.value} at {lu.ref[1]} (read by {lu.op} "
                                f"{lu.node}) was tied to axes of size {was}; lemon-onnx cannot "
                                "tell what it becomes.",
                                hint="Report the model with its `lemon-onnx inspect --json` "
                                     "output.")
            per_tensor[lu.ref[:2]].append((lu, new))
        changed = 0
        for ref, items in per_tensor.items():
            if all(new == lu.value for lu, new in items):
                continue
            if ref[0] == "attr":
                changed += self._rewrite_attributes(self.node(ref[1]), items)
                continue
            v = self._literal_value_of(ref)
            wanted: dict[int, set] = defaultdict(set)
            for lu, new in items:
                wanted[lu.ref[2]].add(new)
            readers = {(u.node.name, u.idx) for u in v.uses()}
            vias = {lu.via for lu, _ in items}
            if all(len(s) == 1 for s in wanted.values()) and readers <= vias:
                # every reader of the constant reads it as these sizes: rewrite in place
                arr = read_array(v).copy()
                flat = arr.reshape(-1)
                for i, s in wanted.items():
                    flat[i] = next(iter(s))
                write_array(v, arr)
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
                a2 = read_array(v).copy()
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

    @staticmethod
    def _rewrite_attributes(node: ir.Node, items: list) -> int:
        """Size literals held in a node's attributes: each attribute on its own (an
        ``Attention``'s ``q_num_heads`` and ``kv_num_heads``), a list attribute (a ``Split``'s
        ``split``) element by element."""
        by_attr: dict[str, dict] = defaultdict(dict)
        for lu, new in items:
            idx = lu.ref[3] if len(lu.ref) > 3 else 0
            by_attr[lu.ref[2]][idx] = int(new)
        for name, values in by_attr.items():
            old = node.attributes[name]
            if old.type == ir.AttributeType.INTS:
                vals = [int(x) for x in old.value]
                for i, v in values.items():
                    vals[i] = v
                node.attributes[name] = ir.AttrInt64s(name, vals)
            else:
                node.attributes[name] = ir.AttrInt64(name, values.get(0, next(iter(values.values()))))
        return len(by_attr)

    def _literal_value_of(self, ref: tuple) -> ir.Value:
        if ref[0] == "node":
            return self.node(ref[1]).outputs[0]
        return self.values[ref[1]]

    # ------------------------------------------------------------------ shapes
    def fix_shapes(self) -> int:
        """Drop stale inferred shapes; recompute the declared shapes of the graph's outputs
        and inputs (a KV cache's head axis, a decoder's encoder output) from their atoms.
        Returns how many shapes changed."""
        g = self.rec.graph
        outs = set(g.outputs)
        changed = 0
        for n in g:
            for o in n.outputs:
                if o not in outs and o.shape is not None:
                    o.shape = None
                    changed += 1
        inits = set(g.initializers)
        for o in list(g.outputs) + [v for v in g.inputs if v.name not in inits]:
            ax = self.rec.ax.get(o)
            if ax is None or o.shape is None:
                continue
            dims_ = []
            for k, a in enumerate(ax):
                old = o.shape[k]
                sizes = [self.new_size(atom) for atom in dims.leaves(a)]
                if isinstance(old, int) and None not in sizes:
                    dims_.append(int(np.prod(sizes, dtype=np.int64)))
                else:  # a size computed at run time (declared static by the exporter): kept
                    dims_.append(old)
            if list(o.shape.dims) != dims_:
                o.shape = ir.Shape(dims_)
                changed += 1
        return changed

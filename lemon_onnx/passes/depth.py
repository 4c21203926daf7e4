"""Depth expansion pass: splice identity-equivalent twin blocks into the residual chain.

A twin is a full copy of its source block's subgraph (own initializers, unique names) that
reads the source block's output and whose branch outputs are exactly zero:
- ``cancel`` (default, LEMON): fan-out rows of replicated units sum to zero (R - mean R), so the
  out/down projections are non-zero but cancel; without width growth units are paired (+R/-R)
  and the twin's fan-in makes each pair compute the same activation.
- ``zero``: all-zero attention out-projection and MLP down-projection (and biases).
Pre-norm blocks are then exact.  Post-norm blocks follow LEMON's recipe (the source block's last
LayerNorm becomes the identity affine, the twin's first LayerNorm too, the twin's last
LayerNorm takes the source's gamma and beta): exact only up to O(epsilon / variance).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx_ir as ir

from .. import lemon_math as lm
from ..errors import PlanError
from ..graph import copy_attr
from ..components import cache, norm, residual
from ..components.linear import Linear
from ..recognize import Recognizer
from ..tensors import LAZY_BYTES, apply_fn, lazy_tensor, read_array, write_array
from .maps import Maps
from .recognition import recognized
from .streaming import SharedResult, keep_together


def plan_depth(L: int, L_target: int, placement: str) -> list[tuple[int, int]]:
    """The final layer order: a list of (source block, copy number) with copy 0 the original.

    interleave (LEMON): the last L'-L blocks each get a twin right after them; factors above 2
    repeat the step on the grown chain.  top: copies of the last L'-L blocks stacked after the
    final block.  uniform: twins after evenly spaced blocks.
    """
    order = [(i, 0) for i in range(L)]
    copies = {i: 0 for i in range(L)}

    def twin_of(entry):
        src = entry[0]
        copies[src] += 1
        return (src, copies[src])

    if placement == "interleave":
        while len(order) < L_target:
            n_new = min(L_target - len(order), len(order))
            start = len(order) - n_new
            new_order = []
            for pos, e in enumerate(order):
                new_order.append(e)
                if pos >= start:
                    new_order.append(twin_of(e))
            order = new_order
    elif placement == "top":
        n = L_target - L
        base = list(order)
        tail = [twin_of(base[(L - n % L + j) % L] if n < L else base[j % L]) for j in range(n)]
        order = order + tail
    elif placement == "uniform":
        while len(order) < L_target:
            n_new = min(L_target - len(order), len(order))
            picks = {int(round((j + 0.5) * len(order) / n_new - 0.5)) for j in range(n_new)}
            new_order = []
            for pos, e in enumerate(order):
                new_order.append(e)
                if pos in picks:
                    new_order.append(twin_of(e))
            order = new_order
    else:
        raise PlanError(f"unknown placement {placement!r}", hint="Use interleave, top or uniform.")
    return order


@dataclasses.dataclass
class DepthResult(ir.passes.PassResult):
    """What the depth pass did, beside the model, and what the plan records of it."""

    order: list = dataclasses.field(default_factory=list)  # (source block, copy number)
    renamed: dict = dataclasses.field(default_factory=dict)  # cache names renumbered
    twin_caches: list = dataclasses.field(default_factory=list)  # (slot, input, output)
    #: source block -> the position in the new chain where its hidden state is reproduced
    blocks: dict = dataclasses.field(default_factory=dict)
    #: the source block of each layer of the new chain
    layer_sources: list = dataclasses.field(default_factory=list)
    exact: bool = True  # False: Post-LN twins (LEMON's recipe, approximate)
    notes: list = dataclasses.field(default_factory=list)


class DepthPass(ir.passes.InPlacePass):
    """Splices twin blocks into the residual chain in place (onnx-ir's pass protocol).  Each
    component makes its own part of a twin compute nothing (``residual.twin``, which asks
    ``attention.twin`` and ``mlp.twin``; ``norm.twin_post_norm`` for Post-LN)."""

    def __init__(self, plan, maps: Maps | None = None):
        """Options: the plan, and its maps where the expansion also widens (None: depth
        only).  ``call`` takes a model that carries its recognition (``passes.recognition``:
        the index and the description whose blocks it twins)."""
        super().__init__()
        self.plan, self.maps = plan, maps
        self.start_run()

    def start_run(self) -> None:
        """This run's bookkeeping."""
        self.silent: dict[str, tuple[int, int]] = {}  # unit -> (zero-initialised, total)
        # computed weights read by their block and its twins: computed once when saved
        self.shared: dict[ir.Value, SharedResult] = {}
        # each copied initializer and its copies, written next to each other
        self.copies: dict[ir.Value, list] = {}
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """A note for the plan (once)."""
        if text not in self.notes:
            self.notes.append(text)

    def rng(self, *parts) -> np.random.Generator:
        h = hashlib.sha256(repr((self.plan.seed, "depth") + parts).encode()).digest()
        return np.random.default_rng(int.from_bytes(h[:8], "little"))

    # -------------------------------------------------------------- graph plumbing
    def snapshot(self, rec: Recognizer, blocks) -> None:
        """Each block's nodes (those on paths from its input to its output, in graph order)
        and their inputs, taken before the graph is changed."""
        self._snap = {}
        for b in blocks:
            inside = rec.branch_nodes(rec.values[b.input], rec.values[b.output])
            # a KV cache's way in and out (a twin layer gets its own: components/cache.py)
            inside |= {rec.node(n) for s in self._caches(b) for n in s.nodes}
            # nodes off the stream that the block owns (a cross-attention's K and V from the
            # encoder output): a twin gets its own
            inside |= {rec.node(n) for n in residual.owned_off_stream(b)}
            self._snap[b.index] = [(n, list(n.inputs)) for n in self.graph if n in inside]

    def _caches(self, b) -> list:
        return [s for s in self.desc.caches if s.block == b.index]

    def clone_block(self, rec: Recognizer, b, tag: str, new_input: ir.Value,
                    seed: dict | None = None):
        """Copy the block's nodes (and float initializers) reading ``new_input`` (and the
        values of ``seed`` in place of its keys: a twin's own cache inputs)."""
        vals = rec.values
        x = vals[b.input]
        snap = self._snap[b.index]
        mapping: dict[ir.Value, ir.Value] = {x: new_input, **(seed or {})}
        new_nodes = []
        inside = {n for n, _ in snap}
        for n, inputs in snap:
            ins = []
            for v in inputs:
                while v is not None and v.producer() is not None and v not in mapping and \
                        v.producer().op_type == "Identity" and v.producer() not in inside:
                    # a weight shared by several layers, read through an Identity the
                    # exporter put outside the block (ALBERT): the twin gets its own copy
                    v = v.producer().inputs[0]
                if v is None:
                    ins.append(None)
                elif v in mapping:
                    ins.append(mapping[v])
                elif v.is_initializer() and v.const_value is not None and \
                        v.const_value.dtype.is_floating_point() and v.const_value.size > 1:
                    name = f"{v.name}__{tag}"
                    orig = v.const_value
                    if orig.nbytes >= LAZY_BYTES and isinstance(orig, ir.LazyTensor):
                        t = self._share(v, name)  # computed once for the block and its twins
                    elif orig.nbytes >= LAZY_BYTES:  # copied when saved, not now
                        t = lazy_tensor(orig, np.array, tuple(orig.shape), name)
                    else:
                        t = ir.tensor(read_array(v).copy(), name=name)
                    nv = ir.Value(name=name, shape=ir.Shape(tuple(orig.shape)), type=v.type,
                                  const_value=t)
                    self.graph.register_initializer(nv)
                    self.copies.setdefault(v, [v]).append(nv)
                    mapping[v] = nv
                    ins.append(nv)
                else:
                    ins.append(v)
            attrs = [copy_attr(a) for a in n.attributes.values()]
            nn = ir.Node(n.domain, n.op_type, ins, attrs, num_outputs=len(n.outputs),
                         name=f"{n.name}__{tag}", overload=n.overload, version=n.version,
                         metadata_props=dict(n.metadata_props))  # exporter's provenance
            for o_old, o_new in zip(n.outputs, nn.outputs):
                o_new.name = f"{o_old.name}__{tag}"
                o_new.type = o_old.type
                mapping[o_old] = o_new
            new_nodes.append(nn)
        return new_nodes, mapping

    def _share(self, v: ir.Value, name: str) -> ir.LazyTensor:
        """A lazy copy of ``v``'s computed tensor that shares one evaluation with ``v`` (and
        with the other twins of its block): streaming.py, rule 3."""
        if v not in self.shared:
            self.shared[v] = SharedResult(v.const_value)
            v.const_value = self.shared[v].reader(v.name)
        return self.shared[v].reader(name)

    # -------------------------------------------------------------- the pass
    def requires(self, model: ir.Model) -> None:
        recognized(model, "DepthPass")

    def call(self, model: ir.Model) -> "DepthResult":
        # this run's model: its index and description
        self.rec, self.desc = recognized(model, "DepthPass")
        self.graph = self.rec.graph
        self.start_run()
        return self._run()

    def _run(self) -> "DepthResult":
        desc, plan = self.desc, self.plan
        L, Lt = desc.num_layers, plan.target["layers"]
        order = plan_depth(L, Lt, plan.depth_placement or "interleave")
        rec = self.rec
        blocks = {b.index: b for b in desc.blocks}
        self.snapshot(rec, desc.blocks)
        # current output of each chain position; build by walking the final order
        vals = rec.values
        prev_out: ir.Value | None = None
        post = desc.layout == "post-norm"
        placed: dict[str, int] = {}  # source block -> its position in the new chain
        prev_norm = None  # post-norm: (gamma value, beta value, nodes) of the previous block's last norm
        twins: dict = {}  # (source block, copy) -> the twin's own caches
        for pos, (src, copy_no) in enumerate(order):
            b = blocks[src]
            if copy_no == 0:
                placed[str(src)] = pos
                prev_out = vals[b.output]
                if post and b.mlp_post_norm is not None:
                    n = b.mlp_post_norm
                    prev_norm = (vals.get(n.gamma), vals.get(n.beta), n.nodes, {})
                continue
            tag = f"twin{copy_no}_b{src}"
            inp = prev_out
            seed = cache.twin_inputs(self, self._caches(b), tag)
            new_nodes, mapping = self.clone_block(rec, b, tag, inp, seed)
            twins[(src, copy_no)] = cache.twin_outputs(self, self._caches(b), mapping)
            out_new = mapping[vals[b.output]]
            # consumers of the previous output now read the twin's output
            consumers = [(u.node, u.idx) for u in list(inp.uses())
                         if u.node not in new_nodes]
            anchor = inp.producer()
            self.graph.insert_after(anchor, new_nodes)
            for node, idx in consumers:
                node.replace_input_with(idx, out_new)
            outs = list(self.graph.outputs)
            for k, o in enumerate(outs):
                if o is inp:
                    self.graph.outputs[k] = out_new
                    out_new.name, inp.name = inp.name, inp.name + f"__before_{tag}"
                    out_new.shape = inp.shape
            residual.twin(self, b, mapping, tag)
            if post:
                prev_norm = norm.twin_post_norm(self, b, mapping, prev_norm)
            prev_out = out_new
        renamed = cache.renumber(self, desc.caches, twins, order) if desc.caches else {}
        self.graph.sort()
        keep_together(self.graph, self.copies.values())
        # a source block's hidden state is reproduced at the end of the run of twins that
        # follows it (Post-LN: only there, since the affine of its last norm moved to the twin)
        for key, p in list(placed.items()):
            while p + 1 < len(order) and order[p + 1][1] > 0:
                p += 1
            placed[key] = p
        if post:
            self.note(
                "Post-LN depth expansion follows LEMON's recipe; it is exact only up to "
                "O(epsilon / variance) of the stream (see the verification report for the "
                "measured error).")
        silent = [f"{z} of {n} {'attention heads' if u == 'head' else 'MLP units'}"
                  for u, (z, n) in self.silent.items() if z]
        if silent:
            why = ("--depth-init zero" if plan.depth_init == "zero" else
                   "LEMON's cancelling init leaves units without a partner at zero")
            self.note(" and ".join(silent) + " in the twin blocks start with all-zero "
                              f"output weights ({why}): their input weights get no gradient "
                              "until those rows move.")
        return DepthResult(
            self.rec.model, modified=any(copy for _, copy in order), order=order,
            renamed=renamed, twin_caches=[(slot, renamed.get(i, i), renamed.get(o, o))
                                          for made in twins.values() for slot, i, o in made],
            blocks=placed, layer_sources=[src for src, _ in order], exact=not post,
            notes=list(self.notes))

    def _weight(self, mapping, lin: Linear) -> ir.Value:
        return mapping[self.rec.values[lin.weight]]

    def _bias(self, mapping, lin: Linear) -> ir.Value | None:
        return mapping.get(self.rec.values[lin.bias]) if lin.bias else None


    def _mixed_roles(self) -> set:
        if not hasattr(self, "_mixed"):
            self._mixed = mixed_roles(self.rec.ax, self.desc.roles)
        return self._mixed

    def zero_branch(self, lin: Linear, mapping, init: str, unit: str, fanin: list, tag: str):
        wv = self._weight(mapping, lin)
        in_axis = 0 if lin.weight_layout == "in,out" else 1
        n_in = tuple(wv.shape)[in_axis]
        bv = self._bias(mapping, lin)
        if bv is not None:
            write_array(bv, np.zeros_like(read_array(bv)))
        desc = self.desc
        unit_size = desc.head_dim if unit == "head" else 1
        if init == "zero":
            self._write_fanout(wv, lm.zero_fanout, in_axis, unit, unit_size)
            return
        role = "heads" if unit == "head" else "ffn"
        if role in self._mixed_roles():
            # an operator mixes these units: replicas or pairs would not compute the same
            # activation, so sum-to-zero rows would not cancel
            self._write_fanout(wv, lm.zero_fanout, in_axis, unit, unit_size)
            note = (f"twin blocks start with zero {unit} fan-out: an operator lemon-onnx does "
                    f"not model mixes the {role} axis, so cancelling pairs would not cancel")
            self.note(note)
            return
        wmap = None if self.maps is None else self.maps.q if unit == "head" else self.maps.ffn
        if unit == "head" and wmap is None and desc.heads != desc.kv_heads:
            g = desc.heads // desc.kv_heads
            if g % 2:
                # pairs would straddle KV groups: fall back to zero fan-out for this branch
                self._write_fanout(wv, lm.zero_fanout, in_axis, unit, unit_size)
                return

        def cancel(W, in_axis=in_axis, wmap=wmap, unit_size=unit_size, tag=tag):
            return lm.cancel_fanout(W, in_axis, wmap, rng=self.rng(tag), unit_size=unit_size,
                                    noise_scale=self.plan.noise_scale)

        self._write_fanout(wv, lambda W: cancel(W)[0], in_axis, unit, unit_size)
        # which rows are paired depends on the sizes only: a small stand-in tells
        _, fanin_src = cancel(_stand_in(n_in, in_axis))
        if wmap is not None or np.array_equal(fanin_src, np.arange(len(fanin_src))):
            return
        # no width growth: make paired units compute the same activation
        gqa = unit == "head" and desc.heads != desc.kv_heads
        for f in fanin:
            if gqa and f is not fanin[0]:
                continue  # paired q heads share their KV head already; K and V stay
            parts = f.out_features // len(fanin_src)
            if f.out_features % len(fanin_src) or parts not in (1, 2, 3):
                continue  # 3: a fused q|k|v, 2: a fused gate|up; pair units in each part
            axis = 1 if f.weight_layout == "in,out" else 0
            _derive(self._weight(mapping, f),
                    lambda a, axis=axis, parts=parts: _take_units(a, fanin_src, axis, parts))
            fb = self._bias(mapping, f)
            if fb is not None:
                write_array(fb, _take_units(read_array(fb), fanin_src, -1, parts))

    def _write_fanout(self, wv: ir.Value, fn, in_axis: int, unit: str,
                      unit_size: int) -> None:
        """Replace a twin's out/down weights by ``fn(weights)`` (when saved, for a large
        tensor), counting the units whose rows are all zero: they start silent (their fan-in
        gets no gradient until the rows move).  Which rows are zero depends on the sizes and
        the rule only, so it is read off ``fn`` applied to a small stand-in."""
        _derive(wv, fn)
        n_in = tuple(wv.shape)[in_axis]
        W = fn(_stand_in(n_in, in_axis))
        rows = np.moveaxis(W, in_axis, 0).reshape(n_in // unit_size, -1)
        silent, total = self.silent.get(unit, (0, 0))
        self.silent[unit] = (silent + int(np.all(rows == 0, axis=1).sum()), total + len(rows))


def _stand_in(n_in: int, in_axis: int) -> np.ndarray:
    """Weights of the right input size and two columns, for the structure of a fan-out rule."""
    return np.ones((n_in, 2) if in_axis == 0 else (2, n_in))


def _derive(v: ir.Value, fn) -> None:
    """``v``'s tensor becomes ``fn`` of it: lazily (when saved) when large, else now."""
    t = v.const_value
    if t is not None and t.nbytes >= LAZY_BYTES:
        v.const_value = lazy_tensor(t, fn, tuple(t.shape), v.name)
    else:
        write_array(v, apply_fn(fn, read_array(v)))


def mixed_roles(ax, named) -> set:
    """Size roles (ffn, heads, ...) that some operator mixes: an operator the axis analysis
    does not model touching an axis of that role, or CumSum/Softmax/... along it (``named``:
    the description's ``dims.Roles``)."""
    roles: set = set()

    def add(value, axis=None):
        axes = ax.axes.get(value) or []
        picked = axes if axis is None else ([axes[axis % len(axes)]] if axes else [])
        for a in picked:
            roles.update(named.named(a))

    for node in ax.unhandled:
        for v in list(node.inputs) + list(node.outputs):
            if v is not None:
                add(v)
    for node, x, axis in ax.axis_ops:
        add(x, axis)
    return roles


def _take_units(arr: np.ndarray, src: np.ndarray, axis: int, parts: int) -> np.ndarray:
    """Re-select output units along ``axis`` by ``src``, separately in each of ``parts``
    equal slices (a fused q|k|v projection holds three unit axes side by side)."""
    return np.concatenate([np.take(p, src, axis=axis) for p in np.split(arr, parts, axis=axis)],
                          axis=axis)

"""The expanded model's tensors as the target architecture's parameters.

``assemble`` pairs every stored constant of the expanded graph with the probe's (``refs.py``
keys; block p of the expanded model with block min(p, probe layers - 1) of the probe), and:

- a constant the probe binds to a parameter gives that parameter, in the parameter's own form
  (``Binding`` inverted: transposed back, reshaped, put back into its slice or elements of a
  fused tensor, ``(stored - b) / a`` for a norm stored as 1 + w or a folded scale);
- a constant that holds no parameter in the probe is what the architecture computes by itself:
  it must equal the expanded model's, or be made equal:
  * a norm's constant gamma/beta (a norm without weight, which a fractional width gave a
    gamma): folded into the fan-in of the linear layers that read the norm (W' = diag(g) W,
    b' = b + beta W), when every reader is one;
  * a scalar multiplier computed from the config (Gemma's sqrt(hidden) on the embeddings):
    the ratio is folded into the parameter it multiplies; a tied table is then untied;
  * anything else (ALiBi slopes, sinusoidal tables, an epsilon the config does not reach):
    ``HandoffError`` (exit 2) naming it, with the expansion that can be written;
- numbers the descriptions hold (norm epsilons) must agree the same way.

Block names of layers the probe does not have come from its last two layers: the one dotted
component that holds their index is replaced by the new layer's.  Every parameter of the
target architecture (built on the meta device from the full config) must be produced, at its
shape: a missing one is an error naming it, never a silently initialised weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..graph import const_tensor
from .errors import HandoffError
from .probe import Binding, Probe
from .refs import Key, Refs

#: constants equal to the architecture's within this (relative to their largest element)
CONST_RTOL = 1e-6
#: ops a value passes through unchanged in meaning, walking from a scale to its table
_VIEW = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Gather", "Flatten",
         "Transpose"}


@dataclasses.dataclass
class Piece:
    key: Key  # the expanded model's key
    value: ir.Value  # its stored constant
    binding: Binding  # of the constant as its reader computes with it (``view`` applied)
    view: tuple | None = None  # axes permutation from the stored constant to what is read
    fold: tuple | None = None  # (axis, vector): the stored tensor times a norm's gamma

    def read(self, fold: bool = True) -> np.ndarray:
        """The stored constant (times a folded gamma) as its reader computes with it."""
        x = array(self.value)
        if fold and self.fold is not None:
            axis, g = self.fold
            shape = [1] * x.ndim
            shape[axis] = -1
            x = x.astype(np.float64) * g.reshape(shape)
        return np.transpose(x, self.view) if self.view is not None else x


@dataclasses.dataclass
class Param:
    name: str
    shape: tuple
    block: int | None
    pieces: list
    ratio: float = 1.0  # a scale folded in (the architecture computes the other part)
    initial: np.ndarray | None = None  # no piece: not read by the forward, written as it starts
    rounded: bool | None = None  # set by produce(): the stored form does not invert exactly
    unset: int = 0  # set by produce(): elements no stored constant gives (written as 0)
    bias_fold: list = dataclasses.field(default_factory=list)  # (beta, the weight's piece)


@dataclasses.dataclass
class Assembly:
    params: dict  # name -> Param
    notes: list
    left_out: list  # [{onnx, shape, why}]


class Unplaced(HandoffError):
    """Parameters of the target architecture that no constant of the expanded graph gives."""


class NeedsUntie(Exception):
    """A scale must be folded into a table the head shares: rebuild the probe untied."""


def array(v: ir.Value) -> np.ndarray:
    """A stored constant's values (an initializer, or a Constant node's output)."""
    return np.asarray(const_tensor(v).numpy())


def _shape(v: ir.Value) -> tuple:
    return tuple(int(d) for d in const_tensor(v).shape)


def probe_block(p: int, n: int) -> int:
    return p if p < n else n - 1


class _Names:
    """Parameter names of expanded block p from the probe's block q = min(p, n - 1)."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.n = probe.layers

    def name(self, binding: Binding, key: Key, p: int) -> str:
        q = probe_block(p, self.n)
        if p == q:
            return binding.param
        prev = self.probe.bindings.get(Key(q - 1, key.path)) if q >= 1 else None
        if prev is None:
            raise HandoffError(
                f"block {p} of the expanded model has {key.path!r}, which only the last of "
                f"the probe's {self.n} layers has, so its parameter's name for layer {p} is "
                "not known.", hint="Report it with the config.json.")
        a, b = prev.param.split("."), binding.param.split(".")
        if a == b:
            return binding.param  # one parameter shared by all layers
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(a) != len(b) or len(diff) != 1 or (a[diff[0]], b[diff[0]]) != (str(q - 1),
                                                                              str(q)):
            raise HandoffError(
                f"the parameters of layers {q - 1} and {q} ({prev.param}, {binding.param}) do "
                "not differ in one layer index, so layer "
                f"{p}'s name cannot be derived.", hint="Report it with the config.json.")
        b[diff[0]] = str(p)
        return ".".join(b)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return a.size == b.size and _close(a.reshape(-1), b.reshape(-1))
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    return bool(np.all(np.abs(a - b) <= CONST_RTOL * scale + 1e-30))


def assemble(model: ir.Model, desc, refs: Refs, probe: Probe, expected: dict,
             describe_fix: Callable[[str], str], eps_factor: float = 1.0) -> Assembly:
    """Pair the expanded model's constants with the probe's; ``expected``: {parameter name:
    shape} of the full target architecture.  ``describe_fix(kind)`` words the expansion that
    can be written when a constant cannot ("heads", "hidden", "epsilon").  Raises
    ``NeedsUntie`` when a scale must go into a table the head shares."""
    return _Assembler(model, desc, refs, probe, describe_fix, eps_factor).run(expected)


class _Assembler:
    def __init__(self, model, desc, refs, probe, describe_fix, eps_factor):
        self.model, self.desc, self.refs, self.probe = model, desc, refs, probe
        self.eps_factor = eps_factor
        self.describe_fix = describe_fix
        self.values = {o.name: o for n in model.graph for o in n.outputs}
        self.values.update(model.graph.initializers)
        self.params: dict[str, Param] = {}
        self.notes: list[str] = []
        self.left_out: list[dict] = []

    def run(self, expected: dict) -> Assembly:
        names = _Names(self.probe)
        n = self.probe.layers
        mismatched = []
        for key, value in sorted(self.refs.consts.items()):
            pk = key if key.block < 0 else Key(probe_block(key.block, n), key.path)
            b = self.probe.bindings.get(pk)
            if b is not None:
                name = names.name(b, pk, key.block) if key.block >= 0 else b.param
                par = self.params.get(name)
                if par is None:
                    par = self.params[name] = Param(name, b.shape, key.block if key.block >= 0
                                                    else None, [])
                self.check_shape(key, value, b)
                par.pieces.append(Piece(key, value, b, self.refs.views.get(key)))
                continue
            c = self.probe.constants.get(pk)
            if c is None:
                if not key.path.startswith("~"):
                    self.left_out.append({"onnx": value.name, "shape": list(_shape(value)),
                                          "key": str(key), "why": "the architecture's graph "
                                          "has no such constant (the verification decides)"})
                continue
            got = array(value)
            got = self.refs.read(key, got)
            if not _close(got, c):
                c = self.paired(key, pk, got, c)
                if c is not None:
                    mismatched.append((key, value, c))
        for key, value, c in mismatched:
            self.fix_constant(key, value, c)
        self.absent_scales()
        _numbers(self.refs, self.probe, self.describe_fix)
        _check_complete(self.params, expected, self.probe, self.notes)
        return Assembly(self.params, self.notes, self.left_out)

    def paired(self, key: Key, pk: Key, got: np.ndarray, c: np.ndarray):
        """The probe's constant to compare ``got`` with.  A described key pairs one to one; a
        positional key (a rank within its signature) is checked against every probe constant
        of the same signature and shape (exporters order and fold them differently): one
        that equals it, else the only one of its shape, else None (no trusted pairing)."""
        if not key.path.startswith("~"):
            return c
        stem = pk.path.rsplit("#", 1)[0]
        same = [x for k, x in self.probe.constants.items() if k.block == pk.block and
                k.path.rsplit("#", 1)[0] == stem and np.shape(x) == np.shape(got)]
        if any(_close(got, x) for x in same):
            return None
        return same[0] if len(same) == 1 else None

    def check_shape(self, key: Key, value: ir.Value, b: Binding) -> None:
        shape = _shape(value)
        view = self.refs.views.get(key)
        if view is not None:
            shape = tuple(shape[i] for i in view)
        want = b.index.shape if b.index is not None else None
        if want is not None:
            ok = shape == want
        elif len(shape) == len(b.shape):  # the parameter itself, or transposed
            ok = shape == (tuple(b.shape)[::-1] if b.transposed else tuple(b.shape))
        else:  # reshaped
            ok = int(np.prod(shape)) == int(np.prod(b.shape))
        if not ok:
            want_shape = tuple(want if want is not None else b.shape)
            if b.transposed or len(shape) != len(want_shape):
                want_shape = want_shape[::-1]
            changed = {(w, g) for w, g in zip(want_shape, shape) if w != g}
            keys = [f"{k}={v} (the expanded model has {g} there)" for k, v in
                    sorted(self.probe.config.items()) for w, g in changed
                    if isinstance(v, int) and not isinstance(v, bool) and v == w]
            raise HandoffError(
                f"the expanded model's {value.name} ({key}) has shape {list(shape)}, but "
                f"transformers' {self.probe.cls_name} built from the expanded config holds it "
                f"in {b.param} of shape {list(b.shape)}: the expansion changed a size the "
                "config.json names under a key lemon-onnx does not update"
                + (f" (maybe {'; '.join(keys[:3])})" if keys else "") + ".",
                hint="Report it with the config.json; the expanded ONNX model itself is "
                     "unaffected.")

    def absent_scales(self) -> None:
        """A scalar multiplier the architecture applies that the expanded graph does not have
        (an export that left out GraniteForCausalLM's logits scaling): the expanded model
        multiplies by 1 there."""
        n = self.probe.layers
        blocks = len(self.desc.blocks)
        for pk, c in self.probe.constants.items():
            reader = self.probe.refs.readers.get(pk)
            if c.size != 1 or reader is None or reader[0].op_type not in ("Mul", "Div") or \
                    not pk.path.startswith("~") or "<>" in pk.path:
                continue
            up = pk.path.split("<", 1)[1].split(">", 1)[0]
            where = [pk.block] if pk.block < 0 or pk.block < n - 1 else \
                list(range(pk.block, blocks))
            for p in where:
                if Key(p, pk.path) in self.refs.consts:
                    continue
                operand = self.refs.anchors.get(Key(p, up))
                want = float(c.reshape(-1)[0])
                if operand is None or want in (0.0, 1.0):
                    continue
                self.fold_scale(reader[0].op_type, reader[1], 1.0, want,
                                self.values.get(operand), f"{reader[0].op_type} by {want:g} "
                                "(absent from the expanded graph)")

    # ------------------------------------------------------------------------- constants
    def fix_constant(self, key, value, c) -> None:
        got = self.refs.read(key, array(value))
        norm = _norm_of(self.desc, value)
        if norm is not None:
            self.fold_norm(*norm, got, c, value)
            return
        reader = self.refs.readers.get(key)
        if got.size == 1 and c.size == 1 and reader is not None and \
                reader[0].op_type in ("Mul", "Div"):
            node, slot = reader
            other = [i for k, i in enumerate(node.inputs) if k != slot and i is not None]
            self.fold_scale(node.op_type, slot, float(got.reshape(-1)[0]),
                            float(c.reshape(-1)[0]), other[0] if len(other) == 1 else None,
                            f"{node.op_type} node {node.name}")
            return
        where = f"read by {reader[0].op_type} node {reader[0].name}" if reader else str(key)
        kind = "heads" if "attention" in key.path or "score" in key.path else "hidden"
        if got.size == 1 and c.size == 1 and self.eps_factor != 1.0 and float(c) != 0 and \
                math.isclose(float(c) / float(got), self.eps_factor, rel_tol=1e-5):
            kind = "epsilon"  # a norm's epsilon the config's rescaled one reaches too
        raise HandoffError(
            f"the expanded model's constant {value.name} {list(got.shape)} ({where}) differs "
            f"from what transformers' {self.probe.cls_name} computes there from its config "
            f"(largest difference {float(np.max(np.abs(got.astype(np.float64) - c))):.3g}): "
            "the architecture has no parameter to hold the expanded values, so it cannot "
            "compute the expanded model.", hint=self.describe_fix(kind))

    def fold_norm(self, nrm, what, got, c, value) -> None:
        """A norm whose gamma (beta) the architecture fixes (no weight): the expanded values
        go into the fan-in of the linear layers that read the norm's output."""
        out = self.values.get(nrm.output)
        readers = [lin for lin in _linears(self.desc) if lin.input == nrm.output]
        consumers = _consumers(out) if out is not None else []
        mine = {lin.node for lin in readers}
        others = sorted({n_.op_type for n_ in consumers if n_.name not in mine})
        if not readers or others:
            raise HandoffError(
                f"the norm with {what} {value.name} has no {what} parameter in transformers' "
                f"{self.probe.cls_name} (a norm without weight), and the expanded model needs "
                f"one: its output also feeds {', '.join(others) or 'no linear layer'}, so the "
                "values cannot be folded into linear layers' weights.",
                hint=self.describe_fix("epsilon"))
        c = np.asarray(c, np.float64).reshape(-1)
        g = np.asarray(got, np.float64).reshape(-1)
        for lin in readers:
            wpiece = self.piece_of(lin.weight, lin.node)
            if wpiece.read().shape[0] != g.size:  # read as [in, out]: the fan-in is axis 0
                raise HandoffError(f"{lin.node} does not read the norm {value.name} as a "
                                   "whole vector (a bug).")
            if what == "gamma":
                if np.any(c == 0):
                    raise HandoffError(f"the norm's fixed gamma {value.name} has zeros.")
                # the fan-in is the read tensor's axis 0: that axis of the stored tensor, in
                # every piece that holds it (the same constant under several keys)
                axis = wpiece.view[0] if wpiece.view is not None else 0
                for pc in self.owner(wpiece).pieces:
                    if pc.value is wpiece.value:
                        pc.fold = (axis, g / c)
            else:
                if lin.bias is None:
                    raise HandoffError(
                        f"the norm with beta {value.name} has no beta parameter in "
                        f"transformers' {self.probe.cls_name}, and the linear layer "
                        f"{lin.node} that reads it has no bias to take it.",
                        hint=self.describe_fix("epsilon"))
                bpiece = self.piece_of(lin.bias, lin.bias_node)
                self.owner(bpiece).bias_fold.append((g - c, wpiece))
        self.notes.append(f"the norm's {what} {value.name} has no parameter in "
                          f"{self.probe.cls_name}; folded into the fan-in of "
                          f"{', '.join(lin.node for lin in readers)}")

    def piece_of(self, name: str, node: str) -> Piece:
        """The piece of the stored constant ``name`` as read by ``node``."""
        found = None
        for par in self.params.values():
            for pc in par.pieces:
                if pc.value.name == name:
                    r = self.refs.readers.get(pc.key)
                    if r is not None and r[0].name == node:
                        return pc
                    found = found or pc
        if found is None:
            raise HandoffError(f"no parameter holds {name} (a bug).")
        return found

    def owner(self, piece: Piece) -> Param:
        return next(p for p in self.params.values() if any(pc is piece for pc in p.pieces))

    def fold_scale(self, op: str, slot: int, got: float, want: float, operand,
                   where: str) -> None:
        """A scalar the architecture computes from its config (``want``) where the expanded
        model has ``got``: the ratio goes into what it multiplies, a table (through Gather
        and views) or a linear layer's weight and bias."""
        ratio = got / want if op == "Mul" or slot == 0 else want / got
        targets = self.scale_targets(operand) if operand is not None else []
        if not targets:
            raise HandoffError(
                f"at {where} the expanded model has {got:g} where transformers' "
                f"{self.probe.cls_name} computes {want:g} from its config, and no parameter "
                "is multiplied there to take the ratio.", hint=self.describe_fix("hidden"))
        for par in targets:
            pname = par.pieces[0].binding.param
            if pname in self.probe.aliases.values() or pname in self.probe.aliases:
                raise NeedsUntie(par.name)
            par.ratio *= ratio
            self.notes.append(f"{par.name} holds the factor {ratio:.9g}: at {where} the "
                              f"expanded model has {got:g} where the architecture computes "
                              f"{want:g} from the config")

    def scale_targets(self, v: ir.Value) -> list:
        """The parameters a scale on ``v`` can move into: the table ``v`` is read from, or
        the weight and bias of the linear layer that computes ``v``."""
        found = _table_behind(v)
        if found is not None:
            table, hop = found
            try:
                return [self.owner(self.piece_of(table.name, hop.name))]
            except (HandoffError, StopIteration):
                return []
        for lin in _linears(self.desc):
            if lin.output == v.name:
                out = []
                for name, node in ((lin.weight, lin.node), (lin.bias, lin.bias_node)):
                    if name:
                        out.append(self.owner(self.piece_of(name, node)))
                return out
        return []


def _norm_of(desc, value: ir.Value):
    """(norm, "gamma" | "beta") when ``value`` is a norm's gamma or beta in ``desc``."""
    for nrm in _walk(desc, "Norm"):
        if nrm.gamma == value.name:
            return nrm, "gamma"
        if nrm.beta == value.name:
            return nrm, "beta"
    return None


def _linears(desc):
    return _walk(desc, "Linear")


def _walk(obj, cls: str):
    """Every description part of class ``cls`` (Norm, Linear) in ``obj``."""
    if type(obj).__name__ == cls:
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name not in ("size_literals", "lemon_plan"):
                yield from _walk(getattr(obj, f.name), cls)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _walk(x, cls)


class _GraphOutput:
    op_type = "a graph output"
    name = ""


def _consumers(v: ir.Value) -> list:
    """The nodes that compute with ``v`` (past Identity and Cast), and graph outputs."""
    out = []
    for use in v.uses():
        n = use.node
        if n.op_type in ("Identity", "Cast"):
            out += _consumers(n.outputs[0])
        else:
            out.append(n)
    if v.graph is not None and v in v.graph.outputs:
        out.append(_GraphOutput())
    return out


def _table_behind(v: ir.Value):
    """(the constant a multiplier's operand is read from, the node that reads it), through
    Gather (its data), views and casts."""
    hop = None
    for _ in range(12):
        if v is None:
            return None
        if v.const_value is not None or (v.producer() is not None and
                                         v.producer().op_type == "Constant"):
            return (v, hop) if hop is not None else None
        p = v.producer()
        if p is None or p.op_type not in _VIEW:
            return None
        hop, v = p, p.inputs[0]
    return None


def _numbers(refs: Refs, probe: Probe, describe_fix) -> None:
    n = probe.layers
    for key, x in refs.numbers.items():
        if not key.path.endswith("epsilon"):
            continue
        pk = key if key.block < 0 else Key(probe_block(key.block, n), key.path)
        y = probe.refs.numbers.get(pk)
        if y is None or abs(x - y) <= 1e-5 * max(abs(x), abs(y)):
            continue
        at = key
        if key.path.startswith("~"):  # a norm found by position: name its node
            node = refs.readers.get(Key(key.block, key.path.removesuffix(".epsilon")))
            at = f"{node[0].op_type} node {node[0].name}" if node else key
        raise HandoffError(
            f"the expanded model's norm at {at} has epsilon {x:.6g}, but transformers' "
            f"{probe.cls_name} built from the expanded config uses {y:.6g} there (its epsilon "
            "is not the config's, or the config has no epsilon key the expansion could "
            "rescale).", hint=describe_fix("epsilon"))


def _check_complete(params: dict, expected: dict, probe: Probe, notes: list) -> None:
    missing = sorted(set(expected) - set(params))
    unread = [m for m in missing if m in probe.initial]
    for name in unread:
        params[name] = Param(name, tuple(expected[name]), None, [],
                             initial=probe.initial[name])
    if unread:
        notes.append(f"{', '.join(unread)}: not read by {probe.cls_name}'s forward on these "
                     "inputs (so not in the ONNX graph); written with transformers' initial "
                     "values")
    missing = [m for m in missing if m not in probe.initial]
    extra = sorted(set(params) - set(expected))
    if missing:
        raise Unplaced(
            f"{len(missing)} parameter(s) of transformers' {probe.cls_name} have no tensor in "
            f"the expanded graph that lemon-onnx could place: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}; transformers would initialise them at "
            "random, so nothing was written.",
            hint="Report it with the config.json and the .onnx file.")
    if extra:
        raise HandoffError(f"tensors named {', '.join(extra[:6])} are no parameters of "
                           f"transformers' {probe.cls_name} (a bug).")
    for name, par in params.items():
        if tuple(expected[name]) != tuple(par.shape):
            raise HandoffError(
                f"{name}: the expanded model gives it shape {list(par.shape)}, transformers' "
                f"{probe.cls_name} built from the expanded config has {list(expected[name])}.",
                hint="Check that the config.json is the source model's.")


# ----------------------------------------------------------------------------- producing
def _inverse(piece: Piece) -> np.ndarray:
    """The parameter's part held by ``piece``, in float64, in the parameter's layout (whole
    parameter: its shape; selected elements: flat, in the index's order)."""
    x = piece.read().astype(np.float64)
    b = piece.binding
    x = (x - b.offset) / b.scale if (b.scale, b.offset) != (1.0, 0.0) else x
    if b.index is not None:
        return x.reshape(-1)
    if b.transposed:
        x = x.T
    return x.reshape(b.shape)


def produce(par: Param, dtype: np.dtype) -> np.ndarray:
    """The parameter's values from its pieces (checked to agree where they overlap)."""
    if par.initial is not None:
        return np.asarray(par.initial).reshape(par.shape).astype(dtype)
    n = int(np.prod(par.shape))
    out = np.zeros(n, np.float64)
    seen = np.zeros(n, bool)
    for piece in par.pieces:
        part = _inverse(piece)
        idx = piece.binding.index
        flat = np.arange(n) if idx is None else idx.reshape(-1)
        vals = part.reshape(-1)
        overlap = seen[flat]
        if overlap.any() and not np.allclose(out[flat][overlap], vals[overlap], rtol=1e-6,
                                             atol=1e-7 * max(1.0, float(np.abs(vals).max()))):
            other = ", ".join(str(p.key) for p in par.pieces if p is not piece)
            raise HandoffError(
                f"{par.name}: the expanded model holds it twice with different values ({piece.key}"
                f" and {other}): the target architecture has one parameter where the expanded "
                "model has two (for example a head it always ties to the embeddings).",
                hint="Expand with --keep-tie, or into an architecture that unties them.")
        out[flat] = vals
        seen[flat] = True
    for beta, wpiece in par.bias_fold:  # y = (x + beta) W: b' = b + beta W
        out = out + (beta @ wpiece.read(fold=False).astype(np.float64)).reshape(-1)
    if par.ratio != 1.0:
        out = out * par.ratio
    res = out.reshape(par.shape).astype(dtype)
    par.unset = int(n - seen.sum())
    par.rounded = _rounded(par, res)
    return res


def _rounded(par: Param, res: np.ndarray) -> bool:
    """Whether the stored form, applied to the written values, misses the expanded model's
    stored values anywhere (an offset or a factor undone in the storage dtype: 1 + w is
    exact for w in [-0.5, 1] by Sterbenz's lemma, a factor generally is not)."""
    if par.bias_fold or any(p.fold is not None for p in par.pieces):
        return True
    flat = res.astype(np.float64).reshape(-1) / par.ratio
    for p in par.pieces:
        b = p.binding
        x = flat if b.index is None else flat[b.index.reshape(-1)]
        if b.index is None:
            x = x.reshape(b.shape)
            x = x.T if b.transposed else x
        back = (x * b.scale + b.offset).astype(res.dtype).reshape(-1)
        if not np.array_equal(back, p.read().astype(res.dtype).reshape(-1)):
            return True
    return False

"""The target architecture, asked directly: which transformers parameter each stored tensor of
the expanded graph is, and in which stored form.

transformers builds the target architecture from the expanded config (a *probe*: the same
widths, at most ``PROBE_LAYERS`` layers), every parameter filled with values no other element
of the probe has; the probe is exported to ONNX by torch and recognised by lemon-onnx like any
model.  Each stored constant of the probe's graph then says, by its values alone, which
parameter it holds and how (``Binding``): the parameter itself (or reshaped), transposed, a
slice or any other selection of its elements (a fused QKV cut apart, a relative position
table gathered by fixed indices), or ``a * parameter + b`` (a norm stored as 1 + w, a
scale the exporter folded in).  A constant that holds no parameter is what the architecture
computes from its config (RoPE tables, ALiBi slopes, sinusoids, an embedding scale, a norm's
constant gamma); the caller compares it with the expanded model's.

Keys (``refs.py``) carry the correspondence to the expanded graph.  Needs torch and
transformers; everything here is cached per (config, class, exporter, inputs) for the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io as _io
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .. import io
from ..graph import const_tensor
from ..recognize import recognize
from . import refs as refs_mod
from .errors import HandoffError

#: layers of the probe: block 0, and two more to see how a layer's index enters its names
PROBE_LAYERS = 3
#: the probe's values: float32 bit patterns counted up from here (0.1), so that a stored value
#: names its parameter and element
_BASE_BITS = int(np.array(np.float32(0.1)).view(np.uint32))
#: small parameters (norm weights, biases) step this many bit patterns per element, so that
#: 1 + w (a norm stored with an offset) still differs between any two elements: at 0.1 a step
#: of 32 patterns is 2.4e-7, two float32 epsilons of 1 + w
_SMALL, _SMALL_STRIDE = 1 << 16, 32
#: head kind -> transformers' auto-class mappings to try, in order
TASKS = {
    "lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES",
           "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "mlm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "classifier": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                   "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                   "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
                   "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "none": ("MODEL_MAPPING_NAMES", "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES"),
}
MAX_CANDIDATES = 6
#: probes kept for the process (a test run hands off many models of a few configs)
CACHE_SIZE = 16


@dataclasses.dataclass
class Binding:
    """stored = scale * P[...] + offset, where P[...] is the parameter ``param`` (of shape
    ``shape``) transposed, reshaped, or its elements ``index`` (flat, the stored shape)."""

    param: str
    shape: tuple
    index: np.ndarray | None = None  # None: the parameter's elements in its own order
    transposed: bool = False
    scale: float = 1.0
    offset: float = 0.0

    @property
    def form(self) -> str:
        parts = []
        if self.transposed:
            parts.append("transposed")
        elif self.index is not None:
            parts.append(f"{self.index.size} of {int(np.prod(self.shape))} elements selected")
        if self.scale != 1.0:
            parts.append(f"x {self.scale:.9g}")
        if self.offset != 0.0:
            parts.append(f"{self.offset:+.9g}")
        return ", ".join(parts) or "as stored"


@dataclasses.dataclass
class Probe:
    cls_name: str
    config: dict  # the probe's config (the expanded one with PROBE_LAYERS layers at most)
    layers: int
    exporter: str
    desc: object
    refs: refs_mod.Refs
    bindings: dict  # Key -> Binding
    constants: dict  # Key -> np.ndarray: stored constants that hold no parameter
    params: dict  # parameter name -> shape (each shared parameter once)
    aliases: dict  # state_dict name -> the parameter it shares (tied weights)
    seconds: float
    unbound: list = dataclasses.field(default_factory=list)  # parameters in no constant
    #: the initial values of the unbound parameters (transformers' own initialisation): the
    #: forward did not read them (DINOv2's mask token), so they are written as they start
    initial: dict = dataclasses.field(default_factory=dict)


_CACHE: dict = {}


@contextlib.contextmanager
def quiet():
    """Silence exporter chatter (prints, warnings, logging)."""
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(_io.StringIO()), \
                contextlib.redirect_stderr(_io.StringIO()):
            try:
                yield
            finally:
                logging.disable(prev)


def candidates(model_type: str, head_kind: str, architectures=None) -> list[str]:
    """transformers classes that may be the target architecture, most likely first."""
    import transformers.models.auto.modeling_auto as auto

    out: list[str] = []

    def add(names):
        for n in ([names] if isinstance(names, str) else list(names or ())):
            if n and n not in out:
                out.append(n)

    add(architectures)
    for mapping in TASKS.get(head_kind, ()):
        add(getattr(auto, mapping, {}).get(model_type))
    for mappings in TASKS.values():
        for mapping in mappings:
            add(getattr(auto, mapping, {}).get(model_type))
    return out


def config_object(cfg: dict):
    import transformers

    mt = cfg.get("model_type")
    if mt not in transformers.CONFIG_MAPPING:
        raise HandoffError(f"the config's model_type {mt!r} is not one this transformers "
                           f"({transformers.__version__}) knows.",
                           hint="Upgrade transformers, or pass the config.json of a model "
                                "transformers implements.")
    c = transformers.CONFIG_MAPPING[mt].from_dict(
        {k: v for k, v in cfg.items() if k not in ("architectures",)})
    c._attn_implementation = "eager"
    return c


def probe_values(shapes: list) -> tuple[dict, dict, list]:
    """Values no two elements share, for parameters [(name, shape)]: float32 bit patterns
    counted up from ``_BASE_BITS``, dealt to each parameter's elements in a scrambled order of
    its own (no stored constant linear in its index, an arange, can pass for ``a * P + b``,
    and no parameter for an affine image of another of its size).  Returns ({name: array}, the
    layout {name: (offset, shape, multiplier, stride, shift)}, the (offset, name) table)."""
    arrays, table, layout = {}, [], {}
    offset = 0
    for k, (name, shape) in enumerate(shapes):
        n = int(np.prod(shape))
        m = _multiplier(n, k)
        shift = (k * 7919) % n if n else 0
        stride = _SMALL_STRIDE if n <= _SMALL else 1
        code = (np.arange(n, dtype=np.int64) * m + shift) % max(n, 1)  # element j: code[j]
        bits = (_BASE_BITS + offset + code * stride).astype(np.uint32)
        arrays[name] = bits.view(np.float32).reshape(tuple(shape))
        layout[name] = (offset, tuple(shape), m, stride, shift)
        table.append((offset, name))
        offset += n * stride
    return arrays, layout, table


def _fill(model) -> tuple[dict, dict, list, dict]:
    """``probe_values`` into the model's parameters (each shared parameter once); returns the
    values, layout, table and the values they replaced (transformers' initialisation)."""
    import torch

    params = list(model.named_parameters())
    arrays, layout, table = probe_values([(n, tuple(p.shape)) for n, p in params])
    init = {}
    with torch.no_grad():
        for name, p in params:
            init[name] = p.detach().clone()
            p.copy_(torch.from_numpy(arrays[name]).to(p.dtype))
    return arrays, layout, table, init


def _multiplier(n: int, k: int) -> int:
    """A multiplier coprime with ``n``, different for each parameter index ``k``: j -> j*m
    mod n scrambles 0..n-1."""
    import math

    if n <= 1:
        return 1
    m = max(1, int(n * (0.6180339887 + 0.0137 * (k % 23)))) % n or 1
    while math.gcd(m, n) != 1:
        m += 1
    return m


def decode(arr: np.ndarray, arrays: dict, layout: dict, table: list) -> Binding | None:
    """Which parameter a stored constant of the probe's graph holds, and how: its elements
    are the probe's own values (``_exact``), or ``a * P + b`` of a whole parameter
    (``_affine``: a norm stored as 1 + w, a scale folded in).  None: no parameter."""
    return _exact(arr, layout, table) or _affine(arr, arrays, layout)


def _exact(arr: np.ndarray, layout: dict, table: list) -> Binding | None:
    """The binding of a stored constant whose elements are the probe's own values."""
    a = np.asarray(arr)
    if a.dtype != np.float32 or a.size == 0 or not table:
        return None
    k = a.reshape(-1).view(np.uint32).astype(np.int64) - _BASE_BITS
    last_start, last = table[-1]
    total = last_start + int(np.prod(layout[last][1])) * layout[last][3]
    if k.min() < 0 or k.max() >= total:
        return None
    starts = np.array([t[0] for t in table])
    which = np.searchsorted(starts, k, side="right") - 1
    if which.min() != which.max():
        return None
    name = table[int(which[0])][1]
    start, shape, m, stride, shift = layout[name]
    n = int(np.prod(shape))
    code, rest = np.divmod(k - start, stride)
    if a.size == 1 and n != 1 or rest.any():
        return None  # one number that happens to fall among a tensor's values
    # value code c sits at element j = c * m^-1 mod n
    idx = (((code - shift) * pow(m, -1, n)) % n if n > 1 else code).reshape(a.shape)
    if a.size == n and np.array_equal(idx.reshape(-1), np.arange(n)):
        return Binding(name, shape)
    if a.ndim == 2 and len(shape) == 2 and a.shape == shape[::-1] and np.array_equal(
            idx, np.arange(n).reshape(shape).T):
        return Binding(name, shape, transposed=True)
    return Binding(name, shape, index=idx)


def _affine(arr: np.ndarray, values: dict, layout: dict) -> Binding | None:
    """stored = a * P + b (or of P transposed) for a parameter with as many elements."""
    a = np.asarray(arr, dtype=np.float64)
    if a.size < 2:
        return None
    for name, (_, shape, *_) in layout.items():
        if int(np.prod(shape)) != a.size:
            continue
        p = np.asarray(values[name], dtype=np.float64)
        views = [(False, p.reshape(-1))]
        if p.ndim == 2 and a.shape == p.shape[::-1] and a.shape != p.shape:
            views.append((True, p.T.reshape(-1)))
        for transposed, x in views:
            y = a.reshape(-1)
            lo, hi = int(np.argmin(x)), int(np.argmax(x))
            if x[hi] == x[lo]:
                continue
            scale = (y[hi] - y[lo]) / (x[hi] - x[lo])
            offset = y[lo] - scale * x[lo]
            if abs(scale) < 1e-30:
                continue
            scale, offset = _tidy(scale), _tidy(offset)
            err = np.max(np.abs(scale * x + offset - y))
            if err <= 4e-7 * max(1.0, float(np.max(np.abs(y)))):
                return Binding(name, shape, transposed=transposed, scale=scale, offset=offset)
    return None


def _tidy(v: float) -> float:
    """A fitted coefficient that is a simple number (1, 0.5, an integer) within float32
    rounding, as that number."""
    for r in (round(v), round(v * 2) / 2, round(v * 8) / 8):
        if abs(v - r) <= 1e-6 * max(1.0, abs(r)):
            return float(r)
    return float(v)


class Outputs:
    """The torch model's values for the ONNX model's outputs, by what the recogniser says
    they are: ``logits`` the output's logits, the hidden state the ``last_hidden_state`` of
    the outermost transformers model inside (found by forward hooks: a causal LM does not
    return it), any other output by name.  A context manager (the hooks are removed)."""

    def __init__(self, model):
        import transformers

        self.found: list = []
        self.handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, transformers.PreTrainedModel):
                depth = 0 if not name else name.count(".") + 1
                self.handles.append(mod.register_forward_pre_hook(self._clear) if depth == 0
                                    else None)
                self.handles.append(mod.register_forward_hook(
                    lambda m, a, out, depth=depth: self._hook(depth, out)))
        self.handles = [h for h in self.handles if h is not None]

    def _clear(self, *args):
        self.found.clear()

    def _hook(self, depth, out):
        import torch

        h = getattr(out, "last_hidden_state", None)
        if isinstance(h, torch.Tensor):
            self.found.append((depth, h))

    def pick(self, out, wanted: list) -> list:
        """[value or None] for [(name, kind)]."""
        res = []
        for name, kind in wanted:
            v = None
            if kind == "logits" or name == "logits":
                v = getattr(out, "logits", None)
            elif kind == "hidden" or name == "last_hidden_state":
                hs = sorted(self.found, key=lambda t: t[0])
                v = hs[0][1] if hs else None
            if v is None and hasattr(out, "keys") and name in out.keys():
                v = out[name]
            res.append(v)
        return res

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _wrapper(model, names: list[str], extra: dict, wanted: list, picker: Outputs):
    """The model as a module of tensors: the outputs the expanded model has (``wanted``:
    [(name, kind)]), or every tensor the model returns when none of them is found."""
    import torch

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(**dict(zip(names, args)), **extra)
            picked = [v for v in picker.pick(out, wanted) if isinstance(v, torch.Tensor)]
            if picked:
                return tuple(picked)
            vals = out.values() if hasattr(out, "values") else out
            return tuple(v for v in vals if isinstance(v, torch.Tensor))

    return Forward().eval()


def forward_kwargs(model, feeds: dict) -> tuple[list[str], dict, list[str]]:
    """(input names the model's forward takes, fixed keyword arguments, inputs it does not)."""
    params = inspect.signature(model.forward).parameters
    names = [n for n in feeds if n in params]
    extra = {"return_dict": True}
    if "use_cache" in params:
        extra["use_cache"] = False
    return names, extra, [n for n in feeds if n not in params]


def _export(model, feeds: dict, dyn: dict, wanted: list, exporter: str, opset: int,
            path: Path) -> None:
    import torch

    names, extra, _ = forward_kwargs(model, feeds)
    if not names:
        raise HandoffError("none of the expanded model's inputs "
                           f"({', '.join(feeds)}) is an argument of {type(model).__name__}"
                           ".forward.")
    args = tuple(torch.from_numpy(np.asarray(feeds[n])) for n in names)
    picker = Outputs(model)
    w = _wrapper(model, names, extra, wanted, picker)
    with picker, quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(w, args, str(path), dynamo=False, opset_version=opset,
                              input_names=names,
                              dynamic_axes={n: dict(dyn.get(n, {})) for n in names},
                              do_constant_folding=True)
        else:
            from torch.export import Dim

            shapes = (tuple({ax: Dim.AUTO for ax in dyn.get(n, {})} or None for n in names),)
            prog = torch.onnx.export(w, args, dynamo=True, opset_version=opset,
                                     input_names=names, dynamic_shapes=shapes)
            prog.save(str(path), external_data=False)


def exporters(opset: int) -> list[tuple[str, int]]:
    """TorchScript first (a second or two; dynamo takes ten times as long), then dynamo, whose
    graph places what TorchScript's folds away."""
    return [("torchscript", min(max(opset, 14), 17)), ("dynamo", max(opset, 18))]


def build(cfg: dict, cls_name: str, feeds: dict, dyn: dict, wanted: list, exporter: str,
          opset: int) -> Probe:
    """The probe of ``cls_name`` built from ``cfg`` (the expanded config, already cut to the
    probe's layers), returning the outputs ``wanted`` ([(name, kind)], the expanded model's),
    exported by ``exporter`` at ``opset``, recognised and decoded.  Raises HandoffError when
    it cannot be built, exported or recognised."""
    key = (json.dumps(cfg, sort_keys=True, default=str), cls_name,
           json.dumps({k: [list(np.shape(v)), str(np.asarray(v).dtype)]
                       for k, v in feeds.items()}, sort_keys=True),
           json.dumps(dyn, sort_keys=True), json.dumps(wanted), exporter, opset)
    if key not in _CACHE:
        try:
            _CACHE[key] = _build(cfg, cls_name, feeds, dyn, wanted, exporter, opset)
        except HandoffError as exc:
            _CACHE[key] = exc
        while len(_CACHE) > CACHE_SIZE:  # the oldest first (a probe holds its graph)
            _CACHE.pop(next(iter(_CACHE)))
    if isinstance(_CACHE[key], HandoffError):
        raise _CACHE[key]
    return _CACHE[key]


_RUNS: dict = {}


def _runs(model, cls_name: str, feeds: dict, key: str) -> None:
    """The class runs the expanded model's inputs in eager mode, or HandoffError (for both
    exporters: T5Model wants decoder inputs an encoder's graph does not have)."""
    import torch

    k = (key, cls_name, tuple(sorted(feeds)))
    if k not in _RUNS:
        names, extra, _ = forward_kwargs(model, feeds)
        _RUNS[k] = None
        try:
            with quiet(), torch.no_grad():
                model(**{n: torch.from_numpy(np.asarray(feeds[n])) for n in names}, **extra)
        except Exception as exc:  # noqa: BLE001 - said in words
            _RUNS[k] = (f"{cls_name} cannot run the expanded model's inputs "
                        f"({', '.join(feeds)}): {' '.join(str(exc).split())[:200]}")
    if _RUNS[k] is not None:
        raise HandoffError(_RUNS[k])


def _build(cfg, cls_name, feeds, dyn, wanted, exporter, opset) -> Probe:
    import torch
    import transformers

    t0 = time.perf_counter()
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise HandoffError(f"transformers has no class {cls_name}.")
    conf = config_object(cfg)
    try:
        with quiet():
            torch.manual_seed(0)
            model = cls(conf).float().eval()
    except Exception as exc:  # noqa: BLE001 - a class that does not fit this config
        raise HandoffError(f"{cls_name} cannot be built from the expanded config: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    _runs(model, cls_name, feeds, key=json.dumps(cfg, sort_keys=True, default=str))
    arrays, layout, table, init = _fill(model)
    state = model.state_dict(keep_vars=True)
    by_id = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: by_id[id(t)] for n, t in state.items()
               if id(t) in by_id and by_id[id(t)] != n}
    with tempfile.TemporaryDirectory(prefix="lemon-probe-") as tmp:
        path = Path(tmp) / "probe.onnx"
        try:
            _export(model, feeds, dyn, wanted, exporter, opset, path)
            m = io.load(path)
            desc = recognize(m)
            refs = refs_mod.collect(m, desc)
        except HandoffError:
            raise
        except Exception as exc:  # noqa: BLE001 - said in words; the caller may try another
            raise HandoffError(
                f"transformers' {cls_name}, built from the expanded config and exported with "
                f"the {exporter} exporter, could not be recognised: "
                f"{' '.join(str(exc).split())[:300]}") from None
        bindings, constants = {}, {}
        for k, v in refs.consts.items():
            t = const_tensor(v)
            if t is None:
                continue
            arr = refs.read(k, np.asarray(t.numpy()))  # as its reader computes with it
            b = decode(arr, arrays, layout, table)
            if b is not None:
                bindings[k] = b
            else:
                constants[k] = arr
    bound = {b.param for b in bindings.values()}
    unbound = [n for n in layout if n not in bound]
    return Probe(cls_name, cfg, len(desc.blocks), exporter, desc, refs, bindings, constants,
                 {n: lay[1] for n, lay in layout.items()}, aliases,
                 time.perf_counter() - t0, unbound=unbound,
                 initial={n: init[n].numpy() for n in unbound})

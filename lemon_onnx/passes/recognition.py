"""How the passes are composed with onnx-ir's ``PassManager``, and what travels between them.

onnx-ir's passes take their options when built and the model in ``call``; a ``PassManager``
runs them in order and returns the last one's result.  What the passes of an expansion share
travels with the model, in its ``meta`` (in-memory metadata, never saved):

- ``RECOGNITION``: the recognised model (the ``Recognizer``, its index over this graph, and
  the ``ModelDescription``).  The pipeline recognises the source once before planning and
  stores it (``remember``); ``RecognizePass`` recognises the model again where a pass left it
  changed in a way the description does not follow (the width pass gave consumers their own
  copies of a shared tensor: names no longer lead to the tensors).  The width and depth
  passes read it (``recognized``) and refuse a model that carries none (a precondition).
- ``RESULTS``: each recorded pass's ``PassResult`` (``Recorded`` wraps a pass, stores its
  result under a name and reports it as a progress stage): the pipeline reads the results
  after the manager has run, and ``RecognizePass(after=...)`` reads the width pass's.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

__all__ = ["RECOGNITION", "RESULTS", "RecognizePass", "Recorded", "recognized", "remember",
           "results"]

RECOGNITION = "lemon.recognition"
RESULTS = "lemon.pass_results"


def remember(model: ir.Model, rec, desc) -> None:
    """Store the recognition of ``model`` (``rec`` indexes this very model) with it."""
    model.meta[RECOGNITION] = (rec, desc)


def recognized(model: ir.Model, who: str):
    """(Recognizer, ModelDescription) of ``model``; a precondition of the passes that read it."""
    got = model.meta.get(RECOGNITION)
    if got is None or got[0].model is not model:
        raise ir.passes.PreconditionError(
            f"{who} needs the model recognised first (lemon_onnx.passes.recognition.remember, "
            "or a RecognizePass before it)")
    return got


def results(model: ir.Model) -> dict:
    """{name: PassResult} of the recorded passes that have run on ``model``."""
    return model.meta.get(RESULTS) or {}


class RecognizePass(ir.passes.InPlacePass):
    """Recognise the model (again) and store it with the model.  ``after``: only when the
    recorded pass of that name reports ``new_initializers`` (shared tensors it copied); else
    the stored recognition still describes the model and nothing is done."""

    def __init__(self, after: str | None = None):
        super().__init__()
        self.after = after

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from ..recognize import Recognizer

        if self.after is not None:
            done = results(model).get(self.after)
            if done is None or not getattr(done, "new_initializers", 0):
                return ir.passes.PassResult(model, modified=False)
        rec = Recognizer(model)
        remember(model, rec, rec.run())
        return ir.passes.PassResult(model, modified=bool(rec.unfused or rec.untransposed))


class Recorded(ir.passes.InPlacePass):
    """Run ``inner`` on the model, store its result under ``name`` (``results``) and report it
    as the progress stage ``name`` (``summary(result)``: the stage's line)."""

    def __init__(self, name: str, inner: ir.passes.InPlacePass, progress=None,
                 summary: Callable | None = None):
        super().__init__()
        self.name, self.inner, self.progress, self.summary = name, inner, progress, summary

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.progress is None:
            res = self.inner(model)
        else:
            with self.progress.stage(self.name) as st:
                res = self.inner(model)
                if self.summary is not None:
                    st.done(self.summary(res))
        model.meta[RESULTS] = {**results(model), self.name: res}
        return res

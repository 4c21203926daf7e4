"""The operator rules: one function per operator (or per group of operators that act alike),
grouped by family, each registered for its op types with ``@rule(...)``
(``closed_world.rule``) and called by ``AxisAnalysis.visit`` as ``rule(analysis, node)``.

A rule reads its inputs' axes (``an.get``) and elements (``an.elems``), unifies the axes the
operator requires to be equal (``an.try_unify``), sets its outputs' axes and elements, and
records what an expansion must know: the literals it explains (``an.lit``), axes whose units it
cannot place (``an.fresh_from_inferred``), cuts, gathers, reductions, ...  The rule for a new
operator is one function in the module of its family.
"""

from . import elementwise, linear, norm_attention, reshape, shape, slicing

__all__ = ["elementwise", "linear", "norm_attention", "reshape", "shape", "slicing"]

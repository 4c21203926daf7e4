"""Axis analysis: which model size every tensor axis and every size literal stands for.

Every axis of every tensor is described as an ordered product of *atoms* (outermost first).
An atom is a size with an identity: the hidden width of the stream, the head count, head_dim,
the batch, ...  Atoms start anonymous (one per initializer axis, one per graph-input dim) and
are *unified* whenever an operator requires two axes to be equal (a MatMul contraction, a
broadcast, a residual Add).  A Reshape that splits an axis *splits* its atom: the Q projection's
output atom becomes (heads, head_dim) when it meets ``Reshape [B, S, -1, 8]``; GQA's ``Expand``
splits the query-head atom into (kv_heads, repeat).  Reshape keeps row-major order, so the split
order is fixed by the graph, never guessed from values.

Integer constants that end up in a size position (Reshape/Expand/ConstantOfShape shapes, Split
sizes, Slice bounds, head-count attributes) are *explained* by the atoms they consume.  Once the
recogniser names the atoms (``hidden``, ``heads``, ...), every such literal has a label, and an
expansion recomputes each literal as the product of its atoms' new sizes.

Nothing here looks at initializer names or searches for numbers: a literal is only ever
explained through the shape arithmetic of the operator that consumes it.

The package, by seam: ``atoms`` (the atom algebra: find, leaves, unify, split), ``elements``
(the elements of shape vectors and the literals they explain), ``analysis`` (``AxisAnalysis``:
the driver and what it records), ``rules`` (one function per operator, by family:
``elementwise``, ``shape``, ``reshape``, ``slicing``, ``linear``, ``norm_attention``) and
``closed_world`` (which domains and ops are modelled: the rules' registry and the op lists);
``roles`` (the table of what size each atom is, named by the components, read by the passes).
"""

from . import rules  # registers the operator rules
from .analysis import AxisAnalysis
from .atoms import Atom, Axis, UnifyError, find, leaves, size_of, split_atom, unify, union
from .elements import INT_BIG, UNK, Elem, LiteralUse, const_floats, int_array
from .roles import Roles

__all__ = [
    "rules", "Atom", "Axis", "AxisAnalysis", "Elem", "INT_BIG", "LiteralUse", "UNK", "UnifyError",
    "const_floats", "find", "int_array", "leaves", "Roles", "size_of", "split_atom", "unify",
    "union",
]

"""The atom algebra: axes as ordered products of atoms, and how two axes are made equal.

An atom is a size with an identity (the hidden width, the head count, the batch, ...).
``find`` gives an atom's representative (union-find), ``leaves`` the atoms an axis is a
product of once splits are expanded, ``unify`` makes two axes the same (splitting an atom
where one side's atom is a product of the other's), ``split_atom`` splits one row-major.
Nothing here knows about graphs: the analysis (``analysis.py``) and the operator rules
(``rules/``) call these whenever an operator requires two axes to be equal.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np

_ids = itertools.count()


class Atom:
    """A factor of an axis.  ``size`` is None for dynamic dims (batch, sequence)."""

    __slots__ = ("id", "size", "sym", "parent", "split", "origin")

    def __init__(self, size: int | None, sym: str | None = None, origin: str = ""):
        self.id = next(_ids)
        self.size = size
        self.sym = sym
        self.parent: Atom | None = None
        self.split: list[Atom] | None = None
        self.origin = origin

    def __repr__(self) -> str:
        r = find(self)
        tag = r.sym or f"a{r.id}"
        return f"{tag}({r.size})"


def find(a: Atom) -> Atom:
    root = a
    while root.parent is not None:
        root = root.parent
    while a.parent is not None and a.parent is not root:  # path compression
        a.parent, a = root, a.parent
    return root


def leaves(atoms: Iterable[Atom]) -> list[Atom]:
    out: list[Atom] = []
    for a in atoms:
        r = find(a)
        if r.split:
            out.extend(leaves(r.split))
        elif r.size != 1:
            out.append(r)
    return out


def size_of(atoms: Iterable[Atom]) -> int | None:
    n = 1
    for a in leaves(atoms):
        if a.size is None:
            return None
        n *= a.size
    return n


def split_atom(a: Atom, sizes: Sequence[int]) -> list[Atom]:
    """Split leaf ``a`` (row-major) into new atoms of ``sizes``; returns them."""
    r = find(a)
    assert r.split is None and r.size is not None
    assert int(np.prod(sizes)) == r.size, (sizes, r)
    parts = [Atom(int(s), origin="split") for s in sizes]
    r.split = parts
    return parts


class UnifyError(Exception):
    pass


def union(a: Atom, b: Atom) -> None:
    ra, rb = find(a), find(b)
    if ra is rb:
        return
    if ra.size != rb.size:
        raise UnifyError(f"size {ra.size} != {rb.size}")
    if ra.split and rb.split:
        sa, sb = ra.split, rb.split
        rb.split = None
        rb.parent = ra
        unify(sa, sb)
        return
    if rb.split and not ra.split:
        ra, rb = rb, ra
    rb.parent = ra
    if ra.sym is None:
        ra.sym = rb.sym


def _adopt(dyn: Atom, other: Atom) -> None:
    """Merge an atom of unknown size into ``other`` (which keeps its size)."""
    rd, ro = find(dyn), find(other)
    if rd is ro:
        return
    rd.parent = ro
    if ro.sym is None and ro.size is None:
        ro.sym = rd.sym
    if ro.origin != "input" and rd.origin == "input":
        ro.origin = "input"


def unify(x: Sequence[Atom], y: Sequence[Atom]) -> None:
    """Make two axes (products of atoms) the same, splitting atoms where needed."""
    lx, ly = leaves(x), leaves(y)
    i = j = 0
    while i < len(lx) and j < len(ly):
        a, b = find(lx[i]), find(ly[j])
        if a is b:
            i += 1
            j += 1
            continue
        if a.split:  # became split during this loop
            lx[i:i + 1] = leaves([a])
            continue
        if b.split:
            ly[j:j + 1] = leaves([b])
            continue
        if a.size is None or b.size is None:
            dyn, stat = (a, b) if a.size is None else (b, a)
            dl, sl, k = (lx, ly, j) if a is dyn else (ly, lx, i)
            if dyn.origin != "input" and dl[-1] is dyn and len(sl) - k > 1 and stat.size is not None:
                # an unresolved dim standing for the whole rest of the other axis
                rest = [find(t) for t in sl[k:]]
                if all(t.size is not None for t in rest):
                    dyn.size = int(np.prod([t.size for t in rest]))
                    dyn.split = rest
                    return
            if stat.size is None or dyn.origin != "input":
                # both dynamic, or a dim that shape inference could not resolve: same atom
                _adopt(dyn, stat)
                i += 1
                j += 1
                continue
            raise UnifyError(f"dynamic {a} vs static {b}")
        if a.size == b.size:
            union(a, b)
            i += 1
            j += 1
        elif a.size > b.size and a.size % b.size == 0:
            head, rest = split_atom(a, [b.size, a.size // b.size])
            union(head, b)
            lx[i:i + 1] = [rest]
            j += 1
        elif b.size > a.size and b.size % a.size == 0:
            head, rest = split_atom(b, [a.size, b.size // a.size])
            union(head, a)
            ly[j:j + 1] = [rest]
            i += 1
        else:
            raise UnifyError(f"cannot align {a} with {b}")
    # leftover unresolved dims are size-1 axes that shape inference could not see
    for rest in (lx[i:], ly[j:]):
        for t in rest:
            t = find(t)
            if t.size is None and t.origin != "input":
                t.size = 1
    lx, ly = leaves(lx), leaves(ly)
    if len(lx) != len(ly) and (i < len(lx) or j < len(ly)):
        raise UnifyError(f"axes differ in length: {lx} vs {ly}")


Axis = list  # list[Atom]

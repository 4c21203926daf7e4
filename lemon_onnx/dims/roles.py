"""What size each atom is: the roles the components name, held in one table.

The components name atoms as they match (``hidden``, ``heads``, ``kv_heads``, ``head_dim``,
``ffn``, ``vocab``, ...); the width pass lays an axis out by its atoms' roles and names them in
refusals.  The table belongs to the recognition of one graph (``GraphIndex.roles``) and travels
to the passes as a field of the description (``ModelDescription.roles``): no atom carries its
role, so nothing outside the recognition can change what an atom is.

An atom is looked up through its representative (``find``): roles are named once the axis
analysis has unified every axis (the components only read the analysis), so representatives
no longer change while the table is in use; ``check`` enforces it where the description is
made (a unification after naming would leave a role on an atom nothing finds any more).
"""

from __future__ import annotations

from typing import Iterable

from .atoms import Atom, find, leaves


class Roles:
    """{atom: role}; the first component to name an atom keeps it, unless ``replace``."""

    __slots__ = ("_by_atom",)

    def __init__(self) -> None:
        self._by_atom: dict[Atom, str] = {}

    def name(self, a: Atom, role: str, *, replace: bool = False) -> None:
        """Name what size atom ``a`` is.  The first name stays, unless ``replace`` (the
        attention component naming the heads, KV heads and head_dim it matched exactly)."""
        r = find(a)
        if replace or self.of(r) is None:
            self._by_atom[r] = role

    def of(self, a: Atom) -> str | None:
        """The role of atom ``a`` (None where no component named it)."""
        return self._by_atom.get(find(a))

    def named(self, atoms: Iterable[Atom]) -> set[str]:
        """The roles among ``atoms``' leaves (unnamed ones left out)."""
        return {r for r in (self.of(a) for a in leaves(atoms)) if r is not None}

    def label(self, atoms: Iterable[Atom]) -> str:
        """``atoms`` as a product of roles, for messages: ``heads*head_dim``; an unnamed atom
        shows its size."""
        return "*".join(self.of(a) or str(a.size) for a in atoms)

    def check(self) -> None:
        """Every named atom is still its own representative (nothing was unified after the
        components named it); raises RuntimeError naming the role otherwise."""
        moved = [(role, a) for a, role in self._by_atom.items() if find(a) is not a]
        if moved:
            role, a = moved[0]
            raise RuntimeError(f"the atom named {role!r} ({a.size}) was unified with "
                               f"{find(a)!r} after it was named: its role would be lost")

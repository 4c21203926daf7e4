"""The project's own documents (``docs/``): what the code cites exists, and what the
specification names exists.  Text only: no model is loaded or run."""

import re
from pathlib import Path

import pytest

import lemon_onnx.lemon_math as lm

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SPEC = DOCS / "lemon-math.md"
#: the short names the code uses for documents of docs/ (``lemon-math.md, "Norm layers"``)
SHORT_NAMES = {"lemon-math.md"} | {p.name for p in DOCS.glob("*.md")}

# a document, then (up to the closing parenthesis) its sections: , "Title" [and "Title"] / §N
_DOC = re.compile(r"(docs/)?([A-Za-z0-9_-]+\.md)\b")
_QUOTED = re.compile(r'"([^"]+)"')
_NUMBER = re.compile(r"§\s*(\d+)")


def _sources():
    yield from sorted((ROOT / "lemon_onnx").rglob("*.py"))
    yield ROOT / "README.md"


def _citations():
    """(where, document path, [section titles], [section numbers]) for every citation of a
    document of docs/ in the package and the README."""
    out = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for m in _DOC.finditer(text):
            prefixed, name = m.group(1), m.group(2)
            if not prefixed and name not in SHORT_NAMES:
                continue  # README.md, or a document outside docs/
            line = text.count("\n", 0, m.start()) + 1
            rest = text[m.end():m.end() + 240].split(")", 1)[0]
            titles, numbers = [], []
            if re.match(r"\s*[,§]", rest):
                titles = [" ".join(t.split()) for t in _QUOTED.findall(rest)]
                numbers = [int(n) for n in _NUMBER.findall(rest)]
                if not re.match(r'\s*,?\s*["§]', rest):  # "doc.md, Notation": unchecked
                    titles.append(f"(a section named without quotes: {rest.strip()!r})")
            out.append((f"{path.relative_to(ROOT)}:{line}", DOCS / name, titles, numbers))
    return out


def _headings(doc: Path) -> tuple[set, set]:
    """(titles, numbers) of a document's headings: ``## 5. Norm layers`` gives the title
    "Norm layers" and the number 5; ``### GQA`` the title "GQA"."""
    titles, numbers = set(), set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(?:(\d+)\.\s+)?(.+?)\s*$", line)
        if m:
            titles.add(m.group(2))
            if m.group(1):
                numbers.add(int(m.group(1)))
    return titles, numbers


CITATIONS = _citations()


def test_the_specification_exists_and_is_cited():
    assert SPEC.is_file()
    assert any(doc == SPEC for _, doc, _, _ in CITATIONS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/lemon-math.md" in readme


@pytest.mark.parametrize("where,doc,titles,numbers", CITATIONS,
                         ids=[c[0] for c in CITATIONS])
def test_every_citation_names_a_document_and_its_sections(where, doc, titles, numbers):
    assert doc.is_file(), f"{where} cites {doc.relative_to(ROOT)}, which does not exist"
    have_titles, have_numbers = _headings(doc)
    for t in titles:
        assert t in have_titles, f"{where} cites section {t!r} of {doc.name}: no such heading"
    for n in numbers:
        assert n in have_numbers, f"{where} cites §{n} of {doc.name}: no such section"


def test_headings_are_unique_and_numbered_in_order():
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    heads = [ln for ln in lines if re.match(r"#{1,6}\s", ln)]
    titles = [re.sub(r"^#+\s+(\d+\.\s+)?", "", h) for h in heads]
    assert len(titles) == len(set(titles)), "two sections with one title"
    numbers = [int(m.group(1)) for h in heads if (m := re.match(r"##\s+(\d+)\.", h))]
    assert numbers == list(range(1, len(numbers) + 1))
    # the specification's own "§N" references
    text = "\n".join(lines)
    assert {int(n) for n in _NUMBER.findall(text)} <= set(numbers)


def test_every_lemon_math_name_the_specification_gives_exists():
    names = re.findall(r"`lemon_math\.([A-Za-z_][\w.]*)", SPEC.read_text(encoding="utf-8"))
    assert names
    for name in names:
        obj = lm
        for part in name.split("."):
            assert hasattr(obj, part), f"lemon_math.{name} does not exist"
            obj = getattr(obj, part)


def test_every_file_function_and_test_the_specification_gives_exists():
    text = SPEC.read_text(encoding="utf-8")
    refs = re.findall(r"`((?:lemon_onnx|tests|docs)/[\w/.-]+?)(?:::(\w+))?`", text)
    assert refs
    for path, name in refs:
        f = ROOT / path
        assert f.exists(), f"{path} does not exist"
        if name:
            src = f.read_text(encoding="utf-8")
            pattern = rf"^\s*(?:def|class)\s+{name}\b|^\s*{name}\s*(?::[^=\n]*)?="
            assert re.search(pattern, src, re.M), f"{path} has no {name}"

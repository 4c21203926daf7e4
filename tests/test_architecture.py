"""The package's module boundaries, read from its source (issue 19): no module imports another
module's underscore names, and none reads or writes an underscore attribute of an object it
does not own (``self``/``cls`` only).  A name another module needs is public, so that a
component works from what it is given, not from another module's internals."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lemon_onnx"

#: underscore attributes of other libraries' objects that are their documented way in
FOREIGN = {
    # transformers: the attention implementation of a config built from a dict
    "_attn_implementation",
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(), str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_walk_sees_the_package():
    names = {str(p) for p, _ in _modules()}
    assert "lemon_onnx/graph.py" in names and "lemon_onnx/components/attention.py" in names


def test_no_module_imports_another_modules_underscore_names():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                    node.level or (node.module or "").startswith("lemon_onnx")):
                found += [f"{path}:{node.lineno} imports {a.name} from {node.module}"
                          for a in node.names if _private(a.name)]
    assert not found, "\n".join(found)


def test_no_module_touches_underscore_attributes_of_objects_it_does_not_own():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) \
                    and node.attr not in FOREIGN:
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_the_check_catches_what_it_is_for(tmp_path):
    """The walk itself on two small modules that break each rule."""
    bad = ("from .tensors import _read\n"
           "def f(dp):\n    dp._cache = 1\n    return dp._rec\n")
    tree = ast.parse(bad)
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names if _private(a.name)]
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)
             and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert imports == ["_read"] and sorted(attrs) == ["_cache", "_rec"]


#: attributes of other libraries' objects that the package sets through their documented
#: setters: onnx-ir's graph layer (a pass edits the graph by contract), onnx's protobuf
#: messages, ONNX Runtime's session options, numpy's bit generator
FOREIGN_SETTERS = {
    "name", "shape", "type", "const_value", "dtype",  # onnx_ir.Value
    "ir_version", "value",  # onnx_ir.Model, onnx StringStringEntryProto
    "log_severity_level", "enable_cpu_mem_arena", "enable_mem_pattern",  # onnxruntime
    "graph_optimization_level",
    "state",  # numpy.random.BitGenerator
}


def _owners() -> dict:
    """attribute name -> the modules whose classes hold it (class-level annotations and
    ``self.NAME = ...`` in their methods)."""
    owners: dict = {}
    for path, tree in _modules():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                name = None
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    name = node.target.id
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                        isinstance(node.value, ast.Name) and node.value.id == "self":
                    name = node.attr
                if name:
                    owners.setdefault(name, set()).add(str(path))
    return owners


def _stores(tree):
    """(line, target text, attribute) of every attribute assignment not on self/cls."""
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store) and not (
                        isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")):
                    yield node.lineno, ast.unparse(t), t.attr


def test_no_module_assigns_attributes_on_objects_another_module_owns():
    """An attribute that only another module's classes hold is set by that module alone
    (its methods, or a new object made with the change): the typed description and the
    results the passes return are the interfaces, not shared objects written from outside."""
    owners = _owners()
    found = []
    for path, tree in _modules():
        for line, text, attr in _stores(tree):
            if attr in FOREIGN_SETTERS or attr.startswith("__"):
                continue
            held = owners.get(attr, set())
            if held and str(path) not in held:
                found.append(f"{path}:{line} {text} (held by {', '.join(sorted(held))})")
    assert not found, "\n".join(found)


def test_the_assignment_check_catches_what_it_is_for():
    owners = {"role": {"lemon_onnx/dims.py"}}
    tree = ast.parse("def f(a, self):\n    a.role = 'heads'\n    self.role = 1\n")
    hits = [attr for _, _, attr in _stores(tree)
            if owners.get(attr) and "lemon_onnx/mlp.py" not in owners[attr]]
    assert hits == ["role"]


def test_every_operator_rule_is_one_registered_function():
    """The axis analysis's operator rules (``lemon_onnx/dims/rules``) are plain functions found
    through one registry: the named ops, the elementwise lists and the Reduce* prefix reach
    their rule, a second rule for an op type is refused, and an op without one is unhandled."""
    from lemon_onnx.dims import closed_world as cw

    assert cw.rule_for("MatMul").__module__ == "lemon_onnx.dims.rules.linear"
    assert cw.rule_for("SimplifiedLayerNormalization") is cw.rule_for("RMSNormalization")
    assert all(cw.rule_for(op) is not None for op in cw.UNARY | cw.BINARY)
    assert cw.rule_for("Div").__name__ == "div" and cw.rule_for("Add").__name__ == "broadcast"
    assert cw.rule_for("ReduceMean") is cw.rule_for("ReduceSumSquare") is not None
    assert cw.rule_for("Einsum") is None
    before = dict(cw.RULES)
    with pytest.raises(ValueError, match="two rules for MatMul"):
        cw.rule("MatMul")(lambda an, node: None)
    assert cw.RULES == before

"""No module touches another's private (underscore) names: it asks for a public method.
Pure: reads the source.

An access `x._name` (x not self or cls) is allowed only where the module itself defines
`_name` (its own class's private state, e.g. a classmethod filling a new instance)."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "s3fuse"
# stdlib privates used on purpose
ALLOWED = {"_exit", "_getframe", "_local"}


def _defined(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _foreign_privates(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    own = _defined(tree)
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and node.attr not in ALLOWED
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr not in own):
            out.append(f"{path.relative_to(SRC)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.append(f"{path.relative_to(SRC)}:{node.lineno}: import {alias.name}")
    return out


def test_the_check_sees_a_foreign_private(tmp_path):
    p = SRC / "_probe_for_test.py"
    try:
        p.write_text("from .x import _hidden\n\ndef f(data):\n    return data._flush_lock\n")
        assert len(_foreign_privates(p)) == 2
    finally:
        p.unlink()


def test_no_module_touches_anothers_private_names():
    found = [f for p in sorted(SRC.rglob("*.py")) for f in _foreign_privates(p)]
    assert found == []

"""Every SQL statement lives in meta.py, or in metaquery.py (read-only queries for fsck and
the CLI). Pure: reads the source."""

from __future__ import annotations

import ast
import pathlib
import re

SRC = pathlib.Path(__file__).resolve().parent.parent / "s3fuse"
ALLOWED = {"meta.py", "metaquery.py"}
SQL = re.compile(r"^\s*(SELECT |INSERT |REPLACE INTO |UPDATE \w+ SET |DELETE FROM |DROP TABLE |PRAGMA "
                 r"|WITH RECURSIVE |CREATE (TEMP |UNIQUE )?(TABLE|INDEX) )")


def _sql_in(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value.strip()[:60]}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("execute", "executemany", "executescript")):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: .{node.func.attr}(...)")
    return found


def test_the_check_finds_sql():
    assert _sql_in(SRC / "metaquery.py")
    assert any("SELECT" in f for f in _sql_in(SRC / "meta.py"))


def test_sql_only_in_meta_and_metaquery():
    found = [f for p in sorted(SRC.rglob("*.py"))
             if str(p.relative_to(SRC)) not in ALLOWED for f in _sql_in(p)]
    assert found == []

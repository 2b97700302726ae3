"""Audit op names: one style (SERVICE:Action), every name the code writes is listed in
audit.OPS, and the names of older logs map to today's. Pure: reads the source."""

from __future__ import annotations

import ast
import pathlib
import re

from s3fuse import audit

SRC = pathlib.Path(__file__).resolve().parent.parent / "s3fuse"
STYLE = re.compile(r"^[a-z0-9-]+:[A-Z][A-Za-z0-9]+$")
WRITERS = {"record", "_record", "append", "_audit_offline", "_owner_for"}


def _written_ops() -> set[str]:
    """Literal ops passed to the audit writers anywhere in s3fuse."""
    ops = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in WRITERS:
                continue
            for arg in node.args[:2]:
                candidates = [arg] if not isinstance(arg, ast.IfExp) else [arg.body, arg.orelse]
                for c in candidates:
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and ":" in c.value:
                        ops.add(c.value)
    return ops


def test_every_op_written_is_listed_and_in_one_style():
    written = _written_ops()
    assert {"kms:Decrypt", "sse-s3:RotateMasterKey", "sse-s3:PauseRewrap"} <= written
    assert written <= audit.OPS, written - audit.OPS
    assert [op for op in audit.OPS if not STYLE.match(op)] == []


def test_kms_administration_ops_come_from_one_table():
    assert audit.kms_op("create-key") == "kms:CreateKey"
    assert audit.kms_op("set-policy") == "kms:PutKeyPolicy"
    for action in audit.KMS_ACTIONS:
        assert audit.kms_op(action) in audit.OPS


def test_old_logs_names_map_to_todays():
    assert audit.canonical_op("kms:create-key") == "kms:CreateKey"
    assert audit.canonical_op("sse-s3:rewrap-done") == "sse-s3:RewrapDone"
    assert audit.canonical_op("root:rekey") == "root:RekeyRoot"
    assert audit.canonical_op("kms:Decrypt") == "kms:Decrypt"
    assert set(audit.LEGACY_OPS.values()) <= audit.OPS


def test_an_old_log_still_verifies_and_reads(tmp_path):
    path = str(tmp_path / "audit.log")
    with audit.AuditLog.open(path) as log:
        log.append("kms:create-key", uid=0, key_id="k1")
        log.append("sse-s3:rotate", uid=0, key_version=2)
        log.sync()
    assert audit.verify(path).ok
    ops = [audit.canonical_op(r["op"]) for r in audit.read(path)]
    assert ops == ["kms:CreateKey", "sse-s3:RotateMasterKey"]

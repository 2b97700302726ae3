"""The audit trail as a plain file: record format, chain recovery, the secret guard,
reading and following, and `verify` pinpointing every single tampering."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3fuse import audit
from s3fuse.audit import AuditError, AuditLog, verify

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _fill(path: str, n: int, **extra) -> AuditLog:
    """A log of `n` varied records at `path` (left open: the caller closes it)."""
    log = AuditLog.open(path)
    for i in range(n):
        if i % 3 == 2:
            log.append("kms.decrypt", audit.DENIED, key_id=f"k{i % 2}", key_version=i,
                       uid=1000 + i, gid=100, pid=4242, process="cat", path=f"/d/f{i}",
                       object_id=f"{i:032x}", errno=13, **extra)
        else:
            log.append("kms.generate-data-key", key_id=f"k{i % 2}", key_version=1, uid=0,
                       gid=0, pid=1, process="s3fuse", path=f"/d/f{i}", object_id=f"{i:032x}",
                       **extra)
    return log


def _lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def _write(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(lines))


def _h(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _edit(line: bytes, **changes) -> bytes:
    record = json.loads(line)
    record.update(changes)
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _record(seq: int, prev: str, op: str = "forged") -> bytes:
    return json.dumps({"seq": seq, "time": "2026-01-01T00:00:00.000000Z", "op": op,
                       "key_id": "k0", "outcome": "allowed", "prev": prev},
                      separators=(",", ":")).encode() + b"\n"


@pytest.fixture
def log_path(tmp_path):
    return str(tmp_path / "store" / "audit.log")


@pytest.fixture
def log20(log_path):
    log = _fill(log_path, 20)
    log.close()
    return log_path, log.head, log.seq


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

def test_append_then_verify_ok(log_path):
    with _fill(log_path, 5) as log:
        assert log.seq == 5
        assert log.head == _h(_lines(log_path)[-1])
    result = verify(log_path)
    assert result == audit.VerifyResult(True, 5, None, "5 records, chain intact", log.head)
    assert verify(log_path, log.head, 5).ok
    assert (verify(log_path, log.head).reason
            == "5 records, chain intact and ends at the expected head")


def test_empty_log(log_path):
    with AuditLog.open(log_path) as log:
        assert (log.seq, log.head) == (0, audit.ZERO_HASH)
    assert os.path.getsize(log_path) == 0
    result = verify(log_path, audit.ZERO_HASH, 0)
    assert (result.ok, result.records, result.head) == (True, 0, audit.ZERO_HASH)


def test_record_fields_in_documented_order_and_ascii(log_path):
    with AuditLog.open(log_path) as log:
        rec = log.append("sse-c.load", errno=None, path="/caf\u00e9\n\x00/\udcff", process="a\nb",
                         object_id="00" * 16, pid=7, gid=8, uid=9, fingerprint="ab" * 16,
                         key_version=3, key_id="alias/x", custom="z")
        second = log.append("kms.decrypt", audit.DENIED, errno=1, key_id="k")
    lines = _lines(log_path)
    assert len(lines) == 2
    for line in lines:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        line.decode("ascii")  # pure ASCII
        assert b", " not in line and b": " not in line  # compact separators
    parsed = json.loads(lines[0])
    assert list(parsed) == ["seq", "time", "op", "key_id", "key_version", "fingerprint", "uid",
                            "gid", "pid", "process", "path", "object_id", "custom", "outcome",
                            "prev"]
    assert parsed == rec
    assert "errno" not in parsed  # None values are omitted
    assert parsed["path"] == "/caf\u00e9\n\x00/\udcff"
    assert (parsed["seq"], parsed["outcome"], parsed["prev"]) == (1, "allowed", audit.ZERO_HASH)
    assert TIME_RE.match(parsed["time"])
    assert list(json.loads(lines[1])) == ["seq", "time", "op", "key_id", "errno", "outcome", "prev"]
    assert second["prev"] == _h(lines[0]) and second["seq"] == 2


def test_time_is_utc_rfc3339_with_microseconds(log_path):
    ns = calendar.timegm((2026, 11, 27, 22, 50, 1)) * 10**9 + 123_456_789
    with AuditLog.open(log_path, clock=lambda: ns) as log:
        assert log.append("x")["time"] == "2026-11-27T22:50:01.123456Z"


def test_modes_of_created_file_and_directory(tmp_path):
    path = tmp_path / "new" / "audit.log"
    old = os.umask(0)
    try:
        AuditLog.open(str(path)).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_reopen_continues_the_chain(log_path):
    log = _fill(log_path, 3)
    head = log.head
    log.close()
    with pytest.raises(AuditError):
        log.append("after-close")
    log = AuditLog.open(log_path)
    assert (log.seq, log.head) == (3, head)
    rec = log.append("master-key.rotate", key_version=2)
    assert (rec["seq"], rec["prev"]) == (4, head)
    log.close()
    assert verify(log_path, log.head, 4).ok


def test_reopen_recovers_a_long_last_record(log_path):
    with AuditLog.open(log_path) as log:
        log.append("a")
        log.append("b", path="/\u00e9" * 20000)  # escaped: ~120 kB on one line
        head = log.head
    with AuditLog.open(log_path) as log:
        assert (log.seq, log.head) == (2, head)
        log.append("c")
    assert verify(log_path, log.head, 3).ok


def test_open_refuses_a_partial_tail_unless_repairing(log_path):
    with _fill(log_path, 3) as log:
        head = log.head
    with open(log_path, "ab") as f:
        f.write(b'{"seq":4,"time":"20')
    with pytest.raises(AuditError, match="partial record"):
        AuditLog.open(log_path)
    with AuditLog.open(log_path, repair=True) as log:
        assert (log.seq, log.head) == (3, head)
        log.append("after-repair")
    assert verify(log_path, log.head, 4).ok


def test_open_refuses_a_malformed_last_record(log_path):
    _fill(log_path, 2).close()
    with open(log_path, "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(AuditError, match="malformed"):
        AuditLog.open(log_path)


def test_a_short_write_is_cut_off_and_the_chain_does_not_advance(log_path, monkeypatch):
    log = _fill(log_path, 2)
    before = open(log_path, "rb").read()
    real_write = os.write

    def half_write(fd, data):
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(audit.os, "write", half_write)
    with pytest.raises(AuditError, match="short write") as info:
        log.append("lost", key_id="k")
    monkeypatch.undo()
    assert info.value.errno == 28  # ENOSPC
    assert open(log_path, "rb").read() == before
    assert log.seq == 2
    log.append("kept")
    log.close()
    assert verify(log_path, log.head, 3).ok


# --------------------------------------------------------------------------
# the secret guard
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["key", "key_bytes", "plaintext", "data_key", "secret",
                                  "material", "root_key", "customer_key", "wrapped_key",
                                  "key_material", "client_secret", "password", "kek", "Key"])
def test_secret_guard_refuses_key_material_names(log_path, name):
    with AuditLog.open(log_path) as log:
        with pytest.raises(ValueError, match="never secrets"):
            log.append("sse-c.load", **{name: "aGVsbG8="})
        assert log.seq == 0
    assert os.path.getsize(log_path) == 0


@pytest.mark.parametrize("value", [b"\x00" * 32, bytearray(32), memoryview(b"k" * 32),
                                   [b"k"], ("x", bytearray(1))])
def test_secret_guard_refuses_bytes_values(log_path, value):
    with AuditLog.open(log_path) as log:
        with pytest.raises(ValueError, match="bytes"):
            log.append("kms.decrypt", object_id=value)
    assert os.path.getsize(log_path) == 0


@pytest.mark.parametrize("fields", [{"details": {"key": "x"}}, {"ratio": float("nan")},
                                    {"seq": 3}, {"prev": "0" * 64}, {"time": "now"}])
def test_append_refuses_other_bad_fields(log_path, fields):
    with AuditLog.open(log_path) as log:
        with pytest.raises(ValueError):
            log.append("x", **fields)


def test_append_refuses_bad_outcomes(log_path):
    with AuditLog.open(log_path) as log:
        with pytest.raises(ValueError, match="errno"):
            log.append("kms.decrypt", audit.DENIED, key_id="k")
        with pytest.raises(ValueError, match="outcome"):
            log.append("kms.decrypt", "maybe")
        with pytest.raises(ValueError, match="op"):
            log.append("")


def test_identifiers_are_allowed(log_path):
    with AuditLog.open(log_path) as log:
        rec = log.append("kms.rotate", key_id="1234", key_version=2, alias="alias/a",
                         key_name="mine", fingerprint="f" * 32, versions=[1, 2], enabled=True)
    assert rec["versions"] == [1, 2] and rec["enabled"] is True


# --------------------------------------------------------------------------
# reading and following
# --------------------------------------------------------------------------

def test_read_with_a_key_filter(log_path):
    with AuditLog.open(log_path) as log:
        log.append("kms.create-key", key_id="id-1", alias="alias/a")
        log.append("kms.decrypt", key_id="id-2")
        log.append("sse-c.load", key_name="mine", fingerprint="ab" * 16)
        log.append("kms.decrypt", key_id="id-1")
        log.append("master-key.rotate", key_version=2)
    assert [r["seq"] for r in audit.read(log_path)] == [1, 2, 3, 4, 5]
    assert [r["seq"] for r in audit.read(log_path, key="id-1")] == [1, 4]
    # an alias selects its key's records too: records of a key's use carry only its id
    assert [r["seq"] for r in audit.read(log_path, key="alias/a")] == [1, 4]
    assert [r["seq"] for r in audit.read(log_path, key="ab" * 16)] == [3]
    assert [r["seq"] for r in audit.read(log_path, key="mine")] == [3]
    assert list(audit.read(log_path, key="nope")) == []


def test_read_skips_a_partial_tail_and_refuses_a_bad_line(log_path):
    _fill(log_path, 3).close()
    lines = _lines(log_path)
    _write(log_path, lines + [lines[0][:10]])
    assert len(list(audit.read(log_path))) == 3
    _write(log_path, [lines[0], b"garbage\n", lines[2]])
    with pytest.raises(AuditError, match="line 2"):
        list(audit.read(log_path))
    with pytest.raises(AuditError):
        list(audit.read(log_path + ".missing"))


def test_follow_yields_new_records_whole_and_stops_on_keyboard_interrupt(log_path, tmp_path):
    source = str(tmp_path / "source" / "audit.log")
    _fill(source, 6).close()
    os.makedirs(os.path.dirname(log_path))
    lines = _lines(source)
    _write(log_path, lines[:2])
    steps = [
        lambda f: f.write(lines[2] + lines[3][:17]),  # a record caught half written
        lambda f: f.write(lines[3][17:]),
        lambda f: None,  # nothing new: keeps polling
        lambda f: f.write(lines[4] + lines[5]),
    ]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if not steps:
            raise KeyboardInterrupt
        with open(log_path, "ab") as f:
            steps.pop(0)(f)

    got = list(audit.follow(log_path, poll=0.5, sleep=sleep))
    assert [r["seq"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert got == [json.loads(line) for line in lines]
    assert sleeps == [0.5] * 5


def test_follow_from_the_end_with_a_key_filter(log_path):
    log = _fill(log_path, 4)  # keys k0, k1, k0, k1

    def sleep(_):
        if log.seq == 6:
            raise KeyboardInterrupt
        log.append("kms.decrypt", key_id="k0")
        log.append("kms.decrypt", key_id="k1")

    got = list(audit.follow(log_path, key="k1", existing=False, sleep=sleep))
    log.close()
    assert [r["seq"] for r in got] == [6]


def test_follow_refuses_a_truncated_log(log_path):
    _fill(log_path, 3).close()

    def sleep(_):
        os.truncate(log_path, 0)

    with pytest.raises(AuditError, match="truncated"):
        list(audit.follow(log_path, sleep=sleep))


def test_process_name():
    with open("/proc/self/comm") as f:
        assert audit.process_name(os.getpid()) == f.read().rstrip("\n")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert audit.process_name(proc.pid) is None
    assert audit.process_name(0) is None
    assert audit.caller(1, 2, 0) == {"uid": 1, "gid": 2, "pid": 0, "process": None}


# --------------------------------------------------------------------------
# verify: each kind of tampering, at the right line
# --------------------------------------------------------------------------

def test_verify_reports_the_edited_record_by_its_line(log20):
    path, head, seq = log20
    lines = _lines(path)
    lines[16] = _edit(lines[16], uid=12345)
    _write(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad, result.records) == (False, 17, 20)
    assert result.reason == "record 17 was edited (its hash no longer matches record 18's prev)"
    assert verify(path, head, seq).first_bad == 17


@pytest.mark.parametrize("k", [1, 2, 10, 19])
@pytest.mark.parametrize("field", ["op", "outcome", "time", "path", "seq", "prev"])
def test_verify_edits_of_any_field(log20, k, field):
    path, head, seq = log20
    lines = _lines(path)
    old = json.loads(lines[k - 1])
    new = {"op": "benign", "outcome": "allowed" if old["outcome"] == "denied" else "denied",
           "time": "2000-01-01T00:00:00.000000Z", "path": "/elsewhere", "seq": k + 7,
           "prev": "f" * 64}[field]
    lines[k - 1] = _edit(lines[k - 1], **{field: new})
    _write(path, lines)
    for args in [(), (head,), (head, seq)]:
        result = verify(path, *args)
        assert (result.ok, result.first_bad) == (False, k), (args, result.reason)
        assert f"record {k} was edited" in result.reason


def test_verify_edit_of_the_last_record_needs_the_head(log20):
    path, head, seq = log20
    lines = _lines(path)
    lines[-1] = _edit(lines[-1], op="benign")
    _write(path, lines)
    assert verify(path).ok  # nothing after it to notice
    result = verify(path, head, seq)
    assert (result.ok, result.first_bad) == (False, 20)
    assert result.reason == "record 20 was edited (its hash is not the expected head)"
    assert not verify(path, head).ok


def test_verify_edit_into_garbage_and_reformatting(log20):
    path, _, _ = log20
    lines = _lines(path)
    _write(path, lines[:4] + [b"{not json\n"] + lines[5:])
    assert verify(path).first_bad == 5
    reformatted = json.dumps(json.loads(lines[4])).encode() + b"\n"  # same record, other bytes
    _write(path, lines[:4] + [reformatted] + lines[5:])
    assert verify(path).first_bad == 5


@pytest.mark.parametrize("position", [1, 2, 11, 20])
@pytest.mark.parametrize("kind", ["copy", "garbage", "forged", "forged-fork"])
def test_verify_reports_an_inserted_line(log20, position, kind):
    path, head, seq = log20
    lines = _lines(path)
    intruder = {
        "copy": lines[(position + 5) % 20],
        "garbage": b"hello\n",
        "forged": _record(position, _h(lines[position - 2]) if position > 1 else audit.ZERO_HASH),
        "forged-fork": _record(position - 1, _h(lines[position - 3]) if position > 2
                               else audit.ZERO_HASH),
    }[kind]
    _write(path, lines[: position - 1] + [intruder] + lines[position - 1 :])
    for args in [(), (head, seq)]:
        result = verify(path, *args)
        assert (result.ok, result.first_bad, result.records) == (False, position, 21), result.reason
        assert f"line {position} was inserted" in result.reason


def test_verify_reports_a_record_appended_after_the_head(log20):
    path, head, seq = log20
    lines = _lines(path)
    for intruder in [lines[3], _record(21, _h(lines[-1]))]:
        _write(path, lines + [intruder])
        result = verify(path, head, seq)
        assert (result.ok, result.first_bad) == (False, 21), result.reason
        assert "inserted after the expected head" in result.reason


@pytest.mark.parametrize("k", [1, 2, 10, 19])
def test_verify_reports_a_deleted_record(log20, k):
    path, head, seq = log20
    lines = _lines(path)
    _write(path, lines[: k - 1] + lines[k:])
    for args in [(), (head, seq)]:
        result = verify(path, *args)
        assert (result.ok, result.first_bad, result.records) == (False, k, 19)
        assert result.reason.startswith(f"record {k} was deleted")
    if k + 1 < len(lines):
        _write(path, lines[: k - 1] + lines[k + 1 :])
        assert verify(path).reason.startswith(f"records {k}-{k + 1} were deleted")


def test_verify_reports_a_truncated_tail_with_the_head(log20):
    path, head, seq = log20
    lines = _lines(path)
    _write(path, lines[:17])
    assert verify(path).ok  # a prefix of a chain is a chain
    result = verify(path, head)
    assert (result.ok, result.first_bad, result.records) == (False, 18, 17)
    assert "does not end at the expected head" in result.reason
    result = verify(path, head, seq)
    assert (result.ok, result.first_bad) == (False, 18)
    assert result.reason == "records 18-20 were deleted (the log was cut short)"
    _write(path, [])
    assert verify(path, head, seq).first_bad == 1


def test_verify_reports_a_trailing_partial_line(log20):
    path, head, seq = log20
    lines = _lines(path)
    _write(path, lines[:-1] + [lines[-1][:-1]])  # the newline gone
    result = verify(path)
    assert (result.ok, result.first_bad, result.records) == (False, 20, 19)
    assert "partial record" in result.reason
    _write(path, lines + [b'{"seq":21,'])
    assert verify(path, head, seq).first_bad == 21


def test_verify_of_a_missing_log_raises(tmp_path):
    with pytest.raises(AuditError):
        verify(str(tmp_path / "nope.log"))


# --------------------------------------------------------------------------
# verify: any single tampering anywhere, found at its line
# --------------------------------------------------------------------------

FIELDS = ["op", "outcome", "time", "path", "uid", "key_id", "seq", "prev"]


@st.composite
def tamperings(draw):
    n = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["edit", "insert", "delete"]))
    if kind == "insert":
        position = draw(st.integers(1, n + 1))
        how = draw(st.sampled_from(["copy", "garbage", "forged", "forged-fork", "random"]))
        detail = (how, draw(st.integers(0, n - 1)), draw(st.integers(0, 2**64)))
    else:
        position = draw(st.integers(1, n))
        how = draw(st.sampled_from(FIELDS + ["garbage", "reformat"]))
        detail = (how, draw(st.integers(0, 2**64)), None)
    return n, kind, position, detail


def _tamper(lines: list[bytes], kind: str, position: int, detail) -> list[bytes]:
    how, a, b = detail
    k = position - 1
    if kind == "delete":
        return lines[:k] + lines[k + 1 :]
    if kind == "insert":
        hashes = [audit.ZERO_HASH] + [_h(line) for line in lines]
        intruder = {
            "copy": lambda: lines[a],
            "garbage": lambda: b"x" * (b % 7) + b"\n",
            "forged": lambda: _record(position, hashes[position - 1]),
            "forged-fork": lambda: _record(max(1, position - 1), hashes[max(0, position - 2)]),
            "random": lambda: _record(b % (len(lines) + 3), f"{b:064x}"),
        }[how]()
        return lines[:k] + [intruder] + lines[k:]
    old = json.loads(lines[k])
    if how == "garbage":
        new = b"garbage %d\n" % a
    elif how == "reformat":
        new = json.dumps(old).encode() + b"\n"
    else:
        value = {
            "op": f"op{a}", "outcome": "allowed" if old["outcome"] == "denied" else "denied",
            "time": f"2000-01-01T00:00:00.{a % 10**6:06d}Z", "path": f"/p{a}", "uid": a,
            "key_id": f"kk{a}", "seq": position + 1 + a % 5 if a % 2 else a % max(1, position),
            "prev": f"{a:064x}",
        }[how]
        new = _edit(lines[k], **{how: value})
    return lines[:k] + [new] + lines[k + 1 :]


@settings(max_examples=400, deadline=None)
@given(tamperings())
def test_verify_finds_any_single_tampering_at_its_line(case):
    n, kind, position, detail = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audit.log")
        log = _fill(path, n)
        log.close()
        lines = _lines(path)
        tampered = _tamper(lines, kind, position, detail)
        if tampered == lines:  # e.g. a reformat that reproduced the same bytes
            return
        _write(path, tampered)
        if kind == "insert":
            # Inserting a copy next to its original: either of the twins is "the" intruder.
            expected = {q + 1 for q in range(len(tampered))
                        if tampered[:q] + tampered[q + 1 :] == lines}
        else:
            expected = {position}
        result = verify(path, log.head, log.seq)
        assert not result.ok
        assert result.first_bad in expected, (result, kind, position, detail)
        assert result.records == len(tampered)
        # Away from the tail the chain alone is enough: no kept head needed.
        if (kind == "insert" and position <= n) or (kind != "insert" and position < n):
            result = verify(path)
            assert not result.ok and result.first_bad in expected, (result, kind, position, detail)

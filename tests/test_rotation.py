"""SSE-S3 master-key rotation: rotate under load, the re-wrap sweep, retirement, kill -9.

Real mounts, real processes reading and writing, the real control socket. The sweep
is made observable (and, where a test needs it, held) with `s3fuse rotate
--pause-sweep/--resume-sweep` and a low `--rewrap-rate`, never with sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from s3fuse import format as fmt
from s3fuse.control import protocol
from s3fuse.control.client import ControlClient
from s3fuse.rotation import SlotRow, rewrap_slots

from .conftest import TRACEBACK, run_cli, wait_until
from .test_cli import assert_cli_error

MASTER_VERSION = "user.s3fuse.master-key-version"


def status(mnt: Path) -> dict:
    with ControlClient(protocol.socket_path(os.path.realpath(mnt)), timeout=30) as c:
        return c.call("status")


def flush(mnt: Path) -> None:
    """Every closed file's data stored and committed (the daemon's `flush` request)."""
    with ControlClient(protocol.socket_path(os.path.realpath(mnt)), timeout=60) as c:
        c.call("flush")


def counts(mnt: Path) -> dict[int, int]:
    return {v["version"]: v["objects"] for v in status(mnt)["master_keys"]}


def rotate(mnt: Path, *args) -> subprocess.CompletedProcess:
    r = run_cli("rotate", mnt, *args)
    assert TRACEBACK not in r.stderr, r.stderr
    return r


def rotate_ok(mnt: Path, *args) -> str:
    r = rotate(mnt, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def old_versions_drained(mnt: Path) -> bool:
    st = status(mnt)
    cur = st["master_key_version"]
    return all(v["objects"] == 0 for v in st["master_keys"] if v["version"] != cur) \
        and st["rewrap"]["remaining"] == 0


def db_versions(store: Path) -> dict[int, int]:
    db = sqlite3.connect(f"file:{store}/meta.db?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key_version, count(*) FROM blocks WHERE mode='AES256' GROUP BY key_version"))
    finally:
        db.close()


def audit_ops(mnt: Path) -> list[dict]:
    r = run_cli("audit", "--mount", mnt)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def make_files(mnt: Path, n: int, size: int = 300) -> dict[str, bytes]:
    files = {}
    d = mnt / "many"
    d.mkdir(exist_ok=True)
    for i in range(n):
        data = hashlib.sha256(b"%d" % i).digest() * (size // 32 + 1)
        (d / f"f{i:04d}").write_bytes(data[: size + i])
        files[f"many/f{i:04d}"] = data[: size + i]
    flush(mnt)
    return files


def check(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = (mnt / name).read_bytes()
        assert got == data, f"{name}: {len(got)} bytes, expected {len(data)}"


# --------------------------------------------------------------------------- pure core

def test_rewrap_slots_keeps_the_binding():
    sid, oid = os.urandom(16), os.urandom(16)
    old, new = os.urandom(32), os.urandom(32)
    dk = os.urandom(32)
    aad = fmt.key_slot_aad(sid, oid, 7, 3, "AES256", "")
    row = SlotRow(7, 3, oid, 1, fmt.wrap_data_key(old, dk, aad))
    bad = SlotRow(8, 0, os.urandom(16), 1, row.key_slot)  # another row's slot: wrong AAD
    gone = SlotRow(9, 0, os.urandom(16), 5, row.key_slot)  # a version not in the keyring
    done, failed = rewrap_slots(sid, [row, bad, gone], {1: old}, 2, new)
    assert [d[0] for d in done] == [oid] and done[0][1] == row.key_slot
    assert fmt.unwrap_data_key(new, done[0][2], aad) == dk
    assert {f[0] for f in failed} == {bad.object_id, gone.object_id}
    assert "version 5" in dict(failed)[gone.object_id]


# --------------------------------------------------------------------------- under load

WORKER = r"""
import hashlib, json, os, sys
root, wid, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def content(i, gen):
    seed = hashlib.sha256(f"{wid}/{i}/{gen}".encode()).digest()
    return seed * (1 + (i * 37 + gen * 11) % 300)
gens = {}
i = 0
os.makedirs(root, exist_ok=True)
while not os.path.exists(stop) or i < 30:
    name = os.path.join(root, f"w{wid}-{i % 40}")
    gen = gens.get(name, -1) + 1
    with open(name, "wb") as f:
        f.write(content(i % 40, gen))
    gens[name] = gen
    # read back an earlier file and check it
    j = (i * 7) % 40
    other = os.path.join(root, f"w{wid}-{j}")
    if other in gens:
        with open(other, "rb") as f:
            if f.read() != content(j, gens[other]):
                print(json.dumps({"error": f"{other} has wrong content"})); sys.exit(1)
    i += 1
print(json.dumps({"files": {os.path.basename(n): hashlib.sha256(content(int(n.rsplit('-', 1)[1]), g)).hexdigest()
                            for n, g in gens.items()}, "writes": i}))
"""


def test_rotation_while_processes_read_and_write(mount_factory, workdir):
    m = mount_factory(extra_args=["--rewrap-batch", "20"])
    mnt = m.mnt
    base = make_files(mnt, 60)
    stop = workdir("ctl") / "stop"
    (mnt / "load").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(mnt / "load"), str(w), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    try:
        wait_until(lambda: len(os.listdir(mnt / "load")) >= 40, 60, "the writers to get going")
        for expected in (2, 3, 4):
            out = rotate_ok(mnt)
            assert f"version {expected} is current" in out
            # foreground I/O goes on through each rotation
            before = status(mnt)["writes"]
            wait_until(lambda: status(mnt)["writes"] >= before + 20, 60, "writes after rotating")
    finally:
        stop.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"worker failed: {out} {err}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["writes"] >= 30 for r in results)

    wait_until(lambda: old_versions_drained(mnt), 60, "the sweep to re-wrap every old key slot")
    c = counts(mnt)
    assert c[4] > 0 and c.get(1, 0) == c.get(2, 0) == c.get(3, 0) == 0, c
    check(mnt, base)
    for r in results:
        for name, digest in r["files"].items():
            assert hashlib.sha256((mnt / "load" / name).read_bytes()).hexdigest() == digest, name
    for name in list(base)[:10]:
        assert os.getxattr(mnt / name, MASTER_VERSION) == b"4"
    assert set(db_versions(m.store)) == {4}
    ops = [r["op"] for r in audit_ops(mnt)]
    assert ops.count("sse-s3:RotateMasterKey") == 3 and "sse-s3:RewrapDone" in ops

    # the old versions are no longer needed: retire them, and everything stays readable
    out = rotate_ok(mnt, "--retire-unused")
    assert all(f"retired master key version {v}" in out for v in (1, 2, 3)), out
    states = {v["version"]: v["state"] for v in status(mnt)["master_keys"]}
    assert states == {1: "retired", 2: "retired", 3: "retired", 4: "current"}
    check(mnt, base)
    m.remount()
    check(m.mnt, base)
    for r in results:
        for name, digest in r["files"].items():
            assert hashlib.sha256((m.mnt / "load" / name).read_bytes()).hexdigest() == digest, name


# --------------------------------------------------------------------------- retirement

def test_retirement_refused_while_anything_depends(mount_factory):
    m = mount_factory(extra_args=["--rewrap-batch", "10"])
    mnt = m.mnt
    files = make_files(mnt, 50)
    r = rotate(mnt, "--retire-unused")
    assert r.returncode == 0 and "nothing to retire" in r.stdout, r.stderr

    rotate_ok(mnt, "--pause-sweep")
    rotate_ok(mnt)
    assert counts(mnt)[1] == 50
    assert status(mnt)["rewrap"]["state"] == "paused"
    r = rotate(mnt, "--retire-unused")
    assert_cli_error(r, "retire while version 1 protects 50 objects")
    assert "version 1" in r.stderr and "50 object(s) still depend on it" in r.stderr and "paused" in r.stderr
    assert {v["version"]: v["state"] for v in status(mnt)["master_keys"]} == {1: "old", 2: "current"}
    check(mnt, files)  # version 1 is still there: nothing was erased

    # new objects use version 2 from the moment of the rotation
    (mnt / "new").write_bytes(b"written after the rotation")
    flush(mnt)
    wait_until(lambda: counts(mnt).get(2, 0) >= 1, 30, "the new file to be stored")
    assert os.getxattr(mnt / "new", MASTER_VERSION) == b"2"

    rotate_ok(mnt, "--resume-sweep")
    wait_until(lambda: old_versions_drained(mnt), 60, "the sweep to finish")
    out = rotate_ok(mnt, "--retire-unused")
    assert "retired master key version 1" in out
    st = status(mnt)
    assert [(v["version"], v["state"], v["objects"]) for v in st["master_keys"]] == \
        [(1, "retired", 0), (2, "current", 51)]
    ops = [(r["op"], r["outcome"]) for r in audit_ops(mnt)]
    assert ("sse-s3:RetireMasterKey", "denied") in ops and ("sse-s3:RetireMasterKey", "allowed") in ops
    check(mnt, files)
    m.remount()
    check(m.mnt, files)
    assert (m.mnt / "new").read_bytes() == b"written after the rotation"
    assert {v["version"]: v["state"] for v in status(m.mnt)["master_keys"]} == {1: "retired", 2: "current"}


def test_rotate_needs_owner_or_root(mounted):
    from .test_sse import cli

    r = cli("rotate", mounted.mnt, uid=1000)
    assert r.returncode != 0 and "only root or the user who mounted" in r.stderr, r.stderr
    assert status(mounted.mnt)["master_key_version"] == 1


# --------------------------------------------------------------------------- kill -9

def test_kill9_during_sweep_then_resume(mount_factory):
    m = mount_factory(extra_args=["--rewrap-batch", "10", "--rewrap-rate", "20"])
    mnt = m.mnt
    files = make_files(mnt, 120)
    rotate_ok(mnt)
    # let the sweep commit a few batches, then hold it and kill the daemon mid-sweep
    wait_until(lambda: status(mnt)["rewrap"]["done"] >= 20, 60, "the sweep to make progress")
    with ControlClient(protocol.socket_path(os.path.realpath(mnt)), timeout=30) as c:
        assert c.call("rotate.sweep", paused=True)["state"] == "paused"
    done = status(mnt)["rewrap"]["done"]
    m.kill9()
    v = db_versions(m.store)
    assert v.get(2, 0) >= done >= 20 and v.get(1, 0) > 0, v  # really caught half-way
    assert v[1] + v[2] == 120

    m.extra_args = []  # default batch and rate
    m.start()
    # every file readable at once, whichever version its slot is under
    check(m.mnt, files)
    wait_until(lambda: old_versions_drained(m.mnt), 60, "the sweep to resume and finish")
    assert db_versions(m.store) == {2: 120}
    st = status(m.mnt)
    assert st["rewrap"]["done"] == 120 and st["rewrap"]["total"] == 120, st["rewrap"]
    assert "sse-s3:RewrapDone" in [r["op"] for r in audit_ops(m.mnt)]
    check(m.mnt, files)
    rotate_ok(m.mnt, "--retire-unused")
    m.remount()
    check(m.mnt, files)


# --------------------------------------------------------------------------- the schedule

def test_scheduled_rotation(mount_factory, workdir):
    store = workdir("s") / "store"
    r = run_cli("init", store)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((store / "store.json").read_text())
    assert cfg["rotation_interval"] == 30 * 86400  # the documented default
    cfg["rotation_interval"] = 0.5  # the store's own setting drives the schedule
    (store / "store.json").write_text(json.dumps(cfg))
    m = mount_factory(store=store)
    files = make_files(m.mnt, 20)
    wait_until(lambda: status(m.mnt)["master_key_version"] >= 3, 60, "two scheduled rotations")
    m.unmount()
    m.extra_args = ["--rotation-interval", "0"]  # the mount option overrides: no more rotations
    m.start()
    st = status(m.mnt)
    assert st["next_rotation"] is None and st["rotation_interval"] == 0
    wait_until(lambda: old_versions_drained(m.mnt), 60, "the sweep")
    check(m.mnt, files)
    current = status(m.mnt)["master_key_version"]
    rot = [r for r in audit_ops(m.mnt) if r["op"] == "sse-s3:RotateMasterKey"]
    assert len(rot) == current - 1 and all(r["trigger"] == "schedule" for r in rot)
    r = run_cli("status", m.mnt)
    assert "re-wrap sweep:" in r.stdout and "next rotation: never" in r.stdout
    assert f"version {current}: current, 20 object(s) depend on it" in r.stdout


def test_one_scheduler_also_rotates_kms_keys(mount_factory):
    """The daemon's key scheduler runs the built-in KMS's automatic rotation too."""
    from s3fuse.keys.kms import BuiltinKms
    from s3fuse.store import load_config, obtain_root_key

    m = mount_factory()
    r = run_cli("kms", "create-key", "--alias", "alias/auto", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    r = run_cli("kms", "enable-rotation", "alias/auto", "--days", "1", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    m.unmount()
    # a day passes: move the key's next rotation date into the past
    cfg = load_config(str(m.store))
    kms = BuiltinKms.load(cfg.kms_path, obtain_root_key(cfg), cfg.store_id)
    key = kms._keys[kms.resolve("alias/auto")]
    assert key.rotation["enabled"] and len(key.versions) == 1
    key.rotation["next"] -= 86400 + 60
    kms.save()
    m.start()

    def kms_version() -> int:
        r = run_cli("kms", "describe", "alias/auto", "--mount", m.mnt)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["current_version"]

    wait_until(lambda: kms_version() == 2, 30, "the scheduler to rotate the KMS key")
    rec = [r for r in audit_ops(m.mnt) if r["op"] == "kms:RotateKey"]
    assert rec and rec[-1]["trigger"] == "schedule"
    assert status(m.mnt)["master_key_version"] == 1  # the master key's schedule is not due

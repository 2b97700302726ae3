"""End-to-end tests of the encryption modes: SSE-S3, SSE-KMS and SSE-C on a real mount.

Everything goes through the kernel: directory settings and the read-only per-file
descriptions are xattrs (`setfattr`/`getfattr` and os.*xattr), keys and the KMS are
driven with the `s3fuse` CLI as a subprocess (as root and as unprivileged uids),
reads and writes are plain open/read/write/fsync or `cat`. Unprivileged callers are
uids 2001 and 2002 on `--allow-other` mounts.

Covered: setting round trips and inheritance, modes kept across directory changes
and renames, the read-only xattrs, owner checks and malformed settings; SSE-C key
scoping per uid and across a remount; KMS key policies, states and the audit trail
of their use; re-encryption of one file and of a tree; a search of the whole store
and the logs for customer keys and data keys; audit-chain verification and tamper
detection; a fuzzed control socket.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import select
import socket
import sqlite3
import stat
import struct
import subprocess
import sysconfig
import time
from pathlib import Path

import msgpack
import pytest

from s3fuse import format as fmt
from s3fuse.control import protocol
from s3fuse.keys import customer as ssec
from s3fuse.keys.kms import BuiltinKms, Principal
from s3fuse.store import load_config, load_keyring, load_root_key

from .conftest import REPO, S3FUSE, TRACEBACK, UNPRIV_PYTHON, run_as

# every test here runs on the local and the S3 backend (conftest.py, "S3 backend")
BACKENDS = ("local", "s3")

SSE = "user.s3fuse.sse"
MODE = "user.s3fuse.mode"
MASTER_VERSION = "user.s3fuse.master-key-version"
KMS_KEY = "user.s3fuse.kms-key-id"
KMS_VERSION = "user.s3fuse.kms-key-version"
FINGERPRINT = "user.s3fuse.sse-c-fingerprint"
READ_ONLY = (MODE, MASTER_VERSION, KMS_KEY, KMS_VERSION, FINGERPRINT)

ALLOW_OTHER = ["--allow-other"]
ALICE = 2001  # uid == gid
BOB = 2002

# The unprivileged uids cannot reach the venv's interpreter (under /root); they run
# the same s3fuse source with the system python and the venv's site-packages.
_SITE = sysconfig.get_paths()["purelib"]
_UNPRIV_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "PYTHONPATH": f"{REPO}:{_SITE}", "LANG": "C.UTF-8", "HOME": "/"}


# --------------------------------------------------------------------------
# helpers: the CLI
# --------------------------------------------------------------------------

def cli(*args, input: str | None = None, uid: int | None = None, timeout: float = 60):
    """Run `s3fuse ARGS` (as root, or as uid:uid with no supplementary groups)."""
    args = [str(a) for a in args]
    kw = dict(capture_output=True, text=True, timeout=timeout, cwd="/", input=input)
    if input is None:
        kw["stdin"] = subprocess.DEVNULL
    if uid is None:
        return subprocess.run([*S3FUSE, *args], **kw)
    return subprocess.run([UNPRIV_PYTHON, "-m", "s3fuse", *args], user=uid, group=uid,
                          extra_groups=[], env=_UNPRIV_ENV, **kw)


def cli_ok(*args, **kw) -> str:
    r = cli(*args, **kw)
    what = " ".join(map(str, args))
    assert r.returncode == 0, f"s3fuse {what} failed ({r.returncode}): {r.stderr}"
    assert TRACEBACK not in r.stderr, r.stderr
    return r.stdout


def cli_fails(*args, **kw) -> str:
    """The command fails the documented way: non-zero, one `s3fuse: ...` line on stderr."""
    r = cli(*args, **kw)
    what = " ".join(map(str, args))
    assert r.returncode != 0, f"s3fuse {what} unexpectedly succeeded: {r.stdout}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3fuse: "), f"not one s3fuse line: {r.stderr!r}"
    return lines[0]


def add_key(mnt, name: str, key: bytes, uid: int | None = None, *extra) -> str:
    """`s3fuse key add NAME` with the key's base64 on stdin; returns the fingerprint."""
    b64 = base64.b64encode(key).decode() + "\n"
    out = cli_ok("key", "add", name, "-m", mnt, *extra, input=b64, uid=uid)
    fp = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", fp), f"key add printed {out!r}, not a fingerprint"
    return fp


def kms_create(mnt, alias: str) -> str:
    d = json.loads(cli_ok("kms", "create-key", "--alias", alias, "--description", "test key",
                          "-m", mnt))
    assert d["alias"] == alias and d["state"] == "Enabled"
    return d["id"]


def kms_describe(mnt, key: str) -> dict:
    return json.loads(cli_ok("kms", "describe", key, "-m", mnt))


def audit_records(mnt, key: str | None = None) -> list[dict]:
    out = cli_ok("audit", "-m", mnt, *(["--key", key] if key else []))
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------
# helpers: xattrs with the attr tools, syscalls as root or as another uid
# --------------------------------------------------------------------------

def setfattr(path, value: str, uid: int | None = None) -> subprocess.CompletedProcess:
    argv = ["setfattr", "-n", SSE, "-v", value, str(path)]
    if uid is not None:
        return run_as(uid, uid, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def setfattr_ok(path, value: str, uid: int | None = None) -> None:
    r = setfattr(path, value, uid)
    assert r.returncode == 0, f"setfattr {SSE}={value} on {path} failed: {r.stderr}"


def setfattr_fails(path, value: str, err: int, uid: int | None = None) -> None:
    r = setfattr(path, value, uid)
    assert r.returncode != 0, (
        f"setfattr {SSE}={value!r} on {path} succeeded; expected {errno.errorcode[err]}")
    assert os.strerror(err) in r.stderr, f"expected {os.strerror(err)!r}, got {r.stderr!r}"


def getfattr(path, name: str = SSE, uid: int | None = None) -> str:
    argv = ["getfattr", "--absolute-names", "--only-values", "-n", name, str(path)]
    if uid is not None:
        r = run_as(uid, uid, argv)
    else:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"getfattr -n {name} {path} failed: {r.stderr}"
    return r.stdout


def xattr(path, name: str) -> str:
    return os.getxattr(path, name).decode()


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def write_file(path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)  # stored now: the per-object xattrs and key checks see real objects
    finally:
        os.close(fd)
    os.chmod(path, mode)


def read_file(path) -> bytes:
    """Read through the daemon, not the page cache of an earlier read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


_OPS = r"""
import errno, json, os, sys
op = sys.argv[1]
a = json.loads(sys.argv[2])
try:
    res = None
    if op == "read":
        with open(a[0], "rb") as f:
            res = f.read().hex()
    elif op == "write":
        fd = os.open(a[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, a[2])
        try:
            os.write(fd, bytes.fromhex(a[1])); os.fsync(fd)
        finally:
            os.close(fd)
    elif op == "create":
        os.close(os.open(a[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif op == "getxattr":
        res = os.getxattr(a[0], a[1]).decode()
    elif op == "setxattr":
        os.setxattr(a[0], a[1], a[2].encode())
    elif op == "removexattr":
        os.removexattr(a[0], a[1])
    elif op == "stat":
        st = os.stat(a[0]); res = [st.st_mode, st.st_uid, st.st_size]
    elif op == "chmod":
        os.chmod(a[0], a[1])
    elif op == "mkdir":
        os.mkdir(a[0], a[1])
    else:
        raise SystemExit("unknown op " + op)
    print(json.dumps({"ok": res}))
except OSError as e:
    print(json.dumps({"errno": e.errno}))
"""


def as_uid(uid: int, op: str, *args):
    """One syscall-level operation as uid:uid -> ("ok", result) or ("errno", n)."""
    encoded = json.dumps([str(a) if isinstance(a, Path) else a for a in args])
    r = run_as(uid, uid, [UNPRIV_PYTHON, "-c", _OPS, op, encoded])
    assert r.returncode == 0, f"helper {op}{args} as {uid} crashed: {r.stderr}"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return ("errno", d["errno"]) if "errno" in d else ("ok", d["ok"])


def cat_as(uid: int, path) -> subprocess.CompletedProcess:
    """`cat PATH` as uid:uid, output as bytes."""
    return subprocess.run(["cat", str(path)], user=uid, group=uid, extra_groups=[],
                          capture_output=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)


def owned_dir(path: Path, uid: int, mode: int = 0o755) -> Path:
    os.mkdir(path)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


# ==========================================================================
# 1. directory settings, inheritance, file modes, read-only xattrs, errors
# ==========================================================================

def test_directory_settings_inheritance_and_file_modes(mount_factory):
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt

    # the root's default
    assert getfattr(mnt) == "AES256"
    key_id = kms_create(mnt, "alias/t1-photos")
    ckey = os.urandom(32)
    fp = add_key(mnt, "c1", ckey)

    # every mode and spelling round-trips to its canonical form
    cases = [
        ("s3", "AES256", "AES256"),
        ("kms-default", "aws:kms", None),  # the managed key's id, checked below
        ("kms-alias", "aws:kms:alias/t1-photos", f"aws:kms:{key_id}"),
        ("kms-id", f"aws:kms:{key_id}", f"aws:kms:{key_id}"),
        ("c-name", "SSE-C:c1", f"SSE-C:{fp}"),
        ("c-fp", f"SSE-C:{fp}", f"SSE-C:{fp}"),
    ]
    got = {}
    for name, value, canonical in cases:
        d = mnt / name
        os.mkdir(d)
        setfattr_ok(d, value)
        got[name] = getfattr(d)
        if canonical is not None:
            assert got[name] == canonical, f"{value} reads back as {got[name]!r}"
        assert xattr(d, SSE) == got[name]
    managed = kms_describe(mnt, "alias/aws/s3")
    assert managed["managed"] is True and managed["state"] == "Enabled"
    assert got["kms-default"] == f"aws:kms:{managed['id']}"
    assert managed["id"] != key_id

    # files take the mode of their directory; the read-only xattrs describe it
    content = {}
    for name, *_ in cases:
        f = mnt / name / "f.bin"
        content[name] = os.urandom(70_000) + name.encode()
        write_file(f, content[name])
    expect = {
        "s3": {MODE: "AES256", MASTER_VERSION: "1"},
        "kms-default": {MODE: "aws:kms", KMS_KEY: managed["id"], KMS_VERSION: "1"},
        "kms-alias": {MODE: "aws:kms", KMS_KEY: key_id, KMS_VERSION: "1"},
        "kms-id": {MODE: "aws:kms", KMS_KEY: key_id, KMS_VERSION: "1"},
        "c-name": {MODE: "SSE-C", FINGERPRINT: fp},
        "c-fp": {MODE: "SSE-C", FINGERPRINT: fp},
    }
    for name, want in expect.items():
        f = mnt / name / "f.bin"
        assert read_file(f) == content[name]
        for attr in READ_ONLY:
            if attr in want:
                assert getfattr(f, attr) == want[attr], f"{name}: {attr}"
                assert xattr(f, attr) == want[attr]
            else:
                assert errno_of(os.getxattr, f, attr) == errno.ENODATA, f"{name}: {attr} is set"
        assert xattr(f, SSE) == got[name]  # a file's own setting
        # read-only, and not listed
        listed = os.listxattr(f)
        assert not [n for n in listed if n.startswith("user.s3fuse.")], listed
        dump = subprocess.run(["getfattr", "-d", "-m", "-", "--absolute-names", str(f)],
                              capture_output=True, text=True)
        assert "s3fuse" not in dump.stdout, dump.stdout
        for attr in READ_ONLY:
            assert errno_of(os.setxattr, f, attr, b"AES256") == errno.EPERM, f"{name}: set {attr}"
        r = subprocess.run(["setfattr", "-n", MODE, "-v", "AES256", str(f)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
        assert getfattr(f, MODE) == want[MODE]

    # inheritance: nearest explicit setting wins; removing it restores inheritance
    parent = mnt / "inh"
    os.mkdir(parent)
    assert getfattr(parent) == "AES256"  # inherits the root default
    assert SSE not in os.listxattr(parent)
    setfattr_ok(parent, "aws:kms:alias/t1-photos")
    child = parent / "child"
    grand = child / "grand"
    os.makedirs(grand)
    assert getfattr(child) == f"aws:kms:{key_id}"
    assert getfattr(grand) == f"aws:kms:{key_id}"
    write_file(child / "old.txt", b"written under KMS")
    assert xattr(child / "old.txt", MODE) == "aws:kms"

    setfattr_ok(child, "AES256")  # explicit child overrides
    assert getfattr(child) == "AES256"
    assert getfattr(grand) == "AES256"
    assert getfattr(parent) == f"aws:kms:{key_id}"
    write_file(grand / "mid.txt", b"written under SSE-S3")
    assert xattr(grand / "mid.txt", MODE) == "AES256"
    assert xattr(child / "old.txt", MODE) == "aws:kms"  # an existing file keeps its mode

    setfattr_ok(child, f"SSE-C:{fp}")
    assert getfattr(grand) == f"SSE-C:{fp}"
    write_file(grand / "c.txt", b"written under SSE-C")
    assert xattr(grand / "c.txt", MODE) == "SSE-C"

    r = subprocess.run(["setfattr", "-x", SSE, str(child)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert getfattr(child) == f"aws:kms:{key_id}"
    assert getfattr(grand) == f"aws:kms:{key_id}"
    assert SSE not in os.listxattr(child)
    write_file(grand / "new.txt", b"written under KMS again")
    assert xattr(grand / "new.txt", MODE) == "aws:kms"
    assert xattr(child / "old.txt", MODE) == "aws:kms"
    assert read_file(child / "old.txt") == b"written under KMS"
    for name, mode, data in [("mid.txt", "AES256", b"written under SSE-S3"),
                             ("c.txt", "SSE-C", b"written under SSE-C")]:
        assert xattr(grand / name, MODE) == mode and read_file(grand / name) == data

    # the root's own setting can change too, and removing it restores the default
    setfattr_ok(mnt, "aws:kms:alias/t1-photos")
    assert getfattr(mnt / "inh") == f"aws:kms:{key_id}"
    assert getfattr(mnt / "s3") == "AES256"
    r = subprocess.run(["setfattr", "-x", SSE, str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert getfattr(mnt) == "AES256"

    # a rename never re-encrypts: mode and content stay, in both directions
    os.rename(mnt / "s3" / "f.bin", mnt / "c-name" / "from-s3.bin")
    moved = mnt / "c-name" / "from-s3.bin"
    assert xattr(moved, MODE) == "AES256" and xattr(moved, SSE) == "AES256"
    assert getfattr(moved, MASTER_VERSION) == "1"
    assert read_file(moved) == content["s3"]
    os.rename(mnt / "c-name" / "f.bin", mnt / "kms-alias" / "from-c.bin")
    moved = mnt / "kms-alias" / "from-c.bin"
    assert xattr(moved, MODE) == "SSE-C" and getfattr(moved, FINGERPRINT) == fp
    assert errno_of(os.getxattr, moved, KMS_KEY) == errno.ENODATA
    assert read_file(moved) == content["c-name"]
    os.rename(mnt / "kms-alias" / "f.bin", mnt / "s3" / "from-kms.bin")
    moved = mnt / "s3" / "from-kms.bin"
    assert xattr(moved, MODE) == "aws:kms" and xattr(moved, KMS_KEY) == key_id
    assert read_file(moved) == content["kms-alias"]

    # only the owner or root may set or remove a directory's setting
    owned = owned_dir(mnt / "alice-shared", ALICE, 0o777)  # writable: the kernel lets bob through
    assert as_uid(ALICE, "setxattr", owned, SSE, "AES256") == ("ok", None)
    assert getfattr(owned, uid=ALICE) == "AES256"
    assert as_uid(BOB, "setxattr", owned, SSE, "aws:kms") == ("errno", errno.EPERM)
    assert as_uid(BOB, "removexattr", owned, SSE) == ("errno", errno.EPERM)
    setfattr_fails(owned, f"SSE-C:{fp}", errno.EPERM, uid=BOB)
    r = run_as(BOB, BOB, ["setfattr", "-x", SSE, str(owned)])
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    assert getfattr(owned, uid=BOB) == "AES256"  # unchanged
    setfattr_ok(owned, "aws:kms:alias/t1-photos")  # root may
    assert getfattr(owned) == f"aws:kms:{key_id}"
    assert as_uid(ALICE, "removexattr", owned, SSE) == ("ok", None)  # the owner may
    assert getfattr(owned) == "AES256"
    private = owned_dir(mnt / "alice-private", ALICE, 0o755)
    res = as_uid(BOB, "setxattr", private, SSE, "aws:kms")
    assert res in (("errno", errno.EPERM), ("errno", errno.EACCES)), res
    assert getfattr(private) == "AES256"

    # malformed settings: EINVAL; unknown keys: ENOKEY; nothing changes
    target = mnt / "kms-id"
    for bad in ("bogus", "aws:kms:", "SSE-C:", "aes256", "SSE-C:a/b", "aws:kms:bad key"):
        assert errno_of(os.setxattr, target, SSE, bad.encode()) == errno.EINVAL, bad
    setfattr_fails(target, "bogus", errno.EINVAL)
    setfattr_fails(target, "aws:kms:", errno.EINVAL)
    setfattr_fails(target, "SSE-C:", errno.EINVAL)
    assert errno_of(os.setxattr, target, SSE, b"aws:kms:alias/no-such-key") == errno.ENOKEY
    setfattr_fails(target, "aws:kms:alias/no-such-key", errno.ENOKEY)
    assert errno_of(os.setxattr, target, SSE, b"aws:kms:0000-no-such-id") == errno.ENOKEY
    assert errno_of(os.setxattr, target, SSE, b"SSE-C:never-loaded") == errno.ENOKEY
    assert getfattr(target) == f"aws:kms:{key_id}"
    assert read_file(mnt / "kms-alias" / "from-c.bin") == content["c-name"]


# ==========================================================================
# 2. SSE-C: keys per uid, ENOKEY / EKEYREJECTED, stat always works, remount
# ==========================================================================

def test_sse_c_keys_are_per_uid_and_forgotten_on_remount(mount_factory):
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    alice_key, bob_key = os.urandom(32), os.urandom(32)
    fp = add_key(mnt, "k1", alice_key, uid=ALICE)
    assert fp == ssec.fingerprint(alice_key)

    d = owned_dir(mnt / "alice", ALICE, 0o755)
    r = setfattr(d, "SSE-C:k1", uid=ALICE)
    assert r.returncode == 0, r.stderr
    assert getfattr(d, uid=ALICE) == f"SSE-C:{fp}"
    assert getfattr(d) == f"SSE-C:{fp}"  # anyone reads the setting (not a secret)

    f = d / "diary.txt"
    secret = b"dear diary, " + os.urandom(25_000).hex().encode()
    assert as_uid(ALICE, "write", f, secret.hex(), 0o644) == ("ok", None)
    r = cat_as(ALICE, f)
    assert r.returncode == 0 and r.stdout == secret, r.stderr
    assert getfattr(f, MODE, uid=ALICE) == "SSE-C"
    assert getfattr(f, FINGERPRINT, uid=ALICE) == fp

    # key list: names, fingerprints, owners; never the key
    listing = cli_ok("key", "list", "-m", mnt, uid=ALICE)
    assert "k1" in listing and fp in listing and str(ALICE) in listing
    for form in _forms(alice_key)[1:]:  # the text forms
        assert form.decode() not in listing
    assert "k1" not in cli_ok("key", "list", "-m", mnt, uid=BOB)

    # bob (permitted by the mode bits) and root have no key: ENOKEY at open
    assert as_uid(BOB, "read", f) == ("errno", errno.ENOKEY)
    r = run_as(BOB, BOB, ["cat", str(f)])
    assert r.returncode != 0 and "Required key not available" in r.stderr, r.stderr
    assert errno_of(open, f, "rb") == errno.ENOKEY
    assert errno_of(os.open, f, os.O_WRONLY) == errno.ENOKEY
    assert errno_of(os.open, d / "root-new.txt", os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENOKEY
    assert not (d / "root-new.txt").exists()

    # ls -l and stat work for everyone
    for uid in (ALICE, BOB, None):
        argv_ls, argv_stat = ["ls", "-l", str(d)], ["stat", "-c", "%s %u %a", str(f)]
        if uid:
            r1, r2 = run_as(uid, uid, argv_ls), run_as(uid, uid, argv_stat)
        else:
            r1 = subprocess.run(argv_ls, capture_output=True, text=True)
            r2 = subprocess.run(argv_stat, capture_output=True, text=True)
        assert r1.returncode == 0 and "diary.txt" in r1.stdout and str(len(secret)) in r1.stdout, r1
        assert r2.returncode == 0 and r2.stdout.split() == [str(len(secret)), str(ALICE), "644"], r2
    assert as_uid(BOB, "stat", f) == ("ok", [stat.S_IFREG | 0o644, ALICE, len(secret)])

    # bob loads a different key under the same name: the directory's key is rejected
    assert as_uid(ALICE, "chmod", d, 0o777) == ("ok", None)
    bob_fp = add_key(mnt, "k1", bob_key, uid=BOB)
    assert bob_fp != fp
    assert as_uid(BOB, "create", d / "bob.txt") == ("errno", errno.EKEYREJECTED)
    assert not (d / "bob.txt").exists()
    res = as_uid(BOB, "read", f)
    assert res in (("errno", errno.ENOKEY), ("errno", errno.EKEYREJECTED)), res
    # bob's own key does not serve alice, nor alice's bob
    assert as_uid(ALICE, "read", f) == ("ok", secret.hex())
    bob_dir = owned_dir(mnt / "bob", BOB, 0o755)
    assert setfattr(bob_dir, "SSE-C:k1", uid=BOB).returncode == 0
    assert getfattr(bob_dir) == f"SSE-C:{bob_fp}"
    assert as_uid(BOB, "write", bob_dir / "b.txt", b"bob's".hex(), 0o644) == ("ok", None)
    # alice's k1 has the name of bob's file's key, not its bytes
    assert as_uid(ALICE, "read", bob_dir / "b.txt") == ("errno", errno.EKEYREJECTED)
    assert as_uid(BOB, "read", bob_dir / "b.txt") == ("ok", b"bob's".hex())

    # keys live in memory only: after a remount, ENOKEY until the key is added again
    m.remount()
    assert cli_ok("key", "list", "-m", mnt).strip() == "(none)"
    assert as_uid(ALICE, "read", f) == ("errno", errno.ENOKEY)
    r = run_as(ALICE, ALICE, ["cat", str(f)])
    assert r.returncode != 0 and "Required key not available" in r.stderr
    assert as_uid(ALICE, "stat", f) == ("ok", [stat.S_IFREG | 0o644, ALICE, len(secret)])
    assert getfattr(f, FINGERPRINT) == fp
    assert add_key(mnt, "k1", alice_key, uid=ALICE) == fp
    r = cat_as(ALICE, f)
    assert r.returncode == 0 and r.stdout == secret, r.stderr
    assert as_uid(BOB, "read", f) == ("errno", errno.ENOKEY)
    # and removing it withdraws it at once
    assert "removed k1" in cli_ok("key", "remove", "k1", "-m", mnt, uid=ALICE)
    assert as_uid(ALICE, "read", f) == ("errno", errno.ENOKEY)


# ==========================================================================
# 3. SSE-KMS: key policy, key states, audit trail of use
# ==========================================================================

def _policy(encrypt, decrypt, admin) -> str:
    return json.dumps({"encrypt": {"uids": encrypt}, "decrypt": {"uids": decrypt},
                       "admin": {"uids": admin}})


def test_kms_policy_states_and_audit(mount_factory):
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    key_id = kms_create(mnt, "alias/team")
    out = json.loads(cli_ok("kms", "policy", "set", "alias/team", "-m", mnt,
                            input=_policy([0, ALICE], [ALICE], [0])))
    assert out["id"] == key_id
    pol = json.loads(cli_ok("kms", "policy", "get", key_id, "-m", mnt))
    assert pol["decrypt"]["uids"] == [ALICE] and pol["encrypt"]["uids"] == [0, ALICE]
    assert key_id in cli_ok("kms", "list", "-m", mnt)

    d = mnt / "team"
    os.mkdir(d)
    os.chmod(d, 0o755)
    setfattr_ok(d, "aws:kms:alias/team")
    assert getfattr(d) == f"aws:kms:{key_id}"
    f = d / "plan.txt"
    data = b"the plan: " + os.urandom(5000).hex().encode()
    write_file(f, data, 0o644)
    assert getfattr(f, MODE) == "aws:kms" and getfattr(f, KMS_KEY) == key_id
    assert getfattr(f, KMS_VERSION) == "1"

    r = cat_as(ALICE, f)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    assert as_uid(ALICE, "read", f) == ("ok", data.hex())
    assert as_uid(BOB, "read", f) == ("errno", errno.EACCES)
    r = run_as(BOB, BOB, ["cat", str(f)])
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert as_uid(BOB, "stat", f)[0] == "ok"

    recs = audit_records(mnt, key_id)
    assert recs and all(key_id in (rec.get("key_id"), rec.get("alias")) for rec in recs)
    decrypts = [r for r in recs if r["op"] == "kms:Decrypt"]
    allowed = [r for r in decrypts if r["outcome"] == "allowed" and r["uid"] == ALICE]
    denied = [r for r in decrypts if r["outcome"] == "denied" and r["uid"] == BOB]
    assert allowed, f"no allowed kms:Decrypt for uid {ALICE}: {recs}"
    assert denied, f"no denied kms:Decrypt for uid {BOB}: {recs}"
    for rec in allowed + denied:
        assert rec["gid"] == rec["uid"] and isinstance(rec["pid"], int) and rec["pid"] > 0
        assert rec["key_id"] == key_id
    assert {rec.get("process") for rec in allowed} & {"cat", "python3"}
    assert all(rec["errno"] == errno.EACCES for rec in denied)
    assert "errno" not in allowed[0]
    assert any(r["op"] == "kms:GenerateDataKey" and r["outcome"] == "allowed" and r["uid"] == 0
               for r in recs)

    # Disabled: EKEYREVOKED for everyone, in a fresh open and after a remount
    assert json.loads(cli_ok("kms", "disable", key_id, "-m", mnt))["state"] == "Disabled"
    assert errno_of(read_file, f) == errno.EKEYREVOKED
    assert as_uid(ALICE, "read", f) == ("errno", errno.EKEYREVOKED)
    assert errno_of(os.open, d / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644) == errno.EKEYREVOKED
    d2 = mnt / "team2"
    os.mkdir(d2)
    setfattr_fails(d2, "aws:kms:alias/team", errno.EKEYREVOKED)
    recs = audit_records(mnt, key_id)
    assert any(r["op"] == "kms:DisableKey" and r["uid"] == 0 and r["outcome"] == "allowed"
               for r in recs)
    m.remount()
    assert kms_describe(mnt, key_id)["state"] == "Disabled"
    assert errno_of(read_file, f) == errno.EKEYREVOKED
    assert json.loads(cli_ok("kms", "enable", key_id, "-m", mnt))["state"] == "Enabled"
    assert read_file(f) == data
    assert as_uid(ALICE, "read", f) == ("ok", data.hex())
    assert as_uid(BOB, "read", f) == ("errno", errno.EACCES)

    # deletion: 7..30 days; PendingDeletion revokes; cancelling leaves it Disabled
    line = cli_fails("kms", "schedule-deletion", key_id, "--days", "6", "-m", mnt)
    assert "7" in line and "30" in line, line
    assert kms_describe(mnt, key_id)["state"] == "Enabled"
    before = int(time.time())
    d7 = json.loads(cli_ok("kms", "schedule-deletion", key_id, "--days", "7", "-m", mnt))
    assert d7["state"] == "PendingDeletion"
    assert before + 7 * 86400 - 5 <= d7["deletion_date"] <= int(time.time()) + 7 * 86400 + 5
    assert errno_of(read_file, f) == errno.EKEYREVOKED
    assert as_uid(ALICE, "read", f) == ("errno", errno.EKEYREVOKED)
    cli_fails("kms", "enable", key_id, "-m", mnt)  # must cancel first
    assert json.loads(cli_ok("kms", "cancel-deletion", key_id, "-m", mnt))["state"] == "Disabled"
    assert kms_describe(mnt, "alias/team")["deletion_date"] is None
    assert errno_of(read_file, f) == errno.EKEYREVOKED
    cli_ok("kms", "enable", key_id, "-m", mnt)
    assert read_file(f) == data

    # a non-admin may not administer it
    cli_fails("kms", "disable", key_id, "-m", mnt, uid=ALICE)
    assert kms_describe(mnt, key_id)["state"] == "Enabled"
    recs = audit_records(mnt, key_id)
    assert any(r["op"] == "kms:DisableKey" and r["uid"] == ALICE and r["outcome"] == "denied"
               and r["errno"] == errno.EACCES for r in recs)
    assert any(r["op"] == "kms:ScheduleKeyDeletion" and r["outcome"] == "allowed" for r in recs)
    assert any(r["op"] == "kms:CancelKeyDeletion" and r["outcome"] == "allowed" for r in recs)
    # the policy was set through the alias: its record still names the key (its id), so
    # `s3fuse audit --key ID` shows every administration of the key
    set_policy = [r for r in audit_records(mnt) if r["op"] == "kms:PutKeyPolicy"]
    assert len(set_policy) == 1 and set_policy[0]["uid"] == 0
    recorded = set_policy[0]["key_id"]
    assert recorded == key_id, f"kms:PutKeyPolicy recorded key_id {recorded!r}, not {key_id!r}"


# ==========================================================================
# 4. re-encryption of a file and of a tree
# ==========================================================================

def test_reencrypt_file_and_tree(mount_factory):
    m = mount_factory()
    mnt = m.mnt
    key_id = kms_create(mnt, "alias/archive")

    # one file, two blocks (4 MiB each), AES256 -> aws:kms (the managed key)
    big = mnt / "big.bin"
    data = os.urandom((4 << 20) + 123_457)
    write_file(big, data)
    assert xattr(big, MODE) == "AES256" and xattr(big, MASTER_VERSION) == "1"
    setfattr_ok(big, "aws:kms")
    managed = kms_describe(mnt, "alias/aws/s3")["id"]
    assert getfattr(big, MODE) == "aws:kms"
    assert getfattr(big, KMS_KEY) == managed
    assert xattr(big, SSE) == f"aws:kms:{managed}"
    assert errno_of(os.getxattr, big, MASTER_VERSION) == errno.ENODATA
    assert read_file(big) == data
    assert getfattr(mnt) == "AES256"  # the directory is untouched
    # and to SSE-C and back to a named KMS key
    cfp = add_key(mnt, "arch-c", os.urandom(32))
    setfattr_ok(big, "SSE-C:arch-c")
    assert xattr(big, MODE) == "SSE-C" and xattr(big, FINGERPRINT) == cfp
    assert read_file(big) == data
    setfattr_ok(big, "aws:kms:alias/archive")
    assert xattr(big, MODE) == "aws:kms" and xattr(big, KMS_KEY) == key_id
    assert read_file(big) == data

    # a tree written before its directory's setting changed
    r = mnt / "r"
    (r / "sub").mkdir(parents=True)
    (r / "keep").mkdir()
    setfattr_ok(r / "keep", "AES256")
    files = {r / "a.txt": b"alpha" * 1000, r / "sub" / "b.txt": os.urandom(200_000),
             r / "keep" / "c.txt": b"stays SSE-S3", r / "empty": b""}
    for p, b in files.items():
        write_file(p, b)
    for p in files:
        assert xattr(p, MODE) == "AES256"
    setfattr_ok(r, "aws:kms:alias/archive")
    out = cli_ok("reencrypt", r, "--recursive")
    assert out.strip() == "3 of 4 files re-encrypted", out
    for p, b in files.items():
        want = "AES256" if p.parent.name == "keep" else "aws:kms"
        assert xattr(p, MODE) == want, p
        assert read_file(p) == b
    assert xattr(r / "a.txt", KMS_KEY) == key_id
    assert xattr(r / "sub" / "b.txt", KMS_VERSION) == "1"
    out = cli_ok("reencrypt", r, "--recursive")
    assert out.strip() == "0 of 4 files re-encrypted", out  # resumable: nothing left to do
    line = cli_fails("reencrypt", r)  # a directory needs --recursive
    assert "recursive" in line

    m.remount()
    assert xattr(big, MODE) == "aws:kms" and read_file(big) == data
    for p, b in files.items():
        assert xattr(p, MODE) == ("AES256" if p.parent.name == "keep" else "aws:kms")
        assert read_file(p) == b
    assert cli_ok("reencrypt", r, "-r").strip() == "0 of 4 files re-encrypted"


# ==========================================================================
# 5. no customer key and no data key anywhere in the store or the logs
# ==========================================================================

def _forms(key: bytes) -> list[bytes]:
    b64 = base64.b64encode(key)
    url = base64.urlsafe_b64encode(key)
    return [key, key.hex().encode(), key.hex().upper().encode(), b64, b64.rstrip(b"="),
            url, url.rstrip(b"=")]


def _snapshot(paths) -> dict[str, bytes]:
    out = {}
    for top in paths:
        top = Path(top)
        if top.is_file():
            out[str(top)] = top.read_bytes()
            continue
        for dirpath, _, names in os.walk(top):
            for n in names:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p):
                    out[p] = Path(p).read_bytes()
    return out


def _search(snapshot: dict[str, bytes], secrets: dict[str, bytes]) -> list[str]:
    hits = []
    for label, key in secrets.items():
        for form in _forms(key):
            for path, content in snapshot.items():
                if form in content:
                    hits.append(f"{label} ({form[:12]!r}...) in {path}")
    return hits


@pytest.mark.local_only  # searches the files of STORE (objects/ included); for the bucket see test_s3.py
def test_no_key_material_in_store_or_logs(mount_factory, workdir):
    m = mount_factory(extra_args=["--log-level", "debug"])
    mnt = m.mnt
    k1, k2 = os.urandom(32), os.urandom(32)
    keyfile = workdir("keyfile") / "k2.bin"
    keyfile.write_bytes(k2)
    fp1 = add_key(mnt, "cust-one", k1)
    out = cli_ok("key", "add", "cust-two", "--key-file", keyfile, "-m", mnt)
    fp2 = out.strip()
    assert fp2 == ssec.fingerprint(k2)
    keyfile.unlink()
    kms_create(mnt, "alias/secret-search")

    layout = {"c1": "SSE-C:cust-one", "c2": "SSE-C:cust-two", "s3": "AES256",
              "kms": "aws:kms:alias/secret-search", "kmsdef": "aws:kms"}
    written = {}
    for dname, value in layout.items():
        os.mkdir(mnt / dname)
        setfattr_ok(mnt / dname, value)
        for i, size in enumerate((10, 70_000, (4 << 20) + 10)):
            p = mnt / dname / f"f{i}"
            written[p] = os.urandom(size)
            write_file(p, written[p])
    for p, b in written.items():
        assert read_file(p) == b
    assert xattr(mnt / "c1" / "f0", FINGERPRINT) == fp1
    assert xattr(mnt / "c2" / "f0", FINGERPRINT) == fp2
    # re-encrypt a file too: that path also handles keys
    setfattr_ok(mnt / "s3" / "f1", "SSE-C:cust-one")
    assert xattr(mnt / "s3" / "f1", MODE) == "SSE-C"
    cli_ok("key", "list", "-m", mnt)
    cli_ok("key", "remove", "cust-two", "-m", mnt)
    m.unmount()

    store = m.store
    names = {os.path.relpath(p, store) for p in _snapshot([store])}
    for required in ("meta.db", "audit.log", "kms.bin", "keyring.bin"):
        assert required in names, sorted(names)
    assert any(n.startswith("objects/") for n in names)
    snap = _snapshot([store, *[p for p in m.logs if p.exists()]])
    assert any("daemon-" in p for p in snap)  # the daemon log is searched too

    hits = _search(snap, {"customer key cust-one": k1, "customer key cust-two": k2})
    assert not hits, "customer key material found:\n" + "\n".join(hits)

    # the data keys: unwrap each key slot the way the daemon does, then look for them
    cfg = load_config(str(store))
    root_key = load_root_key(cfg)
    keyring = load_keyring(cfg, root_key)
    kms = BuiltinKms.load(cfg.kms_path, root_key, cfg.store_id)
    db = sqlite3.connect(f"file:{cfg.meta_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT inode, blockno, object_id, mode, key_ref, key_version, key_slot "
                          "FROM blocks").fetchall()
    finally:
        db.close()
    data_keys: dict[str, bytes] = {}
    per_mode = {"AES256": 0, "aws:kms": 0, "SSE-C": 0}
    for inode, blockno, object_id, mode, key_ref, key_version, key_slot in rows:
        object_id, key_slot = bytes(object_id), bytes(key_slot)
        if mode == "AES256":
            aad = fmt.key_slot_aad(cfg.store_id, object_id, inode, blockno, mode, key_ref)
            dk = fmt.unwrap_data_key(keyring.key(key_version), key_slot, aad)
        elif mode == "aws:kms":
            ctx = {"store": cfg.store_id.hex(), "object": object_id.hex(), "inode": str(inode),
                   "block": str(blockno)}
            dk, kid, _ = kms.decrypt(key_slot, ctx, Principal(0, 0))
            assert kid == key_ref
        else:
            owner = [k for k in (k1, k2) if ssec.matches(k, key_ref)]
            assert len(owner) == 1, f"SSE-C object {object_id.hex()} matches {len(owner)} keys"
            aad = fmt.key_slot_aad(cfg.store_id, object_id, inode, blockno, mode, key_ref)
            dk = fmt.unwrap_data_key(ssec.wrapping_key(owner[0], key_ref, object_id), key_slot, aad)
        assert len(dk) == 32
        per_mode[mode] += 1
        label = f"{mode} data key of object {object_id.hex()}"
        data_keys[label] = dk
        ok = fmt.derive_object_keys(dk, object_id)
        data_keys[label + " (header MAC key)"] = ok.header_mac_key
        data_keys[label + " (segment key)"] = fmt._hkdf(dk, b"s3fuse/v1/segment" + object_id)
    assert per_mode["AES256"] >= 3 and per_mode["aws:kms"] >= 8 and per_mode["SSE-C"] >= 8, per_mode
    assert len({v for k, v in data_keys.items() if "(" not in k}) == len(rows), "repeated data key"
    hits = _search(snap, data_keys)
    assert not hits, "data key material found in the clear:\n" + "\n".join(hits[:20])


# ==========================================================================
# 6. the audit trail: records of key administration, verify, tamper detection
# ==========================================================================

def test_audit_trail_records_verify_and_tamper(mount_factory):
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    ka = os.urandom(32)
    fpa = add_key(mnt, "audited", ka, uid=ALICE)
    line = cli_fails("key", "add", "everyone", "--global", "-m", mnt, uid=ALICE,
                     input=base64.b64encode(os.urandom(32)).decode())
    assert "root" in line
    fpg = add_key(mnt, "everyone", os.urandom(32), None, "--global")
    cli_ok("key", "remove", "audited", "-m", mnt, uid=ALICE)
    cli_fails("key", "remove", "audited", "-m", mnt, uid=ALICE)
    key_id = kms_create(mnt, "alias/audited")
    d = mnt / "k"
    os.mkdir(d)
    setfattr_ok(d, "aws:kms:alias/audited")
    write_file(d / "f", b"kms data", 0o644)
    cli_ok("kms", "disable", key_id, "-m", mnt)
    assert errno_of(read_file, d / "f") == errno.EKEYREVOKED
    cli_ok("kms", "enable", key_id, "-m", mnt)
    assert read_file(d / "f") == b"kms data"
    gd = mnt / "g"
    os.mkdir(gd)
    os.chmod(gd, 0o777)
    setfattr_ok(gd, "SSE-C:everyone")
    assert as_uid(BOB, "write", gd / "bob", b"global key".hex(), 0o644) == ("ok", None)
    assert as_uid(ALICE, "read", gd / "bob") == ("ok", b"global key".hex())

    recs = audit_records(mnt)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))

    def find(op, outcome="allowed", **fields):
        return [r for r in recs if r["op"] == op and r["outcome"] == outcome
                and all(r.get(k) == v for k, v in fields.items())]

    add = find("ssec:AddKey", uid=ALICE, gid=ALICE, fingerprint=fpa, key_name="audited")
    assert len(add) == 1 and isinstance(add[0]["pid"], int) and add[0]["process"]
    assert find("ssec:AddKey", "denied", uid=ALICE, key_name="everyone", errno=errno.EPERM)
    assert find("ssec:AddKey", uid=0, fingerprint=fpg, key_name="everyone")
    assert find("ssec:RemoveKey", uid=ALICE, fingerprint=fpa, key_name="audited")
    assert find("ssec:RemoveKey", "denied", uid=ALICE, key_name="audited", errno=errno.ENOKEY)
    assert find("kms:CreateKey", uid=0, key_id=key_id)
    assert find("kms:DisableKey", uid=0, gid=0, key_id=key_id)
    assert find("kms:EnableKey", uid=0, key_id=key_id)
    assert find("kms:GenerateDataKey", uid=0, key_id=key_id)
    assert find("kms:Decrypt", "denied", uid=0, key_id=key_id, errno=errno.EKEYREVOKED)
    assert find("kms:Decrypt", uid=0, key_id=key_id)
    only = audit_records(mnt, key_id)
    assert only and all(r.get("key_id") == key_id for r in only)
    assert len(only) < len(recs)

    out = cli_ok("audit", "verify", "-m", mnt)
    assert "hash chain intact" in out and f"{len(recs)} records" in out, out
    m.unmount()
    out = cli_ok("audit", "verify", "--store", m.store)
    assert "hash chain intact" in out and f"{len(recs)} records" in out, out

    # edit one byte of a middle line: verify fails and names that record
    log = m.store / "audit.log"
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    n = len(lines)
    assert n >= 10
    j = n // 2  # 1-based record number
    rec = lines[j - 1]
    i = rec.index(b'"time":"') + len(b'"time":"') + 3  # a digit of the year
    assert rec[i:i + 1].isdigit()
    edited = rec[:i] + (b"7" if rec[i:i + 1] != b"7" else b"3") + rec[i + 1:]
    lines[j - 1] = edited
    log.write_bytes(b"\n".join(lines) + b"\n")
    line = cli_fails("audit", "verify", "--store", m.store)
    assert re.search(rf"\brecord {j}\b", line), f"verify does not name record {j}: {line}"
    assert "edited" in line, line


# ==========================================================================
# 7. a fuzzed control socket
# ==========================================================================

def _frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _exchange(path: str, data: bytes) -> bytes:
    """Send `data`, half-close, read until the daemon closes; returns what it sent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may answer an early error and close before all of it arrived
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return buf
            buf += chunk
        return buf
    finally:
        s.close()


def _replies(buf: bytes) -> list[dict]:
    out = []
    while buf:
        assert len(buf) >= 4, f"reply ends in a partial length prefix: {buf!r}"
        (n,) = struct.unpack(">I", buf[:4])
        assert n <= protocol.MAX_FRAME and len(buf) >= 4 + n, "reply frame is truncated"
        reply = msgpack.unpackb(buf[4:4 + n], raw=False)
        assert isinstance(reply, dict) and reply.get("v") == 1, reply
        assert isinstance(reply.get("ok"), bool), reply
        if not reply["ok"]:
            assert isinstance(reply.get("errno"), int) and reply["errno"] > 0, reply
            assert isinstance(reply.get("error"), str) and "\n" not in reply["error"], reply
        out.append(reply)
        buf = buf[4 + n:]
    return out


# Wrong-typed values for the arguments naming a key (every op gets each of these)...
_WRONG_IDS = [3, None, b"\x00\xff", [1, "a"], {"k": "v"}, float("nan")]
# ... and for the others (each gets these)
_WRONG_OTHER = [-1, "x" * 300, [[1]]]
_IDS = ("name", "key")
# ops and their argument names; `unmount` and `flush` are left out (valid requests that act)
_OP_ARGS = {
    "status": [],
    "key.add": ["name", "key", "global"],
    "key.list": [],
    "key.remove": ["name"],
    "audit.path": [],
    "kms.list": [],
    "kms.describe": ["key"],
    "kms.enable": ["key"],
    "kms.disable": ["key"],
    "kms.schedule-deletion": ["key", "days"],
    "kms.cancel-deletion": ["key"],
    "kms.get-policy": ["key"],
    "kms.set-policy": ["key", "policy"],
    "kms.rotate": ["key"],
    "kms.enable-rotation": ["key", "days"],
    "kms.disable-rotation": ["key"],
    "kms.create-key": ["alias", "description"],
}


def _fuzz_cases(rng: random.Random) -> list[tuple[str, bytes, set | None]]:
    """200 frames: (label, bytes to send, the errnos the reply may carry; an empty set
    means no reply may come, None means any well-formed reply or none)."""
    EBADMSG, EINVAL = errno.EBADMSG, errno.EINVAL
    cases = [
        ("list frame", _frame([1, 2, 3]), {EBADMSG}),
        ("string frame", _frame("status"), {EBADMSG}),
        ("nil frame", _frame(None), {EBADMSG}),
        ("int-keyed map", _frame({1: 2}), {EBADMSG}),
        ("op is an int", _frame({"v": 1, "op": 5}), {errno.EOPNOTSUPP}),
        ("op is nil", _frame({"v": 1, "op": None}), {errno.EOPNOTSUPP}),
        ("op is bytes", _frame({"v": 1, "op": b"status"}), {errno.EOPNOTSUPP}),
        ("key.add name int", _frame({"v": 1, "op": "key.add", "args": {"name": 3}}), {EINVAL}),
        ("key.add key str",
         _frame({"v": 1, "op": "key.add", "args": {"name": "fz", "key": "text"}}), {EINVAL}),
        ("key.add short key",
         _frame({"v": 1, "op": "key.add", "args": {"name": "fz", "key": b"short"}}), {EINVAL}),
        ("unknown op", _frame({"v": 1, "op": "no.such.op", "args": {}}), {errno.EOPNOTSUPP}),
        ("version 2", _frame({"v": 2, "op": "status", "args": {}}), {errno.EPROTO}),
        ("no version", _frame({"op": "status"}), {errno.EPROTO}),
        ("args a list", _frame({"v": 1, "op": "status", "args": [1]}), {EINVAL}),
        ("length 2^31", struct.pack(">I", 2**31) + b"\x80" * 64, {EBADMSG}),
        ("length 2^32-1", b"\xff\xff\xff\xff", {EBADMSG}),
        ("length MAX+1", struct.pack(">I", protocol.MAX_FRAME + 1), {EBADMSG}),
        ("empty body", struct.pack(">I", 0), {EBADMSG}),
        ("two requests then garbage",
         _frame({"v": 1, "op": "status", "args": {}})
         + _frame({"v": 1, "op": "key.list", "args": {}}) + b"\xc1\xc1\xc1\xc1", {EBADMSG}),
    ]
    # every argument of every op, with values of the wrong type (deterministic)
    plausible = {"name": "fz-name", "key": "alias/does-not-exist", "global": False, "days": 7,
                 "policy": {"encrypt": {}, "decrypt": {}, "admin": {}}, "alias": None,
                 "description": "x"}
    for op in sorted(_OP_ARGS):
        for arg in _OP_ARGS[op]:
            for value in (_WRONG_IDS if arg in _IDS else _WRONG_OTHER):
                args = {a: plausible[a] for a in _OP_ARGS[op]}
                args[arg] = value
                frame = _frame({"v": 1, "op": op, "args": args})
                cases.append((f"{op} {arg}={value!r:.40}", frame, None))
    while len(cases) < 200:
        kind = rng.randrange(5)
        if kind == 0:
            cases.append(("random bytes", rng.randbytes(rng.randrange(0, 400)), None))
        elif kind == 1:
            body = rng.randbytes(rng.randrange(1, 400))
            cases.append(("valid length, garbage body", struct.pack(">I", len(body)) + body, None))
        elif kind == 2:
            n = rng.randrange(2, 5000)
            part = rng.randbytes(rng.randrange(0, n))
            cases.append(("truncated frame", struct.pack(">I", n) + part, set()))
        elif kind == 3:
            cases.append(("truncated prefix", rng.randbytes(rng.randrange(1, 4)), set()))
        else:
            op = "zz." + rng.randbytes(6).hex()
            frame = _frame({"v": 1, "op": op, "args": {"a": rng.random()}})
            cases.append(("unknown random op", frame, {errno.EOPNOTSUPP}))
    assert len(cases) == 200
    return cases


def test_fuzzed_control_socket(mount_factory):
    m = mount_factory()
    mnt = m.mnt
    f = mnt / "before.txt"
    data = os.urandom(300_000)
    write_file(f, data)
    key_id = kms_create(mnt, "alias/fuzz")

    # the socket's documented name, and protocol.socket_path agree
    real = os.path.realpath(mnt)
    name = "".join(c if re.fullmatch(r"[A-Za-z0-9_.-]", c)
                   else ("-" if c == "/" else "\\x%02x" % ord(c))
                   for c in real.lstrip("/"))
    path = f"/run/s3fuse/{name}.sock"
    assert protocol.socket_path(str(mnt)) == path
    assert stat.S_ISSOCK(os.stat(path).st_mode)

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    counts: dict[int, int] = {}
    for label, payload, allowed in _fuzz_cases(rng):
        buf = _exchange(path, payload)
        try:
            replies = _replies(buf)
        except (AssertionError, ValueError, msgpack.UnpackException) as exc:
            raise AssertionError(f"seed {seed}: {label}: bad reply {buf[:200]!r}: {exc}") from None
        errs = [r["errno"] for r in replies if not r["ok"]]
        for e in errs:
            counts[e] = counts.get(e, 0) + 1
        if allowed is not None:
            if allowed:
                assert errs and errs[-1] in allowed, (
                    f"seed {seed}: {label}: expected one of "
                    f"{[errno.errorcode[e] for e in allowed]}, got {replies}")
            else:
                assert not replies, f"seed {seed}: {label}: a truncated frame got a reply {replies}"
    assert counts.get(errno.EBADMSG, 0) >= 10 and counts.get(errno.EINVAL, 0) >= 5, counts

    # 500 connections at once: exactly 64 are served, the others get EBUSY; then all drop
    conns: list[socket.socket] = []
    try:
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conns.append(s)
            s.connect(path)  # blocking: a full backlog waits for the daemon to accept
            s.settimeout(20)
        by_fd = {c.fileno(): c for c in conns}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        busy: set[socket.socket] = set()
        deadline = time.monotonic() + 25
        while len(busy) < 500 - 64 and time.monotonic() < deadline:
            for fd, _ in poller.poll(1000):
                busy.add(by_fd[fd])
                poller.unregister(fd)
        assert len(busy) == 500 - 64, f"{len(busy)} of 500 connections refused, not {500 - 64}"
        for c in busy:
            buf = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                buf += chunk
            (reply,) = _replies(buf)
            assert reply["ok"] is False and reply["errno"] == errno.EBUSY, reply
    finally:
        for i, c in enumerate(conns):
            if i % 2:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    # the daemon drops the served connections as it notices; a request gets through once
    # fewer than 64 are left (EBUSY until then), and from then on every request does
    deadline = time.monotonic() + 30
    while True:
        reply = _replies(_exchange(path, _frame({"v": 1, "op": "status", "args": {}})))[0]
        if reply["ok"] or reply["errno"] != errno.EBUSY or time.monotonic() > deadline:
            break
    assert reply["ok"], reply

    out = cli_ok("status", mnt)
    assert f"mountpoint: {real}" in out and f"pid: {m.pid}" in out, out
    assert key_id in cli_ok("kms", "list", "-m", mnt)
    assert kms_describe(mnt, "alias/fuzz")["state"] == "Enabled"
    assert read_file(f) == data
    write_file(mnt / "after.txt", b"still writable")
    assert read_file(mnt / "after.txt") == b"still writable"
    assert m.proc.poll() is None and os.path.ismount(mnt)
    cli_ok("audit", "verify", "-m", mnt)
    m.check_log()  # no request, however malformed, left a traceback in the daemon log

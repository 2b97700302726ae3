"""Key checks that an attack run found missing, on a real `--allow-other` mount.

- A size change by path (`truncate(2)`, SETATTR with no open handle) passes the key checks
  of an open for writing: the KMS key policy, the key's state, the SSE-C key; with the
  same errno, and a KMS refusal is audited. `ftruncate` on a handle that passed them at
  open is not checked again.
- Opening an existing SSE-C file with a loaded key of the file's key name but other
  bytes gives EKEYREJECTED, not ENOKEY.
- `s3fuse audit --key ALIAS` finds the records of the key's use, which name only its id.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from .conftest import UNPRIV_PYTHON, run_as, run_cli, seal_settings
from .test_cli import assert_cli_error
from .test_sse import (ALICE, ALLOW_OTHER, BOB, add_key, audit_records, cli_ok, errno_of,
                       kms_create, owned_dir, read_file, setfattr_ok, write_file)

_OPS = r"""
import json, os, sys
op, a = sys.argv[1], json.loads(sys.argv[2])
try:
    res = None
    if op == "truncate":
        os.truncate(a[0], a[1])
    elif op == "read":
        with open(a[0], "rb") as f:
            res = f.read().hex()
    elif op == "size":
        res = os.stat(a[0]).st_size
    else:
        raise SystemExit("unknown op " + op)
    print(json.dumps({"ok": res}))
except OSError as e:
    print(json.dumps({"errno": e.errno}))
"""


def as_uid(uid: int, op: str, *args):
    r = run_as(uid, uid, [UNPRIV_PYTHON, "-c", _OPS, op, json.dumps([str(a) for a in args[:1]] + list(args[1:]))])
    assert r.returncode == 0, f"helper {op}{args} as {uid} crashed: {r.stderr}"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return ("errno", d["errno"]) if "errno" in d else ("ok", d["ok"])


def _policy(encrypt, decrypt, admin) -> str:
    return json.dumps({"encrypt": {"uids": encrypt}, "decrypt": {"uids": decrypt},
                       "admin": {"uids": admin}})


def _truncates(records: list[dict], uid: int, path) -> list[dict]:
    return [r for r in records if r["op"] == "kms:GenerateDataKey" and r["outcome"] == "denied"
            and r["uid"] == uid and r.get("path") == str(path)]


def alice_sse_c_file(mount_factory, dir_mode: int, shell: str):
    """A mount where alice holds customer key k1, her directory of `dir_mode` uses it, and
    `shell` (with {f} for the file) made her file there -> (mnt, alice's key, the file)."""
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    alice_key = os.urandom(32)
    add_key(mnt, "k1", alice_key, uid=ALICE)
    d = owned_dir(mnt / "alice", ALICE, dir_mode)
    r = run_as(ALICE, ALICE, ["setfattr", "-n", "user.s3fuse.sse", "-v", "SSE-C:k1", str(d)])
    assert r.returncode == 0, r.stderr
    f = d / "diary.txt"
    r = run_as(ALICE, ALICE, ["sh", "-c", shell.format(f=f)])
    assert r.returncode == 0, r.stderr
    return mnt, alice_key, f


def test_truncate_by_path_passes_the_kms_checks_and_is_audited(mount_factory):
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    key_id = kms_create(mnt, "alias/team")
    cli_ok("kms", "policy", "set", "alias/team", "-m", mnt, input=_policy([ALICE], [ALICE, BOB], [0]))
    d = owned_dir(mnt / "team", ALICE, 0o777)
    setfattr_ok(d, "aws:kms:alias/team")
    f = d / "plan.txt"
    data = os.urandom(10_000)
    write_file(f, data, 0o666)  # root passes every key policy

    # bob may decrypt but not encrypt: no truncate by path, as no open for writing
    assert as_uid(BOB, "truncate", f, 4) == ("errno", errno.EACCES)
    assert as_uid(BOB, "size", f) == ("ok", len(data))
    assert read_file(f) == data
    assert len(_truncates(audit_records(mnt, key_id), BOB, "/team/plan.txt")) == 1

    # alice may encrypt: allowed
    assert as_uid(ALICE, "truncate", f, 4) == ("ok", None)
    assert as_uid(ALICE, "read", f) == ("ok", data[:4].hex())

    # a handle that passed the checks at open keeps its ftruncate after the key is disabled
    fd = os.open(f, os.O_RDWR)
    try:
        cli_ok("kms", "disable", key_id, "-m", mnt)
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
    finally:
        os.close(fd)
    # a Disabled key: EKEYREVOKED for everyone, root included, as at open
    assert errno_of(os.truncate, f, 0) == errno.EKEYREVOKED
    assert as_uid(ALICE, "truncate", f, 0) == ("errno", errno.EKEYREVOKED)
    assert os.stat(f).st_size == 2
    recs = audit_records(mnt, key_id)
    assert _truncates(recs, 0, "/team/plan.txt")[-1]["errno"] == errno.EKEYREVOKED
    assert _truncates(recs, ALICE, "/team/plan.txt")[-1]["errno"] == errno.EKEYREVOKED


def test_truncate_by_path_needs_the_sse_c_key(mount_factory):
    mnt, alice_key, f = alice_sse_c_file(mount_factory, 0o777, "umask 0; echo 'dear diary, secrets' > {f}")
    assert os.stat(f).st_mode & 0o777 == 0o666

    # root and bob hold no key: ENOKEY, as an open for writing
    assert errno_of(os.open, f, os.O_WRONLY) == errno.ENOKEY
    assert errno_of(os.truncate, f, 4) == errno.ENOKEY
    assert as_uid(BOB, "truncate", f, 4) == ("errno", errno.ENOKEY)
    # bob holds another key of that name: EKEYREJECTED
    add_key(mnt, "k1", os.urandom(32), uid=BOB)
    assert as_uid(BOB, "truncate", f, 4) == ("errno", errno.EKEYREJECTED)
    # alice, once her key is removed: ENOKEY; with it loaded: allowed
    cli_ok("key", "remove", "k1", "-m", mnt, uid=ALICE)
    assert as_uid(ALICE, "truncate", f, 4) == ("errno", errno.ENOKEY)
    assert os.stat(f).st_size == len("dear diary, secrets\n")
    add_key(mnt, "k1", alice_key, uid=ALICE)
    assert as_uid(ALICE, "truncate", f, 4) == ("ok", None)
    assert as_uid(ALICE, "read", f) == ("ok", b"dear".hex())


def test_open_with_a_wrong_key_of_the_right_name_is_ekeyrejected(mount_factory):
    mnt, alice_key, f = alice_sse_c_file(mount_factory, 0o755, "umask 022; echo stored > {f} && sync {f}")
    assert as_uid(ALICE, "read", f) == ("ok", b"stored\n".hex())

    # bob: no key of that name -> ENOKEY; another key named k1 -> EKEYREJECTED
    assert as_uid(BOB, "read", f) == ("errno", errno.ENOKEY)
    add_key(mnt, "k1", os.urandom(32), uid=BOB)
    assert as_uid(BOB, "read", f) == ("errno", errno.EKEYREJECTED)
    # alice swaps her key for other bytes under the same name: EKEYREJECTED too
    cli_ok("key", "remove", "k1", "-m", mnt, uid=ALICE)
    assert as_uid(ALICE, "read", f) == ("errno", errno.ENOKEY)
    add_key(mnt, "k1", os.urandom(32), uid=ALICE)
    assert as_uid(ALICE, "read", f) == ("errno", errno.EKEYREJECTED)
    r = run_as(ALICE, ALICE, ["cat", str(f)])
    assert r.returncode != 0 and "Key was rejected by service" in r.stderr, r.stderr


def test_audit_by_alias_finds_the_uses_of_the_key(mount_factory):
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    key_id = kms_create(mnt, "alias/team")
    d = mnt / "team"
    os.mkdir(d)
    setfattr_ok(d, "aws:kms:alias/team")
    for i in range(3):
        write_file(d / f"f{i}", b"x" * 100, 0o644)
        assert read_file(d / f"f{i}") == b"x" * 100
    by_id = audit_records(mnt, key_id)
    by_alias = audit_records(mnt, "alias/team")
    uses = [r for r in by_id if r["op"] in ("kms:GenerateDataKey", "kms:Decrypt")]
    assert len(uses) >= 3 and all("alias" not in r for r in uses)  # uses name only the id
    assert by_alias == by_id
    # the key's creation record names its alias too
    create = [r for r in by_id if r["op"] == "kms:CreateKey"]
    assert len(create) == 1 and create[0]["alias"] == "alias/team"
    # offline (the store's own trail, no daemon to ask): the same records
    m.unmount()
    out = cli_ok("audit", "--store", m.store, "--key", "alias/team")
    offline = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in offline] == [r["seq"] for r in by_id]


def test_a_root_key_others_may_read_is_refused(workdir, mount_factory):
    m = mount_factory()
    (m.mnt / "f").write_bytes(b"kept")
    m.unmount()
    key = m.store / "root.key"
    mnt = workdir("mnt")
    for mode, who in ((0o644, "its group and others"), (0o604, "others"), (0o640, "its group")):
        key.chmod(mode)
        r = run_cli("mount", m.store, mnt)
        assert_cli_error(r, f"mount with root.key mode {mode:o}")
        assert f"readable by {who}" in r.stderr and f"chmod 600 {key}" in r.stderr, r.stderr
        assert not os.path.ismount(mnt)
        # the same for a key file given explicitly
        r = run_cli("fsck", m.store, "--root-key-file", key)
        assert r.returncode == 8 and "chmod 600" in r.stderr, r.stderr
    key.chmod(0o600)
    m.start()
    assert (m.mnt / "f").read_bytes() == b"kept"


def test_an_older_keyring_is_refused_at_mount(workdir, mount_factory):
    m = mount_factory()
    (m.mnt / "before").write_bytes(b"under version 1")
    m.unmount()
    ring = m.store / "keyring.bin"
    old = ring.read_bytes()
    m.start()
    r = run_cli("rotate", m.mnt)
    assert r.returncode == 0, r.stderr
    (m.mnt / "after").write_bytes(b"under version 2")
    m.unmount()
    new = ring.read_bytes()

    ring.write_bytes(old)  # the keyring from before the rotation, put back
    mnt = workdir("mnt")
    r = run_cli("mount", m.store, mnt)
    assert_cli_error(r, "mount with an older keyring")
    assert "older than the store's metadata" in r.stderr and str(ring) in r.stderr, r.stderr
    assert not os.path.ismount(mnt)
    # rekey-root reseals the same keyring: still accepted; the newest keyring mounts
    ring.write_bytes(new)
    r = run_cli("rekey-root", m.store)
    assert r.returncode == 0, r.stderr
    m.start()
    assert (m.mnt / "before").read_bytes() == b"under version 1"
    assert (m.mnt / "after").read_bytes() == b"under version 2"


def test_keyring_generation_record():
    from s3fuse.errors import StoreError
    from s3fuse.keys import generation as keygen
    from s3fuse.keys.keyring import Keyring

    store_id = bytes(16)
    k1 = Keyring.new()
    k2 = k1.rotated()
    k3 = k2.without([1])
    assert keygen.generation(k1) < keygen.generation(k2) < keygen.generation(k3)
    rec2 = keygen.record_value(k2, store_id)
    keygen.check(None, k1, store_id, "K")  # no record yet: accepted
    keygen.check(rec2, k2, store_id, "K")
    keygen.check(rec2, k3, store_id, "K")  # newer (version 2 still held)
    with pytest.raises(StoreError, match="older"):
        keygen.check(rec2, k1, store_id, "K")
    keygen.check(keygen.record_value(k1, store_id), k3, store_id, "K")  # v1 retired since
    with pytest.raises(StoreError, match="does not authenticate"):
        keygen.check(rec2, Keyring.new().rotated(), store_id, "K")  # another keyring, same generation
    with pytest.raises(StoreError, match="does not authenticate"):
        keygen.check(rec2, k2, bytes([1]) * 16, "K")  # another store's record


def test_keyring_generation_record_matches_documented_vector():
    from s3fuse.keys import generation as keygen
    from s3fuse.keys.keyring import Keyring

    from .test_format import FORMAT_MD

    k = Keyring({1: bytes(range(32)), 2: bytes(range(32, 64))}, 2, {1: 0, 2: 0})
    line = f"keyring generation record: {keygen.record_value(k, bytes([0xa0]) * 16)}\n"
    assert line in open(FORMAT_MD).read()


def test_kms_key_quota_per_uid(mount_factory):
    from .test_sse import cli

    m = mount_factory(extra_args=ALLOW_OTHER, start=False)
    cfg_path = m.store / "store.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["kms"] = {"key_quota": 2}
    cfg_path.write_text(json.dumps(cfg))
    seal_settings(m.store)
    m.start()
    for _ in range(2):
        cli_ok("kms", "create-key", "-m", m.mnt, uid=ALICE)
    r = cli("kms", "create-key", "-m", m.mnt, uid=ALICE)
    assert r.returncode == 1 and "quota" in r.stderr and "key_quota" in r.stderr, r.stderr
    cli_ok("kms", "create-key", "-m", m.mnt, uid=BOB)
    cli_ok("kms", "create-key", "-m", m.mnt)  # root has no quota
    r = cli("kms", "create-key", "--description", "d" * 1025, "-m", m.mnt, uid=BOB)
    assert r.returncode == 1 and "1024" in r.stderr, r.stderr
    recs = [r for r in audit_records(m.mnt) if r["op"] == "kms:CreateKey"]
    assert [r["outcome"] for r in recs if r["uid"] == ALICE] == ["allowed", "allowed", "denied"]

"""SSE-KMS with keys in a real OpenBao Transit engine (tests/baoserver.py).

Each test creates its own transit keys and store; the mounts talk to the server over
HTTP exactly as in production. Knobs in store.json keep the retry budget short.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from s3fuse.keys.transit import derivation_context, parse_blob

from .baoserver import free_port
from .conftest import TRACEBACK, py_as, run_cli, seal_settings, wait_until

SSE = "user.s3fuse.sse"
FAST = {"timeout": 1.0, "attempts": 2, "backoff": 0.05, "backoff_max": 0.1, "cache_ttl": 0}


def new_key(bao, prefix: str = "k") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    bao.create_key(name)
    return name


def transit_store(workdir, bao, token_file: Path | None = None, **knobs) -> Path:
    """A store whose bare KMS key names are Transit keys (s3fuse init --kms transit)."""
    store = workdir("store") / "store"
    r = run_cli("init", store, "--kms", "transit", "--vault-addr", bao.address,
                "--vault-token-file", token_file or bao.token_file)
    assert r.returncode == 0, r.stderr
    set_kms(store, **FAST, **knobs)
    return store


def set_kms(store: Path, **settings) -> None:
    path = store / "store.json"
    cfg = json.loads(path.read_text())
    cfg["kms"].update(settings)
    path.write_text(json.dumps(cfg))
    seal_settings(store)  # the key settings are authenticated: an administrator accepts the edit


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def read_uncached(path: Path) -> bytes:
    """Read through to the daemon: drop the kernel's cached pages of the file first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def errno_of(fn) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


def slots(store: Path) -> list[tuple]:
    """(inode, blockno, object_id, key_ref, key_version, key_slot) of every stored block."""
    db = sqlite3.connect(f"file:{store / 'meta.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT inode, blockno, object_id, key_ref, key_version, key_slot "
                          "FROM blocks ORDER BY inode, blockno").fetchall()
    finally:
        db.close()


def audit_records(store: Path, key: str) -> list[dict]:
    r = run_cli("audit", "--store", store, "--key", key)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def store_id(store: Path) -> str:
    return json.loads((store / "store.json").read_text())["store_id"]


def requests_waiting_at(port: int) -> int:
    """Bytes sent to the server on 127.0.0.1:port that it has not read (/proc/net/tcp)."""
    waiting = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                waiting += int(fields[4].split(":")[1], 16)  # rx_queue of the server's socket
    return waiting


def status_of(mount) -> dict:
    r = run_cli("status", mount.mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kms_cli(mount, *args) -> dict:
    r = run_cli("kms", *args, "--mount", mount.mnt)
    assert r.returncode == 0, f"s3fuse kms {args}: {r.stderr}"
    return json.loads(r.stdout)


def test_transit_files_round_trip_without_plaintext_keys_on_disk(workdir, bao, mount_factory):
    key = new_key(bao)
    store = transit_store(workdir, bao)
    m = mount_factory(store)
    d, builtin = m.mnt / "t", m.mnt / "b"
    os.mkdir(d)
    os.mkdir(builtin)
    os.setxattr(d, SSE, f"aws:kms:{key}".encode())  # a bare name: the store's provider (Transit)
    os.setxattr(builtin, SSE, b"aws:kms")  # the built-in managed key, in the same store
    assert os.getxattr(d, SSE) == f"aws:kms:transit:{key}".encode()
    files = {d / "small": b"hello transit\n", d / "big": os.urandom(5 << 20),
             builtin / "local": b"built-in KMS\n"}
    for p, data in files.items():
        write(p, data)
    assert os.getxattr(d / "big", "user.s3fuse.kms-key-id") == f"transit:{key}".encode()
    assert os.getxattr(d / "big", "user.s3fuse.kms-key-version") == b"1"
    assert os.getxattr(builtin / "local", "user.s3fuse.kms-key-id") != f"transit:{key}".encode()
    m.unmount()
    m.start()  # cold caches: every data key comes back through Transit's decrypt
    for p, data in files.items():
        assert (m.mnt / p.relative_to(m.mnt)).read_bytes() == data
    m.unmount()

    # Every Transit key slot unwraps (as root, with its context) to a data key that is
    # nowhere in the store directory, in raw or base64 form.
    rows = [r for r in slots(store) if r[3] == f"transit:{key}"]
    assert len(rows) == 3  # small + two blocks of big
    data_keys = []
    for inode, blockno, oid, _, version, slot in rows:
        name, ciphertext, v = parse_blob(slot)
        assert (name, v, version) == (key, 1, 1) and ciphertext.startswith("vault:v1:")
        context = {"store": store_id(store), "object": oid.hex(), "inode": str(inode),
                   "block": str(blockno)}
        plain = bao.api("POST", f"transit/decrypt/{key}",
                        {"ciphertext": ciphertext, "context": derivation_context(context)})["plaintext"]
        data_keys.append(base64.b64decode(plain))
        # the context binds the slot to its block: another block's context does not open it
        other = dict(context, block=str(blockno + 1))
        status, _ = bao.request("POST", f"transit/decrypt/{key}",
                                {"ciphertext": ciphertext, "context": derivation_context(other)})
        assert status == 400
    assert len(set(data_keys)) == 3 and all(len(k) == 32 for k in data_keys)
    files_to_search = [Path(dp) / n for dp, _, names in os.walk(store) for n in names] + m.logs
    for path in files_to_search:
        blob = path.read_bytes()
        for k in data_keys:
            assert k not in blob and base64.b64encode(k) not in blob, f"data key in {path}"
    assert not any(base64.b64encode(k) in bao.audit_log.read_bytes() for k in data_keys)

    # OpenBao's own audit device saw the data-key and decrypt calls of this mount
    paths = bao.audited_paths()
    assert paths.count(f"transit/datakey/plaintext/{key}") >= 3
    assert paths.count(f"transit/decrypt/{key}") >= 3

    # and s3fuse's audit trail records each use, as for the built-in KMS
    records = audit_records(store, f"transit:{key}")
    ops = [(r["op"], r["outcome"]) for r in records]
    assert ops.count(("kms:GenerateDataKey", "allowed")) == 3
    decrypts = [r for r in records if r["op"] == "kms:Decrypt" and r.get("object_id")]
    assert {r["object_id"] for r in decrypts} == {r[2].hex() for r in rows}
    assert all(r["key_version"] == 1 for r in decrypts)


def test_transit_token_without_permission_is_eacces(workdir, bao, mount_factory):
    readable, closed = new_key(bao, "ro"), new_key(bao, "closed")
    store = transit_store(workdir, bao)
    m = mount_factory(store)
    for name in (readable, closed):
        os.mkdir(m.mnt / name)
        os.setxattr(m.mnt / name, SSE, f"aws:kms:transit:{name}".encode())
        write(m.mnt / name / "f", b"secret " + name.encode())
    m.unmount()

    # a token whose policy may only decrypt with one key, and nothing else in transit/
    token = bao.token_with_policy(f"decrypt-{readable}",
                                  f'path "transit/decrypt/{readable}" {{ capabilities = ["update"] }}')
    token_file = workdir("tok") / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    set_kms(store, token_file=str(token_file))
    m.start()
    assert (m.mnt / readable / "f").read_bytes() == b"secret " + readable.encode()
    assert errno_of(lambda: open(m.mnt / readable / "new", "wb")) == errno.EACCES
    assert errno_of(lambda: open(m.mnt / closed / "f", "rb").read()) == errno.EACCES
    assert errno_of(lambda: open(m.mnt / closed / "f", "r+b")) == errno.EACCES
    listing = run_cli("kms", "list", "--mount", m.mnt)  # this token may not list transit keys
    assert listing.returncode == 0 and "Transit keys not listed" in listing.stdout
    m.unmount()
    denied = [r for r in audit_records(store, f"transit:{closed}") if r["outcome"] == "denied"]
    assert denied and all(r["errno"] == errno.EACCES for r in denied)


def test_transit_local_key_policy_per_uid(workdir, bao, mount_factory):
    """A store may add a built-in-style uid policy to a Transit key: one token, many users."""
    key = new_key(bao, "team")
    alice, bob = 2001, 2002
    store = transit_store(workdir, bao, policies={
        key: {"encrypt": {"uids": [alice]}, "decrypt": {"uids": [alice]}}})
    m = mount_factory(store, extra_args=["--allow-other"])
    d = m.mnt / "team"
    os.mkdir(d)
    os.chmod(d, 0o777)
    os.setxattr(d, SSE, f"aws:kms:{key}".encode())
    assert py_as(alice, alice, "write", d / "a", b"alice's".hex()) == ("ok", None)
    assert py_as(alice, alice, "read", d / "a") == ("ok", b"alice's".hex())
    write(d / "r", b"root passes every policy")  # as for the built-in KMS
    os.chmod(d / "r", 0o644)
    assert py_as(bob, bob, "read", d / "r") == ("errno", errno.EACCES)
    assert py_as(bob, bob, "create", d / "b", 0o644) == ("errno", errno.EACCES)
    m.unmount()
    denied = [r for r in audit_records(store, f"transit:{key}") if r["outcome"] == "denied"]
    assert {r["uid"] for r in denied} == {bob}


def test_transit_missing_key_is_enokey(workdir, bao, mount_factory):
    key = new_key(bao)
    store = transit_store(workdir, bao, default_key=key)
    m = mount_factory(store)
    d = m.mnt / "d"
    os.mkdir(d)
    assert errno_of(lambda: os.setxattr(d, SSE, b"aws:kms:transit:no-such-key")) == errno.ENOKEY
    os.setxattr(d, SSE, b"aws:kms")  # plain: the store's default Transit key
    assert os.getxattr(d, SSE) == f"aws:kms:transit:{key}".encode()
    write(d / "f", b"soon unreadable")
    m.unmount()
    bao.delete_key(key)
    m.start()
    assert errno_of(lambda: (d / "f").read_bytes()) == errno.ENOKEY
    assert errno_of(lambda: open(d / "g", "wb")) == errno.ENOKEY
    # a key that is not derived would ignore the per-object context: refused for new data
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    bao.create_key(plain, derived=False)
    os.mkdir(m.mnt / "p")
    os.setxattr(m.mnt / "p", SSE, f"aws:kms:{plain}".encode())
    assert errno_of(lambda: open(m.mnt / "p" / "f", "wb")) == errno.EINVAL
    os.stat(m.mnt)  # the mount stays up
    assert "is not a derived key" in m.log_text()


def test_transit_rotate_rewrap_and_min_decryption_version(workdir, bao, mount_factory):
    store = transit_store(workdir, bao)
    m = mount_factory(store)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = kms_cli(m, "create-key", "--transit", name)
    assert created["id"] == f"transit:{name}" and created["derived"] and created["current_version"] == 1
    listing = run_cli("kms", "list", "--mount", m.mnt)
    assert listing.returncode == 0 and f"transit:{name}" in listing.stdout
    d = m.mnt / "d"
    os.mkdir(d)
    contents = {"moved": b"written under SSE-S3, re-encrypted under Transit"}
    write(d / "moved", contents["moved"])
    assert os.getxattr(d / "moved", "user.s3fuse.mode") == b"AES256"
    os.setxattr(d, SSE, f"aws:kms:transit:{name}".encode())
    os.setxattr(d / "moved", SSE, f"aws:kms:transit:{name}".encode())  # re-encrypts the file
    assert os.getxattr(d / "moved", "user.s3fuse.kms-key-id") == f"transit:{name}".encode()
    contents.update({f"f{i}": os.urandom(1000 + i) for i in range(3)})
    for n, data in contents.items():
        write(d / n, data)

    # rotate through s3fuse: a new version in Transit, then every stored slot re-wrapped
    rotated = kms_cli(m, "rotate", f"transit:{name}")
    assert rotated["current_version"] == 2
    assert rotated["rewrap"] == {"rewrapped": 4, "failed": 0, "version": 2}
    assert {os.getxattr(d / n, "user.s3fuse.kms-key-version") for n in contents} == {b"2"}
    m.unmount()
    rows = [r for r in slots(store) if r[3] == f"transit:{name}"]
    assert len(rows) == 4 and all(r[4] == 2 and b"vault:v2:" in r[5] for r in rows)
    m.start()
    for n, data in contents.items():
        assert (d / n).read_bytes() == data

    # an object left at v2 when v3 exists and min_decryption_version is 3: a clear EKEYEXPIRED
    bao.api("POST", f"transit/keys/{name}/rotate")  # behind s3fuse's back: nothing re-wrapped
    described = kms_cli(m, "set-min-decryption-version", f"transit:{name}", "--version", "3")
    assert described["min_decryption_version"] == 3
    # at once: the daemon drops the data keys it had unwrapped
    assert errno_of(lambda: read_uncached(d / "f0")) == errno.EKEYEXPIRED
    assert kms_cli(m, "rewrap", f"transit:{name}")["rewrap"]["failed"] == 4  # too old to re-wrap
    kms_cli(m, "set-min-decryption-version", f"transit:{name}", "--version", "2")
    assert kms_cli(m, "rewrap", f"transit:{name}")["rewrap"] == {"rewrapped": 4, "failed": 0, "version": 3}
    kms_cli(m, "set-min-decryption-version", f"transit:{name}", "--version", "3")
    m.unmount()
    m.start()
    for n, data in contents.items():
        assert (d / n).read_bytes() == data
    assert bao.key_info(name)["min_decryption_version"] == 3
    # non-root may not administer Transit keys through s3fuse; built-in-only ops are refused
    r = run_cli("kms", "disable", f"transit:{name}", "--mount", m.mnt)
    assert r.returncode != 0 and "Vault/OpenBao" in r.stderr and TRACEBACK not in r.stderr
    m.unmount()
    ops = [(r["op"], r["outcome"]) for r in audit_records(store, f"transit:{name}")]
    for op in ("kms:CreateKey", "kms:RotateKey", "kms:ReEncrypt", "kms:SetMinDecryptionVersion"):
        assert (op, "allowed") in ops
    assert ("kms:DisableKey", "denied") in ops


def test_transit_outage_is_eio_then_recovers(workdir, bao, mount_factory):
    key = new_key(bao)
    store = transit_store(workdir, bao)
    m = mount_factory(store)
    d = m.mnt / "d"
    os.mkdir(d)
    os.setxattr(d, SSE, f"aws:kms:{key}".encode())
    write(d / "f", b"needs the KMS")
    write(m.mnt / "local", b"SSE-S3 needs no KMS")
    m.unmount()
    m.start()
    os.kill(bao.proc.pid, signal.SIGSTOP)  # the server stops answering: requests time out
    try:
        # while one request waits on the KMS, the event loop serves others
        waiting = threading.Thread(target=lambda: errno_of(lambda: (d / "f").read_bytes()))
        waiting.start()
        wait_until(lambda: requests_waiting_at(bao.port) > 0, 5, "the daemon's KMS request")
        assert (m.mnt / "local").read_bytes() == b"SSE-S3 needs no KMS"
        assert waiting.is_alive(), "a KMS call stalled the event loop"
        waiting.join()
        assert errno_of(lambda: (d / "f").read_bytes()) == errno.EIO
        assert errno_of(lambda: open(d / "g", "wb")) == errno.EIO
        assert m.proc.poll() is None and os.listdir(d) == ["f"]  # the daemon stays up
        # the first call without an answer opened the circuit breaker: the calls after it
        # fail at once, without waiting on the server, and the outage is logged once
        st = status_of(m)
        assert st["kms_breaker"] == "open" and st["kms_outages"] == 1, st
        assert st["kms_calls_failed_at_once"] >= 1, st
    finally:
        os.kill(bao.proc.pid, signal.SIGCONT)
    bao.wait_healthy()
    # the breaker's probe finds the server again by itself
    wait_until(lambda: status_of(m)["kms_breaker"] == "closed", 60, "the breaker to close")
    assert (d / "f").read_bytes() == b"needs the KMS"
    write(d / "g", b"new data key")
    assert (d / "g").read_bytes() == b"new data key"
    log = m.log_text()
    assert "after 2 attempts" in log and "answers again" in log
    assert log.count("is unreachable (") == 1 and log.count("answers again") == 1, log
    m.unmount()

    # nothing listening at the address at all: the mount still starts, KMS uses fail with EIO
    set_kms(store, address=f"http://127.0.0.1:{free_port()}")
    m.start()
    assert errno_of(lambda: (d / "f").read_bytes()) == errno.EIO
    assert (m.mnt / "local").read_bytes() == b"SSE-S3 needs no KMS"
    assert "is not reachable now" in m.log_text() and "ConnectionRefusedError" in m.log_text()
    m.unmount()


def test_transit_init_refuses_a_rejected_token(workdir, bao):
    bad = workdir("bad") / "token"
    bad.write_text("not-a-token")
    bad.chmod(0o600)
    store = workdir("store") / "store"
    r = run_cli("init", store, "--kms", "transit", "--vault-addr", bao.address,
                "--vault-token-file", bad)
    assert r.returncode != 0 and TRACEBACK not in r.stderr
    assert r.stderr.startswith("s3fuse: ") and "permission denied" in r.stderr.lower()
    assert len(r.stderr.strip().splitlines()) == 1 and not (store / "store.json").exists()

    # a store whose token is later revoked: the mount refuses to start, in one line
    good = transit_store(workdir, bao)
    set_kms(good, token_file=str(bad))
    mnt = workdir("mnt")
    r = run_cli("mount", good, mnt, "--foreground", timeout=60)
    assert r.returncode != 0 and TRACEBACK not in r.stderr and not os.path.ismount(mnt)
    assert "s3fuse: Transit KMS at" in r.stderr and "permission denied" in r.stderr.lower()


# ---- the pure parts, directly ----------------------------------------------

def test_transit_blob_and_error_mapping():
    from s3fuse.errors import S3fuseError
    from s3fuse.keys import transit as tr

    blob = tr.encode_blob("key-1", "vault:v7:QUJD")
    assert blob.startswith(b"TRN1") and tr.parse_blob(blob) == ("key-1", "vault:v7:QUJD", 7)
    for bad in (b"", b"TRN1", blob[:-6], b"KMS1" + blob[4:], blob.replace(b"vault:v7", b"vault:vx"),
                tr.encode_blob("key-1", "plain:v1:QUJD"), blob[:6] + b"k\xff" + blob[8:]):
        with pytest.raises(S3fuseError) as info:
            tr.parse_blob(bad)
        assert info.value.errno == errno.EIO
    assert tr.classify(403, ["1 error occurred: permission denied"]) == errno.EACCES
    assert tr.classify(400, ["encryption key not found"]) == errno.ENOKEY
    assert tr.classify(404, []) == errno.ENOKEY
    assert tr.classify(400, ["ciphertext or signature version is disallowed by policy (too old)"]) \
        == errno.EKEYEXPIRED
    assert tr.classify(400, ["cipher: message authentication failed"]) == errno.EIO
    assert tr.classify(400, ["something else"]) == errno.EINVAL
    # the context reaches Transit as base64 of a prefix and the canonical (sorted) context
    a = tr.derivation_context({"store": "s", "object": "o"})
    assert a == tr.derivation_context({"object": "o", "store": "s"})
    assert a != tr.derivation_context({"store": "s", "object": "p"})
    assert base64.b64decode(a).startswith(b"s3fuse/v1/transit-datakey")
    assert tr.name_of("transit:abc") == tr.name_of("abc") == "abc"
    with pytest.raises(S3fuseError):
        tr.name_of("transit:../sys/seal")


def test_transit_settings_and_backoff(tmp_path):
    from s3fuse.errors import S3fuseError
    from s3fuse.keys import transit as tr

    env = {"BAO_ADDR": "http://127.0.0.1:8200", "BAO_TOKEN": "t-env"}
    s = tr.TransitSettings.from_config({}, env=env)
    assert (s.address, s.token, s.mount) == ("http://127.0.0.1:8200", "t-env", "transit")
    assert "t-env" not in repr(s)
    (tmp_path / "tok").write_text("t-file\n")
    s = tr.TransitSettings.from_config({"address": "https://kms:8200/", "token_file": "tok",
                                        "mount": "/tr/"}, base_dir=str(tmp_path),
                                       env={"VAULT_TOKEN": "t-env"})
    assert (s.address, s.token, s.mount) == ("https://kms:8200", "t-file", "tr")
    for kms, bad_env in (({}, {}), ({"address": "ftp://x"}, {"VAULT_TOKEN": "t"}),
                         ({"address": "http://x"}, {}), ({"address": "http://x", "attempts": 0},
                                                          {"VAULT_TOKEN": "t"})):
        with pytest.raises(S3fuseError) as info:
            tr.TransitSettings.from_config(kms, env=bad_env)
        assert info.value.errno == errno.EINVAL
    s = tr.TransitSettings.from_config({"policies": {"k": {"encrypt": {"uids": [5]},
                                                           "decrypt": {"gids": [7]}}}}, env=env)
    assert s.policies["k"]["decrypt"] == {"uids": [], "gids": [7]}
    for policies in ({"k": {"encrypt": {"uids": [5]}}}, {"bad name": {}}, ["k"],
                     {"k": {"encrypt": {"uids": ["x"]}, "decrypt": {}}}):
        with pytest.raises(S3fuseError) as info:
            tr.TransitSettings.from_config({"policies": policies}, env=env)
        assert info.value.errno == errno.EINVAL
    client = tr.TransitClient(tr.TransitSettings("http://x", "t", backoff=0.1, backoff_max=0.3))
    for attempt in range(1, 8):
        assert 0 <= client.delay(attempt) <= min(0.3, 0.1 * 2 ** (attempt - 1))


def test_circuit_breaker_states():
    from s3fuse.keys.breaker import CircuitBreaker

    answers = []  # what the next probes find: False = no answer

    def probe():
        if not (answers.pop(0) if answers else False):
            raise OSError("no answer")

    b = CircuitBreaker("test server", probe, first=0.01, longest=0.04)
    assert b.refusal() is None and not b.is_open
    answers[:] = [False, False, False]
    b.failed("timed out")
    assert b.is_open and "test server did not answer" in b.refusal() and "timed out" in b.refusal()
    b.failed("again")  # already open: nothing changes, nothing is logged again
    assert b.stats()["kms_outages"] == 1
    wait_until(lambda: not answers, 10, "three failed probes")
    assert b.is_open
    answers.append(True)
    wait_until(lambda: not b.is_open, 10, "a probe to close the breaker")
    assert b.refusal() is None
    # an answer to a call in flight closes it too
    answers[:] = [False] * 1000
    b.failed("timed out")
    b.succeeded()
    assert not b.is_open and b.stats() == {"kms_breaker": "closed", "kms_outages": 2,
                                           "kms_calls_failed_at_once": 2}
    b.close()

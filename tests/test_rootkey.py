"""Root-key sources (key file, scrypt passphrase, systemd credential) and `rekey-root`.

Every test mounts the real filesystem; wrong keys must fail with one clear line and
leave the store byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from s3fuse import store as storemod
from s3fuse.errors import StoreError

from .conftest import TRACEBACK, run_cli
from .test_cli import assert_cli_error

FAST_SCRYPT = ("--scrypt-log-n", "14")  # 16 MiB: the default cost is exercised in test_passphrase_default_cost


def snapshot(store: Path) -> dict[str, str]:
    """SHA-256 of every file of a store except the daemon's log and lock."""
    out = {}
    for dirpath, _dirs, files in os.walk(store):
        for f in files:
            p = Path(dirpath) / f
            rel = str(p.relative_to(store))
            if rel in ("s3fuse.log", "lock"):
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def init(path: Path, *args) -> Path:
    r = run_cli("init", path, *args)
    assert r.returncode == 0, r.stderr
    assert TRACEBACK not in r.stderr
    return path


def write_files(mnt: Path, n: int = 5) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        data = os.urandom(1000 + i * 7919)
        (mnt / f"f{i}").write_bytes(data)
        files[f"f{i}"] = data
    return files


def check_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name


def test_passphrase_default_cost(workdir, mount_factory):
    """scrypt at its default cost: parameters and salt in store.json, no key on disk."""
    d = workdir("pp")
    pw = d / "pw"
    pw.write_text("correct horse battery staple\n")
    store = init(d / "store", "--root-key", "passphrase", "--passphrase-file", pw)
    cfg = json.loads((store / "store.json").read_text())
    rk = cfg["root_key"]
    assert rk["source"] == "passphrase" and rk["kdf"] == "scrypt"
    assert rk["n"] == 1 << 17 and rk["r"] == 8 and rk["p"] == 1 and len(bytes.fromhex(rk["salt"])) == 16
    assert not (store / "root.key").exists()
    # the derived key is nowhere in the store
    key = storemod.obtain_root_key(storemod.load_config(str(store)), passphrase_file=str(pw))
    for dirpath, _d, names in os.walk(store):
        for n in names:
            assert key not in (Path(dirpath) / n).read_bytes(), n

    m = mount_factory(store=store, extra_args=["--passphrase-file", str(pw)])
    files = write_files(m.mnt)
    m.unmount()
    before = snapshot(store)

    wrong = d / "wrong"
    wrong.write_text("correct horse battery stapler\n")
    mnt = workdir("mnt")
    r = run_cli("mount", store, mnt, "--passphrase-file", wrong)
    assert_cli_error(r, "mount with a wrong passphrase")
    assert "wrong passphrase" in r.stderr
    assert not os.path.ismount(mnt)
    assert snapshot(store) == before

    # no passphrase and no terminal: a clear error too
    r = run_cli("mount", store, mnt)
    assert_cli_error(r, "mount without a passphrase")
    assert "--passphrase-file" in r.stderr

    m.start()
    check_files(m.mnt, files)


def test_wrong_key_file(workdir, mount_factory):
    m = mount_factory()
    files = write_files(m.mnt)
    m.unmount()
    store = m.store
    before = snapshot(store)
    d = workdir("keys")
    mnt = workdir("mnt")

    wrong = d / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    r = run_cli("mount", store, mnt, "--root-key-file", wrong)
    assert_cli_error(r, "mount with a wrong key file")
    assert "wrong root key" in r.stderr and str(wrong) in r.stderr

    short = d / "short.key"
    short.write_bytes(os.urandom(31))
    short.chmod(0o600)
    r = run_cli("mount", store, mnt, "--root-key-file", short)
    assert_cli_error(r, "mount with a 31-byte key file")
    assert "32 bytes" in r.stderr

    # the recorded key file itself replaced by a wrong one
    good = (store / "root.key").read_bytes()
    (store / "root.key").write_bytes(os.urandom(32))
    r = run_cli("mount", store, mnt)
    assert_cli_error(r, "mount with a wrong root.key")
    assert "wrong root key" in r.stderr
    (store / "root.key").write_bytes(good)
    assert snapshot(store) == before
    assert not os.path.ismount(mnt)

    # the right key given explicitly, as base64: works
    b64 = d / "good.b64"
    import base64
    b64.write_text(base64.b64encode(good).decode() + "\n")
    b64.chmod(0o600)
    m.extra_args = ["--root-key-file", str(b64)]
    m.start()
    check_files(m.mnt, files)


def test_credential_source(workdir, mount_factory, monkeypatch):
    """The key comes from $CREDENTIALS_DIRECTORY/NAME, as systemd's LoadCredential= provides it."""
    creds = workdir("creds")
    key = os.urandom(32)
    (creds / "s3fuse-root").write_bytes(key)
    os.chmod(creds / "s3fuse-root", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    store = init(workdir("st") / "store", "--root-key", "credential:s3fuse-root")
    cfg = json.loads((store / "store.json").read_text())
    assert cfg["root_key"] == {"source": "credential", "name": "s3fuse-root"}
    assert not (store / "root.key").exists()

    m = mount_factory(store=store)
    files = write_files(m.mnt)
    m.unmount()

    mnt = workdir("mnt")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    r = run_cli("mount", store, mnt)
    assert_cli_error(r, "mount without CREDENTIALS_DIRECTORY")
    assert "CREDENTIALS_DIRECTORY" in r.stderr and "s3fuse-root" in r.stderr

    other = workdir("other")
    (other / "s3fuse-root").write_bytes(os.urandom(32))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(other))
    r = run_cli("mount", store, mnt)
    assert_cli_error(r, "mount with another credential")
    assert "wrong root key" in r.stderr and "systemd credential s3fuse-root" in r.stderr

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    m.start()
    check_files(m.mnt, files)


def test_rekey_root_then_remount(workdir, mount_factory):
    """rekey-root re-seals the keyring and the KMS keystore; the old key then fails clearly."""
    m = mount_factory()
    files = write_files(m.mnt)
    r = run_cli("kms", "create-key", "--alias", "alias/rk", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    (m.mnt / "kmsdir").mkdir()
    os.setxattr(m.mnt / "kmsdir", "user.s3fuse.sse", b"aws:kms:alias/rk")
    kms_data = os.urandom(70000)
    (m.mnt / "kmsdir" / "k").write_bytes(kms_data)

    r = run_cli("rekey-root", m.store)
    assert_cli_error(r, "rekey-root while mounted")
    assert "mounted" in r.stderr
    m.unmount()

    store = m.store
    old_key = workdir("old") / "root.key"
    shutil.copy(store / "root.key", old_key)
    old_keyring = (store / "keyring.bin").read_bytes()

    r = run_cli("rekey-root", store)
    assert r.returncode == 0, r.stderr
    assert "generation 2" in r.stdout
    names = set(os.listdir(store))
    assert {"keyring.2.bin", "kms.2.bin", "root-2.key"} <= names
    assert not {"keyring.bin", "kms.bin", "root.key"} & names, names
    cfg = json.loads((store / "store.json").read_text())
    assert cfg["key_generation"] == 2 and cfg["root_key"] == {"source": "file", "path": "root-2.key"}
    assert (store / "root-2.key").read_bytes() != old_key.read_bytes()
    assert (store / "keyring.2.bin").read_bytes() != old_keyring

    before = snapshot(store)
    mnt = workdir("mnt")
    r = run_cli("mount", store, mnt, "--root-key-file", old_key)
    assert_cli_error(r, "mount with the key from before rekey-root")
    assert "wrong root key" in r.stderr
    r = run_cli("rekey-root", store, "--root-key-file", old_key)
    assert_cli_error(r, "rekey-root with the old key")
    assert snapshot(store) == before

    m.start()
    check_files(m.mnt, files)
    assert (m.mnt / "kmsdir" / "k").read_bytes() == kms_data
    r = run_cli("kms", "describe", "alias/rk", "--mount", m.mnt)
    assert r.returncode == 0 and "alias/rk" in r.stdout, r.stderr
    m.unmount()
    r = run_cli("audit", "verify", "--store", store)
    assert r.returncode == 0, r.stderr
    r = run_cli("audit", "--store", store)
    assert '"op":"root:RekeyRoot"' in r.stdout

    # and on to a passphrase: generation 3, no key file left in the store
    pw = workdir("pw") / "pw"
    pw.write_text("a new passphrase\n")
    r = run_cli("rekey-root", store, "--to", "passphrase", "--new-passphrase-file", pw, *FAST_SCRYPT)
    assert r.returncode == 0, r.stderr
    assert not [n for n in os.listdir(store) if n.endswith(".key")]
    m.extra_args = ["--passphrase-file", str(pw)]
    m.start()
    check_files(m.mnt, files)
    assert (m.mnt / "kmsdir" / "k").read_bytes() == kms_data


def test_rekey_wrong_passphrase_changes_nothing(workdir):
    d = workdir("pp")
    pw, wrong, new = d / "pw", d / "wrong", d / "new"
    pw.write_text("one\n")
    wrong.write_text("two\n")
    new.write_text("three\n")
    store = init(d / "store", "--root-key", "passphrase", "--passphrase-file", pw, *FAST_SCRYPT)
    before = snapshot(store)
    r = run_cli("rekey-root", store, "--passphrase-file", wrong, "--new-passphrase-file", new, *FAST_SCRYPT)
    assert_cli_error(r, "rekey-root with a wrong passphrase")
    assert "wrong passphrase" in r.stderr
    assert snapshot(store) == before


@pytest.mark.parametrize("crash", ["before-commit", "after-commit"])
def test_rekey_root_crash_leaves_exactly_one_key(workdir, mount_factory, monkeypatch, crash):
    """A crash before store.json is replaced leaves the old key working (and only it); a
    crash after it, the new key (and only it). The next mount removes the leftovers."""
    m = mount_factory()
    files = write_files(m.mnt, 3)
    r = run_cli("kms", "create-key", "--alias", "alias/c", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    m.unmount()
    store = m.store
    cfg = storemod.load_config(str(store))
    old_key = storemod.obtain_root_key(cfg)
    old_copy = workdir("old") / "old.key"
    old_copy.write_bytes(old_key)
    old_copy.chmod(0o600)
    new_file = workdir("new") / "new.key"

    class Crash(Exception):
        pass

    def boom(*a, **k):
        raise Crash()

    if crash == "before-commit":
        monkeypatch.setattr(storemod, "write_config", boom)
    else:
        monkeypatch.setattr(storemod, "remove_stale_key_files", boom)
    with pytest.raises(Crash):
        storemod.rekey_root(cfg, old_key, "file", new_key_file=str(new_file))
    monkeypatch.undo()
    assert new_file.exists() and {"keyring.2.bin", "kms.2.bin"} <= set(os.listdir(store))

    cfg = storemod.load_config(str(store))
    works, fails = (old_copy, new_file) if crash == "before-commit" else (new_file, old_copy)
    assert storemod.obtain_root_key(cfg, key_file=str(works))
    with pytest.raises(StoreError, match="wrong root key"):
        storemod.obtain_root_key(cfg, key_file=str(fails))

    m.extra_args = ["--root-key-file", str(works)]
    m.start()
    check_files(m.mnt, files)
    r = run_cli("kms", "describe", "alias/c", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    m.unmount()
    names = set(os.listdir(store))
    if crash == "before-commit":
        assert "keyring.bin" in names and "kms.bin" in names
        assert not {"keyring.2.bin", "kms.2.bin"} & names, names
    else:
        assert "keyring.2.bin" in names and "kms.2.bin" in names
        assert not {"keyring.bin", "kms.bin"} & names, names

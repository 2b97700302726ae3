"""What a newcomer's walk-through of the README tripped over: the command line's manners."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from s3fuse import __version__
from s3fuse.audit import AuditLog

from .conftest import REPO, S3FUSE, TRACEBACK, init_store, run_cli
from .test_sse import ALICE, cli, cli_ok


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"s3fuse {__version__}"


@pytest.mark.parametrize("records", [3, 3000])  # flushed at the end / while printing
def test_a_closed_pipe_ends_the_command_quietly(workdir, records):
    store = init_store(workdir("s") / "store")
    with AuditLog.open(str(store / "audit.log")) as log:
        for i in range(records):
            log.append("kms:Decrypt", uid=1000 + i, path=f"/f{i}")
    # `s3fuse audit --store STORE | head`, with the reader gone before the first line
    reader, writer = os.pipe()
    os.close(reader)
    try:
        r = subprocess.run([*S3FUSE, "audit", "--store", str(store)], stdout=writer,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60)
    finally:
        os.close(writer)
    err, rc = r.stderr.decode(), r.returncode
    assert err == "" and TRACEBACK not in err, err
    assert rc == 141, rc  # as a tool killed by SIGPIPE (128 + 13), like cat or ls


def test_status_summary_first_counters_on_request(mounted):
    r = run_cli("status", mounted.mnt)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) <= 16, r.stdout
    kv = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert int(kv["pid"]) == mounted.pid and "inodes" in kv["files"], r.stdout
    assert "fuse_waits_fast" not in r.stdout and "--verbose" in lines[-1], r.stdout
    v = run_cli("status", mounted.mnt, "--verbose")
    assert v.returncode == 0, v.stderr
    assert v.stdout.startswith("\n".join(lines[:8])), v.stdout  # the same summary first
    assert "fuse_waits_fast: " in v.stdout and len(v.stdout.splitlines()) > 30, v.stdout


def test_kms_walkthrough_manners(mounted):
    mnt = mounted.mnt
    # a key without an alias lists as "-", not "None"
    r = run_cli("kms", "create-key", "-m", mnt)
    assert r.returncode == 0, r.stderr
    listing = run_cli("kms", "list", "-m", mnt).stdout
    assert "None" not in listing and " - " in listing, listing
    # policy set --help describes the JSON; a policy with some sections means nobody else
    # but root in the others
    h = run_cli("kms", "policy", "--help").stdout
    for word in ('"encrypt"', '"decrypt"', '"admin"', '"uids"', '"gids"', "nobody but root"):
        assert word in h, h
    r = run_cli("kms", "create-key", "--alias", "alias/walk", "-m", mnt)
    assert r.returncode == 0, r.stderr
    cli_ok("kms", "policy", "set", "alias/walk", "-m", mnt, input='{"decrypt": {"uids": [1000]}}')
    pol = json.loads(run_cli("kms", "policy", "get", "alias/walk", "-m", mnt).stdout)
    assert pol == {"encrypt": {"uids": [], "gids": []}, "decrypt": {"uids": [1000], "gids": []},
                   "admin": {"uids": [], "gids": []}}
    # kms-key-version of a file not stored yet: the version it will be stored under
    d = mnt / "team"
    os.mkdir(d)
    os.setxattr(d, "user.s3fuse.sse", b"aws:kms:alias/walk")
    fd = os.open(d / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.getxattr(d / "new", "user.s3fuse.kms-key-version") == b"1"
        r = run_cli("kms", "rotate", "alias/walk", "-m", mnt)
        assert r.returncode == 0, r.stderr
        assert os.getxattr(d / "new", "user.s3fuse.kms-key-version") == b"2"
        os.write(fd, b"stored under version 2")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.getxattr(d / "new", "user.s3fuse.kms-key-version") == b"2"


def test_bootstrap_makes_a_venv_other_users_can_run(workdir):
    """A python3 first on PATH that other users cannot reach (pyenv under /root) is not the
    one the venv is made with: its `s3fuse` would be root's alone."""
    hidden = workdir("py") / "private"  # under directories everyone may traverse
    (hidden / "bin").mkdir(parents=True)
    (hidden / "bin" / "python3").symlink_to("/usr/bin/python3")
    hidden.chmod(0o700)
    env = {**os.environ, "PATH": f"{hidden / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    r = subprocess.run([str(REPO / "scripts" / "bootstrap"), "--print-python"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "/usr/bin/python3", r
    hidden.chmod(0o755)  # reachable by everyone: used as found
    r = subprocess.run([str(REPO / "scripts" / "bootstrap"), "--print-python"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(hidden / "bin" / "python3"), r
    # and apt waits for a lock another apt run holds, rather than failing at once
    assert "DPkg::Lock::Timeout" in (REPO / "scripts" / "bootstrap").read_text()


def test_the_mount_is_found_from_the_current_directory(mount_factory):
    a, b = mount_factory(), mount_factory()
    os.mkdir(a.mnt / "sub")
    # with two mounts (and any other test's), the one holding the current directory is used
    r = subprocess.run([*S3FUSE, "key", "add", "here"], input=base64.b64encode(os.urandom(32)),
                       capture_output=True, cwd=a.mnt / "sub", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "here" in cli_ok("key", "list", "-m", a.mnt) and "here" not in cli_ok("key", "list", "-m", b.mnt)
    # from outside every mount, with several of them: the error lists them
    r = subprocess.run([*S3FUSE, "key", "list"], capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert str(a.mnt) in r.stderr and str(b.mnt) in r.stderr and "--mount" in r.stderr, r.stderr
    # --mount may name any path on the mount
    assert "here" in cli_ok("key", "list", "-m", a.mnt / "sub")


def test_status_and_umount_of_another_users_mount(mount_factory):
    m = mount_factory(extra_args=["--allow-other"])
    # a user finds root's daemon for status (its socket is in root's runtime directory)
    r = cli("status", m.mnt, uid=ALICE)
    assert r.returncode == 0, r.stderr
    assert f"pid: {m.pid}" in r.stdout, r.stdout
    r = cli("key", "list", "-m", m.mnt, uid=ALICE)
    assert r.returncode == 0, r.stderr
    # and is told who may unmount it
    r = cli("umount", m.mnt, uid=ALICE)
    assert r.returncode == 1, r
    assert r.stderr.strip() == (f"s3fuse: {os.path.realpath(m.mnt)} was mounted by root (uid 0): "
                                "only that user or root may unmount it"), r.stderr
    assert os.path.ismount(m.mnt) and m.proc.poll() is None
    # a directory that is no mount, and one on another filesystem, are named as such
    r = cli("umount", "/tmp")
    assert "is not a mount point" in r.stderr or "is not an s3fuse mount" in r.stderr, r.stderr
    r = cli("status", "/")
    assert r.returncode == 1 and "is not on an s3fuse mount" in r.stderr, r.stderr


def test_sse_set_and_get_say_why(mount_factory):
    m = mount_factory(extra_args=["--allow-other"])
    d = m.mnt / "team"
    os.mkdir(d)
    os.chmod(d, 0o777)
    r = cli("sse", "set", d, "AES128")
    assert r.returncode == 1 and r.stderr == (
        f"s3fuse: {d}: unknown encryption setting 'AES128' (use AES256, aws:kms[:KEY] or SSE-C:KEY)\n"), r.stderr
    r = cli("sse", "set", d, "SSE-C:nokey")
    assert r.returncode == 1 and "no customer key named 'nokey' is loaded" in r.stderr, r.stderr
    r = cli("sse", "set", d, "AES256", uid=ALICE)
    assert r.returncode == 1 and "only the owner or root" in r.stderr, r.stderr
    r = cli("sse", "set", d, "aws:kms")
    assert r.returncode == 0, r.stderr
    key_id = r.stdout.strip().split("aws:kms:", 1)[1]
    assert r.stdout == f"{d}: aws:kms:{key_id}\n"
    assert cli_ok("sse", "get", d) == f"{d}: aws:kms:{key_id}\n"
    (d / "f").write_bytes(b"x")
    out = cli_ok("sse", "get", d / "f", uid=ALICE)
    assert f"{d / 'f'}: aws:kms:{key_id}" in out and f"kms-key-id: {key_id}" in out and "mode: aws:kms" in out, out
    # setfattr keeps working, with its bare errno
    r = subprocess.run(["setfattr", "-n", "user.s3fuse.sse", "-v", "AES128", str(d)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    r = subprocess.run(["setfattr", "-n", "user.s3fuse.sse", "-v", "AES256", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and cli_ok("sse", "get", d) == f"{d}: AES256\n"

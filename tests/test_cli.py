"""The s3fuse command line: init, mount, umount, status and their errors."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest

from .conftest import TRACEBACK, init_store, list_objects, run_cli


def assert_cli_error(r: subprocess.CompletedProcess, what: str) -> None:
    """An error: non-zero exit, exactly one stderr line starting ``s3fuse: ``."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"{what}: expected failure, got exit 0 (stderr={r.stderr!r})"
    assert TRACEBACK not in r.stderr and TRACEBACK not in r.stdout, f"{what}: traceback:\n{r.stderr}"
    assert len(lines) == 1, f"{what}: expected one stderr line, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("s3fuse: "), f"{what}: stderr line lacks 's3fuse: ': {lines[0]!r}"


def process_exited(pid: int) -> bool:
    """True if pid is gone or a zombie (this sandbox's init may reap late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _cleanup_unexpected_mount(mnt) -> None:
    if os.path.ismount(mnt):
        run_cli("umount", mnt, timeout=60)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


# ---------------------------------------------------------------- help / init

def test_help():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for word in ("init", "mount", "umount", "status"):
        assert word in r.stdout, f"--help does not mention {word!r}:\n{r.stdout}"
    r = run_cli("mount", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--foreground", "--allow-other", "--log-level", "--log-file"):
        assert opt in r.stdout, f"mount --help does not mention {opt}:\n{r.stdout}"


def test_init_creates_store_layout(workdir):
    store = workdir("s") / "store"
    r = run_cli("init", store)
    assert r.returncode == 0, r.stderr
    assert TRACEBACK not in r.stderr
    assert (store / "objects").is_dir()
    json.loads((store / "store.json").read_text())
    with open(store / "meta.db", "rb") as f:
        assert f.read(16) == b"SQLite format 3\x00"
    con = sqlite3.connect(f"file:{store / 'meta.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
    finally:
        con.close()
    assert tables, "meta.db has no tables"
    # besides store.json, meta.db and objects/: a sealed keyring and a root key file
    others = [p for p in store.rglob("*") if p.is_file()
              and p.relative_to(store).parts[0] not in ("store.json", "meta.db", "objects")
              and not p.name.startswith("meta.db-")]
    assert len(others) >= 2, (
        f"expected a sealed keyring and a root key file in {sorted(os.listdir(store))}")
    assert list_objects(store) == set(), "objects/ should start empty"


def test_init_into_existing_empty_dir(workdir):
    store = workdir("s")
    r = run_cli("init", store)
    assert r.returncode == 0, r.stderr
    assert (store / "store.json").exists()


def test_init_nonempty_dir_refused(workdir):
    store = workdir("s")
    (store / "something").write_text("x")
    r = run_cli("init", store)
    assert_cli_error(r, "init into a non-empty directory")
    assert sorted(os.listdir(store)) == ["something"], "init touched a non-empty directory"


def test_init_twice_refused(workdir):
    store = init_store(workdir("s") / "store")
    before = (store / "store.json").read_bytes()
    r = run_cli("init", store)
    assert_cli_error(r, "init of an existing store")
    assert (store / "store.json").read_bytes() == before


# ---------------------------------------------------------------- mount/status/umount

def test_daemon_mount_status_umount(workdir):
    store = init_store(workdir("s") / "store")
    mnt = workdir("m")
    log = workdir("l") / "log"
    r = run_cli("mount", store, mnt, "--log-file", log, "--log-level", "debug", timeout=60)
    try:
        assert r.returncode == 0, f"daemonizing mount failed: {r.stderr}"
        assert TRACEBACK not in r.stderr
        # returns only once the mount answers requests
        assert os.path.ismount(mnt)
        assert os.listdir(mnt) == [] or set(os.listdir(mnt)) <= {"lost+found"}
        with open(mnt / "hello", "w") as f:
            f.write("world")

        st = run_cli("status", mnt)
        assert st.returncode == 0, st.stderr
        kv = {}
        for line in st.stdout.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                kv[k.strip()] = v.strip()
        for key in ("store", "mountpoint", "pid"):
            assert key in kv, f"status lacks {key!r}:\n{st.stdout}"
        assert os.path.realpath(kv["store"]) == os.path.realpath(store)
        assert os.path.realpath(kv["mountpoint"]) == os.path.realpath(mnt)
        pid = int(kv["pid"])
        os.kill(pid, 0)  # alive
        assert log.exists() and log.stat().st_size > 0, "debug log file is empty"

        u = run_cli("umount", mnt, timeout=120)
        assert u.returncode == 0, u.stderr
        assert not os.path.ismount(mnt)
        # umount waits until the daemon has exited
        assert process_exited(pid), f"daemon pid {pid} still running after s3fuse umount returned"
        assert TRACEBACK not in log.read_text(errors="replace")
    finally:
        _cleanup_unexpected_mount(mnt)

    # data survived the clean unmount
    r = run_cli("mount", store, mnt, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert (mnt / "hello").read_text() == "world"
    finally:
        u = run_cli("umount", mnt, timeout=120)
        _cleanup_unexpected_mount(mnt)
    assert u.returncode == 0, u.stderr


def test_foreground_status_pid(mounted):
    st = run_cli("status", mounted.mnt)
    assert st.returncode == 0, st.stderr
    kv = dict(line.split(":", 1) for line in st.stdout.splitlines() if ":" in line)
    kv = {k.strip(): v.strip() for k, v in kv.items()}
    assert int(kv["pid"]) == mounted.pid
    assert os.path.realpath(kv["store"]) == os.path.realpath(mounted.store)
    assert os.path.realpath(kv["mountpoint"]) == os.path.realpath(mounted.mnt)


def test_foreground_umount_exits_daemon(mounted):
    (mounted.mnt / "f").write_bytes(b"abc")
    mounted.unmount()  # asserts exit 0, daemon gone, not mounted
    assert mounted.proc.returncode == 0
    mounted.start()
    assert (mounted.mnt / "f").read_bytes() == b"abc"


# ---------------------------------------------------------------- errors

def test_mount_missing_store(workdir):
    mnt = workdir("m")
    r = run_cli("mount", workdir("s") / "nope", mnt, timeout=60)
    _cleanup_unexpected_mount(mnt)
    assert_cli_error(r, "mount of a missing store")
    assert not os.path.ismount(mnt)


def test_mount_uninitialised_store(workdir):
    store = workdir("s")
    (store / "junk").write_text("not a store")
    mnt = workdir("m")
    r = run_cli("mount", store, mnt, timeout=60)
    _cleanup_unexpected_mount(mnt)
    assert_cli_error(r, "mount of an uninitialised store")


def test_mount_empty_dir_store(workdir):
    mnt = workdir("m")
    r = run_cli("mount", workdir("s"), mnt, timeout=60)
    _cleanup_unexpected_mount(mnt)
    assert_cli_error(r, "mount of an empty (uninitialised) store directory")


def test_mount_missing_mountpoint(workdir):
    store = init_store(workdir("s") / "store")
    r = run_cli("mount", store, workdir("m") / "nope", timeout=60)
    assert_cli_error(r, "mount on a missing mountpoint")


def test_mount_nonempty_mountpoint(workdir):
    store = init_store(workdir("s") / "store")
    mnt = workdir("m")
    (mnt / "file").write_text("x")
    r = run_cli("mount", store, mnt, timeout=60)
    _cleanup_unexpected_mount(mnt)
    assert_cli_error(r, "mount on a non-empty mountpoint")
    assert os.listdir(mnt) == ["file"]


def test_mount_mountpoint_is_file(workdir):
    store = init_store(workdir("s") / "store")
    f = workdir("m") / "file"
    f.write_text("x")
    r = run_cli("mount", store, f, timeout=60)
    assert_cli_error(r, "mount on a regular file")


@pytest.mark.parametrize("args", [
    ["--no-such-option"],
    ["--log-level", "bogus"],
])
def test_mount_bad_option(workdir, args):
    store = init_store(workdir("s") / "store")
    mnt = workdir("m")
    r = run_cli("mount", store, mnt, *args, timeout=60)
    _cleanup_unexpected_mount(mnt)
    assert_cli_error(r, f"mount with bad option {args}")


def test_unknown_command():
    r = run_cli("frobnicate")
    assert_cli_error(r, "unknown subcommand")


def test_second_mount_of_same_store_refused(mounted, workdir):
    mnt2 = workdir("m2")
    for fg in ([], ["--foreground"]):
        try:
            r = run_cli("mount", mounted.store, mnt2, *fg, timeout=60)
        finally:
            mounted_twice = os.path.ismount(mnt2)
            _cleanup_unexpected_mount(mnt2)
        assert not mounted_twice, "a second daemon mounted the same store"
        assert_cli_error(r, f"second mount of a mounted store {fg}")
    # the first mount is unaffected
    (mounted.mnt / "still").write_text("ok")
    assert (mounted.mnt / "still").read_text() == "ok"
    assert mounted.proc.poll() is None


def test_status_not_mounted(workdir):
    r = run_cli("status", workdir("m"))
    assert_cli_error(r, "status of a directory that is not an s3fuse mount")


def test_umount_not_mounted(workdir):
    r = run_cli("umount", workdir("m"))
    assert_cli_error(r, "umount of a directory that is not mounted")


def test_mount_after_kill9_recovers(mount_factory):
    m = mount_factory()
    (m.mnt / "a").write_bytes(b"1" * 1000)
    fd = os.open(m.mnt / "a", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    m.kill9()
    # a stale daemon must not block the next mount (no stale lock)
    m.start()
    assert (m.mnt / "a").read_bytes() == b"1" * 1000
    assert m.proc.poll() is None


def test_scripts_run_creates_store_and_mounts(workdir):
    """The README's first command: creates the store on first use, mounts in the background."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    store = workdir("runstore") / "store"
    mnt = workdir("runmnt") / "mnt"
    env = dict(os.environ, S3FUSE_STORE=str(store))
    try:
        r = subprocess.run([os.path.join(repo, "scripts", "run"), str(mnt)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        assert "umount" in r.stdout  # it says how to unmount
        (mnt / "hello").write_text("world")
        assert (mnt / "hello").read_text() == "world"
        assert (store / "store.json").exists()
        u = run_cli("umount", mnt, timeout=120)
        assert u.returncode == 0, u.stderr
        # second use: the store exists, so it is only mounted again
        r = subprocess.run([os.path.join(repo, "scripts", "run"), str(mnt)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert (mnt / "hello").read_text() == "world"
    finally:
        _cleanup_unexpected_mount(mnt)


def test_init_block_and_segment_sizes(workdir):
    store = workdir("sizes") / "store"
    r = run_cli("init", store, "--block-size-kib", "1024", "--segment-size-kib", "16")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((store / "store.json").read_text())
    assert (cfg["block_size"], cfg["segment_size"]) == (1 << 20, 16 << 10)
    bad = run_cli("init", workdir("bad") / "store", "--block-size-kib", "100", "--segment-size-kib", "64")
    assert_cli_error(bad, "block size not a multiple of the segment size")

"""Shared fixtures for the s3fuse test suite.

Mounted tests mount the real filesystem (``python -m s3fuse mount ...``) on a real FUSE
mount and drive it with real syscalls and tools; pure tests need no mount. Nothing is mocked.
A test whose FUSE device, SeaweedFS or OpenBao is missing is an error under CI (env CI set)
and a skip with the reason otherwise (``missing``).

Fixtures:

* ``s3fuse_cmd``  - argv prefix that runs the s3fuse CLI.
* ``workdir``     - factory for fresh 0o755 directories (traversable by the
                    unprivileged uids that ``run_as`` uses).
* ``new_store``   - a freshly initialised store directory.
* ``mount_factory`` / ``mounted`` / ``module_mount`` - :class:`Mount` objects.

Helpers: :func:`run_as`, :func:`count_objects`, :func:`list_objects`,
:func:`wait_until`.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
S3FUSE = [sys.executable, "-m", "s3fuse"]
# the daemons the mount fixtures start: the same command, through the harness's entry that
# can wrap the object store in the fault injector (tests/faultd.py, tests/faulty.py)
S3FUSE_DAEMON = [sys.executable, str(REPO / "tests" / "faultd.py")]
TRACEBACK = "Traceback (most recent call last)"
MOUNT_TIMEOUT = 20.0
UMOUNT_TIMEOUT = 120.0
# A test that runs longer than this is considered hung: the watchdog kills
# every daemon it knows of so blocked syscalls return ENOTCONN and the test
# fails instead of hanging the whole run.
TEST_WATCHDOG = float(os.environ.get("S3FUSE_TEST_WATCHDOG", "420"))

# Python for unprivileged subprocesses: the venv's interpreter may live under
# /root (not traversable by other uids); the system one is world-readable.
UNPRIV_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


# --------------------------------------------------------------------------
# what the tests need from the machine: FUSE for the mounts, SeaweedFS for S3, OpenBao for
# Transit. Pure tests need none of them. A missing one is an error under CI (env CI set,
# as .ci/run sets it) and a skip with the reason in a plain local run.
# --------------------------------------------------------------------------

FUSE_DEVICE = os.environ.get("S3FUSE_TEST_FUSE_DEVICE", "/dev/fuse")


def missing(what: str) -> None:
    """A test cannot run here: fail it under CI, skip it with the reason otherwise."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (an error because CI is set)", pytrace=False)
    pytest.skip(f"{what} (a failure under CI)")


def _fuse_problem() -> str | None:
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        return f"{FUSE_DEVICE} does not exist"
    if not stat.S_ISCHR(st.st_mode):
        return f"{FUSE_DEVICE} is not a character device"
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR)
    except OSError as e:
        return f"{FUSE_DEVICE} cannot be opened: {e}"
    os.close(fd)
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


_FUSE: dict = {}


def require_fuse() -> None:
    """Called by everything that mounts: the mount fixtures, `Mount.start` and
    `run_cli("mount", ...)`."""
    if "problem" not in _FUSE:
        _FUSE["problem"] = _fuse_problem()
    if _FUSE["problem"]:
        missing(f"this test mounts a real filesystem and needs FUSE: {_FUSE['problem']}")


@pytest.fixture(scope="session")
def fuse() -> None:
    """Depend on this (the mount fixtures do) for a test that mounts."""
    require_fuse()


# --------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def _session_base():
    base = Path(tempfile.mkdtemp(prefix="s3fuse-tests-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    _lazy_unmount_under(base)
    if os.environ.get("S3FUSE_TEST_KEEP"):
        print(f"\nkept test directory {base}")
        return
    shutil.rmtree(base, ignore_errors=True)


def _mounts_under(base: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == str(base) or mp.startswith(str(base) + "/"):
                out.append(mp)
    return out


def _lazy_unmount_under(base: Path) -> None:
    for mp in reversed(_mounts_under(base)):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


class _DirFactory:
    def __init__(self, base: Path):
        self.base = base
        self.n = 0

    def __call__(self, name: str = "d") -> Path:
        self.n += 1
        p = self.base / f"{name}-{self.n}"
        p.mkdir(mode=0o755)
        os.chmod(p, 0o755)
        return p


@pytest.fixture(scope="session")
def _dirs(_session_base):
    return _DirFactory(_session_base)


@pytest.fixture
def workdir(_dirs):
    """Factory: ``workdir("name")`` returns a new empty 0o755 directory."""
    return _dirs


# --------------------------------------------------------------------------
# CLI helpers
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3fuse_cmd():
    return list(S3FUSE)


def run_cli(*args, timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    if args and args[0] == "mount":
        require_fuse()
    return subprocess.run(
        [*S3FUSE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def init_store(path: Path, backend: str = "local") -> Path:
    """A new store at ``path``; for the s3 backend, ``path`` is its state directory and
    the objects go to a fresh prefix of the test bucket on the session's SeaweedFS."""
    if backend == "s3":
        return init_s3_store(path)
    r = run_cli("init", path)
    assert r.returncode == 0, f"s3fuse init {path} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert TRACEBACK not in r.stderr
    return path


@pytest.fixture
def new_store(workdir, store_backend) -> Path:
    return init_store(workdir("store") / "store", store_backend)


def wait_until(cond, timeout: float, what: str, interval: float = 0.02):
    """Poll ``cond()`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_file(p, data: bytes, fsync: bool = False) -> None:
    """Write all of `data` with write(2) (looping over short writes), optionally fsync."""
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def resign_metadata(store: Path) -> None:
    """Sign meta.db's rows again, as they are, under the store's metadata key: a test that
    edits rows to make damage of another kind (a wrong link count, a missing inode) than a
    forged row uses it, so that fsck sees that damage and not the edit (tests/test_meta_tamper.py
    covers edits as forgeries)."""
    from s3fuse.keys.keyring import Keyring
    from s3fuse.meta import Meta
    from s3fuse.store import load_config, read_root_key

    cfg = load_config(str(store))
    keyring = Keyring.unseal(Path(cfg.keyring_path).read_bytes(), read_root_key(cfg), cfg.store_id)
    m = Meta(cfg.meta_path)
    m.authenticate_all(keyring.meta_key)
    m.close()


def seal_settings(store: Path) -> None:
    """Accept an edit of store.json's key settings (kms, default_sse), as an administrator
    does with `s3fuse seal-settings`."""
    r = run_cli("seal-settings", store)
    assert r.returncode == 0, r.stderr


def list_objects(store: Path) -> set[str]:
    """Object ids in the store (files under STORE/objects, or keys under PREFIX/objects/)."""
    if store_is_s3(store):
        return s3_list_objects(store)
    out = set()
    root = Path(store) / "objects"
    for dirpath, _dirs_, files in os.walk(root):
        if Path(dirpath).name == ".free":
            # deleted objects' files, kept for reuse (backends/local.py): never objects, and
            # emptied when they were deleted
            assert all((Path(dirpath) / f).stat().st_size == 0 for f in files), "a recycled file kept data"
            continue
        for f in files:
            out.add(f)
    return out


def object_path(store: Path, oid: str) -> Path:
    for dirpath, _dirs_, files in os.walk(Path(store) / "objects"):
        if oid in files and Path(dirpath).name != ".free":
            return Path(dirpath) / oid
    raise FileNotFoundError(f"object {oid} not found under {store}/objects")


def count_objects(store: Path) -> int:
    return len(list_objects(store))


# --------------------------------------------------------------------------
# mounts
# --------------------------------------------------------------------------

_LIVE_MOUNTS: set["Mount"] = set()
_ALL_MOUNTS: list["Mount"] = []


class Mount:
    """A foreground s3fuse daemon we own (Popen), mounted on ``mnt``."""

    def __init__(self, store: Path, mnt: Path, logdir: Path, extra_args=()):
        self.store = Path(store)
        self.mnt = Path(mnt)
        self.logdir = Path(logdir)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.log_path: Path | None = None
        self.stderr_path: Path | None = None
        self.logs: list[Path] = []
        self.expect_traceback = False
        self._checked: dict[Path, int] = {}
        _ALL_MOUNTS.append(self)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Mount":
        require_fuse()
        assert self.proc is None or self.proc.poll() is not None, "already running"
        assert not os.path.ismount(self.mnt), f"{self.mnt} is still mounted"
        self.generation += 1
        self.log_path = self.logdir / f"daemon-{self.generation}.log"
        self.stderr_path = self.logdir / f"daemon-{self.generation}.stderr"
        self.logs += [self.log_path, self.stderr_path]
        argv = [*S3FUSE_DAEMON, "mount", str(self.store), str(self.mnt), "--foreground",
                "--log-file", str(self.log_path), *self.extra_args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, cwd="/",
            )
        _LIVE_MOUNTS.add(self)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mnt):
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(
                    f"s3fuse mount exited with {rc} before mounting {self.mnt}\n"
                    f"{self.describe_logs()}")
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(
                    f"{self.mnt} not mounted after {MOUNT_TIMEOUT} s\n{self.describe_logs()}")
            time.sleep(0.02)
        os.stat(self.mnt)  # the mount answers requests
        return self

    def unmount(self) -> None:
        """Clean unmount with ``s3fuse umount``; asserts it succeeds."""
        assert self.proc is not None
        r = run_cli("umount", self.mnt, timeout=UMOUNT_TIMEOUT)
        assert r.returncode == 0, (
            f"s3fuse umount {self.mnt} failed ({r.returncode}): {r.stderr}\n{self.describe_logs()}")
        # s3fuse umount waits until the daemon has exited.
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon pid {self.proc.pid} still alive after s3fuse umount returned")
        assert not os.path.ismount(self.mnt), f"{self.mnt} still mounted after s3fuse umount"
        _LIVE_MOUNTS.discard(self)
        assert rc == 0, f"daemon exited with {rc} after umount\n{self.describe_logs()}"
        self.check_log()

    def remount(self) -> "Mount":
        self.unmount()
        return self.start()

    def kill9(self) -> None:
        """SIGKILL the daemon and clear the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.clear_dead_mount()
        _LIVE_MOUNTS.discard(self)

    def clear_dead_mount(self) -> None:
        if os.path.ismount(self.mnt) or _is_dead_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        wait_until(lambda: not os.path.ismount(self.mnt) and not _is_dead_mount(self.mnt),
                   10, f"{self.mnt} to be unmounted")

    def cleanup(self) -> None:
        """Always leaves the mountpoint unmounted and the daemon dead."""
        if self.proc is None:
            return
        if self.proc.poll() is None and os.path.ismount(self.mnt):
            try:
                run_cli("umount", self.mnt, timeout=60)
                self.proc.wait(timeout=30)
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except Exception:
                pass
        if os.path.ismount(self.mnt) or _is_dead_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        _LIVE_MOUNTS.discard(self)

    # -- logs --------------------------------------------------------------
    def log_text(self, all_generations: bool = False) -> str:
        paths = self.logs if all_generations else [self.log_path, self.stderr_path]
        out = []
        for p in paths:
            if p is not None and p.exists():
                out.append(p.read_text(errors="replace"))
        return "\n".join(out)

    def describe_logs(self, limit: int = 8000) -> str:
        out = []
        for p in self.logs[-2:]:
            if p.exists():
                t = p.read_text(errors="replace")
                out.append(f"--- {p} ---\n{t[-limit:]}")
        return "\n".join(out)

    def log_offsets(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self.logs if p.exists()}

    def check_log(self, since: dict[Path, int] | None = None) -> None:
        """Fail if the daemon logs (from ``since``) contain a Python traceback.

        Each part of a log is reported once: whatever was checked is skipped
        next time."""
        if self.expect_traceback:
            return
        for p in self.logs:
            if not p.exists():
                continue
            start = max((since or {}).get(p, 0), self._checked.get(p, 0))
            with open(p, "rb") as f:
                f.seek(start)
                t = f.read().decode(errors="replace")
                self._checked[p] = f.tell()
            if TRACEBACK in t:
                i = t.index(TRACEBACK)
                raise AssertionError(f"daemon log {p} contains a Python traceback:\n"
                                     f"{t[max(0, i - 500):i + 4000]}")

    @property
    def pid(self) -> int:
        return self.proc.pid


def _is_dead_mount(p: Path) -> bool:
    # statfs always reaches the daemon; stat may be answered from the kernel's attribute cache
    try:
        os.statvfs(p)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


class MountFactory:
    def __init__(self, dirs: _DirFactory, backend: str = "local"):
        self.dirs = dirs
        self.backend = backend
        self.mounts: list[Mount] = []

    def __call__(self, store: Path | None = None, extra_args=(), start: bool = True) -> Mount:
        if store is None:
            store = init_store(self.dirs("store") / "store", self.backend)
        mnt = self.dirs("mnt")
        logdir = self.dirs("log")
        m = Mount(store, mnt, logdir, extra_args)
        self.mounts.append(m)
        if start:
            m.start()
        return m

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            m.cleanup()

    def finish(self) -> None:
        """Unmount every still-running mount cleanly (asserting that it works),
        then make sure nothing is left mounted or running."""
        errors = []
        for m in reversed(self.mounts):
            if m.proc is not None and m.proc.poll() is None and os.path.ismount(m.mnt):
                try:
                    m.unmount()
                except Exception as e:  # noqa: BLE001 - re-raised after cleanup
                    errors.append(e)
        self.cleanup()
        if errors:
            raise errors[0]


@pytest.fixture
def mount_factory(_dirs, store_backend, fuse):
    f = MountFactory(_dirs, store_backend)
    try:
        yield f
    finally:
        f.finish()


@pytest.fixture(scope="module")
def module_mount_factory(_dirs, store_backend, fuse):
    f = MountFactory(_dirs, store_backend)
    try:
        yield f
    finally:
        f.finish()


@pytest.fixture
def mounted(mount_factory) -> Mount:
    """A fresh store, mounted for this test only."""
    return mount_factory()


@pytest.fixture(scope="module")
def module_mount(module_mount_factory) -> Mount:
    """One mounted store shared by the tests of a module (each test uses its own subdirectory)."""
    m = module_mount_factory()
    yield m
    if m.proc is not None and m.proc.poll() is None and os.path.ismount(m.mnt):
        m.unmount()  # a failing clean unmount (or a traceback) errors the module's last test


@pytest.fixture
def subdir(module_mount, request) -> Path:
    """A fresh directory inside the module mount, named after the test."""
    name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")[:200]
    p = module_mount.mnt / name
    os.mkdir(p)
    return p


# --------------------------------------------------------------------------
# per-test log checking and hang watchdog
# --------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "expect_traceback: the daemon log may contain a Python traceback")
    config.addinivalue_line(
        "markers", "local_only: run on the local backend only (the test reads STORE/objects by path)")


@pytest.fixture(autouse=True)
def _daemon_log_and_watchdog(request):
    n_before = len(_ALL_MOUNTS)
    before = {m: m.log_offsets() for m in _ALL_MOUNTS}
    fired = []

    def fire():
        fired.append(True)
        for m in list(_LIVE_MOUNTS):
            if m.proc is not None and m.proc.poll() is None:
                try:
                    os.kill(m.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    timer = threading.Timer(TEST_WATCHDOG, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
    if fired:
        pytest.fail(f"watchdog: test ran longer than {TEST_WATCHDOG} s; "
                    "all s3fuse daemons were killed (hang?)")
    if request.node.get_closest_marker("expect_traceback"):
        return
    for m in _ALL_MOUNTS[:n_before]:
        m.check_log(before[m])
    for m in _ALL_MOUNTS[n_before:]:
        m.check_log()


# --------------------------------------------------------------------------
# unprivileged subprocesses
# --------------------------------------------------------------------------

def run_as(uid: int, gid: int, argv, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` as uid/gid with no supplementary groups."""
    r = subprocess.run(
        list(map(str, argv)), user=uid, group=gid, extra_groups=[],
        capture_output=True, text=True, timeout=120, cwd="/", stdin=subprocess.DEVNULL, **kw)
    if check:
        assert r.returncode == 0, f"{argv} as {uid}:{gid} failed: {r.stderr}"
    return r


_PY_OP = r"""
import errno, json, os, sys
op = sys.argv[1]
args = json.loads(sys.argv[2])
try:
    if op == "read":
        with open(args[0], "rb") as f:
            res = f.read().hex()
    elif op == "write":
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, bytes.fromhex(args[1])); os.close(fd); res = None
    elif op == "create":
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, args[1]); os.close(fd); res = None
    elif op == "mkdir":
        os.mkdir(args[0], args[1]); res = None
    elif op == "stat":
        st = os.stat(args[0]); res = [st.st_mode, st.st_uid, st.st_gid]
    elif op == "listdir":
        res = sorted(os.listdir(args[0]))
    elif op == "unlink":
        os.unlink(args[0]); res = None
    elif op == "chmod":
        os.chmod(args[0], args[1]); res = None
    elif op == "chown":
        os.chown(args[0], args[1], args[2]); res = None
    elif op == "rename":
        os.rename(args[0], args[1]); res = None
    elif op == "access":
        res = os.access(args[0], args[1])
    elif op == "utime_now":
        os.utime(args[0]); res = None
    elif op == "utime":
        os.utime(args[0], ns=(args[1], args[1])); res = None
    elif op == "setxattr":
        os.setxattr(args[0], args[1], bytes.fromhex(args[2])); res = None
    else:
        raise SystemExit("unknown op " + op)
    print(json.dumps({"ok": res}))
except OSError as e:
    print(json.dumps({"errno": e.errno, "msg": str(e)}))
"""


def py_as(uid: int, gid: int, op: str, *args):
    """Perform one filesystem operation as uid/gid.

    Returns ``("ok", result)`` or ``("errno", errno)``.
    """
    import json
    r = run_as(uid, gid, [UNPRIV_PYTHON, "-c", _PY_OP, op, json.dumps([str(a) if isinstance(a, Path) else a for a in args])])
    assert r.returncode == 0, f"helper {op}{args} as {uid}:{gid} crashed: {r.stderr}"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if "errno" in d:
        return ("errno", d["errno"])
    return ("ok", d["ok"])


# --------------------------------------------------------------------------
# S3 backend (issue 5): a real SeaweedFS server for the session, and the
# parametrisation of the filesystem tests over both backends
# --------------------------------------------------------------------------
#
# A test module opts in to running against both backends with a module-level
# ``BACKENDS = ("local", "s3")``; every test in it that uses a store (through
# new_store, mount_factory, mounted, module_mount, subdir) then runs once per
# backend.  ``@pytest.mark.local_only`` keeps one test on the local backend (tests
# that read or corrupt files under STORE/objects by path).

S3_TEST_BUCKET = "s3fuse-tests"
_S3: dict = {}


def pytest_generate_tests(metafunc):
    if "store_backend" not in metafunc.fixturenames or not hasattr(metafunc.module, "BACKENDS"):
        return  # the local backend, and test ids stay as they were
    backends = metafunc.module.BACKENDS
    if metafunc.definition.get_closest_marker("local_only"):
        backends = ("local",)
    metafunc.parametrize("store_backend", list(backends), indirect=True, scope="module")


@pytest.fixture(scope="module")
def store_backend(request) -> str:
    """"local" or "s3" (parametrised by pytest_generate_tests)."""
    backend = getattr(request, "param", "local")
    if backend == "s3":
        request.getfixturevalue("s3_server")
    return backend


def _start_s3_server():
    from .s3server import SeaweedServer

    if "server" not in _S3:
        base = tempfile.mkdtemp(prefix="s3fuse-weed-", dir="/tmp")
        try:
            srv = SeaweedServer(base).start()
        except RuntimeError as exc:
            missing(f"the S3 tests need a SeaweedFS server: {exc}")
        os.environ.update(srv.env())  # the daemons and CLI find credentials the usual way
        srv.create_bucket(S3_TEST_BUCKET)
        _S3["server"] = srv
        _S3["base"] = base
        _S3["n"] = 0
    return _S3["server"]


@pytest.fixture(scope="session")
def s3_server():
    """The session's SeaweedFS (started on first use; stopped at session end, and by an
    atexit hook if the session dies)."""
    srv = _start_s3_server()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(_S3.get("base", ""), ignore_errors=True)
        _S3.clear()


def new_s3_url() -> str:
    _S3["n"] += 1
    return f"s3://{S3_TEST_BUCKET}/t{_S3['n']}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def init_s3_store(state_dir: Path, url: str | None = None, extra=()) -> Path:
    srv = _start_s3_server()
    url = url or new_s3_url()
    r = run_cli("init", url, "--endpoint-url", srv.endpoint, "--state-dir", state_dir, *extra)
    assert r.returncode == 0, f"s3fuse init {url} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert TRACEBACK not in r.stderr
    return Path(state_dir)


def store_config(store: Path) -> dict:
    import json

    return json.loads((Path(store) / "store.json").read_text())


def store_is_s3(store: Path) -> bool:
    p = Path(store) / "store.json"
    return p.exists() and store_config(store)["backend"].get("type") == "s3"


def s3_set_backend_options(store: Path, **options) -> None:
    """Change settings in the state directory's store.json backend section."""
    import json

    cfg = store_config(store)
    cfg["backend"].update(options)
    (Path(store) / "store.json").write_text(json.dumps(cfg, indent=2))


def s3_client():
    return _start_s3_server().client()


def s3_list_keys(store: Path, sub: str = "") -> dict[str, int]:
    """{key below PREFIX/: size} in the store's bucket prefix."""
    b = store_config(store)["backend"]
    prefix = f"{b['prefix']}/" if b["prefix"] else ""
    out = {}
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=b["bucket"], Prefix=prefix + sub):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = o["Size"]
    return out


def s3_list_objects(store: Path) -> set[str]:
    return {k[len("objects/"):] for k in s3_list_keys(store, "objects/")}


# --------------------------------------------------------------------------
# OpenBao (Transit KMS) test server - issue 5, Transit half
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bao(_session_base):
    """A real OpenBao dev server with the transit engine enabled, for the whole session.

    Started on first use, stopped (SIGTERM, then SIGKILL) at session end even when
    tests fail. Tests create their own transit keys (dev mode keeps nothing)."""
    from .baoserver import BaoServer

    server = BaoServer(_session_base / "openbao")
    try:
        try:
            server.start()
        except RuntimeError as exc:
            missing(f"the Transit tests need an OpenBao server: {exc}")
        server.setup_transit()
        yield server
    finally:
        server.stop()

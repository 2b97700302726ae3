"""The systemd service: the units verify, and the unit's own command line behaves as
systemd expects of a Type=notify service.

PID 1 is not systemd on the machines that run these tests, so the units are checked
with `systemd-analyze verify`, and the unit's ExecStart= is run here exactly as written
(instance name substituted, the configuration under the test's install root) with the
environment systemd would give it: NOTIFY_SOCKET (a datagram socket this test binds
and reads), WATCHDOG_USEC, JOURNAL_STREAM, CREDENTIALS_DIRECTORY.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, S3FUSE, TRACEBACK, init_store, wait_until

INSTALL = REPO / "scripts" / "install-service"
NAME = "svc"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0

# settings that put the service in a mount namespace of its own, where the FUSE mount
# would be invisible to the host (systemd.exec(5), PrivateMounts=); the unit must not use them
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
               "ProtectControlGroups", "ProtectProc", "ReadWritePaths", "ReadOnlyPaths",
               "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "MountFlags")


def _require_systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd; scripts/bootstrap --test does)")
    return path


def unit_directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _specifiers(text: str) -> str:
    return text.replace("%i", NAME).replace("%%", "%")


@pytest.fixture
def install(workdir):
    """scripts/install-service into a fresh root; returns (root, installed unit instance path)."""
    def run(*extra) -> Path:
        root = workdir("root")
        r = subprocess.run([str(INSTALL), NAME, "--root", str(root), *map(str, extra)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return root
    return run


class Service:
    """One run of the unit's ExecStart=, talking to us over its NOTIFY_SOCKET."""

    def __init__(self, root: Path, logdir: Path, env: dict[str, str], abstract: bool) -> None:
        unit = root / "etc/systemd/system/s3fuse@.service"
        d = unit_directives(unit)
        (exec_start,) = d["ExecStart"]
        self.argv = [_specifiers(a) for a in shlex.split(exec_start)]
        # the instance's configuration, under the install root instead of /
        self.argv = [str(root) + a if a.startswith("/etc/") else a for a in self.argv]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")}
        for assignment in d.get("Environment", []):
            for word in shlex.split(assignment):
                k, _, v = word.partition("=")
                self.env[k] = _specifiers(v)
        self.env.update(env, INVOCATION_ID="0" * 32)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"s3fuse-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.env["NOTIFY_SOCKET"] = "@" + name
        else:
            path = logdir / "notify.sock"
            self.sock.bind(str(path))
            self.env["NOTIFY_SOCKET"] = str(path)
        self.messages: list[dict[str, str]] = []
        self.stderr_path = logdir / f"stderr-{time.monotonic_ns()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        err = open(self.stderr_path, "wb")
        st = os.fstat(err.fileno())
        self.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True, cwd="/")
        err.close()
        return self

    def wait_for(self, key: str, value: str | None = None, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """The next notification that sets `key` (to `value`); fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.messages):
                if key in m and (value is None or m[key] == value):
                    del self.messages[: i + 1]
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}= notification within {timeout} s\n{self.stderr()}")
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the service exited with {self.proc.returncode} before {key}=\n"
                                         f"{self.stderr()}")
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.all.append(message)
            self.messages.append(message)

    all: list[dict[str, str]]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def services(workdir):
    made: list[Service] = []
    mounts: list[Path] = []

    def make(root: Path, mnt: Path, env: dict[str, str] | None = None, abstract: bool = False) -> Service:
        s = Service(root, workdir("svclog"), env or {}, abstract)
        s.all = []
        made.append(s)
        mounts.append(mnt)
        return s

    yield make
    for s in made:
        s.kill()
        s.sock.close()
    for mnt in mounts:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def write_config(root: Path, store: Path, mnt: Path, **extra: str) -> Path:
    cfg = root / "etc/s3fuse" / f"{NAME}.toml"
    text = f'[store]\npath = "{store}"\n'
    if "root_key_credential" in extra:
        text += f'root_key_credential = "{extra.pop("root_key_credential")}"\n'
    text += f'[mount]\nmountpoint = "{mnt}"\n'
    text += f'[audit]\npath = "{root}/var/log/s3fuse/{NAME}/audit.log"\n'
    cfg.write_text(text)
    return cfg


def is_dead_mount(p: Path) -> bool:
    try:
        os.statvfs(p)  # stat may be answered from the attribute cache
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


# ----------------------------------------------------------------------------------------------

def test_units_verify_and_a_broken_unit_does_not(install, workdir):
    analyze = _require_systemd_analyze()
    key = workdir("key") / "root.key"
    key.write_bytes(os.urandom(32))
    root = install("--root-key", key, "--plain-credential")
    units = root / "etc/systemd/system"
    dropin = units / f"s3fuse@{NAME}.service.d/root-key.conf"
    assert f"LoadCredential=root-key:/etc/credstore/s3fuse-{NAME}.root-key" in dropin.read_text()
    assert (root / f"etc/credstore/s3fuse-{NAME}.root-key").read_bytes() == key.read_bytes()
    assert oct((root / f"etc/credstore/s3fuse-{NAME}.root-key").stat().st_mode & 0o777) == "0o600"

    r = subprocess.run([analyze, "verify", str(units / f"s3fuse@{NAME}.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr

    # the same check fails on broken copies: verify is not vacuous here
    text = (units / "s3fuse@.service").read_text()
    for breakage, needle in ((("ExecStart=/", "ExecStart="), "nor an absolute path"),
                             (("NoNewPrivileges=", "NoNewPrivilege="), "Unknown key 'NoNewPrivilege'"),
                             (("Type=notify", "Type=notifying"), "Failed to parse service type")):
        broken = workdir("broken")
        (broken / "s3fuse@.service").write_text(text.replace(*breakage))
        r = subprocess.run([analyze, "verify", str(broken / f"s3fuse@{NAME}.service")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 or r.stderr.strip(), breakage
        assert needle in r.stderr, r.stderr

    d = unit_directives(units / "s3fuse@.service")
    assert d["Type"] == ["notify"] and d["LimitCORE"] == ["0"] and d["RestartPreventExitStatus"] == ["2"]
    assert d["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"] and d["NoNewPrivileges"] == ["yes"]
    assert d["DeviceAllow"] == ["/dev/fuse rw"] and d["DevicePolicy"] == ["closed"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert d["SystemCallArchitectures"] == ["native"]
    assert d["RuntimeDirectory"] == ["s3fuse"] and d["StateDirectory"] == ["s3fuse/%i"]
    assert d["LogsDirectory"] == ["s3fuse/%i"] and d["LogsDirectoryMode"] == ["0700"]
    assert not set(NAMESPACING) & set(d), "a mount namespace would hide the mount from the host"
    # and the installed example configuration is valid as installed
    from s3fuse import config
    cfg = config.load(str(root / f"etc/s3fuse/{NAME}.toml"))
    assert cfg.store == f"/var/lib/s3fuse/{NAME}" and cfg.root_key_credential == "root-key"


def test_notify_lifecycle_sigterm_flushes_and_data_survives(install, services, workdir):
    root = install()
    store = init_store(workdir("store") / "store")
    mnt = workdir("mnt")
    write_config(root, store, mnt)
    files = {f"f{i}": os.urandom(n) for i, n in enumerate((5 << 20, 100_000, 1))}

    s = services(root, mnt, {"WATCHDOG_USEC": "400000"}).start()
    ready = s.wait_for("READY", "1")
    # READY=1 means the mount answers now: no polling
    assert os.path.ismount(mnt) and os.listdir(mnt) == []
    assert ready["STATUS"].startswith(f"Mounted {store} on {mnt}") and "objects" in ready["STATUS"]
    assert "master key v1, next rotation " in ready["STATUS"], ready["STATUS"]
    for name, data in files.items():
        (mnt / name).write_bytes(data)  # left in the daemon's write buffers
    for _ in range(3):
        s.wait_for("WATCHDOG", "1", timeout=10)

    os.kill(s.proc.pid, signal.SIGTERM)
    stopping = s.wait_for("STOPPING", "1", timeout=STOP_TIMEOUT)
    assert stopping["STATUS"].startswith("Stopping: flushing")
    assert s.proc.wait(timeout=STOP_TIMEOUT) == 0
    assert s.wait_for("STATUS", timeout=5)["STATUS"].startswith("Stopped: all data")
    assert not os.path.ismount(mnt)
    log = s.stderr()
    assert TRACEBACK not in log
    lines = log.strip().splitlines()
    # journal format: a syslog priority, no timestamp, one line per event
    assert lines and all(line[:3] in ("<6>", "<5>", "<4>", "<7>") for line in lines), log
    assert not any(line[3:5] == "20" for line in lines), log
    assert "<6>s3fuse.daemon: received SIGTERM: flushing and unmounting" in lines

    s2 = services(root, mnt, abstract=True).start()  # an abstract NOTIFY_SOCKET ('@name') this time
    s2.wait_for("READY", "1")
    for name, data in files.items():  # read at once: READY=1 came after the mount served
        assert hashlib.sha256((mnt / name).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert s2.terminate() == 0
    assert not any("WATCHDOG" in m for m in s2.all)  # no WATCHDOG_USEC, no pings
    assert TRACEBACK not in s2.stderr()


def test_dead_mount_is_cleared_at_start_live_and_foreign_mounts_are_not(install, services, workdir):
    root = install()
    store = init_store(workdir("store") / "store")
    mnt = workdir("mnt")
    write_config(root, store, mnt)
    s = services(root, mnt).start()
    s.wait_for("READY", "1")
    data = os.urandom(300_000)
    with open(mnt / "kept", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())

    # a second service on a live mount point: refused, and the live mount is untouched
    other_root = install()
    write_config(other_root, init_store(workdir("store") / "store"), mnt)
    busy = services(other_root, mnt).start()
    assert busy.proc.wait(timeout=START_TIMEOUT) == 1
    assert "already a mount point" in busy.stderr() and busy.stderr().startswith("<3>s3fuse: ")
    assert (mnt / "kept").read_bytes() == data

    s.kill()  # kill -9: the mount stays behind, dead
    assert is_dead_mount(mnt)
    again = services(root, mnt).start()  # what Restart=on-failure does
    again.wait_for("READY", "1")
    assert (mnt / "kept").read_bytes() == data
    assert "removed the dead s3fuse mount" in again.stderr()
    assert again.terminate() == 0
    assert not os.path.ismount(mnt) and not is_dead_mount(mnt)

    # another filesystem on the mount point is never unmounted
    foreign = workdir("foreign")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "s3fuse-test-tmpfs", str(foreign)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs for the test: {r.stderr}"
    try:
        write_config(root, store, foreign)
        refused = services(root, foreign).start()
        assert refused.proc.wait(timeout=START_TIMEOUT) == 1
        assert "already a mount point" in refused.stderr()
        assert os.path.ismount(foreign)
    finally:
        subprocess.run(["umount", str(foreign)], capture_output=True)


def test_root_key_from_a_systemd_credential(install, services, workdir):
    root = install()
    store = init_store(workdir("store") / "store")
    mnt = workdir("mnt")
    creds = workdir("credentials")
    os.chmod(creds, 0o700)
    # the key leaves the store: only the credential has it
    os.rename(store / "root.key", creds / "root-key")
    write_config(root, store, mnt, root_key_credential="root-key")

    s = services(root, mnt, {"CREDENTIALS_DIRECTORY": str(creds)}).start()
    s.wait_for("READY", "1")
    (mnt / "secret").write_bytes(b"sealed by a key from the credential\n")
    assert s.terminate() == 0

    missing = services(root, mnt).start()  # no $CREDENTIALS_DIRECTORY
    assert missing.proc.wait(timeout=START_TIMEOUT) == 1
    err = missing.stderr().strip().splitlines()
    assert err[-1].startswith("<3>s3fuse: ") and "credential 'root-key'" in err[-1]
    assert "CREDENTIALS_DIRECTORY" in err[-1]

    wrong = workdir("wrongcreds")
    (wrong / "root-key").write_bytes(os.urandom(32))
    bad = services(root, mnt, {"CREDENTIALS_DIRECTORY": str(wrong)}).start()
    assert bad.proc.wait(timeout=START_TIMEOUT) == 1
    assert TRACEBACK not in bad.stderr() and bad.stderr().strip().splitlines()[-1].startswith("<3>s3fuse: ")
    assert not os.path.ismount(mnt)

    s = services(root, mnt, {"CREDENTIALS_DIRECTORY": str(creds)}).start()
    s.wait_for("READY", "1")
    assert (mnt / "secret").read_bytes() == b"sealed by a key from the credential\n"
    assert s.terminate() == 0
    wait_until(lambda: not os.path.ismount(mnt), 10, "the mount to go")


def test_store_whose_root_key_source_is_a_credential(install, services, workdir):
    """A store created with `init --root-key credential:root-key` (store.json names the
    credential) mounts under the unit with no root-key setting in its configuration."""
    root = install()
    creds = workdir("credentials")
    os.chmod(creds, 0o700)
    (creds / "root-key").write_bytes(os.urandom(32))
    store = workdir("store") / "store"
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(creds))
    r = subprocess.run([*S3FUSE, "init", str(store), "--root-key", "credential:root-key"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (store / "root.key").exists()
    mnt = workdir("mnt")
    write_config(root, store, mnt)
    s = services(root, mnt, {"CREDENTIALS_DIRECTORY": str(creds)}).start()
    s.wait_for("READY", "1")
    (mnt / "f").write_bytes(b"credential store\n")
    assert s.terminate() == 0
    s = services(root, mnt, {"CREDENTIALS_DIRECTORY": str(creds)}).start()
    s.wait_for("READY", "1")
    assert (mnt / "f").read_bytes() == b"credential store\n"
    assert s.terminate() == 0


# -- the pure parts -------------------------------------------------------------------------------

def test_notify_protocol_encoding():
    from s3fuse import notify

    assert notify.socket_address("@s3fuse/notify") == b"\0s3fuse/notify"
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify.socket_address("vsock:2:1234") is None
    assert notify.encode(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b\n"
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert notify.watchdog_interval({}, 42) is None
    assert notify.Notifier(None).enabled is False
    notify.Notifier(None).ready("nothing happens without a manager")


def test_journal_format_is_one_line_with_a_priority():
    import logging
    import sys

    from s3fuse.cli import JournalFormatter

    try:
        raise ValueError("bad\nthing")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("s3fuse.daemon", logging.ERROR, __file__, 1, "final flush failed", (), exc_info)
    line = JournalFormatter(tracebacks=False).format(record)
    assert line == "<3>s3fuse.daemon: final flush failed: ValueError: bad thing"
    folded = JournalFormatter(tracebacks=True).format(record)
    assert "\n" not in folded and folded.startswith(line) and "Traceback" in folded
    record = logging.LogRecord("s3fuse", logging.WARNING, __file__, 1, "w %d", (1,), None)
    assert JournalFormatter(tracebacks=False).format(record) == "<4>s3fuse: w 1"

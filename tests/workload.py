"""A mixed workload against a mounted s3fuse, with a model of what was acknowledged.

Shared by tests/test_faults.py (a few kill -9 cycles in CI) and scripts/soak (many cycles,
and the long concurrent load). Pure Python on real syscalls; no s3fuse imports.

The model: for every name, the content a completed fsync acknowledged (or that it is absent,
after an unlink or rename followed by fsync of the directory), plus every content written
since without an fsync (and the operation in flight when the daemon was killed). After a
crash a name must hold its acknowledged content if nothing touched it since, and otherwise
a prefix of one of its candidate contents (an interrupted write leaves a prefix), or be absent
when that was possible: never bytes that were not written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
from dataclasses import dataclass, field

ABSENT = None


@dataclass
class NameState:
    acked: bytes | None = ABSENT  # content an fsync acknowledged (ABSENT: acknowledged absent)
    since: list = field(default_factory=list)  # contents (or ABSENT) possible since the ack


class Model:
    def __init__(self) -> None:
        self.names: dict[str, NameState] = {}
        self.current: dict[str, bytes | None] = {}  # after every completed operation (no crash)
        self.lock = threading.Lock()

    def state(self, name: str) -> NameState:
        return self.names.setdefault(name, NameState())

    def maybe(self, name: str, content: bytes | None) -> None:
        with self.lock:
            self.state(name).since.append(content)

    def ack(self, name: str, content: bytes | None) -> None:
        with self.lock:
            st = self.state(name)
            st.acked, st.since = content, []
            self.current[name] = content

    def done(self, name: str, content: bytes | None) -> None:
        """An operation without fsync completed: what a reader sees now (no crash since)."""
        with self.lock:
            self.current[name] = content

    def expected_digests(self) -> dict[str, str | None]:
        """name -> sha256 hex of its current content (None: absent), for an exact check."""
        with self.lock:
            return {n: None if c is None else hashlib.sha256(c).hexdigest() for n, c in self.current.items()}

    def check(self, root: str) -> list[str]:
        """Problems found on the (remounted) tree; an empty list means consistent."""
        problems = []
        present = set(os.listdir(root))
        with self.lock:
            for name, st in sorted(self.names.items()):
                path = os.path.join(root, name)
                if name not in present:
                    if st.acked is not ABSENT and ABSENT not in st.since:
                        problems.append(f"{name}: missing, but {len(st.acked)} bytes were fsynced")
                    continue
                with open(path, "rb") as f:
                    got = f.read()
                if not st.since:
                    if st.acked is ABSENT:
                        problems.append(f"{name}: exists ({len(got)} bytes) but its removal was fsynced")
                    elif got != st.acked:
                        problems.append(f"{name}: {len(got)} bytes differ from the {len(st.acked)} fsynced")
                    continue
                candidates = [c for c in [st.acked, *st.since] if c is not ABSENT]
                if not any(c.startswith(got) for c in candidates):
                    problems.append(f"{name}: {len(got)} bytes are no prefix of anything written "
                                    f"(sha256 {hashlib.sha256(got).hexdigest()[:16]})")
            for name in present - set(self.names):
                problems.append(f"{name}: exists but was never created")
        return problems

    def settle(self, root: str) -> None:
        """After a check: what is on disk now is what is acknowledged (for the next cycle)."""
        present = set(os.listdir(root))
        with self.lock:
            for name in list(self.names):
                if name in present:
                    with open(os.path.join(root, name), "rb") as f:
                        self.names[name] = NameState(f.read(), [])
                else:
                    self.names[name] = NameState(ABSENT, [])
                self.current[name] = self.names[name].acked


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DEAD = (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV)


class Worker:
    """Random operations on names NAMES_PREFIX0..N in one directory, recorded in `model`.

    Stops at the first error that means the daemon is gone (ENOTCONN); any other error is
    counted in `errors` (which must stay empty)."""

    def __init__(self, root: str, model: Model, seed: int, names: int = 12, prefix: str = "f",
                 max_size: int = 600_000) -> None:
        self.root, self.model, self.rng = root, model, random.Random(seed)
        self.names = [f"{prefix}{i}" for i in range(names)]
        self.max_size = max_size
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        # set by the harness just before it kills the daemon: from then on any error (ENOTCONN,
        # ECONNABORTED, or EIO for a page the kernel could no longer read) means "killed"
        self.killed = threading.Event()
        self.dead = False

    def _content(self) -> bytes:
        n = self.rng.choice([0, 1, 100, 5000, 70_000, self.rng.randrange(1, self.max_size)])
        return self.rng.randbytes(n)

    def run(self) -> None:
        while not self.stop.is_set():
            op = self.rng.choice(["put_sync", "put_sync", "put", "append", "unlink_sync", "rename_sync", "read"])
            try:
                getattr(self, op)()
                self.ops[op] = self.ops.get(op, 0) + 1
            except OSError as exc:
                if exc.errno in DEAD or self.killed.is_set():
                    self.dead = True
                    return
                self.errors.append(f"{op}: {exc}")
                if len(self.errors) > 20:
                    return

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def put_sync(self) -> None:
        name, data = self.rng.choice(self.names), self._content()
        self.model.maybe(name, data)
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            self.model.done(name, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_path(self.root)  # the name too, if it is new
        self.model.ack(name, data)

    def put(self) -> None:
        name, data = self.rng.choice(self.names), self._content()
        self.model.maybe(name, data)
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        self.model.done(name, data)

    def append(self) -> None:
        name = self.rng.choice(self.names)
        try:
            with open(self._path(name), "rb") as f:
                old = f.read()
        except FileNotFoundError:
            return
        extra = self.rng.randbytes(self.rng.randrange(1, 50_000))
        self.model.maybe(name, old + extra)
        fd = os.open(self._path(name), os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(fd, extra)
        finally:
            os.close(fd)
        self.model.done(name, old + extra)

    def unlink_sync(self) -> None:
        name = self.rng.choice(self.names)
        self.model.maybe(name, ABSENT)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        _fsync_path(self.root)
        self.model.ack(name, ABSENT)

    def rename_sync(self) -> None:
        src, dst = self.rng.sample(self.names, 2)
        try:
            with open(self._path(src), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        # fsync the source first, so that the moved content is acknowledged
        _fsync_path(self._path(src))
        self.model.ack(src, data)
        self.model.maybe(src, ABSENT)
        self.model.maybe(dst, data)
        os.rename(self._path(src), self._path(dst))
        _fsync_path(self.root)
        self.model.ack(src, ABSENT)
        self.model.ack(dst, data)

    def read(self) -> None:
        """Reads what the model says is there (the names are this worker's alone)."""
        name = self.rng.choice(self.names)
        expected = self.model.current.get(name)
        try:
            with open(self._path(name), "rb") as f:
                got = f.read()
        except FileNotFoundError:
            got = None
        if name in self.model.current and got != expected:
            self.errors.append(f"read {name}: {None if got is None else len(got)} bytes, expected "
                               f"{None if expected is None else len(expected)} (content differs)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

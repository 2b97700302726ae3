"""Randomized differential test: the same seeded sequence of operations is applied
to the mount and to a plain ext4 directory; every result (value or errno) and
the final trees must match, also after an unmount and remount.

Reproduce a failure with ``S3FUSE_TEST_SEED=<seed> scripts/test tests/test_differential.py``
(the seed is in every assertion message).  ``S3FUSE_DIFF_OPS`` sets the number of
operations (default 3000).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
from pathlib import Path

# every test here runs on the local and the S3 backend (conftest.py, "S3 backend")
BACKENDS = ("local", "s3")

MiB = 1 << 20
BLOCK = 4 * MiB
NAMES = ["a", "b", "c", "d", "e"]
XATTR_NAMES = ["user.one", "user.two", "user.three"]
MODES = [0o644, 0o600, 0o755, 0o700, 0o4755, 0o1777, 0o640]
MAX_FDS = 4

# POSIX lets rename/rmdir of a non-empty directory fail with either errno.
_EQUIV = {errno.EEXIST: errno.ENOTEMPTY}


def _res(fn):
    try:
        return ("ok", fn())
    except OSError as e:
        code = e.errno
        if code in _EQUIV and fn.__name__ in ("rename", "rmdir"):
            code = _EQUIV[code]
        return ("err", errno.errorcode.get(code, code))


class Side:
    def __init__(self, root: Path):
        self.root = str(root)
        self.fds: dict[int, int] = {}

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def close_all(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def apply(side: Side, op: tuple):
    """Apply one operation; returns ("ok", value) or ("err", ERRNO)."""
    kind = op[0]
    P = side.p
    if kind == "write":
        _, rel, off, data = op

        def write():
            fd = os.open(P(rel), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        return _res(write)
    if kind == "truncate":
        _, rel, size = op

        def truncate():
            os.truncate(P(rel), size)
        return _res(truncate)
    if kind == "rename":
        _, a, b = op

        def rename():
            os.rename(P(a), P(b))
        return _res(rename)
    if kind == "link":
        _, a, b = op

        def link():
            os.link(P(a), P(b))
        return _res(link)
    if kind == "symlink":
        _, target, b = op

        def symlink():
            os.symlink(target, P(b))
        return _res(symlink)
    if kind == "unlink":
        def unlink():
            os.unlink(P(op[1]))
        return _res(unlink)
    if kind == "mkdir":
        def mkdir():
            os.mkdir(P(op[1]), 0o755)
        return _res(mkdir)
    if kind == "rmdir":
        def rmdir():
            os.rmdir(P(op[1]))
        return _res(rmdir)
    if kind == "chmod":
        def chmod():
            os.chmod(P(op[1]), op[2])
        return _res(chmod)
    if kind == "setxattr":
        _, rel, name, value, flags = op

        def setxattr():
            os.setxattr(P(rel), name, value, flags)
        return _res(setxattr)
    if kind == "removexattr":
        def removexattr():
            os.removexattr(P(op[1]), op[2])
        return _res(removexattr)
    if kind == "getxattrs":
        def getxattrs():
            return sorted((a, os.getxattr(P(op[1]), a)) for a in os.listxattr(P(op[1]))
                          if a.startswith("user."))
        return _res(getxattrs)
    if kind == "read":
        _, rel, off, ln = op

        def read():
            fd = os.open(P(rel), os.O_RDONLY)
            try:
                return hashlib.sha256(os.pread(fd, ln, off)).hexdigest()
            finally:
                os.close(fd)
        return _res(read)
    if kind == "stat":
        def stat_():
            st = os.lstat(P(op[1]))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            return (st.st_mode, size, nlink)
        return _res(stat_)
    if kind == "listdir":
        def listdir():
            return sorted(os.listdir(P(op[1])))
        return _res(listdir)
    if kind == "open":
        _, h, rel, flags = op

        def open_():
            side.fds[h] = os.open(P(rel), flags, 0o644)
        return _res(open_)
    if kind == "fdwrite":
        _, h, off, data = op

        def fdwrite():
            return os.pwrite(side.fds[h], data, off)
        return _res(fdwrite)
    if kind == "fdread":
        _, h, off, ln = op

        def fdread():
            return hashlib.sha256(os.pread(side.fds[h], ln, off)).hexdigest()
        return _res(fdread)
    if kind == "fdtruncate":
        _, h, size = op

        def fdtruncate():
            os.ftruncate(side.fds[h], size)
        return _res(fdtruncate)
    if kind == "fdstat":
        def fdstat():
            st = os.fstat(side.fds[op[1]])
            return (st.st_mode, st.st_size, st.st_nlink)
        return _res(fdstat)
    if kind == "close":
        def close():
            os.close(side.fds.pop(op[1]))
        return _res(close)
    raise AssertionError(f"unknown op {kind}")


def walk(root: str) -> tuple[list[str], list[str], list[str]]:
    """(all entries, directories, non-directories), relative to root."""
    entries, dirs, others = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            entries.append(rel)
            if os.path.isdir(os.path.join(dirpath, n)) and not os.path.islink(
                    os.path.join(dirpath, n)):
                dirs.append(rel)
            else:
                others.append(rel)
    return sorted(entries), sorted(dirs), sorted(others)


def tree_state(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            e = {"fmt": stat.S_IFMT(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            else:
                e["mode"] = stat.S_IMODE(st.st_mode)
                e["xattrs"] = sorted((a, os.getxattr(p, a)) for a in os.listxattr(p)
                                     if a.startswith("user."))
            if stat.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                e["nlink"] = st.st_nlink
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                e["sha256"] = h.hexdigest()
            out[rel] = e
    return out


class Generator:
    def __init__(self, seed: int):
        self.rnd = random.Random(seed)
        self.next_handle = 0

    def new_path(self, dirs: list[str]) -> str:
        r = self.rnd
        parent = r.choice([""] + dirs) if dirs and r.random() < 0.7 else ""
        if r.random() < 0.05:
            parent = os.path.join(r.choice(NAMES), r.choice(NAMES))  # maybe missing parent
        return os.path.join(parent, r.choice(NAMES)) if parent else r.choice(NAMES)

    def any_path(self, entries, dirs):
        if entries and self.rnd.random() < 0.85:
            return self.rnd.choice(entries)
        return self.new_path(dirs)

    def offset(self) -> int:
        r = self.rnd.random()
        if r < 0.7:
            return self.rnd.randrange(0, 200_000)
        if r < 0.9:
            return max(0, BLOCK + self.rnd.randrange(-100_000, 100_000))
        return self.rnd.randrange(0, 9 * MiB)

    def data(self) -> bytes:
        n = self.rnd.choice([1, 100, 4096, 65536, self.rnd.randrange(1, 150_000)])
        if self.rnd.random() < 0.1:
            return bytes(n)  # zeros
        return self.rnd.randbytes(n)

    def size(self) -> int:
        return self.rnd.choice([0, 1, 4095, 65536, BLOCK, BLOCK + 1, self.offset()])

    def op(self, ref_root: str, handles: list[int]) -> tuple:
        r = self.rnd
        entries, dirs, others = walk(ref_root)
        files = [e for e in others if os.path.isfile(os.path.join(ref_root, e))]
        x = r.random()
        if x < 0.22:
            tgt = r.choice(files) if files and r.random() < 0.7 else self.any_path(entries, dirs)
            return ("write", tgt, self.offset(), self.data())
        if x < 0.27:
            tgt = r.choice(files) if files and r.random() < 0.8 else self.any_path(entries, dirs)
            return ("truncate", tgt, self.size())
        if x < 0.37:
            return ("rename", self.any_path(entries, dirs),
                    self.any_path(entries, dirs) if r.random() < 0.4 else self.new_path(dirs))
        if x < 0.42:
            return ("link", self.any_path(entries, dirs), self.new_path(dirs))
        if x < 0.45:
            target = "/".join(r.choice(NAMES) for _ in range(r.randrange(1, 3)))
            return ("symlink", target, self.new_path(dirs))
        if x < 0.51:
            return ("unlink", self.any_path(entries, dirs))
        if x < 0.58:
            return ("mkdir", self.new_path(dirs))
        if x < 0.62:
            return ("rmdir", r.choice(dirs) if dirs and r.random() < 0.8 else self.new_path(dirs))
        if x < 0.64:
            return ("chmod", self.any_path(entries, dirs), r.choice(MODES))
        if x < 0.69:
            flags = r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            return ("setxattr", self.any_path(entries, dirs), r.choice(XATTR_NAMES),
                    r.randbytes(r.randrange(0, 300)), flags)
        if x < 0.71:
            return ("removexattr", self.any_path(entries, dirs), r.choice(XATTR_NAMES))
        if x < 0.72:
            return ("getxattrs", self.any_path(entries, dirs))
        if x < 0.77:
            tgt = r.choice(files) if files and r.random() < 0.9 else self.any_path(entries, dirs)
            return ("read", tgt, self.offset(), r.randrange(0, 300_000))
        if x < 0.80:
            return ("stat", self.any_path(entries, dirs))
        if x < 0.81:
            return ("listdir", r.choice([""] + dirs))
        # operations on open file descriptors
        if x < 0.85 or not handles:
            if len(handles) >= MAX_FDS:
                return ("close", r.choice(handles))
            self.next_handle += 1
            flags = r.choice([os.O_RDWR, os.O_RDWR | os.O_CREAT, os.O_RDWR | os.O_APPEND,
                              os.O_RDWR | os.O_CREAT | os.O_TRUNC])
            tgt = r.choice(files) if files and r.random() < 0.8 else self.new_path(dirs)
            return ("open", self.next_handle, tgt, flags)
        h = r.choice(handles)
        y = r.random()
        if y < 0.45:
            return ("fdwrite", h, self.offset(), self.data())
        if y < 0.7:
            return ("fdread", h, self.offset(), r.randrange(0, 300_000))
        if y < 0.8:
            return ("fdtruncate", h, self.size())
        if y < 0.9:
            return ("fdstat", h)
        return ("close", h)


def describe(op: tuple) -> str:
    parts = []
    for a in op:
        if isinstance(a, bytes):
            parts.append(f"<{len(a)} bytes>")
        else:
            parts.append(repr(a))
    return "(" + ", ".join(parts) + ")"


def compare_trees(ref: Side, fs: Side, seed: int, when: str) -> None:
    a = tree_state(ref.root)
    b = tree_state(fs.root)
    if a == b:
        return
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    diffs = [f"  {k}: ext4 {a[k]} / s3fuse {b[k]}" for k in sorted(set(a) & set(b))
             if a[k] != b[k]]
    raise AssertionError(
        f"seed={seed}: trees differ {when}: missing on s3fuse {missing[:10]}, "
        f"extra on s3fuse {extra[:10]}\n" + "\n".join(diffs[:10]))


def test_differential(mounted, workdir):
    seed = int(os.environ.get("S3FUSE_TEST_SEED") or random.SystemRandom().randrange(2**32))
    n_ops = int(os.environ.get("S3FUSE_DIFF_OPS", "3000"))
    print(f"differential seed={seed} ops={n_ops}")
    ref = Side(workdir("ref"))
    fs_root = mounted.mnt / "t"
    os.mkdir(fs_root)
    fs = Side(fs_root)
    gen = Generator(seed)
    history: list[str] = []
    try:
        for i in range(n_ops):
            op = gen.op(ref.root, sorted(ref.fds))
            r_ref = apply(ref, op)
            r_fs = apply(fs, op)
            history.append(f"{i}: {describe(op)} -> {r_ref}")
            if r_ref != r_fs:
                raise AssertionError(
                    f"seed={seed}: op {i} {describe(op)}: ext4 gave {r_ref}, s3fuse gave {r_fs}\n"
                    f"last operations:\n" + "\n".join(history[-25:]))
            # keep both sides' fd tables in step even when an open failed on both
            assert sorted(ref.fds) == sorted(fs.fds), f"seed={seed}: fd tables diverged at op {i}"
            if i % 750 == 749:
                compare_trees(ref, fs, seed, f"after op {i}")
        compare_trees(ref, fs, seed, f"after all {n_ops} ops (with {len(ref.fds)} fds open)")
    finally:
        ref.close_all()
        fs.close_all()
    compare_trees(ref, fs, seed, "after closing all fds")
    mounted.remount()
    compare_trees(ref, fs, seed, "after unmount and remount")

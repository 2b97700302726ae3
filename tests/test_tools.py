"""Real tools (cp -a, tar, rsync -a, git) copy trees into the mount faithfully,
also across an unmount and remount."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

# every test here runs on the local and the S3 backend (conftest.py, "S3 backend")
BACKENDS = ("local", "s3")

MiB = 1 << 20


def sh(*argv, cwd=None, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stderr}"
    return r


def make_source_tree(root: Path) -> None:
    """A tree with every kind of entry the tools handle, built on ext4."""
    rnd = random.Random(11)
    root.mkdir()
    sizes = [0, 1, 100, 4095, 4096, 65535, 65536, 65537, 1 * MiB + 3, 4 * MiB, 4 * MiB + 1,
             9 * MiB + 123]
    (root / "data").mkdir()
    for i, n in enumerate(sizes):
        (root / "data" / f"file-{i:02d}-{n}").write_bytes(rnd.randbytes(n))
    # a sparse file and a file of zeros
    with open(root / "data" / "sparse", "wb") as f:
        f.seek(20 * MiB)
        f.write(b"end of sparse file")
    (root / "data" / "zeros").write_bytes(bytes(5 * MiB))
    # deep and wide directories
    p = root
    for i in range(12):
        p = p / f"level{i}"
        p.mkdir()
        (p / "f.txt").write_text(f"level {i}\n" * (i + 1))
    wide = root / "wide"
    wide.mkdir()
    for i in range(500):
        (wide / f"w{i:04d}").write_bytes(rnd.randbytes(rnd.randrange(0, 3000)))
    (root / "empty-dir").mkdir()
    (root / "names").mkdir()
    for n in ["with space", "ünïcödé", "new\nline", "a" * 255, ".hidden", "-dash", "x:y"]:
        (root / "names" / n).write_text(n)
    # modes
    (root / "modes").mkdir()
    for mode in (0o600, 0o640, 0o644, 0o700, 0o755, 0o4755, 0o2755, 0o444, 0o000):
        f = root / "modes" / f"m{mode:04o}"
        f.write_text(oct(mode))
        os.chmod(f, mode)
    d = root / "modes" / "dir0750"
    d.mkdir()
    os.chmod(d, 0o750)
    d = root / "modes" / "sticky"
    d.mkdir()
    os.chmod(d, 0o1777)
    # owners
    (root / "owners").mkdir()
    for uid, gid in ((1000, 1000), (1234, 5678), (0, 42)):
        f = root / "owners" / f"o{uid}-{gid}"
        f.write_text("owned")
        os.chown(f, uid, gid)
    # symlinks (relative, absolute, dangling, to dir)
    (root / "links").mkdir()
    os.symlink("../data/file-02-100", root / "links" / "rel")
    os.symlink("/etc/hostname", root / "links" / "abs")
    os.symlink("nowhere/at/all", root / "links" / "dangling")
    os.symlink("../level0", root / "links" / "todir")
    # hard links
    (root / "hard").mkdir()
    (root / "hard" / "one").write_bytes(b"hard linked content")
    os.link(root / "hard" / "one", root / "hard" / "two")
    # a fifo
    os.mkfifo(root / "fifo")
    # user xattrs
    os.setxattr(root / "data" / "file-02-100", "user.color", b"blue")
    os.setxattr(root / "level0", "user.dir", b"yes")
    # fixed timestamps (with nanoseconds) on everything, children before parents
    t = 1_500_000_000
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            entries.append(Path(dirpath) / n)
    entries.sort(key=lambda q: -len(q.parts))
    for i, q in enumerate(entries + [root]):
        ns = (t + i * 7919) * 10**9 + (i * 104729) % 10**9
        os.utime(q, ns=(ns, ns), follow_symlinks=False)


def snapshot(root: Path, *, mtimes=True, owners=True, xattrs=False, dir_mtimes=True,
             symlink_mtimes=True, skip=()) -> dict:
    """Everything about a tree that the tools are meant to preserve."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for n in sorted(dirnames + filenames):
            if n in skip:
                continue
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            e = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode))}
            if owners:
                e["owner"] = (st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                e["sha256"] = h.hexdigest()
                e["nlink"] = st.st_nlink
                if mtimes:
                    e["mtime"] = st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
                del e["mode"]
                if mtimes and symlink_mtimes:
                    e["mtime"] = st.st_mtime_ns
            elif stat.S_ISDIR(st.st_mode):
                if mtimes and dir_mtimes:
                    e["mtime"] = st.st_mtime_ns
            elif mtimes:
                e["mtime"] = st.st_mtime_ns
            if xattrs and not stat.S_ISLNK(st.st_mode):
                e["xattrs"] = {a: os.getxattr(p, a) for a in sorted(os.listxattr(p))
                               if a.startswith("user.")}
            out[rel] = e
    return out


def assert_same_tree(expected: dict, actual: dict, what: str) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"{what}: missing {missing[:10]}, extra {extra[:10]}"
    diffs = []
    for k in sorted(expected):
        if expected[k] != actual[k]:
            fields = sorted(set(expected[k]) | set(actual[k]))
            d = {f: (expected[k].get(f), actual[k].get(f)) for f in fields
                 if expected[k].get(f) != actual[k].get(f)}
            diffs.append(f"  {k!r}: (expected, actual) {d}")
    assert not diffs, f"{what}: {len(diffs)} entries differ:\n" + "\n".join(diffs[:15])


@pytest.fixture(scope="module")
def source_tree(module_mount_factory):
    base = module_mount_factory.dirs("src")
    make_source_tree(base / "tree")
    return base / "tree"


def test_cp_a(mounted, source_tree):
    dst = mounted.mnt / "copy"
    sh("cp", "-a", source_tree, dst)
    expected = snapshot(source_tree, xattrs=True)
    assert_same_tree(expected, snapshot(dst, xattrs=True), "cp -a")
    mounted.remount()
    assert_same_tree(expected, snapshot(dst, xattrs=True), "cp -a, after remount")
    # and back out again
    back = mounted.store.parent / "back"
    sh("cp", "-a", dst, back)
    assert_same_tree(expected, snapshot(back, xattrs=True), "cp -a out of the mount")


def test_tar_extract(mounted, source_tree, workdir):
    archive = workdir("tar") / "tree.tar"
    sh("tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", "-cf", archive,
       "-C", source_tree.parent, source_tree.name)
    dst = mounted.mnt / "untar"
    dst.mkdir()
    sh("tar", "--xattrs", "--xattrs-include=user.*", "-xpf", archive, "-C", dst)
    expected = snapshot(source_tree, xattrs=True, symlink_mtimes=False)
    got = dst / source_tree.name
    assert_same_tree(expected, snapshot(got, xattrs=True, symlink_mtimes=False), "tar x")
    mounted.remount()
    assert_same_tree(expected, snapshot(got, xattrs=True, symlink_mtimes=False),
                     "tar x, after remount")
    # archive the tree from the mount and extract it on ext4: the same tree again
    out = workdir("tar")
    sh("tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", "-cf", out / "again.tar",
       "-C", dst, source_tree.name)
    sh("tar", "--xattrs", "--xattrs-include=user.*", "-xpf", out / "again.tar", "-C", out)
    assert_same_tree(expected, snapshot(out / source_tree.name, xattrs=True,
                                        symlink_mtimes=False), "tar c from the mount")


def test_rsync_a(mounted, source_tree):
    dst = mounted.mnt / "rsynced"
    sh("rsync", "-aHX", f"{source_tree}/", f"{dst}/")
    expected = snapshot(source_tree, xattrs=True)
    assert_same_tree(expected, snapshot(dst, xattrs=True), "rsync -aHX")
    # a second run has nothing to transfer
    r = sh("rsync", "-aHXi", f"{source_tree}/", f"{dst}/")
    assert r.stdout.strip() == "", f"second rsync run still changed things:\n{r.stdout[:2000]}"
    # rsync -a with in-place updates and deletions
    (dst / "data" / "file-05-65535").write_bytes(b"changed")
    (dst / "extra-file").write_text("delete me")
    sh("rsync", "-aHX", "--delete", f"{source_tree}/", f"{dst}/")
    assert_same_tree(expected, snapshot(dst, xattrs=True), "rsync -aHX --delete")
    mounted.remount()
    assert_same_tree(expected, snapshot(dst, xattrs=True), "rsync -aHX, after remount")
    # rsync out of the mount with checksums finds nothing different
    r = sh("rsync", "-aHXci", "--dry-run", f"{dst}/", f"{source_tree}/")
    assert r.stdout.strip() == "", r.stdout[:2000]


def _git_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
    })
    return env


def test_git_clone(mounted, workdir):
    home = workdir("home")
    env = _git_env(home)
    sh("git", "config", "--global", "init.defaultBranch", "main", env=env)
    sh("git", "config", "--global", "safe.directory", "*", env=env)
    repo = workdir("repo") / "r"
    sh("git", "init", "-q", repo, env=env)
    rnd = random.Random(12)
    for c in range(6):
        for i in range(8):
            f = repo / f"dir{i % 3}" / f"file{i}.txt"
            f.parent.mkdir(exist_ok=True)
            f.write_text(f"commit {c} file {i}\n" + rnd.randbytes(200 * i).hex())
        (repo / "bin.dat").write_bytes(rnd.randbytes(300_000))
        if c == 2:
            os.symlink("dir0/file0.txt", repo / "link")
            (repo / "exe.sh").write_text("#!/bin/sh\necho hi\n")
            os.chmod(repo / "exe.sh", 0o755)
        if c == 4:
            os.unlink(repo / "dir1" / "file1.txt")
        sh("git", "-C", repo, "add", "-A", env=env)
        sh("git", "-C", repo, "commit", "-q", "-m", f"commit {c}", env=env)
    sh("git", "-C", repo, "tag", "v1", env=env)
    sh("git", "-C", repo, "gc", "-q", env=env)  # a pack file
    (repo / "dir0" / "file9.txt").write_text("loose object\n")
    sh("git", "-C", repo, "add", "-A", env=env)
    sh("git", "-C", repo, "commit", "-q", "-m", "loose", env=env)

    ref = workdir("ref") / "clone"
    sh("git", "clone", "-q", "--no-hardlinks", repo, ref, env=env)
    dst = mounted.mnt / "clone"
    sh("git", "clone", "-q", "--no-hardlinks", repo, dst, env=env)

    def check(what):
        expected = snapshot(ref, mtimes=False, owners=False, skip={".git"})
        assert_same_tree(expected, snapshot(dst, mtimes=False, owners=False, skip={".git"}), what)
        sh("git", "-C", dst, "fsck", "--full", "--strict", env=env)
        assert sh("git", "-C", dst, "status", "--porcelain", env=env).stdout == ""
        assert sh("git", "-C", dst, "log", "--format=%H %s", env=env).stdout == \
            sh("git", "-C", ref, "log", "--format=%H %s", env=env).stdout
        assert sh("git", "-C", dst, "rev-parse", "v1", env=env).stdout == \
            sh("git", "-C", ref, "rev-parse", "v1", env=env).stdout

    check("git clone")
    # work inside the mount: commit, branch, checkout, gc (renames, locks, packs)
    (dst / "new.txt").write_text("made in the mount\n")
    sh("git", "-C", dst, "add", "-A", env=env)
    sh("git", "-C", dst, "commit", "-q", "-m", "in mount", env=env)
    sh("git", "-C", dst, "checkout", "-q", "-b", "side", "v1", env=env)
    assert not (dst / "new.txt").exists()
    sh("git", "-C", dst, "checkout", "-q", "main", env=env)
    assert (dst / "new.txt").read_text() == "made in the mount\n"
    sh("git", "-C", dst, "gc", "-q", "--aggressive", "--prune=now", env=env)
    head = sh("git", "-C", dst, "rev-parse", "HEAD", env=env).stdout
    (ref / "new.txt").write_text("made in the mount\n")
    mounted.remount()
    expected = snapshot(ref, mtimes=False, owners=False, skip={".git"})
    assert_same_tree(expected, snapshot(dst, mtimes=False, owners=False, skip={".git"}),
                     "git clone, after remount")
    sh("git", "-C", dst, "fsck", "--full", "--strict", env=env)
    assert sh("git", "-C", dst, "status", "--porcelain", env=env).stdout == ""
    assert sh("git", "-C", dst, "rev-parse", "HEAD", env=env).stdout == head
    # and a clone out of the mount works
    out = workdir("out") / "c"
    sh("git", "clone", "-q", dst, out, env=env)
    assert (out / "new.txt").read_text() == "made in the mount\n"

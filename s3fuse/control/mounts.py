"""Which s3fuse mounts exist, who mounted them, and where their daemons listen.

The kernel's mount table (`/proc/self/mountinfo`) names every FUSE mount with its type
(`fuse.s3fuse`) and the uid that mounted it (`user_id=`); a daemon's control socket is in
that uid's runtime directory (docs/CONTROL.md). The CLI finds a daemon from here: the mount
a path is on, or, with no path given, the mount that holds the current directory, else the
caller's only mount.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
from dataclasses import dataclass

from ..errors import S3fuseError
from . import protocol

FSTYPE = "fuse.s3fuse"
MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    dev: tuple[int, int]
    uid: int | None  # who mounted it (FUSE's user_id=), None if not FUSE

    @property
    def is_s3fuse(self) -> bool:
        return self.fstype == FSTYPE

    def owner(self) -> str:
        return user_name(self.uid)


def user_name(uid: int | None) -> str:
    if uid is None:
        return "an unknown user"
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        major, _, minor = fields[2].partition(":")
        uid = None
        for opt in tail[2].split(","):
            if opt.startswith("user_id="):
                try:
                    uid = int(opt[len("user_id="):])
                except ValueError:
                    pass
        try:
            dev = (int(major), int(minor))
        except ValueError:
            continue
        out.append(MountEntry(_unescape(fields[4]), tail[0], dev, uid))
    return out


def all_mounts() -> list[MountEntry]:
    try:
        with open(MOUNTINFO) as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def s3fuse_mounts() -> list[MountEntry]:
    return [m for m in all_mounts() if m.is_s3fuse]


def entry_at(mountpoint: str) -> MountEntry | None:
    """The mount whose mount point this is (the top one if several are stacked)."""
    real = os.path.realpath(mountpoint)
    found = [m for m in all_mounts() if m.mountpoint == real]
    return found[-1] if found else None


def mount_of(path: str) -> MountEntry | None:
    """The mount a path is on (by its device, as the kernel sees it); None if unknown."""
    try:
        st = os.stat(path)
    except OSError:
        return entry_at(path)  # a dead FUSE mount answers ENOTCONN: by its mount point
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    real = os.path.realpath(path)
    found = [m for m in all_mounts() if m.dev == dev]
    # bind mounts share a device: the one whose mount point holds the path
    inside = [m for m in found if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")]
    candidates = inside or found
    return max(candidates, key=lambda m: len(m.mountpoint)) if candidates else None


def socket_candidates(mountpoint: str, uid: int | None) -> list[str]:
    """Where the daemon of a mount made by `uid` listens (its runtime directory)."""
    paths = []
    if uid == 0 or uid is None:
        paths.append(protocol.socket_path(mountpoint, 0))
    if uid == os.getuid() or uid is None:
        paths.append(protocol.socket_path(mountpoint))
    if uid not in (0, None):
        # another user's runtime directory: XDG's, or the fallback under /tmp
        name = protocol.mount_name(mountpoint) + ".sock"
        paths += [f"/run/user/{uid}/s3fuse/{name}", f"/tmp/s3fuse-{uid}/{name}"]
    return list(dict.fromkeys(paths))


def socket_of(entry: MountEntry) -> str:
    for path in socket_candidates(entry.mountpoint, entry.uid):
        if os.path.exists(path):
            return path
    raise S3fuseError(f"no s3fuse daemon answers for {entry.mountpoint} (mounted by "
                      f"{entry.owner()}): the daemon may have died; `s3fuse umount "
                      f"{entry.mountpoint}` removes the dead mount", errno.ENOTCONN)


def _listing(entries: list[MountEntry]) -> str:
    return ", ".join(f"{m.mountpoint} (by {m.owner()})" for m in entries)


def resolve(path: str | None, cwd: str | None = None) -> MountEntry:
    """The s3fuse mount to talk to: the one `path` is on; with no path, the one holding
    the current directory, else the caller's only mount, else the only one there is."""
    if path is not None:
        entry = mount_of(path)
        if entry is None or not entry.is_s3fuse:
            real = os.path.realpath(path)
            what = "does not exist" if not os.path.exists(path) else (
                f"is on a {entry.fstype} mount ({entry.mountpoint})" if entry is not None else
                "is on no known mount")
            raise S3fuseError(f"{real} is not on an s3fuse mount: it {what}", errno.ENOTCONN)
        return entry
    here = mount_of(cwd or os.getcwd())
    if here is not None and here.is_s3fuse:
        return here
    mounts = s3fuse_mounts()
    mine = [m for m in mounts if m.uid == os.getuid()]
    for group in (mine, mounts):
        if len(group) == 1:
            return group[0]
    if not mounts:
        raise S3fuseError("no s3fuse mount found", errno.ENOTCONN)
    raise S3fuseError(f"several s3fuse mounts: name one with --mount MOUNTPOINT, or run from "
                      f"inside one: {_listing(mounts)}", errno.ENOTCONN)

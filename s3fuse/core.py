"""The filesystem core: POSIX semantics over the metadata database and the data path.

Every method takes plain values and raises `S3fuseError` subclasses carrying an
errno; `fs.py` adapts it to pyfuse3. Metadata changes of one call are one
transaction. Inodes live until their last directory entry, kernel lookup
reference and open handle are all gone (pyfuse3's lookup-count rules).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field

import trio

from . import policy as pol
from .crypto import Caller, KeyManager, WriteGrant
from .data import DataStore
from .errors import S3fuseError
from .meta import ROOT_INODE, Inode, Meta
from .policy import Policy
from .util import now_ns

log = logging.getLogger(__name__)

NAME_MAX = 255
_XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


NAME_READAHEAD = 16  # files fetched ahead of a reader that opens a directory's files in order
REFUSALS_KEPT = 256  # reasons kept for `s3fuse sse set` (each asked for once)
PLACES_HELD = 65536  # (directory, cursor) of entries readdir returned, for that read-ahead
# seconds within which deferred transactions commit (fs.py defers the FUSE requests' namespace
# changes) and unused inodes are deleted, if no other transaction commits them first
COMMIT_DELAY = 0.01
COMMIT_RETRY = 1.0  # seconds between attempts while such commits fail


@dataclass(eq=False)
class _Walk:
    """Opens-for-reading in one directory, in readdir (cursor) order so far."""

    last: int  # cursor of the last file opened
    opens: int = 0  # in order, after the first
    upto: int = 0  # cursor of the last entry looked at for fetching ahead
    done: bool = False  # the directory has no entries past `upto`
    ahead: collections.deque = field(default_factory=collections.deque)  # cursors being fetched
    # entries looked at but not fetched yet (fetches were at their limit): fetched as room
    # frees up, so that each entry is read from the database once
    queued: collections.deque = field(default_factory=collections.deque)


class NotStoredYet(Exception):
    """A KMS file with no object yet: its key version is the KMS key's current one."""

    def __init__(self, key_id: str) -> None:
        super().__init__(key_id)
        self.key_id = key_id


def _err(code: int, message: str = "") -> S3fuseError:
    return S3fuseError(message or os.strerror(code), code)


class Filesystem:
    def __init__(self, meta: Meta, data: DataStore, keys: KeyManager, block_size: int,
                 default_policy: Policy = pol.DEFAULT) -> None:
        self.meta = meta
        self.data = data
        self.keys = keys
        self.block_size = block_size
        self.default_policy = default_policy
        self.lookups: dict[int, int] = {}
        self._policies: dict[int, Policy] = {}  # directory -> effective encryption setting
        self._walks: dict[int, _Walk] = {}  # directory -> a reader opening its files in order
        self.stats = {"walk_queries": 0}  # database reads of a directory walk's next entries
        # inode -> (directory, cursor) of an entry readdir returned lately: saves opens a query
        self._places: dict[int, tuple[int, int]] = {}
        self._refusals: dict[tuple[int, int], str] = {}  # (uid, inode) -> why a setting was refused
        self._commit_due = False  # a task will commit what waits for a commit (_commit_soon)
        meta.on_deferred = self._commit_soon

    # ------------------------------------------------------------------ helpers
    def _inode(self, ino: int) -> Inode:
        row = self.meta.inode(ino)
        if row is None:
            raise _err(errno.ENOENT)
        return row

    def attr(self, ino: int) -> Inode:
        """Attributes with unflushed size and times applied."""
        return self.with_overlay(self._inode(ino))

    def with_overlay(self, row: Inode) -> Inode:
        return self.data.with_overlay(row)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise _err(errno.EINVAL)

    def _dir(self, ino: int) -> Inode:
        row = self._inode(ino)
        if not stat.S_ISDIR(row.mode):
            raise _err(errno.ENOTDIR)
        return row

    def _touch_dir(self, ino: int, now: int) -> None:
        self.meta.update_inode(ino, mtime_ns=now, ctime_ns=now)

    def _changed(self, ino: int, now: int, **fields) -> None:
        """Record an inode change (ctime), in the database and in unflushed state."""
        self.meta.update_inode(ino, ctime_ns=now, **fields)
        self.data.set_times(ino, None, now)

    def remember(self, ino: int) -> None:
        """The kernel took one more reference (lookup, create, readdirplus...)."""
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return
        self.lookups.pop(ino, None)
        self._maybe_reclaim(ino)

    def _maybe_reclaim(self, ino: int) -> None:
        """Delete an inode that no entry, kernel reference or open handle uses: its rows go
        with the next transaction that commits (`Meta.delete_inode_soon`), such as a group of
        deferred ones, within `COMMIT_DELAY`."""
        if ino == ROOT_INODE or ino in self.lookups:
            return
        if self.data.is_open(ino):
            return
        row = self.meta.inode(ino)
        if row is None or row.nlink > 0:
            return
        self.data.discard(ino)
        self.meta.delete_inode_soon(ino)
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Have what waits for a commit (deferred transactions, deletions) committed within
        `COMMIT_DELAY`, unless another transaction commits it first."""
        if not self._commit_due:
            self._commit_due = True
            if not self.data.run_in_background(self._commit_later):
                self.commit_now()  # not mounted: no background tasks

    async def _commit_later(self) -> None:
        try:
            while True:
                since = self.meta.waiting_since()
                if since is None:  # another transaction committed everything
                    self._commit_due = False
                    return
                # after a failed commit (Meta._redo), retried at this pace rather than at once
                delay = COMMIT_RETRY if self.meta.commit_failing else COMMIT_DELAY
                left = since + delay - time.monotonic()
                if left <= 0:
                    break
                await trio.sleep(left)
        except BaseException:  # cancelled at unmount: what comes later asks again
            self._commit_due = False
            raise
        try:
            self.commit_now()
        except Exception:  # a background task: the mount goes on
            if not self.meta.commit_failing:  # else Meta._redo logged it, and it is retried
                log.exception("committing deferred metadata changes failed")

    def commit_now(self) -> None:
        """Commit the deferred transactions and the deletions left for the next commit."""
        self._commit_due = False
        self.meta.commit()

    def forget_all(self) -> None:
        for ino in list(self.lookups):
            self.forget(ino, self.lookups[ino])
        self.commit_now()

    def reclaim_orphans(self) -> int:
        """At mount: inodes unlinked while open when the last daemon stopped."""
        orphans = self.meta.orphan_inodes()
        with self.meta.transaction():
            for ino in orphans:
                self.meta.delete_inode(ino)
        return len(orphans)

    # ------------------------------------------------------------------ namespace
    def lookup(self, parent: int, name: bytes) -> Inode:
        row = self.find(parent, name)
        if row is None:
            raise _err(errno.ENOENT)
        return row

    def find(self, parent: int, name: bytes) -> Inode | None:
        """`lookup`, with None for a name that is not there (FUSE's negative lookups, one per
        create, cost no exception)."""
        if name == b".":
            return self.attr(parent)
        if name == b"..":
            return self.attr(self.meta.parent_of(parent) or ROOT_INODE)
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        ino = self.meta.lookup(parent, name)
        return None if ino is None else self.attr(ino)

    def _new_owner(self, parent: Inode, caller: Caller, mode: int) -> tuple[int, int]:
        gid = caller.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return gid, mode

    def _make(self, parent_ino: int, name: bytes, mode: int, caller: Caller, rdev: int = 0,
              target: bytes | None = None, policy: Policy | None = None, defer: bool = False) -> Inode:
        """`policy`: a regular file's encryption, already checked (`_check_new_file`).
        `defer` (here and in the other namespace changes): a deferred transaction
        (`Meta.transaction`), for a caller whose durability point commits it (FUSE's fsync)."""
        self._check_name(name)
        parent = self._dir(parent_ino)
        if parent.nlink == 0:
            raise _err(errno.ENOENT)
        gid, mode = self._new_owner(parent, caller, mode)
        is_dir = stat.S_ISDIR(mode)
        sse = policy.encode() if stat.S_ISREG(mode) else None
        now = now_ns()
        with self.meta.transaction(defer=defer):
            row = self.meta.create_inode(mode, caller.uid, gid, 2 if is_dir else 1, now, rdev,
                                         sse=sse)
            try:
                self.meta.add_entry(parent_ino, name, row.id)
            except sqlite3.IntegrityError:  # the name is taken (one query less than asking first)
                raise _err(errno.EEXIST) from None
            if target is not None:
                self.meta.set_symlink(row.id, target)
                row.size = len(target)
                self.meta.update_inode(row.id, size=len(target))
            self.meta.update_inode(parent_ino, mtime_ns=now, ctime_ns=now,
                                   nlink=parent.nlink + (1 if is_dir else 0))
        return row

    async def _check_new_file(self, parent_ino: int, caller: Caller, policy: Policy | None = None) -> Policy:
        """The encryption of a regular file about to be made: the nearest setting above it,
        fixed once, now (or the request's own, an S3 PUT's SSE headers), checked for `caller`."""
        self._dir(parent_ino)
        policy = policy or self.effective_policy(parent_ino)
        await self.keys.check_write(policy, caller, path=lambda: self.meta.path_of(parent_ino))
        return policy

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller,
                    defer: bool = False) -> Inode:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        policy = await self._check_new_file(parent, caller) if stat.S_ISREG(mode) else None
        return self._make(parent, name, mode, caller, rdev=rdev, policy=policy, defer=defer)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller, defer: bool = False) -> Inode:
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), caller, defer=defer)

    async def create(self, parent: int, name: bytes, mode: int, caller: Caller,
                     policy: Policy | None = None, defer: bool = False) -> Inode:
        """`policy`: the new file's encryption, instead of its directory's (checked here)."""
        mode = stat.S_IFREG | (mode & 0o7777)
        policy = await self._check_new_file(parent, caller, policy)
        row = self._make(parent, name, mode, caller, policy=policy, defer=defer)
        await self.data.block_pushes(row.id)  # an inode number can be reused: no stale pushes
        self.data.opened(row.id, writer=caller, grant=await self._grant_at_create(row, caller))
        return row

    async def _grant_at_create(self, row: Inode, caller: Caller):
        """The key a new file's writes will be stored under (crypto.WriteGrant); the caller's
        check passed in `_make`. If the key cannot be prepared after all (a KMS that failed
        in between), the file's data asks for a key when it is stored, as without a grant."""
        policy = Policy.decode(row.sse) or pol.DEFAULT
        if policy.mode == pol.SSE_S3:
            return None
        try:
            return await self._grant(policy, caller, row.id, lambda: self.meta.path_of(row.id), checked=True)
        except S3fuseError as exc:
            log.warning("could not prepare the key of new inode %d (%s): it is asked for at its store",
                        row.id, exc)
            return None

    async def _grant(self, policy: Policy, caller: Caller, ino: int, path, checked: bool):
        """`KeyManager.grant_write`; for a network KMS (Transit) the data key is made in the
        background after the check, so that the open does not wait for a second round trip
        (the store waits for it, or asks on its own if it failed)."""
        if policy.mode != pol.SSE_KMS or not self.keys.kms_blocks(key=policy.key):
            return await self.keys.grant_write(policy, caller, ino, path=path)
        if not checked:
            await self.keys.check_write(policy, caller, path=path)
        grant = WriteGrant(policy)
        grant.preparing()
        if not self.data.run_in_background(self._prepare_grant, grant, caller, ino, path):
            await self._prepare_grant(grant, caller, ino, path)
        return grant

    async def _prepare_grant(self, grant: WriteGrant, caller: Caller, ino: int, path) -> None:
        try:
            await self.keys.prepare_async(grant, caller, ino, path)
        except S3fuseError as exc:
            log.info("could not prepare the data key of inode %d (%s): it is asked for at its store", ino, exc)
        except Exception:  # a background task: a bug here must not stop the mount
            log.exception("preparing the data key of inode %d failed unexpectedly", ino)
        finally:
            grant.prepared_done()

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller, defer: bool = False) -> Inode:
        if len(target) > 4096:
            raise _err(errno.ENAMETOOLONG)
        return self._make(parent, name, stat.S_IFLNK | 0o777, caller, target=target, defer=defer)

    def readlink(self, ino: int) -> bytes:
        target = self.meta.symlink_target(ino)
        if target is None:
            raise _err(errno.EINVAL)
        return target

    def link(self, ino: int, new_parent: int, new_name: bytes, defer: bool = False) -> Inode:
        self._check_name(new_name)
        row = self._inode(ino)
        if stat.S_ISDIR(row.mode):
            raise _err(errno.EPERM)
        parent = self._dir(new_parent)
        if parent.nlink == 0 or row.nlink == 0:
            raise _err(errno.ENOENT)
        if self.meta.lookup(new_parent, new_name) is not None:
            raise _err(errno.EEXIST)
        now = now_ns()
        with self.meta.transaction(defer=defer):
            self.meta.add_entry(new_parent, new_name, ino)
            self._changed(ino, now, nlink=row.nlink + 1)
            self._touch_dir(new_parent, now)
        return self.attr(ino)

    def _unlink_entry(self, parent: int, name: bytes, row: Inode, now: int) -> None:
        """Remove one entry and drop its link; called inside a transaction."""
        self.meta.remove_entry(parent, name, row.id)
        if stat.S_ISDIR(row.mode):
            self._changed(row.id, now, nlink=0)
            p = self._inode(parent)
            self.meta.update_inode(parent, nlink=p.nlink - 1)
        else:
            self._changed(row.id, now, nlink=row.nlink - 1)

    def unlink(self, parent: int, name: bytes, defer: bool = False) -> None:
        self._dir(parent)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise _err(errno.ENOENT)
        row = self._inode(ino)
        if stat.S_ISDIR(row.mode):
            raise _err(errno.EISDIR)
        now = now_ns()
        with self.meta.transaction(defer=defer):
            self._unlink_entry(parent, name, row, now)
            self._touch_dir(parent, now)
        self._maybe_reclaim(ino)

    def rmdir(self, parent: int, name: bytes, defer: bool = False) -> None:
        if name == b".":
            raise _err(errno.EINVAL)
        if name == b"..":
            raise _err(errno.ENOTEMPTY)
        self._dir(parent)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise _err(errno.ENOENT)
        row = self._inode(ino)
        if not stat.S_ISDIR(row.mode):
            raise _err(errno.ENOTDIR)
        if self.meta.has_entries(ino):
            raise _err(errno.ENOTEMPTY)
        now = now_ns()
        with self.meta.transaction(defer=defer):
            self._unlink_entry(parent, name, row, now)
            self._touch_dir(parent, now)
        self._maybe_reclaim(ino)

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        while ino != ROOT_INODE:
            if ino == ancestor:
                return True
            parent = self.meta.parent_of(ino)
            if parent is None:
                return False
            ino = parent
        return ancestor == ROOT_INODE

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, defer: bool = False) -> None:
        self._check_name(new_name)
        self._dir(old_parent)
        self._dir(new_parent)
        src_ino = self.meta.lookup(old_parent, old_name)
        if src_ino is None:
            raise _err(errno.ENOENT)
        src = self._inode(src_ino)
        dst_ino = self.meta.lookup(new_parent, new_name)
        exchange = bool(flags & 2)  # RENAME_EXCHANGE
        if flags & 1 and dst_ino is not None:  # RENAME_NOREPLACE
            raise _err(errno.EEXIST)
        if exchange and dst_ino is None:
            raise _err(errno.ENOENT)
        if dst_ino == src_ino:
            return
        src_dir = stat.S_ISDIR(src.mode)
        if src_dir or exchange:
            self._policies.clear()  # a moved directory may inherit from new ancestors
        if src_dir and self._is_ancestor(src_ino, new_parent):
            raise _err(errno.EINVAL)
        dst = self._inode(dst_ino) if dst_ino is not None else None
        dst_dir = dst is not None and stat.S_ISDIR(dst.mode)
        if exchange and dst_dir and self._is_ancestor(dst_ino, old_parent):
            raise _err(errno.EINVAL)
        now = now_ns()
        with self.meta.transaction(defer=defer):
            if exchange:
                self.meta.set_entry_inode(old_parent, old_name, dst_ino)
                self.meta.set_entry_inode(new_parent, new_name, src_ino)
                if old_parent != new_parent and src_dir != dst_dir:
                    delta = 1 if src_dir else -1
                    self._add_nlink(new_parent, delta)
                    self._add_nlink(old_parent, -delta)
                self._changed(dst_ino, now)
            else:
                if dst is not None:
                    if src_dir and not dst_dir:
                        raise _err(errno.ENOTDIR)
                    if not src_dir and dst_dir:
                        raise _err(errno.EISDIR)
                    if dst_dir and self.meta.has_entries(dst_ino):
                        raise _err(errno.ENOTEMPTY)
                    self._unlink_entry(new_parent, new_name, dst, now)
                self.meta.move_entry(old_parent, old_name, new_parent, new_name)
                if src_dir and old_parent != new_parent:
                    self._add_nlink(new_parent, 1)
                    self._add_nlink(old_parent, -1)
            self._changed(src_ino, now)
            self._touch_dir(old_parent, now)
            if new_parent != old_parent:
                self._touch_dir(new_parent, now)
        if dst_ino is not None and not exchange:
            self._maybe_reclaim(dst_ino)

    def _add_nlink(self, ino: int, delta: int) -> None:
        row = self._inode(ino)
        self.meta.update_inode(ino, nlink=row.nlink + delta)

    def readdir(self, ino: int, cursor: int, limit: int = 256) -> list[tuple[int, bytes, Inode]]:
        """Entries after `cursor` as (next cursor, name, attributes)."""
        rows = self.meta.entries_after(ino, cursor, limit)
        places = self._places
        for r in rows:
            places[r[2]] = (ino, r[0])
        while len(places) > PLACES_HELD:
            del places[next(iter(places))]
        return [(r[0], r[1], self.with_overlay(Inode(*r[2:]))) for r in rows]

    # ------------------------------------------------------------------ attributes
    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, ctime_ns: int | None = None,
                      caller: Caller | None = None, defer: bool = False) -> Inode:
        """`caller`: who changes the size by path (no open handle); such a size change
        passes the key checks of an open for writing. A handle's (ftruncate) passed them
        at open. `defer`: as `_make`'s, for a change of attributes only (a size change's
        transaction makes garbage, so it commits)."""
        if (size is None and mode is None and uid is None and gid is None and atime_ns is None
                and self.data.has_unstored(ino)):
            # The kernel's write-back cache sends the times of its writes at close: the
            # flush that is coming commits them, so no transaction is needed now.
            self.data.set_times(ino, mtime_ns, ctime_ns if ctime_ns is not None else now_ns())
            return self.attr(ino)
        row = self._inode(ino)
        now = now_ns()
        if size is not None:
            if not stat.S_ISREG(row.mode):
                raise _err(errno.EINVAL)
            if caller is not None:
                policy = Policy.decode(row.sse) or pol.DEFAULT
                await self.keys.check_write(policy, caller, path=lambda: self.meta.path_of(ino))
            await self.data.truncate(ino, size)
        fields: dict[str, int] = {}
        if mode is not None:
            fields["mode"] = stat.S_IFMT(row.mode) | (mode & 0o7777)
        if uid is not None and uid != 0xFFFFFFFF:
            fields["uid"] = uid
        if gid is not None and gid != 0xFFFFFFFF:
            fields["gid"] = gid
        if ("uid" in fields or "gid" in fields) and mode is None and not stat.S_ISDIR(row.mode):
            # chown clears set-user-ID and (with group execute) set-group-ID, as Linux does
            new_mode = row.mode & ~stat.S_ISUID
            if row.mode & stat.S_IXGRP:
                new_mode &= ~stat.S_ISGID
            if new_mode != row.mode:
                fields["mode"] = new_mode
        if atime_ns is not None:
            fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
        fields["ctime_ns"] = ctime_ns if ctime_ns is not None else now
        # only what differs from the row is written: tar and cp -a, as root, chown every file
        # to the owner it has, and a ctime alone needs no new MAC (metaauth.inode_mac); after a
        # truncate `row` is older than the database's, so all is written
        changed = fields if size is not None else {
            name: value for name, value in fields.items() if getattr(row, name) != value}
        if changed:
            # else nothing changes: the kernel writes back the times it holds when it evicts
            # an inode, such as the ctime it gave an unlinked file, which is the row's own
            with self.meta.transaction(defer=defer and size is None):
                self.meta.update_inode(ino, **changed)
        self.data.set_times(ino, mtime_ns, fields["ctime_ns"])
        return self.attr(ino)

    # ------------------------------------------------------------------ files
    async def open(self, ino: int, flags: int, caller: Caller) -> Inode:
        row = self._inode(ino)
        first = grant = None
        if stat.S_ISDIR(row.mode):
            raise _err(errno.EISDIR)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if self.data.is_damaged(ino):  # a stop dropped written data of it: not a state it had
            raise _err(errno.EIO, f"inode {ino} lost written data at a stop (see {pol.XATTR_DAMAGE.decode()})")
        if stat.S_ISREG(row.mode):
            # Key checks happen here, per caller: later reads may be served from shared caches.
            def path() -> str:
                return self.meta.path_of(ino)

            policy = Policy.decode(row.sse) or pol.DEFAULT
            if (flags & os.O_ACCMODE) != os.O_WRONLY:
                if row.size <= self.block_size:
                    # one block at most: its row gives the keys, and what to fetch (one query)
                    first = self.meta.block(ino, 0)
                    refs = [] if first is None else [(first.mode, first.key_ref)]
                else:
                    refs = self.meta.key_refs(ino)
                await self.keys.check_read(refs, caller, path=path, policy=policy)
            if writing:
                # the key this open's writes will be stored under, fixed now that the check passes
                grant = await self._grant(policy, caller, ino, path, checked=False)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            # the kernel will cache this handle's writes: nothing of ours may go over them
            await self.data.block_pushes(ino)  # until release(writer=True)
        if flags & os.O_TRUNC and stat.S_ISREG(row.mode):
            # libfuse negotiates atomic O_TRUNC: the kernel passes it here, not as a setattr
            try:
                await self.data.truncate(ino, 0)
            except BaseException:
                if writable:
                    self.data.unblock_pushes(ino)
                raise
        self.data.opened(ino, writer=caller if writing else None, grant=grant)
        if (flags & os.O_ACCMODE) != os.O_WRONLY and not flags & os.O_TRUNC and stat.S_ISREG(row.mode):
            self.data.prefetch_on_open(ino, caller, first)
            self._read_ahead_names(ino, caller)
        return row

    def _read_ahead_names(self, ino: int, caller: Caller) -> None:
        """A reader that opens a directory's files in readdir order (cp -r, tar -c, rsync,
        grep -r, find | xargs cat) has the next small files fetched before it opens them, as
        a sequential read of one file has its next blocks fetched. Only for SSE-S3 objects:
        a KMS data-key use is audited under the caller that reads, and an SSE-C key is the
        caller's own, so those are fetched when their file is opened, not before."""
        here = self._places.get(ino) or self.meta.entry_of(ino)
        if here is None:
            return
        parent, cursor = here
        walk = self._walks.pop(parent, None)
        if walk is None or cursor <= walk.last:  # a first open here, or not in order: watch
            walk = _Walk(cursor)
        walk.last = cursor
        while walk.ahead and walk.ahead[0] <= cursor:
            walk.ahead.popleft()
        while walk.queued and walk.queued[0][0] <= cursor:
            walk.queued.popleft()  # the reader got there first
        if len(walk.ahead) <= NAME_READAHEAD // 2 and walk.opens > 0:
            if not walk.queued and not walk.done:
                rows = self.meta.first_blocks_after(parent, max(cursor, walk.upto), NAME_READAHEAD)
                self.stats["walk_queries"] += 1
                walk.done = len(rows) < NAME_READAHEAD
                if rows:
                    walk.upto = rows[-1][0]
                walk.queued.extend(rows)
            while walk.queued and self.data.can_prefetch():
                cur, child, mode, size, ref = walk.queued.popleft()
                if (stat.S_ISREG(mode) and ref is not None and ref.mode == pol.SSE_S3
                        and self.data.prefetch(child, size, ref, caller, ahead=True)):
                    walk.ahead.append(cur)
        walk.opens += 1
        self._walks[parent] = walk
        if len(self._walks) > 64:
            del self._walks[next(iter(self._walks))]


    def release(self, ino: int, writer: bool = False) -> None:
        """`writer`: the handle was opened for writing (its access mode was not O_RDONLY)."""
        self.data.released(ino, writer)
        self._maybe_reclaim(ino)

    async def read(self, ino: int, off: int, size: int, caller: Caller) -> bytes:
        return await self.data.read(ino, off, size, caller)

    async def write(self, ino: int, off: int, buf: bytes) -> int:
        return await self.data.write(ino, off, buf)

    async def fsync(self, ino: int) -> None:
        self.commit_now()  # the file's deferred namespace changes are made durable too
        await self.data.flush(ino, durable=True)

    # ------------------------------------------------------------------ encryption settings
    def effective_policy(self, dir_ino: int) -> Policy:
        """The nearest explicit setting at or above a directory, else the store default.

        Cached per directory; any setting change or directory move clears the cache.
        """
        cached = self._policies.get(dir_ino)
        if cached is None:
            cached = self._policies[dir_ino] = self._lookup_policy(dir_ino)
            if len(self._policies) > 65536:
                self._policies.clear()
        return cached

    def _lookup_policy(self, dir_ino: int) -> Policy:
        ino = dir_ino
        for _ in range(4096):
            row = self._inode(ino)
            if row.sse is not None:
                return Policy.decode(row.sse)
            if ino == ROOT_INODE:
                break
            ino = self.meta.parent_of(ino) or ROOT_INODE
        return self.default_policy

    async def resolve_policy(self, value: bytes, caller: Caller) -> Policy:
        """Turn an xattr value into a policy naming a real key; errno says why not."""
        mode, ref = pol.parse(value)
        if mode == pol.SSE_S3:
            return Policy(pol.SSE_S3)
        if mode == pol.SSE_KMS:
            key_id, state = await self.keys.resolve_kms_key(ref, caller)
            if state != "Enabled":
                raise _err(errno.EKEYREVOKED, f"KMS key {key_id} is {state}")
            return Policy(pol.SSE_KMS, key_id)
        key = self.keys.customer.find(caller.uid, ref)
        if key is not None:
            return Policy(pol.SSE_C, key.fingerprint, key.name)
        if pol.is_fingerprint(ref):
            return Policy(pol.SSE_C, ref)
        raise _err(errno.ENOKEY, f"no customer key named {ref!r} is loaded for uid {caller.uid}")

    def _describe_encryption(self, row: Inode, name: bytes) -> bytes:
        """The read-only xattrs of a regular file: its objects' actual encryption."""
        policy = Policy.decode(row.sse) or pol.DEFAULT
        versions = self.meta.key_versions(row.id)
        mode = versions[0][0] if versions else policy.mode
        if name == pol.XATTR_MODE:
            return mode.encode()
        if name == pol.XATTR_MASTER_VERSION and mode == pol.SSE_S3:
            return ",".join(str(v) for _, _, v in versions).encode() or str(self.keys.keyring.current).encode()
        if name == pol.XATTR_KMS_KEY and mode == pol.SSE_KMS:
            return ",".join(sorted({r for _, r, _ in versions} or {policy.key})).encode()
        if name == pol.XATTR_KMS_VERSION and mode == pol.SSE_KMS and versions:
            return ",".join(str(v) for _, _, v in versions).encode()
        if name == pol.XATTR_KMS_VERSION and mode == pol.SSE_KMS:
            raise NotStoredYet(policy.key)
        if name == pol.XATTR_FINGERPRINT and mode == pol.SSE_C:
            return policy.key.encode()
        raise _err(errno.ENODATA)

    async def kms_version_xattr(self, ino: int) -> bytes:
        """`user.s3fuse.kms-key-version`: its objects' versions; for a file with nothing
        stored yet, the version of its KMS key that a store now would use."""
        try:
            return self.getxattr(ino, pol.XATTR_KMS_VERSION)
        except NotStoredYet as pending:
            try:
                desc = await self.keys.describe_kms_key(pending.key_id)
            except S3fuseError as exc:
                raise _err(exc.errno or errno.EIO, str(exc)) from None
            if desc.get("current_version") is None:
                raise _err(errno.ENODATA) from None
            return str(desc["current_version"]).encode()

    def _require_owner(self, row: Inode, caller: Caller) -> None:
        if caller.uid not in (0, row.uid):
            raise _err(errno.EPERM, "only the owner or root may change the encryption setting")

    # ------------------------------------------------------------------ xattrs
    @staticmethod
    def _unsupported_xattr(name: bytes) -> bool:
        """POSIX ACLs (system.*) and SELinux labels are not supported here. Saying so with
        EOPNOTSUPP, rather than ENODATA, also lets tools such as ls -l remember it per
        filesystem instead of asking again for every file."""
        return name.startswith(b"system.") or name == b"security.selinux"

    def xattr_absent(self, ino: int, name: bytes) -> bool:
        """Whether `getxattr(ino, name)` is known to fail with ENODATA without asking the
        database: an ordinary name on an inode with no xattrs (the kernel's
        security.capability probe before every write(2) is one)."""
        return (not self.meta.may_have_xattrs(ino) and not name.startswith(pol.RESERVED_PREFIX)
                and not self._unsupported_xattr(name))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if self._unsupported_xattr(name):
            raise _err(errno.EOPNOTSUPP)
        if not name.startswith(pol.RESERVED_PREFIX):
            # the common case (security.capability on every write, ACL probes of ls -l): one query
            value = self.meta.get_xattr(ino, name)
            if value is None:
                raise _err(errno.ENODATA)
            return value
        row = self._inode(ino)
        if name.startswith(pol.RESERVED_PREFIX):
            if name == pol.XATTR_SSE:
                if stat.S_ISDIR(row.mode):
                    return self.effective_policy(ino).to_xattr()
                if stat.S_ISREG(row.mode):
                    return (Policy.decode(row.sse) or pol.DEFAULT).to_xattr()
            elif name in pol.READ_ONLY and stat.S_ISREG(row.mode):
                return self._describe_encryption(row, name)
            elif name == pol.XATTR_DAMAGE:
                value = self.meta.get_xattr(ino, name)
                if value is not None:
                    return value
            raise _err(errno.ENODATA)
        value = self.meta.get_xattr(ino, name)
        if value is None:
            raise _err(errno.ENODATA)
        return value

    async def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        row = self._inode(ino)
        if self._unsupported_xattr(name):
            # POSIX ACLs (system.posix_acl_*) are not enforced here, so refuse them rather
            # than store rules the kernel would ignore; cp -a and rsync then fall back to modes
            raise _err(errno.EOPNOTSUPP)
        if name.startswith(pol.RESERVED_PREFIX):
            if name != pol.XATTR_SSE or not (stat.S_ISDIR(row.mode) or stat.S_ISREG(row.mode)):
                raise _err(errno.EPERM, f"{name.decode(errors='replace')} is read-only")
            try:
                await self._set_encryption(row, value, caller)
            except S3fuseError as exc:
                self._note_refusal(caller.uid, ino, str(exc) or os.strerror(exc.errno or errno.EIO))
                raise
            return
        if len(name) > 255 or not name:
            raise _err(errno.ERANGE)
        if not name.startswith(_XATTR_NAMESPACES):
            # as ext4 and tmpfs: a name outside the known namespaces is not supported (the FUSE
            # kernel module passes any name through)
            raise _err(errno.EOPNOTSUPP)
        if len(value) > 65536:
            raise _err(errno.E2BIG)
        with self.meta.transaction():
            self.meta.set_xattr(ino, name, value)
            self._changed(ino, now_ns())

    async def _set_encryption(self, row: Inode, value: bytes, caller: Caller) -> None:
        ino = row.id
        self._require_owner(row, caller)
        try:
            policy = await self.resolve_policy(value, caller)
        except S3fuseError as exc:
            log.warning("encryption setting %r on %s refused: %s", value[:80], self.meta.path_of(ino), exc)
            raise
        if stat.S_ISDIR(row.mode):
            with self.meta.transaction():
                self._changed(ino, now_ns(), sse=policy.encode())
            self._policies.clear()
            return
        if Policy.decode(row.sse) == policy:
            return  # already so: re-encryption is resumable
        await self.keys.check_write(policy, caller, path=lambda: self.meta.path_of(ino))
        await self.data.reencrypt(ino, policy, caller)

    def _note_refusal(self, uid: int, ino: int, reason: str) -> None:
        """Keep why an encryption setting was refused, for `s3fuse sse set` to show (the
        xattr call itself carries only an errno). A few per uid, the latest only per file."""
        self._refusals.pop((uid, ino), None)
        self._refusals[(uid, ino)] = reason[:500]
        while len(self._refusals) > REFUSALS_KEPT:
            del self._refusals[next(iter(self._refusals))]

    def refusal(self, uid: int, ino: int) -> str | None:
        """Why `uid`'s last encryption setting on `ino` was refused (once), or None."""
        return self._refusals.pop((uid, ino), None)

    def listxattr(self, ino: int) -> list[bytes]:
        row = self._inode(ino)
        names = [n for n in self.meta.list_xattrs(ino) if not n.startswith(pol.HIDDEN_PREFIX)]
        if stat.S_ISDIR(row.mode) and row.sse is not None:
            names.append(pol.XATTR_SSE)
        return names

    def removexattr(self, ino: int, name: bytes, caller: Caller) -> None:
        if self._unsupported_xattr(name):
            raise _err(errno.EOPNOTSUPP)
        row = self._inode(ino)
        if name == pol.XATTR_DAMAGE:  # fsck's record: the owner clears it once the file is salvaged
            self._require_owner(row, caller)
            with self.meta.transaction():
                if not self.meta.remove_xattr(ino, name):
                    raise _err(errno.ENODATA)
                self._changed(ino, now_ns())
            self.data.clear_damage(ino)
            return
        if name.startswith(pol.RESERVED_PREFIX):
            if name != pol.XATTR_SSE or not stat.S_ISDIR(row.mode):
                raise _err(errno.EPERM, f"{name.decode(errors='replace')} cannot be removed")
            self._require_owner(row, caller)
            if row.sse is None:
                raise _err(errno.ENODATA)
            with self.meta.transaction():
                self._changed(ino, now_ns(), sse=None)
            self._policies.clear()
            return
        with self.meta.transaction():
            if not self.meta.remove_xattr(ino, name):
                raise _err(errno.ENODATA)
            self._changed(ino, now_ns())

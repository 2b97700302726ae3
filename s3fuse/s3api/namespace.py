"""Buckets and keys as directories and files of the filesystem core, with the caller's permissions.

A bucket is a top-level directory; key `a/b/c` of bucket `B` is the file `B/a/b/c`. The
kernel checks modes for the mount; requests of the S3 API do not pass through it, so
this module checks them as the kernel would (search on every directory walked, write and
search on a directory changed, read on a file read, the sticky bit), for the access key's
uid and groups. Every change made here drops what the kernel caches of the entries and
attributes it touched (entries, attributes and negative lookups are cached for 300 s).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..core import Filesystem
from ..crypto import Caller
from ..errors import S3fuseError
from ..meta import ROOT_INODE, Inode
from .errors import S3Error, from_errno

READ, WRITE, SEARCH = 4, 2, 1
INVALIDATE_TIMEOUT = 10.0  # s: a kernel that does not take an invalidation must not hang a request
MAX_KEY = 1024
TEMP_PREFIX = b".s3fuse-put-"  # a PUT's file until it is complete; never listed
GATHER_SECONDS = 0.005  # longest a store batch waits for small PUT bodies still arriving
SMALL_BODY = 1 << 20  # bodies up to this size are waited for


class StoreNotice:
    """A PUT that will ask for a store once its body has arrived (`Namespace.store_coming`)."""

    __slots__ = ("arrived",)

    def __init__(self) -> None:
        self.arrived = False


class _Pending:
    """A file waiting in the group store; `then` runs in the batch once the file is stored."""

    __slots__ = ("ino", "then", "done", "abandoned", "error", "result")

    def __init__(self, ino: int, then: Callable[[], Any] | None) -> None:
        self.ino, self.then = ino, then
        self.done = self.abandoned = False
        self.error: BaseException | None = None
        self.result: Any = None


def allowed(row: Inode, who: Caller, want: int) -> bool:
    if who.uid == 0:
        return True
    if who.uid == row.uid:
        bits = (row.mode >> 6) & 7
    elif row.gid == who.gid or row.gid in who.groups:
        bits = (row.mode >> 3) & 7
    else:
        bits = row.mode & 7
    return bits & want == want


def split_key(key: str) -> tuple[list[bytes], bool]:
    """A key -> its path segments, and whether it ends in '/' (a directory marker)."""
    raw = key.encode("utf-8", "surrogateescape")
    if not raw:
        raise S3Error("InvalidArgument", "an object key must not be empty")
    if len(raw) > MAX_KEY:
        raise S3Error("KeyTooLongError", "your key is too long (at most 1024 bytes)")
    if b"\0" in raw:
        raise S3Error("InvalidArgument", "an object key must not contain NUL")
    marker = raw.endswith(b"/")
    parts = raw[:-1].split(b"/") if marker else raw.split(b"/")
    for p in parts:
        if p in (b"", b".", b".."):
            raise S3Error("InvalidArgument", f"the key {key[:200]!r} has an empty, '.' or '..' segment: "
                          "it cannot name a file of the filesystem")
        if len(p) > 255:
            raise S3Error("KeyTooLongError", "a segment of the key (between '/') is longer than 255 bytes")
        if p.startswith(TEMP_PREFIX):
            raise S3Error("InvalidArgument", "keys starting with .s3fuse-put- are reserved")
    return parts, marker


class Namespace:
    def __init__(self, core: Filesystem, invalidate_entry: Callable[[int, bytes], None] | None = None,
                 metadata_durable: Callable[[], Awaitable[None]] | None = None,
                 invalidate_attrs: Callable[[int], None] | None = None) -> None:
        """`metadata_durable`: an S3 store's; returns once the committed metadata is in the
        bucket, which an answered PUT promises as fsync does. `invalidate_entry(parent, name)`
        and `invalidate_attrs(ino)` make the kernel forget what it caches; they block, so
        they are called in worker threads."""
        self.core = core
        self._invalidate_entry = invalidate_entry
        self._invalidate_attrs = invalidate_attrs
        self._metadata_durable = metadata_durable
        self._sync_round = 0  # group commit: the WAL syncs started so far
        self._synced_round = 0  # ... and finished
        self._syncing: trio.Event | None = None
        self._to_forget: list[tuple[int, bytes]] = []  # entries the next sync round invalidates
        self._to_store: list[_Pending] = []  # group store: files waiting for the next batch
        self._storing: trio.Event | None = None
        self._batches = self._batched = 0  # store batches run, and the files they held
        self._gathered = 0  # batches that waited for announced bodies
        self._coming = 0  # small PUTs announced, whose bodies are still arriving
        self._enough: trio.Event | None = None  # a gathering batch waits on it

    def _sync_and_forget(self, forget: list[tuple[int, bytes]]) -> None:
        """In a worker thread: the WAL sync, then the kernel's invalidations: the entries, and
        the attributes of their directories (the kernel drops those with an entry only if
        it held the entry), in the same thread hand-off."""
        self.core.meta.sync()
        if self._invalidate_entry is not None:
            for parent, name in forget:
                self._invalidate_entry(parent, name)
        if self._invalidate_attrs is not None:
            for parent in dict.fromkeys(parent for parent, _ in forget):
                self._invalidate_attrs(parent)

    @contextlib.contextmanager
    def store_coming(self, size: int | None):
        """Announce a PUT of `size` bytes whose body is on its way: -> a notice for `store`.

        A store batch about to start waits, up to GATHER_SECONDS, until it holds at least as
        many files as there are small PUTs (at most SMALL_BODY) still receiving their bodies:
        each batch pays one sync barrier, one transaction and one WAL sync whatever its size,
        and with no wait most batches held a single PUT. Waiting for about half of what is
        under way, not all of it, keeps two batches in turn: one is stored while the other's
        clients send their next requests. A large body is not waited for."""
        if size is None or size > SMALL_BODY:
            yield None
            return
        notice = StoreNotice()
        self._coming += 1
        try:
            yield notice
        finally:
            self._arrive(notice)

    def _arrive(self, notice: StoreNotice | None) -> None:
        if notice is None or notice.arrived:
            return
        notice.arrived = True
        self._coming -= 1
        self._check_enough()

    def _check_enough(self) -> None:
        if self._enough is not None and self._coming <= len(self._to_store):
            self._enough.set()

    async def store(self, ino: int, then: Callable[[], Any] | None = None,
                    notice: StoreNotice | None = None) -> Any:
        """Store a new object's data (objects put, synced, rows committed), then run `then`
        and return what it returns. PUTs that arrive together are stored as one batch: one
        sync barrier and one transaction for all. Each PUT's `then` (its rename) runs in the
        batch, before any PUT of it asks for durability, so that the batch then shares one
        WAL sync (see `durable_ticket`) instead of queueing for one each. `notice`: this
        PUT's, from `store_coming`."""
        entry = _Pending(ino, then)
        self._arrive(notice)
        self._to_store.append(entry)
        self._check_enough()
        try:
            while not entry.done:
                if self._storing is not None:
                    await self._storing.wait()
                    continue
                await self._store_batch()
        except BaseException:
            entry.abandoned = True  # its caller cleans up; the batch must not run its `then`
            if entry in self._to_store:
                self._to_store.remove(entry)
            raise
        if entry.error is not None:
            raise entry.error
        return entry.result

    async def _store_batch(self) -> None:
        self._storing = done = trio.Event()
        batch: list[_Pending] = []
        try:
            await self._gather()
            batch, self._to_store = self._to_store, []
            self._batches += 1
            self._batched += len(batch)
            failed = await self.core.data.flush_files([e.ino for e in batch])
        except S3fuseError as exc:  # shared by the batch
            for e in batch:
                e.error, e.done = self._not_stored(exc), True
        except BaseException:  # this task was cancelled: another waiter stores the batch
            self._to_store = [e for e in batch if not e.abandoned] + self._to_store
            raise
        else:
            for e in batch:
                exc = failed.get(e.ino)
                if exc is not None:
                    e.error = self._not_stored(exc)
                elif e.then is not None and not e.abandoned:
                    try:
                        e.result = e.then()
                    except Exception as then_exc:  # that PUT's own failure, raised in its task
                        e.error = then_exc
                e.done = True
        finally:
            self._storing = None
            done.set()

    async def _gather(self) -> None:
        """Wait, briefly, for announced PUTs still receiving their bodies (`store_coming`)."""
        if self._coming <= len(self._to_store):
            return
        self._gathered += 1
        self._enough = trio.Event()
        try:
            with trio.move_on_after(GATHER_SECONDS):
                await self._enough.wait()
        finally:
            self._enough = None

    @property
    def stats(self) -> dict[str, int]:
        """Group commit at work, for `s3fuse status`: PUTs share a batch, and a batch a WAL sync;
        and, as they stand, the small PUTs receiving their bodies and the files waiting to be stored."""
        return {"s3api_store_batches": self._batches, "s3api_stored_files": self._batched,
                "s3api_wal_syncs": self._synced_round, "s3api_batches_gathered": self._gathered,
                "s3api_bodies_arriving": self._coming, "s3api_files_to_store": len(self._to_store)}

    @staticmethod
    def _not_stored(exc: S3fuseError) -> S3fuseError:
        return S3fuseError(f"the object could not be stored: {exc}", exc.errno)

    def durable_ticket(self, changed: tuple[int, bytes] | None = None) -> int:
        """For a change just committed: the WAL sync round that will cover it, to pass to
        `make_durable`. The kernel forgets the entry `changed` (parent, name), and its
        directory's attributes, in that round."""
        if changed is not None:
            self._to_forget.append(changed)
        return self._sync_round + 1  # a round that starts after this call

    async def make_durable(self, ticket: int | None = None) -> None:
        """Everything committed before `ticket` was taken (by default: before this call)
        survives a crash once this returns (for an S3 store: is in the bucket too), and the
        kernel has forgotten the entries named with it. Concurrent requests share one WAL sync
        (a group commit) and one thread hand-off: a request that arrives while a sync runs
        waits for the next one, which covers it."""
        wanted = self.durable_ticket() if ticket is None else ticket
        while self._synced_round < wanted:
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            self._sync_round += 1
            this_round = self._sync_round
            self._syncing = done = trio.Event()
            forget, self._to_forget = self._to_forget, []
            try:
                self.core.commit_now()  # deferred transactions (a PUT's create and rename) too
                await trio.to_thread.run_sync(self._sync_and_forget, forget)
                self._synced_round = this_round
            except BaseException:
                self._to_forget = forget + self._to_forget  # the next round's leader does them
                raise
            finally:
                self._syncing = None
                done.set()
        if self._metadata_durable is not None:
            await self._metadata_durable()

    # ---------------------------------------------------------------- kernel caches
    async def changed_entry(self, parent: int, name: bytes) -> None:
        """An entry of `parent` was added, replaced or removed behind the kernel's back: the
        kernel has forgotten it when this returns (before the request is answered)."""
        if self._invalidate_entry is not None:
            with trio.move_on_after(INVALIDATE_TIMEOUT):
                await trio.to_thread.run_sync(self._invalidate_entry, parent, name, abandon_on_cancel=True)
        self.changed_attrs(parent)

    def changed_attrs(self, ino: int) -> None:
        self.core.data.tell_attrs_changed([ino])

    # ---------------------------------------------------------------- lookups
    def child(self, parent: int, name: bytes) -> Inode | None:
        try:
            return self.core.lookup(parent, name)
        except S3fuseError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def bucket(self, name: str, who: Caller) -> Inode:
        raw = name.encode("utf-8", "surrogateescape")
        root = self.core.attr(ROOT_INODE)
        if not allowed(root, who, SEARCH):
            raise S3Error("AccessDenied", "access denied to the mount's top directory")
        row = None
        if raw and b"/" not in raw and b"\0" not in raw and raw not in (b".", b"..") and len(raw) <= 255:
            row = self.child(ROOT_INODE, raw)
        if row is None or not stat.S_ISDIR(row.mode):
            raise S3Error("NoSuchBucket", "the specified bucket does not exist", bucketName=name)
        return row

    def walk(self, bucket: Inode, parts: list[bytes], who: Caller) -> tuple[Inode, Inode | None]:
        """-> (the directory holding the last segment, the entry or None); search permission
        is needed on every directory walked."""
        cur = bucket
        for i, name in enumerate(parts):
            if not stat.S_ISDIR(cur.mode):
                raise S3Error("NoSuchKey", "the specified key does not exist")
            if not allowed(cur, who, SEARCH):
                raise S3Error("AccessDenied", f"no search permission on {self.path(cur.id)}")
            row = self.child(cur.id, name)
            if i == len(parts) - 1:
                return cur, row
            if row is None:
                raise S3Error("NoSuchKey", "the specified key does not exist")
            cur = row
        raise AssertionError("no segments")

    def path(self, ino: int) -> str:
        return self.core.meta.path_of(ino)

    # ---------------------------------------------------------------- changes
    async def make_parents(self, bucket: Inode, parts: list[bytes], who: Caller) -> Inode:
        """The directory for the last segment, creating the ones missing (as mkdir -p)."""
        cur = bucket
        for i, name in enumerate(parts[:-1]):
            if not allowed(cur, who, SEARCH):
                raise S3Error("AccessDenied", f"no search permission on {self.path(cur.id)}")
            row = self.child(cur.id, name)
            if row is None:
                if not allowed(cur, who, WRITE | SEARCH):
                    raise S3Error("AccessDenied", f"no write permission on {self.path(cur.id)}")
                try:
                    row = self.core.mkdir(cur.id, name, 0o755, who)
                except S3fuseError as exc:
                    raise from_errno(exc.errno, str(exc)) from None
                await self.changed_entry(cur.id, name)
            elif not stat.S_ISDIR(row.mode):
                prefix = b"/".join(parts[: i + 1]).decode("utf-8", "replace")
                raise S3Error("InvalidRequest", f"the key's prefix {prefix!r} is an object (a file), so no "
                              f"key can be under {prefix + '/'!r}: a file cannot also be a directory")
            cur = row
        return cur

    def check_may_replace(self, parent: Inode, who: Caller, existing: Inode | None) -> None:
        if not allowed(parent, who, WRITE | SEARCH):
            raise S3Error("AccessDenied", f"no write permission on {self.path(parent.id)}")
        if (existing is not None and parent.mode & stat.S_ISVTX and who.uid not in (0, parent.uid, existing.uid)):
            raise S3Error("AccessDenied", f"{self.path(parent.id)} is sticky and the object is not yours")

    async def remove(self, parent: Inode, name: bytes, row: Inode, who: Caller) -> None:
        self.check_may_replace(parent, who, row)
        try:
            if stat.S_ISDIR(row.mode):
                self.core.rmdir(parent.id, name)
            else:
                self.core.unlink(parent.id, name)
        except S3fuseError as exc:
            raise from_errno(exc.errno, str(exc)) from None
        await self.changed_entry(parent.id, name)

    async def prune_empty(self, bucket: Inode, parts: list[bytes], who: Caller) -> None:
        """After a delete: directories left empty go too, up to the bucket, as an S3 prefix
        exists only while something is under it."""
        for depth in range(len(parts) - 1, 0, -1):
            try:
                parent, row = self.walk(bucket, parts[:depth], who)
            except S3Error:
                return
            if row is None or not stat.S_ISDIR(row.mode) or self.core.meta.has_entries(row.id):
                return
            if not allowed(parent, who, WRITE | SEARCH):
                return
            try:
                self.core.rmdir(parent.id, parts[depth - 1])
            except S3fuseError:
                return
            await self.changed_entry(parent.id, parts[depth - 1])

    def temp_name(self) -> bytes:
        return TEMP_PREFIX + os.urandom(12).hex().encode()

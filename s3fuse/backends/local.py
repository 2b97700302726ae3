"""A local-directory object store: objects/ab/<key>, written by temp file + rename.

Deleted objects are recycled rather than unlinked: the file is moved to `.free/` and cut to
zero length, and a later small put writes into it and renames it into place. Creating a file
means allocating an inode, and on ext4 without a journal every inode freed in the last minute
or so is skipped, one inode-table lookup each (`recently_deleted`), so that creates right after
a mass delete cost several times their CPU (docs/BENCH.md). Recycling needs no inode allocation and
no inode freeing, on any filesystem. RocksDB recycles its log files for the same reason."""

from __future__ import annotations

import errno
import mmap
import os
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from ..errors import BackendError
from ..util import syncfs
from ..workers import WorkerPool
from .base import BarrierFailed, Backend, NoSuchObject
from .direct import DirectWriter, aligned_buffer

# Objects this large are written with O_DIRECT (see direct.py). Small ones are not: a direct
# write waits for the disk, and a batch of small files is better served by buffered writes
# and the one syncfs after them.
DIRECT_MIN = 1 << 20

# Emptied files kept for reuse, at most (an inode and a directory entry each, no data).
RECYCLE_MAX = 16384


class LocalBackend(Backend):
    """Objects are files; `sync` is one syncfs(2) for every put since the last one."""

    def __init__(self, root: str, max_threads: int = 8, open_files: int = 128) -> None:
        self.root = root
        # recently read objects stay open, so that a read whose bytes are in the page cache
        # can be served on the event loop without a thread hand-off (see try_get_ranges)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._max_fds = open_files
        self._to_close: list[int] = []  # descriptors let go of, closed by the next read's thread
        self._deletes = 0  # objects deleted so far: a read that spans one does not keep its descriptor
        self._tmp = os.path.join(root, ".tmp")
        self._free = os.path.join(root, ".free")
        self._workers = WorkerPool(max_threads, "s3fuse-local")
        self._advised: dict[str, bool] = {}  # objects recently read ahead (`prefetch`), bounded
        self._stats = {"objects_read_ahead": 0, "direct_puts": 0, "objects_recycled": 0, "puts_recycled": 0}
        self._direct = DirectWriter(buffers=2)  # more puts at once fall back to buffered writes
        if not os.path.isdir(root):
            raise BackendError(f"object directory {root} does not exist", errno.ENOENT)
        os.makedirs(self._tmp, exist_ok=True)
        os.makedirs(self._free, mode=0o700, exist_ok=True)
        # names of empty files in .free/; deque's append and pop are atomic, so worker
        # threads share it without a lock and never take the same file twice
        self._recycled: deque[str] = deque(self._spares())

    def _spares(self) -> list[str]:
        """The files a previous run left in `.free/`, each made empty (a crash between moving
        an object there and emptying it leaves one that is not): puts write into them as
        they are."""
        names = os.listdir(self._free)
        for name in names:
            path = os.path.join(self._free, name)
            if os.stat(path).st_size:
                self._empty(path)
        return names

    @staticmethod
    def _empty(path: str) -> None:
        # Through a descriptor that is closed at once, not truncate(2) on the name: ext4
        # marks a file emptied by truncation, and the next close of that file starts its
        # write-back ("auto_da_alloc", for programs that replace a file by truncating it).
        # That close would otherwise be the next put's, in a worker thread, and cost it that
        # write-back. Closed here, with nothing to write back, the mark costs nothing.
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))

    @staticmethod
    def create(root: str) -> None:
        os.makedirs(os.path.join(root, ".tmp"), mode=0o700, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(root, f"{i:02x}"), mode=0o700, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    async def _run(self, fn, *args):
        try:
            return await self._workers.run(fn, *args)
        except FileNotFoundError:
            raise NoSuchObject(f"object {args[0] if args else ''} does not exist", errno.EIO) from None
        except OSError as exc:
            raise BackendError(f"local store: {exc}", exc.errno or errno.EIO) from exc

    def _put(self, key: str, data: bytes | list[bytes]) -> None:
        tmp = os.path.join(self._tmp, key)
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        size = sum(len(p) for p in parts)
        if size >= DIRECT_MIN and isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap) \
                and self._direct.write_aligned(tmp, data.obj, size):
            self._stats["direct_puts"] += 1
            os.rename(tmp, self._path(key))
            return
        if size >= DIRECT_MIN and self._direct.write(tmp, parts, size):
            self._stats["direct_puts"] += 1
            os.rename(tmp, self._path(key))
            return
        recycled = self._open_recycled()
        if recycled is not None:
            tmp, fd = recycled
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write_all(fd, data)
        except BaseException:
            # a failed put (ENOSPC, EIO) must not leave its partial copy taking up the space
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        os.rename(tmp, self._path(key))

    def _open_recycled(self) -> tuple[str, int] | None:
        """An emptied file from `.free/`, opened for writing, if there is one. It is never
        visible as an object until the rename after its new contents are written, exactly
        like a temporary file, and a crash meanwhile leaves it in `.free/`, garbage."""
        while True:
            try:
                name = self._recycled.pop()
            except IndexError:
                return None
            path = os.path.join(self._free, name)
            try:
                fd = os.open(path, os.O_WRONLY)  # empty (`_empty`): no O_TRUNC, no mark
            except FileNotFoundError:
                continue  # removed by hand: take the next
            self._stats["puts_recycled"] += 1
            return path, fd

    @staticmethod
    def _write_all(fd: int, data: bytes | list[bytes]) -> None:
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        for start in range(0, len(parts), 512):  # IOV_MAX is 1024
            chunk = parts[start : start + 512]
            want = sum(len(p) for p in chunk)
            done = os.writev(fd, chunk)
            if done < want:  # a short gather write: finish it piece by piece
                tail = memoryview(b"".join(chunk))[done:]
                while tail:
                    tail = tail[os.write(fd, tail) :]

    def buffer(self, size: int) -> bytearray | memoryview:
        """An object of DIRECT_MIN bytes or more is encrypted into page-aligned memory of its
        own, which its put writes with O_DIRECT as it is: no copy into a DirectWriter buffer,
        and the memory goes back to the kernel once the put is done, rather than staying in
        the heap among the write-back buffers (which it would fragment)."""
        if size < DIRECT_MIN or not self._direct.ok:
            return bytearray(size)
        return aligned_buffer(size)

    async def put(self, key: str, data: bytes | list[bytes]) -> None:
        await self._run(self._put, key, data)

    def _put_many(self, items: list[tuple[str, bytes | list[bytes]]], sync: bool) -> None:
        for key, data in items:
            self._put(key, data)
        if sync:
            try:
                syncfs(self.root)
            except OSError as exc:
                raise BarrierFailed(f"local store: sync: {exc}", exc.errno or errno.EIO) from exc

    async def put_many(self, items: list[tuple[str, bytes]], sync: bool = False) -> None:
        # one thread hand-off for a batch of small objects (and the barrier after them): the
        # hand-off costs more than the I/O
        if items:
            await self._run(self._put_many, items, sync)
        elif sync:
            await self.sync()

    def _get_ranges(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes | memoryview]:
        return self._read_ranges(key, ranges, False, [])[0]

    def _read_ranges(self, key: str, ranges: list[tuple[int, int | None]], keep: bool,
                     to_close: list[int]) -> tuple[list[bytes | memoryview], int | None]:
        """In a worker thread: the ranges, and the object's descriptor if `keep` (the loop then
        keeps it for later non-blocking reads instead of opening the object again). First
        closes `to_close`, descriptors the loop let go of, so that the loop makes neither call."""
        for old in to_close:
            os.close(old)
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            if len(ranges) == 2 and ranges[0][1] is not None and ranges[0][0] + ranges[0][1] == ranges[1][0] \
                    and ranges[1][1] is not None:
                # a header and the segments right after it: one read (one system call less);
                # the segments as a view of it, not a copy of up to a whole block
                (off, n), (_, m) = ranges
                both = os.pread(fd, n + m, off)
                out = [both[:n], memoryview(both)[n:]]
            else:
                out = []
                for off, n in ranges:
                    if n is None:
                        n = os.fstat(fd).st_size - off
                    out.append(os.pread(fd, n, off))
        except BaseException:
            os.close(fd)
            raise
        if keep:
            return out, fd
        os.close(fd)
        return out, None

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return (await self._run(self._get_ranges, key, [(offset, length)]))[0]

    async def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes | memoryview]:
        return await self._read_and_keep(key, ranges, None)

    async def _read_and_keep(self, key: str, ranges: list[tuple[int, int]], transform):
        """Read in a worker thread (and `transform` there), keeping the object open afterwards
        for later non-blocking reads (`try_get_ranges`)."""
        keep = key not in self._fds
        deletes = self._deletes
        to_close, self._to_close = self._to_close, []
        started = []

        def job(key: str):
            started.append(True)
            out, fd = self._read_ranges(key, ranges, keep, to_close)
            if transform is None:
                return out, fd
            try:
                return transform(out), fd
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise

        try:
            out, fd = await self._run(job, key)
        except BaseException:
            if not started:  # cancelled before the hand-off: the descriptors wait for the next read
                self._to_close.extend(to_close)
            raise
        if fd is not None:
            if key in self._fds or self._deletes != deletes:
                # opened twice meanwhile, or an object deleted meanwhile (its file may be
                # recycled): this descriptor is not kept
                self._to_close.append(fd)
            else:
                self._fds[key] = fd
                while len(self._fds) > self._max_fds:
                    self._to_close.append(self._fds.popitem(last=False)[1])
        return out

    def prefetch(self, key: str) -> None:
        """A sequential reader will want this object soon: have the kernel read it into its page
        cache in the background (POSIX_FADV_WILLNEED), so that the disk works ahead of the reader
        as it would for one large file. Never blocks the loop and never fails."""
        if self._advised.get(key) is None:
            self._advised[key] = True
            while len(self._advised) > 64:
                del self._advised[next(iter(self._advised))]
            self._workers.submit(self._willneed, key)

    def _willneed(self, key: str) -> None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError:
            return  # gone meanwhile: the read finds out for itself
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            self._stats["objects_read_ahead"] += 1
        except OSError:
            pass
        finally:
            os.close(fd)

    def try_get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """The ranges, if they can be read now without blocking; else None.

        Only for objects already open, and only from the page cache (RWF_NOWAIT): a
        read that would wait for the disk goes to a worker thread instead.
        """
        fd = self._fds.get(key)
        if fd is None:
            return None
        self._fds.move_to_end(key)
        out = []
        try:
            for off, n in ranges:
                buf = bytearray(n)
                got = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
                if got != n:
                    return None  # short (truncated object or partly cached): the slow path decides
                out.append(bytes(buf))
        except (BlockingIOError, OSError):
            return None
        return out

    def forget_fd(self, key: str) -> None:
        self._deletes += 1
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    async def get_ranges_and(self, key: str, ranges: list[tuple[int, int]], transform):
        return await self._read_and_keep(key, ranges, transform)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if len(self._recycled) < RECYCLE_MAX:
                # moved out of the object namespace first (atomically, like an unlink), then
                # emptied: no ciphertext stays behind, and the inode waits for the next put
                spare = os.path.join(self._free, key)
                os.rename(path, spare)
                self._empty(spare)
                self._recycled.append(key)
                self._stats["objects_recycled"] += 1
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass

    async def delete(self, key: str) -> None:
        self.forget_fd(key)
        await self._run(self._delete, key)

    def _delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self._delete(key)

    async def delete_many(self, keys: list[str]) -> None:
        # one thread hand-off for the batch: the collector deletes up to 256 objects at once,
        # and a hand-off each cost more CPU on the event loop than the deletes themselves
        for key in keys:
            self.forget_fd(key)
        if keys:
            await self._run(self._delete_many, keys)

    def _head(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None

    async def head(self, key: str) -> int | None:
        return await self._run(self._head, key)

    def _list_dir(self, sub: str) -> list[str]:
        try:
            return os.listdir(os.path.join(self.root, sub))
        except FileNotFoundError:
            return []

    async def list(self) -> AsyncIterator[str]:
        for i in range(256):
            for name in await self._run(self._list_dir, f"{i:02x}"):
                yield name

    async def sync(self) -> None:
        await self._run(syncfs, self.root)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    async def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        while self._to_close:
            os.close(self._to_close.pop())

    def clear_tmp(self) -> None:
        """Remove half-written puts left by a crash (never visible as objects)."""
        for name in os.listdir(self._tmp):
            os.unlink(os.path.join(self._tmp, name))

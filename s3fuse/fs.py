"""The pyfuse3 adapter: converts between pyfuse3 and the filesystem core.

This is the one error-translation boundary: an `S3fuseError` becomes its errno, an
unexpected exception is logged with its traceback and becomes EIO, and the mount
stays up. Nothing else in s3fuse knows about pyfuse3.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat

import pyfuse3
import trio

from .core import Filesystem
from .crypto import Caller
from .errors import S3fuseError
from .meta import Inode
from .policy import XATTR_KMS_VERSION

log = logging.getLogger(__name__)

# How long the kernel may trust the attributes and names it was given. Every change of a
# name or attribute goes through the kernel, which updates or drops what it caches, except
# st_blocks after a background flush: the data path invalidates those (DataStore.mounted hands it the pusher).
# So the timeout can be long, as in S3QL, and a file that is stat'ed or opened again costs
# no LOOKUP or GETATTR round trip.
ATTR_TIMEOUT = 300.0
# Reported as st_blksize: tools size their I/O by it, and larger requests are cheaper here.
IO_BLOCK = 128 * 1024


def _translate(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        self.requests += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except S3fuseError as exc:
            log.debug("%s%r: %s (errno %d)", fn.__name__, args[:2], exc, exc.errno)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s%r; returning EIO", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


def entry(row: Inode) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = row.id
    a.generation = 0
    a.entry_timeout = ATTR_TIMEOUT
    a.attr_timeout = ATTR_TIMEOUT
    a.st_mode = row.mode
    a.st_nlink = row.nlink
    a.st_uid = row.uid
    a.st_gid = row.gid
    a.st_rdev = row.rdev
    a.st_size = 4096 if stat.S_ISDIR(row.mode) else row.size
    a.st_blksize = IO_BLOCK
    a.st_blocks = 8 if stat.S_ISDIR(row.mode) else -(-row.stored_bytes // 512)
    a.st_atime_ns = row.atime_ns
    a.st_mtime_ns = row.mtime_ns
    a.st_ctime_ns = row.ctime_ns
    return a


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = True

    def __init__(self, core: Filesystem, statfs_source=None) -> None:
        super().__init__()
        self.requests = 0  # FUSE requests handled: the daemon trims its heap when this stands still
        self.core = core
        self.statfs_source = statfs_source
        # an S3 store's: returns once the committed metadata is in the bucket (fsync's promise)
        self.metadata_durable = None
        # open handles: reads carry no request context, so each handle remembers its opener
        self.handles: dict[int, tuple[int, Caller]] = {}
        self._writers: set[int] = set()  # handles opened for writing: told of write-back failures
        self._next_handle = 1

    def _new_handle(self, ino: int, caller: Caller, flags: int = os.O_RDWR) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self.handles[fh] = (ino, caller)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writers.add(fh)
        return fh

    # namespace
    @_translate
    async def lookup(self, parent_inode, name, ctx):
        row = self.core.find(parent_inode, name)
        if row is None:
            # st_ino 0: the kernel caches the miss; every change goes through it anyway
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = ATTR_TIMEOUT
            return miss
        self.core.remember(row.id)
        return entry(row)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            try:
                self.core.forget(ino, count)
            except Exception:
                log.exception("forget(%d) failed", ino)

    @_translate
    async def getattr(self, inode, ctx):
        return entry(self.core.attr(inode))

    @_translate
    async def setattr(self, inode, attr, fields, fh, ctx):
        row = await self.core.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            caller=_caller(ctx) if fh is None and fields.update_size else None,
            defer=True,
        )
        return entry(row)

    @_translate
    async def readlink(self, inode, ctx):
        return self.core.readlink(inode)

    @_translate
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        row = await self.core.mknod(parent_inode, name, mode, rdev, _caller(ctx), defer=True)
        self.core.remember(row.id)
        return entry(row)

    @_translate
    async def mkdir(self, parent_inode, name, mode, ctx):
        row = self.core.mkdir(parent_inode, name, mode, _caller(ctx), defer=True)
        self.core.remember(row.id)
        return entry(row)

    @_translate
    async def unlink(self, parent_inode, name, ctx):
        self.core.unlink(parent_inode, name, defer=True)

    @_translate
    async def rmdir(self, parent_inode, name, ctx):
        self.core.rmdir(parent_inode, name, defer=True)

    @_translate
    async def symlink(self, parent_inode, name, target, ctx):
        row = self.core.symlink(parent_inode, name, target, _caller(ctx), defer=True)
        self.core.remember(row.id)
        return entry(row)

    @_translate
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.core.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, defer=True)

    @_translate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        row = self.core.link(inode, new_parent_inode, new_name, defer=True)
        self.core.remember(row.id)
        return entry(row)

    # files
    @_translate
    async def open(self, inode, flags, ctx):
        caller = _caller(ctx)
        await self.core.open(inode, flags, caller)
        return pyfuse3.FileInfo(fh=self._new_handle(inode, caller, flags), keep_cache=True)

    @_translate
    async def create(self, parent_inode, name, mode, flags, ctx):
        caller = _caller(ctx)
        row = await self.core.create(parent_inode, name, mode, caller, defer=True)
        self.core.remember(row.id)
        return pyfuse3.FileInfo(fh=self._new_handle(row.id, caller), keep_cache=True), entry(row)

    @_translate
    async def read(self, fh, off, size):
        ino, caller = self.handles[fh]
        return await self.core.read(ino, off, size, caller)

    @_translate
    async def write(self, fh, off, buf):
        return await self.core.write(self.handles[fh][0], off, buf)

    async def flush(self, fh):
        # ENOSYS: the kernel then never sends FLUSH again, saving a round trip per close(2).
        # With the write-back cache it still writes a file's dirty pages to us before close
        # returns (failures of those writes are close's errors); our own store of the data
        # happens later in the background, as ext4's delayed allocation does, and a failure
        # of it is reported by the file's next fsync, or a write that waits for room
        # (DataStore.take_error).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translate
    async def release(self, fh):
        ino, _ = self.handles.pop(fh)
        writer = fh in self._writers
        self._writers.discard(fh)
        self.core.release(ino, writer)

    @_translate
    async def fsync(self, fh, datasync):
        await self.core.fsync(self.handles[fh][0])
        if self.metadata_durable is not None:
            await self.metadata_durable()

    # directories
    @_translate
    async def opendir(self, inode, ctx):
        row = self.core.attr(inode)
        if not stat.S_ISDIR(row.mode):
            raise S3fuseError("not a directory", errno.ENOTDIR)
        return inode

    @_translate
    async def readdir(self, fh, start_id, token):
        # Cursors: 1 and 2 are "." and ".."; an entry's cursor is its dentry id + 2.
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", entry(self.core.attr(fh)), 1):
                return
        if start_id <= 1:
            if not pyfuse3.readdir_reply(token, b"..", entry(self.core.lookup(fh, b"..")), 2):
                return
        cursor = max(0, start_id - 2)
        while True:
            rows = self.core.readdir(fh, cursor)
            if not rows:
                return
            for cur, name, row in rows:
                if not pyfuse3.readdir_reply(token, name, entry(row), cur + 2):
                    return
                self.core.remember(row.id)
                cursor = cur

    async def releasedir(self, fh):
        pass

    @_translate
    async def fsyncdir(self, fh, datasync):
        self.core.commit_now()
        await trio.to_thread.run_sync(self.core.meta.sync)
        if self.metadata_durable is not None:
            await self.metadata_durable()

    @_translate
    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        src = os.statvfs(self.statfs_source) if self.statfs_source else None
        st.f_bsize = 4096
        st.f_frsize = 4096
        if src is not None:
            scale = src.f_frsize / 4096
            st.f_blocks = int(src.f_blocks * scale)
            st.f_bfree = int(src.f_bfree * scale)
            st.f_bavail = int(src.f_bavail * scale)
        files = self.core.meta.inode_count()
        st.f_files = files + 1_000_000
        st.f_ffree = st.f_favail = 1_000_000
        st.f_namemax = 255
        return st

    # xattrs
    async def getxattr(self, inode, name, ctx):
        # hot path, kept off the generic wrapper: ls -l probes two absent names per file, and
        # the kernel asks for security.capability before every write(2)
        if self.core.xattr_absent(inode, name):
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            if name == XATTR_KMS_VERSION:  # may ask a network KMS
                return await self.core.kms_version_xattr(inode)
            return self.core.getxattr(inode, name)
        except S3fuseError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in getxattr(%d, %r); returning EIO", inode, name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_translate
    async def setxattr(self, inode, name, value, ctx):
        await self.core.setxattr(inode, name, value, _caller(ctx))

    @_translate
    async def listxattr(self, inode, ctx):
        return self.core.listxattr(inode)

    @_translate
    async def removexattr(self, inode, name, ctx):
        self.core.removexattr(inode, name, _caller(ctx))

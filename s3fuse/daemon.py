"""The mount daemon: opens a store, mounts it, serves FUSE and control requests, stops cleanly.

Start-up: lock the store, unseal the keyring, reclaim what an unclean stop left
(orphan inodes, objects put but never committed), mount. Stop (unmount, SIGTERM,
SIGINT, or an `unmount` control request): flush every buffered byte and the
metadata, mark the store clean, exit.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from .audit import AuditLog
from .backends import open_backend
from .control import protocol
from .control.admin import AdminHandlers
from .control.server import ControlServer, Peer
from .core import Filesystem
from .crypto import KeyManager
from .data import DataStore
from .errors import S3fuseError
from .fs import Operations
from .keys.customer import CustomerKeys
from .keys.router import open_kms
from .meta import Meta
from .policy import Policy
from .rotation import MasterKeys
from .store import StoreLock, load_config, load_keyring, obtain_root_key, remove_stale_key_files
from .util import syncfs

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class MountOptions:
    allow_other: bool = False
    dirty_limit: int = 64 << 20
    cache_limit: int = 32 << 20
    readahead_kb: int = 8192  # two blocks: keeps several 1 MiB reads in flight
    # issue-4: SSE-S3 master-key rotation (None: the store's setting in store.json)
    rotation_interval: float | None = None  # seconds between scheduled rotations; 0 = never
    rewrap_batch: int | None = None  # key slots re-wrapped per transaction
    rewrap_rate: float | None = None  # key slots re-wrapped per second at most; 0 = unthrottled


def check_mountpoint(mountpoint: str) -> str:
    mnt = os.path.realpath(mountpoint)
    if not os.path.exists(mnt):
        raise S3fuseError(f"mount point {mnt} does not exist", errno.ENOENT)
    if not os.path.isdir(mnt):
        raise S3fuseError(f"mount point {mnt} is not a directory", errno.ENOTDIR)
    if os.path.ismount(mnt):
        raise S3fuseError(f"{mnt} is already a mount point", errno.EBUSY)
    if os.listdir(mnt):
        raise S3fuseError(f"mount point {mnt} is not empty", errno.ENOTEMPTY)
    return mnt


def disable_core_dumps() -> None:
    """Keys live in this process's memory: never let them reach a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    PR_SET_DUMPABLE = 4
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def bound_allocator() -> None:
    """Keep glibc from multiplying heap arenas across worker threads.

    Block buffers are reused from the heap (fresh mappings cost a page fault per 4 KiB,
    which halves copy speed here); with one arena per thread, each would keep its own
    high-water mark and RSS would grow with the thread count.
    """
    M_ARENA_MAX = -8
    try:
        _libc.mallopt(M_ARENA_MAX, 2)
    except AttributeError:  # not glibc
        pass


def _set_readahead(mountpoint: str, kb: int) -> None:
    """Raise the kernel's read-ahead for this mount (the FUSE default is 128 KiB)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == mountpoint:
                    dev = fields[2]
                    with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as out:
                        out.write(str(kb))
                    return
    except OSError as exc:
        log.info("could not raise read-ahead for %s: %s", mountpoint, exc)


class Daemon:
    def __init__(self, store_path: str, mountpoint: str, options: MountOptions,
                 root_key: bytes | None = None) -> None:
        self.cfg = load_config(store_path)
        self._root_key = root_key
        self.mountpoint = check_mountpoint(mountpoint)
        self.options = options
        self.lock = StoreLock(self.cfg)
        self.control_path = protocol.socket_path(self.mountpoint)
        self._stopping = False

    def open(self) -> None:
        self.lock.acquire(self.mountpoint)
        root_key = self._root_key if self._root_key is not None else obtain_root_key(self.cfg)
        self._root_key = None
        keyring = load_keyring(self.cfg, root_key)
        stale = remove_stale_key_files(self.cfg)
        if stale:
            log.info("removed sealed files of another root-key generation: %s", ", ".join(stale))
        self.meta = Meta(self.cfg.meta_path)
        self.backend = open_backend(self.cfg.path, {"backend": self.cfg.backend})
        self.audit = AuditLog.open(self.cfg.audit_path)
        kms = open_kms(self.cfg, root_key, getattr(self.options, "kms", None))
        self.keys = KeyManager(self.cfg.store_id, keyring, kms=kms, customer=CustomerKeys(), audit=self.audit)
        self.data = DataStore(
            self.meta, self.backend, self.keys, self.cfg.store_id, self.cfg.block_size,
            self.cfg.segment_size, dirty_limit=self.options.dirty_limit,
            cache_limit=self.options.cache_limit)
        self.core = Filesystem(self.meta, self.data, self.keys, self.cfg.block_size,
                               default_policy=Policy(self.cfg.default_sse))
        self.admin = AdminHandlers(self)
        o = self.options
        self.master = MasterKeys(
            self.cfg, root_key, self.meta, self.data, self.keys,
            interval=self.cfg.rotation_interval if o.rotation_interval is None else o.rotation_interval,
            batch=self.cfg.rewrap_batch if o.rewrap_batch is None else o.rewrap_batch,
            rate=self.cfg.rewrap_rate if o.rewrap_rate is None else o.rewrap_rate,
            forget_cached_keys=self.admin._forget_cached_keys)
        self.ops = Operations(self.core, statfs_source=self.cfg.path)

    async def recover(self) -> None:
        clean = self.meta.get_state("clean", 1)
        with self.meta.transaction():
            self.meta.set_state("clean", 0)
        orphans = self.core.reclaim_orphans()
        if orphans:
            log.info("reclaimed %d inodes that were deleted while open", orphans)
        if not clean:
            log.warning("the store was not unmounted cleanly; collecting unreferenced objects")
            if hasattr(self.backend, "clear_tmp"):
                self.backend.clear_tmp()
            removed = await self.data.sweep_unreferenced()
            log.info("removed %d unreferenced objects", removed)
        await self.data.collect_garbage()

    async def run(self, ready: Callable[[str | None], None]) -> None:
        await self.recover()
        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {"fsname=s3fuse", "subtype=s3fuse"}
        if self.options.allow_other:
            fuse_options.add("allow_other")
        try:
            pyfuse3.init(self.ops, self.mountpoint, fuse_options)
        except RuntimeError as exc:
            raise S3fuseError(f"could not mount on {self.mountpoint}: {exc}", errno.EIO) from None
        unmounted = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.data.flusher)
                nursery.start_soon(self.data.collector)
                nursery.start_soon(self.master.scheduler, self.admin.kms_tick)
                nursery.start_soon(self.master.sweeper)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                await nursery.start(ControlServer(self.control_path, self._handlers()).serve)
                async with trio.open_nursery() as fuse:
                    fuse.start_soon(pyfuse3.main)
                    # the kernel applies its read-ahead cap when INIT completes, which a stat waits for
                    await trio.to_thread.run_sync(os.stat, self.mountpoint)
                    _set_readahead(self.mountpoint, self.options.readahead_kb)
                    log.info("mounted %s on %s", self.cfg.path, self.mountpoint)
                    ready(None)
                unmounted = True
                nursery.cancel_scope.cancel()
        finally:
            stored = await self._final_flush()
            pyfuse3.close(unmount=not unmounted or self._stopping)
            self.lock.release()
            if stored:
                log.info("stopped; all data stored")
            else:
                log.error("stopped; written data that could not be stored is lost (see above)")

    async def _final_flush(self) -> bool:
        """Store everything and mark the store clean; False if some data could not be stored
        (the store then stays marked unclean, and the next mount collects what was left)."""
        with trio.CancelScope(shield=True):
            stored = True
            try:
                await self.data.flush_all(durable=True)
            except S3fuseError as exc:
                stored = False
                lost = [fs.ino for fs in self.data.files.values() if fs.dirty]
                log.error("final flush failed: unstored writes to inode(s) %s: %s",
                          ",".join(map(str, lost[:20])) or "?", exc)
            except Exception:
                stored = False
                log.exception("final flush failed: the next mount will recover")
            try:
                self.core.forget_all()
                await self.data.collect_garbage()
                self.audit.sync()
                with self.meta.transaction():
                    # the audit trail's head, so that `audit verify` also catches a cut tail
                    self.meta.set_state("audit_head", self.audit.head)
                    self.meta.set_state("audit_seq", self.audit.seq)
                    self.meta.set_state("clean", 1 if stored else 0)
                self.meta.close()
                await self.backend.close()
                self.keys.customer.clear()
                self.audit.close()
            except Exception:
                stored = False
                log.exception("final flush failed: the next mount will recover")
            return stored

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: flushing and unmounting", signal.Signals(signum).name)
                await self.stop()
                return

    async def stop(self) -> None:
        """Flush everything, then end the FUSE session (the caller unmounts)."""
        if self._stopping:
            return
        self._stopping = True
        # let the kernel hand us the dirty pages it still holds for this mount
        try:
            await trio.to_thread.run_sync(syncfs, self.mountpoint)
        except OSError as exc:
            log.warning("syncfs of %s failed (%s); flushing what the daemon holds", self.mountpoint, exc)
        try:
            await self.data.flush_all(durable=True)
        except S3fuseError as exc:
            log.error("flush before unmounting failed (tried again at the final flush): %s", exc)
        pyfuse3.terminate()

    # control requests
    def _handlers(self):
        return {
            "status": self._status,
            "flush": self._flush,
            "unmount": self._unmount,
            **self.admin.handlers(),
        }

    def _require_owner(self, peer: Peer) -> None:
        if peer.uid not in (0, os.getuid()):
            raise S3fuseError("only root or the user who mounted may do this", errno.EPERM)

    async def _status(self, peer: Peer, args: dict) -> dict:
        d = self.data
        return {
            "store": self.cfg.path,
            "mountpoint": self.mountpoint,
            "pid": os.getpid(),
            "objects": self.meta.object_count(),
            "inodes": self.meta.inode_count(),
            "dirty_bytes": d.dirty_bytes,
            "cache_bytes": d.cache.used,
            "open_files": len(d.files),
            "master_key_version": self.keys.keyring.current,
            "customer_keys": len(self.keys.customer.list(0)),
            "audit_log": self.cfg.audit_path,
            **self.master.status(),
            **{k: v for k, v in d.stats.items()},
        }

    async def _flush(self, peer: Peer, args: dict) -> None:
        self._require_owner(peer)
        await self.data.flush_all(durable=True)

    async def _unmount(self, peer: Peer, args: dict) -> dict:
        self._require_owner(peer)
        await self.data.flush_all(durable=True)
        return {"pid": os.getpid()}


def run_foreground(store_path: str, mountpoint: str, options: MountOptions,
                   ready: Callable[[str | None], None], root_key: bytes | None = None) -> None:
    """Run the daemon until unmounted; raises S3fuseError for start-up failures.

    `root_key` is the checked root key (from `store.obtain_root_key`); None: obtain it
    here from the store's recorded source."""
    disable_core_dumps()
    bound_allocator()
    daemon = Daemon(store_path, mountpoint, options, root_key)
    daemon.open()
    trio.run(daemon.run, ready)

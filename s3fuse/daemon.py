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
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import defaults, fuseloop, policy
from .audit import AuditLog
from .backends import Backend, open_backend
from .control import protocol
from .control.admin import AdminHandlers
from .control.server import ControlServer, Peer
from .core import Filesystem
from .crypto import KeyManager
from .data import DataStore
from .errors import S3fuseError
from .fs import Operations
from .keys.customer import CustomerKeys
from .keys.kms import KmsProvider
from .keys.router import open_kms
from .meta import Meta
from .notify import Notifier
from .pagecache import PageCachePusher
from .policy import Policy
from .recovery import RecoveryArea
from .rotation import MasterKeys
from .keys import generation as keygen
from .s3api.credentials import AccessKeys
from .s3api.service import S3Service
from .store import StoreLock, load_config, load_keyring, obtain_root_key, open_meta, remove_stale_key_files
from .util import syncfs

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)


STATUS_INTERVAL = 15.0  # seconds between STATUS= updates for `systemctl status`


@dataclass
class MountOptions:
    allow_other: bool = defaults.ALLOW_OTHER
    dirty_limit: int = defaults.DIRTY_LIMIT
    cache_limit: int = defaults.CACHE_LIMIT
    readahead_kb: int = defaults.READAHEAD_KB
    # SSE-S3 master-key rotation (None: the store's setting in store.json)
    rotation_interval: float | None = None  # seconds between scheduled rotations; 0 = never
    rewrap_batch: int | None = None  # key slots re-wrapped per transaction
    rewrap_rate: float | None = None  # key slots re-wrapped per second at most; 0 = unthrottled
    # from the configuration file (docs/CONFIG.md); None keeps the store's own setting
    audit_path: str | None = None
    default_sse: str | None = None
    kms: dict | None = None  # KMS provider settings overriding the store's (consumed by the KMS providers)
    backend_overrides: dict = field(default_factory=dict)  # merged over store.json "backend"
    s3_api: object | None = None  # s3api.service.Settings: serve the S3 API (docs/S3API.md)



@dataclass
class _MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_entry(path: str) -> _MountEntry | None:
    """The topmost mount on `path`, from /proc/self/mountinfo (works on dead FUSE mounts too)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == path:
                found = _MountEntry(path, fields[sep + 1], _unescape_mountinfo(fields[sep + 2]))
    return found


def _is_dead(path: str) -> bool:
    # statfs always reaches the daemon; stat may be answered from the kernel's attribute
    # cache for a while after the daemon died
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def clear_stale_mount(mnt: str) -> bool:
    """Lazily unmount a dead s3fuse mount on `mnt` (its daemon crashed); True if there was one.

    Only a mount of type fuse.s3fuse whose connection is gone (ENOTCONN) is touched:
    a live mount, or anything else mounted there, is left alone for check_mountpoint
    to refuse.
    """
    entry = mount_entry(mnt)
    if entry is None or entry.fstype != "fuse.s3fuse" or not _is_dead(mnt):
        return False
    res = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
    if res.returncode != 0:
        reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        raise S3fuseError(f"{mnt} holds a dead s3fuse mount that could not be removed: {reason}", errno.EBUSY)
    log.warning("removed the dead s3fuse mount left on %s by a daemon that did not stop cleanly", mnt)
    return True


def check_mountpoint(mountpoint: str) -> str:
    mnt = os.path.realpath(mountpoint)
    clear_stale_mount(mnt)
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
    """Keep glibc from multiplying heap arenas across worker threads, and keep block-sized
    buffers in the heap.

    Block buffers (a 4 MiB object read, a 1 MiB reply) are reused from the heap: a fresh
    mapping costs a page fault and a zeroed page per 4 KiB, which halves copy speed here.
    glibc's default maps each allocation above 128 KiB and unmaps it on free, adapting that
    threshold only as it sees frees; it is fixed at 8 MiB, with up to 32 MiB of free heap kept
    rather than returned. With one arena per thread, each would keep its own high-water mark
    and RSS would grow with the thread count; with two, the write path's buffers (loop thread)
    and ciphertext (worker threads) fragmented two heaps. So: one arena (docs/BENCH.md has the
    measurements).
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    try:
        _libc.mallopt(M_ARENA_MAX, 1)
        _libc.mallopt(M_MMAP_THRESHOLD, 8 << 20)
        _libc.mallopt(M_TRIM_THRESHOLD, 32 << 20)
    except AttributeError:  # not glibc
        pass


HEAP_IDLE_SECONDS = 2.0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_usage() -> dict[str, int]:
    """glibc's heap: bytes in use and bytes free but still held (for `s3fuse status`)."""
    fn = getattr(_libc, "mallinfo2", None)
    if fn is None:  # not glibc, or glibc < 2.33
        return {}
    fn.restype = _Mallinfo2
    info = fn()
    return {"heap_in_use": info.uordblks + info.hblkhd, "heap_free": info.fordblks}


async def trim_heap_when_idle(requests: Callable[[], int], busy: Callable[[], bool],
                              stats: dict) -> None:
    """Give the heap's free pages back to the kernel once the mount goes quiet.

    The heap keeps what a burst of work freed (see `bound_allocator`). A busy daemon reuses
    those pages; an idle one should not sit on them, and the next burst should start from what
    is live. `malloc_trim(0)` blocks the loop for a while, so it runs once per quiet spell: no
    FUSE request for `HEAP_IDLE_SECONDS` and no unwritten data.
    """
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:  # not glibc
        return
    last, trimmed = -1, True
    while True:
        await trio.sleep(HEAP_IDLE_SECONDS)
        seen = requests()
        if seen != last:
            last, trimmed = seen, False
        elif not trimmed and not busy():
            trim(0)
            trimmed = True
            stats["heap_trims"] += 1


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
    @staticmethod
    def wrap_backend(backend: Backend) -> Backend:
        """The object store as the daemon uses it: the store's own. The test harness's
        command (tests/faultd.py) replaces this to inject faults."""
        return backend

    def __init__(self, store_path: str, mountpoint: str, options: MountOptions,
                 root_key: bytes | None = None) -> None:
        self.cfg = load_config(store_path)
        self._root_key = root_key
        self.mountpoint = check_mountpoint(mountpoint)
        self.options = options
        self.lock = StoreLock(self.cfg)
        self.control_path = protocol.socket_path(self.mountpoint)
        self.audit_path = options.audit_path or self.cfg.audit_path
        self.notify = Notifier.from_environment()
        self._stopping = False
        self._announced_stop = False
        self._lost: list[int] = []  # inodes whose unstored data a stop could not keep

    def open(self) -> None:
        self.lock.acquire(self.mountpoint)
        root_key = self._root_key if self._root_key is not None else obtain_root_key(self.cfg)
        self._root_key = None
        backend_settings = {**self.cfg.backend, **self.options.backend_overrides}
        self.backend = self.wrap_backend(open_backend(self.cfg.path, {"backend": backend_settings}))
        self.s3 = None
        if self.cfg.backend.get("type") == "s3":
            # the bucket's lease first, then the newest metadata snapshot (docs/S3.md)
            from .s3store import S3Mount

            self.s3 = S3Mount(self.cfg, self.mountpoint, self.backend, backend_settings)
            self.s3.open(root_key)
        try:
            self._open_rest(root_key)
        except BaseException:
            if self.s3 is not None:
                self.s3.lease.release()
            raise

    def _open_rest(self, root_key: bytes) -> None:
        keyring = load_keyring(self.cfg, root_key)
        stale = remove_stale_key_files(self.cfg)
        if stale:
            log.info("removed sealed files of another root-key generation: %s", ", ".join(stale))
        self.meta = Meta(self.cfg.meta_path)
        if self.s3 is not None:
            self.s3.attach(self.meta)
        # a keyring.bin put back from before a rotation is refused here, before anything changes
        keygen.check(self.meta.get_state(keygen.STATE_KEY), keyring, self.cfg.store_id,
                     self.cfg.keyring_path)
        keyring = open_meta(self.cfg, self.meta, keyring, root_key)
        if self.s3 is not None:
            self.s3.publish_settings(self.cfg.raw)
        with self.meta.transaction():
            self.meta.set_state(keygen.STATE_KEY, keygen.record_value(keyring, self.cfg.store_id))
        self.audit = AuditLog.open(self.audit_path)
        kms = open_kms(self.cfg, root_key, self.options.kms)
        self.keys = KeyManager(self.cfg.store_id, keyring, kms=kms, customer=CustomerKeys(), audit=self.audit)
        self.data = DataStore(
            self.meta, self.backend, self.keys, self.cfg.store_id, self.cfg.block_size,
            self.cfg.segment_size, dirty_limit=self.options.dirty_limit,
            cache_limit=self.options.cache_limit)
        self.data.load_damaged()
        # the write-back buffer's worth, and some (requests let in together): what a stop may keep
        self.recovery = RecoveryArea(self.cfg.path, self.keys, self.options.dirty_limit + (8 << 20),
                                     allowed=self.s3.recovery_allowed if self.s3 is not None else None)
        self.core = Filesystem(self.meta, self.data, self.keys, self.cfg.block_size,
                               default_policy=self._default_policy(kms))
        o = self.options
        self.master = MasterKeys(
            self.cfg, root_key, self.meta, self.data, self.keys,
            interval=self.cfg.rotation_interval if o.rotation_interval is None else o.rotation_interval,
            batch=self.cfg.rewrap_batch if o.rewrap_batch is None else o.rewrap_batch,
            rate=self.cfg.rewrap_rate if o.rewrap_rate is None else o.rewrap_rate,
            forget_cached_keys=self.data.forget_cached_keys)
        self.admin = AdminHandlers(self.keys, self.data, self.meta, self.core, self.master,
                                   self.audit, self.audit_path, recovery=self.recovery)
        self.ops = Operations(self.core, statfs_source=self.cfg.path)
        if self.s3 is not None:
            self.ops.metadata_durable = self.s3.sync_metadata
        self.s3api = S3Service(
            self.core, AccessKeys.load(self.cfg.sealed_path("s3keys"), root_key, self.cfg.store_id),
            self.cfg.store_id, self.mountpoint, self.options.s3_api,
            invalidate_entry=_invalidate_entry, invalidate_attrs=_invalidate_attrs,
            metadata_durable=self.s3.sync_metadata if self.s3 is not None else None)
        self.heap_stats = {"heap_trims": 0}  # counted by trim_heap_when_idle
        self.pusher: PageCachePusher | None = None  # while mounted

    def _default_policy(self, kms: KmsProvider) -> Policy:
        """The encryption of files with no directory setting above them: the file's, else the store's."""
        if self.options.default_sse is None:
            return Policy(self.cfg.default_sse)
        mode, ref = policy.parse(self.options.default_sse.encode())
        if mode == policy.SSE_KMS:
            try:
                return Policy(mode, kms.resolve(ref))
            except S3fuseError as exc:
                raise S3fuseError(f"default_sse {self.options.default_sse}: {exc}", exc.errno) from None
        return Policy(mode, ref)

    async def recover(self) -> None:
        clean = self.meta.get_state("clean", 1)
        with self.meta.transaction():
            self.meta.set_state("clean", 0)
        orphans = self.core.reclaim_orphans()
        if orphans:
            log.info("reclaimed %d inodes that were deleted while open", orphans)
        if not clean:
            log.warning("the store was not unmounted cleanly; collecting unreferenced objects")
            self.backend.clear_tmp()
            if self.s3 is not None:
                removed, kept = await self.s3.sweep_unreferenced(self.meta)
                if kept:
                    log.info("kept %d unreferenced objects stored shortly before the bucket's newest "
                             "metadata: a record the previous holder did not ship may name them", kept)
            else:
                removed = await self.data.sweep_unreferenced()
            log.info("removed %d unreferenced objects", removed)
        await self.data.collect_garbage()

    async def run(self, ready: Callable[[str | None], None]) -> None:
        if self.notify.watchdog:
            # a system task on the same loop: if the loop hangs, the pings stop and systemd acts
            trio.lowlevel.spawn_system_task(self._watchdog)
        self.notify.status(f"Recovering {self.cfg.path}")
        await self.recover()
        # what earlier stops could not store is stored first, before any FUSE request
        await self.recovery.restore(self.data, self.meta)
        if self.options.s3_api is not None:
            await self.s3api.listen()
        fuse_options = {"fsname=s3fuse", "subtype=s3fuse"}
        if self.options.allow_other:
            fuse_options.add("allow_other")
        if self.options.allow_other or os.getuid() != 0:
            # The kernel checks modes and owners against the caller. It needs a directory's
            # attributes for that, and drops them at every change in it, so each create or
            # unlink costs a GETATTR of the parent. Without allow_other only the mounting user
            # reaches the mount at all; when that is root, who passes every such check, the
            # checks (and their round trips) are left out, as gocryptfs does.
            fuse_options |= set(pyfuse3.default_options)
        fuseloop.install()  # before init, which may create pyfuse3's lock
        try:
            pyfuse3.init(self.ops, self.mountpoint, fuse_options)
        except RuntimeError as exc:
            raise S3fuseError(f"could not mount on {self.mountpoint}: {exc}", errno.EIO) from None
        self.pusher = PageCachePusher(pyfuse3.notify_store, _invalidate_attrs)
        self.data.mounted(self.pusher)
        unmounted = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.data.flusher)
                nursery.start_soon(self.data.collector)
                nursery.start_soon(self.data.prefetcher)
                nursery.start_soon(self.data.merger)
                nursery.start_soon(trim_heap_when_idle, lambda: self.ops.requests,
                                   lambda: self.data.dirty_bytes > 0, self.heap_stats)
                nursery.start_soon(self.master.scheduler, self.admin.kms_tick)
                nursery.start_soon(self.master.sweeper)
                if self.s3 is not None:
                    nursery.start_soon(self.s3.lease.keep, self.backend.fence)
                    nursery.start_soon(self.s3.periodic, self.meta)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                await nursery.start(ControlServer(self.control_path, self._handlers()).serve)
                if self.options.s3_api is not None:
                    await nursery.start(self.s3api.serve)
                async with trio.open_nursery() as fuse:
                    fuse.start_soon(pyfuse3.main)
                    # the kernel applies its read-ahead cap when INIT completes, which a stat waits for
                    await trio.to_thread.run_sync(os.stat, self.mountpoint)
                    _set_readahead(self.mountpoint, self.options.readahead_kb)
                    log.info("mounted %s on %s", self.cfg.path, self.mountpoint)
                    ready(None)
                    self.notify.ready(self._status_line("Mounted"))
                    nursery.start_soon(self._report_status)
                unmounted = True
                nursery.cancel_scope.cancel()
        finally:
            self._announce_stop()
            stored = await self._final_flush()
            pusher, self.pusher = self.pusher, None
            self.data.unmounted()
            pusher.close()  # before the session it writes to goes away
            pyfuse3.close(unmount=not unmounted or self._stopping)
            self.lock.release()
            if stored:
                log.info("stopped; all data stored")
                self.notify.status(f"Stopped: all data of {self.cfg.path} stored, {self.mountpoint} unmounted")
            elif self._lost:
                log.error("stopped; the unstored data of inode(s) %s could not be kept and is lost "
                          "(marked damaged; see above)", ",".join(map(str, self._lost)))
                self.notify.status(f"Stopped: some written data of {self.cfg.path} is lost (see the log)")
            else:
                log.warning("stopped; data that could not be stored is kept in the recovery area and "
                            "stored at the next mount (see above)")
                self.notify.status(f"Stopped: unstored data of {self.cfg.path} kept for the next mount")

    def _status_line(self, state: str) -> str:
        """One line for `systemctl status`: what is mounted, how much, which keys."""
        d = self.data
        parts = [f"{state} {self.cfg.path} on {self.mountpoint}",
                 f"{self.meta.object_count()} objects",
                 f"{self.meta.inode_count()} inodes",
                 f"{d.dirty_bytes >> 20} MiB unflushed",
                 self._rotation_status()]
        return "; ".join(parts)

    def _rotation_status(self) -> str:
        """The master key's state from what the rotation task holds (no scan of the block map)."""
        m = self.master
        text = f"master key v{m.keyring.current}"
        due = m.next_rotation()
        text += (f", next rotation {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(due))}" if due
                 else ", no scheduled rotation")
        if m.sweeping or m.paused:
            done = int(self.meta.get_state("rewrap_done", 0) or 0)
            total = int(self.meta.get_state("rewrap_total", 0) or 0)
            text += f", re-wrap {'paused' if m.paused else 'running'} {done}/{max(done, total)}"
        return text

    async def _report_status(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            self.notify.status(self._status_line("Serving"))

    async def _watchdog(self) -> None:
        while True:
            self.notify.ping()
            await trio.sleep(self.notify.watchdog)

    def _announce_stop(self) -> None:
        if not self._announced_stop:
            self._announced_stop = True
            self.notify.stopping(f"Stopping: flushing {self.data.dirty_bytes >> 20} MiB and unmounting {self.mountpoint}")

    async def _final_flush(self) -> bool:
        """Store everything and mark the store clean; False if some data could not be stored
        (the store then stays marked unclean, and the next mount collects what was left)."""
        with trio.CancelScope(shield=True):
            stored = True
            reason = "the daemon failed"
            try:
                await self.data.flush_all(durable=True)
            except S3fuseError as exc:
                stored = False
                reason = str(exc)
            except Exception:
                stored = False
                log.exception("final flush failed: what it could not store is kept for the next mount")
            try:
                if not stored:
                    # kept, sealed, in the recovery area; marked damaged only if even that fails
                    self._lost = await self.recovery.keep_unstored(self.data, self.meta, reason)
                    for ino in self._lost:
                        self.data.mark_damaged(ino, reason)
            except Exception:
                log.exception("could not keep the unstored data in the recovery area")
            try:
                self.core.forget_all()
                await self.data.collect_garbage()
                self.audit.sync()
                with self.meta.transaction():
                    # the audit trail's head, so that `audit verify` also catches a cut tail
                    self.meta.set_state("audit_head", self.audit.head)
                    self.meta.set_state("audit_seq", self.audit.seq)
                    self.meta.set_state("clean", 1 if stored else 0)
                shipped = await self.s3.before_close() if self.s3 is not None else True
                self.meta.close()
                if self.s3 is not None:
                    try:
                        await self.s3.finish(shipped)
                    except S3fuseError as exc:  # the bucket is unreachable: told once, no traceback
                        stored = False
                        log.error("could not finish with the bucket (the next mount recovers): %s", exc)
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
        self._announce_stop()
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
            "sync": self._sync,
            "unmount": self._unmount,
            **self.admin.handlers(),
            **self.s3api.handlers(),
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
            **d.status(),
            "master_key_version": self.keys.keyring.current,
            "customer_keys": len(self.keys.customer.list(0)),
            "audit_log": self.audit_path,
            # files whose data is not stored yet because their store failed, and why
            "unstored_files": d.failing(),
            "recovery_pending": self.recovery.pending(),
            **self.master.status(),
            **(self.pusher.stats if self.pusher is not None else {}),
            "pagecache_pushes_pending": self.pusher.pending if self.pusher is not None else 0,
            **heap_usage(),
            **self.heap_stats,
            **self.core.stats,
            "fuse_waits_fast": fuseloop.wait_readable.fast,
            "fuse_waits_slow": fuseloop.wait_readable.slow,
            "fuse_lock_free": fuseloop.lock_counts.free,
            "fuse_lock_waited": fuseloop.lock_counts.waited,
            **self.backend.stats,
            **self._kms_breaker_stats(),
            **(self.s3.stats() if self.s3 is not None else {}),
            **self.s3api.stats(),
        }

    def _kms_breaker_stats(self) -> dict:
        """The Transit circuit breaker's state, when the store uses Transit."""
        kms = self.keys.kms
        transit = kms.transit if kms is not None else None
        return transit.breaker.stats() if transit is not None else {}

    async def _flush(self, peer: Peer, args: dict) -> None:
        self._require_owner(peer)
        self.core.commit_now()
        await self.data.flush_all(durable=True)

    async def _sync(self, peer: Peer, args: dict) -> dict:
        """Store every buffered byte and, for an S3 store, ship every committed metadata change
        to the bucket (the kernel passes no syncfs to a FUSE daemon)."""
        self._require_owner(peer)
        self.core.commit_now()
        await self.data.flush_all(durable=True)
        if self.s3 is not None:
            await self.s3.sync_metadata()
        return {"bucket": self.s3 is not None}

    async def _unmount(self, peer: Peer, args: dict) -> dict:
        """Store everything; if some files cannot be stored, say which and why and stay
        mounted, unless `keep_pending`: then the stop keeps their data in the recovery area."""
        self._require_owner(peer)
        try:
            await self.data.flush_all(durable=True)
        except S3fuseError as exc:
            pending = self.data.failing() or [{"inode": 0, "path": "?", "reason": str(exc), "bytes": 0}]
            if not args.get("keep_pending"):
                return {"pid": os.getpid(), "pending": pending}
            log.warning("unmounting with unstored data (--keep-pending): %s",
                        "; ".join(f"{p['path']}: {p['reason']}" for p in pending))
        return {"pid": os.getpid()}


def _invalidate_entry(parent: int, name: bytes) -> None:
    """Have the kernel forget one entry (and its negative lookup). Blocks until the kernel
    can take the directory's lock, which a request being answered on the loop may hold: the
    S3 API calls it in a worker thread, never on the loop."""
    try:
        pyfuse3.invalidate_entry(parent, name)
    except OSError as exc:  # not cached: nothing to forget
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("invalidate_entry(%d, %r): %s", parent, name, exc)


def _invalidate_attrs(ino: int) -> None:
    """Have the kernel forget an inode's cached attributes (a worker thread calls it)."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as exc:  # not cached: nothing to forget
        if exc.errno != errno.ENOENT:
            log.warning("invalidate_inode(%d): %s", ino, exc)


def credential_path(name: str) -> str:
    """A systemd credential's file ($CREDENTIALS_DIRECTORY/NAME); a clear error if it is not there."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise S3fuseError(f"the credential {name!r} needs $CREDENTIALS_DIRECTORY "
                          "(set by systemd's LoadCredential=/LoadCredentialEncrypted=)", errno.ENOKEY)
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise S3fuseError(f"no credential {name!r} in {directory} (LoadCredentialEncrypted={name}:... "
                          "in the unit)", errno.ENOKEY)
    return path


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

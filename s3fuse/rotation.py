"""SSE-S3 master-key rotation in the daemon: rotate, re-wrap sweep, retirement, schedule.

- `rotate` adds a keyring version and saves the keyring (atomically, durably) *before*
  the new version becomes current in memory: an object sealed under it is never
  committed while the keyring on disk lacks it.
- The re-wrap sweep rewrites key slots only. Data keys are wrapped in the block map
  rows (`blocks.key_slot`), never in objects, so re-wrapping a row = unwrap with the old
  master-key version, wrap with the current one under the same AAD, and one UPDATE.
  Objects are not read or written. The sweep walks the rows in object-id order in
  batches (one transaction each), computes big batches in a worker thread, yields to
  the loop between batches and keeps under a rate limit, so foreground I/O goes on. Its
  cursor is the object id, its progress is in the `state` table, and every committed
  batch is final: after a kill -9 the next mount simply continues (rows still under an
  old version are exactly the work left). Rows committed late by a flush that sealed
  its objects before the rotation are caught by the next pass.
- `retire_unused` erases the keys of old versions that no row and no stored-but-
  uncommitted block references (checked with the flush lock held, so no object is
  being sealed meanwhile), and refuses, saying why, for versions still in use.
- `scheduler` is the one key scheduler of the daemon: the master key's rotation on its
  interval, and the built-in KMS's automatic rotations and expired deletions.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from . import format as fmt
from .crypto import Caller, KeyManager
from .errors import S3fuseError
from .keys import generation as keygen
from .keys.keyring import Keyring
from .policy import SSE_S3

if TYPE_CHECKING:
    from .data import DataStore
    from .meta import Meta
    from .store import StoreConfig

log = logging.getLogger(__name__)

KMS_PERIOD = 60.0  # KMS rotations and deletions are checked once a minute
SWEEP_IDLE_CHECK = 5.0  # how often an idle sweep looks for rows committed late
THREAD_BATCH = 64  # batches above this many rows are re-wrapped in a worker thread
SCHEDULER = Caller(0, 0, 0)


@dataclass(frozen=True)
class SlotRow:
    inode: int
    blockno: int
    object_id: bytes
    key_version: int
    key_slot: bytes


def rewrap_slots(store_id: bytes, rows: list[SlotRow], old_keys: dict[int, bytes], new_version: int,
                 new_key: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], list[tuple[bytes, str]]]:
    """Re-wrap SSE-S3 key slots (pure): -> ([(object_id, old_slot, new_slot)], [(object_id, why)]).

    The AAD is the slot's own (store, object, inode, block, mode, key_ref): only the KEK
    changes, so the re-wrapped slot opens exactly where the old one did.
    """
    done, failed = [], []
    for r in rows:
        aad = fmt.key_slot_aad(store_id, r.object_id, r.inode, r.blockno, SSE_S3, "")
        old = old_keys.get(r.key_version)
        if old is None:
            failed.append((r.object_id, f"master key version {r.key_version} is not in the keyring"))
            continue
        try:
            data_key = fmt.unwrap_data_key(old, r.key_slot, aad)
        except fmt.FormatError as exc:
            failed.append((r.object_id, f"key slot does not open: {exc}"))
            continue
        done.append((r.object_id, r.key_slot, fmt.wrap_data_key(new_key, data_key, aad)))
        del data_key
    return done, failed


class MasterKeys:
    """The daemon's SSE-S3 master-key lifecycle (runs on the trio loop)."""

    def __init__(self, cfg: "StoreConfig", root_key: bytes, meta: "Meta", data: "DataStore",
                 keys: KeyManager, *, interval: float, batch: int, rate: float,
                 forget_cached_keys: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self._root_key = root_key
        self.meta = meta
        self.data = data
        self.keys = keys
        self.interval = interval
        self.batch = max(1, batch)
        self.rate = max(0.0, rate)
        self._forget = forget_cached_keys or (lambda: None)
        self._lock = trio.Lock()  # keyring changes, one at a time
        self._kick = trio.Event()
        self._wake_scheduler = trio.Event()
        self._failed: set[bytes] = set()  # rows that could not be re-wrapped (logged once)
        self.sweeping = False
        self._resume = trio.Event()  # set = the sweep may run; cleared by `pause`
        self._resume.set()
        self.paused = False  # an operator paused the sweep (not kept across restarts)
        self._keyring_mtime = self._file_mtime()

    @property
    def keyring(self) -> Keyring:
        return self.keys.keyring

    def _file_mtime(self) -> float:
        try:
            return os.stat(self.cfg.keyring_path).st_mtime
        except OSError:
            return time.time()

    # ------------------------------------------------------------------ queries
    def _stale_count(self, current: int) -> int:
        return self.meta.count_not_at_version(SSE_S3, current)

    def dependants(self) -> dict[int, int]:
        """Objects (committed rows + stored-but-uncommitted blocks) per master-key version."""
        counts = self.meta.count_by_version(SSE_S3)
        for version, n in self.data.pending_by_version(SSE_S3).items():
            counts[version] = counts.get(version, 0) + n
        return counts

    def next_rotation(self) -> float | None:
        if not self.interval or self.interval <= 0:
            return None
        created = self.keyring.created_at(self.keyring.current)
        return (created if created is not None else self._keyring_mtime) + self.interval

    def status(self) -> dict:
        kr = self.keyring
        counts = self.dependants()
        versions = []
        for v in sorted({*kr.keys, *kr.retired, *counts}):
            state = "current" if v == kr.current else "retired" if v in kr.retired else \
                "old" if v in kr.keys else "missing"
            versions.append({"version": v, "state": state, "objects": counts.get(v, 0),
                             "created": kr.created.get(v), "retired": kr.retired.get(v)})
        total = int(self.meta.get_state("rewrap_total", 0) or 0)
        done = int(self.meta.get_state("rewrap_done", 0) or 0)
        remaining = sum(n for v, n in counts.items() if v != kr.current)
        return {
            "master_keys": versions,
            "rewrap": {"state": "paused" if self.paused and remaining else
                       "running" if self.sweeping else ("pending" if remaining else "idle"),
                       "target_version": int(self.meta.get_state("rewrap_version", kr.current) or kr.current),
                       "done": done, "total": max(total, done), "remaining": remaining,
                       "batch": self.batch, "rate": self.rate},
            "rotation_interval": self.interval,
            "next_rotation": self.next_rotation(),
        }

    # ------------------------------------------------------------------ rotate / retire
    async def _save(self, keyring: Keyring) -> None:
        await trio.to_thread.run_sync(keyring.save, self.cfg.keyring_path, self._root_key, self.cfg.store_id)
        self._keyring_mtime = time.time()
        with self.meta.transaction():  # from now on an older keyring is refused at mount
            self.meta.set_state(keygen.STATE_KEY, keygen.record_value(keyring, self.cfg.store_id))

    async def rotate(self, who: Caller, trigger: str = "request") -> dict:
        # what was written before the rotation is stored under the old version (and re-wrapped
        # by the sweep), whatever the flusher's timing
        await self.data.flush_all(durable=False)
        async with self._lock:
            old = self.keyring.current
            new = self.keyring.rotated()
            try:
                await self._save(new)  # durable before any object can use it
            except OSError as exc:
                self.keys.record("sse-s3:RotateMasterKey", who, "denied", key_version=new.current, trigger=trigger,
                                 errno=exc.errno or errno.EIO)
                raise S3fuseError(f"could not save the keyring: {exc.strerror or exc}", errno.EIO) from None
            self.keys.keyring = new
            with self.meta.transaction():
                self.meta.set_state("rewrap_version", new.current)
                self.meta.set_state("rewrap_total", self._stale_count(new.current))
                self.meta.set_state("rewrap_done", 0)
            self.keys.record("sse-s3:RotateMasterKey", who, key_version=new.current, previous_version=old,
                             trigger=trigger)
            log.info("master key rotated (%s): version %d is current; re-wrapping version %d's key slots",
                     trigger, new.current, old)
            self._failed.clear()
            self._kick.set()
            self._wake_scheduler.set()
            return {"version": new.current, "previous": old}

    async def retire_unused(self, who: Caller) -> dict:
        """Erase old versions nothing depends on -> {"retired": [...], "kept": {v: reason}}."""
        async with self._lock:
            # With the flush lock held no object is being sealed: every object under an old
            # version is a committed row or a pending block, and both are counted.
            async with self.data.exclusive():
                counts = self.dependants()
            kr = self.keyring
            old = sorted(v for v in kr.keys if v != kr.current)
            unused = [v for v in old if not counts.get(v)]
            kept = {}
            for v in old:
                if counts.get(v):
                    why = f"{counts[v]} object(s) still depend on it"
                    why += " (the re-wrap sweep is paused: s3fuse rotate --resume-sweep)" if self.paused \
                        else " (the re-wrap sweep is still running)" if self.sweeping or self._kick.is_set() \
                        else " (their key slots could not be re-wrapped; see the log)" if self._failed else \
                        " (the re-wrap sweep has not reached them yet)"
                    kept[v] = why
            if unused:
                new = kr.without(unused)
                await self._save(new)
                self.keys.keyring = new
                self._forget()  # nothing cached may outlive the erased versions
                for v in unused:
                    self.keys.record("sse-s3:RetireMasterKey", who, key_version=v)
                log.info("retired master key version(s) %s", ", ".join(map(str, unused)))
            for v, why in kept.items():
                self.keys.record("sse-s3:RetireMasterKey", who, "denied", key_version=v, errno=errno.EBUSY,
                                 reason=why)
            return {"retired": unused, "kept": {str(v): why for v, why in kept.items()},
                    "current": kr.current}

    # ------------------------------------------------------------------ the sweep
    def set_paused(self, paused: bool, who: Caller) -> dict:
        """Hold the sweep between two batches (e.g. at peak load), or let it go on."""
        self.paused = paused
        if paused:
            self._resume = trio.Event()
        else:
            self._resume.set()
            self._kick.set()
        self.keys.record("sse-s3:PauseRewrap" if paused else "sse-s3:ResumeRewrap", who)
        return self.status()["rewrap"]

    async def sweeper(self) -> None:
        """Re-wraps key slots under old versions whenever there are any (started at mount)."""
        while True:
            try:
                await self.sweep()
            except S3fuseError as exc:
                log.error("re-wrap sweep failed (will retry): %s", exc)
            with trio.move_on_after(SWEEP_IDLE_CHECK):
                await self._kick.wait()
            self._kick = trio.Event()

    async def sweep(self) -> int:
        """Passes over the block map until no row under an old version is left -> rows re-wrapped."""
        total = 0
        while True:
            current = self.keyring.current
            if not self._stale_count(current):
                break
            if not self.sweeping:
                self.sweeping = True
                log.info("re-wrap sweep: %d key slot(s) to move to master key version %d",
                         self._stale_count(current), current)
            try:
                n = await self._pass(current)
            finally:
                self.sweeping = False
            total += n
            if n == 0:
                return total  # only rows that cannot be re-wrapped are left (logged)
        if total or self.meta.get_state("rewrap_active", 0):
            with self.meta.transaction():
                self.meta.set_state("rewrap_active", 0)
            self.keys.record("sse-s3:RewrapDone", SCHEDULER, key_version=self.keyring.current,
                             rewrapped=int(self.meta.get_state("rewrap_done", 0) or 0))
            log.info("re-wrap sweep done: every SSE-S3 key slot is under version %d", self.keyring.current)
        return total

    async def _pass(self, current: int) -> int:
        cursor = b""
        done = 0
        with self.meta.transaction():
            self.meta.set_state("rewrap_active", 1)
        while True:
            if not self._resume.is_set():
                log.info("re-wrap sweep paused")
                await self._resume.wait()
                log.info("re-wrap sweep resumed")
            started = time.monotonic()
            rows = [SlotRow(*r) for r in self.meta.slots_not_at_version(SSE_S3, current, cursor,
                                                                        self.batch)]
            if not rows:
                return done
            cursor = rows[-1].object_id
            rows = [r for r in rows if r.object_id not in self._failed]
            kr = self.keyring
            if kr.current != current:
                return done  # rotated again meanwhile: start over for the new version
            old_keys = {v: kr.keys[v] for v in {r.key_version for r in rows} if v in kr.keys}
            args = (self.cfg.store_id, rows, old_keys, current, kr.key(current))
            if len(rows) > THREAD_BATCH:
                rewrapped, failed = await trio.to_thread.run_sync(rewrap_slots, *args)
            else:
                rewrapped, failed = rewrap_slots(*args)
            for oid, why in failed:
                if oid not in self._failed and len(self._failed) < 100_000:
                    self._failed.add(oid)
                    log.error("re-wrap: object %s: %s; its row is left as it is", oid.hex(), why)
            if self.keyring.current != current:
                return done
            changed = 0
            with self.meta.transaction():
                for oid, old_slot, new_slot in rewrapped:
                    # compare-and-set: a flush or truncate may have replaced the row meanwhile
                    changed += self.meta.replace_key_slot(oid, old_slot, new_slot, current)
                if changed:
                    self.meta.set_state("rewrap_done", int(self.meta.get_state("rewrap_done", 0) or 0) + changed)
            done += changed
            # throttle: at most `rate` rows per second, and always let other tasks run
            pause = (len(rows) / self.rate - (time.monotonic() - started)) if self.rate else 0
            await trio.sleep(max(0.0, pause))

    # ------------------------------------------------------------------ the scheduler
    async def scheduler(self, kms_tick: Callable[[float], Awaitable[None]] | None = None) -> None:
        """Rotates the master key when its interval has passed, and runs the KMS's timers."""
        next_kms = 0.0
        while True:
            now = time.time()
            due = self.next_rotation()
            if due is not None and due <= now:
                try:
                    await self.rotate(SCHEDULER, "schedule")
                except S3fuseError as exc:
                    log.error("scheduled master-key rotation failed (will retry): %s", exc)
                    due = now + KMS_PERIOD
                else:
                    due = self.next_rotation()
            if kms_tick is not None and now >= next_kms:
                try:
                    await kms_tick(now)
                except Exception:
                    log.exception("KMS key scheduler failed; will retry")
                next_kms = now + KMS_PERIOD
            wake = min(x for x in (due, next_kms if kms_tick else None, now + 3600) if x is not None)
            with trio.move_on_after(max(0.01, wake - time.time())):
                await self._wake_scheduler.wait()
            self._wake_scheduler = trio.Event()

"""Fault injection for tests: a backend wrapper that fails, delays or hangs chosen operations.

TESTING ONLY, and part of the test harness, not of s3fuse: tests/faultd.py (the `s3fuse`
command the harness mounts with) wraps the daemon's backend in it when the environment
variable `S3FUSE_TESTING_FAULT_PLAN` names a plan file (the daemon then logs a warning).
The production command never reads that variable. The plan is JSON, re-read whenever the file changes, so a test
rewrites it at the moment it chooses::

    {"rules": [{"op": "put", "error": "ENOSPC"},
               {"op": "get", "error": "EIO", "key": "ab12"},
               {"op": "put", "delay": 0.5},
               {"op": "put", "hang": true}]}

`op` is one of put, get, delete, head, list, sync ("*" for all); `key` (optional) a prefix of
the object key; `min_size` (optional, puts only) the least size of the object, which singles
out one file's objects by their size, since object keys are random; `error` an errno name, raised as a BackendError naming the fault; `delay`
seconds to wait before the operation; `hang` waits until the plan no longer says so (then the
operation runs, or fails if the new plan says so). Each injected error or hang is recorded as
a line `OP KEY WHAT` in PLAN.hits, so that a test can wait for the fault to have happened. An absent or empty plan file injects nothing.
The optional abilities of `Backend` are the wrapped backend's; every other attribute is
delegated to it too, so backend-specific methods (the S3 backend's fence, ...) work.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import trio

from s3fuse.backends.base import BarrierFailed, Backend
from s3fuse.errors import BackendError

log = logging.getLogger(__name__)

FAULT_ENV = "S3FUSE_TESTING_FAULT_PLAN"
_POLL = 0.05


class FaultyBackend(Backend):
    def __init__(self, inner: Backend, plan_path: str) -> None:
        self.inner = inner
        self.plan_path = plan_path
        self._stamp: tuple | None = None
        self._rules: list[dict] = []
        self.injected = 0
        log.warning("TESTING: fault injection is on (plan %s): operations may fail on purpose", plan_path)

    def __getattr__(self, name: str):
        # only reached for attributes this class does not define: the wrapped backend's extras
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ the plan
    def _load(self) -> list[dict]:
        try:
            st = os.stat(self.plan_path)
        except FileNotFoundError:
            self._stamp, self._rules = None, []
            return self._rules
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                with open(self.plan_path) as f:
                    text = f.read()
                self._rules = list(json.loads(text).get("rules", [])) if text.strip() else []
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("fault plan %s unreadable (%s): no faults", self.plan_path, exc)
                self._rules = []
            self._stamp = stamp
        return self._rules

    def _matching(self, op: str, key: str, size: int = 0) -> list[dict]:
        return [r for r in self._load() if r.get("op") in (op, "*") and key.startswith(r.get("key", ""))
                and size >= r.get("min_size", 0)]

    def _hit(self, op: str, key: str, what: str) -> None:
        """Append `op key what` to PLAN.hits, so that a test can wait for a fault to happen."""
        try:
            with open(self.plan_path + ".hits", "a") as f:
                f.write(f"{op} {key} {what}\n")
        except OSError:
            pass

    async def _fault(self, op: str, key: str = "", size: int = 0) -> None:
        rules = self._matching(op, key, size)
        if any(r.get("hang") for r in rules):
            self._hit(op, key, "hang")
        while any(r.get("hang") for r in rules):
            await trio.sleep(_POLL)
            rules = self._matching(op, key, size)
        for r in rules:
            if r.get("delay"):
                await trio.sleep(float(r["delay"]))
        for r in rules:
            if r.get("error"):
                code = getattr(errno, r["error"], errno.EIO)
                self.injected += 1
                self._hit(op, key, r["error"])
                raise BackendError(f"injected fault: {op} {key}: {os.strerror(code)}", code)

    def _would_fail(self, op: str, key: str) -> bool:
        return bool(self._matching(op, key))

    # ------------------------------------------------------------------ Backend
    async def put(self, key, data) -> None:
        await self._fault("put", key, _size(data))
        await self.inner.put(key, data)

    async def put_many(self, items, sync=False) -> None:
        for key, data in items:
            await self._fault("put", key, _size(data))
        await self.inner.put_many(items)
        if sync:  # the barrier after the puts, where it fails for real
            try:
                await self.sync()
            except BackendError as exc:
                raise BarrierFailed(str(exc), exc.errno) from exc

    async def get(self, key, offset=0, length=None) -> bytes:
        await self._fault("get", key)
        return await self.inner.get(key, offset, length)

    async def get_ranges(self, key, ranges):
        await self._fault("get", key)
        return await self.inner.get_ranges(key, ranges)

    async def get_ranges_and(self, key, ranges, transform):
        await self._fault("get", key)
        return await self.inner.get_ranges_and(key, ranges, transform)

    def try_get_ranges(self, key, ranges):
        if self._would_fail("get", key):
            return None  # the slow path applies the fault
        return self.inner.try_get_ranges(key, ranges)

    # the optional abilities (Backend's defaults) are the wrapped backend's
    @property
    def store_concurrency(self) -> int:  # type: ignore[override]
        return self.inner.store_concurrency

    def buffer(self, size: int):
        return self.inner.buffer(size)

    @property
    def fetches_whole_objects(self) -> bool:
        return self.inner.fetches_whole_objects

    def prefetch(self, key) -> None:
        self.inner.prefetch(key)

    def clear_tmp(self) -> None:
        self.inner.clear_tmp()

    @property
    def stats(self) -> dict[str, int]:
        return self.inner.stats

    async def delete(self, key) -> None:
        await self._fault("delete", key)
        await self.inner.delete(key)

    async def delete_many(self, keys) -> None:
        for key in keys:
            await self._fault("delete", key)
        await self.inner.delete_many(keys)

    async def head(self, key):
        await self._fault("head", key)
        return await self.inner.head(key)

    async def list(self):
        await self._fault("list")
        async for key in self.inner.list():
            yield key

    async def sync(self) -> None:
        await self._fault("sync")
        await self.inner.sync()

    async def close(self) -> None:
        await self.inner.close()


def _size(data) -> int:
    return sum(map(len, data)) if isinstance(data, list) else len(data)

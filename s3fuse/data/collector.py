"""The collector: deletes objects the metadata no longer references.

Replaced and failed objects are recorded in the `garbage` table in the same transaction
that stops referencing them; this deletes them from the store afterwards, and after an
unclean stop sweeps the store for objects that were put but never committed.

A read looks up a block's object and patches, then fetches them: meanwhile the block may be
stored anew and its old objects become garbage. So reads hold what they looked up (`InUse`)
until they have fetched it, and the collector leaves those objects for a later round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import trio

from .. import format as fmt
from ..backends import Backend
from ..errors import BackendError, S3fuseError
from ..meta import Meta
from ..util import one_error
from .codec import ObjectCodec

log = logging.getLogger(__name__)

GC_BATCH = 256  # objects deleted per call
GC_IDLE = 5.0  # s: the collector looks for garbage at least this often


class InUse:
    """Objects that reads have looked up and may still fetch, counted per object.

    A read takes its objects here in the same step (no await between) as it looks them up in
    the block map or the pending blocks. An object becomes garbage in the transaction that
    stops referencing it, so once it is garbage no read can look it up any more: an object
    that is garbage and not held here is one nobody can fetch."""

    def __init__(self) -> None:
        self._counts: dict[bytes, int] = {}

    @contextmanager
    def holding(self, object_ids: Iterable[bytes]) -> Iterator[None]:
        held = list(object_ids)
        for oid in held:
            self._counts[oid] = self._counts.get(oid, 0) + 1
        try:
            yield
        finally:
            for oid in held:
                left = self._counts[oid] - 1
                if left:
                    self._counts[oid] = left
                else:
                    del self._counts[oid]

    def ids(self) -> set[bytes]:
        return set(self._counts)


class Collector:
    def __init__(self, meta: Meta, backend: Backend, codec: ObjectCodec, in_use: InUse,
                 deleted: Callable[[list[bytes]], None]) -> None:
        self.meta = meta
        self.backend = backend
        self.codec = codec
        self.in_use = in_use
        self.deleted = deleted  # told which objects are gone from the store
        self._kick = trio.Event()

    def kick(self) -> None:
        """There is new garbage: collect it soon."""
        self._kick.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(GC_IDLE):
                await self._kick.wait()
            self._kick = trio.Event()
            await self.collect()

    async def collect(self) -> int:
        """Delete the objects in the garbage table that no read holds (the others wait for a
        later round). -> how many were deleted."""
        done = 0
        while True:
            ids = self.meta.garbage(GC_BATCH, exclude=self.in_use.ids())
            if not ids:
                return done
            try:
                try:
                    await self.backend.delete_many([oid.hex() for oid in ids])
                except BaseExceptionGroup as group:
                    raise one_error(group, S3fuseError) from None
            except BackendError as exc:
                log.warning("could not delete unreferenced objects (will retry): %s", exc)
                return done
            self.codec.forget(ids)
            self.deleted(ids)
            with self.meta.transaction():
                self.meta.forget_garbage(ids)
            done += len(ids)

    async def sweep_unreferenced(self) -> int:
        """After an unclean stop: delete objects that were put but never committed."""
        removed = 0
        async for key in self.backend.list():
            try:
                oid = bytes.fromhex(key)
            except ValueError:
                continue
            if len(oid) == fmt.OBJECT_ID_LEN and not self.meta.is_referenced(oid):
                await self.backend.delete(key)
                removed += 1
        return removed

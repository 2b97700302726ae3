"""The collector: deletes objects the metadata no longer references.

Replaced and failed objects are recorded in the `garbage` table in the same transaction
that stops referencing them; this deletes them from the store afterwards, and after an
unclean stop sweeps the store for objects that were put but never committed.
"""

from __future__ import annotations

import logging

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


class Collector:
    def __init__(self, meta: Meta, backend: Backend, codec: ObjectCodec) -> None:
        self.meta = meta
        self.backend = backend
        self.codec = codec
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
        """Delete the objects in the garbage table. -> how many were deleted."""
        done = 0
        while True:
            ids = self.meta.garbage(GC_BATCH)
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

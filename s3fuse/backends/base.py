"""The object-store interface. Nothing outside a backend may assume local files.

Contract:
- `put` is atomic: a reader sees the whole object or none of it. Its data may be one
  byte string or a list of them (the object is their concatenation), so that callers
  need not join large buffers in memory.
- `sync` is a durability barrier: every object put before it is on stable storage
  when it returns. The data path calls it before committing metadata that refers
  to new objects, so that one barrier can cover a whole batch of puts.
- `get` takes a byte range; a missing object raises `NoSuchObject`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from ..errors import BackendError


class BarrierFailed(BackendError):
    """The durability barrier after a batch of puts failed (`put_many` with `sync`): the
    puts may be lost, whichever object they were."""


class NoSuchObject(BackendError):
    """The object does not exist in the store."""


class Backend(abc.ABC):
    @abc.abstractmethod
    async def put(self, key: str, data: bytes | list[bytes]) -> None: ...

    async def put_many(self, items: list[tuple[str, bytes | list[bytes]]], sync: bool = False) -> None:
        """Several puts; backends may batch them (each one is still atomic). With `sync`,
        then the durability barrier of `sync()`."""
        for key, data in items:
            await self.put(key, data)
        if sync:
            try:
                await self.sync()
            except BackendError as exc:
                raise BarrierFailed(str(exc), exc.errno) from exc

    @abc.abstractmethod
    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    async def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes | memoryview]:
        """Several ranges of one object (bytes, or views of a buffer they share); backends may
        do this in one round trip."""
        return [await self.get(key, off, n) for off, n in ranges]

    async def get_ranges_and(self, key: str, ranges: list[tuple[int, int]], transform):
        """`transform(get_ranges(...))`, run off the event loop; a backend that reads in a
        worker thread runs both in one hand-off (transform is CPU work such as decryption)."""
        import trio

        bufs = await self.get_ranges(key, ranges)
        return await trio.to_thread.run_sync(transform, bufs)

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""

    async def delete_many(self, keys: list[str]) -> None:
        """Delete several objects, a few at a time; backends may batch them."""
        import trio

        limit = trio.CapacityLimiter(8)

        async def one(key: str) -> None:
            async with limit:
                await self.delete(key)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)

    @abc.abstractmethod
    async def head(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""

    @abc.abstractmethod
    def list(self) -> AsyncIterator[str]:
        """Every object key in the store, in no particular order."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Durability barrier for all completed puts and deletes."""

    async def close(self) -> None:
        return None

    # -- optional abilities: defaults for a backend without them, overridden by one with them

    #: blocks the data path stores at once: a few for a local disk; more hide a network's latency
    store_concurrency: int = 4

    @property
    def fetches_whole_objects(self) -> bool:
        """Whether a read of part of an object fetches all of it (into a local cache)."""
        return False

    def prefetch(self, key: str) -> None:
        """Start bringing an object a sequential reader will want soon closer, without waiting
        and without failing (a failed prefetch leaves the read to fetch it). Default: nothing."""
        return None

    def buffer(self, size: int) -> bytearray | memoryview:
        """Writable memory of `size` bytes for an object that will be put whole (the codec
        encrypts straight into it). Default: a bytearray."""
        return bytearray(size)

    def try_get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """The ranges at once if they are already in memory, without blocking; else None, and
        the caller uses `get_ranges`. Default: None."""
        return None

    def clear_tmp(self) -> None:
        """Remove what interrupted puts left behind (called after an unclean stop)."""
        return None

    @property
    def stats(self) -> dict[str, int]:
        """Counters for `s3fuse status`."""
        return {}

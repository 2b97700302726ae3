"""A cheaper request loop for pyfuse3, through its own hook for swapping the async library.

pyfuse3 reaches trio only through its module global ``pyfuse3.trio`` (which is how
``pyfuse3.asyncio`` switches it to asyncio). Its request loop does, per request::

    async with read_lock:                       # trio.Lock: yields even when free
        await trio.lowlevel.wait_readable(fd)   # yields even when a request is queued
    read, handle, reply

Each of those yields is a pass through trio's scheduler and an ``epoll_wait``: a large share
of the daemon's CPU per small request.

`install` gives pyfuse3 a view of trio that differs in two places:

- `ReadLock`: a lock that is taken without yielding when it is free. It is only ever used
  by pyfuse3's loop tasks, around the wait for the device to become readable.
- `wait_readable`: returns at once, without yielding, when ``poll`` says a request is
  already queued on the FUSE device. At most `FAST_PATH_RUN` such returns come in a row;
  the next wait goes through trio whatever the device says, so other tasks (the flusher,
  the control socket, timers) and cancellation still get their turn under a steady stream
  of requests.

Everything else is trio itself (docs/BENCH.md has the measurements).

`install` must run before ``pyfuse3.init``: pyfuse3 3.4.0 creates its lock in ``init``,
later versions on the first request, both through ``pyfuse3.trio``. pyproject.toml pins the
versions this is verified on; `lock_counts` and `wait_readable` count both paths, and a
mounted test checks that both are taken.
"""

from __future__ import annotations

import select
import types

import pyfuse3
import trio

_ABNORMAL = select.POLLERR | select.POLLHUP | select.POLLNVAL

#: How many requests in a row may skip trio's scheduler before one wait goes through it.
#: Results of worker threads (object fetches) reach their tasks only in a scheduler pass, so
#: a long run would hold them up behind a stream of queued reads.
FAST_PATH_RUN = 4


class _LockCounts:
    """Statistics of every `ReadLock`: acquisitions without a checkpoint, and after waiting."""

    def __init__(self) -> None:
        self.free = 0
        self.waited = 0


lock_counts = _LockCounts()


class ReadLock:
    """A FIFO lock, taken without a checkpoint when it is free.

    trio's own Lock always yields once on acquire (a cancellation point); pyfuse3 only
    needs mutual exclusion between its loop tasks, and yields right after anyway when
    the device has nothing to read.
    """

    def __init__(self) -> None:
        self._owner: object | None = None
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        task = trio.lowlevel.current_task()
        if self._owner is None:
            self._owner = task
            lock_counts.free += 1
            return
        lock_counts.waited += 1
        await self._lot.park()  # release() hands the lock over before it wakes us
        assert self._owner is task

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._lot:
            (self._owner,) = self._lot.unpark(count=1)
        else:
            self._owner = None

    def locked(self) -> bool:
        return self._owner is not None


class _FastWait:
    """`wait_readable` with a non-yielding path for a device that already has a request."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        self._run = 0
        self.fast = 0  # statistics: waits answered without the scheduler
        self.slow = 0

    async def __call__(self, fd: int) -> None:
        if self._run < FAST_PATH_RUN and self._readable(fd):
            self._run += 1
            self.fast += 1
            return
        self._run = 0
        self.slow += 1
        await trio.lowlevel.wait_readable(fd)

    def _readable(self, fd: int) -> bool:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        try:
            events = poller.poll(0)
        except OSError:
            return False
        # only a plain "data waiting": errors, hang-ups and a closed fd take trio's path,
        # which reports them the way pyfuse3 expects
        return bool(events) and events[0][1] & _ABNORMAL == 0


wait_readable = _FastWait()


class _Lowlevel(types.SimpleNamespace):
    def __getattr__(self, name: str) -> object:
        return getattr(trio.lowlevel, name)


class _Trio(types.SimpleNamespace):
    def __getattr__(self, name: str) -> object:
        return getattr(trio, name)


def install() -> None:
    """Point pyfuse3 at the tuned view of trio. Call before `pyfuse3.init`, which may create
    the lock."""
    view = _Trio(Lock=ReadLock, lowlevel=_Lowlevel(wait_readable=wait_readable))
    pyfuse3.trio = view  # type: ignore[attr-defined]


def installed() -> bool:
    return isinstance(getattr(pyfuse3, "trio", None), _Trio)

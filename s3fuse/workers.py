"""A fixed set of worker threads with a cheap hand-off from the trio loop.

`trio.to_thread.run_sync` is general (a thread cache, a CapacityLimiter, cancellation
policies, context copies); the data path makes one such hop per object read or stored, so
for small files and random reads the hop is a large share of the work. A `WorkerPool` does
only what the data path needs: a job goes on a queue that its threads wait on, and the
result comes back through the trio token; what is left is the cost of two thread wake-ups
and the GIL changing hands (docs/BENCH.md has the figures).

The pool's size bounds how many of its jobs run at once, as a CapacityLimiter would. A job
is not cancellable once queued: like `to_thread.run_sync`'s default, the caller waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

class WorkerPool:
    """Up to `size` threads, started on demand."""

    def __init__(self, size: int, name: str = "s3fuse-worker") -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # started; they live as long as the process (daemon threads)
        self._waiting = 0  # threads blocked on the queue, or about to take a job from it
        self._queued = 0  # jobs put and not yet taken

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in one of the pool's threads and return (or raise) its outcome."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        self._enqueue((fn, args, task, token))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in the background; nobody waits for it, so it must handle its own
        errors (an exception it raises is dropped)."""
        self._enqueue((fn, args, None, None))

    def _enqueue(self, job: tuple) -> None:
        with self._lock:
            self._jobs.put(job)
            self._queued += 1
            # Threads never exit, so a queued job is always taken eventually; a race between
            # these counts can only delay a job behind a busy thread, never strand it.
            if self._queued > self._waiting and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, name=self.name, daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._waiting += 1
            fn, args, task, token = self._jobs.get()
            with self._lock:
                self._waiting -= 1
                self._queued -= 1
            result = outcome.capture(fn, *args)
            del fn, args  # a job's buffers should not outlive it in this frame
            if task is not None:  # None: submitted, nobody waits
                try:
                    token.run_sync_soon(trio.lowlevel.reschedule, task, result)
                except trio.RunFinishedError:
                    pass  # the loop is gone: nobody is waiting any more
            # nor its result (a block's ciphertext or plaintext): an idle thread would keep the
            # last one alive until its next job, a busy one its previous one
            del result, task, token

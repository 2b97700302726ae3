"""s3fuse/workers.py: the data path's thread pool. Pure trio, no mount."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from s3fuse.workers import WorkerPool


def test_results_exceptions_and_the_bound_on_concurrency():
    pool = WorkerPool(3)
    lock = threading.Lock()
    running = peak = 0
    gate = threading.Event()

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gate.wait(5)
        with lock:
            running -= 1
        if i == 7:
            raise ValueError("job 7")
        return i * i

    results: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            results[i] = await pool.run(job, i)
        except ValueError as exc:
            results[i] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
            with trio.fail_after(10):  # three jobs reach the gate; the rest must queue
                while True:
                    with lock:
                        if running == 3:
                            break
                    await trio.sleep(0.001)
            gate.set()

    trio.run(main)
    assert peak == 3, f"{peak} jobs ran at once in a pool of 3"
    assert {i: r for i, r in results.items() if i != 7} == {i: i * i for i in range(20) if i != 7}
    assert isinstance(results[7], ValueError)


def test_jobs_still_run_after_the_pool_has_been_idle():
    """A burst, a pause, then a burst larger than the pool: no job is stranded."""
    pool = WorkerPool(2)

    async def burst(n: int) -> list[int]:
        out: list[int] = []

        async def one(i: int) -> None:
            out.append(await pool.run(lambda: (time.sleep(0.001), i)[1]))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return sorted(out)

    async def main() -> None:
        for n in (1, 5, 50, 3):
            with trio.fail_after(30):
                assert await burst(n) == list(range(n))
            await trio.sleep(0.05)

    trio.run(main)


def test_a_cancelled_caller_waits_for_its_job():
    pool = WorkerPool(1)
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    async def main() -> None:
        with trio.move_on_after(0.01):
            await pool.run(slow)
        assert finished.is_set(), "the caller returned while its job was still running"

    trio.run(main)


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError):
        WorkerPool(0)


def test_a_thread_keeps_no_job_result_alive():
    """A job's result (a block's ciphertext or plaintext) is the caller's alone: once the
    caller drops it, the idle thread that made it holds no reference to it."""
    import gc
    import weakref

    class Buffer:
        pass

    pool = WorkerPool(1)

    async def idle() -> None:
        # The thread counts itself waiting at the top of its loop, after it let go of its job.
        # (A checkpoint first: trio's run loop holds the outcome it last resumed us with.)
        with trio.fail_after(10):
            await trio.sleep(0)
            while pool._waiting != 1:
                await trio.sleep(0.001)

    async def main() -> None:
        made = await pool.run(Buffer)
        ref = weakref.ref(made)
        del made
        await idle()
        gc.collect()
        assert ref() is None, "the idle worker thread still holds the last job's result"

        def boom() -> None:
            raise ValueError(Buffer())

        try:
            await pool.run(boom)
        except ValueError as exc:
            ref = weakref.ref(exc.args[0])
        await idle()
        gc.collect()
        assert ref() is None, "the idle worker thread still holds the last job's exception"

    trio.run(main)

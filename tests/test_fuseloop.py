"""s3fuse/fuseloop.py: the view of trio that pyfuse3's request loop runs on. Pure trio, no
mount (every mounted test runs on it as well, and one checks that the daemon uses it)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import time

import pyfuse3
import pytest
import trio
import trio.testing

from s3fuse import fuseloop

from .conftest import run_cli


def test_the_read_lock_is_taken_without_a_checkpoint_and_handed_over_in_order():
    lock = fuseloop.ReadLock()
    order: list[str] = []

    async def waiter(name: str, started: trio.Event) -> None:
        started.set()
        async with lock:
            order.append(name)

    async def main() -> None:
        free, waited = fuseloop.lock_counts.free, fuseloop.lock_counts.waited
        with trio.testing.assert_no_checkpoints():
            await lock.__aenter__()
        assert lock.locked()
        assert fuseloop.lock_counts.free == free + 1
        async with trio.open_nursery() as nursery:
            for name in ("a", "b"):
                started = trio.Event()
                nursery.start_soon(waiter, name, started)
                await started.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert order == []  # both wait while it is held
            lock.release()
        assert order == ["a", "b"] and not lock.locked()
        assert fuseloop.lock_counts.waited == waited + 2

    trio.run(main)


def test_the_lock_survives_a_cancelled_waiter():
    lock = fuseloop.ReadLock()

    async def main() -> None:
        await lock.__aenter__()

        async def wait_for_it() -> None:
            async with lock:
                raise AssertionError("taken while held")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        lock.release()
        assert not lock.locked()
        async with lock:  # free again, and nobody stale is handed it
            assert lock.locked()

    trio.run(main)


def test_a_queued_request_is_answered_without_the_scheduler_but_not_forever():
    wait = fuseloop._FastWait()
    a, b = socket.socketpair()

    async def main() -> None:
        a.send(b"x")
        for _ in range(fuseloop.FAST_PATH_RUN):
            with trio.testing.assert_no_checkpoints():
                await wait(b.fileno())
        with trio.testing.assert_checkpoints():  # the run is over: one wait goes through trio
            await wait(b.fileno())
        assert (wait.fast, wait.slow) == (fuseloop.FAST_PATH_RUN, 1)

        b.recv(1)  # nothing queued: it waits until something comes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, b.fileno())
            await trio.testing.wait_all_tasks_blocked()
            assert wait.slow == 2
            a.send(b"y")
        b.recv(1)

        a.close()  # a hang-up is left to trio, which reports the descriptor readable
        with trio.testing.assert_checkpoints():
            await wait(b.fileno())

    try:
        trio.run(main)
    finally:
        b.close()


def test_install_changes_only_the_lock_and_the_wait(monkeypatch):
    monkeypatch.setattr(pyfuse3, "trio", pyfuse3.trio)  # restored after the test
    fuseloop.install()
    assert fuseloop.installed()
    view = pyfuse3.trio
    assert view.Lock is fuseloop.ReadLock
    assert view.lowlevel.wait_readable is fuseloop.wait_readable
    assert view.open_nursery is trio.open_nursery
    assert view.ClosedResourceError is trio.ClosedResourceError
    assert view.lowlevel.current_task is trio.lowlevel.current_task
    assert view.lowlevel.notify_closing is trio.lowlevel.notify_closing
    with pytest.raises(AttributeError):
        view.no_such_name  # noqa: B018


def _status(mnt) -> dict:
    r = run_cli("status", mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_daemon_serves_requests_through_both_fast_paths(mounted):
    """The lock that pyfuse3 created is ours (taken free) and queued requests skip the
    scheduler: both counters move on a real mount, whichever pyfuse3 version runs."""
    for i in range(50):
        (mounted.mnt / f"f{i}").write_bytes(b"x" * i)
    assert sorted(os.listdir(mounted.mnt)) == sorted(f"f{i}" for i in range(50))
    st = _status(mounted.mnt)
    # every request the daemon read went through one of the two paths
    assert st["fuse_waits_slow"] > 0 and st["fuse_waits_fast"] + st["fuse_waits_slow"] >= 150
    assert st["fuse_lock_free"] > 0

    # requests from several threads at once queue on the device, so some wait is answered
    # by poll alone; bounded by a deadline, not a count of tries
    names = [mounted.mnt / f"f{i}" for i in range(50)]

    def stat_all() -> None:
        for _ in range(20):
            for name in names:
                os.stat(name)
                os.listdir(mounted.mnt)

    deadline = time.monotonic() + 60
    while st["fuse_waits_fast"] == 0 and time.monotonic() < deadline:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for f in [pool.submit(stat_all) for _ in range(8)]:
                f.result()
        st = _status(mounted.mnt)
    assert st["fuse_waits_fast"] > 0, st
    assert st["fuse_lock_free"] > 0

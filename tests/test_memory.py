"""Memory: what a burst of work took from the heap goes back to the kernel once the mount is
quiet (daemon.trim_heap_when_idle), so the daemon's resident size follows what it holds live
rather than the highest it ever reached."""

from __future__ import annotations

import json
import os
import re

from .conftest import run_cli, wait_until

MiB = 1 << 20


def status(m) -> dict:
    r = run_cli("status", m.mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def test_an_idle_daemon_gives_back_the_heap_a_burst_of_writes_used(mounted):
    first = status(mounted)
    pid = first["pid"]
    chunk = os.urandom(MiB)
    with open(mounted.mnt / "big", "wb") as f:
        for _ in range(160):  # well over the 64 MiB write-back buffer
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    peak = vm_kib(pid, "VmHWM")
    wait_until(lambda: status(mounted)["heap_trims"] > first["heap_trims"], timeout=60,
               what="the daemon to trim its heap once the writes were over")
    resident = vm_kib(pid, "VmRSS")
    # the buffers the writes filled are free now and no longer resident
    assert resident <= peak - 32 * 1024, (
        f"resident {resident // 1024} MiB after the trim, peak was {peak // 1024} MiB")
    with open(mounted.mnt / "big", "rb") as f:
        assert f.read(MiB) == chunk


def test_a_file_streamed_through_leaves_nothing_in_the_segment_cache(mounted):
    """A sequential reader's segments are not kept (the kernel's page cache has them): what
    was fetched ahead of it goes when its last handle is released."""
    data = os.urandom(6 * (4 << 20) + 1234)
    with open(mounted.mnt / "big", "wb") as f:
        f.write(data)
    mounted.remount()
    with open(mounted.mnt / "big", "rb", buffering=0) as f:
        for _ in range(10):  # into the third block, with the blocks after it fetched ahead
            assert f.read(MiB)
    wait_until(lambda: status(mounted)["cache_bytes"] == 0, timeout=30,
               what="the segment cache to let go of the streamed file")
    with open(mounted.mnt / "big", "rb") as f:
        assert f.read() == data


def test_deleted_files_leave_no_plaintext_in_the_segment_cache(mounted):
    """Once a removed file's objects are deleted from the store, the segments kept of them go
    too; the segments of a file still there stay."""
    files = {f"f{i}": os.urandom(4096) for i in range(40)}
    for name, data in files.items():
        (mounted.mnt / name).write_bytes(data)
    mounted.remount()
    for name, data in files.items():
        assert (mounted.mnt / name).read_bytes() == data
    held = status(mounted)["cache_bytes"]
    assert held >= 40 * 4096, held
    for i in range(1, 40):
        (mounted.mnt / f"f{i}").unlink()
    wait_until(lambda: status(mounted)["cache_bytes"] <= held - 39 * 4096, timeout=30,
               what="the segment cache to drop the removed files' segments")
    assert status(mounted)["cache_bytes"] >= 4096  # f0's segment is still kept
    assert (mounted.mnt / "f0").read_bytes() == files["f0"]

"""What a newcomer's walk-through of the README tripped over: the command line's manners."""

from __future__ import annotations

import subprocess

import pytest

from s3fuse import __version__
from s3fuse.audit import AuditLog

from .conftest import S3FUSE, TRACEBACK, init_store, run_cli


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"s3fuse {__version__}"


@pytest.mark.parametrize("records", [3, 3000])  # flushed at the end / while printing
def test_a_closed_pipe_ends_the_command_quietly(workdir, records):
    store = init_store(workdir("s") / "store")
    with AuditLog.open(str(store / "audit.log")) as log:
        for i in range(records):
            log.append("kms:Decrypt", uid=1000 + i, path=f"/f{i}")
    # `s3fuse audit --store STORE | head`, with the reader gone before the first line
    proc = subprocess.Popen([*S3FUSE, "audit", "--store", str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert err == "" and TRACEBACK not in err, err
    assert rc == 141, rc  # as a tool killed by SIGPIPE (128 + 13), like cat or ls

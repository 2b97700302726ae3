"""The `s3fuse` command with the fault injector (tests/faulty.py) around the daemon's object
store: the only way faults enter. The test harness mounts through it
(``python tests/faultd.py mount STORE MNT --foreground ...``); with S3FUSE_TESTING_FAULT_PLAN
naming a plan file the daemon's backend is wrapped, without it this is ``python -m s3fuse``.
S3FUSE_TESTING_MERGE_IDLE sets how long writes must pause before the background merge of
patched blocks runs (seconds; "inf": never), for tests that look at patches themselves.
S3FUSE_TESTING_STORE_GATHER sets how long an S3 API store batch waits for small PUT bodies
still arriving (seconds), for the test that makes one arrive on its cue.
The production command never reads these variables."""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run by path: its directory, tests/, is on sys.path
    from faulty import FAULT_ENV, FaultyBackend
else:
    from .faulty import FAULT_ENV, FaultyBackend

from s3fuse import cli
from s3fuse.daemon import Daemon
from s3fuse.data import merger
from s3fuse.s3api import namespace

MERGE_IDLE_ENV = "S3FUSE_TESTING_MERGE_IDLE"
STORE_GATHER_ENV = "S3FUSE_TESTING_STORE_GATHER"


def main(argv: list[str]) -> int:
    idle = os.environ.get(MERGE_IDLE_ENV)
    if idle:
        merger.MERGE_IDLE = float(idle)
    gather = os.environ.get(STORE_GATHER_ENV)
    if gather:
        namespace.GATHER_SECONDS = float(gather)
    plan = os.environ.get(FAULT_ENV)
    if plan:
        Daemon.wrap_backend = staticmethod(lambda backend: FaultyBackend(backend, plan))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

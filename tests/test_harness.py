"""The test harness itself: without FUSE, SeaweedFS or OpenBao the pure tests still run, and
the tests that need the missing part are skipped with the reason locally and fail under CI.
Runs pytest in a subprocess with the part made missing (conftest's S3FUSE_TEST_* settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PURE = "tests/test_defaults.py::test_the_daemon_the_file_and_the_command_line_share_defaults"
MOUNTS = "tests/test_fuseloop.py::test_the_daemon_serves_requests_through_both_fast_paths"
S3 = "tests/test_s3.py::test_passphrase_store_moves_with_the_passphrase_alone[s3]"
TRANSIT = "tests/test_transit.py::test_transit_init_refuses_a_rejected_token"


def _pytest(*tests: str, ci: bool, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "CI"}
    full.update(env)
    if ci:
        full["CI"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider",
                           *tests], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ci", [False, True], ids=["local", "ci"])
def test_without_fuse_only_the_mounted_tests_stop(ci):
    r = _pytest(PURE, MOUNTS, ci=ci, S3FUSE_TEST_FUSE_DEVICE="/nonexistent/fuse")
    out = r.stdout
    assert "/nonexistent/fuse does not exist" in out, out
    if ci:
        assert "1 passed, 1 error" in out and r.returncode != 0, out
    else:
        assert "1 passed, 1 skipped" in out and r.returncode == 0, out


@pytest.mark.parametrize("ci", [False, True], ids=["local", "ci"])
def test_a_missing_s3_or_transit_server_is_a_skip_locally_and_an_error_under_ci(ci):
    r = _pytest(S3, TRANSIT, ci=ci, S3FUSE_TEST_WEED="/nonexistent/weed", S3FUSE_TEST_BAO="/nonexistent/bao")
    out = r.stdout
    assert "the S3 tests need a SeaweedFS server" in out and "/nonexistent/weed" in out, out
    assert "the Transit tests need an OpenBao server" in out and "/nonexistent/bao" in out, out
    if ci:
        assert "2 error" in out and r.returncode != 0, out
    else:
        assert "2 skipped" in out and r.returncode == 0, out

"""s3fuse/retry.py (one backoff for S3 and Transit), util.one_error (one way to collapse a
nursery's exception group) and the S3 backend's dependency on botocore alone. Pure."""

import errno
import pathlib
import sys

import pytest

from s3fuse import retry
from s3fuse.errors import BackendError, S3fuseError
from s3fuse.util import one_error

SRC = pathlib.Path(__file__).resolve().parent.parent / "s3fuse"


def test_full_jitter_stays_under_its_doubling_cap():
    for attempt in range(1, 10):
        cap = min(2.0, 0.1 * 2 ** (attempt - 1))
        values = [retry.full_jitter(attempt, 0.1, 2.0) for _ in range(200)]
        assert all(0 <= v <= cap for v in values)
        assert max(values) - min(values) > cap / 3  # spread over [0, cap], not fixed


def test_backoff_ends_at_its_attempts_or_its_budget():
    assert len(list(retry.Backoff(0.1, 1.0, attempts=4).delays())) == 3  # delays between 4 tries
    for _ in range(50):
        delays = list(retry.Backoff(0.1, 1.0, budget=3.0).delays())
        assert sum(delays) <= 3.0 and len(delays) >= 3


def test_s3_and_transit_share_it():
    from s3fuse.backends.s3 import RetryPolicy
    from s3fuse.keys import transit

    assert issubclass(RetryPolicy, retry.Backoff)
    assert transit.full_jitter is retry.full_jitter
    for path in (SRC / "backends" / "s3.py", SRC / "keys" / "transit.py"):
        assert "random." not in path.read_text(), path


def _group(*excs):
    return BaseExceptionGroup("g", [*excs[:1], BaseExceptionGroup("inner", list(excs[1:]))]) \
        if len(excs) > 1 else BaseExceptionGroup("g", list(excs))


def test_one_error_reports_the_first_of_a_kind_or_the_whole_group():
    a, b = BackendError("put failed", errno.EIO), S3fuseError("other")
    assert one_error(_group(a)) is a
    assert one_error(_group(a, b), S3fuseError) is a
    mixed = _group(a, ValueError("bug"))
    assert one_error(mixed) is a
    assert one_error(mixed, S3fuseError) is mixed  # a bug is not hidden behind a store error
    cancelled = _group(a, KeyboardInterrupt())
    assert one_error(cancelled) is cancelled


def test_the_s3_backend_needs_botocore_only(monkeypatch):
    for path in SRC.rglob("*.py"):
        assert "boto3" not in path.read_text(), path
    from s3fuse.backends import s3

    for name in [m for m in sys.modules if m == "botocore" or m.startswith("botocore.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "botocore", None)  # as if not installed
    with pytest.raises(S3fuseError, match=r"pip install 's3fuse\[s3\]'") as info:
        s3.make_client(s3.S3Location("bucket", "prefix", "http://127.0.0.1:9"))
    assert info.value.errno == errno.ENOPKG

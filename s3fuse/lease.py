"""One daemon per bucket prefix: a lease held in PREFIX/lock (docs/S3.md, docs/FORMAT.md).

Taken with a conditional create (PUT If-None-Match: *). The object says who holds
it and until when; the holder renews it (PUT If-Match: its own ETag) every third of
the lease. A successor may take over an expired lease with PUT If-Match: the ETag of
the expired object, so that of two successors racing, exactly one wins. The lease is
deleted at a clean stop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid

import trio

from .backends.s3 import S3Client, S3Error, client_error
from .errors import StoreError

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 60.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _dead_here(info: dict) -> bool:
    """The holder ran on this machine, in this boot, and its process is gone: its lease is
    stale before it expires (a daemon killed here is replaced at once, not after a minute)."""
    if info.get("host") != socket.gethostname() or not info.get("boot_id") or info.get("boot_id") != _boot_id():
        return False
    try:
        os.kill(int(info.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False
    return int(info.get("pid", 0)) <= 0


class LeaseLost(StoreError):
    pass


class BucketLease:
    def __init__(self, s3: S3Client, mountpoint: str, seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.s3 = s3
        self.key = s3.loc.key("lock")
        self.seconds = seconds
        self.lease_id = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}:{mountpoint}"
        self.etag: str | None = None
        self.lost = False
        self.valid_until = 0.0

    def valid(self) -> bool:
        """True while the lease is surely ours (renewed, and not yet expired)."""
        return not self.lost and time.time() < self.valid_until

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"format": 1, "holder": self.holder, "lease_id": self.lease_id,
                           "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                           "renewed": round(now, 3), "expires": round(now + self.seconds, 3)}).encode()

    def _put(self, **cond) -> bool:
        """A conditional PUT; False when its precondition fails (412) or a conflicting
        conditional write is in progress (409)."""
        import botocore.exceptions as bex

        started = time.time()  # the lease runs from before the request, to be safe
        try:
            res = self.s3.call("PUT lock", self.s3.client.put_object, Bucket=self.s3.loc.bucket, Key=self.key,
                               Body=self._body(), ContentType="application/json", **cond)
        except bex.ClientError as exc:
            if client_error(exc)[1] in (409, 412):
                return False
            raise
        self.etag = res["ETag"]
        self.valid_until = started + self.seconds
        return True

    def _read(self) -> tuple[dict, str] | None:
        import botocore.exceptions as bex

        try:
            res = self.s3.call("GET lock", self.s3.client.get_object, Bucket=self.s3.loc.bucket, Key=self.key)
            body = res["Body"].read()
        except bex.ClientError as exc:
            if client_error(exc)[1] == 404:
                return None
            raise
        try:
            info = json.loads(body)
        except ValueError:
            info = {"holder": "an unreadable lock object", "expires": 0}
        return info, res["ETag"]

    def acquire(self) -> None:
        """Take the lease, or raise StoreError (EBUSY) naming the holder. Blocking."""
        for _ in range(5):
            if self._put(IfNoneMatch="*"):
                return
            current = self._read()
            if current is None:
                continue  # released meanwhile: try to create it again
            info, etag = current
            expires = float(info.get("expires", 0))
            if expires > time.time() and not _dead_here(info):
                raise StoreError(
                    f"{self.s3.loc.url} is already mounted by {info.get('holder', '?')} (lease until "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))})", errno.EBUSY)
            if self._put(IfMatch=etag):
                log.warning("took over the %s lease of %s on %s",
                            "expired" if expires <= time.time() else "dead holder's",
                            info.get("holder", "?"), self.s3.loc.url)
                return
        raise StoreError(f"could not take the lease on {self.s3.loc.url} (contended)", errno.EBUSY)

    def renew(self) -> None:
        if not self._put(IfMatch=self.etag):
            current = self._read()
            holder = current[0].get("holder", "?") if current else "nobody"
            raise LeaseLost(f"lost the lease on {self.s3.loc.url}; it is now held by {holder}", errno.EBUSY)

    async def keep(self, on_lost=None) -> None:
        """Renew every third of the lease until cancelled (a trio task). If the lease turns
        out to be someone else's, call `on_lost` (the daemon stops writing) and stop."""
        while True:
            await trio.sleep(self.seconds / 3)
            try:
                await trio.to_thread.run_sync(self.renew)
            except LeaseLost as exc:
                log.error("%s: this daemon no longer writes to the bucket (unmount it)", exc)
                self.lost = True
                if on_lost is not None:
                    on_lost(str(exc))
                return
            except (S3Error, OSError) as exc:
                log.warning("could not renew the lease on %s (will retry): %s", self.s3.loc.url, exc)
            except Exception as exc:  # noqa: BLE001 - botocore errors; the next renewal retries
                log.warning("could not renew the lease on %s (will retry): %s", self.s3.loc.url, exc)

    def release(self) -> None:
        """Delete the lock object if it is still ours."""
        if self.lost:
            return
        current = self._read()
        if current is None or current[0].get("lease_id") != self.lease_id:
            return
        self.s3.call("DELETE lock", self.s3.client.delete_object, Bucket=self.s3.loc.bucket, Key=self.key)

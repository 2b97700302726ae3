"""The S3 endpoint inside the mount's daemon: starting it, and its control-socket requests
(`s3fuse s3-key add/list/remove`, `s3fuse presign`)."""

from __future__ import annotations

import errno
import logging
import os
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote

import trio

from ..crypto import Caller
from ..errors import S3fuseError
from . import sigv4
from .api import S3Api
from .credentials import AccessKeys
from .server import HttpServer, Limits

log = logging.getLogger(__name__)

DEFAULT_PORT = 8333


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: str | None = None
    tls_key: str | None = None
    limits: Limits | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or PORT (on 127.0.0.1)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        raise S3fuseError(f"--s3-api {value!r}: give HOST:PORT", errno.EINVAL) from None
    if not 0 <= n < 65536:
        raise S3fuseError(f"--s3-api {value!r}: the port must be 0-65535", errno.EINVAL)
    return host, n


class S3Service:
    def __init__(self, core, access_keys: AccessKeys, store_id: bytes, mountpoint: str,
                 settings: Settings | None, invalidate_entry=None, metadata_durable=None,
                 invalidate_attrs=None) -> None:
        self.core = core
        self.access_keys = access_keys
        self.mountpoint = mountpoint
        self.settings = settings
        self.api = S3Api(core, access_keys, store_id, invalidate_entry, metadata_durable=metadata_durable,
                         invalidate_attrs=invalidate_attrs)
        self.address: tuple[str, int] | None = None
        self.http: HttpServer | None = None

    async def listen(self) -> None:
        """Open the listening socket (before the mount: a port in use is one clear error)."""
        s = self.settings
        tls = None
        if s.tls_cert:
            try:
                tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls.load_cert_chain(s.tls_cert, s.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise S3fuseError(f"s3api: cannot load the TLS certificate {s.tls_cert} and key {s.tls_key}: "
                                  f"{exc}", errno.EINVAL) from None
        try:
            listeners = await trio.open_tcp_listeners(s.port, host=s.host)
        except OSError as exc:
            raise S3fuseError(f"s3api: cannot listen on {s.host}:{s.port}: {exc.strerror or exc}",
                              exc.errno or errno.EADDRINUSE) from None
        self.address = listeners[0].socket.getsockname()[:2]
        if tls is not None:
            listeners = [trio.SSLListener(lst, tls, https_compatible=True) for lst in listeners]
        self.access_keys.ensure_saved()
        self.http = HttpServer(self.api.handle, self.api.error_response, s.limits, tls)
        self._listeners = listeners

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.http is None:
            await self.listen()
        log.info("S3 API listening on %s", self.endpoint)
        task_status.started()
        await trio.serve_listeners(self.http.connection, self._listeners)

    @property
    def endpoint(self) -> str | None:
        if self.address is None:
            return None
        host, port = self.address
        return f"{self.settings.scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    # ---------------------------------------------------------------- control socket
    def stats(self) -> dict[str, int]:
        return self.api.ns.stats

    def handlers(self) -> dict:
        return {"s3key.add": self.key_add, "s3key.list": self.key_list, "s3key.remove": self.key_remove,
                "s3.presign": self.presign, "s3.endpoint": self.endpoint_info}

    def _record(self, op: str, peer, outcome: str = "allowed", **fields) -> None:
        self.core.keys.record(op, Caller(peer.uid, peer.gid, peer.pid), outcome, **fields)

    async def key_add(self, peer, args: dict) -> dict:
        uid = args.get("uid", peer.uid)
        if isinstance(uid, bool) or not isinstance(uid, int):
            raise TypeError("uid must be an integer")
        try:
            key = self.access_keys.add(uid, peer.uid, bool(args.get("allow_root", False)))
        except S3fuseError as exc:
            self._record("s3:CreateAccessKey", peer, "denied", target_uid=uid, errno=exc.errno)
            raise
        self._record("s3:CreateAccessKey", peer, target_uid=uid, access_key_id=key.access_key_id)
        return {"AccessKeyId": key.access_key_id, "SecretAccessKey": key.secret, "uid": key.uid,
                "endpoint": self.endpoint}

    async def key_list(self, peer, args: dict) -> list:
        return self.access_keys.list(peer.uid)

    async def key_remove(self, peer, args: dict) -> dict:
        akid = args.get("id")
        if not isinstance(akid, str):
            raise TypeError("id must be a string")
        try:
            key = self.access_keys.remove(akid, peer.uid)
        except S3fuseError as exc:
            self._record("s3:DeleteAccessKey", peer, "denied", access_key_id=akid[:64], errno=exc.errno)
            raise
        self._record("s3:DeleteAccessKey", peer, access_key_id=akid)
        return key.describe()

    async def endpoint_info(self, peer, args: dict) -> dict:
        return {"endpoint": self.endpoint}

    async def presign(self, peer, args: dict) -> dict:
        """A presigned URL for a file of the mount, signed with one of the caller's keys."""
        if self.endpoint is None:
            raise S3fuseError("this mount serves no S3 API (mount with --s3-api HOST:PORT)", errno.ENOTCONN)
        path, method = args.get("path"), args.get("method", "GET")
        expires, akid = args.get("expires", 3600), args.get("access_key")
        if not isinstance(path, str) or method not in ("GET", "PUT", "HEAD", "DELETE"):
            raise TypeError("path must be a string and method GET, PUT, HEAD or DELETE")
        if isinstance(expires, bool) or not isinstance(expires, int) or not 0 < expires <= sigv4.MAX_EXPIRES:
            raise S3fuseError("--expires must be 1-604800 seconds (7 days)", errno.EINVAL)
        mnt = os.path.realpath(self.mountpoint)
        rel = os.path.relpath(os.path.abspath(path), mnt) if os.path.isabs(path) else path
        if rel.startswith("..") or rel in (".", ""):
            raise S3fuseError(f"{path} is not a file of the mount {mnt}", errno.EINVAL)
        if "/" not in rel:
            raise S3fuseError(f"{path}: a bucket is a top-level directory; presign a file inside one",
                              errno.EINVAL)
        if akid is None:
            own = self.access_keys.owned_by(peer.uid)
            if not own:
                raise S3fuseError(f"uid {peer.uid} has no S3 access key: create one with s3fuse s3-key add",
                                  errno.ENOKEY)
            key = max(own, key=lambda k: k.created)
        else:
            key = self.access_keys.get(akid)
            if key is None or peer.uid not in (0, key.uid):
                raise S3fuseError(f"no access key {akid!r} of yours exists", errno.ENOENT)
        url = sigv4.presign_url(method, self.endpoint, "/" + quote(rel, safe="/~"), key.access_key_id,
                                key.secret, expires, time.time(), self.api.region)
        self._record("s3:Presign", peer, access_key_id=key.access_key_id, path=rel, method=method,
                     expires=expires)
        return {"url": url}

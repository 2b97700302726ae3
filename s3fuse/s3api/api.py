"""The S3 endpoint's request handling: authentication, the caller, routing to the operations.

A request is verified (SigV4, sigv4.py) against the access keys sealed in the store,
then acts as the key's uid and groups (a `Caller` carrying the access key id, which the
audit trail records, and an SSE-C key sent with the request, usable by it alone).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import unquote

from ..crypto import Caller
from ..errors import S3fuseError
from . import buckets, objects, sigv4, sse
from .credentials import AccessKeys
from .errors import S3Error, from_errno
from .namespace import Namespace
from .server import ClientGone, Request, Response
from .xmlgen import error_document

log = logging.getLogger(__name__)

# sub-resources S3 has and this endpoint does not: 501, never a listing
UNSUPPORTED = {"acl", "policy", "lifecycle", "tagging", "versioning", "versions", "cors", "website",
               "logging", "notification", "replication", "requestPayment", "object-lock", "retention",
               "legal-hold", "torrent", "restore", "select", "analytics", "metrics", "inventory",
               "intelligent-tiering", "accelerate", "ownershipControls", "publicAccessBlock",
               "policyStatus", "attributes"}


class S3Api:
    def __init__(self, core, access_keys: AccessKeys, store_id: bytes, invalidate_entry=None,
                 region: str = sigv4.DEFAULT_REGION, debug_signatures: bool = False,
                 metadata_durable=None, invalidate_attrs=None) -> None:
        self.core = core
        self.keys = core.keys
        self.access_keys = access_keys
        self.store_id = store_id
        self.ns = Namespace(core, invalidate_entry, metadata_durable, invalidate_attrs)
        self.region = region
        self.debug_signatures = debug_signatures
        self._multipart = None

    def multipart_ops(self):
        if self._multipart is None:
            from .multipart import Multipart
            self._multipart = Multipart(self)
        return self._multipart

    # ---------------------------------------------------------------- errors
    def error_response(self, req: Request | None, exc: S3Error) -> Response:
        extra = dict(exc.extra)
        if self.debug_signatures and exc.debug:
            extra.update(exc.debug)
        body = error_document(exc.code, exc.message, req.raw_path if req else "/",
                              req.request_id if req else "", extra)
        headers = [("content-type", "application/xml"), *exc.headers]
        if req is not None and req.method == "HEAD":
            return Response(exc.status, headers, b"", length=None)
        return Response(exc.status, headers, body)

    # ---------------------------------------------------------------- entry
    async def handle(self, req: Request) -> Response:
        held: list = []
        token = sse.REQUEST_KEYS.set(held)
        try:
            resp = await self._handle_logged(req)
        except BaseException:  # no answer to send: the keys go now
            for key in held:
                key.wipe()
            raise
        finally:
            sse.REQUEST_KEYS.reset(token)
        if held:
            # the request's customer keys live until its answer is sent, then are wiped
            previous = resp.cleanup

            def wipe() -> None:
                if previous is not None:
                    previous()
                for key in held:
                    key.wipe()
            resp.cleanup = wipe
        return resp

    async def _handle_logged(self, req: Request) -> Response:
        started = time.monotonic()
        try:
            resp = await self._handle(req)
        except S3Error as exc:
            log.info("s3api %s %s -> %d %s: %s", req.method, req.raw_path[:200], exc.status, exc.code, exc.message)
            return self.error_response(req, exc)
        except S3fuseError as exc:
            err = from_errno(exc.errno, str(exc))
            log.info("s3api %s %s -> %d %s: %s", req.method, req.raw_path[:200], err.status, err.code, exc)
            return self.error_response(req, err)
        except ClientGone as exc:  # nobody to answer: the connection's handler closes it
            log.info("s3api %s %s abandoned: %s", req.method, req.raw_path[:200], exc)
            raise
        except (ValueError, TypeError, UnicodeError) as exc:  # a malformed value a check missed
            log.info("s3api %s %s -> 400: %s", req.method, req.raw_path[:200], exc)
            return self.error_response(req, S3Error("InvalidArgument", f"invalid request: {exc}"))
        except Exception:
            log.exception("s3api %s %s: unexpected error", req.method, req.raw_path[:200])
            return self.error_response(req, S3Error("InternalError", "we encountered an internal error; "
                                                    "please try again"))
        log.debug("s3api %s %s -> %d (%.1f ms)", req.method, req.raw_path[:200], resp.status,
                  (time.monotonic() - started) * 1000)
        return resp

    def caller(self, req: Request, auth: sigv4.Auth) -> Caller:
        key = self.access_keys.get(auth.access_key_id)
        if key is None:
            raise S3Error("InvalidAccessKeyId", "the access key id does not exist")
        return Caller(key.uid, key.gid, 0, key.groups, access_key_id=key.access_key_id)

    async def _handle(self, req: Request) -> Response:
        auth = sigv4.verify(req.method, req.raw_path, req.raw_query, req.headers,
                            self.access_keys.secret_for, time.time(), self.region)
        who = self.caller(req, auth)
        query = dict(sigv4.parse_query(req.raw_query))
        try:
            path = unquote(req.raw_path, errors="strict")
        except UnicodeDecodeError:
            raise S3Error("InvalidURI", "the path is not UTF-8") from None
        if not path.startswith("/"):
            raise S3Error("InvalidURI", "the request target must be a path")
        bucket, _, key = path[1:].partition("/")
        for name in query:
            if name in UNSUPPORTED:
                raise S3Error("NotImplemented", f"the ?{name} sub-resource is not implemented", status=501)
        ctx = Context(self, req, auth, who, query)
        if not bucket:
            if req.method == "GET":
                return await buckets.list_buckets(ctx)
            raise S3Error("MethodNotAllowed", "the specified method is not allowed against the service")
        if not key:
            return await buckets.dispatch(ctx, bucket)
        return await objects.dispatch(ctx, bucket, key)


class Context:
    """One authenticated request."""

    def __init__(self, api: S3Api, req: Request, auth: sigv4.Auth, who: Caller, query: dict) -> None:
        self.api = api
        self.req = req
        self.auth = auth
        self.who = who
        self.query = query
        self.headers: dict[str, str] = {}
        for k, v in req.headers:
            self.headers.setdefault(k, v)

    @property
    def ns(self) -> Namespace:
        return self.api.ns

    @property
    def core(self):
        return self.api.core

    @property
    def secure(self) -> bool:
        return self.req.tls or self.req.loopback


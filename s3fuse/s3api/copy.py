"""CopyObject (and the source side of UploadPartCopy): a copy is a read of the source as the
caller (its SSE-C key from the copy-source headers) and a new write of the target under
the target's encryption (the request's headers, else the target directory's), so a copy
that changes the encryption re-encrypts."""

from __future__ import annotations

import copy
import hashlib
import os
import stat
from dataclasses import replace
from urllib.parse import unquote

from .. import policy as pol
from ..errors import S3fuseError
from ..meta import Inode
from . import etag as etags, sse as ssemod
from .errors import S3Error
from .namespace import READ, allowed, split_key
from .objects import (MAX_OBJECT, READ_PIECE, etag_matches, key_error, parse_date, with_key,
                      check_customer_key, etag_of, object_mode, target_policy, user_metadata,
                      write_object, CONTENT_XATTR, META_PREFIX)
from .buckets import iso8601
from .server import Response
from .xmlgen import document


class Source:
    """An opened copy source: its row, ETag, and a reader of byte ranges."""

    def __init__(self, ctx, row: Inode, who, etag: str, mode: str, kms_key: str) -> None:
        self.ctx, self.row, self.who, self.etag = ctx, row, who, etag
        self.mode, self.kms_key = mode, kms_key
        self.opened = False

    async def open(self) -> None:
        try:
            await self.ctx.core.open(self.row.id, os.O_RDONLY, self.who)
        except S3fuseError as exc:
            raise key_error(exc) from None
        self.opened = True

    def close(self) -> None:
        if self.opened:
            self.ctx.core.release(self.row.id)
            self.opened = False

    async def pieces(self, first: int, last: int, digest=None):
        off = first
        while off <= last:
            try:
                data = await self.ctx.core.read(self.row.id, off, min(READ_PIECE, last + 1 - off), self.who)
            except S3fuseError as exc:
                raise key_error(exc) from None
            if not data:
                raise S3Error("InternalError", "the copy source ended early")
            off += len(data)
            if digest is not None:
                digest.update(data)
            yield data


def parse_copy_source(value: str) -> tuple[str, str]:
    value = value.lstrip("/")
    path, _, query = value.partition("?")
    if query and not query.startswith("versionId="):
        raise S3Error("InvalidArgument", "the copy source is malformed")
    if query and query != "versionId=null":
        raise S3Error("NotImplemented", "object versions are not supported", status=501)
    bucket, sep, key = path.partition("/")
    if not sep or not bucket or not key:
        raise S3Error("InvalidArgument", "copy source must be BUCKET/KEY")
    try:
        return unquote(bucket, errors="strict"), unquote(key, errors="strict")
    except UnicodeDecodeError:
        raise S3Error("InvalidArgument", "the copy source is not UTF-8") from None


def source_conditions(headers: dict[str, str], etag: str, mtime_ns: int) -> None:
    mtime = mtime_ns // 1_000_000_000
    p = "x-amz-copy-source-"
    im, inm = headers.get(p + "if-match"), headers.get(p + "if-none-match")
    ius, ims = parse_date(headers.get(p + "if-unmodified-since")), parse_date(headers.get(p + "if-modified-since"))
    failed = ((im is not None and not etag_matches(im, etag))
              or (im is None and ius is not None and mtime > ius)
              or (inm is not None and etag_matches(inm, etag))
              or (inm is None and ims is not None and mtime <= ims))
    if failed:
        raise S3Error("PreconditionFailed", "at least one of the preconditions you specified did not hold")


async def open_source(ctx) -> Source:
    bucket, key = parse_copy_source(ctx.headers["x-amz-copy-source"])
    b = ctx.ns.bucket(bucket, ctx.who)
    parts, marker = split_key(key)
    _, row = ctx.ns.walk(b, parts, ctx.who)
    if row is None or not stat.S_ISREG(row.mode) or marker:
        raise S3Error("NoSuchKey", "the specified copy source does not exist", key=key)
    if not allowed(row, ctx.who, READ):
        raise S3Error("AccessDenied", f"no read permission on the copy source {ctx.ns.path(row.id)}")
    src_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure, copy_source=True)
    who = with_key(ctx.who, src_sse.customer_key) if src_sse.customer_key is not None else ctx.who
    mode, kms_key = object_mode(ctx.core, row)
    try:
        check_customer_key(with_caller(ctx, who), row, src_sse, mode)
    except S3Error as exc:
        if exc.code == "InvalidRequest" and mode == pol.SSE_C:
            exc.message = "the copy source is encrypted with a customer key: send the " \
                          "x-amz-copy-source-server-side-encryption-customer-* headers"
        raise
    etag = etag_of(ctx.api, row)
    source_conditions(ctx.headers, etag, row.mtime_ns)
    src = Source(ctx, row, who, etag, mode, kms_key)
    src.bucket, src.key = bucket, key
    return src


async def copy_object(ctx, bucket: str, key: str) -> Response:
    directive = ctx.headers.get("x-amz-metadata-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "unknown metadata directive")
    req_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure)
    src = await open_source(ctx)
    if src.row.size > MAX_OBJECT:
        raise S3Error("InvalidRequest", "the source of a CopyObject is at most 5 GB: use UploadPartCopy")
    b = ctx.ns.bucket(bucket, ctx.who)
    parts, marker = split_key(key)
    if marker:
        raise S3Error("InvalidRequest", "a directory marker cannot be a copy target")
    dest_who = with_key(ctx.who, req_sse.customer_key) if req_sse.customer_key is not None else \
        replace(ctx.who, request_key=None)
    wctx = with_caller(ctx, dest_who)
    parent = await ctx.ns.make_parents(b, parts, ctx.who)
    existing = ctx.ns.child(parent.id, parts[-1])
    if existing is not None and stat.S_ISDIR(existing.mode):
        raise S3Error("InvalidRequest", "the target key is a directory (it has keys under it)")
    ctx.ns.check_may_replace(parent, ctx.who, existing)
    policy = await target_policy(wctx, parent, req_sse)
    same = existing is not None and existing.id == src.row.id
    if same and directive == "COPY" and not req_sse.given:
        raise S3Error("InvalidRequest", "this copy request is illegal because it is trying to copy an object "
                      "to itself without changing the object's metadata, storage class, website redirect "
                      "location or encryption attributes")
    if directive == "REPLACE":
        meta = user_metadata(ctx)
    else:
        meta = {}
        for name in ctx.core.meta.list_xattrs(src.row.id):
            if name.startswith(META_PREFIX) or name in CONTENT_XATTR.values():
                meta[name] = ctx.core.meta.get_xattr(src.row.id, name) or b""
    md5 = hashlib.md5()
    await src.open()
    try:
        def etag_for(row):
            h = md5.hexdigest()
            return h if policy.mode == pol.SSE_S3 else etags.opaque(ctx.api.access_keys.etag_key, h)
        row, etag = await write_object(wctx, parent, parts[-1], policy,
                                       src.pieces(0, src.row.size - 1, md5), meta, None, etag_for)
    finally:
        src.close()
    headers = ssemod.response_headers(policy.mode, policy.key if policy.mode == pol.SSE_KMS else "",
                                      req_sse.customer_md5)
    body = document("CopyObjectResult", ("LastModified", iso8601(row.mtime_ns)), ("ETag", f'"{etag}"'))
    return Response(200, [("content-type", "application/xml"), *headers], body)


def with_caller(ctx, who):
    """The request seen with another caller (another SSE-C key)."""
    other = copy.copy(ctx)
    other.who = who
    return other

"""Bucket operations: a bucket is a top-level directory of the mount."""

from __future__ import annotations

import errno
import re
import stat
import time

from .. import policy as pol
from ..errors import S3fuseError
from ..meta import ROOT_INODE
from ..policy import Policy
from . import listing
from .errors import S3Error, from_errno
from .namespace import SEARCH, WRITE, allowed
from .sse import kms_ref
from .server import Response
from .xmlgen import document, el, parse

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def iso8601(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{(ns // 1_000_000) % 1000:03d}Z"


def _xml(body: bytes, status: int = 200) -> Response:
    return Response(status, [("content-type", "application/xml")], body)


def owner(uid: int) -> str:
    return el("Owner", ("ID", str(uid)), ("DisplayName", f"uid {uid}"))


async def list_buckets(ctx) -> Response:
    core = ctx.core
    root = core.attr(ROOT_INODE)
    if not allowed(root, ctx.who, SEARCH | 4):
        raise S3Error("AccessDenied", "no permission to list the mount's top directory")
    items = []
    cursor = 0
    while True:
        rows = core.readdir(ROOT_INODE, cursor, 1024)
        if not rows:
            break
        for cur, name, row in rows:
            cursor = cur
            if stat.S_ISDIR(row.mode):
                items.append((name, row))
    items.sort(key=lambda t: t[0])
    buckets = [el("Bucket", ("Name", n.decode("utf-8", "replace")), ("CreationDate", iso8601(r.ctime_ns)))
               for n, r in items]
    return _xml(document("ListAllMyBucketsResult", owner(ctx.who.uid), el("Buckets", *buckets)))


async def dispatch(ctx, bucket: str) -> Response:
    m, q = ctx.req.method, ctx.query
    if "encryption" in q:
        return await encryption(ctx, bucket)
    if "uploads" in q and m == "GET":
        return await ctx.api.multipart_ops().list_uploads(ctx, bucket)
    if m == "GET" and "location" in q:
        ctx.ns.bucket(bucket, ctx.who)
        return _xml(document("LocationConstraint"))
    if m == "GET":
        return await listing.list_objects(ctx, bucket)
    if m == "HEAD":
        row = ctx.ns.bucket(bucket, ctx.who)
        if not allowed(row, ctx.who, SEARCH):
            raise S3Error("AccessDenied", "access denied")
        return Response(200, [("x-amz-bucket-region", ctx.api.region)])
    if m == "PUT":
        return await create(ctx, bucket)
    if m == "DELETE":
        return await delete(ctx, bucket)
    if m == "POST" and "delete" in q:
        from .objects import delete_many  # objects imports copy, which imports this module
        return await delete_many(ctx, bucket)
    raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", status=405)


async def create(ctx, bucket: str) -> Response:
    await ctx.req.read_all(64 * 1024)  # CreateBucketConfiguration: the region is ours anyway
    raw = bucket.encode()
    try:
        existing = ctx.ns.bucket(bucket, ctx.who)
    except S3Error as exc:
        if exc.code != "NoSuchBucket":
            raise
        existing = None
    if existing is not None:
        if existing.uid == ctx.who.uid:
            raise S3Error("BucketAlreadyOwnedByYou", "your previous request to create the named bucket succeeded "
                          "and you already own it", bucketName=bucket)
        raise S3Error("BucketAlreadyExists", "the requested bucket name is not available", bucketName=bucket)
    if not _BUCKET_NAME.match(bucket) or ".." in bucket or _IP.match(bucket) or bucket.startswith("xn--"):
        raise S3Error("InvalidBucketName", "the specified bucket is not valid (3-63 of a-z 0-9 . -)",
                      bucketName=bucket)
    root = ctx.core.attr(ROOT_INODE)
    if not allowed(root, ctx.who, WRITE | SEARCH):
        raise S3Error("AccessDenied", "no write permission on the mount's top directory")
    try:
        ctx.core.mkdir(ROOT_INODE, raw, 0o755, ctx.who)
    except S3fuseError as exc:
        raise from_errno(exc.errno, str(exc), "bucket") from None
    await ctx.ns.changed_entry(ROOT_INODE, raw)
    return Response(200, [("location", f"/{bucket}")])


async def delete(ctx, bucket: str) -> Response:
    row = ctx.ns.bucket(bucket, ctx.who)
    if ctx.core.meta.has_entries(row.id):
        raise S3Error("BucketNotEmpty", "the bucket you tried to delete is not empty", bucketName=bucket)
    root = ctx.core.attr(ROOT_INODE)
    await ctx.ns.remove(root, bucket.encode(), row, ctx.who)
    return Response(204)


# ---------------------------------------------------------------- default encryption

def _rule(algorithm: str, key: str = "") -> str:
    inner = [("SSEAlgorithm", algorithm)]
    if key:
        inner.append(("KMSMasterKeyID", key))
    return el("Rule", el("ApplyServerSideEncryptionByDefault", *inner), ("BucketKeyEnabled", "false"))


async def encryption(ctx, bucket: str) -> Response:
    row = ctx.ns.bucket(bucket, ctx.who)
    m = ctx.req.method
    if m == "GET":
        if row.sse is None:
            raise S3Error("ServerSideEncryptionConfigurationNotFoundError",
                          "the server side encryption configuration was not found", bucketName=bucket)
        p = Policy.decode(row.sse)
        if p.mode == pol.SSE_C:
            # S3's document has no way to say "SSE-C": PUTs here need the customer-key headers
            raise S3Error("ServerSideEncryptionConfigurationNotFoundError",
                          "this bucket's directory defaults to SSE-C (customer key "
                          f"{p.key}), which S3's encryption configuration cannot express; "
                          "PUTs must carry the customer-key headers", bucketName=bucket)
        doc = document("ServerSideEncryptionConfiguration", _rule(p.mode, p.key if p.mode == pol.SSE_KMS else ""))
        return _xml(doc)
    if m == "PUT":
        body = await ctx.req.read_all(64 * 1024)
        root = parse(body)
        rule = root.find("Rule")
        default = rule.find("ApplyServerSideEncryptionByDefault") if rule is not None else None
        alg = default.findtext("SSEAlgorithm") if default is not None else None
        if alg is None:
            raise S3Error("MalformedXML", "the XML you provided was not well-formed or did not validate")
        key = (default.findtext("KMSMasterKeyID") or "").strip()
        if alg == pol.SSE_S3:
            if key:
                raise S3Error("InvalidArgument", "KMSMasterKeyID is only valid with aws:kms")
            value = b"AES256"
        elif alg == pol.SSE_KMS:
            value = f"aws:kms:{kms_ref(key)}".encode() if key else b"aws:kms"
        else:
            raise S3Error("InvalidArgument", f"the encryption algorithm {alg[:40]!r} is not supported "
                          "(AES256 or aws:kms)")
        try:
            await ctx.core.setxattr(row.id, pol.XATTR_SSE, value, ctx.who)
        except S3fuseError as exc:
            raise _encryption_error(exc) from None
        ctx.ns.changed_attrs(row.id)
        return Response(200)
    if m == "DELETE":
        if row.sse is not None:
            try:
                ctx.core.removexattr(row.id, pol.XATTR_SSE, ctx.who)
            except S3fuseError as exc:
                raise _encryption_error(exc) from None
            ctx.ns.changed_attrs(row.id)
        return Response(204)
    raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", status=405)


def _encryption_error(exc: S3fuseError) -> S3Error:
    if exc.errno == errno.ENOKEY:
        return S3Error("KMS.NotFoundException", str(exc))
    if exc.errno == errno.EKEYREVOKED:
        return S3Error("KMS.DisabledException", str(exc))
    return from_errno(exc.errno, str(exc))

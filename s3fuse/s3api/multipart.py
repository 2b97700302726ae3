"""Multipart uploads. Parts are staged as files of the filesystem itself, so they are
encrypted like any file (under the encryption the upload was created with) and never on
disk as plaintext, and they survive a restart of the daemon.

Layout: `BUCKET/.s3fuse-put-uploads/UPLOADID/NNNNN` (hidden from listings; the directories
belong to root, mode 0700, so the mount shows them to root alone). The upload's record (key,
owner, encryption, metadata) is an xattr of its directory; each part's MD5 is sealed in its
file like an object's ETag. Complete copies the parts in order into the new object's file,
which then replaces the key as a single PUT does.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time

import msgpack

from .. import policy as pol
from ..crypto import Caller
from ..errors import S3fuseError
from ..meta import Inode
from ..policy import Policy
from . import etag as etags, sse as ssemod
from .buckets import iso8601, owner
from .copy import open_source, with_caller
from .errors import S3Error, from_errno
from .namespace import TEMP_PREFIX, split_key
from .objects import (BodyReader, key_error, with_key, etag_of, target_policy, user_metadata,
                      write_object, READ_PIECE)
from .server import Response
from .xmlgen import document, el, parse

UPLOADS = TEMP_PREFIX + b"uploads"
RECORD = b"user.s3fuse.s3api.upload"
MIN_PART = 5 << 20
MAX_PART = 5 << 30
MAX_PARTS = 10000
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
SYSTEM = Caller(0, 0)


def _xml(body: bytes) -> Response:
    return Response(200, [("content-type", "application/xml")], body)


class Upload:
    def __init__(self, upload_id: str, dir_row: Inode, record: dict) -> None:
        self.id = upload_id
        self.dir = dir_row
        self.key: str = record["key"]
        self.uid: int = record["uid"]
        self.policy = Policy.decode(record["policy"])
        self.meta: dict[bytes, bytes] = record.get("meta", {})
        self.created: int = record["created"]


class Multipart:
    def __init__(self, api) -> None:
        self.api = api

    # ---------------------------------------------------------------- routing
    async def dispatch(self, ctx, bucket: str, key: str) -> Response:
        m, q = ctx.req.method, ctx.query
        if m == "POST" and "uploads" in q:
            return await self.create(ctx, bucket, key)
        upload = self._upload(ctx, bucket, key, q.get("uploadId", ""))
        if m == "PUT":
            if "x-amz-copy-source" in ctx.headers:
                return await self.upload_part_copy(ctx, upload)
            return await self.upload_part(ctx, upload)
        if m == "POST":
            return await self.complete(ctx, bucket, upload)
        if m == "DELETE":
            await self._remove(ctx, bucket, upload)
            return Response(204)
        if m == "GET":
            return self.list_parts(ctx, bucket, upload)
        raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", status=405)

    # ---------------------------------------------------------------- staging area
    def _uploads_dir(self, ctx, bucket: str, create: bool) -> Inode | None:
        b = ctx.ns.bucket(bucket, ctx.who)
        row = ctx.ns.child(b.id, UPLOADS)
        if row is None and create:
            row = ctx.core.mkdir(b.id, UPLOADS, 0o700, SYSTEM)
        return row

    def _upload(self, ctx, bucket: str, key: str, upload_id: str) -> Upload:
        missing = S3Error("NoSuchUpload", "the specified upload does not exist: it may have been aborted "
                          "or completed", uploadId=upload_id[:64])
        if not _UPLOAD_ID.match(upload_id):
            raise missing
        ups = self._uploads_dir(ctx, bucket, create=False)
        row = ctx.ns.child(ups.id, upload_id.encode()) if ups is not None else None
        raw = ctx.core.meta.get_xattr(row.id, RECORD) if row is not None else None
        if raw is None:
            raise missing
        up = Upload(upload_id, row, msgpack.unpackb(raw))
        if up.key != key:
            raise missing
        if ctx.who.uid not in (0, up.uid):
            raise S3Error("AccessDenied", "the upload belongs to another user")
        return up

    # ---------------------------------------------------------------- operations
    async def create(self, ctx, bucket: str, key: str) -> Response:
        b = ctx.ns.bucket(bucket, ctx.who)
        parts, marker = split_key(key)
        if marker:
            raise S3Error("InvalidRequest", "a directory marker cannot be uploaded in parts")
        req_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure)
        if req_sse.customer_key is not None:
            ctx.who = with_key(ctx.who, req_sse.customer_key)
        # the target's directory decides the default encryption, as for a PUT
        parent = b
        for name in parts[:-1]:
            row = ctx.ns.child(parent.id, name)
            if row is None or not stat.S_ISDIR(row.mode):
                break
            parent = row
        policy = await target_policy(ctx, parent, req_sse)
        try:
            await ctx.api.keys.check_write(policy, ctx.who, path=key)
        except S3fuseError as exc:
            raise key_error(exc) from None
        ups = self._uploads_dir(ctx, bucket, create=True)
        upload_id = os.urandom(16).hex()
        d = ctx.core.mkdir(ups.id, upload_id.encode(), 0o700, SYSTEM)
        record = {"key": key, "uid": ctx.who.uid, "policy": policy.encode(), "meta": user_metadata(ctx),
                  "created": time.time_ns()}
        with ctx.core.meta.transaction():
            ctx.core.meta.set_xattr(d.id, RECORD, msgpack.packb(record))
        headers = ssemod.response_headers(policy.mode, policy.key if policy.mode == pol.SSE_KMS else "",
                                          req_sse.customer_md5)
        body = document("InitiateMultipartUploadResult", ("Bucket", bucket), ("Key", key),
                        ("UploadId", upload_id))
        return Response(200, [("content-type", "application/xml"), *headers], body)

    def _part_number(self, ctx) -> int:
        try:
            n = int(ctx.query.get("partNumber", ""))
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_PARTS:
            raise S3Error("InvalidArgument", "part number must be an integer between 1 and 10000")
        return n

    def _part_caller(self, ctx, up: Upload):
        req_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure)
        if req_sse.mode in (pol.SSE_S3, pol.SSE_KMS):
            raise S3Error("InvalidArgument", "the encryption of a part is the upload's: set it at "
                          "CreateMultipartUpload")
        if up.policy.mode == pol.SSE_C:
            if req_sse.customer_key is None or req_sse.customer_key.fingerprint != up.policy.key:
                raise S3Error("InvalidRequest", "the SSE-C parameters did not match the ones used originally "
                              "for this upload")
            return with_key(ctx.who, req_sse.customer_key), req_sse
        if req_sse.customer_key is not None:
            raise S3Error("InvalidRequest", "the upload is not encrypted with a customer key")
        return ctx.who, req_sse

    async def _store_part(self, ctx, up: Upload, n: int, who, source, finish, digest) -> str:
        name = b"%05d" % n
        wctx = with_caller(ctx, who)

        def etag_for(row):
            return digest.hexdigest()

        _, etag = await write_object(wctx, up.dir, name, up.policy, source, {}, finish, etag_for)
        return etag

    async def upload_part(self, ctx, up: Upload) -> Response:
        n = self._part_number(ctx)
        who, req_sse = self._part_caller(ctx, up)
        reader = BodyReader(with_caller(ctx, who), limit=MAX_PART)
        etag = await self._store_part(ctx, up, n, who, reader.pieces(), reader.finish, reader.md5)
        headers = [("etag", f'"{etag}"')] + ssemod.response_headers(
            up.policy.mode, up.policy.key if up.policy.mode == pol.SSE_KMS else "", req_sse.customer_md5)
        return Response(200, headers + reader.sums.response_headers())

    async def upload_part_copy(self, ctx, up: Upload) -> Response:
        n = self._part_number(ctx)
        who, req_sse = self._part_caller(ctx, up)
        src = await open_source(ctx)
        size = src.row.size
        first, last = 0, size - 1
        rng = ctx.headers.get("x-amz-copy-source-range")
        if rng is not None:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng.strip())
            if not m:
                raise S3Error("InvalidArgument", "the x-amz-copy-source-range value must be of the form "
                              "bytes=first-last")
            first, last = int(m.group(1)), int(m.group(2))
            if first > last or last >= size:
                raise S3Error("InvalidRange", "the x-amz-copy-source-range is outside the source")
        if last - first + 1 > MAX_PART:
            raise S3Error("EntityTooLarge", "a part is at most 5 GB")
        md5 = hashlib.md5()
        await src.open()
        try:
            etag = await self._store_part(ctx, up, n, who, src.pieces(first, last, md5) if size else _empty(),
                                          None, md5)
        finally:
            src.close()
        row = ctx.ns.child(up.dir.id, b"%05d" % n)
        body = document("CopyPartResult", ("LastModified", iso8601(row.mtime_ns)), ("ETag", f'"{etag}"'))
        return _xml(body)

    def _parts(self, ctx, up: Upload) -> dict[int, tuple[Inode, str]]:
        out = {}
        cursor = 0
        while True:
            rows = ctx.core.readdir(up.dir.id, cursor, 1024)
            if not rows:
                break
            for cur, name, row in rows:
                cursor = cur
                if name.isdigit() and stat.S_ISREG(row.mode):
                    out[int(name)] = (row, etag_of(self.api, row))
        return out

    async def complete(self, ctx, bucket: str, up: Upload) -> Response:
        body = await ctx.req.read_all(1 << 20)
        root = parse(body)
        listed = []
        for p in root.findall("Part"):
            try:
                listed.append((int(p.findtext("PartNumber") or ""), (p.findtext("ETag") or "").strip().strip('"')))
            except ValueError:
                raise S3Error("MalformedXML", "a part number is not an integer") from None
        if root.tag != "CompleteMultipartUpload" or not listed:
            raise S3Error("MalformedXML", "the XML you provided was not well-formed or did not validate")
        numbers = [n for n, _ in listed]
        if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
            raise S3Error("InvalidPartOrder", "the list of parts was not in ascending order")
        have = self._parts(ctx, up)
        chosen = []
        for i, (n, tag) in enumerate(listed):
            part = have.get(n)
            if part is None or part[1] != tag:
                raise S3Error("InvalidPart", f"part {n} could not be found, or its ETag did not match")
            if i < len(listed) - 1 and part[0].size < MIN_PART:
                raise S3Error("EntityTooSmall", "your proposed upload is smaller than the minimum allowed "
                              "size: every part but the last is at least 5 MiB")
            chosen.append(part)
        who = ctx.who
        if up.policy.mode == pol.SSE_C:
            req_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure)
            if req_sse.customer_key is None or req_sse.customer_key.fingerprint != up.policy.key:
                raise S3Error("InvalidRequest", "the SSE-C parameters did not match the ones used originally "
                              "for this upload")
            who = with_key(ctx.who, req_sse.customer_key)
        wctx = with_caller(ctx, who)
        b = ctx.ns.bucket(bucket, ctx.who)
        parts, _ = split_key(up.key)
        parent = await ctx.ns.make_parents(b, parts, ctx.who)
        existing = ctx.ns.child(parent.id, parts[-1])
        if existing is not None and stat.S_ISDIR(existing.mode):
            raise S3Error("InvalidRequest", "the target key is a directory (it has keys under it)")
        ctx.ns.check_may_replace(parent, ctx.who, existing)
        final_etag = etags.multipart([bytes.fromhex(tag) for _, tag in listed])
        core = ctx.core

        async def pieces():
            for row, _ in chosen:
                try:
                    await core.open(row.id, os.O_RDONLY, who)
                except S3fuseError as exc:
                    raise key_error(exc) from None
                try:
                    off = 0
                    while off < row.size:
                        data = await core.read(row.id, off, min(READ_PIECE, row.size - off), who)
                        if not data:
                            raise S3Error("InternalError", "a part ended early")
                        off += len(data)
                        yield data
                finally:
                    core.release(row.id)

        row, etag = await write_object(wctx, parent, parts[-1], up.policy, pieces(), up.meta, None,
                                       lambda row: final_etag)
        await self._remove(ctx, bucket, up)
        headers = ssemod.response_headers(up.policy.mode, up.policy.key if up.policy.mode == pol.SSE_KMS else "")
        return Response(200, [("content-type", "application/xml"), *headers], document(
            "CompleteMultipartUploadResult", ("Location", f"/{bucket}/{up.key}"), ("Bucket", bucket),
            ("Key", up.key), ("ETag", f'"{etag}"')))

    async def _remove(self, ctx, bucket: str, up: Upload) -> None:
        core = ctx.core
        try:
            for n, (row, _) in self._parts(ctx, up).items():
                core.unlink(up.dir.id, b"%05d" % n)
            ups = self._uploads_dir(ctx, bucket, create=False)
            core.rmdir(ups.id, up.id.encode())
            if not core.meta.has_entries(ups.id):
                b = ctx.ns.bucket(bucket, ctx.who)
                core.rmdir(b.id, UPLOADS)
        except S3fuseError as exc:
            raise from_errno(exc.errno, str(exc)) from None

    def list_parts(self, ctx, bucket: str, up: Upload) -> Response:
        try:
            marker = int(ctx.query.get("part-number-marker", "0") or 0)
            max_parts = min(int(ctx.query.get("max-parts", "1000")), 1000)
        except ValueError:
            raise S3Error("InvalidArgument", "part-number-marker and max-parts are integers") from None
        have = sorted((n, p) for n, p in self._parts(ctx, up).items() if n > marker)
        page, truncated = have[:max_parts], len(have) > max_parts
        items = [el("Part", ("PartNumber", n), ("LastModified", iso8601(row.mtime_ns)), ("ETag", f'"{tag}"'),
                    ("Size", row.size)) for n, (row, tag) in page]
        head = [("Bucket", bucket), ("Key", up.key), ("UploadId", up.id), ("PartNumberMarker", marker),
                ("NextPartNumberMarker", page[-1][0] if page else marker), ("MaxParts", max_parts),
                ("IsTruncated", "true" if truncated else "false"), owner(up.uid).replace("Owner", "Initiator"),
                owner(up.uid), ("StorageClass", "STANDARD")]
        return _xml(document("ListPartsResult", *head, *items))

    async def list_uploads(self, ctx, bucket: str) -> Response:
        prefix = ctx.query.get("prefix", "")
        ups = self._uploads_dir(ctx, bucket, create=False)
        found = []
        cursor = 0
        while ups is not None:
            rows = ctx.core.readdir(ups.id, cursor, 1024)
            if not rows:
                break
            for cur, name, row in rows:
                cursor = cur
                raw = ctx.core.meta.get_xattr(row.id, RECORD)
                if raw is None:
                    continue
                up = Upload(name.decode(), row, msgpack.unpackb(raw))
                if up.key.startswith(prefix) and ctx.who.uid in (0, up.uid):
                    found.append(up)
        found.sort(key=lambda u: (u.key.encode(), u.created))
        items = [el("Upload", ("Key", u.key), ("UploadId", u.id), owner(u.uid).replace("Owner", "Initiator"),
                    owner(u.uid), ("StorageClass", "STANDARD"), ("Initiated", iso8601(u.created)))
                 for u in found[:1000]]
        return _xml(document("ListMultipartUploadsResult", ("Bucket", bucket), ("KeyMarker", ""),
                             ("UploadIdMarker", ""), ("Prefix", prefix), ("MaxUploads", 1000),
                             ("IsTruncated", "true" if len(found) > 1000 else "false"), *items))


async def _empty():
    return
    yield b""

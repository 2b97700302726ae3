"""Object operations: GET, HEAD, PUT, DELETE, DeleteObjects, over files of the mount.

A PUT writes a hidden file beside its target (`.s3fuse-put-*`, never listed), stores and
commits its data and metadata, then renames it over the key and makes the rename durable:
200 means the object is stored and committed, and a reader never sees half an object.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import errno
import hashlib
import os
import stat
from dataclasses import replace

from .. import policy as pol
from ..errors import S3fuseError
from ..meta import Inode
from ..policy import Policy
from . import checksums, etag as etags, sse as ssemod
from .errors import S3Error, from_errno
from .namespace import READ, allowed, split_key
from .server import Response
from .sigv4 import STREAMING, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, UNSIGNED, ChunkedDecoder
from .xmlgen import document, el, parse

MAX_OBJECT = 5 << 30  # a single PUT, as S3
READ_PIECE = 4 << 20  # one block of the store: a GET reads as the data path stores
MAX_METADATA = 2048
META_PREFIX = b"user.s3.meta."
CONTENT_HEADERS = ("content-type", "content-encoding", "cache-control", "content-disposition",
                   "content-language", "expires")
CONTENT_XATTR = {h: b"user.s3." + h.encode() for h in CONTENT_HEADERS}


def http_date(ns: int) -> str:
    return email.utils.formatdate(ns / 1e9, usegmt=True)


def etag_of(api, row: Inode) -> str:
    """The object's ETag, unquoted (etag.py says how it is made)."""
    core = api.core
    blocks = core.meta.blocks_of(row.id)
    ids = [b.object_id for b in blocks]
    if not core.data.has_unstored(row.id):
        record = core.meta.get_xattr(row.id, etags.XATTR)
        if record is not None:
            value = etags.unseal(api.access_keys.etag_key, api.store_id, row.id, row.size, ids, record)
            if value is not None:
                return value
    return etags.derived(api.access_keys.etag_key, row.id, row.size, row.mtime_ns, ids)


def object_mode(core, row: Inode) -> tuple[str, str]:
    """(mode, KMS key id) of a file's objects, else of its setting."""
    versions = core.meta.key_versions(row.id)
    if versions:
        return versions[0][0], versions[0][1] if versions[0][0] == pol.SSE_KMS else ""
    p = Policy.decode(row.sse) or pol.DEFAULT
    return p.mode, p.key if p.mode == pol.SSE_KMS else ""


async def dispatch(ctx, bucket: str, key: str) -> Response:
    m, q = ctx.req.method, ctx.query
    mp = ctx.api.multipart_ops
    if "uploadId" in q or "uploads" in q:
        return await mp().dispatch(ctx, bucket, key)
    if m in ("GET", "HEAD"):
        return await get(ctx, bucket, key, head=(m == "HEAD"))
    if m == "PUT":
        if "x-amz-copy-source" in ctx.headers:
            from .copy import copy_object  # copy builds on this module
            return await copy_object(ctx, bucket, key)
        return await put(ctx, bucket, key)
    if m == "DELETE":
        return await delete(ctx, bucket, key)
    raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", status=405)


# ---------------------------------------------------------------- reading

def _resolve(ctx, bucket: str, key: str) -> tuple[Inode, Inode, list[bytes]]:
    b = ctx.ns.bucket(bucket, ctx.who)
    parts, marker = split_key(key)
    parent, row = ctx.ns.walk(b, parts, ctx.who)
    if row is None or (stat.S_ISDIR(row.mode) and not marker) or (marker and not stat.S_ISDIR(row.mode)) \
            or not (stat.S_ISREG(row.mode) or stat.S_ISDIR(row.mode)):
        raise S3Error("NoSuchKey", "the specified key does not exist", key=key)
    return parent, row, parts


def check_customer_key(ctx, row: Inode, req_sse: ssemod.RequestSSE, mode: str) -> None:
    """S3's rules for GET/HEAD: SSE-C objects need their key; others refuse SSE headers."""
    if mode == pol.SSE_C:
        if req_sse.customer_key is None:
            raise S3Error("InvalidRequest", "the object was stored using a form of server side encryption: "
                          "the correct parameters must be provided to retrieve it (SSE-C headers)")
        recorded = [ref for m, ref in ctx.core.meta.key_refs(row.id) if m == pol.SSE_C]
        p = Policy.decode(row.sse)
        ok = all(ctx.api.keys.customer_key_for_object(ctx.who, r) is not None for r in recorded)
        if not recorded and p is not None:
            ok = req_sse.customer_key.fingerprint == p.key
        if not ok:
            raise S3Error("AccessDenied", "the customer key given does not open this object")
    elif req_sse.customer_key is not None:
        raise S3Error("InvalidRequest", "the encryption parameters are not applicable to this object")


def etag_matches(header: str, etag: str) -> bool:
    for tag in header.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == "*" or tag.strip('"') == etag:
            return True
    return False


def parse_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def conditions(headers: dict[str, str], etag: str, mtime_ns: int) -> int | None:
    """S3's order: If-Match, If-Unmodified-Since (412), If-None-Match, If-Modified-Since (304)."""
    mtime = mtime_ns // 1_000_000_000
    im = headers.get("if-match")
    if im is not None:
        if not etag_matches(im, etag):
            return 412
    else:
        ius = parse_date(headers.get("if-unmodified-since"))
        if ius is not None and mtime > ius:
            return 412
    inm = headers.get("if-none-match")
    if inm is not None:
        if etag_matches(inm, etag):
            return 304
    else:
        ims = parse_date(headers.get("if-modified-since"))
        if ims is not None and mtime <= ims:
            return 304
    return None


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """-> (first, last) inclusive; None for no range or one to ignore; S3Error 416."""
    if not value or not value.startswith("bytes=") or "," in value:
        return None
    spec = value[len("bytes="):].strip()
    first_s, dash, last_s = spec.partition("-")
    if not dash:
        return None
    try:
        if first_s == "":
            n = int(last_s)
            if n <= 0 or size == 0:
                raise _unsatisfiable(size)
            return max(0, size - n), size - 1
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first >= size:
        raise _unsatisfiable(size)
    if last < first:
        return None
    return first, min(last, size - 1)


def _unsatisfiable(size: int) -> S3Error:
    err = S3Error("InvalidRange", "the requested range is not satisfiable", actualObjectSize=str(size))
    err.headers.append(("content-range", f"bytes */{size}"))
    return err


def object_headers(ctx, row: Inode, etag: str, mode: str, kms_key: str, customer_md5: str) -> list[tuple[str, str]]:
    core = ctx.core
    h = [("etag", f'"{etag}"'), ("last-modified", http_date(row.mtime_ns)), ("accept-ranges", "bytes")]
    names = set(core.meta.list_xattrs(row.id))  # one query; most files have none of these
    for name in sorted(n for n in names if n.startswith(META_PREFIX)):
        value = core.meta.get_xattr(row.id, name) or b""
        h.append(("x-amz-meta-" + name[len(META_PREFIX):].decode("latin-1"), value.decode("latin-1")))
    for header, xname in CONTENT_XATTR.items():
        if xname in names:
            h.append((header, (core.meta.get_xattr(row.id, xname) or b"").decode("latin-1")))
    if not any(k == "content-type" for k, _ in h):
        h.append(("content-type", "binary/octet-stream" if not stat.S_ISDIR(row.mode) else "application/x-directory"))
    h += ssemod.response_headers(mode, kms_key, customer_md5)
    return h


async def get(ctx, bucket: str, key: str, head: bool) -> Response:
    req_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure)
    if req_sse.mode in (pol.SSE_S3, pol.SSE_KMS):
        raise S3Error("InvalidArgument", "x-amz-server-side-encryption is not valid on GET or HEAD")
    parent, row, _ = _resolve(ctx, bucket, key)
    if stat.S_ISDIR(row.mode):  # a directory marker: an empty object
        h = [("etag", '"d41d8cd98f00b204e9800998ecf8427e"'), ("last-modified", http_date(row.mtime_ns)),
             ("content-type", "application/x-directory")]
        return Response(200, h, b"")
    if not allowed(row, ctx.who, READ):
        raise S3Error("AccessDenied", f"no read permission on {ctx.ns.path(row.id)}")
    if req_sse.customer_key is not None:
        ctx.who = with_key(ctx.who, req_sse.customer_key)
    mode, kms_key = object_mode(ctx.core, row)
    check_customer_key(ctx, row, req_sse, mode)
    etag = etag_of(ctx.api, row)
    headers = object_headers(ctx, row, etag, mode, kms_key, req_sse.customer_md5)
    cond = conditions(ctx.headers, etag, row.mtime_ns)
    if cond == 412:
        raise S3Error("PreconditionFailed", "at least one of the preconditions you specified did not hold",
                      condition="If-Match")
    if cond == 304:
        return Response(304, [h for h in headers if h[0] in ("etag", "last-modified")])
    size = row.size
    rng = parse_range(ctx.headers.get("range"), size)
    if "partNumber" in ctx.query:
        if rng is not None:
            raise S3Error("InvalidRequest", "cannot specify both Range and partNumber")
        if ctx.query["partNumber"] != "1":
            raise S3Error("InvalidPartNumber", "the requested partnumber is not satisfiable", status=416)
    status = 200
    first, last = 0, size - 1
    if rng is not None:
        first, last = rng
        status = 206
        headers.append(("content-range", f"bytes {first}-{last}/{size}"))
    for name in ("content-type", "content-language", "expires", "cache-control", "content-disposition",
                 "content-encoding"):
        override = ctx.query.get("response-" + name)
        if override is not None:
            headers = [h for h in headers if h[0] != name] + [(name, override)]
    length = last - first + 1 if size else 0
    # the key checks of the mount's open(2), for this caller (KMS policy, SSE-C key)
    try:
        await ctx.core.open(row.id, os.O_RDONLY, ctx.who)
    except S3fuseError as exc:
        raise key_error(exc) from None
    if head:
        ctx.core.release(row.id)
        return Response(status, headers + [("content-length", str(length))], b"")
    core, who, ino = ctx.core, ctx.who, row.id
    # The first piece is read before the answer starts, so that a key that cannot be used
    # (a disabled KMS key, a damaged object) is an S3 error rather than a cut-off body.
    try:
        piece = await core.read(ino, first, min(READ_PIECE, length), who) if length else b""
    except S3fuseError as exc:
        core.release(ino)
        raise key_error(exc) from None
    except BaseException:
        core.release(ino)
        raise

    async def stream():
        off = first + len(piece)
        if piece:
            yield piece
        while off <= last:
            data = await core.read(ino, off, min(READ_PIECE, last + 1 - off), who)
            if not data:
                raise S3fuseError("the object ended early", 5)
            off += len(data)
            yield data

    return Response(status, headers, None, stream=stream, length=length, cleanup=lambda: core.release(ino))


def with_key(who, key):
    """The caller, holding the customer key a request brought."""
    return replace(who, request_key=key)


def key_error(exc: S3fuseError) -> S3Error:
    if exc.errno == errno.EKEYREVOKED:
        return S3Error("KMS.DisabledException", str(exc))
    if exc.errno in (errno.ENOKEY, errno.EKEYREJECTED, errno.EACCES, errno.EPERM):
        return S3Error("AccessDenied", str(exc))
    return from_errno(exc.errno, str(exc))


# ---------------------------------------------------------------- writing

def user_metadata(ctx) -> dict[bytes, bytes]:
    meta = {}
    total = 0
    for k, v in ctx.req.headers:
        if k.startswith("x-amz-meta-"):
            name = k[len("x-amz-meta-"):].encode("latin-1")
            meta[META_PREFIX + name] = v.encode("latin-1")
            total += len(name) + len(v)
    if total > MAX_METADATA:
        raise S3Error("MetadataTooLarge", "your metadata headers exceed the maximum allowed metadata size (2 KB)")
    for h, xname in CONTENT_XATTR.items():
        value = ctx.headers.get(h)
        if h == "content-encoding" and value is not None:
            value = ",".join(t.strip() for t in value.split(",") if t.strip() != "aws-chunked") or None
        if value is not None:
            meta[xname] = value.encode("latin-1")
    return meta


async def target_policy(ctx, parent: Inode, req_sse: ssemod.RequestSSE) -> Policy:
    """The new object's encryption: the request's headers, else the bucket directory's default."""
    if req_sse.given:
        try:
            return await ssemod.to_policy(req_sse, ctx.api.keys, ctx.who)
        except S3fuseError as exc:
            raise key_error(exc) from None
    p = ctx.core.effective_policy(parent.id)
    if p.mode == pol.SSE_C:
        raise S3Error("InvalidRequest", "this bucket's directory defaults to SSE-C: send the customer-key "
                      "headers (x-amz-server-side-encryption-customer-*) with each PUT")
    return p


class BodyReader:
    """A PUT body as it arrives: aws-chunked decoded, size bounded, digests computed."""

    def __init__(self, ctx, limit: int = MAX_OBJECT) -> None:
        self.ctx = ctx
        h = ctx.headers
        self.payload = ctx.auth.payload_hash
        self.chunked = self.payload in STREAMING or "aws-chunked" in h.get("content-encoding", "")
        self.decoder = None
        if self.chunked:
            if "x-amz-decoded-content-length" not in h:
                raise S3Error("MissingContentLength", "x-amz-decoded-content-length is required")
            self.expected = int(h["x-amz-decoded-content-length"])
            signed = self.payload in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
            self.decoder = ChunkedDecoder(ctx.auth if signed else None,
                                          signed_trailer=self.payload == STREAMING_SIGNED_TRAILER)
        else:
            cl = h.get("content-length")
            if cl is None and h.get("transfer-encoding") is None:
                raise S3Error("MissingContentLength", "you must provide the Content-Length HTTP header")
            self.expected = int(cl) if cl is not None else None
        if self.expected is not None and self.expected > limit:
            raise S3Error("EntityTooLarge", "your proposed upload exceeds the maximum allowed object size")
        self.limit = limit
        self.size = 0
        self.md5 = hashlib.md5()
        self.sha = hashlib.sha256() if (self.payload not in (UNSIGNED, *STREAMING)) else None
        self.sums = checksums.Checksums(h)
        content_md5 = h.get("content-md5")
        self.content_md5 = None
        if content_md5 is not None:
            try:
                self.content_md5 = base64.b64decode(content_md5, validate=True)
            except (binascii.Error, ValueError):
                raise S3Error("InvalidDigest", "the Content-MD5 you specified was invalid") from None
            if len(self.content_md5) != 16:
                raise S3Error("InvalidDigest", "the Content-MD5 you specified was invalid")

    async def pieces(self):
        async for piece in self.ctx.req.body():
            if self.decoder is not None:
                piece = self.decoder.feed(piece)
            if not piece:
                continue
            self.size += len(piece)
            if self.size > self.limit or (self.expected is not None and self.size > self.expected):
                raise S3Error("EntityTooLarge" if self.size > self.limit else "IncompleteBody",
                              "the body is larger than declared or allowed")
            self.md5.update(piece)
            if self.sha is not None:
                self.sha.update(piece)
            self.sums.update(piece)
            yield piece

    def finish(self) -> None:
        trailer = self.decoder.finish() if self.decoder is not None else {}
        if self.expected is not None and self.size != self.expected:
            raise S3Error("IncompleteBody", "you did not provide the number of bytes specified by the "
                          "Content-Length HTTP header")
        if self.sha is not None and self.sha.hexdigest() != self.payload:
            raise S3Error("XAmzContentSHA256Mismatch", "the provided x-amz-content-sha256 header does not "
                          "match what was computed")
        if self.content_md5 is not None and self.content_md5 != self.md5.digest():
            raise S3Error("BadDigest", "the Content-MD5 you specified did not match what we received")
        self.sums.verify(trailer)


async def write_object(ctx, parent: Inode, name: bytes, policy: Policy, source, meta: dict[bytes, bytes],
                       finish=None, etag_for=None, notice=None) -> tuple[Inode, str]:
    """Create the object's file under a hidden name, fill it from `source` (async pieces),
    store and commit it, rename it over `name`, and make that durable. -> (row, etag).
    `notice`: the PUT's from `Namespace.store_coming`."""
    core, ns, who = ctx.core, ctx.ns, ctx.who
    tmp = ns.temp_name()
    try:
        # deferred: the store batch's commit, or the sync round's, commits it
        row = await core.create(parent.id, tmp, 0o644, who, policy=policy, defer=True)
    except S3fuseError as exc:
        raise key_error(exc) from None
    ino = row.id
    released = False

    def rename_into_place() -> tuple[str | None, int]:
        """Run by the store batch once the data is committed: -> (etag, durable ticket)."""
        nonlocal released
        core.release(ino, writer=True)
        released = True
        row = core.attr(ino)
        etag = etag_for(row) if etag_for is not None else None
        records = dict(meta)
        if etag is not None:
            ids = [b.object_id for b in core.meta.blocks_of(ino)]
            records[etags.XATTR] = etags.seal(ctx.api.access_keys.etag_key, ctx.api.store_id, ino, row.size,
                                              ids, etag)
        with core.meta.transaction(defer=True):  # committed by the sync round that makes it durable
            for xname, value in records.items():
                core.meta.set_xattr(ino, xname, value)
            core.rename(parent.id, tmp, parent.id, name, 0)
        return etag, ns.durable_ticket(changed=(parent.id, name))

    try:
        off = 0
        async for piece in source:
            await core.write(ino, off, piece)
            off += len(piece)
        if finish is not None:
            finish()
        etag, ticket = await ns.store(ino, then=rename_into_place, notice=notice)
    except BaseException:
        if not released:
            core.release(ino, writer=True)
        try:
            core.unlink(parent.id, tmp)
        except S3fuseError:
            pass
        raise
    await ns.make_durable(ticket)  # durable, and the kernel told, before the 200
    row = core.attr(ino)
    return row, etag if etag is not None else etag_of(ctx.api, row)


async def put(ctx, bucket: str, key: str) -> Response:
    b = ctx.ns.bucket(bucket, ctx.who)
    parts, marker = split_key(key)
    req_sse = ssemod.parse(ctx.headers, ctx.who.uid, ctx.secure)
    if req_sse.customer_key is not None:
        ctx.who = with_key(ctx.who, req_sse.customer_key)
    meta = user_metadata(ctx)
    reader = BodyReader(ctx)
    if marker:
        return await _put_marker(ctx, b, parts, reader)
    with ctx.ns.store_coming(reader.expected) as notice:
        return await _put_file(ctx, b, key, parts, req_sse, meta, reader, notice)


async def _put_file(ctx, b: Inode, key: str, parts: list[bytes], req_sse, meta: dict[bytes, bytes],
                    reader: BodyReader, notice) -> Response:
    parent = await ctx.ns.make_parents(b, parts, ctx.who)
    existing = ctx.ns.child(parent.id, parts[-1])
    if existing is not None and stat.S_ISDIR(existing.mode):
        raise S3Error("InvalidRequest", f"the key {key[:200]!r} is a directory (it has keys under it): "
                      "an object cannot have the same name")
    ctx.ns.check_may_replace(parent, ctx.who, existing)
    inm = ctx.headers.get("if-none-match")
    if inm is not None and inm.strip() == "*" and existing is not None:
        raise S3Error("PreconditionFailed", "at least one of the preconditions you specified did not hold",
                      condition="If-None-Match")
    im = ctx.headers.get("if-match")
    if im is not None:
        if existing is None:
            raise S3Error("NoSuchKey", "the specified key does not exist", key=key)
        if not etag_matches(im, etag_of(ctx.api, existing)):
            raise S3Error("PreconditionFailed", "at least one of the preconditions you specified did not hold",
                          condition="If-Match")
    policy = await target_policy(ctx, parent, req_sse)

    def etag_for(row):
        md5 = reader.md5.hexdigest()
        return md5 if policy.mode == pol.SSE_S3 else etags.opaque(ctx.api.access_keys.etag_key, md5)

    row, etag = await write_object(ctx, parent, parts[-1], policy, reader.pieces(), meta, reader.finish, etag_for,
                                   notice)
    headers = [("etag", f'"{etag}"')] + ssemod.response_headers(
        policy.mode, policy.key if policy.mode == pol.SSE_KMS else "", req_sse.customer_md5)
    headers += reader.sums.response_headers()
    return Response(200, headers)


async def _put_marker(ctx, b: Inode, parts: list[bytes], reader: BodyReader) -> Response:
    async for piece in reader.pieces():
        raise S3Error("InvalidRequest", "a key ending in '/' is a directory marker and cannot have data")
    reader.finish()
    parent = await ctx.ns.make_parents(b, parts, ctx.who)
    existing = ctx.ns.child(parent.id, parts[-1])
    if existing is None:
        ctx.ns.check_may_replace(parent, ctx.who, None)
        try:
            ctx.core.mkdir(parent.id, parts[-1], 0o755, ctx.who)
        except S3fuseError as exc:
            raise from_errno(exc.errno, str(exc)) from None
        await ctx.ns.changed_entry(parent.id, parts[-1])
    elif not stat.S_ISDIR(existing.mode):
        raise S3Error("InvalidRequest", "an object (a file) of that name exists: it cannot also be a directory")
    return Response(200, [("etag", '"d41d8cd98f00b204e9800998ecf8427e"')])


# ---------------------------------------------------------------- deleting

async def _delete_one(ctx, b: Inode, key: str) -> None:
    parts, marker = split_key(key)
    try:
        parent, row = ctx.ns.walk(b, parts, ctx.who)
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return
        raise
    if row is None:
        return
    if stat.S_ISDIR(row.mode):
        if not marker or ctx.core.meta.has_entries(row.id):
            return  # a prefix with keys under it is not an object
    elif marker:
        return
    await ctx.ns.remove(parent, parts[-1], row, ctx.who)
    await ctx.ns.prune_empty(b, parts, ctx.who)


async def delete(ctx, bucket: str, key: str) -> Response:
    b = ctx.ns.bucket(bucket, ctx.who)
    await _delete_one(ctx, b, key)
    return Response(204)


async def delete_many(ctx, bucket: str) -> Response:
    b = ctx.ns.bucket(bucket, ctx.who)
    reader = BodyReader(ctx, limit=2 << 20)
    body = bytearray()
    async for piece in reader.pieces():
        body += piece
    reader.finish()
    root = parse(bytes(body))
    objects = root.findall("Object")
    if root.tag != "Delete" or not objects or len(objects) > 1000:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed or did not validate")
    quiet = (root.findtext("Quiet") or "").strip().lower() == "true"
    out = []
    for obj in objects:
        key = obj.findtext("Key") or ""
        try:
            await _delete_one(ctx, b, key)
            if not quiet:
                out.append(el("Deleted", ("Key", key)))
        except (S3Error, S3fuseError) as exc:
            err = exc if isinstance(exc, S3Error) else from_errno(exc.errno, str(exc))
            out.append(el("Error", ("Key", key), ("Code", err.code), ("Message", err.message)))
    return Response(200, [("content-type", "application/xml")], document("DeleteResult", *out))

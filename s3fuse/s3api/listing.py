"""ListObjects (v1) and ListObjectsV2: a walk of the bucket's directory tree in S3's key order.

S3 lists keys in UTF-8 binary order of the whole key, whatever order directories are
read in. Sorting each directory's entries by name, with "/" appended to directory names,
and walking depth first gives exactly that order (every key under directory `d` starts
with `d/`). The walk starts at the deepest directory the prefix names, skips subtrees
wholly before the marker, and does not descend into a directory whose keys all roll up
into one common prefix. An empty directory is listed as its marker key `d/`.
"""

from __future__ import annotations

import base64
import binascii
import stat
from collections.abc import Iterator
from urllib.parse import quote

from ..meta import Inode
from .errors import S3Error
from .namespace import READ, SEARCH, TEMP_PREFIX, allowed
from .server import Response
from .xmlgen import document, el

MAX_KEYS = 1000
PAGE = 1024


def _entries(core, dir_ino: int) -> list[tuple[bytes, bytes, Inode]]:
    out = []
    cursor = 0
    while True:
        rows = core.readdir(dir_ino, cursor, PAGE)
        if not rows:
            break
        for cur, name, row in rows:
            cursor = cur
            if name.startswith(TEMP_PREFIX):
                continue
            if stat.S_ISDIR(row.mode):
                out.append((name + b"/", name, row))
            elif stat.S_ISREG(row.mode):
                out.append((name, name, row))
    out.sort(key=lambda t: t[0])
    return out


def walk(ctx, bucket: Inode, prefix: bytes, marker: bytes, delimiter: bytes) -> Iterator[tuple[bytes, Inode | None]]:
    """(key, file row) and (common prefix, None), in key order, keys > marker only."""
    core, who = ctx.core, ctx.who
    head, sep, _ = prefix.rpartition(b"/")
    cur = bucket
    if sep:
        for name in head.split(b"/"):
            if not name or not allowed(cur, who, SEARCH):
                return
            row = ctx.ns.child(cur.id, name)
            if row is None or not stat.S_ISDIR(row.mode):
                return
            cur = row
    base = head + b"/" if sep else b""
    if not allowed(cur, who, READ | SEARCH):
        raise S3Error("AccessDenied", f"no permission to list {ctx.ns.path(cur.id)}")
    stack = [(base, iter(_entries(core, cur.id)))]
    seen_cp = None
    while stack:
        dir_key, it = stack[-1]
        item = next(it, None)
        if item is None:
            stack.pop()
            continue
        sort_name, name, row = item
        full = dir_key + sort_name
        if not (full.startswith(prefix) or prefix.startswith(full)):
            continue
        if marker and full < marker and not marker.startswith(full):
            continue
        is_dir = stat.S_ISDIR(row.mode)
        if full.startswith(prefix) and delimiter:
            rest = full[len(prefix):]
            i = rest.find(delimiter)
            if i >= 0:  # this key, or every key under this directory, rolls up into one prefix
                cp = prefix + rest[: i + len(delimiter)]
                if cp != seen_cp and cp > marker:
                    seen_cp = cp
                    yield cp, None
                continue
        if is_dir:
            if not allowed(row, who, READ | SEARCH):
                continue
            entries = _entries(core, row.id)
            if not entries:
                if full.startswith(prefix) and full > marker:
                    yield full, row  # an empty directory: its marker object
                continue
            stack.append((full, iter(entries)))
        elif full > marker and full.startswith(prefix):
            yield full, row


def _int_param(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise S3Error("InvalidArgument", f"{name} must be an integer") from None
    if n < 0:
        raise S3Error("InvalidArgument", f"{name} must not be negative")
    return n


def _text(raw: bytes, url: bool) -> str:
    s = raw.decode("utf-8", "surrogateescape")
    return quote(s.encode("utf-8", "surrogateescape"), safe="/~") if url else s.encode(
        "utf-8", "replace").decode("utf-8")


def token_encode(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def token_decode(token: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(token.encode())
    except (binascii.Error, ValueError):
        raise S3Error("InvalidArgument", "the continuation token provided is incorrect") from None


async def list_objects(ctx, bucket_name: str) -> Response:
    from .buckets import iso8601, owner  # buckets imports this module
    from .objects import etag_of

    q = ctx.query
    v2 = q.get("list-type") == "2"
    bucket = ctx.ns.bucket(bucket_name, ctx.who)
    prefix = q.get("prefix", "").encode("utf-8", "surrogateescape")
    delimiter = q.get("delimiter", "").encode("utf-8", "surrogateescape")
    max_keys = min(_int_param(q.get("max-keys"), MAX_KEYS, "max-keys"), MAX_KEYS)
    url = q.get("encoding-type") == "url"
    if q.get("encoding-type") not in (None, "url"):
        raise S3Error("InvalidArgument", "invalid encoding method specified in the request")
    token = q.get("continuation-token") if v2 else None
    if v2:
        marker = token_decode(token) if token else q.get("start-after", "").encode("utf-8", "surrogateescape")
    else:
        marker = q.get("marker", "").encode("utf-8", "surrogateescape")
    items: list[tuple[bytes, Inode | None]] = []
    truncated = False
    if max_keys > 0:
        for key, row in walk(ctx, bucket, prefix, marker, delimiter):
            if len(items) == max_keys:
                truncated = True
                break
            items.append((key, row))
    contents, prefixes = [], []
    for key, row in items:
        if row is None:
            prefixes.append(el("CommonPrefixes", ("Prefix", _text(key, url))))
            continue
        is_dir = stat.S_ISDIR(row.mode)
        parts = [("Key", _text(key, url)), ("LastModified", iso8601(row.mtime_ns)),
                 ("ETag", f'"{"d41d8cd98f00b204e9800998ecf8427e" if is_dir else etag_of(ctx.api, row)}"'),
                 ("Size", 0 if is_dir else row.size), ("StorageClass", "STANDARD")]
        if not v2 or q.get("fetch-owner") == "true":
            parts.append(owner(row.uid))
        contents.append(el("Contents", *parts))
    head = [("Name", bucket_name), ("Prefix", _text(prefix, url))]
    if v2:
        if token:
            head.append(("ContinuationToken", token))
        if "start-after" in q:
            head.append(("StartAfter", _text(q["start-after"].encode("utf-8", "surrogateescape"), url)))
    else:
        head.append(("Marker", _text(marker, url)))
    if delimiter:
        head.append(("Delimiter", _text(delimiter, url)))
    head += [("MaxKeys", max_keys), ("IsTruncated", "true" if truncated else "false")]
    if v2:
        head.append(("KeyCount", len(items)))
        if truncated:
            head.append(("NextContinuationToken", token_encode(items[-1][0])))
    elif truncated and delimiter:
        head.append(("NextMarker", _text(items[-1][0], url)))
    if url:
        head.append(("EncodingType", "url"))
    body = document("ListBucketResult", *head, *contents, *prefixes)
    return Response(200, [("content-type", "application/xml")], body)

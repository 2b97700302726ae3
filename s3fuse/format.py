"""The s3fuse object format: pure encoding, parsing and AEAD, no I/O.

Every byte s3fuse writes to an object store comes from this module; the layout is
specified in docs/FORMAT.md, whose test vector tests/test_format.py checks.

An object holds one block of one file, or a patch of one (written byte ranges of a block,
applied over its object on read; see `encode_patch`)::

    magic "S3FO" | u8 version | u16be body_len | body (msgpack map) | mac (32)
    segment 0 | segment 1 | ... | segment n-1

    segment i = nonce (12) | AES-256-GCM ciphertext | tag (16)
    AAD(segment i) = "s3fuse/v1/seg" | object_id (16) | u32be i | u8 final

The header body binds the object id, store id, inode, block number, encryption
mode and key identity, segment size and plaintext length; its MAC is
HMAC-SHA256 under a key derived from the object's data key, so it authenticates
only once the data key has been unwrapped. The wrapped data key itself is not in
the object: it lives in the metadata database (see `wrap_data_key`), so that a
master-key rotation rewrites database rows and never an object.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from hashlib import sha256
from typing import Callable

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"S3FO"
FORMAT_VERSION = 1
SUITE = "AES-256-GCM"
NONCE_LEN = 12
TAG_LEN = 16
SEGMENT_OVERHEAD = NONCE_LEN + TAG_LEN
MAC_LEN = 32
PREFIX = struct.Struct(">4sBH")
OBJECT_ID_LEN = 16
DATA_KEY_LEN = 32
MAX_HEADER_BODY = 4096
# Patches of block b of a file are block-map rows (and objects) numbered PATCH_BASE + b *
# PATCH_SEQS + seq: above any data block, so each has a position of its own in MACs, key
# slots and KMS contexts, and the block's row stays where it was.
PATCH_BASE = 1 << 62
PATCH_SEQS = 1 << 16
_RUN = struct.Struct(">II")

RandomSource = Callable[[int], bytes]


class FormatError(Exception):
    """An object, header, segment or key slot failed to parse or authenticate."""


class UnsupportedFormat(FormatError):
    """The object was written by a newer format version or an unknown suite."""


@dataclass(frozen=True)
class ObjectHeader:
    object_id: bytes
    store_id: bytes
    inode: int
    block: int
    mode: str  # "AES256" | "aws:kms" | "SSE-C"
    key_ref: str  # key identity within the mode: "" / KMS key id / SSE-C fingerprint (hex)
    segment_size: int
    length: int  # plaintext bytes in this object
    base: bytes = b""  # a patch's: the object id of the block object it applies to

    @property
    def segment_count(self) -> int:
        return segment_count(self.length, self.segment_size)


@dataclass(frozen=True)
class ObjectKeys:
    """Per-object subkeys derived from the data key (cheap to keep in a cache)."""

    segment: AESGCM
    header_mac_key: bytes


def segment_count(length: int, segment_size: int) -> int:
    return max(1, -(-length // segment_size))


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def derive_object_keys(data_key: bytes, object_id: bytes) -> ObjectKeys:
    if len(data_key) != DATA_KEY_LEN:
        raise FormatError("data key must be 32 bytes")
    return ObjectKeys(
        segment=AESGCM(_hkdf(data_key, b"s3fuse/v1/segment" + object_id)),
        header_mac_key=_hkdf(data_key, b"s3fuse/v1/header" + object_id),
    )


def encode_header(header: ObjectHeader, keys: ObjectKeys) -> bytes:
    body = msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "suite": SUITE,
            "oid": header.object_id,
            "sid": header.store_id,
            "ino": header.inode,
            "blk": header.block,
            "mode": header.mode,
            "kref": header.key_ref,
            "seg": header.segment_size,
            "len": header.length,
            **({"base": header.base} if header.base else {}),
        }
    )
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, len(body))
    mac = hmac.new(keys.header_mac_key, prefix + body, sha256).digest()
    return prefix + body + mac


def header_length(buf: bytes) -> int:
    """Total header length (prefix, body and MAC) from the first 7 bytes."""
    if len(buf) < PREFIX.size:
        raise FormatError("object shorter than its header prefix")
    magic, version, body_len = PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError("bad magic")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"object format version {version} is not supported")
    if body_len > MAX_HEADER_BODY:
        raise FormatError("header body too long")
    return PREFIX.size + body_len + MAC_LEN


def parse_header(buf: bytes, keys: ObjectKeys) -> ObjectHeader:
    """Authenticate and decode a header; `buf` starts at the object's first byte."""
    total = header_length(buf)
    if len(buf) < total:
        raise FormatError("object truncated inside its header")
    signed, mac = buf[: total - MAC_LEN], buf[total - MAC_LEN : total]
    expected = hmac.new(keys.header_mac_key, signed, sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise FormatError("header authentication failed")
    try:
        body = msgpack.unpackb(signed[PREFIX.size :], raw=False)
        if body["v"] != FORMAT_VERSION or body["suite"] != SUITE:
            raise UnsupportedFormat("unsupported header version or suite")
        return ObjectHeader(
            object_id=body["oid"],
            store_id=body["sid"],
            inode=body["ino"],
            block=body["blk"],
            mode=body["mode"],
            key_ref=body["kref"],
            segment_size=body["seg"],
            length=body["len"],
            base=body.get("base", b""),
        )
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise FormatError(f"malformed header body: {exc}") from None


def patch_number(block: int, seq: int) -> int:
    """The block number of patch `seq` of block `block`."""
    return PATCH_BASE + block * PATCH_SEQS + seq


def is_patch(number: int) -> bool:
    return number >= PATCH_BASE


def patched_block(number: int) -> int:
    """The data block a patch number belongs to."""
    return (number - PATCH_BASE) // PATCH_SEQS


def encode_patch(runs: list[tuple[int, bytes | bytearray | memoryview]]) -> bytes:
    """A patch's plaintext: u32 count | count x (u32 offset | u32 length) | the runs' bytes.
    `runs`: disjoint (offset within the block, bytes), in ascending offset order."""
    parts = [struct.pack(">I", len(runs))]
    parts.extend(_RUN.pack(off, len(data)) for off, data in runs)
    parts.extend(data for _, data in runs)
    return b"".join(parts)


def decode_patch(plain: bytes | memoryview, block_size: int) -> list[tuple[int, memoryview]]:
    """The runs of a patch's (authenticated) plaintext; FormatError if it is malformed."""
    view = memoryview(plain)
    if len(view) < 4:
        raise FormatError("patch too short")
    (count,) = struct.unpack_from(">I", view)
    pos = 4 + count * _RUN.size
    if pos > len(view):
        raise FormatError("patch run table truncated")
    runs, last_end = [], 0
    for i in range(count):
        off, n = _RUN.unpack_from(view, 4 + i * _RUN.size)
        if off < last_end or n == 0 or off + n > block_size or pos + n > len(view):
            raise FormatError("patch runs overlap, are out of order or out of range")
        runs.append((off, view[pos : pos + n]))
        pos, last_end = pos + n, off + n
    if pos != len(view):
        raise FormatError("patch has bytes past its runs")
    return runs


def _segment_aad(object_id: bytes, index: int, final: bool) -> bytes:
    return b"s3fuse/v1/seg" + object_id + struct.pack(">IB", index, int(final))


def encrypt_object(
    header: ObjectHeader,
    data_key: bytes,
    plaintext: bytes | bytearray | memoryview,
    random: RandomSource = os.urandom,
) -> bytes:
    """Encode a whole object. `len(plaintext)` must equal `header.length`."""
    return bytes(encrypt_object_buffer(header, data_key, plaintext, random)[0])


def encrypt_object_buffer(
    header: ObjectHeader,
    data_key: bytes,
    plaintext: bytes | bytearray | memoryview,
    random: RandomSource = os.urandom,
    alloc: Callable[[int], bytearray | memoryview] = bytearray,
) -> tuple[bytearray | memoryview, int]:
    """The object in one buffer, each segment encrypted straight into its place, and the
    header's length. The same bytes as `encrypt_object`, without a buffer per segment or the
    join: for a 4 MiB block that is 64 allocations and a 4 MiB copy fewer, and a bytearray
    is what the S3 client sends with one `sendall` (bytes it would wrap in a file object
    and send in 16 KiB reads). `alloc` makes the buffer (a backend's `buffer`)."""
    if len(plaintext) != header.length:
        raise ValueError("plaintext length does not match the header")
    keys = derive_object_keys(data_key, header.object_id)
    head = encode_header(header, keys)
    size = header.segment_size
    count = header.segment_count
    out = alloc(object_size(len(head), size, header.length))
    out[: len(head)] = head
    src, dst = memoryview(plaintext), memoryview(out)
    pos = len(head)
    for i in range(count):
        nonce = random(NONCE_LEN)
        chunk = src[i * size : (i + 1) * size]
        dst[pos : pos + NONCE_LEN] = nonce
        pos += NONCE_LEN
        end = pos + len(chunk) + TAG_LEN
        keys.segment.encrypt_into(nonce, chunk, _segment_aad(header.object_id, i, i == count - 1), dst[pos:end])
        pos = end
    return out, len(head)


def segment_range(header_len: int, segment_size: int, length: int, first: int, last: int) -> tuple[int, int]:
    """Byte offset and length, within the object, of segments first..last inclusive."""
    count = segment_count(length, segment_size)
    if not 0 <= first <= last < count:
        raise ValueError("segment index out of range")
    stride = segment_size + SEGMENT_OVERHEAD
    start = header_len + first * stride
    if last == count - 1:
        last_len = length - last * segment_size + SEGMENT_OVERHEAD
        end = header_len + last * stride + last_len
    else:
        end = header_len + (last + 1) * stride
    return start, end - start


def object_size(header_len: int, segment_size: int, length: int) -> int:
    start, span = segment_range(header_len, segment_size, length, 0, segment_count(length, segment_size) - 1)
    return start + span


def decrypt_segments(
    keys: ObjectKeys, header: ObjectHeader, first: int, data: bytes | memoryview,
    expected: int | None = None,
) -> list[bytes]:
    """Authenticate and decrypt consecutive segments starting at index `first`.

    `data` must be exactly the bytes `segment_range` names (that many segments, when
    given as `expected`: fewer means the object was truncated); every segment is authenticated
    before any plaintext is returned.
    """
    size = header.segment_size
    count = header.segment_count
    view = memoryview(data)
    out = []
    pos = 0
    i = first
    while pos < len(view):
        if i >= count:
            raise FormatError("data extends past the final segment")
        final = i == count - 1
        plain_len = header.length - i * size if final else size
        seg_len = plain_len + SEGMENT_OVERHEAD
        seg = view[pos : pos + seg_len]
        if len(seg) != seg_len:
            raise FormatError(f"segment {i} truncated")
        try:
            out.append(
                keys.segment.decrypt(seg[:NONCE_LEN], seg[NONCE_LEN:], _segment_aad(header.object_id, i, final))
            )
        except InvalidTag:
            raise FormatError(f"segment {i} failed authentication") from None
        pos += seg_len
        i += 1
    if expected is not None and len(out) != expected:
        raise FormatError(f"object truncated: segment {first + len(out)} is missing")
    return out


# Key slots: a data key wrapped under a key-encryption key, stored in the metadata DB.

def wrap_data_key(kek: bytes, data_key: bytes, aad: bytes, random: RandomSource = os.urandom) -> bytes:
    nonce = random(NONCE_LEN)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, aad)


def unwrap_data_key(kek: bytes, slot: bytes, aad: bytes) -> bytes:
    if len(slot) != NONCE_LEN + DATA_KEY_LEN + TAG_LEN:
        raise FormatError("key slot has the wrong length")
    try:
        return AESGCM(kek).decrypt(slot[:NONCE_LEN], slot[NONCE_LEN:], aad)
    except InvalidTag:
        raise FormatError("key slot failed authentication") from None


def key_slot_aad(store_id: bytes, object_id: bytes, inode: int, block: int, mode: str, key_ref: str) -> bytes:
    """Binds a wrapped key to one object of one block of one file in one store."""
    return b"s3fuse/v1/keyslot" + msgpack.packb([store_id, object_id, inode, block, mode, key_ref])

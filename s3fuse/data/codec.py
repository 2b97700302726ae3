"""Sealing and opening objects: a fresh object's id, data key and header; the sealed bytes;
and, for a stored object, its data key unwrapped, its header authenticated and checked
against the block-map row that points at it. The data path and fsck both open objects
through `open_header`, so that they agree on what "this object belongs to this row" means.

The object format itself (bytes, nonces, AAD) is `format.py`'s; key wrapping is crypto.py's.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .. import format as fmt
from ..crypto import Caller, KeyManager, WrappedKey, WriteGrant
from ..errors import KeyUnavailable
from ..meta import BlockRef
from ..policy import SSE_KMS, SSE_S3, Policy
from ..workers import WorkerPool

# Crypto on buffers above this size goes to a worker thread; below it the hand-off
# costs more than the work (AES-GCM is fast).
THREAD_THRESHOLD = 256 * 1024
GRANT_WAIT = 10.0  # s: a store waits this long for block 0's key still being made after the open
OPEN_OBJECTS = 4096  # authenticated headers and their keys kept, least recently opened dropped


@dataclass(frozen=True)
class OpenObject:
    keys: fmt.ObjectKeys
    header: fmt.ObjectHeader


def header_matches(header: fmt.ObjectHeader, ref: BlockRef, store_id: bytes, segment_size: int) -> bool:
    """Does an authenticated header describe exactly this block-map row's object? (A patch's
    also names the block object it applies to, which the reader checks against the block's row.)"""
    return (bool(header.base) == fmt.is_patch(ref.blockno)) and ((header.object_id, header.store_id, header.inode, header.block, header.mode, header.key_ref,
             header.segment_size, header.length)
            == (ref.object_id, store_id, ref.inode, ref.blockno, ref.mode, ref.key_ref,
                segment_size, ref.obj_length))


def open_header(header_bytes: bytes, data_key: bytes, ref: BlockRef, store_id: bytes,
                segment_size: int) -> OpenObject:
    """Authenticate an object's header under its data key and check it against its row.
    Raises fmt.FormatError saying why not."""
    keys = fmt.derive_object_keys(data_key, ref.object_id)
    header = fmt.parse_header(header_bytes, keys)
    if not header_matches(header, ref, store_id, segment_size):
        raise fmt.FormatError("header does not match the block map")
    return OpenObject(keys, header)


def verify_object(buf: bytes, data_key: bytes, ref: BlockRef, store_id: bytes, segment_size: int,
                  whole: bool, base: bytes | None = None, block_size: int = 0) -> str | None:
    """fsck's check of a fetched object (`buf`: the whole object, or at least its header):
    -> why it fails, or None. A patch's must name its block's object (`base`; None: the
    block has no row, which fsck reports apart), and, checked whole, hold well-formed runs."""
    try:
        opened = open_header(buf, data_key, ref, store_id, segment_size)
    except fmt.FormatError as exc:
        return str(exc)
    if fmt.header_length(buf) != ref.hdr_len:
        return "header length does not match the block map"
    if fmt.is_patch(ref.blockno) and base is not None and opened.header.base != base:
        return "patch does not apply to its block's object"
    if whole:
        try:
            segs = fmt.decrypt_segments(opened.keys, opened.header, 0, memoryview(buf)[ref.hdr_len:],
                                        opened.header.segment_count)
            if fmt.is_patch(ref.blockno):
                fmt.decode_patch(b"".join(segs), block_size)
        except fmt.FormatError as exc:
            return str(exc)
    return None


def block_ref(header: fmt.ObjectHeader, wrapped: WrappedKey, header_len: int) -> BlockRef:
    """The block-map row of a sealed object."""
    return BlockRef(header.inode, header.block, header.object_id, header.length, header.length,
                    header_len, wrapped.mode, wrapped.key_ref, wrapped.key_version, wrapped.key_slot)


def prepared(grant: WriteGrant | None, policy: Policy, blockno: int):
    """The data key a file's open made for this block, if any (used for one object only:
    a second object under it would repeat its nonces)."""
    if grant is None or grant.policy != policy:
        return None
    return grant.take(blockno)


class ObjectCodec:
    """Seals new objects and opens stored ones for the data path, keeping the opened headers
    and keys of recently read objects (memory only)."""

    def __init__(self, keys: KeyManager, store_id: bytes, segment_size: int, crypto: WorkerPool,
                 path_of: Callable[[int], str], key_now: Callable[[bytes], tuple[int, bytes] | None],
                 alloc: Callable[[int], bytearray | memoryview] = bytearray) -> None:
        self.keys = keys
        self.alloc = alloc  # memory for a large object's bytes (Backend.buffer)
        self.store_id = store_id
        self.segment_size = segment_size
        self.crypto = crypto
        self._path_of = path_of  # for audit records of KMS calls
        self._key_now = key_now  # the key version and slot a row has now (metadata)
        self._objects: OrderedDict[bytes, OpenObject] = OrderedDict()

    # ------------------------------------------------------------------ sealing
    def remote_key(self, policy: Policy) -> bool:
        """Whether new objects under `policy` need a network KMS call (then: a task each)."""
        return policy.mode == SSE_KMS and self.keys.kms_blocks(key=policy.key)

    async def new_object(self, ino: int, blockno: int, length: int, policy: Policy, who: Caller,
                         grant: WriteGrant | None = None,
                         base: bytes = b"") -> tuple[fmt.ObjectHeader, bytes, WrappedKey]:
        """A fresh object id, data key and header: the key its file's open made for it, if
        any, else a new one (a network KMS's call in a worker thread)."""
        remote = self.remote_key(policy)
        if remote and grant is not None and blockno == 0:
            await grant.wait_ready(GRANT_WAIT)
        made = prepared(grant, policy, blockno)
        if made is not None:
            object_id, data_key, wrapped = made
        else:
            object_id = os.urandom(fmt.OBJECT_ID_LEN)
            path = self._path_of(ino) if policy.mode == SSE_KMS else None  # for the audit record
            data_key, wrapped = await self.keys.new_data_key(policy, object_id, ino, blockno, who, path, grant)
        return self._header(object_id, ino, blockno, length, wrapped, base), data_key, wrapped

    def _header(self, object_id: bytes, ino: int, blockno: int, length: int,
                wrapped: WrappedKey, base: bytes = b"") -> fmt.ObjectHeader:
        return fmt.ObjectHeader(object_id, self.store_id, ino, blockno, wrapped.mode,
                                wrapped.key_ref, self.segment_size, length, base)

    async def seal(self, ino: int, blockno: int, data: bytes, policy: Policy, who: Caller,
                   grant: WriteGrant | None = None, base: bytes = b"") -> tuple[bytearray | memoryview, BlockRef]:
        """An object for one block (or, with `base`, a patch numbered `blockno` of that block
        object): -> its bytes and its block-map row. Encryption runs in a worker thread when
        the block is large."""
        header, data_key, wrapped = await self.new_object(ino, blockno, len(data), policy, who, grant, base)
        if len(data) > THREAD_THRESHOLD:
            blob, header_len = await self.crypto.run(fmt.encrypt_object_buffer, header, data_key, data,
                                                     os.urandom, self.alloc)
        else:
            blob, header_len = fmt.encrypt_object_buffer(header, data_key, data)
        return blob, block_ref(header, wrapped, header_len)

    async def seal_here(self, ino: int, blockno: int, data: bytes, policy: Policy, who: Caller,
                        grant: WriteGrant | None = None) -> tuple[bytearray, BlockRef]:
        """`seal` on the loop, for a small block (cheaper than a thread hop) under a key that
        needs no network call."""
        header, data_key, wrapped = await self.new_object(ino, blockno, len(data), policy, who, grant)
        blob, header_len = fmt.encrypt_object_buffer(header, data_key, data)
        return blob, block_ref(header, wrapped, header_len)

    # ------------------------------------------------------------------ opening
    def opened(self, ref: BlockRef) -> OpenObject | None:
        """The object's header and keys, if it was opened for this very row."""
        opened = self._objects.get(ref.object_id)
        if opened is not None and not header_matches(opened.header, ref, self.store_id, self.segment_size):
            return None  # opened for another row: this row must unwrap and authenticate for itself
        return opened

    async def open(self, ref: BlockRef, header_bytes: bytes, who: Caller,
                   grant: WriteGrant | None = None) -> OpenObject:
        """Unwrap the data key, authenticate the header and check it against the block map.
        Raises IntegrityError (from the key slot) or fmt.FormatError."""
        wrapped = WrappedKey(ref.mode, ref.key_ref, ref.key_version, ref.key_slot)
        try:
            data_key = await self.keys.open_data_key(ref.object_id, ref.inode, ref.blockno,
                                                           wrapped, who, grant=grant)
        except KeyUnavailable:
            # `ref` was read before an await: the re-wrap sweep may have moved the row to a
            # newer master key since, and the old version been retired. The row as it is now:
            now = self._key_now(ref.object_id)
            if ref.mode != SSE_S3 or now is None or now[0] == ref.key_version:
                raise
            wrapped = WrappedKey(ref.mode, ref.key_ref, now[0], now[1])
            data_key = await self.keys.open_data_key(ref.object_id, ref.inode, ref.blockno,
                                                           wrapped, who)
        opened = open_header(header_bytes, data_key, ref, self.store_id, self.segment_size)
        self._objects[ref.object_id] = opened
        if len(self._objects) > OPEN_OBJECTS:
            self._objects.popitem(last=False)
        return opened

    def forget(self, object_ids: list[bytes]) -> None:
        for oid in object_ids:
            self._objects.pop(oid, None)

    def forget_all(self) -> None:
        self._objects.clear()

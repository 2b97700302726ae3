"""Encrypted, authenticated snapshots of a store's local state (docs/FORMAT.md, "Metadata snapshot").

A snapshot bundles files (meta.db, the sealed keyring, the sealed KMS keystore, the
audit trail) into one plaintext container, then encrypts it as a stream of chunks
with AES-256-GCM under a key derived from the root key. Everything is streamed
through temporary files: memory does not grow with the size of the metadata.

    header  = "S3FSNAP1" | store_id (16) | seq (u64 BE) | nonce prefix (8) | chunk size (u32 BE)
    chunk i = AES-256-GCM(key, nonce = prefix | u32 BE i,
                          aad = header | u32 BE i | u8 final) of chunk-size bytes of the
              container, except the last chunk (final = 1), which is shorter (maybe empty)

The header is authenticated with every chunk, so the store id and the sequence
number cannot be changed; the final flag catches a truncated snapshot; a fresh
random nonce prefix per snapshot keeps nonces unique under the one key.

    container = u32 BE count | count × (u16 BE name length | name | u64 BE size) | the files' bytes
"""

from __future__ import annotations

import os
import re
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError

MAGIC = b"S3FSNAP1"
HEADER = struct.Struct(">8s16sQ8sI")
CHUNK_SIZE = 1 << 20
TAG = 16
_COPY = 1 << 20


def snapshot_key(root_key: bytes, store_id: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=store_id,
                info=b"s3fuse metadata snapshot v1").derive(root_key)


def pack(files: list[tuple[str, str]], out_path: str) -> None:
    """Write the container of `files` [(name, path)] to out_path."""
    sizes = [(name, os.path.getsize(path), path) for name, path in files]
    with open(out_path, "wb") as out:
        out.write(struct.pack(">I", len(sizes)))
        for name, size, _ in sizes:
            raw = name.encode()
            out.write(struct.pack(">H", len(raw)) + raw + struct.pack(">Q", size))
        for _, size, path in sizes:
            with open(path, "rb") as f:
                left = size
                while left:
                    buf = f.read(min(_COPY, left))
                    if not buf:
                        raise IntegrityError(f"{path} shrank while being packed")
                    out.write(buf)
                    left -= len(buf)


def unpack(container_path: str, dest_dir: str, allowed) -> list[str]:
    """Write the container's files into dest_dir (temp name + rename); returns their names."""
    with open(container_path, "rb") as f:
        (count,) = struct.unpack(">I", f.read(4))
        entries = []
        for _ in range(count):
            (n,) = struct.unpack(">H", f.read(2))
            name = f.read(n).decode()
            (size,) = struct.unpack(">Q", f.read(8))
            ok = allowed.fullmatch(name) if isinstance(allowed, re.Pattern) else name in allowed
            if not ok or "/" in name:
                raise IntegrityError(f"snapshot holds an unexpected file {name!r}")
            entries.append((name, size))
        for name, size in entries:
            tmp = os.path.join(dest_dir, f".{name}.restore")
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                left = size
                while left:
                    buf = f.read(min(_COPY, left))
                    if not buf:
                        raise IntegrityError("snapshot container is truncated")
                    out.write(buf)
                    left -= len(buf)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, os.path.join(dest_dir, name))
    return [name for name, _ in entries]


def encrypt(plain_path: str, out_path: str, key: bytes, store_id: bytes, seq: int,
            chunk_size: int = CHUNK_SIZE) -> None:
    prefix = os.urandom(8)
    header = HEADER.pack(MAGIC, store_id, seq, prefix, chunk_size)
    aead = AESGCM(key)
    with open(plain_path, "rb") as src, open(out_path, "wb") as out:
        out.write(header)
        i = 0
        while True:
            buf = src.read(chunk_size)
            final = len(buf) < chunk_size
            aad = header + struct.pack(">IB", i, final)
            out.write(aead.encrypt(prefix + struct.pack(">I", i), buf, aad))
            if final:
                return
            i += 1


def read_header(blob: bytes) -> tuple[bytes, int]:
    """(store id, sequence number) from a snapshot's first bytes (not yet authenticated)."""
    if len(blob) < HEADER.size:
        raise IntegrityError("snapshot is too short")
    magic, store_id, seq, _, _ = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError("not an s3fuse metadata snapshot")
    return store_id, seq


def decrypt(in_path: str, plain_path: str, key: bytes, store_id: bytes, seq: int) -> None:
    """Authenticate and decrypt; the header must name this store and sequence number."""
    aead = AESGCM(key)
    with open(in_path, "rb") as src, open(os.open(plain_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                          "wb") as out:
        header = src.read(HEADER.size)
        got_store, got_seq = read_header(header)
        _, _, _, prefix, chunk_size = HEADER.unpack(header)
        if got_store != store_id or got_seq != seq:
            raise IntegrityError(f"snapshot header names store {got_store.hex()} sequence {got_seq}, "
                                 f"expected {store_id.hex()} sequence {seq}")
        if not 4096 <= chunk_size <= 64 << 20:
            raise IntegrityError("snapshot chunk size is out of range")
        i = 0
        while True:
            buf = src.read(chunk_size + TAG)
            final = len(buf) < chunk_size + TAG
            aad = header + struct.pack(">IB", i, final)
            try:
                plain = aead.decrypt(prefix + struct.pack(">I", i), buf, aad)
            except InvalidTag:
                raise IntegrityError(f"snapshot {seq} failed authentication (chunk {i}): "
                                     "wrong root key, or the snapshot was altered or truncated") from None
            out.write(plain)
            if final:
                if src.read(1):
                    raise IntegrityError(f"snapshot {seq} has bytes after its final chunk")
                return
            i += 1

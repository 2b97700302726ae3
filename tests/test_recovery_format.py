"""The recovery record's bytes, as docs/FORMAT.md ("Recovery records") specifies them: checked
with AES-GCM and msgpack directly, not through the module that writes them."""

from __future__ import annotations

import os

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from s3fuse import recovery
from s3fuse.crypto import WrappedKey


def test_record_layout_matches_the_spec():
    data_key = bytes(range(32))
    wrapped = WrappedKey("AES256", "", 3, b"\x01" * 60)
    body = {"size": 5, "mtime_ns": 1, "ctime_ns": 2, "db_size": 0, "db_ctime_ns": 3, "blocks": [[0, b"hello"]]}
    blob = recovery.seal(b"\xaa" * 16, 7, data_key, wrapped, {"path": "/f", "reason": "why", "bytes": 5,
                                                                     "uid": 0, "gid": 0}, body)
    assert blob[:8] == b"S3FREC1\n"
    n = int.from_bytes(blob[8:12], "big")
    header = msgpack.unpackb(blob[12:12 + n])
    assert header == {"v": 1, "id": b"\xaa" * 16, "inode": 7, "mode": "AES256", "key_ref": "", "key_version": 3,
                      "key_slot": b"\x01" * 60, "path": "/f", "reason": "why", "bytes": 5, "uid": 0, "gid": 0}
    nonce = blob[12 + n:24 + n]
    plain = AESGCM(data_key).decrypt(nonce, blob[24 + n:], blob[:12 + n])
    assert msgpack.unpackb(plain, strict_map_key=False) == body
    assert b"hello" not in blob
    # the clear header is authenticated: an edited reason does not open
    edited = blob.replace(b"why", b"who")
    h, end = recovery.parse_header(edited)
    with pytest.raises(Exception):
        recovery.open_body(data_key, edited, end)
    assert recovery.open_body(data_key, blob, recovery.parse_header(blob)[1]) == body


def test_truncated_or_foreign_files_are_not_records():
    for bad in (b"", b"S3FREC1\n", b"S3FREC1\n\x00\x00\xff\xff" + os.urandom(20), os.urandom(64)):
        with pytest.raises(ValueError):
            recovery.parse_header(bad)

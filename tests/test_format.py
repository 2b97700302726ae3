"""The object format as pure functions: the documented test vector and every tampering."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3fuse import format as fmt

from . import vectors

FORMAT_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")


def _documented_hex(label: str) -> bytes:
    text = open(FORMAT_MD).read()
    section = text.split(label, 1)[1]
    block = re.search(r"```\n([0-9a-f\n]+)```", section).group(1)
    return bytes.fromhex(block.replace("\n", ""))


def test_object_matches_documented_vector():
    assert vectors.object_bytes() == _documented_hex("Object (`tests/vectors.py`")


def test_patch_matches_documented_vector():
    blob = vectors.patch_bytes()
    assert blob == _documented_hex("Patch (`tests/vectors.py`")
    assert _decrypt_all(blob, vectors.PATCH_HEADER) == vectors.PATCH_PLAINTEXT
    keys = fmt.derive_object_keys(vectors.DATA_KEY, vectors.PATCH_OBJECT_ID)
    assert fmt.parse_header(blob, keys).base == vectors.OBJECT_ID
    runs = fmt.decode_patch(vectors.PATCH_PLAINTEXT, 4 * 1024 * 1024)
    assert [(off, bytes(d)) for off, d in runs] == [(3, b"abc"), (20, b"patch")]


def test_key_slot_matches_documented_vector():
    assert vectors.key_slot_bytes() == _documented_hex("Key slot of that data key")


def _keys():
    return fmt.derive_object_keys(vectors.DATA_KEY, vectors.OBJECT_ID)


def _decrypt_all(blob: bytes, header=vectors.HEADER) -> bytes:
    keys = fmt.derive_object_keys(vectors.DATA_KEY, header.object_id)
    parsed = fmt.parse_header(blob, keys)
    hlen = fmt.header_length(blob)
    start, length = fmt.segment_range(hlen, parsed.segment_size, parsed.length, 0, parsed.segment_count - 1)
    data = blob[start:]
    if len(data) != length:
        raise fmt.FormatError("object length does not match its header")
    return b"".join(fmt.decrypt_segments(keys, parsed, 0, data))


def test_vector_round_trip():
    blob = vectors.object_bytes()
    assert _decrypt_all(blob) == vectors.PLAINTEXT
    assert fmt.parse_header(blob, _keys()) == vectors.HEADER


def test_every_single_bit_flip_is_detected():
    blob = vectors.object_bytes()
    for pos in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(fmt.FormatError):
                _decrypt_all(bytes(bad))


def _segments(blob: bytes) -> tuple[bytes, list[bytes]]:
    hlen = fmt.header_length(blob)
    stride = 16 + fmt.SEGMENT_OVERHEAD
    body = blob[hlen:]
    return blob[:hlen], [body[i : i + stride] for i in range(0, len(body), stride)]


def test_reordered_segments_are_detected():
    head, segs = _segments(vectors.object_bytes())
    with pytest.raises(fmt.FormatError):
        _decrypt_all(head + segs[1] + segs[0] + segs[2])


def test_truncation_and_extension_are_detected():
    blob = vectors.object_bytes()
    head, segs = _segments(blob)
    for bad in (head + segs[0] + segs[1], blob[:-1], blob + segs[1], head + segs[0] + segs[2]):
        with pytest.raises(fmt.FormatError):
            _decrypt_all(bad)


def test_segment_from_another_object_is_detected():
    other = fmt.ObjectHeader(b"\x01" * 16, vectors.STORE_ID, 2, 0, "AES256", "", 16, len(vectors.PLAINTEXT))
    other_blob = fmt.encrypt_object(other, vectors.DATA_KEY, vectors.PLAINTEXT)
    head, segs = _segments(vectors.object_bytes())
    _, other_segs = _segments(other_blob)
    with pytest.raises(fmt.FormatError):
        _decrypt_all(head + other_segs[0] + segs[1] + segs[2])


def test_key_slot_is_bound_to_its_object_and_block():
    slot = vectors.key_slot_bytes()
    good = fmt.key_slot_aad(vectors.STORE_ID, vectors.OBJECT_ID, 2, 0, "AES256", "")
    assert fmt.unwrap_data_key(vectors.KEK, slot, good) == vectors.DATA_KEY
    for aad in (
        fmt.key_slot_aad(vectors.STORE_ID, b"\x01" * 16, 2, 0, "AES256", ""),
        fmt.key_slot_aad(vectors.STORE_ID, vectors.OBJECT_ID, 3, 0, "AES256", ""),
        fmt.key_slot_aad(vectors.STORE_ID, vectors.OBJECT_ID, 2, 1, "AES256", ""),
        fmt.key_slot_aad(b"\xa1" * 16, vectors.OBJECT_ID, 2, 0, "AES256", ""),
        fmt.key_slot_aad(vectors.STORE_ID, vectors.OBJECT_ID, 2, 0, "SSE-C", ""),
    ):
        with pytest.raises(fmt.FormatError):
            fmt.unwrap_data_key(vectors.KEK, slot, aad)
    with pytest.raises(fmt.FormatError):
        fmt.unwrap_data_key(bytes(32), slot, good)


def test_newer_version_is_refused_without_fallback():
    bad = bytearray(vectors.object_bytes())
    bad[4] = 2
    with pytest.raises(fmt.UnsupportedFormat):
        fmt.header_length(bytes(bad))


def test_nonces_never_repeat_across_objects():
    seen = set()
    for _ in range(50):
        head = fmt.ObjectHeader(os.urandom(16), vectors.STORE_ID, 2, 0, "AES256", "", 16, 64)
        _, segs = _segments(fmt.encrypt_object(head, os.urandom(32), os.urandom(64)))
        for s in segs:
            assert s[:12] not in seen
            seen.add(s[:12])


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), seg=st.sampled_from([16, 64, 1000, 4096]),
       first=st.integers(0, 10), span=st.integers(0, 10))
def test_ranged_decrypt_matches_plaintext(data, seg, first, span):
    header = fmt.ObjectHeader(os.urandom(16), vectors.STORE_ID, 5, 1, "AES256", "", seg, len(data))
    dk = os.urandom(32)
    blob = fmt.encrypt_object(header, dk, data)
    keys = fmt.derive_object_keys(dk, header.object_id)
    count = header.segment_count
    first = min(first, count - 1)
    last = min(count - 1, first + span)
    start, length = fmt.segment_range(fmt.header_length(blob), seg, len(data), first, last)
    assert start + length <= len(blob)
    plain = b"".join(fmt.decrypt_segments(keys, header, first, blob[start : start + length]))
    assert plain == data[first * seg : (last + 1) * seg]
    assert fmt.object_size(fmt.header_length(blob), seg, len(data)) == len(blob)


def test_truncation_at_a_segment_boundary_inside_a_range_is_detected():
    blob = vectors.object_bytes()
    keys = _keys()
    hlen = fmt.header_length(blob)
    start, length = fmt.segment_range(hlen, 16, len(vectors.PLAINTEXT), 0, 2)
    two_segments = blob[start : start + 2 * (16 + fmt.SEGMENT_OVERHEAD)]
    assert len(fmt.decrypt_segments(keys, vectors.HEADER, 0, blob[start : start + length], 3)) == 3
    with pytest.raises(fmt.FormatError):
        fmt.decrypt_segments(keys, vectors.HEADER, 0, two_segments, 3)

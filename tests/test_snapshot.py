"""The metadata snapshot format and the retry policy, directly (pure code, no server)."""

from __future__ import annotations

import os

import pytest

from s3fuse import snapshot
from s3fuse.backends.s3 import RetryPolicy
from s3fuse.errors import IntegrityError

SID = bytes(range(16))


def _seal(tmp_path, payload: bytes, seq: int = 7, chunk: int = 4096):
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    plain.write_bytes(payload)
    key = snapshot.snapshot_key(b"r" * 32, SID)
    snapshot.encrypt(str(plain), str(sealed), key, SID, seq, chunk_size=chunk)
    return key, sealed


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 50_000])
def test_round_trip(tmp_path, size):
    payload = os.urandom(size)
    key, sealed = _seal(tmp_path, payload)
    out = tmp_path / "out"
    snapshot.decrypt(str(sealed), str(out), key, SID, 7)
    assert out.read_bytes() == payload
    if size >= 16:  # shorter strings may turn up in random ciphertext by chance
        assert payload[:16] not in sealed.read_bytes()


def _fails(tmp_path, sealed, key=None, sid=SID, seq=7):
    key = key or snapshot.snapshot_key(b"r" * 32, SID)
    with pytest.raises(IntegrityError):
        snapshot.decrypt(str(sealed), str(tmp_path / "out"), key, sid, seq)


def test_tampering_is_detected(tmp_path):
    key, sealed = _seal(tmp_path, os.urandom(10_000))
    blob = sealed.read_bytes()
    for pos in (5, 20, 33, 45, 60, len(blob) - 1):  # magic, store id, seq, nonce prefix, body, tag
        bad = bytearray(blob)
        bad[pos] ^= 1
        sealed.write_bytes(bytes(bad))
        _fails(tmp_path, sealed)
    # truncated at a chunk boundary (the final flag), or extended
    hdr, full = snapshot.HEADER.size, 4096 + 16
    sealed.write_bytes(blob[:hdr + full])
    _fails(tmp_path, sealed)
    sealed.write_bytes(blob + b"x")
    _fails(tmp_path, sealed)


def test_bound_to_store_sequence_and_root_key(tmp_path):
    key, sealed = _seal(tmp_path, b"metadata")
    _fails(tmp_path, sealed, seq=8)  # listed under another sequence number
    _fails(tmp_path, sealed, sid=bytes(16))
    _fails(tmp_path, sealed, key=snapshot.snapshot_key(b"s" * 32, SID))


def test_fresh_nonce_prefix_per_snapshot(tmp_path):
    _, a = _seal(tmp_path, b"same")
    first = a.read_bytes()
    _, b = _seal(tmp_path, b"same")
    assert first[32:40] != b.read_bytes()[32:40]


def test_container_round_trip_and_names(tmp_path):
    (tmp_path / "a").write_bytes(b"A" * 3000)
    (tmp_path / "b").write_bytes(b"")
    snapshot.pack([("meta.db", str(tmp_path / "a")), ("kms.bin", str(tmp_path / "b"))], str(tmp_path / "c"))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert snapshot.unpack(str(tmp_path / "c"), str(dest), {"meta.db", "kms.bin"}) == ["meta.db", "kms.bin"]
    assert (dest / "meta.db").read_bytes() == b"A" * 3000 and (dest / "kms.bin").read_bytes() == b""
    with pytest.raises(IntegrityError):
        snapshot.unpack(str(tmp_path / "c"), str(dest), {"meta.db"})


def test_retry_delays_are_jittered_and_bounded():
    policy = RetryPolicy(budget=3.0, base=0.1, cap=1.0)
    for _ in range(50):
        delays = list(policy.delays())
        assert sum(delays) <= 3.0
        assert all(0 <= d <= 1.0 for d in delays)
        assert len(delays) >= 3  # the budget is used, not given up at once
    caps = [min(1.0, 0.1 * 2 ** i) for i in range(4)]
    seen = [list(policy.delays())[:4] for _ in range(200)]
    for i, cap in enumerate(caps):  # full jitter: spread over [0, cap], not fixed
        values = [s[i] for s in seen if len(s) > i]
        assert max(values) <= cap and max(values) - min(values) > cap / 3

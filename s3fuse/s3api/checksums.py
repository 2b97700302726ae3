"""S3's flexible checksums (x-amz-checksum-*): computed over a body as it arrives, verified
against the header or aws-chunked trailer a client sent, and returned.

CRC32C and CRC64NVME come from awscrt (AWS's own C implementations, the ones the SDKs use);
a table-driven CRC in Python would cost seconds per GiB on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import zlib

from awscrt import checksums as crt

from .errors import S3Error


class _Crc:
    def __init__(self, fn, width: int) -> None:
        self.fn, self.width, self.value = fn, width, 0

    def update(self, data: bytes) -> None:
        self.value = self.fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self.width, "big")


def new(alg: str):
    if alg == "crc32":
        return _Crc(zlib.crc32, 4)
    if alg == "crc32c":
        return _Crc(crt.crc32c, 4)
    if alg == "crc64nvme":
        return _Crc(crt.crc64nvme, 8)
    if alg == "sha1":
        return hashlib.sha1()
    if alg == "sha256":
        return hashlib.sha256()
    return None


ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
PREFIX = "x-amz-checksum-"


def b64(alg: str, data: bytes) -> str:
    h = new(alg)
    h.update(data)
    return base64.b64encode(h.digest()).decode()


class Checksums:
    def __init__(self, headers: dict[str, str]) -> None:
        self.expected = {k[len(PREFIX):]: v for k, v in headers.items()
                         if k.startswith(PREFIX) and k[len(PREFIX):] not in ("mode", "type", "algorithm")}
        self.declared = (headers.get("x-amz-sdk-checksum-algorithm") or "").lower() or None
        trailer = (headers.get("x-amz-trailer") or "").strip().lower()
        self.trailer_alg = trailer[len(PREFIX):] if trailer.startswith(PREFIX) else None
        if self.declared and self.expected and self.declared not in self.expected:
            raise S3Error("InvalidRequest", f"x-amz-sdk-checksum-algorithm says {self.declared} but the "
                          f"request carries a {', '.join(self.expected)} checksum")
        wanted = set(self.expected) | {a for a in (self.declared, self.trailer_alg) if a}
        self.hashers = {a: new(a) for a in wanted if a in ALGORITHMS}
        self.verified: dict[str, str] = {}

    def update(self, data: bytes) -> None:
        for h in self.hashers.values():
            h.update(data)

    def verify(self, trailer: dict[str, str]) -> None:
        expected = dict(self.expected)
        for k, v in trailer.items():
            if k.startswith(PREFIX):
                expected[k[len(PREFIX):]] = v
        if self.declared and self.declared not in expected:
            raise S3Error("InvalidRequest", f"x-amz-sdk-checksum-algorithm {self.declared} was sent "
                          "without its checksum")
        for alg, value in expected.items():
            h = self.hashers.get(alg)
            if h is None:
                continue  # an algorithm we cannot compute: accepted unverified, as S3 advises
            actual = base64.b64encode(h.digest()).decode()
            if actual != value.strip():
                raise S3Error("BadDigest", f"the {alg.upper()} you specified did not match the calculated checksum")
            self.verified[alg] = actual

    def response_headers(self) -> list[tuple[str, str]]:
        return [(PREFIX + a, v) for a, v in self.verified.items()]

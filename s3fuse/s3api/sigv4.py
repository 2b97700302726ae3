"""AWS Signature Version 4 verification for S3, pure (no I/O), written from the specification.

A server must canonicalise the request exactly as it was received (the raw path and
query), not as a client would build it: the path is percent-decoded once and encoded
again with S3's rule (every byte but A-Z a-z 0-9 - _ . ~ and "/" as %XX, no
normalisation of "//", "." or ".."); query names and values likewise, "/" included.

Three ways to carry a signature are handled here:
- the Authorization header (`AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`);
- presigned query parameters (`X-Amz-Algorithm`, `X-Amz-Credential`, ... `X-Amz-Signature`);
- aws-chunked bodies: `STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]` (each chunk signed,
  chained from the seed signature) and `STREAMING-UNSIGNED-PAYLOAD-TRAILER` (a plain
  checksum trailer), decoded by `ChunkedDecoder`.

`verify` returns an `Auth` (the access key, the signing key and scope for chunk
signatures); every failure is an `S3Error` with S3's code. Signatures are compared
in constant time.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_tz, mktime_tz
from urllib.parse import quote, unquote

from .errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
MAX_SKEW = 15 * 60  # seconds, as S3
MAX_EXPIRES = 7 * 24 * 3600  # a presigned URL lives at most 7 days
DEFAULT_REGION = "us-east-1"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")
_SPACES = re.compile(r"\s+")
SIGNING_KEYS = 256  # derived signing keys remembered, at most
_signing_keys: dict[tuple[str, str, str, str], bytes] = {}


@dataclass(frozen=True)
class Auth:
    """A verified request: who signed it, and what chunk signatures chain from."""

    access_key_id: str
    amz_date: str
    scope: str
    signing_key: bytes
    seed_signature: str
    payload_hash: str  # x-amz-content-sha256 (or UNSIGNED-PAYLOAD for presigned URLs)
    presigned: bool


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    """The scope's signing key. A key depends only on these four values and serves every
    request of a day, so the derivation (four HMACs) is done once and remembered; the
    secret comes from the store, never from a request, and the signature comparison that
    uses the key stays constant-time."""
    ident = (secret, date, region, service)
    key = _signing_keys.get(ident)
    if key is None:
        k = _hmac(("AWS4" + secret).encode(), date)
        k = _hmac(k, region)
        k = _hmac(k, service)
        key = _hmac(k, "aws4_request")
        if len(_signing_keys) >= SIGNING_KEYS:
            _signing_keys.clear()  # a new day, or many keys: start again, bounded
        _signing_keys[ident] = key
    return key


def canonical_uri(raw_path: str) -> str:
    return quote(unquote(raw_path), safe="/~") or "/"


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """The raw query as (name, value) pairs, decoded; an item without '=' has value ''."""
    pairs = []
    for item in raw_query.split("&") if raw_query else ():
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((unquote(name.replace("+", "%20")), unquote(value.replace("+", "%20"))))
    return pairs


def canonical_query(pairs: list[tuple[str, str]], skip: str | None = None) -> str:
    enc = sorted((quote(n, safe="~"), quote(v, safe="~")) for n, v in pairs if n != skip)
    return "&".join(f"{n}={v}" for n, v in enc)


def canonical_headers(headers: list[tuple[str, str]], signed: list[str]) -> str:
    """`headers`: (lower-case name, value) in arrival order."""
    joined: dict[str, list[str]] = {}
    for name, value in headers:
        joined.setdefault(name, []).append(_SPACES.sub(" ", value.strip()))
    lines = []
    for name in signed:
        if name not in joined:
            raise S3Error("AccessDenied", f"the signed header {name} is not in the request")
        lines.append(f"{name}:{','.join(joined[name])}\n")
    return "".join(lines)


def canonical_request(method: str, raw_path: str, query: list[tuple[str, str]],
                      headers: list[tuple[str, str]], signed: list[str], payload_hash: str,
                      skip_query: str | None = None) -> str:
    return "\n".join([method, canonical_uri(raw_path), canonical_query(query, skip_query),
                      canonical_headers(headers, signed), ";".join(signed), payload_hash])


def string_to_sign(amz_date: str, scope: str, creq: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])


def sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def parse_amz_date(value: str) -> float:
    if not _AMZ_DATE.match(value):
        raise S3Error("AccessDenied", f"X-Amz-Date {value[:40]!r} is not yyyymmddThhmmssZ")
    try:
        return float(calendar.timegm((int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]),
                                      int(value[11:13]), int(value[13:15]), 0, 0, 0)))
    except (ValueError, OverflowError):
        raise S3Error("AccessDenied", f"X-Amz-Date {value[:40]!r} is not a valid time") from None


def _parse_credential(cred: str, amz_date: str, region: str, code: str) -> tuple[str, str]:
    parts = cred.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not parts[0]:
        raise S3Error(code, f"the credential {cred[:120]!r} is not AKID/date/region/s3/aws4_request")
    akid, date, cred_region, service, _ = parts
    if service != "s3":
        raise S3Error(code, f"the credential names service {service!r}, not s3")
    if cred_region != region:
        raise S3Error(code, f"the region {cred_region!r} is wrong; expecting {region!r}", region=region)
    if date != amz_date[:8]:
        raise S3Error(code, "the credential's date is not the date of X-Amz-Date")
    return akid, "/".join(parts[1:])


def _signed_list(value: str, code: str) -> list[str]:
    signed = value.split(";")
    if not value or "host" not in signed or any(not s or s != s.lower() for s in signed):
        raise S3Error(code, "SignedHeaders must list lower-case names including host")
    return signed


def _check_unsigned_amz(headers: list[tuple[str, str]], signed: list[str]) -> None:
    for name, _ in headers:
        if name.startswith("x-amz-") and name not in signed:
            raise S3Error("AccessDenied", f"there were headers present in the request which were not signed: {name}")


def parse_authorization(value: str) -> tuple[str, list[str], str]:
    """-> (credential, signed headers, signature)."""
    if value.startswith("AWS "):
        raise S3Error("InvalidRequest", "Signature Version 2 is not supported; use AWS4-HMAC-SHA256")
    if not value.startswith(ALGORITHM + " "):
        raise S3Error("AuthorizationHeaderMalformed", "the authorization header must use AWS4-HMAC-SHA256")
    fields = {}
    for part in value[len(ALGORITHM) + 1:].split(","):
        name, eq, val = part.strip().partition("=")
        if not eq:
            raise S3Error("AuthorizationHeaderMalformed", "the authorization header is malformed")
        fields[name] = val
    try:
        cred, signed, sig = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
    except KeyError as exc:
        raise S3Error("AuthorizationHeaderMalformed", f"the authorization header lacks {exc.args[0]}") from None
    return cred, _signed_list(signed, "AuthorizationHeaderMalformed"), sig


def verify(method: str, raw_path: str, raw_query: str, headers: list[tuple[str, str]],
           secret_for, now: float, region: str = DEFAULT_REGION) -> Auth:
    """Check a request's SigV4 signature (header or presigned).

    `headers`: (lower-case name, value) in arrival order. `secret_for(akid)` gives the
    secret access key, or None for an unknown key. Raises S3Error.
    """
    query = parse_query(raw_query)
    qnames = {n for n, _ in query}
    hdr = {}
    for name, value in headers:
        hdr.setdefault(name, value)
    if "authorization" in hdr:
        if "X-Amz-Signature" in qnames:
            raise S3Error("InvalidArgument", "only one authentication mechanism is allowed")
        cred, signed, signature = parse_authorization(hdr["authorization"])
        amz_date = hdr.get("x-amz-date")
        if amz_date is None:
            if "date" not in hdr:
                raise S3Error("AccessDenied", "neither X-Amz-Date nor Date is given")
            parsed = parsedate_tz(hdr["date"])
            if parsed is None:
                raise S3Error("AccessDenied", "the Date header is not an RFC 1123 date")
            stamp = float(mktime_tz(parsed))
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(stamp))
        else:
            stamp = parse_amz_date(amz_date)
        if abs(now - stamp) > MAX_SKEW:
            raise S3Error("RequestTimeTooSkewed",
                          "the difference between the request time and the server's time is too large")
        akid, scope = _parse_credential(cred, amz_date, region, "AuthorizationHeaderMalformed")
        payload_hash = hdr.get("x-amz-content-sha256")
        if payload_hash is None:
            raise S3Error("InvalidRequest", "missing required header for this request: x-amz-content-sha256")
        if payload_hash not in (UNSIGNED, *STREAMING) and not _HEX64.match(payload_hash):
            if payload_hash.startswith("STREAMING-AWS4-ECDSA"):
                raise S3Error("NotImplemented", "SigV4a (ECDSA) signatures are not supported")
            raise S3Error("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, a streaming mode "
                          "or a SHA-256 hex digest")
        _check_unsigned_amz(headers, signed)
        creq = canonical_request(method, raw_path, query, headers, signed, payload_hash)
        presigned = False
    elif "X-Amz-Signature" in qnames or "X-Amz-Credential" in qnames or "X-Amz-Algorithm" in qnames:
        q = {}
        for n, v in query:
            q.setdefault(n, v)
        code = "AuthorizationQueryParametersError"
        for need in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                     "X-Amz-SignedHeaders", "X-Amz-Signature"):
            if need not in q:
                raise S3Error(code, f"the query parameter {need} is missing")
        if q["X-Amz-Algorithm"] != ALGORITHM:
            raise S3Error(code, "X-Amz-Algorithm must be AWS4-HMAC-SHA256")
        amz_date = q["X-Amz-Date"]
        stamp = parse_amz_date(amz_date)
        try:
            expires = int(q["X-Amz-Expires"])
        except ValueError:
            raise S3Error(code, "X-Amz-Expires must be a number of seconds") from None
        if expires > MAX_EXPIRES:
            raise S3Error(code, "X-Amz-Expires must be less than a week (604800 seconds)")
        if expires <= 0:
            raise S3Error("AccessDenied", "X-Amz-Expires must be positive")
        if stamp - now > MAX_SKEW:
            raise S3Error("AccessDenied", "the request is not valid yet")
        if now > stamp + expires:
            raise S3Error("AccessDenied", "Request has expired")
        akid, scope = _parse_credential(q["X-Amz-Credential"], amz_date, region, code)
        signed = _signed_list(q["X-Amz-SignedHeaders"], code)
        signature = q["X-Amz-Signature"]
        payload_hash = q.get("X-Amz-Content-Sha256", UNSIGNED)
        creq = canonical_request(method, raw_path, query, headers, signed, payload_hash,
                                 skip_query="X-Amz-Signature")
        presigned = True
    elif "AWSAccessKeyId" in qnames:
        raise S3Error("InvalidRequest", "Signature Version 2 is not supported; presign with "
                      "signature_version='s3v4'")
    else:
        raise S3Error("AccessDenied", "anonymous requests are not allowed")
    secret = secret_for(akid)
    if secret is None:
        raise S3Error("InvalidAccessKeyId", "the access key id you provided does not exist in our records")
    key = signing_key(secret, amz_date[:8], region)
    sts = string_to_sign(amz_date, scope, creq)
    expected = sign(key, sts)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise S3Error("SignatureDoesNotMatch", "the request signature we calculated does not match the "
                      "signature you provided; check your key and signing method",
                      debug={"StringToSign": sts, "CanonicalRequest": creq})
    return Auth(akid, amz_date, scope, key, signature, payload_hash, presigned)


def presign_url(method: str, scheme_host: str, path: str, access_key_id: str, secret: str,
                expires: int, now: float, region: str = DEFAULT_REGION,
                extra_headers: dict[str, str] | None = None) -> str:
    """A presigned URL for `path` (already percent-encoded with S3's rule).

    `extra_headers` are signed too (the SSE-C triple): the requester must send them.
    """
    if not 0 < expires <= MAX_EXPIRES:
        raise ValueError("expires must be 1-604800 seconds")
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    host = scheme_host.split("://", 1)[1]
    headers = [("host", host)] + sorted((k.lower(), v) for k, v in (extra_headers or {}).items())
    signed = sorted(h for h, _ in headers)
    query = [("X-Amz-Algorithm", ALGORITHM), ("X-Amz-Credential", f"{access_key_id}/{scope}"),
             ("X-Amz-Date", amz_date), ("X-Amz-Expires", str(expires)),
             ("X-Amz-SignedHeaders", ";".join(signed))]
    creq = canonical_request(method, path, query, headers, signed, UNSIGNED)
    sig = sign(signing_key(secret, amz_date[:8], region), string_to_sign(amz_date, scope, creq))
    return f"{scheme_host}{canonical_uri(path)}?{canonical_query(query)}&X-Amz-Signature={sig}"


# --------------------------------------------------------------------------- aws-chunked

MAX_CHUNK = 16 << 20  # a larger chunk is refused (as MinIO)
MAX_LINE = 4096  # a chunk header or trailer line


class ChunkedDecoder:
    """Decodes an aws-chunked body incrementally: feed() the bytes as they arrive (after HTTP
    de-chunking), get the decoded payload back; finish() checks the end and returns the
    trailer headers (lower-case name -> value).

    `auth` given: every chunk's signature is checked (the chain starts at the seed
    signature), and with `signed_trailer` the trailer's signature too.
    """

    def __init__(self, auth: Auth | None = None, signed_trailer: bool = False) -> None:
        self.auth = auth
        self.signed_trailer = signed_trailer
        self.previous = auth.seed_signature if auth else ""
        self.buf = bytearray()
        self.state = "head"  # head | data | crlf | trailer | done
        self.need = 0
        self.chunk_sig = ""
        self.chunk_hash = None
        self.trailer: dict[str, str] = {}
        self.trailer_lines: list[str] = []

    def _line(self) -> str | None:
        i = self.buf.find(b"\r\n")
        if i < 0:
            if len(self.buf) > MAX_LINE:
                raise S3Error("InvalidRequest", "an aws-chunked header line is too long")
            return None
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        if len(line) > MAX_LINE:
            raise S3Error("InvalidRequest", "an aws-chunked header line is too long")
        return line.decode("latin-1")

    def _check_chunk(self, digest: str) -> None:
        if self.auth is None:
            return
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", self.auth.amz_date, self.auth.scope, self.previous,
                         EMPTY_SHA256, digest])
        expected = sign(self.auth.signing_key, sts)
        if not hmac.compare_digest(expected.encode(), self.chunk_sig.encode()):
            raise S3Error("SignatureDoesNotMatch", "an aws-chunked chunk signature does not match")
        self.previous = expected

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while True:
            if self.state == "head":
                line = self._line()
                if line is None:
                    break
                size_text, _, ext = line.partition(";")
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise S3Error("InvalidRequest", "an aws-chunked chunk size is not hex") from None
                if size < 0 or size > MAX_CHUNK:
                    raise S3Error("InvalidRequest", "an aws-chunked chunk is larger than 16 MiB")
                if self.auth is not None:
                    name, _, sig = ext.partition("=")
                    if name != "chunk-signature" or not _HEX64.match(sig):
                        raise S3Error("SignatureDoesNotMatch", "an aws-chunked chunk lacks its signature")
                    self.chunk_sig = sig
                self.chunk_hash = hashlib.sha256() if self.auth is not None else None
                if size == 0:
                    if self.auth is not None:
                        self._check_chunk(EMPTY_SHA256)
                    self.state = "trailer"
                    continue
                self.need = size
                self.state = "data"
            elif self.state == "data":
                if not self.buf:
                    break
                take = bytes(self.buf[: self.need])
                del self.buf[: len(take)]
                self.need -= len(take)
                if self.chunk_hash is not None:
                    self.chunk_hash.update(take)
                out += take
                if self.need == 0:
                    if self.chunk_hash is not None:
                        self._check_chunk(self.chunk_hash.hexdigest())
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2:
                    break
                if self.buf[:2] != b"\r\n":
                    raise S3Error("IncompleteBody", "an aws-chunked chunk is not followed by CRLF")
                del self.buf[:2]
                self.state = "head"
            elif self.state == "trailer":
                line = self._line()
                if line is None:
                    break
                if line == "":
                    self.state = "done"
                    continue
                name, colon, value = line.partition(":")
                if not colon:
                    raise S3Error("InvalidRequest", "an aws-chunked trailer line is malformed")
                name = name.strip().lower()
                if name == "x-amz-trailer-signature":
                    self._check_trailer(value.strip())
                    continue
                if len(self.trailer) >= 8:
                    raise S3Error("InvalidRequest", "too many aws-chunked trailers")
                self.trailer[name] = value.strip()
                self.trailer_lines.append(f"{name}:{value.strip()}\n")
            else:
                if self.buf.strip():
                    raise S3Error("InvalidRequest", "data after the end of an aws-chunked body")
                self.buf.clear()
                break
        return bytes(out)

    def _check_trailer(self, signature: str) -> None:
        if self.auth is None:
            return
        sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", self.auth.amz_date, self.auth.scope, self.previous,
                         hashlib.sha256("".join(self.trailer_lines).encode()).hexdigest()])
        expected = sign(self.auth.signing_key, sts)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise S3Error("SignatureDoesNotMatch", "the aws-chunked trailer signature does not match")
        self.trailer_signed = True

    def finish(self) -> dict[str, str]:
        if self.state == "trailer" and not self.buf:
            self.state = "done"  # a body may end right after the last trailer line
        if self.state != "done":
            raise S3Error("IncompleteBody", "the aws-chunked body ended early")
        if self.signed_trailer and self.trailer and not getattr(self, "trailer_signed", False):
            raise S3Error("SignatureDoesNotMatch", "the aws-chunked trailer is not signed")
        return self.trailer

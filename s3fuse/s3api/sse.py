"""S3's server-side-encryption headers: parsing a request's, and answering with an object's."""

from __future__ import annotations

import base64
import binascii
import contextvars
import errno
import hashlib
import time
from dataclasses import dataclass

from .. import policy as pol
from ..crypto import Caller
from ..errors import S3fuseError
from ..keys import customer as ssec
from ..policy import Policy
from .errors import S3Error

# the customer keys a request brought, wiped when it has been answered (api.S3Api.handle)
REQUEST_KEYS: contextvars.ContextVar[list | None] = contextvars.ContextVar("s3api_request_keys", default=None)

H_SSE = "x-amz-server-side-encryption"
H_KMS_KEY = "x-amz-server-side-encryption-aws-kms-key-id"
H_KMS_CONTEXT = "x-amz-server-side-encryption-context"
H_C_ALG = "x-amz-server-side-encryption-customer-algorithm"
H_C_KEY = "x-amz-server-side-encryption-customer-key"
H_C_MD5 = "x-amz-server-side-encryption-customer-key-md5"
COPY_PREFIX = "x-amz-copy-source-"


@dataclass
class RequestSSE:
    mode: str | None = None  # AES256 | aws:kms | SSE-C, None: not given
    kms_key: str = ""
    customer_key: ssec.CustomerKey | None = None
    customer_md5: str = ""  # base64, as sent

    @property
    def given(self) -> bool:
        return self.mode is not None


def kms_ref(value: str) -> str:
    """An ARN, alias or id as S3 clients send it -> what the KMS resolves."""
    if value.startswith("arn:aws:kms:"):
        tail = value.split(":", 5)[-1]
        return tail[len("key/"):] if tail.startswith("key/") else tail
    return value


def customer_key(alg: str | None, key_b64: str | None, md5_b64: str | None, uid: int) -> tuple[ssec.CustomerKey, str]:
    if alg != "AES256":
        raise S3Error("InvalidEncryptionAlgorithmError", "the customer-key algorithm must be AES256")
    if not key_b64 or not md5_b64:
        raise S3Error("InvalidArgument", "SSE-C needs the customer key and its MD5")
    try:
        raw = base64.b64decode(key_b64, validate=True)
        md5 = base64.b64decode(md5_b64, validate=True)
    except (binascii.Error, ValueError):
        raise S3Error("InvalidArgument", "the customer key or its MD5 is not valid base64") from None
    if len(raw) != ssec.KEY_LEN:
        raise S3Error("InvalidArgument", "the customer key must be 256 bits")
    if hashlib.md5(raw).digest() != md5:
        raise S3Error("InvalidArgument", "the calculated MD5 hash of the key did not match the hash that was provided")
    material = bytearray(raw)
    key = ssec.CustomerKey("s3-request", material, uid, False, ssec.fingerprint(material), time.time())
    held = REQUEST_KEYS.get()
    if held is not None:
        held.append(key)
    return key, md5_b64


def parse(headers: dict[str, str], uid: int, secure: bool, copy_source: bool = False) -> RequestSSE:
    """The SSE headers of a request (or, with `copy_source`, its copy-source SSE-C headers).

    `secure`: TLS, or a loopback peer; SSE-C keys are refused otherwise, as S3 refuses them
    over plain HTTP.
    """
    p = COPY_PREFIX if copy_source else "x-amz-"
    c_names = [p + H_C_ALG[len("x-amz-"):], p + H_C_KEY[len("x-amz-"):], p + H_C_MD5[len("x-amz-"):]]
    has_c = any(n in headers for n in c_names)
    out = RequestSSE()
    if not copy_source:
        mode = headers.get(H_SSE)
        if mode is not None:
            if has_c:
                raise S3Error("InvalidArgument", "server-side encryption with customer keys cannot be "
                              "combined with x-amz-server-side-encryption")
            if mode not in (pol.SSE_S3, pol.SSE_KMS):
                raise S3Error("InvalidArgument", f"the encryption method {mode[:40]!r} is not supported "
                              "(AES256 or aws:kms)")
            out.mode = mode
            if mode == pol.SSE_KMS:
                out.kms_key = kms_ref(headers.get(H_KMS_KEY, ""))
        if H_KMS_KEY in headers and out.mode != pol.SSE_KMS:
            raise S3Error("InvalidArgument", "a KMS key id needs x-amz-server-side-encryption: aws:kms")
    if has_c:
        if not secure:
            raise S3Error("InvalidRequest", "requests with customer keys (SSE-C) must be made over a "
                          "secure connection (TLS), or from this host")
        key, md5 = customer_key(*(headers.get(n) for n in c_names), uid=uid)
        out.mode, out.customer_key, out.customer_md5 = pol.SSE_C, key, md5
    return out


async def to_policy(req: RequestSSE, keys, who: Caller) -> Policy:
    """A request's SSE as the policy a new file is created with (KMS key resolved and enabled)."""
    if req.mode == pol.SSE_S3:
        return Policy(pol.SSE_S3)
    if req.mode == pol.SSE_C:
        return Policy(pol.SSE_C, req.customer_key.fingerprint)
    try:
        key_id, state = await keys.resolve_kms_key(req.kms_key, who)
    except S3fuseError as exc:
        if exc.errno == errno.ENOKEY:
            raise S3Error("KMS.NotFoundException", str(exc)) from None
        raise
    if state == "Disabled":
        raise S3Error("KMS.DisabledException", f"KMS key {key_id} is disabled")
    if state != "Enabled":
        raise S3Error("KMS.KMSInvalidStateException", f"KMS key {key_id} is {state}")
    return Policy(pol.SSE_KMS, key_id)


def response_headers(mode: str, kms_key: str = "", customer_md5: str = "") -> list[tuple[str, str]]:
    if mode == pol.SSE_S3:
        return [(H_SSE, "AES256")]
    if mode == pol.SSE_KMS:
        return [(H_SSE, "aws:kms"), (H_KMS_KEY, kms_key)]
    out = [(H_C_ALG, "AES256")]
    if customer_md5:
        out.append((H_C_MD5, customer_md5))
    return out

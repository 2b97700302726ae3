"""SigV4 verification (s3fuse/s3api/sigv4.py), pure: AWS's published examples, and requests
signed by botocore's own signers (header and presigned) for awkward keys."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from s3fuse.s3api import sigv4
from s3fuse.s3api.errors import S3Error

AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
T0 = 1369353600.0  # 20130524T000000Z


def secrets(akid):
    return SECRET if akid == AKID else None


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(S3Error) as info:
        fn(*args, **kw)
    return info.value.code


# -- AWS's examples (S3 API reference, "Signature Calculations for the Authorization Header"
#    and "Authenticating Requests: Using Query Parameters", "...: Using Multiple Chunks")

EXAMPLE_GET = [("host", "examplebucket.s3.amazonaws.com"), ("range", "bytes=0-9"),
               ("x-amz-content-sha256", sigv4.EMPTY_SHA256), ("x-amz-date", "20130524T000000Z")]


def _auth_header(signed: str, sig: str) -> tuple[str, str]:
    return ("authorization", f"AWS4-HMAC-SHA256 Credential={AKID}/20130524/us-east-1/s3/aws4_request,"
                             f"SignedHeaders={signed},Signature={sig}")


def test_aws_example_get_object_header():
    sig = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    headers = EXAMPLE_GET + [_auth_header("host;range;x-amz-content-sha256;x-amz-date", sig)]
    auth = sigv4.verify("GET", "/test.txt", "", headers, secrets, T0 + 60)
    assert auth.access_key_id == AKID and not auth.presigned
    bad = EXAMPLE_GET + [_auth_header("host;range;x-amz-content-sha256;x-amz-date", "0" * 64)]
    assert code_of(sigv4.verify, "GET", "/test.txt", "", bad, secrets, T0) == "SignatureDoesNotMatch"
    # the same request, one byte of the path changed
    assert code_of(sigv4.verify, "GET", "/test.txT", "", headers, secrets, T0) == "SignatureDoesNotMatch"



def test_remembered_signing_key_still_rejects_a_wrong_secret_or_another_date():
    """Signing keys are derived once per (secret, date, region) and remembered: a request
    verified under one secret leaves nothing that lets the same request pass under
    another secret, and a key of one day never signs for another."""
    sig = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    headers = EXAMPLE_GET + [_auth_header("host;range;x-amz-content-sha256;x-amz-date", sig)]
    sigv4.verify("GET", "/test.txt", "", headers, secrets, T0 + 60)  # the key is remembered now
    assert sigv4.signing_key(SECRET, "20130524", "us-east-1") == sigv4.signing_key(SECRET, "20130524",
                                                                                   "us-east-1")

    def other_secret(akid):
        return SECRET[:-1] + "X" if akid == AKID else None

    assert code_of(sigv4.verify, "GET", "/test.txt", "", headers, other_secret, T0 + 60) == "SignatureDoesNotMatch"
    # the same signature with the next day's date (and scope): a different signing key
    next_day = [(k, "20130525T000000Z" if k == "x-amz-date" else v) for k, v in EXAMPLE_GET]
    cred = _auth_header("host;range;x-amz-content-sha256;x-amz-date", sig)[1].replace("/20130524/", "/20130525/")
    assert code_of(sigv4.verify, "GET", "/test.txt", "", next_day + [("authorization", cred)], secrets,
                   T0 + 86400) == "SignatureDoesNotMatch"
    # and the remembered key is the derivation's, for both days
    for date in ("20130524", "20130525"):
        k = ("AWS4" + SECRET).encode()
        for part in (date, "us-east-1", "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        assert sigv4.signing_key(SECRET, date, "us-east-1") == k


def test_aws_example_presigned_url():
    query = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1"
             "%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
             "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    headers = [("host", "examplebucket.s3.amazonaws.com")]
    auth = sigv4.verify("GET", "/test.txt", query, headers, secrets, T0 + 3600)
    assert auth.presigned and auth.payload_hash == sigv4.UNSIGNED
    err = code_of(sigv4.verify, "GET", "/test.txt", query, headers, secrets, T0 + 86401)
    assert err == "AccessDenied"  # expired
    assert code_of(sigv4.verify, "GET", "/test.txt", query.replace("86400", "86401"), headers, secrets,
                   T0) == "SignatureDoesNotMatch"
    # the generator reproduces AWS's URL
    url = sigv4.presign_url("GET", "https://examplebucket.s3.amazonaws.com", "/test.txt", AKID, SECRET,
                            86400, T0)
    assert url.endswith("X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


def test_aws_example_signed_chunks():
    headers = [("host", "s3.amazonaws.com"), ("x-amz-date", "20130524T000000Z"),
               ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
               ("x-amz-content-sha256", sigv4.STREAMING_SIGNED), ("content-encoding", "aws-chunked"),
               ("x-amz-decoded-content-length", "66560"), ("content-length", "66824")]
    signed = "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;" \
             "x-amz-decoded-content-length;x-amz-storage-class"
    seed = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
    auth = sigv4.verify("PUT", "/examplebucket/chunkObject.txt", "", headers + [_auth_header(signed, seed)],
                        secrets, T0)
    chunks = [(65536, "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"),
              (1024, "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"),
              (0, "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9")]
    body = b"".join(b"%x;chunk-signature=%s\r\n" % (n, s.encode()) + b"a" * n + b"\r\n" for n, s in chunks)
    assert len(body) == 66824
    dec = sigv4.ChunkedDecoder(auth)
    out = b"".join(dec.feed(body[i:i + 1000]) for i in range(0, len(body), 1000))
    assert out == b"a" * 66560
    assert dec.finish() == {}
    tampered = bytearray(body)
    tampered[200] ^= 1
    dec = sigv4.ChunkedDecoder(auth)
    with pytest.raises(S3Error) as info:
        dec.feed(bytes(tampered))
    assert info.value.code == "SignatureDoesNotMatch"


def test_unsigned_trailer_body():
    body = b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\nx-amz-checksum-crc32:TPYlaA==\r\n\r\n"
    dec = sigv4.ChunkedDecoder(None)
    assert dec.feed(body) == b"x" * 1000
    assert dec.finish() == {"x-amz-checksum-crc32": "TPYlaA=="}
    short = sigv4.ChunkedDecoder(None)
    short.feed(body[:500])
    assert code_of(short.finish) == "IncompleteBody"


# -- botocore's signers, for keys a server must canonicalise exactly as received

KEYS = ["plain.txt", "a b+c.txt", "ü/ñ 漢字", "x!*'();:@&=$,?#[]", "a//b/./c/../d", "100%.txt", "~tilde-_."]


def _wire(req: AWSRequest) -> tuple[str, str, list[tuple[str, str]]]:
    prepared = req.prepare()
    parts = urlsplit(prepared.url)
    headers = [(k.lower(), v) for k, v in prepared.headers.items()]
    if not any(k == "host" for k, _ in headers):
        headers.append(("host", parts.netloc))
    return parts.path, parts.query, headers


@pytest.mark.parametrize("key", KEYS)
def test_botocore_header_signature(key):
    from botocore.utils import percent_encode

    body = b"hello"
    url = "http://127.0.0.1:9000/bucket/" + percent_encode(key, safe="/~")
    req = AWSRequest("PUT", url + "?x-id=PutObject&tagging", data=body,
                     headers={"x-amz-content-sha256": hashlib.sha256(body).hexdigest(),
                              "x-amz-meta-note": "  two  spaces ", "content-type": "text/plain"})
    S3SigV4Auth(Credentials(AKID, SECRET), "s3", "us-east-1").add_auth(req)
    path, query, headers = _wire(req)
    import time
    auth = sigv4.verify("PUT", path, query, headers, secrets, time.time())
    assert auth.access_key_id == AKID
    # an unsigned x-amz- header added on the way is refused
    extra = headers + [("x-amz-server-side-encryption", "AES256")]
    assert code_of(sigv4.verify, "PUT", path, query, extra, secrets, time.time()) == "AccessDenied"


@pytest.mark.parametrize("key", KEYS)
def test_botocore_presigned(key):
    import time

    from botocore.utils import percent_encode

    url = "http://127.0.0.1:9000/bucket/" + percent_encode(key, safe="/~") + "?response-content-type=a%2Fb"
    req = AWSRequest("GET", url)
    S3SigV4QueryAuth(Credentials(AKID, SECRET), "s3", "us-east-1", expires=300).add_auth(req)
    path, query, headers = _wire(req)
    sigv4.verify("GET", path, query, headers, secrets, time.time())
    assert code_of(sigv4.verify, "GET", path, query, headers, secrets, time.time() + 301) == "AccessDenied"
    tampered = query.replace("response-content-type=a%2Fb", "response-content-type=a%2Fc")
    assert code_of(sigv4.verify, "GET", path, tampered, headers, secrets, time.time()) == "SignatureDoesNotMatch"


def test_refusals():
    import time
    now = time.time()
    host = [("host", "h")]
    assert code_of(sigv4.verify, "GET", "/b/k", "", host, secrets, now) == "AccessDenied"  # anonymous
    assert code_of(sigv4.verify, "GET", "/b/k", "", host + [("authorization", "AWS AKID:sig")],
                   secrets, now) == "InvalidRequest"  # SigV2
    assert code_of(sigv4.verify, "GET", "/b/k", "AWSAccessKeyId=A&Expires=1&Signature=x", host, secrets,
                   now) == "InvalidRequest"
    # clock skew beyond 15 minutes
    req = AWSRequest("GET", "http://h/b/k", headers={"x-amz-content-sha256": sigv4.EMPTY_SHA256})
    S3SigV4Auth(Credentials(AKID, SECRET), "s3", "us-east-1").add_auth(req)
    path, query, headers = _wire(req)
    sigv4.verify("GET", path, query, headers, secrets, now + 14 * 60)
    assert code_of(sigv4.verify, "GET", path, query, headers, secrets, now + 16 * 60) == "RequestTimeTooSkewed"
    # another region, an unknown key
    assert code_of(sigv4.verify, "GET", path, query, headers, secrets, now, region="eu-west-1") == \
        "AuthorizationHeaderMalformed"
    assert code_of(sigv4.verify, "GET", path, query, headers, lambda a: None, now) == "InvalidAccessKeyId"
    # presigned: more than 7 days
    url = sigv4.presign_url("GET", "http://h", "/b/k", AKID, SECRET, 604800, now)
    q = urlsplit(url).query
    sigv4.verify("GET", "/b/k", q, host, secrets, now)
    assert code_of(sigv4.verify, "GET", "/b/k", q.replace("X-Amz-Expires=604800", "X-Amz-Expires=604801"),
                   host, secrets, now) == "AuthorizationQueryParametersError"

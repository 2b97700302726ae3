"""The S3 API's bodies, checksums and bounds: botocore over TLS (aws-chunked with a checksum
trailer), flexible checksums, a signed-chunk upload, SSE-C refused over plain HTTP from
another host, oversized heads, slow clients, connections per client."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import os
import socket
import time
import zlib

import botocore.exceptions
import pytest

from .conftest import wait_until
from .s3api_helpers import client, endpoint_of, error_code, new_key

ClientError = botocore.exceptions.ClientError


def _self_signed(tmp: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_api(module_mount_factory, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tls"))
    cert, key = _self_signed(tmp)
    conf = os.path.join(tmp, "s3fuse.toml")
    with open(conf, "w") as f:
        f.write(f'[s3api]\nlisten = "127.0.0.1:0"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    m = module_mount_factory(extra_args=["--config", conf])
    endpoint = endpoint_of(m)
    assert endpoint.startswith("https://")
    akid, secret = new_key(m)
    return m, endpoint, client_with_ca(endpoint, akid, secret, cert), cert


def client_with_ca(endpoint, akid, secret, cert):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=akid, aws_secret_access_key=secret,
                        region_name="us-east-1", verify=cert,
                        config=Config(signature_version="s3v4", retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def limited_api(module_mount_factory, tmp_path_factory):
    """Listening on every address, with short timeouts and two connections per client."""
    tmp = str(tmp_path_factory.mktemp("lim"))
    conf = os.path.join(tmp, "s3fuse.toml")
    with open(conf, "w") as f:
        f.write('[s3api]\nlisten = "0.0.0.0:0"\nheader_timeout = 1\nbody_timeout = 1\nidle_timeout = 2\n'
                'connections_per_client = 2\n')
    m = module_mount_factory(extra_args=["--config", conf])
    endpoint = endpoint_of(m)
    akid, secret = new_key(m)
    return m, endpoint, client(endpoint, akid, secret), (akid, secret)


def test_tls_streaming_trailer_checksums(tls_api):
    """botocore over HTTPS sends bodies aws-chunked with a CRC32 trailer
    (STREAMING-UNSIGNED-PAYLOAD-TRAILER); SSE-C works over TLS."""
    m, endpoint, c, _ = tls_api
    c.create_bucket(Bucket="tls")
    body = os.urandom(3 << 20)
    events = []
    c.meta.events.register("before-send.s3.PutObject",
                           lambda request, **kw: events.append(dict(request.headers)))
    r = c.put_object(Bucket="tls", Key="x", Body=body)
    sent = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in events[-1].items()}
    assert sent["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    assert r["ChecksumCRC32"] == crc
    assert (m.mnt / "tls/x").read_bytes() == body
    for alg in ("CRC32C", "CRC64NVME", "SHA256", "SHA1"):
        r = c.put_object(Bucket="tls", Key=f"x-{alg}", Body=body[:100_000], ChecksumAlgorithm=alg)
        assert r[f"Checksum{alg}"]
    key = os.urandom(32)
    c.put_object(Bucket="tls", Key="c", Body=b"customer", SSECustomerAlgorithm="AES256", SSECustomerKey=key)
    assert c.get_object(Bucket="tls", Key="c", SSECustomerAlgorithm="AES256",
                        SSECustomerKey=key)["Body"].read() == b"customer"


def test_checksum_mismatch_and_digests(limited_api):
    m, endpoint, c, _ = limited_api
    c.create_bucket(Bucket="sums")
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket="sums", Key="bad", Body=b"data", ChecksumCRC32="AAAAAA==")
    assert error_code(info.value) == "BadDigest"
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket="sums", Key="bad", Body=b"data", ContentMD5=base64.b64encode(b"0" * 16).decode())
    assert error_code(info.value) == "BadDigest"
    assert not (m.mnt / "sums/bad").exists()  # nothing stored, nothing half-written
    assert os.listdir(m.mnt / "sums") == []
    good = base64.b64encode(hashlib.sha256(b"data").digest()).decode()
    assert c.put_object(Bucket="sums", Key="ok", Body=b"data", ChecksumSHA256=good)["ChecksumSHA256"] == good


def _signed_chunk_put(endpoint: str, akid: str, secret: str, path: str, chunks: list[bytes],
                      tamper: bool = False) -> tuple[int, bytes]:
    """A STREAMING-AWS4-HMAC-SHA256-PAYLOAD upload, signed here from AWS's documentation
    (as the Java SDK and minio-go send it)."""
    host = endpoint.split("://")[1]
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"

    def h(key, msg):
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = h(h(h(h(("AWS4" + secret).encode(), amz_date[:8]), "us-east-1"), "s3"), "aws4_request")
    frames = [(c, hashlib.sha256(c).hexdigest()) for c in chunks] + [(b"", hashlib.sha256(b"").hexdigest())]
    encoded_len = sum(len(f"{len(c):x};chunk-signature=") + 64 + 2 + len(c) + 2 for c, _ in frames)
    headers = {"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
               "content-encoding": "aws-chunked", "x-amz-decoded-content-length": str(sum(map(len, chunks))),
               "content-length": str(encoded_len)}
    signed = sorted(headers)
    creq = "\n".join(["PUT", path, "", "".join(f"{n}:{headers[n]}\n" for n in signed), ";".join(signed),
                      headers["x-amz-content-sha256"]])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
    seed = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={akid}/{scope}, SignedHeaders={';'.join(signed)}, "
                                f"Signature={seed}")
    body, prev = b"", seed
    for data, digest in frames:
        csts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, prev, hashlib.sha256(b"").hexdigest(), digest])
        prev = hmac.new(k, csts.encode(), hashlib.sha256).hexdigest()
        if tamper and data:
            data = data[:-1] + bytes([data[-1] ^ 1])
        body += f"{len(data):x};chunk-signature={prev}\r\n".encode() + data + b"\r\n"
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("PUT", path, body=body, headers=headers)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_signed_chunk_upload(limited_api):
    m, endpoint, c, (akid, secret) = limited_api
    c.create_bucket(Bucket="chunks")
    chunks = [os.urandom(64 << 10), os.urandom(64 << 10), b"last bit"]
    status, _ = _signed_chunk_put(endpoint, akid, secret, "/chunks/signed", chunks)
    assert status == 200
    assert (m.mnt / "chunks/signed").read_bytes() == b"".join(chunks)
    status, body = _signed_chunk_put(endpoint, akid, secret, "/chunks/tampered", chunks, tamper=True)
    assert status == 403 and b"SignatureDoesNotMatch" in body
    assert not (m.mnt / "chunks/tampered").exists()


def test_ssec_refused_over_plain_http_from_another_host(limited_api):
    m, endpoint, c, (akid, secret) = limited_api
    c.create_bucket(Bucket="remote")
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = endpoint.rsplit(":", 1)[1]
    remote = client(f"http://{addr}:{port}", akid, secret)
    remote.put_object(Bucket="remote", Key="plain", Body=b"ok over http")  # SSE-S3: fine
    with pytest.raises(ClientError) as info:
        remote.put_object(Bucket="remote", Key="c", Body=b"x", SSECustomerAlgorithm="AES256",
                          SSECustomerKey=os.urandom(32))
    assert error_code(info.value) == "InvalidRequest"
    assert "secure" in info.value.response["Error"]["Message"]


def _non_loopback_address() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


def _raw(endpoint: str) -> socket.socket:
    host, port = endpoint.split("://")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        out += data
    return out


def test_oversized_head_slow_client_and_connection_limit(limited_api):
    m, endpoint, c, _ = limited_api
    # a request head over 16 KiB
    s = _raw(endpoint)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    reply = _recv_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 431") or reply.startswith(b"HTTP/1.1 400"), reply[:100]
    # a client that trickles its request head is cut off after header_timeout (1 s)
    s = _raw(endpoint)
    s.settimeout(0.1)  # the client's pace: a header line per 0.1 s
    s.sendall(b"GET / HTTP/1.1\r\n")
    deadline = time.monotonic() + 5
    closed = False
    while not closed and time.monotonic() < deadline:
        try:
            s.sendall(b"X-Slow: 1\r\n")
            closed = s.recv(1) == b""
        except socket.timeout:
            pass
        except OSError:
            closed = True
    s.close()
    assert closed, "a trickling client was not cut off"
    # at most two connections from one address: a third is closed at once
    held = [_raw(endpoint), _raw(endpoint)]
    wait_until(lambda: _third_refused(endpoint), 10, "a third connection refused")
    for h in held:
        h.close()
    c.list_buckets()  # the slots are free again


def _third_refused(endpoint: str) -> bool:
    s = _raw(endpoint)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return _recv_all(s) == b""
    finally:
        s.close()


def test_port_in_use_is_one_clear_error(workdir, new_store):
    from .conftest import TRACEBACK, run_cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        mnt = workdir("mnt")
        r = run_cli("mount", new_store, mnt, "--s3-api", f"127.0.0.1:{taken.getsockname()[1]}")
    finally:
        taken.close()
    assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr, r.stderr
    assert TRACEBACK not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt)


def test_background_mount_serves_the_api(workdir, new_store):
    from .conftest import run_cli

    mnt = workdir("mnt")
    r = run_cli("mount", new_store, mnt, "--s3-api", "127.0.0.1:0")
    assert r.returncode == 0, r.stderr
    try:
        r = run_cli("s3-key", "add", "--uid", "0", "--allow-root", "--mount", mnt)
        assert r.returncode == 0, r.stderr
        fields = dict(line.split(None, 1) for line in r.stdout.splitlines())
        c = client(fields["endpoint"], fields["AccessKeyId"], fields["SecretAccessKey"])
        c.create_bucket(Bucket="bgm")
        assert (mnt / "bgm").is_dir()
    finally:
        assert run_cli("umount", mnt).returncode == 0


def test_a_put_that_cannot_be_stored_fails_and_leaves_the_old_object(mount_factory, workdir, monkeypatch):
    import json as _json

    plan = workdir("plan") / "plan.json"
    plan.write_text(_json.dumps({"rules": []}))
    monkeypatch.setenv("S3FUSE_TESTING_FAULT_PLAN", str(plan))
    from .s3api_helpers import start_api_mount

    m, endpoint = start_api_mount(mount_factory)
    c = client(endpoint, *new_key(m))
    c.create_bucket(Bucket="faults")
    c.put_object(Bucket="faults", Key="k", Body=b"old version")
    tmp = plan.with_suffix(".tmp")
    tmp.write_text(_json.dumps({"rules": [{"op": "put", "error": "EIO"}]}))
    os.replace(tmp, plan)
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket="faults", Key="k", Body=b"new version")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert (m.mnt / "faults/k").read_bytes() == b"old version"
    assert os.listdir(m.mnt / "faults") == ["k"]  # no half-made file left beside it
    tmp.write_text(_json.dumps({"rules": []}))
    os.replace(tmp, plan)
    c.put_object(Bucket="faults", Key="k", Body=b"new version")
    assert c.get_object(Bucket="faults", Key="k")["Body"].read() == b"new version"


def test_body_that_does_not_match_its_signed_hash_is_refused(limited_api):
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    m, endpoint, c, (akid, secret) = limited_api
    c.create_bucket(Bucket="hashes")
    req = AWSRequest("PUT", f"{endpoint}/hashes/obj", data=b"signed body",
                     headers={"x-amz-content-sha256": hashlib.sha256(b"signed body").hexdigest()})
    S3SigV4Auth(Credentials(akid, secret), "s3", "us-east-1").add_auth(req)
    prepared = req.prepare()
    host = endpoint.split("://")[1]
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("PUT", "/hashes/obj", body=b"OTHER body!", headers=dict(prepared.headers))
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 400 and b"XAmzContentSHA256Mismatch" in body
    assert os.listdir(m.mnt / "hashes") == []


def test_a_get_whose_later_block_fails_authentication_is_cut_off(limited_api):
    """A GET streams its object a block at a time, the next block read and authenticated
    while the previous one is sent: a block that fails authentication ends the connection
    before the declared length, after only the authenticated bytes before it."""
    import sqlite3

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from .conftest import object_path

    m, endpoint, c, (akid, secret) = limited_api
    block = 4 << 20
    data = os.urandom(3 * block + 100)
    c.create_bucket(Bucket="cutoff")
    c.put_object(Bucket="cutoff", Key="obj", Body=data)
    con = sqlite3.connect(f"file:{m.store / 'meta.db'}?mode=ro", uri=True)
    try:
        (bucket,) = con.execute("SELECT inode FROM dentries WHERE parent=1 AND name=?", (b"cutoff",)).fetchone()
        (ino,) = con.execute("SELECT inode FROM dentries WHERE parent=? AND name=?", (bucket, b"obj")).fetchone()
        (oid,) = con.execute("SELECT object_id FROM blocks WHERE inode=? AND blockno=2", (ino,)).fetchone()
    finally:
        con.close()
    path = object_path(m.store, oid.hex())
    with open(path, "r+b") as f:  # one ciphertext byte of block 2 flipped in place
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    req = AWSRequest("GET", f"{endpoint}/cutoff/obj", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(akid, secret), "s3", "us-east-1").add_auth(req)
    conn = http.client.HTTPConnection(endpoint.split("://")[1], timeout=30)
    try:
        conn.request("GET", "/cutoff/obj", headers=dict(req.prepare().headers))
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("content-length")) == len(data)
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
    finally:
        conn.close()
    got = info.value.partial
    assert len(got) <= 2 * block and got == data[:len(got)]
    # the daemon goes on serving, and the damaged object stays refused
    c.put_object(Bucket="cutoff", Key="small", Body=b"fine")
    assert c.get_object(Bucket="cutoff", Key="small")["Body"].read() == b"fine"

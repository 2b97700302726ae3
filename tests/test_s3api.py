"""The S3 API of a mounted store, driven by boto3 (and urllib for presigned URLs): SSE-S3,
SSE-KMS and SSE-C round trips, coherence with the mount, listing order and paging,
presigned URLs per mode, credentials and permissions, and the refusals."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import json
import os
import subprocess
import threading
import urllib.error
import urllib.request

import botocore.exceptions
import pytest

from .conftest import TRACEBACK, run_cli, wait_until
from .faultd import STORE_GATHER_ENV
from .s3api_helpers import cli_as, client, error_code, new_key, start_api_mount

ClientError = botocore.exceptions.ClientError


@pytest.fixture(scope="module")
def api(module_mount_factory):
    m, endpoint = start_api_mount(module_mount_factory)
    akid, secret = new_key(m)
    c = client(endpoint, akid, secret)
    return m, endpoint, c, (akid, secret)


@pytest.fixture
def bucket(api, request):
    m, _, c, _ = api
    name = "b-" + hashlib.md5(request.node.name.encode()).hexdigest()[:12]
    c.create_bucket(Bucket=name)
    return name


def _ssec(key: bytes) -> dict:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}


def test_sse_s3_round_trip_and_coherence(api, bucket):
    m, _, c, _ = api
    body = os.urandom(300_000)
    r = c.put_object(Bucket=bucket, Key="dir/sub/obj.bin", Body=body, ContentType="application/x-test",
                     Metadata={"colour": "blue"}, CacheControl="no-cache", ContentDisposition="inline")
    assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert r["ServerSideEncryption"] == "AES256"
    # visible through the mount at once (the kernel had looked up nothing, then everything)
    path = m.mnt / bucket / "dir/sub/obj.bin"
    assert path.read_bytes() == body
    assert os.getxattr(path, "user.s3fuse.mode") == b"AES256"
    assert os.getxattr(path, "user.s3.meta.colour") == b"blue"
    g = c.get_object(Bucket=bucket, Key="dir/sub/obj.bin")
    assert g["Body"].read() == body
    assert (g["ContentType"], g["Metadata"], g["CacheControl"], g["ContentDisposition"]) == \
        ("application/x-test", {"colour": "blue"}, "no-cache", "inline")
    assert g["ETag"] == r["ETag"] and g["ContentLength"] == len(body)
    # replace through the API: the mount sees the new content, not a cached old one
    os.stat(m.mnt / bucket / "dir/sub/new.txt") if (m.mnt / bucket / "dir/sub/new.txt").exists() else None
    with pytest.raises(FileNotFoundError):
        os.stat(m.mnt / bucket / "dir/sub/late.txt")  # a negative lookup the kernel caches
    c.put_object(Bucket=bucket, Key="dir/sub/late.txt", Body=b"now here")
    assert (m.mnt / bucket / "dir/sub/late.txt").read_bytes() == b"now here"
    c.put_object(Bucket=bucket, Key="dir/sub/obj.bin", Body=b"short")
    assert path.read_bytes() == b"short"
    assert os.stat(path).st_size == 5
    c.delete_object(Bucket=bucket, Key="dir/sub/late.txt")
    assert not (m.mnt / bucket / "dir/sub/late.txt").exists()


def test_a_put_refreshes_the_directory_attributes_the_kernel_cached(api, bucket):
    """The kernel caches a directory's attributes for 300 s. A PUT of a new key, which the
    kernel never looked up (so forgetting that entry does not touch the directory), and one
    that replaces a key, each change the directory's mtime: the mount sees the new one."""
    m, _, c, _ = api
    d = m.mnt / bucket
    c.put_object(Bucket=bucket, Key="first", Body=b"1")
    before = os.stat(d).st_mtime_ns  # now cached by the kernel
    c.put_object(Bucket=bucket, Key="second", Body=b"2")
    after_new = os.stat(d).st_mtime_ns
    assert after_new > before
    c.put_object(Bucket=bucket, Key="second", Body=b"22")
    assert os.stat(d).st_mtime_ns > after_new
    assert sorted(os.listdir(d)) == ["first", "second"]


def test_mount_written_file_through_api(api, bucket):
    m, _, c, _ = api
    p = m.mnt / bucket / "from-mount.txt"
    p.write_bytes(b"version one")
    h1 = c.head_object(Bucket=bucket, Key="from-mount.txt")
    assert h1["ContentLength"] == 11
    assert h1["ETag"].strip('"').endswith("-1")  # not an MD5: derived, documented in S3API.md
    assert c.get_object(Bucket=bucket, Key="from-mount.txt")["Body"].read() == b"version one"
    with open(p, "r+b") as f:
        f.write(b"VERSION")
        os.fsync(f.fileno())
    h2 = c.head_object(Bucket=bucket, Key="from-mount.txt")
    assert h2["ETag"] != h1["ETag"]
    assert c.get_object(Bucket=bucket, Key="from-mount.txt")["Body"].read() == b"VERSION one"
    # a file the API stored keeps its MD5 ETag until the mount changes it
    r = c.put_object(Bucket=bucket, Key="api.txt", Body=b"abc")
    assert c.head_object(Bucket=bucket, Key="api.txt")["ETag"] == r["ETag"]
    with open(m.mnt / bucket / "api.txt", "ab") as f:
        f.write(b"d")
    wait_until(lambda: c.head_object(Bucket=bucket, Key="api.txt")["ContentLength"] == 4, 10, "size 4")
    assert c.head_object(Bucket=bucket, Key="api.txt")["ETag"] != r["ETag"]
    assert b"user.s3fuse.s3api.etag" not in [n.encode() for n in os.listxattr(m.mnt / bucket / "api.txt")]


def test_sse_kms_round_trip(api, bucket):
    m, _, c, _ = api
    r = c.put_object(Bucket=bucket, Key="k.txt", Body=b"kms body", ServerSideEncryption="aws:kms")
    assert r["ServerSideEncryption"] == "aws:kms" and r["SSEKMSKeyId"]
    assert r["ETag"] != f'"{hashlib.md5(b"kms body").hexdigest()}"'  # opaque for SSE-KMS
    assert os.getxattr(m.mnt / bucket / "k.txt", "user.s3fuse.mode") == b"aws:kms"
    g = c.get_object(Bucket=bucket, Key="k.txt")
    assert g["Body"].read() == b"kms body"
    assert g["ServerSideEncryption"] == "aws:kms" and g["SSEKMSKeyId"] == r["SSEKMSKeyId"]
    # a named key
    out = run_cli("kms", "create-key", "--alias", "alias/s3api-named", "--mount", m.mnt)
    assert out.returncode == 0, out.stderr
    r = c.put_object(Bucket=bucket, Key="named.txt", Body=b"x", ServerSideEncryption="aws:kms",
                     SSEKMSKeyId="alias/s3api-named")
    assert os.getxattr(m.mnt / bucket / "named.txt", "user.s3fuse.kms-key-id").decode() == r["SSEKMSKeyId"]
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="nokey.txt", Body=b"x", ServerSideEncryption="aws:kms",
                     SSEKMSKeyId="alias/does-not-exist")
    assert error_code(info.value) == "KMS.NotFoundException"
    # a disabled key: writes and reads answer KMS.DisabledException
    assert run_cli("kms", "disable", "alias/s3api-named", "--mount", m.mnt).returncode == 0
    for call in (lambda: c.put_object(Bucket=bucket, Key="d.txt", Body=b"x", ServerSideEncryption="aws:kms",
                                      SSEKMSKeyId="alias/s3api-named"),
                 lambda: c.get_object(Bucket=bucket, Key="named.txt")):
        with pytest.raises(ClientError) as info:
            call()
        assert error_code(info.value) == "KMS.DisabledException"
    assert run_cli("kms", "enable", "alias/s3api-named", "--mount", m.mnt).returncode == 0
    assert c.get_object(Bucket=bucket, Key="named.txt")["Body"].read() == b"x"


def test_sse_c_round_trip_and_refusals(api, bucket):
    m, _, c, _ = api
    key = os.urandom(32)
    r = c.put_object(Bucket=bucket, Key="c.bin", Body=b"customer data", **_ssec(key))
    assert r["SSECustomerAlgorithm"] == "AES256"
    assert r["SSECustomerKeyMD5"] == base64.b64encode(hashlib.md5(key).digest()).decode()
    assert r["ETag"] != f'"{hashlib.md5(b"customer data").hexdigest()}"'
    assert c.get_object(Bucket=bucket, Key="c.bin", **_ssec(key))["Body"].read() == b"customer data"
    # listed without its key, with its plaintext size
    listed = c.list_objects_v2(Bucket=bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("c.bin", 13)]
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="c.bin")
    assert error_code(info.value) == "InvalidRequest"
    with pytest.raises(ClientError) as info:
        c.head_object(Bucket=bucket, Key="c.bin")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="c.bin", **_ssec(os.urandom(32)))
    assert error_code(info.value) == "AccessDenied"
    # the key was held for those requests only: the mount cannot read the file...
    with pytest.raises(OSError):
        (m.mnt / bucket / "c.bin").read_bytes()
    # ...until the same key is loaded with `s3fuse key add`: the same object opens
    r2 = subprocess.run([*__import__("tests.conftest", fromlist=["S3FUSE"]).S3FUSE, "key", "add", "ck",
                         "--mount", str(m.mnt)], input=base64.b64encode(key), capture_output=True)
    assert r2.returncode == 0, r2.stderr
    try:
        assert (m.mnt / bucket / "c.bin").read_bytes() == b"customer data"
    finally:
        assert run_cli("key", "remove", "ck", "--mount", m.mnt).returncode == 0
    # SSE and SSE-C together
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="both", Body=b"x", ServerSideEncryption="AES256", **_ssec(key))
    assert error_code(info.value) == "InvalidArgument"
    # SSE-C headers on an object that is not SSE-C
    c.put_object(Bucket=bucket, Key="plain", Body=b"x")
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="plain", **_ssec(key))
    assert error_code(info.value) == "InvalidRequest"


def test_listing_order_and_paging(api, bucket):
    m, _, c, _ = api
    keys = ["a-c", "a/b", "a/b/../x" if False else "a/c/d", "a0", "b", "a/b2", "ü", "a.b", "z/y/x/w"]
    for k in keys:
        c.put_object(Bucket=bucket, Key=k, Body=k.encode())
    (m.mnt / bucket / "emptydir").mkdir()  # made through the mount: its marker key
    expected = sorted(keys + ["emptydir/"], key=lambda k: k.encode())
    got = [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]]
    assert got == expected
    sizes = {o["Key"]: o["Size"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
    assert sizes["a/c/d"] == 5
    # paging: continuation tokens, max-keys, start-after; v1 markers
    pages, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = c.list_objects_v2(Bucket=bucket, MaxKeys=3, **kw)
        pages.append([o["Key"] for o in r.get("Contents", [])])
        assert r["KeyCount"] == len(pages[-1])
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert sum(pages, []) == expected and len(pages) == 4
    r = c.list_objects_v2(Bucket=bucket, StartAfter="a/b2")
    assert [o["Key"] for o in r["Contents"]] == expected[expected.index("a/b2") + 1:]
    paginator = c.get_paginator("list_objects")
    v1 = [o["Key"] for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
          for o in page.get("Contents", [])]
    assert v1 == expected
    # delimiter and prefix
    r = c.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "emptydir/", "z/"]
    assert [o["Key"] for o in r["Contents"]] == ["a-c", "a.b", "a0", "b", "ü"]
    r = c.list_objects_v2(Bucket=bucket, Prefix="a/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["a/b", "a/b2"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/c/"]
    r = c.list_objects_v2(Bucket=bucket, Prefix="a/b")
    assert [o["Key"] for o in r["Contents"]] == ["a/b", "a/b2"]
    paged = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Delimiter="/",
                                                         PaginationConfig={"PageSize": 1})
    seen = []
    for page in paged:
        seen += [o["Key"] for o in page.get("Contents", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    assert sorted(seen, key=str.encode) == ["a-c", "a.b", "a/", "a0", "b", "emptydir/", "z/", "ü"]


def test_prefix_conflicts_and_path_tricks(api, bucket):
    m, _, c, _ = api
    c.put_object(Bucket=bucket, Key="file", Body=b"x")
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="file/under", Body=b"y")
    assert error_code(info.value) == "InvalidRequest" and "is an object" in info.value.response["Error"]["Message"]
    c.put_object(Bucket=bucket, Key="dir/x", Body=b"x")
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="dir", Body=b"y")
    assert error_code(info.value) == "InvalidRequest"
    for bad in ("a/../b", "a//b", "./a", "a/.", ".."):
        with pytest.raises(ClientError) as info:
            c.put_object(Bucket=bucket, Key=bad, Body=b"y")
        assert error_code(info.value) == "InvalidArgument", bad
    assert sorted(os.listdir(m.mnt / bucket)) == ["dir", "file"]
    # a marker object is a directory
    c.put_object(Bucket=bucket, Key="folder/", Body=b"")
    assert (m.mnt / bucket / "folder").is_dir()
    assert c.head_object(Bucket=bucket, Key="folder/")["ContentLength"] == 0
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="dir")
    assert error_code(info.value) == "NoSuchKey"


def test_get_conditions_and_ranges(api, bucket):
    _, _, c, _ = api
    body = bytes(range(256)) * 10
    etag = c.put_object(Bucket=bucket, Key="r", Body=body)["ETag"]
    assert c.get_object(Bucket=bucket, Key="r", Range="bytes=10-19")["Body"].read() == body[10:20]
    assert c.get_object(Bucket=bucket, Key="r", Range="bytes=-5")["Body"].read() == body[-5:]
    g = c.get_object(Bucket=bucket, Key="r", Range="bytes=2550-9999")
    assert g["Body"].read() == body[2550:] and g["ContentRange"] == "bytes 2550-2559/2560"
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="r", Range="bytes=5000-")
    assert error_code(info.value) == "InvalidRange"
    assert c.get_object(Bucket=bucket, Key="r", IfMatch=etag)["Body"].read() == body
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="r", IfMatch='"0123"')
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket=bucket, Key="r", IfNoneMatch=etag)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="r", Body=b"x", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_presigned_urls_per_mode(api, bucket):
    m, endpoint, c, _ = api
    key = os.urandom(32)
    c.put_object(Bucket=bucket, Key="s3.txt", Body=b"sse-s3")
    c.put_object(Bucket=bucket, Key="kms.txt", Body=b"sse-kms", ServerSideEncryption="aws:kms")
    c.put_object(Bucket=bucket, Key="c.txt", Body=b"sse-c", **_ssec(key))
    ssec_headers = {"x-amz-server-side-encryption-customer-algorithm": "AES256",
                    "x-amz-server-side-encryption-customer-key": base64.b64encode(key).decode(),
                    "x-amz-server-side-encryption-customer-key-MD5":
                        base64.b64encode(hashlib.md5(key).digest()).decode()}
    for name, body, params, headers in (("s3.txt", b"sse-s3", {}, {}), ("kms.txt", b"sse-kms", {}, {}),
                                        ("c.txt", b"sse-c", _ssec(key), ssec_headers)):
        url = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": name, **params},
                                       ExpiresIn=300)
        assert urllib.request.urlopen(urllib.request.Request(url, headers=headers)).read() == body
        # s3fuse presign: the same for every mode
        r = run_cli("presign", m.mnt / bucket / name, "--expires", "300")
        assert r.returncode == 0, r.stderr
        cli_url = r.stdout.strip()
        assert cli_url.startswith(endpoint)
        assert urllib.request.urlopen(urllib.request.Request(cli_url, headers=headers)).read() == body
    # SSE-C without its headers
    url = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "c.txt"}, ExpiresIn=300)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url)
    assert info.value.code == 400
    # a tampered signature, and an expired URL
    url = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "s3.txt"}, ExpiresIn=300)
    sig_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    bad = url[:sig_at] + ("0" if url[sig_at] != "0" else "1") + url[sig_at + 1:]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad)
    assert info.value.code == 403 and b"SignatureDoesNotMatch" in info.value.read()
    old = url.replace("X-Amz-Date=", "X-Amz-Date=2020").replace("X-Amz-Date=2020" + url.split("X-Amz-Date=")[1][:16],
                                                               "X-Amz-Date=20200101T000000Z")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(old)
    assert info.value.code == 403
    # a presigned PUT
    r = run_cli("presign", m.mnt / bucket / "uploaded.txt", "--method", "PUT")
    assert r.returncode == 0, r.stderr
    urllib.request.urlopen(urllib.request.Request(r.stdout.strip(), data=b"via url", method="PUT"))
    assert (m.mnt / bucket / "uploaded.txt").read_bytes() == b"via url"


def test_keys_identity_permissions_and_audit(api, bucket):
    m, endpoint, c, (root_akid, _) = api
    # rules of s3-key add
    r = run_cli("s3-key", "add", "--uid", "0", "--mount", m.mnt)
    assert r.returncode != 0 and "--allow-root" in r.stderr
    r = cli_as(1000, "s3-key", "add", "--uid", "1001", "--mount", m.mnt)
    assert r.returncode != 0 and "only root" in r.stderr, r.stderr
    r = cli_as(1000, "s3-key", "add", "--json", "--mount", m.mnt)  # for himself: allowed
    assert r.returncode == 0, r.stderr
    assert run_cli("s3-key", "remove", json.loads(r.stdout)["AccessKeyId"], "--mount", m.mnt).returncode == 0
    akid, secret = new_key(m, uid=1000)
    listed = run_cli("s3-key", "list", "--mount", m.mnt).stdout
    assert akid in listed and secret not in listed
    u = client(endpoint, akid, secret)
    # root's private file: denied to uid 1000; its own directory: allowed
    c.put_object(Bucket=bucket, Key="private", Body=b"root only")
    os.chmod(m.mnt / bucket / "private", 0o600)
    with pytest.raises(ClientError) as info:
        u.get_object(Bucket=bucket, Key="private")
    assert error_code(info.value) == "AccessDenied"
    with pytest.raises(ClientError) as info:
        u.put_object(Bucket=bucket, Key="mine", Body=b"x")
    assert error_code(info.value) == "AccessDenied"
    (m.mnt / bucket / "u1000").mkdir()
    os.chown(m.mnt / bucket / "u1000", 1000, 1000)
    u.put_object(Bucket=bucket, Key="u1000/mine", Body=b"x")
    st = os.stat(m.mnt / bucket / "u1000/mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    # a KMS key whose policy names only root: uid 1000 is refused
    assert run_cli("kms", "create-key", "--alias", "alias/s3api-rootonly", "--mount", m.mnt).returncode == 0
    with pytest.raises(ClientError) as info:
        u.put_object(Bucket=bucket, Key="u1000/kms", Body=b"x", ServerSideEncryption="aws:kms",
                     SSEKMSKeyId="alias/s3api-rootonly")
    assert error_code(info.value) == "AccessDenied"
    # the audit trail records the access key id of API requests
    c.put_object(Bucket=bucket, Key="audited", Body=b"x", ServerSideEncryption="aws:kms",
                 SSEKMSKeyId="alias/s3api-rootonly")
    log = (m.store / "audit.log").read_text()
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert any(r.get("access_key_id") == root_akid and r.get("op", "").startswith("kms:") for r in records)
    assert any(r.get("access_key_id") == akid and r.get("outcome") == "denied" for r in records)
    # a removed key no longer signs
    assert run_cli("s3-key", "remove", akid, "--mount", m.mnt).returncode == 0
    with pytest.raises(ClientError) as info:
        u.list_buckets()
    assert error_code(info.value) == "InvalidAccessKeyId"


def test_buckets_and_deletes(api):
    m, _, c, _ = api
    c.create_bucket(Bucket="bk-life")
    assert "bk-life" in [b["Name"] for b in c.list_buckets()["Buckets"]]
    assert (m.mnt / "bk-life").is_dir()
    with pytest.raises(ClientError) as info:
        c.create_bucket(Bucket="bk-life")
    assert error_code(info.value) == "BucketAlreadyOwnedByYou"
    with pytest.raises(ClientError) as info:
        c.create_bucket(Bucket="Bad_Name")
    assert error_code(info.value) == "InvalidBucketName"
    c.head_bucket(Bucket="bk-life")
    with pytest.raises(ClientError) as info:
        c.head_bucket(Bucket="no-such-bucket")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    c.put_object(Bucket="bk-life", Key="d/e/f", Body=b"x")
    c.put_object(Bucket="bk-life", Key="g", Body=b"x")
    with pytest.raises(ClientError) as info:
        c.delete_bucket(Bucket="bk-life")
    assert error_code(info.value) == "BucketNotEmpty"
    c.delete_object(Bucket="bk-life", Key="missing/key")  # 204 as S3
    r = c.delete_objects(Bucket="bk-life", Delete={"Objects": [{"Key": "d/e/f"}, {"Key": "g"}, {"Key": "nope"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["d/e/f", "g", "nope"]
    assert os.listdir(m.mnt / "bk-life") == []  # emptied prefixes went too
    c.delete_bucket(Bucket="bk-life")
    assert not (m.mnt / "bk-life").exists()
    with pytest.raises(ClientError) as info:
        c.get_object(Bucket="bk-life", Key="x")
    assert error_code(info.value) == "NoSuchBucket"
    with pytest.raises(ClientError) as info:
        c.get_bucket_policy(Bucket=next(iter([b["Name"] for b in c.list_buckets()["Buckets"]]), "x"))
    assert error_code(info.value) == "NotImplemented"


def test_bad_signature_and_anonymous(api, bucket):
    m, endpoint, c, (akid, secret) = api
    bad = client(endpoint, akid, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    with pytest.raises(ClientError) as info:
        bad.list_objects_v2(Bucket=bucket)
    assert error_code(info.value) == "SignatureDoesNotMatch"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{endpoint}/{bucket}")
    assert info.value.code == 403 and b"<Code>AccessDenied</Code>" in info.value.read()
    assert TRACEBACK not in m.log_text()


def test_bucket_default_encryption(api, bucket):
    m, _, c, _ = api
    with pytest.raises(ClientError) as info:
        c.get_bucket_encryption(Bucket=bucket)
    assert error_code(info.value) == "ServerSideEncryptionConfigurationNotFoundError"
    c.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]})
    rule = c.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert os.getxattr(m.mnt / bucket, "user.s3fuse.sse").startswith(b"aws:kms")
    r = c.put_object(Bucket=bucket, Key="by-default", Body=b"x")
    assert r["ServerSideEncryption"] == "aws:kms"
    assert os.getxattr(m.mnt / bucket / "by-default", "user.s3fuse.mode") == b"aws:kms"
    # an explicit header wins over the default
    assert c.put_object(Bucket=bucket, Key="explicit", Body=b"x", ServerSideEncryption="AES256")[
        "ServerSideEncryption"] == "AES256"
    c.delete_bucket_encryption(Bucket=bucket)
    with pytest.raises(ClientError):
        c.get_bucket_encryption(Bucket=bucket)
    # a directory set to SSE-C through the mount: not expressible; PUTs need the key headers
    key = os.urandom(32)
    r = subprocess.run([*__import__("tests.conftest", fromlist=["S3FUSE"]).S3FUSE, "key", "add", "bk",
                        "--mount", str(m.mnt)], input=base64.b64encode(key), capture_output=True)
    assert r.returncode == 0, r.stderr
    try:
        os.mkdir(m.mnt / bucket / "cdir")
        os.setxattr(m.mnt / bucket / "cdir", "user.s3fuse.sse", b"SSE-C:bk")
        with pytest.raises(ClientError) as info:
            c.put_object(Bucket=bucket, Key="cdir/x", Body=b"x")
        assert error_code(info.value) == "InvalidRequest" and "SSE-C" in info.value.response["Error"]["Message"]
        c.put_object(Bucket=bucket, Key="cdir/x", Body=b"with key", **_ssec(key))
        assert (m.mnt / bucket / "cdir/x").read_bytes() == b"with key"  # the loaded key opens it
        # the bucket itself set to SSE-C: S3's document cannot say so; the answer names it
        os.setxattr(m.mnt / bucket, "user.s3fuse.sse", b"SSE-C:bk")
        with pytest.raises(ClientError) as info:
            c.get_bucket_encryption(Bucket=bucket)
        assert error_code(info.value) == "ServerSideEncryptionConfigurationNotFoundError"
        assert "SSE-C" in info.value.response["Error"]["Message"]
        os.removexattr(m.mnt / bucket, "user.s3fuse.sse")
    finally:
        assert run_cli("key", "remove", "bk", "--mount", m.mnt).returncode == 0


def test_concurrent_puts_share_store_batches_and_wal_syncs(api, bucket):
    """PUTs that arrive together are stored in one batch, and the batch's renames are made
    durable by one WAL sync: never more syncs than batches. Each object reads back whole."""
    m, endpoint, _, (akid, secret) = api

    def status() -> dict:
        r = run_cli("status", m.mnt, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    before = status()
    threads, per_thread = 8, 25
    bodies = {f"group/{t}/{i}": os.urandom(4096) for t in range(threads) for i in range(per_thread)}
    clients = [client(endpoint, akid, secret, max_pool_connections=2) for _ in range(threads)]
    keys = sorted(bodies)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: [clients[t].put_object(Bucket=bucket, Key=k, Body=bodies[k])
                                 for k in keys[t::threads]], range(threads)))
    after = status()
    batches = after["s3api_store_batches"] - before["s3api_store_batches"]
    stored = after["s3api_stored_files"] - before["s3api_stored_files"]
    syncs = after["s3api_wal_syncs"] - before["s3api_wal_syncs"]
    assert stored == len(bodies)
    assert 0 < batches <= stored
    assert 0 < syncs <= batches, (syncs, batches)
    for k in keys[::17]:
        assert clients[0].get_object(Bucket=bucket, Key=k)["Body"].read() == bodies[k]


def _api_status(m) -> dict:
    r = run_cli("status", m.mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _put_head_only(endpoint: str, akid: str, secret: str, path: str, body: bytes) -> http.client.HTTPConnection:
    """A signed PUT whose head is sent now; the caller sends `body` when it chooses."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    req = AWSRequest("PUT", f"{endpoint}{path}", data=body,
                     headers={"x-amz-content-sha256": hashlib.sha256(body).hexdigest()})
    S3SigV4Auth(Credentials(akid, secret), "s3", "us-east-1").add_auth(req)
    headers = dict(req.prepare().headers)
    headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection(endpoint.split("://")[1], timeout=60)
    conn.putrequest("PUT", path)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    return conn


def test_a_store_batch_waits_for_small_bodies_still_arriving(mount_factory, monkeypatch):
    """A store batch about to start waits until it holds as many files as there are small PUTs
    still receiving their bodies. Here the wait is long: one PUT waits in its batch while two
    others are announced, a third body sent on cue joins it, and the last PUT is stored on its
    own, with nothing left to wait for."""
    monkeypatch.setenv(STORE_GATHER_ENV, "60")
    m, endpoint = start_api_mount(mount_factory)
    akid, secret = new_key(m)
    c = client(endpoint, akid, secret)
    c.create_bucket(Bucket="gather")
    before = _api_status(m)
    bodies = {name: os.urandom(4096) for name in ("early", "second", "last")}
    held = {name: _put_head_only(endpoint, akid, secret, f"/gather/{name}", bodies[name])
            for name in ("second", "last")}
    wait_until(lambda: _api_status(m)["s3api_bodies_arriving"] == 2, 30, "two PUTs announced")
    early = threading.Thread(target=c.put_object, kwargs={"Bucket": "gather", "Key": "early",
                                                          "Body": bodies["early"]})
    early.start()
    wait_until(lambda: _api_status(m)["s3api_files_to_store"] == 1, 30, "the early PUT waiting in its batch")
    assert early.is_alive()
    held["second"].send(bodies["second"])
    assert held["second"].getresponse().status == 200
    early.join(60)
    assert not early.is_alive()
    middle = _api_status(m)
    assert middle["s3api_store_batches"] - before["s3api_store_batches"] == 1
    assert middle["s3api_stored_files"] - before["s3api_stored_files"] == 2
    assert middle["s3api_batches_gathered"] - before["s3api_batches_gathered"] == 1
    held["last"].send(bodies["last"])
    assert held["last"].getresponse().status == 200
    after = _api_status(m)
    assert after["s3api_store_batches"] - before["s3api_store_batches"] == 2
    assert after["s3api_batches_gathered"] - before["s3api_batches_gathered"] == 1
    assert after["s3api_bodies_arriving"] == 0 and after["s3api_files_to_store"] == 0
    for conn in held.values():
        conn.close()
    for name, body in bodies.items():
        assert (m.mnt / "gather" / name).read_bytes() == body


def test_a_body_that_does_not_come_holds_a_batch_only_briefly(api, bucket):
    """The wait for announced bodies is bounded: PUTs whose bodies never come do not hold
    another's, and their announcements end with their connections."""
    m, endpoint, c, (akid, secret) = api
    before = _api_status(m)
    stalled = [_put_head_only(endpoint, akid, secret, f"/{bucket}/stalled{i}", os.urandom(4096)) for i in range(2)]
    wait_until(lambda: _api_status(m)["s3api_bodies_arriving"] == 2, 30, "the stalled PUTs announced")
    c.put_object(Bucket=bucket, Key="prompt", Body=b"stored without the stalled ones")
    after = _api_status(m)
    assert after["s3api_batches_gathered"] - before["s3api_batches_gathered"] == 1
    assert after["s3api_bodies_arriving"] == 2
    assert (m.mnt / bucket / "prompt").read_bytes() == b"stored without the stalled ones"
    for conn in stalled:
        conn.close()
    wait_until(lambda: _api_status(m)["s3api_bodies_arriving"] == 0, 30, "the announcements withdrawn")
    assert not any(name.startswith("stalled") for name in os.listdir(m.mnt / bucket))

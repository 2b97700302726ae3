"""The S3 API driven by the clients people use, unmodified: the aws CLI (cp, ls, sync, rm,
s3api with each SSE option, a multipart upload), rclone (provider Other: sync up and down
with checksums), and boto3's multipart, copy and re-encrypting copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import botocore.exceptions
import pytest

from .s3api_helpers import client, env_for, error_code, new_key, start_api_mount

BIN = Path(sys.executable).parent
ClientError = botocore.exceptions.ClientError


@pytest.fixture(scope="module")
def api(module_mount_factory):
    m, endpoint = start_api_mount(module_mount_factory)
    akid, secret = new_key(m)
    return m, endpoint, akid, secret


def aws(api, *args, check=True, timeout=300):
    m, endpoint, akid, secret = api
    r = subprocess.run([str(BIN / "aws"), "--endpoint-url", endpoint, *map(str, args)], capture_output=True,
                       text=True, env=env_for(endpoint, akid, secret), timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"aws {' '.join(map(str, args))}: {r.stderr}"
    return r


def rclone(api, *args, check=True):
    m, endpoint, akid, secret = api
    env = dict(os.environ, RCLONE_CONFIG_T_TYPE="s3", RCLONE_CONFIG_T_PROVIDER="Other",
               RCLONE_CONFIG_T_ACCESS_KEY_ID=akid, RCLONE_CONFIG_T_SECRET_ACCESS_KEY=secret,
               RCLONE_CONFIG_T_ENDPOINT=endpoint, RCLONE_CONFIG_T_REGION="us-east-1",
               RCLONE_CONFIG="/dev/null")
    r = subprocess.run([str(BIN / "rclone"), *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"rclone {' '.join(map(str, args))}: {r.stderr}"
    return r


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "dir/b.bin": os.urandom(70_000), "dir/sub/c": b"", "dir/sub/d e+f.txt": b"odd name",
             "z/ü.txt": "ünïcode".encode(), "big.bin": os.urandom(3 << 20)}
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_aws_cli_cp_ls_sync_rm(api, tmp_path):
    m = api[0]
    aws(api, "s3", "mb", "s3://cli-bucket")
    src = tmp_path / "src"
    files = make_tree(src)
    aws(api, "s3", "sync", src, "s3://cli-bucket/tree/")
    assert read_tree(m.mnt / "cli-bucket/tree") == files  # through the mount
    out = aws(api, "s3", "ls", "--recursive", "s3://cli-bucket/").stdout
    assert [line.split(None, 3)[3] for line in out.splitlines()] == sorted(f"tree/{k}" for k in files)
    # an unchanged tree: nothing to upload
    again = aws(api, "s3", "sync", src, "s3://cli-bucket/tree/").stdout
    assert again.strip() == ""
    # down again
    down = tmp_path / "down"
    aws(api, "s3", "sync", "s3://cli-bucket/tree/", down)
    assert read_tree(down) == files
    # a file changed through the mount comes down changed
    (m.mnt / "cli-bucket/tree/a.txt").write_bytes(b"alpha, changed through the mount")
    aws(api, "s3", "cp", "s3://cli-bucket/tree/a.txt", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == b"alpha, changed through the mount"
    # sync --delete and rm
    (src / "a.txt").unlink()
    aws(api, "s3", "sync", "--delete", src, "s3://cli-bucket/tree/")
    assert not (m.mnt / "cli-bucket/tree/a.txt").exists()
    aws(api, "s3", "rm", "--recursive", "s3://cli-bucket/tree/")
    assert os.listdir(m.mnt / "cli-bucket") == []
    aws(api, "s3", "rb", "s3://cli-bucket")
    assert not (m.mnt / "cli-bucket").exists()


def test_aws_cli_multipart_and_sse_options(api, tmp_path):
    m = api[0]
    aws(api, "s3", "mb", "s3://cli-sse")
    big = tmp_path / "big.bin"
    data = os.urandom(37 << 20)  # five 8 MiB parts: the CLI's multipart upload
    big.write_bytes(data)
    aws(api, "s3", "cp", big, "s3://cli-sse/big.bin")
    head = aws(api, "s3api", "head-object", "--bucket", "cli-sse", "--key", "big.bin").stdout
    assert json.loads(head)["ETag"].endswith('-5"')  # a multipart ETag
    assert hashlib.sha256((m.mnt / "cli-sse/big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    aws(api, "s3", "cp", "s3://cli-sse/big.bin", tmp_path / "back.bin")  # ranged, parallel GETs
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    # s3api with each SSE option
    small = tmp_path / "small.txt"
    small.write_bytes(b"small body")
    aws(api, "s3api", "put-object", "--bucket", "cli-sse", "--key", "s3", "--body", small,
        "--server-side-encryption", "AES256")
    aws(api, "s3api", "put-object", "--bucket", "cli-sse", "--key", "kms", "--body", small,
        "--server-side-encryption", "aws:kms")
    key = "0123456789abcdef0123456789abcdef"
    aws(api, "s3api", "put-object", "--bucket", "cli-sse", "--key", "c", "--body", small,
        "--sse-customer-algorithm", "AES256", "--sse-customer-key", key)
    for name, mode in (("s3", b"AES256"), ("kms", b"aws:kms"), ("c", b"SSE-C")):
        assert os.getxattr(m.mnt / "cli-sse" / name, "user.s3fuse.mode") == mode
    out = tmp_path / "out"
    aws(api, "s3api", "get-object", "--bucket", "cli-sse", "--key", "c", "--sse-customer-algorithm", "AES256",
        "--sse-customer-key", key, out)
    assert out.read_bytes() == b"small body"
    r = aws(api, "s3api", "get-object", "--bucket", "cli-sse", "--key", "c", out, check=False)
    assert r.returncode != 0 and "InvalidRequest" in r.stderr
    # high-level cp with a customer key: a multipart upload under SSE-C
    aws(api, "s3", "cp", big, "s3://cli-sse/big-c.bin", "--sse-c", "AES256", "--sse-c-key", key)
    aws(api, "s3", "cp", "s3://cli-sse/big-c.bin", tmp_path / "big-c.bin", "--sse-c", "AES256", "--sse-c-key", key)
    assert (tmp_path / "big-c.bin").read_bytes() == data
    assert os.getxattr(m.mnt / "cli-sse/big-c.bin", "user.s3fuse.mode") == b"SSE-C"


def test_rclone_sync_up_and_down_with_checksums(api, tmp_path):
    m = api[0]
    src = tmp_path / "src"
    files = make_tree(src)
    rclone(api, "sync", "--checksum", src, "t:rc-bucket/data")
    assert read_tree(m.mnt / "rc-bucket/data") == files
    check = rclone(api, "check", src, "t:rc-bucket/data")  # sizes and MD5s (ETags) agree
    assert "0 differences found" in check.stderr
    down = tmp_path / "down"
    rclone(api, "sync", "--checksum", "t:rc-bucket/data", down)
    assert read_tree(down) == files
    # a change through the mount is synced down (its ETag is not an MD5: rclone compares sizes/times)
    (m.mnt / "rc-bucket/data/dir/b.bin").write_bytes(b"replaced through the mount")
    rclone(api, "sync", "t:rc-bucket/data", down)
    assert (down / "dir/b.bin").read_bytes() == b"replaced through the mount"
    listing = rclone(api, "lsf", "-R", "t:rc-bucket/data").stdout.splitlines()
    assert "dir/sub/d e+f.txt" in listing and "z/ü.txt" in listing
    rclone(api, "purge", "t:rc-bucket")
    assert not (m.mnt / "rc-bucket").exists()


def test_boto3_multipart_copy_and_reencryption(api):
    m, endpoint, akid, secret = api
    c = client(endpoint, akid, secret)
    c.create_bucket(Bucket="mpu")
    # multipart by hand: parts out of order, one re-uploaded, then completed
    up = c.create_multipart_upload(Bucket="mpu", Key="obj", ServerSideEncryption="aws:kms")
    uid = up["UploadId"]
    parts = {1: os.urandom(5 << 20), 2: os.urandom(5 << 20), 3: b"tail"}
    etags = {}
    for n in (3, 1, 2, 1):
        etags[n] = c.upload_part(Bucket="mpu", Key="obj", UploadId=uid, PartNumber=n, Body=parts[n])["ETag"]
    listed = c.list_parts(Bucket="mpu", Key="obj", UploadId=uid)["Parts"]
    assert [p["PartNumber"] for p in listed] == [1, 2, 3] and listed[2]["Size"] == 4
    assert [u["UploadId"] for u in c.list_multipart_uploads(Bucket="mpu")["Uploads"]] == [uid]
    assert [o["Key"] for o in c.list_objects_v2(Bucket="mpu").get("Contents", [])] == []  # staging is hidden
    with pytest.raises(ClientError) as info:
        c.complete_multipart_upload(Bucket="mpu", Key="obj", UploadId=uid, MultipartUpload={"Parts": [
            {"PartNumber": 2, "ETag": etags[2]}, {"PartNumber": 1, "ETag": etags[1]}]})
    assert error_code(info.value) == "InvalidPartOrder"
    r = c.complete_multipart_upload(Bucket="mpu", Key="obj", UploadId=uid, MultipartUpload={"Parts": [
        {"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})
    expected = hashlib.md5(b"".join(bytes.fromhex(etags[n].strip('"')) for n in (1, 2, 3))).hexdigest() + "-3"
    assert r["ETag"] == f'"{expected}"'
    whole = parts[1] + parts[2] + parts[3]
    assert (m.mnt / "mpu/obj").read_bytes() == whole
    assert os.getxattr(m.mnt / "mpu/obj", "user.s3fuse.mode") == b"aws:kms"
    assert os.listdir(m.mnt / "mpu") == ["obj"]  # the staging area is gone
    with pytest.raises(ClientError) as info:
        c.upload_part(Bucket="mpu", Key="obj", UploadId=uid, PartNumber=1, Body=b"x")
    assert error_code(info.value) == "NoSuchUpload"
    # abort
    up2 = c.create_multipart_upload(Bucket="mpu", Key="aborted")["UploadId"]
    c.upload_part(Bucket="mpu", Key="aborted", UploadId=up2, PartNumber=1, Body=b"x")
    c.abort_multipart_upload(Bucket="mpu", Key="aborted", UploadId=up2)
    assert c.list_multipart_uploads(Bucket="mpu").get("Uploads", []) == []
    # CopyObject that changes the encryption: KMS -> SSE-C -> SSE-S3
    key = os.urandom(32)
    c.copy_object(Bucket="mpu", Key="as-c", CopySource={"Bucket": "mpu", "Key": "obj"},
                  SSECustomerAlgorithm="AES256", SSECustomerKey=key)
    assert os.getxattr(m.mnt / "mpu/as-c", "user.s3fuse.mode") == b"SSE-C"
    with pytest.raises(ClientError) as info:  # an SSE-C source needs its key
        c.copy_object(Bucket="mpu", Key="as-s3", CopySource={"Bucket": "mpu", "Key": "as-c"})
    assert error_code(info.value) == "InvalidRequest"
    r = c.copy_object(Bucket="mpu", Key="as-s3", CopySource={"Bucket": "mpu", "Key": "as-c"},
                      CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey=key,
                      ServerSideEncryption="AES256")
    assert r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(whole).hexdigest()}"'
    assert (m.mnt / "mpu/as-s3").read_bytes() == whole
    assert os.getxattr(m.mnt / "mpu/as-s3", "user.s3fuse.mode") == b"AES256"
    # SSE-C key rotation: a self-copy with the old key as source and a new key
    new = os.urandom(32)
    c.copy_object(Bucket="mpu", Key="as-c", CopySource={"Bucket": "mpu", "Key": "as-c"},
                  CopySourceSSECustomerAlgorithm="AES256", CopySourceSSECustomerKey=key,
                  SSECustomerAlgorithm="AES256", SSECustomerKey=new)
    assert c.get_object(Bucket="mpu", Key="as-c", SSECustomerAlgorithm="AES256",
                        SSECustomerKey=new)["Body"].read() == whole
    # metadata: COPY keeps it, REPLACE sets it; a plain self-copy is refused
    c.put_object(Bucket="mpu", Key="meta", Body=b"m", Metadata={"a": "1"}, ContentType="text/x-a")
    c.copy_object(Bucket="mpu", Key="meta2", CopySource="mpu/meta")
    h = c.head_object(Bucket="mpu", Key="meta2")
    assert h["Metadata"] == {"a": "1"} and h["ContentType"] == "text/x-a"
    c.copy_object(Bucket="mpu", Key="meta", CopySource="mpu/meta", MetadataDirective="REPLACE",
                  Metadata={"b": "2"})
    assert c.head_object(Bucket="mpu", Key="meta")["Metadata"] == {"b": "2"}
    with pytest.raises(ClientError) as info:
        c.copy_object(Bucket="mpu", Key="meta", CopySource="mpu/meta")
    assert error_code(info.value) == "InvalidRequest"
    # UploadPartCopy with ranges
    up3 = c.create_multipart_upload(Bucket="mpu", Key="pc")["UploadId"]
    p1 = c.upload_part_copy(Bucket="mpu", Key="pc", UploadId=up3, PartNumber=1, CopySource="mpu/as-s3",
                            CopySourceRange=f"bytes=0-{(5 << 20) - 1}")["CopyPartResult"]["ETag"]
    p2 = c.upload_part_copy(Bucket="mpu", Key="pc", UploadId=up3, PartNumber=2, CopySource="mpu/as-s3",
                            CopySourceRange=f"bytes={5 << 20}-{len(whole) - 1}")["CopyPartResult"]["ETag"]
    c.complete_multipart_upload(Bucket="mpu", Key="pc", UploadId=up3, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": p1}, {"PartNumber": 2, "ETag": p2}]})
    assert (m.mnt / "mpu/pc").read_bytes() == whole
    # boto3's managed transfer (multipart above 8 MiB, ranged parallel downloads)
    big = os.urandom(20 << 20)
    from boto3.s3.transfer import TransferConfig
    import io
    c.upload_fileobj(io.BytesIO(big), "mpu", "managed", Config=TransferConfig(multipart_chunksize=8 << 20))
    out = io.BytesIO()
    c.download_fileobj("mpu", "managed", out)
    assert out.getvalue() == big
    shutil.rmtree(m.mnt / "mpu")

"""The S3 API's stored bytes (docs/FORMAT.md): the sealed access-key file and ETag records."""

from __future__ import annotations

import os

import pytest

from s3fuse.errors import StoreError
from s3fuse.s3api import credentials, etag

from .test_format import _documented_hex

ROOT = bytes(range(32, 64))
SID = bytes.fromhex("a0" * 16)
NONCE = (1).to_bytes(12, "big")
OID = bytes.fromhex("00112233445566778899aabbccddeeff")
BODY = {"etag_key": bytes(range(32)),
        "keys": {"AKS3FEXAMPLE0000000": {"secret": "s3fuse-example-secret", "uid": 1000, "gid": 1000,
                                         "groups": [1000], "created": 1700000000}}}


def test_access_key_file_matches_documented_vector(tmp_path):
    blob = credentials.seal(BODY, ROOT, SID, nonce=NONCE)
    assert blob == _documented_hex("S3 API access keys (`s3keys.bin`)")
    path = tmp_path / "s3keys.bin"
    path.write_bytes(blob)
    ks = credentials.AccessKeys.load(str(path), ROOT, SID)
    assert ks.secret_for("AKS3FEXAMPLE0000000") == "s3fuse-example-secret"
    assert ks.etag_key == bytes(range(32))
    with pytest.raises(StoreError):
        credentials.AccessKeys.load(str(path), bytes(32), SID)  # another root key
    with pytest.raises(StoreError):
        credentials.AccessKeys.load(str(path), ROOT, bytes(16))  # another store


def test_access_keys_rules_and_persistence(tmp_path):
    path = str(tmp_path / "s3keys.bin")
    ks = credentials.AccessKeys(path, ROOT, SID)
    with pytest.raises(Exception, match="only root"):
        ks.add(1001, requester_uid=1000)
    with pytest.raises(Exception, match="allow-root"):
        ks.add(0, requester_uid=0)
    mine = ks.add(1000, requester_uid=1000)
    root = ks.add(0, requester_uid=0, allow_root=True)
    assert len(mine.secret) == 40 and mine.access_key_id.startswith("AKS3F") and len(mine.access_key_id) == 20
    assert [k["AccessKeyId"] for k in ks.list(1000)] == [mine.access_key_id]
    assert len(ks.list(0)) == 2
    with pytest.raises(Exception):
        ks.remove(root.access_key_id, requester_uid=1000)
    again = credentials.AccessKeys.load(path, ROOT, SID)
    assert again.secret_for(mine.access_key_id) == mine.secret and again.etag_key == ks.etag_key
    raw = open(path, "rb").read()
    assert mine.secret.encode() not in raw  # sealed, never in the clear
    ks.remove(mine.access_key_id, requester_uid=1000)
    assert credentials.AccessKeys.load(path, ROOT, SID).get(mine.access_key_id) is None


def test_etag_record_matches_documented_vector():
    rec = etag.seal(bytes(range(32)), SID, 2, 3, [OID], "900150983cd24fb0d6963f7d28e17f72", nonce=NONCE)
    assert rec == _documented_hex("S3 API ETag records")
    assert etag.unseal(bytes(range(32)), SID, 2, 3, [OID], rec) == "900150983cd24fb0d6963f7d28e17f72"
    # bound to the inode, size and objects: any change and it no longer opens
    assert etag.unseal(bytes(range(32)), SID, 3, 3, [OID], rec) is None
    assert etag.unseal(bytes(range(32)), SID, 2, 4, [OID], rec) is None
    assert etag.unseal(bytes(range(32)), SID, 2, 3, [os.urandom(16)], rec) is None
    assert etag.derived(bytes(range(32)), 2, 3, 1700000000000000000, [OID]) == "18866f938dcfbc4fc10162b720e9b7c2-1"


def test_config_s3api_section():
    from s3fuse import config

    cfg = config.parse('[s3api]\nlisten = "127.0.0.1:9000"\ntls_cert = "/etc/c.pem"\ntls_key = "/etc/k.pem"\n'
                       'idle_timeout = "2m"\nconnections_per_client = 4\n', "/etc/s3fuse/t.toml")
    assert cfg.s3api == {"listen": "127.0.0.1:9000", "tls_cert": "/etc/c.pem", "tls_key": "/etc/k.pem",
                         "idle_timeout": 120.0, "connections_per_client": 4}
    with pytest.raises(config.ConfigError, match="tls_key"):
        config.parse('[s3api]\nlisten = "x:1"\ntls_cert = "/etc/c.pem"\n', "/t.toml")
    settings = config.resolve({"store": "/s", "mountpoint": "/m", "s3_api": "0.0.0.0:1"}, cfg)
    assert settings.s3api["listen"] == "0.0.0.0:1" and settings.s3api["tls_cert"] == "/etc/c.pem"
    assert config.resolve({"store": "/s", "mountpoint": "/m"}, None).s3api is None
    no_listen = config.parse('[s3api]\nidle_timeout = 5\n', "/t.toml")
    with pytest.raises(config.ConfigError, match="s3api.listen"):
        config.resolve({"store": "/s", "mountpoint": "/m"}, no_listen)


def test_rekey_root_reseals_access_keys(tmp_path):
    from s3fuse.store import load_config, load_root_key

    from .conftest import run_cli

    store = tmp_path / "store"
    assert run_cli("init", store).returncode == 0
    cfg = load_config(str(store))
    old_key = load_root_key(cfg)
    ks = credentials.AccessKeys(cfg.sealed_path("s3keys"), old_key, cfg.store_id)
    key = ks.add(1000, requester_uid=0)
    r = run_cli("rekey-root", store, "--to", "file")
    assert r.returncode == 0, r.stderr
    cfg = load_config(str(store))
    assert cfg.key_generation == 2 and not (store / "s3keys.bin").exists()
    again = credentials.AccessKeys.load(cfg.sealed_path("s3keys"), load_root_key(cfg), cfg.store_id)
    assert again.secret_for(key.access_key_id) == key.secret and again.etag_key == ks.etag_key

"""The S3 backend against a real SeaweedFS: ranged reads, multipart, cache, snapshots,
the mount lease, clear errors, and mounting on a new machine from the bucket alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import (TRACEBACK, init_s3_store, new_s3_url, run_cli, s3_list_keys, s3_list_objects,
                       s3_set_backend_options, store_config, wait_until)

BACKENDS = ("s3",)


def test_write_read_remount(mount_factory, store_backend):
    m = mount_factory()
    data = os.urandom(3 << 20)
    (m.mnt / "a").write_bytes(data)
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "small").write_bytes(b"hello")
    m.remount()
    assert (m.mnt / "a").read_bytes() == data
    assert (m.mnt / "d" / "small").read_bytes() == b"hello"
    keys = s3_list_keys(m.store)
    assert "store.json" in keys
    assert any(k.startswith("snapshots/") for k in keys)
    assert len(s3_list_objects(m.store)) >= 2
    # nothing of the store lives in a local objects directory
    assert not (m.store / "objects").exists()

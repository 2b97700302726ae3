"""A store on disk: its configuration, root key, keyring and metadata, and its lock.

Layout of a store directory (docs/FORMAT.md, "Store directory")::

    store.json     configuration: store id, block and segment sizes, backend, root-key source
    root.key       the root key (32 random bytes, mode 0600) that seals the keyring
    keyring.bin    the SSE-S3 master keyring, sealed by the root key
    meta.db        SQLite metadata (WAL mode: meta.db-wal, meta.db-shm beside it)
    objects/       the local object store (when the backend is local)
    lock           held with flock(2) by the one daemon that has the store mounted
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from .backends import LocalBackend
from .errors import StoreError
from .keys.keyring import Keyring
from .meta import Meta
from .util import atomic_write

CONFIG_NAME = "store.json"
STORE_FORMAT = 1
DEFAULT_BLOCK_SIZE = 4 << 20
DEFAULT_SEGMENT_SIZE = 64 << 10


@dataclass
class StoreConfig:
    path: str
    store_id: bytes
    block_size: int
    segment_size: int
    default_sse: str
    backend: dict
    root_key_file: str
    kms: dict = field(default_factory=dict)  # external KMS settings (docs/TRANSIT.md); {} = built-in only

    @property
    def meta_path(self) -> str:
        return os.path.join(self.path, "meta.db")

    @property
    def keyring_path(self) -> str:
        return os.path.join(self.path, "keyring.bin")

    @property
    def kms_path(self) -> str:
        return os.path.join(self.path, "kms.bin")

    @property
    def audit_path(self) -> str:
        return os.path.join(self.path, "audit.log")


def init_store(path: str, block_size: int = DEFAULT_BLOCK_SIZE,
               segment_size: int = DEFAULT_SEGMENT_SIZE, kms: dict | None = None) -> StoreConfig:
    """Create a new store at `path` (absent or an empty directory)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise StoreError(f"{path} exists and is not a directory", errno.ENOTDIR)
        if os.listdir(path):
            raise StoreError(f"{path} is not empty; a store is created in a new or empty directory",
                             errno.ENOTEMPTY)
    if block_size % segment_size or not (4096 <= segment_size <= block_size <= 64 << 20):
        raise StoreError("block size must be a multiple of the segment size (4 KiB .. 64 MiB)")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    store_id = uuid.uuid4().bytes
    root_key = os.urandom(32)
    atomic_write(os.path.join(path, "root.key"), root_key, mode=0o600)
    config = {
        "format": STORE_FORMAT,
        "store_id": store_id.hex(),
        "block_size": block_size,
        "segment_size": segment_size,
        "default_sse": "AES256",
        "backend": {"type": "local"},
        "root_key": {"source": "file", "path": "root.key"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if kms:
        config["kms"] = kms
    cfg = _parse_config(path, config)
    Keyring.new().save(cfg.keyring_path, root_key, store_id)
    LocalBackend.create(os.path.join(path, "objects"))
    meta = Meta.create(cfg.meta_path, os.getuid(), os.getgid(), time.time_ns())
    meta.close()
    # the config is written last: its presence marks a complete store
    atomic_write(os.path.join(path, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode(), mode=0o600)
    return cfg


def _parse_config(path: str, raw: dict) -> StoreConfig:
    try:
        if raw["format"] != STORE_FORMAT:
            raise StoreError(f"{path}: store format {raw['format']} is not supported")
        key_path = raw["root_key"]["path"]
        return StoreConfig(
            path=path,
            store_id=bytes.fromhex(raw["store_id"]),
            block_size=int(raw["block_size"]),
            segment_size=int(raw["segment_size"]),
            default_sse=raw.get("default_sse", "AES256"),
            backend=raw["backend"],
            root_key_file=key_path if os.path.isabs(key_path) else os.path.join(path, key_path),
            kms=dict(raw.get("kms") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}/{CONFIG_NAME} is malformed ({exc})") from None


def load_config(path: str) -> StoreConfig:
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise StoreError(f"store {path} does not exist (create it with: s3fuse init {path})", errno.ENOENT)
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise StoreError(f"{path} is not an initialised s3fuse store (no {CONFIG_NAME}; "
                         f"run: s3fuse init {path})", errno.EINVAL)
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {cfg_path}: {exc}") from None
    return _parse_config(path, raw)


def load_root_key(cfg: StoreConfig) -> bytes:
    try:
        with open(cfg.root_key_file, "rb") as f:
            key = f.read()
    except OSError as exc:
        raise StoreError(f"cannot read the root key {cfg.root_key_file}: {exc.strerror}", errno.EACCES) from None
    if len(key) != 32:
        raise StoreError(f"root key {cfg.root_key_file} must be exactly 32 bytes")
    return key


def load_keyring(cfg: StoreConfig, root_key: bytes) -> Keyring:
    try:
        with open(cfg.keyring_path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise StoreError(f"cannot read the keyring {cfg.keyring_path}: {exc.strerror}") from None
    return Keyring.unseal(blob, root_key, cfg.store_id)


class StoreLock:
    """An exclusive flock on STORE/lock: one daemon per store. Released when the process ends."""

    def __init__(self, cfg: StoreConfig) -> None:
        self.path = os.path.join(cfg.path, "lock")
        self.fd = -1

    def acquire(self, mountpoint: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise StoreError(f"store {os.path.dirname(self.path)} is already mounted ({holder})",
                             errno.EBUSY) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {mountpoint}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1

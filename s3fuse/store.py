"""A store on disk: its configuration, root key, keyring and metadata, and its lock.

Layout of a store directory (docs/FORMAT.md, "Store directory")::

    store.json     configuration: store id, block and segment sizes, backend, root-key source,
                   key generation, rotation settings
    root.key       the root key (32 random bytes, mode 0600) when its source is a key file
    keyring.bin    the SSE-S3 master keyring, sealed by the root key (keyring.G.bin after
                   `rekey-root` moved the store to key generation G > 1)
    kms.bin        the built-in KMS keystore, sealed by the root key (kms.G.bin likewise)
    meta.db        SQLite metadata (WAL mode: meta.db-wal, meta.db-shm beside it)
    objects/       the local object store (when the backend is local)
    lock           held with flock(2) by the one daemon that has the store mounted
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field

from . import defaults, rootkey
from . import metaauth as ma
from .backends import LocalBackend
from .errors import StoreError
from .keys.keyring import Keyring
from .meta import SCHEMA_VERSION, Meta
from .util import atomic_write, fsync_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "store.json"
# 2: authenticated metadata (docs/FORMAT.md); an s3fuse that knows only 1 refuses the store,
# so it never writes unsigned rows into it
STORE_FORMAT = 2
_FORMATS = (1, 2)  # 1 is upgraded at the first mount
DEFAULT_BLOCK_SIZE = defaults.BLOCK_SIZE
DEFAULT_SEGMENT_SIZE = defaults.SEGMENT_SIZE
DAY = defaults.DAY
DEFAULT_ROTATION_INTERVAL = defaults.ROTATION_INTERVAL
DEFAULT_REWRAP_BATCH = defaults.REWRAP_BATCH
DEFAULT_REWRAP_RATE = defaults.REWRAP_RATE


@dataclass
class StoreConfig:
    path: str
    store_id: bytes
    block_size: int
    segment_size: int
    default_sse: str
    backend: dict
    root_key_file: str | None  # the key file when the root key's source is "file"
    kms: dict = field(default_factory=dict)  # external KMS settings (docs/TRANSIT.md); {} = built-in only
    root_key: dict = field(default_factory=lambda: {"source": "file", "path": "root.key"})
    key_generation: int = 1  # names the sealed keyring and keystore files (rekey-root)
    rotation_interval: float = DEFAULT_ROTATION_INTERVAL  # seconds; 0 = no scheduled rotation
    rewrap_batch: int = DEFAULT_REWRAP_BATCH
    rewrap_rate: float = DEFAULT_REWRAP_RATE
    raw: dict = field(default_factory=dict, repr=False)  # store.json as read

    @property
    def meta_path(self) -> str:
        return os.path.join(self.path, "meta.db")

    def sealed_path(self, name: str, generation: int | None = None) -> str:
        """keyring.bin / kms.bin at generation 1, keyring.G.bin / kms.G.bin after."""
        g = self.key_generation if generation is None else generation
        return os.path.join(self.path, f"{name}.bin" if g == 1 else f"{name}.{g}.bin")

    @property
    def keyring_path(self) -> str:
        return self.sealed_path("keyring")

    @property
    def kms_path(self) -> str:
        return self.sealed_path("kms")

    @property
    def audit_path(self) -> str:
        return os.path.join(self.path, "audit.log")


def init_store(path: str, block_size: int = DEFAULT_BLOCK_SIZE,
               segment_size: int = DEFAULT_SEGMENT_SIZE, kms: dict | None = None,
               root_key_source: str = "file", *, key_file: str | None = None,
               passphrase_file: str | None = None,
               scrypt_log_n: int = rootkey.SCRYPT_LOG_N, backend: dict | None = None) -> StoreConfig:
    """Create a new store at `path` (absent or an empty directory).

    `kms`: external KMS settings (docs/TRANSIT.md). `root_key_source` is `file`
    (default: a new random STORE/root.key, or `key_file`, used if it exists and created
    if not), `passphrase` (from `passphrase_file` or a prompt) or `credential:NAME` (the
    key from $CREDENTIALS_DIRECTORY/NAME, or from `key_file` when not running under
    systemd). `backend`: for a backend other than the local one, `path` is the store's
    local state directory (docs/S3.md).
    """
    path = os.path.abspath(path)
    source, cred_name = rootkey.parse_spec(root_key_source)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise StoreError(f"{path} exists and is not a directory", errno.ENOTDIR)
        if os.listdir(path):
            raise StoreError(f"{path} is not empty; a store is created in a new or empty directory",
                             errno.ENOTEMPTY)
    if block_size % segment_size or not (4096 <= segment_size <= block_size <= 64 << 20):
        raise StoreError("block size must be a multiple of the segment size (4 KiB .. 64 MiB)")
    if source == "passphrase":  # ask before creating anything
        passphrase = rootkey.read_passphrase(passphrase_file, confirm=True, prompt="New passphrase: ")
    elif source == "credential" and rootkey.credential_path(cred_name) is None and key_file is None:
        raise StoreError(f"init with the systemd credential {cred_name!r} needs its key: run it where "
                         f"${rootkey.CREDENTIALS_ENV} holds {cred_name}, or give --root-key-file with "
                         "the same 32 bytes", errno.ENOKEY)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    store_id = uuid.uuid4().bytes
    if source == "file":
        root_key, desc = _new_key_file(path, key_file or "root.key")
    elif source == "passphrase":
        desc = rootkey.new_passphrase_params(scrypt_log_n)
        root_key = rootkey.derive_from_passphrase(passphrase, desc)
    else:
        root_key = rootkey.read_key_file(key_file) if key_file else rootkey.read_credential(cred_name)
        desc = {"source": "credential", "name": cred_name}
    config = {
        "format": STORE_FORMAT,
        "store_id": store_id.hex(),
        "block_size": block_size,
        "segment_size": segment_size,
        "default_sse": "AES256",
        "backend": backend or {"type": "local"},
        "root_key": desc,
        "key_generation": 1,
        "rotation_interval": DEFAULT_ROTATION_INTERVAL,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if kms:
        config["kms"] = kms
    cfg = _parse_config(path, config)
    keyring = Keyring.new()
    config[ma.CONFIG_MAC] = ma.config_mac(keyring.meta_key, config)
    keyring.save(cfg.keyring_path, root_key, store_id)
    if cfg.backend.get("type", "local") == "local":
        LocalBackend.create(os.path.join(path, "objects"))
    meta = Meta.create(cfg.meta_path, os.getuid(), os.getgid(), time.time_ns(), key=keyring.meta_key)
    meta.close()
    # the config is written last: its presence marks a complete store
    atomic_write(os.path.join(path, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode(), mode=0o600)
    return cfg


def _new_key_file(store: str, key_path: str) -> tuple[bytes, dict]:
    """A key file for the root key: used if it exists, else created with a random key."""
    full = key_path if os.path.isabs(key_path) else os.path.join(store, key_path)
    if os.path.exists(full):
        key = rootkey.read_key_file(full)
    else:
        key = os.urandom(rootkey.KEY_LEN)
        atomic_write(full, key, mode=0o600)
    return key, {"source": "file", "path": key_path}


def _parse_config(path: str, raw: dict) -> StoreConfig:
    try:
        if raw["format"] not in _FORMATS:
            raise StoreError(f"{path}: store format {raw['format']} is not supported")
        desc = raw["root_key"]
        if desc.get("source", "file") not in rootkey.SOURCES:
            raise ValueError(f"unknown root key source {desc.get('source')!r}")
        key_file = None
        if desc.get("source", "file") == "file":
            key_path = desc["path"]
            key_file = key_path if os.path.isabs(key_path) else os.path.join(path, key_path)
        generation = int(raw.get("key_generation", 1))
        if generation < 1:
            raise ValueError("key_generation must be >= 1")
        return StoreConfig(
            path=path,
            store_id=bytes.fromhex(raw["store_id"]),
            block_size=int(raw["block_size"]),
            segment_size=int(raw["segment_size"]),
            default_sse=raw.get("default_sse", "AES256"),
            backend=raw["backend"],
            root_key_file=key_file,
            kms=dict(raw.get("kms") or {}),
            root_key=desc,
            key_generation=generation,
            rotation_interval=float(raw.get("rotation_interval", DEFAULT_ROTATION_INTERVAL)),
            rewrap_batch=max(1, int(raw.get("rewrap_batch", DEFAULT_REWRAP_BATCH))),
            rewrap_rate=max(0.0, float(raw.get("rewrap_rate", DEFAULT_REWRAP_RATE))),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
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


def write_config(cfg: StoreConfig, raw: dict) -> None:
    """Replace store.json atomically (the commit point of `rekey_root`)."""
    atomic_write(os.path.join(cfg.path, CONFIG_NAME), (json.dumps(raw, indent=2) + "\n").encode(), mode=0o600)


def check_config_mac(cfg: StoreConfig, keyring: Keyring) -> bool:
    """Whether store.json's key settings (metaauth.CONFIG_FIELDS) authenticate. A keyring
    without a metadata key (a store from before format 2) has nothing to check them with."""
    return keyring.meta_key is None or ma.check_config(keyring.meta_key, cfg.raw)


def seal_settings(cfg: StoreConfig, keyring: Keyring) -> None:
    """MAC store.json's key settings as they are (`s3fuse seal-settings`, with the root key)."""
    if keyring.meta_key is None:
        raise StoreError(f"store {cfg.path} has no metadata key yet: mount it once first", errno.EINVAL)
    raw = {**cfg.raw, ma.CONFIG_MAC: ma.config_mac(keyring.meta_key, cfg.raw)}
    write_config(cfg, raw)
    cfg.raw = raw


def open_meta(cfg: StoreConfig, meta: Meta, keyring: Keyring, root_key: bytes) -> Keyring:
    """Make `meta` (opened without a key) sign and check rows under the keyring's metadata
    key -> the keyring, with that key.

    Call with the store locked, after the keyring passed its checks. A store made before
    authenticated metadata (a keyring without a metadata key) is upgraded first: every row
    is signed under a new key, store.json gets its MAC, then the keyring with the key is
    saved, which is the commit (a crash before it upgrades again at the next mount; the
    keyring, sealed by the root key, decides, so editing store.json cannot ask for a
    second upgrade). Last, store.json's format becomes 2."""
    if keyring.meta_key is None:
        if cfg.raw.get("format") == STORE_FORMAT:
            raise StoreError(f"the keyring {cfg.keyring_path} holds no metadata key, but the store's "
                             "metadata is authenticated: it is a copy from before the upgrade; put "
                             "back the newest keyring", errno.EKEYEXPIRED)
        key = os.urandom(ma.KEY_LEN)
        count = meta.authenticate_all(key)
        raw = {**cfg.raw, ma.CONFIG_MAC: ma.config_mac(key, cfg.raw)}
        write_config(cfg, raw)
        cfg.raw = raw
        keyring = keyring.with_meta_key(key)
        keyring.save(cfg.keyring_path, root_key, cfg.store_id)
        log.warning("store %s was made before authenticated metadata: its %d inodes and their rows "
                    "are authenticated from now on (store format %d)", cfg.path, count, STORE_FORMAT)
    else:
        if not ma.check_config(keyring.meta_key, cfg.raw):
            raise StoreError(f"{cfg.path}/{CONFIG_NAME}: its key settings ({', '.join(ma.CONFIG_FIELDS)}) "
                             "do not authenticate: it was edited outside s3fuse; put back the "
                             "settings it had", errno.EIO)
        version = meta.get_state("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{cfg.meta_path}: schema version {version!r}, expected {SCHEMA_VERSION}",
                             errno.EIO)
        meta.use_key(keyring.meta_key)
    if cfg.raw.get("format") != STORE_FORMAT:
        raw = {**cfg.raw, "format": STORE_FORMAT}
        write_config(cfg, raw)
        cfg.raw = raw
    return keyring


def read_root_key(cfg: StoreConfig, *, key_file: str | None = None,
                  passphrase_file: str | None = None) -> bytes:
    """The root key from its recorded source (or `key_file`), not yet checked."""
    source = cfg.root_key.get("source", "file")
    if passphrase_file is not None and source != "passphrase" and key_file is None:
        raise StoreError(f"store {cfg.path} is not sealed by a passphrase "
                         f"(its root key is the {rootkey.describe(cfg.root_key)})", errno.EINVAL)
    if key_file is not None:
        return rootkey.read_key_file(key_file)
    if source == "file":
        return rootkey.read_key_file(cfg.root_key_file)
    if source == "passphrase":
        passphrase = rootkey.read_passphrase(passphrase_file, prompt=f"Passphrase for {cfg.path}: ")
        return rootkey.derive_from_passphrase(passphrase, cfg.root_key)
    return rootkey.read_credential(cfg.root_key["name"])


def obtain_root_key(cfg: StoreConfig, *, key_file: str | None = None,
                    passphrase_file: str | None = None) -> bytes:
    """The store's root key from its source, checked against the sealed keyring.

    `key_file` overrides the recorded source (any store); `passphrase_file` supplies
    the passphrase of a passphrase store (else a terminal prompt). A key that does not
    open the keyring is refused with one clear line (EACCES), before anything changes.
    """
    key = read_root_key(cfg, key_file=key_file, passphrase_file=passphrase_file)
    if cfg.backend.get("type") == "s3" and not os.path.exists(cfg.keyring_path):
        # an S3 store on a new machine: the keyring comes with the newest metadata snapshot,
        # which only this key opens (checked when the daemon restores it, docs/S3.md)
        return key
    try:
        load_keyring(cfg, key)
    except StoreError as exc:
        if not str(exc).startswith("wrong root key"):
            raise
        if key_file is not None:
            what = f"wrong root key in {key_file}"
        elif cfg.root_key.get("source") == "passphrase":
            what = "wrong passphrase"
        else:
            what = f"wrong root key (from the {rootkey.describe(cfg.root_key)})"
        raise StoreError(f"{what}: it does not open the keyring of store {cfg.path}", errno.EACCES) from None
    return key


def load_root_key(cfg: StoreConfig) -> bytes:
    """Kept for callers written before root-key sources: same as obtain_root_key(cfg)."""
    return obtain_root_key(cfg)


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


# ---------------------------------------------------------------- rekey-root

_GEN_FILE = re.compile(r"(keyring|kms|s3keys)\.(\d+)\.bin|root-(\d+)\.key")


def remove_stale_key_files(cfg: StoreConfig) -> list[str]:
    """Sealed files and generated key files of other key generations (left by a
    `rekey-root` that crashed before or after its commit). Call with the store locked."""
    removed = []
    for name in os.listdir(cfg.path):
        m = _GEN_FILE.fullmatch(name)
        if name in ("keyring.bin", "kms.bin", "s3keys.bin"):
            gen = 1
        elif m is not None:
            gen = int(m.group(2) or m.group(3))
        else:
            continue
        full = os.path.join(cfg.path, name)
        if gen == cfg.key_generation or full == cfg.root_key_file:
            continue
        os.unlink(full)
        removed.append(name)
    if removed:
        fsync_dir(cfg.path)
    return removed


@dataclass
class RekeyResult:
    generation: int
    source: str
    key_file: str | None
    removed: list[str]


def rekey_root(cfg: StoreConfig, old_key: bytes, new_spec: str, *, new_key_file: str | None = None,
               new_passphrase_file: str | None = None,
               scrypt_log_n: int = rootkey.SCRYPT_LOG_N) -> RekeyResult:
    """Seal the keyring and the KMS keystore under a new root key, atomically.

    The caller holds the store lock and has checked `old_key` (obtain_root_key).
    Generation G+1's sealed files are written beside generation G's under new names;
    then store.json, naming the new source and generation, replaces the old one in one
    rename: that is the commit. A crash before it leaves generation G (old key) intact,
    after it generation G+1 (new key) complete; the other generation's files are
    removed afterwards (or at the next mount). docs/ROTATION.md has the argument.
    """
    from .keys.kms import BuiltinKms

    source, cred_name = rootkey.parse_spec(new_spec)
    gen = cfg.key_generation + 1
    keyring = load_keyring(cfg, old_key)
    kms = BuiltinKms.load(cfg.kms_path, old_key, cfg.store_id) if os.path.exists(cfg.kms_path) else None
    if source == "file":
        target = new_key_file or f"root-{gen}.key"
        full = target if os.path.isabs(target) else os.path.join(cfg.path, target)
        if cfg.root_key_file is not None and os.path.realpath(full) == os.path.realpath(cfg.root_key_file):
            raise StoreError("the new key file must not be the current one: give another --new-key-file",
                             errno.EINVAL)
        new_key, desc = _new_key_file(cfg.path, target)
        new_file = full
    elif source == "passphrase":
        passphrase = rootkey.read_passphrase(new_passphrase_file, confirm=True, prompt="New passphrase: ")
        desc = rootkey.new_passphrase_params(scrypt_log_n)
        new_key, new_file = rootkey.derive_from_passphrase(passphrase, desc), None
    else:
        if new_key_file is None and rootkey.credential_path(cred_name) is None:
            raise StoreError(f"the new root key is the systemd credential {cred_name!r}: run where "
                             f"${rootkey.CREDENTIALS_ENV} holds it, or give --new-key-file with the same "
                             "32 bytes", errno.ENOKEY)
        new_key = rootkey.read_key_file(new_key_file) if new_key_file else rootkey.read_credential(cred_name)
        desc, new_file = {"source": "credential", "name": cred_name}, None
    if hmac.compare_digest(new_key, old_key):
        raise StoreError("the new root key is the same as the current one", errno.EINVAL)
    # 1. the new generation's sealed files, durable, under names nothing reads yet
    keyring.save(cfg.sealed_path("keyring", gen), new_key, cfg.store_id)
    if kms is not None:
        kms.reseal(cfg.sealed_path("kms", gen), new_key)
    if os.path.exists(cfg.sealed_path("s3keys")):
        from .s3api.credentials import AccessKeys

        AccessKeys.load(cfg.sealed_path("s3keys"), old_key, cfg.store_id).reseal(
            cfg.sealed_path("s3keys", gen), new_key)
    # 2. the commit: one atomic rename of store.json
    raw = dict(cfg.raw)
    raw["root_key"] = desc
    raw["key_generation"] = gen
    old_key_file = cfg.root_key_file
    write_config(cfg, raw)
    new_cfg = _parse_config(cfg.path, raw)
    # 3. the old generation is garbage now; a key file s3fuse made inside the store goes too
    removed = remove_stale_key_files(new_cfg)
    if (old_key_file is not None and os.path.dirname(os.path.abspath(old_key_file)) == cfg.path
            and os.path.exists(old_key_file) and old_key_file != new_cfg.root_key_file):
        os.unlink(old_key_file)
        fsync_dir(cfg.path)
        removed.append(os.path.basename(old_key_file))
    return RekeyResult(gen, source, new_file, removed)

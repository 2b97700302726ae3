"""A store whose objects live in an S3 bucket (docs/S3.md).

Locally, a state directory holds what a local store holds except the objects
(store.json, meta.db, keyring.bin, kms.bin, audit.log, lock) plus cache/ (ciphertext
of recently used objects) and snapshot.seq. In the bucket, under PREFIX/:

    store.json            the store's configuration (nothing secret), written once by init
    objects/<id>          the encrypted objects
    snapshots/<seq>       encrypted, authenticated snapshots of the local state (snapshot.py)
    lock                  the mount lease (lease.py)

So a new machine mounts from the bucket and the root key alone: it fetches store.json,
takes the lease, restores the newest snapshot, and carries on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sqlite3

import trio

from . import snapshot
from .backends.s3 import S3Backend, S3Client, S3Location, describe_probe_error, parse_s3_url
from .errors import S3fuseError, StoreError
from .format import OBJECT_ID_LEN
from .lease import DEFAULT_LEASE_SECONDS, BucketLease
from .s3journal import Journal, bucket_head
from .store import CONFIG_NAME, StoreConfig, init_store
from .util import atomic_write

log = logging.getLogger(__name__)

STATE_ROOT = "/var/lib/s3fuse"
SEQ_FILE = "snapshot.seq"
SNAPSHOT_FILES = ("meta.db", "keyring.bin", "kms.bin", "s3keys.bin", "audit.log")  # sealed: .G.bin after rekey-root
_SNAPSHOT_NAME = re.compile(r"meta\.db|audit\.log|(keyring|kms|s3keys)(\.\d+)?\.bin")
KEEP_SNAPSHOTS = 3


def journal_name(name: str) -> bool:
    """A file a journal record may carry: what a snapshot may, but the database (its
    changes come as WAL frames)."""
    return name != "meta.db" and _SNAPSHOT_NAME.fullmatch(name) is not None
DEFAULT_SNAPSHOT_INTERVAL = 60.0
DEFAULT_METADATA_SYNC = 5.0
SWEEP_SLACK = 60.0  # seconds added to the retry budget in the collector's age rule (docs/S3.md)
IMMEDIATE_POLL = 0.01  # metadata_sync_seconds = 0: how often the daemon looks for a new commit
PROBE_RETRY_BUDGET = 5.0


def is_s3_url(store: str) -> bool:
    return str(store).startswith("s3://")


def default_state_dir(loc: S3Location) -> str:
    base = STATE_ROOT if os.getuid() == 0 else os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "s3fuse")
    digest = hashlib.sha256(loc.url.encode()).hexdigest()[:12]
    return os.path.join(base, f"{loc.bucket}-{digest}")


def _probe(s3: S3Client) -> None:
    try:
        s3.probe()
    except S3fuseError as exc:
        raise StoreError(f"cannot reach {s3.loc.url}: {exc}", errno.EIO) from None
    except Exception as exc:  # noqa: BLE001 - botocore's errors, worded for a person
        import botocore.exceptions as bex

        if not isinstance(exc, (bex.BotoCoreError, bex.ClientError)):
            raise
        raise StoreError(describe_probe_error(s3.loc, exc), errno.EIO) from None


def _snapshot_key(loc: S3Location, seq: int) -> str:
    return loc.key(f"snapshots/{seq:020d}")


def list_snapshots(s3: S3Client) -> list[int]:
    prefix = s3.loc.key("snapshots/")
    out = []
    for key, _ in s3.list_all(prefix):
        tail = key[len(prefix):]
        if tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def read_seq(state_dir: str) -> int:
    try:
        with open(os.path.join(state_dir, SEQ_FILE)) as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0


def _write_seq(state_dir: str, seq: int) -> None:
    atomic_write(os.path.join(state_dir, SEQ_FILE), f"{seq}\n".encode(), mode=0o600)


# -- init and finding the state directory --------------------------------------------

def init_s3_store(url: str, *, state_dir: str | None, endpoint_url: str | None, region: str | None,
                  profile: str | None, block_size: int, segment_size: int, kms: dict | None = None,
                  root_key_source: str = "file", key_file: str | None = None,
                  passphrase_file: str | None = None, **root_key_options) -> StoreConfig:
    """Create an S3 store: the local state directory (as `init_store`, with the same root-key
    sources and KMS settings), the public store.json in the bucket, and snapshot 0."""
    from .store import obtain_root_key

    bucket, prefix = parse_s3_url(url)
    loc = S3Location(bucket, prefix, endpoint_url, region, profile)
    s3 = S3Client(loc, retry_budget=PROBE_RETRY_BUDGET)
    _probe(s3)
    if s3.head(loc.key(CONFIG_NAME)) is not None:
        raise StoreError(f"{loc.url} already holds an s3fuse store (mount it, or choose another prefix)",
                         errno.EEXIST)
    cfg = init_store(os.path.abspath(state_dir or default_state_dir(loc)), block_size, segment_size,
                     kms=kms, root_key_source=root_key_source, key_file=key_file,
                     passphrase_file=passphrase_file, backend=loc.to_config(), **root_key_options)
    with open(os.path.join(cfg.path, CONFIG_NAME), "rb") as f:
        public = f.read()
    import botocore.exceptions as bex

    try:
        s3.put(loc.key(CONFIG_NAME), public, IfNoneMatch="*", ContentType="application/json")
    except bex.ClientError as exc:
        raise StoreError(f"{loc.url} already holds an s3fuse store (created meanwhile)", errno.EEXIST) from exc
    root_key = obtain_root_key(cfg, key_file=key_file, passphrase_file=passphrase_file)
    # snapshot 1, where the journal starts
    Journal(cfg, s3, root_key, Snapshotter(cfg, s3, root_key, 0), journal_name).compact()
    return cfg


def resolve_store(store: str, *, state_dir: str | None = None, endpoint_url: str | None = None,
                  region: str | None = None, profile: str | None = None,
                  root_key_file: str | None = None) -> str:
    """The local store directory to open for `store` (a path, or s3://BUCKET/PREFIX).

    For an S3 address whose state directory does not exist yet (a new machine), fetch
    the store's configuration from the bucket and create the state directory; the root
    key never comes from the bucket, so it must be named (--root-key-file)."""
    if not is_s3_url(store):
        return store
    bucket, prefix = parse_s3_url(store)
    loc = S3Location(bucket, prefix, endpoint_url, region, profile)
    path = os.path.abspath(state_dir or default_state_dir(loc))
    cfg_path = os.path.join(path, CONFIG_NAME)
    overrides = {k: v for k, v in (("endpoint_url", endpoint_url), ("region", region), ("profile", profile))
                 if v is not None}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            raw = json.load(f)
        b = raw.get("backend", {})
        if b.get("type") != "s3" or b.get("bucket") != bucket or b.get("prefix", "") != prefix:
            raise StoreError(f"state directory {path} belongs to another store, not {loc.url}")
        changed = any(b.get(k) != v for k, v in overrides.items())
        b.update(overrides)
        if root_key_file:
            rk = {"source": "file", "path": os.path.abspath(root_key_file)}
            changed |= raw.get("root_key") != rk
            raw["root_key"] = rk
        if changed:
            atomic_write(cfg_path, (json.dumps(raw, indent=2) + "\n").encode(), mode=0o600)
        return path
    s3 = S3Client(loc, retry_budget=PROBE_RETRY_BUDGET)
    _probe(s3)
    from .backends.base import NoSuchObject

    try:
        body, _ = s3.get(loc.key(CONFIG_NAME))
    except NoSuchObject:
        raise StoreError(f"{loc.url} holds no s3fuse store (create one with: s3fuse init {loc.url})",
                         errno.ENOENT) from None
    raw = json.loads(body)
    raw["backend"] = {**raw.get("backend", {}), **loc.to_config()}
    for k in ("endpoint_url", "region", "profile"):
        if k not in overrides:
            raw["backend"][k] = None
    if root_key_file:
        raw["root_key"] = {"source": "file", "path": os.path.abspath(root_key_file)}
    elif raw.get("root_key", {}).get("source", "file") == "file":
        raise StoreError(f"no local state for {loc.url} in {path}: name the store's root key with "
                         "--root-key-file (it is never stored in the bucket)", errno.ENOKEY)
    os.makedirs(path, mode=0o700, exist_ok=True)
    atomic_write(cfg_path, (json.dumps(raw, indent=2) + "\n").encode(), mode=0o600)
    log.info("created state directory %s for %s", path, loc.url)
    return path


def url_of_state_dir(path: str) -> str:
    """s3://BUCKET/PREFIX of the S3 store whose state directory is `path`."""
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            b = json.load(f).get("backend", {})
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not an s3fuse store ({exc})") from None
    if b.get("type") != "s3":
        raise StoreError(f"{path} is not an S3 store: --endpoint-url, --region, --profile, --state-dir "
                         "and --root-key-file apply to S3 stores")
    return S3Location.from_config(b).url


# -- snapshots ------------------------------------------------------------------------

class Snapshotter:
    """Takes sequence-numbered snapshots of the state directory into the bucket."""

    def __init__(self, cfg: StoreConfig, s3: S3Client, root_key: bytes, seq: int) -> None:
        self.cfg, self.s3, self.seq = cfg, s3, seq
        self.key = snapshot.snapshot_key(root_key, cfg.store_id)
        self.last_header = b""

    def _tmp(self, name: str) -> str:
        return os.path.join(self.cfg.path, f".snapshot-{name}")

    def take(self) -> int:
        """Upload snapshot seq+1 (blocking; run in a worker thread). Returns its number."""
        seq = self.seq + 1
        db, plain, sealed = self._tmp("meta.db"), self._tmp("plain"), self._tmp("sealed")
        try:
            # a consistent copy through a connection of our own (SQLite's online backup)
            src = sqlite3.connect(self.cfg.meta_path)
            dst = sqlite3.connect(db)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            files = [("meta.db", db)]
            # the sealed files of the current root-key generation (keyring.bin or keyring.G.bin, ...)
            for p in (self.cfg.keyring_path, self.cfg.kms_path, self.cfg.sealed_path("s3keys"),
                      os.path.join(self.cfg.path, "audit.log")):
                if os.path.exists(p):
                    files.append((os.path.basename(p), p))
            snapshot.pack(files, plain)
            os.unlink(db)
            snapshot.encrypt(plain, sealed, self.key, self.cfg.store_id, seq)
            os.unlink(plain)
            with open(sealed, "rb") as f:
                header = f.read(snapshot.HEADER.size)
            # never overwrite a snapshot: if another daemon took the same number, fail
            self.s3.put_file(_snapshot_key(self.s3.loc, seq), sealed, if_absent=True)
            self.last_header = header  # what the journal's first record after it links to
        finally:
            for p in (db, plain, sealed):
                if os.path.exists(p):
                    os.unlink(p)
        _write_seq(self.cfg.path, seq)
        self.seq = seq
        for old in list_snapshots(self.s3)[:-KEEP_SNAPSHOTS]:
            self.s3.delete(_snapshot_key(self.s3.loc, old))
        return seq

    def restore_into(self, seq: int, dest: str) -> tuple[list[str], bytes]:
        """Fetch, authenticate and unpack snapshot `seq` into the directory `dest` (blocking).
        Returns the names of its files and its header (which the journal links to)."""
        sealed, plain = self._tmp("download"), self._tmp("plain")
        key = _snapshot_key(self.s3.loc, seq)
        try:
            with open(os.open(sealed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                off, step = 0, 8 << 20
                while True:
                    body, total = self.s3.get(key, off, off + step)
                    out.write(body)
                    off += len(body)
                    if off >= total or not body:
                        break
            snapshot.decrypt(sealed, plain, self.key, self.cfg.store_id, seq)
            with open(sealed, "rb") as f:
                header = f.read(snapshot.HEADER.size)
            return snapshot.unpack(plain, dest, _SNAPSHOT_NAME), header
        finally:
            for p in (sealed, plain):
                if os.path.exists(p):
                    os.unlink(p)

    def adopt(self, names: list[str], seq: int) -> None:
        """The state directory now holds snapshot `seq` (and records after it)."""
        self._adopt_generation(names)
        _write_seq(self.cfg.path, seq)
        self.seq = seq

    def _adopt_generation(self, names: list[str]) -> None:
        """A snapshot taken after `rekey-root` holds keyring.G.bin: record generation G in the
        local store.json (and the loaded config) so that the right sealed files are opened."""
        gen = 1
        for name in names:
            m = re.fullmatch(r"keyring\.(\d+)\.bin", name)
            if m:
                gen = int(m.group(1))
        if gen == getattr(self.cfg, "key_generation", 1):
            return
        path = os.path.join(self.cfg.path, CONFIG_NAME)
        with open(path) as f:
            raw = json.load(f)
        raw["key_generation"] = gen
        atomic_write(path, (json.dumps(raw, indent=2) + "\n").encode(), mode=0o600)
        self.cfg.key_generation = gen


class S3Mount:
    """The S3 side of a mount: probe, lease, state from the bucket (snapshot + journal), the
    journal's shipping, snapshots as its compaction, deferred deletes."""

    def __init__(self, cfg: StoreConfig, mountpoint: str, backend: S3Backend, settings: dict | None = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.s3 = backend.s3
        b = settings if settings is not None else cfg.backend  # store.json's backend + mount overrides
        self.interval = float(b.get("snapshot_interval", DEFAULT_SNAPSHOT_INTERVAL))
        self.sync_seconds = float(b.get("metadata_sync_seconds", DEFAULT_METADATA_SYNC))
        self.lease = BucketLease(self.s3, mountpoint, float(b.get("lease_seconds", DEFAULT_LEASE_SECONDS)))
        self.snapshots: Snapshotter | None = None
        self.journal: Journal | None = None
        self.meta = None  # the daemon's Meta, once open (attach)
        self._changes = -1
        self._lock = trio.Lock()  # one shipment or snapshot at a time
        self._started = 0  # shipments begun, and the newest that succeeded (see sync_metadata)
        self._succeeded = 0
        self.shipped_changes = 0  # the metadata's change count when the newest shipment began
        self.restored = False  # this mount's metadata came from the bucket, not this machine's
        self.head_written = 0.0  # the server's time of the bucket's head at mount
        self.sweep_margin = max(float(b.get("retry_budget", 60.0)), 0.0) + SWEEP_SLACK

    def open(self, root_key: bytes) -> None:
        """Before the metadata is opened: take the lease and bring the local state up to the
        bucket's head (newest snapshot + its journal), or ship what this machine holds that
        the bucket lacks; refuse rollback, gaps, tampering and divergence. Blocking."""
        _probe(self.s3)
        self.lease.acquire()
        try:
            self._open(root_key)
            self.backend.defer_deletes = True
        except BaseException:
            self.lease.release()
            raise

    def _open(self, root_key: bytes) -> None:
        url = self.s3.loc.url
        snaps = list_snapshots(self.s3)
        newest = snaps[-1] if snaps else 0
        if newest == 0:
            raise StoreError(f"{url} holds no metadata snapshot", errno.EIO)
        head = bucket_head(self.s3, newest)
        self._note_head_time(head)
        self.snapshots = Snapshotter(self.cfg, self.s3, root_key, read_seq(self.cfg.path))
        self.journal = Journal(self.cfg, self.s3, root_key, self.snapshots, journal_name)
        st = self.journal.state
        local = st.head if st is not None else (read_seq(self.cfg.path), 0)
        have_db = os.path.exists(self.cfg.meta_path)
        if head < local:
            raise StoreError(
                f"the newest metadata in {url} is snapshot {head[0]} record {head[1]}, but this machine has "
                f"already seen snapshot {local[0]} record {local[1]}: refusing an older state "
                "(rolled back or deleted?)", errno.EIO)
        if not have_db:
            self._restore(head)
            return
        if head == local:
            # this machine's state continues the bucket's head: ship what it holds beyond it
            why = self.journal.local_changes() if st is not None else "a state directory from before the journal"
            if why:
                log.info("shipping what this machine holds beyond the bucket's head (%s)", why)
                self.journal.ship()
            return
        why = self.journal.local_changes() if st is not None else None
        if why is None:
            self._restore(head)
            return
        aside = self.journal.keep_aside()
        self._restore(head)
        raise StoreError(
            f"this machine's metadata holds commits that {url} lacks ({why}), and the bucket has moved on "
            f"without them (to snapshot {head[0]} record {head[1]}; this machine last shipped snapshot "
            f"{local[0]} record {local[1]}). Its copy is kept in {aside} and the state directory now holds the "
            f"bucket's; see what the copy holds with: s3fuse diverged {aside} -- then mount again", errno.EEXIST)

    def _note_head_time(self, head: tuple[int, int]) -> None:
        """When the bucket's head was written (server clock): see sweep_unreferenced."""
        from .s3journal import record_key

        key = record_key(self.s3, *head) if head[1] else _snapshot_key(self.s3.loc, head[0])
        info = self.s3.head(key)
        self.head_written = info["LastModified"].timestamp() if info else 0.0

    def _restore(self, head: tuple[int, int]) -> None:
        log.info("restoring metadata snapshot %d and %d journal record(s) from %s", head[0], head[1],
                 self.s3.loc.url)
        self.journal.restore(head)
        self.restored = True

    def recovery_allowed(self, entry: dict) -> bool:
        """May a recovery record (recovery.py) of this state directory be stored over the
        file `entry` describes? Only when this mount continues this machine's own metadata:
        the bucket's head was what this machine itself shipped last (the open checked it). If
        the state came from the bucket, another host may have written since the stop that kept
        the record, and the record stays (reported) rather than overwrite newer data."""
        return not self.restored

    async def sweep_unreferenced(self, meta) -> tuple[int, int]:
        """After an unclean stop: delete (deferred, like every delete) the objects that the
        replayed metadata does not reference and that were stored more than the margin before
        the bucket's head was written; newer ones a record the crashed holder never shipped
        could name, and they stay (docs/S3.md, "Collection after a crash"). Returns
        (removed, kept)."""
        cutoff = self.head_written - self.sweep_margin
        prefix = self.s3.loc.key("objects/")
        removed = kept = 0
        token = None
        while True:
            items, token = await trio.to_thread.run_sync(self.s3.list_dated_page, prefix, token)
            for key, modified in items:
                name = key[len(prefix):]
                try:
                    oid = bytes.fromhex(name)
                except ValueError:
                    continue
                if len(oid) != OBJECT_ID_LEN or meta.is_referenced(oid):
                    continue
                if modified >= cutoff:
                    kept += 1
                    continue
                await self.backend.delete(name)
                removed += 1
            if token is None:
                return removed, kept

    def publish_settings(self, raw: dict) -> None:
        """Bring the bucket's store.json (what a new machine starts from) up to the local one's
        format and authenticated key settings, after an upgrade or `seal-settings`; the rest
        of it (host-specific paths and endpoints) stays as init wrote it. Blocking."""
        from . import metaauth as ma

        shared = ("format", ma.CONFIG_MAC, *ma.CONFIG_FIELDS)
        body, _ = self.s3.get(self.s3.loc.key(CONFIG_NAME))
        public = json.loads(body)
        if all(public.get(name) == raw.get(name) for name in shared):
            return
        public.update({name: raw[name] for name in shared if name in raw})
        self.s3.put(self.s3.loc.key(CONFIG_NAME), (json.dumps(public, indent=2) + "\n").encode(),
                    ContentType="application/json")
        log.info("updated %s in %s (format %s)", CONFIG_NAME, self.s3.loc.url, raw.get("format"))

    def attach(self, meta) -> None:
        """The daemon opened the metadata: checkpoints are the journal's from now on (a
        checkpoint must never drop WAL frames that are not shipped yet)."""
        self.meta = meta
        meta.hold_checkpoints()

    def note_changes(self, total_changes: int) -> bool:
        changed = total_changes != self._changes
        self._changes = total_changes
        return changed

    def _check_writable(self, what: str) -> None:
        if self.backend.fenced:
            raise StoreError(f"no {what}: {self.backend.fenced}", errno.EIO)
        if not self.lease.valid():  # expired while renewals failed: a successor may own the prefix
            raise StoreError(f"no {what}: the lease on {self.s3.loc.url} has not been renewed in time",
                             errno.EIO)

    async def sync_metadata(self) -> None:
        """Return once every change committed before the call is in the bucket (fsync,
        `s3fuse sync`). Callers arriving while a shipment runs share the next one."""
        arrived = self._started
        async with self._lock:
            if self._succeeded > arrived:  # a shipment that began after we arrived is done
                return
            await self._ship_locked()

    def stats(self) -> dict:
        st = self.journal.state if self.journal is not None else None
        return {"metadata_changes": self.meta.db.total_changes if self.meta is not None else 0,
                "metadata_shipped_changes": self.shipped_changes,
                "journal_records": self.journal.records if self.journal is not None else 0,
                "journal_snapshots": self.journal.compactions if self.journal is not None else 0,
                "journal_head": f"{st.epoch}/{st.seq}" if st is not None else ""}

    async def _ship_locked(self) -> None:
        self._started += 1
        mine = self._started
        if self.meta is not None:
            self.meta.commit()  # deferred transactions (Meta.transaction) are shipped too
        changes = self.meta.db.total_changes if self.meta is not None else 0
        self._check_writable("metadata journal record")
        try:
            written = os.stat(self.cfg.meta_path + "-wal").st_size  # no transaction is open here
        except FileNotFoundError:
            written = None
        try:
            await trio.to_thread.run_sync(self.journal.ship, written)
        except Exception as exc:  # noqa: BLE001 - S3 and botocore errors, worded and logged once
            err = StoreError(f"could not store the metadata journal in {self.s3.loc.url} (fsync and "
                             f"`s3fuse sync` fail until it can): {exc}", errno.EIO)
            log.error("%s", err)
            raise err from None
        self._succeeded = max(self._succeeded, mine)
        self.shipped_changes = max(self.shipped_changes, changes)
        self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        # on the trio thread, with no await between the check and the checkpoint: no commit
        # can slip in between, so the checkpoint drops shipped frames only
        if self.meta is None:
            return
        try:
            size = os.stat(self.cfg.meta_path + "-wal").st_size
        except FileNotFoundError:
            return
        if self.journal.checkpoint_due(size) and self.meta.checkpoint():
            self.journal.checkpointed()

    async def snapshot_now(self) -> None:
        """Take a snapshot (the journal's compaction), then delete the objects it no longer
        refers to."""
        self._check_writable("snapshot")
        async with self._lock:
            pending = self.backend.take_pending_deletes()
            try:
                seq = await trio.to_thread.run_sync(self.journal.compact)
            except BaseException:
                self.backend.requeue_deletes(pending)
                raise
        log.debug("metadata snapshot %d stored", seq)
        if pending:
            try:
                await self.backend.delete_now(pending)
            except S3fuseError as exc:  # deleting twice is harmless: all of them again next time
                log.warning("could not delete unreferenced objects (will retry): %s", exc)
                self.backend.requeue_deletes(pending)

    async def periodic(self, meta) -> None:
        """Ship the journal every `metadata_sync_seconds` (0: as soon as a commit is seen),
        and take a snapshot every `snapshot_interval` seconds while the metadata changes."""
        self.note_changes(meta.db.total_changes)
        last_snapshot = trio.current_time()
        seen = meta.db.total_changes
        while True:
            await trio.sleep(self.sync_seconds if self.sync_seconds > 0 else IMMEDIATE_POLL)
            now = meta.db.total_changes
            if self.sync_seconds > 0 or now != seen:
                seen = now
                try:
                    await self.sync_metadata()
                except Exception:  # noqa: BLE001, S110 - logged where it failed; retried at the next interval
                    pass
            if trio.current_time() - last_snapshot < self.interval:
                continue
            last_snapshot = trio.current_time()
            if not self.note_changes(meta.db.total_changes):
                continue
            try:
                await self.snapshot_now()
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                log.warning("metadata snapshot failed (will retry): %s", exc)
                self._changes = -1

    async def before_close(self) -> bool:
        """At a clean stop, before the metadata is closed (which checkpoints its WAL): ship
        everything. False if that failed (the close then leaves the next ship to a snapshot)."""
        try:
            await self.sync_metadata()
            return True
        except Exception as exc:  # noqa: BLE001
            log.error("final metadata journal shipment failed: %s", exc)
            return False

    async def finish(self, shipped: bool = True) -> None:
        """At a clean stop, after the metadata is closed: last snapshot, deletes, lease."""
        self.meta = None
        if self.journal is not None:
            await trio.to_thread.run_sync(self.journal.finish_closed, shipped)
        try:
            await self.snapshot_now()
        except Exception as exc:  # noqa: BLE001
            log.error("final metadata snapshot failed: the bucket holds an older one (%s)", exc)
        try:
            await trio.to_thread.run_sync(self.lease.release)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not release the lease on %s: %s", self.s3.loc.url, exc)

"""Offline consistency check and safe repair of a store (`s3fuse fsck`).

The checks are functions over the metadata database and the object store (through the
`Backend` interface, so they work on any backend). Each finds `Finding`s; a finding is
either *damage* (something is wrong with the store) or a *note* (a benign leftover of an
unclean stop, or something that cannot be verified offline, such as an SSE-C object whose
customer key is not given). `repair` then does only what is safe:

- deletes objects that no block-map row references (never a referenced one);
- fixes link counts and `stored_bytes`, drops block-map rows past a file's size;
- removes directory entries that point at no inode;
- moves disconnected inodes (orphans, cycles) and files with damaged or missing objects
  into `/lost+found`, recording the damage in the xattr `user.s3fuse.damage`;
- never deletes a referenced object or a file's data.

The exit codes (`EXIT_*`) are documented in docs/FSCK.md and `s3fuse fsck --help`.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import format as fmt
from .backends import Backend, open_backend
from .crypto import SYSTEM, KeyManager, WrappedKey
from .data import codec
from .errors import IntegrityError, KeyUnavailable, S3fuseError, StoreError
from .keys.customer import CustomerKeys
from .keys.router import open_kms
from .meta import ROOT_INODE, BlockRef, Meta
from .metaquery import MetaQuery
from .policy import LOST_AT_STOP, SSE_C, SSE_KMS, SSE_S3, XATTR_DAMAGE
from .recovery import RecoveryArea
from .store import StoreConfig, StoreLock, check_config_mac, load_config, load_keyring, obtain_root_key

EXIT_CLEAN = 0  # no damage (notes about benign leftovers may be printed)
EXIT_REPAIRED = 1  # damage or leftovers were repaired; no damage remains
EXIT_DAMAGED = 4  # damage remains (not repaired, or not safely repairable)
EXIT_FAILED = 8  # fsck could not run (store missing, mounted, key unreadable...)

DAMAGE = "damage"
NOTE = "note"
LOST_FOUND = b"lost+found"
DAMAGE_XATTR = XATTR_DAMAGE
QUICK_SAMPLE = 32  # objects fully authenticated by --quick (at least; or 1 %)
_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFREG = 0o100000


@dataclass
class Finding:
    kind: str  # a stable identifier, e.g. "missing-object" (docs/FSCK.md lists them)
    severity: str  # DAMAGE | NOTE
    message: str
    inode: int | None = None
    object_id: str | None = None
    repaired: bool = False

    def line(self) -> str:
        state = " [repaired]" if self.repaired else ""
        return f"{self.severity}: {self.kind}: {self.message}{state}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    # inodes whose data is damaged: ino -> reasons (what --repair quarantines)
    damaged_files: dict[int, list[str]] = field(default_factory=dict)
    forged_dirs: set[int] = field(default_factory=set)  # entries that do not authenticate
    forged_inodes: set[int] = field(default_factory=set)  # never signed again by a repair

    def add(self, kind: str, severity: str, message: str, inode: int | None = None,
            object_id: str | None = None) -> Finding:
        f = Finding(kind, severity, message, inode, object_id)
        self.findings.append(f)
        return f

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def damage_left(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == DAMAGE and not f.repaired]

    @property
    def exit_code(self) -> int:
        if self.damage_left:
            return EXIT_DAMAGED
        if any(f.repaired for f in self.findings):
            return EXIT_REPAIRED
        return EXIT_CLEAN

    def as_dict(self) -> dict:
        return {"exit": self.exit_code, "counts": self.counts,
                "findings": [f.__dict__ for f in self.findings]}


@dataclass
class Context:
    cfg: StoreConfig
    meta: Meta
    backend: Backend
    keys: KeyManager
    settings_forged: bool = False  # store.json's key settings do not authenticate
    root_key: bytes | None = None  # an S3 store's journal check authenticates with it

    @property
    def query(self) -> MetaQuery:
        return MetaQuery(self.meta.db)

    def path(self, ino: int) -> str:
        return self.meta.path_of(ino)


def _is_dir(mode: int) -> bool:
    return mode & _S_IFMT == _S_IFDIR


# ---------------------------------------------------------------------- opening


def open_context(store: str, customer_keys: dict[str, bytes] | None = None, *, key_file: str | None = None,
                 passphrase_file: str | None = None) -> tuple[Context, StoreLock]:
    """Lock the store (refusing if it is mounted), unseal its keys, open meta and backend."""
    cfg = load_config(store)
    lock = StoreLock(cfg)
    try:
        lock.acquire("s3fuse fsck")
    except StoreError as exc:
        if exc.errno == errno.EBUSY:
            raise StoreError(f"{exc}; unmount it before running fsck", errno.EBUSY) from None
        raise
    try:
        root_key = obtain_root_key(cfg, key_file=key_file, passphrase_file=passphrase_file)
        keyring = load_keyring(cfg, root_key)
        forged = not check_config_mac(cfg, keyring)
        # forged settings may name a KMS of someone else's: not asked
        kms = None if forged else open_kms(cfg, root_key)
        customer = CustomerKeys()
        for name, raw in (customer_keys or {}).items():
            customer.add(name, raw, 0, True)
        if not os.path.exists(cfg.meta_path):
            raise StoreError(f"{cfg.meta_path} does not exist")
        meta = Meta(cfg.meta_path, keyring.meta_key)
        meta.check_reads = False  # check_records checks every row
        backend = open_backend(cfg.path, {"backend": cfg.backend})
        # no audit trail: fsck runs offline, and records appended after the daemon's
        # stored head would read as tampering to `s3fuse audit verify`
        keys = KeyManager(cfg.store_id, keyring, kms=kms, customer=customer, audit=None)
    except BaseException:
        lock.release()
        raise
    return Context(cfg, meta, backend, keys, forged, root_key), lock


# ---------------------------------------------------------------------- checks


def check_database(ctx: Context, report: Report, quick: bool) -> bool:
    """SQLite's own check. False if the database is too damaged to check further."""
    rows = ctx.query.integrity_check(quick)
    if rows != ["ok"]:
        report.add("database-corrupt", DAMAGE, "meta.db fails SQLite's integrity check: " + "; ".join(rows[:5]))
    root = ctx.meta.inode(ROOT_INODE)
    if root is None or not _is_dir(root.mode):
        report.add("no-root", DAMAGE, "the root directory (inode 1) is missing or not a directory")
        return False
    if not ctx.meta.get_state("clean", 1):
        report.add("unclean", NOTE, "the store was not unmounted cleanly (the next mount, or --repair, "
                                    "collects what the stop left behind)")
    return True


def check_journal(ctx: Context, report: Report) -> None:
    """An S3 store: the bucket's snapshot and journal authenticate as a mount replays them,
    without a gap, and are not older than what this machine has seen (docs/S3.md)."""
    if ctx.cfg.backend.get("type") != "s3" or ctx.root_key is None:
        return
    from .s3journal import check_bucket
    from .s3store import Snapshotter, journal_name, read_seq

    s3 = ctx.backend.s3
    for _kind, text in check_bucket(ctx.cfg, s3, ctx.root_key,
                                   Snapshotter(ctx.cfg, s3, ctx.root_key, read_seq(ctx.cfg.path)), journal_name):
        report.add("journal", DAMAGE, f"{text}; a mount refuses this bucket until it is put right")


def check_recovery(ctx: Context, report: Report) -> None:
    """Data a stop could not store: kept in the recovery area (stored by the next mount), or
    dropped (the file is marked, and reads fail). Neither is a clean store."""
    for rec in RecoveryArea(ctx.cfg.path, ctx.keys, 0).records():
        report.add("recovery-pending", DAMAGE,
                   f"inode {rec.inode} ({rec.file_path}): {rec.nbytes} bytes a stop could not store are kept "
                   f"in {rec.path} ({rec.reason}); mount the store to store them", inode=rec.inode)
    for ino in ctx.meta.inodes_with_xattr(DAMAGE_XATTR, LOST_AT_STOP):
        why = (ctx.meta.get_xattr(ino, DAMAGE_XATTR) or b"").decode("utf-8", "replace")
        report.add("lost-at-stop", DAMAGE, f"inode {ino} ({ctx.path(ino)}): a stop dropped written data that "
                   f"could not be stored ({why}); opening it fails (EIO) until the owner removes {DAMAGE_XATTR.decode()}",
                   inode=ino)


def check_namespace(ctx: Context, report: Report) -> None:
    """Directory entries, reachability from the root (orphans and cycles), link counts."""
    q = ctx.query
    c = report.counts
    c["inodes"] = q.count_inodes()
    c["directories"] = q.count_directories()
    c["files"] = q.count_files()
    for did, parent, name, ino in q.dangling_entries():
        report.add("dangling-entry", DAMAGE, f"entry {_name(name)} in directory {parent} points at "
                   f"inode {ino}, which does not exist", inode=ino)
    for did, parent, name, ino in q.misplaced_entries():
        report.add("orphan-entry", DAMAGE, f"entry {_name(name)} (inode {ino}) is in {parent}, "
                   "which is not an existing directory", inode=ino)
    if q.is_linked(ROOT_INODE):
        report.add("root-linked", DAMAGE, "the root directory has a directory entry")
    for ino, n in q.directories_with_several_entries():
        report.add("directory-hard-link", DAMAGE, f"directory inode {ino} has {n} entries", inode=ino)
    for ino in _unreachable(ctx):
        report.add("disconnected", DAMAGE, f"inode {ino} has links but cannot be reached from the root "
                   "(orphaned subtree or a directory cycle)", inode=ino)
    for ino, mode, nlink, want in q.link_counts():
        if nlink == 0 and want == 0:
            report.add("unlinked-inode", NOTE, f"inode {ino} was deleted while open (reclaimed at the next mount)",
                       inode=ino)
        elif nlink != want:
            report.add("link-count", DAMAGE, f"inode {ino} ({ctx.path(ino)}) has link count {nlink}, "
                       f"should be {want}", inode=ino)
    for ino in q.symlinks_without_target():
        report.add("symlink-target", DAMAGE, f"symlink inode {ino} ({ctx.path(ino)}) has no target", inode=ino)
    for table, n in (("xattrs", q.stray_xattr_rows()), ("symlinks", q.stray_symlink_rows())):
        if n:
            report.add("stray-rows", NOTE, f"{n} {table} rows belong to no inode")


def check_records(ctx: Context, report: Report) -> None:
    """Authenticated metadata: every row's MAC and every inode's set digest (docs/FORMAT.md)."""
    if ctx.settings_forged:
        report.add("forged-settings", DAMAGE, f"{ctx.cfg.path}/store.json: its key settings (default_sse, kms, "
                   "block and segment size, store id) do not authenticate: they were edited outside "
                   "s3fuse; put back the settings it had (not repairable by fsck)")
    if ctx.meta.key is None:
        report.add("unauthenticated", NOTE, "the store was made before authenticated metadata; its next "
                   "mount authenticates it")
        return
    quarantined = _quarantined(ctx)
    for ino, record in ctx.meta.forged_records():
        why = f"its {record} does not authenticate (meta.db edited outside s3fuse)"
        if ino in quarantined:
            report.add("quarantined", NOTE, f"inode {ino} ({ctx.path(ino)}): {why}; the file is quarantined "
                       "with its damage recorded", inode=ino)
            continue
        report.add("forged-record", DAMAGE, f"inode {ino} ({ctx.path(ino)}): {why}", inode=ino)
        if record.startswith("entry"):
            report.forged_dirs.add(ino)
        else:
            report.damaged_files.setdefault(ino, []).append(f"{record}: forged")
            report.forged_inodes.add(ino)


def _unreachable(ctx: Context) -> list[int]:
    """Inodes with entries or links that no path from the root reaches."""
    return ctx.query.unreachable(ROOT_INODE)


def check_block_map(ctx: Context, report: Report) -> None:
    """Rows of the block map: owners, lengths, rows past the end, sizes, the garbage list."""
    q, bs = ctx.query, ctx.cfg.block_size
    quarantined = _quarantined(ctx)
    c = report.counts
    c["objects_referenced"] = q.count_blocks()
    for ino, n in q.blocks_of_missing_inodes():
        report.add("stray-blocks", DAMAGE, f"{n} block-map rows belong to inode {ino}, which does not exist",
                   inode=ino)
    for ino, mode in q.blocks_of_non_files():
        report.add("blocks-of-non-file", DAMAGE, f"inode {ino} is not a regular file but has block-map rows",
                   inode=ino)
    for ref in q.impossible_block_rows(bs, fmt.PREFIX.size + fmt.MAX_HEADER_BODY + fmt.MAC_LEN):
        why = (f"block {ref.blockno}: length {ref.length}, object length {ref.obj_length}, "
               f"header length {ref.hdr_len} are impossible")
        if ref.inode in quarantined:
            report.add("quarantined", NOTE, f"inode {ref.inode} ({ctx.path(ref.inode)}) {why}; the file is "
                       "quarantined with its damage recorded", inode=ref.inode)
            continue
        report.add("bad-block-row", DAMAGE, f"inode {ref.inode} ({ctx.path(ref.inode)}) {why}",
                   inode=ref.inode, object_id=ref.object_id.hex())
        report.damaged_files.setdefault(ref.inode, []).append(why)
    for ref in q.stray_patches():
        report.add("stray-patch", DAMAGE, f"inode {ref.inode} ({ctx.path(ref.inode)}) has a patch of block "
                   f"{fmt.patched_block(ref.blockno)}, which has no row", inode=ref.inode,
                   object_id=ref.object_id.hex())
    for ino, blockno, size in q.blocks_past_size(bs):
        report.add("block-past-end", DAMAGE, f"inode {ino} ({ctx.path(ino)}) has block {blockno} past its "
                   f"size {size}", inode=ino)
    for ino, blockno, length, size in q.blocks_over_size(bs):
        report.add("block-past-end", DAMAGE, f"inode {ino} ({ctx.path(ino)}) block {blockno} holds "
                   f"{length} bytes, past its size {size}", inode=ino)
    for ino, stored, want in q.stored_bytes():
        if stored != want:
            report.add("stored-bytes", DAMAGE, f"inode {ino} records {stored} stored bytes, its blocks hold "
                       f"{want}", inode=ino)
    for oid in q.referenced_garbage():
        report.add("referenced-garbage", DAMAGE, f"object {oid.hex()} is listed for deletion but still "
                   "referenced (the collector would destroy live data)", object_id=oid.hex())


def check_keys(ctx: Context, report: Report) -> None:
    """Every key the block map and the encryption settings refer to."""
    keyring, kms = ctx.keys.keyring, ctx.keys.kms
    # files already quarantined by a repair are known damage, reported as such by check_objects
    q = ctx.query
    for version, n in q.master_key_versions(SSE_S3, DAMAGE_XATTR):
        if version not in keyring.keys:
            report.add("missing-master-key", DAMAGE, f"{n} objects are wrapped under master-key version "
                       f"{version}, which the keyring does not hold")
    for key_id, version, n in q.kms_key_versions(SSE_KMS, DAMAGE_XATTR):
        try:
            info = kms.describe(key_id)
        except S3fuseError as exc:
            if exc.errno == errno.ENOKEY:
                report.add("missing-kms-key", DAMAGE, f"{n} objects use KMS key {key_id}, which does not exist")
            else:  # e.g. an external KMS that does not answer now: not evidence of damage
                report.add("kms-unreachable", NOTE, f"{n} objects use KMS key {key_id}, which could not be "
                           f"checked: {exc}")
            continue
        if info.get("versions") and version not in info["versions"]:
            report.add("missing-kms-key", DAMAGE, f"{n} objects use version {version} of KMS key {key_id}, "
                       "which the key does not have")
        elif info.get("state", "Enabled") != "Enabled":
            report.add("kms-key-unusable", NOTE, f"{n} objects use KMS key {key_id}, which is {info['state']}"
                       + (f" (deletion date {info['deletion_date']})" if info.get("deletion_date") else ""))
    for verifier, n in q.key_refs(SSE_C):
        if not _valid_verifier(verifier):
            report.add("bad-ssec-verifier", DAMAGE, f"{n} SSE-C objects record a malformed key verifier")
    from .policy import Policy

    for ino, raw in q.encryption_settings():
        try:
            policy = Policy.decode(raw)
        except Exception:
            report.add("bad-sse-setting", DAMAGE, f"inode {ino} has an undecodable encryption setting", inode=ino)
            continue
        if policy is not None and policy.mode == SSE_KMS and policy.key:
            try:
                kms.describe(policy.key)
            except S3fuseError as exc:
                if exc.errno != errno.ENOKEY:
                    continue
                report.add("missing-kms-key", NOTE, f"inode {ino} ({ctx.path(ino)}) is set to encrypt with KMS "
                           f"key {policy.key}, which does not exist (new writes will fail)", inode=ino)


def _quarantined(ctx: Context) -> set[int]:
    """Files an earlier repair moved aside with their damage recorded: known, not new, damage."""
    return ctx.query.inodes_with_xattr(DAMAGE_XATTR)


def _valid_verifier(v: str) -> bool:
    salt, _, tag = v.partition(":")
    try:
        return len(bytes.fromhex(salt)) == 16 and len(bytes.fromhex(tag)) == 32
    except ValueError:
        return False


async def check_objects(ctx: Context, report: Report, quick: bool,
                        progress: Callable[[int, int], None] | None = None) -> None:
    """Compare the store's object list with the block map, and authenticate objects.

    Full: every referenced object is read whole: its size, key slot, header (against the
    block-map row) and every segment. Quick: every key slot and header, and the segments of a
    random sample.
    """
    q = ctx.query
    listed: set[bytes] = set()
    foreign = 0
    async for key in ctx.backend.list():
        try:
            oid = bytes.fromhex(key)
        except ValueError:
            oid = b""
        if len(oid) != fmt.OBJECT_ID_LEN or oid.hex() != key:
            foreign += 1
            continue
        listed.add(oid)
    report.counts["objects_in_store"] = len(listed)
    if foreign:
        report.add("foreign-key", NOTE, f"{foreign} keys in the object store are not s3fuse object ids (left alone)")
    referenced = q.referenced_objects()
    garbage = q.garbage_objects()
    for oid in sorted(listed - referenced):
        if oid in garbage:
            report.add("garbage", NOTE, f"object {oid.hex()} is deleted but not yet collected", object_id=oid.hex())
        else:
            report.add("unreferenced-object", NOTE, f"object {oid.hex()} is referenced by no file",
                       object_id=oid.hex())
    stale = garbage - listed - referenced
    if stale:
        report.add("garbage", NOTE, f"{len(stale)} objects on the deletion list are already gone")
    refs = q.all_blocks()
    bases = {(r.inode, r.blockno): r.object_id for r in refs if not fmt.is_patch(r.blockno)}
    quarantined = _quarantined(ctx)
    present = [r for r in refs if r.object_id in listed]
    for ref in refs:
        if ref.object_id not in listed:
            _object_damage(ctx, report, ref, "missing-object", "is missing from the store", quarantined)
    full = set(range(len(present)))
    if quick:
        n = min(len(present), max(QUICK_SAMPLE, len(present) // 100))
        full = set(random.sample(range(len(present)), n))
    counters = {"done": 0, "bytes": 0, "unverifiable": 0, "damaged": 0, "whole": 0}
    work = iter(enumerate(present))

    async def worker() -> None:
        # a few objects in flight at once: memory stays at a few blocks whatever the store's size
        for i, ref in work:
            base = bases.get((ref.inode, fmt.patched_block(ref.blockno))) if fmt.is_patch(ref.blockno) else None
            kind, why = await _authenticate(ctx, ref, whole=i in full, counters=counters, base=base)
            if kind == "unverifiable":
                counters["unverifiable"] += 1
                report.add("unverifiable", NOTE, f"object {ref.object_id.hex()} (inode {ref.inode} "
                           f"{ctx.path(ref.inode)}, block {ref.blockno}): {why}", inode=ref.inode,
                           object_id=ref.object_id.hex())
            elif kind is not None:
                counters["damaged"] += 1
                _object_damage(ctx, report, ref, kind, why, quarantined)
            elif i in full:
                counters["whole"] += 1
            counters["done"] += 1
            if progress is not None:
                progress(counters["done"], len(present))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(worker)
    # a damaged object is counted apart, never as authenticated
    report.counts["objects_authenticated"] = len(present) - counters["unverifiable"] - counters["damaged"]
    report.counts["objects_fully_authenticated"] = counters["whole"]
    report.counts["objects_damaged"] = counters["damaged"]
    report.counts["bytes_authenticated"] = counters["bytes"]
    report.counts["objects_unverifiable"] = counters["unverifiable"]


def _object_damage(ctx: Context, report: Report, ref: BlockRef, kind: str, why: str, quarantined: set[int]) -> None:
    oid = ref.object_id.hex()
    where = f"object {oid} (inode {ref.inode} {ctx.path(ref.inode)}, block {ref.blockno})"
    if ref.inode in quarantined:
        report.add("quarantined", NOTE, f"{where} {why}; the file is quarantined with its damage recorded",
                   inode=ref.inode, object_id=oid)
        return
    report.add(kind, DAMAGE, f"{where} {why}", inode=ref.inode, object_id=oid)
    report.damaged_files.setdefault(ref.inode, []).append(f"block {ref.blockno}: object {oid}: {kind}: {why}")


async def _authenticate(ctx: Context, ref: BlockRef, whole: bool, counters: dict,
                        base: bytes | None = None) -> tuple[str | None, str]:
    """(None, "") if the object is good, else (finding kind, why)."""
    wrapped = WrappedKey(ref.mode, ref.key_ref, ref.key_version, ref.key_slot)
    try:
        # a network KMS's call goes to a worker thread, so the other checks go on meanwhile
        data_key = await ctx.keys.open_data_key(ref.object_id, ref.inode, ref.blockno, wrapped, SYSTEM)
    except IntegrityError as exc:
        return "bad-key-slot", f"key slot does not open: {exc}"
    except KeyUnavailable as exc:
        if ref.mode == SSE_C:
            return "unverifiable", "its SSE-C customer key was not given (--customer-key)"
        if ref.mode == SSE_S3:
            return "missing-key", str(exc)
        return "unverifiable", str(exc)
    except S3fuseError as exc:
        if exc.errno == errno.ENOKEY:
            return "missing-key", str(exc)
        return "unverifiable", str(exc)  # e.g. a Disabled KMS key: it exists but may not be used now
    key = ref.object_id.hex()
    expected_size = fmt.object_size(ref.hdr_len, ctx.cfg.segment_size, ref.obj_length)
    try:
        if whole:
            buf = await ctx.backend.get(key)
        else:
            buf = await ctx.backend.get(key, 0, ref.hdr_len)
    except S3fuseError as exc:
        return "unreadable-object", f"cannot be read: {exc}"
    if whole and len(buf) != expected_size:
        return "corrupt-object", f"is {len(buf)} bytes, should be {expected_size} (truncated or appended to)"

    def verify() -> str | None:
        return codec.verify_object(buf, data_key, ref, ctx.cfg.store_id, ctx.cfg.segment_size, whole, base,
                                   ctx.cfg.block_size)

    why = await trio.to_thread.run_sync(verify)
    if why is not None:
        return "corrupt-object", f"fails authentication: {why}"
    counters["bytes"] += len(buf)
    return None, ""


# ---------------------------------------------------------------------- repair


async def repair(ctx: Context, report: Report) -> None:
    """Apply the safe repairs for the findings of `report`, marking each one repaired."""
    meta, q = ctx.meta, ctx.query
    now = time.time_ns()
    with meta.transaction():
        # first: nothing referenced may stay on the deletion list
        for f in report.of("referenced-garbage"):
            meta.remove_garbage(bytes.fromhex(f.object_id))
            f.repaired = True
        for f in report.of("dangling-entry"):
            meta.remove_dangling_entries()
            f.repaired = True
        for f in report.of("stray-rows"):
            meta.remove_stray_rows()
            f.repaired = True
        # entries that do not authenticate are dropped (their inodes, disconnected, go to
        # lost+found below); a directory's digest then sums the entries that authenticate
        for parent in sorted(report.forged_dirs - report.forged_inodes):
            meta.reseal_entries(parent)
        for f in report.of("forged-record"):
            if f.inode in report.forged_dirs and f.inode not in report.forged_inodes:
                f.repaired = True
        lf = None

        def lost_found() -> int:
            nonlocal lf
            if lf is None:
                lf = _lost_found(meta, now)
            return lf

        # block-map rows of a vanished inode: bring the inode back (same number, so that its
        # key slots, which are bound to it, still open) in lost+found
        for f in report.of("stray-blocks"):
            ino = f.inode
            size, stored = q.extent_of_blocks(ino, ctx.cfg.block_size)
            meta.restore_inode(ino, _S_IFREG | 0o600, size, stored, now)
            _attach(meta, lost_found(), ino, b"#%d" % ino)
            meta.set_xattr(ino, DAMAGE_XATTR, b"recovered: its inode was missing")
            f.repaired = True
        # entries in a non-directory or a missing one, and subtrees the root does not reach
        for f in report.of("orphan-entry") + report.of("disconnected") + report.of("directory-hard-link"):
            f.repaired = True
        _reconnect(ctx, lost_found)
        # files with damaged or missing objects: quarantine, recording what is wrong
        for ino, reasons in report.damaged_files.items():
            row = meta.inode(ino)
            if row is None:
                continue
            if row.nlink == 0 and not q.is_linked(ino):
                pass  # deleted while open: reclaimed below with its objects
            else:
                _quarantine(meta, lost_found(), ino, reasons, now)
            for f in report.findings:
                if f.inode == ino and f.severity == DAMAGE and f.kind in _DATA_DAMAGE:
                    f.repaired = True
        # a missing key is repaired as far as it can be once every file that needs it is quarantined
        if not [f for f in report.of("missing-key") if not f.repaired]:
            for f in report.of("missing-master-key") + report.of("missing-kms-key"):
                if f.severity == DAMAGE:
                    f.repaired = True
        # sizes: rows past the end are unreadable by definition; their objects become garbage
        if report.of("block-past-end"):
            bs = ctx.cfg.block_size
            for ino, size in q.files_with_blocks_past_size(bs):
                meta.truncate_blocks(ino, size, bs)
            for f in report.of("block-past-end"):
                f.repaired = True
        # patches of a block with no row apply to nothing: they go (their objects become garbage)
        for ref in q.stray_patches():
            meta.remove_patches(ref.inode, fmt.patched_block(ref.blockno))
        for f in report.of("stray-patch"):
            f.repaired = True
        # counts last: the moves above change them
        for ino, mode, nlink, want in q.link_counts():
            if nlink != want and not (nlink == 0 and want == 0) and ino not in report.forged_inodes:
                meta.update_inode(ino, nlink=want)
        for f in report.of("link-count"):
            f.repaired = True
        meta.recount_stored_bytes()
        for f in report.of("stored-bytes"):
            f.repaired = True
        for f in report.of("unlinked-inode"):
            if not q.is_linked(f.inode):
                meta.delete_inode(f.inode)
            f.repaired = True
    # objects: delete only what no row references, re-checked against the database now
    doomed = {bytes.fromhex(f.object_id) for f in report.of("unreferenced-object") + report.of("garbage")
              if f.object_id}
    doomed |= q.garbage_objects()
    for oid in sorted(doomed):
        if not meta.is_referenced(oid):
            await ctx.backend.delete(oid.hex())
    for f in report.of("unreferenced-object") + report.of("garbage"):
        f.repaired = True
    await ctx.backend.sync()
    with meta.transaction():
        meta.drop_collected_garbage()
    ctx.backend.clear_tmp()
    with meta.transaction():
        # what an unclean stop left is collected now
        meta.set_state("clean", 1)
    for f in report.of("unclean"):
        f.repaired = True
    await trio.to_thread.run_sync(meta.sync)


_DATA_DAMAGE = {"missing-object", "corrupt-object", "bad-key-slot", "missing-key", "unreadable-object",
                "bad-block-row", "forged-record"}


def _lost_found(meta: Meta, now: int) -> int:
    ino = meta.lookup(ROOT_INODE, LOST_FOUND)
    if ino is not None:
        row = meta.inode(ino)
        if row is not None and _is_dir(row.mode):
            return ino
        raise S3fuseError("/lost+found exists and is not a directory: rename it and run fsck --repair again",
                          errno.EEXIST)
    row = meta.create_inode(_S_IFDIR | 0o700, 0, 0, 2, now)
    meta.add_entry(ROOT_INODE, LOST_FOUND, row.id)
    meta.update_inode(ROOT_INODE, mtime_ns=now, ctime_ns=now)
    return row.id


def _attach(meta: Meta, parent: int, ino: int, name: bytes) -> None:
    """Add an entry `name` (cut to NAME_MAX, made unique) for `ino` in `parent`."""
    name = name[:255]
    base, n = name[:240], 0
    while meta.lookup(parent, name) is not None:
        n += 1
        name = base + b".%d" % n
    meta.add_entry(parent, name, ino)


def _reconnect(ctx: Context, lost_found: Callable[[], int]) -> None:
    q, meta = ctx.query, ctx.meta
    # entries whose directory is missing or not a directory move to lost+found
    for did, _parent, name, ino in q.misplaced_entries():
        meta.remove_entry_by_id(did)
        _attach(meta, lost_found(), ino, b"#%d-" % ino + name)
    # a directory has one entry: keep the oldest
    for ino, _n in q.directories_with_several_entries():
        meta.keep_oldest_entry(ino)
    meta.remove_entries_of(ROOT_INODE)
    # unreachable subtrees: attach one member at a time (breaking a cycle) until all are reached;
    # each round attaches one inode, so there are at most as many rounds as inodes
    for _ in range(q.count_inodes() + 1):
        lost = _unreachable(ctx)
        if not lost:
            return
        # inodes without entries first, then directories: attaching one brings back its whole
        # subtree, and breaks a cycle through it; files in unreachable directories come back
        # with their directory
        loose = [i for i in lost if not q.is_linked(i)]
        dirs = [i for i in lost if _is_dir(meta.inode(i).mode)]
        ino = (loose or dirs or lost)[0]
        if ino in dirs:
            meta.remove_entries_of(ino)
        _attach(meta, lost_found(), ino, b"#%d" % ino)


def _quarantine(meta: Meta, lf: int, ino: int, reasons: list[str], now: int) -> None:
    """Move every entry of a damaged file into lost+found (one entry), recording the damage."""
    names = MetaQuery(meta.db).entry_names(ino)
    path = meta.path_of(ino)
    meta.remove_entries_of(ino)
    base = names[0] if names else b"file"
    _attach(meta, lf, ino, b"#%d-" % ino + base)
    record = f"fsck {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: was {path}; " + "; ".join(reasons)
    meta.set_xattr(ino, DAMAGE_XATTR, record.encode()[:65536])
    meta.update_inode(ino, ctime_ns=now)


# ---------------------------------------------------------------------- driver


def _name(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


class Progress:
    """A one-line progress bar on stderr, only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        bar = "#" * (30 * done // max(1, total))
        print(f"\r[{bar:<30}] {done}/{total} objects", end="", file=sys.stderr, flush=True)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


async def _run(ctx: Context, repair_it: bool, quick: bool, progress: Progress) -> Report:
    report = Report()
    if check_database(ctx, report, quick):
        check_records(ctx, report)
        check_namespace(ctx, report)
        check_block_map(ctx, report)
        check_keys(ctx, report)
        check_recovery(ctx, report)
        check_journal(ctx, report)
        await check_objects(ctx, report, quick, progress)
        progress.end()
        if repair_it:
            await repair(ctx, report)
    return report


def run(store: str, *, repair_it: bool = False, quick: bool = False,
        customer_keys: dict[str, bytes] | None = None, progress: bool = False,
        key_file: str | None = None, passphrase_file: str | None = None) -> Report:
    """Check (and with `repair_it`, repair) an unmounted store. Raises S3fuseError if it cannot run."""
    ctx, lock = open_context(store, customer_keys, key_file=key_file, passphrase_file=passphrase_file)
    try:
        return trio.run(_run, ctx, repair_it, quick, Progress(progress))
    finally:
        try:
            ctx.meta.close()
        finally:
            lock.release()


NOTES_SHOWN = 20  # per kind; damage is always listed in full


def format_report(report: Report, store: str, repaired: bool) -> str:
    lines = []
    shown: dict[str, int] = {}
    for f in report.findings:
        if f.severity == NOTE:
            shown[f.kind] = shown.get(f.kind, 0) + 1
            if shown[f.kind] > NOTES_SHOWN:
                continue
        lines.append(f.line())
    for kind, n in shown.items():
        if n > NOTES_SHOWN:
            lines.append(f"note: {kind}: ... and {n - NOTES_SHOWN} more")
    c = report.counts
    lines.append(
        f"{store}: {c.get('inodes', 0)} inodes ({c.get('directories', 0)} directories, {c.get('files', 0)} files), "
        f"{c.get('objects_referenced', 0)} objects referenced, {c.get('objects_in_store', 0)} in the store; "
        f"{c.get('objects_fully_authenticated', 0)} fully authenticated "
        f"({c.get('bytes_authenticated', 0) / (1 << 20):.1f} MiB), {c.get('objects_damaged', 0)} damaged, "
        f"{c.get('objects_unverifiable', 0)} unverifiable")
    damage = [f for f in report.findings if f.severity == DAMAGE]
    notes = [f for f in report.findings if f.severity == NOTE]
    fixed = sum(f.repaired for f in report.findings)
    verdict = {EXIT_CLEAN: "clean", EXIT_REPAIRED: "repaired", EXIT_DAMAGED: "DAMAGE REMAINS"}[report.exit_code]
    tail = f"; {fixed} repaired" if repaired else ("; run with --repair to fix" if damage else "")
    lines.append(f"{verdict}: {len(damage)} damage, {len(notes)} notes{tail}")
    return "\n".join(lines)

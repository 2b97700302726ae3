"""The `s3fuse` command line: init, mount, umount, status.

Every failure prints one line, `s3fuse: <what went wrong>`, on stderr and exits
non-zero; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys

from . import __version__, defaults, durations
from .config import ConfigError
from .control import protocol
from .control.client import ControlClient
from .errors import S3fuseError

EXIT_ERROR = 1
EXIT_USAGE = 2

LOG_LEVELS = defaults.LOG_LEVELS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        self.exit(EXIT_USAGE, f"s3fuse: {message} (see: {self.prog} --help)\n")


def _mib(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of MiB") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return n << 20


POLICY_HELP = """\
Get or set who may use and administer a KMS key. The policy is JSON with up to three
sections, each a list of uids ("*": everyone) and of gids (primary or supplementary):

  {"encrypt": {"uids": [1000], "gids": []},    create and write files under the key
   "decrypt": {"uids": [1000, 1001], "gids": [100]},   open its files for reading
   "admin":   {"uids": [1000]}}    enable, disable, schedule deletion, rotate, set the policy

A section or list left out grants nobody but root; root passes every policy. Example:
  echo '{"decrypt": {"uids": ["*"]}, "admin": {"uids": [1000]}}' | s3fuse kms policy set alias/team
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="s3fuse", description="An encrypted object filesystem with S3's server-side-encryption model.")
    p.add_argument("--version", action="version", version=f"s3fuse {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("init", help="create a new store")
    s.add_argument("store", metavar="STORE", help="directory to create the store in (new or empty), "
                   "or s3://BUCKET/PREFIX")
    _s3_options(s)
    s.add_argument("--block-size-kib", type=int, default=defaults.BLOCK_SIZE >> 10,
                   help=f"largest object: one per block of a file (default {defaults.BLOCK_SIZE >> 10})")
    s.add_argument("--segment-size-kib", type=int, default=defaults.SEGMENT_SIZE >> 10,
                   help="unit of authenticated encryption and of ranged reads "
                        f"(default {defaults.SEGMENT_SIZE >> 10})")
    _root_key_source_options(s)
    _transit_init_options(s)

    # Options default to None so that a value from --config shows through (config.resolve).
    s = sub.add_parser("mount", help="mount a store")
    s.add_argument("store", metavar="STORE", nargs="?", help="the store: a directory, an S3 state directory or s3://BUCKET/PREFIX "
                   "(default: store.path of --config)")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="an existing empty directory (default: mount.mountpoint of --config)")
    s.add_argument("--config", "-c", metavar="FILE",
                   help="read settings from this TOML file; options given here override it (docs/CONFIG.md)")
    _s3_options(s)
    s.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    s.add_argument("--allow-other", action="store_true", default=None,
                   help="let other users use the mount (permissions apply)")
    s.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="default info")
    s.add_argument("--log-file", help="log here (default: stderr in the foreground, STORE/s3fuse.log otherwise)")
    s.add_argument("--dirty-limit-mib", type=_mib, default=None, dest="dirty_limit",
                   help=f"memory for unflushed writes (default {defaults.DIRTY_LIMIT >> 20})")
    s.add_argument("--cache-mib", type=_mib, default=None, dest="cache_limit",
                   help=f"memory for decrypted segments (default {defaults.CACHE_LIMIT >> 20})")
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _root_key_options(s)
    s.add_argument("--root-key-fd", type=int, help=argparse.SUPPRESS)
    s.add_argument("--settings-fd", type=int, help=argparse.SUPPRESS)
    s.add_argument("--rotation-interval", type=_interval, metavar="DURATION",
                   help="rotate the SSE-S3 master key this often: seconds, or e.g. 90d, 12h "
                        "(default: the store's rotation_interval, 30 days at init; 0 or never = never)")
    s.add_argument("--rewrap-batch", type=int, metavar="N", help=argparse.SUPPRESS)
    s.add_argument("--rewrap-rate", type=float, metavar="N", help=argparse.SUPPRESS)
    s.add_argument("--metadata-sync-seconds", type=_duration, metavar="DURATION", dest="metadata_sync_seconds",
                   help="S3 stores: ship committed metadata changes to the bucket at least this often "
                        "(default 5; 0 = at every commit; fsync always does at once)")
    s.add_argument("--s3-api", metavar="HOST:PORT", dest="s3_api",
                   help="also serve the store as an S3 endpoint here (docs/S3API.md)")

    s = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--timeout", type=_duration, default=defaults.UMOUNT_TIMEOUT, metavar="DURATION",
                   help=f"how long to wait for the daemon: seconds, or e.g. 10m (default {defaults.UMOUNT_TIMEOUT:g})")
    s.add_argument("--keep-pending", action="store_true",
                   help="unmount even if some files cannot be stored now: their data is kept, encrypted, "
                        "in the store's recovery area and stored at the next mount")

    s = sub.add_parser("sync", help="store everything written to a mount; for an S3 store, also every "
                       "committed metadata change in the bucket (sync(1) does not reach the bucket)")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--timeout", type=_duration, default=defaults.UMOUNT_TIMEOUT, metavar="DURATION",
                   help=f"how long to wait: seconds, or e.g. 10m (default {defaults.UMOUNT_TIMEOUT:g})")

    s = sub.add_parser("diverged", help="what a state directory kept aside at mount holds that the "
                       "store's current metadata lacks (docs/S3.md)")
    s.add_argument("copy", metavar="DIR", help="the kept copy (STATE_DIR/diverged-TIME)")

    s = sub.add_parser("status", help="show a mounted store's state")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.add_argument("--verbose", "-v", action="store_true",
                   help="also print every counter (the summary comes first)")

    s = sub.add_parser("rotate", help="rotate the SSE-S3 master key now, or retire unused versions")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--retire-unused", action="store_true",
                   help="instead: erase old master-key versions nothing depends on any more")
    g.add_argument("--pause-sweep", action="store_true", help="instead: hold the re-wrap sweep")
    g.add_argument("--resume-sweep", action="store_true", help="instead: let a held re-wrap sweep go on")

    s = sub.add_parser("seal-settings", help="accept store.json's key settings as they are now, after an edit "
                                             "(store not mounted; needs the root key)")
    s.add_argument("store", metavar="STORE")
    _root_key_options(s)

    s = sub.add_parser("rekey-root", help="seal the keyring and KMS keystore under a new root key "
                                          "(store not mounted)")
    s.add_argument("store", metavar="STORE")
    s.add_argument("--to", metavar="SOURCE", dest="new_source",
                   help="the new root key's source: file, passphrase or credential:NAME (default: the current kind)")
    s.add_argument("--new-key-file", metavar="PATH",
                   help="file: the new key file (used if it exists, else created; default STORE/root-G.key); "
                        "credential: the new key's 32 bytes when not running under systemd")
    s.add_argument("--new-passphrase-file", metavar="PATH", help="passphrase: read the new passphrase from PATH")
    s.add_argument("--scrypt-log-n", type=int, default=None, help=argparse.SUPPRESS)
    _root_key_options(s)

    s = sub.add_parser("reencrypt", help="apply the directory's encryption setting to existing files")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--recursive", "-r", action="store_true", help="every file below PATH")

    key = sub.add_parser("key", help="SSE-C customer keys (held in the daemon's memory only)")
    ksub = key.add_subparsers(dest="key_command", metavar="ACTION", parser_class=_Parser)
    ksub.required = True
    s = ksub.add_parser("add", help="load a key: 32 raw bytes or base64, from stdin or --key-file")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--key-file", help="read the key from this file instead of stdin")
    s.add_argument("--global", action="store_true", dest="is_global", help="root only: usable by every uid")
    _mount_option(s)
    s = ksub.add_parser("list", help="loaded keys: names, fingerprints, owners (never key bytes)")
    _mount_option(s)
    s = ksub.add_parser("remove", help="forget a key")
    s.add_argument("name", metavar="NAME")
    _mount_option(s)

    s3k = sub.add_parser("s3-key", help="access keys of the S3 API (docs/S3API.md)")
    s3sub = s3k.add_subparsers(dest="s3key_command", metavar="ACTION", parser_class=_Parser)
    s3sub.required = True
    s = s3sub.add_parser("add", help="create an access key id and secret for a uid")
    s.add_argument("--uid", type=int, default=None, help="the uid requests act as (default: yours)")
    s.add_argument("--allow-root", action="store_true", help="allow a key for uid 0")
    s.add_argument("--json", action="store_true", help='print {"AccessKeyId": ..., "SecretAccessKey": ...}')
    _mount_option(s)
    s = s3sub.add_parser("list", help="access key ids and their uids (never secrets)")
    _mount_option(s)
    s = s3sub.add_parser("remove", help="delete an access key")
    s.add_argument("id", metavar="ID")
    _mount_option(s)

    s = sub.add_parser("presign", help="print a presigned S3 URL for a file of the mount")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--expires", type=int, default=3600, metavar="SECONDS", help="1-604800 (default 3600)")
    s.add_argument("--method", choices=("GET", "PUT"), default="GET")
    s.add_argument("--access-key", metavar="ID", help="sign with this key (default: your newest)")

    kms = sub.add_parser("kms", help="the built-in KMS (SSE-KMS keys, policies, rotation)")
    msub = kms.add_subparsers(dest="kms_command", metavar="ACTION", parser_class=_Parser)
    msub.required = True
    s = msub.add_parser("create-key", help="create a KMS key")
    s.add_argument("--alias", help="alias/NAME")
    s.add_argument("--description", default="")
    s.add_argument("--transit", metavar="NAME", help="create Transit key NAME (derived aes256-gcm96) "
                   "instead of a built-in key; root only")
    _mount_option(s)
    s = msub.add_parser("list", help="list KMS keys")
    _mount_option(s)
    for name, text in (("describe", "show a key"), ("enable", "enable a key"), ("disable", "disable a key"),
                       ("cancel-deletion", "cancel a scheduled deletion (the key becomes Disabled)"),
                       ("rotate", "add a new backing-key version now (Transit keys: then re-wrap "
                                  "stored data keys under it)"),
                       ("rewrap", "Transit keys: re-wrap stored data keys under the latest version"),
                       ("disable-rotation", "stop automatic rotation")):
        s = msub.add_parser(name, help=text)
        s.add_argument("key", metavar="KEY", help="key id or alias")
        _mount_option(s)
    s = msub.add_parser("set-min-decryption-version",
                        help="Transit keys: refuse to decrypt data keys wrapped under older versions")
    s.add_argument("key", metavar="KEY")
    s.add_argument("--version", type=int, required=True)
    _mount_option(s)
    s = msub.add_parser("schedule-deletion", help="delete a key after a waiting period (7-30 days)")
    s.add_argument("key", metavar="KEY")
    s.add_argument("--days", type=int, required=True)
    _mount_option(s)
    s = msub.add_parser("enable-rotation", help="rotate the key automatically every N days")
    s.add_argument("key", metavar="KEY")
    s.add_argument("--days", type=int, required=True)
    _mount_option(s)
    s = msub.add_parser("policy", help="get or set a key policy (JSON)", description=POLICY_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=("get", "set"))
    s.add_argument("key", metavar="KEY")
    s.add_argument("--file", help="set: read the policy JSON from this file instead of stdin")
    _mount_option(s)

    s = sub.add_parser("sse", help="set or show a directory's or file's encryption (user.s3fuse.sse), "
                       "with the reason when a setting is refused")
    ssub = s.add_subparsers(dest="sse_command", metavar="ACTION", parser_class=_Parser)
    ssub.required = True
    t = ssub.add_parser("set", help="set the encryption of a directory (files created below it) or "
                        "re-encrypt a file")
    t.add_argument("path", metavar="PATH")
    t.add_argument("value", metavar="VALUE", help="AES256, aws:kms, aws:kms:KEY, SSE-C:NAME or SSE-C:FINGERPRINT")
    t = ssub.add_parser("get", help="the effective setting (a file: also its actual encryption)")
    t.add_argument("path", metavar="PATH")

    s = sub.add_parser("audit", help="print the audit trail, or verify its hash chain")
    s.add_argument("action", nargs="?", choices=("verify",), help="verify: check the hash chain")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    s.add_argument("--key", help="only records of this key id, alias or fingerprint (an alias "
                   "matches every key it has named, as the trail shows, and the one it names now)")
    s.add_argument("--store", help="read the audit trail of this store (default: ask the daemon)")
    _mount_option(s)
    _add_fsck_parser(sub)
    return p


def _s3_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("S3 stores (STORE = s3://BUCKET/PREFIX; see docs/S3.md)")
    g.add_argument("--endpoint-url", help="S3 endpoint (default: AWS)")
    g.add_argument("--region", help="S3 region (default us-east-1)")
    g.add_argument("--profile", help="AWS profile for credentials (default: environment, shared files)")
    g.add_argument("--state-dir", help="local state directory (default /var/lib/s3fuse/BUCKET-HASH for root, "
                   "~/.local/state/s3fuse/BUCKET-HASH otherwise)")
    # mount --root-key-file (the root-key options) also names the key of a store mounted on a
    # machine without its state directory


def _resolve_store(args) -> str:
    """STORE as a local directory: an s3:// address becomes its state directory."""
    from .s3store import is_s3_url, resolve_store, url_of_state_dir

    s3_flags = (args.endpoint_url, args.region, args.profile, args.state_dir)
    if not is_s3_url(args.store):
        if not any(s3_flags) and not (getattr(args, "root_key_file", None) and _is_s3_state_dir(args.store)):
            return args.store
        # a state directory given by path, with S3 settings to change
        url = url_of_state_dir(args.store)
        if args.state_dir and os.path.abspath(args.state_dir) != os.path.abspath(args.store):
            raise S3fuseError("--state-dir names another directory than STORE")
        args.state_dir = args.store
        args.store = url
    return resolve_store(args.store, state_dir=args.state_dir, endpoint_url=args.endpoint_url,
                         region=args.region, profile=args.profile,
                         root_key_file=getattr(args, "root_key_file", None))


def _is_s3_state_dir(path: str) -> bool:
    import json

    try:
        with open(os.path.join(path, "store.json")) as f:
            return json.load(f).get("backend", {}).get("type") == "s3"
    except (OSError, ValueError):
        return False


FSCK_EPILOG = """exit status (as e2fsck):
  0  clean: no damage (notes about benign leftovers may be printed)
  1  repaired: --repair fixed everything it found; no damage remains
  4  damage remains (run with --repair, or it cannot be repaired safely)
  8  fsck could not run (no store, store mounted, root key unreadable, ...)
see docs/FSCK.md"""


def _add_fsck_parser(sub) -> None:
    s = sub.add_parser("fsck", help="check (and repair) an unmounted store",
                       description="Check an unmounted store: metadata against the object store, every "
                                   "object authenticated, every key reference.",
                       epilog=FSCK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("store", metavar="STORE")
    s.add_argument("--repair", action="store_true",
                   help="fix what is safe: collect unreferenced objects, fix counts, move damaged "
                        "or disconnected files to /lost+found (never deletes referenced data)")
    s.add_argument("--quick", action="store_true",
                   help="authenticate every key slot and header, but the segments of a sample of objects only")
    s.add_argument("--customer-key", action="append", default=[], metavar="NAME=FILE",
                   help="an SSE-C key (32 raw bytes or base64 in FILE) to verify that key's objects too; "
                        "repeatable")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    _root_key_options(s)


def _root_key_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--root-key-file", metavar="PATH",
                   help="read the root key from PATH (32 bytes or base64) instead of its recorded source")
    s.add_argument("--passphrase-file", metavar="PATH",
                   help="the passphrase of a passphrase-sealed store (default: ask on the terminal)")


def _root_key_source_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--root-key", default="file", metavar="SOURCE",
                   help="where the root key comes from: file (default: a new STORE/root.key), passphrase "
                        "(scrypt; asked for, or --passphrase-file) or credential:NAME (systemd "
                        "$CREDENTIALS_DIRECTORY/NAME)")
    s.add_argument("--root-key-file", metavar="PATH",
                   help="file: the key file to use or create; credential: the key's 32 bytes when not "
                        "running under systemd")
    s.add_argument("--passphrase-file", metavar="PATH", help="passphrase: read it from PATH")
    s.add_argument("--scrypt-log-n", type=int, default=None,
                   help="passphrase: scrypt cost, log2(N) (default 17: 128 MiB, about 0.5 s)")


def _interval(value: str) -> float:
    try:
        return durations.parse_interval(value)
    except durations.DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(value: str) -> float:
    try:
        return durations.parse_positive(value)
    except durations.DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _transit_init_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("external KMS (Vault/OpenBao Transit; docs/TRANSIT.md)")
    g.add_argument("--kms", choices=("builtin", "transit"), default=None,
                   help="provider of bare key names in aws:kms:NAME (default builtin)")
    g.add_argument("--vault-addr", help="Transit server URL (default: $VAULT_ADDR or $BAO_ADDR at mount)")
    g.add_argument("--vault-token-file", help="file holding the Vault/OpenBao token "
                   "(default: $VAULT_TOKEN or $BAO_TOKEN at mount)")
    g.add_argument("--transit-mount", help="path of the Transit engine (default transit)")
    g.add_argument("--transit-default-key", help="Transit key used by plain aws:kms")


def _transit_kms_settings(args) -> dict | None:
    """store.json "kms" from the init options; None for a built-in-only store."""
    kms: dict = {}
    if args.kms:
        kms["provider"] = args.kms
    for opt, name in (("vault_addr", "address"), ("transit_mount", "mount"),
                      ("transit_default_key", "default_key")):
        if getattr(args, opt):
            kms[name] = getattr(args, opt)
    if args.vault_token_file:
        kms["token_file"] = os.path.abspath(args.vault_token_file)
    if kms and args.kms is None:
        kms["provider"] = "builtin"
    return kms or None


def _check_transit(kms: dict | None) -> None:
    """At init: the Transit server must answer and accept the token (one clear line if not)."""
    from .keys import router, transit

    if not kms or not router.transit_configured(kms):
        return
    settings = transit.TransitSettings.from_config(kms)
    try:
        transit.TransitKms(settings).check_token()
    except S3fuseError as exc:
        raise S3fuseError(f"Transit KMS at {settings.address}: {exc}", exc.errno) from None


def _mount_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--mount", "-m", metavar="MOUNTPOINT",
                   help="the daemon to talk to (default: the only s3fuse mount)")


def _under_journal() -> bool:
    """Is stderr connected to systemd's journal? ($JOURNAL_STREAM names its device and inode.)"""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# syslog priorities, which journald reads from a "<N>" line prefix (sd-daemon(3))
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """One line per event, "<priority>logger: message", no timestamp (the journal adds its own).

    An exception's type and message stay on the line; the traceback is added, folded onto
    the same line, only at debug level.
    """

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 3 if record.levelno > logging.ERROR else 6)
        text = f"<{priority}>{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f": {exc.__class__.__name__}: {exc}"
            if self.tracebacks:
                text += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return " ".join(text.splitlines())


def _setup_logging(level: str, log_file: str | None) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    if not log_file and _under_journal():
        handler.setFormatter(JournalFormatter(tracebacks=level == "debug"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def cmd_init(args) -> int:
    from . import rootkey
    from .s3store import init_s3_store, is_s3_url
    from .store import init_store

    kms = _transit_kms_settings(args)
    _check_transit(kms)
    extra = {} if args.scrypt_log_n is None else {"scrypt_log_n": args.scrypt_log_n}
    if is_s3_url(args.store):
        cfg = init_s3_store(args.store, state_dir=args.state_dir, endpoint_url=args.endpoint_url,
                            region=args.region, profile=args.profile,
                            block_size=args.block_size_kib << 10, segment_size=args.segment_size_kib << 10,
                            kms=kms, root_key_source=args.root_key, key_file=args.root_key_file,
                            passphrase_file=args.passphrase_file, **extra)
        print(f"created store {args.store} (id {cfg.store_id.hex()}), local state in {cfg.path}")
        source = (cfg.root_key_file if cfg.root_key_file is not None
                  else f"from the {rootkey.describe(cfg.root_key)}")
        print(f"root key: {source} (keep it secret and keep a copy: with it, the bucket alone "
              "is enough to mount the store on another machine)")
        return 0
    cfg = init_store(args.store, block_size=args.block_size_kib << 10,
                     segment_size=args.segment_size_kib << 10, kms=kms, root_key_source=args.root_key,
                     key_file=args.root_key_file, passphrase_file=args.passphrase_file, **extra)
    print(f"created store {cfg.path} (id {cfg.store_id.hex()})")
    if cfg.root_key_file is not None:
        print(f"root key: {cfg.root_key_file} (keep it secret; whoever has it and the store can read everything)")
    else:
        print(f"root key: from the {rootkey.describe(cfg.root_key)} (lose it and the store cannot be opened)")
    return 0


def _mount_settings(args):
    from . import config

    file = config.load(args.config) if args.config else None
    cli = {"store": args.store, "mountpoint": args.mountpoint, "allow_other": args.allow_other,
           "log_level": args.log_level, "log_file": args.log_file, "dirty_limit": args.dirty_limit,
           "cache_limit": args.cache_limit, "rotation_interval": args.rotation_interval,
           "root_key_file": args.root_key_file, "passphrase_file": args.passphrase_file,
           "s3_api": args.s3_api}
    settings = config.resolve(cli, file)
    if args.metadata_sync_seconds is not None:
        settings.backend["metadata_sync_seconds"] = args.metadata_sync_seconds
    return settings


def _obtain_root_key(args, cfg, settings=None) -> bytes:
    """The root key: from the command line's flags, else the configuration's, else the store's source."""
    from .store import obtain_root_key

    key_file, passphrase_file = args.root_key_file, args.passphrase_file
    if settings is not None:
        key_file, passphrase_file = settings.root_key_file, settings.passphrase_file
        if settings.root_key_credential:
            from .daemon import credential_path
            key_file = credential_path(settings.root_key_credential)
    return obtain_root_key(cfg, key_file=key_file, passphrase_file=passphrase_file)


def _kms_settings(kms: dict | None) -> dict | None:
    """The configuration's [kms] table in store.json's vocabulary: a token credential becomes its file."""
    if not kms or "token_credential" not in kms:
        return kms
    from .daemon import credential_path

    out = {k: v for k, v in kms.items() if k != "token_credential"}
    out["token_file"] = credential_path(kms["token_credential"])
    return out


def _read_settings_fd(fd: int, args):
    """The settings a background mount resolved and handed over (JSON), with its hidden
    re-wrap options set on `args`."""
    from .config import MountSettings

    with os.fdopen(fd, "rb") as f:
        data = json.loads(f.read(1 << 20))
    args.rewrap_batch, args.rewrap_rate = data["rewrap_batch"], data["rewrap_rate"]
    return MountSettings(**data["settings"])


def _read_key_fd(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        key = f.read(64)
    if len(key) != 32:
        raise S3fuseError("the root key handed over by the mount command is not 32 bytes")
    return key


def cmd_mount(args) -> int:
    from .daemon import MountOptions, check_mountpoint, run_foreground
    from .store import load_config

    if args.settings_fd is not None:  # the daemon a background mount started
        settings = _read_settings_fd(args.settings_fd, args)
    else:
        if args.store:
            args.store = _resolve_store(args)
        settings = _mount_settings(args)
    options = MountOptions(allow_other=settings.allow_other, dirty_limit=settings.dirty_limit,
                           cache_limit=settings.cache_limit, readahead_kb=settings.readahead_kb,
                           rotation_interval=settings.rotation_interval,
                           rewrap_batch=args.rewrap_batch, rewrap_rate=args.rewrap_rate,
                           audit_path=settings.audit_path, default_sse=settings.default_sse,
                           kms=_kms_settings(settings.kms), backend_overrides=settings.backend,
                           s3_api=_s3api_settings(settings.s3api))
    if args.foreground:
        _setup_logging(settings.log_level, settings.log_file)
        ready_fd = args.ready_fd

        def ready(error: str | None) -> None:
            nonlocal ready_fd
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n" if error is None else f"error {error}\n".encode())
                os.close(ready_fd)
                ready_fd = None

        try:
            if args.root_key_fd is not None:
                root_key = _read_key_fd(args.root_key_fd)
            else:
                root_key = _obtain_root_key(args, load_config(settings.store), settings)
            run_foreground(settings.store, settings.mountpoint, options, ready, root_key=root_key)
        except S3fuseError as exc:
            if settings.log_file:  # on stderr the CLI's own line says it once
                logging.getLogger("s3fuse").error("%s", exc)
            ready(str(exc))
            raise
        return 0

    # Background: check what we can here, then start the daemon and wait until it mounts.
    cfg = load_config(settings.store)
    mnt = check_mountpoint(settings.mountpoint)
    # the key is obtained (and a passphrase asked for) here, on the user's terminal, and
    # handed to the daemon through a pipe: never on a command line or in the environment
    root_key = _obtain_root_key(args, cfg, settings)
    log_file = os.path.abspath(settings.log_file or os.path.join(cfg.path, "s3fuse.log"))
    r, w = os.pipe()
    kr, kw = os.pipe()
    os.write(kw, root_key)
    os.close(kw)
    # the settings as resolved here go to the daemon whole, through a pipe: nothing is
    # re-derived from a command line built for it (STORE and MOUNTPOINT are there for ps)
    sr, sw = os.pipe()
    child = dataclasses.replace(settings, store=cfg.path, mountpoint=mnt, log_file=log_file)
    os.write(sw, json.dumps({"settings": dataclasses.asdict(child), "rewrap_batch": args.rewrap_batch,
                             "rewrap_rate": args.rewrap_rate}).encode())
    os.close(sw)
    argv = [sys.executable, "-m", "s3fuse", "mount", cfg.path, mnt, "--foreground",
            "--ready-fd", str(w), "--root-key-fd", str(kr), "--settings-fd", str(sr)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(w, kr, sr), start_new_session=True, cwd="/")
    os.close(w)
    os.close(kr)
    os.close(sr)
    with os.fdopen(r, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ready":
        print(f"mounted {cfg.path} on {mnt} (daemon pid {proc.pid}, log {log_file})")
        return 0
    proc.wait()
    if message.startswith("error "):
        raise S3fuseError(message[len("error "):])
    raise S3fuseError(f"the daemon exited with status {proc.returncode} before mounting; see {log_file}")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def _fusermount(mountpoint: str, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        raise S3fuseError(f"could not unmount {mountpoint}: {msg}", errno.EBUSY)


def _umount_socket(mnt: str) -> str:
    """The control socket of the s3fuse mount at `mnt`, once the caller may unmount it."""
    from .control import mounts

    entry = mounts.entry_at(mnt)
    if entry is None:
        raise S3fuseError(f"{mnt} is not a mount point", errno.EINVAL)
    if not entry.is_s3fuse:
        raise S3fuseError(f"{mnt} is not an s3fuse mount (it is a {entry.fstype} mount)", errno.EINVAL)
    if os.getuid() not in (0, entry.uid):
        raise S3fuseError(f"{mnt} was mounted by {entry.owner()}: only that user or root may "
                          "unmount it", errno.EPERM)
    for path in mounts.socket_candidates(mnt, entry.uid):
        if os.path.exists(path):
            return path
    return protocol.socket_path(mnt)  # none: the daemon is gone (a stale mount, below)


def cmd_umount(args) -> int:
    mnt = os.path.realpath(args.mountpoint)
    path = _umount_socket(mnt)
    try:
        with ControlClient(path, timeout=args.timeout) as client:
            reply = client.call("unmount", keep_pending=bool(args.keep_pending))
            pid = reply["pid"]
    except S3fuseError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        if not os.path.ismount(mnt):
            raise S3fuseError(f"{mnt} is not an s3fuse mount", errno.EINVAL) from None
        # no daemon answers: a stale mount left by a crash
        _fusermount(mnt, lazy=True)
        print(f"{mnt}: no daemon was running; removed the stale mount")
        return 0
    pending = reply.get("pending")
    if pending:
        for p in pending:
            print(f"  {p['path']} (inode {p['inode']}, {p['bytes']} bytes): {p['reason']}", file=sys.stderr)
        raise S3fuseError(f"{len(pending)} file(s) above cannot be stored now, so {mnt} stays mounted: wait "
                          "and try again (the daemon keeps retrying), or `s3fuse umount --keep-pending` to "
                          "stop now and store them at the next mount", errno.EBUSY)
    _fusermount(mnt)
    if not _wait_for_exit(pid, args.timeout):
        raise S3fuseError(f"the daemon (pid {pid}) did not exit within {args.timeout:.0f} s", errno.ETIMEDOUT)
    return 0


def cmd_sync(args) -> int:
    with ControlClient(_socket_for(args.mountpoint), timeout=args.timeout) as client:
        client.call("sync")
    return 0


def cmd_diverged(args) -> int:
    from .s3journal import diverged_paths

    changes = diverged_paths(os.path.abspath(args.copy))
    for mark, path, what in changes:
        print(f"{mark} {os.fsdecode(path)}  {what}")
    if not changes:
        print("the kept copy holds nothing the current metadata lacks")
    return 0


def cmd_status(args) -> int:
    with ControlClient(_socket_for(args.mountpoint), timeout=30) as client:
        status = client.call("status")
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
        return 0
    unstored = status.pop("unstored_files", [])
    kept = status.pop("recovery_pending", [])
    versions = status.pop("master_keys", None)
    rewrap = status.pop("rewrap", None)
    next_rotation = status.pop("next_rotation", None)
    summary = {
        "store": status.get("store"),
        "mountpoint": status.get("mountpoint"),
        "pid": status.get("pid"),
        "files": f"{status.get('inodes')} inodes, {status.get('objects')} objects, "
                 f"{status.get('open_files')} open",
        "unflushed": _mib_text(status.get("dirty_bytes")),
        "cache": f"{_mib_text(status.get('cache_bytes'))} of decrypted segments",
        "keys": f"master key version {status.get('master_key_version')}, "
                f"{status.get('customer_keys')} customer key(s) loaded",
        "audit_log": status.get("audit_log"),
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.verbose:
        print("counters:")
        for key, value in status.items():
            print(f"{key}: {value}")
    print(f"unstored files: {len(unstored)}")
    for f in unstored:
        print(f"  {f['path']} (inode {f['inode']}, {f['bytes']} bytes): {f['reason']}")
    print(f"recovery area: {len(kept)} record(s)")
    for f in kept:
        print(f"  {f['path']} (inode {f['inode']}, {f['bytes']} bytes): kept because {f['reason']}; "
              f"waiting for {f['waiting_for']}")
    if versions is not None:
        print("master keys (SSE-S3):")
        for v in versions:
            when = _when(v["retired"]) if v["state"] == "retired" else _when(v["created"])
            print(f"  version {v['version']}: {v['state']}, {v['objects']} object(s) depend on it"
                  f"{', retired ' if v['state'] == 'retired' else ', created '}{when}")
    if rewrap is not None:
        print(f"re-wrap sweep: {rewrap['state']}, {rewrap['done']} of {rewrap['total']} key slot(s) "
              f"re-wrapped to version {rewrap['target_version']}, {rewrap['remaining']} remaining")
        print(f"next rotation: {_when(next_rotation) if next_rotation else 'never (rotation_interval 0)'}")
    if not args.verbose:
        print(f"({len(status)} counters: s3fuse status --verbose, or --json)")
    return 0


def _mib_text(n) -> str:
    return "?" if not isinstance(n, int) else f"{n / (1 << 20):.1f} MiB"


def _when(ts) -> str:
    import time as _time

    return "unknown" if ts is None else _time.strftime("%Y-%m-%d %H:%M:%S UTC", _time.gmtime(ts))


def cmd_rotate(args) -> int:
    with ControlClient(_socket_for(args.mountpoint), timeout=120) as client:
        if args.pause_sweep or args.resume_sweep:
            r = client.call("rotate.sweep", paused=bool(args.pause_sweep))
            print(f"re-wrap sweep: {r['state']}, {r['remaining']} key slot(s) remaining")
            return 0
        if not args.retire_unused:
            result = client.call("rotate")
            print(f"master key version {result['version']} is current; the re-wrap sweep moves "
                  f"version {result['previous']}'s key slots to it in the background")
            return 0
        result = client.call("rotate.retire")
    for v in result["retired"]:
        print(f"retired master key version {v} (key material erased)")
    if result["kept"]:
        reasons = "; ".join(f"version {v}: {why}" for v, why in result["kept"].items())
        raise S3fuseError(f"not retired: {reasons}", errno.EBUSY)
    if not result["retired"]:
        print(f"nothing to retire: version {result['current']} is the only master key version")
    return 0


def cmd_seal_settings(args) -> int:
    """store.json's key settings carry a MAC under the metadata key (docs/FORMAT.md), so that
    whoever can write the store directory cannot point the store at another KMS; an
    administrator with the root key accepts an edit here."""
    from .store import StoreLock, load_config, load_keyring, seal_settings

    cfg = load_config(args.store)
    lock = StoreLock(cfg)
    lock.acquire("seal-settings")
    try:
        keyring = load_keyring(cfg, _obtain_root_key(args, cfg))
        seal_settings(cfg, keyring)
        _audit_offline(cfg, "root:SealSettings", default_sse=cfg.default_sse, kms=json.dumps(cfg.kms, sort_keys=True))
    finally:
        lock.release()
    print(f"store {cfg.path}: store.json's key settings sealed (default_sse {cfg.default_sse}, "
          f"kms {json.dumps(cfg.kms, sort_keys=True)})")
    return 0


def cmd_rekey_root(args) -> int:
    from . import rootkey
    from .store import StoreLock, load_config, rekey_root

    cfg = load_config(args.store)
    lock = StoreLock(cfg)
    lock.acquire("rekey-root")
    try:
        old_key = _obtain_root_key(args, cfg)
        spec = args.new_source
        if spec is None:
            spec = cfg.root_key.get("source", "file")
            if spec == "credential":
                spec = f"credential:{cfg.root_key['name']}"
        extra = {} if args.scrypt_log_n is None else {"scrypt_log_n": args.scrypt_log_n}
        result = rekey_root(cfg, old_key, spec, new_key_file=args.new_key_file,
                            new_passphrase_file=args.new_passphrase_file, **extra)
        _audit_offline(cfg, "root:RekeyRoot", generation=result.generation, source=result.source)
    finally:
        lock.release()
    new_cfg = load_config(args.store)
    print(f"store {cfg.path}: keyring and KMS keystore sealed under the new root key "
          f"(generation {result.generation}, {rootkey.describe(new_cfg.root_key)})")
    if result.key_file:
        print(f"root key: {result.key_file} (keep it secret)")
    if cfg.root_key_file and os.path.exists(cfg.root_key_file) and cfg.root_key_file != new_cfg.root_key_file:
        print(f"the old key file {cfg.root_key_file} opens nothing any more; delete it")
    return 0


def _audit_offline(cfg, op: str, **fields) -> None:
    """Append a record while no daemon runs (the store lock is held), keeping the stored head."""
    from .audit import AuditLog, process_name
    from .meta import Meta

    meta = Meta(cfg.meta_path)
    try:
        with AuditLog.open(cfg.audit_path) as audit:
            audit.append(op, uid=os.getuid(), gid=os.getgid(), pid=os.getpid(),
                         process=process_name(os.getpid()), **fields)
            audit.sync()
            if meta.get_state("clean", 1):
                with meta.transaction():
                    meta.set_state("audit_head", audit.head)
                    meta.set_state("audit_seq", audit.seq)
    finally:
        meta.close()


def _socket_for(mount: str | None) -> str:
    """The control socket of the daemon of the mount `mount` is on; with none given, of
    the mount holding the current directory, else the caller's only mount (mounts.resolve)."""
    from .control import mounts

    return mounts.socket_of(mounts.resolve(mount))


def _call(args, op: str, **params):
    with ControlClient(_socket_for(args.mount), timeout=60) as client:
        return client.call(op, **params)


def _print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        return "-" if value is None else str(value)  # no alias, no version: "-", not "None"

    widths = {c: max(len(c), *(len(cell(r, c)) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(cell(r, c).ljust(widths[c]) for c in columns))


def cmd_key(args) -> int:
    if args.key_command == "add":
        if args.key_file:
            with open(args.key_file, "rb") as f:
                raw = f.read()
        else:
            raw = sys.stdin.buffer.read()
        result = _call(args, "key.add", name=args.name, key=raw, **{"global": args.is_global})
        print(result["fingerprint"])
    elif args.key_command == "list":
        _print_table(_call(args, "key.list"), ["name", "fingerprint", "owner_uid", "global"])
    else:
        result = _call(args, "key.remove", name=args.name)
        print(f"removed {result['name']} ({result['fingerprint']})")
        _print_waiting(result.get("waiting"))
    return 0


def _s3api_settings(table: dict | None):
    if table is None:
        return None
    from .s3api.server import Limits
    from .s3api.service import Settings, parse_listen

    host, port = parse_listen(table["listen"])
    limits = Limits()
    for name, attr in (("header_timeout", "header_timeout"), ("body_timeout", "body_timeout"),
                       ("idle_timeout", "idle_timeout"), ("connections_per_client", "per_client")):
        if name in table:
            setattr(limits, attr, table[name])
    return Settings(host, port, table.get("tls_cert"), table.get("tls_key"), limits)


def cmd_s3_key(args) -> int:
    import json

    if args.s3key_command == "add":
        params = {"allow_root": args.allow_root}
        if args.uid is not None:
            params["uid"] = args.uid
        result = _call(args, "s3key.add", **params)
        if args.json:
            print(json.dumps({"AccessKeyId": result["AccessKeyId"], "SecretAccessKey": result["SecretAccessKey"]}))
        else:
            print(f"AccessKeyId     {result['AccessKeyId']}")
            print(f"SecretAccessKey {result['SecretAccessKey']}")
            print(f"uid             {result['uid']}")
            if result.get("endpoint"):
                print(f"endpoint        {result['endpoint']}")
    elif args.s3key_command == "list":
        _print_table(_call(args, "s3key.list"), ["AccessKeyId", "uid", "gid", "created"])
    else:
        result = _call(args, "s3key.remove", id=args.id)
        print(f"removed {result['AccessKeyId']}")
    return 0


def cmd_presign(args) -> int:
    # the file may not exist yet (a presigned PUT): its directory names the mount
    path = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(args.path))),
                        os.path.basename(args.path))
    from .control import mounts

    entry = mounts.resolve(os.path.dirname(path))
    with ControlClient(mounts.socket_of(entry), timeout=60) as client:
        result = client.call("s3.presign", path=os.path.relpath(path, entry.mountpoint), method=args.method,
                             expires=args.expires, access_key=args.access_key)
    print(result["url"])
    return 0


def cmd_kms(args) -> int:
    import json

    op = args.kms_command
    if op == "create-key":
        if args.transit is not None:
            result = _call(args, "kms.create-key", transit=args.transit)
        else:
            result = _call(args, "kms.create-key", alias=args.alias, description=args.description)
    elif op == "list":
        _print_table(_call(args, "kms.list"), ["id", "alias", "state", "current_version", "description"])
        return 0
    elif op == "set-min-decryption-version":
        result = _call(args, f"kms.{op}", key=args.key, version=args.version)
    elif op in ("schedule-deletion", "enable-rotation"):
        result = _call(args, f"kms.{op}", key=args.key, days=args.days)
    elif op == "policy":
        if args.action == "get":
            result = _call(args, "kms.get-policy", key=args.key)
        else:
            text = open(args.file).read() if args.file else sys.stdin.read()
            try:
                policy = json.loads(text)
            except ValueError as exc:
                raise S3fuseError(f"the policy is not valid JSON: {exc}", errno.EINVAL) from None
            result = _call(args, "kms.set-policy", key=args.key, policy=policy)
    else:
        result = _call(args, f"kms.{op}", key=args.key)
    waiting = result.pop("waiting", None) if isinstance(result, dict) else None
    print(json.dumps(result, indent=2, sort_keys=True))
    _print_waiting(waiting)
    return 0


def _print_waiting(paths: list[str] | None) -> None:
    """Files opened for writing before a key was withdrawn: still stored under it."""
    if paths:
        print(f"{len(paths)} file(s) opened for writing before this change are still waiting to be "
              f"stored under this key (their data is stored under it, as accepted): {', '.join(paths)}",
              file=sys.stderr)


def cmd_audit(args) -> int:
    import json

    from . import audit

    head = seq = None
    if args.store:
        store = os.path.abspath(args.store)
        path = os.path.join(store, "audit.log")
        from .metaquery import stored_audit_head

        head, seq = stored_audit_head(store)
    else:
        info = _call(args, "audit.path")
        path, head, seq = info["path"], info["head"], info["seq"]
    if args.action == "verify":
        result = audit.verify(path, expected_head=head, expected_seq=seq)
        if not result.ok:
            raise S3fuseError(f"audit trail {path}: {result.reason}", errno.EBADMSG)
        print(f"audit trail {path}: {result.records} records, hash chain intact")
        return 0
    key = args.key
    if key is not None and key.startswith("alias/") and not args.store:
        try:  # the key the alias names now; the trail shows those it named before
            key = audit.KeyFilter(key, (_call(args, "kms.describe", key=key)["id"],))
        except S3fuseError:
            pass
    records = audit.follow(path, key=key) if args.follow else audit.read(path, key=key)
    try:
        for record in records:
            print(json.dumps(record, separators=(",", ":")), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_sse(args) -> int:
    from .policy import READ_ONLY, XATTR_SSE

    path = args.path
    if args.sse_command == "set":
        try:
            os.setxattr(path, XATTR_SSE, args.value.encode())
        except OSError as exc:
            raise S3fuseError(f"{path}: {_sse_refusal(path) or exc.strerror}", exc.errno) from None
    print(f"{path}: {os.getxattr(path, XATTR_SSE).decode()}")
    if os.path.isfile(path):
        for name in READ_ONLY:  # what its stored data is actually encrypted with
            try:
                value = os.getxattr(path, name).decode()
            except OSError:
                continue
            print(f"  {name.decode().rsplit('.', 1)[-1]}: {value}")
    return 0


def _sse_refusal(path: str) -> str | None:
    """The daemon's reason for refusing our last setting on `path` (the errno alone says little)."""
    try:
        ino = os.stat(path).st_ino
        with ControlClient(_socket_for(path), timeout=30) as client:
            return client.call("sse.why", inode=ino)["reason"]
    except (S3fuseError, OSError):
        return None


def cmd_reencrypt(args) -> int:
    from .policy import XATTR_SSE

    root = os.path.abspath(args.path)
    if os.path.isdir(root):
        if not args.recursive:
            raise S3fuseError(f"{root} is a directory: use --recursive", errno.EISDIR)
        files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    else:
        files = [root]
    files = [f for f in files if os.path.isfile(f) and not os.path.islink(f)]
    done = changed = 0
    show = sys.stderr.isatty()
    for path in files:
        wanted = os.getxattr(os.path.dirname(path), XATTR_SSE)
        if os.getxattr(path, XATTR_SSE) != wanted:  # files already converted are skipped: resumable
            os.setxattr(path, XATTR_SSE, wanted)
            changed += 1
        done += 1
        if show:
            bar = "#" * (30 * done // len(files))
            print(f"\r[{bar:<30}] {done}/{len(files)} files", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    print(f"{changed} of {len(files)} files re-encrypted")
    return 0


def cmd_fsck(args) -> int:
    """Its own exit codes (see FSCK_EPILOG): a failure to run is 8, never 1."""
    import json

    from . import fsck
    from .keys.customer import parse_key

    try:
        keys = {}
        for spec in args.customer_key:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise S3fuseError(f"--customer-key {spec!r}: expected NAME=FILE", errno.EINVAL)
            with open(path, "rb") as f:
                keys[name] = parse_key(f.read())
        report = fsck.run(args.store, repair_it=args.repair, quick=args.quick, customer_keys=keys,
                          progress=sys.stderr.isatty() and not args.json,
                          key_file=args.root_key_file, passphrase_file=args.passphrase_file)
    except (S3fuseError, OSError) as exc:
        msg = str(exc) if isinstance(exc, S3fuseError) else f"{exc.strerror or exc}" + (
            f": {exc.filename}" if getattr(exc, "filename", None) else "")
        print(f"s3fuse: fsck could not run: {msg}", file=sys.stderr)
        return fsck.EXIT_FAILED
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
        return report.exit_code
    print(fsck.format_report(report, os.path.abspath(args.store), args.repair))
    return report.exit_code


COMMANDS = {"init": cmd_init, "mount": cmd_mount, "umount": cmd_umount, "status": cmd_status,
            "sync": cmd_sync, "diverged": cmd_diverged,
            "key": cmd_key, "kms": cmd_kms, "sse": cmd_sse, "audit": cmd_audit, "reencrypt": cmd_reencrypt,
            "rotate": cmd_rotate, "rekey-root": cmd_rekey_root, "seal-settings": cmd_seal_settings, "fsck": cmd_fsck,
            "s3-key": cmd_s3_key, "presign": cmd_presign}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("root_key_file", "passphrase_file", "new_key_file", "new_passphrase_file"):
        if getattr(args, name, None):  # relative to where the command runs, not to the store
            setattr(args, name, os.path.abspath(getattr(args, name)))
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a reader gone is handled, not at the interpreter's exit
        return status
    except S3fuseError as exc:
        _error_line(str(exc))
        # a bad configuration is a usage error: the unit does not restart on it (RestartPreventExitStatus=)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR
    except KeyboardInterrupt:
        print("s3fuse: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except OSError as exc:
        _error_line(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return EXIT_ERROR
    except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
        logging.getLogger("s3fuse").exception("internal error")
        _error_line(f"internal error: {exc.__class__.__name__}: {exc}")
        return EXIT_ERROR


def _reader_gone() -> int:
    """Stdout's reader went away (`s3fuse ... | head`): stop quietly with the status a
    tool killed by SIGPIPE has, as `cat` and `ls` do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _error_line(text: str) -> None:
    # under the journal, an error priority: `journalctl -p err` finds why a mount failed
    print(f"{'<3>' if _under_journal() else ''}s3fuse: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

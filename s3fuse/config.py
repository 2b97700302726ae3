"""The mount configuration file (TOML), pure: parse, validate, merge with the command line.

One file per mount (`/etc/s3fuse/NAME.toml` for the systemd unit `s3fuse@NAME`). Every
key is listed in SCHEMA with its type and a check; an unknown key or a bad value is a
`ConfigError` whose message names the file, the key and the reason on one line
("FILE: mount.cache_mib: must be a positive whole number (got 'lots')"). The keys and
their defaults are documented in docs/CONFIG.md.

Nothing here touches the store or the daemon: `load` reads one file and returns a
`FileConfig`; `resolve` merges it with the command-line values (which win) into the
settings the mount command uses.
"""

from __future__ import annotations

import errno
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import defaults, durations, policy
from .errors import S3fuseError

LOG_LEVELS = defaults.LOG_LEVELS
KMS_PROVIDERS = ("builtin", "transit")
BACKEND_TYPES = ("local", "s3")


class ConfigError(S3fuseError):
    errno = errno.EINVAL


class _Bad(Exception):
    """A value failed its check; the message is the reason (the caller adds file and key)."""


# -- value checks: each returns the normalised value or raises _Bad -------------------------

def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string (got {_show(value)})")
    if not value or "\0" in value:
        raise _Bad("must be a non-empty string")
    return value


def _abs_path(value: Any) -> str:
    value = _string(value)
    if not os.path.isabs(value):
        raise _Bad(f"must be an absolute path (got {value!r})")
    return os.path.normpath(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false (got {_show(value)})")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"must be a positive whole number (got {_show(value)})")
    if value <= 0:
        raise _Bad(f"must be a positive whole number (got {value})")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"must be a whole number, 0 or more (got {_show(value)})")
    return value


def _mib(value: Any) -> int:
    """A size in MiB, returned in bytes."""
    n = _positive_int(value)
    if n > 1 << 20:
        raise _Bad(f"{n} MiB is more than 1 TiB")
    return n << 20


def _duration(value: Any) -> float:
    """Seconds, longer than zero: a number, or a string such as "90d", "12h", "30m", "45s"."""
    try:
        return durations.parse_positive(value)
    except durations.DurationError as exc:
        raise _Bad(str(exc)) from None


def _interval(value: Any) -> float:
    """A rotation interval: a duration, or 0 / "never" for no scheduled rotation."""
    try:
        return durations.parse_interval(value)
    except durations.DurationError as exc:
        raise _Bad(str(exc)) from None


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = _string(value)
        if value not in choices:
            raise _Bad(f"must be one of {', '.join(choices)} (got {value!r})")
        return value
    return check


def _sse(value: Any) -> str:
    """A store-wide default encryption: AES256, aws:kms:KEY or SSE-C:FINGERPRINT."""
    value = _string(value)
    try:
        mode, ref = policy.parse(value.encode())
    except S3fuseError as exc:
        raise _Bad(str(exc)) from None
    if mode == policy.SSE_KMS and not ref:
        raise _Bad("name the KMS key: aws:kms:KEY-ID or aws:kms:alias/NAME")
    if mode == policy.SSE_C and not policy.is_fingerprint(ref):
        raise _Bad("SSE-C needs the key's fingerprint here (customer key names belong to one uid)")
    return value


def _url(value: Any) -> str:
    value = _string(value)
    if not re.match(r"^https?://[^/\s]+", value):
        raise _Bad(f"must be an http:// or https:// URL (got {value!r})")
    return value.rstrip("/")


def _name(value: Any) -> str:
    """A credential or key name: a file name, no path."""
    value = _string(value)
    if "/" in value or value in (".", "..") or len(value) > 255:
        raise _Bad(f"must be a plain name, not a path (got {value!r})")
    return value


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:40]}" if not isinstance(value, (list, dict)) else kind


# -- the schema: section -> key -> check ------------------------------------------------------

SCHEMA: dict[str, dict[str, Callable[[Any], Any]]] = {
    "store": {
        "path": _abs_path,
        "root_key_file": _abs_path,
        "root_key_credential": _name,
        "passphrase_file": _abs_path,
    },
    "mount": {
        "mountpoint": _abs_path,
        "allow_other": _bool,
        "readahead_kib": _positive_int,
    },
    "encryption": {
        "default_sse": _sse,
        "rotation_interval": _interval,
    },
    "cache": {
        "dirty_limit_mib": _mib,
        "cache_mib": _mib,
    },
    "audit": {
        "path": _abs_path,
    },
    "log": {
        "level": _one_of(*LOG_LEVELS),
        "file": _abs_path,
    },
    # Settings of the KMS, in store.json "kms"'s vocabulary (docs/TRANSIT.md), overriding the
    # store's field by field; "transit" is the Transit engine of Vault/OpenBao.
    "kms": {
        "provider": _one_of(*KMS_PROVIDERS),
        "address": _url,
        "token_file": _abs_path,
        "token_credential": _name,
        "mount": _name,
        "default_key": _name,
        "timeout": _duration,
        "attempts": _positive_int,
        "backoff": _duration,
        "backoff_max": _duration,
        "concurrency": _positive_int,
        "cache_ttl": _duration,
        "ca_file": _abs_path,
    },
    # The S3 API endpoint in the daemon (docs/S3API.md)
    "s3api": {
        "listen": _string,
        "tls_cert": _abs_path,
        "tls_key": _abs_path,
        "header_timeout": _duration,
        "body_timeout": _duration,
        "idle_timeout": _duration,
        "connections_per_client": _positive_int,
    },
    # Settings of an S3 store, in store.json "backend"'s vocabulary (docs/S3.md), merged over
    # the store's. The store's identity (type, bucket, prefix) is fixed at init: not here.
    "backend": {
        "endpoint_url": _url,
        "region": _string,
        "profile": _string,
        "max_requests": _positive_int,
        "retry_budget": _duration,
        "cache_mib": _non_negative_int,
        "cache_writes_upto_kib": _non_negative_int,
        "multipart_threshold_mib": _positive_int,
        "snapshot_interval": _duration,
        "metadata_sync_seconds": _duration,
        "lease_seconds": _duration,
    },
}


@dataclass
class FileConfig:
    """One configuration file, validated. Absent keys are None (or empty tables)."""

    path: str
    store: str | None = None
    root_key_file: str | None = None
    root_key_credential: str | None = None
    passphrase_file: str | None = None
    mountpoint: str | None = None
    allow_other: bool | None = None
    readahead_kb: int | None = None
    default_sse: str | None = None
    rotation_interval: float | None = None
    dirty_limit: int | None = None
    cache_limit: int | None = None
    audit_path: str | None = None
    log_level: str | None = None
    log_file: str | None = None
    kms: dict | None = None
    backend: dict = field(default_factory=dict)
    s3api: dict | None = None


# (section, key) -> FileConfig attribute, where the names differ
_ATTR = {
    ("store", "path"): "store",
    ("mount", "readahead_kib"): "readahead_kb",
    ("cache", "dirty_limit_mib"): "dirty_limit",
    ("cache", "cache_mib"): "cache_limit",
    ("audit", "path"): "audit_path",
    ("log", "level"): "log_level",
    ("log", "file"): "log_file",
}


def parse(text: str, path: str) -> FileConfig:
    """Validate the TOML text of the file at `path` (used in messages only)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = FileConfig(path=path)
    for section, table in raw.items():
        schema = SCHEMA.get(section)
        if schema is None:
            raise ConfigError(f"{path}: {section}: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: must be a table ([{section}])")
        values = {}
        for key, value in table.items():
            check = schema.get(key)
            if check is None:
                raise ConfigError(f"{path}: {section}.{key}: unknown key (known in [{section}]: "
                                  f"{', '.join(schema)})")
            try:
                values[key] = check(value)
            except _Bad as exc:
                raise ConfigError(f"{path}: {section}.{key}: {exc}") from None
        if section == "kms":
            if (values.get("provider") == "transit" and "address" not in values
                    and not (os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR"))):
                raise ConfigError(f"{path}: kms.address: required for provider = \"transit\" "
                                  "(or set VAULT_ADDR)")
            if "token_file" in values and "token_credential" in values:
                raise ConfigError(f"{path}: kms.token_credential: give token_file or token_credential, not both")
            cfg.kms = values
        elif section == "backend":
            cfg.backend = values
        elif section == "s3api":
            if ("tls_cert" in values) != ("tls_key" in values):
                raise ConfigError(f"{path}: s3api.tls_key: give tls_cert and tls_key together")
            cfg.s3api = values
        else:
            for key, value in values.items():
                setattr(cfg, _ATTR.get((section, key), key), value)
    sources = [k for k in ("root_key_file", "root_key_credential", "passphrase_file") if getattr(cfg, k)]
    if len(sources) > 1:
        raise ConfigError(f"{path}: store.{sources[1]}: give one root-key source, not "
                          f"{' and '.join(sources)}")
    return cfg


def load(path: str) -> FileConfig:
    """Read and validate a configuration file; ConfigError (one line) if anything is wrong."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}",
                          exc.errno or errno.EINVAL) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, path)


# -- merging with the command line --------------------------------------------------------------

DEFAULTS = defaults.MOUNT


@dataclass
class MountSettings:
    """Everything `s3fuse mount` needs, after the file and the command line are merged."""

    store: str
    mountpoint: str
    allow_other: bool
    dirty_limit: int
    cache_limit: int
    readahead_kb: int
    log_level: str
    log_file: str | None = None
    root_key_file: str | None = None
    root_key_credential: str | None = None
    passphrase_file: str | None = None
    default_sse: str | None = None
    rotation_interval: float | None = None
    audit_path: str | None = None
    kms: dict | None = None
    backend: dict = field(default_factory=dict)
    config_path: str | None = None
    s3api: dict | None = None  # [s3api], with the command line's --s3-api as its listen


def resolve(cli: dict[str, Any], file: FileConfig | None) -> MountSettings:
    """Command-line values (None = not given) win over the file, the file over DEFAULTS."""
    def pick(name: str) -> Any:
        if cli.get(name) is not None:
            return cli[name]
        value = getattr(file, name, None) if file is not None else None
        return value if value is not None else DEFAULTS.get(name)

    where = f" in {file.path}" if file is not None else ""
    store, mountpoint = pick("store"), pick("mountpoint")
    if store is None:
        raise ConfigError(f"no store: give STORE on the command line or store.path{where}")
    if mountpoint is None:
        raise ConfigError(f"no mount point: give MOUNTPOINT on the command line or mount.mountpoint{where}")
    if cli.get("root_key_file") is not None or cli.get("passphrase_file") is not None:
        key_sources = {"root_key_file": cli.get("root_key_file"), "passphrase_file": cli.get("passphrase_file"),
                       "root_key_credential": None}
    else:
        key_sources = {k: getattr(file, k, None) if file else None
                       for k in ("root_key_file", "passphrase_file", "root_key_credential")}
    return MountSettings(
        store=store, mountpoint=mountpoint,
        allow_other=pick("allow_other"), dirty_limit=pick("dirty_limit"), cache_limit=pick("cache_limit"),
        readahead_kb=pick("readahead_kb"), log_level=pick("log_level"), log_file=pick("log_file"),
        default_sse=pick("default_sse"), rotation_interval=pick("rotation_interval"),
        audit_path=pick("audit_path"),
        kms=file.kms if file is not None else None,
        backend=dict(file.backend) if file is not None else {},
        config_path=file.path if file is not None else None,
        s3api=_s3api(cli.get("s3_api"), file),
        **key_sources,
    )


def _s3api(listen: str | None, file: FileConfig | None) -> dict | None:
    table = dict(file.s3api) if file is not None and file.s3api is not None else None
    if listen is not None:
        table = {**(table or {}), "listen": listen}
    if table is not None and "listen" not in table:
        raise ConfigError(f"{file.path}: s3api.listen: required (HOST:PORT) to serve the S3 API")
    return table

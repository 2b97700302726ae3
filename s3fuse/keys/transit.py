"""SSE-KMS keys held by an external KMS: the Transit secrets engine of Vault or OpenBao.

The filesystem sees a `KmsProvider`, as for the built-in KMS; here each call is an
HTTP request to the Transit engine (docs/TRANSIT.md):

    generate_data_key -> POST {mount}/datakey/plaintext/NAME  {"context": b64(ctx)}
    decrypt           -> POST {mount}/decrypt/NAME            {"ciphertext", "context"}
    rotate            -> POST {mount}/keys/NAME/rotate
    rewrap            -> POST {mount}/rewrap/NAME             {"batch_input": [...]}
    authorize         -> POST sys/capabilities-self (cached for `cache_ttl` seconds)

Key ids are ``transit:NAME``: the id stored with every object names its provider, so one
store can hold objects under built-in and Transit keys side by side.

Binding. Transit's `datakey` endpoint takes no associated data, so the encryption context
(store, object, inode, block: what the built-in KMS binds as AAD) is sent as the key
*derivation context*: s3fuse's Transit keys are created with ``derived=true``, and Transit
derives a per-context key (HKDF) to wrap each data key, so a wrapped key moved to another
object does not unwrap. A non-derived key would ignore the context: it is refused when
the token may read the key's metadata.

Ciphertext blob (the object's key slot; docs/FORMAT.md, "Transit key slots")::

    "TRN1" | u16be len(name) | name (utf-8) | Transit ciphertext (ascii "vault:vN:<base64>")

Errors map like the built-in KMS: permission denied (403) -> EACCES; no such key ->
ENOKEY; a ciphertext older than the key's min_decryption_version -> EKEYEXPIRED; a
ciphertext or context that does not authenticate -> EIO; server unreachable, sealed or
failing after a bounded number of attempts with exponential backoff and jitter -> EIO.
Each failure is logged once, by this module; an outage is logged when it starts and ends.

Every method blocks on the network (`blocking = True`): the filesystem calls them from
trio worker threads, at most `concurrency` at a time (`limiter`). The HTTP client keeps
one keep-alive connection per worker thread. The token never appears in a repr, log or
error message, and plaintext data keys are never logged or cached here (the filesystem
keeps opened objects in its bounded in-memory cache).
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import logging
import os
import re
import ssl
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import KmsUnavailable, S3fuseError
from ..retry import full_jitter
from .breaker import CircuitBreaker
from .kms import KEY_LEN, KmsProvider, Principal, canonical_context, policy_allows, validate_policy

log = logging.getLogger(__name__)

PROVIDER = "transit"
PREFIX = "transit:"
BLOB_MAGIC = b"TRN1"
# Prefixed to the canonical context so a Transit key shared with other applications
# never derives the same key for their contexts as for ours.
CONTEXT_PREFIX = b"s3fuse/v1/transit-datakey"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_CIPHERTEXT_RE = re.compile(r"vault:v([0-9]{1,10}):[A-Za-z0-9+/=]+")
MAX_LIST = 1000
REWRAP_BATCH = 64


def _error(message: str, err: int) -> S3fuseError:
    return S3fuseError(message, err)


# --------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------

@dataclass
class TransitSettings:
    """Where the Transit engine is and how to talk to it (store.json "kms", docs/TRANSIT.md)."""

    address: str
    token: str = field(repr=False)
    mount: str = "transit"
    timeout: float = 10.0  # seconds per HTTP request (connect and read)
    attempts: int = 4  # tries per call before EIO
    budget: float = 5.0  # seconds per call in all, its retries included
    backoff: float = 0.2  # first retry delay in seconds; doubles, with full jitter
    backoff_max: float = 2.0
    concurrency: int = 4  # calls in flight at once (worker threads)
    cache_ttl: float = 10.0  # seconds an authorization or key-metadata answer is reused
    default_key: str | None = None  # the key plain "aws:kms" uses when Transit is the default
    ca_file: str | None = None
    # optional per-key uid/gid policies checked by s3fuse before Vault is asked (docs/TRANSIT.md)
    policies: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_config(cls, kms: dict, base_dir: str | None = None,
                    env: dict[str, str] | None = None) -> "TransitSettings":
        """Settings from a store's "kms" section, with VAULT_*/BAO_* environment fallbacks."""
        env = os.environ if env is None else env
        address = kms.get("address") or env.get("VAULT_ADDR") or env.get("BAO_ADDR")
        if not address:
            raise _error("the Transit KMS needs an address: set \"address\" in the store's \"kms\" "
                         "settings, or VAULT_ADDR (or BAO_ADDR)", errno.EINVAL)
        token = None
        token_file = kms.get("token_file")
        if token_file:
            path = token_file if os.path.isabs(token_file) or base_dir is None \
                else os.path.join(base_dir, token_file)
            try:
                with open(path) as f:
                    if os.fstat(f.fileno()).st_mode & 0o077:
                        log.warning("the Transit token file %s is readable by other users; "
                                    "chmod 600 it", path)
                    token = f.read().strip()
            except OSError as exc:
                raise _error(f"cannot read the Transit token file {path}: {exc.strerror}",
                             exc.errno or errno.EIO) from None
        token = token or env.get("VAULT_TOKEN") or env.get("BAO_TOKEN")
        if not token:
            raise _error("the Transit KMS needs a token: set \"token_file\" in the store's \"kms\" "
                         "settings, or VAULT_TOKEN (or BAO_TOKEN)", errno.EINVAL)
        try:
            settings = cls(
                address=str(address).rstrip("/"),
                token=token,
                mount=str(kms.get("mount", "transit")).strip("/"),
                timeout=float(kms.get("timeout", 10.0)),
                attempts=int(kms.get("attempts", 4)),
                budget=float(kms.get("budget", 5.0)),
                backoff=float(kms.get("backoff", 0.2)),
                backoff_max=float(kms.get("backoff_max", 2.0)),
                concurrency=int(kms.get("concurrency", 4)),
                cache_ttl=float(kms.get("cache_ttl", 10.0)),
                default_key=kms.get("default_key"),
                ca_file=kms.get("ca_file"),
                policies=_local_policies(kms.get("policies") or {}),
            )
        except (TypeError, ValueError) as exc:
            raise _error(f"malformed Transit KMS settings: {exc}", errno.EINVAL) from None
        url = urllib.parse.urlsplit(settings.address)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise _error(f"the Transit address must be http(s)://HOST[:PORT], not {address!r}",
                         errno.EINVAL)
        if not (settings.timeout > 0 and 1 <= settings.attempts <= 20 and settings.backoff >= 0
                and settings.budget > 0
                and 1 <= settings.concurrency <= 64 and settings.cache_ttl >= 0):
            raise _error("Transit KMS settings out of range (timeout > 0, attempts 1..20, budget > 0, "
                         "backoff >= 0, concurrency 1..64, cache_ttl >= 0)", errno.EINVAL)
        if settings.default_key is not None:
            check_name(settings.default_key)
        return settings


def _local_policies(raw: Any) -> dict[str, dict]:
    """{"NAME": {"encrypt": {...}, "decrypt": {...}}} -> normalised built-in-style policies."""
    if not isinstance(raw, dict):
        raise _error("Transit \"policies\" must map key names to policies", errno.EINVAL)
    out = {}
    for name, policy in raw.items():
        check_name(name)
        if not isinstance(policy, dict) or not {"encrypt", "decrypt"} <= set(policy):
            raise _error(f"the policy of Transit key {name} needs \"encrypt\" and \"decrypt\" "
                         "sections", errno.EINVAL)
        out[name] = validate_policy({"admin": {"uids": [0]}, **policy})
    return out


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _error(f"invalid Transit key name {name!r}: use 1-128 of A-Z a-z 0-9 _ . -",
                     errno.EINVAL)
    return name


# --------------------------------------------------------------------------
# blobs and contexts (pure)
# --------------------------------------------------------------------------

def encode_blob(name: str, ciphertext: str) -> bytes:
    n = name.encode()
    return BLOB_MAGIC + struct.pack(">H", len(n)) + n + ciphertext.encode("ascii")


def parse_blob(blob: bytes) -> tuple[str, str, int]:
    """Split a Transit key slot -> (key name, Transit ciphertext, key version); EIO if malformed."""
    bad = _error("Transit ciphertext blob is malformed", errno.EIO)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise bad
    blob = bytes(blob)
    if len(blob) < 6 or blob[:4] != BLOB_MAGIC:
        raise bad
    (n,) = struct.unpack_from(">H", blob, 4)
    try:
        name = blob[6:6 + n].decode()
        ciphertext = blob[6 + n:].decode("ascii")
    except UnicodeDecodeError:
        raise bad from None
    m = _CIPHERTEXT_RE.fullmatch(ciphertext)
    if len(name) != n or not _NAME_RE.fullmatch(name) or m is None:
        raise bad
    return name, ciphertext, int(m.group(1))


def is_blob(blob: bytes) -> bool:
    return bytes(blob[:4]) == BLOB_MAGIC


def derivation_context(context: dict[str, str]) -> str:
    """The encryption context as Transit's base64 derivation context."""
    return base64.b64encode(CONTEXT_PREFIX + canonical_context(context)).decode()


def key_id(name: str) -> str:
    return PREFIX + name


def name_of(key: str) -> str:
    """"transit:NAME" or "NAME" -> NAME (checked)."""
    if not isinstance(key, str):
        raise _error(f"invalid Transit key {key!r}", errno.EINVAL)
    return check_name(key[len(PREFIX):] if key.startswith(PREFIX) else key)


def classify(status: int, messages: list[str]) -> int:
    """The errno for a non-retryable Transit error answer."""
    text = " ".join(messages).lower()
    if status in (401, 403) or "permission denied" in text:
        return errno.EACCES
    if status == 404 or "key not found" in text or "no existing key" in text:
        return errno.ENOKEY
    if "disallowed by policy" in text or "too old" in text:
        return errno.EKEYEXPIRED
    if "message authentication failed" in text or "invalid ciphertext" in text \
            or "invalid version" in text:
        return errno.EIO
    return errno.EINVAL


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class TransitUnreachable(KmsUnavailable):
    """No usable answer after every attempt (network error, timeout, 5xx, 429)."""


class TransitClient:
    """A minimal Vault/OpenBao HTTP API client: JSON in and out, retries, keep-alive.

    One connection per thread (http.client connections are not thread-safe); calls
    are made from worker threads, so sleeping between attempts blocks nobody else.
    """

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, settings: TransitSettings,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        url = urllib.parse.urlsplit(settings.address)
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._base = url.path.rstrip("/")
        self._local = threading.local()
        self._sleep = sleep
        self._ssl = ssl.create_default_context(cafile=settings.ca_file) if self._https else None

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port,
                                                   timeout=self.settings.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.settings.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number `attempt` (1-based)."""
        return full_jitter(attempt, self.settings.backoff, self.settings.backoff_max)

    def request(self, method: str, path: str, body: dict | None = None,
                idempotent: bool = True, attempts: int | None = None,
                budget: float | None = None) -> tuple[int, dict]:
        """-> (HTTP status, decoded JSON body or {}); TransitUnreachable after the retry budget:
        `attempts` tries within `budget` seconds in all (each try's timeout is cut to fit).

        A call that must not run twice (`idempotent=False`, e.g. rotate) is retried only when
        the server surely did not act on it: connection refused, 429, 503 (sealed, standby)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"X-Vault-Token": self.settings.token, "X-Vault-Request": "true"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        why = ""
        attempt = 0
        tries = attempts or self.settings.attempts
        deadline = time.monotonic() + (budget or self.settings.budget)
        while attempt < tries:
            attempt += 1
            if attempt > 1:
                pause = self.delay(attempt - 1)
                if time.monotonic() + pause >= deadline:
                    attempt -= 1
                    break
                self._sleep(pause)
            left = deadline - time.monotonic()
            if left <= 0:
                attempt -= 1
                break
            reused = getattr(self._local, "conn", None) is not None
            try:
                conn = self._connection()
                conn.timeout = min(self.settings.timeout, left)
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
                conn.request(method, f"{self._base}/v1/{path}", body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if reused and isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError,
                                               ConnectionResetError)):
                    attempt -= 1  # an idle keep-alive connection the server closed: not an attempt
                elif not idempotent and not isinstance(exc, ConnectionRefusedError):
                    break
                continue
            if resp.will_close:
                self._drop()
            try:
                decoded = json.loads(raw) if raw else {}
            except ValueError:
                decoded = {}
            if not isinstance(decoded, dict):
                decoded = {}
            if status in self.RETRY_STATUS:
                why = f"HTTP {status}: {'; '.join(map(str, decoded.get('errors') or []))[:200]}"
                if not idempotent and status not in (429, 503):
                    break
                continue
            return status, decoded
        raise TransitUnreachable(
            f"Transit KMS at {self.settings.address} did not answer {method} {path} "
            f"after {attempt} attempt{'s' if attempt != 1 else ''} in "
            f"{budget or self.settings.budget:g} s ({why or 'out of time'})")


# --------------------------------------------------------------------------
# the provider
# --------------------------------------------------------------------------

class TransitKms(KmsProvider):
    """SSE-KMS keys in a Vault/OpenBao Transit engine (see the module docstring)."""

    name = PROVIDER
    blocking = True

    def __init__(self, settings: TransitSettings, client: TransitClient | None = None) -> None:
        self.settings = settings
        self.client = client or TransitClient(settings)
        self._lock = threading.Lock()
        self._cache: dict[tuple, tuple[float, Any]] = {}
        # one call without an answer: the others fail at once while a probe checks the server
        self.breaker = CircuitBreaker(f"Transit KMS at {settings.address}", self._probe)
        self._limiter = None

    @property
    def limiter(self):
        """Bounds the worker threads making Transit calls (created in the trio run)."""
        if self._limiter is None:
            import trio
            self._limiter = trio.CapacityLimiter(self.settings.concurrency)
        return self._limiter

    # ---- plumbing ------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.settings.mount, *parts])

    def _call(self, what: str, method: str, path: str, body: dict | None = None,
              ok: tuple[int, ...] = (200, 204), quiet: bool = False, idempotent: bool = True,
              attempts: int | None = None) -> dict:
        """One API call -> its "data"; any failure raised as S3fuseError and logged once
        (here, unless `quiet`: then the caller reports it)."""
        refusal = self.breaker.refusal()
        if refusal is not None:
            raise TransitUnreachable(f"{what}: {refusal}")
        try:
            status, answer = self.client.request(method, path, body, idempotent=idempotent,
                                                 attempts=attempts)
        except TransitUnreachable as exc:
            self.breaker.failed(str(exc))  # logs the outage once
            raise TransitUnreachable(f"{what}: {exc}") from None
        self.breaker.succeeded()
        if status in ok:
            data = answer.get("data")
            return data if isinstance(data, dict) else {}
        messages = [str(m) for m in (answer.get("errors") or [])]
        err = classify(status, messages)
        detail = "; ".join(m.strip().replace("\n", " ") for m in messages if m.strip())[:300]
        message = f"{what}: {os.strerror(err)} (HTTP {status}{': ' + detail if detail else ''})"
        if not quiet:
            log.warning("%s", message)
        raise S3fuseError(message, err)

    def _probe(self) -> None:
        """Does the server answer at all? (Any HTTP answer but 429/5xx; one short try.)"""
        self.client.request("GET", "sys/health", attempts=1,
                            budget=min(self.settings.timeout, self.settings.budget, 2.0))

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._cache) >= 1024:
                self._cache.clear()
            self._cache[key] = (now + self.settings.cache_ttl, value)
        return value

    def forget(self, name: str | None = None) -> None:
        """Drop cached authorizations and metadata (of one key, or all)."""
        with self._lock:
            if name is None:
                self._cache.clear()
            else:
                for k in [k for k in self._cache if k[1] == name]:
                    del self._cache[k]

    def _capabilities(self, path: str) -> list[str]:
        data = self._call(f"Transit capability check on {path}", "POST",
                          "sys/capabilities-self", {"paths": [path]})
        caps = data.get(path, data.get("capabilities", []))
        return [str(c) for c in caps] if isinstance(caps, list) else []

    def _metadata(self, name: str) -> dict | None:
        """Key metadata (cached), or None if this token may not read it; ENOKEY if absent."""
        def fetch() -> dict | None:
            try:
                return self._call(f"Transit key {name}", "GET", self._path("keys", name), quiet=True)
            except S3fuseError as exc:
                if exc.errno == errno.EACCES:
                    return None  # a token may use a key without reading it: not a failure
                if not isinstance(exc, KmsUnavailable):  # an outage: the breaker logged it
                    log.warning("%s", exc)
                raise
        return self._cached(("meta", name), fetch)

    def check_token(self) -> dict:
        """Ask the server who the token is (at init and mount; one attempt, so a KMS that is
        down does not hold the mount up): EACCES if it rejects the token."""
        return self._call("Transit token check", "GET", "auth/token/lookup-self", quiet=True,
                          attempts=1)

    def _check_local_policy(self, name: str, action: str, who: Principal) -> None:
        """The s3fuse-side policy of a key, if the store gives it one (root always passes)."""
        policy = self.settings.policies.get(name)
        if policy is not None and not policy_allows(policy, action, who):
            exc = _error(f"uid {who.uid} may not {action} with Transit key {name}: "
                         "denied by the key's s3fuse policy", errno.EACCES)
            log.warning("%s", exc)
            raise exc

    @staticmethod
    def _require_admin(who: Principal, action: str, name: str) -> None:
        # Every uid shares the daemon's token: only root may change keys through s3fuse.
        if who.uid != 0:
            raise _error(f"uid {who.uid} may not {action} Transit key {name}: "
                         "only root administers Transit keys through s3fuse", errno.EACCES)

    # ---- KmsProvider ---------------------------------------------------

    def resolve(self, key: str) -> str:
        return key_id(name_of(key))

    def default_key(self, who: Principal, now: float | None = None) -> str:
        if not self.settings.default_key:
            raise _error("no default Transit key is configured (set \"default_key\" in the "
                         "store's \"kms\" settings, or name a key: aws:kms:transit:NAME)", errno.ENOKEY)
        return key_id(self.settings.default_key)

    def describe(self, key: str) -> dict:
        name = name_of(key)
        self.forget(name)  # describe always asks afresh
        meta = self._metadata(name)
        if meta is None:
            # The token may use the key but not read it: report what is known.
            self.authorize(key, "encrypt", Principal(0, 0))
            return {"id": key_id(name), "provider": PROVIDER, "name": name, "alias": None,
                    "state": "Enabled", "description": "(metadata not readable with this token)",
                    "current_version": None, "versions": [], "managed": False}
        return self._describe(name, meta)

    @staticmethod
    def _describe(name: str, meta: dict) -> dict:
        keys = meta.get("keys") or {}
        versions = sorted(int(v) for v in keys)
        created = min((int(t) for t in keys.values() if isinstance(t, (int, float))), default=None)
        period = meta.get("auto_rotate_period") or 0
        return {
            "id": key_id(name),
            "provider": PROVIDER,
            "name": name,
            "alias": None,
            "description": f"Transit key ({meta.get('type', '?')}"
                           f"{', derived' if meta.get('derived') else ', NOT derived'})",
            "state": "Enabled",
            "created": created,
            "type": meta.get("type"),
            "derived": bool(meta.get("derived")),
            "versions": versions,
            "current_version": meta.get("latest_version"),
            "min_decryption_version": meta.get("min_decryption_version"),
            "min_encryption_version": meta.get("min_encryption_version"),
            "deletion_allowed": bool(meta.get("deletion_allowed")),
            "rotation": {"enabled": bool(period), "period_seconds": int(period)},
            "managed": False,
        }

    def authorize(self, key: str, action: str, who: Principal) -> str:
        """May the daemon's token `action` with the key? (Vault's ACL decides; cached.)

        Also ENOKEY for a key known to be absent, when the token may read metadata."""
        if action not in ("encrypt", "decrypt"):
            raise _error(f"unknown KMS action {action!r}", errno.EINVAL)
        name = name_of(key)
        self._check_local_policy(name, action, who)
        path = self._path("datakey/plaintext", name) if action == "encrypt" \
            else self._path("decrypt", name)
        caps = self._cached(("caps", name, action), lambda: self._capabilities(path))
        if not ({"update", "root", "sudo"} & set(caps)):
            exc = _error(f"the Transit token may not {action} with key {name} "
                         f"(its capabilities on {path}: {', '.join(caps) or 'none'})", errno.EACCES)
            log.warning("%s", exc)
            raise exc
        meta = self._metadata(name)
        if action == "encrypt":
            self._require_derived(name, meta)
        return key_id(name)

    @staticmethod
    def _require_derived(name: str, meta: dict | None) -> None:
        if meta is not None and not meta.get("derived"):
            exc = _error(f"Transit key {name} is not a derived key: s3fuse binds every data key "
                         "to its object with a derivation context (create keys with "
                         "'s3fuse kms create-key --transit NAME', or derived=true)", errno.EINVAL)
            log.warning("%s", exc)
            raise exc

    def generate_data_key(self, key: str, context: dict[str, str],
                          who: Principal) -> tuple[bytes, bytes, str, int]:
        name = name_of(key)
        self._check_local_policy(name, "encrypt", who)
        self._require_derived(name, self._metadata(name))
        data = self._call(f"Transit data key from {name}", "POST",
                          self._path("datakey/plaintext", name),
                          {"context": derivation_context(context), "bits": KEY_LEN * 8})
        try:
            plaintext = base64.b64decode(data["plaintext"], validate=True)
            ciphertext = str(data["ciphertext"])
            blob = encode_blob(name, ciphertext)
            _, _, version = parse_blob(blob)
        except (KeyError, ValueError, TypeError, S3fuseError):
            raise _error(f"Transit data key from {name}: malformed answer", errno.EIO) from None
        if len(plaintext) != KEY_LEN:
            raise _error(f"Transit data key from {name}: {len(plaintext)} bytes, not {KEY_LEN}",
                         errno.EIO)
        return plaintext, blob, key_id(name), version

    def decrypt(self, blob: bytes, context: dict[str, str],
                who: Principal) -> tuple[bytes, str, int]:
        name, ciphertext, version = parse_blob(blob)
        self._check_local_policy(name, "decrypt", who)
        data = self._call(f"Transit decrypt with {name} v{version}", "POST",
                          self._path("decrypt", name),
                          {"ciphertext": ciphertext, "context": derivation_context(context)})
        try:
            plaintext = base64.b64decode(data["plaintext"], validate=True)
        except (KeyError, ValueError, TypeError):
            raise _error(f"Transit decrypt with {name}: malformed answer", errno.EIO) from None
        if len(plaintext) != KEY_LEN:
            raise _error(f"Transit decrypt with {name}: not a {KEY_LEN}-byte data key", errno.EIO)
        return plaintext, key_id(name), version

    # ---- re-wrapping (no plaintext leaves Transit) ------------------------

    def rewrap(self, name: str, items: list[tuple[bytes, dict[str, str]]]) -> list[tuple[bytes, int] | S3fuseError]:
        """Re-wrap key slots under the key's latest version -> per item (new blob, version) or error."""
        name = check_name(name)
        out: list[tuple[bytes, int] | S3fuseError] = []
        for i in range(0, len(items), REWRAP_BATCH):
            chunk = items[i:i + REWRAP_BATCH]
            batch = []
            for blob, context in chunk:
                blob_name, ciphertext, _ = parse_blob(blob)
                if blob_name != name:
                    raise _error(f"key slot names Transit key {blob_name}, not {name}", errno.EINVAL)
                batch.append({"ciphertext": ciphertext, "context": derivation_context(context)})
            data = self._call(f"Transit rewrap with {name}", "POST", self._path("rewrap", name),
                              {"batch_input": batch}, ok=(200, 204))
            results = data.get("batch_results") or []
            if len(results) != len(chunk):
                raise _error(f"Transit rewrap with {name}: {len(results)} answers for "
                             f"{len(chunk)} key slots", errno.EIO)
            for res in results:
                if res.get("error"):
                    err = classify(400, [str(res["error"])])
                    out.append(_error(f"Transit rewrap with {name}: {res['error']}", err))
                    continue
                try:
                    new = encode_blob(name, str(res["ciphertext"]))
                    out.append((new, parse_blob(new)[2]))
                except (KeyError, S3fuseError):
                    out.append(_error(f"Transit rewrap with {name}: malformed answer", errno.EIO))
        return out

    # ---- administration ------------------------------------------------

    def create_key(self, who: Principal, name: str) -> dict:
        """A new derived aes256-gcm96 key -> its description; EEXIST if it exists."""
        name = check_name(name)
        self._require_admin(who, "create", name)
        self.forget(name)
        try:
            self._call(f"Transit key {name}", "GET", self._path("keys", name), quiet=True)
        except S3fuseError as exc:
            if exc.errno != errno.ENOKEY:
                raise
        else:
            raise _error(f"Transit key {name} already exists", errno.EEXIST)
        self._call(f"create Transit key {name}", "POST", self._path("keys", name),
                   {"type": "aes256-gcm96", "derived": True})
        self.forget(name)
        return self.describe(name)

    def list_keys(self) -> list[dict]:
        try:
            data = self._call("list Transit keys", "GET", self._path("keys") + "?list=true", quiet=True)
        except S3fuseError as exc:
            if exc.errno == errno.ENOKEY:  # Transit answers 404 for an empty list
                return []
            raise
        names = data.get("keys") or []
        return [self.describe(n) for n in names[:MAX_LIST] if _NAME_RE.fullmatch(str(n))]

    def rotate(self, key: str, who: Principal, now: float | None = None) -> dict:
        name = name_of(key)
        self._require_admin(who, "rotate", name)
        self._call(f"rotate Transit key {name}", "POST", self._path("keys", name, "rotate"),
                   idempotent=False)  # a retried rotate could add two versions
        self.forget(name)
        return self.describe(name)

    def set_min_decryption_version(self, key: str, version: int, who: Principal) -> dict:
        name = name_of(key)
        self._require_admin(who, "configure", name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _error("min_decryption_version must be a positive integer", errno.EINVAL)
        self._call(f"set min_decryption_version of Transit key {name}", "POST",
                   self._path("keys", name, "config"), {"min_decryption_version": version})
        self.forget(name)
        return self.describe(name)

    def enable_rotation(self, key: str, days: int, who: Principal, now: float | None = None) -> dict:
        name = name_of(key)
        self._require_admin(who, "enable rotation of", name)
        if not isinstance(days, int) or not 1 <= days <= 2560:
            raise _error("the rotation period in days must be from 1 to 2560", errno.EINVAL)
        self._call(f"enable rotation of Transit key {name}", "POST",
                   self._path("keys", name, "config"), {"auto_rotate_period": f"{days * 24}h"})
        self.forget(name)
        return self.describe(name)

    def disable_rotation(self, key: str, who: Principal) -> dict:
        name = name_of(key)
        self._require_admin(who, "disable rotation of", name)
        self._call(f"disable rotation of Transit key {name}", "POST",
                   self._path("keys", name, "config"), {"auto_rotate_period": "0"})
        self.forget(name)
        return self.describe(name)

    def unsupported(self, action: str, key: str) -> S3fuseError:
        return _error(f"cannot {action} Transit key {name_of(key)} through s3fuse: "
                      "administer it in Vault/OpenBao", errno.EOPNOTSUPP)

    # the built-in KMS's scheduler duties: Transit rotates by itself (auto_rotate_period)
    def rotate_due(self, now: float | None = None) -> list[str]:
        return []

    def purge_expired(self, now: float | None = None) -> list[str]:
        return []

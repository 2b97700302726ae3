"""Where the root key comes from: a key file, a passphrase, or a systemd credential.

The root key (32 bytes) seals the SSE-S3 keyring and the built-in KMS keystore. Its
source is recorded in `store.json` under `"root_key"` (docs/FORMAT.md, "Root key"):

- ``{"source": "file", "path": P}``: 32 raw bytes (or their base64 on one line) in P,
  relative to the store directory unless absolute. The default made at `init`.
- ``{"source": "passphrase", "kdf": "scrypt", "salt": hex, "n": N, "r": R, "p": P}``:
  the key is scrypt(passphrase, salt, N, R, P, 32 bytes); the passphrase is read from
  ``--passphrase-file`` or asked for on the terminal, never stored.
- ``{"source": "credential", "name": NAME}``: the key is the file
  ``$CREDENTIALS_DIRECTORY/NAME`` that systemd provides to a service with
  ``LoadCredential=`` / ``LoadCredentialEncrypted=`` (so ``systemd-creds encrypt`` and
  TPM2 sealing work); raw 32 bytes or their base64.

This module is pure apart from reading those files and the terminal; checking that a
key opens the store is `store.obtain_root_key`'s job.
"""

from __future__ import annotations

import base64
import binascii
import errno
import getpass
import os
import sys

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import StoreError

KEY_LEN = 32
SOURCES = ("file", "passphrase", "credential")
# scrypt cost: N = 2**17, r = 8 needs 128 MiB and about half a second per derivation,
# the interactive setting of the scrypt paper raised for today's machines (RFC 7914 §2).
SCRYPT_LOG_N = 17
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_LOG_N_RANGE = (14, 22)
SALT_LEN = 16
MAX_PASSPHRASE = 4096
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`file` | `passphrase` | `credential:NAME` (the `--root-key` option) -> (source, name)."""
    if spec in ("file", "passphrase"):
        return spec, None
    if spec.startswith("credential:"):
        name = spec[len("credential:"):]
        if not name or "/" in name or name in (".", ".."):
            raise StoreError(f"bad credential name {name!r} (a file name in $CREDENTIALS_DIRECTORY)",
                             errno.EINVAL)
        return "credential", name
    raise StoreError(f"unknown root key source {spec!r} (file, passphrase or credential:NAME)",
                     errno.EINVAL)


def parse_key_bytes(data: bytes, where: str) -> bytes:
    """32 raw bytes, or their base64 (one line, trailing newline allowed)."""
    if len(data) == KEY_LEN:
        return data
    text = data.strip()
    if text and len(text) <= 64:
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) == KEY_LEN:
            return key
    raise StoreError(f"root key {where} must be exactly 32 bytes (raw, or base64 on one line); "
                     f"it has {len(data)}", errno.EINVAL)


def read_key_file(path: str, *, private: bool = True) -> bytes:
    """A key file's key. With `private`, refuse a file that group or others may read, as
    ssh does with private keys (a systemd credential's privacy is systemd's to keep)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if private and mode & 0o044:
                who = " and ".join(w for bit, w in ((0o040, "its group"), (0o004, "others"))
                                   if mode & bit)
                raise StoreError(f"the root key {path} is readable by {who} (mode {mode & 0o777:04o}): "
                                 f"make it private with `chmod 600 {path}` (and keep a copy "
                                 "offline if others may have read it)", errno.EACCES)
            data = f.read(4096)
    except OSError as exc:
        raise StoreError(f"cannot read the root key {path}: {exc.strerror}", exc.errno or errno.EACCES) from None
    return parse_key_bytes(data, path)


def credential_path(name: str) -> str | None:
    directory = os.environ.get(CREDENTIALS_ENV)
    return os.path.join(directory, name) if directory else None


def read_credential(name: str) -> bytes:
    path = credential_path(name)
    if path is None:
        raise StoreError(f"the root key is the systemd credential {name!r}, but ${CREDENTIALS_ENV} is "
                         f"not set (run under systemd with LoadCredential={name}:... or "
                         f"LoadCredentialEncrypted=, or give --root-key-file)", errno.ENOKEY)
    if not os.path.exists(path):
        raise StoreError(f"the systemd credential {name!r} is not in ${CREDENTIALS_ENV} ({path})",
                         errno.ENOKEY)
    return read_key_file(path, private=False)


# ---------------------------------------------------------------- passphrases

def read_passphrase(passphrase_file: str | None, *, confirm: bool = False,
                    prompt: str = "Passphrase: ") -> bytes:
    """From the file (one trailing newline dropped) or, on a terminal, a prompt."""
    if passphrase_file is not None:
        try:
            with open(passphrase_file, "rb") as f:
                data = f.read(MAX_PASSPHRASE + 2)
        except OSError as exc:
            raise StoreError(f"cannot read the passphrase file {passphrase_file}: {exc.strerror}",
                             exc.errno or errno.EACCES) from None
        if data.endswith(b"\n"):
            data = data[:-1]
            if data.endswith(b"\r"):
                data = data[:-1]
    else:
        if not sys.stdin.isatty():
            raise StoreError("this store's root key comes from a passphrase: give --passphrase-file FILE "
                             "or run on a terminal to be asked", errno.ENOKEY)
        try:
            data = getpass.getpass(prompt).encode()
            if confirm and getpass.getpass("Again: ").encode() != data:
                raise StoreError("the passphrases differ", errno.EINVAL)
        except EOFError:
            raise StoreError("no passphrase given", errno.ENOKEY) from None
    if not data:
        raise StoreError("the passphrase is empty", errno.EINVAL)
    if len(data) > MAX_PASSPHRASE:
        raise StoreError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes", errno.EINVAL)
    return data


def new_passphrase_params(log_n: int = SCRYPT_LOG_N) -> dict:
    lo, hi = SCRYPT_LOG_N_RANGE
    if not lo <= log_n <= hi:
        raise StoreError(f"scrypt cost log2(N) must be {lo}..{hi}", errno.EINVAL)
    return {"source": "passphrase", "kdf": "scrypt", "salt": os.urandom(SALT_LEN).hex(),
            "n": 1 << log_n, "r": SCRYPT_R, "p": SCRYPT_P}


def derive_from_passphrase(passphrase: bytes, params: dict) -> bytes:
    """scrypt with the salt and cost recorded in store.json."""
    try:
        if params.get("kdf") != "scrypt":
            raise ValueError(f"unknown kdf {params.get('kdf')!r}")
        salt = bytes.fromhex(params["salt"])
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        if n < 2 or n & (n - 1) or not (1 <= r <= 64 and 1 <= p <= 16) or len(salt) < 16:
            raise ValueError("scrypt parameters out of range")
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"store.json root_key has bad passphrase parameters ({exc})") from None
    return Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(passphrase)


def describe(desc: dict) -> str:
    """A short human description of a root-key source, for messages."""
    source = desc.get("source")
    if source == "file":
        return f"key file {desc.get('path')}"
    if source == "passphrase":
        return "passphrase"
    if source == "credential":
        return f"systemd credential {desc.get('name')}"
    return str(source)

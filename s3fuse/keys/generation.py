"""Which keyring the metadata was last used with, so that an older keyring is refused.

`keyring.bin` put back from before a rotation would mount, leave newer objects unreadable
(EKEYEXPIRED) and let a later rotation make a second, different "version N". The keyring's
generation grows with every change (a rotation adds a version, a retirement erases one):

    generation = highest version ever (retired included) + number of retired versions

Each mount and each keyring change records it in meta.db's `state` table, under
`keyring_generation`, as ``"GEN:VERSION:MAC"``: VERSION is the current master-key version
then, MAC = HMAC-SHA256(HKDF-SHA256(master key VERSION, info "s3fuse/v1/keyring-generation"),
store_id || u64 GEN || u64 VERSION), hex. The record is keyed from the keyring, not the root
key, so `rekey-root` (same keyring, new seal) leaves it valid. A mount refuses a keyring whose
generation is below the record, or that does not authenticate the record. The metadata key
(metaauth.py) lives in the keyring this record guards, so the record stays keyed from the
master keys rather than from it.
"""

from __future__ import annotations

import errno
import hmac
import struct
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import StoreError
from .keyring import Keyring

STATE_KEY = "keyring_generation"
_INFO = b"s3fuse/v1/keyring-generation"


def generation(keyring: Keyring) -> int:
    return max([*keyring.keys, *keyring.retired]) + len(keyring.retired)


def _mac(keyring: Keyring, version: int, store_id: bytes, gen: int) -> str:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(keyring.key(version))
    return hmac.new(key, store_id + struct.pack(">QQ", gen, version), sha256).hexdigest()


def record_value(keyring: Keyring, store_id: bytes) -> str:
    gen = generation(keyring)
    return f"{gen}:{keyring.current}:{_mac(keyring, keyring.current, store_id, gen)}"


def check(recorded: str | None, keyring: Keyring, store_id: bytes, keyring_path: str) -> None:
    """Raise StoreError if `keyring` is older than the one the record was made with."""
    if recorded is None:
        return  # a store from before the record: made at this mount
    try:
        gen_s, version_s, mac = str(recorded).split(":")
        gen, version = int(gen_s), int(version_s)
    except ValueError:
        raise StoreError(f"meta.db's keyring generation record is malformed ({str(recorded)[:80]!r})",
                         errno.EBADMSG) from None
    mine = generation(keyring)
    older = StoreError(
        f"the keyring {keyring_path} is older than the store's metadata (generation {mine}, "
        f"metadata recorded {gen}): it is a copy from before a master-key rotation or retirement; "
        "put back the newest keyring (the one in use before), or keep this store unmounted",
        errno.EKEYEXPIRED)
    if mine < gen:
        raise older
    if version in keyring.keys:
        # the same master key as then, whatever happened since: the record authenticates
        if hmac.compare_digest(mac, _mac(keyring, version, store_id, gen)):
            return
        raise StoreError(f"the keyring {keyring_path} is not the one the store's metadata was "
                         "last used with (its generation record does not authenticate)",
                         errno.EKEYREJECTED)
    if version in keyring.retired and mine > gen:
        return  # rotated and retired since the record (a crash before it was renewed)
    raise older

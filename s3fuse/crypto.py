"""Envelope encryption: a fresh data key per object, wrapped by the key of its mode.

This module picks and wraps data keys; `format` does the byte-level AEAD. The
wrapped key (a "key slot") is stored in the block map, bound by its AAD to the
store, object id, inode, block number, mode and key identity, so a slot copied
to another row or another object does not unwrap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import format as fmt
from .errors import IntegrityError, KeyUnavailable
from .keys.keyring import Keyring

SSE_S3 = "AES256"


@dataclass(frozen=True)
class WrappedKey:
    mode: str
    key_ref: str
    key_version: int
    key_slot: bytes


class KeyManager:
    """Chooses and unwraps data keys for every encryption mode the store knows."""

    def __init__(self, store_id: bytes, keyring: Keyring) -> None:
        self.store_id = store_id
        self.keyring = keyring

    def new_data_key(self, sse: str, object_id: bytes, inode: int, block: int) -> tuple[bytes, WrappedKey]:
        if sse != SSE_S3:
            raise KeyUnavailable(f"encryption mode {sse!r} is not available")
        data_key = os.urandom(fmt.DATA_KEY_LEN)
        version = self.keyring.current
        aad = fmt.key_slot_aad(self.store_id, object_id, inode, block, SSE_S3, "")
        slot = fmt.wrap_data_key(self.keyring.key(version), data_key, aad)
        return data_key, WrappedKey(SSE_S3, "", version, slot)

    def open_data_key(self, object_id: bytes, inode: int, block: int, wrapped: WrappedKey) -> bytes:
        if wrapped.mode != SSE_S3:
            raise KeyUnavailable(f"encryption mode {wrapped.mode!r} is not available")
        try:
            kek = self.keyring.key(wrapped.key_version)
        except KeyError as exc:
            raise KeyUnavailable(str(exc)) from None
        aad = fmt.key_slot_aad(self.store_id, object_id, inode, block, wrapped.mode, wrapped.key_ref)
        try:
            return fmt.unwrap_data_key(kek, wrapped.key_slot, aad)
        except fmt.FormatError as exc:
            raise IntegrityError(f"key slot of object {object_id.hex()}: {exc}") from None

"""Envelope encryption: a fresh data key per object, wrapped for the object's mode.

This module picks, wraps and unwraps data keys, checks that the caller may use the
key, and writes the audit records of key use; `format` does the byte-level AEAD.

- SSE-S3: the data key is wrapped under the current master-key version.
- SSE-KMS: the KMS generates the data key; its ciphertext blob is the key slot; the
  encryption context binds the store, object, inode and block.
- SSE-C: the data key is wrapped under a key derived from the customer key and a
  random salt; the object records only a salted HMAC (the "verifier") of the key.

Key slots are bound by their AAD (or KMS context) to one block of one file in one
store, so a slot copied to another row or object does not open.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from dataclasses import dataclass, field

import trio

from . import format as fmt
from .audit import AuditLog, process_name
from .errors import IntegrityError, KeyUnavailable, KmsUnavailable, S3fuseError
from .keys import customer as ssec
from .keys.customer import CustomerKeys
from .keys.keyring import Keyring
from .keys.kms import KmsProvider, Principal
from .policy import SSE_C, SSE_KMS, SSE_S3, Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrappedKey:
    mode: str
    key_ref: str
    key_version: int
    key_slot: bytes


@dataclass(frozen=True)
class Caller:
    """Who asked: from the FUSE request context or SO_PEERCRED."""

    uid: int
    gid: int
    pid: int = 0
    groups: tuple[int, ...] = ()
    # an S3 API request: the access key it was signed with (audited), and an SSE-C key
    # that came with it, usable by this request only
    access_key_id: str | None = None
    request_key: ssec.CustomerKey | None = None

    @property
    def principal(self) -> Principal:
        return Principal(self.uid, self.gid, self.groups or supplementary_groups(self.pid))


def supplementary_groups(pid: int) -> tuple[int, ...]:
    """A process's supplementary groups (for KMS key policies that name groups)."""
    if not pid:
        return ()
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


SYSTEM = Caller(0, 0, os.getpid())


@dataclass(eq=False)
class WriteGrant:
    """What the writes to one file are stored under, fixed when the file was opened for
    writing (create, open for writing, O_TRUNC) while the caller's key check passed, as S3
    checks a PUT's key when the request arrives: a key removed, disabled or denied later
    affects new opens only, never data `write()` already accepted.

    SSE-C: a private copy of the customer key, in memory only, wiped when the file has no
    handle open for writing and nothing left to store. SSE-KMS: a data key made at the
    open for block 0's next object (the KMS context binds object and block, so it cannot
    be made for blocks not yet known); later blocks ask the KMS when they are stored."""

    policy: Policy
    customer: bytearray | None = field(default=None, repr=False)
    fingerprint: str = ""  # of the customer key (SSE-C)
    # block -> (object id, data key, wrapped key) made at the open, each used for one object
    prepared: dict[int, tuple[bytes, bytes, "WrappedKey"]] = field(default_factory=dict, repr=False)

    wiped: bool = False
    # set once a data key made in the background after the open is in `prepared` or failed
    ready: trio.Event | None = field(default=None, repr=False)

    def preparing(self) -> None:
        """A data key is being made in the background; a store waits for `prepared_done`."""
        self.ready = trio.Event()

    def prepared_done(self) -> None:
        if self.ready is not None:
            self.ready.set()

    async def wait_ready(self, timeout: float) -> None:
        """Wait, at most `timeout` seconds, for a key still being made after the open, so
        that the store uses it rather than asking the KMS a second time."""
        if self.ready is not None and not self.ready.is_set():
            with trio.move_on_after(timeout):
                await self.ready.wait()

    def take(self, block: int) -> tuple[bytes, bytes, "WrappedKey"] | None:
        return self.prepared.pop(block, None)

    def wipe(self) -> None:
        self.wiped = True
        if self.customer is not None:
            for i in range(len(self.customer)):
                self.customer[i] = 0
            self.customer = None
        self.prepared.clear()


def _path(path) -> str | None:
    """An audit record's path, given as is or as a callable (computed only when recorded)."""
    return path() if callable(path) else path


def _accepted(grant: WriteGrant | None, policy: Policy) -> bool:
    """Whether data stored under `policy` was accepted through a handle whose key checks
    passed at its open (a live grant for the same setting)."""
    return grant is not None and not grant.wiped and grant.policy == policy


def _opens(grant: WriteGrant | None, wrapped: WrappedKey) -> bool:
    """Whether a live grant covers an object stored under `wrapped` (same mode and key)."""
    if grant is None or grant.wiped or grant.policy.mode != wrapped.mode:
        return False
    if wrapped.mode == SSE_KMS:
        return grant.policy.key == wrapped.key_ref
    return wrapped.mode == SSE_C and grant.customer is not None


class KeyManager:
    def __init__(self, store_id: bytes, keyring: Keyring, kms: KmsProvider | None = None,
                 customer: CustomerKeys | None = None, audit: AuditLog | None = None) -> None:
        self.store_id = store_id
        self.keyring = keyring
        self.kms = kms
        self.customer = customer or CustomerKeys()
        self.audit = audit
        # data keys, one small class per SSE mode
        self._modes: dict[str, ModeKeys] = {SSE_S3: MasterKeyMode(self), SSE_KMS: KmsMode(self),
                                            SSE_C: CustomerKeyMode(self)}

    # ------------------------------------------------------------------ audit
    def record(self, op: str, who: Caller, outcome: str = "allowed", **fields) -> None:
        if self.audit is None:
            return
        try:
            if who.access_key_id is not None:
                fields["access_key_id"] = who.access_key_id
            self.audit.append(op, outcome, uid=who.uid, gid=who.gid, pid=who.pid,
                              process=process_name(who.pid) if who.pid else None, **fields)
        except Exception:
            log.exception("could not write the audit record for %s", op)

    def _kms(self) -> KmsProvider:
        if self.kms is None:
            raise S3fuseError("no KMS is configured for this store", errno.ENOKEY)
        return self.kms

    def _context(self, object_id: bytes, inode: int, block: int) -> dict[str, str]:
        return {"store": self.store_id.hex(), "object": object_id.hex(),
                "inode": str(inode), "block": str(block)}

    def configured_kms(self) -> KmsProvider:
        """The store's KMS; ENOKEY if none is configured."""
        return self._kms()

    def kms_context(self, object_id: bytes, inode: int, block: int) -> dict[str, str]:
        """The encryption context a KMS binds to an object's data key."""
        return self._context(object_id, inode, block)

    def find_customer_key(self, who: Caller, ref: str) -> ssec.CustomerKey | None:
        """A customer key `who` may use, by name or fingerprint: the request's own first."""
        rk = who.request_key
        if rk is not None and (rk.fingerprint == ref or rk.name == ref):
            return rk
        return self.customer.find(who.uid, ref)

    def customer_key_for_object(self, who: Caller, recorded: str) -> ssec.CustomerKey | None:
        rk = who.request_key
        if rk is not None and ssec.matches(rk.material, recorded):
            return rk
        return self.customer.for_object(who.uid, recorded)

    def _customer_key(self, policy: Policy, who: Caller) -> ssec.CustomerKey:
        key = self.find_customer_key(who, policy.key)
        if key is not None:
            return key
        if policy.name and self.find_customer_key(who, policy.name) is not None:
            raise S3fuseError(f"the loaded key {policy.name!r} is not the key this file or directory "
                              f"was set up with (fingerprint {policy.key})", errno.EKEYREJECTED)
        raise KeyUnavailable(f"customer key {policy.name or policy.key} is not loaded for uid {who.uid}",
                             errno.ENOKEY)

    # ------------------------------------------------------------------ data keys
    def _mode_keys(self, mode: str) -> "ModeKeys | None":
        return self._modes.get(mode)

    async def new_data_key(self, policy: Policy, object_id: bytes, inode: int, block: int, who: Caller,
                           path: str | None = None, grant: WriteGrant | None = None) -> tuple[bytes, WrappedKey]:
        """A fresh data key for a new object under `policy`, and its wrapped form. A network
        KMS's call runs in a worker thread; the others do not wait."""
        keys = self._mode_keys(policy.mode)
        if keys is None:
            raise S3fuseError(f"unknown encryption mode {policy.mode!r}", errno.EINVAL)
        return await keys.new(policy, object_id, inode, block, who, path, grant)

    async def open_data_key(self, object_id: bytes, inode: int, block: int, wrapped: WrappedKey,
                            who: Caller, path: str | None = None, grant: WriteGrant | None = None) -> bytes:
        """The data key of a stored object. `grant`: the live grant of the file the object
        belongs to, for a read-modify-write of its own block: its key opens the object
        even if it was removed, disabled or denied since the open (see WriteGrant)."""
        keys = self._mode_keys(wrapped.mode)
        if keys is None:
            raise IntegrityError(f"object {object_id.hex()} has unknown mode {wrapped.mode!r}")
        return await keys.open(object_id, inode, block, wrapped, who, path, grant)

    # ------------------------------------------------------------------ KMS results and audit
    def _generate_denied(self, policy: Policy, object_id: bytes, who: Caller, path, exc) -> None:
        self.record("kms:GenerateDataKey", who, "denied", key_id=policy.key, path=path,
                    object_id=object_id.hex(), errno=exc.errno)

    def _generated(self, result, object_id: bytes, who: Caller, path) -> tuple[bytes, WrappedKey]:
        data_key, blob, key_id, version = result
        self.record("kms:GenerateDataKey", who, key_id=key_id, key_version=version, path=path,
                    object_id=object_id.hex())
        return data_key, WrappedKey(SSE_KMS, key_id, version, blob)

    def _decrypt_failed(self, object_id: bytes, wrapped: WrappedKey, who: Caller, path, exc) -> None:
        """Audit a refused or failed KMS decrypt; a ciphertext that does not authenticate
        is an integrity error (raised from here), anything else the caller re-raises."""
        self.record("kms:Decrypt", who, "denied", key_id=wrapped.key_ref,
                    key_version=wrapped.key_version, path=path, object_id=object_id.hex(),
                    errno=exc.errno)
        if exc.errno == errno.EIO and not isinstance(exc, KmsUnavailable):
            raise IntegrityError(f"KMS ciphertext of object {object_id.hex()}: {exc}") from None

    def _decrypted(self, result, object_id: bytes, wrapped: WrappedKey, who: Caller, path) -> bytes:
        data_key, key_id, version = result
        if key_id != wrapped.key_ref:
            raise IntegrityError(f"KMS ciphertext of object {object_id.hex()} names another key")
        self.record("kms:Decrypt", who, key_id=key_id, key_version=version, path=path,
                    object_id=object_id.hex())
        return data_key

    # ------------------------------------------------------------------ network KMS (Transit)
    def kms_blocks(self, key: str | None = None, blob: bytes | None = None) -> bool:
        """Whether a KMS call for this key (or key slot) waits on the network."""
        kms = self.kms
        if kms is None:
            return False
        return kms.blocks(key=key, blob=blob)

    async def _offload(self, provider_key: str | None, blob: bytes | None, fn, *args):
        """Run a blocking KMS call in a worker thread, bounded by the provider's limiter."""
        kms = self._kms()
        provider = kms.for_blob(blob) if blob is not None else kms.for_key(provider_key)
        return await trio.to_thread.run_sync(functools.partial(fn, *args),
                                             limiter=provider.limiter)

    async def grant_write(self, policy: Policy, who: Caller, inode: int, path=None) -> WriteGrant | None:
        """`check_write`, keeping what later stores of the file's data need (see WriteGrant):
        None for SSE-S3, whose master key is the store's own."""
        if policy.mode == SSE_S3:
            return None
        if policy.mode == SSE_C:
            key = self._customer_key(policy, who)
            return WriteGrant(policy, bytearray(key.material), key.fingerprint)
        path = path() if callable(path) else path
        object_id = os.urandom(fmt.OBJECT_ID_LEN)
        data_key, wrapped = await self.new_data_key(policy, object_id, inode, 0, who, path)
        return WriteGrant(policy, prepared={0: (object_id, data_key, wrapped)})

    async def prepare_async(self, grant: WriteGrant, who: Caller, inode: int, path=None) -> None:
        """Make block 0's data key of a KMS grant (a network KMS's call in a worker thread);
        kept unless the grant was wiped meanwhile."""
        path = path() if callable(path) else path
        object_id = os.urandom(fmt.OBJECT_ID_LEN)
        data_key, wrapped = await self.new_data_key(grant.policy, object_id, inode, 0, who, path)
        if not grant.wiped:
            grant.prepared.setdefault(0, (object_id, data_key, wrapped))

    async def describe_kms_key(self, key_id: str) -> dict:
        """A KMS key's description; a network KMS's lookup in a worker thread."""
        kms = self._kms()
        if self.kms_blocks(key=key_id):
            return await self._offload(key_id, None, kms.describe, key_id)
        return kms.describe(key_id)

    async def resolve_kms_key(self, ref: str, who: Caller) -> tuple[str, str]:
        """A KMS key reference from an xattr -> (key id, state); blocking lookups in a thread."""
        kms = self._kms()
        if not ref:
            key_id = kms.default_key(who.principal, time.time())
        else:
            key_id = kms.resolve(ref)
        if self.kms_blocks(key=key_id):
            desc = await self._offload(key_id, None, kms.describe, key_id)
        else:
            desc = kms.describe(key_id)
        return key_id, desc["state"]

    @staticmethod
    def _unwrap(kek: bytes, slot: bytes, aad: bytes, object_id: bytes) -> bytes:
        try:
            return fmt.unwrap_data_key(kek, slot, aad)
        except fmt.FormatError as exc:
            raise IntegrityError(f"key slot of object {object_id.hex()}: {exc}") from None

    # ------------------------------------------------------------------ access checks
    async def check_write(self, policy: Policy, who: Caller, path=None) -> None:
        """May `who` create objects under `policy`? (At create, open-for-write, truncate and
        an encryption change.) `path`, or a callable giving it, is for audit records."""
        await self._modes[policy.mode].may_write(policy, who, path)

    async def check_read(self, refs: list[tuple[str, str]], who: Caller, path=None,
                         policy: Policy | None = None) -> None:
        """May `who` read objects with these (mode, key_ref)s? (At open.)

        `policy` is the file's own setting: data not yet stored is readable only by a
        caller who holds its key too."""
        if policy is not None and policy.mode == SSE_C:
            # first: a loaded key of the file's key name that is not its key is EKEYREJECTED,
            # which the objects' verifiers alone cannot tell from ENOKEY
            await self._modes[SSE_C].may_write(policy, who, path)
        elif policy is not None and policy.mode == SSE_KMS:
            refs = [*refs, (SSE_KMS, policy.key)]
        for mode, key_ref in dict.fromkeys(refs):  # each key once, in order
            await self._modes[mode].may_read(key_ref, who, path)


class ModeKeys:
    """Data keys of one SSE mode: made for new objects, unwrapped for stored ones."""

    def __init__(self, km: KeyManager) -> None:
        self.km = km

    async def may_write(self, policy: Policy, who: Caller, path) -> None:
        """Refuse (raise) unless `who` may store data under `policy`."""

    async def may_read(self, key_ref: str, who: Caller, path) -> None:
        """Refuse (raise) unless `who` may read objects under the key `key_ref`."""

    async def new(self, policy: Policy, object_id: bytes, inode: int, block: int, who: Caller,
                  path: str | None, grant: WriteGrant | None) -> tuple[bytes, WrappedKey]:
        raise NotImplementedError

    async def open(self, object_id: bytes, inode: int, block: int, wrapped: WrappedKey, who: Caller,
                   path: str | None, grant: WriteGrant | None) -> bytes:
        raise NotImplementedError


class MasterKeyMode(ModeKeys):
    """SSE-S3: data keys wrapped under the store's master key (the keyring's current version)."""

    async def new(self, policy, object_id, inode, block, who, path, grant):
        km = self.km
        data_key = os.urandom(fmt.DATA_KEY_LEN)
        version = km.keyring.current
        aad = fmt.key_slot_aad(km.store_id, object_id, inode, block, SSE_S3, "")
        slot = fmt.wrap_data_key(km.keyring.key(version), data_key, aad)
        return data_key, WrappedKey(SSE_S3, "", version, slot)

    async def open(self, object_id, inode, block, wrapped, who, path, grant):
        km = self.km
        try:
            kek = km.keyring.key(wrapped.key_version)
        except KeyError as exc:
            raise KeyUnavailable(str(exc), errno.EKEYEXPIRED) from None
        aad = fmt.key_slot_aad(km.store_id, object_id, inode, block, SSE_S3, wrapped.key_ref)
        return km._unwrap(kek, wrapped.key_slot, aad, object_id)


class KmsMode(ModeKeys):
    """SSE-KMS: data keys from the KMS, under a KMS key; a network KMS's calls run in a worker
    thread, the built-in KMS's on the loop. Data accepted through a live grant is stored and
    merged under its key even after the key was disabled or its policy changed."""

    async def _call(self, blocks: bool, provider_key: str | None, blob: bytes | None, fn, *args):
        if blocks:
            return await self.km._offload(provider_key, blob, fn, *args)
        return fn(*args)

    async def may_write(self, policy, who, path):
        km = self.km
        try:
            await self._call(km.kms_blocks(key=policy.key), policy.key, None, km._kms().authorize,
                             policy.key, "encrypt", who.principal)
        except S3fuseError as exc:
            km.record("kms:GenerateDataKey", who, "denied", key_id=policy.key, path=_path(path),
                      errno=exc.errno)
            raise

    async def may_read(self, key_ref, who, path):
        km = self.km
        try:
            await self._call(km.kms_blocks(key=key_ref), key_ref, None, km._kms().authorize,
                             key_ref, "decrypt", who.principal)
        except S3fuseError as exc:
            km.record("kms:Decrypt", who, "denied", key_id=key_ref, path=_path(path), errno=exc.errno)
            raise
        km.record("kms:Decrypt", who, key_id=key_ref, path=_path(path))

    async def new(self, policy, object_id, inode, block, who, path, grant):
        km = self.km
        kms = km._kms()
        generate = kms.generate_data_key_accepted if _accepted(grant, policy) else kms.generate_data_key
        try:
            result = await self._call(km.kms_blocks(key=policy.key), policy.key, None, generate, policy.key,
                                      km._context(object_id, inode, block), who.principal)
        except S3fuseError as exc:
            km._generate_denied(policy, object_id, who, path, exc)
            raise
        return km._generated(result, object_id, who, path)

    async def open(self, object_id, inode, block, wrapped, who, path, grant):
        km = self.km
        kms = km._kms()
        decrypt = kms.decrypt_accepted if _opens(grant, wrapped) else kms.decrypt
        try:
            result = await self._call(km.kms_blocks(blob=wrapped.key_slot), None, wrapped.key_slot, decrypt,
                                      wrapped.key_slot, km._context(object_id, inode, block), who.principal)
        except S3fuseError as exc:
            km._decrypt_failed(object_id, wrapped, who, path, exc)
            raise
        return km._decrypted(result, object_id, wrapped, who, path)


class CustomerKeyMode(ModeKeys):
    """SSE-C: data keys wrapped under a key derived from the caller's customer key (or the
    copy a live grant holds of the key its writes were accepted under)."""

    async def may_write(self, policy, who, path):
        self.km._customer_key(policy, who)

    async def may_read(self, key_ref, who, path):
        if self.km.customer_key_for_object(who, key_ref) is None:
            raise KeyUnavailable(f"no loaded customer key of uid {who.uid} opens {_path(path) or 'this file'}",
                                 errno.ENOKEY)

    async def new(self, policy, object_id, inode, block, who, path, grant):
        km = self.km
        if grant is not None and grant.customer is not None and grant.policy == policy:
            material = grant.customer  # the key the data was accepted under
        else:
            material = km._customer_key(policy, who).material
        verifier = ssec.new_verifier(material)
        data_key = os.urandom(fmt.DATA_KEY_LEN)
        aad = fmt.key_slot_aad(km.store_id, object_id, inode, block, SSE_C, verifier)
        slot = fmt.wrap_data_key(ssec.wrapping_key(material, verifier, object_id), data_key, aad)
        return data_key, WrappedKey(SSE_C, verifier, 0, slot)

    async def open(self, object_id, inode, block, wrapped, who, path, grant):
        km = self.km
        key = km.customer_key_for_object(who, wrapped.key_ref)
        if key is not None:
            material = key.material
        elif _opens(grant, wrapped) and ssec.matches(grant.customer, wrapped.key_ref):
            material = grant.customer  # the key the file's writes were accepted under
        else:
            raise KeyUnavailable(f"no loaded customer key of uid {who.uid} matches object "
                                 f"{object_id.hex()}", errno.ENOKEY)
        aad = fmt.key_slot_aad(km.store_id, object_id, inode, block, SSE_C, wrapped.key_ref)
        kek = ssec.wrapping_key(material, wrapped.key_ref, object_id)
        return km._unwrap(kek, wrapped.key_slot, aad, object_id)

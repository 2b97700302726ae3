"""Key administration over the control socket: customer keys (SSE-C), the built-in KMS, and
the SSE-S3 master key (rotate, retire, pause or resume the re-wrap sweep).

Each handler gets the peer's SO_PEERCRED identity; the KMS enforces its key policies
against it and every action is appended to the audit trail, allowed or denied.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING

from ..audit import kms_op
from ..crypto import Caller
from ..errors import S3fuseError
from ..policy import SSE_C, SSE_KMS
from .server import Peer
from .transit_admin import TransitAdmin

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..core import Filesystem
    from ..crypto import KeyManager
    from ..data import DataStore
    from ..meta import Meta
    from ..recovery import RecoveryArea
    from ..rotation import MasterKeys

log = logging.getLogger(__name__)


class AdminHandlers:
    """The key-administration handlers, given the parts of the daemon they act on."""

    def __init__(self, keys: KeyManager, data: DataStore, meta: Meta, core: Filesystem,
                 master: MasterKeys, audit: AuditLog, audit_path: str,
                 recovery: RecoveryArea | None = None) -> None:
        self.keys = keys
        self.recovery = recovery
        self.data = data
        self.meta = meta
        self.core = core
        self.master = master
        self.audit = audit
        self.audit_file = audit_path

    def handlers(self) -> dict:
        h = {
            "key.add": self.key_add,
            "key.list": self.key_list,
            "key.remove": self.key_remove,
            "audit.path": self.audit_path,
            "sse.why": self.sse_why,
            "rotate": self.master_rotate,
            "rotate.retire": self.master_retire,
            "rotate.sweep": self.master_sweep,
        }
        for op in ("create-key", "list", "describe", "enable", "disable", "schedule-deletion",
                   "cancel-deletion", "get-policy", "set-policy", "rotate", "enable-rotation",
                   "disable-rotation"):
            h[f"kms.{op}"] = self._kms_handler(op)
        # transit:NAME keys go to Vault/OpenBao
        transit = TransitAdmin(self.keys, self.data, self.meta, self.forget_cached_keys)
        h.update(transit.handlers(h))
        return h

    def forget_cached_keys(self) -> None:
        """After a key is withdrawn, no cached data key or plaintext may outlive it."""
        self.data.forget_cached_keys()

    # ---------------------------------------------------------------- SSE-C
    async def key_add(self, peer: Peer, args: dict) -> dict:
        who = peer.caller()
        name, raw, is_global = args["name"], args["key"], bool(args.get("global", False))
        if not isinstance(name, str) or not isinstance(raw, bytes):
            raise TypeError("name must be a string and key bytes")
        try:
            key = self.keys.customer.add(name, raw, peer.uid, is_global)
        except S3fuseError as exc:
            self.keys.record("ssec:AddKey", who, "denied", key_name=name, errno=exc.errno)
            raise
        self.keys.record("ssec:AddKey", who, fingerprint=key.fingerprint, key_name=name,
                         scope="global" if is_global else f"uid {key.owner_uid}")
        if self.recovery is not None and self.recovery.problems:  # kept data may have waited for this key
            await self.recovery.restore(self.data, self.meta)
        return key.describe()

    async def key_list(self, peer: Peer, args: dict) -> list:
        return self.keys.customer.list(peer.uid)

    async def key_remove(self, peer: Peer, args: dict) -> dict:
        who = peer.caller()
        name = args["name"]
        if not isinstance(name, str):
            raise TypeError("name must be a string")
        try:
            key = self.keys.customer.remove(name, peer.uid)
        except S3fuseError as exc:
            self.keys.record("ssec:RemoveKey", who, "denied", key_name=name, errno=exc.errno)
            raise
        self.forget_cached_keys()
        self.keys.record("ssec:RemoveKey", who, fingerprint=key.fingerprint, key_name=name)
        # files opened for writing before the removal are still stored under the key
        return {**key.describe(), "waiting": self.data.waiting_for_key(SSE_C, key.fingerprint)}

    async def audit_path(self, peer: Peer, args: dict) -> dict:
        """Where the trail is, and its current head, so `audit verify` can check the tail."""
        trail = self.audit
        trail.sync()
        return {"path": self.audit_file, "head": trail.head, "seq": trail.seq}

    async def sse_why(self, peer: Peer, args: dict) -> dict:
        """Why the caller's last encryption setting on this inode was refused (or null):
        setxattr(2) carries only an errno. Each uid sees only its own refusals."""
        inode = args["inode"]
        if not isinstance(inode, int) or isinstance(inode, bool) or inode < 1:
            raise TypeError("inode must be a positive integer")
        return {"reason": self.core.refusal(peer.uid, inode)}

    # ---------------------------------------------------------------- KMS
    def _kms_handler(self, op: str):
        async def handler(peer: Peer, args: dict):
            return await self.kms_call(op, peer, args)
        return handler

    async def kms_call(self, op: str, peer: Peer, args: dict):
        kms = self.keys.configured_kms()
        who = peer.caller()
        p = who.principal
        now = time.time()
        key = args.get("key")
        if key is not None and not isinstance(key, str):
            raise TypeError("key must be a string")
        try:
            if op == "create-key":
                result = kms.create_key(p, alias=args.get("alias"), description=args.get("description") or "",
                                        now=now)
                key = result["id"]
            elif op == "list":
                return kms.list_keys()
            elif op == "describe":
                return kms.describe(key)
            elif op == "enable":
                result = kms.enable(key, p)
            elif op == "disable":
                result = kms.disable(key, p)
            elif op == "schedule-deletion":
                result = kms.schedule_deletion(key, int(args["days"]), p, now)
            elif op == "cancel-deletion":
                result = kms.cancel_deletion(key, p)
            elif op == "get-policy":
                return kms.get_policy(key)
            elif op == "set-policy":
                result = kms.set_policy(key, args["policy"], p)
            elif op == "rotate":
                result = kms.rotate(key, p, now)
            elif op == "enable-rotation":
                result = kms.enable_rotation(key, int(args["days"]), p, now)
            elif op == "disable-rotation":
                result = kms.disable_rotation(key, p)
            else:
                raise TypeError(f"unknown KMS operation {op}")
        except S3fuseError as exc:
            fields = self._key_fields(key)
            if op == "create-key" and isinstance(args.get("alias"), str):
                fields["alias"] = args["alias"]
            self.keys.record(kms_op(op), who, "denied", **fields, errno=exc.errno)
            raise
        if op in ("disable", "schedule-deletion"):
            self.forget_cached_keys()
        fields = self._key_fields(key)
        if op == "create-key":
            # the one record that ties a key id to its alias (`audit --key ALIAS` reads it)
            fields["alias"] = result.get("alias")
        self.keys.record(kms_op(op), who, **fields)
        result = result if isinstance(result, dict) else kms.describe(key)
        if op == "rotate":
            await self.data.renew_prepared(kms.resolve(key))
        if op in ("disable", "schedule-deletion", "set-policy"):
            # files opened for writing before the change are still stored under the key
            result = {**result, "waiting": self.data.waiting_for_key(SSE_KMS, kms.resolve(key))}
        return result

    def _key_fields(self, key: str | None) -> dict:
        """Audit fields naming a key by its id (and the alias it was given by), so that
        `s3fuse audit --key ID` finds every record of a key however it was named."""
        if key is None:
            return {}
        try:
            key_id = self.keys.configured_kms().resolve(key)
        except S3fuseError:
            return {"key_id": key}
        return {"key_id": key_id, "alias": key if key != key_id else None}

    async def kms_tick(self, now: float) -> None:
        """The KMS's timers, run by the daemon's one key scheduler (rotation.MasterKeys.scheduler):
        automatic rotation of keys that have it enabled, and deletion of keys past their waiting period."""
        kms = self.keys.kms
        if kms is None:
            return
        system = Caller(0, 0, 0)
        for key_id in kms.rotate_due(now):
            self.keys.record(kms_op("rotate"), system, key_id=key_id, trigger="schedule")
            await self.data.renew_prepared(key_id)
        for key_id in kms.purge_expired(now):
            self.forget_cached_keys()
            self.keys.record(kms_op("delete"), system, key_id=key_id, trigger="schedule")

    # ---------------------------------------------------------------- SSE-S3 master key
    def _require_owner(self, peer: Peer) -> None:
        if peer.uid not in (0, os.getuid()):
            raise S3fuseError("only root or the user who mounted may rotate the master key", errno.EPERM)

    def _owner_for(self, peer: Peer, operation: str) -> Caller:
        """The caller, if root or the mounting user; else audit the refusal and raise EPERM."""
        who = peer.caller()
        try:
            self._require_owner(peer)
        except S3fuseError as exc:
            self.keys.record(operation, who, "denied", errno=exc.errno)
            raise
        return who

    async def master_rotate(self, peer: Peer, args: dict) -> dict:
        who = self._owner_for(peer, "sse-s3:RotateMasterKey")
        return await self.master.rotate(who, "request")

    async def master_retire(self, peer: Peer, args: dict) -> dict:
        who = self._owner_for(peer, "sse-s3:RetireMasterKey")
        return await self.master.retire_unused(who)

    async def master_sweep(self, peer: Peer, args: dict) -> dict:
        paused = args["paused"]
        if not isinstance(paused, bool):
            raise TypeError("paused must be a boolean")
        self._require_owner(peer)
        return self.master.set_paused(paused, peer.caller())

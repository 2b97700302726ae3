"""`s3fuse kms ...` for Transit keys (``transit:NAME``), over the control socket.

The built-in KMS's handlers (admin.py) stay as they are; these wrap the ones that make
sense for Transit and send every other key to them. Transit calls block on the
network, so they run in worker threads; every action is audited, allowed or denied.

Re-wrapping: `kms rotate transit:NAME` adds a key version in Transit and then re-wraps
every stored key slot under an older version through Transit's `rewrap` (the data keys
never leave Transit in plaintext); `kms rewrap transit:NAME` does only the second part.
Only then is it safe to raise `min_decryption_version` (`kms set-min-decryption-version`).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..audit import kms_op
from ..errors import S3fuseError
from ..keys import transit as tr
from .server import Peer

if TYPE_CHECKING:
    from ..crypto import KeyManager
    from ..data import DataStore
    from ..meta import Meta

log = logging.getLogger(__name__)

REWRAP_PAGE = 256
# Built-in operations with no Transit counterpart through s3fuse: administer those in Vault.
_UNSUPPORTED = ("enable", "disable", "schedule-deletion", "cancel-deletion", "get-policy",
                "set-policy")


class TransitAdmin:
    def __init__(self, keys: KeyManager, data: DataStore, meta: Meta,
                 forget_cached_keys: Callable[[], None]) -> None:
        self.keys = keys
        self.data = data
        self.meta = meta
        self.forget_cached_keys = forget_cached_keys

    def handlers(self, builtin: dict) -> dict:
        """The KMS handlers, with Transit keys routed here and every other key to `builtin`."""
        h = {}
        for name, handler in builtin.items():
            if name.startswith("kms."):
                h[name] = self._route(name[4:], handler)
        h["kms.rewrap"] = self._route("rewrap", None)
        h["kms.set-min-decryption-version"] = self._route("set-min-decryption-version", None)
        return h

    # ---------------------------------------------------------------- dispatch
    @property
    def router(self):
        return self.keys.configured_kms()

    def _transit(self) -> tr.TransitKms:
        transit = self.router.transit
        if transit is None:
            raise S3fuseError("no Transit KMS is configured for this store", errno.ENOKEY)
        return transit

    def _route(self, op: str, builtin):
        async def handler(peer: Peer, args: dict):
            key = args.get("key")
            router = self.router
            is_transit = (op == "create-key" and args.get("transit") is not None) or (
                isinstance(key, str) and router.is_transit(key))
            if op == "list":
                return await self._list(peer, args, builtin)
            if not is_transit:
                if builtin is None:
                    raise S3fuseError(f"kms {op} applies to Transit keys (transit:NAME) only",
                                      errno.EINVAL)
                return await builtin(peer, args)
            return await self._transit_op(op, peer, args)
        return handler

    async def _run(self, fn, *args):
        transit = self._transit()
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=transit.limiter)

    # ---------------------------------------------------------------- operations
    async def _list(self, peer: Peer, args: dict, builtin) -> list:
        keys = list(await builtin(peer, args))
        if self.router.transit is not None:
            try:
                keys += await self._run(self._transit().list_keys)
            except S3fuseError as exc:  # e.g. a token that may use keys but not list them
                keys.append({"id": "transit:*", "provider": tr.PROVIDER, "alias": None,
                             "state": "Unknown", "current_version": None,
                             "description": f"Transit keys not listed: {exc}"})
        return keys

    async def _transit_op(self, op: str, peer: Peer, args: dict):
        who = peer.caller()
        p = who.principal
        transit = self._transit()
        key = args.get("key")
        key_id = None
        try:
            if op == "create-key":
                key_id = tr.key_id(tr.check_name(args["transit"]))
                result = await self._run(transit.create_key, p, tr.name_of(key_id))
            else:
                key_id = transit.resolve(key)
                if op == "describe":
                    return await self._run(transit.describe, key_id)
                if op == "rotate":
                    # what was written before the rotation is stored under the old version and
                    # then re-wrapped, not stored under the new one by chance of timing
                    await self.data.flush_all(durable=False)
                    result = await self._run(transit.rotate, key_id, p)
                    if args.get("rewrap", True):
                        result = {**result, "rewrap": await self._rewrap(key_id, who)}
                elif op == "rewrap":
                    if p.uid != 0:
                        raise S3fuseError(f"uid {p.uid} may not re-wrap Transit key {key_id}: "
                                          "only root administers Transit keys", errno.EACCES)
                    result = {**await self._run(transit.describe, key_id),
                              "rewrap": await self._rewrap(key_id, who)}
                elif op == "set-min-decryption-version":
                    result = await self._run(transit.set_min_decryption_version, key_id,
                                             int(args["version"]), p)
                    # data keys of retired versions must not outlive them in the caches
                    self.forget_cached_keys()
                elif op == "enable-rotation":
                    result = await self._run(transit.enable_rotation, key_id, int(args["days"]), p)
                elif op == "disable-rotation":
                    result = await self._run(transit.disable_rotation, key_id, p)
                elif op in _UNSUPPORTED:
                    raise transit.unsupported(op.replace("-", " "), key_id)
                else:
                    raise S3fuseError(f"unknown KMS operation {op}", errno.EINVAL)
        except S3fuseError as exc:
            self.keys.record(kms_op(op), who, "denied", key_id=key_id or key, errno=exc.errno)
            raise
        fields = {"key_id": key_id}
        if isinstance(result, dict) and "rewrap" in result:
            fields.update(rewrapped=result["rewrap"]["rewrapped"], failed=result["rewrap"]["failed"])
        self.keys.record(kms_op(op), who, **fields)
        return result

    async def _rewrap(self, key_id: str, who) -> dict:
        """Re-wrap every stored key slot of `key_id` under its latest version, page by page.

        Each page: read rows on the loop, rewrap in a worker thread (Transit's batch API),
        swap the slots in one transaction (a slot changed meanwhile is left alone).
        """
        transit = self._transit()
        name = tr.name_of(key_id)
        meta = self.meta
        await self.data.flush_all(durable=False)  # stored slots only, none in flight
        latest = (await self._run(transit.describe, key_id))["current_version"]
        rewrapped = failed = 0
        after = b""
        while True:
            rows = meta.kms_slots_below(key_id, latest, after, REWRAP_PAGE)
            if not rows:
                break
            after = rows[-1].object_id
            items = [(r.key_slot, self.keys.kms_context(r.object_id, r.inode, r.blockno)) for r in rows]
            results = await self._run(transit.rewrap, name, items)
            with meta.transaction():
                for row, res in zip(rows, results):
                    if isinstance(res, S3fuseError):
                        failed += 1
                        log.warning("re-wrap of object %s (inode %d, block %d) under %s failed: %s",
                                    row.object_id.hex(), row.inode, row.blockno, key_id, res)
                        continue
                    new_slot, version = res
                    if meta.replace_key_slot(row.object_id, row.key_slot, new_slot, version):
                        rewrapped += 1
        log.info("re-wrapped %d key slots under %s v%d (%d failed)", rewrapped, key_id, latest, failed)
        return {"rewrapped": rewrapped, "failed": failed, "version": latest}

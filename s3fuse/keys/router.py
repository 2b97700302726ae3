"""One `KmsProvider` in front of several: the built-in KMS and, if configured, Transit.

A key reference picks its provider: ``transit:NAME`` is a Transit key; an alias
(``alias/...``) or the id of a key in the built-in keystore is a built-in key; any
other bare name goes to the store's default provider (store.json "kms" "provider").
Stored key slots pick theirs by their magic ("KMS1" built-in, "TRN1" Transit). So the
key id recorded with every object names its provider, and one store may hold both.
"""

from __future__ import annotations

import errno

from ..errors import S3fuseError
from . import transit as tr
from .kms import DEFAULT_KEY_QUOTA, BuiltinKms, KmsProvider, Principal


class KmsRouter(KmsProvider):
    name = "router"
    blocking = False

    def __init__(self, builtin: BuiltinKms, transit: tr.TransitKms | None = None,
                 default: str = "builtin") -> None:
        if default not in ("builtin", tr.PROVIDER):
            raise S3fuseError(f"unknown KMS provider {default!r} (builtin or transit)", errno.EINVAL)
        if default == tr.PROVIDER and transit is None:
            raise S3fuseError("the default KMS provider is transit, but Transit is not configured",
                              errno.EINVAL)
        self.builtin = builtin
        self.transit = transit
        self.default = default

    # ---- dispatch --------------------------------------------------------

    def _transit(self) -> tr.TransitKms:
        if self.transit is None:
            raise S3fuseError("no Transit KMS is configured for this store (store.json \"kms\")",
                              errno.ENOKEY)
        return self.transit

    def for_key(self, key: str | None) -> KmsProvider:
        if isinstance(key, str):
            if key.startswith(tr.PREFIX):
                return self._transit()
            if key.startswith("alias/") or self.builtin.has_key(key):
                return self.builtin
        return self.transit if self.default == tr.PROVIDER else self.builtin

    def for_blob(self, blob: bytes) -> KmsProvider:
        return self._transit() if tr.is_blob(blob) else self.builtin

    def blocks(self, key: str | None = None, blob: bytes | None = None) -> bool:
        """Whether calls for this key (or key slot) block on the network."""
        try:
            p = self.for_blob(blob) if blob is not None else self.for_key(key)
        except S3fuseError:
            return False
        return p.blocking

    def is_transit(self, key: str | None) -> bool:
        try:
            return self.for_key(key) is self.transit and self.transit is not None
        except S3fuseError:
            return False

    # ---- KmsProvider -------------------------------------------------------

    def generate_data_key(self, key, context, who):
        return self.for_key(key).generate_data_key(key, context, who)

    def generate_data_key_accepted(self, key, context, who):
        return self.for_key(key).generate_data_key_accepted(key, context, who)

    def decrypt(self, blob, context, who):
        return self.for_blob(blob).decrypt(blob, context, who)

    def decrypt_accepted(self, blob, context, who):
        return self.for_blob(blob).decrypt_accepted(blob, context, who)

    def authorize(self, key, action, who):
        return self.for_key(key).authorize(key, action, who)

    def resolve(self, key):
        return self.for_key(key).resolve(key)

    def describe(self, key):
        return self.for_key(key).describe(key)

    def default_key(self, who: Principal, now: float | None = None) -> str:
        if self.default == tr.PROVIDER and self._transit().settings.default_key:
            return self._transit().default_key(who, now)
        return self.builtin.default_key(who, now)

    # ---- the built-in KMS's administration and scheduler ------------------

    def __getattr__(self, attr):
        # create_key, list_keys, enable, disable, ... for built-in keys: the admin handlers
        # send Transit keys to the Transit provider themselves (control/transit_admin.py)
        return getattr(self.builtin, attr)

    def rotate_due(self, now=None):
        return self.builtin.rotate_due(now)

    def purge_expired(self, now=None):
        return self.builtin.purge_expired(now)


def open_kms(cfg, root_key: bytes, overrides: dict | None = None) -> KmsRouter:
    """The store's KMS: the built-in keystore, plus Transit if store.json "kms" (or the
    mount's overrides) configures it. A Transit token that the server rejects stops the
    mount; an unreachable server does not (the KMS may come back; calls fail with EIO)."""
    import logging

    settings = {**(cfg.kms or {}), **(overrides or {})}
    builtin = BuiltinKms.load(cfg.kms_path, root_key, cfg.store_id)
    quota = settings.get("key_quota", DEFAULT_KEY_QUOTA)
    if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
        raise S3fuseError(f"store.json \"kms\" \"key_quota\" must be a whole number >= 0, not {quota!r}",
                          errno.EINVAL)
    builtin.key_quota = quota
    provider = settings.get("provider", "builtin")
    transit = None
    if transit_configured(settings):
        ts = tr.TransitSettings.from_config(settings, base_dir=cfg.path)
        transit = tr.TransitKms(ts)
        try:
            transit.check_token()
        except S3fuseError as exc:
            if exc.errno != errno.EIO:
                raise S3fuseError(f"Transit KMS at {ts.address}: {exc}", exc.errno) from None
            logging.getLogger(__name__).warning(
                "Transit KMS at %s is not reachable now; KMS calls fail with EIO until it is",
                ts.address)
    return KmsRouter(builtin, transit, default=provider)


def transit_configured(settings: dict) -> bool:
    """Transit is the default provider, or named by an address or token file beside the built-in."""
    return settings.get("provider") == tr.PROVIDER or "address" in settings or "token_file" in settings

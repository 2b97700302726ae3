"""Optional backend and KMS abilities are declared on the base classes, with defaults, and
every caller relies on them there: no hasattr/getattr probing. Pure."""

import pathlib
import re

from s3fuse.backends.base import Backend
from s3fuse.backends.local import LocalBackend
from s3fuse.keys.kms import KmsProvider
from s3fuse.keys.router import KmsRouter

from .faulty import FaultyBackend

SRC = pathlib.Path(__file__).resolve().parent.parent / "s3fuse"


class _Minimal(Backend):
    async def put(self, key, data): ...
    async def get(self, key, offset=0, length=None): ...
    async def delete(self, key): ...
    async def head(self, key): ...
    def list(self): ...
    async def sync(self): ...


def test_a_backend_without_the_optional_abilities_gets_their_defaults():
    b = _Minimal()
    assert b.store_concurrency >= 1 and b.fetches_whole_objects is False
    assert b.prefetch("k") is None and b.try_get_ranges("k", [(0, 1)]) is None
    assert b.clear_tmp() is None and b.stats == {}


def test_the_fault_wrapper_has_the_wrapped_backends_abilities(tmp_path):
    inner = LocalBackend(str(tmp_path))
    faulty = FaultyBackend(inner, str(tmp_path / "plan.json"))
    assert faulty.store_concurrency == inner.store_concurrency
    assert faulty.fetches_whole_objects == inner.fetches_whole_objects
    assert set(faulty.stats) == set(inner.stats) and "direct_puts" in faulty.stats

    faulty.prefetch("ab" * 16)  # the local backend's read-ahead (of nothing), through the wrapper
    assert faulty.try_get_ranges("ab" * 16, [(0, 1)]) is None


def test_a_local_kms_provider_neither_blocks_nor_routes():
    assert KmsProvider.blocking is False and KmsProvider.transit is None
    for name in ("blocks", "for_key", "for_blob", "is_transit", "limiter"):
        assert name in vars(KmsProvider), name
    assert "blocks" in vars(KmsRouter) and "is_transit" in vars(KmsRouter)


def test_no_ability_is_found_by_probing():
    # a name probed on an object: hasattr(x, "..."), getattr(x.backend, "...", default)
    probe = re.compile(r"\bhasattr\(|getattr\([\w.]*(backend|kms|router|inner|provider|p), *[\"']")
    found = [f"{p.relative_to(SRC)}:{n}: {line.strip()}"
             for p in SRC.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
             if probe.search(line)]
    assert found == []

"""The built-in KMS as pure unit tests: key lifecycle, policy, data keys, rotation, sealing.

No mount: `BuiltinKms` is synchronous and its only I/O is its own keystore file,
which every test keeps under pytest's temporary directory. Time is passed in
explicitly (`now=`) so deletion and rotation dates are deterministic.
"""

from __future__ import annotations

import base64
import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3fuse.errors import S3fuseError
from s3fuse.keys import kms as kms_mod
from s3fuse.keys.kms import BuiltinKms, KmsProvider, Principal

ROOT_KEY = bytes(range(32))
STORE_ID = b"\xa0" * 16
T0 = 1_700_000_000.0
DAY = 86400

ALICE = Principal(1000, 1000)
BOB = Principal(1001, 1001)
CAROL = Principal(1002, 1002, (2000, 3000))
ROOT = Principal(0, 0)
CTX = {"store": STORE_ID.hex(), "object": "00112233445566778899aabbccddeeff"}


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "kms.sealed")


@pytest.fixture
def kms(path):
    return BuiltinKms.load(path, ROOT_KEY, STORE_ID)


def _errno(exc_info) -> int:
    assert isinstance(exc_info.value, S3fuseError)
    return exc_info.value.errno


def raises(err: int, fn, *args, **kwargs) -> S3fuseError:
    with pytest.raises(S3fuseError) as exc_info:
        fn(*args, **kwargs)
    assert _errno(exc_info) == err, f"expected {errno.errorcode[err]}, got {exc_info.value!r}"
    return exc_info.value


def pol(
    encrypt: dict | None = None, decrypt: dict | None = None, admin: dict | None = None
) -> dict:
    """A policy from its three sections (missing ones grant nobody but root)."""
    return {"encrypt": encrypt or {}, "decrypt": decrypt or {}, "admin": admin or {}}


def reload(kms: BuiltinKms) -> BuiltinKms:
    return BuiltinKms.load(kms.path, ROOT_KEY, STORE_ID)


# --------------------------------------------------------------------------
# creation, description, listing, aliases
# --------------------------------------------------------------------------

def test_is_a_provider(kms):
    assert isinstance(kms, KmsProvider)
    assert kms.name == "builtin"


def test_create_describe_list(kms):
    d = kms.create_key(ALICE, alias="alias/photos", description="holiday photos", now=T0)
    assert set(d) == {"id", "alias", "description", "created", "state", "deletion_date", "policy",
                      "versions", "current_version", "rotation", "managed"}
    assert d["alias"] == "alias/photos" and d["description"] == "holiday photos"
    assert d["created"] == int(T0) and d["state"] == "Enabled" and d["deletion_date"] is None
    assert d["versions"] == [1] and d["current_version"] == 1 and d["managed"] is False
    assert d["rotation"] == {"enabled": False, "period_days": 365, "next": None}
    for section in ("encrypt", "decrypt", "admin"):
        assert d["policy"][section] == {"uids": [ALICE.uid], "gids": []}
    assert kms.describe(d["id"]) == d == kms.describe("alias/photos")
    assert kms.resolve("alias/photos") == d["id"] == kms.resolve(d["id"])

    d2 = kms.create_key(BOB, now=T0 + 1)
    assert d2["alias"] is None
    assert [k["id"] for k in kms.list_keys()] == [d["id"], d2["id"]]


def test_unknown_keys_are_enokey(kms):
    kms.create_key(ALICE, alias="alias/a", now=T0)
    for name in ("alias/b", "00000000-0000-4000-8000-000000000000", "", "alias/"):
        raises(errno.ENOKEY, kms.resolve, name)
        raises(errno.ENOKEY, kms.describe, name)
        raises(errno.ENOKEY, kms.generate_data_key, name, CTX, ROOT)


@pytest.mark.parametrize("alias", [
    "photos", "alias/", "alias/with space", "alias/dot.name", "alias/colon:x", "Alias/x",
    "alias/" + "x" * 251, 42,
])
def test_alias_rejected(kms, alias):
    raises(errno.EINVAL, kms.create_key, ALICE, alias=alias, now=T0)
    assert kms.list_keys() == []


def test_alias_accepted_limits(kms):
    longest = "alias/" + "x" * 250
    assert len(longest) == 256
    for alias in ("alias/a", "alias/A-z_0/9", longest):
        assert kms.create_key(ALICE, alias=alias, now=T0)["alias"] == alias


def test_alias_reserved_and_unique(kms):
    raises(errno.EINVAL, kms.create_key, ALICE, alias="alias/aws/s3", now=T0)
    raises(errno.EINVAL, kms.create_key, ALICE, alias="alias/aws/mine", now=T0)
    kms.create_key(ALICE, alias="alias/dup", now=T0)
    raises(errno.EEXIST, kms.create_key, BOB, alias="alias/dup", now=T0)
    assert len(kms.list_keys()) == 1


def test_bad_description_is_einval(kms):
    raises(errno.EINVAL, kms.create_key, ALICE, description=7, now=T0)
    raises(errno.EINVAL, kms.create_key, ALICE, description="x" * 8193, now=T0)


# --------------------------------------------------------------------------
# sealing
# --------------------------------------------------------------------------

def test_absent_file_is_empty_keystore(kms, path):
    assert kms.list_keys() == []
    assert not os.path.exists(path)


def test_seal_round_trip(kms, path):
    a = kms.create_key(ALICE, alias="alias/a", description="first", now=T0)
    b = kms.create_key(BOB, now=T0 + 5)
    kms.rotate(a["id"], ALICE, now=T0 + 10)
    kms.schedule_deletion(b["id"], 7, BOB, now=T0 + 20)
    _, blob, _, _ = kms.generate_data_key("alias/a", CTX, ALICE)

    again = reload(kms)
    assert again.list_keys() == kms.list_keys()
    assert again.decrypt(blob, CTX, ALICE)[1:] == (a["id"], 2)

    raw = Path(path).read_bytes()
    assert raw[:5] == b"S3KM\x02"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_every_change_is_saved(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    steps = [
        lambda: kms.disable(kid, ALICE),
        lambda: kms.enable(kid, ALICE),
        lambda: kms.rotate(kid, ALICE, now=T0),
        lambda: kms.enable_rotation(kid, 30, ALICE, now=T0),
        lambda: kms.disable_rotation(kid, ALICE),
        lambda: kms.set_policy(kid, pol({"uids": ["*"]}, admin={"gids": [5]}), ALICE),
        lambda: kms.schedule_deletion(kid, 10, ROOT, now=T0),
        lambda: kms.cancel_deletion(kid, ROOT),
        lambda: kms.default_key(BOB, now=T0),
    ]
    for step in steps:
        step()
        assert reload(kms).list_keys() == kms.list_keys()


def test_wrong_root_key_is_eacces(kms, path):
    kms.create_key(ALICE, now=T0)
    exc = raises(errno.EACCES, BuiltinKms.load, path, b"\x01" * 32, STORE_ID)
    assert "wrong root key" in str(exc)


def test_other_store_id_does_not_open(kms, path):
    kms.create_key(ALICE, now=T0)
    raises(errno.EACCES, BuiltinKms.load, path, ROOT_KEY, b"\xb0" * 16)


def test_tampered_or_truncated_keystore(kms, path):
    kms.create_key(ALICE, now=T0)
    raw = bytearray(Path(path).read_bytes())
    raw[-1] ^= 1
    Path(path).write_bytes(bytes(raw))
    raises(errno.EACCES, BuiltinKms.load, path, ROOT_KEY, STORE_ID)
    Path(path).write_bytes(bytes(raw[:20]))
    with pytest.raises(S3fuseError, match="truncated"):
        BuiltinKms.load(path, ROOT_KEY, STORE_ID)
    Path(path).write_bytes(b"XXXX\x01" + bytes(raw[5:]))
    with pytest.raises(S3fuseError, match="unknown format"):
        BuiltinKms.load(path, ROOT_KEY, STORE_ID)


def test_failed_save_rolls_back(kms, monkeypatch):
    kid = kms.create_key(ALICE, now=T0)["id"]
    before = kms.list_keys()

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kms_mod, "atomic_write", broken)  # a whole rewrite
    monkeypatch.setattr(kms_mod.os, "pwrite", broken)  # an appended record
    with pytest.raises(OSError):
        kms.rotate(kid, ALICE, now=T0)
    with pytest.raises(OSError):
        kms.create_key(ALICE, now=T0)
    assert kms.list_keys() == before
    monkeypatch.undo()
    assert reload(kms).list_keys() == before


# --------------------------------------------------------------------------
# data keys
# --------------------------------------------------------------------------

def test_generate_decrypt_round_trip(kms):
    kid = kms.create_key(ALICE, alias="alias/a", now=T0)["id"]
    dk, blob, got_id, version = kms.generate_data_key("alias/a", CTX, ALICE)
    assert len(dk) == 32 and got_id == kid and version == 1
    assert dk not in blob
    assert kms.decrypt(blob, CTX, ALICE) == (dk, kid, 1)
    # Context order does not matter: it is canonicalised.
    assert kms.decrypt(blob, dict(reversed(list(CTX.items()))), ALICE)[0] == dk
    # Fresh data keys each time.
    assert kms.generate_data_key(kid, CTX, ALICE)[0] != dk


def test_blob_layout(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)
    n = len(kid)
    assert blob[:4] == b"KMS1"
    assert int.from_bytes(blob[4:6], "big") == n
    assert blob[6 : 6 + n] == kid.encode()
    assert int.from_bytes(blob[6 + n : 10 + n], "big") == 1
    assert len(blob) == 10 + n + 12 + 32 + 16


@pytest.mark.parametrize("ctx", [
    {"store": STORE_ID.hex(), "object": "ffffffffffffffffffffffffffffffff"},
    {"store": "00" * 16, "object": CTX["object"]},
    {"store": STORE_ID.hex()},
    {**CTX, "extra": "x"},
    {},
])
def test_wrong_context_fails(kms, ctx):
    kid = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)
    exc = raises(errno.EIO, kms.decrypt, blob, ctx, ALICE)
    assert "context" in str(exc)


def test_bad_context_type_is_einval(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    for ctx in (None, {"a": 1}, {1: "a"}, [("a", "b")], {"a": "\ud800"}):
        raises(errno.EINVAL, kms.generate_data_key, kid, ctx, ALICE)


def test_edited_key_id_fails(kms):
    a = kms.create_key(ALICE, now=T0)["id"]
    b = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(a, CTX, ALICE)
    assert len(a) == len(b)
    # Pointing at another existing key: its material does not authenticate the blob.
    raises(errno.EIO, kms.decrypt, blob.replace(a.encode(), b.encode()), CTX, ALICE)
    # Pointing at a key that does not exist.
    unknown = b"00000000-0000-4000-8000-000000000000"
    raises(errno.ENOKEY, kms.decrypt, blob.replace(a.encode(), unknown), CTX, ALICE)


def test_edited_or_malformed_blob_fails(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)
    n = 6 + len(kid)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    raises(errno.EIO, kms.decrypt, bytes(flipped), CTX, ALICE)
    # An unknown version of an existing key.
    raises(errno.ENOKEY, kms.decrypt, blob[:n] + (7).to_bytes(4, "big") + blob[n + 4 :], CTX, ALICE)
    for bad in (b"", b"KMS1", b"KMS2" + blob[4:], blob[:-1], blob + b"\0", "text"):
        raises(errno.EIO, kms.decrypt, bad, CTX, ALICE)


# --------------------------------------------------------------------------
# states
# --------------------------------------------------------------------------

def test_disable_and_enable(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)
    assert kms.disable(kid, ALICE)["state"] == "Disabled"
    raises(errno.EKEYREVOKED, kms.generate_data_key, kid, CTX, ALICE)
    raises(errno.EKEYREVOKED, kms.decrypt, blob, CTX, ALICE)
    raises(errno.EKEYREVOKED, kms.decrypt, blob, CTX, ROOT)  # state is not policy: root too
    # Administration still works on a disabled key.
    kms.rotate(kid, ALICE, now=T0)
    assert kms.enable(kid, ALICE)["state"] == "Enabled"
    assert kms.enable(kid, ALICE)["state"] == "Enabled"  # idempotent
    kms.decrypt(blob, CTX, ALICE)
    assert kms.generate_data_key(kid, CTX, ALICE)[3] == 2


@pytest.mark.parametrize("days", [6, 31, 0, -1, 7.5, True, "7"])
def test_schedule_deletion_bounds(kms, days):
    kid = kms.create_key(ALICE, now=T0)["id"]
    raises(errno.EINVAL, kms.schedule_deletion, kid, days, ALICE, now=T0)
    assert kms.describe(kid)["state"] == "Enabled"


@pytest.mark.parametrize("days", [7, 30])
def test_schedule_and_cancel_deletion(kms, days):
    kid = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)
    d = kms.schedule_deletion(kid, days, ALICE, now=T0)
    assert d["state"] == "PendingDeletion" and d["deletion_date"] == int(T0) + days * DAY
    raises(errno.EKEYREVOKED, kms.generate_data_key, kid, CTX, ALICE)
    raises(errno.EKEYREVOKED, kms.decrypt, blob, CTX, ALICE)
    raises(errno.EINVAL, kms.enable, kid, ALICE)  # cancel first, as in AWS
    raises(errno.EINVAL, kms.schedule_deletion, kid, days, ALICE, now=T0)
    d = kms.cancel_deletion(kid, ALICE)
    assert d["state"] == "Disabled" and d["deletion_date"] is None
    raises(errno.EINVAL, kms.cancel_deletion, kid, ALICE)
    kms.enable(kid, ALICE)
    assert kms.decrypt(blob, CTX, ALICE)[1] == kid


def test_purge_after_date(kms):
    kid = kms.create_key(ALICE, alias="alias/doomed", now=T0)["id"]
    keep = kms.create_key(ALICE, now=T0)["id"]
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)
    kms.schedule_deletion(kid, 7, ALICE, now=T0)
    assert kms.purge_expired(now=T0 + 7 * DAY - 1) == []
    assert kms.describe(kid)["state"] == "PendingDeletion"
    assert kms.purge_expired(now=T0 + 7 * DAY) == [kid]
    for k in (kms, reload(kms)):
        raises(errno.ENOKEY, k.decrypt, blob, CTX, ALICE)
        raises(errno.ENOKEY, k.describe, kid)
        raises(errno.ENOKEY, k.resolve, "alias/doomed")
        assert [d["id"] for d in k.list_keys()] == [keep]
    assert kms.purge_expired(now=T0 + 100 * DAY) == []
    # The alias is free again.
    kms.create_key(ALICE, alias="alias/doomed", now=T0)


# --------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------

def test_policy_uid_gid_and_groups(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    kms.set_policy(kid, {
        "encrypt": {"uids": [BOB.uid], "gids": [2000]},
        "decrypt": {"uids": [BOB.uid], "gids": [2000]},
        "admin": {"uids": [ALICE.uid]},
    }, ALICE)
    by_uid = BOB
    by_gid = Principal(1500, 2000)
    by_group = CAROL  # 2000 is one of its supplementary groups
    denied = Principal(1600, 1600, (3000, 4000))
    for who in (by_uid, by_gid, by_group, ROOT):
        _, blob, _, _ = kms.generate_data_key(kid, CTX, who)
        kms.decrypt(blob, CTX, who)
    _, blob, _, _ = kms.generate_data_key(kid, CTX, BOB)
    for who in (denied, ALICE):  # ALICE is admin only now
        raises(errno.EACCES, kms.generate_data_key, kid, CTX, who)
        raises(errno.EACCES, kms.decrypt, blob, CTX, who)


def test_policy_sections_are_separate(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    kms.set_policy(
        kid, pol({"uids": [BOB.uid]}, {"uids": [CAROL.uid]}, {"uids": [ALICE.uid]}), ALICE
    )
    _, blob, _, _ = kms.generate_data_key(kid, CTX, BOB)  # a writer that cannot read back
    raises(errno.EACCES, kms.decrypt, blob, CTX, BOB)
    kms.decrypt(blob, CTX, CAROL)
    raises(errno.EACCES, kms.generate_data_key, kid, CTX, CAROL)


def test_star_means_everyone(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    kms.set_policy(kid, pol({"uids": ["*"]}, {"uids": ["*"]}), ALICE)
    for uid in (1, 65534, 123456):
        who = Principal(uid, uid)
        _, blob, _, _ = kms.generate_data_key(kid, CTX, who)
        kms.decrypt(blob, CTX, who)


def test_non_admin_cannot_administer(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    acts = [
        lambda: kms.disable(kid, BOB),
        lambda: kms.enable(kid, BOB),
        lambda: kms.schedule_deletion(kid, 7, BOB, now=T0),
        lambda: kms.set_policy(kid, pol(admin={"uids": [BOB.uid]}), BOB),
        lambda: kms.rotate(kid, BOB, now=T0),
        lambda: kms.enable_rotation(kid, 30, BOB, now=T0),
        lambda: kms.disable_rotation(kid, BOB),
    ]
    for act in acts:
        raises(errno.EACCES, act)
    raises(errno.EACCES, kms.cancel_deletion, kid, BOB)
    assert kms.describe(kid)["versions"] == [1] and kms.describe(kid)["state"] == "Enabled"
    # Admin by group works; root is always admin.
    kms.set_policy(kid, {"encrypt": {}, "decrypt": {}, "admin": {"gids": [3000]}}, ALICE)
    kms.disable(kid, CAROL)
    kms.enable(kid, ROOT)
    raises(errno.EACCES, kms.disable, kid, ALICE)  # ALICE removed herself from admin


@pytest.mark.parametrize("policy", [
    None, [],
    {"encrypt": {}, "decrypt": {}, "admin": {}, "extra": {}},
    {"encrypt": [], "decrypt": {}, "admin": {}},
    {"encrypt": {"users": [1]}, "decrypt": {}, "admin": {}},
    {"encrypt": {"uids": 5}, "decrypt": {}, "admin": {}},
    {"encrypt": {"uids": [-1]}, "decrypt": {}, "admin": {}},
    {"encrypt": {"uids": ["1"]}, "decrypt": {}, "admin": {}},
    {"encrypt": {"uids": [True]}, "decrypt": {}, "admin": {}},
    {"encrypt": {"gids": ["*"]}, "decrypt": {}, "admin": {}},
    {"encrypt": {"uids": [2**32]}, "decrypt": {}, "admin": {}},
    {"encrypt": {"uids": list(range(1025))}, "decrypt": {}, "admin": {}},
])
def test_bad_policy_is_einval(kms, policy):
    kid = kms.create_key(ALICE, now=T0)["id"]
    before = kms.get_policy(kid)
    raises(errno.EINVAL, kms.set_policy, kid, policy, ALICE)
    assert kms.get_policy(kid) == before


def test_policy_is_normalised_and_copied(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    kms.set_policy(kid, pol({"uids": [5, 3, 5, "*"]}, {"gids": (9, 1)}), ALICE)
    policy = kms.get_policy(kid)
    assert policy == {
        "encrypt": {"uids": ["*", 3, 5], "gids": []},
        "decrypt": {"uids": [], "gids": [1, 9]},
        "admin": {"uids": [], "gids": []},
    }
    policy["admin"]["uids"].append(BOB.uid)  # a returned copy cannot grant anything
    raises(errno.EACCES, kms.disable, kid, BOB)


def test_create_with_policy(kms):
    d = kms.create_key(ALICE, now=T0, policy=pol({"uids": ["*"]}, {"gids": [2000]}))
    raises(errno.EACCES, kms.disable, d["id"], ALICE)
    raises(errno.EINVAL, kms.create_key, ALICE, now=T0, policy={"encrypt": {}, "other": {}})


def test_a_section_left_out_is_nobody_but_root(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    kms.set_policy(kid, {"decrypt": {"uids": [BOB.uid]}}, ALICE)
    assert kms.get_policy(kid) == {"encrypt": {"uids": [], "gids": []},
                                   "decrypt": {"uids": [BOB.uid], "gids": []},
                                   "admin": {"uids": [], "gids": []}}
    kms.authorize(kid, "decrypt", BOB)
    raises(errno.EACCES, kms.authorize, kid, "encrypt", ALICE)
    raises(errno.EACCES, kms.disable, kid, ALICE)
    kms.authorize(kid, "encrypt", ROOT)
    kms.disable(kid, ROOT)


# --------------------------------------------------------------------------
# rotation
# --------------------------------------------------------------------------

def test_rotate_keeps_old_versions(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    dk1, blob1, _, v1 = kms.generate_data_key(kid, CTX, ALICE)
    d = kms.rotate(kid, ALICE, now=T0 + 1)
    assert d["versions"] == [1, 2] and d["current_version"] == 2 and d["id"] == kid
    dk2, blob2, _, v2 = kms.generate_data_key(kid, CTX, ALICE)
    assert (v1, v2) == (1, 2)
    assert kms.decrypt(blob1, CTX, ALICE) == (dk1, kid, 1)
    assert kms.decrypt(blob2, CTX, ALICE) == (dk2, kid, 2)
    assert reload(kms).decrypt(blob1, CTX, ALICE) == (dk1, kid, 1)


@pytest.mark.parametrize("days", [0, 2561, -5, 1.5, None])
def test_enable_rotation_bounds(kms, days):
    kid = kms.create_key(ALICE, now=T0)["id"]
    raises(errno.EINVAL, kms.enable_rotation, kid, days, ALICE, now=T0)


def test_automatic_rotation(kms):
    kid = kms.create_key(ALICE, now=T0)["id"]
    other = kms.create_key(ALICE, now=T0)["id"]  # rotation off: never due
    d = kms.enable_rotation(kid, 10, ALICE, now=T0)
    assert d["rotation"] == {"enabled": True, "period_days": 10, "next": int(T0) + 10 * DAY}
    _, blob, _, _ = kms.generate_data_key(kid, CTX, ALICE)

    assert kms.due_rotations(T0 + 10 * DAY - 1) == []
    assert kms.rotate_due(T0 + 10 * DAY - 1) == []
    assert kms.due_rotations(T0 + 10 * DAY) == [kid]
    assert kms.rotate_due(T0 + 10 * DAY + 5) == [kid]
    d = kms.describe(kid)
    assert d["current_version"] == 2 and d["rotation"]["next"] == int(T0) + 20 * DAY + 5
    assert kms.rotate_due(T0 + 10 * DAY + 6) == []
    assert reload(kms).describe(kid) == d
    assert kms.describe(other)["versions"] == [1]
    kms.decrypt(blob, CTX, ALICE)

    # A disabled key is not rotated; once enabled again after its date, it is.
    kms.disable(kid, ALICE)
    assert kms.rotate_due(T0 + 40 * DAY) == []
    kms.enable(kid, ALICE)
    assert kms.rotate_due(T0 + 40 * DAY) == [kid]
    assert kms.describe(kid)["current_version"] == 3

    d = kms.disable_rotation(kid, ALICE)
    assert d["rotation"] == {"enabled": False, "period_days": 10, "next": None}
    assert kms.rotate_due(T0 + 1000 * DAY) == []


# --------------------------------------------------------------------------
# the service-managed default key
# --------------------------------------------------------------------------

def test_default_key_created_once_and_open_to_all(kms):
    kid = kms.default_key(ALICE, now=T0)
    assert kms.default_key(BOB, now=T0 + 1) == kid
    assert reload(kms).default_key(CAROL, now=T0 + 2) == kid
    d = kms.describe("alias/aws/s3")
    assert d["id"] == kid and d["managed"] is True and d["state"] == "Enabled"
    assert d["rotation"]["enabled"] is True
    assert len(kms.list_keys()) == 1
    _, blob, _, _ = kms.generate_data_key(kid, CTX, Principal(4242, 4242))
    assert kms.decrypt(blob, CTX, Principal(777, 777))[1] == kid


def test_default_key_lifecycle_is_fixed(kms):
    kid = kms.default_key(ALICE, now=T0)
    raises(errno.EACCES, kms.disable, kid, ALICE)  # not an admin
    raises(errno.EPERM, kms.disable, kid, ROOT)  # nobody may
    raises(errno.EPERM, kms.schedule_deletion, kid, 7, ROOT, now=T0)
    raises(errno.EPERM, kms.set_policy, kid, {"encrypt": {}, "decrypt": {}, "admin": {}}, ROOT)
    raises(errno.EPERM, kms.disable_rotation, kid, ROOT)
    raises(errno.EPERM, kms.enable_rotation, kid, 30, ROOT, now=T0)
    assert kms.rotate(kid, ROOT, now=T0)["current_version"] == 2
    assert kms.rotate_due(T0 + 365 * DAY) == [kid]


# --------------------------------------------------------------------------
# key material never leaks
# --------------------------------------------------------------------------

def _forms(material: bytes) -> list[str]:
    return [
        repr(material), material.hex(), material.hex().upper(),
        base64.b64encode(material).decode(), base64.urlsafe_b64encode(material).decode(),
        base64.b64encode(material).decode().rstrip("="),
    ]


def test_no_key_material_in_outputs(kms):
    a = kms.create_key(ALICE, alias="alias/a", now=T0)["id"]
    kms.rotate(a, ALICE, now=T0)
    kms.rotate(a, ALICE, now=T0)
    b = kms.create_key(BOB, now=T0)["id"]
    kms.default_key(CAROL, now=T0)
    kms.schedule_deletion(b, 7, BOB, now=T0)

    outputs = [kms.list_keys(), kms.describe(a), kms.describe(b), kms, kms._keys,
               kms.get_policy(a), kms.enable(a, ALICE), kms.rotate(a, ALICE, now=T0)]
    texts = [repr(o) for o in outputs] + [str(kms)]
    _, blob, _, _ = kms.generate_data_key(a, CTX, ALICE)
    for fn, args in [
        (kms.decrypt, (blob, {"other": "ctx"}, ALICE)),
        (kms.decrypt, (blob, CTX, BOB)),
        (kms.generate_data_key, (b, CTX, BOB)),
        (kms.disable, (a, BOB)),
        (kms.describe, ("alias/none",)),
    ]:
        with pytest.raises(S3fuseError) as exc_info:
            fn(*args)
        texts += [str(exc_info.value), repr(exc_info.value)]
    blob_text = "\n".join(texts)

    materials = [m for k in kms._keys.values() for m in k.versions.values()]
    assert len(materials) == 4 + 1 + 1  # a: v1 + three rotations; b; the default key
    for material in materials:
        for form in _forms(material):
            assert form not in blob_text


# --------------------------------------------------------------------------
# property: any context round-trips, and any other context does not
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_kms(tmp_path_factory):
    k = BuiltinKms.load(str(tmp_path_factory.mktemp("kms") / "kms.sealed"), ROOT_KEY, STORE_ID)
    k.create_key(ALICE, alias="alias/prop", now=T0)
    return k


_contexts = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=6)


@settings(max_examples=150, deadline=None)
@given(ctx=_contexts, other=_contexts)
def test_round_trip_random_contexts(shared_kms, ctx, other):
    dk, blob, kid, version = shared_kms.generate_data_key("alias/prop", ctx, ALICE)
    reordered = dict(sorted(ctx.items(), reverse=True))
    assert shared_kms.decrypt(blob, reordered, ALICE) == (dk, kid, version)
    if other != ctx:
        raises(errno.EIO, shared_kms.decrypt, blob, other, ALICE)


def test_authorize_checks_state_and_policy_without_minting(tmp_path):
    kms = BuiltinKms.load(str(tmp_path / "kms.bin"), ROOT_KEY, STORE_ID)
    owner = Principal(1000, 1000)
    key_id = kms.create_key(owner, alias="alias/auth", now=0)["id"]
    assert kms.authorize("alias/auth", "encrypt", owner) == key_id
    assert kms.authorize(key_id, "decrypt", owner) == key_id
    with pytest.raises(S3fuseError) as exc:
        kms.authorize(key_id, "decrypt", Principal(1001, 1001))
    assert exc.value.errno == errno.EACCES
    kms.disable(key_id, owner)
    with pytest.raises(S3fuseError) as exc:
        kms.authorize(key_id, "encrypt", owner)
    assert exc.value.errno == errno.EKEYREVOKED
    with pytest.raises(S3fuseError) as exc:
        kms.authorize("alias/none", "encrypt", owner)
    assert exc.value.errno == errno.ENOKEY


# --------------------------------------------------------------------------
# the keystore file: version 2 appends one record per change
# --------------------------------------------------------------------------

def test_a_create_appends_a_record_of_constant_size(kms, path):
    sizes = [os.path.getsize(path)] if os.path.exists(path) else [0]
    for i in range(200):
        kms.create_key(ROOT, description="d" * 100, now=T0)
        sizes.append(os.path.getsize(path))
    growth = [b - a for a, b in zip(sizes[1:], sizes[2:])]
    assert max(growth) - min(growth) <= 8, (min(growth), max(growth))  # not the whole keystore
    assert reload(kms).list_keys() == kms.list_keys()


def test_the_log_is_compacted(kms, path):
    kid = kms.create_key(ALICE, now=T0)["id"]
    for _ in range(kms_mod.COMPACT_RECORDS + 10):
        kms.disable(kid, ALICE)
        kms.enable(kid, ALICE)
    assert os.path.getsize(path) < 100 * 1024  # rewritten, not 500 records long
    assert reload(kms).describe(kid)["state"] == "Enabled"


def test_version_1_keystore_still_loads_and_is_rewritten(path):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    import msgpack

    kms = BuiltinKms(path, ROOT_KEY, STORE_ID)
    kid = kms.create_key(ALICE, alias="alias/old", now=T0)["id"]
    bodies = {k: v.to_body() for k, v in kms._keys.items()}
    for b in bodies.values():
        b.pop("creator")  # version 1 records had none
    nonce = bytes(12)
    sealed = AESGCM(ROOT_KEY).encrypt(nonce, msgpack.packb({"keys": bodies}), b"s3fuse/v1/kms" + STORE_ID)
    Path(path).write_bytes(b"S3KM\x01" + nonce + sealed)
    old = BuiltinKms.load(path, ROOT_KEY, STORE_ID)
    assert old.describe("alias/old")["id"] == kid
    old.rotate(kid, ALICE, now=T0)
    assert Path(path).read_bytes()[:5] == b"S3KM\x02"
    assert reload(old).describe(kid)["current_version"] == 2


def _records(raw: bytes) -> list[bytes]:
    out, pos = [], 5 + kms_mod.FILE_ID_LEN
    while pos < len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        out.append(raw[pos:pos + 4 + n])
        pos += 4 + n
    return out


def test_records_cannot_be_moved_dropped_or_spliced(kms, path):
    a = kms.create_key(ALICE, now=T0)["id"]
    kms.disable(a, ALICE)
    kms.enable(a, ALICE)
    raw = Path(path).read_bytes()
    head = 5 + kms_mod.FILE_ID_LEN
    records = _records(raw)
    assert len(records) == 3  # created (record 0, the first write), disabled, enabled
    # the "disable" record dropped from the middle: the next one no longer authenticates
    Path(path).write_bytes(raw[:head] + records[0] + records[2])
    with pytest.raises(S3fuseError, match="record 1 does not authenticate"):
        BuiltinKms.load(path, ROOT_KEY, STORE_ID)
    # a record from another copy of the file (another file id), in the next place
    other = BuiltinKms(path + ".2", ROOT_KEY, STORE_ID)
    kid = other.create_key(ALICE, now=T0)["id"]
    other.disable(kid, ALICE)
    other.enable(kid, ALICE)
    other.disable(kid, ALICE)
    Path(path).write_bytes(raw + _records(Path(path + ".2").read_bytes())[3])
    with pytest.raises(S3fuseError, match="record 3 does not authenticate"):
        BuiltinKms.load(path, ROOT_KEY, STORE_ID)
    # a record cut short by a crash is ignored, and cut off at the next change
    Path(path).write_bytes(raw + records[2][:10])
    torn = BuiltinKms.load(path, ROOT_KEY, STORE_ID)
    assert torn.describe(a)["state"] == "Enabled"
    torn.disable(a, ALICE)
    assert reload(torn).describe(a)["state"] == "Disabled"


def test_key_quota_per_uid_and_description_limit(kms):
    kms.key_quota = 3
    for _ in range(3):
        kms.create_key(ALICE, now=T0)
    err = raises(errno.EDQUOT, kms.create_key, ALICE, now=T0)
    assert "quota" in str(err)
    kms.create_key(BOB, now=T0)  # another uid's quota is its own
    kms.create_key(ROOT, now=T0)  # root has none
    kid = [k["id"] for k in kms.list_keys() if k["policy"]["admin"]["uids"] == [ALICE.uid]][0]
    kms.schedule_deletion(kid, 7, ALICE, now=T0)
    kms.purge_expired(now=T0 + 8 * 86400)
    kms.create_key(ALICE, now=T0)  # a deleted key frees its place
    raises(errno.EINVAL, kms.create_key, BOB, description="x" * (kms_mod.MAX_DESCRIPTION_LEN + 1), now=T0)


def test_keystore_matches_documented_vector(path):
    import re
    import struct

    import msgpack
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .test_format import FORMAT_MD

    section = open(FORMAT_MD).read().split("## KMS keystore", 1)[1].split("Test vector (root key", 1)[1]
    documented = bytes.fromhex(re.search(r"```\n([0-9a-f\n]+)```", section).group(1).replace("\n", ""))
    file_id = b"\x11" * 16

    def record(n, body, nonce):
        aad = b"s3fuse/v2/kms" + STORE_ID + file_id + struct.pack(">Q", n)
        sealed = nonce + AESGCM(ROOT_KEY).encrypt(nonce, msgpack.packb(body), aad)
        return struct.pack(">I", len(sealed)) + sealed

    built = (b"S3KM\x02" + file_id + record(0, {"keys": {}}, (1).to_bytes(12, "big"))
             + record(1, {"put": {}, "del": ["x"]}, (2).to_bytes(12, "big")))
    assert built == documented
    Path(path).write_bytes(documented)
    kms = BuiltinKms.load(path, ROOT_KEY, STORE_ID)  # the reader takes it
    assert kms.list_keys() == []
    kms.create_key(ALICE, now=T0)  # and appends record 2 to it
    assert Path(path).read_bytes()[:len(documented)] == documented
    assert len(reload(kms).list_keys()) == 1

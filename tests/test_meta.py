"""The metadata database's in-memory shortcuts stay correct and bounded."""

from __future__ import annotations

import time

from s3fuse import meta as meta_mod
from s3fuse.meta import Meta


def test_xattr_shortcut_answers_like_the_database(tmp_path, monkeypatch):
    monkeypatch.setattr(meta_mod, "XATTR_SET_LIMIT", 3)
    m = Meta.create(str(tmp_path / "m.db"), 0, 0, time.time_ns())
    with m.transaction():
        for ino in range(2, 5):
            m.set_xattr(ino, b"user.a", b"v%d" % ino)
    assert m.get_xattr(3, b"user.a") == b"v3"
    assert m.get_xattr(30, b"user.a") is None
    assert m._xattr_inodes == {2, 3, 4}
    # past the limit the set is dropped and every lookup asks the database
    with m.transaction():
        for ino in range(5, 9):
            m.set_xattr(ino, b"user.b", b"w")
    assert m.get_xattr(8, b"user.b") == b"w"
    assert m._xattr_inodes is meta_mod._ALWAYS_ASK
    assert m.list_xattrs(7) == [b"user.b"]
    # a new connection with more inodes than the limit starts in that mode
    again = Meta(str(tmp_path / "m.db"))
    assert again.get_xattr(6, b"user.b") == b"w"
    assert again._xattr_inodes is meta_mod._ALWAYS_ASK

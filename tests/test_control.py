"""The control socket: request framing and who may hold its connections."""

from __future__ import annotations

import errno

from s3fuse.control import protocol

from .test_sse import _exchange, _frame, _replies


def test_only_an_int_is_protocol_version_1(mounted):
    path = protocol.socket_path(str(mounted.mnt))
    ok = _replies(_exchange(path, _frame({"v": 1, "op": "key.list", "args": {}})))
    assert [r["ok"] for r in ok] == [True]
    for version in (True, 1.0, "1", b"\x01"):
        replies = _replies(_exchange(path, _frame({"v": version, "op": "key.list", "args": {}})))
        assert len(replies) == 1 and not replies[0]["ok"], (version, replies)
        assert replies[0]["errno"] == errno.EPROTO, (version, replies)

"""The control socket: request framing and who may hold its connections."""

from __future__ import annotations

import errno
import subprocess

from s3fuse.control import protocol
from s3fuse.control.server import ConnectionQuota

from .conftest import UNPRIV_PYTHON
from .test_sse import ALICE, BOB, _exchange, _frame, _replies, cli


def test_only_an_int_is_protocol_version_1(mounted):
    path = protocol.socket_path(str(mounted.mnt))
    ok = _replies(_exchange(path, _frame({"v": 1, "op": "key.list", "args": {}})))
    assert [r["ok"] for r in ok] == [True]
    for version in (True, 1.0, "1", b"\x01"):
        replies = _replies(_exchange(path, _frame({"v": version, "op": "key.list", "args": {}})))
        assert len(replies) == 1 and not replies[0]["ok"], (version, replies)
        assert replies[0]["errno"] == errno.EPROTO, (version, replies)


def test_connection_quota_is_per_uid_with_a_share_for_root():
    q = ConnectionQuota(total=10, per_uid=3, root_share=2)
    assert [q.acquire(1000) for _ in range(3)] == [None] * 3
    assert "already holds 3" in q.acquire(1000)
    assert [q.acquire(1001) for _ in range(3)] == [None] * 3
    assert q.acquire(1002) is None and q.acquire(1002) is None
    assert q.acquire(1003) == "too many control connections"  # the last 2 are root's
    assert q.acquire(0) is None and q.acquire(0) is None
    assert q.acquire(0) == "too many control connections"
    q.release(1000)
    assert q.acquire(1003) is None
    assert q.count == 10 and q.held[1000] == 2


_HOLDER = r"""
import select, socket, sys

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    try:
        s.send(b"\x00\x00")  # half a length prefix: an idle, half-open request
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused (over the quota) and closed before the send: its reply is read below
    return s

held = [connect() for _ in range(int(sys.argv[2]))]
print("holding", flush=True)
while True:  # as the attack did: renew every connection the daemon closes, until stdin closes
    ready, _, _ = select.select([sys.stdin, *held], [], [])
    if sys.stdin in ready:
        break
    for s in ready:
        try:
            refused = bool(s.recv(4096))  # an EBUSY reply: over the quota, not renewed
        except ConnectionResetError:
            refused = True
        held.remove(s)
        s.close()
        if not refused:  # closed for being idle: renewed
            held.append(connect())
"""


def test_one_uid_holding_its_connections_does_not_stop_another(mount_factory):
    m = mount_factory(extra_args=["--allow-other"])
    path = protocol.socket_path(str(m.mnt))
    # alice takes more than her share of the socket, as in the attack: 64 idle connections
    holder = subprocess.Popen([UNPRIV_PYTHON, "-c", _HOLDER, path, "64"], user=ALICE, group=ALICE,
                              extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd="/")
    try:
        assert holder.stdout.readline().strip() == "holding"
        # bob's and root's requests are served (alice's beyond her share get EBUSY: above)
        r = cli("key", "list", "-m", m.mnt, uid=BOB)
        assert r.returncode == 0, r.stderr
        r = cli("kms", "list", "-m", m.mnt)
        assert r.returncode == 0, r.stderr
        reply = _replies(_exchange(path, _frame({"v": 1, "op": "key.list", "args": {}})))
        assert reply[0]["ok"], reply
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    r = cli("key", "list", "-m", m.mnt, uid=ALICE)  # her connections gone: served again
    assert r.returncode == 0, r.stderr
    assert "refusing connections of uid 2001" in m.log_text()

"""The daemon's control-socket server.

Each connection is its own task with a bounded read timeout per frame, so a slow or
hung client cannot block others; a malformed frame gets an error reply and the
connection is closed. Callers are identified by SO_PEERCRED and every handler gets
their uid, gid and pid to authorise the request.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..crypto import Caller
from ..errors import S3fuseError
from . import protocol

log = logging.getLogger(__name__)

FRAME_TIMEOUT = 30.0  # to receive one frame, once it has begun
IDLE_TIMEOUT = 10.0  # to wait for the next frame: the CLI sends its request at once
MAX_CONNECTIONS = 64
PER_UID_CONNECTIONS = 8  # held at once by one uid other than root
ROOT_SHARE = 8  # of MAX_CONNECTIONS, kept for root whatever the others hold


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int

    def caller(self) -> Caller:
        """The peer as the key manager's caller (its policies and audit records)."""
        return Caller(self.uid, self.gid, self.pid)


Handler = Callable[[Peer, dict], Awaitable[object]]


def _peer(sock: trio.socket.SocketType) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(uid, gid, pid)


class ConnectionQuota:
    """Control connections held at once: `per_uid` for each uid but root, `total` in all,
    of which `root_share` only root may take. One user's idle connections thus never lock
    out another user, nor root."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_uid: int = PER_UID_CONNECTIONS,
                 root_share: int = ROOT_SHARE) -> None:
        self.total, self.per_uid, self.root_share = total, per_uid, root_share
        self.held: dict[int, int] = {}
        self.count = 0

    def acquire(self, uid: int) -> str | None:
        """Take a slot for `uid` -> None, or why not (the caller answers EBUSY)."""
        if uid != 0 and self.held.get(uid, 0) >= self.per_uid:
            return f"uid {uid} already holds {self.per_uid} control connections"
        others = self.count - self.held.get(0, 0)
        if self.count >= self.total or (uid != 0 and others >= self.total - self.root_share):
            return "too many control connections"
        self.held[uid] = self.held.get(uid, 0) + 1
        self.count += 1
        return None

    def release(self, uid: int) -> None:
        n = self.held.get(uid, 0) - 1
        if n > 0:
            self.held[uid] = n
        else:
            self.held.pop(uid, None)
        self.count -= 1


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.quota = ConnectionQuota()
        self._refusing: set[int] = set()  # uids refused lately: logged once until a slot frees

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(self.path)
        # anyone may connect; each request is authorised from the peer's credentials
        os.chmod(self.path, 0o666)
        listener.listen(64)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._connection, conn)
        finally:
            listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _recv_exact(self, conn, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = await conn.recv(min(n - len(buf), 65536))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    async def _connection(self, conn) -> None:
        with conn:
            try:
                peer = _peer(conn)
            except OSError:
                return
            refused = self.quota.acquire(peer.uid)
            if refused is not None:
                if peer.uid not in self._refusing:
                    self._refusing.add(peer.uid)
                    log.warning("control: refusing connections of uid %d (pid %d): %s",
                                peer.uid, peer.pid, refused)
                await self._send(conn, protocol.error(errno.EBUSY, refused))
                return
            try:
                await self._serve_peer(conn, peer)
            finally:
                self.quota.release(peer.uid)
                self._refusing.discard(peer.uid)

    async def _serve_peer(self, conn, peer: Peer) -> None:
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    prefix = await self._recv_exact(conn, 4)
                if idle.cancelled_caught or prefix is None:
                    return
                with trio.move_on_after(FRAME_TIMEOUT) as scope:
                    body = await self._recv_exact(conn, protocol.frame_length(prefix))
                if scope.cancelled_caught or body is None:
                    return
                reply = await self._dispatch(peer, protocol.decode(body))
                await self._send(conn, reply)
        except protocol.ProtocolError as exc:
            log.warning("control: bad frame from a client: %s", exc)
            await self._send(conn, protocol.error(errno.EBADMSG, str(exc)))
        except OSError:
            return
        except Exception:
            # a bug in one request must not take the daemon down
            log.exception("control connection failed")

    async def _send(self, conn, message: dict) -> None:
        data = memoryview(protocol.encode(message))
        try:
            with trio.move_on_after(FRAME_TIMEOUT):
                while data:
                    data = data[await conn.send(data) :]
        except OSError:
            pass

    async def _dispatch(self, peer: Peer, message: dict) -> dict:
        version = message.get("v")
        if type(version) is not int or version != protocol.VERSION:  # not True, not 1.0
            return protocol.error(errno.EPROTO, f"unsupported protocol version {message.get('v')!r}")
        op, args = message.get("op"), message.get("args", {})
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return protocol.error(errno.EOPNOTSUPP, f"unknown request {op!r}")
        if not isinstance(args, dict):
            return protocol.error(errno.EINVAL, "args must be a map")
        try:
            return protocol.ok(await handler(peer, args))
        except S3fuseError as exc:
            return protocol.error(exc.errno, str(exc))
        except (TypeError, ValueError, KeyError) as exc:
            return protocol.error(errno.EINVAL, f"bad arguments: {exc}")
        except Exception:
            log.exception("control request %r failed", op)
            return protocol.error(errno.EIO, "internal error (see the daemon log)")

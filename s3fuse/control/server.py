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

from . import protocol
from ..errors import S3fuseError

log = logging.getLogger(__name__)

FRAME_TIMEOUT = 30.0
MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int


Handler = Callable[[Peer, dict], Awaitable[object]]


def _peer(sock: trio.socket.SocketType) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(uid, gid, pid)


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

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
            if self._slots.borrowed_tokens >= MAX_CONNECTIONS:
                await self._send(conn, protocol.error(errno.EBUSY, "too many control connections"))
                return
            async with self._slots:
                try:
                    peer = _peer(conn)
                    while True:
                        with trio.move_on_after(FRAME_TIMEOUT) as scope:
                            prefix = await self._recv_exact(conn, 4)
                            if prefix is None:
                                return
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

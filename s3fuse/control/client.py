"""A blocking control-socket client for the CLI."""

from __future__ import annotations

import errno
import socket

from . import protocol
from ..errors import S3fuseError


class ControlClient:
    def __init__(self, path: str, timeout: float | None = 600) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise S3fuseError(f"no s3fuse daemon is listening on {path}", errno.ENOTCONN) from None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise S3fuseError("the daemon closed the control connection", errno.ECONNRESET)
            buf += chunk
        return bytes(buf)

    def call(self, op: str, **args):
        self.sock.sendall(protocol.encode(protocol.request(op, **args)))
        length = protocol.frame_length(self._recv_exact(4))
        reply = protocol.decode(self._recv_exact(length))
        if not reply.get("ok"):
            raise S3fuseError(reply.get("error", "request failed"), reply.get("errno", errno.EIO))
        return reply.get("result")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

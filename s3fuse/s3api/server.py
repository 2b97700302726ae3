"""The HTTP/1.1 side of the S3 endpoint: h11 (sans-I/O) over trio streams, with bounds.

Each connection is one task. Bounds: the request head (HEADER_LIMIT), connections per
client address, the time to send a request head or a piece of body (a slow client is
dropped), the time a kept-alive connection may sit idle. Bodies are streamed to the
handler, never buffered whole. `Expect: 100-continue` is answered when the handler
first reads the body, so a request refused before that sends none.
"""

from __future__ import annotations

import http
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio

from ..util import one_error
from .errors import S3Error

log = logging.getLogger(__name__)

HEADER_LIMIT = 16 * 1024
READ_SIZE = 256 * 1024
STREAM_AHEAD = 1  # pieces of a streamed body produced ahead of the one being sent


@dataclass
class Limits:
    header_timeout: float = 20.0  # to send a whole request head
    body_timeout: float = 60.0  # between two pieces of a body
    idle_timeout: float = 60.0  # a kept-alive connection with no request
    per_client: int = 64  # connections open at once from one address


class Request:
    def __init__(self, conn: "_Connection", event: h11.Request) -> None:
        self._conn = conn
        self.method = event.method.decode("ascii", "replace").upper()
        target = event.target.decode("latin-1")
        self.raw_path, _, self.raw_query = target.partition("?")
        self.headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        self.peer = conn.peer
        self.tls = conn.tls
        self.body_done = False
        self.request_id = os.urandom(8).hex().upper()

    def header(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    @property
    def loopback(self) -> bool:
        return self.peer.startswith("127.") or self.peer in ("::1", "::ffff:127.0.0.1")

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, piece by piece as it arrives."""
        if self.body_done:
            return
        await self._conn.continue_if_asked()
        while True:
            try:
                event = await self._conn.next_event(self._conn.limits.body_timeout, "body")
            except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                raise ClientGone(f"the connection from {self.peer} broke during the body: {exc}") from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return
            else:
                raise S3Error("IncompleteBody", "the request body ended early")

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        async for piece in self.body():
            out += piece
            if len(out) > limit:
                raise S3Error("MalformedXML" if limit < (1 << 20) else "EntityTooLarge",
                              f"the request body is larger than {limit} bytes")
        return bytes(out)


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = b""
    stream: Callable[[], AsyncIterator[bytes]] | None = None  # body produced piece by piece
    length: int | None = None  # Content-Length of a streamed body (or of a HEAD answer)
    cleanup: Callable[[], None] | None = None  # called once the answer is sent, or failed


class _Connection:
    def __init__(self, stream: trio.abc.Stream, peer: str, tls: bool, limits: Limits) -> None:
        self.stream = stream
        self.peer = peer
        self.tls = tls
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEADER_LIMIT)
        self.continued = False

    async def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def continue_if_asked(self) -> None:
        if self.h11.they_are_waiting_for_100_continue and not self.continued:
            self.continued = True
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))

    async def next_event(self, timeout: float, what: str):
        """The next h11 event, which must be complete within `timeout` (a request head
        that trickles in byte by byte is cut off too)."""
        deadline = trio.current_time() + timeout
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_at(deadline) as scope:
                    data = await self.stream.receive_some(READ_SIZE)
                if scope.cancelled_caught:
                    raise _SlowClient(f"no {what} from {self.peer} for {timeout:.0f} s")
                self.h11.receive_data(data)
                continue
            return event


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class _SlowClient(Exception):
    pass


class ClientGone(ConnectionError):
    """The client closed or broke its connection in the middle of a request: there is no one
    to answer, and the request is abandoned."""


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, error_response: Callable[[Request | None, S3Error], Response],
                 limits: Limits | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.error_response = error_response
        self.limits = limits or Limits()
        self.tls = tls
        self.per_client: dict[str, int] = {}
        self.requests = 0

    async def connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes (trio.serve_listeners' handler)."""
        sock_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        try:
            peer = sock_stream.socket.getpeername()[0]
        except OSError:
            peer = "?"
        count = self.per_client.get(peer, 0)
        if count >= self.limits.per_client:
            log.warning("s3api: refused a connection from %s: %d open already", peer, count)
            await stream.aclose()
            return
        self.per_client[peer] = count + 1
        conn = _Connection(stream, peer, self.tls is not None, self.limits)
        try:
            await self._requests(conn)
        except (_SlowClient, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError,
                ConnectionError) as exc:
            log.debug("s3api: connection from %s closed: %s", peer, exc)
        except Exception as exc:  # one request's failure never takes the daemon down
            log.error("s3api: connection from %s failed: %s: %s", peer, type(exc).__name__, exc)
        finally:
            left = self.per_client.get(peer, 1) - 1
            if left:
                self.per_client[peer] = left
            else:
                self.per_client.pop(peer, None)
            with trio.move_on_after(1):
                await stream.aclose()

    async def _requests(self, conn: _Connection) -> None:
        first = True
        while True:
            timeout = self.limits.header_timeout if first else self.limits.idle_timeout
            try:
                event = await conn.next_event(timeout, "request")
            except h11.RemoteProtocolError as exc:
                if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    code = "RequestHeaderSectionTooLarge" if "too long" in str(exc) or "buffer" in str(exc) else "BadRequest"
                    resp = self.error_response(None, S3Error(code, f"bad request: {exc}", status=exc.error_status_hint))
                    await self._send(conn, None, resp, close=True)
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            first = False
            # h11 bounds a head that is still arriving; one that came in whole is measured here
            if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > HEADER_LIMIT:
                resp = self.error_response(None, S3Error("RequestHeaderSectionTooLarge",
                                                         "the request head is larger than 16 KiB", status=431))
                await self._send(conn, None, resp, close=True)
                return
            req = Request(conn, event)
            self.requests += 1
            try:
                resp = await self.handler(req)
            except S3Error as exc:
                resp = self.error_response(req, exc)
            try:
                close = not req.body_done and conn.h11.their_state is h11.SEND_BODY
                if close:
                    # the body was never read: drain a small one, else close after answering
                    close = not await self._drain(conn, req)
                await self._send(conn, req, resp, close)
            finally:
                if resp.cleanup is not None:
                    resp.cleanup()
            if conn.h11.our_state is h11.MUST_CLOSE or close:
                return
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                conn.continued = False
            else:
                return

    async def _drain(self, conn: _Connection, req: Request) -> bool:
        length = req.header("content-length")
        if conn.h11.they_are_waiting_for_100_continue or length is None or int(length or 0) > 1 << 20:
            return False
        try:
            with trio.move_on_after(self.limits.body_timeout):
                async for _ in req.body():
                    pass
        except S3Error:
            return False
        return req.body_done

    async def _send(self, conn: _Connection, req: Request | None, resp: Response, close: bool) -> None:
        headers = list(resp.headers)
        if req is not None:
            headers.append(("x-amz-request-id", req.request_id))
        if close:
            headers.append(("connection", "close"))
        head_only = req is not None and req.method == "HEAD"
        if resp.stream is not None:
            headers.append(("content-length", str(resp.length)))
        elif resp.status not in (204, 304) and not any(k == "content-length" for k, _ in headers):
            headers.append(("content-length", str(len(resp.body or b""))))
        # a reason phrase: botocore reads an early answer to Expect: 100-continue only if it has one
        out = bytearray(conn.h11.send(h11.Response(
            status_code=resp.status, reason=_reason(resp.status),
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])))
        # head, body and end go out in as few socket writes as possible (each costs a wake-up)
        if not head_only and resp.status not in (204, 304):
            if resp.stream is not None:
                out = await self._send_stream(conn, resp, out)
            elif resp.body:
                out += conn.h11.send(h11.Data(data=resp.body))
        out += conn.h11.send(h11.EndOfMessage()) or b""
        if out:
            await conn.stream.send_all(out)

    async def _send_stream(self, conn: _Connection, resp: Response, head: bytearray) -> bytearray:
        """Send a streamed body, producing the next piece (read, decrypted) while the current
        one goes out: at most STREAM_AHEAD pieces wait beside the one being sent."""
        send, receive = trio.open_memory_channel(STREAM_AHEAD)

        async def produce() -> None:
            async with send:
                async for piece in resp.stream():
                    await send.send(piece)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with receive:
                    async for piece in receive:
                        for data in conn.h11.send_with_data_passthrough(h11.Data(data=piece)):
                            if head:  # the head goes with the first piece
                                head += data
                                data, head = head, bytearray()
                            await conn.stream.send_all(data)
        except BaseExceptionGroup as group:
            raise one_error(group, BaseException) from None  # the producer's or the sender's own error
        return head

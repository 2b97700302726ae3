"""The systemd notification protocol (sd_notify(3)), written out: no extra dependency.

A service of Type=notify finds a datagram socket's address in $NOTIFY_SOCKET (a path,
or an abstract name written with a leading '@') and sends newline-separated
KEY=VALUE assignments to it: READY=1 once it serves, STATUS=... for `systemctl
status`, STOPPING=1 when it begins to shut down, WATCHDOG=1 at least every
$WATCHDOG_USEC microseconds when WatchdogSec= is set. Outside systemd the
variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes | None:
    """The address to send to: a filesystem path, or an abstract name as bytes."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other families: not for us


def encode(**fields: str | int) -> bytes:
    """KEY=VALUE lines; a value never spans lines (STATUS= is one line in systemctl status)."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def watchdog_interval(environ: dict[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled advises)."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid and wpid != str(pid):
        return None  # meant for another process
    try:
        timeout = int(usec)
    except ValueError:
        return None
    return timeout / 2e6 if timeout > 0 else None


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls) -> "Notifier":
        """Read and clear the variables, so that child processes do not talk for us."""
        env = os.environ
        address = socket_address(env.get("NOTIFY_SOCKET", ""))
        watchdog = watchdog_interval(dict(env), os.getpid())
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(encode(**fields), self.address)
        except OSError as exc:
            # the manager went away or the socket is wrong: say so once, keep serving
            if not self._warned:
                log.warning("cannot notify the service manager at %r: %s", self.address, exc.strerror)
                self._warned = True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def ping(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""A circuit breaker for a key server on the network (Vault/OpenBao Transit).

A call that gets no answer within its time budget opens the breaker: from then on calls
fail at once (the caller answers EIO) instead of each waiting out its own budget, while
one background thread probes the server, first after `first` seconds and then at
intervals doubling up to `longest`. The first answer to a probe, or to a call already in
flight, closes it again. Each change of state is logged once.

Calls come from worker threads; the state is guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FIRST_PROBE = 0.5  # seconds after opening; then doubling
LONGEST_PROBE = 30.0


class CircuitBreaker:
    def __init__(self, what: str, probe: Callable[[], None], first: float = FIRST_PROBE,
                 longest: float = LONGEST_PROBE, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what  # e.g. "Transit KMS at http://vault:8200", for messages
        self._probe = probe  # raises if the server does not answer
        self.first, self.longest = first, longest
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._opened_at = 0.0
        self._interval = first
        self._why = ""
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.opened = 0  # times it opened (for `s3fuse status`)
        self.fast_failures = 0  # calls failed at once while it was open

    def stats(self) -> dict:
        return {"kms_breaker": "open" if self._open else "closed", "kms_outages": self.opened,
                "kms_calls_failed_at_once": self.fast_failures}

    @property
    def is_open(self) -> bool:
        return self._open

    def refusal(self) -> str | None:
        """None if a call may go to the server now, else why it fails at once."""
        if not self._open:
            return None
        with self._lock:
            if not self._open:
                return None
            self.fast_failures += 1
            return (f"{self.what} did not answer {self._clock() - self._opened_at:.0f} s ago "
                    f"({self._why}); failing at once while it is probed")

    def failed(self, why: str) -> None:
        """A call got no answer within its budget."""
        with self._lock:
            if self._open:
                return
            self._open, self._opened_at, self._interval, self._why = True, self._clock(), self.first, why
            self.opened += 1
            self._wake.clear()
            start = self._thread is None or not self._thread.is_alive()
            if start:
                self._thread = threading.Thread(target=self._run, name="kms-probe", daemon=True)
        log.error("%s is unreachable (%s): KMS calls fail at once with EIO until a probe "
                  "(after %.1f s, then at doubling intervals up to %.0f s) finds it answering",
                  self.what, why, self.first, self.longest)
        if start:
            self._thread.start()

    def succeeded(self) -> None:
        """A call or a probe got an answer."""
        if not self._open:
            return
        with self._lock:
            if not self._open:
                return
            self._open = False
            down = self._clock() - self._opened_at
            self._wake.set()
        log.warning("%s answers again (after %.1f s); KMS calls go through", self.what, down)

    def close(self) -> None:
        """Stop probing (the provider is going away)."""
        with self._lock:
            self._open = False
            self._wake.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._open:
                    return
                interval = self._interval
            if self._wake.wait(interval):
                continue  # closed by a call's answer, or stopped (or opened again since)
            try:
                self._probe()
            except Exception:
                with self._lock:
                    self._interval = min(self._interval * 2, self.longest)
                continue
            self.succeeded()
            return

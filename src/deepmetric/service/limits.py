"""Slow and surplus clients: time limits on receiving a request, a cap on open connections, and
quiet logs about the ones refused.

uvicorn bounds only idle keep-alive connections: a client that sends half its headers, or its
body one byte at a time, holds its socket (a file descriptor) for as long as it likes, and
enough of them stop the service. :func:`http_protocol` makes uvicorn's h11 protocol with:

- a **header limit**: a request's headers must have arrived ``header_timeout`` seconds after
  the connection opened (or after the previous response on a kept-alive connection), else the
  server answers 408 and closes it;
- a **body limit**: its body must have arrived ``body_timeout`` seconds after its headers,
  else 408 (when no response has started) and the connection is closed. It is a limit on the
  whole body, not on the gap between bytes, so a trickle cannot stretch it;
- a **connection cap**: beyond ``max_connections`` open connections a new one is closed at
  once, without a word in the log.

:func:`quiet_accept_errors` turns asyncio's traceback for a failed ``accept()`` (out of file
descriptors) into one line at most every 10 seconds, and drops the tracebacks of its retries
that fire after the server closed its socket at shutdown.

This builds on uvicorn's ``H11Protocol`` (its ``conn``, ``cycle`` and ``transport``);
tests/test_hostile_service.py checks the limits on a real server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

__all__ = ["ACCEPT_FAILED", "http_protocol", "quiet_accept_errors"]

#: the start of asyncio's log message when ``accept()`` fails (e.g. EMFILE)
ACCEPT_FAILED = "socket.accept() out of system resource"
#: asyncio's retry of ``accept()`` a second after such a failure; when the server has closed
#: its socket meanwhile (a shutdown), each pending retry fails with a traceback (fd -1)
_RETRY_AFTER_CLOSE = "Exception in callback BaseSelectorEventLoop._start_serving"


def _timeout_response(what: str) -> bytes:
    body = json.dumps({"error": f"request timeout: {what}"}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def http_protocol(*, header_timeout: float, body_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol class with the limits of the module docstring (pass it as
    ``uvicorn.Config(http=...)``)."""
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout)):
        if not 0 < value <= 3600:  # NaN too
            raise ValueError(
                f"--{name.replace('_', '-')} must be in (0, 3600] seconds, got {value}"
            )
    if max_connections < 1:
        raise ValueError(f"--max-connections must be at least 1, got {max_connections}")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11Protocol(H11Protocol):
        """H11Protocol with a deadline per request phase and a connection cap."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._phase: str | None = None
            self._deadline: asyncio.TimerHandle | None = None
            self._refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True  # closed at once, unlogged: never one of `connections`
                transport.abort()
                return
            super().connection_made(transport)
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._arm(None)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def _watch(self) -> None:
            """Arm the deadline of the phase the client is in: sending headers, sending a
            body, or neither (its request is in; the response is ours to send)."""
            if self.transport is None or self.transport.is_closing():
                return
            their = self.conn.their_state
            self._arm(
                "headers" if their is h11.IDLE else "body" if their is h11.SEND_BODY else None
            )

        def _arm(self, phase: str | None) -> None:
            if phase == self._phase:
                return  # a deadline runs from the start of its phase, whatever arrives
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase = phase
            if phase is not None:
                seconds = header_timeout if phase == "headers" else body_timeout
                self._deadline = self.loop.call_later(seconds, self._expired, phase)

        def _expired(self, phase: str) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if phase == "headers" or (cycle is not None and not cycle.response_started):
                limit = header_timeout if phase == "headers" else body_timeout
                what = "the headers" if phase == "headers" else "the body"
                self.transport.write(_timeout_response(f"{what} took over {limit:g} s"))
            if cycle is not None and not cycle.response_complete:
                cycle.response_started = cycle.response_complete = True  # the app's answer: dropped
                cycle.disconnected = True  # its next receive() says http.disconnect
                cycle.message_event.set()
            self.transport.close()

    return LimitedH11Protocol


class _AcceptErrorFilter(logging.Filter):
    """One line, without a traceback, at most every ``every`` seconds, for asyncio's
    "socket.accept() out of system resource" errors; none for its retries on a closed socket
    ("Invalid file descriptor: -1"); other records pass unchanged."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self.last = -float("inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(_RETRY_AFTER_CLOSE):
            error = record.exc_info[1] if record.exc_info else None
            return not (isinstance(error, ValueError) and "file descriptor" in str(error))
        if not message.startswith(ACCEPT_FAILED):
            return True
        now = time.monotonic()
        if now - self.last < self.every:
            self.dropped += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = "refusing connections: accept() failed (%s)%s"
        record.args = (error or "out of system resources", self._more())
        record.exc_info = record.exc_text = None
        self.last, self.dropped = now, 0
        return True

    def _more(self) -> str:
        return f"; {self.dropped} more since the last report" if self.dropped else ""


def quiet_accept_errors() -> None:
    """Install the filter on asyncio's logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(_AcceptErrorFilter())

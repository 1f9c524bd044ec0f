"""The HTTP connection layer under the app: uvicorn's HTTP protocols with the bounds an exposed server needs.

uvicorn accepts every connection and waits for its request for as long as the client likes. A flood of connections
that never finish their request then holds one file descriptor each until the process has none left, and
`/healthz` goes unanswered. `GuardedHttpToolsProtocol` (uvicorn's httptools parser, llhttp in C: the default) and
`GuardedH11Protocol` (pure-Python h11: the fallback where httptools is not installed, and settings `http: h11`)
add, per worker process:
  max_connections    one connection over the limit is answered 503 (Retry-After) and closed at once, before its
                     request is read: it costs microseconds and frees its descriptor
  max_connections_per_client
                     the same per client address, so one client cannot take every connection (behind a reverse
                     proxy every client has the proxy's address: raise it to max_connections there, and let the
                     proxy limit each client)
  header_timeout_s   a request's header must be complete this long after its first byte (or after the connection
                     opened): slow-header clients get 408 and are closed
  max_header_bytes   a request line and header larger than this get 431 and are closed (h11 counts the same limit
                     itself; llhttp has none, so the httptools protocol counts what its parser hands over)
The body deadline (limits.body_timeout_s) is enforced in the app (digitkit.serve.app.Guard), which sees bodies.

Repeated "socket.accept() out of system resource" errors, should the descriptor limit still be reached (other
processes, a low `ulimit -n`), are logged once per LOG_EVERY_S with a count instead of a traceback each.

uvicorn builds protocols itself (several worker processes import this module by name), so the limits are module
state, set by `configure` from the app factory before the server accepts anything.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from digitkit.errors import ConfigError

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: GuardedH11Protocol only (see `protocol_path`)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("digitkit.serve")

RESERVED_FDS = 64
"""Descriptors kept free for the database, model files, logs and the listening socket."""
LOG_EVERY_S = 10.0


class _Limits:
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    header_timeout_s: float | None = None
    max_header_bytes: int = 16384
    on_refused: Callable[[str], None] | None = None
    """Called with "max_connections", "max_connections_per_client", "header_timeout" or "header_too_large" for each
    connection refused or cut (for /metrics)."""


LIMITS = _Limits()


def protocol_path(http: str = "auto") -> str:
    """uvicorn's `http` argument for settings.http: auto (httptools when installed, else h11), httptools or h11."""
    if http == "h11" or (http == "auto" and HttpToolsProtocol is None):
        return "digitkit.serve.protocol:GuardedH11Protocol"
    if HttpToolsProtocol is None:
        raise ConfigError("http: httptools is set but the httptools package is not installed; run `pip install "
                          "httptools`, or set http: auto (or h11) to serve with the pure-Python h11 parser")
    return "digitkit.serve.protocol:GuardedHttpToolsProtocol"


def configure(max_connections: int, max_connections_per_client: int, header_timeout_s: float, backlog: int,
              on_refused: Callable[[str], None] | None = None, max_header_bytes: int = 16384) -> int:  # fmt: skip
    """Set the limits for this process; returns the connection limit in force. The soft file-descriptor limit is
    raised (up to the hard one) to hold the connections, the accept backlog (accepted in a burst before the refused
    ones are closed) and RESERVED_FDS; where it cannot be, the connection limit is lowered to fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + backlog + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    effective = max_connections
    if soft != resource.RLIM_INFINITY and soft - RESERVED_FDS - backlog < max_connections:
        effective = max(1, soft - RESERVED_FDS - backlog)
        log.warning("limits.max_connections lowered from %d to %d to fit the file-descriptor limit (ulimit -n = %d)",
                    max_connections, effective, soft)  # fmt: skip
    LIMITS.max_connections, LIMITS.header_timeout_s, LIMITS.on_refused = effective, header_timeout_s, on_refused
    LIMITS.max_connections_per_client, LIMITS.max_header_bytes = max_connections_per_client, max_header_bytes
    _install_accept_log_filter()
    return effective


def _raw_response(status: int, reason: str, error: str, detail: str, extra: list[tuple[str, str]] = ()) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in extra)]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY = _raw_response(503, "Service Unavailable", "too many connections",
                     "this server is at its limit of open connections (limits.max_connections); retry in a second",
                     [("retry-after", "1")])  # fmt: skip


BUSY_CLIENT = _raw_response(503, "Service Unavailable", "too many connections from this client",
                            "this address has as many connections open as it may (limits.max_connections_per_client);"
                            " reuse them (keep-alive) or retry in a second", [("retry-after", "1")])  # fmt: skip
_PER_CLIENT: dict[str, int] = {}
"""Open connections by client address, in this process (the event loop's thread only touches it)."""


def _header_timeout_response(seconds: float) -> bytes:
    return _raw_response(408, "Request Timeout", "request header timeout",
                         f"the request header did not arrive within {seconds:g} s (limits.header_timeout_s); send "
                         "the whole header at once")  # fmt: skip


def _header_too_large_response(limit: int) -> bytes:
    return _raw_response(431, "Request Header Fields Too Large", "request header too large",
                         f"the request line and header fields are over {limit} bytes (limits.max_header_bytes); "
                         "send a shorter URL and fewer or shorter header fields")  # fmt: skip


class _Guard:
    """The bounds both protocols share (see the module docstring). Each protocol says when it waits for a request's
    header (`_waiting_for_header`) and arms the header deadline as that header's bytes arrive."""

    transport: Any
    loop: Any
    cycle: Any
    connections: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._peer: str | None = None
        self._header_timer: Any = None

    def _waiting_for_header(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, (tuple, list)) and peer else None
        limit, per_client = LIMITS.max_connections, LIMITS.max_connections_per_client
        if limit is not None and len(self.connections) >= limit:
            return self._refuse(transport, BUSY, "max_connections")
        if per_client is not None and self._peer is not None and _PER_CLIENT.get(self._peer, 0) >= per_client:
            return self._refuse(transport, BUSY_CLIENT, "max_connections_per_client")
        if self._peer is not None:
            _PER_CLIENT[self._peer] = _PER_CLIENT.get(self._peer, 0) + 1
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def _refuse(self, transport: Any, response: bytes, reason: str) -> None:
        self._refused = True
        self.transport = transport
        self._close_with(response, reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._refused:
            return
        if self._peer is not None:
            left = _PER_CLIENT.get(self._peer, 1) - 1
            if left > 0:
                _PER_CLIENT[self._peer] = left
            else:
                _PER_CLIENT.pop(self._peer, None)
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # The next request's header deadline starts with its first byte (uvicorn's keep-alive timer covers the idle
        # time before it).
        self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        seconds = LIMITS.header_timeout_s
        if seconds is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(seconds, self._header_timeout, seconds)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self, seconds: float) -> None:
        self._header_timer = None
        if self.transport is None or self.transport.is_closing() or not self._waiting_for_header():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written on this connection: not a slow header
        self._close_with(_header_timeout_response(seconds), "header_timeout")

    def _close_with(self, response: bytes, reason: str) -> None:
        try:
            self.transport.write(response)
        finally:
            self.transport.close()
        _count(reason)


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with a connection limit and a header deadline (see the module docstring); h11 bounds
    the header's size itself (uvicorn's h11_max_incomplete_event_size, set to limits.max_header_bytes)."""

    def _waiting_for_header(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._waiting_for_header():
            self._arm_header_timer()
        super().data_received(data)
        if not self._waiting_for_header():  # the header is in: the body has its own deadline in the app
            self._disarm_header_timer()


class _HeaderTooLarge(Exception):
    """Raised from a parser callback: llhttp stops, and uvicorn answers through send_400_response (431 here)."""


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with a connection limit, a header deadline and a header size limit (see the
        module docstring). A request's header is open from the end of the previous request on this connection (or
        from its start) until llhttp calls on_headers_complete; its request line and fields are counted as the
        parser hands them over."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_open = True
            self._header_bytes = 0
            self._too_large = False

        def _waiting_for_header(self) -> bool:
            return self._header_open

        def data_received(self, data: bytes) -> None:
            if self._refused or self._too_large:
                return
            if self._header_open:
                self._arm_header_timer()
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._header_bytes = 0
            super().on_message_begin()

        def _count_header(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > LIMITS.max_header_bytes:
                self._too_large = True
                raise _HeaderTooLarge

        def on_url(self, url: bytes) -> None:
            self._count_header(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._header_open = False
            self._disarm_header_timer()  # the header is in: the body has its own deadline in the app
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._header_open = True  # whatever comes next on this connection is the next request's header

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._disarm_header_timer()
                return self._close_with(_header_too_large_response(LIMITS.max_header_bytes), "header_too_large")
            super().send_400_response(msg)


def _count(reason: str) -> None:
    callback = LIMITS.on_refused
    if callback is not None:
        try:
            callback(reason)
        except Exception:  # noqa: BLE001 - counting must never break the connection layer
            log.debug("could not count a refused connection", exc_info=True)


# ------------------------------------------------------------------------------------------ log rate limit
class RateLimitedLog(logging.Filter):
    """Let the first record with a given message through, then at most one per `every_s` seconds, noting how many
    were held back in between; other messages pass untouched."""

    def __init__(self, messages: tuple[str, ...], every_s: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.messages, self.every_s = messages, every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        key = next((m for m in self.messages if m in text), None)
        if key is None:
            return True
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._last[key] = now
        note = f"and {held} more like it since, " if held else ""
        record.msg = f"{text} ({note}logged at most once per {self.every_s:g} s)"
        record.args = ()
        record.exc_info = record.exc_text = None  # one line, not a traceback each time
        return True


ACCEPT_ERRORS = ("socket.accept() out of system resource", "Too many open files")


def _install_accept_log_filter() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
        logger.addFilter(RateLimitedLog(ACCEPT_ERRORS))

"""Sending OTLP/HTTP requests: one POST, retried the way the OTLP specification asks.

:class:`Poster` sends an already encoded protobuf body (``Content-Type:
application/x-protobuf``) to a URL and returns an :class:`Outcome`; it is the transport of
:mod:`.otlp` and knows nothing of spans. Standard library only (``http.client``).

Guarantees
----------
* **What is retried** (OTLP specification, "OTLP/HTTP Throttling" and "Failures"): a
  connection that cannot be made or breaks (refused, reset, closed without an answer), a
  request that gets no answer within ``timeout`` seconds, and the statuses 429 and 5xx.
  Nothing else: any other 4xx is the collector refusing *this* request (bad data, too large,
  not authorised), and sending it again would be refused again.
* **How long**: at most ``retries`` retries, each after a delay that doubles from
  ``backoff`` seconds (with up to 20% jitter so that many exporters do not retry in step),
  capped at ``max_backoff``; a ``Retry-After`` header (seconds or an HTTP date, RFC 9110
  section 10.2.3) replaces the delay, capped at ``max_backoff`` too. The worst case for one
  request is therefore ``(retries + 1) * timeout + retries * max_backoff`` seconds.
* **Never an exception**: every failure is an :class:`Outcome` with ``ok=False`` and a
  one-line ``reason``; ``retryable`` says whether the collector was unreachable or
  overloaded (the sender stops) or refused the request (the sender goes on).
* A kept-alive connection found closed by the collector (idle timeout) is reopened at once,
  once per request, without counting as an attempt.
* A request that timed out may still have been received: the outcome says so
  (``maybe_received``), and whoever reports it must not claim it was not delivered.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Outcome", "Poster", "parse_headers", "retry_after"]


@dataclass
class Outcome:
    """How one request ended, after its retries."""

    ok: bool
    #: The last HTTP status (0: no answer at all).
    status: int = 0
    #: The answer's body when ``ok`` (an encoded Export*ServiceResponse).
    body: bytes = b""
    #: One line: why it failed (empty when ``ok``).
    reason: str = ""
    #: The failure was the collector being unreachable, overloaded or too slow (429, 5xx,
    #: connection, timeout), retried until the retries ran out; False: refused (4xx).
    retryable: bool = False
    #: A request timed out: the collector may have received it after all.
    maybe_received: bool = False
    attempts: int = 0


def parse_headers(text: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``key1=value1,key2=value2``, keys and values
    percent-decoded (W3C Baggage format, as the OpenTelemetry exporter configuration
    specifies); an entry without ``=`` is ignored."""
    from urllib.parse import unquote

    headers = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = unquote(key).strip()
        if eq and key:
            headers[key] = unquote(value).strip()
    return headers


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date;
    None when absent or not understood."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Poster:
    """POSTs protobuf bodies to OTLP/HTTP URLs over kept-alive connections, with retries.

    ``sleep`` is :func:`time.sleep` (tests pass their own to count the waits)."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        compression: str = "none",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.compression = compression
        self.sleep = sleep
        #: Set (by another thread): no retry starts any more (an interrupted export).
        self.cancel: threading.Event | None = None
        self._conns: dict[tuple[str, str, int | None], http.client.HTTPConnection] = {}

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _conn(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "", parts.port)
        conn = self._conns.get(key)
        if conn is None:
            https = parts.scheme == "https"
            cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
            conn = self._conns[key] = cls(parts.hostname or "", parts.port, timeout=self.timeout)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return conn, path

    def _drop(self, url: str) -> None:
        parts = urlsplit(url)
        conn = self._conns.pop((parts.scheme, parts.hostname or "", parts.port), None)
        if conn is not None:
            conn.close()

    def post(self, url: str, body: bytes) -> Outcome:
        """Send ``body`` to ``url``; retried as the module says. Never raises."""
        headers = {"Content-Type": "application/x-protobuf", **self.headers}
        if self.compression == "gzip":
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        maybe_received = False
        delay = self.backoff
        attempt = 0
        stale_retried = False
        while True:
            attempt += 1
            wait: float | None = None
            reused = False
            try:
                conn, path = self._conn(url)
                reused = conn.sock is not None
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                data = response.read()
                status = response.status
                if response.will_close:
                    self._drop(url)
            except TimeoutError as exc:  # socket.timeout is TimeoutError
                # No answer in time: the request may have arrived (and may yet be
                # processed): a retry can duplicate it, which OTLP receivers tolerate
                # better than a loss; the outcome says it.
                self._drop(url)
                maybe_received = True
                outcome = Outcome(
                    False, 0, reason=f"no answer within {self.timeout:g} s ({exc or 'timeout'})"
                )
                outcome.retryable = True
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                if reused and not stale_retried and isinstance(exc, _STALE):
                    # A kept-alive connection the collector closed while idle (servers
                    # time idle ones out): not a failure of the collector; once, at once,
                    # on a new connection.
                    stale_retried = True
                    attempt -= 1
                    continue
                outcome = Outcome(False, 0, reason=_connection_reason(url, exc), retryable=True)
            else:
                if 200 <= status < 300:
                    return Outcome(
                        True, status, data, attempts=attempt, maybe_received=maybe_received
                    )
                text = _snippet(data)
                reason = f"HTTP {status} {response.reason}".rstrip() + (f": {text}" if text else "")
                if status != 429 and not 500 <= status < 600:
                    return Outcome(
                        False,
                        status,
                        reason=reason + " (refused: not retried)",
                        attempts=attempt,
                        maybe_received=maybe_received,
                    )
                outcome = Outcome(False, status, reason=reason, retryable=True)
                wait = retry_after(response.getheader("Retry-After"))
            cancelled = self.cancel is not None and self.cancel.is_set()
            if attempt > self.retries or cancelled:
                outcome.attempts = attempt
                outcome.maybe_received = maybe_received
                if cancelled:
                    outcome.reason += " (interrupted: not retried)"
                elif self.retries:
                    outcome.reason += f" (after {attempt} attempts)"
                return outcome
            if wait is None:
                wait = delay * (1 + 0.2 * random.random())
                delay = min(delay * 2, self.max_backoff)
            wait = min(wait, self.max_backoff)
            if self.cancel is not None and self.sleep is time.sleep:
                self.cancel.wait(wait)  # cut short by an interrupt
            else:
                self.sleep(wait)


#: How a kept-alive connection the server has closed fails when used again.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _connection_reason(url: str, exc: BaseException) -> str:
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (is the collector running?)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return f"{where} closed the connection without an answer"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {parts.hostname}: {exc.strerror or exc}"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{where}: {text}"


def _snippet(data: bytes) -> str:
    """The start of an error answer, printable on one line (collectors answer with a
    google.rpc.Status protobuf or text: only a text's start is shown)."""
    text = data[:200].decode("utf-8", "replace")
    if not text.isprintable():
        return ""
    return text.strip()

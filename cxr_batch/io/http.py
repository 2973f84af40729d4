"""The one bounded HTTP fetch: every DICOMweb call (QIDO-RS, WADO-RS, STOW-RS, ``dicomweb-list``) goes through :class:`Origin`.

A server may be slow, broken or hostile; whatever it does, a request ends, and costs bounded
memory and disk:

- **a deadline per request**: connect, send, headers and the whole body must be done within
  ``deadline`` seconds, not only each read within ``timeout``. A watchdog shuts the socket down
  at the deadline, so a server that drips a byte every few seconds is cut off too;
- **a cap on answer bytes**, checked against ``Content-Length`` before reading and while reading,
  on the *decoded* bytes (a gzip bomb stops at the cap, not at the end of the disk). Only
  ``gzip``/``deflate``/``identity`` encodings are accepted;
- **no redirect to another origin**: a redirect is followed (at most 5 times) only to the same
  scheme, host and port, and a ``POST`` (STOW-RS: patient data) only by 307/308. Credentials are
  therefore only ever sent to the origin the user named;
- **errors sorted by what to do about them** (:class:`FetchError` ``kind``): ``auth`` (401/403:
  the run can't go on with these credentials), ``transient`` (no answer, broken connection, the
  deadline, 5xx and 429: retried with backoff, then the caller decides), ``refused`` (any other
  answer: a 404, a cross-origin redirect, an answer too large, an unknown encoding).

Messages name the HTTP status and what went wrong, never a credential or a URL's query.
The HTTP is done with the standard library (``http.client``), with one connection per request
in flight, kept alive and reused; nothing from the environment (proxies, ``~/.netrc``) is used.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urljoin, urlsplit

from cxr_batch.redact import redact_url
from cxr_batch.text import shown

Kind = Literal["auth", "transient", "refused"]
_READ = 256 * 1024
_MAX_REDIRECTS = 5


class FetchError(Exception):
    """A request that did not give a usable answer; ``kind`` says what the caller should do."""

    def __init__(self, message: str, kind: Kind, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.status = status


@dataclass(frozen=True)
class Limits:
    #: seconds to connect, and between bytes read
    timeout: float = 30.0
    #: seconds for a whole request (connect, headers, body)
    deadline: float = 300.0
    #: attempts for a transient failure (5xx, 429, no answer), with exponential backoff
    attempts: int = 3
    #: the first backoff, in seconds (doubled each time; a 429's Retry-After is honoured up to 30 s)
    backoff: float = 0.25


def _reason(response: http.client.HTTPResponse) -> str:
    return shown(response.reason or "")[:80]


def _status_error(status: int, reason: str, retry_after: float | None = None) -> FetchError:
    text = f"HTTP {status} {reason}".strip()
    if status in (401, 403):
        return FetchError(text, "auth", status)
    if status == 429 or status >= 500:
        err = FetchError(text, "transient", status)
        err.retry_after = retry_after  # type: ignore[attr-defined]
        return err
    return FetchError(text, "refused", status)


class Answer:
    """A successful answer, its body read on demand: :meth:`chunks` (decoded, bounded) or :meth:`read`."""

    def __init__(
        self, origin: Origin, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, limit: int
    ) -> None:
        self._origin = origin
        self._conn = conn
        self._response = response
        self._limit = limit
        self.status = response.status
        self.headers = response.headers
        self._done = False
        self._closed = False
        length = response.getheader("Content-Length")
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate", ""):
            raise FetchError(f"the server sent an unsupported content encoding ({shown(encoding)[:40]})", "refused")
        self._decoder = (
            zlib.decompressobj(16 + zlib.MAX_WBITS)
            if encoding in ("gzip", "x-gzip")
            else zlib.decompressobj()
            if encoding == "deflate"
            else None
        )
        if length is not None and length.strip().isdigit() and self._decoder is None and int(length) > limit:
            raise FetchError(f"the server's answer is larger than the {limit:,}-byte limit", "refused")

    def chunks(self) -> Iterator[bytes]:
        """The body, decoded, in chunks; raises FetchError past the byte limit or the deadline."""
        total = 0
        response = self._response
        try:
            while True:
                try:
                    data = response.read1(_READ) if hasattr(response, "read1") else response.read(_READ)
                except (OSError, http.client.HTTPException) as exc:
                    raise self._origin.transport_error(exc) from None
                if not data:
                    break
                if self._decoder is not None:
                    budget = self._limit - total + 1
                    try:
                        out = self._decoder.decompress(data, budget)
                        while self._decoder.unconsumed_tail and len(out) <= self._limit - total:
                            out += self._decoder.decompress(self._decoder.unconsumed_tail, budget - len(out))
                    except zlib.error:
                        raise FetchError("the server sent a damaged compressed answer", "refused") from None
                    data = out
                total += len(data)
                if total > self._limit:
                    raise FetchError(f"the server's answer is larger than the {self._limit:,}-byte limit", "refused")
                if data:
                    yield data
            self._origin.check_deadline()
            self._done = True
        finally:
            self.close()

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._origin.finish(self._conn, self._response, reuse=self._done)


class Origin:
    """Requests to one origin (scheme, host, port) with the limits above; safe to use from several threads."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, limits: Limits | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.headers = dict(headers or {})
        self.limits = limits or Limits()
        self._idle: list[http.client.HTTPConnection] = []
        self._active: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        self._aborting = False
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.scheme == "https" else None

    # ---------------------------------------------------------------- connections

    def _same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        return parts.scheme == self.scheme and (parts.hostname or "") == self.host and port == self.port

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._closed or self._aborting:
                raise FetchError("the connection was closed (the run is ending)", "transient")
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                if self._ssl is not None:
                    conn = http.client.HTTPSConnection(
                        self.host, self.port, timeout=self.limits.timeout, context=self._ssl
                    )
                else:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.limits.timeout)
            self._active.add(conn)
            return conn

    def finish(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse | None, reuse: bool) -> None:
        timer = getattr(self._local, "timer", None)
        if timer is not None:
            timer.cancel()
            self._local.timer = None
        keep = reuse and response is not None and not response.will_close and response.isclosed()
        with self._lock:
            self._active.discard(conn)
            if keep and not self._closed and len(self._idle) < 32:
                self._idle.append(conn)
                return
        conn.close()

    @staticmethod
    def _kill(conn: http.client.HTTPConnection) -> None:
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        """Close every connection, cutting off requests in flight (their callers get a FetchError)."""
        with self._lock:
            self._closed = True
            idle, active = self._idle, list(self._active)
            self._idle = []
        for conn in active:
            self._kill(conn)
        for conn in idle:
            conn.close()

    def abort(self) -> None:
        """Cut off the requests in flight (no retry) until :meth:`resume`; idle connections stay."""
        with self._lock:
            self._aborting = True
            active = list(self._active)
        for conn in active:
            self._kill(conn)

    def resume(self) -> None:
        with self._lock:
            self._aborting = False

    def check_deadline(self) -> None:
        end = getattr(self._local, "deadline", None)
        if end is not None and time.monotonic() > end:
            raise FetchError(f"no complete answer within {self.limits.deadline:g} s (deadline)", "transient")

    def transport_error(self, exc: BaseException) -> FetchError:
        end = getattr(self._local, "deadline", None)
        if end is not None and time.monotonic() >= end - 0.05:
            return FetchError(f"no complete answer within {self.limits.deadline:g} s (deadline)", "transient")
        if isinstance(exc, TimeoutError | socket.timeout):
            return FetchError(f"no answer within {self.limits.timeout:g} s (timeout)", "transient")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return FetchError("the server's TLS certificate could not be verified", "refused")
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, http.client.RemoteDisconnected):
            return FetchError(f"the server's answer is not valid HTTP ({type(exc).__name__})", "transient")
        return FetchError("connection failed (the server is down, unreachable or closed the connection)", "transient")

    # ---------------------------------------------------------------- requests

    def open(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None, limit: int
    ) -> Answer:
        """One request (same-origin redirects followed); a 2xx answer, else FetchError. No retry here."""
        self._local.deadline = time.monotonic() + self.limits.deadline
        for _ in range(_MAX_REDIRECTS + 1):
            if not self._same_origin(url):
                raise FetchError(
                    f"the server redirected to another origin ({redact_url(url)[:200]}); not followed", "refused"
                )
            conn = self._take()
            response: http.client.HTTPResponse | None = None
            try:
                response = self._send(conn, method, url, {**self.headers, **(headers or {})}, body)
            except FetchError:
                self.finish(conn, None, reuse=False)
                raise
            status = response.status
            if 200 <= status < 300:
                try:
                    return Answer(self, conn, response, limit)
                except FetchError:
                    self.finish(conn, response, reuse=False)
                    raise
            location = response.getheader("Location")
            retry_after = response.getheader("Retry-After")
            reason = _reason(response)
            self.finish(conn, response, reuse=False)
            if status in (301, 302, 303, 307, 308) and location:
                if method != "GET" and status not in (307, 308):
                    raise FetchError(f"HTTP {status}: the server redirected a {method}; not followed", "refused")
                url = urljoin(url, location.strip())
                continue
            wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
            raise _status_error(status, reason, wait)
        raise FetchError("the server redirected too many times", "refused")

    def _send(
        self, conn: http.client.HTTPConnection, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            if conn.sock is None:
                conn.connect()
            remaining = self._local.deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError(f"no complete answer within {self.limits.deadline:g} s (deadline)", "transient")
            timer = threading.Timer(remaining, self._kill, (conn,))
            timer.daemon = True
            timer.start()
            self._local.timer = timer
            conn.request(method, target, body=body, headers=headers)
            return conn.getresponse()
        except FetchError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise self.transport_error(exc) from None

    def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        limit: int,
        consume: Callable[[Answer], object] | None = None,
    ) -> object:
        """:meth:`open` and then ``consume(answer)`` (default: the body's bytes), retrying a transient
        failure (5xx, 429, no answer, broken connection, the deadline) with backoff. ``consume``
        must start over each time (it is called again on a retry)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = self.open(method, url, headers=headers, body=body, limit=limit)
                with contextlib.closing(answer):
                    return consume(answer) if consume is not None else answer.read()
            except FetchError as exc:
                deadline_hit = "(deadline)" in str(exc)
                if (
                    exc.kind != "transient"
                    or attempt >= self.limits.attempts
                    or deadline_hit
                    or self._closed
                    or self._aborting
                ):
                    raise
                wait = getattr(exc, "retry_after", None)
                pause = self.limits.backoff * 2 ** (attempt - 1)
                time.sleep(min(30.0, max(pause, wait or 0.0)))

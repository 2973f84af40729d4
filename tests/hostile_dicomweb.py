"""A real, small, hostile DICOMweb server for the tests: ``http.server`` in a thread on 127.0.0.1.

It serves QIDO-RS and WADO-RS for real DICOM files (their own UIDs) and accepts STOW-RS, and
each behaviour can be made hostile: drip-feed, ignore ``offset``, huge or malformed answers, gzip
bombs, endless bodies, redirects to another port, bad UIDs, the wrong instance, 401 or 429 after
N requests, ``Warning:`` headers with terminal escapes. Every request is recorded.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom

BOUNDARY = "hostile-boundary-1234"


@dataclass
class Instance:
    study: str
    series: str
    sop: str
    data: bytes
    #: StudyDate (YYYYMMDD), for date-window searches
    date: str = "20240101"

    @classmethod
    def of(cls, path: Path) -> Instance:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return cls(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), path.read_bytes())

    def record(self) -> dict[str, Any]:
        return {
            "0020000D": {"vr": "UI", "Value": [self.study]},
            "0020000E": {"vr": "UI", "Value": [self.series]},
            "00080018": {"vr": "UI", "Value": [self.sop]},
            "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
            "00080060": {"vr": "CS", "Value": ["CR"]},
            "00080020": {"vr": "DA", "Value": [self.date]},
        }


@dataclass
class Behaviour:
    """What the server does; the defaults are a well-behaved server."""

    #: QIDO: the JSON answer instead of the instances' records (bytes: sent as is)
    qido_body: bytes | None = None
    #: QIDO: extra records appended to the answer
    qido_extra: list[dict[str, Any]] = field(default_factory=list)
    #: QIDO: ignore offset (always answer the first page of ``limit``)
    ignore_offset: bool = False
    #: QIDO: a Warning header
    warning: str | None = None
    #: WADO: called with (handler, instance, count) before answering; True when it answered itself
    wado: Callable[[Any, Instance, int], bool] | None = None
    #: WADO: serve this instance's bytes whatever is asked for
    wrong_instance: Instance | None = None
    #: STOW: the JSON answer (None: list every SOP as stored), or a redirect Location
    stow_body: bytes | None = None
    stow_redirect: str | None = None


class HostileServer:
    def __init__(self, instances: list[Instance], behaviour: Behaviour | None = None) -> None:
        self.instances = instances
        self.behaviour = behaviour or Behaviour()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.wado_count = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _record(self, body: bytes = b"") -> None:
                with server.lock:
                    server.requests.append((self.command, self.path, dict(self.headers), body))

            def send_bytes(self, status: int, ctype: str, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._record()
                parts = urlsplit(self.path)
                segs = [s for s in parts.path.split("/") if s]
                try:
                    if segs[-1] == "instances" and "series" not in segs:
                        self.qido(parse_qs(parts.query))
                    elif len(segs) >= 7 and segs[-2] == "instances":
                        self.wado(segs[-1])
                    else:
                        self.send_bytes(404, "text/plain", b"no")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def qido(self, query: dict[str, list[str]]) -> None:
                b = server.behaviour
                extra = {"Warning": b.warning} if b.warning else None
                if b.qido_body is not None:
                    self.send_bytes(200, "application/dicom+json", b.qido_body, extra)
                    return
                chosen = server.instances
                if "StudyDate" in query:  # a date or a range: 20240101, 20240101-20240131
                    low, dash, high = query["StudyDate"][0].partition("-")
                    high = high if dash else low
                    chosen = [i for i in chosen if (low or "00000000") <= i.date <= (high or "99999999")]
                records = [i.record() for i in chosen] + b.qido_extra
                limit = int(query.get("limit", ["1000000"])[0])
                offset = 0 if b.ignore_offset else int(query.get("offset", ["0"])[0])
                page = records[offset : offset + limit]
                self.send_bytes(200, "application/dicom+json", json.dumps(page).encode(), extra)

            def wado(self, sop: str) -> None:
                b = server.behaviour
                with server.lock:
                    server.wado_count += 1
                    count = server.wado_count
                match = [i for i in server.instances if i.sop == sop]
                if not match:
                    self.send_bytes(404, "text/plain", b"no such instance")
                    return
                instance = b.wrong_instance or match[0]
                if b.wado is not None and b.wado(self, instance, count):
                    return
                self.send_bytes(200, f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
                                multipart(instance.data))  # fmt: skip

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                self._record(body)
                b = server.behaviour
                if b.stow_redirect is not None:
                    self.send_bytes(307, "text/plain", b"", {"Location": b.stow_redirect})
                    return
                if b.stow_body is not None:
                    self.send_bytes(200, "application/dicom+json", b.stow_body)
                    return
                self.send_bytes(200, "application/dicom+json", b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def wado_paths(self) -> list[str]:
        return [r[1] for r in self.requests if r[0] == "GET" and "/series/" in r[1]]

    def posts(self) -> list[tuple[str, str, dict[str, str], bytes]]:
        return [r for r in self.requests if r[0] == "POST"]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def multipart(data: bytes) -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def drip(handler: Any, instance: Instance, count: int) -> bool:
    """Headers at once, then one byte every 0.3 s, for as long as the client listens."""
    body = multipart(instance.data)
    handler.send_response(200)
    handler.send_header("Content-Type", f"multipart/related; type=application/dicom; boundary={BOUNDARY}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        for i in range(len(body)):
            handler.wfile.write(body[i : i + 1])
            handler.wfile.flush()
            time.sleep(0.3)
    except OSError:
        pass
    return True


def gzip_bomb(size: int) -> Callable[[Any, Instance, int], bool]:
    """A multipart answer, gzip-encoded, that inflates to ``size`` bytes (zeros after the part header)."""
    raw = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + bytes(size)
    packed = gzip.compress(raw, compresslevel=9)

    def answer(handler: Any, instance: Instance, count: int) -> bool:
        handler.send_bytes(
            200,
            f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
            packed,
            {"Content-Encoding": "gzip"},
        )
        return True

    return answer


def endless(handler: Any, instance: Instance, count: int) -> bool:
    """A chunked multipart body that never ends (until the client hangs up)."""
    handler.send_response(200)
    handler.send_header("Content-Type", f"multipart/related; type=application/dicom; boundary={BOUNDARY}")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = bytes(1 << 16)
    try:
        head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        handler.wfile.write(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        while True:
            handler.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    except OSError:
        pass
    return True


def status_after(n: int, status: int, times: int | None = None) -> Callable[[Any, Instance, int], bool]:
    """Answer ``status`` to every WADO request after the first ``n`` (``times`` of them, or all)."""
    state = {"sent": 0}

    def answer(handler: Any, instance: Instance, count: int) -> bool:
        if count > n and (times is None or state["sent"] < times):
            state["sent"] += 1
            handler.send_bytes(status, "text/plain", b"no", {"Retry-After": "0"} if status == 429 else None)
            return True
        return False

    return answer


def redirect_to(url: str) -> Callable[[Any, Instance, int], bool]:
    def answer(handler: Any, instance: Instance, count: int) -> bool:
        handler.send_bytes(302, "text/plain", b"", {"Location": url + handler.path})
        return True

    return answer

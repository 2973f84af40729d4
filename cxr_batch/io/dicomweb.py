"""DICOMweb input and output: find instances by QIDO-RS, retrieve them by WADO-RS, store SRs by STOW-RS.

Every request goes through the one bounded fetch, :class:`cxr_batch.io.http.Origin`: a deadline
per request, capped answer bytes (decoded: no gzip bomb), no redirect to another origin. What the
server says is checked: QIDO-RS answers must be lists of DICOM JSON objects and are paged with
``limit``/``offset`` (a server that ignores ``offset`` is detected, pages are bounded); UIDs must
be valid DICOM UIDs before they go into a URL; a retrieved instance must be the one asked for; a
STOW-RS store counts only when the server's answer lists it.

Retrieval (``workers`` requests in flight, identity encoding: JPEG data does not shrink)
streams each instance's multipart body straight into a spool file (a private temporary
folder), chunk by chunk, so an instance is never held in memory whole, and at most
``max_instance_bytes`` of it is spooled. The engine decodes spool files like any other DICOM
file; each is deleted as soon as its row (and SR) is written, so the spool never holds more
than the engine's look-ahead plus the requests in flight (about ``(streams + 2) * batch_size +
decode workers + DICOMweb workers`` instances), whatever the number of instances.

Each instance is reported as ``dicomweb:STUDY/SERIES/SOP``: resume (which skips the report's
paths) therefore skips by SOP instance UID, and ``--shard`` hashes that path.

Failures: a search that fails is fatal (nothing to classify). A retrieval that fails (HTTP
error, timeout, broken connection, a body that is not DICOM) becomes that instance's error
row. After :attr:`DicomwebConfig.max_failures` consecutive transport failures (no answer, the
deadline, 5xx, 429: the server went away or is overloaded), or at once on a 401/403 (an expired
token), retrieval stops: the rows of everything retrieved so far are written, the instances not
retrieved get no row (so ``--resume`` retries them), and the run ends with a fatal error that
says to resume.

Credentials never appear on the command line: a bearer token from ``$CXR_BATCH_DICOMWEB_TOKEN``,
or basic auth from ``$CXR_BATCH_DICOMWEB_USER`` and ``$CXR_BATCH_DICOMWEB_PASSWORD``, or the
same from an ``--auth-file`` (``token=...`` or ``user=...`` and ``password=...`` lines). A URL
with credentials, a query or a fragment in it is refused. Messages name the URL and HTTP
status, never a credential; what is recorded goes through :mod:`cxr_batch.redact`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

from cxr_batch.errors import CxrBatchError, InputError, MissingExtraError
from cxr_batch.io.http import Answer, FetchError, Limits, Origin
from cxr_batch.io.inputs import Discovery, InputFile
from cxr_batch.io.safe_open import open_regular
from cxr_batch.redact import redact_query, redact_url
from cxr_batch.text import shown

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from cxr_batch.engine.types import Result

TOKEN_ENV = "CXR_BATCH_DICOMWEB_TOKEN"
USER_ENV = "CXR_BATCH_DICOMWEB_USER"
PASSWORD_ENV = "CXR_BATCH_DICOMWEB_PASSWORD"
PREFIX = "dicomweb:"
#: SOP classes that are not images (SR and key object selection, presentation states,
#: encapsulated documents, waveforms): skipped when a study is searched.
NON_IMAGE_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, ...
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC"})
#: The largest multipart part header accepted (a few hundred bytes in practice).
_MAX_PART_HEADER = 64 * 1024
#: A DICOM UID: digits and dots, no empty component, at most 64 characters.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_AUTH_HINT = f" (check ${USER_ENV}/${PASSWORD_ENV}, ${TOKEN_ENV} or --auth-file)"
_MAX_AUTH_FILE = 64 * 1024
_MAX_WARNINGS = 5


def valid_uid(uid: str) -> bool:
    """``uid`` follows the DICOM UID grammar (digits and dots, at most 64 characters)."""
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


class DicomwebError(CxrBatchError):
    """The DICOMweb server can't be used (unreachable, refused the credentials, went away, answered nonsense)."""


@dataclass(frozen=True)
class DicomwebConfig:
    """Where and what to classify (``classify --dicomweb URL --study/--series/--query``)."""

    url: str
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    #: QIDO-RS filters (``Modality=CR``, ``StudyDate=20240101-20240131``)
    query: tuple[tuple[str, str], ...] = ()
    auth_file: str | None = None
    #: seconds to connect and between bytes read
    timeout: float = 30.0
    #: seconds for a whole request (a server that drips bytes is cut off)
    deadline: float = 300.0
    #: consecutive transport failures (no answer, broken connection, 5xx, 429) that end retrieval
    max_failures: int = 3
    #: where the spool folder is made (default: the system's temporary folder)
    spool_parent: str | None = None
    #: WADO-RS retrievals in flight at once
    workers: int = 8
    #: the largest instance retrieved (decoded bytes spooled); larger ones are error rows
    max_instance_bytes: int = 1 << 30
    #: the largest QIDO-RS answer (one page) and STOW-RS answer
    max_answer_bytes: int = 16 << 20
    #: instances asked for per QIDO-RS page (``limit``), and the most pages of one search
    page_size: int = 1000
    max_pages: int = 10_000


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    user: str | None = None
    password: str | None = None
    #: a remark on the auth file (its permissions), shown as a warning
    warning: str | None = None

    def __repr__(self) -> str:  # never print a credential, even in a traceback or a debugger
        kind = "token" if self.token else "basic" if self.user else "none"
        return f"Credentials({kind})"


def parse_query(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings → pairs; raises ValueError on a malformed one (its value is not quoted)."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*|[0-9A-Fa-f]{8}", key):
            shown_key = shown(key)[:40] if re.fullmatch(r"[A-Za-z0-9]{1,40}", key) else "..."
            raise ValueError(
                f"--query {shown_key}=...: expected KEY=VALUE with a DICOM keyword or tag, e.g. Modality=CR"
            )
        out.append((key, value.strip()))
    return tuple(out)


def check_url(url: str) -> str:
    """The service's base URL without a trailing slash; raises InputError for one that can't be used.

    Refused: another scheme than http(s); user information (``user:pass@``); a query (``?...``) or
    a fragment (``#...``): tokens there (``?access_token=``, ``?sig=``, ``X-Amz-Signature=``,
    ``#access_token=``) would be recorded and shown. Credentials go in the environment or
    ``--auth-file``.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise InputError(f"--dicomweb: not a usable URL: {shown(redact_url(url))!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(
            f"--dicomweb needs an http:// or https:// URL of a DICOMweb service, not {shown(redact_url(url))!r}"
        )
    where = f"set ${USER_ENV} and ${PASSWORD_ENV}, or ${TOKEN_ENV}, or use --auth-file"
    if "@" in parts.netloc:
        raise InputError(
            f"--dicomweb: the URL must not carry credentials (they would show in logs and process lists); {where}"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise InputError(
            "--dicomweb: the URL must not have a query (?...) or fragment (#...): a token there would be "
            f"recorded and shown; {where}"
        )
    return url.rstrip("/")


def load_credentials(auth_file: str | None = None, environ: dict[str, str] | None = None) -> Credentials:
    """From ``auth_file`` when given, else the environment (see the module docstring).

    Raises:
        InputError: the file can't be read, has unknown keys, or gives a user without a password,
            or a credential an HTTP header can't carry (its value is never quoted).
    """
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    warning = None
    if auth_file is not None:
        try:
            with open_regular(auth_file) as fh:
                mode = os.fstat(fh.fileno()).st_mode
                raw = fh.read(_MAX_AUTH_FILE + 1)
        except OSError as exc:
            raise InputError(f"--auth-file {auth_file}: cannot read it: {exc.strerror or exc}") from None
        if len(raw) > _MAX_AUTH_FILE:
            raise InputError(f"--auth-file {auth_file}: larger than {_MAX_AUTH_FILE // 1024} KB, not an auth file")
        try:
            lines = raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"--auth-file {auth_file}: not UTF-8 text (the content is not shown)") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # Not fatal (a shared CI secret file may be group-readable), but worth saying.
            warning = f"--auth-file {auth_file} is readable by others than its owner (chmod 600 it)"
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            key, sep, value = text.partition("=")
            key = key.strip().lower().removeprefix("cxr_batch_dicomweb_")
            if not sep or key not in ("token", "user", "password"):
                raise InputError(
                    f"--auth-file {auth_file}, line {n}: expected token=..., user=... or password=... "
                    "(the value is not shown)"
                )
            values[key] = value.strip()
    else:
        for key, name in (("token", TOKEN_ENV), ("user", USER_ENV), ("password", PASSWORD_ENV)):
            if env.get(name):
                values[key] = env[name]
    where = f"--auth-file {auth_file}" if auth_file is not None else "the environment"
    if values.get("user") and "password" not in values:
        raise InputError(f"{where} gives a DICOMweb user but no password")
    if values.get("token") and values.get("user"):
        raise InputError(f"{where} gives both a token and a user: give one of them")
    token = values.get("token") or None
    if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise InputError(
            f"{where}: the DICOMweb token holds characters an HTTP header can't carry (spaces, controls or "
            "non-ASCII; the value is not shown)"
        )
    user, password = values.get("user") or None, values.get("password")
    for what, given in (("user", user), ("password", password)):
        if given is not None and re.search(r"[\x00-\x1f\x7f]", given):
            raise InputError(f"{where}: the DICOMweb {what} holds control characters (the value is not shown)")
    if user is not None and ":" in user:
        raise InputError(f"{where}: the DICOMweb user must not hold ':' (basic authentication can't carry it)")
    return Credentials(token=token, user=user, password=password, warning=warning)


def auth_headers(creds: Credentials) -> dict[str, str]:
    """The Authorization header for ``creds`` (basic auth in UTF-8, so any password works)."""
    import base64

    if creds.token:
        return {"Authorization": f"Bearer {creds.token}"}
    if creds.user:
        pair = f"{creds.user}:{creds.password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {}


def require_dicomweb_extra() -> None:
    """DICOMweb needs pydicom (the ``dicom`` extra): checked before anything is fetched."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise MissingExtraError("--dicomweb", "dicom", "pydicom") from None


def _failure_text(exc: FetchError) -> str:
    return (
        f"{exc}{_AUTH_HINT}"
        if exc.status == 401
        else f"{exc} (the credentials are not allowed to do this)"
        if (exc.status == 403)
        else str(exc)
    )


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str

    @property
    def display(self) -> str:
        return f"{PREFIX}{self.study}/{self.series}/{self.sop}"

    @property
    def valid(self) -> bool:
        return valid_uid(self.study) and valid_uid(self.series) and valid_uid(self.sop)

    @classmethod
    def parse(cls, display: str) -> InstanceRef | None:
        """The reference a report path names, or None when it is not a valid ``dicomweb:`` path."""
        if not display.startswith(PREFIX):
            return None
        parts = display[len(PREFIX) :].split("/")
        if len(parts) != 3:
            return None
        ref = cls(*parts)
        return ref if ref.valid else None


def _value(record: Any, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object as text; "" for anything unexpected."""
    if not isinstance(record, dict):
        return ""
    element = record.get(tag)
    if not isinstance(element, dict):
        return ""
    values = element.get("Value")
    if not isinstance(values, list) or not values or not isinstance(values[0], str | int | float):
        return ""
    return str(values[0])


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = doc.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


_QIDO_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")


@dataclass
class Found:
    refs: list[InstanceRef]
    skipped: int = 0
    invalid: int = 0
    warnings: list[str] = field(default_factory=list)


class DicomwebSource:
    """One DICOMweb service: search, retrieve into a spool, store. Every request goes through
    :class:`cxr_batch.io.http.Origin` (deadline, byte caps, no cross-origin redirect).

    Raises (from the constructor):
        MissingExtraError: pydicom is not installed.
        InputError: a bad URL, or bad credentials settings.
    """

    def __init__(self, config: DicomwebConfig) -> None:
        require_dicomweb_extra()
        self.config = config
        self.url = check_url(config.url)
        creds = load_credentials(config.auth_file)
        self.warnings: list[str] = [creds.warning] if creds.warning else []
        self.origin = Origin(
            self.url,
            headers={"User-Agent": "cxr-batch", **auth_headers(creds)},
            limits=Limits(timeout=config.timeout, deadline=config.deadline),
        )
        #: the reason retrieval stopped early (the server went away, refused the credentials); None when it did not
        self.fatal: str | None = None
        self.retrieved = 0
        self._spool: str | None = None
        self._spool_lock = threading.Lock()
        self._files: dict[str, str] = {}  # display → spool file, until released
        self._serial = itertools.count(1)
        self._server_warnings: set[str] = set()

    # ------------------------------------------------------------------ QIDO-RS

    def describe(self) -> dict[str, Any]:
        """What the provenance record may say about this source: no credentials, no patient values."""
        return {
            "kind": "dicomweb",
            "url": redact_url(self.url),
            "studies": list(self.config.studies),
            "series": list(self.config.series),
            "query": redact_query(self.config.query),
        }

    def _note_server_warning(self, answer: Answer) -> None:
        for value in answer.headers.get_all("Warning") or []:
            if len(self._server_warnings) < _MAX_WARNINGS:
                self._server_warnings.add(f"the server says: {shown(value)[:300]}")

    def _qido_page(self, url: str) -> list[dict[str, Any]]:
        def consume(answer: Answer) -> bytes:
            self._note_server_warning(answer)
            return answer.read()

        try:
            body = self.origin.fetch(
                "GET", url, headers={"Accept": "application/dicom+json"}, limit=self.config.max_answer_bytes,
                consume=consume,
            )  # fmt: skip
        except FetchError as exc:
            raise DicomwebError(f"QIDO-RS search on {self.url} failed: {_failure_text(exc)}") from None
        assert isinstance(body, bytes)
        if not body.strip():
            return []  # 204 No Content: nothing matches
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise DicomwebError(f"QIDO-RS search on {self.url}: the answer is not valid JSON") from None
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise DicomwebError(
                f"QIDO-RS search on {self.url}: the answer is not a list of DICOM JSON objects "
                f"(got {type(doc).__name__})"
            )
        return doc

    def search(self, filters: dict[str, str], study: str | None = None) -> Iterator[dict[str, Any]]:
        """QIDO-RS instance search, page by page (``limit``/``offset``); each instance once.

        Raises:
            DicomwebError: the search fails, the answer is not a list of DICOM JSON objects, the
                server repeats a page (it ignores ``offset``), or there are more than ``max_pages`` pages.
        """
        if study is not None and not valid_uid(study):
            raise DicomwebError(f"--study {shown(study)[:80]!r} is not a DICOM UID (digits and dots)")
        path = f"/studies/{quote(study)}/instances" if study else "/instances"
        params = [*filters.items(), *(("includefield", f) for f in (*_QIDO_FIELDS, "SeriesDescription"))]
        page = self.config.page_size
        seen: set[str] = set()
        offset = 0
        for number in range(1, self.config.max_pages + 1):
            records = self._qido_page(f"{self.url}{path}?{urlencode([*params, ('limit', page), ('offset', offset)])}")
            new = 0
            for record in records:
                key = _value(record, "00080018") or json.dumps(record, sort_keys=True)[:512]
                if key in seen:
                    continue
                seen.add(key)
                new += 1
                yield record
            if len(records) != page:  # the last page (or a server that ignores limit: all at once)
                return
            if new == 0:
                raise DicomwebError(
                    f"QIDO-RS search on {self.url}: page {number} repeats earlier instances (the server ignores "
                    f"'offset'), so the answer can't be paged; narrow --query so that fewer than {page} match"
                )
            offset += len(records)
        raise DicomwebError(
            f"QIDO-RS search on {self.url}: more than {self.config.max_pages} pages of {page} instances; narrow --query"
        )

    def _searches(self) -> list[tuple[str | None, dict[str, str]]]:
        base = dict(self.config.query)
        searches: list[tuple[str | None, dict[str, str]]] = [(s, base) for s in self.config.studies]
        searches += [(None, {**base, "SeriesInstanceUID": s}) for s in self.config.series]
        return searches or [(None, base)]

    def find(self) -> Found:
        """Every image instance the study/series/query options name, each once, in server order.
        Records whose UIDs are not valid DICOM UIDs are skipped (and counted in a warning)."""
        found = Found(refs=[], warnings=list(self.warnings))
        seen: set[str] = set()
        for study, filters in self._searches():
            for record in self.search(filters, study):
                ref = InstanceRef(
                    _value(record, "0020000D") or (study or ""), _value(record, "0020000E"), _value(record, "00080018")
                )
                if not ref.valid:
                    found.invalid += 1
                    continue
                if ref.sop in seen:
                    continue
                seen.add(ref.sop)
                sop_class = _value(record, "00080016")
                modality = _value(record, "00080060").upper()
                if sop_class.startswith(NON_IMAGE_CLASS_PREFIXES) or modality in NON_IMAGE_MODALITIES:
                    found.skipped += 1
                    continue
                found.refs.append(ref)
        if found.skipped:
            found.warnings.append(
                f"skipped {found.skipped} instance(s) that are not images (structured reports, presentation states, ...)"
            )
        if found.invalid:
            found.warnings.append(
                f"skipped {found.invalid} search result(s) without valid study, series and SOP instance UIDs "
                "(the server's answer; DICOM UIDs are digits and dots, at most 64 characters)"
            )
        found.warnings.extend(sorted(self._server_warnings))
        return found

    def discover(self) -> Discovery:
        """:meth:`find` as the engine's inputs (no path yet: :meth:`retrieve` fetches each when its turn comes)."""
        found = self.find()
        return Discovery(files=[InputFile("", ref.display) for ref in found.refs], warnings=found.warnings)

    # ------------------------------------------------------------------ WADO-RS

    def _spool_dir(self) -> str:
        with self._spool_lock:
            if self._spool is None:
                self._spool = tempfile.mkdtemp(prefix="cxr-batch-dicomweb-", dir=self.config.spool_parent)
            return self._spool

    def retrieve(self, items: Iterable[InputFile]) -> Iterator[InputFile]:
        """Fetch each instance when the engine asks for it (``workers`` requests in flight, the
        answers in the order of ``items``); a failed fetch is an input with an error.

        Transport failures (no answer, broken connection, the deadline, 5xx, 429) are held back
        until the next retrieval succeeds: after ``max_failures`` of them in a row the server is
        taken for gone. A 401 or 403 (an expired token) ends retrieval at once. Either way
        retrieval stops (setting :attr:`fatal`), and the held-back and remaining instances get no
        row, so ``--resume`` retries them. Other failures (404, not DICOM, too large, another
        instance than the one asked for) are error rows at once.
        """
        workers = max(1, self.config.workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="cxr-dicomweb") if workers > 1 else None
        pending: deque[tuple[InputFile, InstanceRef | None, Future[tuple[str, str | None, str | None]] | None]]
        pending = deque()
        source = iter(items)
        exhausted = False
        held: list[InputFile] = []
        try:
            while True:
                while not exhausted and len(pending) < workers:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    ref = InstanceRef.parse(item.display) if item.display.startswith(PREFIX) else None
                    future = pool.submit(self._fetch, ref) if (pool is not None and ref is not None) else None
                    pending.append((item, ref, future))
                if not pending:
                    break
                item, ref, future = pending.popleft()
                if not item.display.startswith(PREFIX):
                    yield item
                    continue
                if ref is None:
                    yield InputFile("", item.display, error="not a valid dicomweb:STUDY/SERIES/SOP path")
                    continue
                path, error, kind = future.result() if future is not None else self._fetch(ref)
                if kind == "auth":
                    self.fatal = (
                        f"{self.url} refused the credentials mid-run ({error}); the rows written so far are kept: "
                        "renew the credentials and rerun with --resume"
                    )
                    return
                if kind == "transient":
                    held.append(InputFile("", item.display, error=f"DICOMweb retrieve failed: {error}"))
                    if len(held) >= self.config.max_failures:
                        self.fatal = (
                            f"{self.url} stopped answering ({len(held)} retrievals in a row failed; last: {error}); "
                            "the rows written so far are kept: rerun with --resume once the server is back"
                        )
                        return
                    continue
                yield from held
                held.clear()
                if error is not None:
                    yield InputFile("", item.display, error=f"DICOMweb retrieve failed: {error}")
                    continue
                self.retrieved += 1
                self._files[item.display] = path
                yield InputFile(path, item.display)
            if held:  # the last retrievals failed for the transport: no rows, --resume retries them
                self.fatal = (
                    f"{self.url} stopped answering ({len(held)} last retrieval(s) failed; last: "
                    f"{held[-1].error}); the rows written so far are kept: rerun with --resume once the server is back"
                )
        finally:
            if pending:  # stopped early: cut off what is in flight, drop what came in
                self.origin.abort()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self.origin.resume()
            for _, _, future in pending:
                if future is not None and future.done() and not future.cancelled() and future.exception() is None:
                    _remove(future.result()[0])

    def _fetch(self, ref: InstanceRef) -> tuple[str, str | None, str | None]:
        """(spool path, error, error kind: None, "transient", "auth" or "refused")."""
        url = f"{self.url}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"
        path = os.path.join(self._spool_dir(), f"{next(self._serial):09d}.dcm")
        headers = {
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
            # JPEG data does not shrink: compressing it costs the server time and saves nothing
            "Accept-Encoding": "identity",
        }

        def consume(answer: Answer) -> None:
            with _spool_file(path) as out:
                _write_body(answer.headers.get("Content-Type", ""), answer.chunks(), out)

        try:
            self.origin.fetch("GET", url, headers=headers, limit=self.config.max_instance_bytes, consume=consume)
        except FetchError as exc:
            _remove(path)
            return path, _failure_text(exc), exc.kind
        except OSError as exc:
            _remove(path)
            return path, f"cannot write the spool file: {exc.strerror or exc}", "refused"
        except TruncatedAnswer as exc:
            _remove(path)
            return path, str(exc), "transient"
        except ValueError as exc:
            _remove(path)
            return path, str(exc), "refused"
        other = _sop_of(path)
        if other is not None and other != ref.sop:
            _remove(path)
            what = f" ({other})" if valid_uid(other) else ""
            return path, f"the server sent another instance{what} than the one asked for", "refused"
        return path, None, None

    def release(self, results: Sequence[Result]) -> None:
        """Delete the spool files of a batch whose rows are written."""
        for r in results:
            path = self._files.pop(r.path, None)
            if path is not None:
                _remove(path)

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        self._files.clear()
        self.origin.close()

    # ------------------------------------------------------------------ STOW-RS

    def store(self, datasets: Sequence[Dataset]) -> list[str | None]:
        """STOW-RS the datasets in one request (see :meth:`store_encoded`)."""
        from io import BytesIO

        items = []
        for ds in datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            items.append((str(ds.SOPInstanceUID), buf.getvalue()))
        return self.store_encoded(items)

    def store_encoded(self, items: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """STOW-RS DICOM files, given as (SOP instance UID, bytes), in one request; one error message
        (or None when stored) per file.

        Only what the server's answer lists as stored (ReferencedSOPSequence) counts as stored: an
        answer that lists nothing, or is not a DICOM JSON object, fails every file. A 401 or 403
        also ends retrieval (:attr:`fatal`): the credentials are no good for the rest of the run.
        """
        if not items:
            return []
        from secrets import token_hex

        boundary = f"cxr-batch-{token_hex(16)}"
        parts = []
        for _, data in items:
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            "Accept-Encoding": "identity",
        }
        try:
            answer = self.origin.fetch(
                "POST", f"{self.url}/studies", headers=headers, body=body, limit=self.config.max_answer_bytes
            )
        except FetchError as exc:
            if exc.kind == "auth" and self.fatal is None:
                self.fatal = (
                    f"{self.url} refused the credentials for STOW-RS ({_failure_text(exc)}); the rows written so far "
                    "are kept: fix the credentials and rerun with --resume"
                )
            return [f"STOW-RS to {self.url} failed: {_failure_text(exc)}"] * len(items)
        assert isinstance(answer, bytes)
        try:
            doc = json.loads(answer) if answer.strip() else None
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            return ["the server's STOW-RS answer is not a DICOM JSON object: not counted as stored"] * len(items)
        failed: dict[str, str] = {}
        for item in _items(doc, "00081198"):
            reason = _value(item, "00081197")
            failed[_value(item, "00081155")] = f"the server refused it (failure reason {shown(reason)[:20]})"
        stored = {_value(item, "00081155") for item in _items(doc, "00081199")}
        out: list[str | None] = []
        for uid, _ in items:
            if uid in failed:
                out.append(failed[uid])
            elif uid not in stored:
                out.append("the server's STOW-RS answer does not list it as stored")
            else:
                out.append(None)
        return out

    def __enter__(self) -> DicomwebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_SPOOL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _spool_file(path: str) -> BinaryIO:
    """A new file in the private (0700) spool folder: created, never opened through a link."""
    return os.fdopen(os.open(path, _SPOOL_FLAGS, 0o600), "wb")


def _sop_of(path: str) -> str | None:
    """The SOP Instance UID a spooled instance says it is; None when it can't be read (the engine says why)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        value = ds.get("SOPInstanceUID")
    except Exception:
        return None
    return None if value is None else str(value).strip("\0 ")


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary\s*=\s*("([^"]+)"|[^;\s]+)', content_type, re.IGNORECASE)
    if not match:
        return None
    return (match.group(2) or match.group(1)).encode("latin-1", "replace")


class TruncatedAnswer(ValueError):
    """The answer ended early (a server going away, a connection cut): a transport failure,
    retried like one (no row; ``--resume`` retrieves the instance again), not a bad instance."""


def _write_body(content_type: str, chunks: Iterator[bytes], out: BinaryIO) -> None:
    """Stream the first part of a multipart/related answer (or a bare application/dicom body) into ``out``.

    Raises:
        ValueError: the answer is not a DICOM instance (no part, empty, unexpected media type).
    """
    if content_type.lower().startswith("application/dicom"):
        size = 0
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        if not size:
            raise TruncatedAnswer("the server sent an empty body")
        return
    boundary = _boundary(content_type)
    if not content_type.lower().startswith("multipart/related") or boundary is None:
        what = shown(content_type)[:80] if content_type else "no media type"
        raise ValueError(f"the server answered with {what}, not a DICOM instance")
    opening = b"--" + boundary
    delimiter = b"\r\n--" + boundary
    buffer = b""
    # 1. the opening delimiter and the part's headers
    for chunk in chunks:
        buffer += chunk
        start = buffer.find(opening)
        if start >= 0:
            end = buffer.find(b"\r\n\r\n", start)
            if end >= 0:
                headers = buffer[start:end].decode("latin-1").lower()
                if "application/dicom" not in headers and "content-type" in headers:
                    raise ValueError("the server's multipart answer holds no application/dicom part")
                buffer = buffer[end + 4 :]
                break
        if len(buffer) > _MAX_PART_HEADER:
            raise ValueError("the server's multipart answer has no readable part header")
    else:
        raise TruncatedAnswer("the server's answer holds no DICOM instance (empty multipart body)")
    # 2. the part body, up to the next delimiter; keep back a delimiter's length of bytes
    size = 0
    keep = len(delimiter) - 1
    while True:
        cut = buffer.find(delimiter)
        if cut >= 0:
            out.write(buffer[:cut])
            size += cut
            break
        if len(buffer) > keep:
            out.write(buffer[:-keep])
            size += len(buffer) - keep
            buffer = buffer[-keep:]
        more = next(chunks, None)
        if more is None:
            raise TruncatedAnswer("the server's multipart answer ended in the middle of the instance")
        buffer += more
    for _ in chunks:  # read the rest (the closing delimiter), so the connection can be reused
        pass
    if not size:
        raise ValueError("the server sent an empty DICOM part")


def list_instances(config: DicomwebConfig) -> list[dict[str, str]]:
    """``dicomweb-list``: one dict per instance the options name (SRs included), for printing.
    Values are the server's: the CLI escapes them before printing."""
    with DicomwebSource(config) as source:
        rows: list[dict[str, str]] = []
        seen: set[str] = set()
        for study, filters in source._searches():
            for record in source.search(filters, study):
                sop = _value(record, "00080018")
                if sop in seen:
                    continue
                seen.add(sop)
                rows.append(
                    {
                        "study": _value(record, "0020000D") or (study or ""),
                        "series": _value(record, "0020000E"),
                        "sop": sop,
                        "modality": _value(record, "00080060"),
                        "sop_class": _value(record, "00080016"),
                        "series_description": _value(record, "0008103E"),
                    }
                )
        return rows


def retrieve_dataset(config: DicomwebConfig, study: str, series: str, sop: str) -> Dataset:
    """One instance as a pydicom dataset (``dicomweb-list --content`` reads SRs with it)."""
    from pydicom import dcmread

    ref = InstanceRef(study, series, sop)
    if not ref.valid:
        raise DicomwebError("the server listed an instance without valid UIDs: not retrieved")
    with DicomwebSource(config) as source:
        path, error, _ = source._fetch(ref)
        if error is not None:
            raise DicomwebError(f"WADO-RS retrieve of {sop} from {source.url} failed: {error}")
        try:
            return dcmread(path)
        finally:
            _remove(path)

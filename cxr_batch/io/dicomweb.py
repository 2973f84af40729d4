"""DICOMweb input and output: find instances by QIDO-RS, retrieve them by WADO-RS, store SRs by STOW-RS.

``dicomweb-client`` (the ``dicom`` extra, imported only when a DICOMweb option is used) runs the
searches and the stores; retrieval streams each instance's multipart body straight into a
spool file (a private temporary folder), chunk by chunk, so an instance is never held in memory
whole. The engine decodes spool files like any other DICOM file; each is deleted as soon as its
row (and SR) is written, so the spool never holds more than the engine's look-ahead (about
``(streams + 2) * batch_size + workers`` instances), whatever the number of instances.

Each instance is reported as ``dicomweb:STUDY/SERIES/SOP``: resume (which skips the report's
paths) therefore skips by SOP instance UID, and ``--shard`` hashes that path.

Failures: a search that fails is fatal (nothing to classify). A retrieval that fails (HTTP
error, timeout, broken connection, a body that is not DICOM) becomes that instance's error
row. After :attr:`DicomwebConfig.max_failures` consecutive transport failures (the server went
away), retrieval stops: the rows of everything retrieved so far are written, then the run ends
with a fatal error that says to resume.

Credentials never appear on the command line: a bearer token from ``$CXR_BATCH_DICOMWEB_TOKEN``,
or basic auth from ``$CXR_BATCH_DICOMWEB_USER`` and ``$CXR_BATCH_DICOMWEB_PASSWORD``, or the
same from an ``--auth-file`` (``token=...`` or ``user=...`` and ``password=...`` lines). A URL
with credentials in it is refused. Messages name the URL and HTTP status, never a credential.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cxr_batch.errors import CxrBatchError, InputError, MissingExtraError
from cxr_batch.io.inputs import Discovery, InputFile

if TYPE_CHECKING:
    import requests
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
_CHUNK = 1 << 20
#: The largest multipart part header accepted (a few hundred bytes in practice).
_MAX_PART_HEADER = 64 * 1024


class DicomwebError(CxrBatchError):
    """The DICOMweb server can't be used (unreachable, refused the credentials, went away)."""


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
    #: consecutive transport failures (no answer, broken connection, 5xx) that end retrieval
    max_failures: int = 3
    #: where the spool folder is made (default: the system's temporary folder)
    spool_parent: str | None = None


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
    """``KEY=VALUE`` strings → pairs; raises ValueError on a malformed one."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*|[0-9A-Fa-f]{8}", key):
            raise ValueError(f"--query {item!r}: expected KEY=VALUE with a DICOM keyword or tag, e.g. Modality=CR")
        out.append((key, value.strip()))
    return tuple(out)


def check_url(url: str) -> str:
    """The service's base URL without a trailing slash; raises InputError for one that can't be used."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--dicomweb needs an http:// or https:// URL of a DICOMweb service, not {_safe_url(url)!r}")
    if parts.username is not None or parts.password is not None:
        raise InputError(
            "--dicomweb: the URL must not carry credentials (they would show in logs and process lists); "
            f"set ${USER_ENV} and ${PASSWORD_ENV}, or ${TOKEN_ENV}, or use --auth-file"
        )
    return url.rstrip("/")


def _safe_url(url: str) -> str:
    """``url`` with any user information removed (for messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=host).geturl()


def load_credentials(auth_file: str | None = None, environ: dict[str, str] | None = None) -> Credentials:
    """From ``auth_file`` when given, else the environment (see the module docstring).

    Raises:
        InputError: the file can't be read, has unknown keys, or gives a user without a password.
    """
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    warning = None
    if auth_file is not None:
        try:
            with open(auth_file, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            mode = os.stat(auth_file).st_mode
        except OSError as exc:
            raise InputError(f"--auth-file {auth_file}: cannot read it: {exc.strerror or exc}") from None
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
    return Credentials(
        token=values.get("token") or None,
        user=values.get("user") or None,
        password=values.get("password"),
        warning=warning,
    )


def require_dicomweb_client() -> None:
    try:
        import dicomweb_client  # noqa: F401
        import pydicom  # noqa: F401
        import requests  # noqa: F401
    except ImportError:
        raise MissingExtraError("--dicomweb", "dicom", "dicomweb-client") from None


def make_session(creds: Credentials) -> requests.Session:
    import requests

    session = requests.Session()
    session.trust_env = False  # no ~/.netrc credentials sent to a server nobody named
    if creds.token:
        session.headers["Authorization"] = f"Bearer {creds.token}"
    elif creds.user:
        session.auth = (creds.user, creds.password or "")
    return session


def describe_error(exc: BaseException, timeout: float) -> tuple[str, bool]:
    """(message, is_transport_failure) for an exception of requests; no credentials in it."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        reason = exc.response.reason or ""
        hint = ""
        if code == 401:
            hint = f" (check ${USER_ENV}/${PASSWORD_ENV}, ${TOKEN_ENV} or --auth-file)"
        elif code == 403:
            hint = " (the credentials are not allowed to do this)"
        return f"HTTP {code} {reason}{hint}".strip(), code >= 500
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s (timeout)", True
    if isinstance(exc, requests.ConnectionError):
        return "connection failed (the server is down, unreachable or closed the connection)", True
    if isinstance(exc, requests.RequestException):
        return f"request failed: {type(exc).__name__}", True
    return f"{type(exc).__name__}: {exc}", False


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str

    @property
    def display(self) -> str:
        return f"{PREFIX}{self.study}/{self.series}/{self.sop}"

    @classmethod
    def parse(cls, display: str) -> InstanceRef | None:
        if not display.startswith(PREFIX):
            return None
        parts = display[len(PREFIX) :].split("/")
        return cls(*parts) if len(parts) == 3 else None


def _value(record: dict[str, Any], tag: str) -> str:
    values = (record.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else ""


_QIDO_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")


@dataclass
class Found:
    refs: list[InstanceRef]
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)


class DicomwebSource:
    """One DICOMweb service: search, retrieve into a spool, store.

    Raises (from the constructor):
        MissingExtraError: dicomweb-client is not installed.
        InputError: a bad URL, or bad credentials settings.
    """

    def __init__(self, config: DicomwebConfig) -> None:
        require_dicomweb_client()
        from dicomweb_client.api import DICOMwebClient

        self.config = config
        self.url = check_url(config.url)
        creds = load_credentials(config.auth_file)
        self.warnings: list[str] = [creds.warning] if creds.warning else []
        self.session = make_session(creds)
        self.client = DICOMwebClient(self.url, session=self.session, timeout=config.timeout)
        self.client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=200)
        #: the reason retrieval stopped early (the server went away); None when it did not
        self.fatal: str | None = None
        self.retrieved = 0
        self._spool: str | None = None
        self._files: dict[str, str] = {}  # display → spool file, until released
        self._serial = 0

    # ------------------------------------------------------------------ QIDO-RS

    def describe(self) -> dict[str, Any]:
        """What the provenance record may say about this source: no credentials."""
        return {
            "url": self.url,
            "studies": list(self.config.studies),
            "series": list(self.config.series),
            "query": dict(self.config.query),
        }

    def search(self, filters: dict[str, str], study: str | None = None) -> list[dict[str, Any]]:
        """QIDO-RS instance search. Raises DicomwebError when the search fails."""
        try:
            result: list[dict[str, Any]] = self.client.search_for_instances(
                study_instance_uid=study,
                fields=[*_QIDO_FIELDS, "SeriesDescription"],
                search_filters=filters or None,
                get_remaining=True,
            )
        except Exception as exc:
            message, _ = describe_error(exc, self.config.timeout)
            raise DicomwebError(f"QIDO-RS search on {self.url} failed: {message}") from None
        return result

    def find(self) -> Found:
        """Every image instance the study/series/query options name, each once, in server order."""
        base = dict(self.config.query)
        searches: list[tuple[str | None, dict[str, str]]] = []
        for study_uid in self.config.studies:
            searches.append((study_uid, base))
        for series_uid in self.config.series:
            searches.append((None, {**base, "SeriesInstanceUID": series_uid}))
        if not searches:
            searches.append((None, base))
        found = Found(refs=[], warnings=list(self.warnings))
        seen: set[str] = set()
        for study, filters in searches:
            for record in self.search(filters, study):
                ref = InstanceRef(
                    _value(record, "0020000D") or (study or ""), _value(record, "0020000E"), _value(record, "00080018")
                )
                if not (ref.study and ref.series and ref.sop) or ref.sop in seen:
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
        return found

    def discover(self) -> Discovery:
        """:meth:`find` as the engine's inputs (no path yet: :meth:`retrieve` fetches each when its turn comes)."""
        found = self.find()
        return Discovery(files=[InputFile("", ref.display) for ref in found.refs], warnings=found.warnings)

    # ------------------------------------------------------------------ WADO-RS

    def _spool_dir(self) -> str:
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="cxr-batch-dicomweb-", dir=self.config.spool_parent)
        return self._spool

    def retrieve(self, items: Iterable[InputFile]) -> Iterator[InputFile]:
        """Fetch each instance when the engine asks for it; a failed fetch is an input with an error.

        Transport failures (no answer, broken connection, 5xx) are held back until the next
        retrieval succeeds: after ``max_failures`` of them in a row the server is taken for gone,
        retrieval stops (setting :attr:`fatal`) and the held-back instances get no row, so
        ``--resume`` retries them. Other failures (404, not DICOM) are error rows at once.
        """
        held: list[InputFile] = []
        for item in items:
            ref = InstanceRef.parse(item.display)
            if ref is None:
                yield item
                continue
            path, error, transport = self._fetch(ref)
            if error is not None and transport:
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
        yield from held

    def _fetch(self, ref: InstanceRef) -> tuple[str, str | None, bool]:
        """(spool path, error, is_transport_failure)."""
        url = f"{self.url}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"
        self._serial += 1
        path = os.path.join(self._spool_dir(), f"{self._serial:09d}.dcm")
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        try:
            with self.session.get(url, headers=headers, stream=True, timeout=self.config.timeout) as response:
                response.raise_for_status()
                with open(path, "wb") as out:
                    _write_body(response, out)
        except OSError as exc:
            import requests

            _remove(path)
            if isinstance(exc, requests.RequestException):
                message, transport = describe_error(exc, self.config.timeout)
                return path, message, transport
            return path, f"cannot write the spool file: {exc.strerror or exc}", False
        except ValueError as exc:
            _remove(path)
            return path, str(exc), False
        except Exception as exc:
            _remove(path)
            message, transport = describe_error(exc, self.config.timeout)
            return path, message, transport
        return path, None, False

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
        self.session.close()

    # ------------------------------------------------------------------ STOW-RS

    def store(self, datasets: Sequence[Dataset]) -> list[str | None]:
        """STOW-RS the datasets in one request; one error message (or None when stored) per dataset."""
        if not datasets:
            return []
        try:
            response = self.client.store_instances(list(datasets))
        except Exception as exc:
            message, _ = describe_error(exc, self.config.timeout)
            return [f"STOW-RS to {self.url} failed: {message}"] * len(datasets)
        failed: dict[str, str] = {}
        for item in getattr(response, "FailedSOPSequence", None) or []:
            reason = item.get("FailureReason")
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = f"the server refused it (failure reason {reason})"
        stored = {
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in getattr(response, "ReferencedSOPSequence", None) or []
        }
        out: list[str | None] = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if uid in failed:
                out.append(failed[uid])
            elif stored and uid not in stored:
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


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary\s*=\s*("([^"]+)"|[^;\s]+)', content_type, re.IGNORECASE)
    if not match:
        return None
    return (match.group(2) or match.group(1)).encode("latin-1")


def _write_body(response: Any, out: Any) -> None:
    """Stream the first part of a multipart/related answer (or a bare application/dicom body) into ``out``.

    Raises:
        ValueError: the answer is not a DICOM instance (no part, empty, unexpected media type).
    """
    content_type = response.headers.get("Content-Type", "")
    chunks = response.iter_content(chunk_size=_CHUNK)
    if content_type.lower().startswith("application/dicom"):
        size = 0
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        if not size:
            raise ValueError("the server sent an empty body")
        return
    boundary = _boundary(content_type)
    if not content_type.lower().startswith("multipart/related") or boundary is None:
        raise ValueError(f"the server answered with {content_type or 'no media type'}, not a DICOM instance")
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
        raise ValueError("the server's answer holds no DICOM instance (empty multipart body)")
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
        chunk = next(chunks, None)
        if chunk is None:
            raise ValueError("the server's multipart answer ended in the middle of the instance")
        buffer += chunk
    if not size:
        raise ValueError("the server sent an empty DICOM part")


def list_instances(config: DicomwebConfig) -> list[dict[str, str]]:
    """``dicomweb-list``: one dict per instance the options name (SRs included), for printing."""
    with DicomwebSource(config) as source:
        searches: list[tuple[str | None, dict[str, str]]] = [(s, dict(config.query)) for s in config.studies]
        searches += [(None, {**dict(config.query), "SeriesInstanceUID": s}) for s in config.series]
        if not searches:
            searches = [(None, dict(config.query))]
        rows: list[dict[str, str]] = []
        seen: set[str] = set()
        for study, filters in searches:
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

    with DicomwebSource(config) as source:
        path, error, _ = source._fetch(InstanceRef(study, series, sop))
        if error is not None:
            raise DicomwebError(f"WADO-RS retrieve of {sop} from {source.url} failed: {error}")
        try:
            return dcmread(path)
        finally:
            _remove(path)

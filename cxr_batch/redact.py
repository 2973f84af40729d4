"""The one redactor: what cxr-batch records or prints never holds a secret or a patient's value.

Everything that is written to a record (the provenance record's ``argv`` and ``source``), shown in
the HTML report, or printed as an error goes through one of these:

- :func:`redact_url`: a URL without its user information (``user:pass@``), the values of its
  query parameters (``?access_token=``, ``?sig=``, ``X-Amz-Signature=``, ``?key=`` ... all of
  them: the names of secret parameters are not a closed list) and its fragment
  (``#access_token=...``). ``--dicomweb`` refuses a URL with any of these (see
  :func:`cxr_batch.io.dicomweb.check_url`), so a recorded URL has none; this is the second
  line of defence for messages that quote what the user typed.
- :func:`redact_query`: ``--query`` filters with the values of attributes that may identify a
  patient replaced (``PatientName=<redacted>``): the attribute is recorded, the value is not.
  Values are kept only for the attributes in :data:`PUBLIC_QUERY_KEYS` (modality, dates, UIDs,
  body part, ...), so an attribute nobody thought of is redacted, not recorded.
- :func:`redact_argv`: the command line (secret-looking options and ``KEY=VALUE`` arguments,
  URLs, authorization values, JSON web tokens, ``--query`` values as above).
- :func:`redact_text`: a free-text message (every URL in it, authorization values, tokens).
- :func:`redact_record`: a provenance document as read back (the HTML report shows it), with
  the above applied to ``argv``, ``source.url`` and ``source.query`` of each run, whatever
  version of cxr-batch wrote it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"

_SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[-_]?key|auth|credential|cookie|bearer|private[-_]?key|session[-_]?id"
    r"|signature|^sig$|^key$)",
    re.IGNORECASE,
)
#: An option whose name is secret-looking but that names where a secret is, not the secret itself.
_POINTER_NAME = re.compile(r"[-_](file|env|var|path)$", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_AUTH_VALUE = re.compile(r"\b(bearer|basic|digest)\s+[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")

#: ``--query`` attributes whose values are recorded as given: they describe the acquisition or
#: name the objects, never the patient. Every other attribute's value is redacted.
PUBLIC_QUERY_KEYS = frozenset(
    {
        "Modality",
        "ModalitiesInStudy",
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDate",
        "ContentDate",
        "BodyPartExamined",
        "ViewPosition",
        "SOPClassUID",
        "SOPClassesInStudy",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SeriesNumber",
        "InstanceNumber",
        "Manufacturer",
        "limit",
        "offset",
        "fuzzymatching",
        "includefield",
    }
)
#: The same attributes as tags (``--query 00080060=CR``).
_PUBLIC_TAGS = frozenset(
    {
        "00080060",
        "00080061",
        "00080020",
        "00080030",
        "00080021",
        "00080031",
        "00080022",
        "00080023",
        "00180015",
        "00185101",
        "00080016",
        "00080062",
        "0020000D",
        "0020000E",
        "00080018",
        "00200011",
        "00200013",
        "00080070",
    }
)


def secret_name(name: str) -> bool:
    """``name`` (an option, a parameter, a key) looks like it holds a secret."""
    name = name.lstrip("-")
    return bool(_SECRET_NAME.search(name)) and not _POINTER_NAME.search(name)


def public_query_key(key: str) -> bool:
    """A ``--query`` attribute whose value may be recorded (see :data:`PUBLIC_QUERY_KEYS`)."""
    return key in PUBLIC_QUERY_KEYS or key.upper() in _PUBLIC_TAGS


def redact_url(url: str) -> str:
    """``url`` without user information, query values and fragment (each becomes ``<redacted>``)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparseable URL (a bad IPv6 literal): nothing of it is kept
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        kept = []
        for item in re.split(r"[&;]", query):
            name, eq, _ = item.partition("=")
            kept.append(f"{name}={REDACTED}" if eq else REDACTED)
        query = "&".join(kept)
    fragment = REDACTED if parts.fragment else ""
    out = urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
    if url.endswith("?") and not parts.query:
        out += "?"
    return out


def redact_query(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``--query`` filters as recorded: the value of every attribute that may identify a patient redacted."""
    return {key: value if public_query_key(key) else REDACTED for key, value in pairs}


def _redact_query_item(item: str) -> str:
    key, eq, _ = item.partition("=")
    if not eq:
        return item
    return item if public_query_key(key.strip()) else f"{key}={REDACTED}"


def redact_text(text: str) -> str:
    """A message with every URL redacted (:func:`redact_url`), authorization values and JWTs removed."""
    text = _URL.sub(lambda m: redact_url(m.group()), text)
    text = _AUTH_VALUE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _JWT.sub(REDACTED, text)


def _redact_value(arg: str) -> str:
    """One argument with the secrets inside it removed (URLs, ``KEY=VALUE`` with a secret-looking
    key, authorization values, JWTs)."""
    if re.match(r"^\s*(bearer|basic|token|digest)\s+\S", arg, re.IGNORECASE) or _JWT.search(arg):
        return REDACTED
    if "://" in arg:
        return redact_text(arg)
    if not arg.startswith("-") and "=" in arg:
        key = arg.split("=", 1)[0]
        if secret_name(key):
            return f"{key}={REDACTED}"
        if key.strip().startswith(("Patient", "OtherPatient", "IssuerOfPatient")):
            return f"{key}={REDACTED}"
    return arg


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line with every secret-looking or patient value replaced by ``<redacted>``.

    - the value of an option whose name looks secret (``--token X``, ``--password=X``, ``--api-key X``;
      not ``--token-file PATH`` or ``--auth-env NAME``, which say where a secret is);
    - URLs as :func:`redact_url` (credentials, query values, fragment);
    - ``--query KEY=VALUE``: the value unless ``KEY`` is in :data:`PUBLIC_QUERY_KEYS`;
    - other ``KEY=VALUE`` arguments with a secret-looking or patient key, authorization values
      (``Bearer ...``, ``Basic ...``) and anything that looks like a JSON web token.

    It errs on the side of removing too much: the argument after a secret-looking flag is
    redacted even if that flag takes no value.
    """
    out: list[str] = []
    redact_next = False
    query_next = False
    for arg in argv:
        if redact_next:
            out.append(REDACTED)
            redact_next = False
            continue
        if query_next:
            query_next = False
            out.append(_redact_value(_redact_query_item(arg)))
            continue
        if arg.startswith("-") and len(arg) > 1 and not arg.startswith("---"):
            name, eq, value = arg.partition("=")
            if secret_name(name):
                if eq:
                    out.append(f"{name}={REDACTED}")
                else:
                    out.append(arg)
                    redact_next = True
                continue
            if name == "--query":
                if eq:
                    out.append(f"{name}={_redact_value(_redact_query_item(value))}")
                else:
                    out.append(arg)
                    query_next = True
                continue
            out.append(f"{name}={_redact_value(value)}" if eq else arg)
            continue
        out.append(_redact_value(arg))
    return out


def redact_record(doc: Any) -> Any:
    """A provenance document (as read back) with each run's ``argv``, ``source.url`` and
    ``source.query`` redacted; anything else is returned as is."""
    if not isinstance(doc, Mapping):
        return doc
    out = dict(doc)
    runs = out.get("runs")
    if isinstance(runs, list):
        out["runs"] = [_redact_run(run) for run in runs]
    return _redact_run(out)


def _redact_run(run: Any) -> Any:
    if not isinstance(run, Mapping):
        return run
    run = dict(run)
    argv = run.get("argv")
    if isinstance(argv, list):
        run["argv"] = redact_argv([str(a) for a in argv])
    source = run.get("source")
    if isinstance(source, Mapping):
        run["source"] = redact_source(source)
    return run


def redact_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """A provenance ``source`` (where the inputs came from) with its URL and query redacted."""
    out = dict(source)
    if isinstance(out.get("url"), str):
        out["url"] = redact_url(out["url"])
    query = out.get("query")
    if isinstance(query, Mapping):
        out["query"] = redact_query((str(k), str(v)) for k, v in query.items())
    return out

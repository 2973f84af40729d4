"""The HTML report's pages rendered from Jinja2 templates (``templates/*.html.j2``, package data), and
the escaping of every value they show.

Everything read from a report is untrusted. The environment escapes by construction: autoescaping
is on, an undefined name is an error (``StrictUndefined``), and every value a template prints
passes through :func:`text` (the environment's ``finalize``): control, bidirectional-override and
undecodable characters shown as visible ``\\xNN`` escapes (:func:`cxr_batch.text.shown`, the one
table of such characters), then HTML-escaped. Links go through the ``href`` filter
(:func:`href`: percent-encoded, always relative). No template marks a value ``|safe``.

Jinja2 is imported here only: by ``report --html`` and ``classify --html``, never by a plain
``classify``.
"""

from __future__ import annotations

import html
import os
import re
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from cxr_batch.text import shown

TEMPLATES = "templates"
_HTML_SPECIAL = re.compile("[&<>\"']")


def text(value: Any) -> str:
    """Any value as HTML text, safe in element content and in quoted attributes.

    ``& < > " '`` are escaped; control characters (tab and newline included), bidirectional
    overrides, zero-width characters and lone surrogates (names that were not UTF-8) become
    visible ``\\xNN``/``\\uNNNN`` text, so a name can neither inject markup nor disguise itself.
    Returns :class:`~markupsafe.Markup` when it escaped something; a text with nothing to escape
    comes back as a plain ``str`` (autoescaping leaves it as it is). Markup the templates made
    themselves (a macro's output) is returned as it is.
    """
    if isinstance(value, Markup):
        return value
    visible = shown(value, named=False)
    if _HTML_SPECIAL.search(visible) is None:
        return visible
    return Markup(html.escape(visible, quote=True))


def href(relpath: str) -> str:
    """A relative link to ``relpath`` (a file path with ``/`` separators), for an attribute.

    Every byte but letters, digits, ``/`` and ``-._~`` is percent-encoded (from the file system
    bytes, so names that are not UTF-8 still link), so ``?``, ``#`` and ``scheme:`` stay part of
    the path.
    """
    return html.escape(quote(os.fsencode(relpath), safe="/"), quote=True)


@cache
def environment() -> jinja2.Environment:
    """The one Jinja2 environment of the report (templates from the package, loaded once)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cxr_batch.report.html", TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=text,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["href"] = href
    return env


def render(template: str, **context: Any) -> str:
    """``templates/<template>`` rendered with ``context``."""
    return environment().get_template(template).render(**context)


def stylesheet() -> str:
    """The report's ``style.css`` (package data beside the templates)."""
    return resources.files("cxr_batch.report.html").joinpath(TEMPLATES, "style.css").read_text(encoding="utf-8")

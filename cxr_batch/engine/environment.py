"""What this installation has: versions, extras, execution providers, CPU flags and the outside
programs the optional features and the tests use (``cxr-batch --version`` and ``cxr-batch doctor``).

Light: extras are looked up in the installed distributions' metadata, never imported (asking
whether torch is there must not cost the seconds importing it takes).
"""

from __future__ import annotations

import platform
import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cxr_batch import __version__
from cxr_batch.engine.cpu import cpu_facts, int8_choice

DISTRIBUTION = "cxr-batch"

#: What each extra adds, for the "missing" hint.
EXTRA_PURPOSE = {
    "train": "train, export, add-cam",
    "dicom": "DICOM files, --sr, --dicomweb, dicomweb-list",
    "plots": "evaluate --plots",
    "ray": "classify --engine ray",
    "test": "the test suite and the checks (pytest, ruff, mypy, lint-imports)",
}

#: Where Orthanc's DICOMweb plugin is installed by the Debian/Ubuntu packages.
ORTHANC_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*([^;]*?)\s*;\s*extra\s*==\s*['\"]([\w-]+)['\"]"
)


@dataclass(frozen=True)
class Package:
    name: str
    wanted: str  #: the version specifier of the extra, e.g. ``==2.14.1``
    installed: str | None  #: its installed version, None when absent


@dataclass(frozen=True)
class Extra:
    name: str
    purpose: str
    packages: tuple[Package, ...]

    @property
    def installed(self) -> bool:
        return all(p.installed is not None for p in self.packages)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.packages if p.installed is None)


@dataclass(frozen=True)
class Program:
    name: str
    needed_for: str
    path: str | None
    install: str


def version_of(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def extras() -> tuple[Extra, ...] | None:
    """The package's extras and whether their distributions are installed; None when cxr-batch
    itself is not installed (run from a source tree: its metadata is not there)."""
    try:
        requires = metadata.distribution(DISTRIBUTION).requires or []
    except metadata.PackageNotFoundError:
        return None
    found: dict[str, list[Package]] = {}
    for line in requires:
        match = _REQUIREMENT.match(line)
        if match is None:
            continue
        name, _, wanted, extra = match.groups()
        found.setdefault(extra, []).append(Package(name, wanted, version_of(name)))
    return tuple(Extra(e, EXTRA_PURPOSE.get(e, ""), tuple(p)) for e, p in found.items())


def orthanc_plugin() -> Path | None:
    for folder in ORTHANC_PLUGIN_DIRS:
        lib = folder / "libOrthancDicomWeb.so"
        if lib.is_file():
            return lib
    return None


def programs() -> tuple[Program, ...]:
    """The outside programs: none is needed to classify; the tests skip without them."""
    plugin = orthanc_plugin()
    orthanc = shutil.which("Orthanc")
    return (
        Program(
            "Orthanc",
            "the DICOMweb tests and the README's DICOMweb example",
            orthanc,
            "apt-get install -y orthanc orthanc-dicomweb",
        ),
        Program(
            "Orthanc DICOMweb plugin",
            "the DICOMweb tests",
            str(plugin) if plugin else None,
            "apt-get install -y orthanc-dicomweb",
        ),
        Program(
            "Chromium",
            "the HTML report's browser tests (they skip without it)",
            shutil.which("chromium") or shutil.which("chromium-browser"),
            "apt-get install -y chromium",
        ),
        Program(
            "dciodvfy",
            "validating the DICOM SRs in the tests",
            shutil.which("dciodvfy"),
            "apt-get install -y dicom3tools",
        ),
    )


def providers() -> list[str]:
    """onnxruntime's execution providers in this build (imports onnxruntime)."""
    from cxr_batch.engine.session import available_providers

    return available_providers()


def torch_cpu_route(extra: Extra) -> str | None:
    """pip's CPU-only route to the ``train`` extra's torch (no CUDA wheels), with the extra's own pins."""
    pins = [f"{p.name}{p.wanted}" for p in extra.packages if p.name in ("torch", "torchvision")]
    if not pins:
        return None
    return f"pip install {' '.join(pins)} --index-url https://download.pytorch.org/whl/cpu"


def cpu_precision() -> str:
    """The CPU's ``--precision auto`` choice and why, one line."""
    return int8_choice()[1]


def default_model() -> str:
    """``name@version (precision)`` of the model ``classify`` takes on this CPU by default, or why none."""
    from cxr_batch.engine.model import choose_model
    from cxr_batch.engine.session import create_session
    from cxr_batch.errors import CxrBatchError

    try:
        choice = choose_model(None, "auto", cuda=False)
        from cxr_batch.contract import read_contract

        session, _ = create_session(choice.path, "cpu", threads=1)
        meta = read_contract(session, str(choice.path))
    except CxrBatchError as exc:
        return f"none ({exc})"
    return f"{meta.ident} ({meta.precision}, {choice.origin})"


def version_lines() -> list[tuple[str, str]]:
    """``cxr-batch --version``: what to paste into a bug report."""
    found = extras()
    installed = (
        "unknown (cxr-batch is not installed)"
        if found is None
        else (", ".join(e.name for e in found if e.installed) or "none")
    )
    return [
        ("cxr-batch", __version__),
        ("default model", default_model()),
        ("onnxruntime", version_of("onnxruntime") or "not installed"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {platform.machine()})"),
        ("extras installed", installed),
        ("cpu precision", cpu_precision()),
    ]


def cpu_line() -> str:
    facts = cpu_facts()
    return f"{facts.model} ({facts.arch}; flags: {', '.join(facts.flags) or 'none relevant'})"


__all__ = [
    "Extra",
    "Package",
    "Program",
    "cpu_line",
    "cpu_precision",
    "default_model",
    "extras",
    "programs",
    "providers",
    "torch_cpu_route",
    "version_lines",
    "version_of",
]

"""What the commands share: exit codes, error mapping, the model/engine options. Light: no numpy,
no onnxruntime (``cxr-batch --help`` imports this)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cxr_batch.engine.cpu import PRECISION_AUTO_RULE  # the standard library only
from cxr_batch.engine.types import DEVICES, PRECISIONS  # no numpy, no onnxruntime
from cxr_batch.errors import CxrBatchError
from cxr_batch.redact import redact_text
from cxr_batch.text import shown

if TYPE_CHECKING:
    from cxr_batch.engine.classifier import EngineConfig

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FATAL = 1  # bad model, unwritable output, no inputs, missing extra: nothing (more) was done
EXIT_USAGE = 2  # Click's usage errors
EXIT_PARTIAL = 3  # the run finished, but some files could not be classified (see the error rows)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was written is kept (classify: rerun with --resume)


def library_errors(func: F) -> F:
    """Turn the package's exceptions into ``Error: ...`` on stderr and exit code 1.

    The message is printed with control characters escaped (it may hold a file name). An
    ``OSError`` that no layer turned into a message (a bug) still gets an ``Error:`` line
    naming the file, never a traceback.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CxrBatchError as exc:
            raise click.ClickException(shown(redact_text(str(exc)))) from exc
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename is not None else ""
            raise click.ClickException(shown(f"{where}{exc.strerror or exc}")) from exc

    return wrapper  # type: ignore[return-value]


def interruptible(message: str) -> Callable[[F], F]:
    """Ctrl-C and SIGTERM (what Slurm and Kubernetes send at a time limit) end the command the
    same way: ``Interrupted: <message>`` on stderr and exit code 130, after the command's own
    clean-up (``finally`` blocks: the report flushed, threads stopped, temporary files removed).
    """

    def decorate(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            received: list[int] = []

            def on_sigterm(signum: int, frame: object) -> None:
                if not received:
                    received.append(signum)
                    raise KeyboardInterrupt

            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
            try:
                return func(*args, **kwargs)
            except KeyboardInterrupt:
                how = " (SIGTERM)" if received else ""
                click.echo(f"Interrupted{how}: {message}", err=True)
                sys.exit(EXIT_INTERRUPTED)
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)

        return wrapper  # type: ignore[return-value]

    return decorate


#: Credentials for DICOMweb, said once per --help (a section note, not in each option's help).
DICOMWEB_AUTH_HELP = (
    "Credentials: $CXR_BATCH_DICOMWEB_TOKEN (bearer token), or $CXR_BATCH_DICOMWEB_USER and "
    "$CXR_BATCH_DICOMWEB_PASSWORD (basic auth), or --auth-file; never on the command line."
)

#: A section of a command's --help: title, a note printed under it (or None), its options by long name.
Section = tuple[str, "str | None", tuple[str, ...]]

#: ``classify --help``, in sections. An option that is in no section is listed under "Other options",
#: so a new option is never hidden: add it to the section where a user looks for it.
CLASSIFY_SECTIONS: tuple[Section, ...] = (
    (
        "Everyday options",
        None,
        (
            "--out",
            "--model",
            "--precision",
            "--device",
            "--recursive",
            "--include",
            "--exclude",
            "--files-from",
            "--files-from-dirs",
            "--overwrite",
            "--resume",
            "--dry-run",
            "--quiet",
            "--help",
        ),
    ),
    (
        "Output",
        None,
        ("--format", "--absolute-paths", "--html", "--heatmaps", "--provenance", "--drop-ood", "--lungs"),
    ),
    (
        "DICOM and DICOMweb",
        DICOMWEB_AUTH_HELP,
        (
            "--dicomweb",
            "--study",
            "--series",
            "--query",
            "--auth-file",
            "--dicomweb-timeout",
            "--dicomweb-deadline",
            "--dicomweb-workers",
        ),
    ),
    ("DICOM Structured Reports (research use only)", None, ("--sr", "--stow")),
    ("Engine, shards and Ray", None, ("--batch-size", "--threads", "--shard", "--engine", "--ray-address")),
    ("Advanced", None, ("--covid-threshold",)),
)


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options in sections (Click has no option groups).

    ``sections``: see :data:`CLASSIFY_SECTIONS`. Options are matched by their longest name
    (``--files-from``; ``--recursive`` for ``--recursive/--no-recursive``), so a section lists
    options as users type them, not Python parameter names.
    """

    def __init__(self, *args: Any, sections: tuple[Section, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records: dict[str, tuple[str, str]] = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue  # arguments are in the usage line
            record = param.get_help_record(ctx)
            if record is not None:
                records[_long_name(param)] = record
        for title, note, names in self.sections:
            rows = [records.pop(name) for name in names if name in records]
            if not rows:
                continue
            with formatter.section(title):
                if note:
                    formatter.write_text(note)
                formatter.write_dl(rows)
        if records:
            with formatter.section("Other options" if self.sections else "Options"):
                formatter.write_dl(list(records.values()))


def _long_name(param: click.Parameter) -> str:
    """``--files-from`` for ``--files-from``, ``--recursive`` for ``--recursive/--no-recursive``."""
    for names in (param.opts, param.secondary_opts):
        longs = [n for n in names if n.startswith("--")]
        if longs:
            return max(longs, key=len)
    return param.name or ""


def _model_options(func: F) -> F:
    """--model, --precision: shared by the commands that load a model."""
    func = click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default="auto",
        show_default=True,
        help=f"Which embedded model: {PRECISION_AUTO_RULE}. "
        "With --model or $CXR_BATCH_MODEL the precision is the file's own (leave auto).",
    )(func)
    return func


def engine_options(func: F) -> F:
    """The model and engine options that classify and evaluate share."""
    for option in reversed(
        [
            click.option(
                "--model",
                "-m",
                metavar="PATH",
                default=None,
                help="ONNX model with the cxr-batch contract. Default: $CXR_BATCH_MODEL, else the embedded model.",
            ),
            click.option(
                "--device",
                type=click.Choice(DEVICES),
                default="auto",
                show_default=True,
                help="auto uses CUDA only when it really starts, else CPU.",
            ),
            _model_options,
            click.option(
                "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per model call."
            ),
            click.option(
                "--threads",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="onnxruntime threads (0: one per physical core).",
            ),
            click.option(
                "--covid-threshold",
                type=click.FloatRange(0, 1),
                default=None,
                metavar="P",
                help="covid_screen is 'positive' when P(covid) >= P. Default: the model's screening operating "
                "point (chosen on validation for sensitivity >= 0.90). Recorded in the provenance.",
            ),
            click.option(
                "--lungs/--no-lungs",
                default=True,
                show_default=True,
                help="Run the lung-field segmenter first: the lung_fraction and assessable columns (a film "
                "without two plausible lung fields gets no label), and the lung crop for a model trained on it.",
            ),
        ]
    ):
        func = option(func)
    return func


def engine_config(
    model: str | None,
    device: str,
    precision: str,
    batch_size: int,
    threads: int,
    covid_threshold: float | None = None,
    lungs: bool = True,
) -> EngineConfig:
    """The :class:`~cxr_batch.engine.classifier.EngineConfig` for the values of :func:`engine_options`."""
    from cxr_batch.engine.classifier import EngineConfig  # numpy, onnxruntime: only once a command runs

    return EngineConfig(
        model=model,
        device=device,  # type: ignore[arg-type]  # click.Choice checked it
        precision=precision,  # type: ignore[arg-type]
        batch_size=batch_size,
        threads=threads,
        covid_threshold=covid_threshold,
        lungs=lungs,
    )

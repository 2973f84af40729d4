"""The DICOMweb and SR options of ``classify``, and the ``dicomweb-list`` command. Light: no
highdicom or pydicom import until a command runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from cxr_batch.cli.options import DICOMWEB_AUTH_HELP, F, library_errors
from cxr_batch.text import shown

if TYPE_CHECKING:
    from cxr_batch.io.dicomweb import DicomwebConfig


def _source_options(func: F) -> F:
    """--study, --series, --query, --auth-file, --dicomweb-timeout: shared by classify and dicomweb-list."""
    for option in reversed(
        [
            click.option(
                "--study",
                "studies",
                multiple=True,
                metavar="UID",
                help="DICOMweb: the instances of this study (Study Instance UID). Repeatable.",
            ),
            click.option(
                "--series",
                "series",
                multiple=True,
                metavar="UID",
                help="DICOMweb: the instances of this series (Series Instance UID). Repeatable.",
            ),
            click.option(
                "--query",
                "query",
                multiple=True,
                metavar="KEY=VALUE",
                help="DICOMweb: a QIDO-RS filter, e.g. Modality=CR or StudyDate=20240101-20240131. Repeatable; "
                "combined with --study/--series.",
            ),
            click.option(
                "--auth-file",
                type=click.Path(dir_okay=False, path_type=str),
                default=None,
                metavar="FILE",
                help="DICOMweb credentials: 'token=...' or 'user=...' and 'password=...' lines.",
            ),
            click.option(
                "--dicomweb-timeout",
                type=click.FloatRange(min=0.1),
                default=30.0,
                show_default=True,
                metavar="SECONDS",
                help="DICOMweb: seconds to wait to connect and for each read.",
            ),
            click.option(
                "--dicomweb-deadline",
                type=click.FloatRange(min=1.0),
                default=300.0,
                show_default=True,
                metavar="SECONDS",
                help="DICOMweb: seconds for a whole request (a server that drips bytes is cut off).",
            ),
            click.option(
                "--dicomweb-workers",
                type=click.IntRange(1, 32),
                default=8,
                show_default=True,
                metavar="N",
                help="DICOMweb: WADO-RS retrievals in flight at once (a PACS across a network is bound by round trips).",
            ),
        ]
    ):
        func = option(func)
    return func


def dicomweb_options(func: F) -> F:
    """classify's --dicomweb, --sr and --stow (and the source options)."""
    func = _source_options(func)
    for option in reversed(
        [
            click.option(
                "--dicomweb",
                "dicomweb_url",
                metavar="URL",
                default=None,
                help="Classify the instances a DICOMweb service finds (QIDO-RS) instead of files, retrieved by "
                "WADO-RS; report paths are dicomweb:STUDY/SERIES/SOP. Needs --study, --series or --query.",
            ),
            click.option(
                "--sr",
                type=click.Path(file_okay=False, path_type=str),
                default=None,
                metavar="DIR",
                help="Also write a DICOM Structured Report (Comprehensive SR, in the image's study) per classified "
                "DICOM image: DIR/<report path>.sr.dcm. Research use only, not for diagnosis.",
            ),
            click.option("--stow", is_flag=True, help="With --dicomweb and --sr: store the SRs back by STOW-RS."),
        ]
    ):
        func = option(func)
    return func


def _config(
    url: str,
    studies: tuple[str, ...],
    series: tuple[str, ...],
    query: tuple[str, ...],
    auth_file: str | None,
    timeout: float,
    deadline: float = 300.0,
    workers: int = 8,
) -> DicomwebConfig:
    from cxr_batch.io.dicomweb import DicomwebConfig, parse_query, valid_uid

    try:
        pairs = parse_query(query)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--query") from None
    for flag, uids in (("--study", studies), ("--series", series)):
        for uid in uids:
            if not valid_uid(uid):
                raise click.BadParameter(
                    f"{shown(uid)[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)", param_hint=flag
                )
    return DicomwebConfig(
        url=url,
        studies=studies,
        series=series,
        query=pairs,
        auth_file=auth_file,
        timeout=timeout,
        deadline=deadline,
        workers=workers,
    )


def dicomweb_settings(
    inputs: tuple[str, ...], files_from: Any, engine_kind: str, options: dict[str, Any]
) -> tuple[DicomwebConfig | None, str | None, bool]:
    """(DICOMweb config or None, SR folder or None, stow) from classify's options; usage errors here."""
    url = options["dicomweb_url"]
    studies, series, query = options["studies"], options["series"], options["query"]
    sr, stow = options["sr"], options["stow"]
    if url is None:
        if studies or series or query or options["auth_file"]:
            raise click.UsageError("--study, --series, --query and --auth-file need --dicomweb URL")
        if stow:
            raise click.UsageError("--stow needs --dicomweb URL (and --sr DIR)")
    else:
        if inputs or files_from is not None:
            raise click.UsageError("--dicomweb replaces INPUTS and --files-from: give one or the other")
        if not (studies or series or query):
            raise click.UsageError(
                "--dicomweb needs --study UID, --series UID or --query KEY=VALUE (classifying a whole archive "
                "is never a default)"
            )
        if engine_kind != "local":
            raise click.UsageError("--dicomweb needs --engine local")
    if stow and sr is None:
        raise click.UsageError("--stow needs --sr DIR (the SRs are kept there too)")
    if sr is not None and engine_kind != "local":
        raise click.UsageError("--sr needs --engine local")
    config = None
    if url is not None:
        config = _config(
            url,
            studies,
            series,
            query,
            options["auth_file"],
            options["dicomweb_timeout"],
            options["dicomweb_deadline"],
            options["dicomweb_workers"],
        )
    return config, sr, stow


@click.command("dicomweb-list", epilog=DICOMWEB_AUTH_HELP)
@click.argument("url")
@_source_options
@click.option("--modality", default=None, metavar="M", help="Only instances of this modality (e.g. SR).")
@click.option(
    "--content",
    is_flag=True,
    help="Also retrieve each SR that cxr-batch wrote and print its finding, probabilities, OOD verdict and model.",
)
@library_errors
def dicomweb_list_command(
    url: str,
    studies: tuple[str, ...],
    series: tuple[str, ...],
    query: tuple[str, ...],
    auth_file: str | None,
    dicomweb_timeout: float,
    dicomweb_deadline: float,
    dicomweb_workers: int,
    modality: str | None,
    content: bool,
) -> None:
    """List the instances on a DICOMweb service (QIDO-RS), one tab-separated line each:
    study, series and SOP instance UID, modality, series description.

    Example: cxr-batch dicomweb-list http://localhost:8042/dicom-web --study 1.2.3 --modality SR --content
    """
    from cxr_batch.io.dicomweb import list_instances, retrieve_dataset

    if modality:
        query = (*query, f"Modality={modality}")
    if not (studies or series or query):
        raise click.UsageError("give --study UID, --series UID, --modality M or --query KEY=VALUE")
    config = _config(url, studies, series, query, auth_file, dicomweb_timeout, dicomweb_deadline, dicomweb_workers)
    rows = list_instances(config)
    # Every field is the server's: escaped (tabs too), so it can't drive the terminal or split a line.
    for row in rows:
        click.echo("\t".join(shown(row[k]) for k in ("study", "series", "sop", "modality", "series_description")))
        if content and row["modality"] == "SR":
            from cxr_batch.report.sr import describe_sr

            summary = describe_sr(retrieve_dataset(config, row["study"], row["series"], row["sop"]))
            for key, value in summary.items():
                click.echo(f"\t{shown(key)}: {shown(value)}")
    click.echo(f"{len(rows)} instance(s)", err=True)

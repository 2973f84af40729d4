"""``classify --dry-run``: what a run would classify, printed; the work is in :mod:`cxr_batch.io.plan`."""

from __future__ import annotations

from typing import Any

import click

from cxr_batch.io.shard import Shard  # hashlib and re only
from cxr_batch.text import shown


def dry_run_report(
    spec: Any, shard: Shard | None, web: Any, out: str, overwrite: bool, resume: bool, quiet: bool
) -> None:
    """``classify --dry-run``: the files to stdout, the counts to stderr; no model, no output written."""
    from cxr_batch.errors import InputError, OutputError
    from cxr_batch.io.inputs import describe_skipped, no_input_files
    from cxr_batch.io.plan import plan_inputs
    from cxr_batch.report.writer import ReportConfig, check_output, report_format

    plan = plan_inputs(spec, shard, web)
    for warning in plan.warnings:
        click.echo(f"warning: {shown(warning)}", err=True)
    if not plan.files and plan.before_shard is None:
        if web is not None:
            raise InputError(f"no image instances found on {web.url} for the given --study/--series/--query")
        raise InputError(no_input_files(spec, plan.skipped))
    for item in plan.files:
        click.echo(shown(item.display))
    if quiet:
        return
    types = ", ".join(f"{n} {kind}" for kind, n in sorted(plan.by_type.items(), key=lambda kn: (-kn[1], kn[0])))
    lines = [f"dry run: {len(plan.files)} file(s) would be classified: {types or 'none'}"]
    if plan.before_shard is not None:
        lines.append(f"shard {shard}: {len(plan.files)} of {plan.before_shard} files")
    if plan.unreadable:
        lines.append(f"{len(plan.unreadable)} would be error rows without being decoded:")
        lines += [f"  {shown(path)}: {shown(why)}" for path, why in plan.unreadable[:20]]
        if len(plan.unreadable) > 20:
            lines.append(f"  ... and {len(plan.unreadable) - 20} more")
    left_out = describe_skipped(plan.skipped, spec)
    lines.append(f"left out: {left_out}" if left_out else "left out: nothing")
    try:
        check_output(ReportConfig(out=out, format=report_format(out, None), overwrite=overwrite, resume=resume))
    except OutputError as exc:
        lines.append(f"the run would stop: {shown(exc)}")
    if resume:
        lines.append("with --resume, the files already in the report are skipped when the run starts")
    lines.append("no model loaded, nothing written")
    for line in lines:
        click.echo(line, err=True)

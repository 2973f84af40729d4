"""``cxr-batch --version`` and ``cxr-batch doctor``: what this installation has and what to install
for what is missing. The facts come from :mod:`cxr_batch.engine.environment`."""

from __future__ import annotations

import json

import click

from cxr_batch.text import shown


def print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--version``: cxr-batch, the default model, onnxruntime, Python, extras, the CPU's precision."""
    if not value or ctx.resilient_parsing:
        return
    from cxr_batch.engine.environment import version_lines

    for key, text in version_lines():
        click.echo(f"{key}: {shown(text)}")
    ctx.exit(0)


version_option = click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=print_version,
    help="Show the versions (cxr-batch, default model, onnxruntime, Python), installed extras and the CPU's "
    "precision, and exit.",
)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of lines.")
def doctor_command(as_json: bool) -> None:
    """Check this installation: extras, execution providers, CPU flags and the outside programs the
    optional features and the tests use, with what to install for each one missing.

    Informational: exits 0 whatever is missing (nothing here is needed to classify).

    Example: cxr-batch doctor
    """
    from cxr_batch.engine import environment as env

    found = env.extras()
    programs = env.programs()
    providers = env.providers()
    if as_json:
        doc = {
            "versions": dict(env.version_lines()),
            "cpu": env.cpu_line(),
            "providers": providers,
            "extras": None
            if found is None
            else {
                e.name: {
                    "installed": e.installed,
                    "for": e.purpose,
                    "packages": {p.name: p.installed for p in e.packages},
                    "install": None if e.installed else f'pip install "cxr-batch[{e.name}]"',
                }
                for e in found
            },
            "programs": {
                p.name: {"path": p.path, "for": p.needed_for, "install": None if p.path else p.install}
                for p in programs
            },
        }
        click.echo(json.dumps(doc, indent=2))
        return
    for key, text in env.version_lines():
        click.echo(f"{key}: {shown(text)}")
    click.echo(f"cpu: {shown(env.cpu_line())}")
    from cxr_batch.engine.session import cuda_possible

    cuda = cuda_possible("auto", providers)
    click.echo(
        f"providers: {', '.join(providers)}"
        + ("" if cuda else " (for --device cuda: pip install onnxruntime-gpu, with an NVIDIA driver)")
    )
    click.echo("extras:")
    if found is None:
        click.echo("  unknown: cxr-batch is not installed (run from a source tree); pip install . to check")
    for extra in found or ():
        packages = ", ".join(f"{p.name} {p.installed or 'missing'}" for p in extra.packages)
        if extra.installed:
            click.echo(f"  ok       {extra.name:<6} for {extra.purpose}: {packages}")
            continue
        click.echo(f"  missing  {extra.name:<6} for {extra.purpose}: {packages}")
        click.echo(f'           install: pip install "cxr-batch[{extra.name}]"')
        route = env.torch_cpu_route(extra)
        if route is not None:
            click.echo(f"           CPU-only torch (no CUDA wheels): {route}, then the line above")
    click.echo("programs (optional: examples and tests; classify needs none):")
    for program in programs:
        if program.path:
            click.echo(f"  ok       {program.name}: {shown(program.path)}")
        else:
            click.echo(f"  missing  {program.name} for {program.needed_for}")
            click.echo(f"           install: {program.install}")

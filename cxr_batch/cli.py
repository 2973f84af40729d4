"""The ``cxr-batch`` command line. Thin: parse options, call the library, map errors to exit codes.

Keep this module light: ``cxr-batch --help`` imports it, so no torch and no onnxruntime here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from cxr_batch import __version__
from cxr_batch.errors import CxrBatchError

#: Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FATAL = 1  # bad model, unwritable output, no inputs, missing extra: nothing (more) was done
EXIT_USAGE = 2  # Click's usage errors
EXIT_PARTIAL = 3  # the run finished, but some files could not be classified (see the error rows)

F = TypeVar("F", bound=Callable[..., Any])


def library_errors(func: F) -> F:
    """Turn the package's exceptions into ``Error: ...`` on stderr and exit code 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CxrBatchError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-batch")
def main() -> None:
    """Screen chest X-rays (normal / viral pneumonia / COVID-19) in batch with ONNX Runtime.

    A research tool, not a medical device: never use its output for diagnosis.
    """


from cxr_batch.cli_train import export_command, train_command  # noqa: E402

main.add_command(train_command)
main.add_command(export_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

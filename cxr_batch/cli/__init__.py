"""The command line: the only package that imports click."""

from cxr_batch.cli.main import main

__all__ = ["main"]

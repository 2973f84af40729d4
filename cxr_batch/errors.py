"""The package's exceptions. No click import here: the CLI maps these to messages and exit codes."""

from __future__ import annotations


class CxrBatchError(Exception):
    """Base class for every error cxr-batch raises on purpose."""


class ModelError(CxrBatchError):
    """The model file is missing, unreadable, or breaks the model contract."""


class NoDefaultModelError(ModelError):
    """No --model, no CXR_BATCH_MODEL and no embedded default model."""


class DeviceError(CxrBatchError):
    """The requested execution provider is not available."""


class InputError(CxrBatchError):
    """The inputs cannot be used at all (none found, unreadable list file, ...)."""


class OutputError(CxrBatchError):
    """The output cannot be written (exists without --overwrite/--resume, unwritable, ...)."""


class MissingExtraError(CxrBatchError):
    """An optional dependency is needed for this feature and is not installed."""

    def __init__(self, feature: str, extra: str, package: str | None = None) -> None:
        what = f" ({package})" if package else ""
        super().__init__(f'{feature} needs the optional dependencies{what}: pip install "cxr-batch[{extra}]"')
        self.extra = extra


class DataError(CxrBatchError):
    """A training or evaluation data folder cannot be used."""


class MergeError(CxrBatchError):
    """The parts of a sharded run can't be merged (conflicting, damaged or missing parts)."""


class ImageError(CxrBatchError):
    """One image cannot be decoded. Becomes an error row, never stops a run."""

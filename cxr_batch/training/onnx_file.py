"""The model contract inside an ONNX file, read and written with the ``onnx`` package (train extra).

The runtime reads the contract through onnxruntime (:func:`cxr_batch.contract.read_contract`);
training, export, the OOD fitter and the card edit files, which needs ``onnx``. One place for both
directions, so the modules that edit a file don't import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_batch.contract import CONTRACT_KEY, ModelMeta
from cxr_batch.errors import MissingExtraError, ModelError
from cxr_batch.io.safe_write import write_file_atomic


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError("export", "train", "onnx") from exc
    return onnx


def write_contract(proto: Any, meta: ModelMeta) -> None:
    """Set (or replace) the contract in an ONNX ModelProto's metadata_props."""
    for prop in list(proto.metadata_props):
        if prop.key == CONTRACT_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key = CONTRACT_KEY
    entry.value = meta.to_json()


def read_contract_file(path: Path) -> tuple[Any, ModelMeta]:
    """(the ONNX ModelProto, its contract) of the file at ``path``.

    Raises:
        ModelError: the file has no cxr-batch contract.
        MissingExtraError: ``onnx`` is not installed.
    """
    onnx = _onnx()
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    if CONTRACT_KEY not in props:
        raise ModelError(f"{path}: no '{CONTRACT_KEY}' metadata; not a cxr-batch model")
    return proto, ModelMeta.from_json(props[CONTRACT_KEY], str(path))


def rewrite_contract(path: Path, update: Callable[[ModelMeta], ModelMeta]) -> ModelMeta:
    """Replace the contract of the ONNX file at ``path`` with ``update(contract)``, atomically,
    leaving the graph and its weights bit-identical (checked before the file is replaced).

    Raises:
        ModelError: no contract, or the graph would change.
        MissingExtraError: ``onnx`` is not installed.
    """
    from cxr_batch.io.safe_write import write_file_atomic

    proto, meta = read_contract_file(path)
    graph = proto.graph.SerializeToString()
    new = update(meta)
    write_contract(proto, new)
    if proto.graph.SerializeToString() != graph:  # pragma: no cover - write_contract touches metadata only
        raise ModelError(f"{path}: rewriting the contract would change the graph")
    write_file_atomic(path, proto.SerializeToString())
    return new


def save_model(proto: Any, path: str | Path) -> None:
    """Write an ONNX ModelProto through the one output writer: atomically, never through a link."""
    write_file_atomic(path, proto.SerializeToString())


@dataclass(eq=False)
class OnnxModel:
    """A model file being made or derived, held in memory: its graph (``proto``) and its contract
    (``meta``), edited in place by each step of ``export`` and saved once (:meth:`save`).
    onnxruntime loads it from memory (:func:`ort_source`), so no step reads it back from disk."""

    #: where it is saved
    path: Path
    proto: Any
    meta: ModelMeta

    @classmethod
    def read(cls, path: Path) -> OnnxModel:
        """The file at ``path`` (its contract read once, here)."""
        proto, meta = read_contract_file(path)
        return cls(Path(path), proto, meta)

    def serialized(self) -> bytes:
        """The model's bytes, contract included (what onnxruntime loads, what :meth:`save` writes)."""
        write_contract(self.proto, self.meta)
        data: bytes = self.proto.SerializeToString()
        return data

    def save(self) -> Path:
        """Write the model and its contract to :attr:`path`, atomically."""
        write_file_atomic(self.path, self.serialized())
        return self.path


def ort_source(model: str | Path | bytes | OnnxModel) -> str | bytes:
    """What ``onnxruntime.InferenceSession`` takes for ``model``: a file's path, or a model in memory."""
    if isinstance(model, OnnxModel):
        return model.serialized()
    return model if isinstance(model, bytes) else str(model)


__all__ = ["OnnxModel", "ort_source", "read_contract_file", "rewrite_contract", "save_model", "write_contract"]

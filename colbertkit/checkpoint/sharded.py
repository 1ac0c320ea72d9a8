"""Sharded (FSDP) training checkpoints: ``torch.distributed.checkpoint`` directories.

accelerate saves an FSDP model as a DCP directory (``pytorch_model_fsdp_0/``: a pickled
``.metadata`` plus one ``.distcp`` file per rank). :class:`DcpCheckpoint` consolidates it tensor
by tensor in one process. torch reads ``.metadata`` with a plain ``pickle.load``; here a
restricted unpickler allows only DCP's own plain classes, never a callable that could run code.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from colbertkit.checkpoint.tensors import TensorEntry
from colbertkit.errors import CheckpointError, first_line

_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only its own plain classes, never a callable
    that could run code (``os.system``, ``eval``, ...)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def load_dcp_metadata(file: Path) -> Any:
    """DCP's checkpoint metadata, read without executing pickled code."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(file, "rb") as handle:
            metadata = _DcpMetadataUnpickler(handle).load()
    except Exception as error:
        raise CheckpointError(
            f"{file}: refused to unpickle the sharded checkpoint's metadata "
            f"({first_line(error)[:200]})"
        ) from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: not torch.distributed.checkpoint metadata")
    for info in (metadata.storage_data or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if Path(relative).name != relative or relative in ("", ".", ".."):
            raise CheckpointError(
                f"{file}: shard path {relative!r} leaves the checkpoint directory"
            )
    return metadata


class DcpCheckpoint:
    """A sharded (FSDP) ``torch.distributed.checkpoint`` directory, consolidated tensor by
    tensor in this one process: each tensor is assembled from its shards on every rank."""

    def __init__(self, directory: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = directory
        self.metadata = load_dcp_metadata(directory / ".metadata")
        self.tensors = {
            key: value
            for key, value in self.metadata.state_dict_metadata.items()
            if isinstance(value, TensorStorageMetadata)
        }
        missing = [file.name for file in self.data_files() if not file.is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: shard file(s) {', '.join(missing)} missing; the sharded checkpoint "
                "is incomplete (copy every rank's file)"
            )

    def data_files(self) -> list[Path]:
        names = {info.relative_path for info in self.metadata.storage_data.values()}
        return [self.directory / name for name in sorted(names)]

    def files(self) -> list[Path]:
        return [self.directory / ".metadata", *self.data_files()]

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                key, tuple(meta.size), meta.properties.dtype, lambda k=key: self.read({k})[k]
            )
            for key, meta in self.tensors.items()
        ]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        state = {
            key: torch.empty(
                tuple(self.tensors[key].size), dtype=self.tensors[key].properties.dtype
            )
            for key in keys
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            try:
                dcp.load(state, storage_reader=_safe_dcp_reader(self), no_dist=True)
            except CheckpointError:
                raise
            # DCP wraps each rank's failure in a CheckpointException, a BaseException.
            except (Exception, CheckpointException) as error:
                raise CheckpointError(
                    f"{self.directory}: cannot read the sharded checkpoint "
                    f"({first_line(error)[:200]}); is a shard file damaged?"
                ) from error
        return state


def _safe_dcp_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDcpReader(FileSystemReader):
        """torch's reader, but with our restricted metadata unpickler (tensor data is already
        read with ``torch.load(weights_only=True)``)."""

        def __init__(self, checkpoint: DcpCheckpoint) -> None:
            super().__init__(str(checkpoint.directory))
            self._checked_metadata = checkpoint.metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = self._checked_metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeDcpReader


def _safe_dcp_reader(checkpoint: DcpCheckpoint) -> Any:
    return _safe_dcp_reader_class()(checkpoint)

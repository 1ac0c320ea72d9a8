"""Tensor files, read and written one tensor at a time, never unpickling code.

* readers: :class:`SafetensorsFile` (plain reads), :class:`MappedSafetensors` (views of a memory
  map), :class:`TorchFile` (``torch.load(weights_only=True)``, memory-mapped where it can);
  :func:`read_weights` lists a weights file (or a sharded ``*.index.json``) as
  :class:`TensorEntry` items whose data is read only when asked;
* writers: :func:`write_safetensors` streams entries into one file, converting dtypes;
  :func:`write_reference_head` writes the reference's plain-tensor ``colbert_linear.pt``;
* the ColBERT head: :func:`load_head_state` and :func:`check_head`.

Streaming is what keeps ``export``'s peak memory near one tensor plus one model.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from colbertkit.errors import CheckpointError, ColbertkitError, first_line

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit the safetensors library applies
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a source, known by name, shape and dtype before its data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]  # the tensor on CPU (a fresh buffer or a memory map)
    release: Callable[[], None] | None = None  # drop what reading keeps open (a memory map)
    # The tensor as a view of a memory map, to keep (a model's parameter) without a copy.
    read_mapped: Callable[[], torch.Tensor] | None = None


def read_weights(file: Path) -> tuple[list[TensorEntry], list[Path]]:
    """Entries of a weights file or of a sharded ``*.index.json``, and the files behind them."""
    if file.name.endswith(".index.json"):
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{file}: unreadable index ({error})") from error
        entries, files = [], []
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(f"{file}: shard {shard!r} is not a file next to the index")
            shard_entries, shard_files = read_weights(file.parent / shard)
            entries += shard_entries
            files += shard_files
        return entries, files
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    if file.suffix == ".safetensors":
        return SafetensorsFile(file).entries(), [file]
    return TorchFile(file).entries(), [file]


class SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads (no memory map: pages read
    for one tensor do not stay in this process's resident memory).

    The header is checked the way the safetensors library checks it (size, dtypes, offsets that
    tile the data exactly), so a truncated or corrupt file is a one-line :class:`CheckpointError`
    before anything is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = file_size(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise self._error(f"only {size} bytes; truncated or not a safetensors file")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > _MAX_SAFETENSORS_HEADER or 8 + header_size > size:
                raise self._error(
                    f"header of {header_size} bytes does not fit in the file's {size} bytes; "
                    "truncated or not a safetensors file"
                )
            raw = handle.read(header_size)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise self._error(f"header is not valid JSON ({error})") from error
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_size
        data_size = size - self.data_start
        spans = []
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as error:
                raise self._error(
                    f"tensor {name!r}: bad or unsupported header entry ({error})"
                ) from None
            if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                raise self._error(f"tensor {name!r}: offsets do not match its shape and dtype")
            spans.append((begin, end, name, shape, dtype))
        spans.sort()
        position = 0
        for begin, end, name, _, _ in spans:
            if begin != position:
                raise self._error(f"tensor {name!r}: data offsets overlap or leave a gap")
            position = end
        if position > data_size:
            raise self._error(
                f"truncated: the header describes {position} bytes of tensor data, the file holds "
                f"{data_size}; copy or download it again"
            )
        if position < data_size:
            raise self._error(f"{data_size - position} unexpected bytes after the tensor data")
        self._spans = spans
        self._mapped: Any = None

    def _error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {problem}")

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                name,
                shape,
                dtype,
                lambda b=begin, e=end, s=shape, d=dtype: self._read(b, e, s, d),
                release=self.release,
                read_mapped=lambda n=name: self._map(n),
            )
            for begin, end, name, shape, dtype in self._spans
        ]

    def _map(self, name: str) -> torch.Tensor:
        if self._mapped is None:
            self._mapped = MappedSafetensors(self.path)
        return self._mapped.read(name)

    def release(self) -> None:
        self._mapped = None  # tensors kept from the map keep it alive; nothing else does

    def _read(
        self, begin: int, end: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            got = handle.readinto(memoryview(buffer.numpy())) if end > begin else 0
        if got != end - begin:
            raise self._error("the file changed or was cut short while being read")
        return buffer.view(dtype).reshape(shape)


class MappedSafetensors:
    """Tensors of a safetensors file as views of the safetensors library's memory map.

    A view costs no copy; a tensor kept (a model's parameter) keeps its pages. Pages read through
    the map count as this process's resident memory while the map lives, so it is reopened
    after every :data:`REOPEN_BYTES` handed out: tensors that were converted (copied) and dropped
    stop holding memory when their old map closes.
    """

    REOPEN_BYTES = 64 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._since_open = 0

    def names(self) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except Exception as error:
            raise CheckpointError(
                f"{self.path}: not a valid safetensors file ({first_line(error)})"
            ) from error

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._handle is None or self._since_open >= self.REOPEN_BYTES:
            self._handle = None  # close before mapping again
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self._since_open = 0
        tensor = self._handle.get_tensor(name)
        self._since_open += tensor.nbytes
        return tensor

    def release(self) -> None:
        self._handle = None


class TorchFile:
    """A ``torch.save`` state dict, loaded with ``weights_only=True`` (never runs pickled code).

    Memory-mapped where the format allows (zip files), so a tensor's bytes are read when it is
    used. Pages read through a map stay in this process's resident memory while the map lives,
    so the map is reopened after every :data:`REOPEN_BYTES` of tensors handed out and dropped by
    :meth:`release`: streaming a file through never holds more than that window.
    """

    REOPEN_BYTES = 64 * 1024 * 1024

    def __init__(self, file: Path) -> None:
        self.file = file
        self._state, self.mapped = torch_load(file)
        if not isinstance(self._state, dict):
            raise CheckpointError(
                f"{file}: expected a state dict of tensors, found {type(self._state).__name__}"
            )
        self._since_open = 0

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(
                str(name),
                tuple(value.shape),
                value.dtype,
                lambda n=name: self.read(n),
                release=self.release,
                read_mapped=lambda n=name: self.read(n),
            )
            for name, value in self._state.items()
            if isinstance(value, torch.Tensor)  # skip e.g. a version number next to the weights
        ]

    def read(self, name: str) -> torch.Tensor:
        if self._state is None or (self.mapped and self._since_open >= self.REOPEN_BYTES):
            self._state = None  # unmap before mapping again
            self._state, _ = torch_load(self.file)
            self._since_open = 0
        tensor = self._state[name]
        self._since_open += tensor.nbytes
        return tensor

    def release(self) -> None:
        if self.mapped:  # an unmapped (legacy) file would have to be read again in full
            self._state = None


def torch_load(file: Path) -> tuple[Any, bool]:
    """(the object in ``file``, whether it is memory-mapped), never executing pickled code."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as error:
            if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
                raise
            return torch.load(file, map_location="cpu", weights_only=True), False  # legacy
    except pickle.UnpicklingError as error:  # what weights_only raises for anything but tensors
        raise CheckpointError(
            f"{file}: refused to unpickle (only plain tensors are loaded, weights_only=True): "
            f"{first_line(error)[:200]}; re-save it as safetensors or a plain state dict"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{file}: cannot read it ({first_line(error)[:160]}); truncated or not a torch.save "
            "file? copy or download it again"
        ) from error


# torch.distributed.checkpoint ---------------------------------------------------------------


def write_safetensors(
    entries: Sequence[TensorEntry],
    file: Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream ``entries`` into one safetensors file, converting floating tensors to ``dtype``.

    The header is computed from names, shapes and dtypes first; then each tensor is read,
    converted, written and dropped, so memory holds one tensor (and its converted copy) at a
    time. ``progress(n)`` is told each tensor's output bytes. Returns the file's size.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise TensorWriteError("writing safetensors needs a little-endian machine")
    planned = []
    for entry in entries:
        target = dtype if (dtype is not None and entry.dtype.is_floating_point) else entry.dtype
        if target not in _SAFETENSORS_CODES:
            raise TensorWriteError(f"tensor {entry.name}: dtype {target} has no safetensors code")
        planned.append((entry, target))
    # Widest dtypes first, like the safetensors library: every tensor stays aligned.
    planned.sort(key=lambda item: -item[1].itemsize)
    names = [entry.name for entry, _ in planned]
    if len(set(names)) != len(names):
        raise TensorWriteError(f"{file.name}: duplicate tensor names")

    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for entry, target in planned:
        size = math.prod(entry.shape) * target.itemsize
        header[entry.name] = {
            "dtype": _SAFETENSORS_CODES[target],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry, target in planned:
            tensor = entry.read()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise CheckpointError(
                    f"tensor {entry.name}: expected {entry.dtype} {list(entry.shape)}, "
                    f"read {tensor.dtype} {list(tensor.shape)}"
                )
            converted = tensor.to(target).contiguous()
            if target == torch.float16 and tensor.dtype != torch.float16:
                check_fits_fp16(entry.name, tensor, converted)
            if converted.numel():
                handle.write(memoryview(converted.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress(converted.numel() * target.itemsize)
            del tensor, converted
    return file_size(file)


def check_fits_fp16(name: str, tensor: torch.Tensor, converted: torch.Tensor) -> None:
    if not bool(torch.isfinite(converted).all()) and bool(torch.isfinite(tensor).all()):
        largest = float(tensor.abs().max())
        raise TensorWriteError(
            f"tensor {name} holds values beyond fp16's range (largest |x| {largest:.3g} > 65504); "
            "export with --dtype bf16 or fp32"
        )


def check_head(state: dict[str, Any], where: Path) -> dict[str, torch.Tensor]:
    weight = state.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CheckpointError(f"{where}: no 2-D head weight; not a Linear head")
    bias = state.get("bias")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise CheckpointError(f"{where}: head bias does not match its weight {tuple(weight.shape)}")
    return {key: value for key, value in (("weight", weight), ("bias", bias)) if value is not None}


def load_head_state(file: Path) -> dict[str, Any]:
    """The head's ``{"weight", "bias"}`` tensors, never executing pickled code."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as error:
            raise CheckpointError(f"{file}: not a valid safetensors file ({error})") from error
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{file}: refused to unpickle (only plain tensors are loaded, weights_only=True): "
                f"{first_line(error)[:200]}; re-save the head as a plain state dict or safetensors"
            ) from error
        except Exception as error:  # truncated, not a torch file, ...
            raise CheckpointError(
                f"{file}: cannot read it ({first_line(error)[:200]}); is it complete?"
            ) from error
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: expected a state dict with weight and bias")
    # Some writers keep the module name as a prefix.
    state = {key.rsplit(".", 1)[-1]: value for key, value in state.items()}
    if "weight" not in state or getattr(state["weight"], "ndim", 0) != 2:
        raise CheckpointError(f"{file}: no 2-D 'weight' tensor; not a Linear head state dict")
    return state


def write_reference_head(head_state: dict[str, Any], file: Path) -> None:
    """Write a head as the reference's ``colbert_linear.pt`` (plain tensors, no code objects)."""
    torch.save({k: v.detach().cpu() for k, v in head_state.items()}, file)


class TensorWriteError(ColbertkitError):
    """A tensor cannot be written as asked (e.g. its values do not fit the chosen dtype)."""


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0

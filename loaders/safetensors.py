"""safetensors checkpoints, single-file or sharded, read without trusting the header.

The header is parsed and checked here before any tensor is touched: length within
the file, JSON, known dtypes, shape x dtype equal to the byte span, spans inside
the data area and not overlapping. A lying header therefore fails with one line
naming the file and the tensor, and never makes us allocate more than the file
holds. Each tensor is then copied out of a read-only memory map of its file
(bfloat16, which NumPy lacks, read as `ml_dtypes.bfloat16` and widened to float32).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from loaders.config import read_json
from loaders.errors import ModelError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
MAX_NDIM = 32  # NumPy 1.x's limit (2.x allows 64)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_READ_CHUNK = 16 * 1024 * 1024  # bytes of a tensor copied out of the map before its pages are dropped
LAYOUT_BAND = 128  # rows per copy when a tensor is read into another memory order


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; raises ModelError naming file and tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise ModelError(f"{path}: header length {n} is larger than the file ({size} bytes); "
                                 "the file is truncated or not safetensors")
            raw = f.read(n)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) < n:  # the file shrank since stat()
        raise ModelError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, a 5000-digit number
        raise ModelError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict)
                                          and all(isinstance(v, str) for v in entry.values())):
                raise ModelError(f"{path}: safetensors __metadata__ is not an object of strings")
            continue
        tensors[name] = _check_entry(path, name, entry, data_start, size)
    _check_overlaps(path, tensors)
    return tensors


def _check_entry(path: Path, key: str, entry: object, data_start: int, size: int) -> TensorInfo:
    name = _Name(key)
    if not isinstance(entry, dict):
        raise ModelError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelError(f"{path}: tensor {name!r}: unknown dtype {_short(dtype)} "
                         f"(supported: {', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
        raise ModelError(f"{path}: tensor {name!r}: bad shape {_short(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise ModelError(f"{path}: tensor {name!r}: bad data_offsets {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end or data_start + end > size:
        raise ModelError(f"{path}: tensor {name!r}: data_offsets {_short(offsets)} out of range "
                         f"(data area is {size - data_start} bytes)")
    # Python integers: a NumPy product would wrap around, and [2**32, 2**32] would claim 0 bytes
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise ModelError(f"{path}: tensor {name!r}: shape {_short(shape)} x {dtype} is {_short(expected)} "
                         f"bytes but its span is {end - begin} bytes")
    return TensorInfo(path, key, dtype, tuple(shape), data_start + begin, data_start + end)


def _short(value: object, limit: int = 80) -> str:
    """repr() cut to one short line: a hostile header may hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _Name(str):
    """A tensor name whose !r is short (and ASCII-safe) whatever the header put in it."""

    def __repr__(self) -> str:
        return _short(str(self), 200)


def _check_overlaps(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ModelError(f"{path}: tensors {_short(name_a, 200)} and {_short(name_b, 200)} "
                             "overlap in the file")


class Checkpoint:
    """All tensors of a model folder, by checkpoint name, read on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tensors: dict[str, TensorInfo] = {}
        self.files = checkpoint_files(folder)
        for file in self.files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise ModelError(f"{file}: tensor {_short(name, 200)} is also in "
                                     f"{self.tensors[name].file.name}")
                self.tensors[name] = info
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            where = (str(self.files[0]) if len(self.files) == 1
                     else f"{self.folder} ({', '.join(f.name for f in self.files)})")
            raise ModelError(f"{where}: tensor {name!r} is missing from the checkpoint") from None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A tensor as a host array of its own (bfloat16 as float32), its shape checked if given."""
        info = self.info(name)
        out = np.empty(info.shape, dtype=np.float32 if info.dtype == "BF16" else DTYPES[info.dtype])
        self.read_into(name, out, shape)
        return out

    def read_into(self, name: str, out: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
        """Copy a tensor into `out`, an array of its shape in any dtype and memory order
        (a fused or transposed weight's slice), its shape checked against `shape` if given.

        Copied out of the file's map in bands of rows, whose pages are dropped from
        this process as soon as they are copied (the OS keeps them cached): a load
        holds the weights once, with neither the file nor a second copy of its
        largest tensor beside them (the safetensors reader held two copies of each
        tensor for a moment, 1 GB more at the peak of a 1B model's load).
        """
        info = self.info(name)
        expected = info.shape if shape is None else tuple(shape)
        if info.shape != expected or out.shape != expected:
            raise ModelError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                             f"config.json implies {list(expected)}")
        dtype = DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return
        file_map = self._map(info.file)
        source = np.frombuffer(file_map, dtype=dtype, count=count, offset=info.start).reshape(info.shape)
        if source.ndim == 0:
            out[...] = source
            return
        row_bytes = dtype.itemsize * (count // info.shape[0])
        # a band of a C-ordered target is one contiguous copy; into any other order it is
        # a transposition, which NumPy runs three times faster in bands of ~128 rows
        rows = max(1, _READ_CHUNK // row_bytes) if out.flags.c_contiguous else LAYOUT_BAND
        for first in range(0, info.shape[0], rows):
            out[first:first + rows] = source[first:first + rows]
            if hasattr(mmap, "MADV_DONTNEED"):
                start = info.start + first * row_bytes
                end = min(info.end, start + rows * row_bytes)
                page = start - start % mmap.PAGESIZE
                file_map.madvise(mmap.MADV_DONTNEED, page, end - page)

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            try:
                with open(file, "rb") as f:
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ModelError(f"{file}: cannot read ({exc})") from None
        return self._maps[file]


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: sharded via the index, or single."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: no weight_map")
        if not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ModelError(f"{index}: weight_map must map tensor names to file names")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            path = folder / shard
            if path.parent != folder or not path.is_file():
                raise ModelError(f"{index}: shard {_short(shard)} is missing from {folder}")
            files.append(path)
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if any((folder / name).exists() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ModelError(f"{folder}: only pytorch_model.bin is present; it is a pickle, which this runtime "
                         "never loads (it can run code). Convert the model to safetensors.")
    raise ModelError(f"{folder}: no model.safetensors or {INDEX_NAME} found")

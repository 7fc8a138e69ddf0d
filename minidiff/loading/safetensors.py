"""Read and write safetensors files (https://github.com/huggingface/safetensors) in plain Python.

A file is three parts:

    [N: u64, little-endian] [N bytes of UTF-8 JSON header] [data buffer]

The header maps each tensor name to {"dtype": "F32", "shape": [2, 2], "data_offsets": [begin, end]}, with
offsets counted from the start of the data buffer, plus an optional "__metadata__" object of str -> str.
Tensor bytes are C-contiguous and little-endian. A reader must trust nothing: every field is checked before
a byte of tensor data is touched, by the reference Rust reader's rules plus two it lets pass (duplicate
keys, unknown fields in a tensor entry).
"""

import json
import mmap
import os
import reprlib
import secrets
from collections.abc import Mapping
from typing import NamedTuple

import torch

# Codes in the reference writer's order: widest items first, so every tensor starts aligned to its item size.
DTYPES = {
    "I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32,
    "BF16": torch.bfloat16, "F16": torch.float16, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_WRITE_ORDER = {dtype: rank for rank, dtype in enumerate(DTYPES.values())}

MAX_HEADER_BYTES = 100_000_000  # the reference refuses larger headers
_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names the file and the defect."""


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: list[int]
    begin: int  # byte offsets into the data buffer
    end: int


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object_pairs_hook: a repeated key would silently shadow an earlier tensor, so refuse it."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {reprlib.repr(key)}")
        obj[key] = value
    return obj


def _check_entry(where: str, name: str, info: object, data_size: int) -> _Entry:
    """Validate one header entry against the data buffer size; every value shown in a message is truncated."""
    tensor = f"{where}: tensor {reprlib.repr(name)}"
    if not isinstance(info, dict) or info.keys() != _FIELDS:
        raise SafetensorsError(f"{tensor} must be an object with exactly dtype, shape, data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise SafetensorsError(f"{tensor} has unsupported dtype {reprlib.repr(code)} (not in {', '.join(DTYPES)})")
    # `type(d) is int` because JSON true/false arrive as bool, a subclass of int; the reference reads u64.
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
        raise SafetensorsError(f"{tensor} shape {reprlib.repr(shape)} is not a list of non-negative 64-bit integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise SafetensorsError(f"{tensor} data_offsets {reprlib.repr(offsets)} are not two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise SafetensorsError(
            f"{tensor} data_offsets {offsets} are not 0 <= begin <= end <= {data_size} (the data buffer size)"
        )
    # Count elements as the reference does, in u64 with overflow checks: a shape like [2**62, 2**62, ...]
    # stops here instead of building a giant integer.
    numel = 1
    for d in shape:
        numel *= d
        if numel >= 2**64:
            raise SafetensorsError(f"{tensor} shape {reprlib.repr(shape)} has over 2**64 elements")
    itemsize = DTYPES[code].itemsize
    if numel * itemsize != end - begin:
        raise SafetensorsError(
            f"{tensor} data_offsets {offsets} do not match shape {reprlib.repr(shape)} x {itemsize} bytes"
        )
    return _Entry(DTYPES[code], shape, begin, end)


def _parse_header(where: str, header: bytes, data_size: int) -> tuple[dict[str, str], dict[str, _Entry]]:
    """Header bytes -> (metadata, {name: entry}), after checking the tensors tile the data buffer exactly."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting such as [[[[...]]]]
        raise SafetensorsError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(f"{where}: header is a JSON {type(obj).__name__}, not an object")

    metadata = obj.pop("__metadata__", None)
    if metadata is None:  # the reference also accepts "__metadata__": null
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: __metadata__ {reprlib.repr(metadata)} is not an object of str -> str")

    entries = {name: _check_entry(where, name, info, data_size) for name, info in obj.items()}
    # Sorted by offsets, each tensor must start where the previous one ended: no gaps, no overlaps, and
    # (as the reference requires) no trailing bytes after the last tensor.
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise SafetensorsError(
                f"{where}: tensor {reprlib.repr(name)} starts at byte {entry.begin} of the data buffer, "
                f"expected {position} (tensors must be contiguous and non-overlapping)"
            )
        position = entry.end
    if position != data_size:
        raise SafetensorsError(f"{where}: tensors cover {position} bytes but the data buffer has {data_size}")
    return metadata, entries


class SafetensorsFile:
    """A safetensors file opened for lazy reading: only the header is read and checked on open.

        with SafetensorsFile("unet.safetensors") as f:
            weight = f.get("conv_in.weight")  # maps just this tensor's bytes

    Tensors from `get` stay valid after the file is closed: each one owns its own memory map.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self.metadata, self._entries, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, str], dict[str, _Entry], int]:
        where = self.path
        file_size = os.fstat(self._file.fileno()).st_size
        if file_size < 8:
            raise SafetensorsError(f"{where}: file is {file_size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(self._file.read(8), "little")
        # Bound the header length before reading it, so a corrupt length cannot ask for a huge allocation.
        if n == 0 or n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{where}: header length {n} is not in 1..{MAX_HEADER_BYTES}")
        if 8 + n > file_size:
            raise SafetensorsError(f"{where}: header length {n} runs past the end of the file ({file_size} bytes)")
        metadata, entries = _parse_header(where, self._file.read(n), data_size=file_size - 8 - n)
        return metadata, entries, 8 + n

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self._entries[name]

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._entry(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (CPU), backed by the file without copying; pages are read when first touched.

        The map is private (copy-on-write): writing to the tensor never changes the file.
        """
        entry = self._entry(name)
        if entry.begin == entry.end:  # zero elements: there is nothing to map
            return torch.empty(entry.shape, dtype=entry.dtype)
        start = self._data_start + entry.begin
        map_start = start - start % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
        length = self._data_start + entry.end - map_start
        buffer = mmap.mmap(self._file.fileno(), length, offset=map_start, access=mmap.ACCESS_COPY)
        count = (entry.end - entry.begin) // entry.dtype.itemsize
        tensor = torch.frombuffer(buffer, dtype=entry.dtype, count=count, offset=start - map_start)
        # Foreign files may misalign a tensor (e.g. an odd header length); kernels assume alignment, so copy.
        if start % entry.dtype.itemsize:
            tensor = tensor.clone()
        return tensor.reshape(entry.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file: {name: tensor} on `device` (lazy, memory-mapped on CPU)."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name).to(device) for name in f.keys()}


def save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write {name: tensor} (and optional str -> str metadata) to `path` as safetensors, atomically.

    The bytes match the reference writer's: widest dtypes first then by name, header padded with spaces to a
    multiple of 8. Tensors are written as contiguous CPU copies, so views and shared storage are fine.
    A failed save leaves any existing file at `path` untouched.
    """
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"metadata must map str to str, got {reprlib.repr(dict(metadata))}")
        header["__metadata__"] = dict(sorted(metadata.items()))  # sorted: same dict, same bytes
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a str other than '__metadata__'")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided or tensor.dtype not in _CODES:
            raise ValueError(
                f"tensor {name!r}: cannot save {tensor.layout} {tensor.dtype} (only dense {', '.join(DTYPES)})"
            )

    ordered = sorted(tensors.items(), key=lambda item: (_WRITE_ORDER[item[1].dtype], item[0]))
    offset = 0
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.dtype.itemsize
        shape, span = list(tensor.shape), [offset, offset + nbytes]
        header[name] = {"dtype": _CODES[tensor.dtype], "shape": shape, "data_offsets": span}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # so the data buffer starts 8-byte aligned

    # Write a temporary file next to `path`, then rename it over `path`: readers see the old or the new file,
    # never half of one. "x" mode never clobbers an existing file.
    path = os.fspath(path)
    temp = f"{path}.{secrets.token_hex(4)}.tmp"
    file = open(temp, "xb")
    try:
        with file:
            file.write(len(header_bytes).to_bytes(8, "little"))
            file.write(header_bytes)
            for _, tensor in ordered:  # one tensor at a time, so at most one extra copy lives in memory
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        os.remove(temp)
        raise

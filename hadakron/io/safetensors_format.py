"""The safetensors container, read and written by hand so every malformed byte gets a clear error.

Layout: 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape, data_offsets}}`
plus an optional `"__metadata__": {str: str}`), then the tensor bytes, packed without holes.
The writer reproduces the byte layout of `safetensors.torch.save` (same tensor order, same padding),
so hashes computed from our bytes equal the ones kohya computes from safetensors' bytes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import torch

from hadakron.io.errors import AdapterFileError

HEADER_LIMIT_BYTES = 100 * 1024 * 1024
"""Largest JSON header we accept (safetensors itself stops at 100 MB too)."""

# safetensors name -> (torch dtype, bytes per element). The row order is the order in which
# safetensors lays tensors out (its dtype enum, largest first); we keep it to match its bytes.
_DTYPES: tuple[tuple[str, torch.dtype, int], ...] = tuple(
    row for row in (
        ("U64", getattr(torch, "uint64", None), 8),
        ("I64", torch.int64, 8),
        ("F64", torch.float64, 8),
        ("F32", torch.float32, 4),
        ("U32", getattr(torch, "uint32", None), 4),
        ("I32", torch.int32, 4),
        ("BF16", torch.bfloat16, 2),
        ("F16", torch.float16, 2),
        ("U16", getattr(torch, "uint16", None), 2),
        ("I16", torch.int16, 2),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None), 1),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None), 1),
        ("I8", torch.int8, 1),
        ("U8", torch.uint8, 1),
        ("BOOL", torch.bool, 1),
    ) if row[1] is not None
)
DTYPE_FROM_NAME: dict[str, torch.dtype] = {name: dt for name, dt, _ in _DTYPES}
NAME_FROM_DTYPE: dict[torch.dtype, str] = {dt: name for name, dt, _ in _DTYPES}
ITEMSIZE: dict[str, int] = {name: size for name, _, size in _DTYPES}
_LAYOUT_RANK: dict[str, int] = {name: i for i, (name, _, _) in enumerate(_DTYPES)}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry: dtype name, shape and byte range inside the data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: where the data area starts, the entries in file order, and the metadata."""

    data_start: int
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    file_size: int


def read_header(path: str | Path) -> Header:
    """Read and validate the header of `path`; raise `AdapterFileError` on anything safetensors would choke on."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(path, "no such file")
    if not path.is_file():
        raise AdapterFileError(path, "not a regular file", expected="a .safetensors file", found="a directory or device")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 8:
            raise AdapterFileError(path, "not a safetensors file", expected="an 8-byte header length at the start",
                                   found=f"a {size}-byte file")
        n = int.from_bytes(head[:8], "little")
        if len(head) > 8 and head[8:9] != b"{":
            raise AdapterFileError(path, "not a safetensors file", expected="a JSON header starting with '{' at byte 8",
                                   found=f"byte 0x{head[8]:02x}")
        if n > HEADER_LIMIT_BYTES:
            raise AdapterFileError(path, "header too large", expected=f"at most {HEADER_LIMIT_BYTES} bytes",
                                   found=f"{n} bytes declared")
        if n < 2:
            raise AdapterFileError(path, "not a safetensors file", expected="a JSON header of at least 2 bytes",
                                   found=f"declared length {n}")
        if 8 + n > size:
            raise AdapterFileError(path, "truncated file (header cut off)", expected=f"{8 + n} bytes or more",
                                   found=f"{size} bytes")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(path, "header is not valid JSON", expected="a UTF-8 JSON object",
                               found=str(exc)) from None
    if not isinstance(header, dict):
        raise AdapterFileError(path, "header is not a JSON object", found=type(header).__name__)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(path, "metadata is not an object", key="__metadata__", found=type(metadata).__name__)
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise AdapterFileError(path, "metadata value is not a string", key=f"__metadata__.{k}",
                                   expected="str", found=type(v).__name__)
    data_start = 8 + n
    data_size = size - data_start
    entries = [_parse_entry(path, name, info, data_size) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for e in entries:
        if e.begin != position:
            what = "overlaps the previous tensor" if e.begin < position else "leaves a gap before it"
            raise AdapterFileError(path, f"tensor data offsets out of order ({what})", key=e.name,
                                   expected=f"data starting at byte {position}", found=f"data_offsets [{e.begin}, {e.end}]")
        position = e.end
    if position != data_size:
        raise AdapterFileError(path, "tensor data does not fill the file exactly", expected=f"{position} data bytes",
                               found=f"{data_size} data bytes")
    return Header(data_start=data_start, entries=tuple(entries), metadata=dict(metadata), file_size=size)


def _parse_entry(path: Path, name: str, info: object, data_size: int) -> TensorEntry:
    """Check one header entry's fields and that its byte range is consistent and inside the file."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise AdapterFileError(path, "bad tensor entry in header", key=name,
                               expected="an object with dtype, shape, data_offsets", found=repr(info)[:80])
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEMSIZE:
        raise AdapterFileError(path, "unsupported tensor dtype", key=name,
                               expected="one of " + ", ".join(ITEMSIZE), found=repr(dtype))
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise AdapterFileError(path, "bad tensor shape", key=name, expected="a list of non-negative integers",
                               found=repr(shape)[:80])
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise AdapterFileError(path, "bad data_offsets", key=name, expected="[begin, end] with 0 <= begin <= end",
                               found=repr(offsets)[:80])
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise AdapterFileError(path, "tensor byte size does not match its shape and dtype", key=name,
                               expected=f"{nbytes} bytes for {dtype} {list(shape)}", found=f"{end - begin} bytes")
    if end > data_size:
        raise AdapterFileError(path, "tensor data offsets out of range (truncated file?)", key=name,
                               expected=f"data end <= {data_size} (bytes after the header)", found=f"data end {end}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


# ---------------------------------------------------------------- writing


def layout_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensor names in the order safetensors writes them: dtype (largest element first, then its enum), then name."""
    def rank(name: str) -> tuple[int, str]:
        return (_LAYOUT_RANK[dtype_name(tensors[name], name)], name)
    return sorted(tensors, key=rank)


def dtype_name(t: torch.Tensor, key: str = "") -> str:
    """The safetensors dtype name of a tensor; `ValueError` naming the key when it has none."""
    try:
        return NAME_FROM_DTYPE[t.dtype]
    except KeyError:
        raise ValueError(f"tensor {key!r}: dtype {t.dtype} cannot be stored in safetensors "
                         f"(supported: {', '.join(str(d) for d in NAME_FROM_DTYPE)})") from None


def header_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                 order: list[str]) -> bytes:
    """The 8-byte length plus JSON header (space padded to a multiple of 8) for `tensors` packed in `order`."""
    entries = []
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, dtype_name(t, name), tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    return encode_header(entries, metadata)


def encode_header(entries: Iterable[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length plus JSON header (space padded to a multiple of 8) for `entries` at their byte
    offsets, in the given order; `metadata` None leaves out `__metadata__` (safetensors' own bytes)."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU contiguous tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_stream(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """Serialise `tensors` (already CPU and contiguous) and `metadata` to an open binary stream."""
    order = layout_order(tensors)
    f.write(header_bytes(tensors, metadata, order))
    for name in order:
        write_tensor(f, tensors[name])


def write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    """Write one tensor's bytes (split out so tests can interrupt a write half way)."""
    f.write(tensor_bytes(t))


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entry list so a rename survives a crash (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

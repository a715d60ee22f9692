"""The safetensors header, read and validated by hand without torch (so `hadakron inspect` stays instant).

Layout: 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape, data_offsets}}`
plus an optional `"__metadata__": {str: str}`), then the tensor bytes, packed without holes.
Every malformed byte gets an `AdapterFileError` naming the file, the key, expected and found.
"""
from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from hadakron.io.errors import AdapterFileError

HEADER_LIMIT_BYTES = 100 * 1024 * 1024
"""Largest JSON header we accept (safetensors itself stops at 100 MB too)."""

DTYPE_LAYOUT: tuple[tuple[str, int], ...] = (
    ("U64", 8), ("I64", 8), ("F64", 8), ("F32", 4), ("U32", 4), ("I32", 4), ("BF16", 2), ("F16", 2),
    ("U16", 2), ("I16", 2), ("F8_E4M3", 1), ("F8_E5M2", 1), ("I8", 1), ("U8", 1), ("BOOL", 1),
)
"""safetensors dtype names with their bytes per element, in the order safetensors lays tensors out (its dtype
enum, largest first)."""
ITEMSIZE: dict[str, int] = dict(DTYPE_LAYOUT)
FLOAT_DTYPES: frozenset[str] = frozenset({"F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"})
INTEGER_DTYPES: frozenset[str] = frozenset({"U64", "I64", "U32", "I32", "U16", "I16", "I8", "U8"})
TORCH_NAMES: dict[str, str] = {
    "U64": "uint64", "I64": "int64", "F64": "float64", "F32": "float32", "U32": "uint32", "I32": "int32",
    "BF16": "bfloat16", "F16": "float16", "U16": "uint16", "I16": "int16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
"""safetensors dtype name -> torch's name for it (`str(torch.float16)` without `torch.`)."""


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
    try:
        exists = path.exists()
    except OSError as exc:  # `exists` lets e.g. ENAMETOOLONG through: one line for the user, not an OSError
        raise _path_error(path, exc) from None
    if not exists:
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
    entries = _parse_entries(path, header, data_size)
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


def _path_error(path: Path, exc: OSError) -> AdapterFileError:
    """The `AdapterFileError` for a path the system refuses to look up: a too-long name (or path) says which part and
    how long; anything else says the system's reason. A long path is shown cut to 100 characters."""
    text = str(path)
    shown = text if len(text) <= 100 else text[:100] + "..."
    if exc.errno == errno.ENAMETOOLONG:
        part = max(path.parts, key=lambda p: len(os.fsencode(p)))
        n = len(os.fsencode(part))
        if n > 255:
            return AdapterFileError(shown, f"the name {part[:24]!r}... is {n} bytes long, more than a file name can "
                                           f"be; check the path")
        return AdapterFileError(shown, f"the path is {len(os.fsencode(text))} bytes long, more than the system "
                                       f"allows; check the path")
    return AdapterFileError(shown, f"cannot look the file up: {exc.strerror or exc}")


_new = object.__new__
_set = object.__setattr__


def _parse_entries(path: Path, header: dict, data_size: int) -> list[TensorEntry]:
    """`_parse_entry` of every entry, in header order: a well-formed entry is checked inline here (thousands per
    file), the first one that is not goes to `_parse_entry`, which raises its error."""
    entries = []
    append = entries.append
    itemsize = ITEMSIZE
    for name, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            ok = type(info) is dict and type(dtype) is str and type(shape) is list and type(offsets) is list
        except (TypeError, KeyError, IndexError):
            ok = False
        if ok and dtype in itemsize and len(offsets) == 2:
            nbytes = itemsize[dtype]
            for d in shape:
                if type(d) is not int or d < 0:
                    ok = False
                    break
                nbytes *= d
            begin, end = offsets
            if (ok and type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
                    and end - begin == nbytes):
                entry = _new(TensorEntry)  # the frozen dataclass's fields, set at once (what __init__ sets)
                _set(entry, "__dict__", {"name": name, "dtype": dtype, "shape": tuple(shape), "begin": begin, "end": end})
                append(entry)
                continue
        append(_parse_entry(path, name, info, data_size))  # raises for a bad entry (or parses an odd one)
    return entries


def _parse_entry(path: Path, name: str, info: object, data_size: int) -> TensorEntry:
    """Check one header entry's fields and that its byte range is consistent and inside the file."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise AdapterFileError(path, "bad tensor entry in header", key=name,
                               expected="an object with dtype, shape, data_offsets", found=repr(info)[:80])
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str or dtype not in ITEMSIZE:
        raise AdapterFileError(path, "unsupported tensor dtype", key=name,
                               expected="one of " + ", ".join(ITEMSIZE), found=repr(dtype))
    if not (type(shape) is list and all(type(d) is int and d >= 0 for d in shape)):  # type(): bool is no int here
        raise AdapterFileError(path, "bad tensor shape", key=name, expected="a list of non-negative integers",
                               found=repr(shape)[:80])
    if not (isinstance(offsets, list) and len(offsets) == 2
            and type(offsets[0]) is int and type(offsets[1]) is int and offsets[0] >= 0
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

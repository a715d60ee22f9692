"""The safetensors container, read and written by hand so every malformed byte gets a clear error.

Layout: 8-byte little-endian header length N, N bytes of JSON (`{name: {dtype, shape, data_offsets}}`
plus an optional `"__metadata__": {str: str}`), then the tensor bytes, packed without holes.
The writer reproduces the byte layout of `safetensors.torch.save` (same tensor order, same padding),
so hashes computed from our bytes equal the ones kohya computes from safetensors' bytes.
"""
from __future__ import annotations

from typing import BinaryIO, Mapping

import torch

from hadakron.io.safetensors_header import (  # noqa: F401  (the header half, re-exported: one home, no torch)
    HEADER_LIMIT_BYTES, ITEMSIZE, Header, TensorEntry, encode_header, read_header,
)

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
_LAYOUT_RANK: dict[str, int] = {name: i for i, (name, _, _) in enumerate(_DTYPES)}


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

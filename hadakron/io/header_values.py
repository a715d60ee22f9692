"""Values of a safetensors file read straight from its bytes at the header's offsets, without torch.

`read_scalars` decodes one-element tensors (alpha) with `struct` (no numpy); `nonfinite_counts` memory-maps the
file and counts NaN/Inf per floating tensor with numpy bit tests (bf16 and fp8 as raw unsigned integers: a float
is NaN/Inf exactly when all its exponent bits are set), a chunk at a time, never reading the file into memory.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Iterable

from hadakron.io.safetensors_header import Header, TensorEntry

_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "U64": "<Q", "I32": "<i", "U32": "<I",
           "I16": "<h", "U16": "<H", "I8": "<b", "U8": "<B"}

# dtype -> (bytes, magnitude mask, exponent mask): |x| bits >= exponent mask means NaN or Inf (== is Inf, > is NaN)
_BIT_TESTS = {"F64": (8, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000), "F32": (4, 0x7FFFFFFF, 0x7F800000),
              "BF16": (2, 0x7FFF, 0x7F80), "F16": (2, 0x7FFF, 0x7C00), "F8_E5M2": (1, 0x7F, 0x7C),
              "F8_E4M3": (1, 0x7F, 0x7F)}  # E4M3FN has no Inf: 0x7F (either sign) is its only NaN
_CHUNK = 1 << 22  # elements per numpy pass


def decode_scalar(dtype: str, raw: bytes) -> float | None:
    """The value of one element of `dtype` from its little-endian bytes; None for BOOL."""
    if dtype in _STRUCT:
        return float(struct.unpack(_STRUCT[dtype], raw)[0])
    if dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    if dtype == "F8_E5M2":
        return float(struct.unpack("<e", b"\x00" + raw)[0])
    if dtype == "F8_E4M3":
        b = raw[0]
        sign = -1.0 if b & 0x80 else 1.0
        exp, man = (b >> 3) & 0xF, b & 0x7
        if exp == 0xF and man == 0x7:
            return math.nan
        if exp == 0:
            return sign * man / 8 * 2.0 ** -6
        return sign * (1 + man / 8) * 2.0 ** (exp - 7)
    return None


def read_scalars(path: str | Path, header: Header, entries: Iterable[TensorEntry]) -> dict[str, float | None]:
    """{name: value} of one-element tensors (each read alone: a few bytes per tensor)."""
    out: dict[str, float | None] = {}
    with open(path, "rb") as f:
        for e in entries:
            if e.end - e.begin == 0 or math.prod(e.shape) != 1:
                continue
            f.seek(header.data_start + e.begin)
            out[e.name] = decode_scalar(e.dtype, f.read(e.end - e.begin))
    return out


def nonfinite_counts(path: str | Path, header: Header,
                     entries: Iterable[TensorEntry] | None = None) -> dict[str, tuple[int, int]]:
    """{name: (NaN count, Inf count)} of the floating tensors that hold any (all of `header`'s by default).

    Neighbouring tensors of one dtype are tested as one span first (a file is mostly runs of one dtype); only a span
    that holds a NaN/Inf is counted tensor by tensor."""
    todo = sorted((e for e in (header.entries if entries is None else entries)
                   if e.dtype in _BIT_TESTS and e.end > e.begin), key=lambda e: e.begin)
    if not todo:
        return {}
    import mmap

    import numpy as np  # only when a value scan is needed

    runs: list[list[TensorEntry]] = []
    for e in todo:
        if runs and runs[-1][-1].dtype == e.dtype and runs[-1][-1].end == e.begin:
            runs[-1].append(e)
        else:
            runs.append([e])
    found: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint8, count=header.file_size - header.data_start, offset=header.data_start)
        try:
            for run in runs:
                size, magnitude, exponent = _BIT_TESTS[run[0].dtype]
                has_inf = run[0].dtype != "F8_E4M3"
                kind = np.dtype(f"<u{size}")
                if _count(np, data[run[0].begin:run[-1].end].view(kind), magnitude, exponent, has_inf=has_inf) is None:
                    continue
                for e in run:
                    counts = _count(np, data[e.begin:e.end].view(kind), magnitude, exponent, has_inf=has_inf)
                    if counts is not None:
                        found[e.name] = counts
        finally:
            del data  # the buffer must go before the mmap closes
    return found


def _count(np, bits, magnitude: int, exponent: int, *, has_inf: bool) -> tuple[int, int] | None:
    """(NaN, Inf) counts of raw float bits, None when all are finite: a max over |bits| per chunk first."""
    buf = np.empty(min(len(bits), _CHUNK), dtype=bits.dtype)
    nan = inf = 0
    for start in range(0, len(bits), _CHUNK):
        chunk = bits[start:start + _CHUNK]
        mags = buf[:len(chunk)]
        np.bitwise_and(chunk, bits.dtype.type(magnitude), out=mags)
        if int(mags.max()) < exponent:
            continue
        if has_inf:
            inf += int(np.count_nonzero(mags == exponent))
            nan += int(np.count_nonzero(mags > exponent))
        else:
            nan += int(np.count_nonzero(mags >= exponent))
    return (nan, inf) if nan or inf else None

"""Values of a safetensors file read straight from its bytes at the header's offsets, without torch.

`read_scalars` decodes one-element tensors (alpha) with `struct` (no numpy); `nonfinite_counts` memory-maps the
file and counts NaN/Inf per floating tensor with numpy bit tests (bf16 and fp8 as raw unsigned integers: a float
is NaN/Inf exactly when all its exponent bits are set), a chunk at a time, never reading the file into memory.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Callable, Iterable

from hadakron.io.safetensors_header import Header, TensorEntry

_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "U64": "<Q", "I32": "<i", "U32": "<I",
           "I16": "<h", "U16": "<H", "I8": "<b", "U8": "<B"}

# dtype -> (bytes, magnitude mask, exponent mask): |x| bits >= exponent mask means NaN or Inf (== is Inf, > is NaN)
_BIT_TESTS = {"F64": (8, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000), "F32": (4, 0x7FFFFFFF, 0x7F800000),
              "BF16": (2, 0x7FFF, 0x7F80), "F16": (2, 0x7FFF, 0x7C00), "F8_E5M2": (1, 0x7F, 0x7C),
              "F8_E4M3": (1, 0x7F, 0x7F)}  # E4M3FN has no Inf: 0x7F (either sign) is its only NaN
_CHUNK = 1 << 22  # elements per numpy pass
_SPAN_BYTES = 1 << 20  # `read_scalars` reads the scalars' whole byte range at once when it is no longer than this


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
    todo = [e for e in entries if e.end - e.begin != 0 and math.prod(e.shape) == 1]
    if not todo:
        return out
    first, last = min(e.begin for e in todo), max(e.end for e in todo)
    with open(path, "rb") as f:
        if last - first <= max(_SPAN_BYTES, 16 * len(todo)):  # alphas lie together (one dtype): one read, not one each
            f.seek(header.data_start + first)
            span = f.read(last - first)
            if len(span) == last - first:
                for e in todo:
                    out[e.name] = decode_scalar(e.dtype, span[e.begin - first:e.end - first])
                return out
        for e in todo:
            f.seek(header.data_start + e.begin)
            out[e.name] = decode_scalar(e.dtype, f.read(e.end - e.begin))
    return out


def _runs(header: Header, entries: Iterable[TensorEntry] | None) -> list[list[TensorEntry]]:
    """The floating tensors to scan, in file order, as runs of neighbouring tensors of one dtype."""
    todo = sorted((e for e in (header.entries if entries is None else entries)
                   if e.dtype in _BIT_TESTS and e.end > e.begin), key=lambda e: e.begin)
    runs: list[list[TensorEntry]] = []
    for e in todo:
        if runs and runs[-1][-1].dtype == e.dtype and runs[-1][-1].end == e.begin:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _open_data(path: str | Path, header: Header):
    """(file, mmap, uint8 array of the data area): the caller drops the array before closing the mmap."""
    import mmap

    import numpy as np  # only when a value scan is needed

    f = open(path, "rb")
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        f.close()
        raise
    return f, mm, np.frombuffer(mm, dtype=np.uint8, count=header.file_size - header.data_start, offset=header.data_start)


def _span_views(np, data, run: list[TensorEntry]):
    """(signed view, unsigned view, signed threshold, unsigned threshold) of a run's bytes (see `_any_nonfinite`)."""
    size, _magnitude, exponent = _BIT_TESTS[run[0].dtype]
    raw = data[run[0].begin:run[-1].end]
    return (raw.view(np.dtype(f"<i{size}")), raw.view(np.dtype(f"<u{size}")), exponent,
            (1 << (8 * size - 1)) | exponent)


def _any_nonfinite(signed, unsigned, signed_at: int, unsigned_at: int, chunk: int | None = None) -> bool:
    """Whether any float of a span has |bits| >= its exponent mask (NaN/Inf), in read-only passes and no temporary:
    as signed integers the largest positive float is the largest value, as unsigned the largest negative one (its
    sign bit set), so |bits| >= exponent somewhere exactly when the signed max >= exponent or the unsigned max >=
    sign bit | exponent. `chunk` elements at a time (the second pass then reads from cache), or the whole span per
    numpy call (few GIL hand-overs, for the background scan)."""
    step = chunk or len(signed) or 1
    for start in range(0, len(signed), step):
        if int(signed[start:start + step].max()) >= signed_at or int(unsigned[start:start + step].max()) >= unsigned_at:
            return True
    return False


def _counted(np, data, runs: list[list[TensorEntry]], hits: list[bool]) -> dict[str, tuple[int, int]]:
    """{name: (NaN, Inf)} of the tensors of the runs that hold any, counted tensor by tensor."""
    found: dict[str, tuple[int, int]] = {}
    for run, hit in zip(runs, hits):
        if not hit:
            continue
        size, magnitude, exponent = _BIT_TESTS[run[0].dtype]
        has_inf = run[0].dtype != "F8_E4M3"
        kind = np.dtype(f"<u{size}")
        for e in run:
            counts = _count(np, data[e.begin:e.end].view(kind), magnitude, exponent, has_inf=has_inf)
            if counts is not None:
                found[e.name] = counts
    return found


def nonfinite_counts(path: str | Path, header: Header,
                     entries: Iterable[TensorEntry] | None = None) -> dict[str, tuple[int, int]]:
    """{name: (NaN count, Inf count)} of the floating tensors that hold any (all of `header`'s by default).

    Neighbouring tensors of one dtype are tested as one span first (a file is mostly runs of one dtype); only a span
    that holds a NaN/Inf is counted tensor by tensor."""
    runs = _runs(header, entries)
    if not runs:
        return {}
    import numpy as np

    f, mm, data = _open_data(path, header)
    try:
        hits = [_any_nonfinite(*_span_views(np, data, run), chunk=1 << 20) for run in runs]
        return _counted(np, data, runs, hits)
    finally:
        del data  # the buffer must go before the mmap closes
        mm.close()
        f.close()


def start_nonfinite_counts(path: str | Path, header: Header,
                           entries: Iterable[TensorEntry] | None = None) -> Callable[[], dict[str, tuple[int, int]]]:
    """`nonfinite_counts` whose span scan runs in a background thread (numpy scans with the GIL released, so the
    caller's Python work goes on meanwhile); the returned function waits for it and returns the counts, or raises.
    Everything but the numpy reductions (imports, file, views, the rare per-tensor counts) runs in the caller's
    thread."""
    runs = _runs(header, entries)
    if not runs:
        return dict
    import threading

    import numpy as np

    f, mm, data = _open_data(path, header)
    spans = [_span_views(np, data, run) for run in runs]
    hits: list[bool] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            hits.extend(_any_nonfinite(*span) for span in spans)
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=work, name="hadakron-nonfinite-scan", daemon=True)
    thread.start()

    def result() -> dict[str, tuple[int, int]]:
        nonlocal data, spans
        thread.join()
        try:
            if failed:
                raise failed[0]
            return _counted(np, data, runs, hits)
        finally:
            del data, spans  # the buffers must go before the mmap closes
            mm.close()
            f.close()

    return result


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

"""Rewrite a safetensors checkpoint tensor by tensor, replacing some tensors, into a new file written atomically.

Peak memory stays near the largest replaced tensor: untouched tensors are copied as raw bytes in chunks,
replaced ones are read, transformed and written one at a time, and the header is written first because a
replacement keeps its dtype and shape (so every byte offset is known before any data moves).
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Mapping

import torch

from hadakron.io.safetensors_format import (DTYPE_FROM_NAME, Header, TensorEntry, encode_header, read_header,
                                            tensor_bytes)
from hadakron.io.writer import atomic_write, check_output_path, refuse_existing, same_file

COPY_CHUNK_BYTES = 16 * 1024 * 1024
"""Untouched tensors move through a buffer of at most this size (not counting the kernel's own copy path)."""

Transform = Callable[[TensorEntry, torch.Tensor], torch.Tensor]


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


_OVERWRITE_HINT = "pass overwrite=True (CLI: --force) to replace it"


def read_entry(f: BinaryIO, header: Header, entry: TensorEntry, buffer: bytearray | None = None) -> torch.Tensor:
    """Read one tensor from an open checkpoint file into writable CPU memory (`buffer`'s start when given,
    which must hold at least the tensor's bytes; the tensor is then valid until the buffer is reused)."""
    nbytes = entry.end - entry.begin
    buf = bytearray(nbytes) if buffer is None else buffer
    f.seek(header.data_start + entry.begin)
    view = memoryview(buf)[:nbytes]
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{getattr(f, 'name', '?')}: file ended inside tensor {entry.name!r}")
        got += n
    dtype = DTYPE_FROM_NAME[entry.dtype]
    if not nbytes:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=nbytes // torch.empty((), dtype=dtype).element_size()).reshape(entry.shape)


def header_for_entries(entries: tuple[TensorEntry, ...], metadata: Mapping[str, str]) -> bytes:
    """8-byte length plus the JSON header (space padded to 8) for `entries` kept at their byte offsets."""
    return encode_header(entries, {k: str(v) for k, v in metadata.items()} if metadata else None)


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    """Copy `length` bytes from `src` at `offset` to the current end of `dst`, in the kernel when possible."""
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None and length > 0:
        dst.flush()
        src_fd, dst_fd = src.fileno(), dst.fileno()
        done, out_pos = 0, dst.tell()
        try:
            while done < length:
                n = copy_range(src_fd, dst_fd, min(length - done, 1 << 30), offset + done, out_pos + done)
                if n == 0:
                    raise OSError(f"{getattr(src, 'name', '?')}: file ended at byte {offset + done}")
                done += n
            dst.seek(out_pos + length)
            return
        except OSError as exc:
            if done or getattr(exc, "errno", None) not in (18, 22, 38, 95, 1):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, EPERM
                raise
            dst.seek(out_pos)
    src.seek(offset)
    left = length
    while left > 0:
        chunk = src.read(min(left, COPY_CHUNK_BYTES))
        if not chunk:
            raise OSError(f"{getattr(src, 'name', '?')}: file ended at byte {offset + length - left}")
        dst.write(chunk)
        left -= len(chunk)


def atomic_output(out_path: str | Path, *, overwrite: bool = False, size: int | None = None) -> ContextManager[BinaryIO]:
    """Open a temp file beside `out_path`; on success fsync and rename it into place, on any error delete it.

    A process killed mid-write leaves at most a hidden `.NAME.*.partial` file, never a partial `out_path`, and
    the next write to `out_path` removes it (`hadakron.io.writer.atomic_write`, raising `OutputExistsError`
    instead of clobbering; `size`, the expected bytes, goes into a disk-full message).
    """
    out = Path(out_path)
    check_output_path(out)
    refuse_existing(out, overwrite, error=OutputExistsError, hint=_OVERWRITE_HINT)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: folder {out.parent} does not exist")
    return atomic_write(out, overwrite=overwrite, suffix=".partial", error=OutputExistsError, hint=_OVERWRITE_HINT,
                        size=size)



IN_FLIGHT = 4
"""Transform results still being written while the next tensor is computed: a transform's result must stay
unchanged during the next IN_FLIGHT transform calls (use IN_FLIGHT + 1 rotating output buffers)."""


class _Writer(threading.Thread):
    """Writes jobs to the output in order on its own thread, so disk writes overlap the next computation."""

    def __init__(self, src: BinaryIO, dst: BinaryIO) -> None:
        super().__init__(name="hadakron-checkpoint-writer", daemon=True)
        self.src, self.dst = src, dst
        self.jobs: queue.Queue = queue.Queue(maxsize=IN_FLIGHT - 1)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                if job[0] == "copy":
                    _copy_range(self.src, self.dst, job[1], job[2])
                else:
                    self.dst.write(job[1])
            except BaseException as exc:  # re-raised on the main thread
                self.error = exc

    def put(self, job: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


READ_AHEAD = 2
"""Replaced tensors read ahead on a reader thread while the current one is computed."""


class _Reader(threading.Thread):
    """Reads the tensors to replace, in file order, into rotating buffers ahead of the computation."""

    def __init__(self, path: Path, header: Header, entries: list[TensorEntry]) -> None:
        super().__init__(name="hadakron-checkpoint-reader", daemon=True)
        self.path, self.header, self.entries = path, header, entries
        largest = max((e.end - e.begin for e in entries), default=0)
        # one being filled, READ_AHEAD queued, one in use by the consumer: never overwritten while in use
        self.buffers = [bytearray(largest) for _ in range(READ_AHEAD + 2)] if entries else []
        self.items: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                for i, entry in enumerate(self.entries):
                    if self.stop.is_set():
                        return
                    tensor = read_entry(f, self.header, entry, self.buffers[i % len(self.buffers)])
                    self._put((entry.name, tensor, None))
        except BaseException as exc:  # handed to the consumer
            self._put((None, None, exc))

    def _put(self, item: tuple) -> None:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, name: str) -> torch.Tensor:
        got, tensor, exc = self.items.get()
        if exc is not None:
            raise exc
        if got != name:
            raise RuntimeError(f"reader out of order: expected {name!r}, got {got!r}")
        return tensor


def rewrite_checkpoint(base_path: str | Path, out_path: str | Path, replace: Mapping[str, Transform],
                       metadata: Mapping[str, str], *, overwrite: bool = False,
                       on_tensor: Callable[[TensorEntry], None] | None = None) -> Path:
    """Copy `base_path` to `out_path` with `replace[name](entry, tensor)` applied to the named tensors.

    Each transform must return a tensor of the entry's dtype and shape (CPU, contiguous), left unchanged during
    the next `IN_FLIGHT` transform calls (it is written on a writer thread meanwhile); the input tensor it gets
    is valid only during the call. `metadata` replaces the header's metadata. `on_tensor` is called after each
    tensor is queued (progress). Returns the output path.
    """
    base, out = Path(base_path), Path(out_path)
    check_output_path(out)
    if same_file(base, out):
        raise ValueError(f"{out}: output is the input checkpoint {base} (same file, maybe through a link); "
                         f"write to another path")
    header = read_header(base)
    missing = sorted(set(replace) - {e.name for e in header.entries})
    if missing:
        raise KeyError(f"{base}: no tensor named {missing[0]!r} to replace ({len(missing)} missing)")
    reader = _Reader(base, header, [e for e in header.entries if e.name in replace])
    size = header.file_size - header.data_start + len(header_for_entries(header.entries, metadata))
    with open(base, "rb") as src_copy, atomic_output(out, overwrite=overwrite, size=size) as dst:
        dst.write(header_for_entries(header.entries, metadata))
        writer = _Writer(src_copy, dst)
        writer.start()
        reader.start()
        try:
            for entry in header.entries:
                transform = replace.get(entry.name)
                if transform is None:
                    writer.put(("copy", header.data_start + entry.begin, entry.end - entry.begin))
                else:
                    new = transform(entry, reader.next(entry.name))
                    want = DTYPE_FROM_NAME[entry.dtype]
                    if new.dtype != want or tuple(new.shape) != entry.shape:
                        raise ValueError(f"{base}: replacement for {entry.name!r} must keep {entry.dtype} "
                                         f"{list(entry.shape)}, found {new.dtype} {list(new.shape)}")
                    writer.put(("bytes", tensor_bytes(new.detach().cpu().contiguous())))
                if on_tensor is not None:
                    on_tensor(entry)
        finally:
            reader.stop.set()
            reader.join()
            writer.finish()
    return out

"""Write a safetensors adapter file atomically, never replacing an existing file unless asked."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import torch

from hadakron.io.safetensors_format import dtype_name, fsync_dir, write_stream


def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (no copy when already so); `TypeError`/`ValueError` naming a bad key."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"tensor key {key!r}: expected a non-empty str")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r}: expected a torch.Tensor, found {type(t).__name__}")
        dtype_name(t, key)
        out[key] = t.detach().to("cpu").contiguous()
    return out


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Metadata as a plain dict of str -> str; `TypeError` naming the first key whose key or value is not a str."""
    checked: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata key {k!r}: expected str, found {type(k).__name__}")
        if not isinstance(v, str):
            raise TypeError(f"metadata {k!r}: value must be str (safetensors stores only strings), "
                            f"found {type(v).__name__} {v!r:.60}")
        checked[k] = v
    return checked


def write_adapter(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                  *, overwrite: bool = False) -> Path:
    """Write `tensors` and `metadata` to `path`: temp file in the same folder, fsync, then rename into place.

    Raises `FileExistsError` when `path` exists and `overwrite` is false. On any error or interrupt the
    temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    prepared = prepare_tensors(tensors)
    meta = check_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=overwrite) as f:
        write_stream(f, prepared, meta)
    return path


def refuse_existing(path: Path, overwrite: bool, *, error: type[FileExistsError] = FileExistsError,
                    hint: str = "ask for overwrite to replace it") -> None:
    """Raise `error` when `path` exists and `overwrite` is false (the cheap check before any work)."""
    if path.exists() and not overwrite:
        raise error(f"{path}: already exists; refusing to overwrite it ({hint})")


@contextmanager
def atomic_write(path: str | Path, *, overwrite: bool = False, suffix: str = ".tmp",
                 error: type[FileExistsError] = FileExistsError,
                 hint: str = "ask for overwrite to replace it") -> Iterator[BinaryIO]:
    """Open a temp file `.NAME.*<suffix>` beside `path`; on success fsync it and move it into place, on any
    error or interrupt delete it. Without `overwrite`, an existing `path` raises `error` (before and after).

    A process killed mid-write leaves at most the hidden temp file, never a partial `path`.
    """
    path = Path(path)
    refuse_existing(path, overwrite, error=error, hint=hint)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _set_default_mode(tmp)
        _move_into_place(tmp, path, overwrite, error, hint)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _move_into_place(tmp: Path, path: Path, overwrite: bool, error: type[FileExistsError], hint: str) -> None:
    """Rename `tmp` to `path`; without `overwrite`, a hard link makes the no-clobber check atomic."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise error(f"{path}: appeared while writing; refusing to overwrite it ({hint})") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise error(f"{path}: appeared while writing; refusing to overwrite it ({hint})") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _set_default_mode(p: Path) -> None:
    """Give the file the usual 0666 & ~umask permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(p, 0o666 & ~umask)
    except OSError:
        pass

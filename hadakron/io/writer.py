"""Write files atomically, never replacing an existing file unless asked, and never leaving debris.

Importing this module needs no torch (the path checks run before a command imports it). Every file hadakron
writes goes through a hidden temp file `.NAME.*.tmp` (checkpoints: `.partial`) in the
target folder: written, fsynced, then moved into place (a hard link for no-clobber, else `os.replace`).
The writer holds an exclusive `flock` on its temp file until it is moved, so a later write to the same
destination can tell a temp file left by a killed writer (no lock: removed) from one still being written
(locked: left alone). Errors a user can fix (disk full, a folder in the way, a bad name) raise
`OutputWriteError` naming the path and what to do.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    import torch

try:  # POSIX; on Windows an open temp file cannot be deleted, which protects a live writer the same way
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIXES = (".tmp", ".partial")
"""Suffixes of the temp files `atomic_write` makes (adapters, checkpoints); stale ones of either are removed."""

_TEMP_NAME_BYTES = 200
"""A long destination name is cut to this many bytes inside its temp name, so the temp name still fits."""

_LIVE: set[str] = set()
"""Temp files this process is writing now: never swept, even where flock is emulated by POSIX locks (NFS), which
do not conflict between two threads of one process."""
_LIVE_LOCK = threading.Lock()

_SPACE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file is too large for the file system"}
if hasattr(errno, "EDQUOT"):
    _SPACE_ERRNOS[errno.EDQUOT] = "the disk quota is exceeded"


class OutputWriteError(OSError):
    """An output that cannot be written for a reason the user can fix (disk full, a folder in the way, a bad
    name); the message names the path and what to do, and `errno` says which."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0])


def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (no copy when already so); `TypeError`/`ValueError` naming a bad key."""
    import torch

    from hadakron.io.safetensors_format import dtype_name

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


def file_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> int:
    """Bytes `write_stream` will write for these (prepared) tensors and metadata."""
    from hadakron.io.safetensors_format import header_bytes, layout_order

    header = header_bytes(tensors, metadata, layout_order(tensors))
    return len(header) + sum(t.numel() * t.element_size() for t in tensors.values())


def write_adapter(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                  *, overwrite: bool = False) -> Path:
    """Write `tensors` and `metadata` to `path`: temp file in the same folder, fsync, then rename into place.

    Raises `FileExistsError` when `path` exists and `overwrite` is false, `OutputWriteError` when `path` is a
    folder, its name is unusable, or the disk fills up. On any error or interrupt the temp file is removed and
    `path` is left as it was.
    """
    from hadakron.io.safetensors_format import write_stream

    path = Path(path)
    check_output_path(path)
    refuse_existing(path, overwrite)
    prepared = prepare_tensors(tensors)
    meta = check_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=overwrite, size=file_size(prepared, meta)) as f:
        write_stream(f, prepared, meta)
    return path


def write_adapter_new(paths: Iterable[str | Path], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write the file once, then give it the first name of `paths` (all in one folder) that is still free.

    Claiming a name is atomic (a hard link, else an `O_EXCL` create), so writers racing for the same names
    (threads or processes) each end with their own complete file and none is overwritten.
    """
    from hadakron.io.safetensors_format import write_stream

    prepared = prepare_tensors(tensors)
    meta = check_metadata(metadata)
    return write_new(paths, lambda f: write_stream(f, prepared, meta), size=file_size(prepared, meta))


def refuse_existing(path: Path, overwrite: bool, *, error: type[FileExistsError] = FileExistsError,
                    hint: str = "ask for overwrite to replace it") -> None:
    """Raise `error` when `path` exists and `overwrite` is false (the cheap check before any work)."""
    if os.path.lexists(path) and not overwrite:
        raise error(f"{path}: already exists; refusing to overwrite it ({hint})")


def name_limit(folder: Path) -> int:
    """The longest file name (bytes) the file system holding `folder` (or its nearest existing parent) allows."""
    probe = _existing_ancestor(folder)
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return 255


def check_output_path(path: str | Path) -> None:
    """Refuse, before any work, an output path that cannot become a file: a NUL byte, a name longer than the file
    system allows, an existing folder at `path`, or a file where a parent folder should be (`OutputWriteError`)."""
    text = os.fspath(path)
    if "\0" in text:
        raise OutputWriteError(errno.EINVAL, f"{text!r}: the output path holds a NUL byte; give a plain file name")
    path = Path(text)
    if not path.name or path.name in (".", ".."):
        raise OutputWriteError(errno.EINVAL, f"{path}: names no file; give a file name such as out.safetensors")
    limit = name_limit(path.parent)
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > limit:
            shown = text if len(text) <= 100 else text[:100] + "..."
            raise OutputWriteError(errno.ENAMETOOLONG, f"{shown}: the name {part[:24]!r}... is {n} bytes long; the "
                                                       f"file system allows at most {limit}; use a shorter name")
    if path.is_dir():
        raise OutputWriteError(errno.EISDIR, f"{path}: is a folder; give a file name inside it "
                                             f"(e.g. {path / 'out.safetensors'})")
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise OutputWriteError(errno.ENOTDIR, f"{path}: {ancestor} is a file, not a folder; write somewhere else")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` are one file on disk (the same path, a symlink or a hard link to it)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _existing_ancestor(folder: Path) -> Path:
    folder = Path(folder) if str(folder) else Path(".")
    while not os.path.lexists(folder) and folder.parent != folder:
        folder = folder.parent
    return folder


@contextmanager
def atomic_write(path: str | Path, *, overwrite: bool = False, suffix: str = ".tmp",
                 error: type[FileExistsError] = FileExistsError, hint: str = "ask for overwrite to replace it",
                 size: int | None = None) -> Iterator[BinaryIO]:
    """Open a locked temp file `.NAME.*<suffix>` beside `path`; on success fsync it and move it into place, on any
    error or interrupt delete it. Without `overwrite`, an existing `path` raises `error` (before and after).
    `size` (the expected byte count) only makes a disk-full message more useful.

    Stale temp files of earlier writers to `path` that were killed are removed first. A process killed
    mid-write leaves at most its hidden temp file (removed by the next write), never a partial `path`.
    """
    path = Path(path)
    check_output_path(path)
    refuse_existing(path, overwrite, error=error, hint=hint)
    f, tmp = _open_temp(path, suffix, size)
    try:
        with f:
            yield f
            _finish_temp(f, tmp)
            if overwrite:
                os.replace(tmp, path)
            elif _claim(tmp, [path]) is None:
                raise error(f"{path}: appeared while writing; refusing to overwrite it ({hint})")
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_explained(exc, path, size, existed=overwrite and path.exists())
    finally:
        _forget(tmp)
    fsync_dir(path.parent)


def write_new(paths: Iterable[str | Path], write: Callable[[BinaryIO], None], *, suffix: str = ".tmp",
              size: int | None = None) -> Path:
    """Call `write(f)` on a locked temp file, then move it to the first of `paths` (one folder) not yet taken.

    Raises `FileExistsError` when every name is taken; on any error the temp file is removed.
    """
    names = iter(Path(p) for p in paths)
    first = next(names, None)
    if first is None:
        raise ValueError("no file name to write to")
    check_output_path(first)
    f, tmp = _open_temp(first, suffix, size)
    try:
        with f:
            write(f)
            _finish_temp(f, tmp)
            final = _claim(tmp, _chain(first, names))
            if final is None:
                raise FileExistsError(f"{first.parent}: every name from {first.name} on is taken; "
                                      f"use another prefix or move some files away")
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_explained(exc, first, size, existed=False)
    finally:
        _forget(tmp)
    fsync_dir(first.parent)
    return final


def _chain(first: Path, rest: Iterator[Path]) -> Iterator[Path]:
    yield first
    yield from rest


def temp_prefix(path: Path) -> str:
    """`.NAME.` (NAME cut to `_TEMP_NAME_BYTES` bytes): the start of every temp file written for `path`."""
    return "." + os.fsencode(path.name)[:_TEMP_NAME_BYTES].decode("utf-8", "ignore") + "."


def _temp_pattern(path: Path) -> re.Pattern[str]:
    suffixes = "|".join(re.escape(s) for s in TEMP_SUFFIXES)
    return re.compile(re.escape(temp_prefix(path)) + r"[A-Za-z0-9_]{6,16}(?:" + suffixes + r")\Z")


def stale_temps(path: str | Path) -> list[Path]:
    """Temp files beside `path` that belong to writes of `path` (`.NAME.*.tmp|.partial`), live or not."""
    path = Path(path)
    pattern = _temp_pattern(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    return [Path(e.path) for e in entries if pattern.match(e.name)]


def remove_stale_temps(path: str | Path, *, names: re.Pattern[str] | None = None) -> list[Path]:
    """Delete the temp files of earlier writes of `path` (or, with `names`, of every destination in its folder whose
    name fully matches `names`) whose writer is gone (no lock held on them); a temp file whose writer is still
    running is left alone. Returns what was removed."""
    path = Path(path)
    with _folder_lock(path.parent if str(path.parent) else Path(".")) as held:
        return _sweep(path, names) if held or fcntl is None else []


def _sweep(path: Path, names: re.Pattern[str] | None) -> list[Path]:
    if names is None:
        candidates = stale_temps(path)
    else:
        suffixes = "|".join(re.escape(s) for s in TEMP_SUFFIXES)
        temp = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{6,16}(?:" + suffixes + r")\Z")
        try:
            entries = list(os.scandir(path.parent))
        except OSError:
            entries = []
        candidates = [Path(e.path) for e in entries
                      if (m := temp.match(e.name)) and names.fullmatch(m["name"])]
    return [tmp for tmp in candidates if _remove_if_unlocked(tmp)]


def _forget(tmp: Path) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(os.path.abspath(tmp))


def _remove_if_unlocked(tmp: Path) -> bool:
    with _LIVE_LOCK:
        if os.path.abspath(tmp) in _LIVE:
            return False
    if fcntl is None:  # Windows: a file some process has open cannot be deleted
        try:
            tmp.unlink()
            return True
        except OSError:
            return False
    try:
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        if not os.path.samestat(os.fstat(fd), os.lstat(tmp)):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # locked: its writer is alive
        try:
            tmp.unlink()
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


FOLDER_LOCK_SECONDS = 10.0
"""How long a writer waits for the folder lock (held for microseconds by others) before going on without a sweep."""


@contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive flock on the folder while a temp file is created and locked, or stale ones are swept,
    so a sweep never sees a new temp file in the instant before its writer locks it. Yields whether the lock is
    held (False where folders cannot be locked, or a stopped process kept it past `FOLDER_LOCK_SECONDS`)."""
    fd, held = None, False
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            fd = None
        deadline = time.monotonic() + FOLDER_LOCK_SECONDS
        while fd is not None and not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            except OSError:
                break
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)


def _open_temp(path: Path, suffix: str, size: int | None) -> tuple[BinaryIO, Path]:
    """Sweep stale temp files of `path`, then create and lock a fresh one; errors name the folder."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        with _folder_lock(folder) as held:
            if held or fcntl is None:
                _sweep(path, None)
            fd, name = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=suffix)
            with _LIVE_LOCK:
                _LIVE.add(os.path.abspath(name))
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    pass  # no flock on this file system: sweeps here cannot lock either, so they remove nothing
    except OSError as exc:
        if exc.errno in _SPACE_ERRNOS:
            _raise_explained(exc, path, size, existed=path.exists())
        raise OutputWriteError(exc.errno or errno.EIO,
                               f"{path}: cannot create a file in {folder} ({exc.strerror or exc}); "
                               f"write to a folder you can write to") from exc
    return os.fdopen(fd, "wb"), Path(name)


def _finish_temp(f: BinaryIO, tmp: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    _set_default_mode(tmp)


def _claim(tmp: Path, names: Iterable[Path]) -> Path | None:
    """Give `tmp` the first free name of `names` without ever replacing a file; None when all are taken."""
    for name in names:
        if os.path.lexists(name):
            continue
        try:
            os.link(tmp, name)
        except FileExistsError:
            continue
        except OSError:  # no hard links here: reserve the name with O_EXCL, then replace our own empty file
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            os.replace(tmp, name)
            return name
        tmp.unlink()
        return name
    return None


def _raise_explained(exc: BaseException, path: Path, size: int | None, *, existed: bool) -> None:
    """Re-raise `exc`; a disk-full error becomes one `OutputWriteError` line naming the file, folder and sizes."""
    if not isinstance(exc, OSError) or isinstance(exc, OutputWriteError) or exc.errno not in _SPACE_ERRNOS:
        raise exc
    folder = path.parent.resolve() if str(path.parent) else Path(".").resolve()
    try:
        free = f", {_human(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    need = f"the file needs {_human(size)}" if size else "no room for the file"
    kept = f"{path.name} is unchanged" if existed else f"nothing was written to {path.name}"
    raise OutputWriteError(exc.errno, f"{path}: {_SPACE_ERRNOS[exc.errno]} holding {folder} ({need}{free}); "
                                      f"{kept}; free some space there or write to another folder") from exc


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


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


def _umask() -> int:
    """The process umask, read without changing it where /proc tells (`os.umask` swaps it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _set_default_mode(p: Path) -> None:
    """Give the file the usual 0666 & ~umask permissions (mkstemp makes it 0600)."""
    try:
        os.chmod(p, 0o666 & ~_umask())
    except OSError:
        pass

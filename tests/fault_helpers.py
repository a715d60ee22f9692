"""Shared by the fault tests: a real small file system, injected disk-full errors, folder listings, forked writers."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest


@contextmanager
def small_filesystem(mountpoint: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a tmpfs of `size` at `mountpoint` (needs root / CAP_SYS_ADMIN); skip the test, saying why, when the
    machine refuses. Unmounted afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid"):
        pytest.skip("a real small file system needs a POSIX mount (not on this OS)")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount for a {size} tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs -o size={size} refused (needs root with CAP_SYS_ADMIN): "
                    f"{(done.stderr or done.stdout).strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def disk_full(after: int = 0) -> Callable:
    """A replacement for a write function that lets `after` calls through, then raises ENOSPC (as a full disk)."""
    calls = []

    def make(real: Callable) -> Callable:
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return write
    return make


def listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> the sha256 of its bytes (streamed: a folder of checkpoints
    is compared byte for byte without holding them in memory)."""
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def file_states(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `folder` -> (inode, size, mtime_ns): a cheap "nothing was written here" check for a
    server's output folder that holds gigabytes of checkpoints."""
    return {str(p.relative_to(folder)): (st.st_ino, st.st_size, st.st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() for st in (p.stat(),)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_files(folder: Path) -> list[str]:
    """Names of writer temp files (`.NAME.*.tmp` / `.partial`) under `folder`."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".partial")))


def forked(work: Callable[[], None]) -> int:
    """Run `work` in a forked child (exit 0 when it returns, 1 when it raises); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_and_reap(pid: int) -> int:
    """SIGKILL `pid` (if still running) and return its wait status."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return os.waitpid(pid, 0)[1]


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forked writers need os.fork (POSIX)")

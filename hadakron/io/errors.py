"""The one exception a user sees when an adapter file cannot be read or written."""
from __future__ import annotations

from pathlib import Path


class AdapterFileError(ValueError):
    """An adapter file is unreadable: names the file, the key (when one is at fault), what was expected and found."""

    def __init__(self, path: str | Path, problem: str, *, key: str | None = None,
                 expected: str | None = None, found: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.key = key
        self.expected = expected
        self.found = found
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [f"{self.path}: {self.problem}"]
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        if self.expected is not None:
            parts.append(f"expected {self.expected}")
        if self.found is not None:
            parts.append(f"found {self.found}")
        return "; ".join(parts)

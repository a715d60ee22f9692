"""A progress bar on stderr for long file work: tqdm when installed and stderr is a terminal, else silent."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(total: int, description: str, *, unit: str = "it", enabled: bool | None = None
                 ) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar only when `enabled` (default: stderr is a tty) and tqdm is importable."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    bar = None
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            scale = unit == "B"
            bar = tqdm(total=total, desc=description, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                       file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield (bar.update if bar is not None else (lambda n: None))
    finally:
        if bar is not None:
            bar.close()

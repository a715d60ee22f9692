"""Where a resumed run starts: the step count from an adapter's metadata (never from its file name)."""
from __future__ import annotations

from typing import Mapping

STEP_KEYS = ("hadakron.step", "ss_steps")


def resume_step(metadata: Mapping[str, str], *, source: str = "adapter") -> int:
    """The number of optimizer steps an adapter was trained for: `hadakron.step`, else kohya's `ss_steps`.

    Raises ValueError naming the file and the keys looked for when neither holds a non-negative integer.
    """
    for key in STEP_KEYS:
        raw = metadata.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"{source}: metadata {key!r} = {raw!r} is not an integer step count") from None
        if value < 0:
            raise ValueError(f"{source}: metadata {key!r} = {value} is negative")
        return value
    raise ValueError(
        f"{source}: no step count in metadata (looked for {list(STEP_KEYS)}); cannot resume without knowing the step"
    )

"""Save Adapter node: write an in-memory adapter (HADAKRON_ADAPTER) into output/loras/ with full metadata.

Names never overwrite (a counter is added, claimed atomically when the file is written), and a prefix that would
leave the output folder or make a name some file system refuses (NUL, `..`, CON/NUL/COM1, too long) is refused.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PureWindowsPath
from typing import Iterator

import folder_paths

from hadakron.io.writer import name_limit, remove_stale_temps, write_adapter_new
from hadakron.train import sidecar_path, write_training_state

CATEGORY = "training/hadakron"
ADAPTER_TYPE = "HADAKRON_ADAPTER"


class AdapterSaveError(ValueError):
    """A save the node refuses (path outside the output folder, an unusable name, nothing to save)."""


WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                              *(f"{d}{i}" for d in ("COM", "LPT") for i in (*"123456789", "\u00b9", "\u00b2", "\u00b3"))})
"""Names Windows keeps for devices, with any extension (`nul.safetensors` opens the NUL device there)."""

WINDOWS_BAD_CHARS = frozenset('<>:"|?*')
"""Characters Windows refuses in file names: a workflow that saves under them would fail there."""

COUNTER_SUFFIX_BYTES = len("_step1000000") + len("_000001_.safetensors") + 4
"""Room kept after the prefix's last part for what saves append: the trainers' `_stepNNNNNN`, the counter and the
extension (`_00001_.safetensors`, `.trainstate`), so a prefix that passes the check fits at every autosave too."""


def shown(text: str, limit: int = 120) -> str:
    """`text` quoted for a message, cut to `limit` characters (a 300-character prefix would drown the line)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def loras_output_dir() -> Path:
    """`<output>/loras`, the folder every save goes into."""
    return Path(folder_paths.get_output_directory()).resolve() / "loras"


def check_name_part(part: str, *, input_name: str, prefix: str, limit: int) -> None:
    """Refuse one `/`-separated part of a prefix that is `..`, a Windows device name, holds characters Windows
    refuses or a control character, ends in a dot or space, or is longer than `limit` bytes."""
    if part == "..":
        raise AdapterSaveError(f"{input_name} {shown(prefix)} uses '..', which leaves the output folder; "
                               f"give a name inside it")
    if any(ord(c) < 32 or ord(c) == 127 for c in part):
        raise AdapterSaveError(f"{input_name} {shown(prefix)} holds a control character (NUL, newline, tab...); "
                               f"use plain characters")
    bad = sorted(WINDOWS_BAD_CHARS.intersection(part))
    if bad:
        raise AdapterSaveError(f"{input_name} {shown(prefix)} holds {' '.join(bad)}, which Windows refuses in file "
                               f"names; use other characters")
    if part.endswith((".", " ")):
        raise AdapterSaveError(f"{input_name} {shown(prefix)}: the name {part!r} ends in a dot or space, which Windows "
                               f"drops; remove it")
    if part.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        raise AdapterSaveError(f"{input_name} {shown(prefix)}: {part!r} is a reserved device name on Windows "
                               f"(CON, PRN, AUX, NUL, COM1-9, LPT1-9); choose another name")
    n = len(part.encode("utf-8", "surrogateescape"))
    if n > limit:
        raise AdapterSaveError(f"{input_name} {shown(prefix)}: the name {shown(part, 24)} is {n} bytes long; at most "
                               f"{limit} fit before the counter and extension (the file system allows "
                               f"{limit + COUNTER_SUFFIX_BYTES} per name)")


def checked_output_base(prefix: str, *, root: Path | None = None, input_name: str = "filename_prefix") -> Path:
    """`root/<prefix>` resolved (root: `<output>/loras`), checked before any work is done; nothing is created.

    Raises AdapterSaveError naming `input_name` when the prefix is empty, absolute, uses `..`, holds a NUL or other
    control character, a Windows device name (CON, NUL, COM1...) or character (`<>:"|?*`), is too long for the file
    system, passes through a file, or resolves (through symlinks too) outside `root`.
    """
    if not isinstance(prefix, str):
        raise AdapterSaveError(f"{input_name} must be text, found {type(prefix).__name__}")
    raw = prefix
    prefix = prefix.strip().replace("\\", "/")
    root = (root or loras_output_dir()).resolve()
    if "\0" in prefix:
        raise AdapterSaveError(f"{input_name} {shown(raw)} holds a NUL byte; use plain characters")
    if not prefix or prefix.endswith("/"):
        raise AdapterSaveError(f"{input_name} {shown(raw)} names no file")
    if os.path.isabs(prefix) or PureWindowsPath(prefix).drive or prefix.startswith("/"):
        raise AdapterSaveError(f"{input_name} {shown(raw)} is absolute; give a name inside {root}")
    parts = [p for p in prefix.split("/") if p not in ("", ".")]
    if not parts:
        raise AdapterSaveError(f"{input_name} {shown(raw)} names no file")
    limit = name_limit(root)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        check_name_part(part, input_name=input_name, prefix=raw, limit=limit - COUNTER_SUFFIX_BYTES if last else limit)
    base = root.joinpath(*parts).resolve()
    if root != base and root not in base.parents:
        raise AdapterSaveError(f"{input_name} {shown(raw)} leaves the output folder {root} (through a symlink?); "
                               f"refusing to save there")
    folder = base.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise AdapterSaveError(f"{input_name} {shown(raw)}: {folder} is a file, not a folder; choose another name")
    return base


def counter_names(base: Path, *, start: int = 1) -> Iterator[Path]:
    """`base_00001_.safetensors`, `base_00002_...` from `start` on, skipping names whose file or sidecar exists
    (a name is only claimed when the file is written, so these are candidates, not reservations)."""
    for counter in range(start, 10 ** 7):
        path = base.parent / f"{base.name}_{counter:05d}_.safetensors"
        if not os.path.lexists(path) and not os.path.lexists(sidecar_path(path)):
            yield path


def next_free_path(prefix: str, *, root: Path | None = None, input_name: str = "filename_prefix") -> Path:
    """`root/<prefix>_00001_.safetensors` (root: `<output>/loras`) with the first counter whose file (or sidecar)
    is absent; the prefix is checked as `checked_output_base` does. Only a hint: two saves may get the same
    answer, so write with `save_tensors`, which claims its name atomically."""
    base = checked_output_base(prefix, root=root, input_name=input_name)
    base.parent.mkdir(parents=True, exist_ok=True)
    return next(counter_names(base))


def save_tensors(prefix: str, tensors, metadata: dict[str, str] | None, *, root: Path | None = None,
                 input_name: str = "filename_prefix") -> Path:
    """Write a safetensors file as `root/<prefix>_NNNNN_.safetensors` with the first counter free at the moment it
    is written (claimed atomically: saves racing on one prefix get distinct names, none is overwritten)."""
    base = checked_output_base(prefix, root=root, input_name=input_name)
    base.parent.mkdir(parents=True, exist_ok=True)
    # temp files of saves under this prefix that were killed (adapter or sidecar, any counter, and any step of the
    # trainers' `<autosave_prefix>_stepNNNNNN` names) go first; a save still being written is never touched
    stem = re.sub(r"_step\d{6,}\Z", "", base.name)
    remove_stale_temps(base, names=re.compile(re.escape(stem) + r"(?:_step\d{6,})?_\d{5,}_\.(?:safetensors|trainstate)"))
    return write_adapter_new(counter_names(base), tensors, metadata)


def save_adapter(adapter, prefix: str, *, extra_metadata: dict[str, str] | None = None,
                 input_name: str = "filename_prefix") -> Path:
    """Write `adapter` (an AdapterFile) under a fresh name; also its training-state sidecar when it has one
    (after the adapter, so a save cut short leaves a loadable adapter, at worst without its sidecar)."""
    if adapter is None or not getattr(adapter, "tensors", None):
        raise AdapterSaveError("no adapter to save (the input holds no tensors)")
    metadata = dict(getattr(adapter, "metadata", {}) or {})
    metadata.update(extra_metadata or {})
    written = save_tensors(prefix, adapter.tensors, metadata, input_name=input_name)
    state = adapter.training_state
    if state is not None:
        write_training_state(sidecar_path(written), state[0], state[1], overwrite=False)
    return written


class HadakronSaveAdapter:
    """Save a trained LoHa/LoKr into output/loras/ (never overwriting), with its metadata and resume state."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = ("Writes the adapter from a LoKr/LoHa Trainer into output/loras/<prefix>_NNNNN_.safetensors with "
                   "full metadata (and a .trainstate file next to it for exact resume). Never overwrites.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter": (ADAPTER_TYPE, {"tooltip": "The adapter from a hadakron trainer node."}),
            "filename_prefix": ("STRING", {"default": "hadakron/adapter",
                                           "tooltip": "Name inside output/loras/; a counter is appended. "
                                                      "Paths leaving the output folder are refused."}),
        }}

    def save(self, adapter, filename_prefix):
        try:
            path = save_adapter(adapter, filename_prefix)
        except AdapterSaveError as exc:
            raise ValueError(str(exc)) from None
        rel = path.relative_to(loras_output_dir())
        return {"ui": {"text": [f"saved loras/{rel}"]}, "result": (str(path),)}


NODE_CLASS_MAPPINGS = {"HadakronSaveAdapter": HadakronSaveAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"HadakronSaveAdapter": "Save Adapter"}

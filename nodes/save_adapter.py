"""Save Adapter node: write an in-memory adapter (HADAKRON_ADAPTER) into output/loras/ with full metadata.

Names never overwrite (a counter is added), and a prefix that would leave the output folder is refused.
"""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from hadakron.io import write_adapter
from hadakron.train import sidecar_path, write_training_state

CATEGORY = "training/hadakron"
ADAPTER_TYPE = "HADAKRON_ADAPTER"


class AdapterSaveError(ValueError):
    """A save the node refuses (path outside the output folder, nothing to save)."""


def loras_output_dir() -> Path:
    """`<output>/loras`, the folder every save goes into."""
    return Path(folder_paths.get_output_directory()).resolve() / "loras"


def checked_output_base(prefix: str, *, root: Path | None = None, input_name: str = "filename_prefix") -> Path:
    """`root/<prefix>` resolved (root: `<output>/loras`), checked before any work is done; nothing is created.

    Raises AdapterSaveError naming `input_name` when the prefix is empty, absolute, or resolves outside `root`.
    """
    prefix = (prefix or "").strip().replace("\\", "/")
    root = (root or loras_output_dir()).resolve()
    if not prefix or prefix.endswith("/"):
        raise AdapterSaveError(f"{input_name} {prefix!r} names no file")
    if os.path.isabs(prefix) or Path(prefix).drive:
        raise AdapterSaveError(f"{input_name} {prefix!r} is absolute; give a name inside {root}")
    base = (root / prefix).resolve()
    if root != base and root not in base.parents:
        raise AdapterSaveError(f"{input_name} {prefix!r} leaves the output folder {root}; refusing to save there")
    return base


def next_free_path(prefix: str, *, root: Path | None = None, input_name: str = "filename_prefix") -> Path:
    """`root/<prefix>_00001_.safetensors` (root: `<output>/loras`) with the first counter whose file (or sidecar)
    is absent; the prefix is checked as `checked_output_base` does."""
    base = checked_output_base(prefix, root=root, input_name=input_name)
    base.parent.mkdir(parents=True, exist_ok=True)
    counter = 1
    while True:
        path = base.parent / f"{base.name}_{counter:05d}_.safetensors"
        if not path.exists() and not sidecar_path(path).exists():
            return path
        counter += 1


def save_adapter(adapter, prefix: str, *, extra_metadata: dict[str, str] | None = None,
                 input_name: str = "filename_prefix") -> Path:
    """Write `adapter` (an AdapterFile) under a fresh name; also its training-state sidecar when it has one."""
    if adapter is None or not getattr(adapter, "tensors", None):
        raise AdapterSaveError("no adapter to save (the input holds no tensors)")
    metadata = dict(getattr(adapter, "metadata", {}) or {})
    metadata.update(extra_metadata or {})
    path = next_free_path(prefix, input_name=input_name)
    written = write_adapter(path, adapter.tensors, metadata, overwrite=False)
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

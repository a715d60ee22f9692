"""Read an adapter file: validate the container, load the tensors, group them by module, list the problems."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hadakron.io.errors import AdapterFileError
from hadakron.io import module_specs
from hadakron.io.module_checks import NonfiniteTensors, group_modules, nonfinite_problems, nonfinite_tensors, specs_of
from hadakron.io.peft_config import apply_peft_config
from hadakron.io.safetensors_format import read_header


@dataclass
class AdapterFile:
    """An adapter file's contents: tensors by file key, metadata, tensors grouped by module, and warnings.

    `path` is None for an adapter held in memory (a trainer's output). `training_state` optionally carries the
    optimizer/scheduler state a trainer hands to Save Adapter for an exact resume; it is not part of the file.
    """

    path: Path | None
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    training_state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
    nonfinite: NonfiniteTensors | None = None

    def nonfinite_tensors(self) -> NonfiniteTensors:
        """The tensors holding NaN/Inf, by module and parameter; scanned once per AdapterFile (read_adapter does it)."""
        if self.nonfinite is None:
            self.nonfinite = nonfinite_tensors(self.modules or group_modules(self.tensors))
        return self.nonfinite

    @property
    def size_bytes(self) -> int:
        """Size of the file on disk when it was read; for an in-memory adapter, the bytes of its tensors."""
        if self.path is not None and self.path.exists():
            return self.path.stat().st_size
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_adapter(path: str | Path, *, device: str | torch.device = "cpu") -> AdapterFile:
    """Read a safetensors adapter file; raise `AdapterFileError` when it is unreadable, collect warnings in `problems`."""
    path = Path(path)
    header = read_header(path)
    module_specs.require_adapter_keys(path, [e.name for e in header.entries])
    tensors = _load_tensors(path, header.entries, device)
    modules = group_modules(tensors)
    # PEFT keeps the scale in adapter_config.json beside the file; written into the modules here, once
    tensors, modules, problems = apply_peft_config(path, tensors, modules, metadata=header.metadata)
    nonfinite = nonfinite_tensors(modules)
    problems += nonfinite_problems(modules, nonfinite)
    specs = {module: specs_of(params) for module, params in modules.items()}
    for module, module_spec in specs.items():
        problems += module_specs.module_problems(module, module_spec)
    warning = module_specs.both_full_alpha_warning(specs, header.metadata)
    if warning:
        problems.append(warning)
    return AdapterFile(path=path, tensors=tensors, metadata=header.metadata, modules=modules, problems=problems,
                       nonfinite=nonfinite)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Only the metadata of a safetensors file (reads the header, not the tensors); `AdapterFileError` if invalid."""
    return read_header(path).metadata


def _load_tensors(path: Path, entries, device) -> dict[str, torch.Tensor]:
    """Load every tensor named in the (already validated) header, in key order."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in sorted(e.name for e in entries):
                t = f.get_tensor(name)
                # own memory, not a view of safetensors' mmap: a file rewritten in place would otherwise change
                # a cached adapter under the loader (a stale, torn patch) or kill the process (SIGBUS) once truncated
                tensors[name] = t.clone() if t.device.type == "cpu" else t
    except Exception as exc:  # the header was validated; anything left is I/O or a safetensors limit
        raise AdapterFileError(path, "could not load tensors", found=f"{type(exc).__name__}: {exc}") from exc
    return tensors

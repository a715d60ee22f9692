"""Adapter files: read (validated, grouped by module, with warnings) and write (atomic, no clobber), plus metadata.

Names are loaded on first use (PEP 562): the torch-free pieces (`safetensors_header`, `module_specs`,
`header_values`) can be imported without importing torch, which `hadakron inspect` relies on.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES: dict[str, str] = {
    "AdapterFileError": "errors",
    "build_metadata": "metadata", "safetensors_hashes": "metadata", "with_hashes": "metadata",
    "AdapterFile": "reader", "read_adapter": "reader", "read_metadata": "reader",
    "HEADER_LIMIT_BYTES": "safetensors_header",
    "write_adapter": "writer",
}

__all__ = [
    "AdapterFile", "AdapterFileError", "HEADER_LIMIT_BYTES", "build_metadata", "read_adapter", "read_metadata",
    "safetensors_hashes", "with_hashes", "write_adapter",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that holds `name` on first use (submodules themselves load as usual)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

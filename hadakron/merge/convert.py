"""Convert an adapter: LoHa/LoKr -> LoRA (exact, or truncated SVD at a rank with its error), or to another key layout.

Layout conversion only renames keys (through the family's known layer names in hadakron.arch): tensors
and metadata are carried over unchanged, so it is lossless; a key naming no known layer is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hadakron.arch import LAYOUTS, convert_state_dict, detect_family
from hadakron.io import AdapterFile, write_adapter
from hadakron.merge.combine import CombineResult, combine
from hadakron.io.module_specs import split_key
from hadakron.merge.module_names import adapter_modules, adapter_name, refused_message, target_refusal


def file_layout(adapter: AdapterFile) -> str | None:
    """The key layout an adapter file is written in (None when not recognised)."""
    return detect_family(list(adapter.tensors)).layout


def to_lora(adapter: AdapterFile, *, rank: int | None = None, layout: str | None = None,
            dtype: torch.dtype = torch.float32, family: str | None = None, skip_bad: bool = False) -> CombineResult:
    """The adapter as a LoRA: exact without `rank`, best rank-`rank` (error reported) with it.

    `layout` defaults to the input file's own layout (kohya when it cannot be told). Broken modules raise
    (named) unless `skip_bad` (as `combine`).
    """
    if layout is None:
        layout = file_layout(adapter) or "kohya"
        if layout not in LAYOUTS:
            layout = "kohya"
    result = combine([(adapter, 1.0)], rank=rank, layout=layout, dtype=dtype, family=family,
                     title=f"{Path(adapter_name(adapter)).stem} as LoRA", skip_bad=skip_bad)
    result.metadata["hadakron.converted_from"] = adapter_name(adapter)
    return result


@dataclass
class LayoutConversion:
    """An adapter's tensors under new keys, its metadata, and the layouts involved."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    source_layout: str | None
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # broken modules left out (skip_bad), with reasons

    def write(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return write_adapter(path, self.tensors, self.metadata, overwrite=overwrite)


def convert_layout(adapter: AdapterFile, layout: str, *, family: str | None = None,
                   skip_bad: bool = False) -> LayoutConversion:
    """Rename every key of `adapter` into `layout` (kohya, lycoris, comfyui, peft, diffusers); tensors unchanged.

    A broken module (bad dtypes, shapes or alpha, or a delta-W that does not fit its layer) raises ValueError
    naming it, unless `skip_bad`: then its tensors are left out and listed in `skipped`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    detected = detect_family(list(adapter.tensors))
    refused = [(m.file_key, why) for m in adapter_modules(adapter, family) if (why := target_refusal(m)) is not None]
    if refused and not skip_bad:
        raise ValueError(refused_message(adapter_name(adapter), refused))
    source = adapter.tensors
    if refused:
        bad = {k for k, _ in refused}
        source = {k: t for k, t in adapter.tensors.items() if split_key(k)[0] not in bad}
    try:
        tensors = convert_state_dict(source, layout, family or detected.family)
    except ValueError as exc:
        raise ValueError(f"{adapter_name(adapter)}: {exc}") from None
    metadata = dict(adapter.metadata)
    metadata["hadakron.converted_layout"] = f"{detected.layout or 'unknown'} -> {layout}"
    return LayoutConversion(tensors=tensors, metadata=metadata, source_layout=detected.layout, layout=layout,
                            skipped=refused)

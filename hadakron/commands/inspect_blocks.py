"""`hadakron inspect FILE --blocks`: where the adapter acts, ||alpha/rank * dW||_F per block as text bars.

The same figure as the loader's heatmap (hadakron.delta_norms, block labels from hadakron.arch's `block_of`, the
block_weights vocabulary), at strength 1. No torch: the factor tensors are read from the file's bytes at the
header's offsets (F64/F32/F16 directly, BF16 widened by its bits); a file whose scale a PEFT config sets goes
through `read_adapter` (torch), as the rest of inspect does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from hadakron.delta_norms import BlockNorm, algorithm, block_norms, delta_norm, module_scale, text_bars

_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def _decode(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """float64 array of one tensor's bytes; ValueError for a dtype that is not a float numpy can widen."""
    if dtype in _NUMPY:
        return data.view(np.dtype(_NUMPY[dtype])).astype(np.float64).reshape(shape)
    if dtype == "BF16":
        return (data.view("<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64).reshape(shape)
    raise ValueError(f"cannot read {dtype} factors without torch")


def file_modules(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """({module_key: {param: float64 array}} of the file's LoHa/LoKr modules, every tensor key of the file)."""
    from hadakron.io import module_specs
    from hadakron.io.safetensors_header import read_header

    path = Path(path)
    header = read_header(path)
    keys = [e.name for e in header.entries]
    if header.metadata.get("lora_adapter_metadata") or (path.parent / "adapter_config.json").is_file():
        from hadakron.io import read_adapter  # the PEFT config sets the scale (torch)

        adapter = read_adapter(path)
        return ({m: {p: t.detach().float().numpy().astype(np.float64) for p, t in params.items()}
                 for m, params in adapter.modules.items() if algorithm(params)}, keys)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start,
                     shape=(header.file_size - header.data_start,))
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        for e in header.entries:
            module, param = module_specs.split_key(e.name)
            out.setdefault(module, {})[param] = _decode(np.asarray(data[e.begin:e.end]), e.dtype, e.shape)
    finally:
        del data
    return {m: params for m, params in out.items() if algorithm(params)}, keys


def block_cells(modules: Mapping[str, Mapping[str, np.ndarray]], keys: list[str]) -> tuple[str | None, list[BlockNorm]]:
    """(family, cells): ||alpha/rank * dW||_F per block of the file's parts, every block of the vocabulary listed."""
    from hadakron.arch import detect_family, get_family
    from hadakron.block_weights import all_block_ids

    detection = detect_family(keys)
    if detection.family is None:
        return None, []
    fam = get_family(detection.family)
    entries = []
    for module_key, params in modules.items():
        hit = detection.modules.get(module_key)
        if hit is None:
            continue
        part, dotted = hit
        entries.append((part, fam.block_of(part, dotted), delta_norm(params), module_scale(params)))
    parts = {part for part, _ in detection.modules.values()}
    # Anima: as many DiT blocks as the file's keys reach (no model here says more), never an assumed 28
    ids = (all_block_ids(fam.name, num_blocks=detection.depths.get("unet", 0)) if fam.name == "anima"
           else all_block_ids(fam.name))
    te = {"te", "te1", "te2"}
    order = [("unet", b) for b in ids if b.lower() not in te and "unet" in parts]
    order += [(b.lower(), b) for b in ids if b.lower() in te and b.lower() in parts]
    return fam.name, block_norms(entries, order)


def file_cells(path: str | Path) -> tuple[str | None, list[BlockNorm]]:
    """(family, cells) of a file: its factors read without torch, one cell per block of its parts."""
    return block_cells(*file_modules(path))


def block_lines(family: str | None, cells: list[BlockNorm], *, width: int = 30) -> list[str]:
    """The text form: a title line, then one bar per block of the file's parts ('-': no module there)."""
    if family is None or not cells:
        return ["blocks: no LoHa/LoKr module of a known family"]
    exact = all(c.exact for c in cells if c.modules)
    title = (f"||alpha/rank * dW||_F per block ({family.upper()}, strength 1; "
             + ("exact from the factors)" if exact else "'(bound)': upper bound, the rest exact)"))
    return [title, *text_bars(cells, width=width)]

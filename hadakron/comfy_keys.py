"""ComfyUI's state-dict names for a layer `(part, dotted)` of SDXL and Anima (strings only; no comfy import).

The diffusion model lives under `diffusion_model.` in `ModelPatcher.model`; the text encoders live in
`CLIP.cond_stage_model` as `clip_l.transformer.` / `clip_g.transformer.` (SDXL) and
`qwen3_06b.transformer.model.` (Anima). Patches are keyed by `<prefix><dotted>.weight`.
"""
from __future__ import annotations

from typing import Iterable, Mapping

MODEL_PREFIXES: dict[str, dict[str, str]] = {
    "sdxl": {"unet": "diffusion_model."},
    "anima": {"unet": "diffusion_model."},
}
CLIP_PREFIXES: dict[str, dict[str, str]] = {
    "sdxl": {"te1": "clip_l.transformer.", "te2": "clip_g.transformer."},
    "anima": {"te": "qwen3_06b.transformer.model."},
}


def _prefix(family: str, part: str) -> str:
    for table in (MODEL_PREFIXES, CLIP_PREFIXES):
        if part in table.get(family, {}):
            return table[family][part]
    raise ValueError(f"no ComfyUI prefix for {family} part {part!r}")


def is_clip_part(family: str, part: str) -> bool:
    """True when the part's weights live in the CLIP object (text encoders), False for the diffusion model."""
    return part in CLIP_PREFIXES.get(family, {})


def comfy_weight_key(family: str, part: str, dotted: str) -> str:
    """ComfyUI patch key of a layer's weight, e.g. `diffusion_model.input_blocks.4.1.proj_in.weight`."""
    return f"{_prefix(family, part)}{dotted}.weight"


def layer_shapes(family: str, shapes: Mapping[str, Iterable[int]], *, clip: bool) -> dict[tuple[str, str], tuple[int, ...]]:
    """`(part, dotted) -> weight shape` for every >=2-D `.weight` of a ComfyUI state dict (model or CLIP side)."""
    prefixes = (CLIP_PREFIXES if clip else MODEL_PREFIXES).get(family, {})
    out: dict[tuple[str, str], tuple[int, ...]] = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        for part, prefix in prefixes.items():
            if key.startswith(prefix):
                out[(part, key[len(prefix):-len(".weight")])] = shape
                break
    return out

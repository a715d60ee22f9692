"""How many stacked blocks (Anima `blocks.N`) a model or an adapter file has, and the family sized to it.

Nothing here assumes a depth: a model's is the highest `blocks.N` among its module names (or state-dict keys) + 1,
a file's the highest `blocks.N` its keys name (any layout) + 1. What lists blocks (targets, block ids, reports, the
heatmap) takes the family from `family_for_model` / `family_for_file`; SDXL has no stack and passes through.
`hadakron.arch.anima.anima_dims` gives an Anima DiT's block count and width from its names or state-dict shapes.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from hadakron.arch.detect import match_part_names
from hadakron.arch.family import Family
from hadakron.arch.layouts import get_family, parse_keys


def model_depths(family: str | Family, parts: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """`{part: blocks}` of each stacked part given as its module names (any model prefix, e.g. `diffusion_model.`)."""
    fam = get_family(family)
    out = {}
    for part, names in parts.items():
        if part in fam.stacks:
            out[part] = fam.depth_of(part, match_part_names(fam, part, names)[1])
    return out


def file_depths(family: str | Family, keys: Iterable[str]) -> dict[str, int]:
    """`{part: blocks}` an adapter file's keys reach (highest `blocks.N` + 1, 0 when none) for each stacked part."""
    fam = get_family(family)
    parsed, _unknown = parse_keys(keys, fam)
    return {part: fam.depth_of(part, (p.dotted for p in parsed if p.part == part)) for part in fam.stacks}


def family_for_model(family: str | Family, parts: Mapping[str, Iterable[str]]) -> Family:
    """`family` with the depth of the given model parts (`{part: module names}`); parts not given keep theirs."""
    fam = get_family(family)
    return fam.with_depth(model_depths(fam, parts)) if fam.stacks else fam


def family_for_file(family: str | Family, keys: Iterable[str]) -> Family:
    """`family` with the depth an adapter file's keys reach (a file alone: no model says more)."""
    fam = get_family(family)
    return fam.with_depth(file_depths(fam, keys)) if fam.stacks else fam


def anima_file_num_blocks(keys: Iterable[str]) -> int:
    """Number of DiT blocks an Anima adapter file's keys reach, in any layout (kohya `lora_unet_blocks_N_...`,
    `lycoris_blocks_N_...`, ComfyUI `diffusion_model.blocks.N....`, PEFT `base_model.model.blocks.N....`)."""
    return file_depths("anima", keys)["unet"]

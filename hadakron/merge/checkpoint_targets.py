"""Where an adapted layer's weight lives inside a checkpoint file: key, row slice, and the file's prefixes.

Adapters name a layer by (family, part, dotted) in hadakron's canonical naming (see hadakron.arch). Checkpoint
files store those weights under their own prefixes, and SDXL's CLIP-G is stored in OpenCLIP form, where q, k
and v are three row blocks of one `attn.in_proj_weight`. This module builds that index from the file's keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

SDXL_UNET_PREFIX = "model.diffusion_model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_TE2_HF_PREFIX = "conditioner.embedders.1.transformer."

ANIMA_DIT_MARKER = "blocks.0.mlp.layer1.weight"
"""Key (after the prefix) that marks an Anima / Cosmos-predict2 DiT; its prefix is whatever precedes it."""
QWEN3_MARKER = "layers.0.self_attn.q_norm.weight"
"""Key (after the prefix) that marks a Qwen3 text encoder (`model.`, `qwen3_06b.transformer.model.`, ...)."""

_OPENCLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                             r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPENCLIP_TO_HF = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class WeightTarget:
    """A layer's weight in the file: `key`; `rows` (start, stop) when it is a row block of a stacked tensor;
    `transposed` when the file stores the layer's weight transposed (OpenCLIP `text_projection`)."""

    key: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


@dataclass(frozen=True)
class CheckpointIndex:
    """(family, part, dotted) -> WeightTarget for every adaptable weight found, and what the file holds."""

    targets: dict[tuple[str, str, str], WeightTarget]
    families: tuple[str, ...]
    parts: dict[str, str]
    """part label ("sdxl/unet", "anima/te", ...) -> the key prefix it was found under."""


def _strip_weight(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") else None


def _index_prefix(keys: Iterable[str], prefix: str, family: str, part: str,
                  out: dict[tuple[str, str, str], WeightTarget], exclude: tuple[str, ...] = ()) -> int:
    n = 0
    for key in keys:
        if not key.startswith(prefix) or any(key.startswith(x) for x in exclude):
            continue
        dotted = _strip_weight(key[len(prefix):])
        if dotted:
            out[(family, part, dotted)] = WeightTarget(key)
            n += 1
    return n


def _index_openclip(shapes: Mapping[str, tuple[int, ...]], prefix: str,
                    out: dict[tuple[str, str, str], WeightTarget]) -> int:
    n = 0
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        m = _OPENCLIP_BLOCK.match(key[len(prefix):])
        if not m:
            continue
        layer, what = m.group(1), m.group(2)
        base = f"text_model.encoder.layers.{layer}."
        if what == "attn.in_proj_weight":
            width = shape[0] // 3
            for i, name in enumerate(_QKV):
                out[("sdxl", "te2", base + "self_attn." + name)] = WeightTarget(key, (i * width, (i + 1) * width))
        else:
            out[("sdxl", "te2", base + _OPENCLIP_TO_HF[what])] = WeightTarget(key)
        n += 1
    if prefix + "text_projection" in shapes:  # OpenCLIP keeps x @ P; the layer's weight is P^T
        out[("sdxl", "te2", "text_projection")] = WeightTarget(prefix + "text_projection", None, True)
    return n


def _marker_prefixes(keys: Iterable[str], marker: str, skip: str | None = None) -> list[str]:
    found = []
    for key in keys:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            if (prefix == "" or prefix.endswith(".")) and (skip is None or skip not in prefix):
                found.append(prefix)
    return sorted(set(found), key=len)


def index_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> CheckpointIndex:
    """Index a checkpoint's adaptable weights from its key -> shape map (no tensor data needed)."""
    keys = list(shapes)
    targets: dict[tuple[str, str, str], WeightTarget] = {}
    parts: dict[str, str] = {}
    if any(k.startswith(SDXL_UNET_PREFIX + "input_blocks.") for k in keys) or any(
            k.startswith("conditioner.embedders.") for k in keys):
        if _index_prefix(keys, SDXL_UNET_PREFIX, "sdxl", "unet", targets):
            parts["sdxl/unet"] = SDXL_UNET_PREFIX
        if _index_prefix(keys, SDXL_TE1_PREFIX, "sdxl", "te1", targets):
            parts["sdxl/te1"] = SDXL_TE1_PREFIX
        if _index_openclip(shapes, SDXL_TE2_OPENCLIP_PREFIX, targets):
            parts["sdxl/te2"] = SDXL_TE2_OPENCLIP_PREFIX
        elif _index_prefix(keys, SDXL_TE2_HF_PREFIX, "sdxl", "te2", targets):
            parts["sdxl/te2"] = SDXL_TE2_HF_PREFIX
    for prefix in _marker_prefixes(keys, ANIMA_DIT_MARKER, skip="llm_adapter"):
        if "anima/unet" in parts:
            break
        if _index_prefix(keys, prefix, "anima", "unet", targets):
            parts["anima/unet"] = prefix
    for prefix in _marker_prefixes(keys, QWEN3_MARKER):
        if "anima/te" in parts:
            break
        if _index_prefix(keys, prefix, "anima", "te", targets):
            parts["anima/te"] = prefix
    families = tuple(sorted({label.split("/")[0] for label in parts}))
    return CheckpointIndex(targets=targets, families=families, parts=parts)

"""Adapter metadata: kohya `ss_*` keys, `modelspec.*`, our `hadakron.*` rebuild keys, and the sshs hashes.

The hashes follow sd-scripts' `precalculate_safetensors_hashes`: serialise the tensors with only the
`ss_*` metadata; `sshs_model_hash` is the sha256 of the bytes after the header, `sshs_legacy_hash` the
first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of the whole serialisation.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Mapping

import torch

from hadakron.io.safetensors_format import header_bytes, layout_order, tensor_bytes
from hadakron.io.writer import prepare_tensors

NETWORK_MODULES = {"loha": "networks.loha", "lokr": "networks.lokr", "lora": "networks.lora"}
BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "anima": "anima"}
MODELSPEC_ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base/lora", "anima": "anima-preview/lora"}
MODELSPEC_IMPLEMENTATIONS = {
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "anima": "https://huggingface.co/circlestone-labs/Anima",
}
DEFAULT_RESOLUTIONS = {"sdxl": "1024x1024", "anima": "1024x1024"}
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


class _WindowHash:
    """sha256 of the bytes of a stream that fall in [start, start + length)."""

    def __init__(self, start: int, length: int) -> None:
        self.start, self.end, self.pos = start, start + length, 0
        self.sha = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        n = len(data)
        lo, hi = max(self.start, self.pos), min(self.end, self.pos + n)
        if lo < hi:
            self.sha.update(memoryview(data)[lo - self.pos: hi - self.pos])
        self.pos += n


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya sd-scripts computes them, streamed (no full copy)."""
    prepared = prepare_tensors(tensors)
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    order = layout_order(prepared)
    model, legacy = hashlib.sha256(), _WindowHash(_LEGACY_OFFSET, _LEGACY_LENGTH)
    legacy.update(header_bytes(prepared, ss_only, order))
    for name in order:
        data = tensor_bytes(prepared[name])
        model.update(data)
        legacy.update(data)
    return model.hexdigest(), legacy.sha.hexdigest()[:8]


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """A copy of `metadata` with `sshs_model_hash` and `sshs_legacy_hash` set for `tensors`."""
    out = dict(metadata)
    out["sshs_model_hash"], out["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    return out


def _flag(value: bool) -> str:
    return "True" if value else "False"


def build_metadata(
    *,
    algorithm: str,
    family: str,
    network_dim: int | None,
    network_alpha: float | None,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    factor: int = -1,
    use_tucker: bool = False,
    decompose_both: bool = False,
    module_ranks: Mapping[str, int] | None = None,
    module_alphas: Mapping[str, float] | None = None,
    network_args: Mapping[str, object] | None = None,
    training: Mapping[str, object] | None = None,
    title: str | None = None,
    resolution: str | None = None,
    timestamp: float | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """Metadata (all str) that kohya, ComfyUI and web UIs read, plus what hadakron needs to rebuild the network.

    `training` keys are written as `ss_<key>` (e.g. `steps` -> `ss_steps`). When `tensors` is given the sshs
    hashes are added, computed over the final `ss_*` keys as sd-scripts does.
    """
    if algorithm not in NETWORK_MODULES:
        raise ValueError(f"algorithm: expected one of {', '.join(NETWORK_MODULES)}, found {algorithm!r}")
    if family not in BASE_MODEL_VERSIONS:
        raise ValueError(f"family: expected one of {', '.join(BASE_MODEL_VERSIONS)}, found {family!r}")
    from hadakron import __version__

    args: dict[str, str] = {}
    if conv_dim is not None:
        args["conv_dim"] = str(conv_dim)
    if conv_alpha is not None:
        args["conv_alpha"] = str(conv_alpha)
    if algorithm == "lokr":
        args["factor"] = str(factor)
        args["decompose_both"] = _flag(decompose_both)
    if use_tucker:
        args["use_tucker"] = _flag(use_tucker)
    args.update({k: str(v) for k, v in (network_args or {}).items()})
    ts = time.time() if timestamp is None else timestamp
    meta: dict[str, str] = {
        "ss_network_module": NETWORK_MODULES[algorithm],
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(network_alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_v2": "False",
    }
    for k, v in (training or {}).items():
        meta[k if k.startswith("ss_") else f"ss_{k}"] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    meta.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURES[family],
        "modelspec.implementation": MODELSPEC_IMPLEMENTATIONS[family],
        "modelspec.title": title or f"hadakron {algorithm}",
        "modelspec.date": datetime.fromtimestamp(int(ts), timezone.utc).isoformat(),
        "modelspec.resolution": resolution or DEFAULT_RESOLUTIONS[family],
        "hadakron.version": __version__,
        "hadakron.family": family,
        "hadakron.algorithm": algorithm,
        "hadakron.factor": str(factor),
        "hadakron.use_tucker": _flag(use_tucker),
        "hadakron.decompose_both": _flag(decompose_both),
        "hadakron.module_ranks": json.dumps(dict(module_ranks or {}), sort_keys=True),
        "hadakron.module_alphas": json.dumps({k: float(v) for k, v in (module_alphas or {}).items()}, sort_keys=True),
    })
    return with_hashes(tensors, meta) if tensors is not None else meta

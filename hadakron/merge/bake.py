"""Bake adapters into a checkpoint file: W' = W + sum_i s_i * dW_i for every matched weight, streamed.

Math runs in float32 (float64 for float64 weights) and the result is cast back to the weight's dtype. The
checkpoint is rewritten tensor by tensor (see checkpoint_stream), so memory stays near one tensor plus the
adapters. Modules that match no weight are reported, never silently dropped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from hadakron.io import AdapterFile
from hadakron.io.safetensors_format import TensorEntry
from hadakron.merge.checkpoint_stream import read_checkpoint_header, rewrite_checkpoint
from hadakron.merge.checkpoint_targets import CheckpointIndex, WeightTarget, index_checkpoint
from hadakron.merge.module_names import NamedModule, name_modules
from hadakron.ops import delta_weight, patched_weight

BAKED_METADATA_KEY = "hadakron.baked_adapters"
"""Metadata key of a baked checkpoint: JSON list of {file, strength, hash, applied, unmatched}, oldest first."""


@dataclass(frozen=True)
class Patch:
    """One adapter module applied to one weight (or a row block of it) at a strength."""

    rows: tuple[int, int] | None
    transposed: bool
    params: Mapping[str, torch.Tensor]
    strength: float
    label: str


@dataclass
class AdapterBakeReport:
    """What one adapter contributed: modules applied, and modules left out with the reason."""

    name: str
    strength: float
    applied: list[str] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class BakeReport:
    """The outcome of a bake: output file, per-adapter reports, how many weights changed, and the time."""

    base_path: Path
    out_path: Path
    checkpoint_parts: dict[str, str]
    adapters: list[AdapterBakeReport]
    weights_changed: int
    tensors_total: int
    seconds: float

    def lines(self, max_unmatched: int = 10) -> list[str]:
        """Human-readable summary (one line per adapter, then the first unmatched modules of each)."""
        out = [f"baked into {self.out_path}: {self.weights_changed} of {self.tensors_total} tensors changed "
               f"in {self.seconds:.2f} s (checkpoint parts: {', '.join(self.checkpoint_parts) or 'none found'})"]
        for a in self.adapters:
            out.append(f"  {a.name} @ {a.strength:g}: {len(a.applied)} modules applied, {len(a.unmatched)} unmatched")
            for label, reason in a.unmatched[:max_unmatched]:
                out.append(f"    unmatched {label}: {reason}")
            if len(a.unmatched) > max_unmatched:
                out.append(f"    ... and {len(a.unmatched) - max_unmatched} more")
        return out


def baked_weight(weight: torch.Tensor, patches: Sequence[Patch]) -> torch.Tensor:
    """`weight` with every patch added (`s * dW` into its rows), computed in float32, returned in weight's dtype.

    Modules carrying `dora_scale` are applied with `hadakron.ops.patched_weight` (norm of W + s*dW) in order.
    """
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(work_dtype, copy=True)
    for p in patches:
        region = w if p.rows is None else w[p.rows[0]:p.rows[1]]
        if p.transposed:
            region = region.T
        try:
            if "dora_scale" in p.params:
                region.copy_(patched_weight(region, p.params, p.strength, dtype=work_dtype))
            else:
                region.add_(delta_weight(p.params, tuple(region.shape), dtype=work_dtype), alpha=p.strength)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{p.label}: does not fit weight of shape {list(region.shape)}: {exc}") from exc
    return w.to(weight.dtype)


def plan_patches(index: CheckpointIndex, adapters: Sequence[tuple[AdapterFile, float]],
                 family: str | None = None) -> tuple[dict[str, list[Patch]], list[AdapterBakeReport]]:
    """Match every adapter module to a checkpoint weight: {tensor key: patches}, plus per-adapter reports."""
    if family is None and len(index.families) == 1:
        family = index.families[0]
    plan: dict[str, list[Patch]] = {}
    reports = []
    for adapter, strength in adapters:
        report = AdapterBakeReport(name=adapter.path.name, strength=float(strength))
        for m in name_modules(adapter.modules, family):
            reason, target = _match(index, m)
            if target is None:
                report.unmatched.append((m.label, reason))
                continue
            label = f"{adapter.path.name}: {m.file_key} -> {target.key}" + (
                f"[{target.rows[0]}:{target.rows[1]}]" if target.rows else "")
            plan.setdefault(target.key, []).append(Patch(target.rows, target.transposed, m.params, float(strength), label))
            report.applied.append(m.label)
        reports.append(report)
    return plan, reports


def _match(index: CheckpointIndex, m: NamedModule) -> tuple[str, WeightTarget | None]:
    if m.algorithm is None:
        return f"not a LoHa, LoKr or LoRA module (tensors: {', '.join(sorted(m.params))})", None
    if m.canonical is None:
        return "key not recognised for SDXL or Anima in any known layout", None
    target = index.targets.get(m.canonical)
    if target is None:
        parts = ", ".join(index.parts) or "no known parts"
        return f"no weight for {m.part} layer {m.dotted} in this checkpoint (it holds {parts})", None
    return "", target


def baked_metadata(base_metadata: Mapping[str, str], reports: Sequence[AdapterBakeReport],
                   adapters: Sequence[tuple[AdapterFile, float]]) -> dict[str, str]:
    """The base's metadata plus a record of what was baked in (appended to any earlier record)."""
    meta = dict(base_metadata)
    try:
        history = json.loads(meta.get(BAKED_METADATA_KEY, "[]"))
        if not isinstance(history, list):
            history = []
    except json.JSONDecodeError:
        history = []
    for report, (adapter, _) in zip(reports, adapters):
        history.append({
            "file": report.name,
            "strength": report.strength,
            "sshs_model_hash": adapter.metadata.get("sshs_model_hash", ""),
            "applied": len(report.applied),
            "unmatched": len(report.unmatched),
        })
    from hadakron import __version__
    meta[BAKED_METADATA_KEY] = json.dumps(history)
    meta["hadakron.version"] = __version__
    return meta


def bake_checkpoint(base_path: str | Path, adapters: Sequence[tuple[AdapterFile, float]], out_path: str | Path, *,
                    overwrite: bool = False, family: str | None = None,
                    on_tensor: Callable[[TensorEntry], None] | None = None) -> BakeReport:
    """Write `out_path` = `base_path` with each adapter baked in at its strength; report what matched.

    `base_path` is a safetensors SDXL single-file checkpoint, an Anima diffusion-model file (bare, `net.` or
    `model.diffusion_model.` prefix) or a Qwen3 text-encoder file. Raises ValueError when no module matches.
    """
    start = time.perf_counter()
    base, out = Path(base_path), Path(out_path)
    header = read_checkpoint_header(base)
    index = index_checkpoint({e.name: e.shape for e in header.entries})
    if not index.parts:
        raise ValueError(f"{base}: no SDXL, Anima DiT or Qwen3 weights recognised (expected keys such as "
                         f"'model.diffusion_model.input_blocks.0.0.weight', 'blocks.0.mlp.layer1.weight' or "
                         f"'model.layers.0.self_attn.q_norm.weight'); found e.g. {header.entries[0].name if header.entries else 'no tensors'!r}")
    plan, reports = plan_patches(index, adapters, family)
    if not plan:
        first = next((u for r in reports for u in r.unmatched), ("-", "no modules"))
        raise ValueError(f"{base}: none of the adapters' modules match a weight of this checkpoint "
                         f"(first: {first[0]}: {first[1]})")

    def transform(entry: TensorEntry, weight: torch.Tensor) -> torch.Tensor:
        return baked_weight(weight, plan[entry.name])

    rewrite_checkpoint(base, out, {key: transform for key in plan}, baked_metadata(header.metadata, reports, adapters),
                       overwrite=overwrite, on_tensor=on_tensor)
    return BakeReport(base_path=base, out_path=out, checkpoint_parts=dict(index.parts), adapters=reports,
                      weights_changed=len(plan), tensors_total=len(header.entries),
                      seconds=time.perf_counter() - start)

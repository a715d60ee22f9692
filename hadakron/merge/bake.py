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
from hadakron.io.safetensors_format import TensorEntry, read_header
from hadakron.merge.checkpoint_stream import IN_FLIGHT, rewrite_checkpoint
from hadakron.merge.checkpoint_targets import CheckpointIndex, WeightTarget, index_checkpoint
from hadakron.merge.module_names import NamedModule, adapter_modules, adapter_name, refused_message, target_refusal
from hadakron.merge.accumulate import add_delta_, prepare

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
    refused: list[tuple[str, str]] = field(default_factory=list)  # broken modules (also listed in unmatched)


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


class Workspace:
    """Reusable flat buffers by (role, dtype), grown on demand: a streamed bake allocates once, not per tensor."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def tensor(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        buf = self._buffers.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype)
            self._buffers[(role, dtype)] = buf
        return buf[:n].view(shape)


CHUNK_ELEMENTS = 1 << 18
"""float32 elements per row block of the streamed bake (1 MiB: the block stays in cache while adapters add to it)."""


def _fusable(weight: torch.Tensor, patches: Sequence[Patch]) -> bool:
    return (weight.dim() >= 1 and weight.numel() > 0 and weight.is_contiguous()
            and not any(p.transposed or "dora_scale" in p.params for p in patches))


def baked_weight(weight: torch.Tensor, patches: Sequence[Patch], workspace: Workspace | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` with every patch added (`s * dW` into its rows), computed in float32, returned in weight's dtype.

    Row block by row block: each block is converted to float32 once, every adapter adds its rows, and the block
    is rounded once into `out` (a new tensor when not given). Modules with `dora_scale` (applied with
    `hadakron.ops.patched_weight`, norm of W + s*dW, in order) and transposed targets take a whole-tensor path.
    """
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    shape = tuple(weight.shape)
    if out is None:
        out = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    if not _fusable(weight, patches):
        w = weight.to(work_dtype, copy=True)
        for p in patches:
            region = w if p.rows is None else w[p.rows[0]:p.rows[1]]
            if p.transposed:
                region = region.T
            try:
                add_delta_(region, p.params, p.strength)
            except (ValueError, RuntimeError) as exc:
                raise ValueError(f"{p.label}: does not fit weight of shape {list(region.shape)}: {exc}") from exc
        out.copy_(w)
        return out
    rows = shape[0]
    cols = weight.numel() // rows
    prepared = []
    for p in patches:
        p0, p1 = p.rows if p.rows is not None else (0, rows)
        try:
            prepared.append((p0, p1, prepare(p.params, p1 - p0, cols, work_dtype, weight.device), p.strength))
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{p.label}: does not fit weight of shape {[p1 - p0, *shape[1:]]}: {exc}") from exc
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    block = (workspace.tensor("block", (min(step, rows), cols), work_dtype) if workspace is not None
             else torch.empty(min(step, rows), cols, dtype=work_dtype, device=weight.device))
    w2, o2 = weight.view(rows, cols), out.view(rows, cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        b = block[: r1 - r0]
        b.copy_(w2[r0:r1])
        for p0, p1, acc, strength in prepared:
            lo, hi = max(r0, p0), min(r1, p1)
            if lo < hi:
                acc.add_rows_(b[lo - r0:hi - r0], lo - p0, hi - p0, strength)
        o2[r0:r1].copy_(b)
    return out


def plan_patches(index: CheckpointIndex, adapters: Sequence[tuple[AdapterFile, float]],
                 family: str | None = None, weight_shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> tuple[dict[str, list[Patch]], list[AdapterBakeReport]]:
    """Match every adapter module to a checkpoint weight: {tensor key: patches}, plus per-adapter reports.

    Broken modules (`module_names.target_refusal`, against the weight's shape when `weight_shapes` is given) are
    listed in the report's `refused` and `unmatched`, never patched."""
    if family is None and len(index.families) == 1:
        family = index.families[0]
    plan: dict[str, list[Patch]] = {}
    reports = []
    for adapter, strength in adapters:
        report = AdapterBakeReport(name=adapter_name(adapter), strength=float(strength))
        for m in adapter_modules(adapter, family):
            if m.refused and m.algorithm is not None:  # broken in itself: refused whether or not its layer is here
                report.unmatched.append((m.label, f"refused: {m.refused}"))
                report.refused.append((m.file_key, m.refused))
                continue
            reason, target = _match(index, m)
            if target is None:
                report.unmatched.append((m.label, reason))
                continue
            why = target_refusal(m, _region_shape(target, weight_shapes[target.key])
                                 if weight_shapes is not None and target.key in weight_shapes else None)
            if why:
                report.unmatched.append((m.label, f"refused: {why}"))
                report.refused.append((m.file_key, why))
                continue
            label = f"{adapter_name(adapter)}: {m.file_key} -> {target.key}" + (
                f"[{target.rows[0]}:{target.rows[1]}]" if target.rows else "")
            plan.setdefault(target.key, []).append(Patch(target.rows, target.transposed, m.params, float(strength), label))
            report.applied.append(m.label)
        reports.append(report)
    return plan, reports


def _region_shape(target: WeightTarget, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a patch of `target` adds into: its row block, transposed when the file stores it transposed."""
    if target.rows is not None:
        shape = (target.rows[1] - target.rows[0],) + tuple(shape[1:])
    return (shape[1], shape[0]) + tuple(shape[2:]) if target.transposed and len(shape) >= 2 else tuple(shape)


def _match(index: CheckpointIndex, m: NamedModule) -> tuple[str, WeightTarget | None]:
    if m.algorithm is None:
        return f"not a LoHa, LoKr or LoRA module (tensors: {', '.join(sorted(m.params))})", None
    if m.canonical is None:
        return "key not recognised for SDXL or Anima in any known layout", None
    if m.nonfinite_reason:
        return m.nonfinite_reason, None
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
                    on_tensor: Callable[[TensorEntry], None] | None = None, skip_bad: bool = False) -> BakeReport:
    """Write `out_path` = `base_path` with each adapter baked in at its strength; report what matched.

    `base_path` is a safetensors SDXL single-file checkpoint, an Anima diffusion-model file (bare, `net.` or
    `model.diffusion_model.` prefix) or a Qwen3 text-encoder file. Raises ValueError when no module matches, and,
    unless `skip_bad`, before writing anything when a module is broken (bad dtypes, shapes, alpha; named).
    """
    start = time.perf_counter()
    base, out = Path(base_path), Path(out_path)
    header = read_header(base)
    index = index_checkpoint({e.name: e.shape for e in header.entries})
    if not index.parts:
        raise ValueError(f"{base}: no SDXL, Anima DiT or Qwen3 weights recognised (expected keys such as "
                         f"'model.diffusion_model.input_blocks.0.0.weight', 'blocks.0.mlp.layer1.weight' or "
                         f"'model.layers.0.self_attn.q_norm.weight'); found e.g. {header.entries[0].name if header.entries else 'no tensors'!r}")
    plan, reports = plan_patches(index, adapters, family, {e.name: e.shape for e in header.entries})
    if not skip_bad:
        for r in reports:
            if r.refused:
                raise ValueError(refused_message(r.name, r.refused))
    if not plan:
        first = next((u for r in reports for u in r.unmatched), ("-", "no modules"))
        raise ValueError(f"{base}: none of the adapters' modules match a weight of this checkpoint "
                         f"(first: {first[0]}: {first[1]})")

    workspace = Workspace()
    calls = [0]

    def transform(entry: TensorEntry, weight: torch.Tensor) -> torch.Tensor:
        slot = calls[0] % (IN_FLIGHT + 1)  # results are written while the next IN_FLIGHT are computed
        calls[0] += 1
        out = workspace.tensor(f"out{slot}", entry.shape, weight.dtype)
        return baked_weight(weight, plan[entry.name], workspace, out=out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # row blocks are cache-sized: one compute thread beats barrier waits; I/O runs beside
    try:
        rewrite_checkpoint(base, out, {key: transform for key in plan},
                           baked_metadata(header.metadata, reports, adapters), overwrite=overwrite, on_tensor=on_tensor)
    finally:
        torch.set_num_threads(threads)
    return BakeReport(base_path=base, out_path=out, checkpoint_parts=dict(index.parts), adapters=reports,
                      weights_changed=len(plan), tensors_total=len(header.entries),
                      seconds=time.perf_counter() - start)

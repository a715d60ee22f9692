"""Combine LoHa/LoKr/LoRA adapters into one LoRA whose delta-W is exactly the weighted sum (or its best rank-k).

Each module is brought to its exact LoRA form (`hadakron.ops.lora_form`: LoHa rank r1*r2, LoKr rank R1*R2,
scale folded in), the forms of one layer are stacked along the rank with the strengths folded into `up`, and
the result is written as kohya `lora_up.weight` / `lora_down.weight` / `alpha` (= rank, so scale 1).
With a target rank, a truncated SVD keeps the best approximation and the relative Frobenius error is reported
per module and overall. Converting one adapter to LoRA is the one-adapter case.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from hadakron.arch import file_key, get_family, module_key
from hadakron.io import AdapterFile, build_metadata, with_hashes, write_adapter
from hadakron.merge.low_rank import reduce_pair, stack_pairs
from hadakron.merge.module_names import NamedModule, adapter_modules, adapter_name, refused_message, target_refusal
from hadakron.ops import lora_form, natural_shape


@dataclass(frozen=True)
class CombinedModule:
    """One output module: its key, canonical label, rank before and after, and its relative error."""

    module_key: str
    label: str
    sources: tuple[str, ...]
    rank_in: int
    rank: int
    norm_sq: float
    lost_sq: float

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.lost_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


@dataclass
class CombineResult:
    """The combined LoRA (file tensors and metadata), a report per module, and what was left out."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[CombinedModule]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    family: str | None = None
    layout: str = "kohya"
    target_rank: int | None = None

    @property
    def overall_error(self) -> float:
        """sqrt(sum of lost ||.||_F^2 / sum of ||dW||_F^2) over all modules: 0 for an exact result."""
        total = sum(m.norm_sq for m in self.modules)
        lost = sum(m.lost_sq for m in self.modules)
        return math.sqrt(lost / total) if total > 0 else 0.0

    @property
    def max_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def lines(self, worst: int = 5) -> list[str]:
        """Human-readable summary: module count, ranks, errors (the worst modules first), skipped modules."""
        ranks = [m.rank for m in self.modules]
        head = (f"{len(self.modules)} LoRA modules ({self.layout} layout), rank "
                f"{min(ranks, default=0)}..{max(ranks, default=0)}")
        if self.target_rank is None:
            out = [head + ": exact (no truncation)"]
        else:
            out = [head + f", target rank {self.target_rank}: relative Frobenius error overall "
                          f"{self.overall_error:.3e}, worst module {self.max_error:.3e}"]
            for m in sorted(self.modules, key=lambda m: -m.relative_error)[:worst]:
                if m.lost_sq > 0:
                    out.append(f"  {m.label}: rank {m.rank_in} -> {m.rank}, error {m.relative_error:.3e}")
        for label, reason in self.skipped:
            out.append(f"  skipped {label}: {reason}")
        return out

    def write(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the combined LoRA atomically (refuses to overwrite unless asked)."""
        return write_adapter(path, self.tensors, self.metadata, overwrite=overwrite)


def layer_shape(modules: Sequence[NamedModule]) -> tuple[int, ...]:
    """The best-known weight shape for one layer: a 4-D natural shape wins, then the family's full-size shape."""
    shapes = [natural_shape(m.params) for m in modules]
    numels = {math.prod(s) for s in shapes}
    outs = {s[0] for s in shapes}
    if len(numels) != 1 or len(outs) != 1:
        raise ValueError(f"{modules[0].label}: the adapters disagree on this layer's shape "
                         f"({', '.join(str(list(s)) for s in shapes)})")
    four_d = [s for s in shapes if len(s) == 4]
    if four_d:
        return four_d[0]
    m = modules[0]
    if m.canonical is not None:
        known = get_family(m.family).layer(m.part, m.dotted)
        if known is not None and math.prod(known.shape) == math.prod(shapes[0]) and known.shape[0] == shapes[0][0]:
            return tuple(known.shape)
    return shapes[0]


def lora_tensors(up: torch.Tensor, down: torch.Tensor, shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors for a layer of `shape`: conv layers get (R, in, kh, kw) down and (out, R, 1, 1) up."""
    r = int(up.shape[1])
    if len(shape) == 4:
        up_t = up.reshape(int(shape[0]), r, 1, 1)
        down_t = down.reshape(r, int(shape[1]), int(shape[2]), int(shape[3]))
    else:
        up_t, down_t = up, down
    return {"lora_up.weight": up_t.contiguous(), "lora_down.weight": down_t.contiguous(),
            "alpha": torch.tensor(float(r))}


REFUSED = "refused: "
"""Prefix of a skipped module's reason when it is broken (not merely unsupported)."""


def _group(adapters: Sequence[tuple[AdapterFile, float]], family: str | None
           ) -> tuple[dict[object, list[tuple[NamedModule, float, str]]], list[tuple[str, str]]]:
    groups: dict[object, list[tuple[NamedModule, float, str]]] = {}
    skipped: list[tuple[str, str]] = []
    for adapter, strength in adapters:
        name = adapter_name(adapter)
        for m in adapter_modules(adapter, family):
            if m.algorithm is None:
                skipped.append((f"{name}: {m.file_key}", f"not a LoHa, LoKr or LoRA module ({', '.join(sorted(m.params))})"))
            elif (why := target_refusal(m)) is not None:
                skipped.append((f"{name}: {m.file_key}", f"{REFUSED}{why}"))
            elif "dora_scale" in m.params:
                skipped.append((f"{name}: {m.file_key}", "DoRA (dora_scale) is not additive, so it has no exact LoRA "
                                                        "form; bake it into the checkpoint instead"))
            elif m.canonical is None:
                skipped.append((f"{name}: {m.file_key}", "key not recognised for SDXL or Anima; cannot name it in "
                                                        "the output layout"))
            elif m.nonfinite_reason:
                skipped.append((f"{name}: {m.file_key}", m.nonfinite_reason))
            else:
                groups.setdefault(m.canonical, []).append((m, float(strength), name))
    return groups, skipped


def combine(adapters: Sequence[tuple[AdapterFile, float]], *, rank: int | None = None, layout: str = "kohya",
            dtype: torch.dtype = torch.float32, family: str | None = None, title: str | None = None,
            on_module: Callable[[str], None] | None = None, skip_bad: bool = False) -> CombineResult:
    """One LoRA whose delta-W is sum_i s_i * dW_i per layer: exact without `rank`, best rank-`rank` with it.

    A broken module (bad dtypes, shapes or alpha, or a delta-W that does not fit its layer) raises ValueError naming
    it, unless `skip_bad`: then it is skipped and listed in `skipped` with the reason."""
    if not adapters:
        raise ValueError("combine: no adapters given")
    groups, skipped = _group(adapters, family)
    refused = [(label, why[len(REFUSED):]) for label, why in skipped if why.startswith(REFUSED)]
    if refused and not skip_bad:
        raise ValueError(refused_message("combine", refused))
    if not groups:
        first = skipped[0] if skipped else ("-", "no modules")
        raise ValueError(f"combine: no module could be combined (first: {first[0]}: {first[1]})")
    tensors: dict[str, torch.Tensor] = {}
    modules: list[CombinedModule] = []
    families = set()
    for (fam, part, dotted), members in groups.items():
        families.add(fam)
        shape = layer_shape([m for m, _, _ in members])
        pairs = []
        for m, strength, _ in members:
            up, down = lora_form(m.params, shape, dtype=torch.float64)
            pairs.append((up, down, strength))
        up, down = stack_pairs(pairs)
        reduced = reduce_pair(up, down, rank)
        key = module_key(fam, part, dotted, layout)
        for param, t in lora_tensors(reduced.up.to(dtype), reduced.down.to(dtype), shape).items():
            tensors[file_key(fam, part, dotted, param, layout)] = t
        modules.append(CombinedModule(key, members[0][0].label, tuple(n for _, _, n in members),
                                      reduced.rank_in, reduced.rank, reduced.norm_sq, reduced.lost_sq))
        if on_module is not None:
            on_module(key)
    result = CombineResult(tensors=tensors, metadata={}, modules=modules, skipped=skipped,
                           family=families.pop() if len(families) == 1 else None, layout=layout, target_rank=rank)
    result.metadata = combined_metadata(result, adapters, title=title)
    return result


def combined_metadata(result: CombineResult, adapters: Sequence[tuple[AdapterFile, float]],
                      title: str | None = None) -> dict[str, str]:
    """kohya/modelspec metadata of a LoRA file plus what went in, at which strengths, and the errors."""
    ranks = {m.module_key: m.rank for m in result.modules}
    record = {
        "hadakron.combined_from": json.dumps([
            {"file": adapter_name(a), "strength": float(s), "sshs_model_hash": a.metadata.get("sshs_model_hash", ""),
             "algorithm": a.metadata.get("hadakron.algorithm") or a.metadata.get("ss_network_module", "")}
            for a, s in adapters]),
        "hadakron.combine_rank": "exact" if result.target_rank is None else str(result.target_rank),
        "hadakron.combine_relative_error": f"{result.overall_error:.6e}",
        "hadakron.combine_module_errors": json.dumps({m.module_key: round(m.relative_error, 8)
                                                      for m in result.modules if m.lost_sq > 0}, sort_keys=True),
    }
    if result.family is None:
        return record
    max_rank = max(ranks.values(), default=0)
    meta = build_metadata(algorithm="lora", family=result.family, network_dim=max_rank, network_alpha=float(max_rank),
                          module_ranks=ranks, module_alphas={k: float(r) for k, r in ranks.items()},
                          title=title or "hadakron combined LoRA", tensors=None)
    meta.update(record)
    return with_hashes(result.tensors, meta)

"""Training batches: latents plus their conditioning, drawn with the caller's generator (reproducible per step).

Datasets arrive as groups (a latent batch per input, e.g. one per image from ComfyUI's MakeTrainingDataset or one per
resolution from ResolutionBucket) with a conditioning group each: `split_batches` and `pair_conditioning` turn them
into one latent and one conditioning per sample; `shape_buckets` groups samples by latent shape, and a batch is drawn
from one bucket only (never stacking different sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

Tensor = torch.Tensor


@dataclass
class Batch:
    """Clean latents `x0` (B, C, ...) and the conditioning for them (model-specific; the model call reads it)."""

    x0: Tensor
    cond: Any = None
    indices: tuple[int, ...] = ()


class BatchSource(Protocol):
    """Anything that draws a batch of `batch_size` samples using only `generator` for randomness."""

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch: ...


def default_collate(conds: list[Any]) -> Any:
    """Stack tensors of one shape; otherwise keep the list (the model call knows its conditioning)."""
    if conds and all(isinstance(c, Tensor) for c in conds) and len({tuple(c.shape) for c in conds}) == 1:
        return torch.stack(conds)
    return conds


def split_batches(batches: Sequence[Tensor]) -> list[Tensor]:
    """Every batch (B, C, ...) split along its first dim: one (C, ...) tensor per sample, in order."""
    samples = [sample for batch in batches for sample in batch.unbind(0)]
    if not samples:
        sizes = [int(b.shape[0]) for b in batches]
        raise ValueError(f"the dataset has no latents: expected at least one sample, found {len(batches)} latent "
                         f"batch(es) holding {sizes or 'nothing'}")
    return samples


def pair_conditioning(groups: Sequence[Sequence[Any]], sizes: Sequence[int]) -> list[Any]:
    """One conditioning per sample, from conditioning `groups` and the sample count of each latent group (`sizes`).

    Accepted: one conditioning in all (shared by every sample); as many groups as latent groups, each with one
    conditioning per sample of its latent group or one for the whole group (MakeTrainingDataset, ResolutionBucket);
    or, when either side is a single group, one conditioning per sample in order. Anything else is refused, since
    pairing it in order would give samples another sample's conditioning (e.g. ResolutionBucket's latents with the
    unbucketed conditioning list).
    """
    counts = [len(g) for g in groups]
    total, wanted = sum(counts), sum(sizes)
    if total == 0:
        raise ValueError(f"the dataset has no conditioning: expected 1 or {wanted} (one per latent), found "
                         f"{len(groups)} empty conditioning input(s)")
    entries = [c for g in groups for c in g]
    if total == 1:
        return entries * wanted
    if len(groups) == len(sizes) > 1:
        paired = []
        for i, (group, size) in enumerate(zip(groups, sizes)):
            if len(group) not in (1, size):
                raise ValueError(f"latent group {i} holds {size} sample(s) but its conditioning has {len(group)}: "
                                 f"expected 1 or {size} (conditioning groups {counts}, latent groups {list(sizes)})")
            paired += list(group) * size if len(group) == 1 else list(group)
        return paired
    if len(groups) > 1 and len(sizes) > 1:
        raise ValueError(f"the latents come in {len(sizes)} groups {list(sizes)} but the conditioning in "
                         f"{len(groups)} groups {counts}: expected the same grouping (connect latents and conditioning "
                         f"from the same node, e.g. both outputs of ResolutionBucket)")
    if total != wanted:
        raise ValueError(f"got {total} conditionings for {wanted} latents: expected 1, or one per latent")
    return entries


def shape_buckets(latents: Sequence[Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Sample indices grouped by latent shape (resolution buckets), buckets in order of first appearance."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, latent in enumerate(latents):
        buckets.setdefault(tuple(latent.shape), []).append(i)
    return buckets


def bucket_summary(latents: Sequence[Tensor]) -> str:
    """'N samples in K buckets: 4x8x8 (2), 4x8x12 (3)': what a run trains on, for logs and the node's text."""
    buckets = shape_buckets(latents)
    parts = ", ".join(f"{'x'.join(map(str, shape))} ({len(idx)})" for shape, idx in buckets.items())
    return f"{len(latents)} samples in {len(buckets)} bucket{'s' if len(buckets) != 1 else ''}: {parts}"


class LatentDataset:
    """A list of latents (each (C, ...) without batch dim) and optional per-sample conditioning.

    A batch holds samples of one latent shape (resolution buckets): the first index is drawn uniformly (so a bucket
    is picked in proportion to its size), the rest uniformly without replacement among the samples of that shape.
    A bucket smaller than `batch_size` gives a batch of all its samples (as ComfyUI's own trainer does), never a
    sample twice.
    """

    def __init__(
        self,
        latents: Sequence[Tensor] | Tensor,
        conds: Sequence[Any] | None = None,
        *,
        collate: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        self.latents = list(latents.unbind(0) if isinstance(latents, Tensor) else latents)
        if not self.latents:
            raise ValueError("the dataset has no latents")
        if conds is not None and len(conds) not in (1, len(self.latents)):
            raise ValueError(
                f"got {len(self.latents)} latents but {len(conds)} conditionings; expected 1 or {len(self.latents)}"
            )
        self.conds = list(conds) if conds is not None else None
        self.collate = collate
        self._by_shape = shape_buckets(self.latents)

    def __len__(self) -> int:
        return len(self.latents)

    def cond_of(self, index: int) -> Any:
        """The conditioning of sample `index` (a single shared conditioning serves every sample)."""
        if self.conds is None:
            return None
        return self.conds[0] if len(self.conds) == 1 else self.conds[index]

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """Draw min(`batch_size`, bucket size) indices of one latent shape with `generator`; the collated batch."""
        n = len(self.latents)
        first = int(torch.randint(0, n, (1,), generator=generator, device=generator.device).item())
        pool = [i for i in self._by_shape[tuple(self.latents[first].shape)] if i != first]
        indices = [first]
        while len(indices) < batch_size and pool:
            pick = int(torch.randint(0, len(pool), (1,), generator=generator, device=generator.device).item())
            indices.append(pool.pop(pick))
        x0 = torch.stack([self.latents[i] for i in indices])
        cond = None if self.conds is None else self.collate([self.cond_of(i) for i in indices])
        return Batch(x0=x0, cond=cond, indices=tuple(indices))

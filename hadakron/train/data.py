"""Training batches: latents plus their conditioning, drawn with the caller's generator (reproducible per step)."""
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


class LatentDataset:
    """A list of latents (each (C, ...) without batch dim) and optional per-sample conditioning.

    A batch holds samples of one latent shape (resolution buckets): the first index is drawn uniformly,
    the rest uniformly among the samples of that shape (without replacement while there are enough).
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
        self._by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, latent in enumerate(self.latents):
            self._by_shape.setdefault(tuple(latent.shape), []).append(i)

    def __len__(self) -> int:
        return len(self.latents)

    def cond_of(self, index: int) -> Any:
        """The conditioning of sample `index` (a single shared conditioning serves every sample)."""
        if self.conds is None:
            return None
        return self.conds[0] if len(self.conds) == 1 else self.conds[index]

    def draw(self, generator: torch.Generator, batch_size: int) -> Batch:
        """Draw `batch_size` indices of one latent shape with `generator`; return the collated batch."""
        n = len(self.latents)
        first = int(torch.randint(0, n, (1,), generator=generator, device=generator.device).item())
        pool = [i for i in self._by_shape[tuple(self.latents[first].shape)] if i != first]
        indices = [first]
        while len(indices) < batch_size:
            if not pool:
                pool = list(self._by_shape[tuple(self.latents[first].shape)])
            pick = int(torch.randint(0, len(pool), (1,), generator=generator, device=generator.device).item())
            indices.append(pool.pop(pick))
        x0 = torch.stack([self.latents[i] for i in indices])
        cond = None if self.conds is None else self.collate([self.cond_of(i) for i in indices])
        return Batch(x0=x0, cond=cond, indices=tuple(indices))

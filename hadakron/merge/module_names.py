"""Name an adapter file's modules canonically, (family, part, dotted), so files in any key layout line up."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from hadakron.arch import detect_family, parse_module_key, parse_module_keys
from hadakron.io.module_checks import nonfinite_applied, refusal
from hadakron.ops import algorithm_of

Params = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class NamedModule:
    """One module of an adapter file: its key in the file, canonical name (None if unknown), algorithm, tensors."""

    file_key: str
    family: str | None
    part: str | None
    dotted: str | None
    layout: str | None
    algorithm: str | None
    params: Params
    nonfinite: tuple[str, ...] = ()  # tensors hadakron.ops applies that hold NaN/Inf: the module must not apply
    refused: str | None = None  # why its tensors cannot be applied (io.module_specs.refusal: dtypes, shapes, alpha)

    @property
    def nonfinite_reason(self) -> str | None:
        """Why the module is skipped when it holds NaN/Inf in a tensor that would be applied, else None."""
        return f"{', '.join(self.nonfinite)} hold NaN/Inf values; module skipped" if self.nonfinite else None

    @property
    def canonical(self) -> tuple[str, str, str] | None:
        """(family, part, dotted), or None when hadakron.arch does not know the key."""
        if self.family is None or self.part is None or self.dotted is None:
            return None
        return (self.family, self.part, self.dotted)

    @property
    def label(self) -> str:
        """Readable name for reports: `family/part dotted` or the file key."""
        c = self.canonical
        return f"{c[0]}/{c[1]} {c[2]}" if c else self.file_key


def adapter_name(adapter) -> str:
    """The adapter's file name for reports, or "in-memory adapter" when it was never saved (path None)."""
    path = getattr(adapter, "path", None)
    return Path(path).name if path else "in-memory adapter"


def file_family(keys: list[str], hint: str | None = None) -> str | None:
    """The family an adapter file's keys belong to (the hint wins when given)."""
    if hint is not None:
        return hint
    return detect_family(keys).family  # None for keys of no known family: parsing then tries every family


def name_modules(modules: Mapping[str, Params], family: str | None = None,
                 nonfinite: Mapping[str, Mapping[str, object]] | None = None) -> list[NamedModule]:
    """Canonical names for each module of a file (grouped tensors), in file order; `nonfinite` is the file's NaN/Inf
    scan (`AdapterFile.nonfinite_tensors()`), marking the modules that must not be applied."""
    fam = file_family([f"{key}.{param}" for key, params in modules.items() for param in params], family)
    named = []
    in_family = parse_module_keys(modules, fam) if fam is not None else {}
    for key, params in modules.items():
        parsed = in_family.get(key)
        if parsed is None:
            parsed = parse_module_key(key)
        fam_k, part, dotted, layout = parsed if parsed is not None else (None, None, None, None)
        bad = tuple(nonfinite_applied(params, nonfinite.get(key))) if nonfinite else ()
        algorithm = algorithm_of(params)
        named.append(NamedModule(key, fam_k, part, dotted, layout, algorithm, params, bad,
                                 refusal(params) if algorithm is not None else None))
    return named


def target_refusal(m: NamedModule, weight_shape: tuple[int, ...] | None = None) -> str | None:
    """Why module `m` must not be applied (to a weight of `weight_shape`, when the target is known): its own refusal,
    or a delta-W of another shape / a dora_scale that fits neither side of that weight; None when it applies.
    Combine and convert have no target model (files of any model size are fine), bake has the checkpoint's."""
    if m.refused:
        return m.refused
    return refusal(m.params, tuple(weight_shape)) if weight_shape is not None and m.algorithm else None


def refused_message(name: str, refused: list[tuple[str, str]]) -> str:
    """One line naming the refused modules of adapter `name` (the first three with their reasons)."""
    shown = "; ".join(f"{label}: {why}" for label, why in refused[:3])
    more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
    return (f"{name}: {len(refused)} broken module{'s' if len(refused) != 1 else ''} refused ({shown}{more}); "
            f"skip them with skip_bad=True (CLI: --skip-bad)")


def adapter_modules(adapter, family: str | None = None) -> list[NamedModule]:
    """`name_modules` of an AdapterFile (or anything with `.modules`), with its NaN/Inf scan when it has one."""
    scan = adapter.nonfinite_tensors() if hasattr(adapter, "nonfinite_tensors") else None
    return name_modules(adapter.modules, family, scan)

"""Which family, parts and layout an adapter file (its keys) or a live model (its module names) belongs to.

Detection counts how many modules name a known layer of each family and part; it never guesses names.
Every result carries readable `reasons`, and `DetectResult.require(...)` turns a wrong family or a wrong
algorithm (a LoRA file where LoHa/LoKr was asked) into a clear error.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from hadakron.arch.family import Family
from hadakron.arch.layouts import (FAMILIES, LAYOUTS, LAYOUT_TITLES, get_family, join_key, module_key,
                                   parse_module_keys, split_key)
from hadakron.ops.shape_rules import algorithm_of

ALGORITHM_TITLES = {"loha": "LoHa", "lokr": "LoKr", "lora": "LoRA", "diff": "full diff", "other": "unknown"}


@dataclass
class DetectResult:
    """Outcome of detection. `counts[family][part]` = modules found; `modules` = module key -> (part, dotted).

    `layout` is None for live models (and for files that match nothing); `prefixes[part]` is the module
    name prefix of each part in a live model (e.g. `diffusion_model.`).
    """

    family: str | None
    parts: tuple[str, ...]
    layout: str | None
    reasons: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    algorithms: dict[str, int] = field(default_factory=dict)
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    prefixes: dict[str, str] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)  # stacked blocks found per part (Anima unet: blocks.N + 1)

    def summary(self) -> str:
        """One line: family, parts, layout and algorithms."""
        if self.family is None:
            return "unknown family: " + "; ".join(self.reasons)
        fam = get_family(self.family)
        parts = ", ".join(f"{fam.part_titles[p]} ({self.counts[self.family][p]})" for p in self.parts)
        algos = ", ".join(f"{n} {ALGORITHM_TITLES.get(a, a)}" for a, n in sorted(self.algorithms.items()))
        layout = f"; layout {LAYOUT_TITLES.get(self.layout, self.layout)}" if self.layout else ""
        return f"{fam.title}: {parts}{layout}" + (f"; {algos}" if algos else "")

    def require(self, family: str | None = None, algorithms: Iterable[str] | None = None, what: str = "file") -> None:
        """Raise ValueError with a clear message when the family or the adapter algorithm is not the wanted one."""
        if family is not None:
            want = get_family(family)
            if self.family != want.name:
                raise ValueError(f"{what} is not an {want.title} adapter: {describe_other(self, want)}")
        if algorithms is not None:
            wanted = set(algorithms)
            found = {a for a, n in self.algorithms.items() if n}
            if not found & wanted:
                have = ", ".join(f"{n} {ALGORITHM_TITLES.get(a, a)} modules{_ALGO_HINT.get(a, '')}"
                                 for a, n in sorted(self.algorithms.items())) or "no adapter modules"
                names = "/".join(ALGORITHM_TITLES.get(a, a) for a in sorted(wanted))
                raise ValueError(f"{what} holds {have}, no {names} modules; "
                                 f"use a loader for its algorithm (e.g. ComfyUI's LoraLoader for LoRA)")


_ALGO_HINT = {"lora": " (lora_up/lora_down)", "loha": " (hada_*)", "lokr": " (lokr_*)", "diff": " (diff)"}


def describe_other(result: DetectResult, want: Family) -> str:
    """'file has 722 SDXL UNet modules (e.g. input_blocks...), none of Anima's'."""
    if result.family is None:
        return f"no key names a layer of {want.title} or of any other known family ({'; '.join(result.reasons)})"
    fam = get_family(result.family)
    pieces = []
    for part in result.parts:
        example = next((d for p, d in result.modules.values() if p == part), "")
        pieces.append(f"{result.counts[fam.name][part]} {fam.title} {fam.part_titles[part]} modules (e.g. {example})")
    return f"it has {', '.join(pieces)}, none of {want.title}'s"


def _algorithm(params: set[str]) -> str:
    """`hadakron.ops.algorithm_of`, else "diff" for LyCORIS full/norm diffs, else "other"."""
    return algorithm_of(dict.fromkeys(params)) or ("diff" if params & {"diff", "diff_b", "set_weight", "w_norm", "b_norm"}
                                                  else "other")


def detect_family(keys: Iterable[str]) -> DetectResult:
    """Family, parts and layout of an adapter file from its keys, with the reasons.

    Each key is split once and grouped by module; each module key is resolved once per family
    (`parse_module_keys`: what `parse_keys` does for every key of it) and spelled once per candidate layout."""
    keys = list(keys)
    split: dict[str, tuple[str, str]] = {}
    unsplit: list[str] = []  # keys with no adapter tensor name: unknown to every family
    groups: dict[str, list[tuple[str, str]]] = {}  # module key -> [(key, param)], modules in first-key order
    for k in keys:
        if k in split:
            continue
        try:
            mk, param = split[k] = split_key(k)
        except ValueError:
            unsplit.append(k)
            continue
        group = groups.get(mk)
        if group is None:
            groups[mk] = [(k, param)]
        else:
            group.append((k, param))
    best = None
    counts: dict[str, dict[str, int]] = {}
    per_family = {}
    for name, fam in FAMILIES.items():
        hits = parse_module_keys(groups, fam)
        per_family[name] = hits
        modules = {(h[1], h[2]) for h in hits.values() if h is not None}
        counts[name] = {part: sum(1 for m in modules if m[0] == part) for part in fam.parts}
        total = len(modules)
        if total and (best is None or total > sum(counts[best].values())):
            best = name
    if best is None:
        sample = ", ".join(repr(k) for k in keys[:3])
        return DetectResult(None, (), None, [f"none of {len(keys)} keys names a layer of "
                                             f"{' or '.join(f.title for f in FAMILIES.values())} (e.g. {sample})"],
                            counts=counts, unknown=keys)
    fam = FAMILIES[best]
    hits = per_family[best]
    # (module key, (family, part, dotted, layout), [(key, param)]) of the known modules, in first-key order
    matched = [(mk, hits[mk], pairs) for mk, pairs in groups.items() if hits[mk] is not None]
    unknown = unsplit + ([k for k, (mk, _) in split.items() if hits[mk] is None] if len(matched) < len(groups) else [])
    parts = tuple(p for p in fam.parts if counts[best][p])
    reasons = [f"{counts[best][p]} modules name {fam.title} {fam.part_titles[p]} layers" for p in parts]
    for other, c in counts.items():
        if other != best and sum(c.values()):
            reasons.append(f"{sum(c.values())} modules would also fit {FAMILIES[other].title}: mixed or ambiguous file")
    if unknown:
        reasons.append(f"{len(unknown)} keys name no known {fam.title} layer (e.g. {unknown[0]!r})")

    layout = None
    for candidate in LAYOUTS:
        if _spelled_in(fam, matched, candidate):
            layout = candidate
            break
    if layout is None:
        votes = Counter(hits[mk][3] for k, (mk, _) in split.items() if hits[mk] is not None)  # in key order
        layout = votes.most_common(1)[0][0]
        if len(votes) > 1:
            reasons.append("keys mix layouts: " + ", ".join(f"{n} {lay}" for lay, n in votes.most_common()))
        else:
            reasons.append(f"layout {layout} in a non-canonical spelling")
    modules: dict[str, tuple[str, str]] = {}
    algos: Counter[str] = Counter()
    algorithm_of_names: dict[frozenset[str], str] = {}  # modules alike (same tensor names): one lookup
    for mk, hit, pairs in matched:
        modules[mk] = (hit[1], hit[2])
        names = frozenset(param for _, param in pairs)
        algo = algorithm_of_names.get(names)
        if algo is None:
            algo = algorithm_of_names[names] = _algorithm(set(names))
        algos[algo] += 1
    depths = {p: fam.depth_of(p, (d for part, d in modules.values() if part == p)) for p in fam.stacks}
    return DetectResult(best, parts, layout, reasons, counts=counts, algorithms=dict(algos),
                        modules=modules, unknown=unknown, depths=depths)


def _spelled_in(fam: Family, matched: list[tuple[str, tuple[str, str, str, str], list[tuple[str, str]]]],
                layout: str) -> bool:
    """Whether every key of the `matched` modules is exactly `file_key(fam, part, dotted, param, layout)` (False
    where the layout cannot spell one of them); each module is spelled once, each parameter name once."""
    suffixes: dict[str, str] = {}  # param -> "." + its spelling in `layout`
    try:
        for _mk, hit, pairs in matched:
            module = module_key(fam, hit[1], hit[2], layout)
            for key, param in pairs:
                suffix = suffixes.get(param)
                if suffix is None:
                    suffix = suffixes[param] = join_key("", param, layout)
                if module + suffix != key:
                    return False
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------- live models
_MODEL_PREFIXES = {
    "unet": ("", "diffusion_model.", "model.diffusion_model.", "net."),
    "te1": ("", "transformer.", "clip_l.transformer.", "cond_stage_model.clip_l.transformer.",
            "conditioner.embedders.0.transformer."),
    "te2": ("", "transformer.", "clip_g.transformer.", "cond_stage_model.clip_g.transformer."),
    "te": ("", "model.", "transformer.model.", "qwen3_06b.transformer.model.",
           "cond_stage_model.qwen3_06b.transformer.model."),
}


def _names(named_modules: Iterable[tuple[str, object]] | Iterable[str] | "torch.nn.Module") -> list[str]:
    if callable(getattr(named_modules, "named_modules", None)):  # an nn.Module (duck-typed: no torch import here)
        return [n for n, _ in named_modules.named_modules()]
    out = []
    for item in named_modules:
        out.append(item if isinstance(item, str) else item[0])
    return out


def match_part_names(family: str | Family, part: str, names: Iterable[str]) -> tuple[str, dict[str, str]]:
    """`(prefix, {dotted: module name})`: the name prefix under which most of `part`'s layers are found."""
    fam = get_family(family)
    names = list(names)
    best: tuple[str, dict[str, str]] = ("", {})
    for prefix in _MODEL_PREFIXES.get(part, ("",)):  # stacked blocks (Anima blocks.N) count at any depth
        found = {n[len(prefix):]: n for n in names if n.startswith(prefix) and fam.knows(part, n[len(prefix):])}
        if len(found) > len(best[1]):
            best = (prefix, found)
    return best


def detect_model_family(named_modules: Iterable[tuple[str, object]] | Iterable[str] | "torch.nn.Module") -> DetectResult:
    """Family and parts of a live model from its module names (ComfyUI's `diffusion_model.` etc. accepted).

    SDXL CLIP-L and CLIP-G share names; when the same names match both, a model with names only CLIP-G
    has (layers 12..31, text_projection) is CLIP-G, otherwise CLIP-L.
    """
    names = _names(named_modules)
    counts: dict[str, dict[str, int]] = {}
    found_parts: dict[str, dict[str, str]] = {}
    depths: dict[str, dict[str, int]] = {}
    for fname, fam in FAMILIES.items():
        counts[fname], found_parts[fname], depths[fname] = {}, {}, {}
        for part in fam.parts:
            prefix, found = match_part_names(fam, part, names)
            counts[fname][part] = len(found)
            found_parts[fname][part] = prefix
            if part in fam.stacks:
                depths[fname][part] = fam.depth_of(part, found)
    # CLIP-L/CLIP-G: keep the one with the larger coverage when both match the same names
    if counts["sdxl"]["te1"] and counts["sdxl"]["te2"] and found_parts["sdxl"]["te1"] == found_parts["sdxl"]["te2"]:
        drop = "te1" if counts["sdxl"]["te2"] > counts["sdxl"]["te1"] else "te2"
        counts["sdxl"][drop] = 0
    totals = {f: sum(c.values()) for f, c in counts.items()}
    best = max(totals, key=lambda f: totals[f])
    if totals[best] == 0:
        sample = ", ".join(repr(n) for n in names[1:4])
        return DetectResult(None, (), None, [f"no module of the model ({len(names)} names, e.g. {sample}) "
                                             f"is a known SDXL or Anima layer"], counts=counts)
    fam = FAMILIES[best].with_depth(depths[best]) if depths[best] else FAMILIES[best]  # listed at the model's depth
    parts = tuple(p for p in fam.parts if counts[best][p])
    reasons = [f"{counts[best][p]} of {len(fam.layers[p])} {fam.title} {fam.part_titles[p]} layers found"
               + (f" ({depths[best][p]} blocks)" if p in depths[best] else "")
               + (f" under prefix {found_parts[best][p]!r}" if found_parts[best][p] else "") for p in parts]
    return DetectResult(best, parts, None, reasons, counts=counts,
                        prefixes={p: found_parts[best][p] for p in parts}, depths=depths[best])


"""Match an adapter file's modules to a model's layers and say what matched, what did not and why.

Pure (no comfy): the caller gives the file's modules and metadata, the model family and the model's layer
shapes keyed by `(part, dotted)`. The result (`LoadReport`) drives the loader's patches and is rendered as
text (node UI) and as a dict (JSON for the frontend).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from hadakron.arch import Family, get_family, parse_module_key, parse_module_keys
from hadakron.io import module_specs
from hadakron.io.module_checks import NonfiniteTensors, nonfinite_applied, nonfinite_tensors, refusal, specs_of
from hadakron.ops import algorithm_of, alpha_of, module_rank, module_scale, natural_shape

Params = Mapping[str, torch.Tensor]
Resolver = Callable[[str], "tuple[str, str, str] | None"]

# Metadata keys worth showing (kohya ss_*, LyCORIS, modelspec); everything else stays in the file.
TRAINING_METADATA_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_sd_model_name", "ss_steps", "ss_max_train_steps", "ss_epoch",
    "ss_num_train_images", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_training_comment",
    "ss_output_name", "ss_training_started_at", "modelspec.architecture", "modelspec.title",
    "hadakron.config",
)
LORA_LOADER_HINT = "use ComfyUI's LoraLoader (or 'Load LoRA') for LoRA files"
ALGORITHM_NAMES = {"loha": "LoHa", "lokr": "LoKr", "lora": "LoRA"}


@dataclass
class MatchedModule:
    """A file module that will patch one model weight."""

    module_key: str
    part: str
    dotted: str
    block: str
    algorithm: str
    layout: str
    shape: tuple[int, ...]
    rank: int | None
    alpha: float | None
    scale: float
    params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.module_key, "part": self.part, "layer": self.dotted, "block": self.block,
                "algorithm": self.algorithm, "layout": self.layout, "shape": list(self.shape),
                "rank": self.rank, "alpha": _json_number(self.alpha), "scale": _json_number(self.scale)}


@dataclass
class UnmatchedKey:
    """A file module (or key) that is not applied, with the reason in words and the shapes when they differ."""

    key: str
    kind: str  # unknown_module | not_in_model | part_not_loaded | shape_mismatch | unsupported_algorithm | bad_tensors | nonfinite
    reason: str
    expected: tuple[int, ...] | None = None
    found: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        d = {"key": self.key, "kind": self.kind, "reason": self.reason}
        if self.expected is not None:
            d["expected"] = list(self.expected)
        if self.found is not None:
            d["found"] = list(self.found)
        return d


@dataclass
class LoadReport:
    """What a loader did with one file for one model."""

    source: str
    family: str
    file_family: str | None
    layouts: list[str]
    matched: list[MatchedModule]
    unmatched: list[UnmatchedKey]
    problems: list[str]
    training: dict[str, object]
    loaded_parts: tuple[str, ...]
    strengths: dict[str, float] = field(default_factory=dict)
    block_weights: str = ""
    patches_added: int = 0
    zero_strength: int = 0  # matched modules left out because their (block-weighted) strength is 0
    delta_norms: dict | None = None  # ||s*strength*dW||_F per block (hadakron.delta_norms.heatmap_payload), set by the loader
    depths: dict[str, int] = field(default_factory=dict)  # stacked blocks of the model per part (Anima unet: blocks.N)

    # ------------------------------------------------------------ summaries
    def counts_by_part(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.matched:
            out[m.part] = out.get(m.part, 0) + 1
        return out

    def counts_by_block(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for m in self.matched:
            blocks = out.setdefault(m.part, {})
            blocks[m.block] = blocks.get(m.block, 0) + 1
        return out

    def counts_by_algorithm(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.matched:
            out[m.algorithm] = out.get(m.algorithm, 0) + 1
        return out

    def total_modules(self) -> int:
        return len(self.matched) + len(self.unmatched)

    # ------------------------------------------------------------ renderings
    def to_dict(self) -> dict:
        """JSON-ready dict (the frontend reads it from the node's `hadakron_report` UI field)."""
        return {
            "source": self.source,
            "family": self.family,
            "file_family": self.file_family,
            "layouts": list(self.layouts),
            "loaded_parts": list(self.loaded_parts),
            "total_modules": self.total_modules(),
            "matched_count": len(self.matched),
            "unmatched_count": len(self.unmatched),
            "by_part": self.counts_by_part(),
            "by_block": self.counts_by_block(),
            "by_algorithm": self.counts_by_algorithm(),
            "matched": [m.to_dict() for m in self.matched],
            "unmatched": [u.to_dict() for u in self.unmatched],
            "problems": list(self.problems),
            "training": dict(self.training),
            "strengths": dict(self.strengths),
            "block_weights": self.block_weights,
            "patches_added": self.patches_added,
            "zero_strength": self.zero_strength,
            "delta_norms": self.delta_norms,
            "depths": dict(self.depths),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)

    def to_text(self, *, max_unmatched: int = 40) -> str:
        """Short human-readable report for the node's UI text and `report` output."""
        lines = [f"{self.source}: {len(self.matched)}/{self.total_modules()} modules applied "
                 f"({_fmt_counts({ALGORITHM_NAMES.get(k, k): v for k, v in self.counts_by_algorithm().items()})}) "
                 f"to {self.family.upper()}"]
        if self.file_family and self.file_family != self.family:
            lines.append(f"file looks like {self.file_family.upper()}")
        if self.layouts:
            lines.append(f"key layout: {', '.join(self.layouts)}")
        if self.strengths:
            lines.append("strength: " + ", ".join(f"{k} {v:g}" for k, v in self.strengths.items())
                         + (f"; block weights: {self.block_weights}" if self.block_weights else ""))
        for part, blocks in self.counts_by_block().items():
            depth = f" of {self.depths[part]} blocks" if part in self.depths else ""
            lines.append(f"  {part}{depth}: {sum(blocks.values())} ({_fmt_counts(blocks)})")
        if self.training:
            lines.append("training: " + ", ".join(f"{k.removeprefix('ss_')}={_short(v)}"
                                                  for k, v in self.training.items()))
        if self.unmatched:
            lines.append(f"not applied ({len(self.unmatched)}):")
            for u in self.unmatched[:max_unmatched]:
                lines.append(f"  {u.key}: {u.reason}")
            if len(self.unmatched) > max_unmatched:
                lines.append(f"  ... and {len(self.unmatched) - max_unmatched} more (see the JSON report)")
        if self.problems:
            lines.append(f"file warnings ({len(self.problems)}):")
            lines += [f"  {p}" for p in self.problems[:max_unmatched]]
        return "\n".join(lines)


def _json_number(value: float | None) -> float | str | None:
    """A float JSON can carry: inf/NaN (an unused sd-scripts alpha may be inf) become the strings 'inf'/'nan'."""
    return value if value is None or math.isfinite(value) else str(value)


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _short(v: object, limit: int = 80) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------- pieces


def training_metadata(metadata: Mapping[str, str]) -> dict[str, object]:
    """The training facts from kohya/LyCORIS/modelspec metadata (JSON values decoded where they are JSON)."""
    out: dict[str, object] = {}
    for k in TRAINING_METADATA_KEYS:
        if k not in metadata or metadata[k] in ("", "None"):
            continue
        v = metadata[k]
        if k in ("ss_network_args", "hadakron.config"):
            try:
                v = json.loads(v)
            except (TypeError, ValueError):
                pass
        out[k] = v
    return out


def delta_shape(params: Params) -> tuple[int, int]:
    """`(out, in*kh*kw)`: the flattened shape of the module's delta-W, from tensor shapes alone.

    Raises ValueError (naming the tensors) when the factors do not multiply out.
    """
    shape = natural_shape(params)
    return (shape[0], math.prod(shape[1:]))


def weight_accepts(weight_shape: tuple[int, ...], flat: tuple[int, int]) -> bool:
    """True when a delta of flattened shape `flat` reshapes onto a weight of `weight_shape`."""
    return (len(weight_shape) >= 2 and weight_shape[0] == flat[0]
            and int(math.prod(weight_shape[1:])) == flat[1])


def default_resolver(family: str, module_keys: Iterable[str] = ()) -> Resolver:
    """module_key -> (part, dotted, layout) for `family` through `hadakron.arch`; the keys of one file, when given,
    are resolved together (`parse_module_keys`: bare PEFT CLIP names are CLIP-G when any of them is)."""
    known = parse_module_keys(module_keys, family)

    def resolve(module_key: str):
        hit = known[module_key] if module_key in known else parse_module_key(module_key, family)
        if hit is None:
            return None
        fam, part, dotted, layout = hit
        if fam != family:
            return None
        return part, dotted, layout
    return resolve


def default_block_of(family: str) -> Callable[[str, str], str]:
    """Block labels for the report: `hadakron.arch`'s `block_of` (IN04, M00, blocks.7, TE1, ...)."""
    return get_family(family).block_of


def _unsupported_reason(params: Params) -> str:
    names = sorted(p for p in params if p not in ("alpha", "dora_scale"))
    if any(n.startswith(("oft_", "boft_")) for n in names):
        algo = "OFT/BOFT"
    elif any(n in ("diff", "diff_b", "w_norm", "b_norm", "set_weight") for n in names):
        algo = "full/norm diff"
    elif any(n.startswith(("a1.", "a2.", "b1.", "b2.")) or n in ("a1.weight",) for n in names):
        algo = "GLoRA"
    else:
        algo = "unknown"
    return (f"algorithm {algo} ({', '.join(names) or 'no tensors'}) is not LoHa or LoKr; "
            f"this loader applies only LoHa/LoKr")


# ---------------------------------------------------------------- the report


def build_load_report(
    modules: Mapping[str, Params],
    metadata: Mapping[str, str],
    family: str,
    model_shapes: Mapping[tuple[str, str], tuple[int, ...]],
    *,
    loaded_parts: tuple[str, ...] | None = None,
    source: str = "adapter",
    file_family: str | None = None,
    problems: list[str] | None = None,
    resolver: Resolver | None = None,
    block_of: Callable[[str, str], str] | None = None,
    nonfinite: NonfiniteTensors | None = None,
) -> LoadReport:
    """Match every module of a file against the model's layers.

    `model_shapes`: `(part, dotted) -> weight shape` of the loaded model; `loaded_parts`: the parts the node
    patches (e.g. no text encoders for a model-only loader); `resolver`: module key -> `(part, dotted, layout)`;
    `nonfinite`: the file's NaN/Inf scan (`AdapterFile.nonfinite_tensors()`, made once per file), scanned here when
    not given. A module is dropped as non-finite only when a tensor `hadakron.ops` applies holds NaN/Inf (an unused
    alpha does not count).
    """
    if nonfinite is None:
        nonfinite = nonfinite_tensors(modules)
    resolver = resolver or default_resolver(family, modules)
    block_of = block_of or default_block_of(family)
    fam = get_family(family)
    depths = {part: fam.depth_of(part, (d for p, d in model_shapes if p == part))
              for part in fam.stacks if any(p == part for p, _ in model_shapes)}
    parts_present = {p for p, _ in model_shapes}
    loaded = tuple(loaded_parts) if loaded_parts is not None else tuple(sorted(parts_present))
    matched: list[MatchedModule] = []
    unmatched: list[UnmatchedKey] = []
    layouts: list[str] = []
    for module_key, params in modules.items():
        params = dict(params)
        algo = algorithm_of(params)
        if algo == "lora":
            unmatched.append(UnmatchedKey(module_key, "unsupported_algorithm",
                                          f"LoRA module: {LORA_LOADER_HINT}"))
            continue
        if algo not in ("loha", "lokr"):
            unmatched.append(UnmatchedKey(module_key, "unsupported_algorithm", _unsupported_reason(params)))
            continue
        hit = resolver(module_key)
        if hit is None:
            unmatched.append(UnmatchedKey(module_key, "unknown_module",
                                          f"not a known {family.upper()} layer name in any key layout"))
            continue
        part, dotted, layout = hit
        if part not in loaded:
            why = "not loaded by this node (model-only loader or no CLIP)" if part in _TE_PARTS else "not loaded"
            unmatched.append(UnmatchedKey(module_key, "part_not_loaded", f"{part} {why}"))
            continue
        shape = model_shapes.get((part, dotted))
        if shape is None:
            unmatched.append(UnmatchedKey(module_key, "not_in_model", _not_in_model(fam, part, dotted, depths)))
            continue
        why = refusal(params)  # the module checks inspect runs: bad dtypes, shapes, alpha (module_specs)
        if why:
            unmatched.append(UnmatchedKey(module_key, "bad_tensors", f"refused: {why}"))
            continue
        try:
            flat = delta_shape(params)
        except ValueError as exc:
            unmatched.append(UnmatchedKey(module_key, "bad_tensors", str(exc)))
            continue
        if not weight_accepts(tuple(shape), flat):
            unmatched.append(UnmatchedKey(
                module_key, "shape_mismatch",
                f"delta-W is {list(flat)} but {part} '{dotted}' weight is {list(shape)}",
                expected=tuple(shape), found=tuple(flat)))
            continue
        why = refusal(params, tuple(shape))  # dora_scale against the real weight
        if why:
            unmatched.append(UnmatchedKey(module_key, "bad_tensors", f"refused: {why}"))
            continue
        bad = nonfinite_applied(params, nonfinite.get(module_key))
        if bad:
            unmatched.append(UnmatchedKey(module_key, "nonfinite",
                                          f"{', '.join(bad)} hold NaN/Inf values; module skipped"))
            continue
        if layout not in layouts:
            layouts.append(layout)
        matched.append(MatchedModule(
            module_key=module_key, part=part, dotted=dotted, block=block_of(part, dotted), algorithm=algo,
            layout=layout, shape=tuple(shape), rank=module_rank(params), alpha=alpha_of(params),
            scale=module_scale(params), params=params))
    return LoadReport(source=source, family=family, file_family=file_family, layouts=layouts, matched=matched,
                      unmatched=unmatched, problems=_with_alpha_warnings(problems, matched, metadata),
                      training=training_metadata(metadata), loaded_parts=loaded, depths=depths)


def _not_in_model(fam: Family, part: str, dotted: str, depths: Mapping[str, int]) -> str:
    """Why a known layer is not applied: absent from the model, with the model's depth for a block beyond it."""
    hit = fam.stack_index(part, dotted)
    if hit is not None and part in depths and hit[0] >= depths[part]:
        n, prefix = depths[part], fam.stacks[part]
        have = f"{prefix}0..{prefix}{n - 1}" if n else "no blocks"
        return (f"{part} layer '{dotted}' does not exist in this model: block {hit[0]} is beyond its depth "
                f"({n} blocks, {have})")
    return f"{part} layer '{dotted}' does not exist in this model"


def _with_alpha_warnings(problems: list[str] | None, matched: list[MatchedModule],
                         metadata: Mapping[str, str]) -> list[str]:
    """The file's warnings plus, when the caller did not pass them, the ones about applied modules' alphas: a
    stored 0 (ComfyUI's reading, scale 0, is applied) and both-full LoKr alphas (scale 1.0 applied, ComfyUI #15114)."""
    out = list(problems or [])
    specs = {m.module_key: specs_of(m.params) for m in matched}
    extra = [p for m, s in specs.items() if "alpha" in s
             for p in module_specs.alpha_problems(m, s["alpha"], used=module_specs.shape_rules.module_rank(
                 module_specs.shapes(s)) is not None)]
    warning = module_specs.both_full_alpha_warning(specs, metadata)
    if warning and any("ComfyUI #15114" in p for p in out):
        warning = None  # the file's own warning (counting every module of the file) is there already
    return out + [p for p in extra + ([warning] if warning else []) if p not in out]


_TE_PARTS = ("te", "te1", "te2")

"""LoHa/LoKr Loader nodes: match a file to the model, add one lazy exact patch per weight, report what happened."""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import comfy.model_base
import folder_paths

from hadakron.arch import anima_dims
from hadakron.block_weights import BlockWeights, BlockWeightsError, all_block_ids, block_id, parse_block_weights
from hadakron.delta_norms import block_norms, delta_norm, heatmap_payload
from hadakron.comfy_keys import comfy_weight_key, is_clip_part, layer_shapes
from hadakron.load_report import LORA_LOADER_HINT, LoadReport, build_load_report

from .comfy_adapter import HadakronWeightPatch

log = logging.getLogger("hadakron")

CATEGORY = "loaders/hadakron"
ADAPTER_TYPE = "HADAKRON_ADAPTER"

_TOOLTIPS = {
    "model": "The diffusion model (SDXL or Anima) the LoHa/LoKr is applied to.",
    "clip": "The text encoder(s) the adapter's text-encoder modules are applied to.",
    "lora_name": "A LoHa or LoKr .safetensors file from the loras folder (kohya, LyCORIS, ComfyUI, PEFT or "
                 "diffusers key names). LoRA files belong in ComfyUI's LoraLoader.",
    "strength_model": "How strongly to apply the adapter to the diffusion model (1 = as trained; may be "
                      "negative; 0 adds no patches).",
    "strength_clip": "How strongly to apply the adapter to the text encoder(s) (0 adds no patches).",
    "block_weights": "Optional per-block strengths, multiplied into the strengths. Empty = 1 everywhere. Block names "
                     "are the ones the load report shows. SDXL: a preset (ALL, NONE, INS, IND, INALL, MIDD, OUTD, "
                     "OUTS, OUTALL, ALL0.5), 12 values (BASE,IN04,IN05,IN07,IN08,M00,OUT00..OUT05), 20 values "
                     "(BASE,IN00..IN08,M00,OUT00..OUT08) or NAME=value entries like 'IN04=0.5, OUT=0, TE2=0' (BASE or "
                     "TE = both text encoders, TE1/TE2 one). Anima: 'blocks.3=0.5, blocks.0-9=0, llm_adapter=0, te=0, "
                     "OTHER=0' (blocks.N up to the model's depth).",
    "adapter": "Optional in-memory adapter from a hadakron trainer node; when connected it is used instead "
               "of lora_name.",
}


class HadakronLoadError(ValueError):
    """A file or input the loader cannot apply; the message is meant for the user."""


# ---------------------------------------------------------------- model inspection


def model_family(model, node: str = "the LoHa/LoKr Loader", error: type[Exception] = HadakronLoadError) -> str:
    """'sdxl' or 'anima' for a ComfyUI MODEL; for anything else `error` saying that `node` supports only those."""
    base = getattr(model, "model", None)
    if isinstance(base, comfy.model_base.Anima):
        return "anima"
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    name = type(base).__name__ if base is not None else type(model).__name__
    raise error(f"the model is {name}; {node} supports SDXL and Anima models")


def _anima_num_blocks(model) -> int:
    """The Anima DiT's own block count (`hadakron.arch.anima_dims` over its parameters): 10, 28, 40, 52, ..."""
    return anima_dims(model.model).num_blocks


def _state_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- file reading (cached)

# Files read by any loader/merge node, keyed by path and checked against their identity (`_stamp`) on every use:
# a few at once, so two loaders (or a merge of several files) in one graph do not evict each other at every prompt.
_cache: OrderedDict[str, tuple[tuple, object]] = OrderedDict()
CACHED_FILES = 4


def lora_path(lora_name: str | None) -> str | None:
    """The full path of `lora_name` in the loras folder, or None when it is not there."""
    path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
    return path if path is not None and os.path.isfile(path) else None


def _stamp(path: str) -> tuple[int, ...]:
    """The file's identity: (device, inode, size, mtime, ctime), and the same of the PEFT adapter_config.json beside it
    when there is one (it sets the scale). The inode catches a replaced file, the ctime a rewrite in place that kept
    size and mtime (a tool restoring mtime, a coarse clock): either way the next load reads the new bytes."""
    from hadakron.io.peft_config import peft_config_path

    def identity(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    config = peft_config_path(path)
    return identity(os.stat(path)) + (identity(config.stat()) if config is not None else ())


def file_identity(*lora_names: str | None) -> str:
    """Path and identity (`_stamp`) of each named file, as IS_CHANGED text: the executor re-runs a node whose file
    changed."""
    out = []
    for name in lora_names:
        path = lora_path(name)
        if path is not None:
            out.append(f"{path}:{':'.join(map(str, _stamp(path)))}")
    return "|".join(out)


def read_lora_file(lora_name: str):
    """Read `lora_name` from the loras folder as a `hadakron.io.AdapterFile` (cached by path, size, mtime; the
    file's NaN/Inf scan is made once, when it is read)."""
    from hadakron.io import AdapterFileError, read_adapter

    path = lora_path(lora_name)
    if path is None:
        raise HadakronLoadError(f"adapter file {lora_name!r} was not found in the loras folder "
                                f"({', '.join(folder_paths.get_folder_paths('loras'))})")
    stamp = _stamp(path)
    hit = _cache.get(path)
    if hit is not None and hit[0] == stamp:
        _cache.move_to_end(path)
        return hit[1]
    try:
        adapter = read_adapter(path)
    except AdapterFileError as exc:
        raise HadakronLoadError(f"cannot read {lora_name}: {exc}") from None
    _cache[path] = (stamp, adapter)
    _cache.move_to_end(path)
    while len(_cache) > CACHED_FILES:
        _cache.popitem(last=False)
    return adapter


def _modules_of(adapter) -> dict:
    modules = getattr(adapter, "modules", None)
    if modules:
        return modules
    from hadakron.io.module_checks import group_modules
    return group_modules(adapter.tensors)


def _source_name(adapter, lora_name: str | None) -> str:
    path = getattr(adapter, "path", None)
    if path:
        return Path(path).name
    return lora_name or "in-memory adapter"


# ---------------------------------------------------------------- the core


def family_mismatch(adapter, modules: dict, family: str, source: str) -> tuple[str | None, str | None]:
    """(family the file's keys belong to, one-line error when that is not the model's `family`, else None)."""
    from hadakron.arch import detect_family
    detected = detect_family(adapter.tensors.keys() if getattr(adapter, "tensors", None) else
                             [f"{m}.{p}" for m, ps in modules.items() for p in ps])
    if detected.family is None or detected.family == family:
        return detected.family, None
    article = "an" if detected.family.upper()[0] in "AEIOU" else "a"
    return detected.family, (f"{source} is {article} {detected.family.upper()} adapter ({detected.summary()}) "
                             f"but the model is {family.upper()}")


def _check_family(adapter, modules: dict, family: str, report: LoadReport) -> None:
    """Raise a one-line error for a file that cannot apply at all (LoRA, other family, nothing known)."""
    if report.matched:
        return
    kinds = {u.kind for u in report.unmatched}
    if not modules:
        raise HadakronLoadError(f"{report.source} holds no adapter modules")
    algos = {u.reason for u in report.unmatched if u.kind == "unsupported_algorithm"}
    if kinds == {"unsupported_algorithm"}:
        if any("LoRA module" in r for r in algos):
            raise HadakronLoadError(f"{report.source} is a LoRA file, not LoHa/LoKr: {LORA_LOADER_HINT}")
        raise HadakronLoadError(f"{report.source}: {sorted(algos)[0]}")
    if "part_not_loaded" in kinds:
        return  # e.g. a text-encoder-only file on the model-only loader: reported, not an error
    report.file_family, mismatch = family_mismatch(adapter, modules, family, report.source)
    if mismatch:
        raise HadakronLoadError(mismatch)
    first = report.unmatched[0] if report.unmatched else None
    why = f"{first.key}: {first.reason}" if first else "no modules"
    raise HadakronLoadError(f"{report.source}: no module could be applied to this {family.upper()} model "
                            f"({len(report.unmatched)} not applied; first: {why})")


def apply_adapter(model, clip, adapter, strength_model: float, strength_clip: float,
                  block_weights_text: str = "", *, source: str | None = None):
    """Clone model/clip and add one lazy patch per matched weight; returns (model, clip, report)."""
    family = model_family(model)
    depth = _anima_num_blocks(model) if family == "anima" else 0  # SDXL has no stack of blocks
    try:
        bw: BlockWeights = parse_block_weights(block_weights_text, family, num_blocks=depth)
    except BlockWeightsError as exc:
        raise HadakronLoadError(str(exc)) from None
    modules = _modules_of(adapter)
    shapes = layer_shapes(family, _state_shapes(model.model), clip=False)
    loaded_parts = ["unet"]
    if clip is not None:
        shapes.update(layer_shapes(family, _state_shapes(clip.cond_stage_model), clip=True))
        loaded_parts += [p for p in ("te1", "te2", "te") if any(k[0] == p for k in shapes)]
    report = build_load_report(modules, getattr(adapter, "metadata", {}) or {}, family, shapes,
                               loaded_parts=tuple(loaded_parts), source=source or _source_name(adapter, None),
                               problems=list(getattr(adapter, "problems", []) or []),
                               nonfinite=adapter.nonfinite_tensors() if hasattr(adapter, "nonfinite_tensors") else None)
    _check_family(adapter, modules, family, report)
    report.strengths = {"model": float(strength_model)} | ({"clip": float(strength_clip)} if clip is not None else {})
    report.block_weights = bw.text

    model_patches: dict[float, dict] = {}
    clip_patches: dict[float, dict] = {}
    strengths: list[float] = []
    for m in report.matched:
        on_clip = is_clip_part(family, m.part)
        base = strength_clip if on_clip else strength_model
        strength = float(base) * bw.strength(block_id(family, m.part, m.dotted))
        strengths.append(strength)
        if strength == 0.0:
            report.zero_strength += 1
            continue
        patch = HadakronWeightPatch.from_params(m.params, loaded_keys={f"{m.module_key}.{p}" for p in m.params})
        target = clip_patches if on_clip else model_patches
        target.setdefault(strength, {})[comfy_weight_key(family, m.part, m.dotted)] = patch

    new_model, new_clip = model, clip
    applied = 0
    if model_patches:
        new_model = model.clone()
        for strength, patches in model_patches.items():
            applied += len(new_model.add_patches(patches, strength))
    if clip_patches and clip is not None:
        new_clip = clip.clone()
        for strength, patches in clip_patches.items():
            applied += len(new_clip.add_patches(patches, strength))
    report.patches_added = applied
    report.delta_norms = delta_norm_heatmap(family, report, strengths, depth)
    if report.problems:
        log.warning("hadakron: %s: %d file warnings (see the node's report)", report.source, len(report.problems))
    return new_model, new_clip, report


def delta_norm_heatmap(family: str, report: LoadReport, strengths: list[float], num_blocks: int) -> dict:
    """`report.delta_norms`: ||s*strength*dW||_F per block of the family's vocabulary (every block of the loaded
    parts, touched or not), from each matched module's factors (small tensors, converted to float64 numpy)."""
    te_parts = {p for p in report.loaded_parts if p != "unet"}
    ids = all_block_ids(family, num_blocks=num_blocks) if family == "anima" else all_block_ids(family)
    cells = [("unet", b) for b in ids if b.lower() not in ("te", "te1", "te2")]
    cells += [(b.lower(), b) for b in ids if b.lower() in te_parts]
    modules = []
    for m, strength in zip(report.matched, strengths):
        factors = {k: v.detach().float().cpu().numpy() for k, v in m.params.items() if k != "dora_scale"}
        modules.append((m.part, m.block, delta_norm(factors), m.scale * strength))
    return heatmap_payload(block_norms(modules, cells))


def _ui(report: LoadReport, text: str) -> dict:
    return {"hadakron_report": [report.to_json()], "text": [text]}


def _report_text(report: LoadReport) -> str:
    zero = f" ({report.zero_strength} matched modules at strength 0)" if report.zero_strength else ""
    return report.to_text() + f"\npatches added: {report.patches_added}{zero}"


# ---------------------------------------------------------------- nodes


class HadakronLoader:
    """LoHa/LoKr Loader: applies a LoHa or LoKr file exactly to an SDXL or Anima model and its text encoders."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": _TOOLTIPS["model"]}),
                "clip": ("CLIP", {"tooltip": _TOOLTIPS["clip"]}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": _TOOLTIPS["lora_name"]}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": _TOOLTIPS["strength_model"]}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": _TOOLTIPS["strength_clip"]}),
            },
            "optional": {
                "block_weights": ("STRING", {"default": "", "multiline": False,
                                             "tooltip": _TOOLTIPS["block_weights"]}),
                "adapter": (ADAPTER_TYPE, {"tooltip": _TOOLTIPS["adapter"]}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter patches (applied lazily when ComfyUI loads it).",
                       "The text encoder(s) with the adapter patches.",
                       "What was applied: modules per part and block, every key not applied and why, "
                       "training metadata.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a LoHa or LoKr adapter (LyCORIS family) exactly to SDXL or Anima: one lazy patch per "
                   "weight, computed in float32 when ComfyUI loads the model, with a report of what matched.")
    SEARCH_ALIASES = ["loha", "lokr", "lycoris", "hadakron", "load loha", "load lokr"]

    @classmethod
    def IS_CHANGED(cls, lora_name=None, adapter=None, **_inputs):
        """The file's identity (path, size, mtime): a file replaced on disk is re-read by the next prompt, while
        an unchanged one keeps the executor's cached output (ComfyUI's own LoraLoader would keep the stale one)."""
        return "" if adapter is not None else file_identity(lora_name)

    def load(self, model, clip, lora_name, strength_model, strength_clip, block_weights="", adapter=None):
        if strength_model == 0 and strength_clip == 0 and adapter is None:
            text = f"{lora_name}: both strengths are 0; nothing applied"
            return {"ui": {"hadakron_report": [json.dumps({"source": lora_name, "matched_count": 0,
                                                           "patches_added": 0, "note": text})],
                           "text": [text]}, "result": (model, clip, text)}
        if adapter is None:
            adapter = read_lora_file(lora_name)
            source = _source_name(adapter, lora_name)
        else:
            source = _source_name(adapter, "in-memory adapter")
        new_model, new_clip, report = apply_adapter(model, clip, adapter, strength_model, strength_clip,
                                                    block_weights or "", source=source)
        text = _report_text(report)
        return {"ui": _ui(report, text), "result": (new_model, new_clip, text)}


class HadakronLoaderModelOnly(HadakronLoader):
    """LoHa/LoKr Loader (Model Only): the same without text encoders."""

    @classmethod
    def INPUT_TYPES(cls):
        full = HadakronLoader.INPUT_TYPES()
        req = {k: v for k, v in full["required"].items() if k not in ("clip", "strength_clip")}
        return {"required": req, "optional": full["optional"]}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "report")
    OUTPUT_TOOLTIPS = HadakronLoader.OUTPUT_TOOLTIPS[:1] + HadakronLoader.OUTPUT_TOOLTIPS[2:]
    FUNCTION = "load_model_only"
    DESCRIPTION = "Applies a LoHa or LoKr adapter exactly to the diffusion model only (SDXL or Anima)."

    def load_model_only(self, model, lora_name, strength_model, block_weights="", adapter=None):
        out = self.load(model, None, lora_name, strength_model, 0.0, block_weights, adapter)
        new_model, _clip, text = out["result"]
        return {"ui": out["ui"], "result": (new_model, text)}


NODE_CLASS_MAPPINGS = {
    "HadakronLoader": HadakronLoader,
    "HadakronLoaderModelOnly": HadakronLoaderModelOnly,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HadakronLoader": "LoHa/LoKr Loader",
    "HadakronLoaderModelOnly": "LoHa/LoKr Loader (Model Only)",
}

"""Adapter Merge and Adapter Combine nodes: bake several adapters into a model exactly; write one combined LoRA.

Adapter Merge gives the MODEL (and CLIP) a clone carrying one merged patch per weight that computes
W + sum_i s_i * delta-W_i in float32 and rounds once to the weight's dtype: the same function
(`hadakron.merge.baked_weight`) that `hadakron merge` applies to checkpoint files, so sampling the clone or
saving it with ComfyUI's CheckpointSave gives exactly the weights of the file-level bake. ComfyUI applies the
patch when it loads the model (the clone shares the original's module, like every ComfyUI model merge).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import folder_paths
import torch
from comfy.weight_adapter.base import WeightAdapterBase

from hadakron.comfy_keys import comfy_weight_key, is_clip_part
from hadakron.merge import Patch, baked_weight, combine, natural_shape
from hadakron.merge.module_names import adapter_modules, adapter_name, target_refusal

from .save_adapter import AdapterSaveError, checked_output_base, save_tensors
from .loader import HadakronLoadError, family_mismatch, file_identity, model_family, read_lora_file

log = logging.getLogger("hadakron")

CATEGORY = "advanced/model_merging/hadakron"
ADAPTER_TYPE = "HADAKRON_ADAPTER"
NONE = "None"
SLOTS = 3


class HadakronMergeError(ValueError):
    """An input the merge nodes cannot use; the message is meant for the user."""


class HadakronMergedPatch(WeightAdapterBase):
    """One weight's merged patch: W' = W + sum_i s_i * dW_i (float32 math, one rounding), DoRA modules in order.

    `weights = (spec, *tensors)` with `spec = ((names, strength), ...)` per module and the tensors in that order,
    so ComfyUI's staging (`type(v)(v.loaded_keys, moved weights)`) keeps working.
    """

    name = "hadakron_merge"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = set(loaded_keys)
        self.weights = tuple(weights)

    @classmethod
    def from_modules(cls, modules, loaded_keys=()) -> "HadakronMergedPatch":
        """Build from [(params, strength)]."""
        spec, tensors = [], []
        for params, strength in modules:
            names = tuple(sorted(params))
            spec.append((names, float(strength)))
            tensors += [params[n] for n in names]
        return cls(set(loaded_keys), (tuple(spec),) + tuple(tensors))

    def modules(self, device=None) -> list[tuple[dict[str, torch.Tensor], float]]:
        spec, tensors = self.weights[0], self.weights[1:]
        out, i = [], 0
        for names, strength in spec:
            params = {n: (t.to(device) if device is not None else t) for n, t in zip(names, tensors[i:i + len(names)])}
            out.append((params, strength))
            i += len(names)
        return out

    def calculate_shape(self, key):
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """The merged weight (in `weight`'s dtype); `strength` multiplies every module's strength."""
        patches = [Patch(None, False, params, s * float(strength), key) for params, s in self.modules(weight.device)]
        return baked_weight(weight, patches)


# ---------------------------------------------------------------- shared helpers

def _read(lora_name: str):
    """The loader's (cached) read of a loras-folder file, its errors as this node's."""
    try:
        return read_lora_file(lora_name)
    except HadakronLoadError as exc:
        raise HadakronMergeError(str(exc)) from None


def collect_adapters(kwargs: dict) -> list[tuple[object, float]]:
    """[(AdapterFile, strength)] from the node's adapter_N/strength_N widgets and the optional in-memory adapter."""
    out = []
    for i in range(1, SLOTS + 1):
        name = kwargs.get(f"adapter_{i}", NONE)
        strength = float(kwargs.get(f"strength_{i}", 1.0))
        if name and name != NONE and strength != 0.0:
            out.append((_read(name), strength))
    mem = kwargs.get("adapter")
    if mem is not None and float(kwargs.get("adapter_strength", 1.0)) != 0.0:
        out.append((mem, float(kwargs.get("adapter_strength", 1.0))))
    if not out:
        raise HadakronMergeError("no adapter selected (or every strength is 0)")
    return out


def plan_merge(family: str, model_shapes: dict, clip_shapes: dict | None, adapters):
    """({comfy key: [(params, strength)]} for model and clip, report lines) for the adapters on this model."""
    model_plan: dict[str, list] = {}
    clip_plan: dict[str, list] = {}
    lines = []
    for adapter, strength in adapters:
        applied, skipped = 0, []
        for m in adapter_modules(adapter, family):
            why = None
            if m.algorithm is None:
                why = "not a LoHa, LoKr or LoRA module"
            elif m.canonical is None or m.family != family:
                why = f"not a {family.upper()} layer name"
            elif m.nonfinite_reason:
                why = m.nonfinite_reason
            elif m.refused:
                why = f"refused: {m.refused}"
            else:
                on_clip = is_clip_part(family, m.part)
                shapes = clip_shapes if on_clip else model_shapes
                key = comfy_weight_key(family, m.part, m.dotted)
                if shapes is None:
                    why = "text-encoder module, but no CLIP is connected"
                elif key not in shapes:
                    why = f"no weight {key} in this {'CLIP' if on_clip else 'model'}"
                elif (refusal := target_refusal(m, tuple(shapes[key]))) is not None:
                    why = f"refused: {refusal}"
                else:
                    try:
                        nat = natural_shape(m.params)
                    except ValueError as exc:
                        nat, why = None, str(exc)
                    if nat is not None and (math.prod(nat) != math.prod(shapes[key]) or nat[0] != shapes[key][0]):
                        why = f"delta-W is {list(nat)}, weight is {list(shapes[key])}"
            if why is not None:
                skipped.append(f"{m.file_key}: {why}")
                continue
            (clip_plan if on_clip else model_plan).setdefault(key, []).append((m.params, strength))
            applied += 1
        lines.append(f"{adapter_name(adapter)} @ {strength:g}: {applied} modules applied, {len(skipped)} not applied")
        lines += [f"  not applied {s}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"  ... and {len(skipped) - 20} more")
    return model_plan, clip_plan, lines


def nothing_applies(adapters, family: str, lines: list[str]) -> str:
    """One line for a merge where no module applies: the first file of the other family, else the first reason."""
    for adapter, _strength in adapters:
        _found, mismatch = family_mismatch(adapter, adapter.modules, family, adapter_name(adapter))
        if mismatch:
            return mismatch
    first = next((ln.strip().removeprefix("not applied ") for ln in lines if ln.startswith("  not applied")), "no modules")
    return (f"no module of {', '.join(adapter_name(a) for a, _ in adapters)} applies to this {family.upper()} model "
            f"(first: {first})")


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def merge_into(model, clip, adapters):
    """(model clone, clip clone or None, report text) with one merged patch per matched weight."""
    family = model_family(model, "Adapter Merge", HadakronMergeError)
    clip_shapes = _shapes(clip.cond_stage_model) if clip is not None else None
    model_plan, clip_plan, lines = plan_merge(family, _shapes(model.model), clip_shapes, adapters)
    if not model_plan and not clip_plan:
        raise HadakronMergeError(nothing_applies(adapters, family, lines))
    new_model = model.clone()
    added = len(new_model.add_patches({k: HadakronMergedPatch.from_modules(v) for k, v in model_plan.items()}, 1.0))
    new_clip = clip
    if clip is not None:
        new_clip = clip.clone()
        if clip_plan:
            added += len(new_clip.add_patches({k: HadakronMergedPatch.from_modules(v) for k, v in clip_plan.items()}, 1.0))
    lines.append(f"{added} weights merged ({len(model_plan)} in the model, {len(clip_plan)} in the text encoders)")
    return new_model, new_clip, "\n".join(lines)


def _adapter_inputs(extra_tooltip: str = "") -> tuple[dict, dict]:
    names = folder_paths.get_filename_list("loras")
    required, optional = {}, {}
    for i in range(1, SLOTS + 1):
        target = required if i == 1 else optional
        choices = names if i == 1 else [NONE] + names
        target[f"adapter_{i}"] = (choices, {"tooltip": f"Adapter file {i} (LoHa, LoKr or LoRA) from the loras folder."
                                                       + extra_tooltip})
        target[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": f"Strength of adapter {i} (negative subtracts; 0 skips it)."})
    optional["adapter"] = (ADAPTER_TYPE, {"tooltip": "Optional in-memory adapter from a hadakron trainer node."})
    optional["adapter_strength"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                              "tooltip": "Strength of the in-memory adapter."})
    return required, optional


def adapter_files_changed(**inputs) -> str:
    """IS_CHANGED for nodes with adapter_N file inputs: the files' identities, so a replaced file is re-read."""
    return file_identity(*(inputs.get(f"adapter_{i}") for i in range(1, SLOTS + 1)
                           if inputs.get(f"adapter_{i}") not in (None, NONE)))


# ---------------------------------------------------------------- nodes

class HadakronAdapterMerge:
    """Adapter Merge: W + sum_i s_i * delta-W_i on a clone of the model (and CLIP), exact, one rounding."""

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = _adapter_inputs()
        return {"required": {"model": ("MODEL", {"tooltip": "SDXL or Anima model to merge the adapters into."}),
                             **required},
                "optional": {"clip": ("CLIP", {"tooltip": "Text encoder(s) for the adapters' text-encoder modules."}),
                             **optional}}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report")
    OUTPUT_TOOLTIPS = ("The model with the adapters merged (send it to a sampler or to CheckpointSave).",
                       "The text encoder(s) with the adapters merged (None when no CLIP is connected).",
                       "Which modules of each adapter were merged and which were not, with the reason.")
    FUNCTION = "merge"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Merges up to three adapter files (LoHa, LoKr or LoRA) and an optional in-memory adapter into a "
                   "model and its text encoders: W + sum of strength x delta-W per weight, in float32 with one "
                   "rounding, the same numbers as the `hadakron merge` command. Save with CheckpointSave.")
    SEARCH_ALIASES = ["merge lokr", "merge loha", "bake lora", "adapter merge", "hadakron"]

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return adapter_files_changed(**inputs)

    def merge(self, model, adapter_1, strength_1, clip=None, **kwargs):
        try:
            adapters = collect_adapters({"adapter_1": adapter_1, "strength_1": strength_1, **kwargs})
            new_model, new_clip, text = merge_into(model, clip, adapters)
        except HadakronMergeError as exc:
            raise ValueError(f"Adapter Merge: {exc}") from None
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, text)}


class HadakronAdapterCombine:
    """Adapter Combine: one LoRA file whose delta-W is the exact weighted sum (or its best rank-R)."""

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = _adapter_inputs()
        required["rank"] = ("INT", {"default": 0, "min": 0, "max": 4096,
                                    "tooltip": "Target rank per layer (truncated SVD, error reported). 0 = exact "
                                               "(ranks add up: LoHa r1*r2, LoKr R1*R2, capped at full rank)."})
        required["filename_prefix"] = ("STRING", {"default": "loras/hadakron_combined",
                                                  "tooltip": "Output path under ComfyUI's output folder."})
        optional["layout"] = (["kohya", "comfyui", "lycoris", "peft"], {"default": "kohya",
                                                                         "tooltip": "Key layout of the written file."})
        optional["dtype"] = (["fp32", "fp16", "bf16"], {"default": "fp16", "tooltip": "Tensor dtype of the file."})
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the file was written, the ranks, and the relative error per layer and overall.",)
    FUNCTION = "combine"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Combines LoHa, LoKr and LoRA adapters into one LoRA file whose delta-W is exactly the weighted "
                   "sum (exact LoRA forms stacked along the rank), or its best rank-R approximation with the error "
                   "reported. Loadable by ComfyUI's LoraLoader.")
    SEARCH_ALIASES = ["combine lora", "merge loras", "lokr to lora", "loha to lora", "hadakron"]

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return adapter_files_changed(**inputs)

    def combine(self, adapter_1, strength_1, rank, filename_prefix, layout="kohya", dtype="fp16", **kwargs):
        out_dir = Path(folder_paths.get_output_directory()).resolve()
        try:
            checked_output_base(filename_prefix, root=out_dir)  # before the work, not after it
            adapters = collect_adapters({"adapter_1": adapter_1, "strength_1": strength_1, **kwargs})
            result = combine(adapters, rank=rank or None, layout=layout,
                             dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
            path = save_tensors(filename_prefix, result.tensors, result.metadata, root=out_dir)  # name claimed atomically
        except (HadakronMergeError, AdapterSaveError, ValueError) as exc:
            raise ValueError(f"Adapter Combine: {exc}") from None
        text = "\n".join([f"wrote {path.relative_to(out_dir).as_posix()}"] + result.lines())
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "HadakronAdapterMerge": HadakronAdapterMerge,
    "HadakronAdapterCombine": HadakronAdapterCombine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HadakronAdapterMerge": "Adapter Merge",
    "HadakronAdapterCombine": "Adapter Combine",
}

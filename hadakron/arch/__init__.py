"""Model families (SDXL, Anima) as data, file key layouts, and detection.

Inside hadakron a layer is `(family, part, dotted)`: the dotted module path in the family's canonical
naming (SDXL SGM/LDM UNet names, CLIP `text_model...`, Anima `blocks.N...`, Qwen3 `layers.N...`).
File layouts are conversions at the edge (`layouts`); `detect` finds the family of a file or a model.

Names are loaded on first use (PEP 562): `hadakron.arch.keys` (split a file key) imports without building the
family tables, which `hadakron inspect` relies on to start its value scan before it needs them.
"""
from __future__ import annotations

from hadakron.lazy_names import lazy_attributes

_HOMES: dict[str, str] = {
    **dict.fromkeys(("ANIMA", "AnimaDims", "anima_dims", "anima_family"), "anima"),
    **dict.fromkeys(("anima_file_num_blocks", "family_for_file", "family_for_model", "file_depths", "model_depths"),
                    "depth"),
    **dict.fromkeys(("DetectResult", "detect_family", "detect_model_family", "match_part_names"), "detect"),
    **dict.fromkeys(("Family", "Layer", "compile_patterns"), "family"),
    **dict.fromkeys(("FAMILIES", "LAYOUT_TITLES", "LAYOUTS", "ParsedKey", "convert_key", "convert_state_dict",
                     "file_key", "get_family", "module_key", "parse_key", "parse_keys", "parse_module_key",
                     "parse_module_keys"), "layouts"),
    **dict.fromkeys(("PARAMS", "join_key", "split_key"), "keys"),
    **dict.fromkeys(("DIFFUSERS_TO_SGM", "SDXL", "SGM_TO_DIFFUSERS"), "sdxl"),
}
_SUBMODULES = ("anima", "depth", "detect", "family", "keys", "layouts", "sdxl")

__all__ = [
    "ANIMA", "SDXL", "FAMILIES", "Family", "Layer", "get_family", "compile_patterns",
    "LAYOUTS", "LAYOUT_TITLES", "PARAMS", "ParsedKey", "split_key", "join_key", "module_key", "file_key",
    "parse_module_key", "parse_module_keys", "parse_key", "parse_keys", "convert_key", "convert_state_dict",
    "DIFFUSERS_TO_SGM", "SGM_TO_DIFFUSERS",
    "DetectResult", "detect_family", "detect_model_family", "match_part_names",
    "AnimaDims", "anima_dims", "anima_family", "anima_file_num_blocks", "family_for_file", "family_for_model",
    "file_depths", "model_depths",
]


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES, _SUBMODULES, __all__)

"""Model families (SDXL, Anima) as data, file key layouts, and detection.

Inside hadakron a layer is `(family, part, dotted)`: the dotted module path in the family's canonical
naming (SDXL SGM/LDM UNet names, CLIP `text_model...`, Anima `blocks.N...`, Qwen3 `layers.N...`).
File layouts are conversions at the edge (`layouts`); `detect` finds the family of a file or a model.
"""
from hadakron.arch.anima import ANIMA, AnimaDims, anima_dims, anima_family
from hadakron.arch.detect import DetectResult, detect_family, detect_model_family, match_part_names
from hadakron.arch.family import Family, Layer, compile_patterns
from hadakron.arch.layouts import (
    FAMILIES, LAYOUT_TITLES, LAYOUTS, PARAMS, ParsedKey, convert_key, convert_state_dict, file_key,
    get_family, join_key, module_key, parse_key, parse_keys, parse_module_key, parse_module_keys, split_key,
)
from hadakron.arch.sdxl import DIFFUSERS_TO_SGM, SDXL, SGM_TO_DIFFUSERS
from hadakron.arch.depth import (anima_file_num_blocks, family_for_file, family_for_model, file_depths,
                                 model_depths)

__all__ = [
    "ANIMA", "SDXL", "FAMILIES", "Family", "Layer", "get_family", "compile_patterns",
    "LAYOUTS", "LAYOUT_TITLES", "PARAMS", "ParsedKey", "split_key", "join_key", "module_key", "file_key",
    "parse_module_key", "parse_module_keys", "parse_key", "parse_keys", "convert_key", "convert_state_dict",
    "DIFFUSERS_TO_SGM", "SGM_TO_DIFFUSERS",
    "DetectResult", "detect_family", "detect_model_family", "match_part_names",
    "AnimaDims", "anima_dims", "anima_family", "anima_file_num_blocks", "family_for_file", "family_for_model",
    "file_depths", "model_depths",
]

"""hadakron.ops: the LoHa/LoKr/LoRA algebra as pure torch functions (imports only torch).

Entry points on a module's parameter dict (the file's own tensor names): `algorithm_of`, `module_rank`,
`module_scale`, `delta_weight`, `patched_weight` (DoRA), `lora_form`. Lower level: factor kinds (`factors`),
`factorization`, write-floor rebuilds `loha_delta` / `lokr_delta`, the recomputing `HadaWeight` autograd, and
bypass products `lokr_bypass_linear`, `lokr_linear` (frozen Linear + LoKr fused), `lokr_bypass_conv2d`,
`loha_bypass` (see `bypass` for their arguments); frozen float8 base layers upcast per call (`frozen_linear`,
`frozen_conv2d`). The shape rules alone (`shape_rules`: `PARAM_NAMES`,
`algorithm_of`, factor shapes from tensor shapes) import no torch.

Names are loaded on first use (PEP 562), so `from hadakron.ops import algorithm_of` does not import torch.
"""
from __future__ import annotations

from hadakron.lazy_names import lazy_attributes

_HOMES: dict[str, str] = {
    **dict.fromkeys(("HadaWeight", "hada_weight", "hada_weight_tucker"), "autograd"),
    **dict.fromkeys(("hada_lora_pair", "loha_bypass", "loha_bypass_mode", "lokr_bypass_conv2d", "lokr_bypass_linear",
                     "lokr_linear"), "bypass"),
    "KronLinear": "kron_linear",
    **dict.fromkeys(("FLOAT8_DTYPES", "frozen_conv2d", "frozen_linear", "is_float8"), "frozen"),
    "factorization": "factorization",
    **dict.fromkeys(("Factor", "Full", "LowRank", "Tucker", "as_factor"), "factors"),
    **dict.fromkeys(("PARAM_NAMES", "algorithm_of"), "shape_rules"),
    **dict.fromkeys(("alpha_of", "applied_params", "loha_factors", "lokr_factors", "lora_factor", "module_factors",
                     "module_rank", "module_scale"), "params"),
    **dict.fromkeys(("hada_product", "kron_into", "loha_delta", "lokr_delta"), "rebuild"),
    **dict.fromkeys(("delta_weight", "dora_norm", "lora_form", "natural_shape", "patched_weight"), "weights"),
}
_SUBMODULES = ("autocast", "autograd", "bypass", "factorization", "factors", "frozen", "kron_linear", "params", "rebuild",
               "shape_rules", "weights")

__all__ = [
    "PARAM_NAMES", "algorithm_of", "alpha_of", "applied_params", "module_rank", "module_scale", "module_factors",
    "loha_factors", "lokr_factors", "lora_factor",
    "delta_weight", "natural_shape", "patched_weight", "lora_form", "dora_norm", "factorization",
    "Factor", "Full", "LowRank", "Tucker", "as_factor",
    "loha_delta", "lokr_delta", "kron_into", "hada_product",
    "HadaWeight", "hada_weight", "hada_weight_tucker",
    "FLOAT8_DTYPES", "is_float8", "frozen_linear", "frozen_conv2d",
    "lokr_bypass_linear", "lokr_linear", "KronLinear", "lokr_bypass_conv2d", "loha_bypass", "loha_bypass_mode", "hada_lora_pair",
]


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES, _SUBMODULES, __all__)

"""hadakron.ops: the LoHa/LoKr/LoRA algebra as pure torch functions (imports only torch).

Entry points on a module's parameter dict (the file's own tensor names): `algorithm_of`, `module_rank`,
`module_scale`, `delta_weight`, `patched_weight` (DoRA), `lora_form`. Lower level: factor kinds (`factors`),
`factorization`, write-floor rebuilds `loha_delta` / `lokr_delta`, the recomputing `HadaWeight` autograd, and
bypass products `lokr_bypass_linear`, `lokr_linear` (frozen Linear + LoKr fused), `lokr_bypass_conv2d`,
`loha_bypass` (see `bypass` for their arguments).
"""

from .autograd import HadaWeight, hada_weight, hada_weight_tucker
from .bypass import (
    hada_lora_pair, loha_bypass, loha_bypass_mode, lokr_bypass_conv2d, lokr_bypass_linear, lokr_linear,
)
from .kron_linear import KronLinear
from .factorization import factorization
from .factors import Factor, Full, LowRank, Tucker, as_factor
from .params import (
    PARAM_NAMES,
    algorithm_of,
    alpha_of,
    applied_params,
    loha_factors,
    lokr_factors,
    lora_factor,
    module_factors,
    module_rank,
    module_scale,
)
from .rebuild import hada_product, kron_into, loha_delta, lokr_delta
from .weights import delta_weight, dora_norm, lora_form, natural_shape, patched_weight

__all__ = [
    "PARAM_NAMES", "algorithm_of", "alpha_of", "applied_params", "module_rank", "module_scale", "module_factors",
    "loha_factors", "lokr_factors", "lora_factor",
    "delta_weight", "natural_shape", "patched_weight", "lora_form", "dora_norm", "factorization",
    "Factor", "Full", "LowRank", "Tucker", "as_factor",
    "loha_delta", "lokr_delta", "kron_into", "hada_product",
    "HadaWeight", "hada_weight", "hada_weight_tucker",
    "lokr_bypass_linear", "lokr_linear", "KronLinear", "lokr_bypass_conv2d", "loha_bypass", "loha_bypass_mode", "hada_lora_pair",
]

"""`LoHa`: trainable low-rank Hadamard adapter, dW = s * (w1a @ w1b) * (w2a @ w2b).

Shapes (file names): Linear and conv 1x1 `hada_w*_a (out, r)`, `hada_w*_b (r, in)`; conv kxk flat
`hada_w*_b (r, in*kh*kw)`; conv kxk Tucker `hada_w*_a (r, out)`, `hada_w*_b (r, in)`, `hada_t* (r, r, kh, kw)`.
Init as LyCORIS (sd-scripts for the non-Tucker modes): w*_b ~ N(0, 1), w1_a ~ N(0, 0.1), t* ~ N(0, 0.1),
w2_a = 0 so dW is exactly 0. For Tucker this follows LyCORIS (w2_a = 0), not sd-scripts (which zeroes
w1_a); this matters only for LoRA+ (w2_a is the boosted tensor). With `use_scalar`, the scalar starts at
0 and w2_a gets N(0, 0.1) instead.
"""
from __future__ import annotations

import torch
from torch import nn

from hadakron import ops
from hadakron.adapters.base import AdapterModule, dora_options, normalize_alpha, rs_alpha
from hadakron.adapters.layer import LayerSpec, layer_device

Tensor = torch.Tensor

_PAIRS = (("hada_w1_a", "hada_w1_b", "hada_t1"), ("hada_w2_a", "hada_w2_b", "hada_t2"))


def loha_shapes(spec: LayerSpec, rank: int, tucker: bool, rank2: int | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a LoHa module for `spec` (rank2 = rank of the w2 pair, default `rank`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for (a, b, t), r in zip(_PAIRS, (rank, rank if rank2 is None else rank2)):
        if tucker:
            shapes[a] = (r, spec.out_dim)
            shapes[b] = (r, spec.in_dim)
            shapes[t] = (r, r, *spec.kernel)
        else:
            shapes[a] = (spec.out_dim, r)
            shapes[b] = (r, spec.in_dim * spec.kernel_numel)
    return shapes


class LoHa(AdapterModule):
    """LoHa adapter of one Linear/Conv2d layer (see module docstring for shapes and init)."""

    algorithm = "loha"
    FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.factor_names

    @classmethod
    def for_layer(
        cls,
        layer: nn.Module,
        rank: int,
        alpha: float | Tensor | None = None,
        *,
        use_tucker: bool = False,
        use_scalar: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        rs_lora: bool = False,
        dora_wd: bool = False,
        wd_on_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "LoHa":
        """A fresh LoHa for `layer` with dW = 0. alpha None/0 means alpha = rank (scale 1).

        `use_tucker` applies to conv layers with a kernel other than 1x1 (ignored otherwise). `rs_lora` stores
        alpha * sqrt(rank) so the scale is alpha / sqrt(rank) (LyCORIS); `dora_wd` trains a DoRA magnitude
        (see `dora_options`).
        """
        spec = LayerSpec.of(layer)
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"LoHa rank must be >= 1; got {rank}")
        device = layer_device(layer) if device is None else torch.device(device)
        tucker = bool(use_tucker) and spec.is_conv and spec.kernel != (1, 1)
        t = {n: torch.empty(s, dtype=dtype, device=device) for n, s in loha_shapes(spec, rank, tucker).items()}
        with torch.no_grad():  # LyCORIS' order, so the same seed gives the same tensors
            if tucker:
                nn.init.normal_(t["hada_t1"], std=0.1)
                nn.init.normal_(t["hada_t2"], std=0.1)
            nn.init.normal_(t["hada_w1_b"], std=1.0)
            nn.init.normal_(t["hada_w1_a"], std=0.1)
            nn.init.normal_(t["hada_w2_b"], std=1.0)
            if use_scalar:
                nn.init.normal_(t["hada_w2_a"], std=0.1)
            else:
                nn.init.zeros_(t["hada_w2_a"])
        alpha_t = torch.tensor(rs_alpha(normalize_alpha(alpha, rank), rank, rs_lora), dtype=torch.float32,
                               device=device)
        return cls(spec, t, alpha_t, rank, use_scalar=use_scalar, scalar_init=0.0,
                   rank_dropout=rank_dropout, module_dropout=module_dropout, rank_dropout_scale=rank_dropout_scale,
                   **dora_options(layer, dora_wd, wd_on_output, dtype, device))

    @classmethod
    def _from_file_params(cls, spec: LayerSpec, factors: dict[str, Tensor], alpha: Tensor | None,
                          **options) -> "LoHa":
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if name not in factors:
                raise ValueError(f"LoHa module is missing {name} (found {sorted(factors)})")
        has_t = ["hada_t1" in factors, "hada_t2" in factors]
        if has_t[0] != has_t[1]:
            raise ValueError("LoHa Tucker module needs both hada_t1 and hada_t2; found only one")
        tucker = has_t[0]
        if tucker and not spec.is_conv:
            raise ValueError(f"LoHa Tucker tensors (hada_t1/hada_t2) need a Conv2d layer; got weight {spec.weight_shape}")
        r1 = int(factors["hada_w1_b"].shape[0])
        r2 = int(factors["hada_w2_b"].shape[0])
        for name, shape in loha_shapes(spec, r1, tucker, r2).items():
            cls._check_shape(name, factors[name], shape, spec)
        alpha_t = cls._alpha_tensor(alpha, r1, factors["hada_w1_b"])
        return cls(spec, factors, alpha_t, r1, **options)

    def _bypass(self, x: Tensor, params: dict[str, Tensor], scale: float) -> Tensor:
        w1, w2 = ops.loha_factors(params)
        spec = self.spec
        if spec.is_conv:
            return ops.loha_bypass(x, w1, w2, scale, kernel_size=spec.kernel, stride=spec.stride,
                                   padding=spec.padding, dilation=spec.dilation)
        return ops.loha_bypass(x, w1, w2, scale)

    def _differentiable_delta(self, params: dict[str, Tensor], scale: float) -> Tensor:
        p = params
        if self.tucker:
            dw = ops.hada_weight_tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"],
                                        p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"], scale)
        else:
            dw = ops.hada_weight(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], scale)
        return dw.reshape(self.spec.weight_shape)


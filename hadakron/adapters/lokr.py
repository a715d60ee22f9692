"""`LoKr`: trainable low-rank Kronecker adapter, dW = s * kron(W1, W2).

W1 `(out_l, in_m)` is `lokr_w1` or, with `decompose_both` and rank < max(out_l, in_m)/2, `lokr_w1_a (out_l, r)
@ lokr_w1_b (r, in_m)`. W2 `(out_k, in_n[, kh, kw])` is full `lokr_w2` when rank >= max(out_k, in_n)/2 (a
warning, as sd-scripts) or `full_matrix`; else Tucker (`lokr_t2 (r, r, kh, kw)`, `lokr_w2_a (r, out_k)`,
`lokr_w2_b (r, in_n)`) for conv kxk with `use_tucker`; else `lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n*kh*kw)`.
Linear and conv 1x1 full W2 is 2-D `(out_k, in_n)` (sd-scripts; LyCORIS' 4-D `(k, n, 1, 1)` files load too).
Scale as ComfyUI: alpha / rank of the decomposed factor (w2 first); with both factors full, alpha is set
to the rank and the scale is 1. Init as LyCORIS: W1 parts, w2_a and t2 kaiming-uniform, w2/w2_b = 0 (with
`use_scalar`: kaiming too, the scalar starts at 0).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from hadakron import ops
from hadakron.adapters.base import AdapterModule, dora_options, normalize_alpha, rs_alpha
from hadakron.adapters.layer import LayerSpec, layer_device

Tensor = torch.Tensor
logger = logging.getLogger(__name__)


def infer_factor(out_dim: int, in_dim: int, out_l: int, in_m: int) -> int | None:
    """The `factor` argument that gives these splits (-1 first), or None when no single factor does."""
    candidates = [-1, *sorted({out_l, in_m, out_dim // out_l, in_dim // in_m})]
    for f in candidates:
        if ops.factorization(out_dim, f)[0] == out_l and ops.factorization(in_dim, f)[0] == in_m:
            return f
    return None


def _kaiming(t: Tensor) -> Tensor:
    """LyCORIS' init for LoKr factors: kaiming_uniform_(a=sqrt(5))."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKr(AdapterModule):
    """LoKr adapter of one Linear/Conv2d layer (see module docstring for forms, scale and init)."""

    algorithm = "lokr"
    FACTOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, spec: LayerSpec, factors, alpha: Tensor, rank: int, *, splits: tuple[int, int, int, int],
                 factor: int | None, **options) -> None:
        super().__init__(spec, factors, alpha, rank, **options)
        self.out_l, self.out_k, self.in_m, self.in_n = splits
        self.factor = factor

    # --------------------------------------------------------------- forms
    @property
    def w1_full(self) -> bool:
        return "lokr_w1" in self.factor_names

    @property
    def w2_form(self) -> str:
        """'full', 'tucker' or 'low_rank'."""
        if "lokr_w2" in self.factor_names:
            return "full"
        return "tucker" if "lokr_t2" in self.factor_names else "low_rank"

    @property
    def decompose_both(self) -> bool:
        return not self.w1_full

    @property
    def tucker(self) -> bool:
        return self.w2_form == "tucker"

    # --------------------------------------------------------------- construction
    @classmethod
    def for_layer(
        cls,
        layer: nn.Module,
        rank: int,
        alpha: float | Tensor | None = None,
        *,
        factor: int = -1,
        decompose_both: bool = False,
        use_tucker: bool = False,
        use_scalar: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        full_matrix: bool = False,
        rank_dropout_scale: bool = False,
        rs_lora: bool = False,
        dora_wd: bool = False,
        wd_on_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "LoKr":
        """A fresh LoKr for `layer` with dW = 0 (forms chosen as LyCORIS/sd-scripts do; see module docstring).

        `rs_lora` stores alpha * sqrt(rank) (scale alpha / sqrt(rank), LyCORIS); `dora_wd` trains a DoRA magnitude.
        """
        spec = LayerSpec.of(layer)
        rank, factor = int(rank), int(factor)
        if rank < 1:
            raise ValueError(f"LoKr rank must be >= 1; got {rank}")
        device = layer_device(layer) if device is None else torch.device(device)
        out_l, out_k = ops.factorization(spec.out_dim, factor)
        in_m, in_n = ops.factorization(spec.in_dim, factor)
        kernel = spec.kernel if spec.is_conv and spec.kernel != (1, 1) else ()
        shapes: dict[str, tuple[int, ...]] = {}
        w1_full = not (decompose_both and not full_matrix and rank < max(out_l, in_m) / 2)
        if w1_full:
            shapes["lokr_w1"] = (out_l, in_m)
        else:
            shapes["lokr_w1_a"] = (out_l, rank)
            shapes["lokr_w1_b"] = (rank, in_m)
        w2_full = full_matrix or rank >= max(out_k, in_n) / 2
        if w2_full:
            if not full_matrix:
                logger.warning(
                    "LoKr: rank %d >= max(out_k=%d, in_n=%d)/2 for weight %s with factor=%d: using a full matrix "
                    "for W2%s", rank, out_k, in_n, "x".join(map(str, spec.weight_shape)), factor,
                    " (alpha ignored, scale 1)" if w1_full else "",
                )
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif use_tucker and kernel:
            shapes["lokr_t2"] = (rank, rank, *kernel)
            shapes["lokr_w2_a"] = (rank, out_k)
            shapes["lokr_w2_b"] = (rank, in_n)
        else:
            shapes["lokr_w2_a"] = (out_k, rank)
            shapes["lokr_w2_b"] = (rank, in_n * spec.kernel_numel)
        t = {n: torch.empty(s, dtype=dtype, device=device) for n, s in shapes.items()}
        with torch.no_grad():  # LyCORIS' order
            if w2_full:
                _kaiming(t["lokr_w2"]) if use_scalar else nn.init.zeros_(t["lokr_w2"])
            else:
                if "lokr_t2" in t:
                    _kaiming(t["lokr_t2"])
                _kaiming(t["lokr_w2_a"])
                _kaiming(t["lokr_w2_b"]) if use_scalar else nn.init.zeros_(t["lokr_w2_b"])
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b"):
                if name in t:
                    _kaiming(t[name])
        # both full: scale 1 whatever alpha or rs_lora say (ComfyUI ignores alpha then)
        alpha_v = float(rank) if (w1_full and w2_full) else rs_alpha(normalize_alpha(alpha, rank), rank, rs_lora)
        alpha_t = torch.tensor(alpha_v, dtype=torch.float32, device=device)
        return cls(spec, t, alpha_t, rank, splits=(out_l, out_k, in_m, in_n), factor=factor,
                   use_scalar=use_scalar, scalar_init=0.0, rank_dropout=rank_dropout, module_dropout=module_dropout,
                   rank_dropout_scale=rank_dropout_scale, **dora_options(layer, dora_wd, wd_on_output, dtype, device))

    @classmethod
    def _from_file_params(cls, spec: LayerSpec, factors: dict[str, Tensor], alpha: Tensor | None,
                          **options) -> "LoKr":
        def need(*names: str) -> None:
            for n in names:
                if n not in factors:
                    raise ValueError(f"LoKr module is missing {n} (found {sorted(factors)})")

        # W1 gives (out_l, in_m); the layer gives the rest.
        if "lokr_w1" in factors:
            w1 = factors["lokr_w1"]
            if w1.dim() != 2:
                raise ValueError(f"lokr_w1: expected a 2-D (out_l, in_m) matrix, found shape {tuple(w1.shape)}")
            out_l, in_m = int(w1.shape[0]), int(w1.shape[1])
            r1 = None
        else:
            need("lokr_w1_a", "lokr_w1_b")
            out_l, in_m = int(factors["lokr_w1_a"].shape[0]), int(factors["lokr_w1_b"].shape[-1])
            r1 = int(factors["lokr_w1_b"].shape[0])
            cls._check_shape("lokr_w1_a", factors["lokr_w1_a"], (out_l, r1), spec)
            cls._check_shape("lokr_w1_b", factors["lokr_w1_b"], (r1, in_m), spec)
        if spec.out_dim % out_l or spec.in_dim % in_m:
            raise ValueError(
                f"LoKr W1 is {out_l}x{in_m}, which does not divide the layer's (out, in) = "
                f"({spec.out_dim}, {spec.in_dim})"
            )
        out_k, in_n = spec.out_dim // out_l, spec.in_dim // in_m
        kernel = spec.kernel if spec.is_conv and spec.kernel != (1, 1) else ()
        if "lokr_w2" in factors:
            w2 = factors["lokr_w2"]
            allowed = [(out_k, in_n, *kernel)]
            if spec.is_conv and not kernel:
                allowed.append((out_k, in_n, 1, 1))  # LyCORIS' conv 1x1 layout
            if tuple(w2.shape) not in allowed:
                raise ValueError(
                    f"lokr_w2: expected shape {' or '.join(map(str, allowed))} for a layer with weight "
                    f"{spec.weight_shape} and lokr_w1 {out_l}x{in_m}, found {tuple(w2.shape)}"
                )
            r2 = None
        elif "lokr_t2" in factors:
            need("lokr_w2_a", "lokr_w2_b")
            if not kernel:
                raise ValueError(f"lokr_t2 (Tucker) needs a conv layer with a kernel; got weight {spec.weight_shape}")
            r2 = int(factors["lokr_t2"].shape[0])
            cls._check_shape("lokr_t2", factors["lokr_t2"], (r2, r2, *kernel), spec)
            cls._check_shape("lokr_w2_a", factors["lokr_w2_a"], (r2, out_k), spec)
            cls._check_shape("lokr_w2_b", factors["lokr_w2_b"], (r2, in_n), spec)
        else:
            need("lokr_w2_a", "lokr_w2_b")
            r2 = int(factors["lokr_w2_b"].shape[0])
            cls._check_shape("lokr_w2_a", factors["lokr_w2_a"], (out_k, r2), spec)
            cls._check_shape("lokr_w2_b", factors["lokr_w2_b"], (r2, in_n * spec.kernel_numel), spec)
        if r2 is not None:
            rank = r2
        elif r1 is not None:
            rank = r1
        else:  # both full: scale 1; the rank the trainer asked for is what sd-scripts/LyCORIS store as alpha
            a = None if alpha is None else float(alpha.float())
            rank = int(a) if a is not None and a >= 1 and a == int(a) else 1
        alpha_t = cls._alpha_tensor(alpha, rank, next(iter(factors.values())))
        factor = infer_factor(spec.out_dim, spec.in_dim, out_l, in_m)
        return cls(spec, factors, alpha_t, rank, splits=(out_l, out_k, in_m, in_n), factor=factor, **options)

    # --------------------------------------------------------------- math
    def _bypass(self, x: Tensor, params: dict[str, Tensor], scale: float) -> Tensor:
        w1, w2 = ops.lokr_factors(params)
        spec = self.spec
        if spec.is_conv:
            return ops.lokr_bypass_conv2d(x, w1, w2, scale, spec.stride, spec.padding, spec.dilation,
                                          kernel_size=spec.kernel)
        return ops.lokr_bypass_linear(x, w1, w2, scale)

    def fuses_linear(self) -> bool:
        """Not for conv, DoRA, or the dropouts in training (rank dropout masks output rows, module dropout
        skips the term: `forward` does both)."""
        if self.spec.is_conv or self.dora_scale is not None:
            return False
        return not (self.training and (self.rank_dropout or self.module_dropout))

    def fused_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Frozen Linear + LoKr term through `ops.lokr_linear` (one autograd node; multiplier and scalar folded in)."""
        params = self.live_params()
        if len(params) == 2 and "lokr_w1" in params and "lokr_w2" in params and params["lokr_w2"].dim() == 2:
            w1, w2 = params["lokr_w1"], params["lokr_w2"]  # two full matrices: ops casts them to x's dtype itself
        else:
            w1, w2 = ops.lokr_factors({n: t.to(x.dtype) for n, t in params.items()})
        return ops.lokr_linear(x, weight, bias, w1, w2, self._scale * self.multiplier)

    def _differentiable_delta(self, params: dict[str, Tensor], scale: float) -> Tensor:
        w1, w2 = ops.lokr_factors(params)
        m1, m2 = w1.matrix(), w2.materialize()  # differentiable; (out_l, in_m) and (out_k, in_n[*K] | , kh, kw)
        m1 = m1.reshape(*m1.shape, *([1] * (m2.dim() - 2)))
        return (torch.kron(m1, m2) * scale).reshape(self.spec.weight_shape)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", W1 {self.out_l}x{self.in_m} {'full' if self.w1_full else 'low_rank'}, "
                f"W2 {self.out_k}x{self.in_n} {self.w2_form}, factor={self.factor}")

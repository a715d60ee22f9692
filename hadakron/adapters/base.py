"""`AdapterModule`: what LoHa and LoKr training modules share (alpha, scalar, dropouts, DoRA, files).

The math lives in `hadakron.ops`; this class only holds parameters and options around it. A module
keeps the layer's geometry (`LayerSpec`), never the layer, so the base weights stay out of its
`parameters()` and `state_dict()`. The one exception is DoRA (`dora_scale`, loaded from a file or trained
with `dora_wd`): its output depends on the base weight, which is only read from the layer at call time
through a plain (unregistered) reference, never written.
"""
from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch
from torch import nn

from hadakron import ops
from hadakron.adapters.layer import LayerSpec

Tensor = torch.Tensor


def _check_probability(name: str, p: float, *, allow_one: bool) -> float:
    p = float(p)
    ok = 0.0 <= p <= 1.0 if allow_one else 0.0 <= p < 1.0
    if not ok:
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}; got {p}")
    return p


def normalize_alpha(alpha: float | Tensor | None, rank: int) -> float:
    """Alpha as sd-scripts/LyCORIS read it: None or 0 means alpha = rank (scale 1)."""
    if isinstance(alpha, Tensor):
        alpha = float(alpha.detach().float())
    if alpha is None or alpha == 0:
        return float(rank)
    return float(alpha)


def dora_magnitude(weight: Tensor, on_output: bool = True) -> Tensor:
    """DoRA's initial magnitude ||W|| as LyCORIS shapes it: per output row `(out, 1, ...)` (`wd_on_output`) or per
    input column `(1, in, ...)`, in float32 (LyCORIS' dtype; float64 stays float64), from a read-only copy of the layer's weight."""
    w = weight.detach()
    w = w.to(torch.float32) if w.dtype != torch.float64 else w
    ones = (1,) * (w.dim() - 1)
    if on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape((w.shape[0],) + ones)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape((1, w.shape[1]) + ones[1:])


def rs_alpha(alpha: float, rank: int, rs_lora: bool) -> float:
    """The alpha to store so that alpha / rank is LyCORIS' rs_lora scale alpha / sqrt(rank) (as LyCORIS saves it)."""
    return float(alpha) * math.sqrt(rank) if rs_lora else float(alpha)


def dora_options(layer: nn.Module, dora_wd: bool, wd_on_output: bool, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """The constructor options of a freshly trained DoRA (`dora_wd`): a trainable magnitude initialised to ||W||
    (norm taken in float32 as LyCORIS, kept in the factors' dtype) and the layer whose weight the forward reads;
    {} without DoRA."""
    if not dora_wd:
        return {}
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"dora_wd needs the layer's weight; {type(layer).__name__} has none")
    with torch.no_grad(), torch.inference_mode(False):
        magnitude = dora_magnitude(weight, wd_on_output).to(device=device, dtype=dtype).clone()
    return {"dora_scale": magnitude, "base_layer": layer, "train_dora": True}


def _refresh_after_load(module: "AdapterModule", incompatible_keys) -> None:
    module.refresh_scale()


class AdapterModule(nn.Module):
    """Base of `LoHa` and `LoKr`: the additive bypass term `multiplier * s * dW x` of one layer.

    Subclasses set `algorithm`, `FACTOR_NAMES` (canonical tensor order) and implement `_bypass`
    and `_from_file_params`.
    """

    algorithm: ClassVar[str] = ""
    FACTOR_NAMES: ClassVar[tuple[str, ...]] = ()
    _registry: ClassVar[dict[str, type["AdapterModule"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.algorithm:
            AdapterModule._registry[cls.algorithm] = cls

    def __init__(
        self,
        spec: LayerSpec,
        factors: Mapping[str, Tensor],
        alpha: Tensor,
        rank: int,
        *,
        use_scalar: bool = False,
        scalar_init: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        dora_scale: Tensor | None = None,
        base_layer: nn.Module | None = None,
        train_dora: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.rank = int(rank)
        self.multiplier = 1.0
        self.rank_dropout = _check_probability("rank_dropout", rank_dropout, allow_one=False)
        self.module_dropout = _check_probability("module_dropout", module_dropout, allow_one=True)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        self.factor_names: tuple[str, ...] = tuple(n for n in self.FACTOR_NAMES if n in factors)
        for name in self.factor_names:
            self.register_parameter(name, nn.Parameter(factors[name]))
        self.register_buffer("alpha", alpha)
        self._scale = 1.0
        self.refresh_scale()
        # alpha can change through load_state_dict: keep the cached float in step
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.use_scalar = bool(use_scalar)
        if self.use_scalar:
            self.scalar = nn.Parameter(torch.tensor(float(scalar_init), dtype=torch.float32, device=alpha.device))
        else:
            self.scalar = None
        # The scalar is folded into the smallest factor (first in canonical order on ties), in the
        # forward as well as in the file, so every path computes the very same dW.
        self.scalar_target = min(self.factor_names, key=lambda n: factors[n].numel())
        if dora_scale is not None:
            if train_dora:  # the magnitude is trained (a parameter, saved as the file's dora_scale)
                self.register_parameter("dora_scale", nn.Parameter(dora_scale))
            else:
                self.register_buffer("dora_scale", dora_scale)
            if base_layer is None:
                raise ValueError(f"{type(self).__name__}: dora_scale needs the base layer (its weight)")
            self._base_layer_ref: list[nn.Module] = [base_layer]  # a list: not registered as a submodule
        else:
            self.dora_scale = None
            self._base_layer_ref = []

    # ------------------------------------------------------------------ construction from files
    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Tensor],
        layer: nn.Module,
        *,
        use_scalar: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ) -> "AdapterModule":
        """Rebuild the right module (LoHa or LoKr) for `layer` from a file's tensors, by shapes alone.

        Keeps every tensor's dtype, so `file_state_dict()` gives the same tensors back. A missing
        `alpha` means scale 1 (as ComfyUI reads it); it is written back as alpha = rank.
        `use_scalar=True` adds a trainable scalar starting at 1 (dW unchanged), e.g. to resume.
        """
        algorithm = ops.algorithm_of(dict(params))
        if algorithm not in AdapterModule._registry:
            names = ", ".join(sorted(params)) or "none"
            raise ValueError(f"not a LoHa/LoKr module: algorithm {algorithm!r} from tensors {names}")
        target = AdapterModule._registry[algorithm]
        if cls is not AdapterModule and cls is not target:
            raise ValueError(f"{cls.__name__}.from_params got {algorithm} tensors")
        known = set(target.FACTOR_NAMES) | {"alpha", "dora_scale"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{target.__name__}: unknown tensor name(s) {unknown}; expected some of {sorted(known)}")
        spec = LayerSpec.of(layer)
        factors = {n: params[n].detach().clone() for n in target.FACTOR_NAMES if n in params}
        dora = params.get("dora_scale")
        return target._from_file_params(
            spec, factors, params.get("alpha"),
            use_scalar=use_scalar, scalar_init=1.0, rank_dropout=rank_dropout, module_dropout=module_dropout,
            dora_scale=None if dora is None else dora.detach().clone(), base_layer=layer,
        )

    @classmethod
    def from_state_dict(cls, params: Mapping[str, Tensor], layer: nn.Module, **options) -> "AdapterModule":
        """Alias of `from_params` (the name issue 2 uses)."""
        return cls.from_params(params, layer, **options)

    @classmethod
    def _from_file_params(cls, spec: LayerSpec, factors: dict[str, Tensor], alpha: Tensor | None,
                          **options) -> "AdapterModule":
        raise NotImplementedError

    @staticmethod
    def _alpha_tensor(alpha: Tensor | None, rank: int, like: Tensor) -> Tensor:
        """The alpha buffer: the file's own tensor (dtype kept) or, if missing, rank (scale 1)."""
        if alpha is None:
            return torch.tensor(float(rank), dtype=torch.float32, device=like.device)
        return alpha.detach().clone()

    @staticmethod
    def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], spec: LayerSpec) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"{name}: expected shape {tuple(expected)} for a layer with weight {spec.weight_shape}, "
                f"found {tuple(tensor.shape)}"
            )

    # ------------------------------------------------------------------ parameters and files
    def factors(self) -> dict[str, Tensor]:
        """The module's own factor tensors (trainable, scalar not folded)."""
        return {n: getattr(self, n) for n in self.factor_names}

    def live_params(self) -> dict[str, Tensor]:
        """Factors with the scalar folded into the smallest one: the tensors every dW path uses."""
        params = self.factors()
        if self.scalar is not None:
            t = params[self.scalar_target]
            params[self.scalar_target] = t * self.scalar.to(t.dtype)
        return params

    @property
    def scale(self) -> float:
        """The scale ComfyUI applies to this module's dW (see `hadakron.ops.module_scale`), cached as a float."""
        return self._scale

    def refresh_scale(self) -> None:
        """Recompute the cached scale from `alpha` (a float, so forward never syncs a GPU to read alpha)."""
        self._scale = float(ops.module_scale({**self.factors(), "alpha": self.alpha}))

    def file_state_dict(self) -> dict[str, Tensor]:
        """The module's tensors under the file's own names, scalar folded in, `alpha` included."""
        with torch.no_grad():
            out = {n: t.detach().clone() for n, t in self.live_params().items()}
        out["alpha"] = self.alpha.detach().clone()
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach().clone()
        return out

    def _ops_params(self) -> dict[str, Tensor]:
        """`live_params()` plus alpha and dora_scale: the parameter dict `hadakron.ops` reads."""
        out = {**self.live_params(), "alpha": self.alpha}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    def _param_dtype(self) -> torch.dtype:
        return getattr(self, self.factor_names[0]).dtype

    def _base_weight(self, base_weight: Tensor | None) -> Tensor:
        if base_weight is not None:
            return base_weight
        if not self._base_layer_ref:
            raise ValueError(f"{type(self).__name__}: DoRA needs the base weight; pass base_weight=")
        weight = getattr(self._base_layer_ref[0], "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"{type(self).__name__}: DoRA needs the base layer's weight, which is not a tensor")
        return weight

    def delta_weight(self, base_weight: Tensor | None = None) -> Tensor:
        """Scaled dW in the layer's weight shape, in the parameters' dtype (no multiplier, no dropout, no graph).

        With DoRA it is the effective change `patched(W) - W` at strength 1; W comes from the layer
        unless `base_weight` is given.
        """
        dtype = self._param_dtype()
        device = getattr(self, self.factor_names[0]).device
        # detached: ops rebuilds without autograd, and torch.matmul picks other kernels for tensors that
        # require grad; detached inputs give bit for bit what any loader computes from file_state_dict()
        with torch.no_grad():
            params = {n: t.detach() for n, t in self._ops_params().items()}
        if self.dora_scale is None:
            return ops.delta_weight(params, self.spec.weight_shape, dtype=dtype, device=device)
        with torch.no_grad():  # (ops.patched_weight also fails on its no_grad views when grad mode is on)
            w = self._base_weight(base_weight).detach().to(device=device, dtype=dtype)
            w = w.reshape(self.spec.weight_shape)
            return ops.patched_weight(w, params, 1.0, dtype=dtype) - w

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """The additive term `multiplier * s * dW x` (layer op with the layer's conv args, no bias).

        Runs in `x.dtype`. dW is never built for groups=1 layers without DoRA (ops bypass products).
        """
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return x.new_zeros(self.spec.output_shape(x))
        if self.dora_scale is not None:
            y = self._dora_forward(x)
        else:
            params = {n: t.to(x.dtype) for n, t in self.live_params().items()}
            scale = self.scale * self.multiplier
            if self.spec.groups != 1:  # ops' bypass products cover groups=1 only
                y = self.spec.apply_weight(x, self._differentiable_delta(params, scale))
            else:
                y = self._bypass(self.spec.prepare_input(x), params, scale)
        if self.training and self.rank_dropout:
            y = self._apply_rank_dropout(y)
        return y

    def fuses_linear(self) -> bool:
        """Whether `fused_linear` can stand in for `F.linear(x, W, b) + self(x)` now (LoKr on a Linear, options
        the fused op expresses); False here: the caller adds `self(x)` to the layer's own output."""
        return False

    def fused_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """`F.linear(x, weight, bias) + self(x)` as one fused op (only where `fuses_linear()`)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused Linear forward")

    def _dora_forward(self, x: Tensor) -> Tensor:
        """DoRA: the term is `multiplier * (W_d - W) x` with W_d = dora_scale * (W + s dW) / ||W + s dW||.

        It needs the base weight W (read from the layer now), so dW is built here, differentiably.
        """
        dtype = self._param_dtype()
        w = self._base_weight(None).detach().to(device=x.device, dtype=dtype).reshape(self.spec.weight_shape)
        params = {n: t.to(x.device) for n, t in self.live_params().items()}
        merged = w + self._differentiable_delta(params, self.scale)
        ds = self.dora_scale.to(device=x.device, dtype=dtype)
        norm, _ = ops.dora_norm(merged, ds)
        w_d = merged * (ds.reshape(norm.shape) / (norm + torch.finfo(dtype).eps))  # eps as ops.patched_weight
        return self.spec.apply_weight(x, ((w_d - w) * self.multiplier).to(x.dtype))

    def _apply_rank_dropout(self, y: Tensor) -> Tensor:
        """Rank dropout: zero whole output rows of the term (one mask per call), rescaled by 1/(1-p) (sd-scripts),
        or with `rank_dropout_scale` by 1/mean(mask) as LyCORIS does (an all-dropped mask stays zero)."""
        p = self.rank_dropout
        keep = (torch.rand(self.spec.out_dim, device=y.device) > p).to(y.dtype)
        if self.rank_dropout_scale:
            keep = keep / keep.mean().clamp_min(1.0 / keep.numel())
        else:
            keep = keep / (1.0 - p)
        if self.spec.is_conv:
            keep = keep.view(-1, 1, 1)
        return y * keep

    def _bypass(self, x: Tensor, params: dict[str, Tensor], scale: float) -> Tensor:
        """`scale * dW x` through an ops bypass product (x already padded by `spec.prepare_input`)."""
        raise NotImplementedError

    def _differentiable_delta(self, params: dict[str, Tensor], scale: float) -> Tensor:
        """`scale * dW` in the layer's weight shape, with autograd (groups != 1 and DoRA paths)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        shape = "x".join(str(d) for d in self.spec.weight_shape)
        return (f"{self.algorithm}, weight {shape}, rank={self.rank}, alpha={float(self.alpha):g}, "
                f"scalar={self.use_scalar}, rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}"
                + (f", dora={tuple(self.dora_scale.shape)}" if self.dora_scale is not None else ""))


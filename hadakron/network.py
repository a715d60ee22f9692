"""Attach LoHa/LoKr adapters to a live torch model by the family's rules; optimizer groups (LoRA+, per-regex lr).

`AdapterNetwork.build(family, parts, config)` finds each part's layers by their canonical dotted names
(any model whose module paths follow the family's names: ComfyUI's, sd-scripts', our test models; a
`diffusion_model.`-style prefix is found by itself). An Anima DiT's depth is the model's own (`blocks.N`: 10, 28,
40, 52, ...), so the targets are as many blocks as it has. Layers are matched with `isinstance(nn.Linear /
nn.Conv2d)`, so subclasses such as ComfyUI's cast ops count. Selection follows sd-scripts
(`networks/network_base.py`): exclude/include patterns (`re.fullmatch` on the unprefixed dotted name,
include only rescues), then the first matching `network_reg_dims` entry (alpha = network_alpha), then
network_dim for Linear / 1x1 conv, conv_dim (with conv_alpha) for kxk conv; a dim of 0 skips.
Attaching wraps each layer's forward: y = layer(x) + adapter(x), computed as one fused op (LoKr's
`ops.lokr_linear`) for a plain Linear whose weight needs no cast; the base weights are never written. On a
ComfyUI cast op the fused op first calls what that op's forward calls every op (`comfy.ops.run_every_op`, the
interrupt check), found through the layer's class: the library never imports comfy and needs nothing passed in. A layer whose frozen
weight is stored in float8 (ComfyUI's UNETLoader `weight_dtype` fp8_*) runs its op on a per-call upcast of that one
weight (`ops.frozen_linear` / `frozen_conv2d`, cast again in backward): the model stays float8 in memory.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from hadakron import ops
from hadakron.adapters import AdapterModule, LoHa, LoKr
from hadakron.arch import (Family, compile_patterns, family_for_model, file_key, get_family, match_part_names, module_key,
                           parse_keys)

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

ALGORITHMS = ("loha", "lokr")
_PLUS_NAMES = {"loha": ("hada_w2_a",), "lokr": ("lokr_w1",)}


# ---------------------------------------------------------------------------------------- config
def parse_regex_values(value: str | Mapping[str, float] | Sequence[tuple[str, float]] | None, what: str,
                       cast: type) -> dict[str, float]:
    """`"re1=v1,re2=v2"` (sd-scripts' syntax), a mapping or pairs -> ordered `{regex: value}`; bad input raises."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise ValueError(f"{what}: entry {item!r} is not 'regex=value'")
            regex, v = item.split("=", 1)
            pairs.append((regex.strip(), v.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = [tuple(p) for p in value]
    out: dict[str, float] = {}
    for regex, v in pairs:
        compile_patterns([regex], what)
        try:
            out[regex] = cast(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: value {v!r} for '{regex}' is not a {cast.__name__}") from None
        if out[regex] < 0:
            raise ValueError(f"{what}: value {v!r} for '{regex}' must be >= 0")
    return out


def _pattern_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    """A list of regexes from a list or a string (`"['a', 'b']"` as sd-scripts' literal_eval, or one regex per line,
    as the trainer's multiline widget gives them: a regex never holds a line break, so each line is one)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"{what}: {value!r} is not a list of strings") from None
        else:
            value = [line.strip() for line in text.splitlines() if line.strip()]
    out = [str(v) for v in value]
    compile_patterns(out, what)
    return out


def network_arg_text(key: str, value: object, *, flags: tuple[str, str] = ("false", "true")) -> str:
    """One network argument as its sd-scripts `--network_args` string (`flags`: how False/True are spelled)."""
    if key in ("exclude_patterns", "include_patterns"):
        return repr(list(value))
    if key in ("network_reg_dims", "network_reg_lrs"):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return flags[value]
    return str(value)


@dataclass
class NetworkConfig:
    """Everything that chooses and shapes the adapters (sd-scripts' network args, LyCORIS' extra options)."""

    algo: str = "lokr"
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    full_matrix: bool = False
    rank_dropout_scale: bool = False
    rs_lora: bool = False
    dora_wd: bool = False
    wd_on_output: bool = True
    exclude_patterns: list[str] = field(default_factory=list)
    include_patterns: list[str] = field(default_factory=list)
    network_reg_dims: dict[str, int] = field(default_factory=dict)
    network_reg_lrs: dict[str, float] = field(default_factory=dict)
    train_llm_adapter: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        self.algo = str(self.algo).lower()
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {ALGORITHMS}; got {self.algo!r}")
        if int(self.network_dim) < 0:
            raise ValueError(f"network_dim must be >= 0; got {self.network_dim}")
        if self.conv_dim is not None and int(self.conv_dim) < 0:
            raise ValueError(f"conv_dim must be >= 0; got {self.conv_dim}")
        if self.conv_dim is not None and self.conv_alpha is None:
            self.conv_alpha = 1.0  # sd-scripts' default when conv_dim is given
        self.exclude_patterns = _pattern_list(self.exclude_patterns, "exclude_patterns")
        self.include_patterns = _pattern_list(self.include_patterns, "include_patterns")
        self.network_reg_dims = parse_regex_values(self.network_reg_dims, "network_reg_dims", int)  # type: ignore
        self.network_reg_lrs = parse_regex_values(self.network_reg_lrs, "network_reg_lrs", float)
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            v = getattr(self, name)
            if v is not None and float(v) <= 0:
                raise ValueError(f"{name} must be > 0; got {v}")

    # sd-scripts' `--network_args key=value` strings <-> config fields
    _ARG_TYPES = {
        "conv_dim": int, "conv_alpha": float, "factor": int, "decompose_both": bool, "use_tucker": bool,
        "use_scalar": bool, "rank_dropout": float, "module_dropout": float, "full_matrix": bool,
        "exclude_patterns": list, "include_patterns": list, "network_reg_dims": str, "network_reg_lrs": str,
        "train_llm_adapter": bool, "loraplus_lr_ratio": float, "loraplus_unet_lr_ratio": float,
        "loraplus_text_encoder_lr_ratio": float, "algo": str, "rank_dropout_scale": bool, "rs_lora": bool,
        "dora_wd": bool, "wd_on_output": bool,
    }
    _IGNORED_ARGS = ("dropout", "verbose", "preset")

    @classmethod
    def from_network_args(cls, args: Mapping[str, object], *, algo: str | None = None, network_dim: int | None = None,
                          network_alpha: float | None = None) -> "NetworkConfig":
        """A config from sd-scripts-style network args (values may be strings, as in `ss_network_args`).

        Unknown keys raise (sd-scripts ignores them silently); `dropout`, `verbose`, `preset` are accepted and unused.
        """
        kw: dict[str, object] = {}
        for key, value in args.items():
            if key in cls._IGNORED_ARGS:
                continue
            kind = cls._ARG_TYPES.get(key)
            if kind is None:
                raise ValueError(f"network_args: unknown key {key!r}; known: {sorted(cls._ARG_TYPES)}")
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
                continue
            if kind is bool:
                kw[key] = value if isinstance(value, bool) else str(value).strip().lower() == "true"
            elif kind in (int, float):
                try:
                    kw[key] = kind(float(value)) if kind is int else float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"network_args: {key}={value!r} is not a {kind.__name__}") from None
            else:
                kw[key] = value
        if algo is not None:
            kw["algo"] = algo
        if network_dim is not None:
            kw["network_dim"] = int(network_dim)
        if network_alpha is not None:
            kw["network_alpha"] = float(network_alpha)
        return cls(**kw)  # type: ignore[arg-type]

    def network_args(self) -> dict[str, str]:
        """The options as sd-scripts-style strings (for `ss_network_args`); `from_network_args` reads them back."""
        out: dict[str, str] = {"algo": self.algo}
        defaults = NetworkConfig()
        for key in self._ARG_TYPES:
            value = getattr(self, key)
            if key == "algo" or value == getattr(defaults, key):
                continue
            out[key] = network_arg_text(key, value)
        return out

    def plus_ratio(self, part: str) -> float | None:
        """LoRA+ ratio of a part: the part-specific one, else the global one (sd-scripts' `or`)."""
        if part == "unet":
            return self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        return self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio


# ---------------------------------------------------------------------------------------- network
@dataclass
class Target:
    """One adapted layer: where it is, its adapter, and what chose its rank and lr."""

    key: str  # kohya module name (lora_name), also the key in AdapterNetwork.adapters
    part: str
    dotted: str
    name: str  # module path in the given part module
    layer: nn.Module
    adapter: AdapterModule
    rank: int
    alpha: float
    reg_lr_index: int | None = None


@dataclass
class LoadReport:
    """What `load_file_state` did: loaded module keys, network modules absent from the file, file keys not used."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]


# ComfyUI's cast-op Linear (`comfy.ops`, read from v0.29; never imported here) runs, per call: the module-level
# `run_every_op()` (its interrupt check: a user's Cancel raises there), then its cast path when weights must be cast
# or patched per call, else nn.Linear's forward through `super()`. The fused path repeats exactly that work: it
# fuses only a comfy.ops forward that names nothing beyond these, and calls the same `run_every_op` first.
_COMFY_PER_OP_HOOK = "run_every_op"
_COMFY_FORWARD_NAMES = frozenset({_COMFY_PER_OP_HOOK, "comfy_cast_weights", "weight_function", "bias_function",
                                  "forward_comfy_cast_weights", "len", "super", "forward"})


class _PerOpHook:
    """Calls the per-op hook a comfy.ops forward calls, looked up in that forward's module globals on every call
    (as the forward itself looks it up: a later patch of `comfy.ops.run_every_op` is honoured)."""

    __slots__ = ("namespace",)

    def __init__(self, namespace: Mapping[str, object]) -> None:
        self.namespace = namespace

    def __call__(self) -> None:
        self.namespace[_COMFY_PER_OP_HOOK]()


def _next_forward_owner(cls: type, owner: type) -> type | None:
    """The class whose `forward` a zero-argument `super().forward` inside `owner` reaches, for an instance of cls."""
    mro = cls.__mro__
    for klass in mro[mro.index(owner) + 1:]:
        if "forward" in klass.__dict__:
            return klass
    return None


def _fusion_plan(layer: nn.Module) -> tuple[bool, _PerOpHook | None]:
    """(fusable, per-op hook): whether the layer's class forward may be replaced by the fused op, and what it
    calls per op that the fused op must call too.

    Fusable: nn.Linear's own forward (no hook), or a ComfyUI cast op's forward (defined in `comfy.ops`, naming only
    `_COMFY_FORWARD_NAMES`, its `super().forward` reaching nn.Linear's) whose per-op `run_every_op` is then the
    hook. Anything else (another subclass, a future comfy.ops forward doing more) runs its own forward."""
    if not isinstance(layer, nn.Linear):
        return False, None
    cls = type(layer)
    forward = cls.forward
    if forward is nn.Linear.forward:
        return True, None
    code = getattr(forward, "__code__", None)
    if getattr(forward, "__module__", None) != "comfy.ops" or not hasattr(layer, "comfy_cast_weights") \
            or code is None or not set(code.co_names) <= _COMFY_FORWARD_NAMES:
        return False, None
    owner = next((k for k in cls.__mro__ if k.__dict__.get("forward") is forward), None)
    if owner is None or _next_forward_owner(cls, owner) is not nn.Linear:
        return False, None  # e.g. comfy.ops.cublas_ops.Linear: super() reaches another Linear's forward
    if _COMFY_PER_OP_HOOK not in code.co_names:
        return True, None
    if not callable(forward.__globals__.get(_COMFY_PER_OP_HOOK)):
        return False, None
    return True, _PerOpHook(forward.__globals__)


def _fusable_call(layer: nn.Module, x: Tensor) -> bool:
    """True when the layer's weight and bias are plain tensors on x's device in x's dtype, so F.linear would
    run on them as they are (nothing cast or moved per call; autocast's own cast `ops.lokr_linear` repeats)."""
    if getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None) \
            or getattr(layer, "bias_function", None) or layer.weight is None or not x.is_floating_point():
        return False
    for t in (layer.weight, layer.bias):
        if t is not None and (type(t) not in (Tensor, nn.Parameter) or t.dtype != x.dtype or t.device != x.device):
            return False
    return True


def _upcast_kind(layer: nn.Module, fusable: bool) -> str | None:
    """"linear" / "conv2d" when the bypass may run the layer's op itself on a per-call upcast of a float8 weight:
    nn.Linear's / nn.Conv2d's own forward, or a ComfyUI cast-op Linear whose forward the fused path accepts."""
    if isinstance(layer, nn.Linear) and fusable:
        return "linear"
    if isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward:
        return "conv2d"
    return None


def _float8_call(layer: nn.Module, x: Tensor) -> bool:
    """True when the layer's weight is a frozen float8 tensor on x's device with nothing patched or streamed per call
    (no ComfyUI weight/bias functions, no dynamic-VRAM state), so upcasting it is all the layer's forward would do."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if type(weight) not in (Tensor, nn.Parameter) or not ops.is_float8(weight.dtype) or weight.requires_grad \
            or weight.device != x.device or not x.is_floating_point():
        return False
    if bias is not None and (type(bias) not in (Tensor, nn.Parameter) or bias.requires_grad or bias.device != x.device):
        return False
    return not (getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None)
                or hasattr(layer, "_v"))


class _BypassForward:
    """The wrapped forward: the layer's own forward plus the adapter's additive term, fused into one op
    (`adapter.fused_linear`, e.g. LoKr's `ops.lokr_linear`) for a plain Linear whose weight needs no cast.

    The fused op does per call what the layer's own forward would have done: for a ComfyUI cast op that is its
    module's `run_every_op()` (the interrupt check that makes Cancel stop mid-step), called first, once per call.
    The library finds it on the layer's class (`_fusion_plan`); the ComfyUI layer passes nothing.
    """

    def __init__(self, layer: nn.Module, adapter: AdapterModule, original) -> None:
        self.layer, self.adapter, self.original = layer, adapter, original
        fusable, self.per_op_hook = _fusion_plan(layer) if original is None else (False, None)
        self.fusable = fusable
        self.upcast = _upcast_kind(layer, fusable) if original is None else None

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.upcast and not args and not kwargs and _float8_call(self.layer, x):
            return self._upcast_forward(x) + self.adapter(x)
        if self.fusable and not args and not kwargs:
            y = self._fused(x)
            if y is not None:
                return y
        if self.original is None:
            y = type(self.layer).forward(self.layer, x, *args, **kwargs)
        else:
            y = self.original(x, *args, **kwargs)
        return y + self.adapter(x)

    def _upcast_forward(self, x: Tensor) -> Tensor:
        """The layer's own output with its float8 weight upcast for this call only (`ops.frozen_linear` /
        `frozen_conv2d`: backward casts again, so no upcast copy is kept); the weight stays float8 in memory."""
        if self.per_op_hook is not None:
            self.per_op_hook()
        layer = self.layer
        if self.upcast == "linear":
            return ops.frozen_linear(x, layer.weight, layer.bias)
        spec = self.adapter.spec
        return ops.frozen_conv2d(spec.prepare_input(x), layer.weight, layer.bias, spec.stride, spec.padding,
                                 spec.dilation, spec.groups)

    def _fused(self, x: Tensor) -> Tensor | None:
        """The fused forward, or None to fall back. Under autocast `ops.lokr_linear` casts x, weight, bias and
        factors to the autocast dtype, as autocast does for F.linear."""
        if not self.adapter.fuses_linear() or not _fusable_call(self.layer, x):
            return None
        if self.per_op_hook is not None:
            self.per_op_hook()
        return self.adapter.fused_linear(x, self.layer.weight, self.layer.bias)


_NO_ATTR = object()



@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None):
    """Seed torch's RNG (CPU, and the CUDA device in use) inside a fork that restores the caller's state after."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


class AdapterNetwork(nn.Module):
    """Adapters over a family's parts. Build with `AdapterNetwork.build`; state keys are kohya names."""

    def __init__(self, family: Family, config: NetworkConfig) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.adapters = nn.ModuleDict()
        self.targets: list[Target] = []
        self.warnings: list[str] = []
        self._saved_forward: dict[str, object] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, family: str | Family, parts: Mapping[str, nn.Module], config: NetworkConfig | None = None,
              *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              seed: int | None = None) -> "AdapterNetwork":
        """Create fresh adapters (dW = 0) for every selected layer of the given parts.

        With `seed`, the random init is drawn from an RNG seeded with it inside a fork, so the same seed gives the
        same adapters (and the same training run) while the caller's random state is left untouched.
        """
        if seed is not None:
            with seeded_rng(int(seed), device):
                return cls.build(family, parts, config, dtype=dtype, device=device)
        if torch.is_inference_mode_enabled():
            # ComfyUI runs nodes under inference mode; adapters are trained, so they must be normal tensors.
            with torch.inference_mode(False):
                return cls.build(family, parts, config, dtype=dtype, device=device)
        fam = get_family(family)
        config = config or NetworkConfig()
        if not parts:
            raise ValueError(f"no parts given; {fam.title} has parts {list(fam.parts)}")
        for part in parts:
            fam.check_part(part)
        fam = _sized_to(fam, parts)
        net = cls(fam, config)
        conv = config.conv_dim is not None and int(config.conv_dim) > 0
        reg_dims = [(re.compile(p), d) for p, d in config.network_reg_dims.items()]
        reg_lrs = [re.compile(p) for p in config.network_reg_lrs]
        seen_layers: dict[int, str] = {}
        all_candidates: list[str] = []
        for part in fam.parts:
            if part not in parts:
                continue
            root = parts[part]
            live = dict(root.named_modules())
            prefix, found = match_part_names(fam, part, live)
            candidates = fam.candidates(part, conv=conv, train_llm_adapter=config.train_llm_adapter)
            all_candidates += candidates
            selected = fam.select(part, conv=conv, train_llm_adapter=config.train_llm_adapter,
                                  exclude_patterns=config.exclude_patterns, include_patterns=config.include_patterns)
            if not found:
                sample = ", ".join(repr(n) for n in list(live)[1:4]) or "none"
                raise ValueError(f"{fam.title} {part}: the given module has none of the {fam.part_titles[part]}'s "
                                 f"layer names (expected e.g. {candidates[0]!r}; found {sample})")
            absent = [d for d in selected if d not in found]
            if absent:
                net._warn(f"{fam.title} {part}: {len(absent)} of {len(selected)} selected layers are not in the "
                          f"given module (e.g. {absent[0]!r}); they get no adapter")
            count = 0
            for dotted in selected:
                if dotted not in found:
                    continue
                layer = live[found[dotted]]
                if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                    net._warn(f"{fam.title} {part}: {found[dotted]!r} is a {type(layer).__name__}, "
                              f"not a Linear/Conv2d; skipped")
                    continue
                rank, alpha = _rank_alpha(dotted, layer, config, reg_dims)
                if not rank:
                    continue
                if id(layer) in seen_layers:
                    raise ValueError(f"layer {part}:{dotted} is the same module as {seen_layers[id(layer)]}; "
                                     f"a layer can carry one adapter (are two parts the same model?)")
                seen_layers[id(layer)] = f"{part}:{dotted}"
                adapter = _make_adapter(layer, rank, alpha, config, dtype, device)
                key = module_key(fam, part, dotted, "kohya")
                reg_i = next((i for i, p in enumerate(reg_lrs) if p.fullmatch(dotted)), None)
                net.adapters[key] = adapter
                net.targets.append(Target(key, part, dotted, found[dotted], layer, adapter, rank, alpha, reg_i))
                count += 1
            if count == 0:
                raise ValueError(f"{fam.title} {part}: no layer selected ({len(candidates)} candidates, "
                                 f"{len(selected)} after exclude/include patterns, dims from network_dim="
                                 f"{config.network_dim}, conv_dim={config.conv_dim}, network_reg_dims); "
                                 f"leave the part out instead of training nothing")
        net._check_patterns(all_candidates)
        logger.info("%s adapter network: %d modules (%s)", fam.title, len(net.targets),
                    ", ".join(f"{p} {n}" for p, n in net.counts().items()))
        return net

    @classmethod
    def from_file(cls, family: str | Family, parts: Mapping[str, nn.Module], tensors: Mapping[str, Tensor],
                  config: NetworkConfig | None = None) -> "AdapterNetwork":
        """Rebuild the network a file describes (any layout): each module's form and rank come from its tensors.

        `config` supplies only dropouts, reg lrs and LoRA+ ratios. Modules whose layer is not in the given parts,
        and keys naming no known layer, raise a ValueError listing them.
        """
        fam = get_family(family)
        for part in parts:
            fam.check_part(part)
        fam = _sized_to(fam, parts)
        config = config or NetworkConfig()
        net = cls(fam, config)
        grouped, _, unknown = _group_file(tensors, fam)
        if unknown:
            raise ValueError(f"{len(unknown)} file keys name no known {fam.title} layer (e.g. {unknown[:3]})")
        if not grouped:
            raise ValueError("the file has no adapter modules")
        reg_lrs = [re.compile(p) for p in config.network_reg_lrs]
        found: dict[str, tuple[dict[str, nn.Module], dict[str, str]]] = {}
        absent = []
        for (part, dotted), params in grouped.items():
            if part not in parts:
                absent.append(f"{part}:{dotted}")
                continue
            if part not in found:
                live = dict(parts[part].named_modules())
                found[part] = (live, match_part_names(fam, part, live)[1])
            live, names = found[part]
            if dotted not in names:
                absent.append(f"{part}:{dotted}")
                continue
            layer = live[names[dotted]]
            adapter = AdapterModule.from_params(params, layer, rank_dropout=config.rank_dropout,
                                                module_dropout=config.module_dropout)
            key = module_key(fam, part, dotted, "kohya")
            reg_i = next((i for i, rx in enumerate(reg_lrs) if rx.fullmatch(dotted)), None)
            net.adapters[key] = adapter
            net.targets.append(Target(key, part, dotted, names[dotted], layer, adapter, adapter.rank,
                                      float(adapter.alpha), reg_i))
        if absent:
            raise ValueError(f"{len(absent)} file modules have no layer in the given parts "
                             f"{sorted(parts)} (e.g. {absent[:3]})")
        return net

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)

    def _check_patterns(self, candidates: list[str]) -> None:
        """Warn about patterns that select nothing (a typo would otherwise pass unnoticed)."""
        c = self.config
        chosen = [t.dotted for t in self.targets]
        checks = [("exclude_patterns", c.exclude_patterns, candidates),
                  ("include_patterns", c.include_patterns,
                   [d for d in candidates if any(re.fullmatch(p, d) for p in self.family.default_excludes + c.exclude_patterns)]),
                  ("network_reg_dims", list(c.network_reg_dims), candidates),
                  ("network_reg_lrs", list(c.network_reg_lrs), chosen)]
        for what, patterns, names in checks:
            for p in patterns:
                rx = re.compile(p)
                if not any(rx.fullmatch(n) for n in names):
                    self._warn(f"{what}: pattern '{p}' matches no {'excluded ' if what == 'include_patterns' else ''}"
                               f"layer of the given parts (it is matched with re.fullmatch on dotted names "
                               f"such as {names[0] if names else 'blocks.0.mlp.layer1'!r})")

    # ------------------------------------------------------------------ views
    @property
    def modules_by_key(self) -> dict[str, AdapterModule]:
        """`{kohya module name: adapter}`."""
        return {t.key: t.adapter for t in self.targets}

    def counts(self) -> dict[str, int]:
        """Number of adapted layers per part."""
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.part] = out.get(t.part, 0) + 1
        return out

    def module_ranks(self) -> dict[str, int]:
        """`{kohya module name: rank}` (for metadata)."""
        return {t.key: t.adapter.rank for t in self.targets}

    def module_alphas(self) -> dict[str, float]:
        """`{kohya module name: alpha}` (each module keeps its own)."""
        return {t.key: float(t.adapter.alpha) for t in self.targets}

    def set_multiplier(self, multiplier: float) -> None:
        for t in self.targets:
            t.adapter.multiplier = float(multiplier)

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._saved_forward)

    def attach(self) -> "AdapterNetwork":
        """Wrap each target layer's forward: y = layer(x) + adapter(x) (bypass, fused where safe; weights untouched)."""
        if self.attached:
            raise RuntimeError("adapter network is already attached")
        for t in self.targets:
            if isinstance(t.layer.__dict__.get("forward"), _BypassForward):
                raise RuntimeError(f"layer {t.part}:{t.dotted} already carries an adapter from another network")
        for t in self.targets:
            original = t.layer.__dict__.get("forward", _NO_ATTR)
            self._saved_forward[t.key] = original
            t.layer.forward = _BypassForward(t.layer, t.adapter, None if original is _NO_ATTR else original)
        return self

    def detach(self) -> "AdapterNetwork":
        """Restore every layer's forward exactly as it was before `attach`."""
        for t in self.targets:
            if t.key not in self._saved_forward:
                continue
            original = self._saved_forward.pop(t.key)
            if original is _NO_ATTR:
                t.layer.__dict__.pop("forward", None)
            else:
                t.layer.forward = original
        return self

    # ------------------------------------------------------------------ files
    def file_state_dict(self, layout: str = "kohya") -> dict[str, Tensor]:
        """Every module's tensors (scalar folded, alpha included) under `layout`'s keys."""
        out: dict[str, Tensor] = {}
        for t in self.targets:
            for param, tensor in t.adapter.file_state_dict().items():
                out[file_key(self.family, t.part, t.dotted, param, layout)] = tensor
        return out

    def load_file_state(self, tensors: Mapping[str, Tensor], *, strict: bool = False) -> LoadReport:
        """Copy a file's tensors (any layout) into the matching adapters; shapes must agree.

        `strict=True` raises when a network module is absent from the file or a file key is not used.
        """
        by_module, file_keys, unknown = _group_file(tensors, self.family)
        targets = {(t.part, t.dotted): t for t in self.targets}
        loaded, missing = [], []
        for where, t in targets.items():
            params = by_module.pop(where, None)
            if params is None:
                missing.append(t.key)
                continue
            _load_into(t, params)
            loaded.append(t.key)
        unexpected = list(unknown) + [k for where in by_module for k in file_keys[where]]
        if strict and (missing or unexpected):
            raise ValueError(f"file does not fit the network: {len(missing)} network modules missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} keys unused (e.g. {unexpected[:2]})")
        return LoadReport(loaded, missing, unexpected)

    # ------------------------------------------------------------------ optimizer groups
    def param_groups(self, unet_lr: float | None = None,
                     te_lr: float | Sequence[float] | Mapping[str, float] | None = None,
                     default_lr: float = 1e-4) -> list[dict]:
        """Optimizer groups as sd-scripts' `prepare_optimizer_params_with_multiple_te_lrs`.

        Text encoder parts first, then the UNet/DiT; within a part the `network_reg_lrs` groups (in
        regex order), then the part's own group; each split into `lora` and LoRA+ `plus` (lr x ratio;
        `hada_w2_a` for LoHa, `lokr_w1*` for LoKr) when a ratio applies. Groups with lr 0/None are
        left out. `te_lr`: one lr, one per text encoder (te1, te2), or `{part: lr}`; None -> default_lr.
        """
        te_parts = [p for p in self.family.parts if p != "unet"]
        lrs = {"unet": default_lr if unet_lr is None else unet_lr}
        for i, part in enumerate(te_parts):
            if te_lr is None:
                lrs[part] = default_lr
            elif isinstance(te_lr, Mapping):
                lrs[part] = te_lr.get(part, default_lr)
            elif isinstance(te_lr, (list, tuple)):
                lrs[part] = (te_lr[i] if i < len(te_lr) else te_lr[0]) if te_lr else default_lr
            else:
                lrs[part] = te_lr
        reg_lrs = list(self.config.network_reg_lrs.values())
        groups: list[dict] = []
        for part in te_parts + ["unet"]:
            members = [t for t in self.targets if t.part == part]
            if not members:
                continue
            title = "unet" if part == "unet" else f"textencoder {te_parts.index(part) + 1}"
            ratio = self.config.plus_ratio(part)
            buckets = [(f" reg_lr_{i}", lr, [t for t in members if t.reg_lr_index == i]) for i, lr in enumerate(reg_lrs)]
            buckets.append(("", lrs[part], [t for t in members if t.reg_lr_index is None]))
            for suffix, lr, ts in buckets:
                lora, plus = _split_plus(ts, ratio is not None)
                for kind, named, group_lr in (("lora", lora, lr), ("plus", plus, None if lr is None else lr * (ratio or 1))):
                    if not named or not group_lr:
                        continue
                    groups.append({"params": [p for _, p in named], "names": [n for n, _ in named], "lr": float(group_lr),
                                   "part": part, "kind": kind,
                                   "description": title + suffix + (" plus" if kind == "plus" else "")})
        return groups


def _sized_to(fam: Family, parts: Mapping[str, nn.Module]) -> Family:
    """`fam` at the depth of the given model parts (Anima: as many `blocks.N` as the DiT has), so targets follow it."""
    return family_for_model(fam, {p: [n for n, _ in m.named_modules()] for p, m in parts.items() if p in fam.stacks})


def _group_file(tensors: Mapping[str, Tensor], fam: Family):
    """`({(part, dotted): {param: tensor}}, {(part, dotted): [file keys]}, unknown keys)`; a module spelled twice raises."""
    parsed, unknown = parse_keys(tensors, fam)
    by_module: dict[tuple[str, str], dict[str, Tensor]] = {}
    file_keys: dict[tuple[str, str], list[str]] = {}
    module_keys: dict[tuple[str, str], str] = {}
    for p in parsed:
        where = (p.part, p.dotted)
        first = module_keys.setdefault(where, p.module_key)
        if first != p.module_key:
            raise ValueError(f"the file names layer {p.part}:{p.dotted} twice, as {first!r} and {p.module_key!r}")
        if p.param in by_module.get(where, {}):
            raise ValueError(f"the file holds {p.param} of {p.module_key!r} twice (key {p.key!r})")
        by_module.setdefault(where, {})[p.param] = tensors[p.key]
        file_keys.setdefault(where, []).append(p.key)
    return by_module, file_keys, unknown


def _rank_alpha(dotted: str, layer: nn.Module, config: NetworkConfig,
                reg_dims: list[tuple[re.Pattern[str], int]]) -> tuple[int, float]:
    for rx, dim in reg_dims:
        if rx.fullmatch(dotted):
            return int(dim), float(config.network_alpha)
    small = isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1)
    if small:
        return int(config.network_dim), float(config.network_alpha)
    if config.conv_dim:
        return int(config.conv_dim), float(config.conv_alpha if config.conv_alpha is not None else 1.0)
    return 0, 0.0


def _make_adapter(layer: nn.Module, rank: int, alpha: float, c: NetworkConfig, dtype, device) -> AdapterModule:
    common = dict(use_tucker=c.use_tucker, use_scalar=c.use_scalar, rank_dropout=c.rank_dropout,
                  module_dropout=c.module_dropout, rank_dropout_scale=c.rank_dropout_scale, rs_lora=c.rs_lora,
                  dora_wd=c.dora_wd, wd_on_output=c.wd_on_output, dtype=dtype, device=device)
    if c.algo == "loha":
        return LoHa.for_layer(layer, rank, alpha, **common)
    return LoKr.for_layer(layer, rank, alpha, factor=c.factor, decompose_both=c.decompose_both,
                          full_matrix=c.full_matrix, **common)


def _split_plus(targets: Iterable[Target], use_plus: bool) -> tuple[list, list]:
    lora, plus = [], []
    for t in targets:
        for name, p in t.adapter.named_parameters():
            full = f"{t.key}.{name}"
            is_plus = use_plus and any(s in name for s in _PLUS_NAMES[t.adapter.algorithm])
            (plus if is_plus else lora).append((full, p))
    return lora, plus


def _load_into(t: Target, params: Mapping[str, Tensor]) -> None:
    """Copy one file module's tensors into its adapter, with clear errors on form or shape mismatch."""
    adapter = t.adapter
    own = set(adapter.factor_names)
    given = {n for n in params if n not in ("alpha", "dora_scale")}
    if given != own:
        raise ValueError(f"module {t.key}: file tensors {sorted(given)} do not match the network's {sorted(own)} "
                         f"(built with another algorithm, rank, factor or Tucker setting?)")
    with torch.no_grad():
        for name in sorted(own):
            dst, src = getattr(adapter, name), params[name]
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"module {t.key}: {name} has shape {tuple(src.shape)} in the file, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))
        if (adapter.dora_scale is None) != ("dora_scale" not in params):
            raise ValueError(f"module {t.key}: the file {'has' if 'dora_scale' in params else 'lacks'} dora_scale, "
                             f"the network {'lacks' if adapter.dora_scale is None else 'has'} it (dora_wd differs?)")
        if adapter.dora_scale is not None:
            src = params["dora_scale"]
            if tuple(src.shape) != tuple(adapter.dora_scale.shape):
                raise ValueError(f"module {t.key}: dora_scale has shape {tuple(src.shape)} in the file, expected "
                                 f"{tuple(adapter.dora_scale.shape)} (wd_on_output differs?)")
            adapter.dora_scale.copy_(src.to(adapter.dora_scale.dtype))
        if "alpha" in params:
            adapter.alpha.copy_(params["alpha"].to(adapter.alpha.dtype).reshape(adapter.alpha.shape))
        if adapter.scalar is not None:
            adapter.scalar.fill_(1.0)  # the file's tensors already hold the scalar
    adapter.refresh_scale()

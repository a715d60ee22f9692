"""PEFT's `adapter_config.json` beside an adapter file: the scale PEFT applies, given to the modules as tensors.

PEFT saves LoHa/LoKr/LoRA as `adapter_model.safetensors` (keys `base_model.model.<name>.<param>`, no `alpha`
tensors) with `adapter_config.json` beside it. Its scale rule (huggingface/peft `tuners/{loha,lokr,lora}/layer.py`
`update_layer`, `model.py` `_create_and_replace`, `utils/other.py` `get_pattern_key`), per module:
- r and alpha: the first `rank_pattern` / `alpha_pattern` key (in file order) for which
  `re.match(rf"(.*\\.)?({key})$", name)` matches the module's name inside the wrapped model, else `r` / `alpha`
  (`lora_alpha` for LoRA). PEFT's defaults, 8 and 8, fill a missing `r` / `alpha`.
- LoHa: alpha / r. LoKr: alpha / r for every form, also when both Kronecker factors are full, where LyCORIS and
  `hadakron.ops.module_scale` use 1 and ignore alpha. LoRA: lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`.

So that every user of a module's tensors (loader patch, bake, combine, convert, load report) gets exactly PEFT's
delta-W with no special case, the scale is written into the module's own tensors, in what `hadakron.ops` reads:
- a module whose ops scale is alpha / rank gets a synthesized `alpha` (PEFT's alpha, or lora_alpha * sqrt(r) for
  rsLoRA): exact, since its rank is PEFT's r (checked);
- a LoKr whose factors are both full gets PEFT's scale folded into its smaller factor (computed in float32, or
  float64 for a float64 file), since ops gives it scale 1 whatever its alpha.
The file's own tensors win: a module that already has an `alpha` is left as it is (a warning says so when the config
disagrees). The config also comes from the file's metadata `lora_adapter_metadata` (diffusers embeds the PEFT
config there), which then applies to every module of that file.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from hadakron.io.errors import AdapterFileError
from hadakron.ops import algorithm_of, module_rank, module_scale

CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_CONFIG_KEY = "lora_adapter_metadata"
PEFT_PREFIX = "base_model.model."
# diffusers component prefixes a metadata-embedded config's module names may carry (the config saw names below them)
_COMPONENT_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")
_ALGORITHMS = {"LOHA": "loha", "LOKR": "lokr", "LORA": "lora"}
_PEFT_DEFAULT = 8  # PEFT's LoHaConfig / LoKrConfig / LoraConfig default r and alpha (lora_alpha)

Params = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PeftConfig:
    """The parts of a PEFT adapter config that decide the scale; `source` names where it was read from."""

    source: str
    algorithm: str  # "loha" | "lokr" | "lora"
    r: int
    alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    notes: tuple[str, ...] = ()  # defaults filled in, options not applied: warnings for the file's problems
    in_file: bool = False  # read from the adapter file's own metadata (then it applies to all its modules)

    @property
    def alpha_key(self) -> str:
        return "lora_alpha" if self.algorithm == "lora" else "alpha"

    def rank_of(self, name: str) -> tuple[int, str]:
        """(r, the config key it came from) for a module named `name` inside the wrapped model."""
        key = _pattern_key(self.rank_pattern, name)
        return (self.rank_pattern[key], f"rank_pattern[{key!r}]") if key is not None else (self.r, "r")

    def alpha_of(self, name: str) -> tuple[float, str]:
        """(alpha, the config key it came from) for a module named `name`."""
        key = _pattern_key(self.alpha_pattern, name)
        return ((self.alpha_pattern[key], f"alpha_pattern[{key!r}]") if key is not None
                else (self.alpha, self.alpha_key))

    def scale(self, name: str) -> float:
        """PEFT's scale of the module: alpha / r (lora_alpha / sqrt(r) for rsLoRA)."""
        r, alpha = self.rank_of(name)[0], self.alpha_of(name)[0]
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: Mapping[str, object], name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first key matching `(.*\\.)?(key)$` at the start of `name`, else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name if name in patterns else None


# ------------------------------------------------------------------------------------------ reading the config
def peft_config_path(path: str | Path) -> Path | None:
    """`adapter_config.json` beside the adapter file when there is one (a loader's cache key should include its
    size and mtime: editing it changes the scale)."""
    config_path = Path(path).parent / CONFIG_NAME
    return config_path if config_path.is_file() else None


def find_peft_config(path: str | Path | None, metadata: Mapping[str, str] | None = None) -> PeftConfig | None:
    """The PEFT config of the adapter file at `path`: embedded in its metadata (`lora_adapter_metadata`), else
    `adapter_config.json` in the same folder; None when there is neither. Invalid configs raise `AdapterFileError`."""
    if path is None:
        return None
    path = Path(path)
    embedded = (metadata or {}).get(METADATA_CONFIG_KEY)
    if embedded:
        source = f"{path} metadata {METADATA_CONFIG_KEY!r}"
        try:
            data = json.loads(embedded)
        except ValueError as exc:
            raise AdapterFileError(path, "the embedded PEFT config is not valid JSON", key=METADATA_CONFIG_KEY,
                                   expected="a JSON object", found=str(exc)) from None
        if isinstance(data, dict) and "peft_type" in data:
            return parse_peft_config(data, source, in_file=True)
    config_path = peft_config_path(path)
    if config_path is None:
        return None
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFileError(config_path, "could not read the PEFT config beside the adapter",
                               found=f"{type(exc).__name__}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AdapterFileError(config_path, "not valid JSON", expected="a PEFT adapter config object",
                               found=str(exc)) from None
    return parse_peft_config(data, str(config_path))


def parse_peft_config(data: object, source: str, *, in_file: bool = False) -> PeftConfig:
    """Validate a PEFT config dict (as `adapter_config.json` holds it); `AdapterFileError` names `source` and key."""
    if not isinstance(data, dict):
        raise AdapterFileError(source, "not a PEFT adapter config", expected="a JSON object",
                               found=type(data).__name__)
    peft_type = data.get("peft_type")
    if peft_type not in _ALGORITHMS:
        raise AdapterFileError(source, "not a LoHa, LoKr or LoRA config", key="peft_type",
                               expected=" / ".join(repr(t) for t in _ALGORITHMS), found=repr(peft_type))
    algorithm = _ALGORITHMS[peft_type]
    alpha_key = "lora_alpha" if algorithm == "lora" else "alpha"
    notes = []
    for key in ("r", alpha_key):
        if data.get(key) is None:
            notes.append(f"{source}: no {key!r}; PEFT's default {_PEFT_DEFAULT} is used")
    r = _rank(_PEFT_DEFAULT if data.get("r") is None else data["r"], source, "r")
    alpha = _number(_PEFT_DEFAULT if data.get(alpha_key) is None else data[alpha_key], source, alpha_key)
    rank_pattern = {k: _rank(v, source, f"rank_pattern[{k!r}]")
                    for k, v in _patterns(data.get("rank_pattern"), source, "rank_pattern").items()}
    alpha_pattern = {k: _number(v, source, f"alpha_pattern[{k!r}]")
                     for k, v in _patterns(data.get("alpha_pattern"), source, "alpha_pattern").items()}
    use_rslora = False
    if algorithm == "lora":
        use_rslora = data.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise AdapterFileError(source, "bad PEFT config value", key="use_rslora", expected="true or false",
                                   found=repr(use_rslora))
        if data.get("use_dora"):
            notes.append(f"{source}: use_dora is set; PEFT's DoRA magnitude (lora_magnitude_vector) is not applied")
    return PeftConfig(source, algorithm, r, alpha, rank_pattern, alpha_pattern, use_rslora, tuple(notes), in_file)


def _rank(value: object, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise AdapterFileError(source, "bad PEFT config value", key=key, expected="a positive integer rank",
                               found=repr(value))
    return int(value)


def _number(value: object, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFileError(source, "bad PEFT config value", key=key, expected="a finite number",
                               found=repr(value))
    return float(value)


def _patterns(value: object, source: str, key: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFileError(source, "bad PEFT config value", key=key,
                               expected="an object of module-name regex -> value", found=type(value).__name__)
    for pattern in value:
        try:
            re.compile(pattern)
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, TypeError) as exc:
            raise AdapterFileError(source, "invalid regular expression", key=f"{key}[{pattern!r}]",
                                   found=str(exc)) from None
    return dict(value)


# ------------------------------------------------------------------------------------------ applying it
def peft_module_name(module_key: str, *, embedded: bool = False) -> str | None:
    """The module's name inside the model PEFT wrapped (what rank/alpha patterns are matched against): the part after
    `base_model.model.`; for a config embedded in the file also a diffusers name below its component prefix (or the
    bare key). None for a module that is not in PEFT's layout."""
    head, sep, name = module_key.partition(PEFT_PREFIX)
    if sep:
        return name
    if not embedded:
        return None
    for prefix in _COMPONENT_PREFIXES:
        if module_key.startswith(prefix):
            return module_key[len(prefix):]
    return module_key


def apply_peft_config(
    path: str | Path | None,
    tensors: Mapping[str, torch.Tensor],
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    problems: list[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[str]]:
    """(tensors, modules, problems) with PEFT's scale written into each PEFT module (see the module docstring).

    `tensors` / `modules` are what `read_adapter` read (file keys; module key -> canonical params); both come back
    updated alike (new dicts, the inputs are not changed). `problems` comes back extended with warnings. Without a
    PEFT config everything comes back as given. An invalid config, or one that does not fit the file (another
    algorithm, another rank), raises `AdapterFileError` naming the config and key.
    """
    problems = list(problems or [])
    config = find_peft_config(path, metadata)
    if config is None:
        return dict(tensors), {k: dict(v) for k, v in modules.items()}, problems
    out_tensors = dict(tensors)
    out_modules = {k: dict(v) for k, v in modules.items()}
    applied, own_alpha = 0, []
    for module_key, params in out_modules.items():
        name = peft_module_name(module_key, embedded=config.in_file)
        algorithm = algorithm_of(params)
        if name is None or algorithm is None:
            continue  # not in PEFT's layout (a config beside a kohya file is not its config), or no weights
        if algorithm != config.algorithm:
            raise AdapterFileError(config.source, "the PEFT config is for another algorithm than the file's modules",
                                   key="peft_type", expected=f"{algorithm.upper()} (module {module_key!r})",
                                   found=config.algorithm.upper())
        if "alpha" in params:  # the file's own tensors win
            ops_scale, scale = _ops_scale(params), config.scale(name)
            if ops_scale is not None and not math.isclose(ops_scale, scale, rel_tol=1e-6):
                own_alpha.append(f"{module_key} (scale {ops_scale:g} from its alpha, {scale:g} from the config)")
            continue
        problems += _apply_to_module(config, module_key, name, params, out_tensors)
        applied += 1
    if own_alpha:
        problems.append(f"{config.source}: {len(own_alpha)} modules carry their own alpha, which is used, and the "
                        f"config gives another scale (e.g. {own_alpha[0]})")
    if applied:
        problems += list(config.notes)
        if not config.in_file and path is not None and Path(path).name != PEFT_WEIGHTS_NAME:
            problems.append(f"{config.source}: applied to {Path(path).name}, which PEFT would have named "
                            f"{PEFT_WEIGHTS_NAME}; check the config belongs to this file")
    return out_tensors, out_modules, problems


def _apply_to_module(config: PeftConfig, module_key: str, name: str, params: dict[str, torch.Tensor],
                     tensors: dict[str, torch.Tensor]) -> list[str]:
    """Write PEFT's scale into one module's params (and the file tensors) that has no alpha; warnings as strings."""
    r, r_key = config.rank_of(name)
    rank = module_rank(params)
    if rank is not None and rank != r:
        raise AdapterFileError(config.source, "the PEFT config's rank does not fit the file's tensors", key=r_key,
                               expected=f"{rank} (the rank of module {module_key!r})", found=str(r))
    if rank is not None:
        alpha = config.alpha_of(name)[0]
        _put(params, tensors, module_key, "alpha", _scalar(alpha * math.sqrt(r) if config.use_rslora else alpha))
        return []
    if "lokr_w1" not in params or "lokr_w2" not in params:
        return []  # a malformed LoKr: module_problems names what is missing
    return _fold_into_smaller_factor(module_key, r, config.scale(name), params, tensors)


def _ops_scale(params: Params) -> float | None:
    """The scale `hadakron.ops` applies to a module (alpha / rank; 1 for a LoKr with both factors full); None when
    its tensors are malformed (module_problems reports them)."""
    try:
        return module_scale(params)
    except ValueError:
        return None


def _fold_into_smaller_factor(module_key: str, r: int, scale: float, params: dict[str, torch.Tensor],
                              tensors: dict[str, torch.Tensor]) -> list[str]:
    """A LoKr with both factors full: ops applies scale 1, PEFT alpha / r; multiply it into the smaller factor."""
    w1, w2 = params["lokr_w1"], params["lokr_w2"]
    notes = []
    b, d = int(w2.shape[0]), int(w2.shape[1])
    if r < max(b, d) / 2:  # PEFT's rule: W2 is full only when r >= max(out_k, in_n) / 2
        notes.append(f"{module_key}: lokr_w2 is full ({b}x{d}) but the PEFT config's r={r} would have made it "
                     f"low-rank; check the config belongs to this file (scale alpha/r = {scale:g} applied)")
    param = "lokr_w1" if w1.numel() <= w2.numel() else "lokr_w2"
    t = params[param]
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    _put(params, tensors, module_key, param, t.to(dtype) * scale)
    return notes


def _scalar(value: float) -> torch.Tensor:
    """A 0-d alpha tensor: float32 when that holds `value` exactly, else float64."""
    t32 = torch.tensor(value, dtype=torch.float32)
    return t32 if float(t32) == value else torch.tensor(value, dtype=torch.float64)


def _put(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], module_key: str, param: str,
         value: torch.Tensor) -> None:
    """Set one module parameter in both views: the module's params and the file tensors (`<module_key>.<param>`)."""
    params[param] = value
    tensors[f"{module_key}.{param}"] = value


__all__ = ["CONFIG_NAME", "METADATA_CONFIG_KEY", "PeftConfig", "apply_peft_config", "find_peft_config",
           "parse_peft_config", "peft_config_path", "peft_module_name"]

"""What is wrong with a file's modules, from each tensor's (dtype, shape) and a few scalar values: no torch.

The one home of the module checks: `hadakron inspect` runs them on header entries (values read with numpy),
`read_adapter`, the load report, merge, combine and convert on specs made from loaded tensors
(`hadakron.io.module_checks.specs_of`). Each check returns problem strings naming the module, the tensor,
expected and found. `refusal` says why a module must not be applied at all (its delta-W is unknown or wrong).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hadakron.arch.keys import split_key as arch_split_key
from hadakron.io.errors import AdapterFileError
from hadakron.io.safetensors_header import FLOAT_DTYPES, INTEGER_DTYPES
from hadakron.ops import shape_rules
from hadakron.ops.shape_rules import PARAM_NAMES

# The parameter names we know per algorithm, in canonical spelling (`group_modules` renames PEFT's lora_A/B):
# hadakron.ops' names, plus LyCORIS' lokr_t1 (named in checks, not applied).
KNOWN_PARAMS: dict[str, frozenset[str]] = {
    **PARAM_NAMES,
    "lokr": PARAM_NAMES["lokr"] | {"lokr_t1"},
    # LyCORIS algorithms that are not LoHa/LoKr/LoRA: recognised so they are named, not applied.
    "full": frozenset({"diff", "diff_b"}),
    "norm": frozenset({"w_norm", "b_norm"}),
    "other": frozenset({"set_weight", "on_input"}),
}
COMMON_PARAMS = frozenset({"alpha", "dora_scale", "scalar"})
_PARAM_ALGO: dict[str, str] = {name: algo for algo, names in KNOWN_PARAMS.items() for name in names}
_ALPHA_DTYPES = FLOAT_DTYPES | INTEGER_DTYPES
APPLIED_ALGORITHMS = ("loha", "lokr", "lora")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the checks see it: safetensors dtype name, shape, and its value when it holds one number
    (alpha; None when not read)."""

    dtype: str
    shape: tuple[int, ...]
    value: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


Specs = Mapping[str, TensorSpec]


def split_key(key: str) -> tuple[str, str]:
    """(module_key, param) of a file key: `hadakron.arch.split_key` (canonical param names) when it knows
    the parameter name, else split at the last dot so the unknown name can be reported."""
    try:
        return arch_split_key(key)
    except ValueError:
        module, dot, param = key.rpartition(".")
        return (module, param) if dot else (key, "")


def group_modules(tensors: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """Group values (tensors or specs) by module key: {module_key: {param: value}}, in key order."""
    modules: dict[str, dict[str, object]] = {}
    for key, t in tensors.items():
        module, param = split_key(key)
        modules.setdefault(module, {})[param] = t
    return modules


def algorithm_guess(params: Mapping[str, object]) -> str | None:
    """The algorithm a module's parameter names belong to, or None when none or several match."""
    found = {_PARAM_ALGO[p] for p in params if p in _PARAM_ALGO}
    return found.pop() if len(found) == 1 else None


def shapes(specs: Specs) -> dict[str, tuple[int, ...]]:
    """{param: shape} for `hadakron.ops.shape_rules`."""
    return {p: s.shape for p, s in specs.items()}


def require_adapter_keys(path: Path, keys: list[str]) -> None:
    """Refuse (before loading gigabytes) a file none of whose keys is an adapter tensor, e.g. a checkpoint."""
    if not keys:
        return
    for key in keys:
        try:
            arch_split_key(key)
            return
        except ValueError:
            continue
    raise AdapterFileError(path, "not an adapter file (a model checkpoint?)",
                           expected="keys ending in adapter tensor names such as .hada_w1_a, .lokr_w1, "
                                    ".lora_up.weight, .alpha",
                           found=f"{len(keys)} tensors such as {sorted(keys)[0]!r}")


# ---------------------------------------------------------------------------------------------- the checks
def module_problems(module: str, specs: Specs) -> list[str]:
    """Missing, unknown, conflicting, mis-shaped or mis-typed tensors of one module, a missing or bad alpha and a
    dora_scale that fits neither side of the weight."""
    unknown = sorted(p for p in specs if p not in COMMON_PARAMS and p not in _PARAM_ALGO)
    problems = [f"{module}: key has no '.<parameter>' suffix" if not p
                else f"{module}.{p}: unknown parameter name (not LoHa, LoKr or LoRA)" for p in unknown]
    known = {p: s for p, s in specs.items() if p not in unknown} if unknown else specs
    algos = {_PARAM_ALGO[p] for p in known if p in _PARAM_ALGO}
    if len(algos) > 1:
        problems.append(f"{module}: mixes parameters of {' and '.join(sorted(algos))} "
                        f"({', '.join(sorted(known))}); expected one algorithm per module")
        return problems
    if not algos:
        if known:
            problems.append(f"{module}: only {', '.join(sorted(known))}, no weights")
        return problems
    algo = algos.pop()
    if algo not in APPLIED_ALGORITHMS:
        problems.append(f"{module}: algorithm '{algo}' is not LoHa, LoKr or LoRA; hadakron does not apply it")
        return problems
    problems += dtype_problems(module, known)
    known_shapes = shapes(known)
    shape_problems = _shape_check(algo, known)
    factors = None
    if not shape_problems:
        try:
            factors = shape_rules.module_factor_shapes(known_shapes)
        except ValueError as exc:
            shape_problems = [str(exc)]
    problems += [f"{module}: {p}" for p in shape_problems]
    alpha_used = factors is not None and shape_rules.module_rank(known_shapes) is not None  # both-full LoKr: unused
    if "alpha" not in specs:
        if alpha_used:
            problems.append(f"{module}.alpha: missing (loaders then use scale 1.0)")
    else:
        problems += alpha_problems(module, specs["alpha"], used=alpha_used or bool(shape_problems))
    if "dora_scale" in specs and not shape_problems:
        problem = dora_problem(specs["dora_scale"].shape, shape_rules.natural_shape_of(*factors))
        if problem:
            problems.append(f"{module}.dora_scale: {problem}")
    return problems


def dtype_problems(module: str, specs: Specs) -> list[str]:
    """Factor tensors and dora_scale must be floating point; alpha may also be an integer (LyCORIS writes int64)."""
    problems = []
    for p, s in specs.items():
        if s.dtype not in (_ALPHA_DTYPES if p == "alpha" else FLOAT_DTYPES):
            want = "a floating-point or integer scalar" if p == "alpha" else "a floating-point dtype (F16, BF16, F32, F64)"
            problems.append(f"{module}.{p}: dtype {s.dtype}, expected {want}")
    return problems


def alpha_problems(module: str, alpha: TensorSpec, *, used: bool = True) -> list[str]:
    """A non-scalar alpha; where alpha sets the scale (`used`), a negative one and a zero (ambiguous: says which
    reading is applied); where it does not (both LoKr factors full), a non-positive one, said to be unused (a
    positive one that disagrees with the metadata is `both_full_alpha_warning`'s)."""
    if alpha.numel != 1:
        return [f"{module}.alpha: expected one value (0-d), found shape {list(alpha.shape)}"]
    v = alpha.value
    if v is None or math.isnan(v):
        return []  # not read, or NaN (the NaN/Inf scan reports it)
    if not used:
        if v <= 0:
            return [f"{module}.alpha: {v:g} stored, expected alpha > 0 (not used: both LoKr factors are full, "
                    f"scale 1.0 applied)"]
        return []
    if v < 0:
        return [f"{module}.alpha: {v:g} is negative, expected alpha > 0 (it would flip the sign of delta-W)"]
    if v == 0:
        return [f"{module}.alpha: {'-0.0' if math.copysign(1.0, v) < 0 else '0'} stored; applied as ComfyUI does "
                f"(scale 0: the module changes nothing). LyCORIS and sd-scripts turn alpha 0 into alpha = rank "
                f"only when they create a network, so a stored 0 is ambiguous"]
    return []


def dora_problem(ds_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    """Why a dora_scale of `ds_shape` fits neither the rows (out, 1, ...) nor the columns (1, in, ...) of a weight of
    `weight_shape` (the rule of `hadakron.ops.dora_norm`), else None."""
    out = weight_shape[0]
    cols = weight_shape[1] if len(weight_shape) > 1 else 1
    n = math.prod(ds_shape)
    if (len(ds_shape) >= 1 and ds_shape[0] == out and n == out) or n == cols:
        return None
    return (f"shape {list(ds_shape)} fits neither the weight's {out} rows ((out, 1, ...)) nor its {cols} columns "
            f"((1, in, ...)); weight shape {list(weight_shape)}")


def refusal(specs: Specs, weight_shape: tuple[int, ...] | None = None) -> str | None:
    """Why a LoHa/LoKr/LoRA module must not be applied (its delta-W is unknown or wrong), else None: unknown or
    mixed tensor names, non-float factors, missing or mis-shaped factors, a non-scalar, non-numeric or negative
    alpha, a dora_scale that fits neither side, or (when `weight_shape` is given) a delta-W of another shape."""
    for p in specs:
        if p not in COMMON_PARAMS and algorithm_guess({p: None}) is None:
            return f"unknown tensor {p!r} (not LoHa, LoKr or LoRA): its effect is unknown"
    algos = {a for a, names in KNOWN_PARAMS.items() if names & specs.keys()}
    if len(algos) > 1:
        return f"mixes parameters of {' and '.join(sorted(algos))}; expected one algorithm per module"
    if not algos or next(iter(algos)) not in APPLIED_ALGORITHMS:
        return None  # not an applied algorithm: callers report it as unsupported
    problems = dtype_problems("", specs)
    if problems:
        return problems[0].removeprefix(".")
    algo = next(iter(algos))
    shape_problems = _shape_check(algo, specs) or _rule_problems(specs)
    if shape_problems:
        return shape_problems[0]
    alpha = specs.get("alpha")
    if alpha is not None:
        if alpha.numel != 1:
            return f"alpha: expected one value (0-d), found shape {list(alpha.shape)}"
        used = shape_rules.module_rank(shapes(specs)) is not None
        if used and alpha.value is not None and alpha.value < 0:
            return f"alpha: {alpha.value:g} is negative, expected alpha > 0 (it would flip the sign of delta-W)"
    natural = shape_rules.natural_shape(shapes(specs))
    target = tuple(weight_shape) if weight_shape is not None else natural
    if weight_shape is not None:
        flat = (natural[0], math.prod(natural[1:]))
        if not (len(target) >= 2 and target[0] == flat[0] and math.prod(target[1:]) == flat[1]):
            return f"delta-W is {list(flat)} but the weight is {list(target)}"
    if "dora_scale" in specs:
        problem = dora_problem(specs["dora_scale"].shape, target)
        if problem:
            return f"dora_scale {problem}"
    return None


def network_dims(metadata: Mapping[str, str]) -> tuple[int, ...]:
    """The ranks a kohya/LyCORIS trainer says it used: `ss_network_dim` and `conv_dim` in `ss_network_args`."""
    dims = []
    try:
        dims.append(int(float(metadata.get("ss_network_dim", ""))))
    except ValueError:
        pass
    try:
        args = json.loads(metadata.get("ss_network_args", "") or "{}")
        if isinstance(args, dict) and "conv_dim" in args:
            dims.append(int(float(args["conv_dim"])))
    except (ValueError, TypeError):
        pass
    return tuple(d for d in dims if d > 0)


def both_full_alpha_warning(modules: Mapping[str, Specs], metadata: Mapping[str, str]) -> str | None:
    """One file-level warning (ComfyUI #15114) for LoKr modules with both factors full whose stored alpha is not the
    network dim the metadata names: a trainer then applied alpha/dim, while ComfyUI, LyCORIS and hadakron apply
    scale 1.0 (a full factor has no rank to divide by; LyCORIS itself stores alpha = dim there). Says which scale
    was applied and why."""
    dims = network_dims(metadata)
    if not dims:
        return None  # no stated dim: nothing contradicts the stored alpha
    hits = []
    for module, specs in modules.items():
        alpha = specs.get("alpha")
        if ("lokr_w1" not in specs or "lokr_w2" not in specs  # cheap first: both full needs both (most modules not)
                or alpha is None or alpha.numel != 1 or alpha.value is None or math.isnan(alpha.value)
                or algorithm_guess(specs) != "lokr" or not shape_rules.both_full_lokr(specs)):
            continue
        if all(alpha.value != d for d in dims):
            hits.append((module, alpha.value))
    if not hits:
        return None
    module, value = hits[0]
    dim = dims[0]
    return (f"{len(hits)} LoKr modules with both Kronecker factors full store alpha {value:g} (e.g. {module}.alpha) "
            f"while the metadata says network dim {dim}: applied scale 1.0 (alpha not used: a full factor has no rank "
            f"to divide it by; ComfyUI and LyCORIS do the same). A trainer that applied alpha/dim trained with "
            f"{value / dim:g} (ComfyUI #15114): if the result looks overdriven, try strength {value / dim:g}")


def nonfinite_problems(modules: Mapping[str, Specs], found: Mapping[str, Mapping[str, tuple[int, int]]]) -> list[str]:
    """One warning per tensor holding NaN/Inf (`found`: module -> param -> (NaN, Inf) counts); a value
    `hadakron.ops` does not use says so (it changes nothing)."""
    problems = []
    for module, bad in found.items():
        specs = modules[module]
        used = shape_rules.applied_names(shapes(specs))
        for param, (nan, inf) in bad.items():
            text = f"{module}.{param}: {nan} NaN and {inf} Inf values out of {specs[param].numel}"
            if param == "alpha" and "alpha" not in used and algorithm_guess(specs) == "lokr":
                text += " (not used: both LoKr factors are full, so the scale is 1)"
            problems.append(text)
    return problems


def _rule_problems(specs: Specs) -> list[str]:
    """What `hadakron.ops.shape_rules` finds when it builds the module's factor shapes."""
    try:
        shape_rules.module_factor_shapes(shapes(specs))
    except ValueError as exc:
        return [str(exc)]
    return []


def _shape_check(algo: str, specs: Specs) -> list[str]:
    return {"loha": _loha_problems, "lokr": _lokr_problems, "lora": _lora_problems}[algo](specs)


def _missing(specs: Specs, names: list[str]) -> list[str]:
    return [f"missing {n} (present: {', '.join(sorted(specs))})" for n in names if n not in specs]


def _dims(specs: Specs, name: str, ndim: tuple[int, ...]) -> list[str]:
    s = specs[name].shape
    if len(s) not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        return [f"{name} expected {want}, found shape {list(s)}"]
    return []


def _match(a_name: str, a_dim: int, a: tuple[int, ...], b_name: str, b_dim: int, b: tuple[int, ...]) -> list[str]:
    if a[a_dim] != b[b_dim]:
        return [f"{a_name} {list(a)} does not multiply with {b_name} {list(b)}: "
                f"expected {a_name}.shape[{a_dim}] == {b_name}.shape[{b_dim}], found {a[a_dim]} vs {b[b_dim]}"]
    return []


def _flat(s: tuple[int, ...]) -> tuple[int, ...]:
    return (s[0], math.prod(s[1:]))


def _product_shape(specs: Specs, a: str, b: str, t: str | None) -> tuple[list[str], tuple[int, ...]]:
    """Shape of a low-rank (a@b) or Tucker (t with a, b) factor; problems if they do not multiply out."""
    wa, wb = specs[a].shape, specs[b].shape
    if t is None:
        problems = _dims(specs, a, (2, 4)) + _dims(specs, b, (2, 4))
        if problems:
            return problems, ()
        wa2, wb2 = _flat(wa), _flat(wb)
        problems = _match(a, 1, wa2, b, 0, wb2)
        return problems, (wa2[0], wb2[1])
    problems = _dims(specs, a, (2,)) + _dims(specs, b, (2,)) + _dims(specs, t, (3, 4, 5))
    if problems:
        return problems, ()
    core = specs[t].shape
    problems = _match(t, 0, core, a, 0, wa) + _match(t, 1, core, b, 0, wb)
    return problems, (wa[1], wb[1], *core[2:])


def _loha_problems(p: Specs) -> list[str]:
    problems = _missing(p, ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"])
    tucker = [n for n in ("hada_t1", "hada_t2") if n in p]
    if len(tucker) == 1:
        problems.append(f"has {tucker[0]} without {'hada_t2' if tucker[0] == 'hada_t1' else 'hada_t1'}")
    if problems:
        return problems
    t1, t2 = ("hada_t1", "hada_t2") if tucker else (None, None)
    p1, s1 = _product_shape(p, "hada_w1_a", "hada_w1_b", t1)
    p2, s2 = _product_shape(p, "hada_w2_a", "hada_w2_b", t2)
    problems = p1 + p2
    if not problems and s1 != s2:
        problems.append(f"Hadamard factors differ in shape: (w1_a@w1_b) is {list(s1)}, (w2_a@w2_b) is {list(s2)}")
    return problems


def _lokr_factor(p: Specs, i: int) -> tuple[list[str], tuple[int, ...] | None]:
    full, a, b, t = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}"
    if full in p:
        extra = [n for n in (a, b, t) if n in p]
        if extra:
            return [f"has both {full} and {', '.join(extra)}; expected one form of W{i}"], None
        return [], tuple(p[full].shape)
    if a not in p or b not in p:
        return [f"missing {full} (or {a} and {b}) (present: {', '.join(sorted(p))})"], None
    problems, shape = _product_shape(p, a, b, t if t in p else None)
    return problems, shape


def _lokr_problems(p: Specs) -> list[str]:
    p1, _ = _lokr_factor(p, 1)
    p2, _ = _lokr_factor(p, 2)
    return p1 + p2  # factor dimensions are checked by hadakron.ops.shape_rules (see _rule_problems)


def _lora_problems(p: Specs) -> list[str]:
    up, down, mid = "lora_up.weight", "lora_down.weight", "lora_mid.weight"
    problems = _missing(p, [up, down])
    if problems:
        return problems
    problems = _dims(p, up, (2, 4)) + _dims(p, down, (2, 4)) + (_dims(p, mid, (4,)) if mid in p else [])
    if problems:
        return problems
    if mid in p:
        return _match(up, 1, p[up].shape, mid, 0, p[mid].shape) + _match(mid, 1, p[mid].shape, down, 0, p[down].shape)
    return _match(up, 1, p[up].shape, down, 0, p[down].shape)

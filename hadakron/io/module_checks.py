"""Group a file's tensors into modules and list what is wrong with them (warnings, not errors).

Each check returns human-readable problem strings naming the key, the expected and the found value.
Shape checks look only at shapes, so they cost nothing even for large files.
"""
from __future__ import annotations

from typing import Mapping

import torch

from hadakron.arch import split_key as arch_split_key
from hadakron.ops import PARAM_NAMES, applied_params, module_factors, module_rank

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


def split_key(key: str) -> tuple[str, str]:
    """(module_key, param) of a file key: `hadakron.arch.split_key` (canonical param names) when it knows
    the parameter name, else split at the last dot so the unknown name can be reported."""
    try:
        return arch_split_key(key)
    except ValueError:
        module, dot, param = key.rpartition(".")
        return (module, param) if dot else (key, "")


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by module key: {module_key: {param: tensor}}, in file key order."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, param = split_key(key)
        modules.setdefault(module, {})[param] = t
    return modules


def algorithm_guess(params: Mapping[str, object]) -> str | None:
    """The algorithm a module's parameter names belong to, or None when none or several match."""
    found = {algo for algo, names in KNOWN_PARAMS.items() if names & params.keys()}
    return found.pop() if len(found) == 1 else None


# (same-size integer dtype, exponent mask): a float is NaN/Inf exactly when all its exponent bits are set.
_EXPONENT_MASKS = {
    torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000),
}

# module key -> param -> (NaN count, Inf count), for the tensors that hold any.
NonfiniteTensors = dict[str, dict[str, tuple[int, int]]]


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a floating tensor that holds any, else None.

    Reads only (no `_version`, nothing in place), so inference tensors from a ComfyUI prompt are fine; the first
    pass is an integer test of the exponent bits (torch.isfinite is slow on bf16 CPU).
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    spec = _EXPONENT_MASKS.get(t.dtype)
    if spec is not None:
        int_dtype, mask = spec
        if not bool(((t.contiguous().view(int_dtype) & mask) == mask).any()):
            return None
    values = t if spec is not None else t.float()
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    return (nan, inf) if nan or inf else None


def nonfinite_tensors(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> NonfiniteTensors:
    """Every tensor holding NaN/Inf, by module and parameter name: one pass over the file's values."""
    found: NonfiniteTensors = {}
    for module, params in modules.items():
        for param, t in params.items():
            counts = nonfinite_counts(t)
            if counts is not None:
                found.setdefault(module, {})[param] = counts
    return found


def nonfinite_applied(params: Mapping[str, torch.Tensor], bad: Mapping[str, object] | None) -> list[str]:
    """The names, among one module's NaN/Inf tensors `bad`, that `hadakron.ops` applies (an unused alpha is not one)."""
    return sorted(set(bad or ()) & applied_params(params))


def nonfinite_problems(modules: Mapping[str, Mapping[str, torch.Tensor]], found: NonfiniteTensors) -> list[str]:
    """One warning per tensor holding NaN/Inf; a value `hadakron.ops` does not use says so (it changes nothing)."""
    problems = []
    for module, bad in found.items():
        params = modules[module]
        used = applied_params(params)
        for param, (nan, inf) in bad.items():
            text = f"{module}.{param}: {nan} NaN and {inf} Inf values out of {params[param].numel()}"
            if param == "alpha" and "alpha" not in used and algorithm_guess(params) == "lokr":
                text += " (not used: both LoKr factors are full, so the scale is 1)"
            problems.append(text)
    return problems


def module_problems(module: str, params: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unknown, conflicting or mis-shaped tensors of one module, and a missing alpha."""
    unknown = sorted(p for p in params if p not in COMMON_PARAMS and algorithm_guess({p: None}) is None)
    problems = [f"{module}: key has no '.<parameter>' suffix" if not p
                else f"{module}.{p}: unknown parameter name (not LoHa, LoKr or LoRA)" for p in unknown]
    known = {p: t for p, t in params.items() if p not in unknown}
    algos = {a for a, names in KNOWN_PARAMS.items() if names & known.keys()}
    if len(algos) > 1:
        problems.append(f"{module}: mixes parameters of {' and '.join(sorted(algos))} "
                        f"({', '.join(sorted(known))}); expected one algorithm per module")
        return problems
    if not algos:
        if known:
            problems.append(f"{module}: only {', '.join(sorted(known))}, no weights")
        return problems
    algo = algos.pop()
    shape_check = {"loha": _loha_problems, "lokr": _lokr_problems, "lora": _lora_problems}.get(algo)
    if shape_check is not None:
        shape_problems = shape_check(known) or _ops_problems(known)
        problems += [f"{module}: {p}" for p in shape_problems]
        if "alpha" not in params:
            if not shape_problems and module_rank(known) is not None:  # a both-full LoKr never uses alpha
                problems.append(f"{module}.alpha: missing (loaders then use scale 1.0)")
        elif params["alpha"].numel() != 1:
            problems.append(f"{module}.alpha: expected one value (0-d), found shape {list(params['alpha'].shape)}")
    else:
        problems.append(f"{module}: algorithm '{algo}' is not LoHa, LoKr or LoRA; hadakron does not apply it")
    return problems


def _ops_problems(params: Mapping[str, torch.Tensor]) -> list[str]:
    """What `hadakron.ops` finds when it builds the module's factors (shape checks only, no delta-W)."""
    try:
        module_factors(dict(params))
    except ValueError as exc:
        return [str(exc)]
    return []


def _missing(params: Mapping[str, torch.Tensor], names: list[str]) -> list[str]:
    return [f"missing {n} (present: {', '.join(sorted(params))})" for n in names if n not in params]


def _dims(params: Mapping[str, torch.Tensor], name: str, ndim: tuple[int, ...]) -> list[str]:
    t = params[name]
    if t.dim() not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        return [f"{name} expected {want}, found shape {list(t.shape)}"]
    return []


def _match(a_name: str, a_dim: int, a: torch.Tensor, b_name: str, b_dim: int, b: torch.Tensor) -> list[str]:
    if a.shape[a_dim] != b.shape[b_dim]:
        return [f"{a_name} {list(a.shape)} does not multiply with {b_name} {list(b.shape)}: "
                f"expected {a_name}.shape[{a_dim}] == {b_name}.shape[{b_dim}], found {a.shape[a_dim]} vs {b.shape[b_dim]}"]
    return []


def _product_shape(params: Mapping[str, torch.Tensor], a: str, b: str, t: str | None) -> tuple[list[str], tuple[int, ...]]:
    """Shape of a low-rank (a@b) or Tucker (t with a, b) factor; problems if they do not multiply out."""
    wa, wb = params[a], params[b]
    if t is None:
        problems = _dims(params, a, (2, 4)) + _dims(params, b, (2, 4))
        if problems:
            return problems, ()
        wa2, wb2 = wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1)
        problems = _match(a, 1, wa2, b, 0, wb2)
        return problems, (wa2.shape[0], wb2.shape[1])
    problems = _dims(params, a, (2,)) + _dims(params, b, (2,)) + _dims(params, t, (3, 4, 5))
    if problems:
        return problems, ()
    core = params[t]
    problems = _match(t, 0, core, a, 0, wa) + _match(t, 1, core, b, 0, wb)
    return problems, (wa.shape[1], wb.shape[1], *core.shape[2:])


def _loha_problems(p: Mapping[str, torch.Tensor]) -> list[str]:
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


def _lokr_factor(p: Mapping[str, torch.Tensor], i: int) -> tuple[list[str], tuple[int, ...] | None]:
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


def _lokr_problems(p: Mapping[str, torch.Tensor]) -> list[str]:
    p1, _ = _lokr_factor(p, 1)
    p2, _ = _lokr_factor(p, 2)
    return p1 + p2  # factor dimensions are checked by hadakron.ops (see _ops_problems)


def _lora_problems(p: Mapping[str, torch.Tensor]) -> list[str]:
    up, down = "lora_up.weight", "lora_down.weight"
    problems = _missing(p, [up, down])
    if problems:
        return problems
    if "lora_mid.weight" in p:
        mid = p["lora_mid.weight"]
        return _match(up, 1, p[up], "lora_mid.weight", 0, mid) + _match("lora_mid.weight", 1, mid, down, 0, p[down])
    return _match(up, 1, p[up], down, 0, p[down])

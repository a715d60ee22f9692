"""The shape rules of LoHa/LoKr/LoRA modules, from tensor shapes alone (imports nothing heavy: no torch).

The one place that says which tensor shapes multiply out and to what: `hadakron.ops.params` builds its factor
objects only after these rules accepted the shapes, and `hadakron inspect` applies them to a file's header without
loading a tensor. Inputs are `{param: shape}` (a shape is a tuple of ints); errors are `ValueError`s naming the
tensor and the expected vs found shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

PARAM_NAMES: dict[str, frozenset[str]] = {
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
}
COMMON_NAMES: frozenset[str] = frozenset({"alpha", "dora_scale"})

Shapes = Mapping[str, object]
"""param -> shape (tuple of ints); any other value stands for something that is not a tensor (its type is named)."""


@dataclass(frozen=True)
class NotATensor:
    """Placeholder for a parameter value that is not a tensor (so the rules can name its type)."""

    type_name: str


@dataclass(frozen=True)
class FactorShape:
    """The shape facts of one factor (as `hadakron.ops.factors` defines them): kind, full shape, rows, cols
    (flattened, cols * kh * kw), kernel and the rank of its exact LoRA pair."""

    kind: str  # "full" | "lowrank" | "tucker"
    shape: tuple[int, ...]
    rows: int
    cols: int
    kernel: tuple[int, ...]
    rank: int


def algorithm_of(params: Mapping[str, object]) -> str | None:
    """"loha" | "lokr" | "lora" from the tensor names present, None when none of them is there."""
    keys = set(params)
    if keys & PARAM_NAMES["loha"]:
        return "loha"
    if keys & PARAM_NAMES["lokr"]:
        return "lokr"
    if keys & PARAM_NAMES["lora"]:
        return "lora"
    return None


def _get(shapes: Shapes, name: str, dims: tuple[int, ...], algorithm: str) -> tuple[int, ...]:
    """The shape of `name`, checked to have one of `dims` dimensions; ValueError naming it otherwise."""
    if name not in shapes:
        present = ", ".join(sorted(k for k in shapes if k not in COMMON_NAMES)) or "none"
        raise ValueError(f"{algorithm} module is missing '{name}' (tensors present: {present})")
    s = shapes[name]
    if isinstance(s, NotATensor):
        raise ValueError(f"'{name}' must be a tensor, found {s.type_name}")
    if type(s) is not tuple:
        s = tuple(int(d) for d in s)  # type: ignore[union-attr]
    if len(s) not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"'{name}' must be {want}, found shape {s}")
    return s


def _match(name: str, s: tuple[int, ...], axis: int, size: int, other: str, other_s: tuple[int, ...]) -> None:
    if s[axis] != size:
        raise ValueError(f"'{name}' has shape {s} but '{other}' {other_s} needs size {size} on its axis {axis}")


def full(s: tuple[int, ...]) -> FactorShape:
    cols = math.prod(s[1:])
    return FactorShape("full", s, s[0], cols, s[2:], min(s[0], cols))


def low_rank(a: tuple[int, ...], b: tuple[int, ...]) -> FactorShape:
    return FactorShape("lowrank", (a[0],) + b[1:], a[0], math.prod(b[1:]), b[2:], a[1])


def tucker(core: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> FactorShape:
    kernel = core[2:]
    return FactorShape("tucker", (a[1], b[1]) + kernel, a[1], b[1] * math.prod(kernel), kernel, core[0])


def _low_rank(shapes: Shapes, a_name: str, b_name: str, algorithm: str) -> FactorShape:
    a = _get(shapes, a_name, (2,), algorithm)
    b = _get(shapes, b_name, (2, 3, 4, 5), algorithm)
    _match(b_name, b, 0, a[1], a_name, a)
    return low_rank(a, b)


def _tucker(shapes: Shapes, t_name: str, a_name: str, b_name: str, algorithm: str) -> FactorShape:
    t = _get(shapes, t_name, (3, 4, 5), algorithm)
    a = _get(shapes, a_name, (2,), algorithm)
    b = _get(shapes, b_name, (2,), algorithm)
    _match(a_name, a, 0, t[0], t_name, t)
    _match(b_name, b, 0, t[1], t_name, t)
    return tucker(t, a, b)


def loha_shapes(shapes: Shapes) -> tuple[FactorShape, FactorShape]:
    """The two Hadamard factors: low-rank (hada_w*_a, hada_w*_b) or Tucker (hada_t*, hada_w*_a, hada_w*_b)."""
    if "hada_t1" in shapes or "hada_t2" in shapes:
        f1 = _tucker(shapes, "hada_t1", "hada_w1_a", "hada_w1_b", "LoHa")
        f2 = _tucker(shapes, "hada_t2", "hada_w2_a", "hada_w2_b", "LoHa")
    else:
        f1 = _low_rank(shapes, "hada_w1_a", "hada_w1_b", "LoHa")
        f2 = _low_rank(shapes, "hada_w2_a", "hada_w2_b", "LoHa")
    if f1.shape != f2.shape:
        raise ValueError(
            f"LoHa factors differ in shape: hada_w1_* multiplies out to {f1.shape}, hada_w2_* to {f2.shape}"
        )
    return f1, f2


def lokr_shapes(shapes: Shapes) -> tuple[FactorShape, FactorShape]:
    """(W1, W2) of the Kronecker product: each full, low-rank, or (W2 only) Tucker."""
    if "lokr_w1" in shapes:
        w1 = full(_get(shapes, "lokr_w1", (2, 4), "LoKr"))
    elif "lokr_w1_a" in shapes or "lokr_w1_b" in shapes:
        w1 = _low_rank(shapes, "lokr_w1_a", "lokr_w1_b", "LoKr")
    else:
        raise ValueError("LoKr module needs 'lokr_w1' or 'lokr_w1_a' + 'lokr_w1_b'; found neither")
    if w1.kernel and any(k != 1 for k in w1.kernel):
        raise ValueError(f"'lokr_w1' must be 2-D (or (m, n, 1, 1)), found shape {w1.shape}")
    if "lokr_w2" in shapes:
        w2 = full(_get(shapes, "lokr_w2", (2, 3, 4, 5), "LoKr"))
    elif "lokr_t2" in shapes:
        w2 = _tucker(shapes, "lokr_t2", "lokr_w2_a", "lokr_w2_b", "LoKr")
    elif "lokr_w2_a" in shapes or "lokr_w2_b" in shapes:
        w2 = _low_rank(shapes, "lokr_w2_a", "lokr_w2_b", "LoKr")
    else:
        raise ValueError("LoKr module needs 'lokr_w2', 'lokr_w2_a' + 'lokr_w2_b', or those with 'lokr_t2'; found none")
    return w1, w2


def lora_shapes(shapes: Shapes) -> FactorShape:
    """LoRA as one factor: low-rank (up, down), or Tucker (lora_mid, up^T, down) when a mid is present.

    up is (out, r) or (out, r, 1, 1); down (r, in), (r, in*K) or (r, in, kh, kw); a mid is (r, r, kh, kw)."""
    up = _get(shapes, "lora_up.weight", (2, 4), "LoRA")
    down = _get(shapes, "lora_down.weight", (2, 4), "LoRA")
    if any(s != 1 for s in up[2:]):
        raise ValueError(f"'lora_up.weight' must be (out, r) or (out, r, 1, 1), found shape {up}")
    up2 = up[:2]
    if "lora_mid.weight" in shapes:
        mid = _get(shapes, "lora_mid.weight", (4,), "LoRA")
        if any(s != 1 for s in down[2:]):
            raise ValueError(f"'lora_down.weight' must be (r, in, 1, 1) with a lora_mid, found shape {down}")
        down2 = down[:2]
        _match("lora_up.weight", up2, 1, mid[0], "lora_mid.weight", mid)
        _match("lora_down.weight", down2, 0, mid[1], "lora_mid.weight", mid)
        return tucker(mid, (up2[1], up2[0]), down2)
    _match("lora_down.weight", down, 0, up2[1], "lora_up.weight", up)
    return low_rank(up2, down)


def module_factor_shapes(shapes: Shapes) -> tuple[str, tuple[FactorShape, ...]]:
    """(algorithm, factor shapes): two for LoHa/LoKr, one for LoRA. ValueError for an unknown or broken module."""
    alg = algorithm_of(shapes)
    if alg == "loha":
        return alg, loha_shapes(shapes)
    if alg == "lokr":
        return alg, lokr_shapes(shapes)
    if alg == "lora":
        return alg, (lora_shapes(shapes),)
    names = ", ".join(sorted(shapes)) or "none"
    raise ValueError(f"not a LoHa, LoKr or LoRA module: no known tensor names among ({names})")


def natural_shape_of(alg: str, factors: tuple[FactorShape, ...]) -> tuple[int, ...]:
    """The weight shape the factors multiply out to: (out, in) or (out, in, kh, kw) (flat convs: 2-D)."""
    if alg == "lokr":
        w1, w2 = factors
        return (w1.rows * w2.rows, w1.cols * w2.shape[1]) + tuple(w2.shape[2:])
    return tuple(factors[0].shape)


def natural_shape(shapes: Shapes) -> tuple[int, ...]:
    """`natural_shape_of(*module_factor_shapes(shapes))`; ValueError naming the tensors when they do not multiply out."""
    return natural_shape_of(*module_factor_shapes(shapes))


def delta_flat(shapes: Shapes) -> tuple[int, int]:
    """`(out, in*kh*kw)`: the flattened delta-W shape (ValueError when the factors do not multiply out)."""
    shape = natural_shape(shapes)
    return (shape[0], math.prod(shape[1:]))


def module_rank(shapes: Shapes) -> int | None:
    """The rank alpha is divided by; None for a LoKr whose factors are both full (or an unknown module)."""
    alg = algorithm_of(shapes)
    if alg == "loha":
        return _get(shapes, "hada_w1_b", (2, 3, 4, 5), "LoHa")[0]
    if alg == "lokr":
        if "lokr_t2" in shapes:
            return _get(shapes, "lokr_t2", (1, 2, 3, 4, 5), "LoKr")[0]
        if "lokr_w2" not in shapes and "lokr_w2_b" in shapes:
            return _get(shapes, "lokr_w2_b", (1, 2, 3, 4, 5), "LoKr")[0]
        if "lokr_w1" not in shapes and "lokr_w1_b" in shapes:
            return _get(shapes, "lokr_w1_b", (1, 2, 3, 4, 5), "LoKr")[0]
        return None
    if alg == "lora":
        return _get(shapes, "lora_down.weight", (2, 4), "LoRA")[0]
    return None


def both_full_lokr(shapes: Mapping[str, object]) -> bool:
    """A LoKr whose Kronecker factors are both stored full: its scale is 1.0 whatever alpha it stores."""
    return algorithm_of(shapes) == "lokr" and "lokr_w1" in shapes and "lokr_w2" in shapes and "lokr_t2" not in shapes


def applied_names(shapes: Shapes) -> frozenset[str]:
    """Names of the tensors delta-W reads: factors, `dora_scale`, and `alpha` only where it sets the scale."""
    alg = algorithm_of(shapes)
    if alg is None:
        return frozenset()
    names = {n for n in shapes if n in PARAM_NAMES[alg] or n == "dora_scale"}
    if "alpha" in shapes:
        try:
            uses_alpha = module_rank(shapes) is not None
        except ValueError:  # broken shapes: the module is refused elsewhere; count its alpha as applied
            uses_alpha = True
        if uses_alpha:
            names.add("alpha")
    return frozenset(names)

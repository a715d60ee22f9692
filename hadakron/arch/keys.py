"""File key names without the family tables: the adapter tensor suffixes a key can end in, and `split_key` /
`join_key` (`hadakron.arch.layouts` re-exports them). Importing this module builds no layer table, so
`hadakron inspect` can split a file's keys before it needs the families.
"""
from __future__ import annotations

from functools import lru_cache

# Parameter suffixes a module key can carry, mapped to hadakron's canonical names.
PARAM_ALIASES: dict[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
}
PARAMS: tuple[str, ...] = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "lora_up.weight", "lora_down.weight", "lora_mid.weight",
    "alpha", "dora_scale", "scalar", "diff", "diff_b", "w_norm", "b_norm", "set_weight", "on_input",
    *PARAM_ALIASES,
)
_SUFFIXES = sorted(PARAMS, key=len, reverse=True)
_SUFFIXES_BY_LAST: dict[str, tuple[str, ...]] = {}
for _s in _SUFFIXES:  # a key can end in "." + suffix only when its last segment is the suffix's last segment
    _SUFFIXES_BY_LAST[_s.rpartition(".")[2]] = _SUFFIXES_BY_LAST.get(_s.rpartition(".")[2], ()) + (_s,)
_ONE_SEGMENT: frozenset[str] = frozenset(last for last, found in _SUFFIXES_BY_LAST.items() if found == (last,))
"""Suffixes without a dot that no longer suffix ends in (alpha, hada_w1_a, ...): the last segment alone decides."""
_AB_LAYOUTS = ("peft", "diffusers")
_TO_AB = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


@lru_cache(maxsize=1 << 16)  # detection, grouping and checks split the same keys of a file several times
def split_key(key: str) -> tuple[str, str]:
    """`(module_key, param)` of a file key; param in canonical spelling (PEFT lora_A -> lora_down.weight).

    Raises ValueError naming the key when it ends in no known adapter tensor name.
    """
    head, _, last = key.rpartition(".")
    if head and last in _ONE_SEGMENT:  # the common case: `<module>.<name>` (no alias has no dot)
        return head, last
    for suffix in _SUFFIXES_BY_LAST.get(key.rpartition(".")[2], ()):  # _SUFFIXES' order, only those that can match
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], PARAM_ALIASES.get(suffix, suffix)
    for old, new in (("_lora.up.weight", "lora_up.weight"), ("_lora.down.weight", "lora_down.weight")):
        if key.endswith(old) and len(key) > len(old):  # diffusers attn-procs: `...to_q_lora.up.weight`
            return key[: -len(old)], new
    raise ValueError(f"key {key!r} ends in no known adapter tensor name (known: {', '.join(PARAMS)})")


def join_key(module_key: str, param: str, layout: str) -> str:
    """File key for `param` (canonical name) of `module_key` in `layout`'s own spelling."""
    param = PARAM_ALIASES.get(param, param)
    if layout in _AB_LAYOUTS:
        param = _TO_AB.get(param, param)
    return f"{module_key}.{param}"

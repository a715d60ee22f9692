"""Per-block strengths for the loader: parse the `block_weights` text and give each module its multiplier.

One vocabulary: a module's block id is `hadakron.arch`'s `block_of` label, the label the load report shows, and
every such label is a name this syntax takes (case-insensitive). SDXL follows the LoRA Block Weight (LBW)
convention so that numbers people already use carry over; Anima uses the model's own module names.

SDXL block ids (the UNet's LDM names; `TE1`/`TE2` are the two text encoders, `BASE` both of them, as in LBW):

    TE1, TE2   CLIP-L, CLIP-G                BASE (also TE, CLIP)  both text encoders
    IN00   input_blocks.0  (conv_in)          IN01, IN02  input_blocks.1-2  (ResBlocks, 320 ch)
    IN03   input_blocks.3  (downsample)       IN04, IN05  input_blocks.4-5  (Res + attention, 640 ch)
    IN06   input_blocks.6  (downsample)       IN07, IN08  input_blocks.7-8  (Res + attention, 1280 ch)
    M00    middle_block
    OUT00..OUT02  output_blocks.0-2 (Res + attention, 1280 ch)   OUT03..OUT05  output_blocks.3-5 (640 ch)
    OUT06..OUT08  output_blocks.6-8 (ResBlocks only, 320 ch)
    OTHER  time_embed, label_emb, out (the final norm/conv): layers outside any block

The 12-value form lists the blocks that hold attention, which is all a LoRA/LoHa/LoKr without conv layers touches:
    BASE, IN04, IN05, IN07, IN08, M00, OUT00, OUT01, OUT02, OUT03, OUT04, OUT05
The 20-value form (for adapters with conv layers) lists every block:
    BASE, IN00..IN08, M00, OUT00..OUT08
(the BASE value goes to both text encoders).

Anima block ids: `te` (the Qwen3 text encoder), `blocks.0` .. `blocks.N-1` (the DiT blocks; N is the model's
depth: 28, 40, 52, ...), `llm_adapter`, and `OTHER` (embedders, final layer). The vector form is
`te, blocks.0, ..., blocks.N-1, llm_adapter`. Also read: `BLOCK07` / `block7` for `blocks.7` (earlier reports'
spelling), `base` / `clip` for `te`.

Text forms accepted by :func:`parse_block_weights` (case-insensitive ids):
    ""                      every block 1
    "ALL" / "NONE" / ...    a preset (see PRESETS_SDXL / PRESETS_ANIMA); "NONE" also zeroes OTHER
    "1,0,0,0.5,..."         a vector in one of the forms above
    "IN04=0.5, OUT=0"       named entries; a group name (IN, OUT, M, MID, TE, BASE, ALL; Anima: blocks, ALL) sets
                            all its blocks, ranges as "IN04-IN08" or "blocks.0-9"; later entries override earlier ones
    "MIDD, OUT05=0"         a preset followed by named overrides
Blocks not addressed keep 1 (as in LBW, where layers outside the vector keep the node's strength).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from hadakron.arch import ANIMA, SDXL
from hadakron.arch.anima import NUM_BLOCKS as ANIMA_DEFAULT_BLOCKS

SDXL_TE = ("TE1", "TE2")  # what LBW's BASE stands for
SDXL_IN = tuple(f"IN{i:02d}" for i in range(9))
SDXL_OUT = tuple(f"OUT{i:02d}" for i in range(9))
# The LBW vector forms, in order; their BASE slot sets both text encoders.
SDXL_BLOCKS_20 = ("BASE",) + SDXL_IN + ("M00",) + SDXL_OUT
SDXL_BLOCKS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                  "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
SDXL_ALL_IDS = SDXL_TE + SDXL_IN + ("M00",) + SDXL_OUT + ("OTHER",)

# Presets as sets of block ids that stay on (1); every other listed block gets 0.
# They carry the meaning of the LBW SD1.x presets over to SDXL's levels: "shallow" = the 320/640-channel
# levels, "deep" = the 1280-channel level next to the middle block.
_SDXL_IN_SHALLOW = ("IN00", "IN01", "IN02", "IN03", "IN04", "IN05")
_SDXL_IN_DEEP = ("IN06", "IN07", "IN08")
_SDXL_OUT_DEEP = ("OUT00", "OUT01", "OUT02")
_SDXL_OUT_SHALLOW = ("OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08")
PRESETS_SDXL: dict[str, tuple[str, ...]] = {
    "ALL": SDXL_BLOCKS_20,
    "NONE": (),
    "INS": ("BASE",) + _SDXL_IN_SHALLOW,
    "IND": ("BASE",) + _SDXL_IN_DEEP,
    "INALL": ("BASE",) + SDXL_IN,
    "MIDD": ("BASE",) + _SDXL_IN_DEEP + ("M00",) + _SDXL_OUT_DEEP,
    "OUTD": ("BASE",) + _SDXL_OUT_DEEP,
    "OUTS": ("BASE",) + _SDXL_OUT_SHALLOW,
    "OUTALL": ("BASE",) + SDXL_OUT,
}
PRESET_NAMES = tuple(PRESETS_SDXL) + ("ALL0.5",)


class BlockWeightsError(ValueError):
    """The block_weights text cannot be understood; the message says which part and what is expected."""


@dataclass(frozen=True)
class BlockWeights:
    """Parsed per-block multipliers for one family, keyed by block id (`block_of` labels); `strength(block_id)` is
    1.0 for blocks never named."""

    family: str
    values: dict[str, float] = field(default_factory=dict)
    text: str = ""

    def strength(self, block_id: str) -> float:
        """Multiplier for a block id as returned by :func:`block_id`."""
        return self.values.get(block_id, 1.0)

    def is_identity(self) -> bool:
        """True when every block keeps strength 1."""
        return all(v == 1.0 for v in self.values.values())


# ---------------------------------------------------------------- module -> block id

def sdxl_block_id(part: str, dotted: str) -> str:
    """Block id of an SDXL module given its part (unet/te1/te2) and LDM dotted name: `hadakron.arch`'s label
    (IN04, M00, OUT05, OTHER; TE1 / TE2 for the text encoders, which LBW's BASE sets together)."""
    return SDXL.block_of(part, dotted)


def anima_block_id(part: str, dotted: str) -> str:
    """Block id of an Anima module: `hadakron.arch`'s label, `te`, `blocks.N`, `llm_adapter` or `OTHER`."""
    return ANIMA.block_of(part, dotted)


def block_id(family: str, part: str, dotted: str) -> str:
    """Block id used by block weights for a module of `family` ("sdxl" or "anima"): the load report's label."""
    if family == "sdxl":
        return sdxl_block_id(part, dotted)
    if family == "anima":
        return anima_block_id(part, dotted)
    raise BlockWeightsError(f"block weights: unknown model family {family!r} (expected 'sdxl' or 'anima')")


def all_block_ids(family: str, *, num_blocks: int = ANIMA_DEFAULT_BLOCKS) -> tuple[str, ...]:
    """Every block id of `family` in vector order (SDXL: TE1, TE2, IN00..OUT08, OTHER; Anima: te, blocks.0..N-1,
    llm_adapter, OTHER, N = `num_blocks`, the model's or file's depth): the cells of the loader's ||dW|| heatmap."""
    if family == "sdxl":
        return _sdxl_ids_for_name("ALL")
    if family == "anima":
        return _anima_ids_for_name("all", num_blocks)
    raise BlockWeightsError(f"block weights: unknown model family {family!r} (expected 'sdxl' or 'anima')")


# ---------------------------------------------------------------- parsing

_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _number(token: str, where: str) -> float:
    if not _NUMBER_RE.match(token):
        raise BlockWeightsError(f"block weights: {where}: {token!r} is not a number")
    value = float(token)
    if not math.isfinite(value):
        raise BlockWeightsError(f"block weights: {where}: {token!r} is not a finite number")
    return value


def _split_entries(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\n;]", text) if t.strip()]


def _sdxl_expand(names) -> tuple[str, ...]:
    """Block ids of LBW vector / preset names: BASE becomes both text encoders."""
    return tuple(b for n in names for b in (SDXL_TE if n == "BASE" else (n,)))


def _sdxl_ids_for_name(name: str) -> tuple[str, ...]:
    """Expand one SDXL name (id, group or range) to block ids."""
    n = name.upper().replace(" ", "")
    groups = {
        "ALL": SDXL_ALL_IDS, "IN": SDXL_IN, "OUT": SDXL_OUT, "M": ("M00",), "MID": ("M00",), "M00": ("M00",),
        "MIDDLE": ("M00",), "BASE": SDXL_TE, "TE": SDXL_TE, "CLIP": SDXL_TE, "TE1": ("TE1",), "TE2": ("TE2",),
        "OTHER": ("OTHER",),
    }
    if n in groups:
        return groups[n]
    m = re.match(r"^(IN|OUT)(\d{1,2})(?:-(?:(IN|OUT))?(\d{1,2}))?$", n)
    if m:
        kind, lo = m.group(1), int(m.group(2))
        if m.group(3) and m.group(3) != kind:
            raise BlockWeightsError(f"block weights: range {name!r} mixes IN and OUT blocks")
        hi = int(m.group(4)) if m.group(4) is not None else lo
        if lo > hi or hi > 8:
            raise BlockWeightsError(
                f"block weights: {name!r} is out of range: SDXL has {kind}00..{kind}08")
        return tuple(f"{kind}{i:02d}" for i in range(lo, hi + 1))
    raise BlockWeightsError(
        f"block weights: unknown SDXL block {name!r}; expected BASE, TE1, TE2, IN00..IN08, M00, OUT00..OUT08, "
        f"OTHER, or a group IN/OUT/MID/TE/ALL")


def _anima_ids_for_name(name: str, num_blocks: int) -> tuple[str, ...]:
    """Expand one Anima name (`blocks.3`, `blocks.0-9`, `llm_adapter`, `te`, `ALL`, `OTHER`; `BLOCK03`) to ids."""
    n = name.lower().replace(" ", "")
    all_blocks = tuple(f"blocks.{i}" for i in range(num_blocks))
    if n == "all":
        return ("te",) + all_blocks + ("llm_adapter", "OTHER")
    if n in ("te", "base", "clip"):
        return ("te",)
    if n == "llm_adapter":
        return ("llm_adapter",)
    if n == "other":
        return ("OTHER",)
    if n == "blocks":
        return all_blocks
    m = re.match(r"^blocks?\.?(\d+)(?:-(?:blocks?\.?)?(\d+))?$", n)
    if m:
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi or hi >= num_blocks:
            have = (f"{num_blocks} blocks, blocks.0..blocks.{num_blocks - 1}; the last is blocks.{num_blocks - 1}"
                    if num_blocks else "no DiT blocks")
            raise BlockWeightsError(f"block weights: {name!r} is out of range: this Anima model has {have}")
        return tuple(f"blocks.{i}" for i in range(lo, hi + 1))
    raise BlockWeightsError(
        f"block weights: unknown Anima block {name!r}; expected te, blocks.N, blocks.A-B, llm_adapter, OTHER or ALL")


def _preset(family: str, name: str, num_blocks: int) -> dict[str, float] | None:
    upper = name.upper()
    if family == "sdxl":
        if upper == "ALL0.5":
            return {b: 0.5 for b in SDXL_ALL_IDS}
        if upper not in PRESETS_SDXL:
            return None
        on = set(_sdxl_expand(PRESETS_SDXL[upper]))
        values = {b: (1.0 if b in on else 0.0) for b in _sdxl_expand(SDXL_BLOCKS_20)}
        if upper == "NONE":
            values["OTHER"] = 0.0
        return values
    ids = _anima_ids_for_name("all", num_blocks)
    if upper in ("ALL", "NONE", "ALL0.5"):
        v = {"ALL": 1.0, "NONE": 0.0, "ALL0.5": 0.5}[upper]
        return {b: v for b in ids}
    return None


def _vector(family: str, numbers: list[float], num_blocks: int) -> dict[str, float]:
    if family == "sdxl":
        if len(numbers) in (12, 20):
            names = SDXL_BLOCKS_12 if len(numbers) == 12 else SDXL_BLOCKS_20
            return {b: v for name, v in zip(names, numbers) for b in _sdxl_expand((name,))}
        raise BlockWeightsError(
            f"block weights: SDXL takes 12 values ({', '.join(SDXL_BLOCKS_12)}) or 20 values "
            f"(BASE, IN00..IN08, M00, OUT00..OUT08); found {len(numbers)}")
    names = ("te",) + tuple(f"blocks.{i}" for i in range(num_blocks)) + ("llm_adapter",)
    if len(numbers) != len(names):
        raise BlockWeightsError(
            f"block weights: Anima with {num_blocks} blocks takes {len(names)} values "
            f"(te, blocks.0..blocks.{num_blocks - 1}, llm_adapter); found {len(numbers)}")
    return dict(zip(names, numbers))


def parse_block_weights(text: str | None, family: str, *, num_blocks: int = ANIMA_DEFAULT_BLOCKS) -> BlockWeights:
    """Parse `block_weights` text for `family` ("sdxl"/"anima"); `num_blocks` is the Anima DiT depth, checked by
    every `blocks.N` entry and the vector length: pass the model's own (`hadakron.arch.anima_dims(model).num_blocks`:
    10, 28, 40, 52, ...); the default (sd-scripts' 28) is for text checked with no model at hand."""
    if family not in ("sdxl", "anima"):
        raise BlockWeightsError(f"block weights: unknown model family {family!r} (expected 'sdxl' or 'anima')")
    raw = (text or "").strip()
    if not raw:
        return BlockWeights(family, {}, "")
    # An optional LBW-style "NAME:" label before a vector ("XL:1,0,...") is ignored.
    label = re.match(r"^[A-Za-z_][\w.]*\s*:\s*(?=[-+.\d])", raw)
    body = raw[label.end():] if label else raw
    entries = _split_entries(body)
    values: dict[str, float] = {}
    if all(_NUMBER_RE.match(e) for e in entries):
        numbers = [_number(e, f"value {i + 1}") for i, e in enumerate(entries)]
        return BlockWeights(family, _vector(family, numbers, num_blocks), raw)
    for i, entry in enumerate(entries):
        if "=" in entry:
            name, _, value_text = entry.partition("=")
            name = name.strip()
            value = _number(value_text.strip(), f"entry {entry!r}")
            ids = _sdxl_ids_for_name(name) if family == "sdxl" else _anima_ids_for_name(name, num_blocks)
            for b in ids:
                values[b] = value
            continue
        preset = _preset(family, entry.strip(), num_blocks)
        if preset is None:
            if _NUMBER_RE.match(entry):
                raise BlockWeightsError(
                    f"block weights: a bare number ({entry!r}) cannot be mixed with named entries; "
                    f"write NAME=value, or give only numbers")
            known = ", ".join(PRESET_NAMES) if family == "sdxl" else "ALL, NONE, ALL0.5"
            raise BlockWeightsError(
                f"block weights: {entry!r} is neither a preset ({known}) nor NAME=value")
        if i != 0:
            raise BlockWeightsError(f"block weights: preset {entry!r} must come first, before NAME=value entries")
        values.update(preset)
    return BlockWeights(family, values, raw)

"""Key layouts of adapter files, converted both ways through the family's known layer names.

A file key is `<module_key>.<param>`. Inside hadakron a module is `(family, part, dotted)`; each layout
spells it differently (examples for SDXL `input_blocks.4.1.transformer_blocks.0.attn1.to_q` / Anima):

| layout | UNet / DiT | text encoders |
|---|---|---|
| kohya | `lora_unet_input_blocks_4_1_..._to_q` | `lora_te1_` / `lora_te2_` (SDXL), `lora_te_` (Anima) + `_`-joined |
| lycoris | SDXL `lycoris_down_blocks_1_attentions_0_..._to_q` (diffusers names, as SimpleTuner and ComfyUI), Anima `lycoris_blocks_0_...` | as kohya |
| comfyui | `diffusion_model.<dotted>` | `text_encoders.clip_l.transformer.<dotted>` / `text_encoders.clip_g.transformer.<dotted>`, `text_encoders.qwen3_06b.transformer.model.<dotted>` |
| peft | `base_model.model.<dotted>` | `text_encoder.base_model.model.<dotted>` (SDXL te2: `text_encoder_2.`) |
| diffusers (SDXL only) | `unet.<diffusers dotted>` | `text_encoder.<dotted>` / `text_encoder_2.<dotted>` |

PEFT and diffusers spell LoRA tensors `lora_A.weight` / `lora_B.weight`; they are read as
`lora_down.weight` / `lora_up.weight` and written back in the layout's own spelling. LoHa/LoKr
tensor names are the same in every layout.

Reading also accepts the other spellings seen in the wild: `lora_te_` for SDXL CLIP-L, `clip_l.transformer.`
without `text_encoders.`, `qwen3_06b.transformer.model.`, `unet.base_model.model.`, `lora_unet_` or
`lycoris_` or bare prefix with diffusers names, `lycoris_` with SGM names, and diffusers
`...attn1.processor.to_q` / `...processor.to_out`. Bare `base_model.model.text_model...` (SDXL) is
CLIP-G when its layer index exists only there (12..31) and CLIP-L otherwise. `_`-joined names go back
to dotted names only through a lookup built from the family's layer list: never by guessing. Stacked blocks
(Anima `blocks.N`) resolve at any index whose block-0 name is known, so files of 40- or 52-block models parse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from hadakron.arch.anima import ANIMA
from hadakron.arch.family import Family
from hadakron.arch.keys import PARAM_ALIASES, PARAMS, join_key, split_key  # noqa: F401  (re-exported)
from hadakron.arch.sdxl import DIFFUSERS_TO_SGM, SDXL, SGM_TO_DIFFUSERS

LAYOUTS = ("kohya", "lycoris", "comfyui", "peft", "diffusers")
LAYOUT_TITLES = {
    "kohya": "kohya (lora_unet_/lora_te*_)",
    "lycoris": "LyCORIS standalone (lycoris_)",
    "comfyui": "ComfyUI native (diffusion_model./text_encoders.)",
    "peft": "PEFT (base_model.model.)",
    "diffusers": "diffusers (unet./text_encoder.)",
}
FAMILIES: dict[str, Family] = {"sdxl": SDXL, "anima": ANIMA}


def get_family(name: str | Family) -> Family:
    """The `Family` called `name` ("sdxl" or "anima"); a Family passes through."""
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown key layout {layout!r}; known: {list(LAYOUTS)}")


# ---------------------------------------------------------------------------------------- writing
_KOHYA = {"sdxl": {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"},
          "anima": {"unet": "lora_unet_", "te": "lora_te_"}}
_COMFY = {"sdxl": {"unet": "diffusion_model.", "te1": "text_encoders.clip_l.transformer.",
                   "te2": "text_encoders.clip_g.transformer."},
          "anima": {"unet": "diffusion_model.", "te": "text_encoders.qwen3_06b.transformer.model."}}
_PEFT = {"sdxl": {"unet": "base_model.model.", "te1": "text_encoder.base_model.model.",
                  "te2": "text_encoder_2.base_model.model."},
         "anima": {"unet": "base_model.model.", "te": "text_encoder.base_model.model."}}
_DIFFUSERS = {"sdxl": {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}}


def module_key(family: str | Family, part: str, dotted: str, layout: str) -> str:
    """The module key of `(family, part, dotted)` in `layout` (see the module docstring)."""
    fam = get_family(family)
    check_layout(layout)
    fam.check_part(part)
    if not fam.knows(part, dotted):
        raise ValueError(f"{fam.name} {part}: unknown layer {dotted!r} (not in the family's layer list)")
    if layout == "kohya" or (layout == "lycoris" and part != "unet"):
        return _KOHYA[fam.name][part] + dotted.replace(".", "_")
    if layout == "lycoris":
        name = SGM_TO_DIFFUSERS[dotted] if fam.name == "sdxl" else dotted
        return "lycoris_" + name.replace(".", "_")
    if layout == "comfyui":
        return _COMFY[fam.name][part] + dotted
    if layout == "peft":
        return _PEFT[fam.name][part] + dotted
    if fam.name not in _DIFFUSERS:
        raise ValueError(f"the diffusers layout has no names for {fam.title}; use kohya, lycoris, comfyui or peft")
    name = SGM_TO_DIFFUSERS[dotted] if part == "unet" else dotted
    return _DIFFUSERS[fam.name][part] + name


def file_key(family: str | Family, part: str, dotted: str, param: str, layout: str) -> str:
    """Full file key `<module_key>.<param>` in `layout`."""
    return join_key(module_key(family, part, dotted, layout), param, layout)


# ---------------------------------------------------------------------------------------- reading
class _Rule:
    """One reading rule: keys starting with `prefix` name layers of `family`'s `parts` in the `names` spelling.

    (A plain class, not a dataclass: making a frozen dataclass costs more than all the rules, and `hadakron inspect`
    imports this module on every run.)"""

    __slots__ = ("prefix", "family", "parts", "names", "layout")

    def __init__(self, prefix: str, family: str, parts: tuple[str, ...], names: str, layout: str) -> None:
        self.prefix = prefix
        self.family = family
        self.parts = parts  # several: the first part that knows the name (SDXL bare CLIP names)
        self.names = names  # "dotted", "joined", "diff_dotted", "diff_joined"
        self.layout = layout


def _rules() -> list[_Rule]:
    r: list[_Rule] = []
    for fam, parts in _KOHYA.items():
        for part, prefix in parts.items():
            r.append(_Rule(prefix, fam, (part,), "joined", "kohya"))
    r += [
        _Rule("lora_te_", "sdxl", ("te1",), "joined", "kohya"),  # SD1-style CLIP-L prefix (ComfyUI maps it)
        _Rule("lora_unet_", "sdxl", ("unet",), "diff_joined", "diffusers"),
        _Rule("lycoris_", "sdxl", ("unet",), "diff_joined", "lycoris"),
        _Rule("lycoris_", "sdxl", ("unet",), "joined", "lycoris"),
        _Rule("lycoris_", "anima", ("unet",), "joined", "lycoris"),
        _Rule("clip_l.transformer.", "sdxl", ("te1",), "dotted", "comfyui"),
        _Rule("clip_g.transformer.", "sdxl", ("te2",), "dotted", "comfyui"),
        _Rule("qwen3_06b.transformer.model.", "anima", ("te",), "dotted", "comfyui"),
        _Rule("text_encoders.transformer.model.", "anima", ("te",), "dotted", "comfyui"),
        _Rule("unet.base_model.model.", "sdxl", ("unet",), "dotted", "peft"),
        _Rule("unet.base_model.model.", "sdxl", ("unet",), "diff_dotted", "peft"),
        _Rule("base_model.model.", "sdxl", ("unet",), "diff_dotted", "peft"),
        _Rule("base_model.model.", "sdxl", ("te1", "te2"), "dotted", "peft"),
        _Rule("base_model.model.", "anima", ("te",), "dotted", "peft"),
        _Rule("", "sdxl", ("unet",), "diff_dotted", "diffusers"),
    ]
    for table, layout in ((_COMFY, "comfyui"), (_PEFT, "peft")):
        for fam, parts in table.items():
            for part, prefix in parts.items():
                r.append(_Rule(prefix, fam, (part,), "dotted", layout))
    for fam, parts in _DIFFUSERS.items():
        for part, prefix in parts.items():
            r.append(_Rule(prefix, fam, (part,), "diff_dotted" if part == "unet" else "dotted", "diffusers"))
    return sorted(r, key=lambda x: -len(x.prefix))  # longest prefix first (stable: listed order on ties)


_RULES = _rules()
_RULES_OF: dict[str, tuple[_Rule, ...]] = {f: tuple(r for r in _RULES if r.family == f) for f in FAMILIES}
"""`_RULES` (same order) of one family."""
# read-only aliases (ComfyUI accepts them too): SDXL's add_embedding is also called class_embedding
_DIFF_READ = {**DIFFUSERS_TO_SGM, "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
_DIFF_JOINED = {k.replace(".", "_"): v for k, v in _DIFF_READ.items()}


def _diffusers_dotted(name: str) -> str | None:
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    return _DIFF_READ.get(name)


def parse_module_key(module_key: str, family: str | Family | None = None) -> tuple[str, str, str, str] | None:
    """`(family, part, dotted, layout)` of a module key, or None when no family knows the name."""
    return _matcher(None if family is None else get_family(family).name)(module_key)


_MATCHERS: dict[str | None, Callable[[str], tuple[str, str, str, str] | None]] = {}
_DOTTED, _JOINED, _DIFF_DOTTED, _DIFF_JOINED_NAMES = range(4)


def _matcher(family: str | None) -> Callable[[str], tuple[str, str, str, str] | None]:
    """`parse_module_key` for one family (None: every family) as one function over precomputed rule tables (the
    same rules in the same order, each rule's name table bound once; names not in a table go to the family): detection resolves thousands of module keys."""
    match = _MATCHERS.get(family)
    if match is not None:
        return match
    kinds = {"dotted": _DOTTED, "joined": _JOINED, "diff_dotted": _DIFF_DOTTED, "diff_joined": _DIFF_JOINED_NAMES}
    table = []
    for rule in _RULES if family is None else _RULES_OF.get(family, ()):
        fam = FAMILIES[rule.family]
        kind = kinds[rule.names]
        parts = tuple((part, fam.joined_lookup(part) if kind == _JOINED else fam.layers[part], fam)
                      for part in rule.parts)
        table.append((rule.prefix, len(rule.prefix), kind, rule.family, rule.layout, parts))
    rules = tuple(table)
    longest = max((n for _, n, *_ in rules), default=0)
    starting: dict[str, tuple] = {}  # a key's first `longest` characters -> the rules whose prefix it starts with

    def match(module_key: str) -> tuple[str, str, str, str] | None:
        head = module_key[:longest]
        candidates = starting.get(head)
        if candidates is None:
            if len(starting) > 4096:
                starting.clear()
            candidates = starting[head] = tuple(rule for rule in rules if head.startswith(rule[0]))
        for prefix, n, kind, fam_name, layout, parts in candidates:
            rest = module_key[n:]
            for part, names, fam in parts:  # names: the part's layers, or (joined) its `joined_lookup`
                # a name in the table is known; any other goes to the family (stacked blocks at any index)
                if kind == _DOTTED:
                    if rest in names or fam.knows(part, rest):
                        return fam_name, part, rest, layout
                    continue
                if kind == _JOINED:
                    dotted = names.get(rest)
                    if dotted is None:
                        dotted = fam.from_joined(part, rest)
                        if dotted is not None and not fam.knows(part, dotted):
                            dotted = None
                else:
                    dotted = _diffusers_dotted(rest) if kind == _DIFF_DOTTED else _DIFF_JOINED.get(rest)
                    if dotted is not None and dotted not in names and not fam.knows(part, dotted):
                        dotted = None
                if dotted is not None:
                    return fam_name, part, dotted, layout
        return None

    _MATCHERS[family] = match
    return match


@dataclass(frozen=True)
class ParsedKey:
    """One file key resolved: module `(family, part, dotted)`, the layout it was written in, canonical param."""

    key: str
    module_key: str
    family: str
    part: str
    dotted: str
    layout: str
    param: str


def parse_key(key: str, family: str | Family | None = None) -> ParsedKey | None:
    """Resolve a full file key; None when the module name is unknown or the key has no adapter tensor name."""
    try:
        mk, param = split_key(key)
    except ValueError:
        return None
    hit = parse_module_key(mk, family)
    if hit is None:
        return None
    return ParsedKey(key, mk, hit[0], hit[1], hit[2], hit[3], param)


_BARE_PEFT_CLIP = "base_model.model.text_model."


def parse_module_keys(module_keys: Iterable[str], family: str | Family | None = None
                      ) -> dict[str, tuple[str, str, str, str] | None]:
    """`parse_module_key` for every module of one file, with the file-level rule: bare PEFT CLIP names of an SDXL
    file (no text_encoder prefix says which CLIP) are all CLIP-G when any of them has a layer index only CLIP-G
    has (12..31)."""
    match = _matcher(None if family is None else get_family(family).name)
    hits = {mk: match(mk) for mk in module_keys}
    bare = [mk for mk, h in hits.items() if h is not None and h[0] == "sdxl" and h[3] == "peft"
            and mk.startswith(_BARE_PEFT_CLIP)]
    if any(hits[mk][1] == "te2" for mk in bare):
        for mk in bare:
            fam, _part, dotted, layout = hits[mk]
            hits[mk] = (fam, "te2", dotted, layout)
    return hits


def parse_keys(keys: Iterable[str], family: str | Family | None = None) -> tuple[list[ParsedKey], list[str]]:
    """Resolve many keys of one file: `(parsed, unknown keys)`, with `parse_module_keys`' file-level rule."""
    split = {}
    unknown = []
    for k in keys:
        try:
            split[k] = split_key(k)
        except ValueError:
            unknown.append(k)
    hits = parse_module_keys(dict.fromkeys(mk for mk, _ in split.values()), family)
    parsed = []
    for k, (mk, param) in split.items():
        hit = hits[mk]
        if hit is None:
            unknown.append(k)
        else:
            parsed.append(ParsedKey(k, mk, hit[0], hit[1], hit[2], hit[3], param))
    return parsed, unknown


# ---------------------------------------------------------------------------------------- converting
def convert_key(key: str, layout: str, family: str | Family | None = None) -> str:
    """`key` rewritten in `layout`; ValueError naming the key when its module is unknown."""
    p = parse_key(key, family)
    if p is None:
        raise ValueError(f"cannot convert key {key!r}: its module is not a known layer of "
                         f"{'any family' if family is None else get_family(family).title}")
    return file_key(p.family, p.part, p.dotted, p.param, layout)


def convert_state_dict(tensors: Mapping[str, object], layout: str, family: str | Family | None = None) -> dict:
    """All keys of an adapter file rewritten in `layout` (values untouched); unknown keys raise."""
    check_layout(layout)
    parsed, unknown = parse_keys(tensors, family)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(f"cannot convert: {len(unknown)} key(s) name no known layer, e.g. {unknown[:5]}{more}")
    out: dict = {}
    for p in parsed:
        new = file_key(p.family, p.part, p.dotted, p.param, layout)
        if new in out:
            raise ValueError(f"cannot convert: keys collide on {new!r} (two spellings of one module in the file)")
        out[new] = tensors[p.key]
    return out

"""`Family` and `Layer`: a model family described as data (parts, layer names, full-size shapes, target rules).

Each adaptable layer of a part is a `Layer` with its canonical dotted name (no prefix), its full-size
weight shape and the sd-scripts target class (`group`) that holds it. Selection follows sd-scripts'
`create_modules`: candidates are the Linear/Conv2d children of the target classes; a pattern list is
matched with `re.fullmatch` on the unprefixed dotted name; include patterns only rescue excluded names.
A part may hold a stack of like blocks (`stacks`, Anima `blocks.N`): its names resolve at any index, and
`with_depth` gives the family listing exactly a model's or file's number of blocks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Layer:
    """One Linear or Conv2d weight: `shape` is `(out, in)` or `(out, in, kh, kw)` at full size.

    `group` is the sd-scripts target class holding the layer ("" when no target class holds it, e.g.
    SDXL `time_embed.0`: such layers are known, so files naming them load, but never selected).
    """

    dotted: str
    shape: tuple[int, ...]
    group: str

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel(self) -> tuple[int, int]:
        return (self.shape[2], self.shape[3]) if self.is_conv else (1, 1)


@dataclass
class Family:
    """A model family: parts, their layers, and the rules sd-scripts uses to pick adapter targets.

    `target_groups[part]`: groups targeted by default; `conv_groups[part]`: groups added only with
    `conv_dim` (or when loading a file); `llm_adapter_groups[part]`: groups added with `train_llm_adapter`.
    """

    name: str
    title: str
    parts: tuple[str, ...]
    layers: dict[str, dict[str, Layer]]
    target_groups: dict[str, frozenset[str]]
    conv_groups: dict[str, frozenset[str]]
    llm_adapter_groups: dict[str, frozenset[str]]
    default_excludes: list[str]
    part_titles: dict[str, str]
    block_fn: Callable[[str, str], str]
    # part -> prefix of a stack of like blocks (Anima: {"unet": "blocks."}): `<prefix>N.<local>` names a layer for
    # every N when block 0 has `<local>`, so names of any depth resolve; `with_depth` lists the layers of N blocks.
    stacks: dict[str, str] = field(default_factory=dict)
    # part -> {local name: Layer of block 0}: the layers every stacked block has (taken from `layers` when empty)
    stack_layers: dict[str, dict[str, Layer]] = field(default_factory=dict)
    # Lazily built reverse lookups: part -> {dotted.replace(".", "_"): dotted}
    _joined: dict[str, dict[str, str]] = field(default_factory=dict, repr=False, compare=False)
    _sized: dict[tuple, "Family"] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for part, prefix in self.stacks.items():
            if part not in self.stack_layers:
                first = prefix + "0."
                self.stack_layers[part] = {d[len(first):]: layer for d, layer in self.layers[part].items()
                                           if d.startswith(first)}

    # ------------------------------------------------------------------ data access
    def check_part(self, part: str) -> None:
        """Raise a clear ValueError for a part this family does not have."""
        if part not in self.parts:
            raise ValueError(f"{self.name}: unknown part {part!r}; this family has parts {list(self.parts)}")

    def layer_shapes(self, part: str) -> dict[str, tuple[int, ...]]:
        """Every known Linear/Conv2d layer of `part` with its full-size weight shape."""
        self.check_part(part)
        return {d: layer.shape for d, layer in self.layers[part].items()}

    def layer(self, part: str, dotted: str) -> Layer | None:
        """The known layer `dotted` of `part`; a stacked block's layer at any index (shape and group of block 0)."""
        self.check_part(part)
        known = self.layers[part].get(dotted)
        if known is not None:
            return known
        hit = self.stack_index(part, dotted)
        if hit is None:
            return None
        template = self.stack_layers[part].get(hit[1])
        return None if template is None else Layer(dotted, template.shape, template.group)

    def knows(self, part: str, dotted: str) -> bool:
        """Whether `dotted` names a layer of `part` (stacked blocks at any index: the depth comes from the model or file)."""
        return dotted in self.layers[part] or self.layer(part, dotted) is not None

    def stack_index(self, part: str, dotted: str) -> tuple[int, str] | None:
        """`(N, local)` when `dotted` is `<stack prefix>N.<local>` of `part`, else None (no check that `local` exists)."""
        prefix = self.stacks.get(part)
        if prefix is None or not dotted.startswith(prefix):
            return None
        head, _, local = dotted[len(prefix):].partition(".")
        return (int(head), local) if _index(head) and local else None

    def depth_of(self, part: str, dotted_names: Iterable[str]) -> int:
        """Number of stacked blocks the names reach (highest `blocks.N` + 1; 0 when none): the model's or file's depth."""
        depth = 0
        for dotted in dotted_names:
            hit = self.stack_index(part, dotted)
            if hit is not None and hit[1] in self.stack_layers.get(part, {}):
                depth = max(depth, hit[0] + 1)
        return depth

    def with_depth(self, depths: Mapping[str, int]) -> "Family":
        """This family with `depths[part]` stacked blocks listed in `layers` (block ids, targets and counts follow);
        parts without a stack are unchanged. The same depths give the same object."""
        depths = {p: int(n) for p, n in depths.items() if p in self.stacks}
        for part, n in depths.items():
            if n < 0:
                raise ValueError(f"{self.name} {part}: depth must be >= 0; got {n}")
        if not depths:
            return self
        key = tuple(sorted(depths.items()))
        if key in self._sized:
            return self._sized[key]
        layers = dict(self.layers)
        for part, n in depths.items():
            prefix = self.stacks[part]
            rows: dict[str, Layer] = {}
            placed = False
            stacked = [Layer(f"{prefix}{i}.{local}", t.shape, t.group)
                       for i in range(n) for local, t in self.stack_layers[part].items()]
            for d, layer in self.layers[part].items():
                if self.stack_index(part, d) is not None:
                    if not placed:  # the blocks go where the stack stood in the family's own list
                        rows.update((x.dotted, x) for x in stacked)
                        placed = True
                    continue
                rows[d] = layer
            if not placed:
                rows.update((x.dotted, x) for x in stacked)
            layers[part] = rows
        sized = replace(self, layers=layers, stack_layers=self.stack_layers, _joined={}, _sized=self._sized)
        self._sized[key] = sized
        return sized

    def from_joined(self, part: str, joined: str) -> str | None:
        """The dotted name of a `_`-joined one (kohya / LyCORIS keys): from the known names, and for stacked blocks
        from block 0's names at any index (`blocks_45_mlp_layer1` -> `blocks.45.mlp.layer1`); None when unknown."""
        dotted = self.joined_lookup(part).get(joined)
        if dotted is not None:
            return dotted
        prefix = self.stacks.get(part)
        if prefix is None:
            return None
        head = prefix.replace(".", "_")
        if not joined.startswith(head):
            return None
        index, _, local = joined[len(head):].partition("_")
        if not _index(index) or not local:
            return None
        for name in self.stack_layers[part]:
            if name.replace(".", "_") == local:
                return f"{prefix}{int(index)}.{name}"
        return None

    def joined_lookup(self, part: str) -> dict[str, str]:
        """`{dotted with '.' -> '_': dotted}` for every known layer of `part` (no guessing of underscores)."""
        self.check_part(part)
        if part not in self._joined:
            table: dict[str, str] = {}
            for d in self.layers[part]:
                j = d.replace(".", "_")
                if j in table and table[j] != d:
                    raise AssertionError(f"{self.name}.{part}: names {table[j]!r} and {d!r} join to the same {j!r}")
                table[j] = d
            self._joined[part] = table
        return self._joined[part]

    def part_of(self, dotted: str) -> list[str]:
        """The parts that have a layer named `dotted` (SDXL CLIP names exist in both te1 and te2)."""
        return [p for p in self.parts if self.knows(p, dotted)]

    # ------------------------------------------------------------------ selection
    def candidates(self, part: str, *, conv: bool = False, train_llm_adapter: bool = False) -> list[str]:
        """Layers inside the targeted classes, before exclude patterns (sd-scripts' walk)."""
        self.check_part(part)
        groups = set(self.target_groups.get(part, ()))
        if conv:
            groups |= self.conv_groups.get(part, frozenset())
        if train_llm_adapter:
            groups |= self.llm_adapter_groups.get(part, frozenset())
        return [d for d, layer in self.layers[part].items() if layer.group and layer.group in groups]

    def select(
        self,
        part: str,
        *,
        conv: bool = False,
        train_llm_adapter: bool = False,
        exclude_patterns: Sequence[str] = (),
        include_patterns: Sequence[str] = (),
    ) -> list[str]:
        """Targets of `part`: candidates minus (default + given) excludes, plus included ones rescued.

        Without `conv`, conv 3x3 groups are not even candidates, as in sd-scripts.
        """
        excludes = compile_patterns(list(exclude_patterns) + list(self.default_excludes), "exclude_patterns")
        includes = compile_patterns(include_patterns, "include_patterns")
        out = []
        for d in self.candidates(part, conv=conv, train_llm_adapter=train_llm_adapter):
            excluded = any(p.fullmatch(d) for p in excludes)
            if excluded and not any(p.fullmatch(d) for p in includes):
                continue
            out.append(d)
        return out

    def default_targets(self, part: str, *, conv: bool = False, train_llm_adapter: bool = False) -> list[str]:
        """sd-scripts' default targets of `part` (default excludes applied, no user patterns)."""
        return self.select(part, conv=conv, train_llm_adapter=train_llm_adapter)

    def block_of(self, part: str, dotted: str) -> str:
        """Block label for reports and block weights (see the family module for the convention)."""
        self.check_part(part)
        return self.block_fn(part, dotted)


def _index(text: str) -> bool:
    """A block index as module names spell it: digits, no leading zero (`07` is no index; `0` is)."""
    return text.isdigit() and (text == "0" or not text.startswith("0"))


def compile_patterns(patterns: Iterable[str] | str | None, what: str) -> list[re.Pattern[str]]:
    """Compile regexes, raising a ValueError that names the bad pattern and the argument it came from."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: invalid regular expression '{p}': {e}") from None
    return out


def block_index_label(dotted: str, prefix: str, label: str) -> str | None:
    """`label + NN` when `dotted` starts with `prefix + 'N.'`, else None (helper for block_of)."""
    if not dotted.startswith(prefix):
        return None
    head = dotted[len(prefix):].split(".", 1)[0]
    return f"{label}{int(head):02d}" if head.isdigit() else None

"""`Family` and `Layer`: a model family described as data (parts, layer names, full-size shapes, target rules).

Each adaptable layer of a part is a `Layer` with its canonical dotted name (no prefix), its full-size
weight shape and the sd-scripts target class (`group`) that holds it. Selection follows sd-scripts'
`create_modules`: candidates are the Linear/Conv2d children of the target classes; a pattern list is
matched with `re.fullmatch` on the unprefixed dotted name; include patterns only rescue excluded names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence


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
    # Lazily built reverse lookups: part -> {dotted.replace(".", "_"): dotted}
    _joined: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

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
        self.check_part(part)
        return self.layers[part].get(dotted)

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
        return [p for p in self.parts if dotted in self.layers[p]]

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

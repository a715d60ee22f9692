"""PEP 562 lazy names for a package: its public names are imported from their home submodule on first use, so
importing the package (and the names a caller needs) does not import every submodule (torch among them)."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def lazy_attributes(package: str, homes: Mapping[str, str], submodules: Iterable[str],
                    names: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`: `homes` maps a name to its submodule, `submodules` are importable
    as attributes; a value found is cached in the package's namespace (looked up once)."""
    subs, public = frozenset(submodules), frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in homes:
            value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        elif name in subs:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | public | subs)

    return __getattr__, __dir__

"""The pack's ComfyUI nodes: each module in NODE_MODULES exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS.

Adding a node family is one line: append its module name to NODE_MODULES. A module that fails to import is
logged and skipped, so one broken node family does not take the others down.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

NODE_MODULES = (
    "loader",
    "trainer", "trainer_options", "save_adapter",
    "merge",
)

# ComfyUI imports the pack from custom_nodes/<pack>/ without putting that folder on sys.path; the library
# `hadakron` lives there too, so make it importable when it is not installed.
_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("hadakron") is None and _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)  # last: the pack folder's nodes/ and tests/ must never shadow ComfyUI's modules

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in NODE_MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except Exception:  # noqa: BLE001 - report and keep the other node families
        logging.getLogger("hadakron").exception("hadakron: could not load the %s nodes", _name)
        continue
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NODE_MODULES"]

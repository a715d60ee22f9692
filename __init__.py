"""ComfyUI entry point for the hadakron node pack.

ComfyUI imports this file as the custom-node package. Outside ComfyUI (pytest at the repo root, plain
Python) `comfy` is absent and the pack exports no nodes instead of failing to import.
"""
import importlib.util

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

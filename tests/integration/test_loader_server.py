"""The real ComfyUI server with the pack in custom_nodes lists the loader nodes in /object_info."""
from __future__ import annotations

import json
import urllib.request


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_object_info_lists_loader_nodes(comfy_server):
    info = _get(comfy_server["url"] + "/object_info")
    assert "HadakronLoader" in info and "HadakronLoaderModelOnly" in info, \
        comfy_server["log"].read_text()[-3000:]
    full, model_only = info["HadakronLoader"], info["HadakronLoaderModelOnly"]
    assert full["display_name"] == "LoHa/LoKr Loader"
    assert model_only["display_name"] == "LoHa/LoKr Loader (Model Only)"
    assert full["category"] == model_only["category"] == "loaders/hadakron"
    assert full["output"] == ["MODEL", "CLIP", "STRING"] and full["output_name"] == ["MODEL", "CLIP", "report"]
    assert model_only["output"] == ["MODEL", "STRING"]
    req, opt = full["input"]["required"], full["input"]["optional"]
    assert list(req) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert set(opt) == {"block_weights", "adapter"} and opt["adapter"][0] == "HADAKRON_ADAPTER"
    for name, spec in list(req.items()) + list(opt.items()):
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert "clip" not in model_only["input"]["required"]
    # the per-node route answers too, and the pack was imported from custom_nodes/hadakron
    one = _get(comfy_server["url"] + "/object_info/HadakronLoader")
    assert one["HadakronLoader"]["python_module"].endswith("hadakron")


def test_pack_finds_its_library_without_install(comfy_env, tmp_path):
    """ComfyUI-Manager installs only requirements.txt: the pack must import `hadakron` from its own folder."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                            and "editable" not in getattr(f, "__name__", "").lower()]
        sys.path[:] = [{comfy_env.root!r}] + [p for p in sys.path if p not in ("", ".", {str(repo)!r})]
        assert importlib.util.find_spec("hadakron") is None, "hadakron still importable"
        import comfy.options, comfy.cli_args
        comfy.cli_args.args.cpu = True
        spec = importlib.util.spec_from_file_location("custom_pack", {str(repo / '__init__.py')!r},
                                                      submodule_search_locations=[{str(repo)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["custom_pack"] = mod; spec.loader.exec_module(mod)
        print(sorted(mod.NODE_CLASS_MAPPINGS))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'HadakronLoader', 'HadakronLoaderModelOnly'" in proc.stdout

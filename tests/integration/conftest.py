"""Integration tests against a real ComfyUI checkout (COMFYUI_PATH); every test here is skipped without one.

Run: COMFYUI_PATH=/work/ComfyUI /work/comfyui-venv/bin/python -m pytest tests/integration -q
(docs/comfyui-env.md builds that checkout and venv).

Rules for test files in this folder: do not import comfy / folder_paths / the pack at module level (they are
not importable without ComfyUI); take them from the fixtures below (`comfy_env`, `pack_nodes`, ...).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def _comfy_reason() -> str | None:
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set (integration tests need a ComfyUI checkout; see docs/comfyui-env.md)"
    if not (Path(COMFYUI_PATH) / "comfy" / "model_management.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout (no comfy/model_management.py)"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not importable in this Python"
    return None


SKIP_REASON = _comfy_reason()
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    mark = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(mark)


# ---------------------------------------------------------------- ComfyUI import (CPU mode)

_COMFY = None


def import_comfy():
    """Put COMFYUI_PATH first on sys.path and import comfy in CPU mode (as `main.py --cpu`). Cached."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    root = str(Path(COMFYUI_PATH).resolve())
    # ComfyUI's top-level `nodes.py` must win over this repo's `nodes/` package (the cwd is on sys.path).
    sys.path[:] = [root] + [p for p in sys.path if p not in ("", ".", str(REPO_ROOT), root)]
    if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(root):
        del sys.modules["nodes"]
    import comfy.options  # noqa: F401
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_dynamic_vram = True
    import comfy.model_management
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_detection
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.sd
    import comfy.lora
    import comfy.utils
    import folder_paths

    class _Env:
        pass
    env = _Env()
    env.comfy = comfy
    env.mm = comfy.model_management
    env.folder_paths = folder_paths
    env.root = root
    _COMFY = env
    return env


@pytest.fixture(scope="session")
def comfy_env():
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    return import_comfy()


def _import_pack():
    """The repo imported as a package under a private name, as ComfyUI imports custom_nodes/<pack>."""
    name = "hadakron_pack_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack_nodes(comfy_env):
    """`nodes.loader` of the pack (imported through the pack's package, like ComfyUI does)."""
    pack = _import_pack()
    import importlib
    loader = importlib.import_module(pack.__name__ + ".nodes.loader")
    return loader


@pytest.fixture(scope="session")
def pack(comfy_env):
    return _import_pack()


# ---------------------------------------------------------------- small models built with ComfyUI's classes

SMALL_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": 64, "num_head_channels": 16, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SMALL_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
              "projection_dim": 64}
SMALL_QWEN3 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 1000}


def randomize_(module, seed: int) -> None:
    """Fill every parameter with deterministic random values (ComfyUI's ops skip weight init)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)


def _patcher(env, base_model):
    import torch
    cpu = torch.device("cpu")
    return env.comfy.model_patcher.ModelPatcher(base_model, load_device=cpu, offload_device=cpu)


def build_small_sdxl(env, dtype=None, seed: int = 0):
    """A ModelPatcher around comfy.model_base.SDXL with narrow widths (real SDXL layer names)."""
    import torch
    dtype = dtype or torch.float32
    cfg = dict(SMALL_SDXL_UNET, dtype=dtype)
    mc = env.comfy.supported_models.SDXL(cfg)
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({})
    randomize_(model, seed)
    return _patcher(env, model)


def build_small_anima(env, dtype=None, seed: int = 1):
    """A ModelPatcher around comfy.model_base.Anima, model_channels 256 (ComfyUI then builds 10 blocks)."""
    import torch
    dtype = dtype or torch.float32
    fake = {"blocks.0.mlp.layer1.weight": torch.zeros(1024, 256),
            "llm_adapter.blocks.0.cross_attn.q_proj.weight": torch.zeros(1024, 1024),
            "x_embedder.proj.1.weight": torch.zeros(256, 68)}
    mc = env.comfy.model_detection.model_config_from_unet(fake, "")
    assert isinstance(mc, env.comfy.supported_models.Anima), type(mc)
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({})
    randomize_(model, seed)
    return _patcher(env, model)


def build_small_sdxl_clip(env, seed: int = 2):
    """comfy.sd.CLIP with SDXL's CLIP-L + CLIP-G classes at small widths (3 layers, hidden 64)."""
    import torch
    import comfy.sdxl_clip
    target = env.comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = env.comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": SMALL_CLIP,
                                                           "clip_g_model_config": SMALL_CLIP, "dtype": torch.float32})
    randomize_(clip.cond_stage_model, seed)
    return clip


def build_small_anima_clip(env, seed: int = 3):
    """comfy.sd.CLIP with Anima's Qwen3-0.6B text encoder class at small widths (2 layers, hidden 64)."""
    import torch
    import comfy.text_encoders.anima as anima_te
    target = env.comfy.supported_models_base.ClipTarget(anima_te.AnimaTokenizer, anima_te.te())
    clip = env.comfy.sd.CLIP(target=target, model_options={"qwen3_06b_model_config": SMALL_QWEN3,
                                                           "dtype": torch.float32})
    randomize_(clip.cond_stage_model, seed)
    return clip


@pytest.fixture(scope="session")
def small_sdxl(comfy_env):
    return build_small_sdxl(comfy_env)


@pytest.fixture(scope="session")
def small_sdxl_clip(comfy_env):
    return build_small_sdxl_clip(comfy_env)


@pytest.fixture(scope="session")
def small_anima(comfy_env):
    return build_small_anima(comfy_env)


@pytest.fixture(scope="session")
def small_anima_clip(comfy_env):
    return build_small_anima_clip(comfy_env)


# ---------------------------------------------------------------- files in a loras folder


@pytest.fixture(scope="session")
def loras_dir(comfy_env, tmp_path_factory):
    """A temporary folder registered as ComfyUI's `loras` folder (first in the list)."""
    d = tmp_path_factory.mktemp("loras")
    comfy_env.folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    return d


@pytest.fixture
def write_lora(loras_dir):
    """write_lora(name, tensors, metadata=None) -> lora_name: save a .safetensors into the loras folder."""
    from safetensors.torch import save_file

    def write(name: str, tensors: dict, metadata: dict | None = None) -> str:
        path = loras_dir / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
        return name
    return write


# ---------------------------------------------------------------- patched weights as ComfyUI computes them


def patched_weights(patcher, keys):
    """Let ComfyUI patch the weights as it does before sampling (model_management.load_models_gpu, here on
    CPU: in place, full load), copy `keys`, then unload (which restores the original weights)."""
    import comfy.model_management as mm
    mm.unload_all_models()
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        sd = patcher.model.state_dict()
        return {k: sd[k].detach().clone() for k in keys}
    finally:
        mm.unload_all_models()


# ---------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_server(comfy_env, tmp_path_factory):
    """Start ComfyUI's main.py (--cpu) with this repo as custom_nodes/hadakron; yield its base URL."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    # --base-directory puts models/<folder>, input/, output/, temp/ and user/ under base (folder_paths.py)
    for folder in ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae"):
        (base / "models" / folder).mkdir(parents=True)
    for folder in ("input", "output", "temp", "user"):
        (base / folder).mkdir()
    (base / "custom_nodes" / "hadakron").symlink_to(REPO_ROOT, target_is_directory=True)
    port = _free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, os.path.join(comfy_env.root, "main.py"), "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--base-directory", str(base), "--disable-auto-launch",
           "--database-url", "sqlite:///:memory:", "--dont-print-server"]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=comfy_env.root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/object_info", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ComfyUI did not answer /object_info in 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield {"url": url, "log": log_path, "base": base}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- client and test model files on that server


@pytest.fixture(scope="session")
def comfy(comfy_server):
    """ComfyClient of the session's server (websocket open); see comfy_client.py."""
    from comfy_client import ComfyClient
    client = ComfyClient(comfy_server["url"], comfy_server["base"], comfy_server["log"])
    yield client
    client.close()


@pytest.fixture(scope="session")
def sdxl_files(comfy_env, comfy):
    """model_files.SDXLFiles: the small SDXL checkpoint linked into models/checkpoints (built once, cached)."""
    import model_files as mf
    path = mf.sdxl_checkpoint_path(comfy_env)
    name = mf.link_into(path, comfy.models_dir("checkpoints"))
    return mf.SDXLFiles(checkpoint=name, path=path, weights=mf.SafetensorsWeights(path))


@pytest.fixture(scope="session")
def anima_files(comfy_env, comfy):
    """model_files.AnimaFiles: the small Anima DiT, Qwen3 TE and Wan VAE linked into the server's folders."""
    import model_files as mf
    unet, te, vae = mf.anima_paths(comfy_env)
    return mf.AnimaFiles(unet=mf.link_into(unet, comfy.models_dir("diffusion_models")),
                         text_encoder=mf.link_into(te, comfy.models_dir("text_encoders")),
                         vae=mf.link_into(vae, comfy.models_dir("vae")),
                         unet_weights=mf.SafetensorsWeights(unet), te_weights=mf.SafetensorsWeights(te),
                         vae_weights=mf.SafetensorsWeights(vae))


@pytest.fixture(scope="session")
def input_image(comfy):
    """Name (for LoadImage) of a deterministic 64x64 RGB PNG in the server's input/ folder."""
    import model_files as mf
    return mf.link_into(mf.input_image_path(), comfy.input_dir)


@pytest.fixture
def server_lora(comfy):
    """server_lora(name, tensors, metadata=None) -> lora_name: write a .safetensors into the server's models/loras
    (atomically: temp file + rename, so a replaced file gets a new mtime and inode)."""
    from safetensors.torch import save_file

    def write(name: str, tensors: dict, metadata: dict | None = None) -> str:
        folder = comfy.models_dir("loras")
        tmp = folder / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {})
        os.replace(tmp, folder / name)
        return name
    return write

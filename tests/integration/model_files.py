"""Real single-file test models (small SDXL checkpoint, small Anima UNET + Qwen3 TE + Wan VAE) for the server tests.

No weights can be downloaded, so the files are built with ComfyUI's own classes, in this (test) process, with
deterministic random weights, and saved under the key names real files use; the *real* loader nodes
(CheckpointLoaderSimple, UNETLoader, CLIPLoader, VAELoader) load them on the server.

Use from a test through the session fixtures in conftest.py:

    def test_x(comfy, sdxl_files):
        g = Graph()
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
        ...
        base = sdxl_files.weights["model.diffusion_model.input_blocks.4.1.proj_in.weight"]   # exact base tensor
        shape = sdxl_files.unet_layers["input_blocks.4.1.proj_in"]                          # (out, in)

- `sdxl_files: SDXLFiles`: `checkpoint` (name in models/checkpoints), `weights` (lazy checkpoint tensors, SGM keys:
  `model.diffusion_model.*`, `conditioner.embedders.0.transformer.text_model.*` (CLIP-L),
  `conditioner.embedders.1.model.*` (CLIP-G, OpenCLIP form), `first_stage_model.*`), `unet_layers` / `clip_l_layers` /
  `clip_g_layers` ({module: weight shape} of every Linear/Conv weight, in ComfyUI's internal module names), and
  `clip_weights(env)` (the text encoders in ComfyUI's internal names, as CLIPSave writes them).
- `anima_files: AnimaFiles`: `unet` (models/diffusion_models), `text_encoder` (models/text_encoders, CLIPLoader
  type "stable_diffusion" or any: ComfyUI detects Qwen3-0.6B and uses Anima's TE), `vae` (models/vae), with
  `unet_weights` (file keys `net.*`), `te_weights` (`model.*`), `vae_weights`, `unet_layers`, `te_layers`.
- `input_image`: the name of a 64x64 RGB PNG in input/ for LoadImage.

What is real and what is small:
- SDXL: the full SDXL block layout (every real layer name, transformer depths [0,0,2,2,10,10], middle 10, context
  2048, adm 2816, model_channels 320) but channel multipliers 1 on every level (~283M UNet parameters), so ComfyUI
  detects it as SDXL; full-size CLIP-L and CLIP-G (their widths come from ComfyUI's json configs) and the full SD VAE.
- Anima: the DiT at model_channels 256 (ComfyUI then builds 10 blocks, 16 heads), the fixed-size LLM adapter, the
  full Qwen3-0.6B text encoder, and a Wan 2.1 VAE with base width 32 (ComfyUI reads the width from the file).
Weights: norm weights 1 + U(+-0.035), everything else uniform with std 0.02 (finite outputs everywhere), fp16.

Files are cached under $HADAKRON_TEST_MODELS or ~/.cache/hadakron-test-models/<MODEL_FILES_VERSION>/ and hard-linked
(or symlinked) into the server's folders; they are rebuilt only when missing. Bump MODEL_FILES_VERSION whenever
the builder changes what it writes.
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

MODEL_FILES_VERSION = "v1"
CACHE_ROOT = Path(os.environ.get("HADAKRON_TEST_MODELS", Path.home() / ".cache" / "hadakron-test-models"))

SDXL_CHECKPOINT = "hadakron_test_sdxl.safetensors"
SDXL_UNET = "hadakron_test_sdxl_unet.safetensors"  # the checkpoint's diffusion model alone, for UNETLoader
ANIMA_UNET = "hadakron_test_anima_dit.safetensors"
ANIMA_TE = "hadakron_test_qwen3_06b.safetensors"
ANIMA_VAE = "hadakron_test_wan21_vae.safetensors"
INPUT_IMAGE = "hadakron_test_input.png"

FILE_DTYPE = torch.float16
WEIGHT_STD = 0.02
NORM_NOISE = 0.02

# The UNet config ComfyUI's detection derives from the file (checked by the builder): real SDXL layout, mult 1.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 1, 1], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
ANIMA_MODEL_CHANNELS = 256
WAN_VAE_DIM = 32


# ---------------------------------------------------------------- lazy file access


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Read-only mapping key -> tensor over one .safetensors file; tensors are read on access (never cached)."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")  # kept open: one header parse, mmap reads
        self._keys = list(self._file.keys())
        self.metadata = self._file.metadata() or {}
        self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._keys}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(f"{self.path.name}: no tensor {key!r}")
        return self._file.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def get(self, key: str, default=None):
        return self[key] if key in self.shapes else default

    def many(self, keys) -> dict[str, torch.Tensor]:
        """Several tensors at once."""
        return {k: self[k] for k in keys}

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def layer_weights(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{module name: weight shape} of every 2-D/4-D `<prefix><module>.weight` (Linear and Conv2d layers)."""
    out = {}
    for k, s in shapes.items():
        if k.startswith(prefix) and k.endswith(".weight") and len(s) in (2, 4):
            out[k[len(prefix):-len(".weight")]] = tuple(s)
    return out


# ---------------------------------------------------------------- deterministic weights


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 62)


def randomize_module_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter deterministically (by name): norm weights ~1, everything else std WEIGHT_STD."""
    bound = WEIGHT_STD * math.sqrt(3.0)
    norm_bound = NORM_NOISE * math.sqrt(3.0)
    owners = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(_tensor_seed(seed, name))
            is_norm = "norm" in type(owners[name]).__name__.lower()
            t = torch.empty(p.shape, dtype=torch.float32)
            if is_norm and not name.endswith("bias"):
                t.uniform_(-norm_bound, norm_bound, generator=g).add_(1.0)
            else:
                t.uniform_(-bound, bound, generator=g)
            p.copy_(t)
            del t


def _contiguous(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(FILE_DTYPE if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}


def _save_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(dict(tensors), str(tmp), metadata=metadata or {})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _cache_lock(directory: Path):
    """Exclusive lock on the cache folder (parallel test sessions build each file once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cache_dir() -> Path:
    return CACHE_ROOT / MODEL_FILES_VERSION


def _cached(names: list[str], build: Callable[[Path], None]) -> list[Path]:
    """Paths of `names` in the cache folder, calling `build(folder)` first when any is missing."""
    d = cache_dir()
    paths = [d / n for n in names]
    if all(p.is_file() for p in paths):
        return paths
    with _cache_lock(d):
        if not all(p.is_file() for p in paths):
            t0 = time.time()
            build(d)
            gc.collect()
            (d / f"{names[0]}.build.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    missing = [p for p in paths if not p.is_file()]
    assert not missing, f"model builder did not write {missing}"
    return paths


# ---------------------------------------------------------------- SDXL checkpoint


def _sdxl_config(env):
    mc = env.comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    mc.set_inference_dtype(FILE_DTYPE, None)
    return mc


def build_sdxl_checkpoint(env, path: Path, seed: int = 0) -> None:
    """Write the small SDXL single-file checkpoint (SGM key names) to `path`."""
    import comfy.sdxl_clip
    import comfy.ldm.models.autoencoder as autoencoder

    comfy = env.comfy
    mc = _sdxl_config(env)
    model = mc.get_model({})
    randomize_module_(model.diffusion_model, seed)
    unet_sd = model.diffusion_model.state_dict()

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": FILE_DTYPE, "initial_device": torch.device("cpu")})
    randomize_module_(clip.cond_stage_model, seed + 1)
    clip_sd = clip.cond_stage_model.state_dict()

    vae = autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4).to(FILE_DTYPE)
    randomize_module_(vae, seed + 2)
    vae_sd = vae.state_dict()

    sd = model.state_dict_for_saving(unet_sd, clip_sd, vae_sd)
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.implementation": "sgm",
            "modelspec.title": "hadakron test SDXL (random weights)", "hadakron.test_model": MODEL_FILES_VERSION}
    tensors = _contiguous(sd)
    del model, clip, vae, sd, unet_sd, clip_sd, vae_sd
    gc.collect()
    _save_atomic(tensors, path, meta)


def check_sdxl_detection(env, weights: SafetensorsWeights) -> None:
    """ComfyUI's detection on the file's UNet keys gives supported_models.SDXL with our config."""
    keys = {k: _ShapeOnly(s) for k, s in weights.shapes.items()}
    detected = env.comfy.model_detection.detect_unet_config(keys, "model.diffusion_model.")
    mc = env.comfy.model_detection.model_config_from_unet_config(detected, keys)
    assert type(mc) is env.comfy.supported_models.SDXL, f"{weights.path.name}: detected {type(mc).__name__}"
    for k, v in SDXL_UNET_CONFIG.items():
        assert detected.get(k) == v, f"{weights.path.name}: detected {k}={detected.get(k)!r}, built with {v!r}"


class _ShapeOnly:
    """Stand-in tensor for detection code that reads only `.shape` (and `.ndim`)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)
        self.ndim = len(shape)

    def dim(self):
        return self.ndim


@dataclass
class SDXLFiles:
    """The small SDXL checkpoint as the server sees it, plus exact in-process access to its tensors."""

    checkpoint: str
    path: Path
    weights: SafetensorsWeights
    unet_prefix: str = "model.diffusion_model."
    clip_l_prefix: str = "conditioner.embedders.0.transformer."
    clip_g_prefix: str = "conditioner.embedders.1.model."
    _clip_cache: dict | None = field(default=None, repr=False)

    @property
    def unet_layers(self) -> dict[str, tuple[int, ...]]:
        """{module: weight shape} of the UNet's Linear/Conv layers (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`)."""
        return layer_weights(self.weights.shapes, self.unet_prefix)

    def unet_key(self, module: str) -> str:
        """Checkpoint / ModelSave key of a UNet module's weight (`input_blocks.4.1.proj_in` -> model.diffusion_model...)."""
        return f"{self.unet_prefix}{module}.weight"

    def clip_weights(self, env) -> dict[str, dict[str, torch.Tensor]]:
        """{"clip_l": {key: tensor}, "clip_g": {...}} in the keys CLIPSave writes (`text_model.encoder...`),
        converted from the checkpoint by ComfyUI's own SDXL clip conversion (slices and renames: exact)."""
        if self._clip_cache is None:
            mc = _sdxl_config(env)
            keys = [k for k in self.weights if k.startswith("conditioner.embedders.")]
            converted = mc.process_clip_state_dict(self.weights.many(keys))
            out: dict[str, dict[str, torch.Tensor]] = {"clip_l": {}, "clip_g": {}}
            for k, v in converted.items():
                part, rest = k.split(".", 1)
                if rest.startswith("transformer."):
                    rest = rest[len("transformer."):]
                out[part][rest] = v
            self._clip_cache = out
        return self._clip_cache

    @property
    def clip_l_layers(self) -> dict[str, tuple[int, ...]]:
        """{module: weight shape} of CLIP-L's Linear layers, HF names (`text_model.encoder.layers.0.self_attn.q_proj`)."""
        return layer_weights(self.weights.shapes, self.clip_l_prefix)

    def clip_g_layers(self, env) -> dict[str, tuple[int, ...]]:
        """{module: weight shape} of CLIP-G's Linear layers in HF names (as ComfyUI holds them)."""
        return layer_weights({k: tuple(v.shape) for k, v in self.clip_weights(env)["clip_g"].items()})


def sdxl_checkpoint_path(env) -> Path:
    """The cached SDXL checkpoint, built (and checked by ComfyUI's detection) when missing."""
    def build(d: Path) -> None:
        build_sdxl_checkpoint(env, d / SDXL_CHECKPOINT)
        check_sdxl_detection(env, SafetensorsWeights(d / SDXL_CHECKPOINT))
    (path,) = _cached([SDXL_CHECKPOINT], build)
    return path


def sdxl_unet_path(env) -> Path:
    """The small SDXL checkpoint's diffusion model alone (its `model.diffusion_model.` tensors, unprefixed, as a file
    in models/diffusion_models holds them), for UNETLoader and its weight_dtype; cut from the cached checkpoint."""
    checkpoint = sdxl_checkpoint_path(env)

    def build(d: Path) -> None:
        weights = SafetensorsWeights(checkpoint)
        prefix = "model.diffusion_model."
        unet = weights.many([k for k in weights if k.startswith(prefix)])
        _save_atomic({k[len(prefix):]: v.contiguous() for k, v in unet.items()}, d / SDXL_UNET,
                     {"hadakron.test_model": MODEL_FILES_VERSION})
    return _cached([SDXL_UNET], build)[0]


# ---------------------------------------------------------------- Anima files


def _anima_config(env):
    fake = {"blocks.0.mlp.layer1.weight": _ShapeOnly((4 * ANIMA_MODEL_CHANNELS, ANIMA_MODEL_CHANNELS)),
            "llm_adapter.blocks.0.cross_attn.q_proj.weight": _ShapeOnly((1024, 1024)),
            "x_embedder.proj.1.weight": _ShapeOnly((ANIMA_MODEL_CHANNELS, 68))}
    mc = env.comfy.model_detection.model_config_from_unet(fake, "")
    assert isinstance(mc, env.comfy.supported_models.Anima), type(mc)
    mc.set_inference_dtype(FILE_DTYPE, None)
    return mc


def build_anima_files(env, directory: Path, seed: int = 10) -> None:
    """Write the Anima DiT (`net.*` keys), Qwen3-0.6B text encoder (HF `model.*` keys) and Wan 2.1 VAE."""
    import comfy.text_encoders.anima as anima_te
    import comfy.ldm.wan.vae as wan_vae

    comfy = env.comfy
    mc = _anima_config(env)
    model = mc.get_model({})
    randomize_module_(model.diffusion_model, seed)
    unet = {f"net.{k}": v for k, v in model.diffusion_model.state_dict().items()}
    _save_atomic(_contiguous(unet), directory / ANIMA_UNET, {"hadakron.test_model": MODEL_FILES_VERSION})
    del model, unet
    gc.collect()

    target = comfy.supported_models_base.ClipTarget(anima_te.AnimaTokenizer, anima_te.te())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": FILE_DTYPE, "initial_device": torch.device("cpu")})
    randomize_module_(clip.cond_stage_model, seed + 1)
    te_prefix = "qwen3_06b.transformer."
    te = {k[len(te_prefix):]: v for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(te_prefix)}
    _save_atomic(_contiguous(te), directory / ANIMA_TE, {"hadakron.test_model": MODEL_FILES_VERSION})
    del clip, te
    gc.collect()

    vae = wan_vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3, dropout=0.0)
    randomize_module_(vae, seed + 2)
    _save_atomic(_contiguous(vae.state_dict()), directory / ANIMA_VAE, {"hadakron.test_model": MODEL_FILES_VERSION})


@dataclass
class AnimaFiles:
    """The small Anima files as the server sees them, plus exact in-process access to their tensors."""

    unet: str
    text_encoder: str
    vae: str
    unet_weights: SafetensorsWeights
    te_weights: SafetensorsWeights
    vae_weights: SafetensorsWeights
    unet_prefix: str = "net."
    clip_type: str = "stable_diffusion"

    def unet_key(self, module: str) -> str:
        """File key of a DiT module's weight (`blocks.0.self_attn.q_proj` -> net.blocks.0.self_attn.q_proj.weight)."""
        return f"{self.unet_prefix}{module}.weight"

    @staticmethod
    def saved_unet_key(module: str) -> str:
        """ModelSave's key for a DiT module's weight."""
        return f"model.diffusion_model.{module}.weight"

    @property
    def unet_layers(self) -> dict[str, tuple[int, ...]]:
        """{module: weight shape} of the DiT's Linear layers (`blocks.0.self_attn.q_proj`, `llm_adapter....`)."""
        return layer_weights(self.unet_weights.shapes, self.unet_prefix)

    @property
    def te_layers(self) -> dict[str, tuple[int, ...]]:
        """{module: weight shape} of Qwen3's Linear layers, without `model.` (`layers.0.mlp.up_proj`)."""
        return layer_weights(self.te_weights.shapes, "model.")


def anima_paths(env) -> list[Path]:
    """[unet, text encoder, vae] cached Anima files, built when missing."""
    return _cached([ANIMA_UNET, ANIMA_TE, ANIMA_VAE], lambda d: build_anima_files(env, d))


# ---------------------------------------------------------------- input image and linking


def input_image_path() -> Path:
    """A deterministic 64x64 RGB PNG (smooth gradients plus seeded noise) in the cache folder."""
    def build(d: Path) -> None:
        import numpy as np
        from PIL import Image
        rng = np.random.default_rng(1234)
        y, x = np.mgrid[0:64, 0:64].astype(np.float64) / 63.0
        rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6.0 * (x + y))], axis=-1) * 200.0 + rng.uniform(0, 55, (64, 64, 3))
        tmp = d / f".{INPUT_IMAGE}.tmp-{os.getpid()}.png"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(tmp)
        os.replace(tmp, d / INPUT_IMAGE)
    (path,) = _cached([INPUT_IMAGE], build)
    return path


def link_into(src: Path, folder: Path, name: str | None = None) -> str:
    """Hard-link (or symlink across file systems) `src` into `folder`; returns the name the server sees."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or src.name)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        dst.symlink_to(src)
    return dst.name

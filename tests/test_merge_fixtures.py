"""Shared pieces of the merge/combine/convert tests: a tiny SDXL-named checkpoint, adapter modules of every
form, and an independent float64 reference delta-W (written here from the formulas, not from hadakron.ops).

No tests here; the other test_merge*/test_combine*/test_convert* files import it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from hadakron.io import read_adapter, write_adapter

C = 16  # tiny channel width (full SDXL has 320..1280)
CLIP = 8  # tiny CLIP width

# key -> (shape, dtype): tensors a tiny SDXL single-file checkpoint holds, with the real key names.
SDXL_CHECKPOINT_LAYOUT: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": ((C, 8, 3, 3), torch.float16),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.bias": ((C,), torch.float16),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": ((C, C), torch.float16),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": ((C, C), torch.float16),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ((C, 24), torch.bfloat16),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight": ((C, C), torch.float32),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.bias": ((C,), torch.float32),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": ((4 * C, C), torch.float16),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": ((CLIP, CLIP), torch.float16),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": ((4 * CLIP, CLIP), torch.float16),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": ((3 * CLIP, CLIP), torch.float16),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": ((3 * CLIP,), torch.float16),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight": ((CLIP, CLIP), torch.float16),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": ((4 * CLIP, CLIP), torch.float16),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight": ((CLIP, 4 * CLIP), torch.float16),
    "conditioner.embedders.1.model.text_projection": ((CLIP, CLIP), torch.float16),
    "first_stage_model.decoder.conv_in.weight": ((4, 4, 3, 3), torch.float16),
}
CHECKPOINT_METADATA = {"modelspec.title": "tiny sdxl", "format": "pt"}


def make_checkpoint(path: Path, seed: int = 0, layout: dict | None = None, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """Write a tiny checkpoint with random weights; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(shape, generator=g) * 0.5).to(dtype) for k, (shape, dtype) in (layout or SDXL_CHECKPOINT_LAYOUT).items()}
    save_file(tensors, str(path), metadata=metadata if metadata is not None else CHECKPOINT_METADATA)
    return tensors


def rnd(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


# ------------------------------------------------------------------ module parameter dicts of every form
def loha(out: int, inn: int, r: int, alpha: float, seed: int, kernel: tuple[int, int] | None = None,
         tucker: bool = False) -> dict[str, torch.Tensor]:
    k = 1 if kernel is None else kernel[0] * kernel[1]
    if tucker:
        kh, kw = kernel
        return {"hada_w1_a": rnd(r, out, seed=seed), "hada_w1_b": rnd(r, inn, seed=seed + 1),
                "hada_t1": rnd(r, r, kh, kw, seed=seed + 2), "hada_w2_a": rnd(r, out, seed=seed + 3),
                "hada_w2_b": rnd(r, inn, seed=seed + 4), "hada_t2": rnd(r, r, kh, kw, seed=seed + 5),
                "alpha": torch.tensor(alpha)}
    return {"hada_w1_a": rnd(out, r, seed=seed), "hada_w1_b": rnd(r, inn * k, seed=seed + 1),
            "hada_w2_a": rnd(out, r, seed=seed + 2), "hada_w2_b": rnd(r, inn * k, seed=seed + 3),
            "alpha": torch.tensor(alpha)}


def lokr(a: int, b: int, c: int, d: int, seed: int, *, w1: str = "full", w2: str = "full", r: int = 2,
         alpha: float = 1.0, kernel: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """LoKr for a (a*c, b*d[, kh, kw]) weight: w1 (a, b) full|lowrank; w2 (c, d[, k]) full|lowrank|flat|tucker."""
    p: dict[str, torch.Tensor] = {"alpha": torch.tensor(alpha)}
    if w1 == "full":
        p["lokr_w1"] = rnd(a, b, seed=seed)
    else:
        p["lokr_w1_a"], p["lokr_w1_b"] = rnd(a, r, seed=seed), rnd(r, b, seed=seed + 1)
    kh, kw = kernel or (1, 1)
    if w2 == "full":
        p["lokr_w2"] = rnd(c, d, kh, kw, seed=seed + 2) if kernel else rnd(c, d, seed=seed + 2)
    elif w2 == "lowrank":
        p["lokr_w2_a"], p["lokr_w2_b"] = rnd(c, r, seed=seed + 3), rnd(r, d, seed=seed + 4)
    elif w2 == "flat":
        p["lokr_w2_a"], p["lokr_w2_b"] = rnd(c, r, seed=seed + 3), rnd(r, d * kh * kw, seed=seed + 4)
    elif w2 == "tucker":
        p["lokr_t2"] = rnd(r, r, kh, kw, seed=seed + 5)
        p["lokr_w2_a"], p["lokr_w2_b"] = rnd(r, c, seed=seed + 3), rnd(r, d, seed=seed + 4)
    else:
        raise ValueError(w2)
    return p


def lora(out: int, inn: int, r: int, alpha: float, seed: int, kernel: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    if kernel:
        return {"lora_up.weight": rnd(out, r, 1, 1, seed=seed), "lora_down.weight": rnd(r, inn, *kernel, seed=seed + 1),
                "alpha": torch.tensor(alpha)}
    return {"lora_up.weight": rnd(out, r, seed=seed), "lora_down.weight": rnd(r, inn, seed=seed + 1),
            "alpha": torch.tensor(alpha)}


# ------------------------------------------------------------------ independent float64 reference
def _d(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # W[p, q, y, x] = sum_ij t[i, j, y, x] a[i, p] b[j, q]
    return torch.einsum("ijyx,ip,jq->pqyx", _d(t), _d(a), _d(b)).contiguous()


def ref_delta(p: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Scaled delta-W in float64 from the published formulas (LyCORIS/ComfyUI scale rules), reshaped to `shape`."""
    alpha = float(p["alpha"]) if "alpha" in p else None
    if "hada_w1_a" in p:
        if "hada_t1" in p:
            w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            w1 = _d(p["hada_w1_a"]) @ _d(p["hada_w1_b"])
            w2 = _d(p["hada_w2_a"]) @ _d(p["hada_w2_b"])
        rank = p["hada_w1_b"].shape[0]
        dw = (w1 * w2).reshape(shape)
    elif any(k.startswith("lokr_") for k in p):
        w1 = _d(p["lokr_w1"]) if "lokr_w1" in p else _d(p["lokr_w1_a"]) @ _d(p["lokr_w1_b"])
        if "lokr_w2" in p:
            w2 = _d(p["lokr_w2"])
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = _d(p["lokr_w2_a"]) @ _d(p["lokr_w2_b"])
        if len(shape) == 4 and w2.dim() == 2:  # flat conv factor (c, d*kh*kw)
            w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], shape[2], shape[3])
        if w2.dim() == 4:
            dw = torch.kron(w1[:, :, None, None], w2)
        else:
            dw = torch.kron(w1, w2)
        if "lokr_t2" in p:
            rank = p["lokr_t2"].shape[0]
        elif "lokr_w2_b" in p:
            rank = p["lokr_w2_b"].shape[0]
        elif "lokr_w1_b" in p:
            rank = p["lokr_w1_b"].shape[0]
        else:
            rank = None
        if rank is None:
            alpha = None
        dw = dw.reshape(shape)
    else:
        up, down = _d(p["lora_up.weight"]), _d(p["lora_down.weight"])
        rank = down.shape[0]
        dw = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape)
    scale = 1.0 if alpha is None else alpha / rank
    return dw * scale


def save_adapter(path: Path, modules: dict[str, dict[str, torch.Tensor]], metadata: dict | None = None):
    """Write {module_key: params} as an adapter file and read it back with hadakron.io."""
    tensors = {f"{mk}.{name}": t.contiguous() for mk, params in modules.items() for name, t in params.items()}
    write_adapter(path, tensors, metadata or {})
    return read_adapter(path)

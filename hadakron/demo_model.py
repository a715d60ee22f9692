"""A tiny SDXL-structured denoiser for the demo: real SDXL module names (SGM/LDM), narrow widths, CPU-fast.

It holds one ResBlock conv (`input_blocks.1.0.in_layers.2`), one SpatialTransformer
(`input_blocks.4.1.proj_in`, `transformer_blocks.0.attn1/attn2/ff`, `proj_out`) and the conv in/out layers,
so adapters, files and checkpoints built on it use the same keys as on a full SDXL. Its checkpoint also
carries a tiny CLIP-L and an OpenCLIP-form CLIP-G (`in_proj_weight` with q, k, v stacked), as SDXL files do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LATENT_CHANNELS = 4
UNET_PREFIX = "model.diffusion_model."


def _put(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register `module` at `dotted` under `root`, creating plain container modules on the way."""
    *path, last = dotted.split(".")
    node = root
    for name in path:
        if not hasattr(node, name):
            node.add_module(name, nn.Module())
        node = getattr(node, name)
    node.add_module(last, module)


def _get(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinySDXLUNet(nn.Module):
    """UNet-shaped denoiser eps(x_t, t, context) with SDXL names; `channels` wide, 4 attention heads."""

    def __init__(self, channels: int = 32, context_dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        c, t = channels, channels * 2
        self.channels, self.context_dim, self.heads = c, context_dim, heads
        st = "input_blocks.4.1."
        blk = st + "transformer_blocks.0."
        layers: dict[str, nn.Module] = {
            "time_embed.0": nn.Linear(c, t), "time_embed.2": nn.Linear(t, t),
            "input_blocks.0.0": nn.Conv2d(LATENT_CHANNELS, c, 3, padding=1),
            "input_blocks.1.0.in_layers.0": nn.GroupNorm(8, c),
            "input_blocks.1.0.in_layers.2": nn.Conv2d(c, c, 3, padding=1),
            "input_blocks.1.0.emb_layers.1": nn.Linear(t, c),
            st + "norm": nn.GroupNorm(8, c),
            st + "proj_in": nn.Linear(c, c),
            blk + "norm1": nn.LayerNorm(c), blk + "norm2": nn.LayerNorm(c), blk + "norm3": nn.LayerNorm(c),
            blk + "attn1.to_q": nn.Linear(c, c, bias=False), blk + "attn1.to_k": nn.Linear(c, c, bias=False),
            blk + "attn1.to_v": nn.Linear(c, c, bias=False), blk + "attn1.to_out.0": nn.Linear(c, c),
            blk + "attn2.to_q": nn.Linear(c, c, bias=False), blk + "attn2.to_k": nn.Linear(context_dim, c, bias=False),
            blk + "attn2.to_v": nn.Linear(context_dim, c, bias=False), blk + "attn2.to_out.0": nn.Linear(c, c),
            blk + "ff.net.0.proj": nn.Linear(c, 8 * c), blk + "ff.net.2": nn.Linear(4 * c, c),
            st + "proj_out": nn.Linear(c, c),
            "out.0": nn.GroupNorm(8, c), "out.2": nn.Conv2d(c, LATENT_CHANNELS, 3, padding=1),
        }
        for name, module in layers.items():
            _put(self, name, module)

    def _attention(self, prefix: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = _get(self, prefix + ".to_q")(x)
        k = _get(self, prefix + ".to_k")(context)
        v = _get(self, prefix + ".to_v")(context)
        split = lambda y: y.reshape(b, y.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return _get(self, prefix + ".to_out.0")(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        g = lambda name: _get(self, name)  # noqa: E731
        temb = g("time_embed.2")(F.silu(g("time_embed.0")(timestep_embedding(t, self.channels))))
        h = g("input_blocks.0.0")(x)
        r = g("input_blocks.1.0.in_layers.2")(F.silu(g("input_blocks.1.0.in_layers.0")(h)))
        h = h + r + g("input_blocks.1.0.emb_layers.1")(F.silu(temb))[:, :, None, None]
        b, c, hh, ww = h.shape
        st, blk = "input_blocks.4.1.", "input_blocks.4.1.transformer_blocks.0."
        tokens = g(st + "norm")(h).flatten(2).transpose(1, 2)
        u = g(st + "proj_in")(tokens)
        n1 = g(blk + "norm1")(u)
        u = u + self._attention(blk + "attn1", n1, n1)
        u = u + self._attention(blk + "attn2", g(blk + "norm2")(u), context)
        a, gate = g(blk + "ff.net.0.proj")(g(blk + "norm3")(u)).chunk(2, dim=-1)
        u = u + g(blk + "ff.net.2")(a * F.gelu(gate))
        h = h + g(st + "proj_out")(u).transpose(1, 2).reshape(b, c, hh, ww)
        return g("out.2")(F.silu(g("out.0")(h)))


def tiny_text_encoder_tensors(width: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """One-layer CLIP-L (HF names) and CLIP-G (OpenCLIP names) weights under SDXL checkpoint prefixes."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.05  # noqa: E731
    w = width
    l_pre = "conditioner.embedders.0.transformer.text_model."
    g_pre = "conditioner.embedders.1.model."
    return {
        l_pre + "embeddings.token_embedding.weight": r(64, w),
        l_pre + "encoder.layers.0.self_attn.q_proj.weight": r(w, w),
        l_pre + "encoder.layers.0.self_attn.k_proj.weight": r(w, w),
        l_pre + "encoder.layers.0.self_attn.v_proj.weight": r(w, w),
        l_pre + "encoder.layers.0.self_attn.out_proj.weight": r(w, w),
        l_pre + "encoder.layers.0.mlp.fc1.weight": r(4 * w, w),
        l_pre + "encoder.layers.0.mlp.fc2.weight": r(w, 4 * w),
        g_pre + "token_embedding.weight": r(64, w),
        g_pre + "transformer.resblocks.0.attn.in_proj_weight": r(3 * w, w),
        g_pre + "transformer.resblocks.0.attn.in_proj_bias": r(3 * w),
        g_pre + "transformer.resblocks.0.attn.out_proj.weight": r(w, w),
        g_pre + "transformer.resblocks.0.mlp.c_fc.weight": r(4 * w, w),
        g_pre + "transformer.resblocks.0.mlp.c_proj.weight": r(w, 4 * w),
        g_pre + "text_projection": r(w, w),
    }


def checkpoint_tensors(unet: TinySDXLUNet, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """An SDXL single-file state dict: the UNet under `model.diffusion_model.` plus the tiny text encoders."""
    sd = {UNET_PREFIX + k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    sd.update({k: v.to(dtype) for k, v in tiny_text_encoder_tensors().items()})
    return sd


def load_unet_from_checkpoint(unet: TinySDXLUNet, tensors: dict[str, torch.Tensor]) -> TinySDXLUNet:
    """Load the `model.diffusion_model.` tensors of a checkpoint into `unet` (float32)."""
    own = {k[len(UNET_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    unet.load_state_dict(own, strict=True)
    return unet

"""Small torch models with the real module names and structure of SDXL and Anima, at narrow widths.

They exist so that attaching, training and merging adapters can be tested on CPU in seconds:
- `SDXLUNet`: the SGM/LDM UNet (input_blocks 0..8, middle_block, output_blocks 0..8, real transformer
  depths 2/10, ResBlocks, Downsample `op`, Upsample `conv`), default width 8/16/32 channels, context 16;
- `CLIPTextModel`: CLIP-L/G-like text encoder (`text_model.encoder.layers.N...`, 12 or 32 layers);
- `AnimaDiT`: 28 DiT blocks with adaLN-LoRA modulations, embedders, final layer and the 6-block `llm_adapter`;
- `Qwen3Model`: Qwen3-like decoder (`layers.N.self_attn/mlp`, GQA, q/k norms), 28 layers.
Their forward passes are plausible (attention, MLPs, modulation), not the real models' exact math.
Every config has a `full()` counterpart with the real widths: build it under `torch.device("meta")` to
compare shapes with the arch data at no memory cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------- shared bits
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding `(B, dim)` of timesteps `(B,)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head attention on `(B, L, heads*d)` inputs (k/v may have fewer heads: grouped-query)."""
    b, lq, _ = q.shape
    q = q.view(b, lq, heads, -1).transpose(1, 2)
    kv_heads = k.shape[-1] // q.shape[-1]
    k = k.view(b, k.shape[1], kv_heads, -1).transpose(1, 2)
    v = v.view(b, v.shape[1], kv_heads, -1).transpose(1, 2)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, lq, -1)


def adaptable_layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """`{module name: weight shape}` of every Linear and Conv2d in `model`."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# ---------------------------------------------------------------------------------------- SDXL UNet
@dataclass(frozen=True)
class SDXLConfig:
    model_channels: int = 8
    channel_mult: tuple[int, ...] = (1, 2, 4)
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    middle_depth: int = 10
    num_res_blocks: int = 2
    context_dim: int = 16
    adm_in_channels: int = 12
    in_channels: int = 4
    norm_groups: int = 4
    head_dim: int = 4

    @staticmethod
    def full() -> "SDXLConfig":
        return SDXLConfig(model_channels=320, context_dim=2048, adm_in_channels=2816, norm_groups=32, head_dim=64)


class TimestepEmbedSequential(nn.Sequential):
    """Runs its children with the timestep embedding (ResBlock) or the context (SpatialTransformer)."""

    def forward(self, x, emb=None, context=None):  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, c: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k = nn.Linear(context_dim, c, bias=False)
        self.to_v = nn.Linear(context_dim, c, bias=False)
        self.to_out = nn.Sequential(nn.Linear(c, c), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, c: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(c, 4 * c), nn.Dropout(0.0), nn.Linear(4 * c, c))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, c: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(c, c, heads)
        self.ff = FeedForward(c)
        self.attn2 = CrossAttention(c, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, c: int, depth: int, context_dim: int, groups: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.proj_in = nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(c, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(c, c)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class SDXLUNet(nn.Module):
    """SGM/LDM SDXL UNet structure with configurable widths. forward(x, timesteps, context, y)."""

    def __init__(self, cfg: SDXLConfig = SDXLConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb = 4 * mc
        heads = lambda c: max(1, c // cfg.head_dim)  # noqa: E731
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mc * mult, emb, g)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg.context_dim, g, heads(ch)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb, g), SpatialTransformer(ch, cfg.middle_depth, cfg.context_dim, g, heads(ch)),
            ResBlock(ch, ch, emb, g))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            for j in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mc * cfg.channel_mult[level], emb, g)]
                ch = mc * cfg.channel_mult[level]
                if cfg.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg.context_dim, g, heads(ch)))
                if level and j == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(g, mc), nn.SiLU(), nn.Conv2d(mc, cfg.in_channels, 3, padding=1))

    def forward(self, x, timesteps, context, y):
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels)) + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    def example_inputs(self, batch: int = 2, size: int = 8, tokens: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = self.cfg
        return (torch.randn(batch, c.in_channels, size, size, generator=g), torch.rand(batch, generator=g) * 999,
                torch.randn(batch, tokens, c.context_dim, generator=g), torch.randn(batch, c.adm_in_channels, generator=g))


# ---------------------------------------------------------------------------------------- CLIP
@dataclass(frozen=True)
class CLIPConfig:
    hidden: int = 16
    mlp: int = 64
    layers: int = 12
    heads: int = 2
    vocab: int = 64
    positions: int = 16
    projection: bool = False

    @staticmethod
    def large() -> "CLIPConfig":  # tiny CLIP-L: 12 layers
        return CLIPConfig()

    @staticmethod
    def bigg() -> "CLIPConfig":  # tiny CLIP-G: 32 layers and a text projection
        return CLIPConfig(hidden=24, mlp=96, layers=32, heads=2, projection=True)

    def full(self) -> "CLIPConfig":
        if self.layers == 32:
            return replace(self, hidden=1280, mlp=5120, heads=20, vocab=49408, positions=77)
        return replace(self, hidden=768, mlp=3072, heads=12, vocab=49408, positions=77)


class CLIPAttention(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, h: int, m: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, m), nn.Linear(m, h)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden)
        self.mlp = CLIPMLP(cfg.hidden, cfg.mlp)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position_embedding = nn.Embedding(cfg.positions, cfg.hidden)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden)


class CLIPTextModel(nn.Module):
    """HF-style CLIP text model: `text_model.encoder.layers.N...` (+ `text_projection` for CLIP-G).

    forward(input_ids) -> last hidden state `(B, L, hidden)`.
    """

    def __init__(self, cfg: CLIPConfig = CLIPConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection:
            self.text_projection = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, input_ids):
        tm = self.text_model
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(pos)
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)

    def example_inputs(self, batch: int = 2, tokens: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.cfg.vocab, (batch, tokens), generator=g),)


# ---------------------------------------------------------------------------------------- Anima DiT
@dataclass(frozen=True)
class AnimaConfig:
    model_channels: int = 32
    num_blocks: int = 28
    heads: int = 2
    crossattn_dim: int = 16
    mlp_ratio: int = 4
    adaln_lora_dim: int = 8
    patch_in: int = 20
    patch_out: int = 16
    adapter_blocks: int = 6
    adapter_mlp: int = 64
    adapter_heads: int = 2
    adapter_vocab: int = 32

    @staticmethod
    def full() -> "AnimaConfig":
        return AnimaConfig(model_channels=2048, heads=16, crossattn_dim=1024, adaln_lora_dim=256, patch_in=68,
                           patch_out=64, adapter_mlp=4096, adapter_heads=16, adapter_vocab=32128)


class Timesteps(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c, c, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(c, 3 * c, bias=False)

    def forward(self, x):
        return self.linear_2(self.activation(self.linear_1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Identity(), nn.Linear(cin, c, bias=False))  # [0] stands for Rearrange

    def forward(self, x):
        return self.proj(x)


class DiTAttention(nn.Module):
    """predict2 attention: q/k/v/output_proj with per-head RMS norms on q and k."""

    def __init__(self, c: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(c, c, bias=False)
        self.q_norm = RMSNorm(c // heads)
        self.k_proj = nn.Linear(context_dim, c, bias=False)
        self.k_norm = RMSNorm(c // heads)
        self.v_proj = nn.Linear(context_dim, c, bias=False)
        self.output_proj = nn.Linear(c, c, bias=False)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, l, c = x.shape
        q = self.q_norm(self.q_proj(x).view(b, l, self.heads, -1)).view(b, l, c)
        k = self.k_norm(self.k_proj(context).view(b, context.shape[1], self.heads, -1)).view(b, -1, c)
        return self.output_proj(attention(q, k, self.v_proj(context), self.heads))


class GPT2FeedForward(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(c, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, c, bias=False)

    def forward(self, x):
        return self.layer2(self.activation(self.layer1(x)))


def _modulation(c: int, lora: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(c, lora, bias=False), nn.Linear(lora, n * c, bias=False))


class Block(nn.Module):
    """DiT block: adaLN-modulated self-attention, cross-attention and MLP."""

    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        c = cfg.model_channels
        self.layer_norm_self_attn = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.self_attn = DiTAttention(c, c, cfg.heads)
        self.layer_norm_cross_attn = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.cross_attn = DiTAttention(c, cfg.crossattn_dim, cfg.heads)
        self.layer_norm_mlp = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(c, cfg.mlp_ratio * c)
        self.adaln_modulation_self_attn = _modulation(c, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _modulation(c, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _modulation(c, cfg.adaln_lora_dim, 3)

    def forward(self, x, emb, context, adaln_lora):
        for name, op in (("self_attn", lambda h: self.self_attn(h)),
                         ("cross_attn", lambda h: self.cross_attn(h, context)), ("mlp", lambda h: self.mlp(h))):
            mod = getattr(self, f"adaln_modulation_{name}")(emb) + adaln_lora
            shift, scale, gate = mod[:, None].chunk(3, dim=-1)
            h = getattr(self, f"layer_norm_{name}")(x) * (1 + scale) + shift
            x = x + gate * op(h)
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        c = cfg.model_channels
        self.layer_norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c, cfg.patch_out, bias=False)
        self.adaln_modulation = _modulation(c, cfg.adaln_lora_dim, 2)

    def forward(self, x, emb, adaln_lora):
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[:, : 2 * emb.shape[-1]])[:, None].chunk(2, dim=-1)
        return self.linear(self.layer_norm(x) * (1 + scale) + shift)


class AdapterAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(d // heads), RMSNorm(d // heads)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, l, d = x.shape
        q = self.q_norm(self.q_proj(x).view(b, l, self.heads, -1)).view(b, l, d)
        k = self.k_norm(self.k_proj(context).view(b, context.shape[1], self.heads, -1)).view(b, -1, d)
        return self.o_proj(attention(q, k, self.v_proj(context), self.heads))


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, d: int, mlp: int, heads: int) -> None:
        super().__init__()
        self.norm_self_attn = RMSNorm(d)
        self.self_attn = AdapterAttention(d, heads)
        self.norm_cross_attn = RMSNorm(d)
        self.cross_attn = AdapterAttention(d, heads)
        self.norm_mlp = RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x, context):
        x = x + self.self_attn(self.norm_self_attn(x))
        x = x + self.cross_attn(self.norm_cross_attn(x), context)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Maps Qwen3 hidden states (source) onto T5 token ids (target) to make the DiT's cross-attention context."""

    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        d = cfg.crossattn_dim
        self.embed = nn.Embedding(cfg.adapter_vocab, d)
        self.blocks = nn.ModuleList(LLMAdapterTransformerBlock(d, cfg.adapter_mlp, cfg.adapter_heads)
                                    for _ in range(cfg.adapter_blocks))
        self.in_proj = nn.Identity()
        self.out_proj = nn.Linear(d, d)
        self.norm = RMSNorm(d)

    def forward(self, source_hidden, target_ids):
        x = self.embed(target_ids)
        context = self.in_proj(source_hidden)
        for block in self.blocks:
            x = block(x, context)
        return self.norm(self.out_proj(x))


class AnimaDiT(nn.Module):
    """Anima DiT structure. forward(x (B, N, patch_in), timesteps (B,), context (B, L, crossattn), t5_ids=None).

    With `t5_ids` the context goes through `llm_adapter` first (as Anima does with Qwen3 states).
    """

    def __init__(self, cfg: AnimaConfig = AnimaConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.model_channels
        self.x_embedder = PatchEmbed(cfg.patch_in, c)
        self.t_embedder = nn.Sequential(Timesteps(c), TimestepEmbedding(c))
        self.t_embedding_norm = RMSNorm(c)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        self.llm_adapter = LLMAdapter(cfg)

    def forward(self, x, timesteps, context, t5_ids=None):
        temb = self.t_embedder[0](timesteps)
        adaln_lora = self.t_embedder[1](temb)
        emb = self.t_embedding_norm(temb)
        if t5_ids is not None:
            context = self.llm_adapter(context, t5_ids)
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h, emb, context, adaln_lora)
        return self.final_layer(h, emb, adaln_lora)

    def example_inputs(self, batch: int = 2, tokens: int = 6, context_len: int = 5, seed: int = 0, t5: bool = True):
        g = torch.Generator().manual_seed(seed)
        c = self.cfg
        ids = torch.randint(0, c.adapter_vocab, (batch, context_len + 1), generator=g) if t5 else None
        return (torch.randn(batch, tokens, c.patch_in, generator=g), torch.rand(batch, generator=g),
                torch.randn(batch, context_len, c.crossattn_dim, generator=g), ids)


# ---------------------------------------------------------------------------------------- Qwen3
@dataclass(frozen=True)
class Qwen3Config:
    hidden: int = 16
    layers: int = 28
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    intermediate: int = 48
    vocab: int = 64

    @staticmethod
    def full() -> "Qwen3Config":
        return Qwen3Config(hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)
        self.head_dim = cfg.head_dim

    def forward(self, x):
        b, l, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, l, -1, self.head_dim)).view(b, l, -1)
        k = self.k_norm(self.k_proj(x).view(b, l, -1, self.head_dim)).view(b, l, -1)
        return self.o_proj(attention(q, k, self.v_proj(x), self.heads, causal=True))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden)
        self.post_attention_layernorm = RMSNorm(cfg.hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Qwen3 decoder (`Qwen3ForCausalLM(...).model`): names start at `layers.N`. forward(input_ids) -> hidden."""

    def __init__(self, cfg: Qwen3Config = Qwen3Config()) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def example_inputs(self, batch: int = 2, tokens: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.cfg.vocab, (batch, tokens), generator=g),)


# ---------------------------------------------------------------------------------------- builders
def sdxl_parts(seed: int = 0) -> dict[str, nn.Module]:
    """Tiny SDXL: {"unet", "te1" (CLIP-L-like, 12 layers), "te2" (CLIP-G-like, 32 layers)}."""
    torch.manual_seed(seed)
    return {"unet": SDXLUNet(), "te1": CLIPTextModel(CLIPConfig.large()), "te2": CLIPTextModel(CLIPConfig.bigg())}


def anima_parts(seed: int = 0) -> dict[str, nn.Module]:
    """Tiny Anima: {"unet" (DiT with llm_adapter), "te" (Qwen3-like, 28 layers)}."""
    torch.manual_seed(seed)
    return {"unet": AnimaDiT(), "te": Qwen3Model()}


def full_size_parts_on_meta(family: str) -> dict[str, nn.Module]:
    """The same structures at the real widths, on the meta device (no memory): for shape checks."""
    with torch.device("meta"):
        if family == "sdxl":
            return {"unet": SDXLUNet(SDXLConfig.full()), "te1": CLIPTextModel(CLIPConfig.large().full()),
                    "te2": CLIPTextModel(CLIPConfig.bigg().full())}
        if family == "anima":
            return {"unet": AnimaDiT(AnimaConfig.full()), "te": Qwen3Model(Qwen3Config.full())}
    raise ValueError(f"unknown family {family!r}")


def full_size_layers(family: str, part: str) -> dict[str, tuple[int, ...]]:
    """Full-size layer names and shapes from the arch data (hadakron.arch), for tests to check."""
    from hadakron.arch import get_family

    return get_family(family).layer_shapes(part)

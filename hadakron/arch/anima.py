"""Anima as data: the DiT (`unet`: `blocks.N...`, embedders, final layer, `llm_adapter...`) and Qwen3-0.6B (`te`).

DiT config (sd-scripts `anima_utils.load_anima_model`, the default here): model_channels 2048, 28 blocks,
cross-attention context 1024, mlp ratio 4, adaLN-LoRA dim 256, patch input 68 (16 latent channels x 2x2 + padding
mask), output 64. Newer checkpoints have more blocks (40, 52) and ComfyUI builds 10 at narrow widths, so the depth
is never assumed: `anima_dims` reads it (and the width) from a model, `hadakron.arch.depth` from a model or a
file, and `Family.stacks` lets `blocks.N` names of any N resolve. LLM adapter: 6 blocks of width 1024 (MLP 4096).
Qwen3-0.6B: hidden 1024, 28 layers, 16 query heads / 8 KV heads of 128, MLP 3072.

Targets as sd-scripts: classes Block, PatchEmbed, TimestepEmbedding, FinalLayer with default excludes
`.*(_modulation|_norm|_embedder|final_layer).*`, which leaves 10 DiT Linears per block (N x 10: 280 at 28 blocks,
400 at 40, 520 at 52); with `train_llm_adapter` the LLMAdapterTransformerBlock Linears add 6 x 10 = 60; Qwen3
attention and MLP give 28 x 7 = 196. `include_patterns` can rescue excluded layers (adaLN, embedders, final layer).

Block labels are the model's own module names, the spelling the loader's `block_weights` takes:
`blocks.N...` -> `blocks.N` (any depth: 28, 40, 52 blocks), `llm_adapter...` -> `llm_adapter`, other DiT layers
-> `OTHER`, text encoder -> `te` (the part name).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

from hadakron.arch.family import Family, Layer

MODEL_CHANNELS = 2048
NUM_BLOCKS = 28
CROSSATTN_DIM = 1024
MLP_RATIO = 4
ADALN_LORA_DIM = 256
PATCH_IN = 68
PATCH_OUT = 64
LLM_ADAPTER = {"dim": 1024, "mlp": 4096, "blocks": 6}
QWEN3_06B = {"hidden": 1024, "layers": 28, "q_out": 2048, "kv_out": 1024, "mlp": 3072}


def _dit_layers(num_blocks: int = NUM_BLOCKS, model_channels: int = MODEL_CHANNELS) -> list[Layer]:
    """The DiT's Linears in model order for `num_blocks` blocks of width `model_channels` (full size: 28, 2048)."""
    c = model_channels
    layers = [
        Layer("x_embedder.proj.1", (c, PATCH_IN), "PatchEmbed"),
        Layer("t_embedder.1.linear_1", (c, c), "TimestepEmbedding"),
        Layer("t_embedder.1.linear_2", (3 * c, c), "TimestepEmbedding"),
    ]
    for i in range(num_blocks):
        p = f"blocks.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            layers.append(Layer(f"{p}.self_attn.{name}", (c, c), "Block"))
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            cin = CROSSATTN_DIM if name in ("k_proj", "v_proj") else c
            layers.append(Layer(f"{p}.cross_attn.{name}", (c, cin), "Block"))
        layers.append(Layer(f"{p}.mlp.layer1", (MLP_RATIO * c, c), "Block"))
        layers.append(Layer(f"{p}.mlp.layer2", (c, MLP_RATIO * c), "Block"))
        for which in ("self_attn", "cross_attn", "mlp"):
            layers.append(Layer(f"{p}.adaln_modulation_{which}.1", (ADALN_LORA_DIM, c), "Block"))
            layers.append(Layer(f"{p}.adaln_modulation_{which}.2", (3 * c, ADALN_LORA_DIM), "Block"))
    layers += [
        Layer("final_layer.linear", (PATCH_OUT, c), "FinalLayer"),
        Layer("final_layer.adaln_modulation.1", (ADALN_LORA_DIM, c), "FinalLayer"),
        Layer("final_layer.adaln_modulation.2", (2 * c, ADALN_LORA_DIM), "FinalLayer"),
    ]
    d, m = LLM_ADAPTER["dim"], LLM_ADAPTER["mlp"]
    for i in range(LLM_ADAPTER["blocks"]):
        p = f"llm_adapter.blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                layers.append(Layer(f"{p}.{attn}.{name}", (d, d), "LLMAdapterTransformerBlock"))
        layers.append(Layer(f"{p}.mlp.0", (m, d), "LLMAdapterTransformerBlock"))
        layers.append(Layer(f"{p}.mlp.2", (d, m), "LLMAdapterTransformerBlock"))
    layers.append(Layer("llm_adapter.out_proj", (d, d), ""))
    return layers


def _qwen3_layers() -> list[Layer]:
    q = QWEN3_06B
    h = q["hidden"]
    out = []
    for i in range(q["layers"]):
        p = f"layers.{i}"
        out += [
            Layer(f"{p}.self_attn.q_proj", (q["q_out"], h), "Qwen3Attention"),
            Layer(f"{p}.self_attn.k_proj", (q["kv_out"], h), "Qwen3Attention"),
            Layer(f"{p}.self_attn.v_proj", (q["kv_out"], h), "Qwen3Attention"),
            Layer(f"{p}.self_attn.o_proj", (h, q["q_out"]), "Qwen3Attention"),
            Layer(f"{p}.mlp.gate_proj", (q["mlp"], h), "Qwen3MLP"),
            Layer(f"{p}.mlp.up_proj", (q["mlp"], h), "Qwen3MLP"),
            Layer(f"{p}.mlp.down_proj", (h, q["mlp"]), "Qwen3MLP"),
        ]
    return out


def block_of(part: str, dotted: str) -> str:
    """`blocks.N` / `llm_adapter` / `OTHER` for DiT layers (the module names, any N), `te` for the text encoder."""
    if part != "unet":
        return part
    if dotted.startswith("llm_adapter."):
        return "llm_adapter"
    head, _, rest = dotted.partition(".")
    index = rest.split(".", 1)[0]
    return f"blocks.{int(index)}" if head == "blocks" and index.isdigit() else "OTHER"


@lru_cache(maxsize=8)  # a few sizes at most; the same size gives the same Family
def anima_family(num_blocks: int = NUM_BLOCKS, model_channels: int = MODEL_CHANNELS) -> Family:
    """The Anima family with `num_blocks` DiT blocks of width `model_channels` (layer shapes follow the width)."""
    return Family(
        name="anima",
        title="Anima",
        parts=("unet", "te"),
        layers={
            "unet": {layer.dotted: layer for layer in _dit_layers(num_blocks, model_channels)},
            "te": {layer.dotted: layer for layer in _qwen3_layers()},
        },
        target_groups={
            "unet": frozenset({"Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer"}),
            "te": frozenset({"Qwen3Attention", "Qwen3MLP"}),
        },
        conv_groups={},
        llm_adapter_groups={"unet": frozenset({"LLMAdapterTransformerBlock"})},
        default_excludes=[r".*(_modulation|_norm|_embedder|final_layer).*"],
        part_titles={"unet": "DiT", "te": "Qwen3-0.6B text encoder"},
        block_fn=block_of,
        stacks={"unet": "blocks."},
        stack_layers={"unet": {layer.dotted[len("blocks.0."):]: layer for layer in _dit_layers(1, model_channels)
                               if layer.dotted.startswith("blocks.0.")}},
    )


# The sd-scripts default size. Names of any depth resolve through it (`Family.stacks`); what lists blocks (targets,
# block ids, reports) takes the depth from the model or the file (`hadakron.arch.depth`).
ANIMA = anima_family()


@dataclass(frozen=True)
class AnimaDims:
    """Size of an Anima DiT as found in a model: `num_blocks` (`blocks.N`), `model_channels` (None: no shapes given)."""

    num_blocks: int
    model_channels: int | None


_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.")
_WEIGHT_SUFFIXES = (".weight", ".bias")


def _dit_name(name: str) -> str:
    """A model module name or state-dict key as the DiT's own dotted layer name (prefix and .weight/.bias off)."""
    for prefix in _MODEL_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def anima_dims(model: "Iterable[str] | Mapping[str, Sequence[int]]") -> AnimaDims:
    """Block count and width of an Anima DiT from its module names or its state-dict `{key: shape}` (any of the
    prefixes `diffusion_model.`, `model.diffusion_model.`, `net.`); an nn.Module (duck-typed) gives its parameters."""
    if callable(getattr(model, "named_parameters", None)):
        model = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes = model if isinstance(model, Mapping) else dict.fromkeys(model)
    names = {_dit_name(n): n for n in shapes}
    depth = ANIMA.depth_of("unet", names)
    probes = [shapes[names[p]] for p in ("blocks.0.self_attn.q_proj", "x_embedder.proj.1") if p in names]
    width = next((int(shape[0]) for shape in probes if shape), None)  # a weight's out dim is the width
    return AnimaDims(depth, width)

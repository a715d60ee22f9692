"""SDXL as data: UNet (SGM/LDM names), CLIP-L (`te1`) and CLIP-G (`te2`), full-size shapes, targets.

UNet structure (model_channels 320, channel_mult 1/2/4, 2 res blocks per level, context 2048):
input_blocks.0 conv_in; 1,2 ResBlock 320; 3 Downsample; 4,5 ResBlock+SpatialTransformer 640 (depth 2);
6 Downsample; 7,8 ResBlock+SpatialTransformer 1280 (depth 10); middle_block = ResBlock, ST(1280, 10),
ResBlock; output_blocks 0..2 at 1280 (ST depth 10, Upsample at output_blocks.2.2), 3..5 at 640
(depth 2, Upsample at output_blocks.5.2), 6..8 at 320 (no ST). Output ResBlocks take the skip concat.

Targets as sd-scripts: `Transformer2DModel` Linears by default (722), plus with `conv_dim` the
ResBlock (in_layers.2, out_layers.3, emb_layers.1, skip_connection), Downsample `op` and Upsample
`conv` layers (+66 = 788). CLIP: self_attn q/k/v/out_proj and mlp fc1/fc2 (72 + 192 = 264).

Block labels (LoRA Block Weight convention): `input_blocks.N...` -> `IN{N:02d}`, `middle_block...`
-> `M00`, `output_blocks.N...` -> `OUT{N:02d}`, other UNet layers (time_embed, label_emb, out) ->
`OTHER`; text encoder layers -> the part name in capitals (`TE1`, `TE2`).

`DIFFUSERS_TO_SGM` is the exact diffusers <-> SGM module-name table, written from the structure:
down_blocks.i.resnets.j <-> input_blocks.(3i+j+1).0, down_blocks.i.attentions.j <-> input_blocks.(3i+j+1).1,
down_blocks.i.downsamplers.0.conv <-> input_blocks.(3i+3).0.op, mid_block.resnets.k <-> middle_block.(2k),
mid_block.attentions.0 <-> middle_block.1, up_blocks.i.resnets.j <-> output_blocks.(3i+j).0,
up_blocks.i.attentions.j <-> output_blocks.(3i+j).1, up_blocks.i.upsamplers.0.conv <-> output_blocks.(3i+2).2.conv,
ResBlock in_layers.2/out_layers.3/emb_layers.1/skip_connection <-> conv1/conv2/time_emb_proj/conv_shortcut.
"""
from __future__ import annotations

from hadakron.arch.family import Family, Layer, block_index_label

MODEL_CHANNELS = 320
TIME_EMBED_DIM = 1280
CONTEXT_DIM = 2048
ADM_IN_CHANNELS = 2816
IN_CHANNELS = 4
CHANNEL_MULT = (1, 2, 4)
TRANSFORMER_DEPTH = (0, 2, 10)  # per level (SpatialTransformer depth; 0 = no transformer)
MIDDLE_DEPTH = 10
NUM_RES_BLOCKS = 2

CLIP_L = {"hidden": 768, "mlp": 3072, "layers": 12}
CLIP_G = {"hidden": 1280, "mlp": 5120, "layers": 32}

RESBLOCK_TO_DIFFUSERS = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
BASIC_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
}

TRANSFORMER_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


def _resblock(prefix: str, cin: int, cout: int) -> list[Layer]:
    layers = [
        Layer(f"{prefix}.in_layers.2", (cout, cin, 3, 3), "ResnetBlock2D"),
        Layer(f"{prefix}.emb_layers.1", (cout, TIME_EMBED_DIM), "ResnetBlock2D"),
        Layer(f"{prefix}.out_layers.3", (cout, cout, 3, 3), "ResnetBlock2D"),
    ]
    if cin != cout:
        layers.append(Layer(f"{prefix}.skip_connection", (cout, cin, 1, 1), "ResnetBlock2D"))
    return layers


def _transformer(prefix: str, c: int, depth: int) -> list[Layer]:
    g = "Transformer2DModel"
    layers = [Layer(f"{prefix}.proj_in", (c, c), g)]
    for t in range(depth):
        b = f"{prefix}.transformer_blocks.{t}"
        for name in TRANSFORMER_LINEARS:
            if name in ("attn2.to_k", "attn2.to_v"):
                shape = (c, CONTEXT_DIM)
            elif name == "ff.net.0.proj":
                shape = (8 * c, c)  # GEGLU: value and gate
            elif name == "ff.net.2":
                shape = (c, 4 * c)
            else:
                shape = (c, c)
            layers.append(Layer(f"{b}.{name}", shape, g))
    layers.append(Layer(f"{prefix}.proj_out", (c, c), g))
    return layers


def _unet_layers() -> tuple[list[Layer], dict[str, str]]:
    """All UNet Linear/Conv2d layers with full shapes, and the diffusers -> SGM module-name table."""
    layers: list[Layer] = [
        Layer("time_embed.0", (TIME_EMBED_DIM, MODEL_CHANNELS), ""),
        Layer("time_embed.2", (TIME_EMBED_DIM, TIME_EMBED_DIM), ""),
        Layer("label_emb.0.0", (TIME_EMBED_DIM, ADM_IN_CHANNELS), ""),
        Layer("label_emb.0.2", (TIME_EMBED_DIM, TIME_EMBED_DIM), ""),
        Layer("input_blocks.0.0", (MODEL_CHANNELS, IN_CHANNELS, 3, 3), ""),
    ]
    d2s: dict[str, str] = {v: k for k, v in BASIC_TO_DIFFUSERS.items()}

    def add_res(sgm: str, diff: str, cin: int, cout: int) -> None:
        for layer in _resblock(sgm, cin, cout):
            layers.append(layer)
            local = layer.dotted[len(sgm) + 1:]
            d2s[f"{diff}.{RESBLOCK_TO_DIFFUSERS[local]}"] = layer.dotted

    def add_st(sgm: str, diff: str, c: int, depth: int) -> None:
        for layer in _transformer(sgm, c, depth):
            layers.append(layer)
            d2s[diff + layer.dotted[len(sgm):]] = layer.dotted

    skips = [MODEL_CHANNELS]  # channels of each input block output, consumed by the output blocks
    ch = MODEL_CHANNELS
    n = 1
    for level, mult in enumerate(CHANNEL_MULT):
        cout = MODEL_CHANNELS * mult
        for j in range(NUM_RES_BLOCKS):
            add_res(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", ch, cout)
            ch = cout
            if TRANSFORMER_DEPTH[level]:
                add_st(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", ch, TRANSFORMER_DEPTH[level])
            skips.append(ch)
            n += 1
        if level != len(CHANNEL_MULT) - 1:
            layers.append(Layer(f"input_blocks.{n}.0.op", (ch, ch, 3, 3), "Downsample2D"))
            d2s[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            skips.append(ch)
            n += 1

    add_res("middle_block.0", "mid_block.resnets.0", ch, ch)
    add_st("middle_block.1", "mid_block.attentions.0", ch, MIDDLE_DEPTH)
    add_res("middle_block.2", "mid_block.resnets.1", ch, ch)

    n = 0
    for up, level in enumerate(reversed(range(len(CHANNEL_MULT)))):
        cout = MODEL_CHANNELS * CHANNEL_MULT[level]
        for j in range(NUM_RES_BLOCKS + 1):
            cin = ch + skips.pop()
            add_res(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", cin, cout)
            ch = cout
            idx = 1
            if TRANSFORMER_DEPTH[level]:
                add_st(f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", ch, TRANSFORMER_DEPTH[level])
                idx = 2
            if level != 0 and j == NUM_RES_BLOCKS:
                layers.append(Layer(f"output_blocks.{n}.{idx}.conv", (ch, ch, 3, 3), "Upsample2D"))
                d2s[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{n}.{idx}.conv"
            n += 1
    layers.append(Layer("out.2", (IN_CHANNELS, MODEL_CHANNELS, 3, 3), ""))
    return layers, d2s


def _clip_layers(cfg: dict[str, int], projection: bool) -> list[Layer]:
    h, m = cfg["hidden"], cfg["mlp"]
    out = []
    for i in range(cfg["layers"]):
        p = f"text_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append(Layer(f"{p}.self_attn.{name}", (h, h), "CLIPAttention"))
        out.append(Layer(f"{p}.mlp.fc1", (m, h), "CLIPMLP"))
        out.append(Layer(f"{p}.mlp.fc2", (h, m), "CLIPMLP"))
    if projection:
        out.append(Layer("text_projection", (h, h), ""))
    return out


def block_of(part: str, dotted: str) -> str:
    """`IN{N:02d}` / `M00` / `OUT{N:02d}` / `OTHER` for UNet layers, `TE1` / `TE2` for text encoders."""
    if part != "unet":
        return part.upper()
    if dotted.startswith("middle_block."):
        return "M00"
    return (block_index_label(dotted, "input_blocks.", "IN")
            or block_index_label(dotted, "output_blocks.", "OUT") or "OTHER")


_UNET_LAYERS, DIFFUSERS_TO_SGM = _unet_layers()
SGM_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_TO_SGM.items()}

SDXL = Family(
    name="sdxl",
    title="SDXL",
    parts=("unet", "te1", "te2"),
    layers={
        "unet": {layer.dotted: layer for layer in _UNET_LAYERS},
        "te1": {layer.dotted: layer for layer in _clip_layers(CLIP_L, projection=False)},
        "te2": {layer.dotted: layer for layer in _clip_layers(CLIP_G, projection=True)},
    },
    target_groups={
        "unet": frozenset({"Transformer2DModel"}),
        "te1": frozenset({"CLIPAttention", "CLIPMLP"}),
        "te2": frozenset({"CLIPAttention", "CLIPMLP"}),
    },
    conv_groups={"unet": frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})},
    llm_adapter_groups={},
    default_excludes=[],
    part_titles={"unet": "UNet", "te1": "CLIP-L text encoder", "te2": "CLIP-G text encoder"},
    block_fn=block_of,
)

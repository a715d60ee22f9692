"""Anima of every size: the DiT's depth (28, 40, 52 blocks) and width come from the model or the file, never 28.

The models are the real module structure (`tests.models.AnimaDiT`) at full width on the meta device; expectations
come from walking those models (or from the block count each test picks), not from hadakron's layer list.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn

from hadakron.arch import (AnimaDims, anima_dims, anima_file_num_blocks, detect_family, detect_model_family,
                           family_for_file, file_key, parse_module_key)
from hadakron.block_weights import BlockWeightsError, all_block_ids, parse_block_weights
from hadakron.commands.inspect_blocks import block_cells
from hadakron.load_report import build_load_report
from hadakron.network import AdapterNetwork, NetworkConfig
from tests.models import AnimaConfig, AnimaDiT

SIZES = [28, 40, 52]
LAYOUTS = ["kohya", "lycoris", "comfyui", "peft"]  # no diffusers names for Anima
# Two layers per block in the files below: a square self-attention one and the 2048x1024 cross-attention key.
FILE_LAYERS = ("self_attn.q_proj", "cross_attn.k_proj")


@functools.lru_cache(maxsize=None)  # read only by the tests (never attached to): built once per size
def meta_dit(num_blocks: int) -> nn.Module:
    """Full-width Anima DiT (2048 channels) with `num_blocks` blocks on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return AnimaDiT(dataclasses.replace(AnimaConfig.full(), num_blocks=num_blocks))


def weight_shapes(model: nn.Module) -> dict[tuple[str, str], tuple[int, ...]]:
    """`("unet", dotted) -> weight shape` of every >=2-D weight of the model (what the loader reads from ComfyUI)."""
    return {("unet", n[: -len(".weight")]): tuple(p.shape) for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() >= 2}


def block_linears(model: nn.Module, *, adaln: bool) -> list[str]:
    """Linear layers inside `blocks.N` by the model's own names; the adaLN modulations only when `adaln`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")
            and (adaln or "adaln_modulation" not in n)]


def lokr(shape: tuple[int, ...], alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """A small LoKr module for a weight of `shape` (out, in): full W1 (2, 2), rank-1 W2 (out/2 x in/2)."""
    out, cols = shape
    return {"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.full((out // 2, 1), 0.01),
            "lokr_w2_b": torch.full((1, cols // 2), 0.01), "alpha": torch.tensor(alpha)}


def file_modules(blocks, layout: str, shapes) -> dict[str, dict[str, torch.Tensor]]:
    """`{module key: tensors}` of a file in `layout` with FILE_LAYERS on each block index in `blocks`."""
    out = {}
    for i in blocks:
        for local in FILE_LAYERS:
            dotted = f"blocks.{i}.{local}"
            out[file_key("anima", "unet", dotted, "alpha", layout)[: -len(".alpha")]] = lokr(shapes[dotted])
    return out


def keys_of(modules) -> list[str]:
    return [f"{m}.{p}" for m, params in modules.items() for p in params]


SHAPES = {f"blocks.{i}.{local}": s for i in range(80) for local, s in
          (("self_attn.q_proj", (2048, 2048)), ("cross_attn.k_proj", (2048, 1024)))}


# ------------------------------------------------------------------------------------------ the model's size
@pytest.mark.parametrize("n", SIZES)
def test_dims_from_module_names_and_state_dict_shapes(n):
    model = meta_dit(n)
    assert len(model.blocks) == n
    assert anima_dims(model) == AnimaDims(n, 2048)
    state = {f"diffusion_model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}  # as in ComfyUI
    assert anima_dims(state) == AnimaDims(n, 2048)
    assert anima_dims([f"diffusion_model.{name}" for name, _ in model.named_modules()]) == AnimaDims(n, None)
    detected = detect_model_family(model)
    assert detected.family == "anima" and detected.depths == {"unet": n}
    assert f"({n} blocks)" in detected.reasons[0]


def test_dims_of_a_narrow_model_and_of_none():
    with torch.device("meta"):
        narrow = AnimaDiT(dataclasses.replace(AnimaConfig(), num_blocks=10))  # ComfyUI builds 10 at narrow widths
    assert anima_dims(narrow) == AnimaDims(10, 32)
    assert anima_dims(["llm_adapter.blocks.5.mlp.0", "x_embedder.proj.1"]) == AnimaDims(0, None)


# ------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("n", SIZES)
def test_default_targets_scale_with_depth(n):
    model = meta_dit(n)
    expected = block_linears(model, adaln=False)  # 4 self-attn + 4 cross-attn + 2 mlp per block, no adaLN
    assert len(expected) == n * 10
    net = AdapterNetwork.build("anima", {"unet": model}, NetworkConfig(network_dim=4))
    assert sorted(t.dotted for t in net.targets) == sorted(expected)
    assert net.counts() == {"unet": n * 10}
    keys = net.file_state_dict("kohya")
    assert f"lora_unet_blocks_{n - 1}_mlp_layer2.lokr_w1" in keys
    assert not any(k.startswith(f"lora_unet_blocks_{n}_") for k in keys)
    llm = AdapterNetwork.build("anima", {"unet": model}, NetworkConfig(network_dim=4, train_llm_adapter=True))
    assert llm.counts() == {"unet": n * 10 + 6 * 10}
    adaln = AdapterNetwork.build("anima", {"unet": model},
                                 NetworkConfig(network_dim=4, include_patterns=[r"blocks\..*adaln_modulation.*"]))
    assert sorted(t.dotted for t in adaln.targets) == sorted(block_linears(model, adaln=True))  # 16 per block


# ------------------------------------------------------------------------------------------ block weights
@pytest.mark.parametrize("n", SIZES)
def test_block_weights_take_the_model_depth(n):
    depth = anima_dims(meta_dit(n)).num_blocks
    bw = parse_block_weights(f"blocks.0-{n - 1}=0.5", "anima", num_blocks=depth)
    assert bw.values == {f"blocks.{i}": 0.5 for i in range(n)}
    assert parse_block_weights(f"blocks.{n - 1}=0", "anima", num_blocks=depth).strength(f"blocks.{n - 1}") == 0
    with pytest.raises(BlockWeightsError, match=rf"'blocks\.{n}' is out of range: this Anima model has {n} blocks, "
                                                rf"blocks\.0\.\.blocks\.{n - 1}; the last is blocks\.{n - 1}"):
        parse_block_weights(f"blocks.{n}=0.5", "anima", num_blocks=depth)
    with pytest.raises(BlockWeightsError, match=rf"the last is blocks\.{n - 1}"):
        parse_block_weights("blocks.0-51=0.5, blocks.52=0", "anima", num_blocks=depth)
    vector = parse_block_weights(",".join(["0.25"] * (n + 2)), "anima", num_blocks=depth)  # te, blocks, llm_adapter
    assert set(vector.values) == {"te", "llm_adapter"} | {f"blocks.{i}" for i in range(n)}
    with pytest.raises(BlockWeightsError, match=rf"Anima with {n} blocks takes {n + 2} values"):
        parse_block_weights(",".join(["1"] * (n + 1)), "anima", num_blocks=depth)
    ids = all_block_ids("anima", num_blocks=depth)
    assert ids == ("te",) + tuple(f"blocks.{i}" for i in range(n)) + ("llm_adapter", "OTHER")


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", SIZES)
def test_detection_from_file_keys(n, layout):
    keys = keys_of(file_modules(range(n), layout, SHAPES))
    assert anima_file_num_blocks(keys) == n
    detected = detect_family(keys)
    assert (detected.family, detected.parts, detected.layout) == ("anima", ("unet",), layout)
    assert detected.counts["anima"]["unet"] == 2 * n and not detected.unknown
    assert detected.depths == {"unet": n}
    assert len(family_for_file("anima", keys).select("unet")) == n * 10
    last = file_key("anima", "unet", f"blocks.{n - 1}.self_attn.q_proj", "alpha", layout)[: -len(".alpha")]
    assert parse_module_key(last, "anima") == ("anima", "unet", f"blocks.{n - 1}.self_attn.q_proj", layout)


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
@pytest.mark.parametrize("n", SIZES)
def test_load_report_counts_every_block_of_the_model(n, layout):
    model = meta_dit(n)
    shapes = weight_shapes(model)
    modules = file_modules(range(n), layout, {d: s for (_, d), s in shapes.items()})
    report = build_load_report(modules, {}, "anima", shapes, source="wide.safetensors")
    assert not report.unmatched
    assert report.counts_by_block() == {"unet": {f"blocks.{i}": 2 for i in range(n)}}
    assert report.depths == {"unet": n} and report.to_dict()["depths"] == {"unet": n}
    assert f"unet of {n} blocks: {2 * n} (blocks.0 2, " in report.to_text()
    assert f"blocks.{n - 1} 2)" in report.to_text()


@pytest.mark.parametrize("n", SIZES)
def test_blocks_beyond_the_model_are_reported(n):
    """A file made for a deeper model: its extra blocks are listed as not in the model, with the model's depth."""
    model = meta_dit(n)
    shapes = weight_shapes(model)
    extra = [n, n + 11]
    modules = file_modules(list(range(n)) + extra, "kohya", SHAPES)
    report = build_load_report(modules, {}, "anima", shapes, source="deeper.safetensors")
    assert len(report.matched) == 2 * n
    assert {m.block for m in report.matched} == {f"blocks.{i}" for i in range(n)}
    assert sorted(u.key for u in report.unmatched) == sorted(
        f"lora_unet_blocks_{i}_{local.replace('.', '_')}" for i in extra for local in FILE_LAYERS)
    assert report.total_modules() == len(modules)
    for u in report.unmatched:
        assert u.kind == "not_in_model"
        assert f"beyond its depth ({n} blocks, blocks.0..blocks.{n - 1})" in u.reason, u.reason
    assert "not applied (4):" in report.to_text()


@pytest.mark.parametrize("n", SIZES)
def test_heatmap_cells_list_the_file_depth(n):
    """`hadakron inspect --blocks`: one cell per DiT block the file reaches, no fewer, no assumed 28."""
    modules = file_modules(range(n), "kohya", SHAPES)
    arrays = {m: {p: t.numpy().astype(np.float64) for p, t in params.items()} for m, params in modules.items()}
    family, cells = block_cells(arrays, keys_of(modules))
    assert family == "anima"
    assert [c.block for c in cells] == [f"blocks.{i}" for i in range(n)] + ["llm_adapter", "OTHER"]
    assert all(c.modules == 2 for c in cells[:n]) and all(c.modules == 0 for c in cells[n:])


@pytest.mark.parametrize("width,n", [(2048, 52), (256, 10), (3072, 40)])
def test_inspect_checks_layer_shapes_at_the_files_width_and_depth(tmp_path, capsys, width, n):
    """`hadakron inspect`: a file for a DiT of another width (and depth) fits its own layers; a module that fits no
    layer of that width is named, on a block past the default 28 too."""
    import json

    import safetensors.torch

    from hadakron.cli import main

    shapes = {"self_attn.q_proj": (width, width), "cross_attn.k_proj": (width, 1024),
              "mlp.layer1": (4 * width, width), "mlp.layer2": (width, 4 * width)}
    tensors = {}
    for i in range(n):
        for local, shape in shapes.items():
            module = file_key("anima", "unet", f"blocks.{i}.{local}", "alpha", "kohya")[: -len(".alpha")]
            tensors |= {f"{module}.{p}": t.contiguous() for p, t in lokr(shape).items()}
    bad = f"lora_unet_blocks_{n - 1}_mlp_layer1"  # out dim 2 * width: fits no mlp.layer1 of this width
    tensors |= {f"{bad}.{p}": t.contiguous() for p, t in lokr((2 * width, width)).items()}
    path = tmp_path / f"anima_{width}_{n}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "anima" and report["parts"] == {"unet": 4 * n}
    assert report["problems"] == [f"{bad}: delta-W is {2 * width}x{width} but Anima unet layer blocks.{n - 1}.mlp.layer1 "
                                  f"is {4 * width}x{width} ({4 * width}x{width} flattened)"], report["problems"]

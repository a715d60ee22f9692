"""The trainers fed by ComfyUI's own dataset chain through a real server (POST /prompt):
LoadImageTextDataSetFromFolder -> ResizeImagesByShorterEdge -> MakeTrainingDataset (the small SDXL
checkpoint's VAE and CLIP) -> ResolutionBucket -> LoKr Trainer -> Save Adapter; the unbucketed lists into LoHa
Trainer and the legacy LoKr node; SaveTrainingDataset, then LoadTrainingDataset into a trainer in the next prompt.

The folder holds 6 PNGs of three aspect ratios (2 each), so the latents fall into three resolution buckets of 2:
a batch of 4 must be one whole bucket (stacking two sizes would fail), and the log names the buckets.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from comfy_client import Graph
from test_server_trainer import hadakron_lib, loss_curve, place_in_loras, saved_adapter_path, train_node  # noqa: F401 (fixture)

FOLDER = "hadakron_core_dataset"
DATASET = "hadakron_core_dataset_saved"
# (width, height) of the written PNGs; ResizeImagesByShorterEdge(64) makes them 64x64, 96x64 and 64x96 pixels,
# i.e. latents (4, 8, 8), (4, 8, 12) and (4, 12, 8) in the SDXL VAE's 8x space
SIZES = [(128, 128), (192, 128), (128, 192)] * 2
BUCKETS = {"4x8x8": 2, "4x8x12": 2, "4x12x8": 2}
STEPS = 3
SEED = 5


@pytest.fixture(scope="module")
def image_folder(comfy):
    """input/<FOLDER>: 6 seeded PNGs of three aspect ratios, each with a .txt caption."""
    from PIL import Image
    folder = comfy.input_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y) / (4.0 + i))], axis=-1) * 200.0
        rgb += rng.uniform(0, 55, (h, w, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a test picture number {i}", encoding="utf-8")
    return FOLDER


def dataset_nodes(g: Graph, files, folder: str):
    """CheckpointLoaderSimple and core's chain up to MakeTrainingDataset: (checkpoint node, dataset node)."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=files.checkpoint)
    loaded = g.node("LoadImageTextDataSetFromFolder", folder=folder)
    resized = g.node("ResizeImagesByShorterEdge", images=loaded[0], shorter_edge=64)
    # (core's AddTextPrefix is left out: in this ComfyUI each of its outputs is a one-item list, not a string, and
    # MakeTrainingDataset fails on it in clip.tokenize before any trainer runs)
    data = g.node("MakeTrainingDataset", images=resized[0], vae=ckpt[2], clip=ckpt[1], texts=loaded[1])
    return ckpt, data


def assert_buckets_logged(log: str, count: int) -> None:
    """The trainers logged `count` runs on 6 samples in the three buckets the image sizes make, 2 samples each."""
    lines = re.findall(r"hadakron: training on 6 samples in 3 buckets: (.*)", log)
    assert len(lines) == count, lines
    for line in lines:
        assert dict(re.findall(r"(\d+x\d+x\d+) \((\d+)\)", line)) == {k: str(v) for k, v in BUCKETS.items()}, line


def assert_run(run, node: str, adapter=None) -> list[float]:
    """STEPS finite losses; the saved adapter (when given) says STEPS steps on 6 images."""
    curve = loss_curve(run, node)
    assert len(curve["loss"]) == STEPS and all(math.isfinite(x) for x in curve["loss"]), curve
    if adapter is not None:
        assert adapter.metadata["ss_steps"] == str(STEPS) and adapter.metadata["ss_num_train_images"] == "6"
        assert float(adapter.metadata["hadakron.final_loss"]) == pytest.approx(curve["loss"][-1], rel=1e-6)
    return curve["loss"]


@pytest.fixture(scope="module")
def chain_run(comfy, sdxl_files, image_folder):
    """One prompt: bucketed lists into LoKr Trainer (batch 4 > bucket 2), the unbucketed lists into LoHa Trainer
    and the legacy LoKr node (batch 2), both adapters saved, the dataset saved with SaveTrainingDataset."""
    g = Graph()
    ckpt, data = dataset_nodes(g, sdxl_files, image_folder)
    bucket = g.node("ResolutionBucket", latents=data[0], conditioning=data[1])
    trainers = {
        "lokr": train_node(g, "lokr", ckpt[0], bucket[0], bucket[1], steps=STEPS, seed=SEED, batch_size=4),
        "loha": train_node(g, "loha", ckpt[0], data[0], data[1], steps=STEPS, seed=SEED, batch_size=2),
        "legacy": train_node(g, "lokr", ckpt[0], data[0], data[1], steps=STEPS, seed=SEED, batch_size=2,
                             legacy=True),
    }
    saves = {algo: g.node("HadakronSaveAdapter", adapter=trainers[algo][0], filename_prefix=f"core_dataset/{algo}").id
             for algo in ("lokr", "loha")}
    g.node("SaveTrainingDataset", latents=data[0], conditioning=data[1], folder_name=DATASET, shard_size=1000)
    log_start = len(comfy.log.read_text(errors="replace"))
    run = comfy.run(g, timeout=1800)
    print(f"core dataset chain prompt: {run.seconds:.1f} s")
    return {"run": run, "trainers": {k: v.id for k, v in trainers.items()}, "saves": saves,
            "log": comfy.log.read_text(errors="replace")[log_start:]}


def test_trainers_train_on_the_chain_lists(comfy, chain_run, hadakron_lib):
    """Bucketed (LoKr) and unbucketed (LoHa, legacy LoKr) lists train STEPS finite steps on all 6 samples, in the
    three buckets the image sizes make; the saved adapters say so."""
    run = chain_run["run"]
    assert_buckets_logged(chain_run["log"], 3)
    for algo, node in chain_run["trainers"].items():
        adapter = None
        if algo in chain_run["saves"]:
            adapter = hadakron_lib.io.read_adapter(saved_adapter_path(comfy, run, chain_run["saves"][algo]))
            assert not adapter.problems, adapter.problems
        print(algo, [round(x, 4) for x in assert_run(run, node, adapter)])
    assert (comfy.base / "datasets" / DATASET / "metadata.json").exists()


def test_saved_dataset_trains_the_same_and_adapters_load(comfy, sdxl_files, chain_run):
    """Next prompt: LoadTrainingDataset of the saved dataset into LoHa Trainer with the first run's settings gives
    the first run's losses (same samples, same order, same seed); each saved adapter loads in HadakronLoader with
    every module matched."""
    first = chain_run["run"]
    names = {algo: place_in_loras(comfy, saved_adapter_path(comfy, first, node), f"core_dataset_{algo}.safetensors")
             for algo, node in chain_run["saves"].items()}
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    data = g.node("LoadTrainingDataset", folder_name=DATASET, shard_size=1000)
    again = train_node(g, "loha", ckpt[0], data[0], data[1], steps=STEPS, seed=SEED, batch_size=2)
    loaders = {}
    for algo, name in names.items():
        loaders[algo] = g.node("HadakronLoader", model=ckpt[0], clip=ckpt[1], lora_name=name, strength_model=1.0,
                               strength_clip=1.0)
        g.node("PreviewAny", source=loaders[algo][2])
    run = comfy.run(g, timeout=1800)
    print(f"saved dataset prompt: {run.seconds:.1f} s")
    losses = assert_run(run, again.id)
    assert losses == pytest.approx(loss_curve(first, chain_run["trainers"]["loha"])["loss"], rel=1e-6)
    for algo, loader in loaders.items():
        report = json.loads(run.outputs[loader.id]["hadakron_report"][0])
        assert report["matched_count"] > 100 and report["unmatched_count"] == 0, report


def test_bucketed_latents_with_unbucketed_conditioning_are_refused(comfy, sdxl_files, image_folder, chain_run):
    """ResolutionBucket's latents (3 groups) with MakeTrainingDataset's conditioning (6 groups) would pair samples
    with other images' captions: the trainer refuses, naming both groupings."""
    g = Graph()
    ckpt, data = dataset_nodes(g, sdxl_files, image_folder)
    bucket = g.node("ResolutionBucket", latents=data[0], conditioning=data[1])
    train_node(g, "lokr", ckpt[0], bucket[0], data[1], steps=1, seed=SEED)
    run = comfy.run(g, expect_error=True)
    message = run.error["exception_message"]
    assert "3 groups [2, 2, 2]" in message and "6 groups [1, 1, 1, 1, 1, 1]" in message, message

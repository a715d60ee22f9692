"""`hadakron demo`: the whole file workflow on a tiny SDXL-structured model, on CPU, in seconds, no downloads.

Steps: build a tiny SDXL-named UNet and a "teacher" that differs from it by a known low-rank change; train
a LoKr and a LoHa (hadakron.network + hadakron.train) to reproduce the teacher; save them with metadata;
inspect them; bake them into an SDXL-layout checkpoint and check the baked weights and outputs; combine
them exactly and at a low rank; convert the LoKr to LoRA (exact and SVD) and to another key layout.
Every step prints what it produced: losses, file sizes, delta-W errors and timings.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hadakron.arch import convert_state_dict, parse_module_key
from hadakron.demo_model import TinySDXLUNet, checkpoint_tensors, load_unet_from_checkpoint
from hadakron.io import build_metadata, read_adapter, write_adapter
from hadakron.merge import bake_checkpoint, combine, convert_layout, to_lora
from hadakron.network import AdapterNetwork, NetworkConfig
from hadakron.ops import delta_weight
from hadakron.train import DiffusionObjective, LatentDataset, Sample, TrainConfig, train

RANK = 4
TITLES = {"lokr": "LoKr", "loha": "LoHa"}
LOKR_RANK = 2  # with factor 4 on 32-wide layers: W1 (4, 4) full, W2 (8, 8) as a rank-2 product
CONTEXT_TOKENS = 6
COMBINE_RANK = 8
CONVERT_RANK = 4
CHANGED = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_v",
           "input_blocks.4.1.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.ff.net.2",
           "input_blocks.1.0.in_layers.2")
"""Layers the synthetic teacher changes (the adapters must discover which)."""


class DistillObjective:
    """Match a teacher's prediction on noised latents: x_t and t as in SDXL training, target = teacher(x_t)."""

    def __init__(self, teacher: nn.Module, context: torch.Tensor) -> None:
        self.teacher, self.context = teacher, context
        self.noise = DiffusionObjective("epsilon")

    def sample(self, x0: torch.Tensor, generator: torch.Generator) -> Sample:
        noisy, t, _ = self.noise.sample(x0, generator)
        with torch.no_grad():
            target = self.teacher(noisy, t, self.context.expand(x0.shape[0], -1, -1))
        return Sample(noisy, t, target)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)


@dataclass
class DemoReport:
    """Numbers the demo measured, by name, plus the files it wrote."""

    numbers: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _teacher(base: TinySDXLUNet, seed: int) -> TinySDXLUNet:
    """The base plus a known rank-2 change on CHANGED layers (what the adapters learn)."""
    teacher = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in CHANGED:
            w = teacher.get_submodule(name).weight
            flat = w.reshape(w.shape[0], -1)
            change = torch.randn(flat.shape[0], 2, generator=gen) @ torch.randn(2, flat.shape[1], generator=gen)
            w += (0.6 * change * flat.norm() / change.norm()).reshape(w.shape)
    return teacher


def _eval_loss(model: nn.Module, teacher: nn.Module, context: torch.Tensor, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed + 99)
    x0 = torch.randn(16, 4, 8, 8, generator=gen)
    noisy, t, target = DistillObjective(teacher, context).sample(x0, gen)
    with torch.no_grad():
        return float(F.mse_loss(model(noisy, t, context.expand(16, -1, -1)), target))


def run_demo(out_dir: str | Path, *, steps: int = 120, seed: int = 0, overwrite: bool = False,
             echo: Callable[[str], None] = print) -> DemoReport:
    """Run every step, writing files into `out_dir` (refused if it holds files, unless `overwrite`).

    Runs single-threaded: the model is tiny, and one thread is fastest on a shared CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), steps=steps, seed=seed, overwrite=overwrite, echo=echo)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, *, steps: int, seed: int, overwrite: bool, echo: Callable[[str], None]) -> DemoReport:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder exists and is not empty; choose another --output or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    report = DemoReport()
    num, files = report.numbers, report.files
    t_all = time.perf_counter()

    def step(title: str) -> float:
        echo(f"\n== {title}")
        return time.perf_counter()

    def done(t0: float, key: str) -> None:
        num[f"{key}_seconds"] = time.perf_counter() - t0
        echo(f"   ({num[f'{key}_seconds']:.2f} s)")

    # 1. model, teacher, data
    t0 = step("1. tiny SDXL-structured UNet and a synthetic target")
    base = TinySDXLUNet().eval()
    for p in base.parameters():
        p.requires_grad_(False)
    teacher = _teacher(base, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(1, CONTEXT_TOKENS, base.context_dim, generator=gen)
    data = LatentDataset(torch.randn(64, 4, 8, 8, generator=gen))
    n_params = sum(p.numel() for p in base.parameters())
    files["base"] = out / "base.safetensors"
    ckpt = checkpoint_tensors(base, torch.float16)
    write_adapter(files["base"], ckpt, {"modelspec.title": "hadakron demo tiny SDXL"}, overwrite=overwrite)
    num["base_loss"] = _eval_loss(base, teacher, context, seed)
    echo(f"   UNet with {n_params} parameters and SDXL layer names; the teacher changes "
         f"{len(CHANGED)} layers by a rank-2 delta")
    echo(f"   checkpoint {files['base'].name}: {len(ckpt)} tensors (UNet + tiny CLIP-L + OpenCLIP CLIP-G), "
         f"fp16, {_size(files['base'])}; base-vs-teacher loss {num['base_loss']:.4f}")
    done(t0, "setup")

    # 2. train a LoKr and a LoHa
    configs = {
        "lokr": NetworkConfig(algo="lokr", network_dim=LOKR_RANK, network_alpha=float(LOKR_RANK), factor=4,
                              conv_dim=LOKR_RANK, conv_alpha=float(LOKR_RANK)),
        "loha": NetworkConfig(algo="loha", network_dim=RANK, network_alpha=float(RANK),
                              conv_dim=RANK, conv_alpha=float(RANK)),
    }
    for algo, config in configs.items():
        t0 = step(f"2. train a {TITLES[algo]} (hadakron.network + hadakron.train, AdamW, {steps} steps, "
                  f"distillation on noised latents)")
        student = copy.deepcopy(base)
        with warnings.catch_warnings():  # the tiny model holds only a few of SDXL's layers: expected here
            warnings.simplefilter("ignore")
            net = AdapterNetwork.build("sdxl", {"unet": student}, config, seed=seed)
        net.attach()
        train_config = TrainConfig(steps=steps, batch_size=8, learning_rate=1e-2 if algo == "lokr" else 5e-3,
                                   scheduler="cosine", seed=seed)
        objective = DistillObjective(teacher, context)
        result = train(net, lambda x, t, b: student(x, t, context.expand(x.shape[0], -1, -1)), data, objective,
                       train_config)
        start, end = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
        num[f"{algo}_loss_start"], num[f"{algo}_loss_end"] = start, end
        num[f"{algo}_eval_loss"] = _eval_loss(student, teacher, context, seed)
        tensors = {k: v.detach().contiguous() for k, v in net.file_state_dict("kohya").items()}
        rank = config.network_dim
        meta = build_metadata(algorithm=algo, family="sdxl", network_dim=rank, network_alpha=float(rank),
                              conv_dim=rank, conv_alpha=float(rank), factor=config.factor,
                              training={"steps": steps, "learning_rate": train_config.learning_rate},
                              title=f"hadakron demo {algo}", tensors=tensors)
        files[algo] = write_adapter(out / f"{algo}.safetensors", tensors, meta, overwrite=overwrite)
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        echo(f"   {len(net.targets)} layers adapted (sd-scripts' SDXL targets with conv_dim, as present in the tiny "
             f"model); {n_train} trainable parameters")
        echo(f"   loss {start:.4f} -> {end:.4f} (mean of first/last 5 steps); held-out loss "
             f"{num[f'{algo}_eval_loss']:.4f} (base {num['base_loss']:.4f})")
        echo(f"   saved {files[algo].name}: {len(tensors)} tensors, {_size(files[algo])}")
        net.detach()
        done(t0, f"train_{algo}")

    # 3. inspect
    t0 = step("3. inspect the saved files")
    from hadakron.commands.inspect import describe
    adapters = {algo: read_adapter(files[algo]) for algo in configs}
    for algo, a in adapters.items():
        r = describe(a)
        size_notes = [p for p in r["problems"] if "but SDXL" in p]
        other = len(r["problems"]) - len(size_notes)
        echo(f"   {files[algo].name}: family {r['family']}, layout {r['layout']}, {r['modules']} modules, "
             f"algorithms {dict(r['algorithms'])}, ranks {dict(r['ranks'])}")
        echo(f"      {len(size_notes)} notes that layer sizes differ from full-size SDXL (expected: tiny model), "
             f"{other or 'no'} other problems")
    done(t0, "inspect")

    # 4. bake into the checkpoint
    t0 = step("4. bake LoKr@1.0 into the checkpoint (streamed, atomic), then LoKr@0.5 + LoHa@0.5")
    files["baked"] = out / "base+lokr.safetensors"
    rep = bake_checkpoint(files["base"], [(adapters["lokr"], 1.0)], files["baked"], overwrite=overwrite)
    baked = load_file(str(files["baked"]))
    worst = 0.0
    for mk, params in adapters["lokr"].modules.items():
        key = "model.diffusion_model." + parse_module_key(mk, "sdxl")[2] + ".weight"
        w = ckpt[key]
        exact = w.double() + delta_weight(params, tuple(w.shape), dtype=torch.float64)
        want = exact.to(w.dtype)
        ulp = (torch.nextafter(want.abs(), torch.tensor(math.inf, dtype=w.dtype)) - want.abs()).double()
        worst = max(worst, float(((baked[key].double() - want.double()).abs() / ulp).max()))
    num["bake_max_ulps"] = worst
    num["baked_eval_loss"] = _eval_loss(load_unet_from_checkpoint(TinySDXLUNet(), baked), teacher, context, seed)
    echo(f"   {rep.weights_changed} of {rep.tensors_total} tensors changed, {sum(len(a.unmatched) for a in rep.adapters)} "
         f"modules unmatched; {files['baked'].name} {_size(files['baked'])}")
    echo(f"   baked weights vs float64 W + dW rounded to fp16: at most {worst:.0f} fp16 ulp apart "
         f"(float32 math, one rounding to the stored dtype)")
    echo(f"   baked checkpoint loss vs teacher {num['baked_eval_loss']:.4f} (LoKr as adapter {num['lokr_eval_loss']:.4f}, "
         f"base {num['base_loss']:.4f})")
    files["blend"] = out / "base+lokr+loha.safetensors"
    bake_checkpoint(files["base"], [(adapters["lokr"], 0.5), (adapters["loha"], 0.5)], files["blend"], overwrite=overwrite)
    num["blend_eval_loss"] = _eval_loss(load_unet_from_checkpoint(TinySDXLUNet(), load_file(str(files["blend"]))),
                                        teacher, context, seed)
    echo(f"   {files['blend'].name}: loss vs teacher {num['blend_eval_loss']:.4f}")
    done(t0, "bake")

    # 5. combine
    t0 = step(f"5. combine LoKr@0.5 + LoHa@0.5 into one LoRA (exact), and at rank {COMBINE_RANK} (truncated SVD)")
    pair = [(adapters["lokr"], 0.5), (adapters["loha"], 0.5)]
    exact = combine(pair)
    files["combined"] = exact.write(out / "combined_exact_lora.safetensors", overwrite=overwrite)
    back = read_adapter(files["combined"])
    rel = []
    for mk, params in back.modules.items():
        want = sum(s * delta_weight(a.modules[mk], dtype=torch.float64).reshape(-1) for a, s in pair)
        got = delta_weight(params, dtype=torch.float64).reshape(-1)
        rel.append(float((got - want).norm() / want.norm()))
    num["combine_exact_error"] = max(rel)
    ranks = [m.rank for m in exact.modules]
    echo(f"   exact: {len(exact.modules)} modules, ranks {min(ranks)}..{max(ranks)}, {_size(files['combined'])}; "
         f"max relative delta-W error vs 0.5*dW_lokr + 0.5*dW_loha: {num['combine_exact_error']:.2e}")
    low = combine(pair, rank=COMBINE_RANK)
    files["combined_low"] = low.write(out / f"combined_rank{COMBINE_RANK}_lora.safetensors", overwrite=overwrite)
    num["combine_low_rank_error"] = low.overall_error
    echo(f"   rank {COMBINE_RANK}: reported relative Frobenius error {low.overall_error:.3e} overall, worst module "
         f"{low.max_error:.3e}; {_size(files['combined_low'])}")
    done(t0, "combine")

    # 6. convert
    t0 = step(f"6. convert the LoKr: to LoRA (exact and rank {CONVERT_RANK}) and to the ComfyUI key layout")
    as_lora = to_lora(adapters["lokr"])
    files["lokr_lora"] = as_lora.write(out / "lokr_as_lora.safetensors", overwrite=overwrite)
    back = read_adapter(files["lokr_lora"])
    num["to_lora_exact_error"] = max(
        float((delta_weight(back.modules[mk], dtype=torch.float64).reshape(-1)
               - delta_weight(p, dtype=torch.float64).reshape(-1)).norm()
              / delta_weight(p, dtype=torch.float64).norm()) for mk, p in adapters["lokr"].modules.items())
    echo(f"   exact LoRA: {_size(files['lokr_lora'])}, max relative delta-W error {num['to_lora_exact_error']:.2e}")
    small = to_lora(adapters["lokr"], rank=CONVERT_RANK)
    files["lokr_lora_low"] = small.write(out / f"lokr_as_lora_rank{CONVERT_RANK}.safetensors", overwrite=overwrite)
    num["to_lora_low_rank_error"] = small.overall_error
    echo(f"   rank-{CONVERT_RANK} LoRA: {_size(files['lokr_lora_low'])}, relative Frobenius error {small.overall_error:.3e}")
    comfy = convert_layout(adapters["lokr"], "comfyui")
    files["lokr_comfyui"] = comfy.write(out / "lokr_comfyui_keys.safetensors", overwrite=overwrite)
    again = convert_state_dict(comfy.tensors, "kohya", "sdxl")
    same = again.keys() == adapters["lokr"].tensors.keys() and all(
        torch.equal(t, adapters["lokr"].tensors[k]) for k, t in again.items())
    num["layout_lossless"] = 1.0 if same else 0.0
    echo(f"   ComfyUI layout: {len(comfy.tensors)} tensors renamed ({next(iter(sorted(comfy.tensors)))} ...), "
         f"values identical: {same}")
    done(t0, "convert")

    num["total_seconds"] = time.perf_counter() - t_all
    echo(f"\nall steps done in {num['total_seconds']:.1f} s; files in {out}")
    return report

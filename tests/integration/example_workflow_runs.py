"""How an example workflow is run with the test models: the API prompt with test file names and CPU-sized settings,
the small adapter files the load and merge templates read, and readers for what a run wrote.

Shared by test_example_workflows_run.py (POST /prompt) and test_frontend_browser.py (the UI's Run button).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adapter_forms import make_params, reference_delta
from workflow_api import to_api, with_values

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
LATENT_PIXELS = 64  # 8x8 latents for SDXL and Anima
SAMPLE_STEPS = 2
TRAIN_STEPS = 2
DELTA_STD = 0.01  # the test adapters change weights (std 0.02) by about half their size
TRAINER_TYPES = ("HadakronTrainLoKr", "HadakronTrainLoHa", "HadakronLoKrTrainer", "HadakronLoHaTrainer")
FILE_INPUTS = ("ckpt_name", "unet_name", "clip_name", "vae_name", "lora_name", "image", "adapter_1", "adapter_2",
               "adapter_3")


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def workflow_params(in_ci: set[str]) -> list:
    """`workflow_paths()` as pytest params named by stem; those not in `in_ci` are marked `slow` (the full suite
    runs every template, CI's `-m "not slow"` the cheaper ones; CI's time is limited)."""
    import pytest
    return [pytest.param(p, id=p.stem, marks=() if p.stem in in_ci else pytest.mark.slow) for p in workflow_paths()]


def family_of(path: Path) -> str:
    return "anima" if "anima" in Path(path).stem else "sdxl"


@dataclass
class WrittenAdapter:
    """An adapter file written into the server's loras folder, with its exact float64 delta-W per module."""

    name: str
    deltas: dict[str, torch.Tensor]  # module (ComfyUI/LDM name) -> scaled delta-W


def write_adapter(folder: Path, name: str, layers: dict[str, tuple[int, ...]], modules: list[str], form: str,
                  seed: int) -> WrittenAdapter:
    """A kohya-named LoHa/LoKr file (`lora_unet_<module>`) on `modules`, delta-W std DELTA_STD, fp32."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for module in modules:
        shape = layers[module]
        params = make_params(form, shape, g)
        first = "hada_w1_a" if "hada_w1_a" in params else ("lokr_w1" if "lokr_w1" in params else "lokr_w1_a")
        params[first] = params[first] * (DELTA_STD / float(reference_delta(params, shape).std()))
        key = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{key}.{k}": v.contiguous() for k, v in params.items()})
        deltas[module] = reference_delta(params, shape)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"ss_network_module": "lycoris.kohya"})
    tmp.replace(folder / name)
    return WrittenAdapter(name, deltas)


def attention_layers(layers: dict[str, tuple[int, ...]], count: int) -> list[str]:
    """`count` 2-D attention projection layers, in name order (q/k/v/out of self-attention)."""
    names = sorted(m for m, s in layers.items() if len(s) == 2 and ("attn1.to_" in m or "self_attn." in m))
    assert len(names) >= count, names
    return names[:count]


def shrink_settings(trainer_steps: int = TRAIN_STEPS) -> dict[tuple[str, str], object]:
    """{(class, input): value} that make a template run in seconds on CPU: few steps, 64 px, and fp32 training
    (bf16 matmuls are many times slower than fp32 on CPUs without bf16 units)."""
    out: dict[tuple[str, str], object] = {("KSampler", "steps"): SAMPLE_STEPS,
                                          ("EmptyLatentImage", "width"): LATENT_PIXELS,
                                          ("EmptyLatentImage", "height"): LATENT_PIXELS}
    for trainer in TRAINER_TYPES:
        out[(trainer, "steps")] = trainer_steps
    for holder in ("HadakronLoKrTrainer", "HadakronLoHaTrainer", "HadakronPrecisionOptions"):
        out[(holder, "training_dtype")] = "fp32"  # compact trainers take it from the precision options node
    return out


def prompt_for_test_run(workflow: dict, object_info: dict, file_names: dict[str, str],
                trainer_steps: int = TRAIN_STEPS) -> dict:
    """The template as the API prompt with the test files and CPU-sized settings; every file name it ends up
    with must be one the server lists (no placeholder left)."""
    prompt = with_values(to_api(workflow, object_info), file_names, shrink_settings(trainer_steps), strict=False)
    for node_id, entry in prompt.items():
        spec = {**object_info[entry["class_type"]]["input"].get("required", {}),
                **object_info[entry["class_type"]]["input"].get("optional", {})}
        for name in FILE_INPUTS:
            value = entry["inputs"].get(name)
            if isinstance(value, str) and value != "None" and isinstance(spec.get(name, [None])[0], list):
                assert value in spec[name][0], (f"node {node_id} ({entry['class_type']}) {name}={value!r} is not "
                                                f"on the server: {spec[name][0][:20]}")
    return prompt


def image_array(comfy, item: dict):
    """An image a node reported ({filename, subfolder, type}) as a uint8 array, read back through GET /view."""
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(comfy.view(item["filename"], item["subfolder"], item["type"]))))


def load_report(output: dict) -> dict:
    """The loader node's JSON report from its ui output."""
    return json.loads(output["hadakron_report"][0])


# ---------------------------------------------------------------- fixtures (import them into a test module)


@pytest.fixture(scope="module")
def adapter_files(comfy, sdxl_files, anima_files) -> dict[str, WrittenAdapter]:
    """The adapter files the load and merge templates read, written into the server's models/loras."""
    loras = comfy.models_dir("loras")
    sdxl_modules = attention_layers(sdxl_files.unet_layers, 5)
    anima_modules = attention_layers(anima_files.unet_layers, 4)
    return {
        "sdxl_lokr": write_adapter(loras, "hadakron_test_sdxl_lokr.safetensors", sdxl_files.unet_layers,
                                   sdxl_modules[:3], "lokr_lowrank", seed=1),
        "sdxl_loha": write_adapter(loras, "hadakron_test_sdxl_loha.safetensors", sdxl_files.unet_layers,
                                   sdxl_modules[2:], "loha", seed=2),
        "anima_lokr": write_adapter(loras, "hadakron_test_anima_lokr.safetensors", anima_files.unet_layers,
                                    anima_modules, "lokr_full", seed=3),
    }


@pytest.fixture(scope="module")
def file_names(sdxl_files, anima_files, input_image, adapter_files) -> dict[str, dict[str, str]]:
    """{family: {input name: test file name}} for the templates' placeholder file names."""
    lokr, loha = adapter_files["sdxl_lokr"].name, adapter_files["sdxl_loha"].name
    sdxl = {"ckpt_name": sdxl_files.checkpoint, "image": input_image, "lora_name": lokr, "adapter_1": lokr,
            "adapter_2": loha}
    anima = {"unet_name": anima_files.unet, "clip_name": anima_files.text_encoder, "vae_name": anima_files.vae,
             "image": input_image, "lora_name": adapter_files["anima_lokr"].name}
    return {"sdxl": sdxl, "anima": anima}

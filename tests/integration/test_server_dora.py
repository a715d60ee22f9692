"""DoRA training through a real ComfyUI server (POST /prompt): the compact LoKr Trainer with a Network Options node
set to dora_wd, 2 steps on the small SDXL checkpoint, saved; the next prompt loads each file with HadakronLoader and
with core LoraLoaderModelOnly and samples.

Per input column (wd_on_output off) ComfyUI's weight_decompose and ours compute the same W_d, so the two loaders'
latents agree. Per output row (LyCORIS' default) ComfyUI divides by ||W|| where LyCORIS and we take ||W + dW||
(tests/test_train_dora.py checks that factor exactly), so there only our loader is held to the trainer's output
and the core gap is printed.
"""
from __future__ import annotations

import json

import pytest

from comfy_client import Graph
from test_server_trainer import (OPTION_NODES, TRAINER_CLASS, place_in_loras, relative_change, sample,
                                 saved_adapter_path, saved_latent, sdxl_data, trainer_inputs)

LAYOUTS = {"rows": True, "cols": False}


def dora_trainer(g: Graph, model, latents, positive, **network_extra):
    """The compact LoKr Trainer (2 steps) with its option nodes; `network_extra` goes onto the Network Options node."""
    settings = dict(trainer_inputs("lokr", steps=2), te_learning_rate=0.0)
    data = dict(model=model, latents=latents, positive=positive)
    for socket, (node, names) in OPTION_NODES.items():
        values = {name: settings.pop(name) for name in names}
        if socket == "network_options":
            values.update(network_extra)
        data[socket] = g.node(node, **values)
    return g.node(TRAINER_CLASS["lokr"], **data, **settings)


@pytest.fixture(scope="module")
def dora_trained(comfy, sdxl_files, input_image):
    g = Graph()
    ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)
    out = {}
    for tag, on_output in LAYOUTS.items():
        t = dora_trainer(g, ckpt[0], latent[0], positive[0], dora_wd=True, wd_on_output=on_output)
        out[tag] = {"save": g.node("HadakronSaveAdapter", adapter=t[0], filename_prefix=f"server/dora_{tag}").id,
                    "sample": sample(g, t[1], positive[0], latent[0], ckpt[2], f"dora_{tag}_trained")}
    base = sample(g, ckpt[0], positive[0], latent[0], ckpt[2], "dora_base")
    run = comfy.run(g, timeout=1800)
    print(f"dora train prompt: {run.seconds:.1f} s")
    return {"run": run, "runs": out, "base": base}


def test_dora_files_hold_dora_scale_and_load_alike(comfy, sdxl_files, input_image, dora_trained):
    from safetensors import safe_open
    first = dora_trained["run"]
    names = {}
    for tag, on_output in LAYOUTS.items():
        path = saved_adapter_path(comfy, first, dora_trained["runs"][tag]["save"])
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata()
            dora = [k for k in keys if k.endswith(".dora_scale")]
            modules = {k.rsplit(".", 1)[0] for k in keys}
            assert dora and len(dora) == len(modules), (len(dora), len(modules))
            shape = f.get_slice(dora[0]).get_shape()
            assert (shape[0] > 1 and all(s == 1 for s in shape[1:])) if on_output else shape[0] == 1, shape
        args = json.loads(meta["ss_network_args"])
        assert str(args.get("dora_wd")).lower() == "true", args
        names[tag] = place_in_loras(comfy, path, f"server_dora_{tag}.safetensors")

    g2 = Graph()
    ckpt2, latent2, positive2 = sdxl_data(g2, sdxl_files, input_image)
    loaded = {}
    for tag, name in names.items():
        core = g2.node("LoraLoaderModelOnly", model=ckpt2[0], lora_name=name, strength_model=1.0)
        ours = g2.node("HadakronLoader", model=ckpt2[0], clip=ckpt2[1], lora_name=name, strength_model=1.0,
                       strength_clip=1.0)
        loaded[tag] = {"core": sample(g2, core[0], positive2[0], latent2[0], ckpt2[2], f"dora_{tag}_core"),
                       "ours": sample(g2, ours[0], positive2[0], latent2[0], ckpt2[2], f"dora_{tag}_ours"),
                       "report": ours.id}
    log_start = len(comfy.log.read_text(errors="replace"))
    run = comfy.run(g2, timeout=1800)
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert "lora key not loaded" not in log, log[-3000:]

    base = saved_latent(comfy, first, dora_trained["base"]["latent"])
    for tag in LAYOUTS:
        core = saved_latent(comfy, run, loaded[tag]["core"]["latent"])
        ours = saved_latent(comfy, run, loaded[tag]["ours"]["latent"])
        trained = saved_latent(comfy, first, dora_trained["runs"][tag]["sample"]["latent"])
        change, gap, gap_trained = (relative_change(ours, base), relative_change(core, ours),
                                    relative_change(trained, ours))
        print(f"dora {tag}: change vs base {change:.4g}; core vs ours {gap:.3g}; trainer output vs ours "
              f"{gap_trained:.3g}")
        assert change > 1e-4
        assert gap_trained < 1e-4, gap_trained
        if tag == "cols":
            assert gap < 1e-4, gap
        report = json.loads(run.outputs[loaded[tag]["report"]]["hadakron_report"][0])
        assert report["matched_count"] > 100 and report["unmatched_count"] == 0, report

"""Every example workflow runs in the real server: each file in example_workflows/ is converted from its UI format
with workflow_api.py (from /object_info), given the test model files and CPU-sized settings, POSTed to /prompt,
and what it made is checked: images (not constant, no NaN cast warning), the load report, the trainer's loss
events and saved adapter, the merged checkpoint's weights against float64 delta-W, the combined adapter file.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from example_workflow_runs import (TRAIN_STEPS, TRAINER_TYPES, adapter_files, family_of, file_names, image_array,  # noqa: F401
                                   load_report, prompt_for_test_run, workflow_params)
from workflow_api import first_of

NAN_CAST_WARNING = "invalid value encountered"


@pytest.fixture(scope="module")
def object_info(comfy, file_names):
    return comfy.object_info()  # after the files are in place, so the combo lists hold them


def _run(comfy, prompt):
    log_start = len(comfy.log.read_text(errors="replace"))
    run = comfy.run(prompt, timeout=900)
    return run, comfy.log.read_text(errors="replace")[log_start:]


def _check_image(comfy, run, node: str, log: str) -> None:
    (item,) = run.outputs[node]["images"]
    image = image_array(comfy, item)
    assert image.shape == (64, 64, 3), image.shape
    assert image.std() > 0.5, f"node {node}: the decoded image is constant"
    assert NAN_CAST_WARNING not in log, "NaN/inf reached the image's uint8 cast"


def _new_file(folder: Path, pattern: str, since: float) -> Path:
    found = [p for p in folder.glob(pattern) if p.stat().st_mtime >= since]
    assert len(found) == 1, f"expected one new {folder}/{pattern}, found {found}"
    return found[0]


def check_load(comfy, prompt, run, log, adapter) -> None:
    loader = first_of(prompt, ["HadakronLoader"])
    report = load_report(run.outputs[loader])
    assert report["matched_count"] == len(adapter.deltas) and report["unmatched_count"] == 0, report
    _check_image(comfy, run, first_of(prompt, ["SaveImage"]), log)


def check_train(comfy, prompt, run, log, since: float) -> None:
    trainer = first_of(prompt, list(TRAINER_TYPES))
    assert prompt[trainer]["class_type"] == "HadakronTrainLoKr", "the train templates use the compact trainer"
    events = [e for e in run.events_of("hadakron.loss") if str(e["node"]) == trainer]
    assert [e["step"] for e in events] == list(range(1, TRAIN_STEPS + 1)), events
    assert all(e["total"] == TRAIN_STEPS and math.isfinite(e["loss"]) and e["loss"] > 0 for e in events), events
    curve = json.loads(run.outputs[trainer]["hadakron_loss"][0])
    assert len(curve["loss"]) == TRAIN_STEPS and all(math.isfinite(x) for x in curve["loss"]), curve
    save = prompt[first_of(prompt, ["HadakronSaveAdapter"])]["inputs"]["filename_prefix"]
    path = _new_file(comfy.output_dir / "loras", f"{save}_*.safetensors", since)
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    assert any(k.endswith(".lokr_w1") or ".lokr_w1_" in k for k in tensors), sorted(tensors)[:10]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    _check_image(comfy, run, first_of(prompt, ["PreviewImage", "SaveImage"]), log)


def check_merge(comfy, prompt, run, sdxl_files, adapters, since: float) -> None:
    from safetensors import safe_open
    merge = prompt[first_of(prompt, ["HadakronAdapterMerge"])]["inputs"]
    lokr, loha = adapters["sdxl_lokr"], adapters["sdxl_loha"]
    strengths = {lokr.name: merge["strength_1"], loha.name: merge["strength_2"]}
    assert {merge["adapter_1"], merge["adapter_2"]} == set(strengths) and merge["adapter_3"] == "None"
    prefix = prompt[first_of(prompt, ["CheckpointSave"])]["inputs"]["filename_prefix"]
    ckpt = _new_file(comfy.output_dir, f"{prefix}_*.safetensors", since)
    modules = sorted(set(lokr.deltas) | set(loha.deltas))
    untouched = next(m for m in sorted(sdxl_files.unet_layers) if m not in modules and "attn1.to_" in m)
    with safe_open(str(ckpt), framework="pt") as f:
        for module in modules + [untouched]:
            merged = f.get_tensor(sdxl_files.unet_key(module)).to(torch.float64)
            base = sdxl_files.weights[sdxl_files.unet_key(module)].to(torch.float64)
            expected = sum(strengths[a.name] * a.deltas[module] for a in (lokr, loha) if module in a.deltas)
            torch.testing.assert_close(merged - base, torch.as_tensor(expected, dtype=torch.float64).expand_as(base),
                                       atol=2e-4, rtol=0, msg=lambda m: f"{module}: {m}")
    combine = prompt[first_of(prompt, ["HadakronAdapterCombine"])]["inputs"]
    combined = _new_file(comfy.output_dir, f"{combine['filename_prefix']}_*.safetensors", since)
    with safe_open(str(combined), framework="pt") as f:
        keys = list(f.keys())
    for module in modules:
        assert any(k.startswith("lora_unet_" + module.replace(".", "_") + ".") for k in keys), (module, keys[:8])


def _checks(stem: str):
    """The check for each template (a new template without one fails the test that lists them)."""
    return {"hadakron_load_lokr": "load", "hadakron_anima_load_lokr": "load", "hadakron_train_lokr": "train",
            "hadakron_anima_train_lokr": "train", "hadakron_merge_adapters": "merge"}.get(stem)


# CI runs these two here; the browser tests queue every other template in CI with the Run button.
CI_RUNS = {"hadakron_merge_adapters", "hadakron_anima_load_lokr"}


@pytest.mark.parametrize("path", workflow_params(CI_RUNS))
def test_example_workflow_runs(path, comfy, object_info, file_names, sdxl_files, adapter_files):
    kind = _checks(path.stem)
    assert kind, f"{path.name} has no run check in {__file__}"
    family = family_of(path)
    prompt = prompt_for_test_run(json.loads(path.read_text()), object_info, file_names[family])
    since = time.time() - 1
    run, log = _run(comfy, prompt)
    assert run.succeeded, run.status
    if kind == "load":
        check_load(comfy, prompt, run, log, adapter_files[f"{family}_lokr"])
    elif kind == "train":
        check_train(comfy, prompt, run, log, since)
    else:
        check_merge(comfy, prompt, run, sdxl_files, adapter_files, since)
    print(f"{path.stem}: {run.seconds:.1f} s")

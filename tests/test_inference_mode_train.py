"""The trainer nodes' library calls on what a ComfyUI prompt hands them: a model, a text encoder, latents and
conditioning that are all inference tensors (made under `torch.inference_mode()`).

The node enters `torch.inference_mode(False), torch.enable_grad()` itself, clones latents/conditioning with
`normal_copy`, builds the network, and trains inside `autograd_safe_weights(diffusion_model, *text_encoders)`.
The run must lower the loss while the base weights stay bit-identical, in the same memory, and are never copied;
the trained adapter then goes through the in-memory loader, Save Adapter and the file loader, and patches exactly.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from hadakron.arch import module_key
from hadakron.comfy_keys import layer_shapes
from hadakron.io import AdapterFile, build_metadata, write_adapter
from hadakron.io.module_checks import group_modules
from hadakron.load_report import build_load_report
from hadakron.network import AdapterNetwork, NetworkConfig
from hadakron.train import (
    DiffusionObjective, LatentDataset, ResumeState, TrainCallbacks, TrainConfig, read_training_state, train,
    write_training_state,
)
from hadakron.train.inference_tensors import autograd_safe_weights, normal_copy
from helpers import copy_watch, one_thread, read_adapter_in_inference_mode  # noqa: F401 (autouse fixture)
from integration.adapter_forms import reference_delta
from models import CLIPConfig, CLIPTextModel, SDXLUNet
from test_inference_mode_load import comfy_patch_

# one transformer block of the middle block (reads the context), the last ResBlock (next to the output) and the
# first CLIP layer: 10 + 4 + 6 adapters, seconds on a CPU
CONFIG = NetworkConfig(algo="lokr", network_dim=2, network_alpha=1.0, factor=4, conv_dim=2, conv_alpha=1.0,
                       exclude_patterns=[r"(?!middle_block\.1\.transformer_blocks\.0\.|output_blocks\.8\.0\."
                                         r"|text_model\.encoder\.layers\.0\.).*"])
STEPS = 6
# the last ResBlock only: the cheap network of the resume and inference-mode-caller runs
SMALL = NetworkConfig(algo="loha", network_dim=2, network_alpha=1.0, conv_dim=2, conv_alpha=1.0,
                      exclude_patterns=[r"(?!output_blocks\.8\.0\.).*"])


def comfy_prompt_inputs() -> dict:
    """Model, text encoder, LATENT, CONDITIONING and token ids as a ComfyUI prompt holds them: inference tensors."""
    torch.manual_seed(0)
    with torch.inference_mode():
        unet, te1 = SDXLUNet(), CLIPTextModel(CLIPConfig.large())
        unet.time_embed.register_buffer("inference_buffer", torch.arange(4.0))  # buffers get swapped too
        g = torch.Generator().manual_seed(1)
        latent = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
        positive = [[torch.randn(1, 5, 16, generator=g), {"pooled_output": torch.randn(1, 12, generator=g)}]]
        ids = torch.randint(0, 64, (1, 5), generator=g)
    return {"unet": unet, "te1": te1, "latent": latent, "positive": positive, "ids": ids}


def base_tensors(parts: dict) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the unet and the text encoder, by `part.name`."""
    return {f"{part}.{n}": t for part in ("unet", "te1")
            for n, t in [*parts[part].named_parameters(), *parts[part].named_buffers()]}


@contextlib.contextmanager
def trainer_node_context(node_context: bool = True):
    """ComfyUI's executor mode (`inference_mode()`, every node runs in it) and inside it the trainer node's own
    `inference_mode(False), enable_grad()`; without `node_context`, a caller that stays in the executor's mode."""
    with torch.inference_mode():
        if not node_context:
            with torch.no_grad():
                yield
            return
        with torch.inference_mode(False), torch.enable_grad():
            yield


class FixedNoiseObjective:
    """SDXL's epsilon objective drawing the same noise and timestep every step: on one sample the loss must fall."""

    def __init__(self) -> None:
        self.base = DiffusionObjective("epsilon")

    def sample(self, x0: torch.Tensor, generator: torch.Generator):
        return self.base.sample(x0, torch.Generator().manual_seed(0))

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.base.loss(pred, target, timestep)


@pytest.fixture(scope="module")
def trained() -> dict:
    """One trainer run the way nodes/trainer.py makes it, with what was observed during it."""
    parts = comfy_prompt_inputs()
    unet, te1, ids = parts["unet"], parts["te1"], parts["ids"]
    originals = base_tensors(parts)
    with torch.inference_mode():
        before = {n: t.clone() for n, t in originals.items()}
    pointers = {n: t.data_ptr() for n, t in originals.items()}
    storages = {t.untyped_storage().data_ptr() for t in originals.values()}
    during: list[tuple[dict[str, int], bool]] = []

    def model_call(noisy, timestep, batch):
        now = base_tensors(parts)
        during.append(({n: t.data_ptr() for n, t in now.items()}, any(t.is_inference() for t in now.values())))
        context = torch.cat([c[0] for c in batch.cond]) + te1(ids[list(batch.indices)])
        pooled = torch.cat([c[1]["pooled_output"] for c in batch.cond])
        return unet(noisy, timestep.float(), context, pooled)

    with trainer_node_context():
        unet.requires_grad_(False)
        te1.requires_grad_(False)
        samples = [s.float() for s in normal_copy(parts["latent"])["samples"]]
        conds = normal_copy(parts["positive"])
        net = AdapterNetwork.build("sdxl", {"unet": unet, "te1": te1}, CONFIG, seed=0)
        watch = copy_watch(storages)
        net.attach()  # nodes/trainer_runtime.py run_training: attach, then train inside autograd_safe_weights
        try:
            with watch, autograd_safe_weights(unet, te1) as swapped:
                result = train(net, model_call, LatentDataset(samples, conds), FixedNoiseObjective(),
                               TrainConfig(steps=STEPS, learning_rate=2e-2, seed=0))
        finally:
            net.detach()
        tensors = result.snapshot.adapter_tensors()
        metadata = build_metadata(algorithm="lokr", family="sdxl", network_dim=2, network_alpha=1.0, factor=4,
                                  module_ranks=net.module_ranks(), module_alphas=net.module_alphas(),
                                  training={"steps": result.step}, tensors=tensors)
        adapter = AdapterFile(path=None, tensors=tensors, metadata=metadata, modules=group_modules(tensors),
                              problems=[], training_state=result.snapshot.training_state())
    return {"parts": parts, "originals": originals, "before": before, "pointers": pointers, "during": during,
            "copies": watch.copies, "swapped": swapped, "result": result, "net": net, "adapter": adapter}


def test_loss_falls_and_every_adapter_trains(trained):
    result, net = trained["result"], trained["net"]
    assert result.stop_reason == "completed" and result.step == STEPS and len(result.losses) == STEPS
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(b < a for a, b in zip(result.losses, result.losses[1:])), result.losses  # same draw every step
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert net.counts() == {"unet": 14, "te1": 6}
    for key, adapter in net.modules_by_key.items():
        assert float(adapter.delta_weight().detach().abs().max()) > 0, f"{key} did not train"
        assert all(not p.is_inference() and p.requires_grad for p in adapter.parameters()), key


def test_base_weights_stay_bit_identical_in_the_same_memory_and_are_never_copied(trained):
    now = base_tensors(trained["parts"])
    assert trained["swapped"] == len(trained["originals"])  # every parameter and buffer was an inference tensor
    for name, original in trained["originals"].items():
        assert now[name] is original and now[name].is_inference(), f"{name}: original not restored"
        assert torch.equal(now[name], trained["before"][name]), f"{name} changed"
    assert len(trained["during"]) == STEPS
    for pointers, any_inference in trained["during"]:
        moved = [n for n, ptr in trained["pointers"].items() if pointers[n] != ptr]
        assert moved == []  # the model ran on the very same memory ...
        assert not any_inference  # ... through normal tensors that backward may save
    assert trained["copies"] == []  # no op copied a base weight (no clone, no cast, no copy_)


def test_copy_watch_sees_a_copy_of_a_base_weight():
    """The no-copy check above can fail: a clone or a dtype cast of a base weight is recorded, a view is not."""
    weight = comfy_prompt_inputs()["unet"].out[2].weight
    watch = copy_watch({weight.untyped_storage().data_ptr()})
    with watch:
        weight.view(-1).sum()
        weight.clone()
        weight.to(torch.float64)
    assert len(watch.copies) == 2 and "clone" in watch.copies[0]


def test_network_built_under_inference_mode_is_normal_and_seeded():
    """`AdapterNetwork.build` called inside inference mode gives normal trainable tensors, the same as outside."""
    parts = comfy_prompt_inputs()
    model = {"unet": parts["unet"], "te1": parts["te1"]}
    with torch.inference_mode():
        inside = AdapterNetwork.build("sdxl", model, CONFIG, seed=7)
    outside = AdapterNetwork.build("sdxl", model, CONFIG, seed=7)
    params = dict(inside.named_parameters())
    assert params and params.keys() == dict(outside.named_parameters()).keys()
    for name, p in outside.named_parameters():
        assert not params[name].is_inference() and params[name].requires_grad, name
        assert torch.equal(params[name], p), name


def test_normal_copy_clones_only_the_inference_tensors_of_a_conditioning():
    parts = comfy_prompt_inputs()
    plain = torch.arange(3.0)
    value = {"positive": parts["positive"], "extra": (plain, "caption", 3)}
    out = normal_copy(value)
    cross, pooled = out["positive"][0][0], out["positive"][0][1]["pooled_output"]
    assert isinstance(out["positive"], list) and isinstance(out["positive"][0], list)
    assert out["extra"][0] is plain and out["extra"][1:] == ("caption", 3)
    for got, src in ((cross, parts["positive"][0][0]), (pooled, parts["positive"][0][1]["pooled_output"])):
        assert not got.is_inference() and src.is_inference() and got.data_ptr() != src.data_ptr()
        assert torch.equal(got, src)
    # a normal copy can be saved for backward: d/dw sum(w * cross) = cross
    w = torch.zeros_like(cross, requires_grad=True)
    (w * cross).sum().backward()
    assert torch.equal(w.grad, cross)


def test_autograd_safe_weights_gives_backward_the_same_memory():
    parts = comfy_prompt_inputs()
    layer = parts["unet"].time_embed[0]
    weight = layer.weight
    x = torch.randn(2, weight.shape[1], dtype=torch.float32, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        layer(x).sum().backward()  # what the trainers met in ComfyUI
    with autograd_safe_weights(parts["unet"]):
        assert layer.weight is not weight and layer.weight.data_ptr() == weight.data_ptr()
        assert layer.weight.stride() == weight.stride() and not layer.weight.requires_grad
        layer(x).sum().backward()
    assert layer.weight is weight
    assert torch.allclose(x.grad.double(), weight.double().sum(0).expand(2, -1), atol=1e-6)


def small_run(parts: dict, steps: int, *, seed: int = 1, resume=None, callbacks=None, tensors=None,
              node_context: bool = True):
    """(network, result, modes seen by the model call): a LoHa on the last ResBlock of the prompt's unet, trained
    like the node does it (attached, inside `autograd_safe_weights`, normal copies of latent and conditioning),
    in the node's context or, without `node_context`, in the executor's inference mode with no_grad."""
    unet = parts["unet"]
    modes: list[tuple[bool, bool]] = []

    def model_call(noisy, timestep, batch):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        cross, extra = batch.cond[0]
        return unet(noisy, timestep.float(), cross, extra["pooled_output"])

    with trainer_node_context(node_context):
        net = AdapterNetwork.build("sdxl", {"unet": unet}, SMALL, seed=seed)
        if tensors is not None:
            net.load_file_state(tensors, strict=True)
        data = LatentDataset(list(normal_copy(parts["latent"])["samples"]), normal_copy(parts["positive"]))
        net.attach()
        try:
            with autograd_safe_weights(unet):
                result = train(net, model_call, data, FixedNoiseObjective(), callbacks=callbacks, resume=resume,
                               config=TrainConfig(steps=steps, learning_rate=2e-2, seed=3, optimizer="AdamW"))
        finally:
            net.detach()
    return net, result, modes


def test_resume_from_files_read_in_a_prompt_matches_the_uninterrupted_run(tmp_path):
    """Adapter file and training-state sidecar saved and read back under inference mode (optimizer state that
    is inference tensors must not be updated in place), then resumed: the same losses and weights as 4 steps."""
    _, full, _ = small_run(comfy_prompt_inputs(), 4)
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    _, part, _ = small_run(comfy_prompt_inputs(), 4, callbacks=TrainCallbacks(interrupt=stop_after_two))
    assert part.step == 2 and part.stop_reason == "interrupted"
    path = tmp_path / "run.safetensors"
    with trainer_node_context():  # the trainer's output (or autosave) is taken inside its own context
        tensors, state = part.snapshot.adapter_tensors(), part.snapshot.training_state()
    with torch.inference_mode():  # Save Adapter, then the next prompt reads both files
        write_adapter(path, tensors, {"hadakron.step": "2"})
        write_training_state(path.with_suffix(".trainstate"), *state)
        saved, saved_meta = read_training_state(path.with_suffix(".trainstate"))
    adapter = read_adapter_in_inference_mode(path)
    assert all(t.is_inference() for t in [*saved.values(), *adapter.tensors.values()])
    net, resumed, _ = small_run(comfy_prompt_inputs(), 4, seed=99, tensors=adapter.tensors,
                                resume=ResumeState(2, saved, saved_meta))
    assert resumed.step == 4 and resumed.losses == pytest.approx(full.losses[2:], rel=1e-6)
    full_params = dict(full.snapshot.network.named_parameters())
    for name, p in net.named_parameters():
        assert torch.allclose(p, full_params[name], rtol=1e-6, atol=1e-9), name


def test_train_called_inside_inference_mode_trains_normally():
    """`train` leaves inference mode and no_grad itself, so a caller still in a prompt's mode gets the real run."""
    net, result, modes = small_run(comfy_prompt_inputs(), 3, node_context=False)
    _, node_run, _ = small_run(comfy_prompt_inputs(), 3)  # the same run from the node's own context
    assert modes == [(False, True)] * 3  # the model ran outside inference mode, with autograd on
    assert result.losses == node_run.losses and result.losses[-1] < result.losses[0]
    assert all(not p.is_inference() and p.requires_grad for p in net.parameters())


# ---------------------------------------------------------------- the trained adapter, in memory and as a file


def comfy_shapes(parts: dict) -> dict[tuple[str, str], tuple[int, ...]]:
    """The loader's `(part, dotted) -> weight shape` for the model and the CLIP side (ComfyUI key prefixes)."""
    model = {f"diffusion_model.{k}": tuple(v.shape) for k, v in parts["unet"].state_dict().items()}
    clip = {f"clip_l.transformer.{k}": tuple(v.shape) for k, v in parts["te1"].state_dict().items()}
    return layer_shapes("sdxl", model, clip=False) | layer_shapes("sdxl", clip, clip=True)


def report_of(adapter: AdapterFile, parts: dict):
    """`build_load_report` as nodes/loader.py `apply_adapter` calls it for a model plus CLIP, in inference mode."""
    with torch.inference_mode():
        return build_load_report(adapter.modules, adapter.metadata, "sdxl", comfy_shapes(parts),
                                 loaded_parts=("unet", "te1"), source="trained", problems=list(adapter.problems),
                                 nonfinite=adapter.nonfinite_tensors())


def test_trained_adapter_saves_loads_and_patches_exactly(trained, tmp_path):
    parts, adapter, net = trained["parts"], trained["adapter"], trained["net"]
    in_memory = report_of(adapter, parts)  # the trainer's own apply_adapter on its output
    assert not in_memory.unmatched and len(in_memory.matched) == len(net.targets)
    path = tmp_path / "trained_00001_.safetensors"
    with torch.inference_mode():  # the Save Adapter node
        write_adapter(path, adapter.tensors, adapter.metadata, overwrite=False)
        write_training_state(path.with_suffix(".trainstate"), *adapter.training_state, overwrite=False)
    back = read_adapter_in_inference_mode(path)  # the loader, next prompt
    assert back.tensors.keys() == adapter.tensors.keys() and back.metadata == adapter.metadata
    for key, t in adapter.tensors.items():
        assert back.tensors[key].is_inference() and torch.equal(back.tensors[key], t), key
    state, state_meta = read_training_state(path.with_suffix(".trainstate"))
    assert state.keys() == adapter.training_state[0].keys() and state_meta == adapter.training_state[1]
    assert all(torch.equal(state[k], v) for k, v in adapter.training_state[0].items())
    report = report_of(back, parts)
    assert not report.unmatched and len(report.matched) == len(net.targets)
    targets = {t.key: t for t in net.targets}
    for m in report.matched:
        t = targets[m.module_key]
        want = reference_delta(m.params, m.shape)
        assert m.module_key == module_key("sdxl", t.part, t.dotted, "kohya")
        assert torch.allclose(t.adapter.delta_weight().detach().double().reshape(m.shape), want, atol=1e-6)
        with torch.inference_mode():  # ComfyUI's calculate_weight on a copy of the loaded model's weight
            weight = comfy_patch_(parts[t.part].get_submodule(t.name).weight.clone(), m.params, 1.0)
        ref = trained["before"][f"{t.part}.{t.name}.weight"].double() + want
        assert torch.allclose(weight.double(), ref, atol=1e-5), m.module_key

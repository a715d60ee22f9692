"""hadakron.train with AdapterNetwork on the small SDXL and Anima test models (real module names).

(Teacher/student convergence is tested on a smaller stand-in in test_train_loop.py: these models are
too slow on a shared CPU for the hundred-odd steps it needs.) Here: a run saved at step 2 through hadakron.io (adapter file + training-state sidecar), rebuilt from the file
  and resumed, ends exactly where the uninterrupted 4-step run ends.
"""
from __future__ import annotations

import pytest
import torch

from hadakron.io import build_metadata, read_adapter, write_adapter
from hadakron.network import AdapterNetwork, NetworkConfig
from hadakron.train import (
    DiffusionObjective,
    FlowMatchingObjective,
    LatentDataset,
    ResumeState,
    TrainCallbacks,
    TrainConfig,
    read_training_state,
    resume_step,
    sidecar_path,
    train,
    write_training_state,
)
from helpers import one_thread  # noqa: F401 (autouse fixture)
from models import AnimaDiT, SDXLUNet

SDXL_ONLY_MIDDLE = [r"(?!middle_block\.).*"]
ANIMA_FIRST_BLOCKS = [r"(?!blocks\.[01]\.).*"]


def sdxl_data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    conds = [(torch.randn(5, 16, generator=g), torch.randn(12, generator=g)) for _ in range(n)]
    return LatentDataset(latents, conds, collate=lambda cs: (torch.stack([c for c, _ in cs]), torch.stack([y for _, y in cs])))


def anima_data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 6, 20, generator=g)  # (tokens, patch features)
    conds = [torch.randn(5, 16, generator=g) for _ in range(n)]
    return LatentDataset(latents, conds)


def sdxl_call(unet):
    return lambda noisy, t, batch: unet(noisy, t.float(), batch.cond[0], batch.cond[1])


def anima_call(dit):
    """The test DiT maps 20 patch features to 16 outputs; pad to the input width so pred and target align."""
    return lambda noisy, t, batch: torch.nn.functional.pad(dit(noisy, t, batch.cond), (0, 4))


FAMILIES = {
    "sdxl": (SDXLUNet, sdxl_call, sdxl_data, lambda: DiffusionObjective("epsilon"),
             NetworkConfig(algo="lokr", network_dim=2, network_alpha=1.0, factor=4, use_scalar=True,
                           rank_dropout=0.1, exclude_patterns=SDXL_ONLY_MIDDLE)),
    "anima": (AnimaDiT, anima_call, anima_data, lambda: FlowMatchingObjective("logit_normal"),
              NetworkConfig(algo="loha", network_dim=2, network_alpha=1.0, module_dropout=0.2,
                            exclude_patterns=ANIMA_FIRST_BLOCKS)),
}


@pytest.mark.parametrize("family", ["sdxl", "anima"])
def test_resume_from_files_matches_uninterrupted_run(tmp_path, family):
    model_cls, call, data, objective, config = FAMILIES[family]
    train_cfg = dict(steps=4, batch_size=2, learning_rate=1e-2, seed=5, scheduler="cosine", warmup_steps=1,
                     max_grad_norm=1.0)

    def build(init_seed):
        torch.manual_seed(0)
        model = model_cls().requires_grad_(False)
        torch.manual_seed(init_seed)
        return model, AdapterNetwork.build(family, {"unet": model}, config).attach()

    unet, full_net = build(1)
    full = train(full_net, call(unet), data(), objective(), TrainConfig(**train_cfg))

    out = tmp_path / "loras" / "run.safetensors"

    def autosave(step, snap):
        tensors = snap.adapter_tensors()
        meta = build_metadata(algorithm=config.algo, family=family, network_dim=2, network_alpha=1.0, factor=4,
                              training={"steps": step}, tensors=tensors)
        meta["hadakron.step"] = str(step)
        write_adapter(out, tensors, meta)
        write_training_state(sidecar_path(out), *snap.training_state())

    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    unet2, part_net = build(1)
    part = train(part_net, call(unet2), data(), objective(), TrainConfig(**train_cfg),
                 TrainCallbacks(autosave=autosave, interrupt=stop_after_two))
    assert part.step == 2 and part.stop_reason == "interrupted"

    adapter = read_adapter(out)
    step = resume_step(adapter.metadata, source=str(out))
    assert step == 2
    unet3, resumed_net = build(99)  # other init: everything must come from the files
    resumed_net.load_file_state(adapter.tensors, strict=True)
    # the file alone gives the saved delta-W (scalar folded into the factors)
    for key, a in resumed_net.modules_by_key.items():
        assert torch.allclose(a.delta_weight(), part_net.modules_by_key[key].delta_weight(), atol=1e-7)
    tensors, meta = read_training_state(sidecar_path(out))
    resumed = train(resumed_net, call(unet3), data(), objective(), TrainConfig(**train_cfg),
                    resume=ResumeState(step, tensors, meta))
    assert resumed.step == 4
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6)
    for (name, a), (_, b) in zip(resumed_net.named_parameters(), full_net.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), name

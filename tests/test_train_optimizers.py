"""The optional optimizers for real: Prodigy, schedule-free AdamW and 8-bit AdamW (bitsandbytes) train a few steps of
a tiny attached network with a finite, falling loss, and their state saved by the resume path (sidecar written and
read back) continues bit for bit as the uninterrupted run. Each test skips, with the reason, when its package is
absent.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from hadakron.train import (
    DiffusionObjective, ResumeState, TrainCallbacks, TrainConfig, available_optimizers, read_training_state,
    sidecar_path, train, write_training_state,
)
from hadakron.train.optimizers import OPTIONAL_OPTIMIZERS, build_optimizer, is_schedule_free

from helpers import one_thread  # noqa: F401 (autouse fixture)
from test_train_loop import BypassNetwork, TinyDenoiser, call_of, dataset, make_lokr

OPTIONAL = sorted(OPTIONAL_OPTIMIZERS)
TOTAL, FIRST = 6, 3


def _needs(name: str) -> None:
    """Skip, naming the package, when the optimizer's package is not installed."""
    module = OPTIONAL_OPTIMIZERS[name]
    pytest.importorskip(module, reason=f"{name} needs the optional package {module!r} (pip install {module})")


def _lr(name: str) -> float:
    return 1.0 if name == "Prodigy" else 1e-2  # Prodigy finds its own step size; lr is a multiplier (1 as documented)


def _run(name: str, *, steps: int, callbacks=None, resume=None, before=None):
    torch.manual_seed(123)  # the same adapter init for every run
    model = TinyDenoiser()
    net = BypassNetwork(model, make_lokr)
    if before is not None:
        before(net)
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=_lr(name), optimizer=name, seed=1,
                         weight_decay=0.01)
    result = train(net, call_of(model), dataset(), DiffusionObjective("epsilon"), config, callbacks, resume=resume)
    return net, result


def _save(path, snap) -> None:
    """What the trainer node writes: the adapter file and its training-state sidecar."""
    from safetensors.torch import save_file

    save_file(snap.adapter_tensors(), str(path), metadata={"hadakron.step": str(snap.step)})
    tensors, meta = snap.training_state()
    write_training_state(sidecar_path(path), tensors, meta)


def _resume_from(path, name: str):
    """A fresh network (other init) loads the adapter file; the loop then loads the sidecar read from disk."""
    from safetensors.torch import load_file

    tensors, meta = read_training_state(sidecar_path(path))

    def load(net):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
        net.load_file_state(load_file(str(path)))
    return _run(name, steps=TOTAL, resume=ResumeState(int(meta["hadakron.step"]), tensors, meta), before=load)


def _assert_identical(a_net, b_net) -> None:
    for (name, a), b in zip(a_net.named_parameters(), b_net.parameters()):
        assert torch.equal(a, b), f"{name} differs after resume (max abs diff {float((a - b).abs().max()):.3g})"


@pytest.mark.parametrize("name", OPTIONAL)
def test_optional_optimizer_trains_a_few_steps(name):
    _needs(name)
    assert name in available_optimizers()
    net, result = _run(name, steps=TOTAL)
    assert result.stop_reason == "completed" and result.step == TOTAL
    assert len(result.losses) == TOTAL and all(math.isfinite(v) for v in result.losses)
    torch.manual_seed(123)
    fresh = BypassNetwork(TinyDenoiser(), make_lokr)
    moved = [not torch.equal(a, b) for a, b in zip(net.parameters(), fresh.parameters())]
    assert any(moved), f"{name}: no adapter parameter changed in {TOTAL} steps"
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("name", OPTIONAL)
def test_interrupted_run_resumes_bit_identically(name, tmp_path):
    _needs(name)
    full_net, full = _run(name, steps=TOTAL)
    path = tmp_path / "run.safetensors"
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        return calls["n"] > FIRST

    part_net, part = _run(name, steps=TOTAL, callbacks=TrainCallbacks(interrupt=interrupt,
                                                                     autosave=lambda step, snap: _save(path, snap)))
    assert part.stop_reason == "interrupted" and part.step == FIRST and part.losses == full.losses[:FIRST]
    resumed_net, resumed = _resume_from(path, name)
    assert resumed.step == TOTAL and resumed.losses == full.losses[FIRST:]
    _assert_identical(resumed_net, full_net)


@pytest.mark.parametrize("name", OPTIONAL)
def test_finished_run_resumes_bit_identically(name, tmp_path):
    """A run that completed its steps (schedule-free: optimizer left in eval mode) saves the state it continues from."""
    _needs(name)
    full_net, full = _run(name, steps=TOTAL)
    path = tmp_path / "done.safetensors"
    _, first = _run(name, steps=FIRST)
    assert first.stop_reason == "completed" and first.losses == full.losses[:FIRST]
    _save(path, first.snapshot)
    resumed_net, resumed = _resume_from(path, name)
    assert resumed.losses == full.losses[FIRST:]
    _assert_identical(resumed_net, full_net)


def test_autosave_leaves_the_run_unchanged(tmp_path):
    """Reading the adapter mid-run (schedule-free switches to its averaged weights for it) changes no later step."""
    _needs("AdamWScheduleFree")
    full_net, full = _run("AdamWScheduleFree", steps=TOTAL)
    saving_net, saving = _run("AdamWScheduleFree", steps=TOTAL, callbacks=TrainCallbacks(
        autosave=lambda step, snap: _save(tmp_path / f"s{step}.safetensors", snap)))
    assert saving.losses == full.losses
    _assert_identical(saving_net, full_net)


def test_schedule_free_adapter_is_the_averaged_weights():
    """The saved adapter holds schedule-free's x (eval mode), not the y the gradients were taken at."""
    _needs("AdamWScheduleFree")
    net, result = _run("AdamWScheduleFree", steps=FIRST)
    optimizer = result.snapshot.optimizer
    assert is_schedule_free(optimizer) and not optimizer.param_groups[0]["train_mode"]
    beta1 = optimizer.param_groups[0]["betas"][0]
    for p in net.parameters():
        z = optimizer.state[p]["z"]
        x = p.detach().clone()
        y = x.lerp(z, 1 - beta1)  # train mode's point from eval's
        assert not torch.equal(x, z) and not torch.equal(x, y)


def _steps(opt, params, grads) -> None:
    for grad in grads:
        for p, g in zip(params, grad):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_8bit_adamw_state_is_8bit_and_resumes_bit_identically(tmp_path):
    """Tensors of 4096+ elements get bitsandbytes' uint8 state (with its quantile maps); it survives the sidecar."""
    from hadakron.train import apply_training_state, training_state

    _needs("AdamW8bit")
    g = torch.Generator().manual_seed(0)
    start = {"big": torch.randn(64, 64, generator=g), "small": torch.randn(8, generator=g)}
    grads = [[torch.randn(64, 64, generator=g), torch.randn(8, generator=g)] for _ in range(4)]

    def fresh():
        params = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
        return params, build_optimizer("AdamW8bit", list(params.values()), lr=1e-2, weight_decay=0.01)

    full, full_opt = fresh()
    _steps(full_opt, list(full.values()), grads)
    part, part_opt = fresh()
    _steps(part_opt, list(part.values()), grads[:2])
    assert type(part_opt).__module__.split(".")[0] == "bitsandbytes"
    assert part_opt.state[part["big"]]["state1"].dtype == torch.uint8
    assert part_opt.state[part["big"]]["state2"].dtype == torch.uint8
    tensors, meta = training_state(part, part_opt, 2, optimizer_name="AdamW8bit")
    path = write_training_state(tmp_path / "opt.trainstate", tensors, meta)
    resumed, resumed_opt = fresh()
    assert apply_training_state(*read_training_state(path), resumed, resumed_opt) == 2
    _steps(resumed_opt, list(resumed.values()), grads[2:])
    for name in start:
        assert torch.equal(resumed[name], full[name]), name


@pytest.mark.parametrize("name", OPTIONAL)
def test_offered_only_when_importable(name):
    installed = importlib.util.find_spec(OPTIONAL_OPTIMIZERS[name]) is not None
    assert (name in available_optimizers()) == installed

"""hadakron.train.train on a tiny denoiser with real SDXL-style layer names.

Teacher = base model + a known LoKr/LoHa delta; the student (fresh adapters in bypass form) is
trained to the teacher's predictions and must approach the teacher's delta-W. Also: bypass vs
materialised training step for step, NaN stop with the last good state, exact resume, interrupt,
seeded reproducibility, clipping and mixed precision.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron.adapters import LoHa, LoKr
from hadakron.train import (
    DiffusionObjective,
    LatentDataset,
    ResumeState,
    Sample,
    TrainCallbacks,
    TrainConfig,
    apply_training_state,
    train,
)

from helpers import one_thread  # noqa: F401 (autouse fixture)

TARGETS = ("input_blocks.0.0", "input_blocks.1.1.proj_in", "input_blocks.1.1.proj_out", "out.2")


class TinyDenoiser(nn.Module):
    """conv_in -> time/cond-modulated tokens through two Linear -> conv_out (SDXL module names)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.input_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(4, 16, 3, padding=1)]),
            nn.ModuleList([nn.Identity(), nn.Module()]),
        ])
        block = self.input_blocks[1][1]
        block.proj_in = nn.Linear(16, 32)
        block.proj_out = nn.Linear(32, 16)
        self.time_embed = nn.Linear(8, 32)
        self.out = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.05))
        self.requires_grad_(False)

    def forward(self, x, t, cond):
        freqs = torch.arange(4, dtype=torch.float32) + 1
        tt = t.float().view(-1, 1) / 1000.0
        emb = self.time_embed(torch.cat([torch.sin(tt * freqs), torch.cos(tt * freqs)], dim=1))
        h = self.input_blocks[0][0](x)
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        block = self.input_blocks[1][1]
        z = F.silu(block.proj_in(tokens) + emb[:, None, :] + cond[:, None, :])
        tokens = tokens + block.proj_out(z)
        h = tokens.transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(h)


class BypassNetwork(nn.Module):
    """Adapters for named layers of a model, attached by wrapping each layer's forward (y = layer(x) + adapter(x))."""

    def __init__(self, model: nn.Module, make, *, materialise: bool = False) -> None:
        super().__init__()
        self.model = [model]
        self.names = list(TARGETS)
        layers = dict(model.named_modules())
        self.layers = [layers[n] for n in self.names]
        self.adapters = nn.ModuleList([make(layer) for layer in self.layers])
        self.materialise = materialise
        for layer, adapter in zip(self.layers, self.adapters):
            layer.forward = self._wrap(layer, adapter)

    def _wrap(self, layer, adapter):
        base_forward = type(layer).forward.__get__(layer)
        if not self.materialise:
            return lambda x: base_forward(x) + adapter(x)

        def forward(x):
            w = layer.weight + materialised_delta(adapter, tuple(layer.weight.shape))
            if isinstance(layer, nn.Linear):
                return F.linear(x, w, layer.bias)
            return F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
        return forward

    def file_state_dict(self):
        return {f"{n}.{k}": v for n, a in zip(self.names, self.adapters) for k, v in a.file_state_dict().items()}

    def load_file_state(self, tensors):
        with torch.no_grad():
            for n, a in zip(self.names, self.adapters):
                for k, p in a.factors().items():
                    p.copy_(tensors[f"{n}.{k}"])

    def delta_weights(self):
        return [a.delta_weight().detach().double() for a in self.adapters]


def materialised_delta(adapter, shape):
    """Plain delta-W with autograd, written from the factor definitions (kron / Hadamard), not from hadakron.ops."""
    p = adapter.factors()
    alpha = float(adapter.alpha)
    if "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        dw = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (alpha / rank)
        return dw.reshape(shape)
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2, scale = p["lokr_w2"], (1.0 if "lokr_w1" in p else alpha / p["lokr_w1_b"].shape[0])
    else:
        w2, scale = p["lokr_w2_a"] @ p["lokr_w2_b"], alpha / p["lokr_w2_b"].shape[0]
    if len(shape) == 4:
        w2 = w2.reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
        return torch.kron(w1[:, :, None, None], w2) * scale
    return torch.kron(w1, w2) * scale


def make_lokr(layer):
    return LoKr.for_layer(layer, rank=2, alpha=1.0, factor=4)


def make_loha(layer):
    return LoHa.for_layer(layer, rank=2, alpha=1.0)


def dataset(n: int = 8, seed: int = 5) -> LatentDataset:
    g = torch.Generator().manual_seed(seed)
    return LatentDataset(torch.randn(n, 4, 6, 6, generator=g), torch.randn(n, 32, generator=g) * 0.5)


def call_of(model):
    return lambda noisy, t, batch: model(noisy, t, batch.cond)


class DistillObjective:
    """Noise and timesteps from the SDXL eps objective; target = the teacher's prediction (distillation)."""

    def __init__(self, teacher) -> None:
        self.base = DiffusionObjective("epsilon")
        self.teacher = teacher
        self.cond = None

    def sample(self, x0, generator):
        noisy, t, _ = self.base.sample(x0, generator)
        with torch.no_grad():
            target = self.teacher(noisy, t, self.cond)
        return Sample(noisy, t, target)

    def loss(self, pred, target, t):
        return self.base.loss(pred, target, t)


class CondDataset(LatentDataset):
    """Hands each batch's conditioning to the distillation objective before it samples."""

    def __init__(self, objective, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective

    def draw(self, generator, batch_size):
        batch = super().draw(generator, batch_size)
        self.objective.cond = batch.cond
        return batch


def teacher_with_delta(make, seed: int):
    """Base model whose target weights carry a known random adapter delta (float64 reference kept)."""
    teacher = TinyDenoiser()
    layers = dict(teacher.named_modules())
    deltas = []
    g = torch.Generator().manual_seed(seed)
    for name in TARGETS:
        adapter = make(layers[name])
        with torch.no_grad():
            for p in adapter.factors().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            d = adapter.delta_weight().double()
            d = d * (0.3 * layers[name].weight.double().norm() / d.norm())  # sizeable, not dominant
        deltas.append(d)
        with torch.no_grad():
            layers[name].weight.add_(d.to(torch.float32))
    return teacher, deltas


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-30))


@pytest.mark.parametrize("make,max_mean_err,min_mean_cos", [(make_lokr, 0.5, 0.85), (make_loha, 0.85, 0.55)])
def test_student_learns_teacher_delta(make, max_mean_err, min_mean_cos):
    steps, lr = 150, 2e-2
    torch.manual_seed(0)
    teacher, deltas = teacher_with_delta(make, seed=11)
    student = TinyDenoiser()
    net = BypassNetwork(student, make)
    assert all(float(d.norm()) == 0.0 for d in net.delta_weights())
    objective = DistillObjective(teacher)
    data = CondDataset(objective, *dataset_tensors())
    config = TrainConfig(steps=steps, batch_size=4, learning_rate=lr, optimizer="AdamW", seed=3)
    result = train(net, call_of(student), data, objective, config)
    assert result.stop_reason == "completed" and result.step == steps
    first = sum(result.losses[:5]) / 5
    last = sum(result.losses[-5:]) / 5
    assert last < 0.1 * first, (first, last)
    learned = net.delta_weights()
    rel_err = [float((s - t).norm() / t.norm()) for s, t in zip(learned, deltas)]
    cos = [cosine(s, t) for s, t in zip(learned, deltas)]
    # the student started at dW = 0 (relative error 1, cosine undefined) and must move towards the teacher
    # (measured: LoKr mean error 0.36, mean cosine 0.92; LoHa 0.79 and 0.63: its Hadamard factors start at
    # dW = 0 and move slower; the later layers see a narrower input span, so less of their dW is identifiable)
    assert max(rel_err) < 0.98, rel_err
    assert sum(rel_err) / len(rel_err) < max_mean_err, rel_err
    assert sum(cos) / len(cos) > min_mean_cos, cos


def dataset_tensors(n: int = 8, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, 6, generator=g), torch.randn(n, 32, generator=g) * 0.5


def _run(make, *, materialise=False, steps=5, optimizer="AdamW", seed=1, callbacks=None, resume=None, init=None,
         model_call_wrap=None, **cfg):
    torch.manual_seed(123)  # same adapter init for every run
    model = TinyDenoiser()
    net = BypassNetwork(model, make, materialise=materialise)
    if init is not None:
        init(net)
    call = call_of(model)
    if model_call_wrap is not None:
        call = model_call_wrap(call)
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=cfg.pop("lr", 1e-2), optimizer=optimizer,
                         seed=seed, **cfg)
    result = train(net, call, dataset(), DiffusionObjective("epsilon"), config, callbacks, resume=resume)
    return net, result


def _nonzero_init(net):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for a in net.adapters:
            for p in a.factors().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("make", [make_lokr, make_loha])
def test_bypass_matches_materialised_step_for_step(make):
    by_net, by = _run(make, init=_nonzero_init, steps=6)
    mat_net, mat = _run(make, init=_nonzero_init, steps=6, materialise=True)
    for a, b in zip(by.losses, mat.losses):
        assert a == pytest.approx(b, rel=1e-4)
    for pa, pb in zip(by_net.parameters(), mat_net.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6)
    assert by.losses[0] != by.losses[-1]


def test_same_seed_reproduces_and_leaves_global_rng_alone():
    make = lambda layer: LoKr.for_layer(layer, rank=2, alpha=1.0, factor=4, rank_dropout=0.3, module_dropout=0.2)
    net1, r1 = _run(make, steps=4)
    net2, r2 = _run(make, steps=4)
    assert r1.losses == r2.losses
    for a, b in zip(net1.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    _, r3 = _run(make, steps=4, seed=2)
    assert r3.losses != r1.losses
    model = TinyDenoiser()
    net = BypassNetwork(model, make)
    before = torch.get_rng_state()
    train(net, call_of(model), dataset(), DiffusionObjective("epsilon"), TrainConfig(steps=2, batch_size=2))
    assert torch.equal(before, torch.get_rng_state())


def _nan_after(n_calls):
    def wrap(call):
        count = {"n": 0}

        def inner(noisy, t, batch):
            count["n"] += 1
            out = call(noisy, t, batch)
            return out * float("nan") if count["n"] > n_calls else out
        return inner
    return wrap


def test_nan_loss_stops_with_last_good_state():
    net_ref, ref = _run(make_lokr, init=_nonzero_init, steps=3)
    net, result = _run(make_lokr, init=_nonzero_init, steps=10, model_call_wrap=_nan_after(4))
    assert result.stop_reason == "non_finite_loss"
    assert "step 5/10" in result.message and "nan" in result.message and "step 3" in result.message
    assert result.step == 3 and len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    for a, b in zip(net.parameters(), net_ref.parameters()):
        assert torch.equal(a, b)
    # NaN at the very first step: nothing trained, adapters unchanged from their init
    net0, r0 = _run(make_lokr, init=_nonzero_init, steps=10, model_call_wrap=_nan_after(0))
    fresh, _ = _run(make_lokr, init=_nonzero_init, steps=1, lr=1e-30, optimizer="SGD")
    assert r0.step == 0 and r0.stop_reason == "non_finite_loss"
    for a, b in zip(net0.parameters(), fresh.parameters()):
        assert torch.allclose(a, b, atol=1e-25)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    from hadakron.train import read_training_state, resume_step, sidecar_path, write_training_state
    from safetensors.torch import load_file, save_file

    make = lambda layer: LoKr.for_layer(layer, rank=2, alpha=1.0, factor=4, rank_dropout=0.2)
    cfg = dict(steps=8, scheduler="cosine", warmup_steps=2, grad_accum_steps=2, max_grad_norm=1.0,
               weight_decay=0.01)
    full_net, full = _run(make, **cfg)

    saved = {}

    def autosave(step, snap):
        path = tmp_path / "run.safetensors"
        save_file(snap.adapter_tensors(), str(path), metadata={"hadakron.step": str(step), "ss_steps": str(step)})
        tensors, meta = snap.training_state()
        write_training_state(sidecar_path(path), tensors, meta)
        saved["path"] = path

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        return calls["n"] > 4  # stop before the 5th step

    part_net, part = _run(make, callbacks=TrainCallbacks(autosave=autosave, interrupt=interrupt), **cfg)
    assert part.stop_reason == "interrupted" and part.step == 4
    assert part.losses == full.losses[:4]
    path = saved["path"]
    assert sidecar_path(path).name == "run.trainstate"

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    step = resume_step(meta)
    tensors, state_meta = read_training_state(sidecar_path(path))

    def load(net):  # a freshly built network (other init) gets the file, then the sidecar
        _nonzero_init(net)
        net.load_file_state(load_file(str(path)))

    resumed_net, resumed = _run(make, init=load, resume=ResumeState(step, tensors, state_meta), **cfg)
    assert resumed.step == 8
    for a, b in zip(resumed.losses, full.losses[4:]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    for a, b in zip(resumed_net.parameters(), full_net.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    # the file alone (no sidecar) resumes the same delta-W
    file_only = BypassNetwork(TinyDenoiser(), make)
    file_only.load_file_state(load_file(str(path)))
    for a, b in zip(file_only.delta_weights(), part_net.delta_weights()):
        assert torch.allclose(a, b, atol=1e-7)


def test_training_state_rejects_other_network():
    net, result = _run(make_lokr, steps=1)
    tensors, meta = result.snapshot.training_state()
    other = BypassNetwork(TinyDenoiser(), lambda layer: LoKr.for_layer(layer, rank=3, alpha=1.0, factor=4))
    params = {n: p for n, p in other.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"has shape .* the network expects"):
        apply_training_state(tensors, meta, params, None)


def test_interrupt_exception_autosaves_then_propagates():
    class Interrupted(Exception):
        pass

    saves = []
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] > 3:
            raise Interrupted("user pressed cancel")

    with pytest.raises(Interrupted):
        _run(make_lokr, steps=10, callbacks=TrainCallbacks(
            interrupt=interrupt, autosave=lambda step, snap: saves.append((step, snap.adapter_tensors()))))
    assert [s for s, _ in saves] == [3]
    assert any(float(v.abs().sum()) > 0 for k, v in saves[0][1].items() if k.endswith("lokr_w2_b"))


def test_callbacks_progress_loss_autosave_and_lr_schedule():
    seen = {"progress": [], "loss": [], "save": []}
    cb = TrainCallbacks(
        progress=lambda s, n: seen["progress"].append((s, n)),
        loss=lambda s, loss, lr: seen["loss"].append((s, loss, lr)),
        autosave=lambda s, snap: seen["save"].append(s),
    )
    _, result = _run(make_lokr, steps=6, callbacks=cb, save_every=2, scheduler="linear", warmup_steps=2, lr=0.1)
    assert seen["progress"] == [(s, 6) for s in range(1, 7)]
    assert seen["save"] == [2, 4]
    expected_lr = [0.05, 0.1, 0.1, 0.075, 0.05, 0.025]
    assert [lr for _, _, lr in seen["loss"]] == pytest.approx(expected_lr)
    assert result.lrs == pytest.approx(expected_lr)


def test_gradient_clipping_bounds_the_update():
    net0, _ = _run(make_lokr, init=_nonzero_init, steps=1, lr=1e-30, optimizer="SGD")
    net1, _ = _run(make_lokr, init=_nonzero_init, steps=1, lr=1.0, optimizer="SGD", max_grad_norm=1e-3)
    update = torch.sqrt(sum(((a.detach().double() - b.detach().double()) ** 2).sum() for a, b in zip(net0.parameters(), net1.parameters())))
    assert float(update) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains(dtype):
    net, result = _run(make_lokr, init=_nonzero_init, steps=12, dtype=dtype, lr=1e-2)
    assert result.stop_reason == "completed"
    assert all(p.dtype == torch.float32 for p in net.parameters())
    _, fp32 = _run(make_lokr, init=_nonzero_init, steps=12, lr=1e-2)
    assert result.losses[0] == pytest.approx(fp32.losses[0], rel=0.05)
    assert sum(result.losses[-3:]) / 3 == pytest.approx(sum(fp32.losses[-3:]) / 3, rel=0.1)


def test_interrupt_raised_inside_a_step_autosaves_last_completed_step():
    """ComfyUI raises its interrupt from inside the model's ops: the step in flight is dropped, the last
    completed one is autosaved (once), then the exception propagates."""

    class Interrupted(Exception):
        pass

    def wrap(call):
        count = {"n": 0}

        def inner(noisy, t, batch):
            count["n"] += 1
            if count["n"] == 5:  # during the 5th step (one call per step)
                raise Interrupted("cancel")
            return call(noisy, t, batch)
        return inner

    saves = []
    with pytest.raises(Interrupted):
        _run(make_lokr, init=_nonzero_init, steps=10, model_call_wrap=wrap, save_every=4,
             callbacks=TrainCallbacks(interrupt_exceptions=(Interrupted,),
                                      autosave=lambda s, snap: saves.append((s, snap.adapter_tensors()))))
    assert [s for s, _ in saves] == [4]
    ref_net, _ = _run(make_lokr, init=_nonzero_init, steps=4)
    for key, value in ref_net.file_state_dict().items():
        assert torch.equal(saves[0][1][key], value)
    # other errors are not interrupts: no autosave
    saves.clear()
    with pytest.raises(Interrupted):
        _run(make_lokr, steps=10, model_call_wrap=wrap,
             callbacks=TrainCallbacks(autosave=lambda s, snap: saves.append(s)))
    assert saves == []

"""The training loop over an abstract model call: `train(network, model_call, batches, objective, config, callbacks)`.

- `network`: an nn.Module whose trainable parameters are the adapters (an `AdapterNetwork`, attached to
  the model in bypass form); `param_groups(unet_lr, te_lr, default_lr)` is used when it has one.
- `model_call(noisy, timestep, batch) -> prediction`: runs the (adapted) model on one batch.
- `batches`: a `BatchSource` (`draw(generator, batch_size) -> Batch`), e.g. `LatentDataset`.
- `objective`: `sample(x0, generator)` and `loss(pred, target, timestep)` (see objectives.py).
Randomness: every micro-step gets its own generator seeded from (seed, micro-step index), and the
global RNG (used by dropout) is re-seeded from it inside a fork, so a run resumed at step N draws
exactly what the uninterrupted run drew, and the caller's global RNG state is left as it was.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hadakron.train.data import Batch, BatchSource
from hadakron.train.optimizers import build_optimizer, canonical_optimizer_name, is_schedule_free
from hadakron.train.schedules import SCHEDULERS, lr_factor, set_learning_rates
from hadakron.train.state import apply_training_state, training_state

log = logging.getLogger("hadakron.train")

Tensor = torch.Tensor
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


@dataclass
class TrainConfig:
    """Settings of one run. `steps` counts optimizer updates (each of `grad_accum_steps` micro-batches)."""

    steps: int = 100
    batch_size: int = 1
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    te_lr: float | None = None
    optimizer: str = "AdamW"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int = 0
    grad_accum_steps: int = 1
    max_grad_norm: float = 0.0
    dtype: str = "fp32"
    seed: int = 0
    save_every: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the field for settings that cannot run."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1; got {self.grad_accum_steps}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}; got {self.scheduler!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {self.dtype!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.max_grad_norm < 0 or self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("max_grad_norm, save_every and warmup_steps must be >= 0")
        canonical_optimizer_name(self.optimizer)


@dataclass
class TrainCallbacks:
    """Optional hooks. `interrupt()` runs before every step: return True (or raise) to stop after an autosave.

    `interrupt_exceptions`: exception types that mean "the user stopped the run" when raised anywhere in a
    step (ComfyUI raises its interrupt inside every op): the last completed step is autosaved, then the
    exception propagates.
    """

    progress: Callable[[int, int], None] | None = None
    loss: Callable[[int, float, float], None] | None = None
    autosave: Callable[[int, "TrainSnapshot"], None] | None = None
    interrupt: Callable[[], bool | None] | None = None
    interrupt_exceptions: tuple[type[BaseException], ...] = ()


@dataclass
class ResumeState:
    """Where to continue: the step already done, and the sidecar's (tensors, metadata) when it was saved."""

    step: int
    training_tensors: dict[str, Tensor] | None = None
    training_metadata: dict[str, str] | None = None


class TrainSnapshot:
    """The run at a step, handed to `autosave` and returned in `TrainResult`; reads state lazily."""

    def __init__(self, step: int, network: torch.nn.Module, optimizer, optimizer_name: str, scaler, losses: list[float],
                 train_weights: list[Tensor] | None = None):
        self.step = step
        self.train_weights = train_weights  # schedule-free after the run: its exact train-mode weights
        self.network = network
        self.optimizer = optimizer
        self.optimizer_name = optimizer_name
        self.scaler = scaler
        self.losses = list(losses)

    def adapter_tensors(self, **kwargs: Any) -> dict[str, Tensor]:
        """The network's file tensors (`file_state_dict(**kwargs)`), detached."""
        with _schedule_free_eval(self.optimizer):
            return {k: v.detach().clone() for k, v in self.network.file_state_dict(**kwargs).items()}

    def training_state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, metadata) of the training-state sidecar at this step (exact params + optimizer; schedule-free:
        its train-mode weights, which the resumed run steps from)."""
        with _schedule_free_train(self.optimizer, self.train_weights):
            return training_state(
                trainable_parameters(self.network), self.optimizer, self.step,
                optimizer_name=self.optimizer_name, scaler=self.scaler,
            )


@dataclass
class TrainResult:
    """What a run did: steps done (total, resumed ones included), per-step loss and lr, and why it stopped."""

    step: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    stop_reason: str = "completed"  # "completed" | "interrupted" | "non_finite_loss"
    message: str = ""
    snapshot: TrainSnapshot | None = None


def trainable_parameters(network: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The network's parameters with requires_grad, by name (the keys of the training-state sidecar)."""
    return {n: p for n, p in network.named_parameters() if p.requires_grad}


def micro_step_seed(seed: int, micro_step: int) -> int:
    """Seed of one micro-step's generator: a fixed mix of the run seed and the global micro-step index."""
    return (int(seed) * 1_000_003 + (micro_step + 1) * _SEED_MIX) & _SEED_MASK


def _optimizer_params(optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _in_train_mode(optimizer) -> bool:
    return bool(optimizer.param_groups[0].get("train_mode", False))


def _put_weights(optimizer, weights: list[Tensor], train_mode: bool) -> None:
    """Copy `weights` into the optimizer's parameters and set its mode flag, without recomputing anything."""
    with torch.no_grad():
        for p, w in zip(_optimizer_params(optimizer), weights):
            p.copy_(w)
    for group in optimizer.param_groups:
        group["train_mode"] = train_mode


def _weights(optimizer) -> list[Tensor]:
    return [p.detach().clone() for p in _optimizer_params(optimizer)]


@contextlib.contextmanager
def _schedule_free_eval(optimizer):
    """Schedule-free optimizers hold the averaged weights (x) only in eval mode: switch for a read, then put the
    train-mode weights (y) back exactly (`.train()` would recompute y from x and z, off by a rounding, and the run
    would then differ from one that never read its adapter)."""
    if optimizer is None or not is_schedule_free(optimizer) or not _in_train_mode(optimizer):
        yield
        return
    kept = _weights(optimizer)
    optimizer.eval()
    try:
        yield
    finally:
        _put_weights(optimizer, kept, True)


@contextlib.contextmanager
def _schedule_free_train(optimizer, train_weights: list[Tensor] | None):
    """The inverse for a finished run (optimizer left in eval mode): its exact train-mode weights, kept when it
    switched, are in the parameters during the read, so the saved state continues exactly as the run would have."""
    if optimizer is None or train_weights is None or not is_schedule_free(optimizer) or _in_train_mode(optimizer):
        yield
        return
    kept = _weights(optimizer)
    _put_weights(optimizer, train_weights, True)
    try:
        yield
    finally:
        _put_weights(optimizer, kept, False)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Seed the global RNG (dropout uses it) for one micro-step inside a fork, restoring the caller's state after."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def _param_groups(network: torch.nn.Module, config: TrainConfig) -> list[dict]:
    if hasattr(network, "param_groups") and callable(network.param_groups):
        return network.param_groups(
            unet_lr=config.unet_lr if config.unet_lr is not None else config.learning_rate,
            te_lr=config.te_lr if config.te_lr is not None else config.learning_rate,
            default_lr=config.learning_rate,
        )
    return [{"params": list(trainable_parameters(network).values()), "lr": config.learning_rate}]


def _interrupted(callbacks: TrainCallbacks) -> tuple[bool, BaseException | None]:
    if callbacks.interrupt is None:
        return False, None
    try:
        return bool(callbacks.interrupt()), None
    except BaseException as exc:  # the host's interrupt exception: autosave first, then re-raise
        return True, exc


def train(
    network: torch.nn.Module,
    model_call: Callable[[Tensor, Tensor, Batch], Tensor],
    batches: BatchSource,
    objective: Any,
    config: TrainConfig,
    callbacks: TrainCallbacks | None = None,
    *,
    resume: ResumeState | None = None,
) -> TrainResult:
    """Train the network's adapter parameters for `config.steps` total steps (resumed steps included).

    Stops early on a non-finite loss (restoring the parameters of the last step whose loss was finite,
    with a message naming the step and value) or on an interrupt (autosave, then stop; an exception
    raised by `callbacks.interrupt` is re-raised after the autosave).
    Runs with autograd on and outside inference mode whatever the caller's mode (ComfyUI calls nodes under
    `torch.inference_mode()`); frozen base weights that are inference tensors need `autograd_safe_weights`.
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        with torch.inference_mode(False), torch.enable_grad():
            return train(network, model_call, batches, objective, config, callbacks, resume=resume)
    config.validate()
    callbacks = callbacks or TrainCallbacks()
    params = trainable_parameters(network)
    if not params:
        raise ValueError("the network has no trainable parameters")
    device = next(iter(params.values())).device
    optimizer_name = canonical_optimizer_name(config.optimizer)
    optimizer = build_optimizer(
        optimizer_name, _param_groups(network, config), lr=config.learning_rate,
        weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
        momentum=config.momentum, warmup_steps=config.warmup_steps,
    )
    schedule_free = is_schedule_free(optimizer)
    autocast_dtype = DTYPES[config.dtype]
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype is torch.float16 else None

    start = 0
    if resume is not None:
        start = int(resume.step)
        if resume.training_tensors is not None:
            saved = apply_training_state(
                resume.training_tensors, resume.training_metadata or {}, params, optimizer, scaler=scaler
            )
            if saved != start:
                raise ValueError(f"training state is from step {saved}, the adapter from step {start}")
    if start >= config.steps:
        raise ValueError(f"resume step {start} is not below the total steps {config.steps}; raise steps to continue")

    losses: list[float] = []
    lrs: list[float] = []
    stop_reason, message = "completed", ""
    done = start
    last_good: list[Tensor] | None = None
    plist = list(params.values())
    network.train(True)
    if schedule_free:
        optimizer.train()

    train_weights: list[Tensor] | None = None

    def snapshot(step: int) -> TrainSnapshot:
        return TrainSnapshot(step, network, optimizer, optimizer_name, scaler, losses, train_weights)

    saved_steps: set[int] = set()

    def autosave(step: int) -> None:
        if callbacks.autosave is not None and step > start and step not in saved_steps:
            saved_steps.add(step)
            callbacks.autosave(step, snapshot(step))

    try:
        for step in range(start, config.steps):
            stop, exc = _interrupted(callbacks)
            if stop:
                autosave(done)
                if exc is not None:
                    raise exc
                stop_reason, message = "interrupted", f"interrupted before step {step + 1}/{config.steps}; kept step {done}"
                break
            factor = 1.0 if schedule_free else lr_factor(step, config.steps, config.scheduler, config.warmup_steps)
            lr = set_learning_rates(optimizer, factor)[0]
            step_loss = 0.0
            bad: float | None = None
            for micro in range(config.grad_accum_steps):
                seed = micro_step_seed(config.seed, step * config.grad_accum_steps + micro)
                generator = torch.Generator(device="cpu").manual_seed(seed)
                with _seeded_global_rng(seed, device):
                    batch = batches.draw(generator, config.batch_size)
                    x0 = batch.x0.to(device)
                    noisy, timestep, target = objective.sample(x0, generator)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        pred = model_call(noisy, timestep, batch)
                    loss = objective.loss(pred.float(), target, timestep)
                value = float(loss.detach())
                if not math.isfinite(value):
                    bad = value
                    break
                scaled = loss / config.grad_accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += value / config.grad_accum_steps
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                if last_good is not None:
                    with torch.no_grad():
                        for p, good in zip(plist, last_good):
                            p.copy_(good)
                    done = step - 1
                stop_reason = "non_finite_loss"
                message = (
                    f"loss is {bad} at step {step + 1}/{config.steps}; training stopped and the adapter "
                    f"was restored to step {done}, the last step with a finite loss"
                )
                log.warning("hadakron.train: %s", message)
                break
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(plist, config.max_grad_norm)
            if last_good is None:
                last_good = [p.detach().clone() for p in plist]
            else:  # reuse the buffers: one copy per step, no allocation
                with torch.no_grad():
                    for good, p in zip(last_good, plist):
                        good.copy_(p)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            losses.append(step_loss)
            lrs.append(lr)
            if callbacks.loss is not None:
                callbacks.loss(done, step_loss, lr)
            if callbacks.progress is not None:
                callbacks.progress(done, config.steps)
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                autosave(done)
    except callbacks.interrupt_exceptions:
        optimizer.zero_grad(set_to_none=True)  # a step cut short: params are still those of step `done`
        autosave(done)
        raise
    finally:
        if schedule_free:
            train_weights = _weights(optimizer)
            optimizer.eval()
        network.train(False)
    return TrainResult(step=done, losses=losses, lrs=lrs, stop_reason=stop_reason, message=message, snapshot=snapshot(done))

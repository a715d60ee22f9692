"""Optimizer construction by name: torch's AdamW/Adam/SGD, plus Prodigy, schedule-free AdamW and 8-bit AdamW when
installed.

Prodigy (`prodigyopt`), schedule-free AdamW (`schedulefree`) and 8-bit AdamW (`bitsandbytes`, which steps on CPU
tensors too) are optional extras (`pip install hadakron[optimizers]`), offered only when importable and never
vendored. Schedule-free optimizers must be switched with `.train()` / `.eval()`;
`is_schedule_free` tells the loop to do so and to leave the lr schedule to the optimizer.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Iterable

import torch

BUILTIN_OPTIMIZERS = ("AdamW", "Adam", "SGD")
OPTIONAL_OPTIMIZERS = {"Prodigy": "prodigyopt", "AdamWScheduleFree": "schedulefree", "AdamW8bit": "bitsandbytes"}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_optimizers() -> list[str]:
    """Names accepted by `build_optimizer` on this install: the torch ones, then the optional ones found."""
    return list(BUILTIN_OPTIMIZERS) + [n for n, mod in OPTIONAL_OPTIMIZERS.items() if _importable(mod)]


def canonical_optimizer_name(name: str) -> str:
    """Case-insensitive lookup of an optimizer name; ValueError listing the choices when unknown or not installed."""
    choices = list(BUILTIN_OPTIMIZERS) + list(OPTIONAL_OPTIMIZERS)
    for choice in choices:
        if choice.lower() == str(name).lower():
            if choice in OPTIONAL_OPTIMIZERS and not _importable(OPTIONAL_OPTIMIZERS[choice]):
                raise ValueError(
                    f"optimizer {choice!r} needs the package {OPTIONAL_OPTIMIZERS[choice]!r}, which is not installed "
                    f"(pip install {OPTIONAL_OPTIMIZERS[choice]}); available: {available_optimizers()}"
                )
            return choice
    raise ValueError(f"unknown optimizer {name!r}; expected one of {choices}")


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for schedule-free optimizers, which need `.train()` before steps and `.eval()` before saving."""
    return type(optimizer).__module__.split(".")[0] == "schedulefree"


def build_optimizer(
    name: str,
    param_groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.0,
    warmup_steps: int = 0,
) -> torch.optim.Optimizer:
    """Build the named optimizer; groups keep their own `lr`, and each gets `initial_lr` for the lr schedule.

    `warmup_steps` is used only by schedule-free AdamW (which does its own warmup).
    """
    choice = canonical_optimizer_name(name)
    groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in param_groups]
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: every adapter parameter has requires_grad=False or none were given")
    if choice == "AdamW":
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif choice == "Adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif choice == "SGD":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif choice == "Prodigy":
        import prodigyopt

        opt = prodigyopt.Prodigy(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif choice == "AdamW8bit":
        import bitsandbytes

        opt = bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps
        )
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt

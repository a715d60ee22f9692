"""Learning-rate schedules and optimizer construction against the formulas written out here."""
import math

import pytest
import torch

from hadakron.train.optimizers import available_optimizers, build_optimizer, canonical_optimizer_name
from hadakron.train.schedules import lr_factor


def expected(kind: str, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / (total - warmup)
    return {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[kind]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_factor_matches_formula(kind, warmup):
    total = 12
    for step in range(total):
        assert lr_factor(step, total, kind, warmup) == pytest.approx(expected(kind, step, total, warmup), abs=1e-12)


def test_lr_factor_values():
    assert [lr_factor(s, 4, "linear", 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(0, 10, "cosine", 2) == 0.5 and lr_factor(1, 10, "cosine", 2) == 1.0
    assert lr_factor(6, 10, "cosine", 2) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        lr_factor(0, 10, "polynomial")


def test_optimizer_names_and_settings():
    names = available_optimizers()
    assert names[:3] == ["AdamW", "Adam", "SGD"]
    assert canonical_optimizer_name("adamw") == "AdamW"
    with pytest.raises(ValueError, match="unknown optimizer"):
        canonical_optimizer_name("Lion")
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("AdamW", [{"params": [p], "lr": 1e-3}, {"params": [q], "lr": 5e-4}],
                          lr=1e-4, weight_decay=0.1, betas=(0.8, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1
    sgd = build_optimizer("SGD", [p], lr=0.1, momentum=0.9)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.1
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("Adam", [frozen], lr=1e-3)


def test_optional_optimizers_only_when_importable():
    import importlib.util

    for name, module in (("Prodigy", "prodigyopt"), ("AdamWScheduleFree", "schedulefree")):
        installed = importlib.util.find_spec(module) is not None
        assert (name in available_optimizers()) == installed
        if not installed:
            with pytest.raises(ValueError, match="not installed"):
                canonical_optimizer_name(name)

"""Objective Options (sd-scripts' objective and noise options) through a real ComfyUI server (POST /prompt): SDXL and
Anima trainers fed by core loader / encode nodes, trained a few steps with non-default objectives; the saved
adapters carry the options as sd-scripts' metadata keys; options of the other family are refused by name before
a step is trained.

What is checked of the objective itself: the losses are finite and differ from a same-seed run without the
option node (same draws of u and noise, so only the objective changes them); the formulas are checked against
float64 references in tests/test_train_objectives_sdscripts.py.
"""
from __future__ import annotations

import math
import re

import pytest

from comfy_client import Graph
from test_server_trainer import anima_data, loss_curve, saved_adapter_path, sdxl_data, train_node

STEPS = 3
# every setting of the Objective Options node at its default, written here (not read from the pack): a setting
# renamed, moved or dropped fails the prompt's validation
OBJECTIVE_DEFAULTS = dict(
    v_parameterization=False, min_snr_gamma=0.0, scale_v_pred_loss_like_noise_pred=False,
    debiased_estimation_loss=False, noise_offset=0.0, adaptive_noise_scale=0.0, multires_noise_iterations=0,
    multires_noise_discount=0.3, zero_terminal_snr=False, ip_noise_gamma=0.0, loss_type="l2", huber_schedule="snr",
    huber_c=0.1, timestep_sampling="model", discrete_flow_shift=1.0, sigmoid_scale=1.0, weighting_scheme="uniform",
    logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
)


def objective_trainer(g: Graph, model, latents, positive, objective: dict | None, **over):
    """A compact LoKr trainer (test_server_trainer.train_node: the three option nodes) with, when `objective` is
    given, an Objective Options node at OBJECTIVE_DEFAULTS updated by it."""
    trainer = train_node(g, "lokr", model, latents, positive, steps=STEPS, **over)
    if objective is not None:
        options = g.node("HadakronObjectiveOptions", **dict(OBJECTIVE_DEFAULTS, **objective))
        trainer.set(objective_options=options[0])
    return trainer


def saved_metadata(comfy, run, save_node, hadakron_lib) -> dict[str, str]:
    adapter = hadakron_lib.io.read_adapter(saved_adapter_path(comfy, run, save_node))
    assert not adapter.problems, adapter.problems
    return adapter.metadata


@pytest.fixture(scope="module")
def hadakron_lib(pack):
    import hadakron.io
    return hadakron


def assert_changed_finite(objective: list[float], plain: list[float]) -> None:
    assert len(objective) == len(plain) == STEPS and all(math.isfinite(x) for x in objective + plain)
    assert all(a != b for a, b in zip(objective, plain)), (objective, plain)


SDXL_EPS = dict(min_snr_gamma=5.0, loss_type="huber", huber_schedule="snr", noise_offset=0.05, ip_noise_gamma=0.1)
SDXL_V = dict(v_parameterization=True, zero_terminal_snr=True, scale_v_pred_loss_like_noise_pred=True,
              debiased_estimation_loss=True, multires_noise_iterations=4, loss_type="smooth_l1",
              huber_schedule="exponential", huber_c=0.2)


def test_sdxl_objectives_train_and_are_saved(comfy, sdxl_files, input_image, hadakron_lib):
    """One prompt on the SDXL checkpoint: epsilon with min-SNR 5 + Huber (snr schedule) + noise offset + input
    perturbation; v-prediction with zero terminal SNR (core ModelSamplingDiscrete, v_prediction, zsnr) with the
    v-pred loss scaling, debiased estimation, multires noise and smooth L1 (exponential schedule); each beside a
    same-seed trainer without the option node. The saved files carry the options as sd-scripts' ss_* keys."""
    g = Graph()
    ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)
    vpred = g.node("ModelSamplingDiscrete", model=ckpt[0], sampling="v_prediction", zsnr=True)
    trainers = {
        "eps": objective_trainer(g, ckpt[0], latent[0], positive[0], SDXL_EPS),
        "eps_plain": objective_trainer(g, ckpt[0], latent[0], positive[0], None),
        "v": objective_trainer(g, vpred[0], latent[0], positive[0], SDXL_V),
        "v_plain": objective_trainer(g, vpred[0], latent[0], positive[0], None),
    }
    saves = {k: g.node("HadakronSaveAdapter", adapter=t[0], filename_prefix=f"server/objective_sdxl_{k}").id
             for k, t in trainers.items()}
    run = comfy.run(g, timeout=1800)
    print(f"sdxl objectives prompt: {run.seconds:.1f} s")
    curves = {k: loss_curve(run, t.id)["loss"] for k, t in trainers.items()}
    print("losses", {k: [round(x, 5) for x in c] for k, c in curves.items()})
    assert_changed_finite(curves["eps"], curves["eps_plain"])
    assert_changed_finite(curves["v"], curves["v_plain"])

    meta = {k: saved_metadata(comfy, run, node, hadakron_lib) for k, node in saves.items()}
    expected_eps = {"ss_min_snr_gamma": "5.0", "ss_loss_type": "huber", "ss_huber_schedule": "snr",
                    "ss_huber_c": "0.1", "ss_noise_offset": "0.05", "ss_adaptive_noise_scale": "None",
                    "ss_ip_noise_gamma": "0.1", "ss_multires_noise_iterations": "None",
                    "ss_v_parameterization": "False", "ss_zero_terminal_snr": "False",
                    "ss_debiased_estimation": "False", "ss_scale_v_pred_loss_like_noise_pred": "False"}
    expected_v = {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True",
                  "ss_scale_v_pred_loss_like_noise_pred": "True", "ss_debiased_estimation": "True",
                  "ss_multires_noise_iterations": "4", "ss_multires_noise_discount": "0.3",
                  "ss_loss_type": "smooth_l1", "ss_huber_schedule": "exponential", "ss_huber_c": "0.2",
                  "ss_min_snr_gamma": "None", "ss_noise_offset": "None"}
    assert {k: meta["eps"].get(k) for k in expected_eps} == expected_eps
    assert {k: meta["v"].get(k) for k in expected_v} == expected_v
    # no option node: the defaults are written, and the model's own prediction / schedule
    assert meta["eps_plain"]["ss_min_snr_gamma"] == "None" and meta["eps_plain"]["ss_loss_type"] == "l2"
    assert meta["v_plain"]["ss_v_parameterization"] == "True" and meta["v_plain"]["ss_zero_terminal_snr"] == "True"
    assert not any(k in meta["eps"] for k in ("ss_timestep_sampling", "ss_discrete_flow_shift"))


ANIMA = dict(timestep_sampling="sigma", discrete_flow_shift=3.0, weighting_scheme="logit_normal", logit_mean=0.5,
             loss_type="huber", huber_schedule="constant", ip_noise_gamma=0.05)


def test_anima_objective_trains_and_is_saved(comfy, anima_files, input_image, hadakron_lib):
    """One prompt on Anima (UNETLoader + CLIPLoader + VAELoader): sd-scripts' sigma timestep sampling with
    discrete_flow_shift 3 and the logit-normal density, Huber loss (constant c) and input perturbation, beside a
    same-seed trainer without the option node; the metadata has sd-scripts' Anima keys."""
    g = Graph()
    unet, _, _, latent, positive = anima_data(g, anima_files, input_image)
    trainers = {"anima": objective_trainer(g, unet[0], latent[0], positive[0], ANIMA),
                "plain": objective_trainer(g, unet[0], latent[0], positive[0], None)}
    saves = {k: g.node("HadakronSaveAdapter", adapter=t[0], filename_prefix=f"server/objective_{k}").id
             for k, t in trainers.items()}
    run = comfy.run(g, timeout=1800)
    print(f"anima objective prompt: {run.seconds:.1f} s")
    curves = {k: loss_curve(run, t.id)["loss"] for k, t in trainers.items()}
    print("losses", {k: [round(x, 5) for x in c] for k, c in curves.items()})
    assert_changed_finite(curves["anima"], curves["plain"])
    meta = {k: saved_metadata(comfy, run, node, hadakron_lib) for k, node in saves.items()}
    expected = {"ss_timestep_sampling": "sigma", "ss_discrete_flow_shift": "3.0", "ss_weighting_scheme": "logit_normal",
                "ss_logit_mean": "0.5", "ss_logit_std": "1.0", "ss_mode_scale": "1.29", "ss_sigmoid_scale": "1.0",
                "ss_loss_type": "huber", "ss_huber_schedule": "constant", "ss_huber_c": "0.1",
                "ss_ip_noise_gamma": "0.05"}
    assert {k: meta["anima"].get(k) for k in expected} == expected
    # no option node: the model's own sampling, and its own shift (3)
    assert meta["plain"]["ss_timestep_sampling"] == "model" and meta["plain"]["ss_discrete_flow_shift"] == "3.0"
    assert not any(k in meta["anima"] for k in ("ss_min_snr_gamma", "ss_noise_offset", "ss_v_parameterization"))


def test_options_of_the_other_family_refused(comfy, sdxl_files, anima_files, input_image):
    """An Anima option on SDXL, an SDXL option on Anima: the prompt fails at the trainer with one message naming
    the option, before any step is trained (no progress event of the trainer)."""
    cases = (("sdxl", dict(timestep_sampling="shift"), r"\['timestep_sampling'\] are Anima options.*SDXL model"),
             ("anima", dict(min_snr_gamma=5.0), r"\['min_snr_gamma'\] are SDXL options.*Anima model"))
    for family, objective, message in cases:
        g = Graph()
        if family == "sdxl":
            ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)
            model = ckpt[0]
        else:
            unet, _, _, latent, positive = anima_data(g, anima_files, input_image)
            model = unet[0]
        trainer = objective_trainer(g, model, latent[0], positive[0], objective)
        run = comfy.run(g, timeout=600, expect_error=True)
        assert run.error["node_id"] == trainer.id, run.error
        text = run.error["exception_message"]
        print(f"{family}: {text!r}")
        assert re.search(message, text), text
        assert not [d for d in run.events_of("progress") if str(d.get("node")) == trainer.id]

"""LoKr Trainer / LoHa Trainer nodes: train an adapter inside the graph with hadakron.train.

Adapters run in bypass form beside the model's own layers (base weights never written); noise, sigmas and
targets come from the model's `model_sampling`; the loss is MSE on the model's own prediction (eps, v or
flow velocity). Progress, interrupt and the live loss go to ComfyUI every step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from hadakron.io import AdapterFile, read_adapter
from hadakron.io.module_checks import group_modules
from hadakron.network import AdapterNetwork, NetworkConfig
from hadakron.train import (
    normal_copy,
    ResumeState,
    TrainCallbacks,
    TrainConfig,
    read_training_state,
    resume_step,
    sidecar_path,
)
from hadakron.train.metadata import LATENT_SCALE, RunFacts, training_metadata
from hadakron.train.resume import check_resume_config

from .loader import apply_adapter, model_family
from .objective_specs import objective_options
from .save_adapter import (ADAPTER_TYPE, CATEGORY, AdapterSaveError, checked_output_base, loras_output_dir,
                           save_adapter)
from .trainer_options import (NONE, OPTION_GROUPS, canonical_none, compact_trainer_settings, legacy_setting_specs,
                              merged_settings, setting_specs, text_encoder_specs)
from .trainer_inputs import training_samples
from .trainer_runtime import (autograd_safe_text_encoders, checkpoint_blocks, objective_facts, objective_for,
                             objective_metadata_of, run_training)

log = logging.getLogger("hadakron")
LOSS_EVENT = "hadakron.loss"


def _first(value):
    """Inputs arrive as lists (INPUT_IS_LIST); scalars are their first element."""
    return value[0] if isinstance(value, list) else value


def _send_loss(node_id, step: int, total: int, loss: float, lr: float) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(LOSS_EVENT, {"node": node_id, "step": step, "total": total, "loss": loss, "lr": lr})


def _network_config(algo: str, kw: dict) -> NetworkConfig:
    return NetworkConfig(
        algo=algo, network_dim=kw["network_dim"], network_alpha=kw["network_alpha"],
        conv_dim=kw["conv_dim"] or None, conv_alpha=kw["conv_alpha"] if kw["conv_dim"] else None,
        factor=kw.get("factor", -1), decompose_both=kw.get("decompose_both", False),
        use_tucker=kw["use_tucker"], use_scalar=kw["use_scalar"], rank_dropout=kw["rank_dropout"],
        module_dropout=kw["module_dropout"], exclude_patterns=kw["exclude_patterns"],
        include_patterns=kw["include_patterns"], network_reg_dims=kw["network_reg_dims"],
        network_reg_lrs=kw["network_reg_lrs"], train_llm_adapter=kw["train_llm_adapter"],
        loraplus_lr_ratio=kw["loraplus_lr_ratio"] or None, dora_wd=kw.get("dora_wd", False),
        wd_on_output=kw.get("wd_on_output", True), rs_lora=kw.get("rs_lora", False),
        rank_dropout_scale=kw.get("rank_dropout_scale", False),
    )


def base_model_file(model) -> str | None:
    """The checkpoint or diffusion-model file a MODEL's weights were loaded from (core loaders record it in
    `cached_patcher_init` to reload the model), or None when the model does not say."""
    init = getattr(model, "cached_patcher_init", None)
    args = init[1] if isinstance(init, tuple) and len(init) > 1 and isinstance(init[1], tuple) else ()
    path = args[0] if args and isinstance(args[0], str) else None
    return path if path and os.path.isfile(path) else None


def sample_sizes(samples: list[torch.Tensor], family: str) -> list[tuple[int, int]]:
    """(width, height) in pixels of each training latent ((C, H, W) or (C, T, H, W))."""
    scale = LATENT_SCALE[family]
    return [(int(s.shape[-1]) * scale, int(s.shape[-2]) * scale) for s in samples]


def _metadata(net_config: NetworkConfig, config: TrainConfig, facts: RunFacts, net: AdapterNetwork, step: int,
              losses: list[float], tensors, **changes) -> dict[str, str]:
    """The file's metadata at `step` (hadakron.train.metadata): the run's facts, its configs, each module's rank."""
    facts = dataclasses.replace(facts, step=step, final_loss=losses[-1] if losses else None, **changes)
    return training_metadata(net_config, config, facts, module_ranks={t.key: t.rank for t in net.targets},
                             module_alphas={t.key: t.alpha for t in net.targets}, tensors=tensors)


def _adapter_file(tensors, metadata, training_state=None) -> AdapterFile:
    return AdapterFile(path=None, tensors=tensors, metadata=metadata, modules=group_modules(tensors), problems=[],
                       training_state=training_state)


def _resume(net: AdapterNetwork, name: str, net_config: NetworkConfig, parts: list[str], config: TrainConfig):
    """Load `name` from the loras folder into the network; ResumeState with the sidecar when there is one.

    The file's saved configuration is compared with the node's first: a setting that builds another network is
    refused, naming each (saved vs given); allowed changes (lrs, steps, ...) and checks an older file cannot support
    are logged."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"resume_from {name!r} is not in the loras folder")
    adapter = read_adapter(path)
    step = resume_step(adapter.metadata, source=name)
    check = check_resume_config(adapter.metadata, net_config, parts, train=config, source=f"resume_from {name!r}")
    if check.changed:
        log.info("hadakron: resuming %s with changed settings: %s", name, "; ".join(check.changed))
    if check.unchecked:
        log.info("hadakron: %s does not record %s; those settings could not be checked against the file", name,
                 ", ".join(check.unchecked))
    try:
        net.load_file_state(adapter.tensors, strict=True)
    except ValueError as exc:
        raise ValueError(f"resume_from {name!r} does not fit the network built from these settings "
                         f"(same algorithm, dims, factor, Tucker, patterns?): {exc}") from None
    side = sidecar_path(path)
    if side.exists():
        tensors, meta = read_training_state(side)
        return ResumeState(step, tensors, meta)
    log.info("hadakron: resuming %s from step %d without optimizer state (no %s)", name, step, side.name)
    return ResumeState(step)


def legacy_inputs(lokr: bool) -> dict:
    """The all-in-one trainers' inputs: every setting as a widget, in the order saved workflows hold them."""
    return {"required": {**_data_inputs(), **legacy_setting_specs(lokr)}, "optional": text_encoder_specs(),
            "hidden": {"unique_id": "UNIQUE_ID"}}


def compact_inputs(lokr: bool) -> dict:
    """The compact trainers' inputs: what every run needs, one socket per option group, the text encoder's data."""
    specs = setting_specs(lokr)
    optional = {group.socket: (group.type_name, {"tooltip": f"From a {group.title} node; empty: "
                                                            f"the defaults ({', '.join(group.settings)})."})
                for group in OPTION_GROUPS}
    te = text_encoder_specs()
    optional["clip"] = te["clip"]
    optional["captions"] = ("STRING", {"forceInput": True, "tooltip": te["captions"][1]["tooltip"]})
    return {"required": {**_data_inputs(), **{name: specs[name] for name in compact_trainer_settings(lokr)}},
            "optional": optional, "hidden": {"unique_id": "UNIQUE_ID"}}


def _data_inputs() -> dict:
    return {
        "model": ("MODEL", {"tooltip": "SDXL or Anima model to train on (its own objective is used)."}),
        "latents": ("LATENT", {"tooltip": "Training latents (VAE Encode or a dataset node); batches are split."}),
        "positive": ("CONDITIONING", {"tooltip": "One conditioning for all latents, or one per latent."}),
    }


def shown_path(path) -> str:
    """A path as the user sees it: relative to the output folder (`loras/...`), as core's save nodes show them."""
    root = loras_output_dir().parent
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def migrate_prompt(json_data):
    """POST /prompt hook: a trainer's `resume_from` in its old spelling ("none") becomes NONE before the server's own
    combo check, so workflows and API prompts saved with it still run (nothing else is touched)."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    for node in (prompt.values() if isinstance(prompt, dict) else ()):
        inputs = node.get("inputs") if isinstance(node, dict) and node.get("class_type") in TRAINER_IDS else None
        if isinstance(inputs, dict) and isinstance(inputs.get("resume_from"), str):
            inputs["resume_from"] = canonical_none(inputs["resume_from"])
    return json_data


def register_prompt_migration() -> bool:
    """Add `migrate_prompt` to the running server's prompt handlers (once); False without a server (tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    handlers = getattr(instance, "on_prompt_handlers", None)
    if handlers is None:
        return False
    if not any(getattr(h, "__qualname__", "") == migrate_prompt.__qualname__ and
               getattr(h, "__module__", "") == migrate_prompt.__module__ for h in handlers):
        instance.add_on_prompt_handler(migrate_prompt)
    return True


def text_encoder_parts(clip, family: str) -> dict:
    """The CLIP object's text-encoder modules under the family's part names (SDXL te1/te2, Anima te)."""
    stage = clip.cond_stage_model
    names = {"sdxl": {"te1": "clip_l", "te2": "clip_g"}, "anima": {"te": "qwen3_06b"}}[family]
    parts = {part: getattr(stage, attr) for part, attr in names.items() if getattr(stage, attr, None) is not None}
    if not parts:
        raise ValueError(f"the CLIP input has none of the {family.upper()} text encoders ({sorted(names.values())})")
    return parts


def split_captions(captions: list, count: int) -> list[str]:
    """Captions, one per line across the inputs; one caption serves every latent."""
    lines = [ln.strip() for text in captions for ln in str(text or "").splitlines() if ln.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"got {len(lines)} captions for {count} latents; give one, or one per latent (one per line)")
    return lines


class _Trainer:
    ALGORITHM = ""
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = (ADAPTER_TYPE, "MODEL", "LOSS_MAP", "CLIP")
    RETURN_NAMES = ("adapter", "model", "loss", "clip")
    OUTPUT_IS_LIST = (False, False, False, False)
    FUNCTION = "train"
    OUTPUT_NODE = True

    def run(self, kw: dict, model, latents: list, positive: list, clip, captions: list | None, node_id):
        """One training run with every setting in `kw` (legacy widgets, or defaults + option nodes + widgets)."""
        kw = dict(kw, resume_from=canonical_none(kw["resume_from"]))
        te_lr = float(kw.get("te_learning_rate") or 0.0) or None
        train_te = clip is not None and any(str(c or "").strip() for c in (captions or []))
        algo = self.ALGORITHM
        family = model_family(model)
        objective = objective_options(kw)
        sampling = model.get_model_object("model_sampling")
        objective_for(sampling, objective)  # refuses options that do not fit this model, before any work
        objective_meta = objective_metadata_of(sampling, objective)
        try:  # before any step is trained: autosaves (every save_every steps, and on interrupt) go there
            checked_output_base(kw["autosave_prefix"], input_name="autosave_prefix")
        except AdapterSaveError as exc:
            raise ValueError(str(exc)) from None
        with torch.inference_mode(False), torch.enable_grad():
            # upstream nodes ran under inference mode: the (small) latents and conds become normal tensors here;
            # the model's own weights are made autograd-usable without a copy inside run_training
            # a LATENT + CONDITIONING, or core's dataset lists (MakeTrainingDataset, ResolutionBucket): trainer_inputs
            samples, conds = training_samples(latents, normal_copy(positive))
            mp = model.clone()
            dm = mp.model.diffusion_model
            dm.requires_grad_(False)
            parts = {"unet": dm}
            encode = te_clip = None
            if train_te:
                lines = split_captions(captions, len(samples))
                te_clip = clip.clone()
                te_parts = text_encoder_parts(te_clip, family)
                for module in te_parts.values():
                    module.requires_grad_(False)
                parts.update(te_parts)
                tokens = {line: te_clip.tokenize(line) for line in dict.fromkeys(lines)}

                def encode(i, _clip=te_clip, _lines=lines, _tokens=tokens):
                    return _clip.encode_from_tokens(_tokens[_lines[i]], return_pooled=True, return_dict=True)
            net_config = _network_config(algo, kw)
            net = AdapterNetwork.build(family, parts, net_config, device=mp.load_device, seed=kw["seed"])
            config = TrainConfig(
                steps=kw["steps"], batch_size=kw["batch_size"], learning_rate=kw["learning_rate"],
                optimizer=kw["optimizer"], weight_decay=kw["weight_decay"], scheduler=kw["scheduler"],
                warmup_steps=kw["warmup_steps"], grad_accum_steps=kw["grad_accum_steps"],
                max_grad_norm=kw["max_grad_norm"], dtype=kw["training_dtype"], seed=kw["seed"],
                save_every=kw["save_every"], te_lr=te_lr,
            )
            resume = (_resume(net, kw["resume_from"], net_config, list(parts), config)
                      if kw["resume_from"] != NONE else None)
            facts = RunFacts(
                family=family, step=0, sample_sizes=sample_sizes(samples, family),
                captions=lines if train_te else (), parts=list(parts),
                gradient_checkpointing=kw["gradient_checkpointing"], base_model_path=base_model_file(model),
                prediction_type=objective_facts(sampling)["prediction"], autosave_prefix=kw["autosave_prefix"],
                resume_from=kw["resume_from"] if resume is not None else None,
                resumed_step=resume.step if resume is not None else None,
                session_id=random.SystemRandom().randrange(2 ** 32), started_at=time.time(),
                extra={k if k.startswith("ss_") else f"ss_{k}": v for k, v in objective_meta.items()},
            )
            pbar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
            losses: list[float] = []

            def on_loss(step, loss, lr):
                losses.append(loss)
                _send_loss(node_id, step, config.steps, loss, lr)

            autosaved: list[str] = []

            def autosave(step, snap):
                tensors = snap.adapter_tensors()
                meta = _metadata(net_config, config, facts, net, step, losses, tensors,
                                 output_name=Path(kw["autosave_prefix"]).name)
                path = save_adapter(_adapter_file(tensors, meta, snap.training_state()),
                                    f"{kw['autosave_prefix']}_step{step:06d}", input_name="autosave_prefix")
                autosaved.append(shown_path(path))
                log.info("hadakron: autosaved step %d to %s", step, autosaved[-1])

            callbacks = TrainCallbacks(
                progress=lambda step, total: pbar.update_absolute(step, total),
                loss=on_loss,
                autosave=autosave,
                interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                interrupt_exceptions=(comfy.model_management.InterruptProcessingException,),
            )
            blocks = checkpoint_blocks(dm, family, llm_adapter=kw["train_llm_adapter"])
            with autograd_safe_text_encoders([parts[p] for p in parts if p != "unet"]):
                result = run_training(mp, net, samples, conds, config, callbacks, resume=resume, blocks=blocks,
                                      gradient_checkpoint=kw["gradient_checkpointing"], encode=encode,
                                      text_encoder=te_clip, objective_options=objective)
            snap = result.snapshot
            tensors = snap.adapter_tensors()
            meta = _metadata(net_config, config, facts, net, result.step, result.losses, tensors)
            adapter = _adapter_file(tensors, meta, snap.training_state())
        if result.stop_reason != "completed":
            log.warning("hadakron: %s", result.message)
        model_out, clip_out, _ = apply_adapter(model, clip if train_te else None, adapter, 1.0, 1.0,
                                               source=f"{algo} trainer")
        clip_out = clip_out if train_te else clip
        loss_map = {"loss": list(result.losses)}
        text = result.message or (f"trained to step {result.step}; final loss {result.losses[-1]:.5g}"
                                  if result.losses else f"no steps trained (step {result.step})")
        if autosaved:
            text += f"; last autosave {autosaved[-1]}"
        # first_step places a resumed run's curve at its real steps on the chart (losses are consecutive, 1-based;
        # a run stopped by a NaN also lists the rolled-back step, so count from the start, not from result.step).
        curve = {"loss": list(result.losses), "first_step": (resume.step if resume is not None else 0) + 1}
        return {"ui": {"hadakron_loss": [json.dumps(curve)], "text": [text]},
                "result": (adapter, model_out, loss_map, clip_out)}


class _LegacyTrainer(_Trainer):
    """Every setting as a widget (the layout workflows saved before the option nodes hold)."""

    DEPRECATED = True  # hidden from search; saved workflows still load and run it

    @classmethod
    def INPUT_TYPES(cls):
        return legacy_inputs(lokr=cls.ALGORITHM == "lokr")

    def train(self, model, latents, positive, unique_id=None, clip=None, captions=None, te_learning_rate=None,
              **inputs):
        kw = {k: _first(v) for k, v in inputs.items()}
        kw["te_learning_rate"] = _first(te_learning_rate) or 0.0
        return self.run(kw, _first(model), latents, positive, _first(clip), captions, _first(unique_id))


class _CompactTrainer(_Trainer):
    """The settings every run needs as widgets; the rest from option nodes (their defaults when not connected)."""

    @classmethod
    def INPUT_TYPES(cls):
        return compact_inputs(lokr=cls.ALGORITHM == "lokr")

    def train(self, model, latents, positive, unique_id=None, clip=None, captions=None, **inputs):
        sockets = {group.socket for group in OPTION_GROUPS}
        options = {k: _first(v) for k, v in inputs.items() if k in sockets}
        values = {k: _first(v) for k, v in inputs.items() if k not in sockets}
        kw = merged_settings(self.ALGORITHM == "lokr", values, options)
        return self.run(kw, _first(model), latents, positive, _first(clip), captions, _first(unique_id))


_LOKR_DESCRIPTION = ("Trains a LoKr adapter with the model's own objective; outputs the adapter, the adapted model, "
                     "the loss and the CLIP.")
_LOHA_DESCRIPTION = ("Trains a LoHa adapter with the model's own objective; outputs the adapter, the adapted model, "
                     "the loss and the CLIP.")
_OPTIONS_HINT = (" Network, optimizer, precision and objective settings come from the option nodes "
                 "(training/hadakron); left empty, each group trains with its defaults.")


class HadakronLoKrTrainer(_LegacyTrainer):
    """Legacy LoKr Trainer: every setting on the node (kept so saved workflows load and run unchanged)."""

    ALGORITHM = "lokr"
    DESCRIPTION = _LOKR_DESCRIPTION + " Legacy layout with every setting on the node; new graphs use LoKr Trainer."


class HadakronLoHaTrainer(_LegacyTrainer):
    """Legacy LoHa Trainer: every setting on the node (kept so saved workflows load and run unchanged)."""

    ALGORITHM = "loha"
    DESCRIPTION = _LOHA_DESCRIPTION + " Legacy layout with every setting on the node; new graphs use LoHa Trainer."


class HadakronTrainLoKr(_CompactTrainer):
    """Train a LoKr (Kronecker) adapter on SDXL or Anima inside the graph."""

    ALGORITHM = "lokr"
    DESCRIPTION = _LOKR_DESCRIPTION + _OPTIONS_HINT


class HadakronTrainLoHa(_CompactTrainer):
    """Train a LoHa (Hadamard) adapter on SDXL or Anima inside the graph."""

    ALGORITHM = "loha"
    DESCRIPTION = _LOHA_DESCRIPTION + _OPTIONS_HINT


TRAINER_IDS = ("HadakronTrainLoKr", "HadakronTrainLoHa", "HadakronLoKrTrainer", "HadakronLoHaTrainer")
NODE_CLASS_MAPPINGS = {"HadakronTrainLoKr": HadakronTrainLoKr, "HadakronTrainLoHa": HadakronTrainLoHa,
                       "HadakronLoKrTrainer": HadakronLoKrTrainer, "HadakronLoHaTrainer": HadakronLoHaTrainer}
NODE_DISPLAY_NAME_MAPPINGS = {"HadakronTrainLoKr": "LoKr Trainer", "HadakronTrainLoHa": "LoHa Trainer",
                              "HadakronLoKrTrainer": "LoKr Trainer (legacy, all options)",
                              "HadakronLoHaTrainer": "LoHa Trainer (legacy, all options)"}
register_prompt_migration()

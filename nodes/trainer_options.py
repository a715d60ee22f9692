"""The trainers' settings as data: one spec per setting (sd-scripts name in the tooltip), grouped into option nodes.

The compact trainer nodes keep the settings every run needs and take the rest from small option nodes, each of
which outputs one custom type (`HADAKRON_NETWORK_OPTIONS`, ...) carrying a plain dict {setting: value}. A group's
defaults are its specs' defaults, the very specs the legacy all-in-one trainers use, so a compact trainer with no
option node trains exactly as a legacy one left at its defaults. A later group (dataset, preview/validation,
objective) is one more `OptionGroup` in `OPTION_GROUPS`: the trainers get its socket, the pack its node.
"""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths

from hadakron.train import SCHEDULERS, available_optimizers

from .objective_specs import objective_specs
from .save_adapter import CATEGORY

DTYPES = ("bf16", "fp16", "fp32")
NONE = "None"  # "nothing chosen" in every combo of the pack (Adapter Merge's slots spell it so too)
OLD_NONE = ("none",)
LOKR_ONLY = ("factor", "decompose_both")  # resume_from's spelling before 2026-12: saved workflows still carry it


def _sd(name: str, text: str) -> str:
    """A tooltip naming the sd-scripts argument the setting corresponds to."""
    return f"{text} (sd-scripts: {name})"


def resume_choices() -> list[str]:
    return [NONE] + folder_paths.get_filename_list("loras")


def canonical_none(value):
    """The old "none" spelling of a combo's empty choice read as NONE; anything else unchanged."""
    return NONE if isinstance(value, str) and value in OLD_NONE else value


# The legacy all-in-one trainers' settings, in their widget order. Saved workflows map widgets_values by position
# (required inputs, then the optional captions and te_learning_rate), so this list is frozen: a new setting goes into
# setting_specs and an option group, never onto the legacy nodes.
LEGACY_SETTINGS = (
    "steps", "batch_size", "learning_rate", "optimizer", "scheduler", "warmup_steps", "seed", "network_dim",
    "network_alpha", "factor", "decompose_both", "use_tucker", "use_scalar", "conv_dim", "conv_alpha", "rank_dropout",
    "module_dropout", "exclude_patterns", "include_patterns", "network_reg_dims", "network_reg_lrs",
    "loraplus_lr_ratio", "train_llm_adapter", "gradient_checkpointing", "training_dtype", "grad_accum_steps",
    "max_grad_norm", "weight_decay", "save_every", "autosave_prefix", "resume_from",
)


def legacy_setting_specs(lokr: bool) -> dict[str, tuple]:
    """The legacy trainers' widgets in LEGACY_SETTINGS order (LoHa: without the LoKr-only ones)."""
    specs = setting_specs(lokr)
    return {name: specs[name] for name in LEGACY_SETTINGS if name in specs}


# Every trainer setting but the text encoder's. `factor` and `decompose_both` exist on the LoKr trainers only.
def setting_specs(lokr: bool) -> dict[str, tuple]:
    specs = {
        "steps": ("INT", {"default": 200, "min": 1, "max": 1000000, "tooltip": _sd(
            "max_train_steps", "Total optimizer steps (a resumed run counts its earlier steps).")}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": _sd(
            "train_batch_size", "Latents per step.")}),
        "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 10.0, "step": 1e-6, "tooltip": _sd(
            "learning_rate", "Learning rate of the UNet / DiT adapters.")}),
        "optimizer": (available_optimizers(), {"default": "AdamW", "tooltip": _sd(
            "optimizer_type", "Optimizer; the optional ones are listed when their package is installed.")}),
        "scheduler": (list(SCHEDULERS), {"default": "constant", "tooltip": _sd(
            "lr_scheduler", "Learning-rate schedule over the steps.")}),
        "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": _sd(
            "lr_warmup_steps", "Steps of linear warmup from 0 to the learning rate.")}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": _sd(
            "seed", "Seeds the adapters' init and every step's noise and timestep: same seed, same run.")}),
        "network_dim": ("INT", {"default": 8 if lokr else 4, "min": 1, "max": 100000, "tooltip": _sd(
            "network_dim", "Rank of the adapters' low-rank factors.")}),
        "network_alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100000.0, "step": 0.01, "tooltip": _sd(
            "network_alpha", "Scale alpha / dim applied to every adapter.")}),
    }
    if lokr:
        specs["factor"] = ("INT", {"default": -1, "min": -1, "max": 1024, "tooltip": _sd(
            "factor", "Kronecker factor; -1 picks the most square split.")})
        specs["decompose_both"] = ("BOOLEAN", {"default": False, "tooltip": _sd(
            "decompose_both", "Also make the small Kronecker factor low-rank.")})
    specs.update({
        "use_tucker": ("BOOLEAN", {"default": False, "tooltip": _sd(
            "use_tucker", "Tucker decomposition of 3x3 conv adapters.")}),
        "use_scalar": ("BOOLEAN", {"default": False, "tooltip": _sd(
            "use_scalar", "A trained scalar per adapter (starts at 0).")}),
        "conv_dim": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": _sd(
            "conv_dim", "Rank of 3x3 conv adapters; 0: no 3x3 conv adapters.")}),
        "conv_alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100000.0, "step": 0.01, "tooltip": _sd(
            "conv_alpha", "Alpha of the 3x3 conv adapters (used when conv_dim > 0).")}),
        "rank_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": _sd(
            "rank_dropout", "Probability of dropping each rank of an adapter per step.")}),
        "module_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": _sd(
            "module_dropout", "Probability of skipping a whole adapter per step.")}),
        "exclude_patterns": ("STRING", {"default": "", "multiline": True, "tooltip": _sd(
            "exclude_patterns", "Regexes (one per line) of layer names to leave out.")}),
        "include_patterns": ("STRING", {"default": "", "multiline": True, "tooltip": _sd(
            "include_patterns", "Regexes (one per line) of excluded layer names to train anyway.")}),
        "network_reg_dims": ("STRING", {"default": "", "tooltip": _sd(
            "network_reg_dims", "regex=dim, comma separated; the first full match sets a layer's rank.")}),
        "network_reg_lrs": ("STRING", {"default": "", "tooltip": _sd(
            "network_reg_lrs", "regex=lr, comma separated; the first full match sets a layer's learning rate.")}),
        "loraplus_lr_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": _sd(
            "loraplus_lr_ratio", "LoRA+: the up factors' lr is this times learning_rate; 0: off.")}),
        "train_llm_adapter": ("BOOLEAN", {"default": False, "tooltip": _sd(
            "train_llm_adapter", "Anima: also train the LLM adapter.")}),
        "dora_wd": ("BOOLEAN", {"default": False, "tooltip": _sd(
            "network_args dora_wd", "DoRA: also train a magnitude per output row (or input column), saved as "
                                    "dora_scale; the base weights stay frozen.")}),
        "wd_on_output": ("BOOLEAN", {"default": True, "tooltip": _sd(
            "network_args wd_on_output", "DoRA magnitude per output row (LyCORIS' default). ComfyUI's own "
            "LoraLoader divides such a file by ||W|| instead of ||W + dW||, so it differs there; off (per input "
            "column): every loader gives the same weights.")}),
        "rs_lora": ("BOOLEAN", {"default": False, "tooltip": _sd(
            "network_args rs_lora", "Rank-stabilised scale alpha / sqrt(dim) (stored as alpha * sqrt(dim)).")}),
        "rank_dropout_scale": ("BOOLEAN", {"default": False, "tooltip": _sd(
            "network_args rank_dropout_scale", "Rank dropout rescales by the kept fraction of each mask "
                                               "(LyCORIS) instead of 1 / (1 - rank_dropout).")}),
        "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": _sd(
            "gradient_checkpointing", "One checkpoint per block: less memory, about a third more time.")}),
        "training_dtype": (list(DTYPES), {"default": "bf16", "tooltip": _sd(
            "mixed_precision", "Autocast dtype of the forward pass; the adapters stay float32.")}),
        "grad_accum_steps": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip": _sd(
            "gradient_accumulation_steps", "Batches summed into one optimizer step.")}),
        "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip": _sd(
            "max_grad_norm", "Gradient clipping norm; 0: no clipping.")}),
        "weight_decay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0, "step": 0.001, "tooltip": _sd(
            "optimizer_args weight_decay", "Decoupled weight decay of the optimizer.")}),
        "save_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": _sd(
            "save_every_n_steps", "Autosave into output/loras every N steps (0: off); an interrupt autosaves too.")}),
        "autosave_prefix": ("STRING", {"default": "hadakron/autosave", "tooltip": _sd(
            "output_name", "Autosave name inside output/loras; _stepNNNNNN and a counter are appended.")}),
        "resume_from": (resume_choices(), {"default": NONE, "tooltip": _sd(
            "network_weights + resume", "An autosave in models/loras to continue from (with its .trainstate "
                                        "optimizer state when there is one).")}),
    })
    return specs


def text_encoder_specs() -> dict[str, tuple]:
    """The legacy trainers' optional text-encoder inputs (clip is a socket everywhere)."""
    return {
        "clip": ("CLIP", {"tooltip": "Connect with captions to train the text encoder(s) too."}),
        "captions": ("STRING", {"default": "", "multiline": True, "tooltip": _sd(
            "caption", "One caption per line, one per latent (or a single one for all). Needs clip; empty: the "
                       "text encoder is not trained.")}),
        "te_learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 1e-6, "tooltip": _sd(
            "text_encoder_lr", "Text-encoder lr; 0: the same as learning_rate.")}),
    }


def all_specs() -> dict[str, tuple]:
    """Every setting any trainer has (the LoKr ones included), by name."""
    return {**setting_specs(lokr=True), **text_encoder_specs(), **objective_specs()}


@dataclass(frozen=True)
class OptionGroup:
    """One option node: its class id, title, output type, the trainer socket it plugs into, and its settings."""

    node_id: str
    title: str
    type_name: str
    socket: str
    settings: tuple[str, ...]
    description: str
    # settings added after the node shipped: optional inputs, so API prompts saved before still validate (an absent
    # one takes its default in `merged_settings`); the frontend shows them as widgets all the same
    later: tuple[str, ...] = ()

    def specs(self) -> dict[str, tuple]:
        """Every setting's spec (`settings`, then `later`)."""
        specs = all_specs()
        return {name: specs[name] for name in self.settings + self.later}

    def input_types(self) -> dict[str, dict[str, tuple]]:
        """The node's INPUT_TYPES: `settings` required, `later` optional."""
        specs = self.specs()
        out = {"required": {n: specs[n] for n in self.settings}}
        if self.later:
            out["optional"] = {n: specs[n] for n in self.later}
        return out

    def defaults(self) -> dict:
        """{setting: default}: what the trainer uses when this group's socket is left empty."""
        return {name: spec[1]["default"] for name, spec in self.specs().items()}


NETWORK = OptionGroup(
    "HadakronNetworkOptions", "Network Options", "HADAKRON_NETWORK_OPTIONS", "network_options",
    ("decompose_both", "use_tucker", "use_scalar", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
     "exclude_patterns", "include_patterns", "network_reg_dims", "network_reg_lrs", "loraplus_lr_ratio",
     "train_llm_adapter"),
    "Which layers get adapters and how they are built (sd-scripts network_args): Tucker, scalar, dropouts, conv "
    "dim/alpha, include/exclude patterns, per-layer dims and lrs, LoRA+, Anima's LLM adapter, DoRA (dora_wd), "
    "rs_lora, rank_dropout_scale. decompose_both is read by LoKr trainers only.",
    later=("dora_wd", "wd_on_output", "rs_lora", "rank_dropout_scale"))
OPTIMIZER = OptionGroup(
    "HadakronOptimizerOptions", "Optimizer Options", "HADAKRON_OPTIMIZER_OPTIONS", "optimizer_options",
    ("optimizer", "scheduler", "warmup_steps", "weight_decay", "te_learning_rate"),
    "Optimizer, learning-rate schedule and warmup, weight decay, and the text encoders' own learning rate.")
PRECISION = OptionGroup(
    "HadakronPrecisionOptions", "Precision & Memory Options", "HADAKRON_PRECISION_OPTIONS", "precision_options",
    ("training_dtype", "gradient_checkpointing", "batch_size", "grad_accum_steps", "max_grad_norm"),
    "Autocast dtype, gradient checkpointing, batch size, gradient accumulation and clipping.")
OBJECTIVE = OptionGroup(
    "HadakronObjectiveOptions", "Objective Options", "HADAKRON_OBJECTIVE_OPTIONS", "objective_options",
    tuple(objective_specs()),
    "sd-scripts' objective and noise options, by their names and formulas. SDXL: min_snr_gamma, "
    "scale_v_pred_loss_like_noise_pred, debiased_estimation_loss, noise_offset (+ adaptive_noise_scale), "
    "multires noise, and v_parameterization / zero_terminal_snr as checks of the model's sampling. Anima: "
    "timestep_sampling, discrete_flow_shift, sigmoid_scale, weighting_scheme, logit_mean/std, mode_scale. Both: "
    "ip_noise_gamma, loss_type with huber_schedule and huber_c. Defaults: the model's own objective, unchanged "
    "(SDXL: sd-scripts' defaults; Anima: the model's shift-3 sampling, where sd-scripts defaults to sigmoid). "
    "Options of the other family, or set where they do nothing, are refused by name.")
OPTION_GROUPS: tuple[OptionGroup, ...] = (NETWORK, OPTIMIZER, PRECISION, OBJECTIVE)


def compact_trainer_settings(lokr: bool) -> tuple[str, ...]:
    """The settings on the compact trainer itself: every setting that is in no option group."""
    grouped = {name for group in OPTION_GROUPS for name in group.settings + group.later}
    return tuple(name for name in setting_specs(lokr) if name not in grouped)


def merged_settings(lokr: bool, trainer_values: dict, options: dict[str, dict | None]) -> dict:
    """Every setting for one run: each group's defaults, overridden by its connected option node's dict, then the
    trainer's own widgets. `options` is {socket: dict or None}. LoKr-only settings are dropped for LoHa."""
    out: dict = {}
    for group in OPTION_GROUPS:
        values = group.defaults()
        given = options.get(group.socket)
        if given is not None:
            unknown = sorted(set(given) - set(values)) if isinstance(given, dict) else None
            if unknown is None or unknown:
                raise ValueError(f"{group.socket}: expected the dict of a {group.title} node, got "
                                 f"{'unknown settings ' + str(unknown) if unknown else type(given).__name__}")
            values.update(given)
        out.update(values)
    out.update(trainer_values)
    if not lokr:
        for name in LOKR_ONLY:
            out.pop(name, None)
    return out


def _option_node(group: OptionGroup) -> type:
    """The option node class of a group: its settings as widgets, one dict out."""

    class OptionNode:
        CATEGORY = CATEGORY
        RETURN_TYPES = (group.type_name,)
        RETURN_NAMES = (group.socket,)
        OUTPUT_TOOLTIPS = (f"Connect to a LoKr/LoHa Trainer's {group.socket} input.",)
        FUNCTION = "options"
        DESCRIPTION = group.description
        SEARCH_ALIASES = [group.title.lower(), "hadakron", "lokr", "loha", "training options"]

        @classmethod
        def INPUT_TYPES(cls):
            return group.input_types()

        def options(self, **values):
            return (dict(values),)

    OptionNode.__name__ = OptionNode.__qualname__ = group.node_id
    OptionNode.__doc__ = f"{group.title}: {group.description}"
    return OptionNode


NODE_CLASS_MAPPINGS = {group.node_id: _option_node(group) for group in OPTION_GROUPS}
NODE_DISPLAY_NAME_MAPPINGS = {group.node_id: f"{group.title} (hadakron)" for group in OPTION_GROUPS}

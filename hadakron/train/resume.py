"""Resuming: where a run starts (the step count from an adapter's metadata, never its file name), and whether the
saved configuration builds the same network as the node's settings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

STEP_KEYS = ("hadakron.step", "ss_steps")


def resume_step(metadata: Mapping[str, str], *, source: str = "adapter") -> int:
    """The number of optimizer steps an adapter was trained for: `hadakron.step`, else kohya's `ss_steps`.

    Raises ValueError naming the file and the keys looked for when neither holds a non-negative integer.
    """
    for key in STEP_KEYS:
        raw = metadata.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"{source}: metadata {key!r} = {raw!r} is not an integer step count") from None
        if value < 0:
            raise ValueError(f"{source}: metadata {key!r} = {value} is negative")
        return value
    raise ValueError(
        f"{source}: no step count in metadata (looked for {list(STEP_KEYS)}); cannot resume without knowing the step"
    )


# ---------------------------------------------------------------------------------------- configuration check
# The arguments that decide which layers get adapters and what their parameters are: a resumed run must match them.
NETWORK_SHAPING_ARGS = (
    "algo", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "factor", "decompose_both", "use_tucker",
    "use_scalar", "full_matrix", "exclude_patterns", "include_patterns", "network_reg_dims", "train_llm_adapter",
    "dora_wd", "wd_on_output", "rs_lora",
)
# Network arguments that change only how the adapters train (dropouts, lrs): a resumed run may change them.
NETWORK_TRAINING_ARGS = ("rank_dropout", "module_dropout", "rank_dropout_scale", "network_reg_lrs", "loraplus_lr_ratio",
                         "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
TRAINING_ARGS = ("steps", "batch_size", "learning_rate", "unet_lr", "te_lr", "optimizer", "weight_decay", "betas",
                 "eps", "momentum", "scheduler", "warmup_steps", "grad_accum_steps", "max_grad_norm", "dtype", "seed",
                 "save_every")
_TOP_LEVEL = {"algo": "hadakron.algorithm", "network_dim": "ss_network_dim", "network_alpha": "ss_network_alpha"}


class ResumeConfigError(ValueError):
    """A resumed adapter whose saved configuration builds another network than the node's settings."""


@dataclass
class ResumeCheck:
    """What comparing a file's saved configuration with the node's found: allowed changes, and checks not made."""

    changed: list[str] = field(default_factory=list)  # "name: saved X, given Y" for allowed differences
    unchecked: list[str] = field(default_factory=list)  # arguments the file does not record


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _difference(name: str, saved: object, given: object) -> str:
    return f"{name}: saved {_shown(saved)}, given {_shown(given)}"


def check_resume_config(metadata: Mapping[str, str], network, parts: Sequence[str], *, train=None,
                        source: str = "adapter") -> ResumeCheck:
    """Compare the configuration saved in `metadata` with `network` (a NetworkConfig) and the adapted `parts`.

    Raises ResumeConfigError naming every differing network-shaping argument (one line each, saved vs given).
    Returns the allowed differences (dropouts, lrs, and with `train` every TrainConfig setting) and the arguments
    the file does not record (files written before every argument was saved, without `hadakron.parts`, and files
    of other trainers: only the arguments they name are compared).
    """
    from hadakron.train.metadata import network_config_from_metadata, saved_network_args, train_config_from_metadata

    args = saved_network_args(metadata, source=source)
    complete = "hadakron.parts" in metadata  # written, with every network argument, since the trainers save them all
    try:
        saved = network_config_from_metadata(metadata, source=source)
    except ValueError as exc:
        raise ResumeConfigError(f"{source}: the saved network configuration cannot be read: {exc}") from None
    recorded = set(args) | {name for name, key in _TOP_LEVEL.items()
                            if metadata.get(key, "").strip() not in ("", "None")}
    if metadata.get("ss_network_module") in ("networks.loha", "networks.lokr"):
        recorded.add("algo")
    check = ResumeCheck()
    refused = []
    for name in NETWORK_SHAPING_ARGS + NETWORK_TRAINING_ARGS:
        if name in ("factor", "decompose_both") and network.algo != "lokr" and saved.algo != "lokr":
            continue
        if not complete and name not in recorded:
            check.unchecked.append(name)
            continue
        a, b = getattr(saved, name), getattr(network, name)
        if a != b:
            (refused if name in NETWORK_SHAPING_ARGS else check.changed).append(_difference(name, a, b))
    raw_parts = metadata.get("hadakron.parts")
    if raw_parts:
        try:
            saved_parts = sorted(json.loads(raw_parts))
        except (ValueError, TypeError):
            raise ResumeConfigError(f"{source}: metadata 'hadakron.parts' = {raw_parts!r} is not a JSON list") from None
        if saved_parts != sorted(parts):
            refused.append(_difference("parts", saved_parts, sorted(parts)))
    else:
        check.unchecked.append("parts")
    if refused:
        raise ResumeConfigError(f"{source} was trained with another network configuration; resume needs the same "
                                "(set these as saved, or start a new run):\n  " + "\n  ".join(refused))
    if train is not None and "ss_max_train_steps" in metadata:
        try:
            saved_train = train_config_from_metadata(metadata, source=source)
        except (ValueError, TypeError):
            saved_train = None
        for name in TRAINING_ARGS if saved_train is not None else ():
            a, b = getattr(saved_train, name), getattr(train, name)
            if a != b and not (name == "betas" and tuple(a) == tuple(b)):
                check.changed.append(_difference(name, a, b))
    return check

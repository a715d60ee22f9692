"""The training-state sidecar: exact adapter parameters + optimizer state, for resuming a run exactly.

Saved next to an adapter file `name.safetensors` as `name.trainstate` (safetensors format; a different
extension so model folders do not list it as a LoRA). Tensors: `param/<name>` (the trainable
parameters, float32 as trained) and `optim/<name>/<key>` (per-parameter optimizer state).
Metadata: `hadakron.step`, `hadakron.optimizer`, and JSON for the param-group settings, non-tensor
per-parameter state and the GradScaler state. Parameters are keyed by their names in the network,
so the state loads into a freshly built network with the same configuration.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from hadakron.io import read_metadata, write_adapter

Tensor = torch.Tensor

SIDECAR_SUFFIX = ".trainstate"
FORMAT_VERSION = "1"


# Param-group settings the run's own configuration sets (lr per group, optimizer arguments): a resumed run keeps the
# values it was built with, so a changed learning rate or weight decay takes effect; every other group entry (an
# optimizer's own state kept in its groups: Prodigy's d, schedule-free's k and weight_sum) is restored.
CONFIGURED_GROUP_KEYS = ("lr", "initial_lr", "weight_decay", "betas", "eps", "momentum", "warmup_steps")


class TrainingStateError(ValueError):
    """A training-state sidecar that does not match the network or optimizer it is loaded into."""


def sidecar_path(adapter_path: str | os.PathLike) -> Path:
    """`dir/name.safetensors` -> `dir/name.trainstate`."""
    p = Path(adapter_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX) if p.suffix else p.with_name(p.name + SIDECAR_SUFFIX)


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def training_state(
    named_params: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    optimizer_name: str = "",
    scaler: Any = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Collect (tensors, metadata) for the sidecar from live parameters and optimizer at `step`."""
    name_of = {id(p): n for n, p in named_params.items()}
    # copies: a CPU float32 parameter's .float().cpu() is the parameter itself, which the next step changes
    tensors: dict[str, Tensor] = {f"param/{n}": p.detach().to("cpu", torch.float32, copy=True).contiguous()
                                  for n, p in named_params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for param, state in optimizer.state.items():
        name = name_of.get(id(param))
        if name is None:
            raise TrainingStateError("optimizer holds a parameter that is not in the network's named parameters")
        for key, value in state.items():
            if isinstance(value, Tensor) and value.ndim > 0:
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, Tensor):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().reshape(1).contiguous()
                scalars.setdefault(name, {})[key] = "__tensor0d__"
            else:
                scalars.setdefault(name, {})[key] = _json_safe(value)
    groups = []
    for group in optimizer.param_groups:
        settings = {k: _json_safe(v) for k, v in group.items() if k != "params"}
        settings["param_names"] = [name_of[id(p)] for p in group["params"]]
        groups.append(settings)
    metadata = {
        "hadakron.trainstate_version": FORMAT_VERSION,
        "hadakron.step": str(int(step)),
        "hadakron.optimizer": optimizer_name or type(optimizer).__name__,
        "hadakron.param_groups": json.dumps(groups),
        "hadakron.optimizer_scalars": json.dumps(scalars),
        "hadakron.grad_scaler": json.dumps(_json_safe(scaler.state_dict()) if scaler is not None else {}),
    }
    return tensors, metadata


def apply_training_state(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    named_params: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    *,
    scaler: Any = None,
    source: str = "training state",
) -> int:
    """Copy saved parameters into `named_params` and state into `optimizer` (when given); return the saved step.

    The optimizer keeps its own lrs and arguments (CONFIGURED_GROUP_KEYS): they come from the resumed run's settings.

    Raises TrainingStateError naming the key when a parameter is missing or has another shape.
    """
    for name, param in named_params.items():
        key = f"param/{name}"
        if key not in tensors:
            raise TrainingStateError(f"{source}: missing tensor {key!r} for a parameter of the network")
        saved = tensors[key]
        if tuple(saved.shape) != tuple(param.shape):
            raise TrainingStateError(
                f"{source}: {key!r} has shape {tuple(saved.shape)}, the network expects {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(saved.to(param.dtype))
    extra = sorted(k[len("param/"):] for k in tensors if k.startswith("param/") and k[len("param/"):] not in named_params)
    if extra:
        raise TrainingStateError(f"{source}: parameters {extra[:5]} are not in the network (another configuration?)")
    if optimizer is not None:
        _apply_optimizer_state(tensors, metadata, named_params, optimizer, source)
    if scaler is not None:
        scaler_state = json.loads(metadata.get("hadakron.grad_scaler", "{}") or "{}")
        if scaler_state:
            scaler.load_state_dict(scaler_state)
    return int(metadata["hadakron.step"])


def _apply_optimizer_state(tensors, metadata, named_params, optimizer, source) -> None:
    groups = json.loads(metadata.get("hadakron.param_groups", "[]"))
    if len(groups) != len(optimizer.param_groups):
        raise TrainingStateError(
            f"{source}: {len(groups)} optimizer param groups saved, the optimizer has {len(optimizer.param_groups)}"
        )
    name_of = {id(p): n for n, p in named_params.items()}
    for saved, group in zip(groups, optimizer.param_groups):
        names = [name_of.get(id(p)) for p in group["params"]]
        if names != saved.get("param_names"):
            raise TrainingStateError(f"{source}: optimizer param group holds other parameters than when saved")
        for key, value in saved.items():
            if key != "param_names" and not (key in CONFIGURED_GROUP_KEYS and key in group):
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    scalars = json.loads(metadata.get("hadakron.optimizer_scalars", "{}"))
    by_param: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, _, state_key = key[len("optim/"):].rpartition("/")
            by_param.setdefault(name, {})[state_key] = value
    for name, values in scalars.items():
        for state_key, value in values.items():
            if value == "__tensor0d__":
                by_param[name][state_key] = by_param[name][state_key].reshape(())
            else:
                by_param.setdefault(name, {})[state_key] = value
    optimizer.state.clear()
    for name, state in by_param.items():
        if name not in named_params:
            raise TrainingStateError(f"{source}: optimizer state for {name!r}, which is not in the network")
        param = named_params[name]
        # copies, never the file's tensors: the optimizer updates its state in place, and a file read during a
        # ComfyUI prompt holds inference tensors
        optimizer.state[param] = {
            k: (v.to(param.device if v.ndim > 0 else v.device, copy=True) if isinstance(v, Tensor) else v)
            for k, v in state.items()
        }


def write_training_state(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], *, overwrite: bool = False
) -> Path:
    """Write the sidecar atomically (`hadakron.io.write_adapter`: temp file in the target folder, then rename);
    refuse to overwrite unless asked."""
    return write_adapter(path, tensors, metadata, overwrite=overwrite)


def read_training_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a sidecar written by `write_training_state`; TrainingStateError if it is not one."""
    path = Path(path)
    metadata = read_metadata(path)
    if "hadakron.step" not in metadata or "hadakron.trainstate_version" not in metadata:
        raise TrainingStateError(
            f"{path}: not a hadakron training state (expected metadata 'hadakron.step' and 'hadakron.trainstate_version')"
        )
    return load_file(str(path)), metadata

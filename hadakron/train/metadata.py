"""The metadata a trained adapter carries: every network and training argument in sd-scripts' `ss_*` keys.

`training_metadata(network, train, run, ...)` is a pure function from the two configs and the facts of the run
(`RunFacts`: family, step, sample sizes, captions, parts, base model file, ...) to the str -> str dict written into
the file; it extends `hadakron.io.build_metadata` (modelspec, `hadakron.*` rebuild keys, sshs hashes), so every key
that writes stays. Values follow sd-scripts' `train_network.py` formats: `ss_network_args` and the dataset keys are
JSON, `ss_optimizer` is `module.Class(arg=value,...)`, booleans `True`/`False`, absent lrs `None`.
`network_config_from_metadata` and `train_config_from_metadata` read them back.

Dataset facts are what the trainer really has: one LATENT input (named `latents` in `ss_dataset_dirs` and
`ss_tag_frequency`, as sd-scripts names a folder), its samples' sizes (`ss_bucket_info`: one bucket per size, as the
loop batches samples of one size), and the captions when the text encoders are trained. The loop draws batches at
random, not in passes: `ss_num_batches_per_epoch` is ceil(samples / batch size) and `ss_epoch` / `ss_num_epochs`
count that many batches drawn (with gradient accumulation, micro-batches).
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from hadakron.io.metadata import build_metadata
from hadakron.network import NetworkConfig, network_arg_text
from hadakron.train.loop import TrainConfig
from hadakron.train.optimizers import BUILTIN_OPTIMIZERS, OPTIONAL_OPTIMIZERS

# the optimizer classes `build_optimizer` makes, as sd-scripts names them (`cls.__module__ + "." + cls.__name__`)
OPTIMIZER_CLASSES = {
    "AdamW": "torch.optim.adamw.AdamW", "Adam": "torch.optim.adam.Adam", "SGD": "torch.optim.sgd.SGD",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
}
# sd-scripts' --mixed_precision values for our autocast dtypes
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
# pixels per latent cell (SDXL's VAE and Anima's Wan 2.1 VAE both scale space by 8)
LATENT_SCALE = {"sdxl": 8, "anima": 8}
# the name the one LATENT input gets where sd-scripts names dataset folders
DATASET_NAME = "latents"
# network args only LoKr has
LOKR_ARGS = ("factor", "decompose_both")
# modelspec.prediction_type values (ModelSpec 1.0.1) for the objectives ComfyUI models name
PREDICTION_TYPES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v", "v_prediction": "v"}


@dataclass(frozen=True)
class RunFacts:
    """What one run knows besides its configs; every field is written only when it is known."""

    family: str
    step: int
    sample_sizes: Sequence[tuple[int, int]]  # (width, height) in pixels, one per training sample
    captions: Sequence[str] = ()  # one per sample when the text encoders are trained, else empty
    parts: Sequence[str] = ("unet",)  # the model parts that carry adapters (unet, te1, te2, te)
    gradient_checkpointing: bool = False
    base_model_path: str | None = None  # the checkpoint / diffusion-model file the base weights came from
    prediction_type: str | None = None  # "eps", "v", "flow" (modelspec writes eps and v)
    output_name: str | None = None  # the file's name when the trainer chooses it (autosaves)
    autosave_prefix: str | None = None
    resume_from: str | None = None  # the adapter a resumed run continued from
    resumed_step: int | None = None
    session_id: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    final_loss: float | None = None
    comment: str = "trained in ComfyUI with hadakron"
    extra: Mapping[str, str] = field(default_factory=dict)  # further keys as given (e.g. objective options)


def network_args_metadata(network: NetworkConfig) -> dict[str, str]:
    """Every network argument of `network` as `ss_network_args` strings (None-valued ones left out)."""
    out: dict[str, str] = {"algo": network.algo}
    for key in NetworkConfig._ARG_TYPES:
        if key == "algo" or (key in LOKR_ARGS and network.algo != "lokr"):
            continue
        value = getattr(network, key)
        if value is None:
            continue
        out[key] = network_arg_text(key, value, flags=("False", "True"))
    return out


def optimizer_args(train: TrainConfig) -> dict[str, object]:
    """The keyword arguments `build_optimizer` passes besides lr, for the configured optimizer."""
    if train.optimizer.lower() == "sgd":
        return {"momentum": train.momentum, "weight_decay": train.weight_decay}
    args: dict[str, object] = {"weight_decay": train.weight_decay, "betas": tuple(train.betas), "eps": train.eps}
    if train.optimizer.lower() == "adamwschedulefree":
        args["warmup_steps"] = train.warmup_steps
    return args


def optimizer_metadata(train: TrainConfig) -> str:
    """`ss_optimizer` as sd-scripts writes it: `module.Class(k=v,...)`."""
    name = _optimizer_choice(train.optimizer)
    args = ",".join(f"{k}={v}" for k, v in optimizer_args(train).items())
    return OPTIMIZER_CLASSES.get(name, name) + (f"({args})" if args else "")


def _optimizer_choice(name: str) -> str:
    """The canonical optimizer name (installed or not: reading a file needs no optimizer package)."""
    tail = str(name).rsplit(".", 1)[-1]
    for choice in (*BUILTIN_OPTIMIZERS, *OPTIONAL_OPTIMIZERS):
        if choice.lower() == tail.lower():
            return choice
    raise ValueError(f"unknown optimizer {name!r}; expected one of {[*BUILTIN_OPTIMIZERS, *OPTIONAL_OPTIMIZERS]}")


def parse_optimizer(value: str) -> tuple[str, dict[str, object]]:
    """(canonical name, kwargs) from an `ss_optimizer` string such as `torch.optim.adamw.AdamW(weight_decay=0.01)`."""
    text = value.strip()
    head, _, rest = text.partition("(")
    kwargs: dict[str, object] = {}
    if rest:
        try:
            call = ast.parse(f"f({rest}", mode="eval").body
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}  # type: ignore[attr-defined]
        except (SyntaxError, ValueError):
            raise ValueError(f"ss_optimizer: {value!r} is not 'module.Class(name=value,...)'") from None
    return _optimizer_choice(head), kwargs


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """Tags per caption as sd-scripts counts them: split at commas, stripped, lower-cased, empty ones skipped."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in str(caption).split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def bucket_info(sizes: Sequence[tuple[int, int]]) -> dict[str, object]:
    """sd-scripts' `bucket_info`: `{"buckets": {i: {"resolution": [w, h], "count": n}}}`, sizes in sorted order."""
    counts: dict[tuple[int, int], int] = {}
    for size in sizes:
        counts[tuple(size)] = counts.get(tuple(size), 0) + 1
    return {"buckets": {str(i): {"resolution": list(size), "count": counts[size]}
                        for i, size in enumerate(sorted(counts))}}


def largest_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The sample size with the most pixels (the first of equals), or None without samples."""
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def legacy_model_hash(path: str | os.PathLike) -> str:
    """sd-scripts' `model_hash` (`ss_sd_model_hash`): sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _or_none(value: object) -> object:
    """sd-scripts writes an lr that was not given as the string None."""
    return "None" if value is None else value


def _epochs(train: TrainConfig, samples: int, steps: int) -> int:
    per_epoch = max(1, math.ceil(samples / train.batch_size))
    return math.ceil(steps * train.grad_accum_steps / per_epoch)


def training_metadata(
    network: NetworkConfig,
    train: TrainConfig,
    run: RunFacts,
    *,
    module_ranks: Mapping[str, int] | None = None,
    module_alphas: Mapping[str, float] | None = None,
    tensors=None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """Every network and training argument as sd-scripts' `ss_*` keys, plus modelspec and `hadakron.*` keys (all str).

    With `tensors` the sshs hashes are added over the final `ss_*` keys (`hadakron.io.build_metadata`).
    """
    now = time.time() if timestamp is None else timestamp
    samples = len(run.sample_sizes)
    size = largest_size(run.sample_sizes)
    training: dict[str, object] = {
        "session_id": run.session_id, "training_started_at": run.started_at,
        "training_finished_at": run.finished_at if run.finished_at is not None else now,
        "output_name": run.output_name,
        "learning_rate": train.learning_rate, "unet_lr": _or_none(train.unet_lr),
        "text_encoder_lr": _or_none(train.te_lr),
        "num_train_images": samples, "num_reg_images": 0,
        "num_batches_per_epoch": math.ceil(samples / train.batch_size) if samples else None,
        "num_epochs": _epochs(train, samples, train.steps) if samples else None,
        "epoch": _epochs(train, samples, run.step) if samples else None,
        "steps": run.step, "max_train_steps": train.steps,
        "gradient_checkpointing": run.gradient_checkpointing,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "lr_warmup_steps": train.warmup_steps, "lr_scheduler": train.scheduler,
        "network_dropout": "None",
        "mixed_precision": MIXED_PRECISION.get(train.dtype, train.dtype), "full_fp16": False,
        "seed": train.seed, "optimizer": optimizer_metadata(train), "max_grad_norm": train.max_grad_norm,
        "train_batch_size": train.batch_size, "batch_size_per_device": train.batch_size,
        "total_batch_size": train.batch_size * train.grad_accum_steps,
        "resolution": f"({size[0]}, {size[1]})" if size else None,
        "enable_bucket": True, "color_aug": False, "flip_aug": False, "random_crop": False,
        "shuffle_caption": False,
        "dataset_dirs": {DATASET_NAME: {"n_repeats": 1, "img_count": samples}} if samples else {},
        "reg_dataset_dirs": {},
        "tag_frequency": {DATASET_NAME: tag_frequency(run.captions)} if run.captions else {},
        "bucket_info": bucket_info(run.sample_sizes),
        "training_comment": run.comment,
    }
    if run.base_model_path:
        training["sd_model_name"] = os.path.basename(run.base_model_path)
        training["sd_model_hash"] = legacy_model_hash(run.base_model_path)
    training = {k: v for k, v in training.items() if v is not None}
    meta = build_metadata(
        algorithm=network.algo, family=run.family, network_dim=network.network_dim,
        network_alpha=network.network_alpha, conv_dim=network.conv_dim, conv_alpha=network.conv_alpha,
        factor=network.factor, use_tucker=network.use_tucker, decompose_both=network.decompose_both,
        module_ranks=module_ranks, module_alphas=module_alphas, network_args=network_args_metadata(network),
        training=training, resolution=f"{size[0]}x{size[1]}" if size else None, timestamp=now,
    )
    prediction = PREDICTION_TYPES.get(str(run.prediction_type).lower())
    if prediction:
        meta["modelspec.prediction_type"] = prediction
    meta.update({
        "hadakron.step": str(run.step),
        "hadakron.parts": json.dumps(list(run.parts)),
        "hadakron.save_every_n_steps": str(train.save_every),
        "hadakron.resume_from": run.resume_from or "None",
    })
    if run.autosave_prefix is not None:
        meta["hadakron.autosave_prefix"] = run.autosave_prefix
    if run.resumed_step is not None:
        meta["hadakron.resumed_step"] = str(run.resumed_step)
    if run.final_loss is not None:
        meta["hadakron.final_loss"] = repr(float(run.final_loss))
    meta.update({k: str(v) for k, v in run.extra.items()})
    if tensors is not None:
        from hadakron.io.metadata import with_hashes
        meta = with_hashes(tensors, meta)
    return meta


# ---------------------------------------------------------------------------------------- reading back
def saved_network_args(metadata: Mapping[str, str], *, source: str = "adapter") -> dict[str, str]:
    """`ss_network_args` as a dict of strings ({} when absent); ValueError naming the file if it is no JSON object."""
    raw = metadata.get("ss_network_args", "") or "{}"
    try:
        args = json.loads(raw)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise ValueError(f"{source}: metadata 'ss_network_args' is not a JSON object: {raw[:200]!r}")
    return {str(k): str(v) for k, v in args.items()}


def saved_algorithm(metadata: Mapping[str, str]) -> str | None:
    """The algorithm a file names: `hadakron.algorithm`, else the `ss_network_args` algo, else `ss_network_module`."""
    if metadata.get("hadakron.algorithm"):
        return metadata["hadakron.algorithm"]
    try:
        algo = json.loads(metadata.get("ss_network_args", "") or "{}").get("algo")
    except (ValueError, AttributeError):
        algo = None
    if algo:
        return str(algo)
    module = metadata.get("ss_network_module", "")
    return {"networks.loha": "loha", "networks.lokr": "lokr"}.get(module)


def _number(metadata: Mapping[str, str], key: str, kind: type, source: str):
    raw = metadata.get(key)
    if raw is None or raw.strip() in ("", "None"):
        return None
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise ValueError(f"{source}: metadata {key!r} = {raw!r} is not a {kind.__name__}") from None


def network_config_from_metadata(metadata: Mapping[str, str], *, source: str = "adapter") -> NetworkConfig:
    """The NetworkConfig a file was trained with, from `ss_network_args`, `ss_network_dim` and `ss_network_alpha`."""
    args = {k: v for k, v in saved_network_args(metadata, source=source).items() if k in NetworkConfig._ARG_TYPES}
    return NetworkConfig.from_network_args(
        args, algo=saved_algorithm(metadata), network_dim=_number(metadata, "ss_network_dim", int, source),
        network_alpha=_number(metadata, "ss_network_alpha", float, source))


def train_config_from_metadata(metadata: Mapping[str, str], *, source: str = "adapter") -> TrainConfig:
    """The TrainConfig a file was trained with, from its `ss_*` keys (and `hadakron.save_every_n_steps`)."""
    kw: dict[str, object] = {}
    ints = {"steps": "ss_max_train_steps", "batch_size": "ss_batch_size_per_device", "seed": "ss_seed",
            "warmup_steps": "ss_lr_warmup_steps", "grad_accum_steps": "ss_gradient_accumulation_steps",
            "save_every": "hadakron.save_every_n_steps"}
    floats = {"learning_rate": "ss_learning_rate", "unet_lr": "ss_unet_lr", "te_lr": "ss_text_encoder_lr",
              "max_grad_norm": "ss_max_grad_norm"}
    for name, key in ints.items():
        kw[name] = _number(metadata, key, int, source)
    for name, key in floats.items():
        kw[name] = _number(metadata, key, float, source)
    if metadata.get("ss_lr_scheduler"):
        kw["scheduler"] = metadata["ss_lr_scheduler"]
    precision = metadata.get("ss_mixed_precision")
    if precision:
        kw["dtype"] = {v: k for k, v in MIXED_PRECISION.items()}.get(precision, precision)
    if metadata.get("ss_optimizer"):
        kw["optimizer"], opt_args = parse_optimizer(metadata["ss_optimizer"])
        for name in ("weight_decay", "eps", "momentum"):
            if name in opt_args:
                kw[name] = float(opt_args[name])  # type: ignore[arg-type]
        if "betas" in opt_args:
            kw["betas"] = tuple(float(b) for b in opt_args["betas"])  # type: ignore[union-attr]
    return TrainConfig(**{k: v for k, v in kw.items() if v is not None or k in ("unet_lr", "te_lr")})

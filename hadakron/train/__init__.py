"""Training LoHa/LoKr adapters on diffusion models, in pure torch: objectives, optimizers, schedules, the loop, resume.

`train(network, model_call, batches, objective, config, callbacks)` is the entry point (see loop.py).
"""
from hadakron.train.data import (
    Batch, BatchSource, LatentDataset, bucket_summary, pair_conditioning, shape_buckets, split_batches,
)
from hadakron.train.inference_tensors import autograd_safe_weights, normal_copy, storage_alias
from hadakron.train.loop import (
    ResumeState,
    TrainCallbacks,
    TrainConfig,
    TrainResult,
    TrainSnapshot,
    micro_step_seed,
    train,
    trainable_parameters,
)
from hadakron.train.objectives import (
    DiffusionObjective,
    FlowMatchingObjective,
    ModelSamplingObjective,
    Sample,
    min_snr_weight,
    scaled_linear_alphas_cumprod,
    shift_timesteps,
)
from hadakron.train.optimizers import available_optimizers, build_optimizer
from hadakron.train.resume import resume_step
from hadakron.train.schedules import SCHEDULERS, lr_factor
from hadakron.train.state import (
    TrainingStateError,
    apply_training_state,
    read_training_state,
    sidecar_path,
    training_state,
    write_training_state,
)

__all__ = [
    "Batch", "BatchSource", "LatentDataset", "bucket_summary", "pair_conditioning", "shape_buckets", "split_batches",
    "ResumeState", "TrainCallbacks", "TrainConfig", "TrainResult",
    "TrainSnapshot", "micro_step_seed", "train", "trainable_parameters", "DiffusionObjective",
    "FlowMatchingObjective", "ModelSamplingObjective", "Sample", "min_snr_weight", "scaled_linear_alphas_cumprod",
    "shift_timesteps", "available_optimizers", "build_optimizer", "resume_step", "SCHEDULERS", "lr_factor",
    "TrainingStateError", "apply_training_state", "read_training_state", "sidecar_path", "training_state",
    "write_training_state", "autograd_safe_weights", "normal_copy", "storage_alias",
]

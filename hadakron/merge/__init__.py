"""Fold adapters into checkpoints (bake), combine adapters exactly, convert adapters between forms and layouts.

- `bake_checkpoint(base, [(AdapterFile, strength)], out)`: W' = W + sum s_i dW_i, streamed, atomic.
- `combine([(AdapterFile, strength)], rank=None)`: one LoRA with exactly the weighted sum (or best rank-k).
- `to_lora(AdapterFile, rank=None)`: LoHa/LoKr -> LoRA; `convert_layout(AdapterFile, layout)`: lossless renaming.
"""
from hadakron.merge.bake import BakeReport, Patch, bake_checkpoint, baked_weight, plan_patches
from hadakron.merge.checkpoint_stream import OutputExistsError, atomic_output, rewrite_checkpoint
from hadakron.merge.checkpoint_targets import CheckpointIndex, WeightTarget, index_checkpoint
from hadakron.merge.combine import CombinedModule, CombineResult, combine, natural_shape
from hadakron.merge.convert import convert_layout, to_lora
from hadakron.merge.low_rank import LowRankResult, reduce_pair, stack_pairs

__all__ = [
    "BakeReport", "Patch", "bake_checkpoint", "baked_weight", "plan_patches",
    "OutputExistsError", "atomic_output", "rewrite_checkpoint",
    "CheckpointIndex", "WeightTarget", "index_checkpoint",
    "CombinedModule", "CombineResult", "combine", "natural_shape",
    "convert_layout", "to_lora",
    "LowRankResult", "reduce_pair", "stack_pairs",
]

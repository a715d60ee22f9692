"""Trainable LoHa and LoKr nn.Modules: the additive bypass term beside a frozen Linear/Conv2d.

`LoHa.for_layer(...)`, `LoKr.for_layer(...)` build fresh adapters (dW = 0); `AdapterModule.from_params`
rebuilds any file's module from tensor shapes; `file_state_dict()` writes it back. Math: `hadakron.ops`.
"""
from hadakron.adapters.base import AdapterModule
from hadakron.adapters.layer import LayerSpec
from hadakron.adapters.loha import LoHa
from hadakron.adapters.lokr import LoKr

__all__ = ["AdapterModule", "LayerSpec", "LoHa", "LoKr"]

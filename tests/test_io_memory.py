"""An in-memory AdapterFile (a trainer's output, path None) answers size_bytes and carries its training state."""
import torch

from hadakron.io import AdapterFile


def test_in_memory_adapter_size_and_state():
    tensors = {"lora_unet_x.lokr_w1": torch.zeros(4, 8), "lora_unet_x.alpha": torch.tensor(2.0, dtype=torch.float16)}
    state = ({"step": torch.tensor(3)}, {"hadakron.step": "3"})
    f = AdapterFile(path=None, tensors=tensors, metadata={}, training_state=state)
    assert f.size_bytes == 4 * 8 * 4 + 2
    assert f.training_state is state
    assert AdapterFile(path=None, tensors={}, metadata={}).training_state is None

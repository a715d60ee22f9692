"""A read adapter owns its tensors: rewriting or truncating its file in place afterwards (what the loader's cache
meets when a tool overwrites a file) changes nothing in memory and cannot kill the process. safetensors' own
`get_tensor` hands out views of a shared mmap: the values would follow the file, and a truncated file raises
SIGBUS at the next access. Run in a forked child, so a SIGBUS fails the test instead of killing pytest."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from hadakron.io import read_adapter, write_adapter
from fault_helpers import forked, needs_fork

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@needs_fork
@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_a_read_adapter_survives_its_file_changing_in_place(tmp_path, how):
    path = tmp_path / "a.safetensors"
    write_adapter(path, {f"{Q}.lokr_w1": torch.ones(4, 4), f"{Q}.lokr_w2": torch.full((160, 160), 2.0),
                         f"{Q}.alpha": torch.tensor(1.0)})
    out_r, out_w = os.pipe()

    def work():
        adapter = read_adapter(path)
        if how == "truncate":
            os.truncate(path, 64)
        else:
            with open(path, "r+b") as f:
                f.seek(-160 * 160 * 4, 2)
                f.write(b"\0" * (160 * 160 * 4))
        sums = (float(adapter.tensors[f"{Q}.lokr_w2"].sum()), float(adapter.modules[Q]["lokr_w2"].sum()))
        os.write(out_w, repr(sums).encode())
    pid = forked(work)
    status = os.waitpid(pid, 0)[1]
    os.close(out_w)
    printed = os.read(out_r, 1000).decode()
    os.close(out_r)
    assert not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS), \
        "SIGBUS: the adapter's tensors were views of the file's mmap"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert printed == repr((2.0 * 160 * 160, 2.0 * 160 * 160))  # the values read, not the file's new bytes

"""A read adapter owns its tensors: rewriting or truncating its file in place afterwards (what the loader's cache
meets when a tool overwrites a file) changes nothing in memory and cannot kill the process. safetensors' own
`get_tensor` hands out views of a shared mmap: the values would follow the file, and a truncated file raises
SIGBUS at the next access. Run in a child process, so a SIGBUS fails the test instead of killing pytest."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import os, sys, torch
    from hadakron.io import read_adapter, write_adapter
    path, how = sys.argv[1], sys.argv[2]
    Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    write_adapter(path, {Q + ".lokr_w1": torch.ones(4, 4), Q + ".lokr_w2": torch.full((160, 160), 2.0),
                         Q + ".alpha": torch.tensor(1.0)})
    adapter = read_adapter(path)
    if how == "truncate":
        os.truncate(path, 64)
    else:
        with open(path, "r+b") as f:
            f.seek(-160 * 160 * 4, 2)
            f.write(b"\\x00" * (160 * 160 * 4))
    print(float(adapter.tensors[Q + ".lokr_w2"].sum()), float(adapter.modules[Q]["lokr_w2"].sum()))
""")


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_a_read_adapter_survives_its_file_changing_in_place(tmp_path, how):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "a.safetensors"), how],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != -signal.SIGBUS, "SIGBUS: the adapter's tensors were views of the file's mmap"
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(2.0 * 160 * 160)] * 2  # the values read, not the file's new bytes

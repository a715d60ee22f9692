"""hadakron.io writing: bit-identical round trips, byte compatibility with safetensors, atomic and no-clobber."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hadakron.io import read_adapter, read_metadata, write_adapter
from hadakron.io import safetensors_format

MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{MODULE}.hada_w1_a": torch.randn(64, 8, generator=g),                       # fp32
        f"{MODULE}.hada_w1_b": torch.randn(8, 64, generator=g).to(torch.float16),     # fp16
        f"{MODULE}.hada_w2_a": torch.randn(64, 8, generator=g).to(torch.bfloat16),    # bf16
        f"{MODULE}.hada_w2_b": torch.randn(8, 64, generator=g).to(torch.float64),
        f"{MODULE}.alpha": torch.tensor(4.0),                                          # 0-d fp32
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(8, dtype=torch.int64),  # int64 alpha
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.randn(4, 4, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w2": torch.randn(16, 32, generator=g),
    }


def _bits(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor, computed independently of the code under test."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_write_then_read_is_bit_identical(tmp_path):
    tensors = _tensors()
    meta = {"ss_network_module": "networks.loha", "note": "é ünïcode \"quoted\"\nline"}
    out = write_adapter(tmp_path / "a.safetensors", tensors, meta)
    assert out == tmp_path / "a.safetensors"
    back = read_adapter(out)
    assert back.metadata == meta
    assert read_metadata(out) == meta
    assert set(back.tensors) == set(tensors)
    for k, t in tensors.items():
        r = back.tensors[k]
        assert r.dtype == t.dtype and r.shape == t.shape, k
        assert _bits(r) == _bits(t), k
    assert back.tensors[f"{MODULE}.alpha"].dim() == 0
    assert back.tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"].dtype == torch.int64
    # safetensors itself reads the same thing
    loaded = safetensors.torch.load_file(out)
    assert all(_bits(loaded[k]) == _bits(t) for k, t in tensors.items())


def test_bytes_equal_safetensors_save_and_modules_are_grouped(tmp_path):
    tensors = _tensors()
    meta = {"ss_note": 'é "q"\n\x01\u2028\x7f\t\\ / \U0001F600'}  # one key: safetensors orders several at random
    out = write_adapter(tmp_path / "b.safetensors", tensors, meta)
    assert out.read_bytes() == safetensors.torch.save(tensors, meta)
    back = read_adapter(out)
    assert set(back.modules) == {MODULE, "lora_te1_text_model_encoder_layers_0_mlp_fc1"}
    assert set(back.modules[MODULE]) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert back.problems == []


def test_noncontiguous_grad_and_empty_metadata(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()  # not contiguous
    w = torch.ones(2, 2, requires_grad=True)
    out = write_adapter(tmp_path / "c.safetensors", {"x.lokr_w1": t, "x.lokr_w2": w * 2, "x.alpha": torch.tensor(1.0)}, None)
    back = read_adapter(out)
    assert back.metadata == {}
    assert back.tensors["x.lokr_w1"].tolist() == [[0.0, 4.0, 8.0], [1.0, 5.0, 9.0], [2.0, 6.0, 10.0], [3.0, 7.0, 11.0]]
    assert back.tensors["x.lokr_w2"].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_metadata_values_must_be_str(tmp_path):
    with pytest.raises(TypeError, match="ss_network_dim"):
        write_adapter(tmp_path / "m.safetensors", {"a.alpha": torch.tensor(1.0)}, {"ss_network_dim": 8})
    with pytest.raises(TypeError, match="'bad'"):
        write_adapter(tmp_path / "m.safetensors", {"bad": [1, 2]}, {})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="keep.safetensors.*overwrite"):
        write_adapter(target, {"a.alpha": torch.tensor(1.0)}, {})
    assert target.read_bytes() == b"precious"
    write_adapter(target, {"a.alpha": torch.tensor(2.0)}, {}, overwrite=True)
    assert read_adapter(target).tensors["a.alpha"].item() == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_file_mode_is_not_private(tmp_path):
    out = write_adapter(tmp_path / "mode.safetensors", {"a.alpha": torch.tensor(1.0)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_error_midway_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch, exc):
    written = []
    real = safetensors_format.write_tensor

    def flaky(f, t):
        if written:
            raise exc
        written.append(t)
        real(f, t)

    monkeypatch.setattr(safetensors_format, "write_tensor", flaky)
    new = tmp_path / "new.safetensors"
    with pytest.raises(type(exc)):
        write_adapter(new, _tensors(), {})
    assert written and not new.exists()
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"old content")
    written.clear()
    with pytest.raises(type(exc)):
        write_adapter(old, _tensors(), {}, overwrite=True)
    assert old.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]  # no temp files left


_CHILD = textwrap.dedent("""
    import sys, time, torch
    from hadakron.io import safetensors_format, write_adapter
    real = safetensors_format.write_tensor
    def slow(f, t):
        real(f, t)
        f.flush()
        print("WRITING", flush=True)
        time.sleep(30)
    safetensors_format.write_tensor = slow
    write_adapter(sys.argv[1], {"a.lokr_w1": torch.ones(256, 256), "a.lokr_w2": torch.ones(256, 256)}, {})
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_writer_leaves_no_output_file(tmp_path, sig):
    target = tmp_path / "killed.safetensors"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "WRITING", child.stderr.read()
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # really mid-write
        child.send_signal(sig)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not target.exists()
    if sig == signal.SIGINT:  # KeyboardInterrupt: the writer removes its temp file too
        assert child.returncode != 0
        assert list(tmp_path.iterdir()) == []

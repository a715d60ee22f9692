"""CLI: `hadakron merge|combine|convert` write what the library computes, refuse to overwrite, and exit 0/1/2."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hadakron.cli import main
from hadakron.io import read_adapter
from test_merge_fixtures import C, loha, lokr, make_checkpoint, ref_delta, save_adapter

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
QW = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture()
def files(tmp_path):
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(base)
    pa, pb = loha(C, C, 2, 1.0, seed=1), lokr(4, 4, 4, 4, seed=2, w2="lowrank", r=2, alpha=2.0)
    save_adapter(tmp_path / "a.safetensors", {Q: pa})
    save_adapter(tmp_path / "b.safetensors", {Q: pb})
    return tmp_path, base, tensors, pa, pb


def test_merge_writes_baked_checkpoint_and_refuses_overwrite(files, capsys):
    d, base, tensors, pa, pb = files
    out = d / "out.safetensors"
    assert main(["merge", str(base), f"{d / 'a.safetensors'}:0.5", f"{d / 'b.safetensors'}:-1", "-o", str(out)]) == 0
    got = load_file(str(out))[QW].double()
    want = tensors[QW].double() + 0.5 * ref_delta(pa, (C, C)) - ref_delta(pb, (C, C))
    assert (got - want).abs().max() <= 2e-3 * (1 + want.abs().max())
    printed = capsys.readouterr().out
    assert "a.safetensors @ 0.5: 1 modules applied, 0 unmatched" in printed and "b.safetensors @ -1" in printed
    before = out.read_bytes()
    assert main(["merge", str(base), str(d / "a.safetensors"), "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["merge", str(base), str(d / "a.safetensors"), "-o", str(out), "--force", "--quiet"]) == 0
    got = load_file(str(out))[QW].double()
    want = tensors[QW].double() + ref_delta(pa, (C, C))
    assert (got - want).abs().max() <= 2e-3 * (1 + want.abs().max())


def test_merge_failures_and_usage(files, capsys):
    d, base, _, _, _ = files
    assert main(["merge", str(base), str(d / "missing.safetensors"), "-o", str(d / "o.safetensors")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["merge", str(base), str(d / "a.safetensors")]) == 2  # no -o
    assert main(["merge", str(d / "nope.safetensors"), str(d / "a.safetensors"), "-o", str(d / "o.safetensors")]) == 1
    assert not (d / "o.safetensors").exists()
    assert main(["merge", "--help"]) == 0
    assert "W' = W" in capsys.readouterr().out


def test_combine_cli_exact_and_rank(files, capsys):
    d, _, _, pa, pb = files
    out = d / "c.safetensors"
    assert main(["combine", str(d / "a.safetensors"), f"{d / 'b.safetensors'}:0.25", "-o", str(out)]) == 0
    m = read_adapter(out).modules[Q]
    r = m["lora_down.weight"].shape[0]
    got = m["lora_up.weight"].double() @ m["lora_down.weight"].double() * float(m["alpha"]) / r
    want = ref_delta(pa, (C, C)) + 0.25 * ref_delta(pb, (C, C))
    assert (got - want).norm() <= 1e-5 * want.norm()
    assert "exact" in capsys.readouterr().out
    assert main(["combine", str(d / "a.safetensors"), "-o", str(out), "--rank", "2"]) == 1  # exists
    assert main(["combine", str(d / "a.safetensors"), "-o", str(out), "--rank", "2", "--force"]) == 0
    assert "relative Frobenius error" in capsys.readouterr().out
    assert read_adapter(out).modules[Q]["lora_down.weight"].shape[0] == 2
    assert main(["combine", str(d / "a.safetensors"), "-o", str(d / "z.safetensors"), "--rank", "0"]) == 1


def test_convert_cli(files, capsys):
    d, _, _, pa, _ = files
    out = d / "comfy.safetensors"
    assert main(["convert", str(d / "a.safetensors"), "-o", str(out), "--layout", "comfyui"]) == 0
    t = read_adapter(out).tensors
    assert torch.equal(t["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.hada_w1_a"], pa["hada_w1_a"])
    lo = d / "lora.safetensors"
    assert main(["convert", str(d / "a.safetensors"), "-o", str(lo), "--to-lora"]) == 0
    m = read_adapter(lo).modules[Q]
    assert m["lora_down.weight"].shape[0] == 4  # LoHa rank 2 x 2
    assert main(["convert", str(d / "a.safetensors"), "-o", str(lo), "--to-lora"]) == 1  # refuses to overwrite
    assert main(["convert", str(d / "a.safetensors"), "-o", str(d / "x.safetensors"), "--layout", "peft", "--rank", "2"]) == 1
    assert main(["convert", str(d / "a.safetensors"), "-o", str(d / "x.safetensors")]) == 2  # neither mode
    assert main(["convert", str(d / "a.safetensors"), "-o", str(d / "x.safetensors"), "--layout", "peft", "--to-lora"]) == 2
    assert not (d / "x.safetensors").exists()

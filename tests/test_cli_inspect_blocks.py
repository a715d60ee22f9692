"""`hadakron inspect --blocks`: ||alpha/rank * dW||_F per block from the file's bytes (no torch), against the dense
float64 dW of hadakron.ops.delta_weight summed per block; f32/f16/bf16 factors; the JSON form; a torch-free process."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import safetensors.torch
import torch

from hadakron.arch import SDXL
from hadakron.cli import main
from hadakron.ops import delta_weight

G = torch.Generator().manual_seed(5)


def _r(*shape, dtype=torch.float32):
    return (torch.randn(*shape, generator=G, dtype=torch.float64) * 0.3).to(dtype)


# kohya name -> (part, dotted) for the references
MODULES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_k"),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": ("unet", "middle_block.1.transformer_blocks.0.attn2.to_v"),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": ("te1", "text_model.encoder.layers.0.mlp.fc1"),
}


def _file(tmp_path):
    t = {}
    q, k, v, te = MODULES
    t |= {f"{q}.hada_w1_a": _r(640, 4, dtype=torch.float16), f"{q}.hada_w1_b": _r(4, 640, dtype=torch.float16),
          f"{q}.hada_w2_a": _r(640, 4, dtype=torch.float16), f"{q}.hada_w2_b": _r(4, 640, dtype=torch.float16),
          f"{q}.alpha": torch.tensor(2.0)}
    t |= {f"{k}.lokr_w1": _r(8, 8), f"{k}.lokr_w2_a": _r(80, 2), f"{k}.lokr_w2_b": _r(2, 80), f"{k}.alpha": torch.tensor(1.0)}
    t |= {f"{v}.lokr_w1": _r(4, 16, dtype=torch.bfloat16), f"{v}.lokr_w2": _r(320, 128, dtype=torch.bfloat16)}
    t |= {f"{te}.hada_w1_a": _r(3072, 2), f"{te}.hada_w1_b": _r(2, 768), f"{te}.hada_w2_a": _r(3072, 2),
          f"{te}.hada_w2_b": _r(2, 768), f"{te}.alpha": torch.tensor(1.0)}
    path = tmp_path / "blocks.safetensors"
    safetensors.torch.save_file(t, str(path))
    return path, t


def _reference(tensors) -> dict[str, float]:
    acc: dict[str, float] = {}
    for key, (part, dotted) in MODULES.items():
        params = {n.split(".", 1)[1]: x.to(torch.float64) for n, x in tensors.items() if n.startswith(key + ".")}
        n = float(torch.linalg.vector_norm(delta_weight(params, dtype=torch.float64).reshape(-1)))
        block = SDXL.block_of(part, dotted)
        acc[block] = acc.get(block, 0.0) + n * n
    return {b: math.sqrt(v) for b, v in acc.items()}


def test_json_blocks_match_dense_norms(tmp_path, capsys):
    path, tensors = _file(tmp_path)
    assert main(["inspect", str(path), "--json", "--blocks"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    unet = [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)] + ["OTHER"]
    assert [(c["part"], c["block"]) for c in blocks] == [("unet", b) for b in unet] + [("te1", "TE1")]
    want = _reference(tensors)
    for c in blocks:
        assert math.isclose(c["norm"], want.get(c["block"], 0.0), rel_tol=1e-9, abs_tol=1e-12), (c, want)
        assert c["modules"] == {"IN04": 2, "M00": 1, "TE1": 1}.get(c["block"], 0) and c["exact"]


def test_text_bars(tmp_path, capsys):
    path, tensors = _file(tmp_path)
    assert main(["inspect", str(path), "--blocks"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("||alpha/rank * dW||_F per block"):].splitlines()
    assert lines[0] == "||alpha/rank * dW||_F per block (SDXL, strength 1; exact from the factors)"
    want = _reference(tensors)
    top = max(want.values())
    bars = {m.group(1): m for m in (re.match(r"^\S+ (\S+)\s+([#.]{30})  (\S+)", ln) for ln in lines[1:]) if m}
    assert len(bars) == 21
    for block, m in bars.items():
        if block in want:
            assert math.isclose(float(m.group(3)), want[block], rel_tol=1e-3), (block, m.group(0))
            assert m.group(2).count("#") == max(1, round(30 * want[block] / top)), m.group(0)
        else:
            assert m.group(2) == "." * 30 and m.group(3) == "-", m.group(0)


def test_blocks_without_torch(tmp_path):
    path, _ = _file(tmp_path)
    code = ("import builtins, sys; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('torch imported')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from hadakron.cli import main; sys.exit(main(['inspect', sys.argv[1], '--blocks']))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SDXL, strength 1; exact" in proc.stdout and "unet IN04" in proc.stdout

"""`hadakron inspect`: the JSON contract on kohya-layout files, the table, and bad files (exit 1, one line)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch

from hadakron.cli import main

CONTRACT_FIELDS = {"file", "size_bytes", "family", "layout", "modules", "parts", "algorithms", "ranks", "factors",
                   "tucker", "dora", "params", "dtypes", "metadata", "problems"}


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_r.g).to(dtype)


_r.g = torch.Generator().manual_seed(3)


def _loha(prefix, out, inn, r, dtype=torch.float32):
    return {f"{prefix}.hada_w1_a": _r(out, r, dtype=dtype), f"{prefix}.hada_w1_b": _r(r, inn, dtype=dtype),
            f"{prefix}.hada_w2_a": _r(out, r, dtype=dtype), f"{prefix}.hada_w2_b": _r(r, inn, dtype=dtype),
            f"{prefix}.alpha": torch.tensor(float(r))}


def _sdxl_tensors() -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    t |= _loha("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640, 4, torch.float16)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # LoHa Tucker conv 320x320x3x3, rank 4
    t |= {f"{conv}.hada_w1_a": _r(4, 320), f"{conv}.hada_w1_b": _r(4, 320), f"{conv}.hada_t1": _r(4, 4, 3, 3),
          f"{conv}.hada_w2_a": _r(4, 320), f"{conv}.hada_w2_b": _r(4, 320), f"{conv}.hada_t2": _r(4, 4, 3, 3),
          f"{conv}.alpha": torch.tensor(2.0)}
    k = "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"  # LoKr 1280x2048: w1 8x8, w2 160x256 rank 4
    t |= {f"{k}.lokr_w1": _r(8, 8), f"{k}.lokr_w2_a": _r(160, 4), f"{k}.lokr_w2_b": _r(4, 256),
          f"{k}.alpha": torch.tensor(4, dtype=torch.int64)}
    f = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k"  # LoKr full 640x640: w1 8x8, w2 80x80
    t |= {f"{f}.lokr_w1": _r(8, 8), f"{f}.lokr_w2": _r(80, 80), f"{f}.alpha": torch.tensor(1.0)}
    q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"  # LoRA rank 2 with DoRA
    t |= {f"{q}.lora_up.weight": _r(768, 2), f"{q}.lora_down.weight": _r(2, 768), f"{q}.alpha": torch.tensor(2.0),
          f"{q}.dora_scale": _r(768, 1)}
    t |= _loha("lora_te2_text_model_encoder_layers_31_mlp_fc2", 1280, 5120, 2, torch.bfloat16)
    return t


def _inspect_json(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_inspect_json_sdxl_kohya(tmp_path, capsys):
    tensors = _sdxl_tensors()
    meta = {"ss_network_module": "networks.loha", "ss_network_dim": "4", "modelspec.title": "sdxl test"}
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(tensors, str(path), meta)  # written by safetensors itself, not by hadakron
    r = _inspect_json(path, capsys)
    assert CONTRACT_FIELDS <= r.keys()
    assert r["file"] == str(path) and r["size_bytes"] == path.stat().st_size
    assert r["family"] == "sdxl" and r["layout"] == "kohya"
    assert r["modules"] == 6
    assert r["parts"] == {"unet": 4, "te1": 1, "te2": 1}
    assert r["algorithms"] == {"loha": 3, "lokr": 2, "lora": 1}
    assert r["ranks"] == {"2": 2, "4": 3, "full": 1}
    assert r["factors"] == {"8x8": 2}
    assert r["tucker"] == 1 and r["dora"] == 1
    assert r["params"] == sum(v.numel() for v in tensors.values())
    assert r["dtypes"] == {str(d).replace("torch.", ""): n for d, n in Counter(v.dtype for v in tensors.values()).items()}
    assert r["metadata"] == meta
    # the both-full LoKr stores alpha 1 while the metadata says dim 4: the ComfyUI #15114 ambiguity, one warning
    [warning] = r["problems"]
    assert warning.startswith("1 LoKr modules with both Kronecker factors full store alpha 1 "
                              "(e.g. lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k.alpha)")
    assert "network dim 4: applied scale 1.0" in warning and "try strength 0.25" in warning


def test_inspect_json_anima_and_problems(tmp_path, capsys):
    tensors = _loha("lora_unet_blocks_0_self_attn_q_proj", 2048, 2048, 2)
    tensors |= _loha("lora_unet_blocks_27_mlp_layer2", 2048, 8192, 2)
    tensors |= _loha("lora_te_layers_0_mlp_down_proj", 1024, 3072, 2)
    tensors["lora_te_layers_0_mlp_down_proj.hada_w1_a"][0, 0] = float("nan")
    del tensors["lora_unet_blocks_27_mlp_layer2.alpha"]
    path = tmp_path / "anima.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    r = _inspect_json(path, capsys)
    assert r["family"] == "anima" and r["layout"] == "kohya"
    assert r["modules"] == 3 and r["parts"] == {"unet": 2, "te": 1}
    assert r["algorithms"] == {"loha": 3} and r["ranks"] == {"2": 3}
    assert r["metadata"] == {}
    assert sorted(r["problems"]) == [
        "lora_te_layers_0_mlp_down_proj.hada_w1_a: 1 NaN and 0 Inf values out of 2048",
        "lora_unet_blocks_27_mlp_layer2.alpha: missing (loaders then use scale 1.0)",
    ]


def test_inspect_reports_unknown_family(tmp_path, capsys):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(_loha("lora_unet_not_a_layer", 8, 8, 2), str(path))
    r = _inspect_json(path, capsys)
    assert r["family"] is None and r["layout"] is None and r["parts"] == {}
    assert any("not recognised" in p for p in r["problems"])
    assert any("lora_unet_not_a_layer" in p for p in r["problems"])


def test_inspect_table(tmp_path, capsys):
    path = tmp_path / "sdxl.safetensors"
    meta = {"ss_network_module": "networks.lokr", "ss_tag_frequency": '{"x": {"a": 1}}'}
    safetensors.torch.save_file(_sdxl_tensors(), str(path), meta)
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any("ss_tag_frequency" in line for line in lines)
    assert any("2 keys (1 not shown" in line for line in lines)
    table = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    assert "sdxl" in table["family"] and "kohya" in table["family"]
    assert "6" in table["modules"] and "unet 4" in table["modules"] and "te2 1" in table["modules"]
    assert "loha 3" in table["algorithms"] and "lokr 2" in table["algorithms"]
    assert any("ss_network_module = networks.lokr" in line for line in lines)
    assert table["problems"].split()[-1] == "none"
    assert main(["inspect", str(path), "--all-metadata"]) == 0
    assert "ss_tag_frequency = {\"x\": {\"a\": 1}}" in capsys.readouterr().out


def test_bad_file_exits_1_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 50) + b'{"x": 1')  # header cut off
    assert main(["inspect", str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0]
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_over_long_file_name_is_one_line(tmp_path, capsys):
    long_name = tmp_path / ("a" * 300 + ".safetensors")  # more than any file name can be (no OSError: [Errno 36])
    deep = tmp_path.joinpath(*["b" * 200] * 30, "x.safetensors")  # each name fits, the whole path does not
    for path, what in ((long_name, "312 bytes long, more than a file name can be"), (deep, "the path is")):
        assert main(["inspect", str(path), "--json"]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hadakron inspect: error: "), lines
        assert what in lines[0] and "Errno" not in lines[0] and "OSError" not in lines[0]
        assert len(lines[0]) < 300  # the path is shown cut short


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["inspect"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out


def test_real_process_bad_file_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not tensors at all")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HADAKRON_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "hadakron.cli", "inspect", str(bad)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("hadakron inspect: error: ") and "not a safetensors file" in done.stderr


def test_inspect_flags_modules_that_do_not_fit_the_layer(tmp_path, capsys):
    tensors = _loha("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640, 2)
    tensors |= _loha("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", 1280, 768, 2)  # SD1.5-sized k
    path = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    r = _inspect_json(path, capsys)
    assert r["family"] == "sdxl"
    (problem,) = r["problems"]
    assert problem.startswith("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k: delta-W is 1280x768")
    assert "1280x2048" in problem

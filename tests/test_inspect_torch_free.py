"""`hadakron inspect` without torch: the same report as the torch path (`read_adapter` + `describe`) on the test
fixtures, every dtype's NaN/Inf counted as torch counts them, and a real process that never imports torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hadakron.commands.inspect import describe, inspect_file
from hadakron.io import read_adapter
from hadakron.io.header_values import decode_scalar

from helpers import one_thread, sdxl  # noqa: F401  (fixtures)
from test_cli_inspect import _loha, _sdxl_tensors

REPO = Path(__file__).resolve().parents[1]
Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _same_report(path: Path) -> dict:
    fast, slow = inspect_file(path), describe(read_adapter(path))
    assert fast == slow
    return fast


def test_fixture_reports_equal(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(_sdxl_tensors(), str(path), {"ss_network_dim": "4"})
    assert _same_report(path)["modules"] == 6
    anima = _loha("lora_unet_blocks_0_self_attn_q_proj", 2048, 2048, 2) | _loha("lora_te_layers_0_mlp_down_proj", 1024, 3072, 2)
    anima["lora_te_layers_0_mlp_down_proj.hada_w1_a"][0, 0] = float("nan")
    del anima["lora_unet_blocks_0_self_attn_q_proj.alpha"]
    path = tmp_path / "anima.safetensors"
    safetensors.torch.save_file(anima, str(path))
    assert len(_same_report(path)["problems"]) == 2
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file(_loha("lora_unet_not_a_layer", 8, 8, 2), str(path))
    assert _same_report(path)["family"] is None


def test_network_written_file_reports_equal(tmp_path, sdxl):
    from helpers import build_network

    from hadakron.io import write_adapter

    for algo in ("loha", "lokr"):
        net = build_network("sdxl", sdxl, algo=algo, network_dim=4, network_alpha=2.0, conv_dim=2)
        path = tmp_path / f"{algo}.safetensors"
        write_adapter(path, net.file_state_dict(), {"ss_network_dim": "4"})
        assert _same_report(path)["modules"] == len(net.targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)])
def test_nonfinite_counts_match_torch(tmp_path, dtype):
    if dtype is None:
        pytest.skip("this torch has no float8")
    g = torch.Generator().manual_seed(1)
    t = _loha(Q, 640, 640, 3)
    t = {k: v.to(dtype) if k.endswith(("_a", "_b")) else v for k, v in t.items()}
    a = t[f"{Q}.hada_w1_a"].float()
    a[0, :3] = float("nan")
    if dtype != getattr(torch, "float8_e4m3fn", None):  # e4m3fn has no Inf: inf casts to NaN
        a[5, 1] = float("inf")
        a[7, 2] = -float("inf")
    a.view(-1)[torch.randperm(a.numel(), generator=g)[:11]] = float("nan")
    t[f"{Q}.hada_w1_a"] = a.to(dtype)
    path = tmp_path / "nonfinite.safetensors"
    safetensors.torch.save_file(t, str(path))
    report = _same_report(path)
    assert any(p.startswith(f"{Q}.hada_w1_a: ") and "NaN" in p for p in report["problems"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, getattr(torch, "float8_e4m3fn", None),
                                   getattr(torch, "float8_e5m2", None)])
@pytest.mark.parametrize("value", [3.0, -0.5, 0.0, -0.0, 448.0, 0.015625])
def test_alpha_bytes_decode_as_torch_reads_them(dtype, value):
    if dtype is None:
        pytest.skip("this torch has no float8")
    if not dtype.is_floating_point and (value < 0 or value != int(value)):
        pytest.skip("not an integer")
    t = torch.tensor(value).to(dtype)
    from hadakron.io.safetensors_format import NAME_FROM_DTYPE
    raw = t.reshape(1).view(torch.uint8).numpy().tobytes()
    got = decode_scalar(NAME_FROM_DTYPE[dtype], raw)
    want = float(t.to(torch.float64))
    assert got == want and str(got) == str(want)  # -0.0 keeps its sign


def _run_inspect(tmp_path: Path, path: Path, *extra: str) -> subprocess.CompletedProcess:
    code = ("import json, sys\nfrom hadakron.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HADAKRON_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, "inspect", str(path), *extra], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)


def test_inspect_process_never_imports_torch(tmp_path):
    t = _sdxl_tensors()
    t[f"{Q}.hada_w2_b"][0, 0] = float("inf")
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(t, str(path))
    done = _run_inspect(tmp_path, path, "--json")
    status = json.loads(done.stderr.splitlines()[-1])
    assert status == {"rc": 0, "torch": False}
    assert json.loads(done.stdout) == describe(read_adapter(path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    done = _run_inspect(tmp_path, bad)
    assert json.loads(done.stderr.splitlines()[-1]) == {"rc": 1, "torch": False}
    assert "truncated" in done.stderr.splitlines()[0]


def test_peft_config_file_reports_equal(tmp_path):
    """A PEFT adapter whose adapter_config.json sets the scale: inspect applies it as read_adapter does."""
    dotted = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    t = {k.replace(f"{Q}.", f"base_model.model.{dotted}."): v for k, v in _loha(Q, 640, 640, 2).items()
         if not k.endswith(".alpha")}
    folder = tmp_path / "peft"
    folder.mkdir()
    safetensors.torch.save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 8}))
    report = _same_report(folder / "adapter_model.safetensors")
    assert report["layout"] == "peft" and report["tensors"] == 5  # the config's alpha is synthesized
    assert report["problems"] == []


def test_usage_errors_and_unreadable_inputs_answer_without_torch(tmp_path):
    """The other commands import torch only after their arguments and input headers were checked."""
    code = ("import sys\nfrom hadakron.cli import main\nrc = main(sys.argv[1:])\n"
            "print('RESULT', rc, 'torch' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    missing, out = str(tmp_path / "missing.safetensors"), str(tmp_path / "out.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00[1, 2] ")
    cases = [(["frobnicate"], 2), (["merge"], 2), (["combine", "-o", out], 2), (["inspect", missing], 1),
             (["merge", missing, str(bad), "-o", out], 1), (["merge", str(bad), str(bad), "-o", out], 1),
             (["combine", str(bad), "-o", out], 1), (["convert", missing, "-o", out, "--to-lora"], 1),
             (["convert", str(bad), "-o", out, "--layout", "kohya"], 1)]
    for argv, rc in cases:
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)
        assert done.stdout.split()[-3:] == ["RESULT", str(rc), "False"], (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr

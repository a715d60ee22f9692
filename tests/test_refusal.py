"""Broken modules are refused by name: the load report lists them as not applied with the reason (and warns about a
stored alpha 0 and the both-full LoKr alpha), and `hadakron merge|combine|convert` exit 1 naming them unless
`--skip-bad`, which leaves them out and says so."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hadakron.cli import main
from hadakron.load_report import build_load_report
from test_merge_fixtures import C, loha, make_checkpoint, ref_delta, save_adapter

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
KQ = "lora_unet_" + Q.replace(".", "_")
K2 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"
MODEL = {("unet", Q): (8, 8), ("unet", Q.replace("to_q", "to_k")): (8, 8)}


def _loha(alpha=2.0, r=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(r)
    p = {n: torch.randn(8, r, generator=g).to(dtype) if n.endswith("_a") else torch.randn(r, 8, generator=g).to(dtype)
         for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    if alpha is not None:
        p["alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    return p


@pytest.mark.parametrize("params,reason", [
    (_loha(dtype=torch.int32), "hada_w1_a: dtype I32, expected a floating-point dtype"),
    (_loha(alpha=-2.0), "alpha: -2 is negative"),
    (_loha(alpha=torch.tensor([2.0, 2.0])), "alpha: expected one value (0-d), found shape [2]"),
    (_loha(alpha=torch.tensor(True)), "alpha: dtype BOOL"),
    (_loha() | {"dora_scale": torch.ones(7, 1)}, "dora_scale shape [7, 1] fits neither the weight's 8 rows"),
    (_loha() | {"hada_w3_a": torch.ones(2)}, "unknown tensor 'hada_w3_a'"),
])
def test_load_report_refuses_by_name(params, reason):
    report = build_load_report({KQ: params, K2: _loha()}, {}, "sdxl", MODEL)
    assert [m.module_key for m in report.matched] == [K2]
    [u] = report.unmatched
    assert u.key == KQ and u.kind == "bad_tensors" and u.reason.startswith("refused: ") and reason in u.reason
    assert f"{KQ}: refused: " in report.to_text()


def test_integer_alpha_is_fine_and_zero_alpha_is_applied_with_a_warning():
    report = build_load_report({KQ: _loha(alpha=torch.tensor(2, dtype=torch.int64)), K2: _loha(alpha=-0.0)}, {},
                               "sdxl", MODEL)
    assert {m.module_key: m.scale for m in report.matched} == {KQ: 1.0, K2: -0.0}
    [warning] = report.problems
    assert warning.startswith(f"{K2}.alpha: -0.0 stored; applied as ComfyUI does (scale 0")


def test_both_full_lokr_alpha_warning_says_which_scale():
    full = {"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(4, 4), "alpha": torch.tensor(1.0)}
    report = build_load_report({KQ: full}, {"ss_network_dim": "32"}, "sdxl", MODEL)
    assert [m.scale for m in report.matched] == [1.0]
    [warning] = report.problems
    assert "store alpha 1" in warning and "network dim 32: applied scale 1.0" in warning
    assert "try strength 0.03125" in warning and "#15114" in warning
    # LyCORIS' own convention (alpha = dim) and a file without a stated dim are not ambiguous
    assert build_load_report({KQ: dict(full, alpha=torch.tensor(32.0))}, {"ss_network_dim": "32"}, "sdxl",
                             MODEL).problems == []
    assert build_load_report({KQ: full}, {}, "sdxl", MODEL).problems == []


@pytest.fixture()
def files(tmp_path):
    base = tmp_path / "base.safetensors"
    tensors = make_checkpoint(base)
    good = loha(C, C, 2, 1.0, seed=1)
    save_adapter(tmp_path / "good.safetensors", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": good})
    bad = {f"{KQ}.{k}": v for k, v in good.items()}
    bad[f"{K2}.hada_w1_a"] = torch.ones(C, 2, dtype=torch.int32)
    bad |= {f"{K2}.{k}": v.clone() for k, v in good.items() if k != "hada_w1_a"}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    return tmp_path, base, tensors, good


def test_cli_refuses_broken_modules_unless_skip_bad(files, capsys):
    d, base, tensors, good = files
    bad = str(d / "bad.safetensors")
    runs = {
        "merge": ["merge", str(base), bad, "-o", str(d / "merged.safetensors")],
        "combine": ["combine", bad, "-o", str(d / "combined.safetensors")],
        "convert": ["convert", bad, "-o", str(d / "converted.safetensors"), "--layout", "comfyui"],
        "to-lora": ["convert", bad, "-o", str(d / "lora.safetensors"), "--to-lora"],
    }
    for name, argv in runs.items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "1 broken module refused" in err[0] and K2 in err[0] and "dtype I32" in err[0], (name, err)
        assert "--skip-bad" in err[0]
        assert not any(p.name.startswith(("merged", "combined", "converted", "lora")) for p in d.iterdir()), name
    for name, argv in runs.items():
        assert main(argv + ["--skip-bad"]) == 0, name
        out = capsys.readouterr().out
        assert K2 in out and "dtype I32" in out, (name, out)
    merged = load_file(str(d / "merged.safetensors"))
    qw = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    want = tensors[qw].double() + ref_delta(good, (C, C))
    assert (merged[qw].double() - want).abs().max() <= 2e-3 * (1 + want.abs().max())
    assert all(torch.equal(merged[k], t) for k, t in tensors.items() if k != qw)  # only the good module applied
    converted = load_file(str(d / "converted.safetensors"))
    assert converted and not any("to_k" in k for k in converted)

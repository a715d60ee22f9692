"""`hadakron demo` runs end to end (short: 10 training steps) and its numbers say the file work was exact."""
from __future__ import annotations

from safetensors.torch import load_file

from hadakron.cli import main
from hadakron.demo import run_demo


def test_demo_runs_and_reports_exact_file_work(tmp_path):
    lines: list[str] = []
    report = run_demo(tmp_path / "demo", steps=10, echo=lines.append)
    n = report.numbers
    assert n["lokr_loss_end"] < n["lokr_loss_start"] and n["loha_loss_end"] < n["loha_loss_start"]
    assert n["bake_max_ulps"] <= 1.0  # float32 math, one rounding to fp16
    assert abs(n["baked_eval_loss"] - n["lokr_eval_loss"]) <= 0.02 * n["lokr_eval_loss"]  # baked == adapted model
    assert n["combine_exact_error"] < 1e-6 and n["to_lora_exact_error"] < 1e-6
    assert 0 < n["combine_low_rank_error"] < 1 and 0 <= n["to_lora_low_rank_error"] < 1
    assert n["layout_lossless"] == 1.0
    for path in report.files.values():
        assert path.is_file() and path.stat().st_size > 0
    assert len(load_file(str(report.files["baked"]))) == len(load_file(str(report.files["base"])))
    text = "\n".join(lines)
    for step in ("1.", "2.", "3.", "4.", "5.", "6."):
        assert f"== {step}" in text


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "-o", str(tmp_path), "--steps", "5"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

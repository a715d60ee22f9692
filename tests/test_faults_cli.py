"""`hadakron merge|combine|convert` under faults: disk full (injected, and a real 1 MiB tmpfs) exits 1 with one
line naming the output and what to do, the old output intact and no temp file left; a folder, NUL or over-long
name at the output is refused before the work; an output that is one of the inputs (same path, symlink, hard
link) is refused even with --force, the input untouched."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hadakron.cli import main
from hadakron.io import safetensors_format
from hadakron.merge import checkpoint_stream
from fault_helpers import disk_full, listing, small_filesystem, temp_files
from test_merge_fixtures import SDXL_CHECKPOINT_LAYOUT, C, loha, make_checkpoint, save_adapter

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
BIG = "first_stage_model.decoder.big.weight"  # copied untouched: makes the checkpoint 2 MiB


@pytest.fixture()
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    make_checkpoint(d / "base.safetensors", layout={**SDXL_CHECKPOINT_LAYOUT, BIG: ((1024, 1024), torch.float16)})
    save_adapter(d / "a.safetensors", {Q: loha(C, C, 2, 1.0, seed=1)})
    save_adapter(d / "big.safetensors", {Q: loha(640, 640, 128, 1.0, seed=2)})  # 1.3 MiB; combine: 2.6 MiB
    return d


def _commands(d: Path, out: Path) -> dict[str, list[str]]:
    return {"merge": ["merge", str(d / "base.safetensors"), str(d / "a.safetensors"), "-o", str(out)],
            "combine": ["combine", str(d / "big.safetensors"), "-o", str(out)],
            "convert": ["convert", str(d / "big.safetensors"), "-o", str(out), "--layout", "comfyui"]}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "Errno" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["merge", "combine", "convert"])
def test_disk_full_exits_1_with_one_line_and_keeps_the_old_output(files, tmp_path, monkeypatch, capsys, command):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.safetensors"
    out.write_bytes(b"yesterday's result")
    monkeypatch.setattr(safetensors_format, "write_tensor", disk_full(after=0)(safetensors_format.write_tensor))
    monkeypatch.setattr(checkpoint_stream, "_copy_range", disk_full(after=1)(checkpoint_stream._copy_range))
    before, inputs = listing(out_dir), listing(files)
    assert main(_commands(files, out)[command] + ["--force", "--quiet"]) == 1
    line = _error_line(capsys)
    assert f"hadakron {command}: error: {out}: no space left" in line
    assert "result.safetensors is unchanged" in line and "free some space" in line and str(out_dir) in line
    assert listing(out_dir) == before and listing(files) == inputs


@pytest.mark.parametrize("command", ["merge", "combine", "convert"])
def test_a_real_full_file_system(files, tmp_path, capsys, command):
    with small_filesystem(tmp_path / "small") as small:
        out = small / "result.safetensors"
        assert main(_commands(files, out)[command] + ["--quiet"]) == 1
        line = _error_line(capsys)
        assert f"{out}: no space left" in line and "nothing was written to result.safetensors" in line
        assert listing(small) == {} and temp_files(small) == []


@pytest.mark.parametrize("command", ["merge", "combine", "convert"])
def test_unusable_output_names_are_refused_before_the_work(files, tmp_path, monkeypatch, capsys, command):
    def never(*_):
        raise AssertionError("work started before the output was checked")
    import hadakron.io
    monkeypatch.setattr(hadakron.io, "read_adapter", never)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    cases = [(folder, "is a folder"), (tmp_path / ("x" * 300 + ".safetensors"), "bytes long"),
             (tmp_path / "bad\0name.safetensors", "NUL byte")]
    for out, words in cases:
        for force in ([], ["--force"]):
            assert main(_commands(files, out)[command] + force) == 1
            line = _error_line(capsys)
            assert words in line and (repr(str(out)) in line or str(out)[:40] in line) and len(line) < 300, line
    assert list(folder.iterdir()) == [] and temp_files(tmp_path) == []


@pytest.mark.parametrize("command", ["merge", "combine", "convert"])
def test_a_nul_or_over_long_input_path_is_one_clear_line(files, capsys, command):
    for bad, words in ((files / "a\0.safetensors", "NUL byte"), (files / ("y" * 300 + ".safetensors"), "bytes long")):
        argv = _commands(files, files / "x.safetensors")[command]
        argv[1] = str(bad)
        assert main(argv) == 1
        line = _error_line(capsys)
        assert words in line and len(line) < 300, line
    assert not (files / "x.safetensors").exists()


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
@pytest.mark.parametrize("command", ["merge", "combine", "convert"])
def test_an_output_that_is_an_input_is_refused_even_with_force(files, capsys, command, how):
    victim = {"merge": files / "base.safetensors", "combine": files / "big.safetensors",
              "convert": files / "big.safetensors"}[command]
    out = {"same path": victim, "other spelling": files / "." / ".." / files.name / victim.name,
           "symlink": files / "link.safetensors", "hard link": files / "hard.safetensors"}[how]
    if how == "symlink":
        out.symlink_to(victim)
    elif how == "hard link":
        os.link(victim, out)
    before = listing(files)
    argv = _commands(files, victim)[command]
    argv[argv.index("-o") + 1] = str(out)
    assert main(argv + ["--force"]) == 1
    line = _error_line(capsys)
    assert "is also the input" in line and str(victim) in line and "write to another file" in line
    assert listing(files) == before

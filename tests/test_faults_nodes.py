"""Save Adapter's file naming without ComfyUI (a stand-in `folder_paths` gives the output folder): every hostile
prefix (`..`, absolute, symlinks out, NUL, control characters, Windows device names, too long) is refused with
one clear message and nothing is written outside the output folder; saves racing on one prefix (threads and
processes) each get their own complete file; disk full leaves earlier saves and no temp file."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from hadakron.io import AdapterFile, read_adapter, safetensors_format
from hadakron.io.writer import OutputWriteError
from hadakron.train import read_training_state, sidecar_path
from fault_helpers import disk_full, forked, listing, needs_fork, temp_files

REPO = Path(__file__).resolve().parents[1]
Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture()
def node(tmp_path, monkeypatch):
    """nodes/save_adapter.py loaded with a stand-in `folder_paths` whose output folder is tmp_path/'output'."""
    output = tmp_path / "output"
    output.mkdir()
    fake = types.ModuleType("folder_paths")
    fake.get_output_directory = lambda: str(output)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    spec = importlib.util.spec_from_file_location("hadakron_test_save_adapter", REPO / "nodes" / "save_adapter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.test_output = output
    return module


def _adapter(seed: int, state: bool = False) -> AdapterFile:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{Q}.lokr_w1": torch.randn(4, 4, generator=g), f"{Q}.lokr_w2": torch.randn(4, 4, generator=g),
               f"{Q}.alpha": torch.tensor(1.0)}
    training = ({"step": torch.tensor(seed)}, {"hadakron.step": str(seed), "hadakron.trainstate_version": "1"}) if state else None
    return AdapterFile(path=None, tensors=tensors, metadata={"seed": str(seed)}, training_state=training)


HOSTILE = {
    "../escape": "uses '..'",
    "a/../../escape": "uses '..'",
    "..\\escape": "uses '..'",
    "/tmp/absolute": "is absolute",
    "C:/Windows/x": "is absolute",
    "C:relative": "is absolute",
    "\\\\server\\share\\x": "is absolute",
    "nul\0byte": "NUL byte",
    "new\nline": "control character",
    "tab\there": "control character",
    "CON": "reserved device name",
    "sub/nul.safetensors": "reserved device name",
    "com1": "reserved device name",
    "LPT9.tar": "reserved device name",
    "aux /x": "ends in a dot or space",
    "dots.": "ends in a dot or space",
    "what?": "Windows refuses",
    'a"b': "Windows refuses",
    "x" * 240: "bytes long",
    "d" * 256 + "/x": "bytes long",
    "": "names no file",
    "   ": "names no file",
    "folder/": "names no file",
    "./.": "names no file",
}


@pytest.mark.parametrize("prefix", list(HOSTILE), ids=[repr(p)[:30] for p in HOSTILE])
def test_hostile_prefixes_are_refused_and_nothing_is_written(node, tmp_path, prefix):
    for root, input_name in ((None, "filename_prefix"), (node.test_output, "autosave_prefix")):
        with pytest.raises(node.AdapterSaveError) as info:
            node.save_adapter(_adapter(1), prefix, input_name=input_name) if root is None else \
                node.save_tensors(prefix, _adapter(1).tensors, {}, root=root, input_name=input_name)
        text = str(info.value)
        assert "\n" not in text and text.startswith(input_name) and HOSTILE[prefix] in text, text
    assert listing(tmp_path) == {} and sorted(p.name for p in tmp_path.iterdir()) == ["output"]
    assert list(node.test_output.iterdir()) == []


def test_symlinks_out_of_the_output_folder_are_refused(node, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    loras = node.test_output / "loras"
    loras.mkdir()
    (loras / "out").symlink_to(outside, target_is_directory=True)
    with pytest.raises(node.AdapterSaveError, match="leaves the output folder"):
        node.save_adapter(_adapter(1), "out/x")
    # a dangling symlink where the first file would go: skipped, never followed
    (loras / "y_00001_.safetensors").symlink_to(outside / "y.safetensors")
    path = node.save_adapter(_adapter(2), "y")
    assert path.name == "y_00002_.safetensors" and list(outside.iterdir()) == []
    # a symlink inside the folder that stays inside is fine
    (loras / "inside").symlink_to(loras / "real", target_is_directory=True)
    (loras / "real").mkdir()
    assert node.save_adapter(_adapter(3), "inside/z").parent == (loras / "real")


def test_ordinary_names_still_save(node):
    for prefix in ("hadakron/adapter", "sub\\dir\\name", "  spaced name  ", "ünïcödé/名前", "a.b.c", "x" * 200):
        path = node.save_adapter(_adapter(1), prefix)
        assert path.is_file() and node.test_output / "loras" in path.parents
        assert path.name.endswith("_00001_.safetensors")


def test_racing_saves_on_one_prefix_threads(node, monkeypatch):
    real = safetensors_format.write_tensor
    barrier = threading.Barrier(8)
    got: dict[int, Path] = {}

    def slow(f, t):
        real(f, t)
        threading.Event().wait(0.002)
    monkeypatch.setattr(safetensors_format, "write_tensor", slow)

    def save(i):
        barrier.wait()
        got[i] = node.save_adapter(_adapter(i, state=True), "race/same")
    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 8 and len(set(got.values())) == 8
    for i, path in got.items():
        assert read_adapter(path).metadata["seed"] == str(i)
        tensors, meta = read_training_state(sidecar_path(path))
        assert int(tensors["step"]) == i  # each sidecar next to its own adapter
    assert temp_files(node.test_output) == []


@needs_fork
def test_racing_saves_on_one_prefix_processes(node):
    go_r, go_w = os.pipe()
    pids = []
    for i in range(6):
        def work(i=i):
            os.read(go_r, 1)
            node.save_adapter(_adapter(i), "race/same")
        pids.append(forked(work))
    os.write(go_w, b"x" * len(pids))
    assert [os.waitpid(p, 0)[1] for p in pids] == [0] * len(pids)
    os.close(go_r), os.close(go_w)
    files = sorted((node.test_output / "loras" / "race").glob("same_*_.safetensors"))
    assert len(files) == 6 and sorted(read_adapter(p).metadata["seed"] for p in files) == [str(i) for i in range(6)]


def test_disk_full_keeps_earlier_saves_and_leaves_no_temp(node, monkeypatch):
    first = node.save_adapter(_adapter(1, state=True), "full/x")
    before = listing(node.test_output)
    monkeypatch.setattr(safetensors_format, "write_tensor", disk_full(after=0)(safetensors_format.write_tensor))
    with pytest.raises(OutputWriteError) as info:
        node.save_adapter(_adapter(2, state=True), "full/x")
    text = str(info.value)
    assert "\n" not in text and "no space left" in text and str(first.parent) in text and "free some space" in text
    assert listing(node.test_output) == before


def test_a_file_where_a_folder_should_be(node):
    (node.test_output / "loras").mkdir()
    (node.test_output / "loras" / "taken").write_bytes(b"a file")
    with pytest.raises(node.AdapterSaveError, match="is a file, not a folder"):
        node.save_adapter(_adapter(1), "taken/x")

"""Faults while writing lose nothing: disk full (injected and a real 1 MiB tmpfs), a folder or a bad name at the
output, SIGKILL at random points (the destination is the old file or the complete new one; the next write sweeps
the dead writer's temp file but never a live one), and racing writers that each get their own complete file."""
from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hadakron.io import read_adapter, safetensors_format, write_adapter
from hadakron.io import writer
from hadakron.io.writer import OutputWriteError, atomic_write, stale_temps, write_adapter_new
from hadakron.merge import checkpoint_stream
from hadakron.merge.checkpoint_stream import rewrite_checkpoint
from fault_helpers import disk_full, forked, kill_and_reap, listing, needs_fork, small_filesystem, temp_files

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _adapter(seed: int, rank: int = 8, width: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{Q}.hada_w1_a": torch.randn(rank, width, generator=g), f"{Q}.hada_w1_b": torch.randn(rank, width, generator=g),
            f"{Q}.hada_w2_a": torch.randn(rank, width, generator=g), f"{Q}.hada_w2_b": torch.randn(rank, width, generator=g),
            f"{Q}.alpha": torch.tensor(float(rank))}


def _checkpoint(path: Path, mib: float = 2.0) -> dict[str, torch.Tensor]:
    n = int(mib * 1024 * 1024 / 2 / 256)
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.diffusion_model.big.{i}.weight": torch.randn(n // 4, 256, generator=g).half() for i in range(4)}
    tensors["model.diffusion_model.small.weight"] = torch.randn(8, 8, generator=g).half()
    save_file(tensors, str(path))
    return tensors


def _one_clear_line(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text and "Errno" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.mark.parametrize("where", ["second tensor", "fsync"])
def test_disk_full_writing_an_adapter_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, where):
    old = tmp_path / "out.safetensors"
    write_adapter(old, _adapter(1))
    before = listing(tmp_path)
    if where == "fsync":
        monkeypatch.setattr(writer.os, "fsync", disk_full(after=0)(os.fsync))
    else:
        monkeypatch.setattr(safetensors_format, "write_tensor", disk_full(after=1)(safetensors_format.write_tensor))
    for target, overwrite in ((old, True), (tmp_path / "new.safetensors", False)):
        with pytest.raises(OutputWriteError) as info:
            write_adapter(target, _adapter(2), {}, overwrite=overwrite)
        assert info.value.errno == errno.ENOSPC
        text = _one_clear_line(info.value, str(target), "no space left", str(tmp_path.resolve()), "free some space")
        assert ("unchanged" in text) == overwrite
        assert listing(tmp_path) == before  # old file byte for byte, no new file, no temp file


def test_disk_full_in_the_checkpoint_writer_thread(tmp_path, monkeypatch):
    base = tmp_path / "base.safetensors"
    _checkpoint(base, mib=1)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"the old merge")
    before = listing(tmp_path)
    monkeypatch.setattr(checkpoint_stream, "_copy_range", disk_full(after=1)(checkpoint_stream._copy_range))
    double = {"model.diffusion_model.small.weight": lambda e, t: (t * 2).contiguous()}
    with pytest.raises(OutputWriteError) as info:
        rewrite_checkpoint(base, out, double, {}, overwrite=True)
    _one_clear_line(info.value, str(out), "no space left", "merged.safetensors is unchanged", "needs 1.0 MiB")
    assert listing(tmp_path) == before


def test_real_one_mib_file_system_fills_up(tmp_path):
    """A real tmpfs of 1 MiB: ENOSPC comes from the kernel, mid-file; nothing is left behind, the old file stays."""
    base = tmp_path / "base.safetensors"
    _checkpoint(base, mib=2)
    with small_filesystem(tmp_path / "small") as small:
        old = write_adapter(small / "old.safetensors", _adapter(1))
        before = listing(small)
        with pytest.raises(OutputWriteError) as info:
            write_adapter(small / "big.safetensors", _adapter(2, rank=512, width=256))  # 2 MiB
        _one_clear_line(info.value, "big.safetensors", "no space left", "needs 2.0 MiB", "free some space")
        with pytest.raises(OutputWriteError) as info:
            write_adapter(old, _adapter(3, rank=512, width=256), overwrite=True)
        _one_clear_line(info.value, "old.safetensors is unchanged")
        with pytest.raises(OutputWriteError) as info:
            rewrite_checkpoint(base, small / "merged.safetensors", {}, {})
        _one_clear_line(info.value, "merged.safetensors", "no space left")
        assert listing(small) == before
        assert os.statvfs(small).f_bfree * os.statvfs(small).f_frsize > 900 * 1024  # the space came back
        assert torch.equal(read_adapter(old).tensors[f"{Q}.hada_w1_a"], _adapter(1)[f"{Q}.hada_w1_a"])


def test_a_folder_or_bad_name_is_refused_before_any_byte_is_written(tmp_path, monkeypatch):
    base = tmp_path / "base.safetensors"
    _checkpoint(base, mib=0.1)
    folder = tmp_path / "a_folder.safetensors"
    folder.mkdir()
    (tmp_path / "a_file").write_bytes(b"x")

    def never(*_):
        raise AssertionError("bytes were written before the output path was checked")

    monkeypatch.setattr(safetensors_format, "write_tensor", never)
    monkeypatch.setattr(checkpoint_stream, "_copy_range", never)
    cases = [(folder, errno.EISDIR, "is a folder"), (tmp_path / ("x" * 300 + ".safetensors"), errno.ENAMETOOLONG, "bytes long"),
             (tmp_path / "nul\0.safetensors", errno.EINVAL, "NUL"), (tmp_path / "a_file" / "x.safetensors", errno.ENOTDIR, "not a folder")]
    for path, code, words in cases:
        for write in (lambda p: write_adapter(p, _adapter(1), overwrite=True),
                      lambda p: rewrite_checkpoint(base, p, {}, {}, overwrite=True)):
            with pytest.raises(OutputWriteError) as info:
                write(path)
            assert info.value.errno == code
            _one_clear_line(info.value, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder.safetensors", "base.safetensors"]
    assert list(folder.iterdir()) == []


def test_a_name_near_the_limit_still_gets_a_temp_file_that_fits(tmp_path):
    long = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")  # 255 bytes: the temp name is cut
    write_adapter(long, _adapter(1))
    assert read_adapter(long).tensors.keys() == _adapter(1).keys()
    assert temp_files(tmp_path) == []


def _slow_writes(monkeypatch, seconds: float) -> None:
    real = safetensors_format.write_tensor

    def slow(f, t):
        real(f, t)
        time.sleep(seconds)
    monkeypatch.setattr(safetensors_format, "write_tensor", slow)


def _many_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{Q}_{i}.lokr_w1": torch.randn(64, 256, generator=g) for i in range(48)}  # 3 MiB in 48 writes


@needs_fork
def test_sigkill_at_random_points_never_tears_and_the_next_write_sweeps(tmp_path, monkeypatch):
    target = tmp_path / "adapter.safetensors"
    versions = [_many_tensors(seed) for seed in (1, 2)]
    write_adapter(target, versions[0])
    complete = {target.read_bytes()}
    write_adapter(tmp_path / "other.safetensors", versions[1])
    complete.add((tmp_path / "other.safetensors").read_bytes())
    (tmp_path / "other.safetensors").unlink()
    _slow_writes(monkeypatch, 0.002)
    rng = random.Random(16)
    left = 0
    for kill in range(6):
        def work():
            i = 0
            while True:
                write_adapter(target, versions[i % 2], overwrite=True)
                i += 1
        pid = forked(work)
        time.sleep(rng.uniform(0.05, 0.6))
        kill_and_reap(pid)
        assert target.read_bytes() in complete  # the old file or a complete new one, never torn
        partials = stale_temps(target)
        assert len(partials) <= 1  # each write swept the temp file of the one before
        left += len(partials)
    assert left >= 2, "the kills never landed mid-write; the test proves nothing"
    monkeypatch.undo()
    write_adapter(target, versions[1], overwrite=True)
    assert temp_files(tmp_path) == []
    assert torch.equal(read_adapter(target).tensors[f"{Q}_0.lokr_w1"], versions[1][f"{Q}_0.lokr_w1"])


@needs_fork
def test_sigkill_mid_checkpoint_rewrite_leaves_a_partial_the_next_bake_removes(tmp_path, monkeypatch):
    base = tmp_path / "base.safetensors"
    tensors = _checkpoint(base, mib=2)
    out = tmp_path / "merged.safetensors"
    real = checkpoint_stream._copy_range
    ready_r, ready_w = os.pipe()

    def slow_copy(src, dst, offset, length):
        real(src, dst, offset, length)
        dst.flush()
        os.write(ready_w, b"x")
        time.sleep(60)
    monkeypatch.setattr(checkpoint_stream, "_copy_range", slow_copy)
    pid = forked(lambda: rewrite_checkpoint(base, out, {}, {}))
    assert os.read(ready_r, 1) == b"x"
    partials = stale_temps(out)
    assert len(partials) == 1 and partials[0].name.endswith(".partial") and partials[0].stat().st_size > 256 * 1024
    kill_and_reap(pid)
    os.close(ready_r), os.close(ready_w)
    assert not out.exists() and partials[0].exists()
    monkeypatch.undo()
    rewrite_checkpoint(base, out, {}, {})
    assert temp_files(tmp_path) == []
    got = load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def _hold_a_live_write(target: Path, started: threading.Event, release: threading.Event) -> None:
    with atomic_write(target, overwrite=True) as f:
        f.write(b"half of a file")
        f.flush()
        started.set()
        release.wait(30)
        raise KeyboardInterrupt  # let the writer abandon its file: nothing must be left


def test_a_temp_file_still_being_written_is_never_swept(tmp_path):
    target = tmp_path / "adapter.safetensors"
    started, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def hold():
        try:
            _hold_a_live_write(target, started, release)
        except KeyboardInterrupt:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert started.wait(30)
        live = stale_temps(target)
        assert len(live) == 1
        write_adapter(target, _adapter(5), overwrite=True)  # sweeps, but must skip the live one
        assert live[0].exists() and live[0].read_bytes() == b"half of a file"
    finally:
        release.set()
        thread.join(30)
    assert not failures
    assert temp_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


@needs_fork
def test_a_live_writer_in_another_process_keeps_its_temp_file(tmp_path):
    target = tmp_path / "adapter.safetensors"
    ready_r, ready_w = os.pipe()

    def work():
        with atomic_write(target, overwrite=True) as f:
            f.write(b"another process is writing")
            f.flush()
            os.write(ready_w, b"x")
            time.sleep(60)
    pid = forked(work)
    try:
        assert os.read(ready_r, 1) == b"x"
        live = stale_temps(target)
        write_adapter(target, _adapter(6), overwrite=True)
        assert len(live) == 1 and live[0].exists()
    finally:
        kill_and_reap(pid)
        os.close(ready_r), os.close(ready_w)
    write_adapter(target, _adapter(7), overwrite=True)  # its writer is gone now: swept
    assert temp_files(tmp_path) == []


def _names(base: Path):
    return (base.parent / f"{base.name}_{i:05d}_.safetensors" for i in range(1, 1000))


def test_racing_writers_on_one_prefix_each_get_their_own_complete_file_threads(tmp_path, monkeypatch):
    _slow_writes(monkeypatch, 0.001)  # widen the window between picking a name and renaming into it
    contents = {i: _adapter(100 + i) for i in range(8)}
    got: dict[int, Path] = {}
    barrier = threading.Barrier(len(contents))

    def save(i):
        barrier.wait()
        got[i] = write_adapter_new(_names(tmp_path / "race"), contents[i], {"who": str(i)})
    threads = [threading.Thread(target=save, args=(i,)) for i in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(got.values())) == len(contents)
    for i, path in got.items():
        a = read_adapter(path)
        assert a.metadata["who"] == str(i) and torch.equal(a.tensors[f"{Q}.hada_w1_a"], contents[i][f"{Q}.hada_w1_a"])
    assert temp_files(tmp_path) == []


@needs_fork
def test_racing_writers_on_one_prefix_each_get_their_own_complete_file_processes(tmp_path):
    go_r, go_w = os.pipe()
    pids = []
    for i in range(6):
        def work(i=i):
            os.read(go_r, 1)
            write_adapter_new(_names(tmp_path / "race"), _adapter(200 + i), {"who": str(i)})
        pids.append(forked(work))
    os.write(go_w, b"x" * len(pids))
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    os.close(go_r), os.close(go_w)
    assert statuses == [0] * len(pids)
    files = sorted(tmp_path.glob("race_*_.safetensors"))
    assert [p.name for p in files] == [f"race_{i:05d}_.safetensors" for i in range(1, 7)]
    assert sorted(read_adapter(p).metadata["who"] for p in files) == [str(i) for i in range(6)]
    assert temp_files(tmp_path) == []


def test_without_hard_links_names_are_still_claimed_atomically(tmp_path, monkeypatch):
    """File systems without hard links (FAT, some network mounts): O_EXCL reserves the name, then our own empty
    file is replaced; racing writers still get distinct names and nothing existing is replaced."""
    def no_links(*_):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(writer.os, "link", no_links)
    (tmp_path / "race_00001_.safetensors").write_bytes(b"keep me")
    got: list[Path] = []
    threads = [threading.Thread(target=lambda i=i: got.append(write_adapter_new(_names(tmp_path / "race"), _adapter(i))))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(p.name for p in got) == [f"race_{i:05d}_.safetensors" for i in range(2, 8)]
    assert (tmp_path / "race_00001_.safetensors").read_bytes() == b"keep me"
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "late.safetensors") as f:
            f.write(b"new")
            (tmp_path / "late.safetensors").write_bytes(b"appeared meanwhile")
    assert (tmp_path / "late.safetensors").read_bytes() == b"appeared meanwhile" and temp_files(tmp_path) == []


def test_write_new_never_replaces_a_dangling_symlink_or_an_existing_file(tmp_path):
    (tmp_path / "race_00001_.safetensors").symlink_to(tmp_path / "outside" / "x.safetensors")  # dangling
    (tmp_path / "race_00002_.safetensors").write_bytes(b"keep me")
    path = write_adapter_new(_names(tmp_path / "race"), _adapter(1))
    assert path.name == "race_00003_.safetensors"
    assert (tmp_path / "race_00002_.safetensors").read_bytes() == b"keep me"
    assert not (tmp_path / "outside").exists()

"""Reliability on the real server (POST /prompt, real core nodes around ours).

- A cached adapter file rewritten in place (same size, mtime put back) is read again: the next sample equals a
  sample from the new bytes under a fresh name (no stale patch); a file truncated in place, or replaced by a
  truncated copy, is refused in one line and the server goes on serving.
- 50 prompts queued back to back, each loading a different adapter onto the same checkpoint: every latent equals
  ComfyUI's own LoraLoader on the same file (and differs from the unpatched one), a broken file in prompt 25 fails
  only prompt 25, and the server's RSS stays bounded (figures printed against one load).
- Adapter Combine's filename_prefix with odd names (Windows device names, NUL, too long, a symlink out of the
  output folder) is refused in one line with nothing written; on a full disk (a real 4 KiB tmpfs under output/,
  where the machine allows mounting) it fails in one line naming the file, leaving no temp file.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from comfy_client import Graph
from test_server_loader import _sdxl_shapes, _write_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the unit suite's fault helpers
from fault_helpers import file_states, listing, small_filesystem, temp_files  # noqa: E402

# plain forms ComfyUI's LoraLoader computes exactly (its reference for our loader)
MODULES = {("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"): "loha",
           ("unet", "middle_block.1.transformer_blocks.3.ff.net.0.proj"): "loha",
           ("unet", "input_blocks.7.1.transformer_blocks.9.attn2.to_k"): "lokr_lowrank",
           ("unet", "output_blocks.5.1.proj_out"): "loha"}
N_PROMPTS, BROKEN = 50, 25


def _sample_graph(sdxl_files, lora_name: str, tag: str, *, core: bool) -> tuple[Graph, dict[str, str]]:
    """Checkpoint -> our loader (and core LoraLoaderModelOnly) -> KSampler 1 step on a 64x64 empty latent ->
    SaveLatent. The shared nodes keep fixed ids, so the executor reuses them across prompts."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", _id="ckpt", ckpt_name=sdxl_files.checkpoint)
    pos = g.node("CLIPTextEncode", _id="pos", text="a photo of a cat", clip=ckpt[1])
    empty = g.node("EmptyLatentImage", _id="empty", width=64, height=64, batch_size=1)
    saves = {}
    branches = [("ours", "HadakronLoaderModelOnly", {"block_weights": ""})]
    if core:
        branches.append(("core", "LoraLoaderModelOnly", {}))
    for branch, loader_class, extra in branches:
        loader = g.node(loader_class, _id=f"{branch}_loader", model=ckpt[0], lora_name=lora_name,
                        strength_model=1.0, **extra)
        ks = g.node("KSampler", _id=f"{branch}_ks", model=loader[0], seed=7, steps=1, cfg=1.0, sampler_name="euler",
                    scheduler="normal", positive=pos[0], negative=pos[0], latent_image=empty[0], denoise=1.0)
        saves[branch] = g.node("SaveLatent", _id=f"{branch}_save", samples=ks[0],
                               filename_prefix=f"latents/rel_{tag}_{branch}").id
    return g, saves


def _base_graph(sdxl_files) -> tuple[Graph, str]:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", _id="ckpt", ckpt_name=sdxl_files.checkpoint)
    pos = g.node("CLIPTextEncode", _id="pos", text="a photo of a cat", clip=ckpt[1])
    empty = g.node("EmptyLatentImage", _id="empty", width=64, height=64, batch_size=1)
    ks = g.node("KSampler", _id="base_ks", model=ckpt[0], seed=7, steps=1, cfg=1.0, sampler_name="euler",
                scheduler="normal", positive=pos[0], negative=pos[0], latent_image=empty[0], denoise=1.0)
    return g, g.node("SaveLatent", _id="base_save", samples=ks[0], filename_prefix="latents/rel_base").id


def _latent(comfy, run, node_id: str) -> torch.Tensor:
    from safetensors.torch import load_file
    (item,) = run.outputs[node_id]["latents"]
    path = comfy.output_dir / item["subfolder"] / item["filename"]
    latent = load_file(str(path))["latent_tensor"].double()
    path.unlink()
    return latent


def _server_pid(comfy) -> int:
    """The pid of the ComfyUI process serving `comfy` (its command line names the session's base folder)."""
    base = str(comfy.base)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"main.py" in b" ".join(argv) and base.encode() in argv:
            return int(entry.name)
    pytest.skip(f"no /proc entry for the server with --base-directory {base} (needs Linux /proc)")


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def _one_line_naming(run, node_id: str, *words: str) -> str:
    err = run.error
    assert err is not None and str(err.get("node_id")) == node_id, err
    msg = str(err.get("exception_message", "")).strip()
    assert "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_a_cached_file_changed_on_disk_is_read_again_and_a_truncated_one_refused(comfy, comfy_env, sdxl_files,
                                                                                 server_lora):
    t0 = time.time()
    shapes = _sdxl_shapes(comfy_env, sdxl_files)
    loras = comfy.models_dir("loras")
    name, ref_name = "rel_cache.safetensors", "rel_cache_ref.safetensors"
    _write_adapter(server_lora, name, MODULES, shapes, seed=301)
    _write_adapter(server_lora, ref_name, MODULES, shapes, seed=302)  # the new bytes, under a fresh name
    path, ref = loras / name, loras / ref_name
    assert path.stat().st_size == ref.stat().st_size

    g, saves = _sample_graph(sdxl_files, name, "cache", core=False)
    first = _latent(comfy, comfy.run(g), saves["ours"])
    g_ref, saves_ref = _sample_graph(sdxl_files, ref_name, "cache_ref", core=False)
    want = _latent(comfy, comfy.run(g_ref), saves_ref["ours"])
    assert (first - want).abs().max() > 1e-3 * want.abs().max()  # the two adapters sample differently

    # rewrite in place: same inode, same size, mtime put back (what a copy tool preserving times does)
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(ref.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    run = comfy.run(g)
    assert "ours_loader" in run.executed_nodes, run.cached_nodes
    got = _latent(comfy, run, saves["ours"])
    assert torch.equal(got, want), f"stale patch: the rewritten file sampled {float((got - want).abs().max()):.3g} off"

    # truncated in place (the cache holds this inode), then replaced by a truncated copy: refused, nothing applied
    os.truncate(path, path.stat().st_size // 2)
    msg = _one_line_naming(comfy.run(g, expect_error=True), "ours_loader", name)
    assert re.search(r"(?i)truncat|does not fill|cut off", msg), msg
    cut = loras / ".rel_cut.tmp"
    cut.write_bytes(ref.read_bytes()[:-100])
    os.replace(cut, path)
    msg = _one_line_naming(comfy.run(g, expect_error=True), "ours_loader", name)
    assert re.search(r"(?i)truncat|does not fill|cut off", msg), msg
    # the server goes on: the reference file samples as before
    g_ref2, saves_ref2 = _sample_graph(sdxl_files, ref_name, "cache_ref2", core=False)
    assert torch.equal(_latent(comfy, comfy.run(g_ref2), saves_ref2["ours"]), want)
    path.unlink()
    ref.unlink()
    print(f"\n[time] cache rewrite/truncate: {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_fifty_prompts_with_fifty_adapters_bounded_rss_and_a_broken_one_in_the_middle(comfy, comfy_env, sdxl_files,
                                                                                    server_lora):
    t0 = time.time()
    shapes = _sdxl_shapes(comfy_env, sdxl_files)
    loras = comfy.models_dir("loras")
    names = [f"rel_many_{i:02d}.safetensors" for i in range(1, N_PROMPTS + 1)]
    for i, name in enumerate(names, start=1):
        _write_adapter(server_lora, name, MODULES, shapes, seed=1000 + i)
    broken = loras / names[BROKEN - 1]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size * 2 // 3])  # a download cut short
    pid = _server_pid(comfy)

    g_base, base_save = _base_graph(sdxl_files)
    base = _latent(comfy, comfy.run(g_base), base_save)
    rss_start = _rss_mib(pid)
    # the broken prompt has only our loader (ComfyUI's would fail on the file first, and say less)
    graphs = [_sample_graph(sdxl_files, name, f"many{i:02d}", core=i != BROKEN) for i, name in enumerate(names, start=1)]
    ids = [comfy.queue(g) for g, _ in graphs]  # all queued before the first one runs
    t_queued = time.time()
    rss, latents = [], []
    for i, (prompt_id, (_, saves)) in enumerate(zip(ids, graphs), start=1):
        run = comfy.wait(prompt_id, expect_error=i == BROKEN)
        rss.append(_rss_mib(pid))
        if i == BROKEN:
            _one_line_naming(run, "ours_loader", names[BROKEN - 1])
            continue
        ours, core = _latent(comfy, run, saves["ours"]), _latent(comfy, run, saves["core"])
        scale = base.abs().max().item()
        assert (ours - core).abs().max().item() <= 1e-4 * scale, \
            f"prompt {i}: ours vs core LoraLoader latents differ by {(ours - core).abs().max().item():.3g}"
        assert (ours - base).abs().max().item() > 1e-3 * scale, f"prompt {i}: the adapter did not change the sample"
        if latents:
            assert (ours - latents[-1]).abs().max().item() > 1e-4 * scale, f"prompt {i}: same sample as the one before"
        latents.append(ours)
    assert len(latents) == N_PROMPTS - 1
    one_load = rss[0] - rss_start
    growth_late = max(rss[-10:]) - max(rss[5:15])
    print(f"\n[rss] server VmRSS: {rss_start:.0f} MiB before, {rss[0]:.0f} after prompt 1 (+{one_load:.0f}), "
          f"{rss[BROKEN - 1]:.0f} after the broken prompt {BROKEN}, {rss[-1]:.0f} after prompt {N_PROMPTS}, "
          f"max {max(rss):.0f}; prompts 41-50 vs 6-15: {growth_late:+.0f} MiB")
    print(f"[time] {N_PROMPTS} prompts: {time.time() - t_queued:.1f} s after queueing "
          f"({(time.time() - t_queued) / N_PROMPTS:.2f} s each), {time.time() - t0:.1f} s in all")
    # bounded: the last ten prompts hold no more than the 6th-15th did, give or take allocator noise
    assert growth_late <= 64, f"RSS still grows: {growth_late:.0f} MiB from prompts 6-15 to 41-50 ({rss})"
    assert max(rss) - rss[0] <= 256, f"RSS grew {max(rss) - rss[0]:.0f} MiB over one load across {N_PROMPTS} prompts"
    for name in names:
        (loras / name).unlink()


def test_combine_refuses_odd_names_and_a_full_disk_in_one_line(comfy, comfy_env, sdxl_files, server_lora, tmp_path):
    t0 = time.time()
    name = "rel_combine_in.safetensors"
    _write_adapter(server_lora, name, MODULES, _sdxl_shapes(comfy_env, sdxl_files), seed=401)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = comfy.output_dir / "rel_link"
    link.symlink_to(outside, target_is_directory=True)
    before = file_states(comfy.output_dir)  # holds the suite's checkpoints: stat, not bytes

    def combine(prefix: str):
        g = Graph()
        node = g.node("HadakronAdapterCombine", adapter_1=name, strength_1=1.0, rank=0, filename_prefix=prefix,
                      layout="kohya", dtype="fp32")
        return comfy.run(g, expect_error=True), node.id
    cases = {"rel/CON": "reserved device name", "rel/com1.safetensors": "reserved device name",
             "rel/nul\0byte": "NUL byte", "rel/" + "x" * 240: "bytes long", "rel/what?": "Windows refuses",
             "rel_link/combined": "leaves the output folder"}
    for prefix, problem in cases.items():
        run, node_id = combine(prefix)
        msg = _one_line_naming(run, node_id, "filename_prefix", problem)
        assert len(msg) < 400, msg
    assert file_states(comfy.output_dir) == before and list(outside.iterdir()) == []
    link.unlink()

    with small_filesystem(comfy.output_dir / "rel_full", size="4k") as full:
        run, node_id = combine("rel_full/combined")
        msg = _one_line_naming(run, node_id, str(full), "no space left", "free some space")
        assert listing(full) == {} and temp_files(full) == []
    g = Graph()  # the server goes on: the same combine into a roomy folder writes its file
    node = g.node("HadakronAdapterCombine", adapter_1=name, strength_1=1.0, rank=0, filename_prefix="rel_ok/combined",
                  layout="kohya", dtype="fp32")
    (text,) = comfy.run(g).outputs[node.id]["text"]
    written = comfy.output_dir / text.splitlines()[0].removeprefix("wrote ")
    assert written.is_file() and written.parent.name == "rel_ok"
    written.unlink()
    (comfy.models_dir("loras") / name).unlink()
    print(f"\n[time] combine odd names / full disk: {time.time() - t0:.1f} s")

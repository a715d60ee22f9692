"""Peak RSS of a training prompt in a real ComfyUI server, against the size of the model it trains.

Each trainer gets its own fresh server (main.py --cpu, this repo in custom_nodes) and the same three prompts on
the small SDXL test checkpoint (tests/integration/model_files.py) and the 64x64 test image:
  1. load + encode: CheckpointLoaderSimple, LoadImage -> VAEEncode -> SaveLatent, CLIPTextEncode -> PreviewAny;
  2. sample: the base model, one KSampler step (ComfyUI's own footprint with the UNet in use);
  3. train: the same (cached) loaders -> the trainer for --steps steps, its adapter saved.
Before each prompt the server's peak RSS is reset (`echo 5 > /proc/<pid>/clear_refs`); after it, VmHWM (the
prompt's peak) and VmRSS are read from /proc/<pid>/status. "training adds" = peak of prompt 3 minus the RSS
before it. Trainers: hadakron's LoKr Trainer (bypass adapters over the shared frozen weights) and ComfyUI's own
TrainLoraNode with algorithm LoKr (`model.clone(force_deepcopy=True)` in comfy_extras/nodes_train.py), both
rank/dim 4, batch 1, AdamW, lr 2e-2; fp32 without gradient checkpointing, or (the `*-defaults` variants) the
nodes' defaults: bf16 with gradient checkpointing. Model sizes: parameter counts from the checkpoint header times
the dtypes the server logs for the loaded UNet and text encoders.

Run (ComfyUI venv): COMFYUI_PATH=~/.cache/hadakron-comfy/ComfyUI ~/.cache/hadakron-comfy/venv/bin/python \
    bench/bench_server_train.py [--steps 5] [--trainers hadakron,core,hadakron-defaults,core-defaults] [--threads 1]

Measured 2026-12-04 on the shared 2-core / 23 GiB CPU box (other servers running; torch 2.14.1 CPU, ComfyUI 0.29.0,
--threads 1, --steps 5, two invocations: fp32 rows, then the nodes' defaults). Model as the server loads it: UNet
282.9 M params in float32 = 1079.2 MiB (log: "SDXL 1079.22 MB loaded"); text encoders 817.7 M params in float16 =
1559.7 MiB; VAE 319.1 MiB. RSS in MiB; "adds" = training prompt's peak minus the RSS before it:

  trainer                                  after load  train peak  after train  adds  adds/UNet  train s
  hadakron LoKr, fp32                            4003        4077         4075    70       0.07     12.5
  ComfyUI TrainLoraNode LoKr, fp32               4008        6787         6535  2775       2.57     34.5
  hadakron LoKr, bf16 + ckpt (node defaults)     4002        4698         4604   693       0.64     56.3
  ComfyUI TrainLoraNode LoKr, bf16 + ckpt        4004        6078         6051  2071       1.92    252.1

(one KSampler step on the base model peaked at +3-4 MiB over "after load" in every server: the UNet is
resident after loading.) The bf16 row above was measured while gradient checkpointing was a no-op on SDXL
(checkpoint_blocks wrapped the blocks' `forward`, which ComfyUI never calls: `forward_timestep_embed` calls each
layer). After the fix (checkpointing the layers), same box, quieter, --threads 1, --steps 5:

  hadakron LoKr, bf16 + ckpt (node defaults)     4011        4148         4126   133       0.12     41.9
  hadakron LoKr, fp32                            4001        4073         4073    69       0.06      6.6

So a training prompt adds 0.06-0.12 of the UNet's own size; ComfyUI's TrainLoraNode adds 1.9-2.6 of it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

MIB = 2 ** 20
DTYPE_BYTES = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2, "torch.float64": 8}


# ---------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A fresh ComfyUI main.py (--cpu) with this repo as custom_nodes/hadakron, under a temporary base folder;
    the same command line as the integration tests' `comfy_server` fixture."""

    def __init__(self, comfy_root: Path, threads: int | None):
        self.base = Path(tempfile.mkdtemp(prefix="hadakron_bench_server_"))
        for folder in ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae"):
            (self.base / "models" / folder).mkdir(parents=True)
        for folder in ("input", "output", "temp", "user", "custom_nodes"):
            (self.base / folder).mkdir()
        (self.base / "custom_nodes" / "hadakron").symlink_to(REPO, target_is_directory=True)
        self.log = self.base / "server.log"
        port = _free_port()
        cmd = [sys.executable, str(comfy_root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               "--dont-print-server", "--input-directory", str(self.base / "input"),
               "--output-directory", str(self.base / "output"), "--temp-directory", str(self.base / "temp")]
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=str(comfy_root), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer in 300 s:\n{self.log.read_text()[-4000:]}")
            time.sleep(1.0)

    def status_kib(self, field: str) -> int:
        """A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux clear_refs 5), so the next reading is this prompt's peak."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------- the prompts


def data_nodes(g, checkpoint: str, image: str):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=checkpoint)
    pixels = g.node("LoadImage", image=image)
    latent = g.node("VAEEncode", pixels=pixels[0], vae=ckpt[2])
    positive = g.node("CLIPTextEncode", text="a photo of a cat", clip=ckpt[1])
    return ckpt, latent, positive


def hadakron_trainer(g, ckpt, latent, positive, steps: int, *, dtype: str = "fp32", checkpointing: bool = False):
    node = g.node("HadakronLoKrTrainer", model=ckpt[0], latents=latent[0], positive=positive[0], steps=steps,
                  batch_size=1, learning_rate=2e-2, optimizer="AdamW", scheduler="constant", warmup_steps=0, seed=3,
                  network_dim=4, network_alpha=4.0, factor=4, decompose_both=False, use_tucker=False,
                  use_scalar=False, conv_dim=0, conv_alpha=1.0, rank_dropout=0.0, module_dropout=0.0,
                  exclude_patterns="", include_patterns="", network_reg_dims="", network_reg_lrs="",
                  loraplus_lr_ratio=0.0, train_llm_adapter=False, gradient_checkpointing=checkpointing,
                  training_dtype=dtype, grad_accum_steps=1, max_grad_norm=1.0, weight_decay=0.0, save_every=0,
                  autosave_prefix="bench/autosave", resume_from="none")
    g.node("HadakronSaveAdapter", adapter=node[0], filename_prefix="bench/hadakron_lokr")
    return node


def core_trainer(g, ckpt, latent, positive, steps: int, *, dtype: str = "fp32", checkpointing: bool = False):
    node = g.node("TrainLoraNode", model=ckpt[0], latents=latent[0], positive=positive[0], batch_size=1,
                  grad_accumulation_steps=1, steps=steps, learning_rate=2e-2, rank=4, optimizer="AdamW",
                  loss_function="MSE", seed=3, training_dtype=dtype, lora_dtype=dtype, quantized_backward=False,
                  algorithm="LoKr", gradient_checkpointing=checkpointing, checkpoint_depth=1, offloading=False,
                  existing_lora="[None]", bucket_mode=False, bypass_mode=False)
    g.node("SaveLoRA", lora=node[0], prefix="loras/bench_core_lokr", steps=node[2])
    return node


TRAINERS = {
    "hadakron": ("hadakron LoKr, fp32", hadakron_trainer),
    "core": ("ComfyUI TrainLoraNode LoKr, fp32", core_trainer),
    # the nodes' defaults: bf16 autocast, gradient checkpointing on
    "hadakron-defaults": ("hadakron LoKr, bf16 + ckpt",
                          lambda *a: hadakron_trainer(*a, dtype="bf16", checkpointing=True)),
    "core-defaults": ("ComfyUI TrainLoraNode LoKr, bf16 + ckpt",
                      lambda *a: core_trainer(*a, dtype="bf16", checkpointing=True)),
}


def measure(trainer: str, args, comfy_root: Path) -> dict:
    """Start a server, run the three prompts, return the RSS readings (KiB) and the model sizes from its log."""
    from comfy_client import ComfyClient, Graph
    import model_files as mf

    server = Server(comfy_root, args.threads)
    try:
        client = ComfyClient(server.url, server.base, server.log)
        env = _model_env()
        checkpoint = mf.link_into(mf.sdxl_checkpoint_path(env), client.models_dir("checkpoints"))
        image = mf.link_into(mf.input_image_path(), client.input_dir)
        out = {"trainer": TRAINERS[trainer][0], "start_rss": server.status_kib("VmRSS")}

        def run(graph, label):
            server.reset_peak()
            before = server.status_kib("VmRSS")
            t0 = time.time()
            result = client.run(graph, timeout=7200)
            out[label] = {"before": before, "peak": server.status_kib("VmHWM"), "after": server.status_kib("VmRSS"),
                          "seconds": time.time() - t0}
            return result

        g = Graph()
        ckpt, latent, positive = data_nodes(g, checkpoint, image)
        g.node("SaveLatent", samples=latent[0], filename_prefix="bench/encoded")
        g.node("PreviewAny", source=positive[0])
        run(g, "load")

        g = Graph()
        ckpt, latent, positive = data_nodes(g, checkpoint, image)
        ks = g.node("KSampler", model=ckpt[0], seed=7, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal",
                    positive=positive[0], negative=positive[0], latent_image=latent[0], denoise=0.75)
        g.node("SaveLatent", samples=ks[0], filename_prefix="bench/sampled")
        run(g, "sample")

        g = Graph()
        ckpt, latent, positive = data_nodes(g, checkpoint, image)
        TRAINERS[trainer][1](g, ckpt, latent, positive, args.steps)
        trained = run(g, "train")
        cached = trained.cached_nodes
        out["loaders_cached"] = ckpt.id in cached
        log = server.log.read_text(errors="replace")
        out["unet_dtype"] = _last(r"model weight dtype (torch\.\w+)", log)
        out["te_dtype"] = _last(r"CLIP/text encoder model load device: .*dtype: (torch\.\w+)", log)
        out["loaded_mb"] = re.findall(r"Requested to load (\w+)\n.*?loaded completely;\s+([\d.]+) MB", log)
        client.close()
        return out
    finally:
        server.stop()


def _last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def _model_env():
    """model_files needs the comfy modules only to build missing files; import ComfyUI in CPU mode for that."""
    import conftest
    return conftest.import_comfy()


def model_sizes(unet_dtype: str, te_dtype: str) -> dict:
    """Parameter counts of the checkpoint's UNet and text encoders, and their bytes in the loaded dtypes."""
    import model_files as mf
    from math import prod
    weights = mf.SafetensorsWeights(mf.sdxl_checkpoint_path(_model_env()))
    unet = sum(prod(s) for k, s in weights.shapes.items() if k.startswith("model.diffusion_model."))
    clip = sum(prod(s) for k, s in weights.shapes.items() if k.startswith("conditioner.embedders."))
    return {"unet_params": unet, "unet_bytes": unet * DTYPE_BYTES.get(unet_dtype, 4),
            "clip_params": clip, "clip_bytes": clip * DTYPE_BYTES.get(te_dtype, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trainers", default="hadakron,core", help="comma list of: " + ", ".join(TRAINERS))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server (default: inherit)")
    args = parser.parse_args()
    comfy_root = Path(os.environ.get("COMFYUI_PATH", Path.home() / ".cache/hadakron-comfy/ComfyUI")).expanduser()
    os.environ["COMFYUI_PATH"] = str(comfy_root)

    results = []
    for name in [t.strip() for t in args.trainers.split(",") if t.strip()]:
        try:
            results.append(measure(name, args, comfy_root))
        except Exception as exc:  # a trainer that cannot run here is reported, the other still measured
            results.append({"trainer": TRAINERS[name][0], "error": f"{type(exc).__name__}: {str(exc)[:3000]}"})
    ok = [r for r in results if "error" not in r]
    if ok:
        sizes = model_sizes(ok[0]["unet_dtype"], ok[0]["te_dtype"])
        print(f"model: UNet {sizes['unet_params'] / 1e6:.1f} M params = {sizes['unet_bytes'] / MIB:.1f} MiB "
              f"({ok[0]['unet_dtype']}); text encoders {sizes['clip_params'] / 1e6:.1f} M params = "
              f"{sizes['clip_bytes'] / MIB:.1f} MiB ({ok[0]['te_dtype']}); server log 'loaded completely': "
              f"{ok[0]['loaded_mb']}")
    print(f"steps {args.steps}, threads {args.threads or 'inherited'}; RSS in MiB (/proc/<pid>/status)")
    header = (f"{'trainer':32} {'after load':>10} {'sample pk':>10} {'before tr':>10} {'train pk':>10} "
              f"{'after tr':>10} {'adds':>8} {'adds/UNet':>9} {'train s':>8}")
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['trainer']:32} FAILED: {r['error'][:600]}")
            continue
        kib = lambda v: v / 1024  # noqa: E731
        adds = r["train"]["peak"] - r["train"]["before"]
        print(f"{r['trainer']:32} {kib(r['load']['after']):10.0f} {kib(r['sample']['peak']):10.0f} "
              f"{kib(r['train']['before']):10.0f} {kib(r['train']['peak']):10.0f} {kib(r['train']['after']):10.0f} "
              f"{kib(adds):8.0f} {adds * 1024 / sizes['unet_bytes']:9.2f} {r['train']['seconds']:8.1f}"
              + ("" if r["loaders_cached"] else "  (loaders NOT cached: the training prompt reloaded the model)"))


if __name__ == "__main__":
    main()

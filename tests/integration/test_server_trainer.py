"""LoKr/LoHa Trainer (compact, with its option nodes; and the legacy all-in-one node fed the old API form) and
Save Adapter through a real ComfyUI server (POST /prompt), fed by ComfyUI's own nodes.

Every prompt here is built from core nodes (CheckpointLoaderSimple or UNETLoader/CLIPLoader/VAELoader, LoadImage,
VAEEncode, CLIPTextEncode, KSampler, VAEDecode, SaveImage, SaveLatent, LoraLoader, ModelSave) around the pack's
trainers, so the executor runs them as a user's graph runs: under `torch.inference_mode()`, with its caches.

How "it trained" is judged: the loop draws step k's noise and sigma from (seed, k) only, and both adapters start
at delta-W = 0, so a run at the widget's minimum learning rate (1e-8) with the same seed records the frozen model's
loss on exactly the draws the trained run sees. The trained run's loss must equal it at step 1 and fall below it
afterwards (paired, per step and in sum). Margins are fixed numbers of seeded runs, quoted where they are asserted.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_client import END_EVENTS, Graph, PromptRun

TRAIN_LR = 2e-2   # big enough that 5 steps move a dim-4 adapter on the random-weight test models
STILL_LR = 1e-8   # the learning_rate widget's minimum: the adapter stays at its zero-delta init (paired baseline)
STEPS = 5
SEED = 3
PROMPT_TEXT = "a photo of a cat"


# ---------------------------------------------------------------- graph pieces


def trainer_inputs(algo: str, **over) -> dict:
    """Every setting of a trainer (the legacy node's widgets: the API prompt must carry all required ones), set for
    short CPU runs: dim 4, fp32 (no autocast casts on CPU), no gradient checkpointing (tiny latents), batch 1."""
    kw = dict(steps=STEPS, batch_size=1, learning_rate=TRAIN_LR, optimizer="AdamW", scheduler="constant",
              warmup_steps=0, seed=SEED, network_dim=4, network_alpha=4.0, use_tucker=False, use_scalar=False,
              conv_dim=0, conv_alpha=1.0, rank_dropout=0.0, module_dropout=0.0, exclude_patterns="",
              include_patterns="", network_reg_dims="", network_reg_lrs="", loraplus_lr_ratio=0.0,
              train_llm_adapter=False, gradient_checkpointing=False, training_dtype="fp32", grad_accum_steps=1,
              max_grad_norm=1.0, weight_decay=0.0, save_every=0, autosave_prefix="hadakron/autosave",
              resume_from="None")
    if algo == "lokr":
        kw.update(factor=4, decompose_both=False)
    kw.update(over)
    return kw


TRAINER_CLASS = {"lokr": "HadakronTrainLoKr", "loha": "HadakronTrainLoHa"}
LEGACY_CLASS = {"lokr": "HadakronLoKrTrainer", "loha": "HadakronLoHaTrainer"}
# the option nodes and the settings each carries (written here, not read from the pack: a setting moved to another
# node, or dropped, fails the prompt's validation)
OPTION_NODES = {
    "network_options": ("HadakronNetworkOptions", (
        "decompose_both", "use_tucker", "use_scalar", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
        "exclude_patterns", "include_patterns", "network_reg_dims", "network_reg_lrs", "loraplus_lr_ratio",
        "train_llm_adapter")),
    "optimizer_options": ("HadakronOptimizerOptions", (
        "optimizer", "scheduler", "warmup_steps", "weight_decay", "te_learning_rate")),
    "precision_options": ("HadakronPrecisionOptions", (
        "training_dtype", "gradient_checkpointing", "batch_size", "grad_accum_steps", "max_grad_norm")),
}


def train_node(g: Graph, algo: str, model, latents, positive, *, clip=None, captions: str | None = None,
               te_learning_rate: float = 0.0, legacy: bool = False, **over):
    """A trainer fed by `model`/`latents`/`positive` with `trainer_inputs(algo, **over)`: the compact node with the
    three option nodes (captions from a core text node, as the UI links them), or with `legacy` the all-in-one node
    with every setting as a widget (the API form workflows saved before the option nodes hold)."""
    kw = trainer_inputs(algo, **over)
    data = dict(model=model, latents=latents, positive=positive)
    if clip is not None:
        data["clip"] = clip
    if legacy:
        te = {"captions": captions, "te_learning_rate": te_learning_rate} if captions is not None else {}
        return g.node(LEGACY_CLASS[algo], **data, **kw, **te)
    settings = dict(kw, te_learning_rate=te_learning_rate)
    settings.setdefault("decompose_both", False)
    for socket, (node, names) in OPTION_NODES.items():
        data[socket] = g.node(node, **{name: settings.pop(name) for name in names})
    if captions is not None:
        data["captions"] = g.node("PrimitiveStringMultiline", value=captions)
    return g.node(TRAINER_CLASS[algo], **data, **settings)


def sdxl_data(g: Graph, files, image: str):
    """CheckpointLoaderSimple + LoadImage -> VAEEncode and CLIPTextEncode: (checkpoint node, latent, positive)."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=files.checkpoint)
    pixels = g.node("LoadImage", image=image)
    latent = g.node("VAEEncode", pixels=pixels[0], vae=ckpt[2])
    positive = g.node("CLIPTextEncode", text=PROMPT_TEXT, clip=ckpt[1])
    return ckpt, latent, positive


def anima_data(g: Graph, files, image: str):
    """UNETLoader + CLIPLoader + VAELoader, LoadImage -> VAEEncode, CLIPTextEncode: (unet, clip, vae, latent, pos)."""
    unet = g.node("UNETLoader", unet_name=files.unet, weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name=files.text_encoder, type=files.clip_type)
    vae = g.node("VAELoader", vae_name=files.vae)
    pixels = g.node("LoadImage", image=image)
    latent = g.node("VAEEncode", pixels=pixels[0], vae=vae[0])
    positive = g.node("CLIPTextEncode", text=PROMPT_TEXT, clip=clip[0])
    return unet, clip, vae, latent, positive


def sample(g: Graph, model, positive, latent, vae, tag: str, seed: int = 7) -> dict[str, str]:
    """KSampler (2 euler steps, cfg 1: one model call per step) -> SaveLatent and VAEDecode -> SaveImage.
    Returns the ids of the two save nodes ({"latent", "image"})."""
    ks = g.node("KSampler", model=model, seed=seed, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                positive=positive, negative=positive, latent_image=latent, denoise=0.75)
    decoded = g.node("VAEDecode", samples=ks[0], vae=vae)
    return {"latent": g.node("SaveLatent", samples=ks[0], filename_prefix=f"trainer_server/{tag}").id,
            "image": g.node("SaveImage", images=decoded[0], filename_prefix=f"trainer_server/{tag}").id}


# ---------------------------------------------------------------- reading a run back


@pytest.fixture(scope="module")
def hadakron_lib(pack):
    """The repo's `hadakron` library (importable once the pack is imported: it puts its folder on sys.path)."""
    import hadakron.io
    import hadakron.train
    return hadakron


def saved_latent(comfy, run: PromptRun, node: str) -> torch.Tensor:
    """The latent a SaveLatent node wrote (exact float values, unlike the 8-bit image)."""
    from safetensors.torch import load_file
    (item,) = run.outputs[node]["latents"]
    return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def saved_image(comfy, run: PromptRun, node: str) -> np.ndarray:
    """The image a SaveImage node wrote, fetched through GET /view, as (H, W, 3) uint8."""
    from PIL import Image
    (item,) = run.outputs[node]["images"]
    return np.asarray(Image.open(io.BytesIO(comfy.view(item["filename"], item["subfolder"], item["type"]))))


def loss_curve(run: PromptRun, node: str) -> dict:
    """The trainer's ui loss curve ({"loss": [...], "first_step": n}): the LOSS_MAP output's list, as the UI gets it."""
    return json.loads(run.outputs[node]["hadakron_loss"][0])


def loss_output(run: PromptRun, preview_node: str) -> list[float]:
    """The trainer's LOSS_MAP output as core PreviewAny showed it (JSON text of {"loss": [...]})."""
    (text,) = run.outputs[preview_node]["text"]
    return json.loads(text)["loss"]


def loss_events(run: PromptRun, node: str) -> list[dict]:
    """The run's hadakron.loss websocket events sent by trainer `node`, in arrival order."""
    return [d for d in run.events_of("hadakron.loss") if str(d["node"]) == node]


def saved_adapter_path(comfy, run: PromptRun, node: str) -> Path:
    """The file a HadakronSaveAdapter node wrote (its ui text is "saved loras/<relative path>")."""
    (text,) = run.outputs[node]["text"]
    assert text.startswith("saved loras/"), text
    return comfy.output_dir / "loras" / text[len("saved "):].split("/", 1)[1]


def assert_live_loss_events(run: PromptRun, node: str, steps: list[int], curve: dict) -> None:
    """One hadakron.loss event per step, in order, sent while the node ran (after it started, before it finished),
    and carrying exactly the losses of the node's loss output."""
    events = loss_events(run, node)
    assert [e["step"] for e in events] == steps, events
    assert [e["loss"] for e in events] == curve["loss"]
    assert all(e["total"] == steps[-1] for e in events)
    kinds = [(t, d) for t, d in run.events]
    started = next(i for i, (t, d) in enumerate(kinds) if t == "executing" and str(d.get("node")) == node)
    finished = next(i for i, (t, d) in enumerate(kinds) if t == "executed" and str(d.get("node")) == node)
    where = [i for i, (t, d) in enumerate(kinds) if t == "hadakron.loss" and str(d["node"]) == node]
    assert started < where[0] and where[-1] < finished, (started, where, finished)
    # the progress bar moved with the steps: a progress event for this node between consecutive loss events
    progress = [i for i, (t, d) in enumerate(kinds) if t == "progress" and str(d.get("node")) == node]
    assert all(any(a < p < b for p in progress) for a, b in zip(where, where[1:])), (where, progress)


def assert_trained(trained: list[float], still: list[float], ratio: float) -> None:
    """Paired criterion (module docstring): same loss at step 1, lower at every later step, and lower in sum by
    `ratio` or more."""
    assert len(trained) == len(still) == STEPS and all(math.isfinite(x) for x in trained + still)
    assert trained[0] == pytest.approx(still[0], rel=1e-6), (trained, still)
    assert all(t < s for t, s in zip(trained[1:], still[1:])), (trained, still)
    assert sum(trained[1:]) < ratio * sum(still[1:]), (sum(trained[1:]) / sum(still[1:]), trained, still)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers of its width (bit-for-bit comparison, -0.0 and NaN payloads included)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def sha256(path: Path) -> str:
    """A file's content hash (to prove a later save left it untouched)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def place_in_loras(comfy, path: Path, name: str) -> str:
    """Copy an adapter (and its .trainstate sidecar when there is one) into models/loras as `name`."""
    folder = comfy.models_dir("loras")
    shutil.copyfile(path, folder / name)
    side = path.with_suffix(".trainstate")
    if side.exists():
        shutil.copyfile(side, (folder / name).with_suffix(".trainstate"))
    return name


# ---------------------------------------------------------------- SDXL: train, sample, save (one prompt)


@pytest.fixture(scope="module")
def sdxl_trained(comfy, sdxl_files, input_image):
    """One prompt: LoKr and LoHa trained on the VAE-encoded image, a LoKr run at STILL_LR as the paired baseline,
    the trained `model` outputs and the base model sampled with one seed, both adapters saved."""
    g = Graph()
    ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)
    trainers = {
        "lokr": train_node(g, "lokr", ckpt[0], latent[0], positive[0]),
        "loha": train_node(g, "loha", ckpt[0], latent[0], positive[0]),
        "still": train_node(g, "lokr", ckpt[0], latent[0], positive[0], learning_rate=STILL_LR),
        # the legacy node as workflows saved before the option nodes send it ("none": resume_from's old spelling)
        "legacy": train_node(g, "lokr", ckpt[0], latent[0], positive[0], legacy=True, resume_from="none"),
    }
    previews = {k: g.node("PreviewAny", source=t[2]).id for k, t in trainers.items()}
    samples = {"base": sample(g, ckpt[0], positive[0], latent[0], ckpt[2], "sdxl_base")}
    for algo in ("lokr", "loha"):
        samples[algo] = sample(g, trainers[algo][1], positive[0], latent[0], ckpt[2], f"sdxl_{algo}")
    saves = {algo: g.node("HadakronSaveAdapter", adapter=trainers[algo][0], filename_prefix=f"server/sdxl_{algo}").id
             for algo in ("lokr", "loha")}
    run = comfy.run(g, timeout=1800)
    print(f"sdxl train+sample prompt: {run.seconds:.1f} s")
    return {"run": run,
            "trainers": {k: v.id for k, v in trainers.items()}, "previews": previews, "samples": samples,
            "saves": saves}


def test_sdxl_loss_falls_and_events_match(sdxl_trained):
    """LoKr and LoHa losses fall against the paired STILL_LR run; live events and LOSS_MAP carry the same losses."""
    run, ids = sdxl_trained["run"], sdxl_trained["trainers"]
    curves = {k: loss_curve(run, node) for k, node in ids.items()}
    # the legacy all-in-one node, sent the old API form with the same settings, trains exactly as the compact
    # node with its option nodes (same seed, same settings: the same float operations)
    assert curves["legacy"]["loss"] == curves["lokr"]["loss"], (curves["legacy"], curves["lokr"])
    for k, node in ids.items():
        assert curves[k]["first_step"] == 1
        assert loss_output(run, sdxl_trained["previews"][k]) == curves[k]["loss"]
        assert_live_loss_events(run, node, list(range(1, STEPS + 1)), curves[k])
    still = curves["still"]["loss"]
    print("losses", {k: [round(x, 4) for x in c["loss"]] for k, c in curves.items()})
    # seeded runs measured on this checkpoint: sum(steps 2-5) trained / still = 0.867 (LoKr), 0.894 (LoHa)
    assert_trained(curves["lokr"]["loss"], still, ratio=0.93)
    assert_trained(curves["loha"]["loss"], still, ratio=0.95)


def test_sdxl_trained_model_changes_the_image(comfy, sdxl_trained):
    """The trainers' `model` outputs, sampled with the base model's seed, give a different latent and image."""
    run, samples = sdxl_trained["run"], sdxl_trained["samples"]
    base = saved_latent(comfy, run, samples["base"]["latent"])
    base_image = saved_image(comfy, run, samples["base"]["image"])
    assert torch.isfinite(base).all() and base_image.shape == (64, 64, 3)
    for algo in ("lokr", "loha"):
        trained = saved_latent(comfy, run, samples[algo]["latent"])
        image = saved_image(comfy, run, samples[algo]["image"])
        change = relative_change(trained, base)
        pixels = float(np.mean(image != base_image))
        print(f"{algo}: latent change {change:.4g}, pixels changed {pixels:.3f}")
        assert torch.isfinite(trained).all() and change > 1e-3, change
        assert pixels > 0.05, pixels


def test_sdxl_saved_adapters_metadata(comfy, sdxl_trained, hadakron_lib):
    """Save Adapter wrote output/loras/server/<prefix>_00001_ with step, final loss, finite tensors and a sidecar."""
    read_adapter = hadakron_lib.io.read_adapter
    run = sdxl_trained["run"]
    for algo, node in sdxl_trained["saves"].items():
        path = saved_adapter_path(comfy, run, node)
        assert path.parent == comfy.output_dir / "loras" / "server" and path.name == f"sdxl_{algo}_00001_.safetensors"
        adapter = read_adapter(path)
        assert not adapter.problems, adapter.problems
        assert adapter.metadata["hadakron.step"] == str(STEPS) and adapter.metadata["ss_steps"] == str(STEPS)
        final = loss_curve(run, sdxl_trained["trainers"][algo])["loss"][-1]
        assert float(adapter.metadata["hadakron.final_loss"]) == pytest.approx(final, rel=1e-6)
        assert all(torch.isfinite(t).all() for t in adapter.tensors.values())
        suffix = "lokr_w1" if algo == "lokr" else "hada_w1_a"
        assert sum(k.endswith(suffix) for k in adapter.tensors) > 100
        assert path.with_suffix(".trainstate").exists()


def test_sdxl_saved_files_load_in_next_prompt(comfy, sdxl_files, input_image, sdxl_trained):
    """Next prompt: each saved file, placed in models/loras, loads in core LoraLoader and in HadakronLoader; both
    change the sampled image versus the base and agree with each other and with the trainer's own `model`
    output; ModelSave of the base model (cached loader: the very object the trainers had) equals the checkpoint's
    UNet; a second trainer run saving under an existing prefix writes a new counter and leaves the first file."""
    first, samples = sdxl_trained["run"], sdxl_trained["samples"]
    files = {algo: saved_adapter_path(comfy, first, node) for algo, node in sdxl_trained["saves"].items()}
    hashes = {algo: sha256(p) for algo, p in files.items()}
    names = {algo: place_in_loras(comfy, p, f"server_sdxl_{algo}.safetensors") for algo, p in files.items()}

    g2 = Graph()
    ckpt2, latent2, positive2 = sdxl_data(g2, sdxl_files, input_image)
    log_start = len(comfy.log.read_text(errors="replace"))
    loaded = {}
    for algo, name in names.items():
        core = g2.node("LoraLoader", model=ckpt2[0], clip=ckpt2[1], lora_name=name, strength_model=1.0,
                       strength_clip=1.0)
        ours = g2.node("HadakronLoader", model=ckpt2[0], clip=ckpt2[1], lora_name=name, strength_model=1.0,
                       strength_clip=1.0)
        loaded[algo] = {"core": sample(g2, core[0], positive2[0], latent2[0], ckpt2[2], f"next_{algo}_core"),
                        "ours": sample(g2, ours[0], positive2[0], latent2[0], ckpt2[2], f"next_{algo}_ours"),
                        "report": ours.id}
    save_base = g2.node("ModelSave", model=ckpt2[0], filename_prefix="trainer_server/base_after_training")
    again = train_node(g2, "lokr", ckpt2[0], latent2[0], positive2[0], steps=1, seed=SEED + 1)
    save_again = g2.node("HadakronSaveAdapter", adapter=again[0], filename_prefix="server/sdxl_lokr")
    run = comfy.run(g2, timeout=1800)
    log = comfy.log.read_text(errors="replace")[log_start:]
    print(f"sdxl next prompt: {run.seconds:.1f} s; cached {run.cached_nodes}")
    assert "lora key not loaded" not in log, log[-3000:]  # core LoraLoader skips what it cannot match, silently
    assert ckpt2.id in run.cached_nodes, ("the checkpoint loader was not served from the cache, so ModelSave "
                                          "would not see the model object the trainers ran on", run.cached_nodes)

    base = saved_latent(comfy, first, samples["base"]["latent"])
    for algo in names:
        core = saved_latent(comfy, run, loaded[algo]["core"]["latent"])
        ours = saved_latent(comfy, run, loaded[algo]["ours"]["latent"])
        trained = saved_latent(comfy, first, samples[algo]["latent"])
        change, gap, gap_trained = relative_change(ours, base), relative_change(core, ours), relative_change(
            trained, ours)
        print(f"{algo}: change vs base {change:.4g}; core vs ours {gap:.3g}; trainer output vs ours {gap_trained:.3g}")
        # measured: 0 and 0 (both loaders patch in float32; the trainer's output is the same patches in memory);
        # 1e-4 leaves room for a different float order on other CPUs, far below the 0.5 change the adapter makes
        assert change > 1e-3
        assert gap < 1e-4, gap
        assert gap_trained < 1e-4, gap_trained
        report = json.loads(run.outputs[loaded[algo]["report"]]["hadakron_report"][0])
        assert report["matched_count"] > 100 and report["unmatched_count"] == 0, report

    # the base model the trainers ran on, saved: every UNet tensor of the checkpoint, bit for bit (the server holds
    # the fp16 file's weights in float32, an exact widening; compared as integers, so even -0.0 vs 0.0 would count)
    assert save_base.id in run.executed_nodes
    (saved_base,) = sorted((comfy.output_dir / "trainer_server").glob("base_after_training_*.safetensors"))
    from safetensors import safe_open
    unet_keys = [k for k in sdxl_files.weights if k.startswith(sdxl_files.unet_prefix)]
    with safe_open(str(saved_base), framework="pt") as f:
        saved_keys = set(f.keys())
        assert set(unet_keys) <= saved_keys, sorted(set(unet_keys) - saved_keys)[:5]
        for chunk in range(0, len(unet_keys), 200):
            keys = unet_keys[chunk:chunk + 200]
            for k, original in sdxl_files.weights.many(keys).items():
                saved = f.get_tensor(k)
                assert torch.equal(bits(saved), bits(original.to(saved.dtype))), k
    saved_base.unlink()

    # the same prefix again: a new counter, the first file's bytes untouched
    again_path = saved_adapter_path(comfy, run, save_again.id)
    assert again_path.name == "sdxl_lokr_00002_.safetensors", again_path
    assert sha256(files["lokr"]) == hashes["lokr"] and sha256(files["loha"]) == hashes["loha"]
    assert again_path.with_suffix(".trainstate").exists()


# ---------------------------------------------------------------- interrupt, autosave, resume


def wait_for_loss_step(comfy, prompt_id: str, node: str, step: int, timeout: float = 900.0) -> dict:
    """Block until the running prompt has sent `node`'s hadakron.loss event for `step`; its data.

    `ComfyClient.wait_event` returns the first event of a type only, so this follows the prompt's events with the
    client's own `_follow` (same prompt-id rules) and a predicate; a prompt that ends first fails the test."""
    def until(events):
        etype, data = events[-1]
        if etype in END_EVENTS:
            raise AssertionError(f"prompt {prompt_id} ended ({etype}) before step {step}: {data}\n{comfy.log_tail()}")
        return etype == "hadakron.loss" and str(data.get("node")) == node and data.get("step", 0) >= step
    return comfy._follow(prompt_id, until, time.time() + timeout, f"hadakron.loss step {step}")[-1][1]


def test_interrupt_autosaves_and_resume_continues(comfy, sdxl_files, input_image, hadakron_lib):
    """/interrupt mid-run ends the prompt as interrupted with a valid autosave of the last completed step; the
    server runs the next prompt, where `resume_from` (the autosave in models/loras) continues from that step with
    that state: its losses at steps N+1, N+2 equal those of an uninterrupted run of N+2 steps (same seed), which
    holds only if the factors and the optimizer state at its start are the autosave's."""
    read_adapter, read_state = hadakron_lib.io.read_adapter, hadakron_lib.train.read_training_state
    prefix = "server/interrupt"
    settings = dict(steps=40, save_every=2, autosave_prefix=prefix, seed=SEED + 10)
    g = Graph()
    ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)
    trainer = train_node(g, "lokr", ckpt[0], latent[0], positive[0], **settings)
    prompt_id = comfy.queue(g)
    assert wait_for_loss_step(comfy, prompt_id, trainer.id, 3)["step"] == 3
    comfy.interrupt()
    run = comfy.wait(prompt_id, timeout=900, expect_error=True)
    assert run.interrupted and not run.succeeded, [t for t, _ in run.events]
    assert run.error["node_id"] == trainer.id, run.error
    steps_done = [e["step"] for e in loss_events(run, trainer.id)]
    done = steps_done[-1]
    assert steps_done == list(range(1, done + 1)) and 3 <= done < 40, steps_done

    folder = comfy.output_dir / "loras" / Path(prefix).parent
    stem = Path(prefix).name
    autosaves = sorted(folder.glob(f"{stem}_step*.safetensors"))
    expected = sorted({s for s in range(2, done + 1, 2)} | {done})
    assert [p.name for p in autosaves] == [f"{stem}_step{s:06d}_00001_.safetensors" for s in expected], autosaves
    last = autosaves[-1]
    adapter = read_adapter(last)
    assert not adapter.problems and adapter.metadata["hadakron.step"] == str(done)
    assert all(torch.isfinite(t).all() for t in adapter.tensors.values())
    state_tensors, state_meta = read_state(last.with_suffix(".trainstate"))
    assert state_meta["hadakron.step"] == str(done) and state_tensors
    assert all(torch.isfinite(t).all() for t in state_tensors.values() if t.is_floating_point())

    # next prompt: resume for 2 more steps beside an uninterrupted reference run of done + 2 steps
    name = place_in_loras(comfy, last, f"server_resume_{stem}.safetensors")
    g2 = Graph()
    ckpt2, latent2, positive2 = sdxl_data(g2, sdxl_files, input_image)
    total = done + 2
    resumed = train_node(g2, "lokr", ckpt2[0], latent2[0], positive2[0],
                         **dict(settings, steps=total, save_every=0, resume_from=name))
    # the reference on the legacy node (old API form, resume_from "none"): the same run as the compact node's
    reference = train_node(g2, "lokr", ckpt2[0], latent2[0], positive2[0], legacy=True,
                           **dict(settings, steps=total, save_every=0, resume_from="none"))
    save = g2.node("HadakronSaveAdapter", adapter=resumed[0], filename_prefix=f"{prefix}_resumed")
    preview = g2.node("PreviewAny", source=resumed[2])
    run2 = comfy.run(g2, timeout=1800)
    assert run2.succeeded
    curve = loss_curve(run2, resumed.id)
    assert curve["first_step"] == done + 1 and loss_output(run2, preview.id) == curve["loss"]
    assert_live_loss_events(run2, resumed.id, [done + 1, done + 2], curve)
    reference_losses = loss_curve(run2, reference.id)["loss"]
    interrupted_losses = [e["loss"] for e in loss_events(run, trainer.id)]
    print(f"interrupted at step {done}; losses {interrupted_losses}; resumed {curve['loss']}; "
          f"reference {reference_losses}")
    assert reference_losses[:done] == pytest.approx(interrupted_losses, rel=1e-6)
    assert curve["loss"] == pytest.approx(reference_losses[done:], rel=1e-6)  # measured: equal
    out = read_adapter(saved_adapter_path(comfy, run2, save.id))
    assert out.metadata["hadakron.step"] == str(total)


# ---------------------------------------------------------------- text-encoder training, Anima

TE_PREFIXES = {"sdxl": ("lora_te1_", "lora_te2_"), "anima": ("lora_te_",)}
CAPTIONS = "a photo of a red cat"
TE_LR = 1e-3  # the text encoders' own rate: at TRAIN_LR, CLIP-G's adapters overshoot (SDXL step 3 rose 1.50 -> 1.62)


def te_moved(adapter, prefixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Per text-encoder prefix: (modules whose zero-initialised LoKr factor moved off zero, modules)."""
    moved = {}
    for prefix in prefixes:
        zero_init = [k for k in adapter.tensors if k.startswith(prefix) and (k.endswith(".lokr_w2_b")
                                                                               or k.endswith(".lokr_w2"))]
        moved[prefix] = (sum(float(adapter.tensors[k].abs().max()) > 0 for k in zero_init), len(zero_init))
    return moved


def train_family_prompt(comfy, family: str, files, image: str, *, train_te: bool, steps: int, ratio: float,
                        hadakron_lib) -> None:
    """One prompt on `family`: LoKr at TRAIN_LR and at STILL_LR (paired baseline), with clip + captions when
    `train_te`; the trained model (and, with TE training, the trained clip's conditioning) sampled against the base.
    Asserts the loss falls, the live events, the image changes, the saved file's step and TE modules."""
    g = Graph()
    if family == "sdxl":
        ckpt, latent, positive = sdxl_data(g, files, image)
        model, clip, vae = ckpt[0], ckpt[1], ckpt[2]
    else:
        unet, clip_node, vae_node, latent, positive = anima_data(g, files, image)
        model, clip, vae = unet[0], clip_node[0], vae_node[0]
    te = dict(clip=clip, captions=CAPTIONS, te_learning_rate=TE_LR) if train_te else {}
    tag = f"{family}_{'te' if train_te else 'unet'}"
    trained = train_node(g, "lokr", model, latent[0], positive[0], steps=steps, **te)
    still_te = dict(te, te_learning_rate=0.0) if train_te else {}  # 0: the text encoders take STILL_LR too
    still = train_node(g, "lokr", model, latent[0], positive[0], steps=steps, learning_rate=STILL_LR, **still_te)
    base = sample(g, model, positive[0], latent[0], vae, f"{tag}_base")
    with_model = sample(g, trained[1], positive[0], latent[0], vae, f"{tag}_trained")
    if train_te:
        te_positive = g.node("CLIPTextEncode", text=PROMPT_TEXT, clip=trained[3])
        with_te = sample(g, trained[1], te_positive[0], latent[0], vae, f"{tag}_trained_te")
    save = g.node("HadakronSaveAdapter", adapter=trained[0], filename_prefix=f"server/{tag}")
    preview = g.node("PreviewAny", source=trained[2])
    run = comfy.run(g, timeout=3000)
    print(f"{tag} prompt: {run.seconds:.1f} s")

    curve, still_curve = loss_curve(run, trained.id), loss_curve(run, still.id)
    assert loss_output(run, preview.id) == curve["loss"]
    assert_live_loss_events(run, trained.id, list(range(1, steps + 1)), curve)
    losses, untrained = curve["loss"], still_curve["loss"]
    print(f"{tag} losses {[round(x, 4) for x in losses]} still {[round(x, 4) for x in untrained]} "
          f"ratio {sum(losses[1:]) / sum(untrained[1:]):.4f}")
    assert len(losses) == len(untrained) == steps and all(math.isfinite(x) for x in losses + untrained)
    assert losses[0] == pytest.approx(untrained[0], rel=1e-6)
    assert all(t < s for t, s in zip(losses[1:], untrained[1:])), (losses, untrained)
    assert sum(losses[1:]) < ratio * sum(untrained[1:])

    base_latent = saved_latent(comfy, run, base["latent"])
    change = relative_change(saved_latent(comfy, run, with_model["latent"]), base_latent)
    assert change > 1e-3, change
    adapter = hadakron_lib.io.read_adapter(saved_adapter_path(comfy, run, save.id))
    assert adapter.metadata["hadakron.step"] == str(steps) and not adapter.problems
    moved = te_moved(adapter, TE_PREFIXES[family])
    print(f"{tag}: latent change {change:.4g}; text-encoder modules moved {moved}")
    if train_te:
        # measured: CLIP-L 66 of 72 (SDXL reads its penultimate layer: the last layer's 6 get no gradient),
        # CLIP-G 192 of 192, Qwen3 196 of 196
        assert all(n >= 0.9 * total and total > 0 for n, total in moved.values()), moved
        te_change = relative_change(saved_latent(comfy, run, with_te["latent"]),
                                    saved_latent(comfy, run, with_model["latent"]))
        print(f"{tag}: trained clip's conditioning changes the latent by {te_change:.4g}")
        assert te_change > 1e-4, te_change
    else:
        assert all(total == 0 for _, total in moved.values()), moved


@pytest.mark.slow
def test_sdxl_text_encoder_training(comfy, sdxl_files, input_image, hadakron_lib):
    """CheckpointLoaderSimple's CLIP + captions: CLIP-L and CLIP-G adapters train beside the UNet's (3 steps;
    measured loss ratio 0.918)."""
    train_family_prompt(comfy, "sdxl", sdxl_files, input_image, train_te=True, steps=3, ratio=0.97,
                        hadakron_lib=hadakron_lib)


def test_anima_lokr_training(comfy, anima_files, input_image, hadakron_lib):
    """UNETLoader + CLIPLoader + VAELoader (Anima: flow matching, Wan VAE latents); measured loss ratio 0.921."""
    train_family_prompt(comfy, "anima", anima_files, input_image, train_te=False, steps=STEPS, ratio=0.96,
                        hadakron_lib=hadakron_lib)


def test_anima_text_encoder_training(comfy, anima_files, input_image, hadakron_lib):
    """CLIPLoader's Qwen3 + captions on Anima (3 steps; measured loss ratio 0.889)."""
    train_family_prompt(comfy, "anima", anima_files, input_image, train_te=True, steps=3, ratio=0.97,
                        hadakron_lib=hadakron_lib)


# ---------------------------------------------------------------- float8 base: UNETLoader weight_dtype fp8_e4m3fn


@pytest.mark.slow  # ~90 s: the full suite runs it (CI stays under 15 minutes); the in-process fp8 tests run in CI
def test_sdxl_training_on_fp8_base(comfy, comfy_env, sdxl_files, input_image, hadakron_lib):
    """UNETLoader with weight_dtype fp8_e4m3fn (float8 weights, ComfyUI's per-layer manual cast) feeds the LoKr
    Trainer with gradient checkpointing: the loss is finite and falls against the paired STILL_LR run; the saved
    adapter loads in the next prompt in core LoraLoaderModelOnly on the same fp8 model and changes its sample."""
    import model_files as mf
    unet_name = mf.link_into(mf.sdxl_unet_path(comfy_env), comfy.models_dir("diffusion_models"))
    g = Graph()
    ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)  # its CLIP and VAE; the UNet from UNETLoader
    unet = g.node("UNETLoader", unet_name=unet_name, weight_dtype="fp8_e4m3fn")
    trained = train_node(g, "lokr", unet[0], latent[0], positive[0], gradient_checkpointing=True)
    still = train_node(g, "lokr", unet[0], latent[0], positive[0], gradient_checkpointing=True,
                       learning_rate=STILL_LR)
    save = g.node("HadakronSaveAdapter", adapter=trained[0], filename_prefix="server/sdxl_fp8_lokr")
    log_start = len(comfy.log.read_text(errors="replace"))
    run = comfy.run(g, timeout=1800)
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert "model weight dtype torch.float8_e4m3fn" in log, log[-3000:]  # ComfyUI's load message: float8 weights
    losses, baseline = loss_curve(run, trained.id)["loss"], loss_curve(run, still.id)["loss"]
    print("fp8 losses", [round(x, 5) for x in losses], [round(x, 5) for x in baseline])
    # seeded runs measured on this checkpoint: sum(steps 2-5) trained / still = 0.872
    assert_trained(losses, baseline, ratio=0.93)

    path = saved_adapter_path(comfy, run, save.id)
    adapter = hadakron_lib.io.read_adapter(path)
    assert not adapter.problems and adapter.metadata["hadakron.step"] == str(STEPS)
    assert all(t.dtype != torch.float8_e4m3fn and torch.isfinite(t).all() for t in adapter.tensors.values())
    name = place_in_loras(comfy, path, "server_sdxl_fp8_lokr.safetensors")
    g2 = Graph()
    ckpt2, latent2, positive2 = sdxl_data(g2, sdxl_files, input_image)
    unet2 = g2.node("UNETLoader", unet_name=unet_name, weight_dtype="fp8_e4m3fn")
    lora = g2.node("LoraLoaderModelOnly", model=unet2[0], lora_name=name, strength_model=1.0)
    base = sample(g2, unet2[0], positive2[0], latent2[0], ckpt2[2], "fp8_base")
    adapted = sample(g2, lora[0], positive2[0], latent2[0], ckpt2[2], "fp8_lokr")
    log_start = len(comfy.log.read_text(errors="replace"))
    run2 = comfy.run(g2, timeout=1800)
    assert "lora key not loaded" not in comfy.log.read_text(errors="replace")[log_start:]
    base_latent, adapted_latent = (saved_latent(comfy, run2, s["latent"]) for s in (base, adapted))
    assert torch.isfinite(adapted_latent).all() and relative_change(adapted_latent, base_latent) > 1e-4


# ---------------------------------------------------------------- the saved file says how it was made; resume checks it


def test_saved_metadata_and_resume_configuration_check(comfy, sdxl_files, input_image, hadakron_lib):
    """A LoKr run with non-default network args through POST /prompt: the saved file's ss_network_args carries every
    one, the base checkpoint is named and hashed as sd-scripts does; resuming from it with another dim fails the
    prompt naming the argument (saved vs given), resuming with another learning rate and more steps trains on."""
    from hadakron.train.metadata import legacy_model_hash, network_config_from_metadata
    read_adapter = hadakron_lib.io.read_adapter
    network = dict(exclude_patterns=".*attn2.*", network_reg_dims=".*ff.*=2", rank_dropout=0.1, use_scalar=True,
                   decompose_both=True, conv_dim=2, conv_alpha=2.0, loraplus_lr_ratio=2.0,
                   network_reg_lrs=".*attn1.*=0.001")
    settings = dict(network, steps=2, seed=SEED + 20, network_dim=4, network_alpha=2.0)
    g = Graph()
    ckpt, latent, positive = sdxl_data(g, sdxl_files, input_image)
    trainer = train_node(g, "lokr", ckpt[0], latent[0], positive[0], **settings)
    save = g.node("HadakronSaveAdapter", adapter=trainer[0], filename_prefix="server/metadata")
    run = comfy.run(g, timeout=1800)
    path = saved_adapter_path(comfy, run, save.id)
    meta = read_adapter(path).metadata
    args = json.loads(meta["ss_network_args"])
    assert {k: args[k] for k in network} == {
        "exclude_patterns": "['.*attn2.*']", "network_reg_dims": ".*ff.*=2", "rank_dropout": "0.1",
        "use_scalar": "True", "decompose_both": "True", "conv_dim": "2", "conv_alpha": "2.0",
        "loraplus_lr_ratio": "2.0", "network_reg_lrs": ".*attn1.*=0.001"}, args
    assert args["algo"] == "lokr" and args["factor"] == "4" and meta["ss_network_dim"] == "4"
    config = network_config_from_metadata(meta)
    assert config.exclude_patterns == [".*attn2.*"] and config.network_reg_dims == {".*ff.*": 2}
    assert meta["ss_sd_model_name"] == sdxl_files.checkpoint
    assert meta["ss_sd_model_hash"] == legacy_model_hash(sdxl_files.path)
    assert meta["ss_num_train_images"] == "1" and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(") and meta["ss_learning_rate"] == str(TRAIN_LR)
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["hadakron.parts"] == '["unet"]'
    assert not any("attn2" in k for k in read_adapter(path).tensors)

    name = place_in_loras(comfy, path, "server_metadata_resume.safetensors")
    g2 = Graph()
    ckpt2, latent2, positive2 = sdxl_data(g2, sdxl_files, input_image)
    refused = train_node(g2, "lokr", ckpt2[0], latent2[0], positive2[0],
                         **dict(settings, steps=3, network_dim=8, resume_from=name))
    run2 = comfy.run(g2, timeout=900, expect_error=True)
    assert run2.error["node_id"] == refused.id, run2.error
    message = run2.error["exception_message"]
    assert f"resume_from {name!r} was trained with another network configuration" in message, message
    assert [ln for ln in message.splitlines() if ln.startswith("  ")] == ["  network_dim: saved 4, given 8"], message
    assert not loss_events(run2, refused.id)  # refused before the first step

    log_start = len(comfy.log.read_text(errors="replace"))
    g3 = Graph()
    ckpt3, latent3, positive3 = sdxl_data(g3, sdxl_files, input_image)
    resumed = train_node(g3, "lokr", ckpt3[0], latent3[0], positive3[0],
                         **dict(settings, steps=3, learning_rate=TRAIN_LR / 2, resume_from=name))
    save3 = g3.node("HadakronSaveAdapter", adapter=resumed[0], filename_prefix="server/metadata_resumed")
    run3 = comfy.run(g3, timeout=1800)
    log = comfy.log.read_text(errors="replace")[log_start:]
    assert [e["step"] for e in loss_events(run3, resumed.id)] == [3]
    out = read_adapter(saved_adapter_path(comfy, run3, save3.id)).metadata
    assert out["hadakron.step"] == "3" and out["hadakron.resume_from"] == name and out["hadakron.resumed_step"] == "2"
    assert out["ss_learning_rate"] == str(TRAIN_LR / 2) and out["ss_network_args"] == meta["ss_network_args"]
    assert f"learning_rate: saved {TRAIN_LR}, given {TRAIN_LR / 2}" in log and "steps: saved 2, given 3" in log, log

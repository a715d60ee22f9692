"""LoKr/LoHa Trainer and Save Adapter nodes on small SDXL and Anima models built from ComfyUI's classes.

A few steps: the loss falls; the saved file loads in our loader and in ComfyUI's own LoraLoader with the
same patched weights; an interrupt mid-run leaves a valid autosave (file + resume state); the
differentiable RMS+RoPE stand-in matches comfy_kitchen's fused op.

Everything runs the way ComfyUI's executor runs it: the models, latents and conditioning are made under
`torch.inference_mode()` (as the loader / encode nodes make them) and the node is called inside it.
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch


@pytest.fixture(scope="module")
def trainer_mod(pack):
    return importlib.import_module(pack.__name__ + ".nodes.trainer")


@pytest.fixture(scope="module")
def save_mod(pack):
    return importlib.import_module(pack.__name__ + ".nodes.save_adapter")


@pytest.fixture(scope="module")
def runtime_mod(pack):
    return importlib.import_module(pack.__name__ + ".nodes.trainer_runtime")


@pytest.fixture(scope="module")
def small_sdxl(comfy_env):
    """conftest's small SDXL, but built under inference mode as a prompt's checkpoint loader builds it."""
    from conftest import build_small_sdxl
    with torch.inference_mode():
        return build_small_sdxl(comfy_env)


@pytest.fixture(scope="module")
def small_anima(comfy_env):
    from conftest import build_small_anima
    with torch.inference_mode():
        return build_small_anima(comfy_env)


@pytest.fixture(scope="module")
def small_sdxl_clip(comfy_env):
    from conftest import build_small_sdxl_clip
    with torch.inference_mode():
        return build_small_sdxl_clip(comfy_env)


@pytest.fixture
def output_dir(comfy_env, tmp_path):
    fp = comfy_env.folder_paths
    before = fp.get_output_directory()
    fp.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "output").mkdir()
    yield tmp_path / "output"
    fp.set_output_directory(before)


@torch.inference_mode()
def sdxl_inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(n, 4, 16, 16, generator=g)}
    positive = [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    return latents, positive


@torch.inference_mode()
def anima_inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(n, 16, 1, 8, 8, generator=g)}
    positive = [[torch.randn(1, 6, 1024, generator=g) * 0.5,
                 {"t5xxl_ids": torch.randint(0, 32128, (6,), generator=g), "t5xxl_weights": torch.ones(6)}]]
    return latents, positive


STEPS, LR = 6, 5e-2


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    """Small models on a shared CPU: many threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def node_kwargs(**over):
    kw = dict(steps=6, batch_size=2, learning_rate=5e-3, optimizer="AdamW", scheduler="constant", warmup_steps=0,
              seed=3, network_dim=4, network_alpha=4.0, use_tucker=False, use_scalar=False, conv_dim=0,
              conv_alpha=1.0, rank_dropout=0.0, module_dropout=0.0, exclude_patterns="", include_patterns="",
              network_reg_dims="", network_reg_lrs="", loraplus_lr_ratio=0.0, train_llm_adapter=False,
              gradient_checkpointing=True, training_dtype="fp32", grad_accum_steps=1, max_grad_norm=1.0,
              weight_decay=0.0, save_every=0, autosave_prefix="hadakron/autosave", resume_from="none")
    kw.update(over)
    return kw


def run_node(node_cls, model, latents, positive, **kw):
    """Call the trainer node as the executor does: list inputs, inside torch.inference_mode()."""
    args = {k: [v] for k, v in node_kwargs(**kw).items()}
    with torch.inference_mode():
        return node_cls().train(model=[model], latents=[latents], positive=[positive], unique_id=["7"], **args)


@pytest.mark.parametrize("family,algo", [("sdxl", "lokr"), ("sdxl", "loha"), ("anima", "lokr")])
def test_trainer_loss_falls_and_files_load_everywhere(family, algo, comfy_env, trainer_mod, save_mod, pack_nodes,
                                                      small_sdxl, small_anima, output_dir):
    model = small_sdxl if family == "sdxl" else small_anima
    latents, positive = (sdxl_inputs if family == "sdxl" else anima_inputs)()
    node_cls = trainer_mod.HadakronLoKrTrainer if algo == "lokr" else trainer_mod.HadakronLoHaTrainer
    extra = {"factor": 4, "decompose_both": False} if algo == "lokr" else {}
    before = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    # Paired comparison: step k draws the same noise and sigmas in both runs (seeded per step), so the
    # trained run's loss at steps 2.. must be below the loss the untouched adapter has on the same draws.
    extra.update(conv_dim=4, conv_alpha=4.0)  # conv adapters too: the output conv learns fastest
    out = run_node(node_cls, model, latents, positive, steps=STEPS, learning_rate=LR, **extra)
    still = run_node(node_cls, model, latents, positive, steps=STEPS, learning_rate=1e-12, **extra)
    adapter, new_model, loss_map, clip_out = out["result"]
    assert clip_out is None  # no clip connected: passed through
    losses, untrained = loss_map["loss"], still["result"][2]["loss"]
    print("LOSSES", family, algo, [round(x, 4) for x in losses], [round(x, 4) for x in untrained])
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(untrained[0], rel=1e-5)
    # LoHa moves slower in its first steps (hada_w2_a starts at 0 and hada_w1_a at std 0.1, so dW grows as a
    # product of two small updates); the runs are seeded, so these margins are fixed numbers, not noise.
    margin = 0.97 if algo == "lokr" else 0.99
    assert sum(losses[2:]) < margin * sum(untrained[2:]), (losses, untrained)
    assert adapter.path is None and adapter.metadata["hadakron.step"] == str(STEPS)
    assert adapter.metadata["ss_steps"] == str(STEPS)
    # the base weights were never written and the bypass wrappers are gone
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in model.model.diffusion_model.modules())
    assert json.loads(out["ui"]["hadakron_loss"][0]) == {"loss": losses, "first_step": 1}

    saved = save_mod.HadakronSaveAdapter().save(adapter, "runs/test")["result"][0]
    from pathlib import Path
    path = Path(saved)
    assert path.parent == output_dir / "loras" / "runs" and path.exists()
    assert (path.parent / (path.stem + ".trainstate")).exists()
    second = save_mod.HadakronSaveAdapter().save(adapter, "runs/test")["result"][0]
    assert second != saved  # never overwrites
    with pytest.raises(ValueError, match="leaves the output folder"):
        save_mod.HadakronSaveAdapter().save(adapter, "../../escape")

    # our loader and ComfyUI's LoraLoader give the same patched weights
    from hadakron.io import read_adapter
    from conftest import patched_weights
    from safetensors.torch import load_file
    ours = pack_nodes.apply_adapter(model, None, read_adapter(path), 1.0, 0.0)[0]
    theirs = comfy_env.comfy.sd.load_lora_for_models(model, None, load_file(str(path)), 1.0, 0.0)[0]
    keys = [k for k in ours.patches][:40]
    assert keys and set(keys) <= set(theirs.patches)
    w_ours = patched_weights(ours, keys)
    w_theirs = patched_weights(theirs, keys)
    w_out = patched_weights(new_model, keys)
    base = {k: before[k[len("diffusion_model."):]] for k in keys}
    moved = 0
    for k in keys:
        assert torch.allclose(w_ours[k], w_theirs[k], rtol=1e-5, atol=1e-6), k
        assert torch.allclose(w_out[k], w_ours[k], rtol=1e-6, atol=1e-7), k
        moved += int(not torch.equal(w_ours[k], base[k]))
    assert moved > 0


def test_interrupt_leaves_valid_autosave_and_resume(comfy_env, trainer_mod, small_sdxl, output_dir, loras_dir,
                                                    monkeypatch):
    mm = comfy_env.mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):  # the user presses cancel once step 3 is reported
        if value >= 3:
            mm.interrupt_current_processing(True)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    latents, positive = sdxl_inputs()
    with pytest.raises(mm.InterruptProcessingException):
        run_node(trainer_mod.HadakronLoKrTrainer, small_sdxl, latents, positive, factor=4, decompose_both=False,
                 steps=10, autosave_prefix="auto/run")
    files = sorted((output_dir / "loras" / "auto").glob("*.safetensors"))
    assert [f.name for f in files] == ["run_step000003_00001_.safetensors"]
    from hadakron.io import read_adapter
    saved = read_adapter(files[0])
    assert saved.metadata["hadakron.step"] == "3" and not saved.problems
    assert (files[0].parent / (files[0].stem + ".trainstate")).exists()

    # resume from the autosave (copied into the loras folder) for 2 more steps
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    mm.interrupt_current_processing(False)
    import shutil
    for f in (files[0], files[0].parent / (files[0].stem + ".trainstate")):
        shutil.copy(f, loras_dir / f.name)
    out = run_node(trainer_mod.HadakronLoKrTrainer, small_sdxl, latents, positive, factor=4, decompose_both=False,
                   steps=5, resume_from=files[0].name, save_every=1, autosave_prefix="auto/resumed")
    adapter = out["result"][0]
    assert adapter.metadata["hadakron.step"] == "5" and len(out["result"][2]["loss"]) == 2
    # the closing message names the last autosave as the user finds it: relative to the output folder
    (text,) = out["ui"]["text"]
    assert text.endswith("; last autosave loras/auto/resumed_step000004_00001_.safetensors"), text
    assert (output_dir / "loras" / "auto" / "resumed_step000004_00001_.safetensors").exists()
    curve = json.loads(out["ui"]["hadakron_loss"][0])  # the chart places the resumed steps at 4 and 5
    assert curve["first_step"] == 4 and len(curve["loss"]) == 2


def test_differentiable_rms_rope_matches_kitchen(runtime_mod):
    ck = pytest.importorskip("comfy_kitchen")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=g)
    k = torch.randn(2, 5, 4, 16, generator=g)
    angles = torch.randn(5, 1, 8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    freqs = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)[None]  # (1,5,1,8,2,2)
    qs, ks = torch.rand(16, generator=g) + 0.5, torch.rand(16, generator=g) + 0.5
    ref_q, ref_k = ck.rms_rope_split_half(q, k, freqs, qs, ks, 1e-6)
    q2 = q.clone().requires_grad_(True)
    out_q, out_k = runtime_mod.rms_rope_split_half(q2, k, freqs, qs, ks, 1e-6)
    assert torch.allclose(out_q, ref_q, atol=1e-5) and torch.allclose(out_k, ref_k, atol=1e-5)
    out_q.sum().backward()
    assert q2.grad is not None and torch.isfinite(q2.grad).all()
    import comfy.quant_ops
    original = comfy.quant_ops.ck
    with runtime_mod.differentiable_kitchen():
        assert comfy.quant_ops.ck.rms_rope_split_half is runtime_mod.rms_rope_split_half
    assert comfy.quant_ops.ck is original


def test_live_loss_events_and_progress(comfy_env, trainer_mod, small_sdxl, output_dir, monkeypatch):
    import comfy.utils
    import server

    events, progress = [], []

    class Recorder:
        def send_sync(self, event, data, sid=None):
            events.append((event, data))
    monkeypatch.setattr(server.PromptServer, "instance", Recorder(), raising=False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: progress.append((v, t, node_id)))
    latents, positive = sdxl_inputs()
    out = run_node(trainer_mod.HadakronLoHaTrainer, small_sdxl, latents, positive, steps=3, scheduler="linear")
    losses = out["result"][2]["loss"]
    loss_events = [d for e, d in events if e == "hadakron.loss"]
    assert [d["step"] for d in loss_events] == [1, 2, 3]
    assert all(d["node"] == "7" and d["total"] == 3 for d in loss_events)
    assert [d["loss"] for d in loss_events] == losses
    assert [d["lr"] for d in loss_events] == pytest.approx([5e-3, 5e-3 * 2 / 3, 5e-3 / 3])
    assert (3, 3, "7") in progress


@torch.inference_mode()
def sdxl_for_small_clip(env):
    """Small SDXL whose context (CLIP-L 64 + CLIP-G 64) and adm (pooled 64 + 6*256) fit the small test CLIPs."""
    import conftest as cf
    cfg = dict(cf.SMALL_SDXL_UNET, context_dim=128, adm_in_channels=64 + 1536, dtype=torch.float32)
    mc = env.comfy.supported_models.SDXL(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    cf.randomize_(model, 5)
    cpu = torch.device("cpu")
    return env.comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@torch.inference_mode()
def anima_clip_full_vocab(env):
    """A one-layer Anima text encoder with Qwen's full vocabulary and width 1024 (what the llm_adapter takes)."""
    import comfy.text_encoders.anima as anima_te
    import conftest as cf
    target = env.comfy.supported_models_base.ClipTarget(anima_te.AnimaTokenizer, anima_te.te())
    config = dict(cf.SMALL_QWEN3, vocab_size=151936, hidden_size=1024, num_attention_heads=8, num_hidden_layers=1)
    clip = env.comfy.sd.CLIP(target=target, model_options={"qwen3_06b_model_config": config, "dtype": torch.float32})
    cf.randomize_(clip.cond_stage_model, 6)
    return clip


@pytest.mark.parametrize("family", ["sdxl", "anima"])
def test_text_encoder_training_with_captions(family, comfy_env, trainer_mod, small_sdxl, small_sdxl_clip,
                                             small_anima, output_dir):
    model, clip = (small_sdxl, small_sdxl_clip) if family == "sdxl" else (small_anima, anima_clip_full_vocab(comfy_env))
    latents, positive = (sdxl_inputs if family == "sdxl" else anima_inputs)()
    if family == "sdxl":  # the caption encodings replace the context: a UNet for the small CLIPs' widths
        model = sdxl_for_small_clip(comfy_env)
        with torch.inference_mode():
            positive = [[torch.zeros(1, 8, 128), {"pooled_output": torch.zeros(1, 64)}]]
    te_before = {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    args = {k: [v] for k, v in node_kwargs(steps=3, factor=4, decompose_both=False).items()}
    with torch.inference_mode():
        out = trainer_mod.HadakronLoKrTrainer().train(
            model=[model], latents=[latents], positive=[positive], unique_id=["7"], clip=[clip],
            captions=["a red cat\na blue dog"], te_learning_rate=[1e-2], **args)
    adapter, _, loss_map, clip_out = out["result"]
    te_prefix = "lora_te" if family == "anima" else "lora_te1_"
    te_keys = [k for k in adapter.tensors if k.startswith(te_prefix)]
    assert te_keys, sorted(adapter.tensors)[:5]
    trained = [k for k in te_keys if k.endswith("lokr_w2") or k.endswith("lokr_w2_b")]
    assert trained and any(float(adapter.tensors[k].abs().sum()) > 0 for k in trained)  # moved from the zero init
    assert len(loss_map["loss"]) == 3 and all(x == x for x in loss_map["loss"])
    assert clip_out is not clip and len(clip_out.patcher.patches) > 0
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(te_before[k], after[k]) for k in te_before)
    assert not any("forward" in m.__dict__ for m in clip.cond_stage_model.modules())


def test_same_seed_same_run(comfy_env, trainer_mod, small_sdxl, output_dir):
    """Seeded reproducibility through the node: adapter init, noise and sigmas all follow `seed`."""
    latents, positive = sdxl_inputs()
    runs = [run_node(trainer_mod.HadakronLoHaTrainer, small_sdxl, latents, positive, steps=3, learning_rate=LR,
                     seed=seed)["result"] for seed in (5, 5, 6)]
    (a, _, loss_a, _), (b, _, loss_b, _), (c, _, loss_c, _) = runs
    assert loss_a["loss"] == loss_b["loss"]
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert loss_c["loss"] != loss_a["loss"]


@pytest.mark.parametrize("family", ["sdxl", "anima"])
def test_gradient_checkpointing_really_checkpoints(family, trainer_mod, small_sdxl, small_anima, output_dir,
                                                   monkeypatch):
    """ComfyUI calls SDXL's layers one by one (forward_timestep_embed), never a block's forward: checkpointing must
    wrap what is called, and give the same losses as without it."""
    import torch.utils.checkpoint as tuc
    model = small_sdxl if family == "sdxl" else small_anima
    latents, positive = (sdxl_inputs if family == "sdxl" else anima_inputs)()
    calls = []
    original = tuc.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(tuc, "checkpoint", counting)
    on = run_node(trainer_mod.HadakronLoKrTrainer, model, latents, positive, steps=2, factor=4, decompose_both=False,
                  gradient_checkpointing=True)["result"][2]["loss"]
    assert calls, "gradient_checkpointing=True ran no torch.utils.checkpoint call"
    n = len(calls)
    off = run_node(trainer_mod.HadakronLoKrTrainer, model, latents, positive, steps=2, factor=4, decompose_both=False,
                   gradient_checkpointing=False)["result"][2]["loss"]
    assert len(calls) == n  # off means off
    assert on == pytest.approx(off, rel=1e-5)


# ---------------------------------------------------------------- compact trainer + option nodes vs the legacy node

def _widget_defaults(node_cls) -> dict:
    """{input: default} of every widget of a node class, as a fresh node in the frontend holds them."""
    spec = node_cls.INPUT_TYPES()
    return {name: s[1]["default"] for section in ("required", "optional") for name, s in spec.get(section, {}).items()
            if len(s) > 1 and "default" in s[1]}


def _call(node_cls, model, latents, positive, **inputs):
    with torch.inference_mode():
        return node_cls().train(model=[model], latents=[latents], positive=[positive], unique_id=["7"],
                                **{k: [v] for k, v in inputs.items()})["result"]


def _same_run(a, b) -> None:
    (adapter_a, _, loss_a, _), (adapter_b, _, loss_b, _) = a, b
    assert loss_a["loss"] == loss_b["loss"]
    assert adapter_a.tensors.keys() == adapter_b.tensors.keys()
    assert all(torch.equal(adapter_a.tensors[k], adapter_b.tensors[k]) for k in adapter_a.tensors)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_compact_trainer_without_options_trains_as_the_legacy_defaults(algo, trainer_mod, small_sdxl, output_dir):
    """No option node connected: the same run, bit for bit, as a fresh legacy node left at its widget defaults
    (bf16 autocast, gradient checkpointing, AdamW with weight decay 0.01, clipping at 1.0)."""
    legacy, compact = ((trainer_mod.HadakronLoKrTrainer, trainer_mod.HadakronTrainLoKr) if algo == "lokr"
                       else (trainer_mod.HadakronLoHaTrainer, trainer_mod.HadakronTrainLoHa))
    latents, positive = sdxl_inputs()
    old = dict(_widget_defaults(legacy), steps=2)
    new = dict(_widget_defaults(compact), steps=2)
    assert set(new) < set(old) and len(new) <= 10, sorted(new)  # the compact node: a few widgets
    _same_run(_call(legacy, small_sdxl, latents, positive, **old), _call(compact, small_sdxl, latents, positive, **new))


def test_option_nodes_carry_their_settings(trainer_mod, pack, small_sdxl, output_dir):
    """Each option node's dict reaches the run: non-default settings in all three groups give the same run as the
    legacy node with those widgets; a dict with a setting of no group is refused before training."""
    import importlib
    options = importlib.import_module(pack.__name__ + ".nodes.trainer_options")
    nodes = options.NODE_CLASS_MAPPINGS
    latents, positive = sdxl_inputs()
    network = dict(_widget_defaults(nodes["HadakronNetworkOptions"]), use_scalar=True, decompose_both=True,
                   exclude_patterns=".*attn2.*")
    optimizer = dict(_widget_defaults(nodes["HadakronOptimizerOptions"]), scheduler="linear", warmup_steps=1,
                     weight_decay=0.0)
    precision = dict(_widget_defaults(nodes["HadakronPrecisionOptions"]), training_dtype="fp32",
                     gradient_checkpointing=False, batch_size=2, max_grad_norm=0.5)
    own = dict(_widget_defaults(trainer_mod.HadakronTrainLoKr), steps=3, learning_rate=LR, network_dim=4,
               network_alpha=4.0, factor=4, seed=11)
    dicts = {"network_options": nodes["HadakronNetworkOptions"]().options(**network)[0],
             "optimizer_options": nodes["HadakronOptimizerOptions"]().options(**optimizer)[0],
             "precision_options": nodes["HadakronPrecisionOptions"]().options(**precision)[0]}
    compact = _call(trainer_mod.HadakronTrainLoKr, small_sdxl, latents, positive, **own, **dicts)
    legacy = _call(trainer_mod.HadakronLoKrTrainer, small_sdxl, latents, positive,
                   **dict(_widget_defaults(trainer_mod.HadakronLoKrTrainer), **own, **network, **optimizer,
                          **precision))
    _same_run(compact, legacy)
    assert compact[0].metadata["ss_lr_scheduler"] == "linear" and compact[0].metadata["ss_train_batch_size"] == "2"
    assert not any("attn2" in k for k in compact[0].tensors)
    with pytest.raises(ValueError, match="network_options.*unknown settings.*'steps'"):
        _call(trainer_mod.HadakronTrainLoKr, small_sdxl, latents, positive, **own,
              network_options=dict(dicts["network_options"], steps=5))


# ---------------------------------------------------------------- float8 base (UNETLoader weight_dtype fp8_*)

def _small_sdxl_fp8(env, weight_dtype):
    """The small SDXL as UNETLoader loads it with weight_dtype fp8_*: float8 weights, ComfyUI's manual-cast ops
    (compute dtype float32 on CPU), built under inference mode; and its float32 twin holding the same float8 values."""
    from conftest import SMALL_SDXL_UNET, _patcher, randomize_
    models = {}
    for dtype, cast in ((torch.float32, None), (weight_dtype, torch.float32)):
        mc = env.comfy.supported_models.SDXL(dict(SMALL_SDXL_UNET, dtype=dtype))
        mc.set_inference_dtype(dtype, cast)
        with torch.inference_mode():
            models[dtype] = mc.get_model({})
    fp32, fp8 = models[torch.float32], models[weight_dtype]
    with torch.inference_mode():
        randomize_(fp32, 0)
        low = dict(fp8.named_parameters())
        for name, p in fp32.named_parameters():
            low[name].copy_(p)  # rounds to float8 where the fp8 model stores float8
            p.copy_(low[name].float())
    return _patcher(env, fp8), _patcher(env, fp32)


@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_trainer_on_float8_base(weight_dtype, comfy_env, trainer_mod, output_dir, monkeypatch):
    """Trains on float8 weights without upcasting the model (weights stay float8, bit for bit; the adapted Linears
    run on a per-call upcast through hadakron.ops.frozen_linear), and the run equals the run on a float32 model
    holding the same float8 values."""
    import hadakron.ops
    calls = []
    frozen_linear = hadakron.ops.frozen_linear
    monkeypatch.setattr(hadakron.ops, "frozen_linear", lambda *a, **k: (calls.append(1), frozen_linear(*a, **k))[1])
    fp8, fp32 = _small_sdxl_fp8(comfy_env, weight_dtype)
    dm = fp8.model.diffusion_model
    assert dm.input_blocks[4][1].proj_in.weight.dtype == weight_dtype
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    latents, positive = sdxl_inputs()
    # SGD: an update linear in the gradient, so the two runs' last-bit differences stay last-bit (Adam's first steps
    # are sign(grad)-sized and amplify them where a gradient is near zero)
    kw = dict(steps=4, learning_rate=1.0, optimizer="SGD", factor=4, decompose_both=False, conv_dim=4, conv_alpha=4.0)
    out = run_node(trainer_mod.HadakronLoKrTrainer, fp8, latents, positive, **kw)["result"]
    assert calls, "no adapted Linear ran through ops.frozen_linear"
    n = len(calls)
    ref = run_node(trainer_mod.HadakronLoKrTrainer, fp32, latents, positive, **kw)["result"]
    assert len(calls) == n  # float32 weights: the layers' own forward
    losses = out[2]["loss"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(ref[2]["loss"], rel=1e-4)
    for k, t in out[0].tensors.items():
        r = ref[0].tensors[k]
        assert float((t - r).norm()) <= 1e-4 * float(r.norm()) + 1e-9, k
    after = dm.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k].view(torch.uint8) if after[k].dtype ==
               weight_dtype else after[k], before[k].view(torch.uint8) if before[k].dtype == weight_dtype
               else before[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in dm.modules())


def test_text_encoder_not_trained_runs_no_encode_per_step(trainer_mod, small_sdxl, small_sdxl_clip, output_dir,
                                                           monkeypatch):
    """CLIP connected but no captions: the TE is not trained, so the conditioning given (CLIPTextEncode's output,
    encoded once upstream and cached by the executor) serves every step; the CLIP never encodes during the run."""
    calls = []
    for name in ("encode_from_tokens", "tokenize"):
        original = getattr(type(small_sdxl_clip), name)
        monkeypatch.setattr(type(small_sdxl_clip), name,
                            lambda self, *a, _f=original, _n=name, **k: (calls.append(_n), _f(self, *a, **k))[1])
    latents, positive = sdxl_inputs()
    args = {k: [v] for k, v in node_kwargs(steps=3, factor=4, decompose_both=False).items()}
    with torch.inference_mode():
        out = trainer_mod.HadakronLoKrTrainer().train(model=[small_sdxl], latents=[latents], positive=[positive],
                                                      unique_id=["7"], clip=[small_sdxl_clip], captions=[""],
                                                      **args)
    adapter, _, loss_map, clip_out = out["result"]
    assert len(loss_map["loss"]) == 3 and calls == []
    assert clip_out is small_sdxl_clip and not any(k.startswith("lora_te") for k in adapter.tensors)


# ---------------------------------------------------------------- the saved file says how it was made

KEEP, ABSENT = object(), object()  # a setting left at its default (a model check; the other family's) / no such key
# every input of the compact trainers and every option-node setting, at a value other than its default, and where the
# metadata says it: ("args", x) is ss_network_args' entry, else the key; the value as it must read there
NON_DEFAULT = {
    "steps": (2, "ss_max_train_steps", "2"), "learning_rate": (2e-4, "ss_learning_rate", "0.0002"),
    "seed": (7, "ss_seed", "7"), "network_dim": (3, "ss_network_dim", "3"),
    "network_alpha": (2.0, "ss_network_alpha", "2.0"), "factor": (4, "args", "4"),
    "save_every": (5, "hadakron.save_every_n_steps", "5"),
    "autosave_prefix": ("meta/run", "hadakron.autosave_prefix", "meta/run"),
    "resume_from": ("None", "hadakron.resume_from", "None"),  # a resumed run: test_resume_checks_the_configuration
    "decompose_both": (True, "args", "True"), "use_tucker": (True, "args", "True"),
    "use_scalar": (True, "args", "True"), "conv_dim": (2, "args", "2"), "conv_alpha": (2.0, "args", "2.0"),
    "rank_dropout": (0.1, "args", "0.1"), "module_dropout": (0.05, "args", "0.05"),
    "exclude_patterns": (".*attn2.*", "args", "['.*attn2.*']"),
    "include_patterns": (".*attn2.to_k", "args", "['.*attn2.to_k']"),
    "network_reg_dims": (".*ff.*=2", "args", ".*ff.*=2"),
    "network_reg_lrs": (".*attn1.*=0.001", "args", ".*attn1.*=0.001"),
    "loraplus_lr_ratio": (2.0, "args", "2.0"), "train_llm_adapter": (True, "args", "True"),
    "optimizer": ("SGD", "ss_optimizer", "torch.optim.sgd.SGD(momentum=0.0,weight_decay=0.02)"),
    "scheduler": ("linear", "ss_lr_scheduler", "linear"), "warmup_steps": (1, "ss_lr_warmup_steps", "1"),
    "weight_decay": (0.02, "ss_optimizer", "torch.optim.sgd.SGD(momentum=0.0,weight_decay=0.02)"),
    "te_learning_rate": (1e-5, "ss_text_encoder_lr", "1e-05"),
    "training_dtype": ("fp32", "ss_mixed_precision", "no"),
    "gradient_checkpointing": (False, "ss_gradient_checkpointing", "False"),
    "batch_size": (2, "ss_batch_size_per_device", "2"), "grad_accum_steps": (2, "ss_gradient_accumulation_steps", "2"),
    "max_grad_norm": (0.5, "ss_max_grad_norm", "0.5"),
    "captions": ("a red cat, photo\na blue dog, photo", "ss_tag_frequency",
                 json.dumps({"latents": {"a red cat": 1, "photo": 2, "a blue dog": 1}})),
    "clip": (None, "hadakron.parts", json.dumps(["unet", "te1", "te2"])),
    "latents": (None, "ss_num_train_images", "2"),
    "model": (None, "ss_base_model_version", "sdxl_base_v1-0"),
    "positive": (None, None, None),  # conditioning tensors: nothing a file could say about them
    # objective options on an SDXL (epsilon) model; the model checks (v_parameterization, zero_terminal_snr,
    # scale_v_pred_loss_like_noise_pred) stay at their default and say so; Anima's are not SDXL keys
    "min_snr_gamma": (5.0, "ss_min_snr_gamma", "5.0"),
    "debiased_estimation_loss": (True, "ss_debiased_estimation", "True"),
    "noise_offset": (0.05, "ss_noise_offset", "0.05"),
    "adaptive_noise_scale": (0.01, "ss_adaptive_noise_scale", "0.01"),
    "multires_noise_iterations": (2, "ss_multires_noise_iterations", "2"),
    "multires_noise_discount": (0.5, "ss_multires_noise_discount", "0.5"),
    "ip_noise_gamma": (0.1, "ss_ip_noise_gamma", "0.1"), "loss_type": ("huber", "ss_loss_type", "huber"),
    "huber_schedule": ("constant", "ss_huber_schedule", "constant"), "huber_c": (0.2, "ss_huber_c", "0.2"),
    "v_parameterization": (KEEP, "ss_v_parameterization", "False"),
    "zero_terminal_snr": (KEEP, "ss_zero_terminal_snr", "False"),
    "scale_v_pred_loss_like_noise_pred": (KEEP, "ss_scale_v_pred_loss_like_noise_pred", "False"),
    **{name: (KEEP, f"ss_{name}", ABSENT) for name in ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale",
                                                       "weighting_scheme", "logit_mean", "logit_std", "mode_scale")},
}


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_every_input_appears_in_the_metadata(algo, comfy_env, trainer_mod, pack, small_sdxl_clip, output_dir):
    """Both compact trainers with every widget and option-node setting changed from its default: each value is in
    the adapter's metadata (ss_* keys as sd-scripts writes them), and the metadata reads back to the run's configs."""
    options = importlib.import_module(pack.__name__ + ".nodes.trainer_options")
    node_cls = trainer_mod.HadakronTrainLoKr if algo == "lokr" else trainer_mod.HadakronTrainLoHa
    spec = node_cls.INPUT_TYPES()
    sockets = {group.socket: group for group in options.OPTION_GROUPS}
    inputs = [n for section in ("required", "optional") for n in spec[section] if n not in sockets]
    settings = [n for group in options.OPTION_GROUPS for n in group.settings]
    lokr_only = set(options.LOKR_ONLY)
    expected_names = set(inputs) | (set(settings) - (set() if algo == "lokr" else lokr_only))
    assert expected_names <= set(NON_DEFAULT), sorted(expected_names - set(NON_DEFAULT))
    for name in expected_names - {"clip", "latents", "model", "positive", "captions", "resume_from"}:
        given, default = NON_DEFAULT[name][0], options.all_specs()[name][1]["default"]
        assert given is KEEP or given != default, name

    model = sdxl_for_small_clip(comfy_env)
    latents, _ = sdxl_inputs()
    with torch.inference_mode():
        positive = [[torch.zeros(1, 8, 128), {"pooled_output": torch.zeros(1, 64)}]]
    value = {name: NON_DEFAULT[name][0] for name in expected_names if NON_DEFAULT[name][0] is not KEEP}
    dicts = {group.socket: {n: value[n] for n in group.settings if n in value} for group in options.OPTION_GROUPS}
    own = {n: value[n] for n in inputs if n not in ("model", "latents", "positive", "clip", "captions")}
    with torch.inference_mode():
        out = node_cls().train(model=[model], latents=[latents], positive=[positive], unique_id=["7"],
                               clip=[small_sdxl_clip], captions=[value["captions"]],
                               **{k: [v] for k, v in {**own, **dicts}.items()})
    meta = out["result"][0].metadata
    args = json.loads(meta["ss_network_args"])
    for name in sorted(expected_names):
        _, key, shown = NON_DEFAULT[name]
        if shown is ABSENT:
            assert key not in meta, key
        elif key is not None:
            assert (args.get(name) if key == "args" else meta.get(key)) == shown, (name, key, meta.get(key), args)
    assert meta["ss_resolution"] == "(128, 128)" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_steps"] == "2" and meta["hadakron.step"] == "2"
    assert "ss_sd_model_name" not in meta  # built in memory: no file to name or hash

    from hadakron.train.metadata import network_config_from_metadata, train_config_from_metadata
    net = network_config_from_metadata(meta)
    assert (net.algo, net.network_dim, net.exclude_patterns, net.network_reg_dims) == (
        algo, 3, [".*attn2.*"], {".*ff.*": 2})
    train = train_config_from_metadata(meta)
    assert (train.optimizer, train.weight_decay, train.te_lr, train.dtype, train.grad_accum_steps) == (
        "SGD", 0.02, 1e-5, "fp32", 2)


def test_resume_checks_the_configuration(comfy_env, trainer_mod, small_sdxl, output_dir, loras_dir, caplog):
    """resume_from refuses settings that build another network (each named, saved vs given) before training, and
    resumes with a changed learning rate and step count (logged), writing the file it resumed from."""
    latents, positive = sdxl_inputs()
    first = run_node(trainer_mod.HadakronLoKrTrainer, small_sdxl, latents, positive, factor=4, decompose_both=False,
                     steps=2, save_every=1, autosave_prefix="meta/first", exclude_patterns=".*attn2.*")
    assert first["result"][0].metadata["hadakron.step"] == "2"
    (saved,) = sorted((output_dir / "loras" / "meta").glob("first_step000001_*.safetensors"))
    import shutil
    for f in (saved, saved.with_suffix(".trainstate")):
        shutil.copy(f, loras_dir / f.name)
    with pytest.raises(ValueError) as info:
        run_node(trainer_mod.HadakronLoKrTrainer, small_sdxl, latents, positive, factor=2, decompose_both=False,
                 steps=3, resume_from=saved.name, network_dim=8, exclude_patterns="")
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"resume_from {saved.name!r} was trained with another network configuration"), lines
    assert lines[1:] == ["  network_dim: saved 4, given 8", "  factor: saved 4, given 2",
                         "  exclude_patterns: saved ['.*attn2.*'], given []"], lines
    with caplog.at_level("INFO", logger="hadakron"):
        out = run_node(trainer_mod.HadakronLoKrTrainer, small_sdxl, latents, positive, factor=4, decompose_both=False,
                       steps=3, resume_from=saved.name, learning_rate=1e-3, exclude_patterns=".*attn2.*")
    meta = out["result"][0].metadata
    assert meta["hadakron.step"] == "3" and len(out["result"][2]["loss"]) == 2
    assert meta["hadakron.resume_from"] == saved.name and meta["hadakron.resumed_step"] == "1"
    assert meta["ss_learning_rate"] == "0.001"
    assert "learning_rate: saved 0.005, given 0.001" in caplog.text and "steps: saved 2, given 3" in caplog.text

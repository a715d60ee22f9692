"""The LoHa/LoKr loader over every file layout and form, block weights and the model-only node, through POST /prompt.

Cost is ModelSave / CLIPSave and comparing tensors, so each family gets ONE big prompt: many HadakronLoader nodes
chained (each its own file, in one key layout, on its own layers, at its own strengths), then one ModelSave and one
CLIPSave. Every targeted tensor is compared with the float64 reference W + s*dW (DoRA: W + s*(W_d - W)), every
other tensor with the base bit for bit. Key names, SGM -> diffusers names, block labels and PEFT's scale rule are
written out independently in loader_matrix_files.py. A first, cheap prompt (loader -> PreviewAny) reads the block
labels from a report; the big prompt feeds two of them back as `block_weights` to another file.
DoRA follows LyCORIS and the DoRA paper: W_d = (W + dW) * m / ||W + dW||, per output row for a (out, 1, ...)
dora_scale and per input column for (1, in, ...); ComfyUI's own row-wise DoRA takes ||W|| instead.
Run time on a 2-core machine: SDXL ~27 s, Anima ~15 s (after the server is up); 80 s / 45 s when it is overloaded.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from comfy_client import Graph
from loader_matrix_files import (
    AdapterSpec, Target, assert_saved_file, check_disjoint, check_report, expectations, expected_block,
    layer_shapes_of, one_torch_thread, strict_json, write_spec,
)

TE = "text_model.encoder.layers"
T1 = "transformer_blocks"

# ---------------------------------------------------------------- SDXL files: one layout each, disjoint layers


def sdxl_specs(label_unet: str = "M00", label_te: str = "TE1") -> list[AdapterSpec]:
    """The SDXL files of the matrix, in chain order; the last one takes `<label_unet>=0, <label_te>=0` (labels read
    from a report) as block weights."""
    specs = [
        AdapterSpec("mx_kohya.safetensors", "sdxl", "kohya", [
            Target("unet", f"input_blocks.4.1.{T1}.0.attn1.to_q", "loha", rank=3, alpha=2.0),
            Target("unet", "input_blocks.1.0.in_layers.2", "loha_tucker", rank=2, alpha=1.0),        # 3x3 conv
            Target("unet", f"output_blocks.3.1.{T1}.1.ff.net.0.proj", "lokr_both", rank=2, alpha=3.0),
            Target("unet", "input_blocks.6.0.op", "lokr_tucker", rank=3, alpha=1.5),                 # downsample
            Target("te1", f"{TE}.0.self_attn.q_proj", "loha", rank=2, alpha=1.0),
            Target("te2", f"{TE}.5.mlp.fc1", "lokr_lowrank", rank=4, alpha=2.0),
        ], strength_model=1.0, strength_clip=1.0),
        AdapterSpec("mx_comfyui.safetensors", "sdxl", "comfyui", [
            Target("unet", "input_blocks.3.0.op", "lokr_full"),                                       # downsample
            Target("unet", f"middle_block.1.{T1}.3.ff.net.2", "lokr_full"),
            Target("unet", "output_blocks.1.0.skip_connection", "loha", rank=2, alpha=4.0),           # 1x1 conv
            Target("unet", "output_blocks.2.2.conv", "loha_tucker", rank=3, alpha=2.0),               # upsample
            Target("te1", f"{TE}.3.mlp.fc2", "lokr_both", rank=3, alpha=1.0),
            Target("te2", f"{TE}.20.self_attn.k_proj", "loha", rank=2, alpha=1.0),
        ], strength_model=0.8, strength_clip=-0.5),
        AdapterSpec("mx_lycoris.safetensors", "sdxl", "lycoris", [
            Target("unet", f"input_blocks.7.1.{T1}.9.attn2.to_k", "lokr_lowrank", rank=2, alpha=1.0),  # (320, 2048)
            Target("unet", "output_blocks.5.1.proj_out", "lokr_full"),
            Target("unet", "middle_block.2.out_layers.3", "loha", rank=2, alpha=2.0),
            Target("unet", "output_blocks.8.0.in_layers.2", "lokr_full"),                             # (320, 640, 3, 3)
            Target("unet", "output_blocks.5.2.conv", "lokr_tucker", rank=2, alpha=1.0),
        ], strength_model=-0.5, strength_clip=1.0),
        AdapterSpec("mx_diffusers.safetensors", "sdxl", "diffusers", [
            Target("unet", "input_blocks.5.0.emb_layers.1", "loha", rank=2, alpha=1.0),
            Target("unet", f"output_blocks.0.1.{T1}.7.attn1.to_out.0", "lokr_lowrank", rank=3, alpha=2.0),
            Target("unet", "time_embed.0", "lokr_both", rank=2, alpha=1.0),
            Target("unet", "input_blocks.2.0.out_layers.3", "lokr_tucker", rank=2, alpha=2.0),
            Target("te1", f"{TE}.7.self_attn.v_proj", "lokr_full"),
            Target("te2", f"{TE}.30.mlp.fc2", "loha", rank=2, alpha=1.0),
        ], strength_model=1.0, strength_clip=1.0),
        # PEFT LoHa with its adapter_config.json: no alpha tensors; first matching pattern wins ("to_k" before
        # "attn2.to_k"), rank_pattern must give the tensors' own rank
        AdapterSpec("mx_peft_loha/adapter_model.safetensors", "sdxl", "peft", [
            Target("unet", f"input_blocks.8.1.{T1}.2.attn2.to_k", "loha", rank=2, alpha=None),
            Target("unet", f"middle_block.1.{T1}.6.ff.net.2", "loha", rank=4, alpha=None),
            Target("unet", "input_blocks.4.0.in_layers.2", "loha_tucker", rank=3, alpha=None),
            Target("unet", f"output_blocks.4.1.{T1}.0.attn1.to_v", "loha", rank=4, alpha=None),
            Target("te1", f"{TE}.9.self_attn.k_proj", "loha", rank=4, alpha=None),
        ], strength_model=1.0, strength_clip=0.8,
            peft_config={"peft_type": "LOHA", "r": 4, "alpha": 8, "rank_pattern": {"attn2.to_k": 2, "conv1": 3},
                         "alpha_pattern": {"to_k": 3.0, "attn2.to_k": 5.0, "mid_block.*ff.net.2": 1.5}}),
        # PEFT LoKr: alpha / r for every form, also both factors full (folded into a factor by the reader; no
        # missing-alpha warning is due there, since a both-full LoKr never uses alpha)
        AdapterSpec("mx_peft_lokr/adapter_model.safetensors", "sdxl", "peft", [
            Target("unet", "input_blocks.5.1.proj_in", "lokr_full", alpha=None),                    # w2 80x80: r 48
            Target("unet", "output_blocks.6.0.out_layers.3", "lokr_tucker", rank=4, alpha=None),
            Target("unet", f"output_blocks.4.1.{T1}.1.attn2.to_q", "lokr_lowrank", rank=4, alpha=None),
            Target("unet", "input_blocks.8.0.emb_layers.1", "lokr_both", rank=4, alpha=None),
        ], strength_model=0.8, strength_clip=1.0,
            peft_config={"peft_type": "LOKR", "r": 4, "alpha": 2, "rank_pattern": {"proj_in": 48},
                         "alpha_pattern": {"proj_in": 12}}),
        # PEFT adapter of CLIP-G alone (bare base_model.model.text_model...): layer 25 exists only in CLIP-G, so the
        # whole file is CLIP-G, also its layer 3
        AdapterSpec("mx_peft_clip_g/adapter_model.safetensors", "sdxl", "peft_bare_clip", [
            Target("te2", f"{TE}.3.self_attn.q_proj", "loha", rank=2, alpha=None),
            Target("te2", f"{TE}.25.mlp.fc1", "loha", rank=2, alpha=None),
        ], strength_model=1.0, strength_clip=-0.5,
            peft_config={"peft_type": "LOHA", "r": 2, "alpha": 1}),
        # PEFT layout without a config: the scale comes from the file's alpha tensors (1, with a warning, where
        # there is none)
        AdapterSpec("mx_peft_noconfig.safetensors", "sdxl", "peft", [
            Target("unet", "input_blocks.7.0.in_layers.2", "loha", rank=2, alpha=None),
            Target("unet", "output_blocks.7.0.skip_connection", "lokr_lowrank", rank=3, alpha=6.0),
            Target("te2", f"{TE}.14.self_attn.out_proj", "loha", rank=2, alpha=1.0),
        ], strength_model=1.5, strength_clip=1.0, warned_alpha=("input_blocks.7.0.in_layers.2",)),
        AdapterSpec("mx_dora.safetensors", "sdxl", "kohya", [
            Target("unet", f"input_blocks.5.1.{T1}.1.attn1.to_k", "loha", rank=2, alpha=1.0, dora="row"),
            Target("unet", f"output_blocks.2.1.{T1}.4.attn2.to_v", "lokr_lowrank", rank=2, alpha=1.0, dora="col"),
            Target("unet", "output_blocks.7.0.in_layers.2", "lokr_full", dora="row"),                # conv, row-wise
            Target("te1", f"{TE}.5.mlp.fc1", "loha", rank=2, alpha=2.0, dora="row"),
        ], strength_model=0.8, strength_clip=-0.5),
        AdapterSpec("mx_blocks.safetensors", "sdxl", "kohya", [
            Target("unet", f"input_blocks.4.1.{T1}.1.attn2.to_out.0", "loha", block_weight=0.5),
            Target("unet", "input_blocks.4.0.out_layers.3", "lokr_lowrank", block_weight=0.5),
            Target("unet", "input_blocks.5.1.proj_out", "lokr_both"),
            Target("unet", f"middle_block.1.{T1}.0.attn1.to_q", "lokr_lowrank"),
            Target("unet", "output_blocks.4.1.proj_in", "lokr_full", block_weight=0.0),
            Target("unet", "output_blocks.6.0.in_layers.2", "loha", block_weight=0.0),
            Target("unet", "label_emb.0.0", "loha"),
            Target("te1", f"{TE}.8.self_attn.out_proj", "loha"),
            Target("te2", f"{TE}.10.mlp.fc2", "lokr_lowrank", block_weight=0.0),
        ], strength_model=1.25, strength_clip=0.9, block_weights="IN04=0.5, OUT=0, TE2=0"),
        # the model-only node inside the chain: its UNet modules are baked, its text-encoder modules not loaded
        AdapterSpec("mx_model_only.safetensors", "sdxl", "comfyui", [
            Target("unet", "output_blocks.3.0.emb_layers.1", "loha"),
            Target("unet", "middle_block.1.proj_in", "lokr_lowrank", rank=3),
            Target("te1", f"{TE}.1.mlp.fc2", "loha"),
            Target("te2", f"{TE}.2.self_attn.v_proj", "lokr_full"),
        ], strength_model=-0.75, strength_clip=None),
    ]
    label_targets = [
        Target("unet", f"middle_block.1.{T1}.5.attn1.to_v", "loha"),
        Target("unet", "middle_block.0.in_layers.2", "lokr_full"),
        Target("unet", f"input_blocks.5.1.{T1}.0.attn2.to_q", "lokr_lowrank"),
        Target("unet", f"output_blocks.1.1.{T1}.3.attn1.to_out.0", "loha"),
        Target("te1", f"{TE}.4.self_attn.v_proj", "loha"),
        Target("te2", f"{TE}.12.self_attn.q_proj", "lokr_both"),
    ]
    for t in label_targets:
        if expected_block("sdxl", t.part, t.dotted) in (label_unet, label_te):
            t.block_weight = 0.0
    specs.append(AdapterSpec("mx_labels.safetensors", "sdxl", "comfyui", label_targets, strength_model=0.7,
                             strength_clip=1.1, block_weights=f"{label_unet}=0, {label_te}=0"))
    return specs


# ---------------------------------------------------------------- graph and report helpers


def chain_loaders(g: Graph, model, clip, specs: list[AdapterSpec]):
    """Chain one loader node per spec from (model, clip); returns ({spec name: node}, model, clip)."""
    nodes = {}
    for spec in specs:
        if spec.model_only:
            node = g.node("HadakronLoaderModelOnly", model=model, lora_name=spec.name,
                          strength_model=spec.strength_model, block_weights=spec.block_weights)
            model = node[0]
        else:
            node = g.node("HadakronLoader", model=model, clip=clip, lora_name=spec.name,
                          strength_model=spec.strength_model, strength_clip=spec.strength_clip,
                          block_weights=spec.block_weights)
            model, clip = node[0], node[1]
        nodes[spec.name] = node
    return nodes, model, clip


def run_probe(comfy, g, probe) -> tuple[dict, dict]:
    """Run the probe loader (its report text previewed) and return (its report, {(part, layer): block label})."""
    g.node("PreviewAny", source=probe[2])
    report, _ = node_report(comfy.run(g), probe)
    return report, {(m["part"], m["layer"]): m["block"] for m in report["matched"]}


def node_report(run, node) -> tuple[dict, str]:
    """(report dict, text) from the node's UI outputs in /history; the JSON must be strict JSON."""
    ui = run.outputs.get(node.id)
    assert ui is not None and set(ui) >= {"hadakron_report", "text"}, (node.id, ui)
    (raw,), (text,) = ui["hadakron_report"], ui["text"]
    return strict_json(raw), text


def saved_files(comfy, subfolder: str, prefix: str) -> list[Path]:
    """Files a save node wrote as output/<subfolder>/<prefix>_*.safetensors."""
    return sorted((comfy.output_dir / subfolder).glob(f"{prefix}_*.safetensors"))


class Failures:
    """Collects assertion failures of independent checks, so one wrong layout does not hide the others."""

    def __init__(self):
        self.messages: list[str] = []

    def check(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None with its AssertionError recorded under `what`."""
        try:
            return fn(*args, **kwargs)
        except AssertionError as exc:
            self.messages.append(f"--- {what}:\n{exc}")
            return None

    def raise_if_any(self):
        """Fail with every recorded message."""
        assert not self.messages, f"{len(self.messages)} checks failed:\n" + "\n".join(self.messages)


def check_reports(failures: Failures, run, specs: list[AdapterSpec], nodes: dict) -> None:
    """Every loader's UI output (in /history and in the websocket's executed event) is strict JSON and says what
    its spec wrote."""
    executed = {e["node"]: e.get("output") or {} for e in run.events_of("executed")}
    for spec in specs:
        node = nodes[spec.name]
        report, text = failures.check(f"{spec.name} UI output", node_report, run, node) or (None, None)
        if report is None:
            continue
        failures.check(f"{spec.name} report", check_report, report, text, spec)
        failures.check(f"{spec.name} executed event", _assert_in_executed, executed, node.id)


def _free(paths) -> None:
    """Delete the saved files (a ModelSave output is a GB)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)


def _label_round_trip_branches(g: Graph, model, clip, spec: AdapterSpec, labels: list[str]) -> dict:
    """Side branches (loader -> PreviewAny) feeding each label back as `<label>=0` ("zero") and `ALL=0, <label>=1`
    ("only"); returns {(label, mode): loader node}."""
    out = {}
    for label in labels:
        for mode, text in (("zero", f"{label}=0"), ("only", f"ALL=0, {label}=1")):
            node = g.node("HadakronLoader", model=model, clip=clip, lora_name=spec.name,
                          strength_model=spec.strength_model, strength_clip=spec.strength_clip, block_weights=text)
            g.node("PreviewAny", source=node[2])
            out[(label, mode)] = node
    return out


# ---------------------------------------------------------------- SDXL


def test_sdxl_every_layout_and_form_in_one_prompt(comfy, comfy_env, sdxl_files):
    """kohya, ComfyUI, LyCORIS, diffusers, PEFT (config / bare CLIP-G / no config) files with every LoHa/LoKr form,
    DoRA, block weights, the model-only node and report labels fed back, baked by one ModelSave + CLIPSave."""
    with one_torch_thread():
        _sdxl_matrix(comfy, comfy_env, sdxl_files)


def _sdxl_matrix(comfy, comfy_env, sdxl_files):
    t0 = time.time()
    clip_base = sdxl_files.clip_weights(comfy_env)
    shapes = layer_shapes_of(sdxl_files.unet_layers, te1=sdxl_files.clip_l_layers,
                             te2=sdxl_files.clip_g_layers(comfy_env))
    loras = comfy.models_dir("loras")

    def base_of(part: str, dotted: str) -> torch.Tensor:
        if part == "unet":
            return sdxl_files.weights[sdxl_files.unet_key(dotted)]
        return clip_base["clip_l" if part == "te1" else "clip_g"][f"{dotted}.weight"]

    # prompt 1 (cheap): the block-weights file's report, to read its labels
    specs = sdxl_specs()
    blocks_spec = next(s for s in specs if s.name == "mx_blocks.safetensors")
    write_spec(blocks_spec, loras, shapes, base_of, seed=100)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    probe = g.node("HadakronLoader", model=ckpt[0], clip=ckpt[1], lora_name=blocks_spec.name,
                   strength_model=1.0, strength_clip=1.0, block_weights="")
    probe_report, labels = run_probe(comfy, g, probe)
    label_unet = labels[("unet", f"middle_block.1.{T1}.0.attn1.to_q")]
    label_te = labels[("te1", f"{TE}.8.self_attn.out_proj")]
    t_probe = time.time() - t0

    # prompt 2: every file chained, one ModelSave + one CLIPSave, plus label round-trip side branches
    specs = sdxl_specs(label_unet, label_te)
    check_disjoint(specs, shapes)
    for i, spec in enumerate(specs):
        write_spec(spec, loras, shapes, base_of, seed=100 + i if spec.name != blocks_spec.name else 100)
    prefix = f"mx_sdxl_{int(t0)}"
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
    nodes, model, clip = chain_loaders(g, ckpt[0], ckpt[1], specs)
    g.node("ModelSave", model=model, filename_prefix=f"diffusion_models/{prefix}")
    g.node("CLIPSave", clip=clip, filename_prefix=f"clip/{prefix}")
    all_labels = sorted({b for blocks in probe_report["by_block"].values() for b in blocks})
    blocks_spec = next(s for s in specs if s.name == "mx_blocks.safetensors")
    round_trip = _label_round_trip_branches(g, ckpt[0], ckpt[1], blocks_spec, all_labels)
    run = comfy.run(g)
    t_prompt = run.seconds
    t_saved = time.time()
    unet_files = saved_files(comfy, "diffusion_models", prefix)
    clip_files = saved_files(comfy, "clip", prefix)
    failures = Failures()
    try:
        check_reports(failures, run, specs, nodes)
        failures.check("block round trip", _assert_label_round_trip, run, round_trip, blocks_spec, probe_report)

        # ModelSave: the UNet
        assert len(unet_files) == 1, unet_files
        unet_expected = expectations(specs, lambda part, dotted: sdxl_files.unet_key(dotted) if part == "unet"
                                     else None)
        worst = failures.check("ModelSave UNet", assert_saved_file, unet_files[0], sdxl_files.weights.get,
                               unet_expected) or {}
        t_unet = time.time()

        # CLIPSave: CLIP-L and CLIP-G files
        assert {p.name for p in clip_files} == {f"{prefix}_{c}_00001_.safetensors" for c in ("clip_l", "clip_g")}, \
            [p.name for p in clip_files]
        for path in clip_files:
            clip_name = "clip_l" if f"{prefix}_clip_l_" in path.name else "clip_g"
            part = {"clip_l": "te1", "clip_g": "te2"}[clip_name]
            expected = expectations(specs, lambda p, dotted, part=part: f"{dotted}.weight" if p == part else None)
            # SGM checkpoints carry no CLIP-L projection / logit scale: ComfyUI's own tensors, never patched
            extras = frozenset({"logit_scale", "text_projection.weight"}) if clip_name == "clip_l" else frozenset()
            worst |= failures.check(f"CLIPSave {clip_name}", assert_saved_file, path, clip_base[clip_name].get,
                                    expected, extras) or {}
        n_targets = sum(len(s.targets) for s in specs)
        print(f"\n[time] sdxl matrix: {time.time() - t0:.1f} s (probe prompt {t_probe:.1f} s, matrix prompt "
              f"{t_prompt:.1f} s, UNet compare {t_unet - t_saved:.1f} s, CLIP compare {time.time() - t_unet:.1f} s); "
              f"{len(specs)} files, {n_targets} modules; worst err/tol {max(worst.values(), default=0):.3g}")
        failures.raise_if_any()
    finally:
        _free([*unet_files, *clip_files])


# ---------------------------------------------------------------- Anima


def anima_specs(label_block: str = "blocks.1", label_te: str = "te") -> list[AdapterSpec]:
    """The Anima files of the matrix (10-block DiT, LLM adapter, Qwen3), in chain order; the last one takes
    `<label_block>=0, <label_te>=0` (labels read from a report) as block weights."""
    specs = [
        AdapterSpec("mxa_kohya.safetensors", "anima", "kohya", [
            Target("unet", "blocks.0.self_attn.q_proj", "loha", rank=3, alpha=2.0),
            Target("unet", "blocks.7.mlp.layer1", "lokr_lowrank", rank=2, alpha=1.0),
            Target("unet", "llm_adapter.blocks.1.cross_attn.v_proj", "lokr_both", rank=2, alpha=3.0),
            Target("te", "layers.2.self_attn.q_proj", "loha", rank=2, alpha=1.0),
            Target("te", "layers.17.mlp.gate_proj", "lokr_full"),
        ], strength_model=1.0, strength_clip=1.0),
        AdapterSpec("mxa_comfyui.safetensors", "anima", "comfyui", [
            Target("unet", "blocks.5.cross_attn.k_proj", "lokr_full"),                                # (256, 1024)
            Target("unet", "llm_adapter.blocks.0.mlp.0", "loha", rank=2, alpha=1.0),
            Target("unet", "final_layer.linear", "loha", rank=2, alpha=2.0),
            Target("unet", "blocks.8.self_attn.v_proj", "loha", rank=2, alpha=1.0, dora="row"),
            Target("unet", "blocks.6.cross_attn.output_proj", "lokr_lowrank", rank=2, alpha=1.0, dora="col"),
            Target("te", "layers.20.mlp.down_proj", "lokr_lowrank", rank=3, alpha=1.5),
            Target("te", "layers.5.self_attn.o_proj", "loha", rank=2, alpha=1.0, dora="row"),
        ], strength_model=0.8, strength_clip=-0.5),
        AdapterSpec("mxa_lycoris.safetensors", "anima", "lycoris", [
            Target("unet", "blocks.9.self_attn.output_proj", "lokr_both", rank=2, alpha=1.0),
            Target("unet", "t_embedder.1.linear_2", "loha", rank=2, alpha=1.0),
        ], strength_model=-0.5, strength_clip=1.0),
        AdapterSpec("mxa_peft/adapter_model.safetensors", "anima", "peft", [
            Target("unet", "blocks.6.mlp.layer2", "loha", rank=4, alpha=None),
            Target("unet", "llm_adapter.blocks.3.self_attn.o_proj", "loha", rank=4, alpha=None),
            Target("te", "layers.4.self_attn.k_proj", "loha", rank=4, alpha=None),
        ], strength_model=1.0, strength_clip=0.8,
            peft_config={"peft_type": "LOHA", "r": 4, "alpha": 2, "alpha_pattern": {"llm_adapter.*o_proj": 6}}),
        AdapterSpec("mxa_blocks.safetensors", "anima", "kohya", [
            Target("unet", "blocks.3.self_attn.k_proj", "loha", block_weight=0.5),
            Target("unet", "blocks.3.mlp.layer2", "lokr_lowrank", block_weight=0.5),
            Target("unet", "llm_adapter.blocks.2.self_attn.q_proj", "loha", block_weight=0.0),
            Target("unet", "llm_adapter.out_proj", "lokr_full", block_weight=0.0),
            Target("unet", "blocks.1.cross_attn.q_proj", "loha"),
            Target("unet", "t_embedder.1.linear_1", "loha"),
            Target("te", "layers.9.mlp.up_proj", "lokr_both"),
        ], strength_model=1.1, strength_clip=0.7, block_weights="blocks.3=0.5, llm_adapter=0"),
        AdapterSpec("mxa_model_only.safetensors", "anima", "comfyui", [
            Target("unet", "blocks.2.self_attn.v_proj", "loha"),
            Target("unet", "blocks.4.mlp.layer1", "lokr_full"),
            Target("te", "layers.1.self_attn.o_proj", "loha"),
        ], strength_model=0.6, strength_clip=None),
    ]
    label_targets = [
        Target("unet", "blocks.1.mlp.layer1", "loha"),
        Target("unet", "blocks.1.self_attn.output_proj", "lokr_lowrank"),
        Target("unet", "blocks.2.cross_attn.v_proj", "lokr_both"),
        Target("unet", "x_embedder.proj.1", "loha"),
        Target("te", "layers.12.self_attn.v_proj", "loha"),
        Target("te", "layers.13.mlp.down_proj", "lokr_lowrank"),
    ]
    for t in label_targets:
        if expected_block("anima", t.part, t.dotted) in (label_block, label_te):
            t.block_weight = 0.0
    specs.append(AdapterSpec("mxa_labels.safetensors", "anima", "kohya", label_targets, strength_model=0.9,
                             strength_clip=1.2, block_weights=f"{label_block}=0, {label_te}=0"))
    return specs


def test_anima_every_layout_and_form_in_one_prompt(comfy, anima_files):
    """kohya, ComfyUI, LyCORIS and PEFT files on the DiT, LLM adapter and Qwen3 through UNETLoader + CLIPLoader,
    DoRA, `blocks.3=0.5, llm_adapter=0`, the model-only node and report labels fed back: one ModelSave + CLIPSave."""
    with one_torch_thread():
        _anima_matrix(comfy, anima_files)


def _anima_matrix(comfy, anima_files):
    t0 = time.time()
    shapes = layer_shapes_of(anima_files.unet_layers, te=anima_files.te_layers)
    loras = comfy.models_dir("loras")
    dm, te_prefix = "model.diffusion_model.", "qwen3_06b.transformer."

    def base_of(part: str, dotted: str) -> torch.Tensor:
        if part == "unet":
            return anima_files.unet_weights[anima_files.unet_key(dotted)]
        return anima_files.te_weights[f"model.{dotted}.weight"]

    def loaders(g: Graph):
        unet = g.node("UNETLoader", unet_name=anima_files.unet, weight_dtype="default")
        clip = g.node("CLIPLoader", clip_name=anima_files.text_encoder, type=anima_files.clip_type)
        return unet, clip

    # prompt 1 (cheap): the block-weights file's report, to read its labels
    specs = anima_specs()
    blocks_spec = next(s for s in specs if s.name == "mxa_blocks.safetensors")
    write_spec(blocks_spec, loras, shapes, base_of, seed=200)
    g = Graph()
    unet, clip = loaders(g)
    probe = g.node("HadakronLoader", model=unet[0], clip=clip[0], lora_name=blocks_spec.name,
                   strength_model=1.0, strength_clip=1.0, block_weights="")
    probe_report, labels = run_probe(comfy, g, probe)
    label_block, label_te = labels[("unet", "blocks.1.cross_attn.q_proj")], labels[("te", "layers.9.mlp.up_proj")]
    t_probe = time.time() - t0

    # prompt 2: every file chained, one ModelSave + one CLIPSave
    specs = anima_specs(label_block, label_te)
    check_disjoint(specs, shapes)
    for i, spec in enumerate(specs):
        write_spec(spec, loras, shapes, base_of, seed=200 + i if spec.name != blocks_spec.name else 200)
    prefix = f"mx_anima_{int(t0)}"
    g = Graph()
    unet, clip = loaders(g)
    nodes, model, clip_out = chain_loaders(g, unet[0], clip[0], specs)
    g.node("ModelSave", model=model, filename_prefix=f"diffusion_models/{prefix}")
    g.node("CLIPSave", clip=clip_out, filename_prefix=f"clip/{prefix}")
    run = comfy.run(g)
    t_saved = time.time()
    unet_files = saved_files(comfy, "diffusion_models", prefix)
    clip_files = saved_files(comfy, "clip", prefix)
    failures = Failures()
    try:
        check_reports(failures, run, specs, nodes)
        assert len(unet_files) == 1 and len(clip_files) == 1, (unet_files, clip_files)
        unet_w, te_w = anima_files.unet_weights, anima_files.te_weights

        def unet_base(key: str):
            return unet_w.get(anima_files.unet_prefix + key[len(dm):]) if key.startswith(dm) else None

        def te_base(key: str):
            return te_w.get(key[len(te_prefix):]) if key.startswith(te_prefix) else None
        unet_expected = expectations(specs, lambda part, dotted: anima_files.saved_unet_key(dotted)
                                     if part == "unet" else None)
        worst = failures.check("ModelSave DiT", assert_saved_file, unet_files[0], unet_base, unet_expected) or {}
        t_unet = time.time()
        te_expected = expectations(specs, lambda part, dotted: f"{te_prefix}model.{dotted}.weight"
                                   if part == "te" else None)
        # SDClipModel's logit_scale is ComfyUI's own parameter (no Qwen3 file has it)
        worst |= failures.check("CLIPSave Qwen3", assert_saved_file, clip_files[0], te_base, te_expected,
                                frozenset({"qwen3_06b.logit_scale"})) or {}
        n_targets = sum(len(s.targets) for s in specs)
        print(f"\n[time] anima matrix: {time.time() - t0:.1f} s (probe prompt {t_probe:.1f} s, matrix prompt "
              f"{run.seconds:.1f} s, DiT compare {t_unet - t_saved:.1f} s, TE compare {time.time() - t_unet:.1f} s); "
              f"{len(specs)} files, {n_targets} modules; worst err/tol {max(worst.values(), default=0):.3g}")
        failures.raise_if_any()
    finally:
        _free([*unet_files, *clip_files])


def _assert_in_executed(executed: dict, node_id: str) -> None:
    """The node's `executed` websocket event carried its report (strict JSON) and text."""
    out = executed.get(node_id)
    assert out is not None and "hadakron_report" in out and "text" in out, (node_id, out)
    strict_json(out["hadakron_report"][0])


def _assert_label_round_trip(run, branches: dict, spec: AdapterSpec, probe: dict) -> None:
    """Each report label fed back: `<label>=0` zeroes exactly that block's modules, `ALL=0, <label>=1` keeps only
    them (counts from the probe report's by_block)."""
    counts = {b: n for blocks in probe["by_block"].values() for b, n in blocks.items()}
    total = probe["matched_count"]
    assert total == len(spec.targets) and set(counts) == {expected_block("sdxl", t.part, t.dotted)
                                                           for t in spec.targets}, (counts, total)
    assert {label for label, _ in branches} == set(counts), (sorted(counts), sorted(branches))
    for (label, mode), node in branches.items():
        report, _ = node_report(run, node)
        n = counts[label]
        want = (total - n, n) if mode == "zero" else (n, total - n)
        got = (report["patches_added"], report["zero_strength"])
        assert got == want, (label, mode, report["block_weights"], "(patches_added, zero_strength)", got, want)

"""File work on inference tensors, as the nodes do it inside ComfyUI's `torch.inference_mode()`: Save Adapter
(`write_adapter`, metadata and sshs hashes) and read-back, the Adapter Merge node's merged patch (`baked_weight`
on an inference-tensor weight), Adapter Combine (`combine` + write), and the CLI's bake and convert fed with
adapters read under inference mode. Every result is compared with an independent float64 reference.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors.torch import load_file

from hadakron.io import build_metadata, with_hashes, write_adapter
from hadakron.merge import Patch, bake_checkpoint, baked_weight, combine, convert_layout, natural_shape, to_lora
from hadakron.merge.module_names import name_modules
from helpers import one_thread, read_adapter_in_inference_mode, ref_dora  # noqa: F401 (autouse fixture)
from test_combine import lora_delta
from test_io_metadata import kohya_hashes
from test_merge_fixtures import C, loha, lokr, lora, make_checkpoint, ref_delta

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # (C, C)
K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # (C, 24)
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # (C, 8, 3, 3)
SHAPES = {Q: (C, C), K: (C, 24), CONV: (C, 8, 3, 3)}
WEIGHT_KEYS = {Q: "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
               K: "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
               CONV: "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"}
ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 1e-6}


def write_and_read(path, modules: dict[str, dict[str, torch.Tensor]], metadata: dict | None = None):
    """Write `{module: params}` as an adapter file and read it back as the loader does (inference tensors)."""
    write_adapter(path, {f"{m}.{n}": t for m, p in modules.items() for n, t in p.items()}, metadata or {})
    adapter = read_adapter_in_inference_mode(path)
    assert all(t.is_inference() for t in adapter.tensors.values())
    return adapter


def data_sha256(path) -> str:
    """sha256 of a safetensors file's bytes after its header (what sshs_model_hash stands for)."""
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def assert_rounded_close(got: torch.Tensor, want64: torch.Tensor, what: str) -> None:
    """`got` is `want64` (float64) computed in float32 and rounded once to got's dtype."""
    err = (got.double() - want64).abs()
    bound = ROUNDING[got.dtype] * want64.abs() + 2e-6 * (1 + want64.abs().max())
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}"


# ---------------------------------------------------------------- Save Adapter and read-back


def test_save_metadata_hashes_and_read_back_of_inference_tensors(tmp_path):
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():  # tensors from a trainer output or a loaded file, inside a prompt
        tensors = {f"{Q}.lokr_w1": torch.randn(4, 4, generator=g).t(),  # not contiguous: the writer copies it
                   f"{Q}.lokr_w2_a": torch.randn(4, 2, generator=g).half(),
                   f"{Q}.lokr_w2_b": torch.randn(2, 4, generator=g).to(torch.bfloat16),
                   f"{Q}.alpha": torch.tensor(1.0)}
        meta = build_metadata(algorithm="lokr", family="sdxl", network_dim=2, network_alpha=1.0, factor=4,
                              training={"steps": 7}, tensors=tensors)
        path = write_adapter(tmp_path / "saved.safetensors", tensors, meta, overwrite=False)
    normal = {k: v.contiguous().clone() for k, v in tensors.items()}  # outside inference mode: normal tensors
    assert not any(t.is_inference() for t in normal.values())
    without = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(normal, without)
    assert data_sha256(path) == meta["sshs_model_hash"]
    assert load_file(str(path)).keys() == tensors.keys()
    for _ in range(2):  # a re-queued prompt reads the file again
        back = read_adapter_in_inference_mode(path)
        assert back.metadata == meta and back.problems == [] and back.tensors.keys() == tensors.keys()
        for key, t in tensors.items():
            assert back.tensors[key].dtype == t.dtype and torch.equal(back.tensors[key], t), key
    with torch.inference_mode():
        assert with_hashes(back.tensors, without) == meta  # hashes of read-back inference tensors agree


# ---------------------------------------------------------------- Adapter Merge: the merged lazy patch


@pytest.fixture()
def stacked(tmp_path):
    """Three adapter files on the same (C, C) layer, read under inference mode: LoHa, LoKr, LoRA (and a DoRA LoHa)."""
    mods = [loha(C, C, 3, 2.0, seed=1), lokr(4, 4, 4, 4, seed=2, w2="lowrank", r=2, alpha=1.5), lora(C, C, 2, 1.0, seed=3)]
    dora = loha(C, C, 2, 1.0, seed=4)
    dora["dora_scale"] = torch.rand(C, 1, generator=torch.Generator().manual_seed(5)) + 0.5
    files = [write_and_read(tmp_path / f"{i}.safetensors", {Q: m}) for i, m in enumerate(mods + [dora])]
    loaded = []
    with torch.inference_mode():  # nodes/merge.py plan_merge: canonical names, then the shape check
        for f in files:
            (named,) = name_modules(f.modules, "sdxl")
            assert named.canonical == ("sdxl", "unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
            assert tuple(natural_shape(named.params)) == (C, C)
            loaded.append(named.params)
    return mods + [dora], loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_dora", [False, True])
def test_merged_patch_on_inference_weight_equals_reference(stacked, dtype, with_dora):
    """nodes/merge.py `HadakronMergedPatch.calculate_weight`: `baked_weight(weight, [Patch(None, False, params,
    s * strength, key)])`, called by ComfyUI in inference mode on a weight copy that is an inference tensor."""
    written, loaded = stacked
    strengths = [0.8, -0.5, 1.25, 0.6]
    count = 4 if with_dora else 3
    with torch.inference_mode():
        weight = (torch.randn(C, C, generator=torch.Generator().manual_seed(9)) * 0.5).to(dtype)
        before = weight.clone()
        strength = 1.0  # the patch's own strength (add_patches(..., 1.0)) multiplies each module's
        patches = [Patch(None, False, loaded[i], strengths[i] * strength, "diffusion_model.x.weight")
                   for i in range(count)]
        out = baked_weight(weight, patches)
    assert out.dtype == dtype and out.shape == weight.shape and torch.equal(weight, before)
    want = before.double()
    for i in range(count):
        delta = ref_delta(written[i], (C, C))
        want = ref_dora(want, delta, written[i]["dora_scale"], strengths[i]) if "dora_scale" in written[i] \
            else want + strengths[i] * delta
    assert_rounded_close(out, want, f"{dtype} dora={with_dora}")


# ---------------------------------------------------------------- the CLI's bake, fed adapters read in a prompt


@pytest.mark.parametrize("bake_in_inference_mode", [True, False])
def test_bake_checkpoint_with_inference_tensor_adapters(tmp_path, bake_in_inference_mode):
    base = tmp_path / "base.safetensors"
    layout = {WEIGHT_KEYS[m]: (shape, dtype) for (m, shape), dtype in
              zip(SHAPES.items(), (torch.float16, torch.bfloat16, torch.float32))}
    layout["model.diffusion_model.input_blocks.4.1.proj_in.weight"] = ((C, C), torch.float16)  # untouched
    tensors = make_checkpoint(base, layout=layout, metadata={"modelspec.title": "tiny"})
    a = {Q: loha(C, C, 3, 2.0, seed=1), K: lokr(4, 4, 4, 6, seed=2, w2="lowrank", r=3, alpha=1.5),
         CONV: loha(C, 8, 2, 1.0, seed=3, kernel=(3, 3), tucker=True)}
    b = {Q: lora(C, C, 2, 1.0, seed=4), CONV: lokr(4, 2, 4, 4, seed=5, w2="tucker", r=2, alpha=3.0, kernel=(3, 3))}
    adapters = [(write_and_read(tmp_path / "a.safetensors", a), 0.7), (write_and_read(tmp_path / "b.safetensors", b), -1.3)]
    out = tmp_path / "baked.safetensors"
    if bake_in_inference_mode:
        with torch.inference_mode():
            report = bake_checkpoint(base, adapters, out)
    else:
        report = bake_checkpoint(base, adapters, out)
    assert report.weights_changed == 3 and all(not r.unmatched for r in report.adapters)
    got = load_file(str(out))
    assert torch.equal(got["model.diffusion_model.input_blocks.4.1.proj_in.weight"],
                       tensors["model.diffusion_model.input_blocks.4.1.proj_in.weight"])
    for m, shape in SHAPES.items():
        want = tensors[WEIGHT_KEYS[m]].double() + sum(s * ref_delta(mods[m], shape)
                                                      for mods, s in ((a, 0.7), (b, -1.3)) if m in mods)
        assert got[WEIGHT_KEYS[m]].dtype == tensors[WEIGHT_KEYS[m]].dtype
        assert_rounded_close(got[WEIGHT_KEYS[m]], want, m)


# ---------------------------------------------------------------- Adapter Combine and convert


@pytest.fixture()
def two_adapters(tmp_path):
    """A LoHa/LoKr file and a LoRA file read under inference mode, with strengths and the float64 weighted sum."""
    a = {Q: loha(C, C, 3, 2.0, seed=11), K: lokr(4, 4, 4, 6, seed=12, w2="lowrank", r=2, alpha=1.0),
         CONV: loha(C, 8, 2, 1.0, seed=13, kernel=(3, 3), tucker=True)}
    b = {Q: lora(C, C, 2, 1.0, seed=14), CONV: lokr(4, 2, 4, 4, seed=15, w2="tucker", r=2, alpha=2.0, kernel=(3, 3))}
    adapters = [(write_and_read(tmp_path / "a.safetensors", a, {"ss_network_module": "networks.lokr"}), 0.8),
                (write_and_read(tmp_path / "b.safetensors", b), -0.5)]
    expected = {m: sum(s * ref_delta(mods[m], shape) for mods, s in ((a, 0.8), (b, -0.5)) if m in mods)
                for m, shape in SHAPES.items()}
    return adapters, expected, a


@pytest.mark.parametrize("rank", [None, 2])
def test_combine_in_inference_mode_writes_the_weighted_sum(two_adapters, tmp_path, rank):
    """The Adapter Combine node: `combine(adapters, rank=..., layout=..., dtype=...)` then `result.write`, in a prompt."""
    adapters, expected, _ = two_adapters
    path = tmp_path / "combined.safetensors"
    with torch.inference_mode():
        result = combine(adapters, rank=rank, layout="kohya", dtype=torch.float32)
        result.write(path)
    assert data_sha256(path) == result.metadata["sshs_model_hash"]
    back = read_adapter_in_inference_mode(path)
    assert back.problems == [] and set(back.modules) == set(SHAPES)
    lost = total = 0.0
    for m, shape in SHAPES.items():
        got, want = lora_delta(back.modules[m], shape), expected[m]
        err_sq, norm_sq = float((got - want).square().sum()), float(want.square().sum())
        lost, total = lost + err_sq, total + norm_sq
        if rank is None:
            assert math.sqrt(err_sq) <= 1e-5 * math.sqrt(norm_sq), m
        else:  # the best rank-2 approximation (Eckart-Young) of the exact sum
            sv = torch.linalg.svdvals(want.reshape(shape[0], -1))
            assert math.isclose(math.sqrt(err_sq / norm_sq), float(sv[rank:].norm() / sv.norm()), rel_tol=1e-4), m
    assert math.isclose(result.overall_error, math.sqrt(lost / total), rel_tol=1e-4, abs_tol=1e-7)


def test_convert_in_inference_mode_to_lora_and_across_layouts(two_adapters, tmp_path):
    """The CLI's convert on an adapter read under inference mode: exact LoRA form, and a lossless key renaming."""
    adapters, _, written = two_adapters
    adapter = adapters[0][0]
    with torch.inference_mode():
        lora_path = to_lora(adapter).write(tmp_path / "as_lora.safetensors")
        comfy_path = convert_layout(adapter, "comfyui").write(tmp_path / "comfyui.safetensors")
    as_lora = read_adapter_in_inference_mode(lora_path)
    for m, shape in SHAPES.items():
        want = ref_delta(written[m], shape)
        assert (lora_delta(as_lora.modules[m], shape) - want).norm() <= 2e-6 * want.norm(), m
    with torch.inference_mode():
        round_trip = convert_layout(read_adapter_in_inference_mode(comfy_path), "kohya")
    assert any(k.startswith("diffusion_model.") for k in load_file(str(comfy_path)))
    assert round_trip.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(round_trip.tensors[k], t) for k, t in adapter.tensors.items())
    assert round_trip.metadata["ss_network_module"] == "networks.lokr"

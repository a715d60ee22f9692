"""The LoHa/LoKr Loader's library calls on inference tensors, as ComfyUI makes them (every node runs inside
`torch.inference_mode()`): the file is read there, `build_load_report` scans it there (twice: a re-queued prompt
reuses the cached file), and ComfyUI computes each lazy patch (`calculate_weight`) there on an inference-tensor
weight, which the patch modifies in place. Numbers are checked against independent float64 references.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from hadakron import ops
from hadakron.arch import module_key
from hadakron.comfy_keys import layer_shapes
from hadakron.io import write_adapter
from hadakron.load_report import build_load_report
from helpers import one_thread, read_adapter_in_inference_mode, ref_dora  # noqa: F401 (autouse fixture)
from integration.adapter_forms import CONV_FORMS, LINEAR_FORMS, make_params, reference_delta
from models import SDXLUNet

LINEAR_LAYERS = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_k",
                 "input_blocks.4.1.transformer_blocks.0.attn1.to_v", "input_blocks.4.1.transformer_blocks.0.attn2.to_q")
CONV_LAYERS = ("input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3", "input_blocks.2.0.in_layers.2",
               "input_blocks.2.0.out_layers.3", "input_blocks.4.0.out_layers.3", "input_blocks.5.0.out_layers.3")
DORA_LAYER = "input_blocks.5.1.transformer_blocks.0.attn1.to_q"
STRENGTH = 0.7


@pytest.fixture(scope="module")
def unet() -> SDXLUNet:
    """A tiny SDXL UNet whose weights are inference tensors, like a model loaded by ComfyUI's checkpoint loader."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = SDXLUNet()
    assert all(p.is_inference() for p in model.parameters())
    return model


def model_shapes(unet: SDXLUNet) -> dict[tuple[str, str], tuple[int, ...]]:
    """`(part, dotted) -> weight shape` as the loader takes it from `ModelPatcher.model` (`diffusion_model.` keys)."""
    return layer_shapes("sdxl", {f"diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()},
                        clip=False)


def kohya(dotted: str) -> str:
    return module_key("sdxl", "unet", dotted, "kohya")


def loader_report(adapter, unet: SDXLUNet, source: str):
    """`build_load_report` with the arguments nodes/loader.py `apply_adapter` passes for a model-only load."""
    return build_load_report(adapter.modules, adapter.metadata or {}, "sdxl", model_shapes(unet),
                             loaded_parts=("unet",), source=source, problems=list(adapter.problems or []),
                             nonfinite=adapter.nonfinite_tensors())


def comfy_patch_(weight: torch.Tensor, params: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """The library calls of nodes/comfy_adapter.py `HadakronWeightPatch.calculate_weight` (under no_grad, in place)."""
    with torch.no_grad():
        params = {n: t.to(weight.device) for n, t in params.items()}
        if "dora_scale" in params:
            new = ops.patched_weight(weight, params, strength, dtype=torch.float32)
        else:
            dw = ops.delta_weight(params, tuple(weight.shape), dtype=torch.float32, device=weight.device)
            dw = dw.mul_(strength) if strength != 1.0 else dw
            if weight.dtype == torch.float32:
                return weight.add_(dw)
            new = weight.to(torch.float32).add_(dw)
        weight.copy_(new.to(weight.dtype))
        return weight


def assert_rounded_close(got: torch.Tensor, want64: torch.Tensor, what: str) -> None:
    """`got` is `want64` rounded once to got's dtype (float32 math before it)."""
    rel = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[got.dtype]
    err = (got.double() - want64).abs()
    bound = rel * want64.abs() + 2e-6 * (1 + want64.abs().max())
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}"


# ---------------------------------------------------------------- the NaN/Inf scan


@pytest.fixture(scope="module")
def nonfinite_file(tmp_path_factory, unet):
    """A file saved like sd-scripts (fp16): a full-full LoKr whose alpha overflowed to inf (network_dim 100000),
    a LoHa with a NaN in a factor, a low-rank LoKr whose (used) alpha is inf, and a clean LoHa."""
    shapes = model_shapes(unet)
    g = torch.Generator().manual_seed(3)
    full_full = make_params("lokr_full", shapes[("unet", LINEAR_LAYERS[0])], g, dtype=torch.float16)
    full_full["alpha"] = torch.tensor(100000.0).half()
    nan_loha = make_params("loha", shapes[("unet", LINEAR_LAYERS[1])], g, dtype=torch.float16)
    nan_loha["hada_w1_a"][1, 0] = float("nan")
    inf_alpha = make_params("lokr_lowrank", shapes[("unet", LINEAR_LAYERS[2])], g, dtype=torch.float16)
    inf_alpha["alpha"] = torch.tensor(float("inf")).half()
    clean = make_params("loha", shapes[("unet", LINEAR_LAYERS[3])], g, dtype=torch.float16)
    modules = dict(zip(LINEAR_LAYERS, (full_full, nan_loha, inf_alpha, clean)))
    assert math.isinf(float(full_full["alpha"]))
    path = tmp_path_factory.mktemp("loras") / "sd_scripts_lokr.safetensors"
    write_adapter(path, {f"{kohya(d)}.{n}": t for d, p in modules.items() for n, t in p.items()},
                  {"ss_network_module": "networks.lokr", "ss_network_dim": "100000"})
    return path, modules


def test_report_applies_unused_inf_alpha_and_drops_used_nonfinite_twice(nonfinite_file, unet):
    path, modules = nonfinite_file
    adapter = read_adapter_in_inference_mode(path)
    assert all(t.is_inference() for t in adapter.tensors.values())
    reports = []
    with torch.inference_mode():
        for _ in range(2):  # a re-queued prompt reports the loader's cached file again
            reports.append(loader_report(adapter, unet, path.name))
    for report in reports:
        matched = {m.dotted: m for m in report.matched}
        unmatched = {u.key: u for u in report.unmatched}
        assert sorted(matched) == sorted([LINEAR_LAYERS[0], LINEAR_LAYERS[3]])
        assert sorted(unmatched) == sorted([kohya(LINEAR_LAYERS[1]), kohya(LINEAR_LAYERS[2])])
        assert matched[LINEAR_LAYERS[0]].scale == 1.0  # both factors full: alpha unused
        assert matched[LINEAR_LAYERS[3]].scale == pytest.approx(2.0 / 3)  # make_params: alpha 2, rank 3
        nan = unmatched[kohya(LINEAR_LAYERS[1])]
        assert nan.kind == "nonfinite" and "hada_w1_a" in nan.reason
        assert "hada_w2_a" not in nan.reason and "hada_w1_b" not in nan.reason
        inf = unmatched[kohya(LINEAR_LAYERS[2])]
        assert inf.kind == "nonfinite" and "alpha" in inf.reason
        as_json = json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"report JSON holds {c}"))
        assert len(as_json["matched"]) == 2  # strict JSON for the frontend, the inf alpha included
    # the applied full-full module patches with kron(w1, w2), alpha ignored
    m = {m.dotted: m for m in reports[1].matched}[LINEAR_LAYERS[0]]
    with torch.inference_mode():
        weight = unet.state_dict()[f"{LINEAR_LAYERS[0]}.weight"].clone()
        before = weight.double()
        comfy_patch_(weight, m.params, STRENGTH)
    want = before + STRENGTH * reference_delta(modules[LINEAR_LAYERS[0]], m.shape)
    assert torch.isfinite(want).all()
    assert_rounded_close(weight, want, LINEAR_LAYERS[0])


# ---------------------------------------------------------------- the lazy patches


@pytest.fixture(scope="module")
def every_form_file(tmp_path_factory, unet):
    """Every LoHa/LoKr file form on a real layer, plus a row-wise DoRA LoHa: `(path, {dotted: params})`."""
    shapes = model_shapes(unet)
    g = torch.Generator().manual_seed(11)
    modules = {d: make_params(f, shapes[("unet", d)], g) for d, f in zip(LINEAR_LAYERS, LINEAR_FORMS)}
    modules |= {d: make_params(f, shapes[("unet", d)], g) for d, f in zip(CONV_LAYERS, CONV_FORMS)}
    dora = make_params("loha", shapes[("unet", DORA_LAYER)], g)
    with torch.inference_mode():
        w = unet.state_dict()[f"{DORA_LAYER}.weight"].double()
    dora["dora_scale"] = (w.norm(dim=1, keepdim=True) * (1 + 0.2 * torch.rand(w.shape[0], 1, generator=g,
                                                                                dtype=torch.float64))).float()
    modules[DORA_LAYER] = dora
    path = tmp_path_factory.mktemp("loras") / "every_form.safetensors"
    write_adapter(path, {f"{kohya(d)}.{n}": t for d, p in modules.items() for n, t in p.items()}, {})
    return path, modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_patch_in_place_on_inference_weight_equals_reference(every_form_file, unet, dtype):
    """ComfyUI patches a copy of the weight (float32 on CPU, bf16 where lora_compute_dtype says so) in inference
    mode; the patch must modify that inference tensor in place and give W + s*dW (DoRA: its formula)."""
    path, modules = every_form_file
    adapter = read_adapter_in_inference_mode(path)
    with torch.inference_mode():
        report = loader_report(adapter, unet, path.name)
        assert not report.unmatched and sorted(m.dotted for m in report.matched) == sorted(modules)
        for m in report.matched:
            weight = unet.state_dict()[f"{m.dotted}.weight"].to(dtype, copy=True)
            assert weight.is_inference()
            before, ptr = weight.double(), weight.data_ptr()
            out = comfy_patch_(weight, m.params, STRENGTH)
            assert out is weight and weight.data_ptr() == ptr, f"{m.dotted}: not patched in place"
            delta = reference_delta(modules[m.dotted], m.shape)
            if m.dotted == DORA_LAYER:
                want = ref_dora(before, delta, modules[m.dotted]["dora_scale"], STRENGTH)
            else:
                want = before + STRENGTH * delta
            assert_rounded_close(weight, want, m.dotted)

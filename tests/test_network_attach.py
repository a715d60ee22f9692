"""AdapterNetwork attached to the tiny models: bypass vs float64 reference, exact detach, files in every layout."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hadakron.arch import LAYOUTS, detect_family
from hadakron.network import AdapterNetwork

from helpers import anima, sdxl  # noqa: F401 (fixtures)
from helpers import build_network as build

logging.getLogger("hadakron").setLevel(logging.ERROR)  # LoKr's full-W2 notice on tiny layers


def randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------- bypass
def loha_dw64(sd, key, shape):
    w1 = sd[f"{key}.hada_w1_a"].double() @ sd[f"{key}.hada_w1_b"].double()
    w2 = sd[f"{key}.hada_w2_a"].double() @ sd[f"{key}.hada_w2_b"].double()
    return (w1 * w2 * float(sd[f"{key}.alpha"]) / sd[f"{key}.hada_w1_b"].shape[0]).reshape(shape)


def lokr_dw64(sd, key, shape):
    w1 = sd[f"{key}.lokr_w1"].double()
    if f"{key}.lokr_w2" in sd:
        w2, scale = sd[f"{key}.lokr_w2"].double(), 1.0
    else:
        a, b = sd[f"{key}.lokr_w2_a"].double(), sd[f"{key}.lokr_w2_b"].double()
        w2, scale = a @ b, float(sd[f"{key}.alpha"]) / b.shape[0]
    if len(shape) == 4:  # conv: W2 is (out_k, in_n, kh, kw), W1 acts as a 1x1 kernel
        w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


def layer64(layer, x, dw):
    w = layer.weight.double() + dw
    b = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x.double(), w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x.double(), w, b)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_bypass_equals_patched_layer_in_float64(sdxl, algo):
    unet = sdxl["unet"]
    net = build("sdxl", {"unet": unet}, algo=algo, network_dim=2, network_alpha=1.5, conv_dim=2, conv_alpha=0.5)
    randomize(net, 1)
    sd = net.file_state_dict()
    ref = loha_dw64 if algo == "loha" else lokr_dw64
    net.attach()
    g = torch.Generator().manual_seed(2)
    try:
        for dotted in ("input_blocks.4.1.transformer_blocks.1.attn2.to_k", "input_blocks.1.0.in_layers.2",
                       "input_blocks.3.0.op", "output_blocks.0.0.skip_connection", "middle_block.0.emb_layers.1"):
            t = next(t for t in net.targets if t.dotted == dotted)
            w = t.layer.weight
            x = torch.randn((3, w.shape[1], 6, 6) if w.ndim == 4 else (3, 5, w.shape[1]), generator=g)
            want = layer64(t.layer, x, ref(sd, t.key, tuple(w.shape)))
            got = t.layer(x)
            assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4), dotted
            assert (got.double() - layer64(t.layer, x, 0)).abs().max() > 1e-3  # the adapter does something
    finally:
        net.detach()


def test_detach_restores_exactly(anima):
    dit = anima["unet"]
    inputs = dit.example_inputs()
    before = dit(*inputs)
    q = dit.blocks[0].self_attn.q_proj
    custom = lambda x: nn.Linear.forward(q, x)  # noqa: E731  a forward someone patched before us
    q.forward = custom
    net = build("anima", {"unet": dit}, algo="loha", train_llm_adapter=True, exclude_patterns=[r"blocks\.([4-9]|\d\d)\..*"])
    assert net.counts() == {"unet": 4 * 10 + 60}
    randomize(net)
    net.attach()
    assert not torch.allclose(dit(*inputs), before)
    with pytest.raises(RuntimeError, match="already attached"):
        net.attach()
    net.detach()
    assert q.forward is custom
    del q.forward
    assert all("forward" not in t.layer.__dict__ for t in net.targets)
    assert torch.equal(dit(*inputs), before)
    assert all(p.grad is None for p in dit.parameters())


def test_subclassed_ops_and_prefixes(anima):
    class CastLinear(nn.Linear):  # like comfy.ops.manual_cast.Linear
        pass

    te = anima["te"]
    original = te.layers[0].mlp.up_proj
    sub = CastLinear(original.in_features, original.out_features, bias=False)
    sub.load_state_dict(original.state_dict())
    te.layers[0].mlp.up_proj = sub
    try:
        holder = nn.Module()
        holder.model = te  # HF Qwen3ForCausalLM holds the decoder as `model`
        net = build("anima", {"te": holder})
        assert net.counts() == {"te": 196}
        t = next(t for t in net.targets if t.dotted == "layers.0.mlp.up_proj")
        assert t.layer is sub and t.name == "model.layers.0.mlp.up_proj"
    finally:
        te.layers[0].mlp.up_proj = original


def test_gradients_reach_adapters(anima):
    te = anima["te"]
    for p in te.parameters():
        p.requires_grad_(False)
    net = build("anima", {"te": te}, algo="lokr", network_dim=2)
    net.attach()
    try:
        te(*te.example_inputs()).square().mean().backward()
    finally:
        net.detach()
    # LoKr starts with w2 = 0: w1 gets no gradient at step 0, w2 does
    names = dict(net.named_parameters())
    zero_init = [n for n in names if n.endswith((".lokr_w2", ".lokr_w2_b"))]
    assert zero_init and all(names[n].grad is not None and names[n].grad.abs().sum() > 0 for n in zero_init)
    for p in te.parameters():
        p.requires_grad_(True)


# ---------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("family", ["sdxl", "anima"])
def test_file_in_each_layout_loads_onto_the_same_modules(family, sdxl, anima):
    parts = sdxl if family == "sdxl" else anima
    cfg = dict(algo="loha", network_dim=2, conv_dim=2 if family == "sdxl" else None, train_llm_adapter=True)
    src = build(family, parts, **cfg)
    randomize(src, 3)
    kohya = src.file_state_dict("kohya")
    dst = build(family, parts, **cfg)
    for layout in LAYOUTS:
        if family == "anima" and layout == "diffusers":
            continue
        sd = src.file_state_dict(layout)
        r = detect_family(sd)
        assert (r.family, r.layout, r.parts) == (family, layout, tuple(parts))
        randomize(dst, 4)
        report = dst.load_file_state(sd, strict=True)
        assert len(report.loaded) == len(src.targets) and not report.missing and not report.unexpected
        got = dst.file_state_dict("kohya")
        assert got.keys() == kohya.keys()
        assert all(torch.equal(got[k], kohya[k]) for k in kohya), layout


def test_loading_mismatches(anima):
    net = build("anima", {"te": anima["te"]}, algo="loha", network_dim=2)
    sd = net.file_state_dict()
    sd["lora_te_layers_0_mlp_up_proj.hada_w1_b"] = torch.zeros(3, 16)
    with pytest.raises(ValueError, match=r"module lora_te_layers_0_mlp_up_proj: hada_w1_b has shape \(3, 16\) in the file, expected \(2, 16\)"):
        net.load_file_state(sd)
    lora = {"lora_te_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(48, 2),
            "lora_te_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(2, 16)}
    with pytest.raises(ValueError, match=r"file tensors \['lora_down.weight', 'lora_up.weight'\] do not match"):
        net.load_file_state(lora)
    report = net.load_file_state({"lora_unet_blocks_0_mlp_layer1.alpha": torch.tensor(1.0), "junk.alpha": torch.tensor(1.0)})
    assert report.loaded == [] and len(report.missing) == 196
    assert sorted(report.unexpected) == ["junk.alpha", "lora_unet_blocks_0_mlp_layer1.alpha"]
    with pytest.raises(ValueError, match="file does not fit the network: 196 network modules missing"):
        net.load_file_state({}, strict=True)


def test_from_file_rebuilds_ranks_and_forms(anima):
    parts = {"unet": anima["unet"]}
    src = build("anima", parts, algo="lokr", network_dim=2, network_reg_dims={r"blocks\.0\..*": 3}, factor=4)
    randomize(src, 5)
    sd = src.file_state_dict("comfyui")
    net = AdapterNetwork.from_file("anima", parts, sd)
    assert net.module_ranks() == src.module_ranks() and net.module_ranks()["lora_unet_blocks_0_mlp_layer1"] == 3
    assert net.module_alphas() == src.module_alphas()
    kohya = src.file_state_dict()
    got = net.file_state_dict()
    assert got.keys() == kohya.keys() and all(torch.equal(got[k], kohya[k]) for k in kohya)
    with pytest.raises(ValueError, match=r"196 file modules have no layer in the given parts \['unet'\]"):
        AdapterNetwork.from_file("anima", parts, build("anima", {"te": anima["te"]}).file_state_dict())


def test_module_spelled_twice_is_refused(anima):
    net = build("anima", {"te": anima["te"]}, algo="loha", network_dim=2)
    sd = net.file_state_dict()
    sd["text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.alpha"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"names layer te:layers.0.mlp.up_proj twice, as 'lora_te_layers_0_mlp_up_proj' and"):
        net.load_file_state(sd)
    with pytest.raises(ValueError, match="twice"):
        AdapterNetwork.from_file("anima", {"te": anima["te"]}, sd)
    sd = net.file_state_dict()
    sd["lora_te_layers_0_mlp_up_proj.lora_A.weight"] = torch.zeros(2, 16)
    sd["lora_te_layers_0_mlp_up_proj.lora_down.weight"] = torch.zeros(2, 16)
    with pytest.raises(ValueError, match=r"holds lora_down.weight of 'lora_te_layers_0_mlp_up_proj' twice"):
        net.load_file_state(sd)

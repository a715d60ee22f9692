"""hadakron.io metadata: kohya/modelspec/hadakron keys, and sshs hashes against kohya's definition."""
from __future__ import annotations

import hashlib
import json
from io import BytesIO

import safetensors.torch
import torch

from hadakron.io import build_metadata, read_adapter, safetensors_hashes, with_hashes, write_adapter


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes, written from its definition: serialise with the ss_* keys
    only; model hash = sha256 of everything after the header; legacy = sha256 of 64 KiB at 1 MiB, 8 hex digits."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, ss))
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model, legacy


def _tensors(big: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    m = "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
    rows = 1024 if big else 16  # big: 1280*1024*4 bytes > 1 MiB + 64 KiB, so the legacy window holds data
    return {
        f"{m}.hada_w1_a": torch.randn(1280, 8, generator=g).half(),
        f"{m}.hada_w1_b": torch.randn(8, 2048, generator=g),
        f"{m}.hada_w2_a": torch.randn(1280, 8, generator=g).to(torch.bfloat16),
        f"{m}.hada_w2_b": torch.randn(8, 2048, generator=g),
        f"{m}.alpha": torch.tensor(8, dtype=torch.int64),
        "lora_te2_text_model_encoder_layers_31_mlp_fc2.lokr_w1": torch.randn(rows, 320, generator=g),
    }


def test_hashes_match_kohya_definition():
    for big in (False, True):
        tensors = _tensors(big)
        meta = {"ss_network_dim": "8", "ss_network_args": json.dumps({"conv_dim": "4"}), "modelspec.title": "x" * 500}
        ours = safetensors_hashes(tensors, meta)
        assert ours == kohya_hashes(tensors, meta)
        assert len(ours[0]) == 64 and len(ours[1]) == 8
    # non-ss keys do not change the hashes; ss keys change the legacy one (header length shifts the window)
    assert safetensors_hashes(tensors, {**meta, "modelspec.title": "y"}) == ours
    changed = safetensors_hashes(tensors, {**meta, "ss_steps": "1000"})
    assert changed[0] == ours[0] and changed[1] != ours[1]
    assert changed == kohya_hashes(tensors, {**meta, "ss_steps": "1000"})


def test_small_file_legacy_hash_is_of_nothing():
    tensors = _tensors(False)
    assert safetensors_hashes(tensors, {})[1] == hashlib.sha256(b"").hexdigest()[:8]


def test_written_file_data_hash_equals_model_hash(tmp_path):
    tensors = _tensors(True)
    meta = with_hashes(tensors, {"ss_network_module": "networks.loha", "ss_network_dim": "8"})
    path = write_adapter(tmp_path / "h.safetensors", tensors, meta)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert hashlib.sha256(raw[8 + n:]).hexdigest() == meta["sshs_model_hash"]
    assert read_adapter(path).metadata == meta


def test_build_metadata_sdxl_lokr():
    tensors = _tensors(False)
    meta = build_metadata(
        algorithm="lokr", family="sdxl", network_dim=16, network_alpha=8.0, conv_dim=4, conv_alpha=1,
        factor=8, decompose_both=True, use_tucker=True,
        module_ranks={"lora_unet_a": 16, "lora_unet_b": 4}, module_alphas={"lora_unet_a": 8, "lora_unet_b": 1.5},
        network_args={"rank_dropout": 0.1}, training={"steps": 100, "learning_rate": 1e-4, "ss_epoch": "2"},
        title="my lokr", timestamp=1_700_000_000, tensors=tensors,
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lokr"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {
        "conv_dim": "4", "conv_alpha": "1", "factor": "8", "decompose_both": "True", "use_tucker": "True",
        "rank_dropout": "0.1"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_steps"] == "100" and meta["ss_learning_rate"] == "0.0001" and meta["ss_epoch"] == "2"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "my lokr"
    assert meta["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    assert meta["hadakron.algorithm"] == "lokr" and meta["hadakron.factor"] == "8"
    assert meta["hadakron.use_tucker"] == "True" and meta["hadakron.decompose_both"] == "True"
    assert json.loads(meta["hadakron.module_ranks"]) == {"lora_unet_a": 16, "lora_unet_b": 4}
    assert json.loads(meta["hadakron.module_alphas"]) == {"lora_unet_a": 8.0, "lora_unet_b": 1.5}
    without = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, without)


def test_build_metadata_anima_loha():
    meta = build_metadata(algorithm="loha", family="anima", network_dim=8, network_alpha=None)
    assert meta["ss_network_module"] == "networks.loha"
    assert meta["ss_network_alpha"] == "None"
    assert json.loads(meta["ss_network_args"]) == {}
    assert meta["ss_base_model_version"] == "anima"
    assert meta["modelspec.architecture"] == "anima-preview/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/circlestone-labs/Anima"
    assert "sshs_model_hash" not in meta


def test_build_metadata_rejects_unknown_names():
    import pytest

    with pytest.raises(ValueError, match="algorithm.*'boft'"):
        build_metadata(algorithm="boft", family="sdxl", network_dim=8, network_alpha=1)
    with pytest.raises(ValueError, match="family.*'flux'"):
        build_metadata(algorithm="loha", family="flux", network_dim=8, network_alpha=1)

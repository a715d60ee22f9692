"""hadakron.train.metadata and the resume check: every network and training argument reaches the file in sd-scripts'
`ss_*` keys, reads back to the same configs, and a resumed run that would build another network is refused."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from hadakron.io import build_metadata, read_adapter, write_adapter
from hadakron.network import NetworkConfig
from hadakron.train import TrainConfig, apply_training_state, build_optimizer, training_state
from hadakron.train.metadata import (
    RunFacts,
    bucket_info,
    legacy_model_hash,
    network_config_from_metadata,
    parse_optimizer,
    tag_frequency,
    train_config_from_metadata,
    training_metadata,
)
from hadakron.train.resume import ResumeConfigError, check_resume_config

# every NetworkConfig field at a value other than its default
NETWORK = NetworkConfig(
    algo="lokr", network_dim=16, network_alpha=8.0, conv_dim=4, conv_alpha=2.0, factor=8, decompose_both=True,
    use_tucker=True, use_scalar=True, rank_dropout=0.1, module_dropout=0.05, full_matrix=True,
    exclude_patterns=[".*attn2.*"], include_patterns=[".*attn2.to_k"], network_reg_dims=".*ff.*=2,.*proj_in=6",
    network_reg_lrs=".*attn1.*=0.0003", train_llm_adapter=True, loraplus_lr_ratio=4.0, loraplus_unet_lr_ratio=8.0,
    loraplus_text_encoder_lr_ratio=2.0, rank_dropout_scale=True, rs_lora=True, dora_wd=True, wd_on_output=False,
)
# every TrainConfig field at a value other than its default
TRAIN = TrainConfig(
    steps=40, batch_size=2, learning_rate=3e-4, unet_lr=2e-4, te_lr=1e-5, optimizer="AdamW", weight_decay=0.02,
    betas=(0.8, 0.95), eps=1e-6, momentum=0.0, scheduler="cosine", warmup_steps=5, grad_accum_steps=3,
    max_grad_norm=0.5, dtype="bf16", seed=11, save_every=10,
)
SIZES = [(1024, 1024), (832, 1216), (1024, 1024)]
RUN = RunFacts(
    family="sdxl", step=12, sample_sizes=SIZES, captions=["a cat, Red", "a dog", "A cat"], parts=["unet", "te1", "te2"],
    gradient_checkpointing=True, prediction_type="v_prediction", output_name="run", autosave_prefix="runs/run",
    resume_from="run_step000006_00001_.safetensors", resumed_step=6, session_id=1234, started_at=1_700_000_000.5,
    finished_at=1_700_000_600.25, final_loss=0.125, comment="a comment", extra={"ss_min_snr_gamma": "5.0"},
)


def _meta(network=NETWORK, train=TRAIN, run=RUN, **kw):
    return training_metadata(network, train, run, timestamp=1_700_000_700, **kw)


def _args(meta):
    return json.loads(meta["ss_network_args"])


# ---------------------------------------------------------------- every argument appears

NETWORK_KEYS = {  # NetworkConfig field -> (metadata key or ss_network_args entry, expected string)
    "algo": ("ss_network_module", "networks.lokr"), "network_dim": ("ss_network_dim", "16"),
    "network_alpha": ("ss_network_alpha", "8.0"), "conv_dim": ("args", "4"), "conv_alpha": ("args", "2.0"),
    "factor": ("args", "8"), "decompose_both": ("args", "True"), "use_tucker": ("args", "True"),
    "use_scalar": ("args", "True"), "rank_dropout": ("args", "0.1"), "module_dropout": ("args", "0.05"),
    "full_matrix": ("args", "True"), "exclude_patterns": ("args", "['.*attn2.*']"),
    "include_patterns": ("args", "['.*attn2.to_k']"), "network_reg_dims": ("args", ".*ff.*=2,.*proj_in=6"),
    "network_reg_lrs": ("args", ".*attn1.*=0.0003"), "train_llm_adapter": ("args", "True"),
    "loraplus_lr_ratio": ("args", "4.0"), "loraplus_unet_lr_ratio": ("args", "8.0"),
    "loraplus_text_encoder_lr_ratio": ("args", "2.0"), "rank_dropout_scale": ("args", "True"),
    "rs_lora": ("args", "True"), "dora_wd": ("args", "True"), "wd_on_output": ("args", "False"),
}
TRAIN_KEYS = {  # TrainConfig field -> (metadata key, expected string)
    "steps": ("ss_max_train_steps", "40"), "batch_size": ("ss_batch_size_per_device", "2"),
    "learning_rate": ("ss_learning_rate", "0.0003"), "unet_lr": ("ss_unet_lr", "0.0002"),
    "te_lr": ("ss_text_encoder_lr", "1e-05"),
    "optimizer": ("ss_optimizer", "torch.optim.adamw.AdamW(weight_decay=0.02,betas=(0.8, 0.95),eps=1e-06)"),
    "weight_decay": ("ss_optimizer", None), "betas": ("ss_optimizer", None), "eps": ("ss_optimizer", None),
    "momentum": ("ss_optimizer", None),  # SGD only: checked in test_sgd_momentum_round_trips
    "scheduler": ("ss_lr_scheduler", "cosine"), "warmup_steps": ("ss_lr_warmup_steps", "5"),
    "grad_accum_steps": ("ss_gradient_accumulation_steps", "3"), "max_grad_norm": ("ss_max_grad_norm", "0.5"),
    "dtype": ("ss_mixed_precision", "bf16"), "seed": ("ss_seed", "11"),
    "save_every": ("hadakron.save_every_n_steps", "10"),
}
RUN_KEYS = {  # RunFacts field -> (metadata key, expected string)
    "family": ("ss_base_model_version", "sdxl_base_v1-0"), "step": ("ss_steps", "12"),
    "sample_sizes": ("ss_num_train_images", "3"), "captions": ("ss_tag_frequency", None),
    "parts": ("hadakron.parts", '["unet", "te1", "te2"]'),
    "gradient_checkpointing": ("ss_gradient_checkpointing", "True"),
    "base_model_path": (None, None),  # needs a file: test_base_model_name_and_hash
    "prediction_type": ("modelspec.prediction_type", "v"), "output_name": ("ss_output_name", "run"),
    "autosave_prefix": ("hadakron.autosave_prefix", "runs/run"),
    "resume_from": ("hadakron.resume_from", "run_step000006_00001_.safetensors"),
    "resumed_step": ("hadakron.resumed_step", "6"), "session_id": ("ss_session_id", "1234"),
    "started_at": ("ss_training_started_at", "1700000000.5"),
    "finished_at": ("ss_training_finished_at", "1700000600.25"),
    "final_loss": ("hadakron.final_loss", "0.125"), "comment": ("ss_training_comment", "a comment"),
    "extra": ("ss_min_snr_gamma", "5.0"),
}


@pytest.mark.parametrize("cls,keys", [(NetworkConfig, NETWORK_KEYS), (TrainConfig, TRAIN_KEYS), (RunFacts, RUN_KEYS)])
def test_every_field_has_a_key(cls, keys):
    """A field added to a config without a metadata key fails here."""
    assert {f.name for f in dataclasses.fields(cls)} == set(keys)


def test_every_argument_appears_with_its_value():
    meta = _meta()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    args = _args(meta)
    assert all(isinstance(v, str) for v in args.values())
    for field, (key, expected) in {**NETWORK_KEYS, **TRAIN_KEYS, **RUN_KEYS}.items():
        if key is None:
            continue
        value = args.get(field) if key == "args" else meta.get(key)
        assert value is not None, (field, key)
        if expected is not None:
            assert value == expected, (field, key, value)
    assert args["algo"] == "lokr"


def test_sd_scripts_formats_of_the_dataset_keys():
    meta = _meta()
    assert json.loads(meta["ss_tag_frequency"]) == {"latents": {"a cat": 2, "red": 1, "a dog": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"latents": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {}
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [832, 1216], "count": 1},
                                                              "1": {"resolution": [1024, 1024], "count": 2}}}
    assert meta["ss_resolution"] == "(1024, 1024)" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_num_reg_images"] == "0" and meta["ss_enable_bucket"] == "True"
    # batches of 2 from 3 samples: 2 per epoch; 3 micro-batches per step: step 12 drew 36 batches = 18 epochs
    assert meta["ss_num_batches_per_epoch"] == "2" and meta["ss_epoch"] == "18" and meta["ss_num_epochs"] == "60"
    assert meta["ss_total_batch_size"] == "6" and meta["ss_train_batch_size"] == "2"
    assert meta["ss_network_dropout"] == "None" and meta["ss_v2"] == "False"
    assert meta["modelspec.date"] == "2023-11-14T22:25:00+00:00"


def test_no_captions_no_tags_and_unknowns_left_out():
    run = dataclasses.replace(RUN, captions=(), output_name=None, resume_from=None, resumed_step=None,
                              prediction_type="flow", session_id=None, started_at=None, final_loss=None, extra={})
    meta = _meta(train=dataclasses.replace(TRAIN, unet_lr=None, te_lr=None), run=run)
    assert meta["ss_tag_frequency"] == "{}"
    for key in ("ss_output_name", "ss_session_id", "ss_training_started_at", "ss_sd_model_name", "ss_sd_model_hash",
                "modelspec.prediction_type", "hadakron.resumed_step", "hadakron.final_loss"):
        assert key not in meta, key
    assert meta["ss_unet_lr"] == "None" and meta["ss_text_encoder_lr"] == "None"  # as sd-scripts writes them
    assert meta["hadakron.resume_from"] == "None"


def test_keeps_every_key_build_metadata_writes():
    old = build_metadata(algorithm="lokr", family="sdxl", network_dim=16, network_alpha=8.0, conv_dim=4,
                         conv_alpha=2.0, factor=8, decompose_both=True, use_tucker=True)
    assert set(old) <= set(_meta())


def test_loha_has_no_lokr_arguments():
    loha = NetworkConfig(algo="loha", network_dim=4, network_alpha=2.0)
    args = _args(_meta(network=loha))
    assert "factor" not in args and "decompose_both" not in args and args["algo"] == "loha"


def test_base_model_name_and_hash(tmp_path):
    path = tmp_path / "base.safetensors"
    data = bytes(range(256)) * (0x120000 // 256)
    path.write_bytes(data)
    meta = _meta(run=dataclasses.replace(RUN, base_model_path=str(path)))
    assert meta["ss_sd_model_name"] == "base.safetensors"
    # sd-scripts' model_hash: sha256 of the 64 KiB at 1 MiB, 8 hex digits
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_model_hash(path) == meta["ss_sd_model_hash"]
    assert "ss_new_sd_model_hash" not in meta  # the full-file sha256 is not computed (gigabytes per run)


def test_pieces():
    assert tag_frequency([" A, b ,, a", "c"]) == {"a": 2, "b": 1, "c": 1}
    assert bucket_info([]) == {"buckets": {}}
    assert parse_optimizer("torch.optim.sgd.SGD(momentum=0.9,weight_decay=0.0)") == (
        "SGD", {"momentum": 0.9, "weight_decay": 0.0})
    assert parse_optimizer("prodigyopt.prodigy.Prodigy") == ("Prodigy", {})
    eight_bit = train_config_from_metadata(_meta(train=dataclasses.replace(TRAIN, optimizer="AdamW8bit")))
    assert eight_bit.optimizer == "AdamW8bit" and eight_bit.betas == (0.8, 0.95)
    with pytest.raises(ValueError, match="ss_optimizer.*not 'module.Class"):
        parse_optimizer("AdamW(weight_decay=")


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("network", [
    NETWORK,
    NetworkConfig(algo="loha", network_dim=4, network_alpha=1.0),
    NetworkConfig(algo="lokr", network_dim=8, network_alpha=4.0, factor=4, exclude_patterns=["a.*", "b"]),
])
def test_round_trip_through_a_file(tmp_path, network):
    tensors = {"lora_unet_x.alpha": torch.tensor(1.0)}
    meta = _meta(network=network, tensors=tensors)
    path = write_adapter(tmp_path / "a.safetensors", tensors, meta)
    back = read_adapter(path).metadata
    assert back == meta
    assert network_config_from_metadata(back) == network
    assert train_config_from_metadata(back) == TRAIN


def test_sgd_momentum_round_trips():
    train = dataclasses.replace(TRAIN, optimizer="SGD", momentum=0.9, betas=(0.9, 0.999), eps=1e-8)
    meta = _meta(train=train)
    assert meta["ss_optimizer"] == "torch.optim.sgd.SGD(momentum=0.9,weight_decay=0.02)"
    assert train_config_from_metadata(meta) == train


# ---------------------------------------------------------------- resume check


def test_resume_refuses_network_changes_naming_each():
    meta = _meta()
    given = dataclasses.replace(NETWORK, network_dim=32, use_tucker=False, exclude_patterns=[])
    with pytest.raises(ResumeConfigError) as info:
        check_resume_config(meta, given, RUN.parts, source="resume_from 'a.safetensors'")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("resume_from 'a.safetensors' was trained with another network configuration")
    assert lines[1:] == ["  network_dim: saved 16, given 32", "  use_tucker: saved True, given False",
                         "  exclude_patterns: saved ['.*attn2.*'], given []"]


@pytest.mark.parametrize("change,line", [
    (dict(algo="loha"), "algo: saved 'lokr', given 'loha'"),
    (dict(network_alpha=1.0), "network_alpha: saved 8.0, given 1.0"),
    (dict(factor=4), "factor: saved 8, given 4"),
    (dict(decompose_both=False), "decompose_both: saved True, given False"),
    (dict(use_scalar=False), "use_scalar: saved True, given False"),
    (dict(conv_dim=None), "conv_dim: saved 4, given None"),
    (dict(include_patterns=[]), "include_patterns: saved ['.*attn2.to_k'], given []"),
    (dict(network_reg_dims={}), "network_reg_dims: saved {'.*ff.*': 2, '.*proj_in': 6}, given {}"),
    (dict(train_llm_adapter=False), "train_llm_adapter: saved True, given False"),
    (dict(dora_wd=False), "dora_wd: saved True, given False"),
    (dict(wd_on_output=True), "wd_on_output: saved False, given True"),
    (dict(rs_lora=False), "rs_lora: saved True, given False"),
])
def test_resume_refuses_each_shaping_argument(change, line):
    with pytest.raises(ResumeConfigError, match="another network configuration") as info:
        check_resume_config(_meta(), dataclasses.replace(NETWORK, **change), RUN.parts)
    assert str(info.value).splitlines()[1:] == ["  " + line]


def test_resume_refuses_other_parts():
    with pytest.raises(ResumeConfigError) as info:
        check_resume_config(_meta(), NETWORK, ["unet"])
    assert "  parts: saved ['te1', 'te2', 'unet'], given ['unet']" in str(info.value).splitlines()


def test_resume_allows_lr_steps_dropouts_and_optimizer_args():
    given_net = dataclasses.replace(NETWORK, rank_dropout=0.0, network_reg_lrs={}, loraplus_lr_ratio=None)
    given_train = dataclasses.replace(TRAIN, steps=80, learning_rate=1e-4, weight_decay=0.0, scheduler="linear",
                                      save_every=0)
    check = check_resume_config(_meta(), given_net, list(reversed(RUN.parts)), train=given_train)
    assert check.unchecked == []
    assert check.changed == [
        "rank_dropout: saved 0.1, given 0.0", "network_reg_lrs: saved {'.*attn1.*': 0.0003}, given {}",
        "loraplus_lr_ratio: saved 4.0, given None", "steps: saved 40, given 80",
        "learning_rate: saved 0.0003, given 0.0001", "weight_decay: saved 0.02, given 0.0",
        "scheduler: saved 'cosine', given 'linear'", "save_every: saved 10, given 0"]
    assert check_resume_config(_meta(), NETWORK, RUN.parts, train=TRAIN).changed == []


def _old_trainer_metadata(network_dim=8, conv_dim=None):
    """What the trainer wrote before every argument was saved: a 4-key network_args, no hadakron.parts."""
    return build_metadata(algorithm="lokr", family="sdxl", network_dim=network_dim, network_alpha=4.0,
                          conv_dim=conv_dim, factor=4, network_args={"rank_dropout": 0.0, "module_dropout": 0.0,
                                                                     "use_scalar": False, "train_llm_adapter": False},
                          training={"steps": 6, "max_train_steps": 6, "learning_rate": 1e-4, "optimizer": "AdamW"})


def test_resume_of_an_older_file_checks_what_it_records():
    given = NetworkConfig(algo="lokr", network_dim=8, network_alpha=4.0, factor=4, exclude_patterns=[".*x"])
    check = check_resume_config(_old_trainer_metadata(), given, ["unet"], train=TrainConfig(steps=10))
    assert check.unchecked == ["conv_dim", "conv_alpha", "use_tucker", "full_matrix", "exclude_patterns",
                               "include_patterns", "network_reg_dims", "dora_wd", "wd_on_output", "rs_lora",
                               "rank_dropout_scale", "network_reg_lrs", "loraplus_lr_ratio",
                               "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "parts"]
    with pytest.raises(ResumeConfigError, match="network_dim: saved 16, given 8"):
        check_resume_config(_old_trainer_metadata(network_dim=16), given, ["unet"])


def test_resume_names_the_file_when_its_network_args_are_broken():
    meta = dict(_meta(), ss_network_args='{"conv_dim": "four", "algo": "lokr"}')
    with pytest.raises(ResumeConfigError, match=r"resume_from 'x': the saved network configuration cannot") as info:
        check_resume_config(meta, NETWORK, RUN.parts, source="resume_from 'x'")
    assert "conv_dim='four' is not a int" in str(info.value)
    with pytest.raises(ValueError, match="resume_from 'x': metadata 'ss_network_args' is not a JSON object"):
        check_resume_config(dict(meta, ss_network_args="[1]"), NETWORK, RUN.parts, source="resume_from 'x'")


def test_resumed_optimizer_takes_the_new_learning_rate():
    """The sidecar restores the optimizer's state, but the lr and arguments come from the resumed run's settings."""
    p = torch.nn.Parameter(torch.ones(3))
    old = build_optimizer("AdamW", [{"params": [p], "lr": 1e-3}], lr=1e-3, weight_decay=0.1)
    p.grad = torch.ones(3)
    old.step()
    tensors, meta = training_state({"p": p}, old, 1)
    new = build_optimizer("AdamW", [{"params": [p], "lr": 5e-4}], lr=5e-4, weight_decay=0.0)
    assert apply_training_state(tensors, meta, {"p": p}, new) == 1
    group = new.param_groups[0]
    assert group["initial_lr"] == 5e-4 and group["lr"] == 5e-4 and group["weight_decay"] == 0.0
    assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])

"""Training faults keep the last good autosave: a NaN loss stops the run without writing NaN weights over or
beside it; an interrupt (KeyboardInterrupt, the host's interrupt exception) or SIGKILL in the middle of an
autosave leaves every earlier autosave complete and loadable, and no temp file once the next save runs.
The autosaves go through Save Adapter's own `save_adapter`, as the trainer nodes write them."""
from __future__ import annotations

import math
import os
import random
import time

import pytest
import torch

from hadakron.io import read_adapter, safetensors_format
from hadakron.train import TrainCallbacks, read_training_state, sidecar_path
from fault_helpers import forked, kill_and_reap, needs_fork, temp_files
from test_faults_nodes import node  # noqa: F401 (fixture: nodes/save_adapter.py on a stand-in folder_paths)
from test_train_loop import _nan_after, _nonzero_init, _run, make_lokr

from helpers import one_thread  # noqa: F401 (autouse fixture)


class Interrupted(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def _autosaver(node, prefix: str, saved: list):
    def autosave(step, snap):
        from hadakron.io import AdapterFile
        adapter = AdapterFile(path=None, tensors=snap.adapter_tensors(), metadata={"hadakron.step": str(step)},
                              training_state=snap.training_state())
        saved.append((step, node.save_adapter(adapter, f"{prefix}_step{step:06d}", input_name="autosave_prefix")))
    return autosave


def _loadable(path) -> dict[str, torch.Tensor]:
    adapter = read_adapter(path)
    assert not adapter.problems, adapter.problems
    assert all(torch.isfinite(t).all() for t in adapter.tensors.values())
    tensors, meta = read_training_state(sidecar_path(path))
    assert meta["hadakron.step"] == adapter.metadata["hadakron.step"]
    return adapter.tensors


def _folder(node):
    return node.test_output / "loras" / "run"


def test_nan_loss_keeps_the_last_good_autosave(node):
    saved: list = []
    net, result = _run(make_lokr, init=_nonzero_init, steps=10, save_every=2, model_call_wrap=_nan_after(5),
                       callbacks=TrainCallbacks(autosave=_autosaver(node, "run/nan", saved)))
    assert result.stop_reason == "non_finite_loss" and result.step == 4  # NaN at step 6: back to step 4
    assert [s for s, _ in saved] == [2, 4]  # nothing written for the NaN step
    clean, _ = _run(make_lokr, init=_nonzero_init, steps=4)
    last = _loadable(saved[-1][1])
    for key, value in clean.file_state_dict().items():
        assert torch.equal(last[key], value.detach()), key  # the step-4 autosave is step 4's adapter exactly
    assert sorted(p.name for p in _folder(node).iterdir()) == [
        "nan_step000002_00001_.safetensors", "nan_step000002_00001_.trainstate",
        "nan_step000004_00001_.safetensors", "nan_step000004_00001_.trainstate"]


@pytest.mark.parametrize("what", ["adapter", "sidecar"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, Interrupted])
def test_an_interrupt_inside_an_autosave_keeps_the_earlier_ones(node, monkeypatch, exc, what):
    saved: list = []
    real_tensor, real_state = safetensors_format.write_tensor, node.write_training_state
    state = {"armed": False, "writes": 0}

    def interruptible(f, t):  # the second tensor write of the armed file raises
        if state["armed"]:
            state["writes"] += 1
            if state["writes"] > 1:
                raise exc("stop")
        real_tensor(f, t)

    def sidecar(*args, **kwargs):
        state["armed"] = state["step"] == 4
        return real_state(*args, **kwargs)
    monkeypatch.setattr(safetensors_format, "write_tensor", interruptible)
    monkeypatch.setattr(node, "write_training_state", sidecar)
    autosave = _autosaver(node, "run/int", saved)

    def arming(step, snap):
        state["step"] = step
        state["armed"] = step == 4 and what == "adapter"
        autosave(step, snap)
    with pytest.raises(exc):
        _run(make_lokr, init=_nonzero_init, steps=10, save_every=2,
             callbacks=TrainCallbacks(autosave=arming, interrupt_exceptions=(Interrupted,)))
    assert [s for s, _ in saved] == [2]  # the step-4 save never returned
    _loadable(saved[0][1])
    names = sorted(p.name for p in _folder(node).iterdir())
    kept = ["int_step000002_00001_.safetensors", "int_step000002_00001_.trainstate"]
    if what == "sidecar":  # the adapter was complete before the sidecar was cut: loadable, resumable without it
        assert names == sorted(kept + ["int_step000004_00001_.safetensors"])
        assert read_adapter(_folder(node) / "int_step000004_00001_.safetensors").tensors
    else:
        assert names == kept
    assert temp_files(node.test_output) == []


@needs_fork
def test_sigkill_during_autosaves_leaves_only_complete_files(node, monkeypatch):
    real = safetensors_format.write_tensor

    def slow(f, t):
        real(f, t)
        time.sleep(0.004)
    monkeypatch.setattr(safetensors_format, "write_tensor", slow)
    rng = random.Random(4)
    torn = 0
    for attempt in range(3):
        def work():
            _run(make_lokr, init=_nonzero_init, steps=200, save_every=1,
                 callbacks=TrainCallbacks(autosave=_autosaver(node, "run/kill", [])))
        pid = forked(work)
        time.sleep(rng.uniform(0.4, 1.2))
        kill_and_reap(pid)
        torn += len(temp_files(node.test_output))
        for path in sorted(_folder(node).glob("*.safetensors")):
            adapter = read_adapter(path)  # every visible adapter is complete
            assert all(math.isfinite(float(t.abs().sum())) for t in adapter.tensors.values())
            side = sidecar_path(path)
            if side.exists():
                read_training_state(side)
    assert torn >= 1, "no kill landed inside an autosave; the test proves nothing"
    monkeypatch.undo()
    saved: list = []
    _run(make_lokr, init=_nonzero_init, steps=2, save_every=1,
         callbacks=TrainCallbacks(autosave=_autosaver(node, "run/kill", saved)))
    # the next save under the prefix sweeps what the killed writers left, whatever step they were at
    assert temp_files(node.test_output) == []
    assert os.path.exists(saved[-1][1])

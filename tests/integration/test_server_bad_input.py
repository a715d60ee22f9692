"""Bad input to the pack's nodes through POST /prompt on the real server: one readable error, and nothing else.

For every bad file (wrong model family, truncated, a NaN in every module, a checkpoint in loras/) and every
filename/prefix input pointing outside output/ (`../`, absolute):
- the execution_error's exception_message is ONE line naming the file (or the prefix as typed) and the problem,
  with no Python repr noise;
- the server runs a good prompt right after;
- nothing is written anywhere around the server's base folder: no file outside output/, and no partial or temp
  file inside it either.
Combo inputs (lora_name, adapter_N, resume_from) are checked by ComfyUI's own validation: /prompt answers 400 with
a node error naming the input, for `../` and absolute values (even ones that name a real file) and missing files.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_forms import make_params
from comfy_client import Graph, PromptRejected

TAG = uuid.uuid4().hex[:8]  # names this session's escape targets, so a leftover from another run cannot pass
SDXL_ADAPTER = "bad_input_sdxl_adapter.safetensors"
ANIMA_ADAPTER = "bad_input_anima_adapter.safetensors"
TRUNCATED = "bad_input_truncated.safetensors"
NAN_EVERY_MODULE = "bad_input_nan_every_module.safetensors"
CHECKPOINT_IN_LORAS = "bad_input_checkpoint_in_loras.safetensors"
TRAINER_NONE = "none"
PROMPT_TEXT = "a photo of a cat"

UNET_Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
UNET_CONV = "input_blocks.1.0.in_layers.2"
CLIP_L_Q = "text_model.encoder.layers.0.self_attn.q_proj"
ANIMA_Q = "blocks.0.self_attn.q_proj"
ANIMA_MLP = "blocks.1.mlp.layer1"

# what a message for a user must not contain: tracebacks, object/tensor reprs, escaped newlines of a repr'd string
REPR_NOISE = re.compile(r"Traceback|File \"|<[\w.]+ object at 0x|<class '|\btensor\(|dtype=torch|\\n|\{'\w+': ")
MAX_MESSAGE = 600
_strengths = itertools.count(1)


# ---------------------------------------------------------------- files and filesystem


def _kohya(part: str, dotted: str) -> str:
    return f"lora_{part}_{dotted.replace('.', '_')}"


def _write(folder: Path, name: str, modules: dict[str, dict[str, torch.Tensor]]) -> Path:
    tensors = {f"{mk}.{p}": t.contiguous() for mk, params in modules.items() for p, t in params.items()}
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / name)
    return folder / name


@pytest.fixture(scope="module")
def bad_files(comfy, sdxl_files, anima_files):
    """The adapter files of this module in models/loras (removed afterwards)."""
    import model_files as mf

    loras = comfy.models_dir("loras")
    unet, clip_l, anima = sdxl_files.unet_layers, sdxl_files.clip_l_layers, anima_files.unet_layers
    g = torch.Generator().manual_seed(21)
    sdxl = {_kohya("unet", UNET_Q): make_params("loha", unet[UNET_Q], g, rank=2, alpha=0.5),
            _kohya("unet", UNET_CONV): make_params("lokr_lowrank", unet[UNET_CONV], g, rank=2, alpha=0.5)}
    anima_mods = {_kohya("unet", ANIMA_Q): make_params("lokr_full", anima[ANIMA_Q], g, rank=2, alpha=0.5),
                  _kohya("unet", ANIMA_MLP): make_params("loha", anima[ANIMA_MLP], g, rank=2, alpha=0.5)}
    nan = {_kohya("unet", UNET_Q): make_params("loha", unet[UNET_Q], g, rank=2),
           _kohya("unet", UNET_CONV): make_params("lokr_both", unet[UNET_CONV], g, rank=2),
           _kohya("te1", CLIP_L_Q): make_params("lokr_lowrank", clip_l[CLIP_L_Q], g, rank=2)}
    for params in nan.values():  # one NaN in one factor of every module
        factor = sorted(k for k in params if k != "alpha")[0]
        params[factor].view(-1)[1] = math.nan
    paths = [_write(loras, SDXL_ADAPTER, sdxl), _write(loras, ANIMA_ADAPTER, anima_mods),
             _write(loras, NAN_EVERY_MODULE, nan)]
    data = (loras / SDXL_ADAPTER).read_bytes()
    (loras / TRUNCATED).write_bytes(data[: len(data) - 64])
    paths.append(loras / TRUNCATED)
    paths.append(loras / mf.link_into(sdxl_files.path, loras, CHECKPOINT_IN_LORAS))
    yield paths
    for p in paths:
        p.unlink(missing_ok=True)


def tree_state(root: Path) -> dict[str, tuple]:
    """{relative path: (size, mtime_ns) for files and links, ("dir",) for folders} under `root` (links not followed)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for f in filenames:
            path = os.path.join(dirpath, f)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


class WriteGuard:
    """Snapshot of the folders around the server's base; `assert_nothing_written()` after a refused prompt."""

    def __init__(self, comfy):
        self.comfy = comfy
        self.root = comfy.base.parent
        self.log = os.path.relpath(comfy.log, self.root)
        self.before = tree_state(self.root)

    def changes(self) -> list[str]:
        after = tree_state(self.root)
        return sorted(k for k, v in after.items() if k != self.log and self.before.get(k) != v)

    def assert_nothing_written(self, *escape_targets: Path) -> None:
        changed = self.changes()
        base = os.path.relpath(self.comfy.base, self.root)
        outside = [c for c in changed if not c.startswith(os.path.join(base, "output") + os.sep)]
        assert not outside, f"written outside output/: {outside}"
        assert not changed, f"a refused prompt left files in output/ (partial or temp): {changed}"
        for target in escape_targets:
            assert not target.exists(), f"{target} exists"


@pytest.fixture
def guard(comfy, bad_files):
    return WriteGuard(comfy)


# ---------------------------------------------------------------- graphs


def _sdxl(g: Graph, sdxl_files):
    return g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)


def _anima(g: Graph, anima_files):
    return g.node("UNETLoader", unet_name=anima_files.unet, weight_dtype="default")


def keep_loaded(g: Graph, files) -> None:
    """Unconnected SDXL loader + text encode: never executed, but named in the prompt, so the executor's RAM cache
    keeps their outputs (it drops entries of nodes a prompt does not name) and no case reloads the checkpoint."""
    ckpt = _sdxl(g, files["sdxl"])
    g.node("CLIPTextEncode", text=PROMPT_TEXT, clip=ckpt[1])


def merge_on_sdxl(g, files, adapter, strength=1.0):
    ckpt = _sdxl(g, files["sdxl"])
    node = g.node("HadakronAdapterMerge", model=ckpt[0], clip=ckpt[1], adapter_1=adapter, strength_1=strength)
    g.node("PreviewAny", source=node[2])
    return node


def merge_on_anima(g, files, adapter, strength=1.0):
    node = g.node("HadakronAdapterMerge", model=_anima(g, files["anima"])[0], adapter_1=adapter, strength_1=strength)
    g.node("PreviewAny", source=node[2])
    return node


def loader_on_sdxl(g, files, adapter, strength=1.0):
    ckpt = _sdxl(g, files["sdxl"])
    node = g.node("HadakronLoader", model=ckpt[0], clip=ckpt[1], lora_name=adapter, strength_model=strength,
                  strength_clip=strength)
    g.node("PreviewAny", source=node[2])
    return node


def loader_on_anima(g, files, adapter, strength=1.0):
    node = g.node("HadakronLoaderModelOnly", model=_anima(g, files["anima"])[0], lora_name=adapter,
                  strength_model=strength)
    g.node("PreviewAny", source=node[1])
    return node


def combine(g, files, adapter, strength=1.0, prefix="loras/bad_input_combined"):
    return g.node("HadakronAdapterCombine", adapter_1=adapter, strength_1=strength, rank=0, filename_prefix=prefix)


def trainer_inputs(comfy, node_class: str) -> dict:
    """Every widget input of a trainer at its default (combos without one: their first choice)."""
    spec = comfy.object_info(node_class)[node_class]["input"]["required"]
    out = {}
    for name, (kind, *rest) in spec.items():
        opts = rest[0] if rest else {}
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(kind, list):
            out[name] = kind[0]
    return out


def trainer_on_sdxl(g, files, resume_from=TRAINER_NONE, *, node_class="HadakronLoKrTrainer", **inputs):
    """A trainer on SDXL with a one-layer network and one step (the bad input is what fails, not the training)."""
    ckpt = _sdxl(g, files["sdxl"])
    pos = g.node("CLIPTextEncode", text=PROMPT_TEXT, clip=ckpt[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    widgets = trainer_inputs(files["comfy"], node_class)
    widgets.update(steps=1, network_dim=2, training_dtype="fp32", gradient_checkpointing=False,
                   exclude_patterns=".*", include_patterns=re.escape(UNET_Q), resume_from=resume_from)
    widgets.update(inputs)
    return g.node(node_class, model=ckpt[0], latents=lat[0], positive=pos[0], **widgets)


def resume_on_sdxl(g, files, adapter, strength=1.0):
    return trainer_on_sdxl(g, files, resume_from=adapter)


@pytest.fixture
def files(comfy, sdxl_files, anima_files):
    return {"comfy": comfy, "sdxl": sdxl_files, "anima": anima_files}


# ---------------------------------------------------------------- checks


def assert_one_readable_line(run, node, *must_name: str, problem: str) -> str:
    """The prompt failed in `node` with a one-line message naming `must_name` and matching `problem`."""
    err = run.error
    assert err is not None and str(err.get("node_id")) == node.id, (err or {}).get("node_id")
    # ComfyUI appends "\n" (and its OOM tips, none here) to str(exception): strip that, nothing else
    msg = str(err.get("exception_message", "")).strip()
    assert "\n" not in msg, f"{node.class_type}: the error is not one line:\n{msg}"
    for name in must_name:
        assert name in msg, f"{node.class_type}: the error does not name {name!r}: {msg!r}"
    assert re.search(problem, msg), f"{node.class_type}: the error does not say {problem!r}: {msg!r}"
    assert not REPR_NOISE.search(msg), f"{node.class_type}: Python repr noise in the error: {msg!r}"
    assert len(msg) <= MAX_MESSAGE, f"{node.class_type}: {len(msg)} characters: {msg!r}"
    return msg


def assert_server_serves(comfy, files, kind: str) -> None:
    """A good prompt right after runs and our node executes (a fresh strength: no cache hit)."""
    strength = round(0.5 + 0.01 * next(_strengths), 2)
    g = Graph()
    keep_loaded(g, files)
    if kind == "combine":
        node = combine(g, files, SDXL_ADAPTER, strength, prefix="loras/bad_input_after/good")
        run = comfy.run(g)
        (text,) = run.outputs[node.id]["text"]
        assert text.startswith("wrote ") and "bad_input_after" in text.splitlines()[0], text
    else:
        build, adapter = (merge_on_anima, ANIMA_ADAPTER) if kind == "anima" else (merge_on_sdxl, SDXL_ADAPTER)
        node = build(g, files, adapter, strength)
        run = comfy.run(g)
        (text,) = run.outputs[node.id]["text"]
        assert f"{adapter} @ {strength:g}: 2 modules applied, 0 not applied" in text, text
    assert node.id in run.executed_nodes, (run.executed_nodes, run.cached_nodes)


# ---------------------------------------------------------------- bad adapter files

WRONG_FAMILY = r"(?i)anima.*sdxl|sdxl.*anima"
TRUNCATED_PROBLEM = r"(?i)truncated"
NAN_PROBLEM = r"NaN"
NOT_ADAPTER = r"(?i)not an adapter"

FILE_CASES = [
    # id, graph builder, file, problem, the good prompt after (the Anima cases last and together: one Anima load)
    ("merge-anima-adapter-on-sdxl", merge_on_sdxl, ANIMA_ADAPTER, WRONG_FAMILY, "sdxl"),
    ("loader-anima-adapter-on-sdxl", loader_on_sdxl, ANIMA_ADAPTER, WRONG_FAMILY, "sdxl"),
    ("merge-truncated", merge_on_sdxl, TRUNCATED, TRUNCATED_PROBLEM, "sdxl"),
    ("combine-truncated", combine, TRUNCATED, TRUNCATED_PROBLEM, "combine"),
    ("loader-truncated", loader_on_sdxl, TRUNCATED, TRUNCATED_PROBLEM, "sdxl"),
    ("trainer-resume-truncated", resume_on_sdxl, TRUNCATED, TRUNCATED_PROBLEM, "sdxl"),
    ("merge-nan-every-module", merge_on_sdxl, NAN_EVERY_MODULE, NAN_PROBLEM, "sdxl"),
    ("combine-nan-every-module", combine, NAN_EVERY_MODULE, NAN_PROBLEM, "combine"),
    ("loader-nan-every-module", loader_on_sdxl, NAN_EVERY_MODULE, NAN_PROBLEM, "sdxl"),
    ("merge-checkpoint-in-loras", merge_on_sdxl, CHECKPOINT_IN_LORAS, NOT_ADAPTER, "sdxl"),
    ("combine-checkpoint-in-loras", combine, CHECKPOINT_IN_LORAS, NOT_ADAPTER, "combine"),
    ("loader-checkpoint-in-loras", loader_on_sdxl, CHECKPOINT_IN_LORAS, NOT_ADAPTER, "sdxl"),
    ("trainer-resume-checkpoint-in-loras", resume_on_sdxl, CHECKPOINT_IN_LORAS, NOT_ADAPTER, "sdxl"),
    ("merge-sdxl-adapter-on-anima", merge_on_anima, SDXL_ADAPTER, WRONG_FAMILY, "anima"),
    ("loader-sdxl-adapter-on-anima", loader_on_anima, SDXL_ADAPTER, WRONG_FAMILY, "anima"),
]


@pytest.mark.parametrize("build,adapter,problem,after", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_adapter_file_gives_one_line_error(comfy, files, guard, build, adapter, problem, after):
    """Merge, Combine, Loader and the trainer's resume_from on a bad file: one line, nothing written, server fine."""
    g = Graph()
    keep_loaded(g, files)
    node = build(g, files, adapter)
    run = comfy.run(g, expect_error=True)
    guard.assert_nothing_written()
    assert_server_serves(comfy, files, after)
    assert_one_readable_line(run, node, adapter, problem=problem)


# ---------------------------------------------------------------- prefixes leaving output/


def _escapes(comfy) -> dict[str, tuple[str, Path]]:
    """{case: (prefix as typed, the folder it would create)} relative to output/ (Adapter Combine's root)."""
    base = comfy.base
    absolute = base.parent / f"bad_input_abs_{TAG}"
    return {"dotdot": (f"../bad_input_escape_{TAG}/combined", base / f"bad_input_escape_{TAG}"),
            "nested-dotdot": (f"loras/../../bad_input_escape_{TAG}/combined", base / f"bad_input_escape_{TAG}"),
            "absolute": (str(absolute / "combined"), absolute)}


@pytest.mark.parametrize("case", ["dotdot", "nested-dotdot", "absolute"])
def test_combine_filename_prefix_outside_output_is_refused(comfy, files, guard, case):
    """Adapter Combine's filename_prefix with `../` or an absolute path: refused in one line, nothing written."""
    prefix, target = _escapes(comfy)[case]
    g = Graph()
    keep_loaded(g, files)
    node = combine(g, files, SDXL_ADAPTER, prefix=prefix)
    run = comfy.run(g, expect_error=True)
    guard.assert_nothing_written(target)
    assert_server_serves(comfy, files, "combine")
    assert_one_readable_line(run, node, prefix, problem=r"(?i)outside|leaves|absolute")


def _loras_escapes(comfy) -> dict[str, tuple[str, Path]]:
    """The same escapes relative to output/loras (Save Adapter's and the trainers' autosave root)."""
    base = comfy.base
    absolute = base.parent / f"bad_input_abs_{TAG}"
    return {"dotdot": (f"../../bad_input_escape_{TAG}/adapter", base / f"bad_input_escape_{TAG}"),
            "nested-dotdot": (f"hadakron/../../../bad_input_escape_{TAG}/adapter", base / f"bad_input_escape_{TAG}"),
            "absolute": (str(absolute / "adapter"), absolute)}


@pytest.mark.parametrize("case", ["dotdot", "nested-dotdot", "absolute"])
def test_save_adapter_prefix_outside_output_is_refused(comfy, files, guard, case):
    """Save Adapter fed by a one-step, one-layer trainer (cached by the executor across the cases: one trains)."""
    prefix, target = _loras_escapes(comfy)[case]
    g = Graph()
    trainer = trainer_on_sdxl(g, files)
    save = g.node("HadakronSaveAdapter", adapter=trainer[0], filename_prefix=prefix)
    run = comfy.run(g, expect_error=True)
    assert_one_readable_line(run, save, prefix, problem=r"(?i)outside|leaves|absolute")
    guard.assert_nothing_written(target)
    # the good prompt after: the same (cached) trainer into a good prefix
    save.set(filename_prefix=f"hadakron/bad_input_after_{case}")  # a prefix per case: no cache hit
    good = comfy.run(g)
    assert trainer.id in good.cached_nodes and save.id in good.executed_nodes, (good.cached_nodes, good.executed_nodes)
    (text,) = good.outputs[save.id]["text"]
    assert text.startswith(f"saved loras/hadakron/bad_input_after_{case}_") and text.endswith("_.safetensors"), text
    assert (comfy.output_dir / text[len("saved "):]).is_file(), text


@pytest.mark.parametrize("case", ["dotdot", "absolute"])
def test_trainer_autosave_prefix_outside_output_is_refused_before_training(comfy, files, guard, case):
    """A bad autosave_prefix is an input error: refused before any step (today it fails at the first autosave,
    after training, and the run is lost), naming autosave_prefix."""
    prefix, target = _loras_escapes(comfy)[case]
    g = Graph()
    trainer = trainer_on_sdxl(g, files, steps=2, save_every=1, autosave_prefix=prefix)
    run = comfy.run(g, expect_error=True)
    guard.assert_nothing_written(target)
    assert_server_serves(comfy, files, "sdxl")
    assert_one_readable_line(run, trainer, prefix, "autosave_prefix", problem=r"(?i)outside|leaves|absolute")
    trained = [d for d in run.events_of("progress") if str(d.get("node")) == trainer.id]
    assert not trained, f"the trainer ran {len(trained)} steps before refusing its autosave_prefix"


# ---------------------------------------------------------------- combo inputs: ComfyUI's validation


def _combo_cases(comfy, sdxl_files) -> dict[str, str]:
    """Values that are not in a combo's list: a `../` path to a real file, an absolute path, a missing name."""
    loras = comfy.models_dir("loras")
    real_by_dotdot = f"../checkpoints/{sdxl_files.checkpoint}"  # exists, but outside models/loras
    return {"dotdot-to-real-file": real_by_dotdot, "absolute-real-adapter": str(loras / SDXL_ADAPTER),
            "missing-file": "bad_input_no_such_file.safetensors"}


COMBO_NODES = [
    # id, graph builder, the combo input it fills
    ("loader-lora_name", loader_on_sdxl, "lora_name"),
    ("loader-model-only-lora_name", loader_on_anima, "lora_name"),
    ("merge-adapter_1", merge_on_sdxl, "adapter_1"),
    ("combine-adapter_1", combine, "adapter_1"),
    ("lokr-trainer-resume_from", resume_on_sdxl, "resume_from"),
]


@pytest.mark.parametrize("value_case", ["dotdot-to-real-file", "absolute-real-adapter", "missing-file"])
@pytest.mark.parametrize("build,input_name", [c[1:] for c in COMBO_NODES], ids=[c[0] for c in COMBO_NODES])
def test_combo_input_outside_the_folder_list_is_rejected(comfy, files, guard, sdxl_files, build, input_name,
                                                         value_case):
    """/prompt answers 400 naming the combo input for `../`, absolute (real files too) and missing names."""
    value = _combo_cases(comfy, sdxl_files)[value_case]
    g = Graph()
    node = build(g, files, value)
    with pytest.raises(PromptRejected) as info:
        comfy.queue(g)
    assert "HTTP 400" in str(info.value), str(info.value)[:300]
    errors = (info.value.node_errors or {}).get(node.id, {}).get("errors", [])
    ours = [e for e in errors if e.get("extra_info", {}).get("input_name") == input_name]
    assert ours and ours[0]["type"] == "value_not_in_list", errors
    assert f"{input_name}: '{value}' not in" in ours[0]["details"], ours[0]["details"]
    guard.assert_nothing_written()


def test_merge_adapter_2_outside_the_folder_list_is_rejected(comfy, files, guard, sdxl_files):
    """An optional adapter slot is validated like the first."""
    g = Graph()
    ckpt = _sdxl(g, sdxl_files)
    node = g.node("HadakronAdapterMerge", model=ckpt[0], clip=ckpt[1], adapter_1=SDXL_ADAPTER, strength_1=1.0,
                  adapter_2="../../etc/passwd", strength_2=1.0)
    g.node("PreviewAny", source=node[2])
    with pytest.raises(PromptRejected) as info:
        comfy.queue(g)
    errors = info.value.node_errors[node.id]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["adapter_2"], errors
    guard.assert_nothing_written()


def test_resume_from_deleted_after_queueing_gives_one_line_error(comfy, files, guard, sdxl_files):
    """resume_from passed validation, then the file went away before the trainer ran (queued behind a prompt)."""
    loras = comfy.models_dir("loras")
    name = f"bad_input_resume_gone_{TAG}.safetensors"
    shutil.copyfile(loras / SDXL_ADAPTER, loras / name)
    blocker = Graph()  # a VAE decode of a 128x136 image keeps the queue busy for a second or more
    keep_loaded(blocker, files)
    ckpt = _sdxl(blocker, sdxl_files)
    lat = blocker.node("EmptyLatentImage", width=128, height=136, batch_size=1)
    blocker.node("PreviewImage", images=blocker.node("VAEDecode", samples=lat[0], vae=ckpt[2])[0])
    g = Graph()
    trainer = trainer_on_sdxl(g, files, resume_from=name)
    try:
        first = comfy.queue(blocker)
        second = comfy.queue(g)
        (loras / name).unlink()
        guard.before = tree_state(guard.root)
        assert not comfy.history(first), "the blocker ended before the file was removed: the test proves nothing"
        comfy.wait(first, timeout=300)
        run = comfy.wait(second, timeout=300, expect_error=True)
    finally:
        (loras / name).unlink(missing_ok=True)
    assert_one_readable_line(run, trainer, name, problem=r"(?i)not in the loras folder|not found|missing|no such")
    changed = [c for c in guard.changes() if os.sep + "temp" + os.sep not in os.sep + c]
    assert not changed, f"written by the failed prompt: {changed}"
    assert_server_serves(comfy, files, "sdxl")

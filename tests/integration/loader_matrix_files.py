"""Adapter files for the loader matrix tests, with every key layout written out by hand, and their float64 references.

Nothing here imports hadakron: the file names (kohya, ComfyUI, LyCORIS, PEFT, diffusers), the SGM -> diffusers UNet
names, the block labels, PEFT's scale rule and DoRA are written independently, so a wrong mapping in the loader
shows up as a wrong weight. `AdapterSpec` describes one file and the loader node that applies it; `write_spec`
writes it into the server's loras folder (a PEFT file with a config goes into its own subfolder, config beside it);
`expectations` gives, per saved tensor key, what ModelSave / CLIPSave must contain; `assert_saved_file` compares
a saved file with them (targets within float32 rounding of the float64 reference, every other tensor bit for bit).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from adapter_forms import make_params, reference_delta

F32_EPS = torch.finfo(torch.float32).eps

# ---------------------------------------------------------------- key layouts, by hand

# (family, layout) -> part -> module-key prefix; names after it are dotted ("dotted"), "_"-joined ("joined"),
# diffusers dotted ("diffusers") or diffusers "_"-joined ("diffusers_joined").
LAYOUT_PREFIXES: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("sdxl", "kohya"): {"unet": ("lora_unet_", "joined"), "te1": ("lora_te1_", "joined"),
                        "te2": ("lora_te2_", "joined")},
    ("sdxl", "comfyui"): {"unet": ("diffusion_model.", "dotted"),
                          "te1": ("text_encoders.clip_l.transformer.", "dotted"),
                          "te2": ("text_encoders.clip_g.transformer.", "dotted")},
    ("sdxl", "lycoris"): {"unet": ("lycoris_", "diffusers_joined")},
    ("sdxl", "diffusers"): {"unet": ("unet.", "diffusers"), "te1": ("text_encoder.", "dotted"),
                            "te2": ("text_encoder_2.", "dotted")},
    ("sdxl", "peft"): {"unet": ("base_model.model.", "diffusers"), "te1": ("text_encoder.base_model.model.", "dotted"),
                       "te2": ("text_encoder_2.base_model.model.", "dotted")},
    # a PEFT adapter of one CLIP model alone: bare `base_model.model.text_model...` (CLIP-G by its layer indices)
    ("sdxl", "peft_bare_clip"): {"te2": ("base_model.model.", "dotted")},
    ("anima", "kohya"): {"unet": ("lora_unet_", "joined"), "te": ("lora_te_", "joined")},
    ("anima", "comfyui"): {"unet": ("diffusion_model.", "dotted"),
                           "te": ("text_encoders.qwen3_06b.transformer.model.", "dotted")},
    ("anima", "lycoris"): {"unet": ("lycoris_", "joined")},
    ("anima", "peft"): {"unet": ("base_model.model.", "dotted"), "te": ("text_encoder.base_model.model.", "dotted")},
}
# the layout name the load report gives each of them
REPORTED_LAYOUT = {"peft_bare_clip": "peft"}

_RESBLOCK_TO_DIFFUSERS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                          "skip_connection": "conv_shortcut"}
_OUTSIDE_BLOCKS_TO_DIFFUSERS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                                "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
                                "input_blocks.0.0": "conv_in", "out.2": "conv_out"}


def sgm_to_diffusers(dotted: str) -> str:
    """The diffusers UNet2DConditionModel name of an SDXL UNet layer given by its SGM/LDM name (SDXL's block
    structure: 3 levels of 2 blocks, downsamplers at input_blocks 3 and 6, 3 output blocks per level, upsamplers
    at output_blocks 2 and 5, transformers in every block but level 0)."""
    if dotted in _OUTSIDE_BLOCKS_TO_DIFFUSERS:
        return _OUTSIDE_BLOCKS_TO_DIFFUSERS[dotted]

    def inner(kind: str, rest: str) -> str:
        if kind == "resnets":
            return _RESBLOCK_TO_DIFFUSERS[rest]
        return rest

    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", dotted)
    if m:
        n, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if n in (3, 6):
            assert sub == 0 and rest == "op", dotted
            return f"down_blocks.{n // 3 - 1}.downsamplers.0.conv"
        level, j = (n - 1) // 3, (n - 1) % 3
        kind = "resnets" if sub == 0 else "attentions"
        return f"down_blocks.{level}.{kind}.{j}.{inner(kind, rest)}"
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", dotted)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{sub // 2}.{inner('resnets', rest)}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", dotted)
    if m:
        n, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        up, j = n // 3, n % 3
        if sub == 2 or (sub == 1 and rest == "conv"):
            assert rest == "conv", dotted
            return f"up_blocks.{up}.upsamplers.0.conv"
        kind = "resnets" if sub == 0 else "attentions"
        return f"up_blocks.{up}.{kind}.{j}.{inner(kind, rest)}"
    raise ValueError(f"no diffusers name written for SDXL layer {dotted!r}")


def file_module_key(family: str, layout: str, part: str, dotted: str) -> str:
    """The module key a file in `layout` uses for layer `(part, dotted)`."""
    prefix, names = LAYOUT_PREFIXES[(family, layout)][part]
    if names == "dotted":
        name = dotted
    elif names == "joined":
        name = dotted.replace(".", "_")
    elif names == "diffusers":
        name = sgm_to_diffusers(dotted)
    else:
        name = sgm_to_diffusers(dotted).replace(".", "_")
    return prefix + name


def expected_block(family: str, part: str, dotted: str) -> str:
    """The block label the report must give a layer (LBW names on SDXL, module names on Anima)."""
    if family == "sdxl":
        if part != "unet":
            return part.upper()
        m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", dotted)
        if m:
            return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
        return "M00" if dotted.startswith("middle_block.") else "OTHER"
    if part == "te":
        return "te"
    if dotted.startswith("llm_adapter."):
        return "llm_adapter"
    m = re.match(r"blocks\.(\d+)\.", dotted)
    return f"blocks.{int(m.group(1))}" if m else "OTHER"


# ---------------------------------------------------------------- what a file holds


@dataclass
class Target:
    """One module of a file: layer `(part, dotted)`, its form (adapter_forms), rank, alpha (None: no alpha tensor),
    DoRA (None, "row": dora_scale (out, 1, ...), "col": (1, in, ...)) and the block multiplier the node must give it."""

    part: str
    dotted: str
    form: str
    rank: int = 2
    alpha: float | None = 1.0
    dora: str | None = None
    block_weight: float = 1.0


@dataclass
class AdapterSpec:
    """One adapter file and the loader node applying it (`strength_clip` None: HadakronLoaderModelOnly)."""

    name: str                       # lora_name as the server lists it ("x.safetensors", "sub/adapter_model...")
    family: str
    layout: str
    targets: list[Target]
    strength_model: float
    strength_clip: float | None = 1.0
    block_weights: str = ""
    peft_config: dict | None = None  # written as adapter_config.json beside the file (PEFT files without alpha)
    warned_alpha: tuple[str, ...] = ()  # layers (dotted) whose missing alpha the report must warn about
    params: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)  # filled by write_spec

    @property
    def model_only(self) -> bool:
        return self.strength_clip is None

    @property
    def reported_layout(self) -> str:
        return REPORTED_LAYOUT.get(self.layout, self.layout)

    def loaded(self, target: Target) -> bool:
        """Whether the node loads the target's part (the model-only node loads no text encoder)."""
        return target.part == "unet" or not self.model_only

    def strength(self, target: Target) -> float:
        """The strength the node gives a target: its part's strength times its block multiplier."""
        base = self.strength_model if target.part == "unet" else self.strength_clip
        return float(base) * target.block_weight


def peft_scale(config: Mapping, module_name: str) -> float:
    """PEFT's alpha / r for a module named `module_name` inside the wrapped model: the first rank_pattern /
    alpha_pattern key (in order) with `re.match(rf"(.*\\.)?({key})$", name)`, else the config's r / alpha."""
    def pick(patterns: Mapping, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        return default
    return float(pick(config.get("alpha_pattern"), config["alpha"])) / float(pick(config.get("rank_pattern"),
                                                                                     config["r"]))


def _peft_name(module_key: str) -> str:
    return module_key.split("base_model.model.", 1)[1]


def _dora_scale(base: torch.Tensor, delta: torch.Tensor, how: str, g: torch.Generator) -> torch.Tensor:
    """A magnitude vector near the norm of W + dW (row- or column-wise), so W_d moves away from W + dW."""
    merged = base.to(torch.float64) + delta
    if how == "row":
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (merged.dim() - 2))
    wobble = 0.6 + 0.8 * torch.rand(norm.shape, generator=g, dtype=torch.float64)
    return (norm * wobble).to(torch.float32)


def write_spec(spec: AdapterSpec, loras_dir: Path, shapes: Mapping[tuple[str, str], tuple[int, ...]],
               base_of: Callable[[str, str], torch.Tensor], seed: int) -> None:
    """Write the spec's file (and PEFT config) into `loras_dir`; fills `spec.params` with the tensors as written."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for t in spec.targets:
        shape = shapes[(t.part, t.dotted)]
        p = make_params(t.form, shape, g, rank=t.rank, alpha=1.0 if t.alpha is None else t.alpha)
        if t.alpha is None:
            del p["alpha"]
        mkey = file_module_key(spec.family, spec.layout, t.part, t.dotted)
        if spec.peft_config is not None:
            _check_peft_rank(spec.peft_config, _peft_name(mkey), t, p)
        if t.dora:
            p["dora_scale"] = _dora_scale(base_of(t.part, t.dotted), _scaled_delta(spec, t, p, shape), t.dora, g)
        spec.params[(t.part, t.dotted)] = p
        for pname, value in p.items():
            tensors[f"{mkey}.{pname}"] = value
    path = loras_dir / spec.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.peft_config is not None:
        _write_atomic(path.parent / "adapter_config.json", json.dumps(spec.peft_config).encode())
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={})
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_peft_rank(config: Mapping, name: str, t: Target, params: Mapping[str, torch.Tensor]) -> None:
    """The file's own rank equals PEFT's r for the module (PEFT made the tensors from it), full LoKr aside."""
    r = config["r"]
    for key, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            r = value
            break
    if t.form != "lokr_full":
        assert t.rank == r, f"test spec: {name} has rank {t.rank} but its PEFT config gives r={r}"


def _scaled_delta(spec: AdapterSpec, t: Target, params: Mapping[str, torch.Tensor],
                  shape: tuple[int, ...]) -> torch.Tensor:
    """delta-W in float64 with the file's scale: alpha / rank from its tensors, or PEFT's alpha / r from its config
    (also for a LoKr with both factors full, where the tensors alone give scale 1)."""
    if spec.peft_config is None:
        return reference_delta(params, shape)
    unscaled = reference_delta({k: v for k, v in params.items() if k != "alpha"}, shape)
    name = _peft_name(file_module_key(spec.family, spec.layout, t.part, t.dotted))
    return unscaled * peft_scale(spec.peft_config, name)


# ---------------------------------------------------------------- expected saved tensors


@dataclass
class Expectation:
    """What one saved tensor must hold: base W patched by `params` at `strength` (DoRA when it has dora_scale)."""

    spec: AdapterSpec
    target: Target
    strength: float

    def reference(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 reference, float32 error bound before the saved dtype's rounding) for base weight `base`."""
        params = self.spec.params[(self.target.part, self.target.dotted)]
        shape = tuple(base.shape)
        s = self.strength
        w = base.to(torch.float64)
        delta = _scaled_delta(self.spec, self.target, params, shape)
        abs_params = {k: v.abs() for k, v in params.items() if k != "dora_scale"}
        bound = _scaled_delta(self.spec, self.target, abs_params, shape).abs()
        if "dora_scale" not in params:
            return w + s * delta, 8 * F32_EPS * abs(s) * bound
        merged = w + delta
        m = params["dora_scale"].to(torch.float64)
        if self.target.dora == "row":
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, -1, *[1] * (merged.dim() - 2))
        factor = m.reshape(norm.shape) / (norm + F32_EPS)
        wd = merged * factor
        # float32: W + dW, its norm (a sum over up to a few thousand terms), the factor, then W + s (W_d - W)
        bound = 64 * F32_EPS * abs(s) * ((w.abs() + bound) * factor + wd.abs() + w.abs())
        return w + s * (wd - w), bound


def expectations(specs: list[AdapterSpec], saved_key: Callable[[str, str], str | None]) -> dict[str, Expectation]:
    """{saved key: Expectation} of every target a node applies with a nonzero strength; `saved_key(part, dotted)`
    names the tensor in the saved file (None: not in this file). Targets at strength 0 and targets the node does not
    load are left out: they must equal the base bit for bit."""
    out: dict[str, Expectation] = {}
    for spec in specs:
        for t in spec.targets:
            s = spec.strength(t) if spec.loaded(t) else 0.0
            key = saved_key(t.part, t.dotted)
            if key is None or s == 0.0:
                continue
            assert key not in out, f"test spec: {key} targeted twice"
            out[key] = Expectation(spec, t, s)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` and `b` (same dtype and shape) hold the same bytes; compared as int64 words where the layout allows (15x
    faster than torch.equal on float16, and exact about -0.0 and NaN payloads)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a8, b8 = a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    for word in (torch.int64, torch.int32, torch.int16):
        try:
            return torch.equal(a8.view(word), b8.view(word))
        except RuntimeError:  # size or storage offset not a multiple of the word
            continue
    return torch.equal(a8, b8)


def same_values(saved: torch.Tensor, base: torch.Tensor) -> bool:
    """Bit for bit: the saved tensor holds exactly the base values (a wider float dtype holds them exactly)."""
    if saved.dtype == base.dtype:
        return same_bits(saved, base)
    if not (saved.is_floating_point() and base.is_floating_point()):
        return False
    if not same_bits(saved, base.to(saved.dtype)):
        return False
    widening = saved.dtype != torch.bfloat16 and torch.finfo(saved.dtype).bits >= torch.finfo(base.dtype).bits
    return widening or same_bits(saved.to(base.dtype), base)


def assert_saved_file(path: Path, base_of: Callable[[str], torch.Tensor | None], expected: Mapping[str, Expectation],
                      extras: frozenset[str] = frozenset()) -> dict[str, float]:
    """Every tensor of the saved file: an expected key within rounding of its float64 reference (and far from the
    base), every other key equal to the base bit for bit. `base_of(key)` is None only for `extras` (ComfyUI's own
    tensors that no file carries). Returns {key: max error / tolerance} of the expected keys."""
    from safetensors import safe_open
    worst: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        missing = sorted(set(expected) - set(keys))
        assert not missing, f"{path.name}: targeted tensors not saved: {missing}"
        no_base, differ, off = [], [], []
        for key in keys:
            saved = f.get_tensor(key)
            base = base_of(key)
            if base is None:
                if key not in extras:
                    no_base.append(key)
                continue
            assert saved.shape == base.shape, f"{path.name}: {key} {tuple(saved.shape)} vs base {tuple(base.shape)}"
            if key not in expected:
                if not same_values(saved, base):
                    differ.append(key)
                continue
            exp = expected[key]
            ref, bound = exp.reference(base)
            tol = torch.finfo(saved.dtype).eps * ref.abs() + bound + torch.finfo(saved.dtype).tiny
            err = (saved.to(torch.float64) - ref).abs()
            ratio = float((err / tol).max())
            worst[key] = ratio
            moved = float((saved.to(torch.float64) - base.to(torch.float64)).abs().max())
            if ratio > 1.0 or moved <= 100 * float(tol.max()):
                form = exp.target.form + (f" dora {exp.target.dora}" if exp.target.dora else "")
                off.append(f"{key} ({exp.spec.name} {form}, strength {exp.strength:g}, {saved.dtype}): max err {float(err.max()):.3g} = "
                           f"{ratio:.3g} x tol; moved from base by {moved:.3g}; base->ref max "
                           f"{float((ref - base.to(torch.float64)).abs().max()):.3g}")
    assert not off, f"{path.name}: {len(off)} targeted tensors off the float64 reference:\n" + "\n".join(off)
    assert not no_base, f"{path.name}: {len(no_base)} saved tensors with no base tensor: {no_base[:10]}"
    assert not differ, f"{path.name}: {len(differ)} untargeted tensors differ from the base: {differ[:10]}"
    return worst


@contextlib.contextmanager
def one_torch_thread():
    """Run torch ops on one thread: on a busy 2-core machine, parallel regions wait on descheduled threads and
    comparing a saved checkpoint takes 10x longer than on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- reports


def strict_json(text: str) -> dict:
    """json.loads that refuses NaN / Infinity (what a browser's JSON.parse refuses)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def check_report(report: dict, text: str, spec: AdapterSpec) -> None:
    """The node's report says what the spec wrote: matched layers, blocks, layout, strengths, counts, not-loaded
    text-encoder modules of the model-only node, and no warnings."""
    source = Path(spec.name).name
    loaded = [t for t in spec.targets if spec.loaded(t)]
    skipped = [t for t in spec.targets if not spec.loaded(t)]
    zero = [t for t in loaded if spec.strength(t) == 0.0]
    assert report["family"] == spec.family and report["source"] == source, {k: report.get(k) for k in
                                                                            ("family", "source")}
    summary = {k: report.get(k) for k in ("matched_count", "unmatched_count", "patches_added", "zero_strength",
                                          "unmatched", "problems", "layouts", "loaded_parts")}
    assert report["matched_count"] == len(loaded), (spec.name, summary)
    assert report["unmatched_count"] == len(skipped), (spec.name, summary)
    assert report["patches_added"] == len(loaded) - len(zero), (spec.name, summary)
    assert report["zero_strength"] == len(zero), (spec.name, summary)
    want_problems = [f"{file_module_key(spec.family, spec.layout, t.part, t.dotted)}.alpha: missing (loaders then "
                     f"use scale 1.0)" for t in spec.targets if t.dotted in spec.warned_alpha]
    assert sorted(report["problems"]) == sorted(want_problems), (spec.name, report["problems"])
    assert report["layouts"] == [spec.reported_layout], (spec.name, report["layouts"])
    got = {(m["part"], m["layer"]): m for m in report["matched"]}
    want = {(t.part, t.dotted): t for t in loaded}
    assert set(got) == set(want), (spec.name, sorted(set(got) ^ set(want)))
    for key, m in got.items():
        t = want[key]
        assert m["block"] == expected_block(spec.family, t.part, t.dotted), (spec.name, key, m["block"])
        assert m["algorithm"] == t.form.split("_")[0], (spec.name, key, m["algorithm"])
        assert m["layout"] == spec.reported_layout, (spec.name, key, m["layout"])
        assert m["key"] == file_module_key(spec.family, spec.layout, t.part, t.dotted), (spec.name, m["key"])
    by_block: dict[str, dict[str, int]] = {}
    for t in loaded:
        blocks = by_block.setdefault(t.part, {})
        label = expected_block(spec.family, t.part, t.dotted)
        blocks[label] = blocks.get(label, 0) + 1
    assert report["by_block"] == by_block, (spec.name, report["by_block"], by_block)
    for u in report["unmatched"]:
        assert u["kind"] == "part_not_loaded", (spec.name, u)
    assert {u["key"] for u in report["unmatched"]} == {file_module_key(spec.family, spec.layout, t.part, t.dotted)
                                                       for t in skipped}, (spec.name, report["unmatched"])
    want_strengths = {"model": spec.strength_model} | ({} if spec.model_only else {"clip": spec.strength_clip})
    assert report["strengths"] == want_strengths, (spec.name, report["strengths"])
    assert report["block_weights"] == spec.block_weights, (spec.name, report["block_weights"])
    total = len(spec.targets)
    assert text.startswith(f"{source}: {len(loaded)}/{total} modules applied"), (spec.name, text)
    assert f"patches added: {len(loaded) - len(zero)}" in text, (spec.name, text)
    if spec.block_weights:
        assert f"block weights: {spec.block_weights}" in text, (spec.name, text)
    for t in skipped:
        key = file_module_key(spec.family, spec.layout, t.part, t.dotted)
        assert f"{key}: {t.part} not loaded by this node" in text, (spec.name, key, text)


def layer_shapes_of(unet_layers: Mapping[str, tuple[int, ...]],
                    **te_layers: Mapping[str, tuple[int, ...]]) -> dict[tuple[str, str], tuple[int, ...]]:
    """{(part, dotted): weight shape} from the model files' layer tables (`unet=`, then text encoders by part)."""
    out = {("unet", m): tuple(s) for m, s in unet_layers.items()}
    for part, layers in te_layers.items():
        out |= {(part, m): tuple(s) for m, s in layers.items()}
    return out


def check_disjoint(specs: list[AdapterSpec], shapes: Mapping[tuple[str, str], tuple[int, ...]]) -> None:
    """Test-spec sanity: every target is a layer of the model and no layer is targeted by two files."""
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        for t in spec.targets:
            key = (t.part, t.dotted)
            assert key in shapes, f"test spec {spec.name}: {key} is not a layer of the test model"
            assert key not in seen, f"test spec: {key} in {seen[key]} and {spec.name}"
            seen[key] = spec.name
            assert not (t.form.endswith("tucker") and len(shapes[key]) != 4), f"{key}: Tucker needs a conv"

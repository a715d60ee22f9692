"""Fuzzing the adapter checks: a seeded generator mutates valid SDXL adapter files (dtypes, shapes, offsets, alpha
values, names, truncations, extra and missing tensors, NaN values, DoRA lengths) and an oracle written from the
format rules alone (its own header parser, its own shape rules, numpy for the values; nothing from hadakron.io
or hadakron.ops) says what each file is: unreadable, broken (some module must not be applied), flagged (a warning
is due) or clean. Every file then goes through `inspect` (torch-free), `read_adapter` + the torch describe, and the
loader's report: unreadable files are refused with one error, broken and flagged files never have `problems: []`,
clean files stay clean, the torch and torch-free reports are equal, the loader applies exactly the modules the oracle
allows, and combine refuses the broken ones by name.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from hadakron.commands.inspect import describe, inspect_file
from hadakron.io import AdapterFileError, read_adapter
from hadakron.load_report import build_load_report

SEED = 20261204
FILES = 400

# ---------------------------------------------------------------------------------------------- the format rules
ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "U16": 2, "U32": 4,
        "BOOL": 1, "I8": 1}
FLOATS = {"F64", "F32", "F16", "BF16"}
INTS = {"I64", "I32", "I16", "I8", "U8", "U16", "U32"}
NAMES = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
         "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
         "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"}}

# the layers the files target: kohya module name -> (part, dotted, weight shape), SDXL's real sizes
LAYERS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q", (640, 640)),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": ("unet", "middle_block.1.transformer_blocks.0.attn2.to_k", (1280, 2048)),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "input_blocks.1.0.in_layers.2", (320, 320, 3, 3)),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("te1", "text_model.encoder.layers.0.self_attn.q_proj", (768, 768)),
    "lora_te2_text_model_encoder_layers_3_mlp_fc1": ("te2", "text_model.encoder.layers.3.mlp.fc1", (5120, 1280)),
}


# ---------------------------------------------------------------------------------------------- file building
@dataclass
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    values: np.ndarray  # float64 values (their bytes are made in `dtype` when the file is packed)


@dataclass
class Case:
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    header_edit: object = None  # callable(header dict) -> None, applied to the packed header
    cut: int = 0  # bytes cut off the end
    what: str = "base"


def _encode(t: Tensor) -> bytes:
    v = t.values.reshape(-1)
    if t.dtype == "BF16":
        return (v.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if t.dtype == "BOOL":
        return (v != 0).astype("u1").tobytes()
    np_type = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
               "U8": "u1", "U16": "<u2", "U32": "<u4"}[t.dtype]
    if t.dtype in INTS:
        v = np.nan_to_num(v, nan=0, posinf=0, neginf=0).round()
    return v.astype(np_type).tobytes()


def pack(case: Case) -> bytes:
    """safetensors bytes: 8-byte length, JSON header, packed data (tensor order by name)."""
    header: dict[str, object] = {"__metadata__": case.metadata} if case.metadata else {}
    blobs, offset = [], 0
    for name in sorted(case.tensors):
        t = case.tensors[name]
        blob = _encode(t)
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if case.header_edit is not None:
        case.header_edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = len(raw).to_bytes(8, "little") + raw + b"".join(blobs)
    return data[:len(data) - case.cut] if case.cut else data


# ---------------------------------------------------------------------------------------------- valid modules
def _rand(rng: random.Random, shape) -> np.ndarray:
    return np.random.default_rng(rng.randrange(1 << 30)).standard_normal(shape) * 0.1


def module_loha(rng, key, r, dt):
    out, *rest = LAYERS[key][2]
    cols = math.prod(rest)
    return {f"{key}.hada_w1_a": Tensor(dt, (out, r), _rand(rng, (out, r))),
            f"{key}.hada_w1_b": Tensor(dt, (r, cols), _rand(rng, (r, cols))),
            f"{key}.hada_w2_a": Tensor(dt, (out, r), _rand(rng, (out, r))),
            f"{key}.hada_w2_b": Tensor(dt, (r, cols), _rand(rng, (r, cols))),
            f"{key}.alpha": Tensor("F32", (), np.array(float(r)))}


def module_loha_tucker(rng, key, r, dt):
    out, inn, kh, kw = LAYERS[key][2]
    t = {}
    for i in (1, 2):
        t[f"{key}.hada_w{i}_a"] = Tensor(dt, (r, out), _rand(rng, (r, out)))
        t[f"{key}.hada_w{i}_b"] = Tensor(dt, (r, inn), _rand(rng, (r, inn)))
        t[f"{key}.hada_t{i}"] = Tensor(dt, (r, r, kh, kw), _rand(rng, (r, r, kh, kw)))
    t[f"{key}.alpha"] = Tensor("F32", (), np.array(float(r) / 2))
    return t


def module_lokr(rng, key, r, dt):
    out, *rest = LAYERS[key][2]
    cols = math.prod(rest)
    a, c = 8, 8
    return {f"{key}.lokr_w1": Tensor(dt, (a, c), _rand(rng, (a, c))),
            f"{key}.lokr_w2_a": Tensor(dt, (out // a, r), _rand(rng, (out // a, r))),
            f"{key}.lokr_w2_b": Tensor(dt, (r, cols // c), _rand(rng, (r, cols // c))),
            f"{key}.alpha": Tensor("F32", (), np.array(float(r)))}


def module_lokr_full(rng, key, r, dt):
    out, *rest = LAYERS[key][2]
    cols = math.prod(rest)
    return {f"{key}.lokr_w1": Tensor(dt, (8, 8), _rand(rng, (8, 8))),
            f"{key}.lokr_w2": Tensor(dt, (out // 8, cols // 8), _rand(rng, (out // 8, cols // 8))),
            f"{key}.alpha": Tensor("F32", (), np.array(1.0))}


def module_lora(rng, key, r, dt):
    shape = LAYERS[key][2]
    out, inn = shape[0], shape[1]
    t = {f"{key}.alpha": Tensor("F32", (), np.array(float(r)))}
    if len(shape) == 4:  # conv LoRA with a mid: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1)
        t[f"{key}.lora_up.weight"] = Tensor(dt, (out, r, 1, 1), _rand(rng, (out, r, 1, 1)))
        t[f"{key}.lora_mid.weight"] = Tensor(dt, (r, r, *shape[2:]), _rand(rng, (r, r, *shape[2:])))
        t[f"{key}.lora_down.weight"] = Tensor(dt, (r, inn, 1, 1), _rand(rng, (r, inn, 1, 1)))
        return t
    t[f"{key}.lora_up.weight"] = Tensor(dt, (out, r), _rand(rng, (out, r)))
    t[f"{key}.lora_down.weight"] = Tensor(dt, (r, inn), _rand(rng, (r, inn)))
    if rng.random() < 0.4:  # DoRA, row-wise or column-wise
        ds = (out, 1) if rng.random() < 0.5 else (1, inn)
        t[f"{key}.dora_scale"] = Tensor(dt, ds, 1 + _rand(rng, ds))
    return t


BUILDERS = {"loha": module_loha, "lokr": module_lokr, "lokr_full": module_lokr_full, "lora": module_lora}


def base_case(rng: random.Random) -> Case:
    dt = rng.choice(["F32", "F16", "BF16"])
    tensors: dict[str, Tensor] = {}
    for key in rng.sample(sorted(LAYERS), rng.randint(2, 4)):
        kind = rng.choice(sorted(BUILDERS))
        builder = module_loha_tucker if (len(LAYERS[key][2]) == 4 and kind in ("loha", "lokr_full")) else BUILDERS[kind]
        if len(LAYERS[key][2]) == 4 and kind == "lokr":
            builder = module_lokr  # conv LoKr: flat w2_b (r, in*9 / 8)
        tensors |= builder(rng, key, rng.randint(1, 4), dt)
    return Case(tensors)


# ---------------------------------------------------------------------------------------------- mutations
def _pick(rng, case: Case, param_filter=lambda p: True) -> str | None:
    keys = [k for k in sorted(case.tensors) if param_filter(k.rsplit(".", 2)[-1] if "lora_" not in k else k)]
    return rng.choice(keys) if keys else None


def _is_factor(key: str) -> bool:
    return not key.endswith((".alpha", ".dora_scale"))


def m_dtype(rng, c):
    k = _pick(rng, c, lambda p: True)
    t = c.tensors[k]
    t.dtype = rng.choice(sorted(INTS | {"BOOL", "F64"}))
    c.what = f"dtype {k} -> {t.dtype}"


def m_shape(rng, c):
    k = _pick(rng, c, lambda p: True)
    t = c.tensors[k]
    shape = list(t.shape) or [1]
    axis = rng.randrange(len(shape))
    shape[axis] = max(1, shape[axis] + rng.choice([-2, -1, 1, 3]))
    if rng.random() < 0.2:
        shape.append(rng.choice([1, 2]))  # an extra dimension
    t.shape = tuple(shape)
    t.values = _rand(rng, t.shape)
    c.what = f"shape {k} -> {t.shape}"


def m_rank(rng, c):
    """Change one module's rank consistently: still valid."""
    module = rng.choice(sorted({k.rsplit(".", 1)[0].removesuffix(".lora_up").removesuffix(".lora_down")
                                .removesuffix(".lora_mid") for k in c.tensors}))
    names = {k: t for k, t in c.tensors.items() if k.startswith(module + ".")}
    if any(k.endswith(("lokr_w2", "hada_t1", "lora_mid.weight", "dora_scale")) for k in names):
        c.what = "rank (no change: full or Tucker)"
        return
    r = rng.randint(1, 6)
    for k, t in names.items():
        p = k[len(module) + 1:]
        if p in ("hada_w1_a", "hada_w2_a", "lokr_w2_a", "lora_up.weight"):
            t.shape = (t.shape[0], r)
        elif p in ("hada_w1_b", "hada_w2_b", "lokr_w2_b", "lora_down.weight"):
            t.shape = (r, t.shape[1])
        else:
            continue
        t.values = _rand(rng, t.shape)
    c.what = f"rank {module} -> {r}"


def m_offsets(rng, c):
    def edit(header):
        names = [n for n in header if n != "__metadata__"]
        a = rng.choice(names)
        kind = rng.choice(["shift", "swap", "grow", "negative"])
        if kind == "swap" and len(names) > 1:
            b = rng.choice([n for n in names if n != a])
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        elif kind == "grow":
            header[a]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][1] + 8]
        elif kind == "negative":
            header[a]["data_offsets"] = [-1, header[a]["data_offsets"][1]]
        else:
            s, e = header[a]["data_offsets"]
            header[a]["data_offsets"] = [s + 2, e + 2]
    c.header_edit = edit
    c.what = "offsets"


def m_alpha(rng, c):
    k = _pick(rng, c, lambda p: p == "alpha")
    if k is None:
        return m_dtype(rng, c)
    v = rng.choice([-1.0, -0.5, 0.0, -0.0, float("nan"), float("inf"), 2.0, 16.0, "vector", "int"])
    t = c.tensors[k]
    if v == "vector":
        t.shape, t.values = (2,), np.array([1.0, 1.0])
    elif v == "int":
        t.dtype, t.values = "I64", np.array(4.0)
    else:
        t.values = np.array(v)
    c.what = f"alpha {k} = {v}"


def m_name(rng, c):
    k = _pick(rng, c)
    t = c.tensors.pop(k)
    module, _, param = k.rpartition(".")
    if "lora_" in k:
        module, param = k.rsplit(".", 2)[0], ".".join(k.rsplit(".", 2)[1:])
    kind = rng.choice(["param", "module", "nodot"])
    new = {"param": f"{module}.{param}x", "module": f"lora_unet_nonexistent_block_{rng.randrange(9)}.{param}",
           "nodot": module.replace(".", "_") + param}[kind]
    c.tensors[new] = t
    c.what = f"rename {k} -> {new}"


def m_truncate(rng, c):
    c.cut = rng.randint(1, 64)
    c.what = f"truncate {c.cut}"


def m_extra(rng, c):
    kind = rng.choice(["unknown", "module", "dora_bad", "dora_ok"])
    module = rng.choice(sorted({k.split(".")[0] for k in c.tensors}))
    out = LAYERS.get(module, (None, None, (7, 7)))[2]
    if kind == "unknown":
        c.tensors[f"{module}.hada_w3_a"] = Tensor("F32", (3, 2), _rand(rng, (3, 2)))
    elif kind == "module":
        free = [k for k in sorted(LAYERS) if not any(t.startswith(k + ".") for t in c.tensors)]
        if free:
            c.tensors |= module_loha(rng, free[0], 2, "F32") if len(LAYERS[free[0]][2]) == 2 else \
                module_loha_tucker(rng, free[0], 2, "F32")
    elif kind == "dora_bad":
        c.tensors[f"{module}.dora_scale"] = Tensor("F32", (out[0] + 1, 1), 1 + _rand(rng, (out[0] + 1, 1)))
    else:
        c.tensors[f"{module}.dora_scale"] = Tensor("F32", (out[0], 1), 1 + _rand(rng, (out[0], 1)))
    c.what = f"extra {kind} in {module}"


def m_missing(rng, c):
    k = _pick(rng, c)
    del c.tensors[k]
    c.what = f"missing {k}"


def m_nan(rng, c):
    k = _pick(rng, c, lambda p: True)
    t = c.tensors[k]
    if t.dtype not in FLOATS or not t.values.size:
        return m_missing(rng, c)
    flat = t.values.reshape(-1).copy()
    flat[rng.randrange(flat.size)] = rng.choice([float("nan"), float("inf"), -float("inf")])
    t.values = flat.reshape(t.values.shape)
    c.what = f"non-finite in {k}"


def m_lora_dims(rng, c):
    ups = [k for k in c.tensors if k.endswith("lora_up.weight")]
    if not ups:
        return m_shape(rng, c)
    k = rng.choice(sorted(ups))
    t = c.tensors[k]
    t.shape = (t.shape[0], t.shape[1], 2)
    t.values = _rand(rng, t.shape)
    c.what = f"3-D {k}"


def m_metadata_dim(rng, c):
    c.metadata = {"ss_network_dim": str(rng.choice([1, 8, 32]))}
    c.what = f"metadata dim {c.metadata['ss_network_dim']}"


MUTATIONS = [m_dtype, m_shape, m_rank, m_offsets, m_alpha, m_alpha, m_name, m_truncate, m_extra, m_missing,
             m_nan, m_lora_dims, m_metadata_dim, None]


# ---------------------------------------------------------------------------------------------- the oracle
@dataclass
class Verdict:
    kind: str  # unreadable | broken | flagged | clean
    apply: set[str] = field(default_factory=set)  # module keys the LoHa/LoKr loader must apply
    refuse: set[str] = field(default_factory=set)  # modules broken in themselves (combine must refuse them)
    why: list[str] = field(default_factory=list)


def parse(raw: bytes):
    """The header and tensors per the safetensors rules, or None when the file breaks one."""
    if len(raw) < 8:
        return None
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or 8 + n > len(raw):
        return None
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return None
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    spans = []
    for name, info in header.items():
        s, e = info["data_offsets"]
        if not (0 <= s <= e <= len(data)) or e - s != math.prod(info["shape"]) * ITEM[info["dtype"]]:
            return None
        spans.append((s, e))
    spans.sort()
    pos = 0
    for s, e in spans:
        if s != pos:
            return None
        pos = e
    if pos != len(data):
        return None
    tensors = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        tensors[name] = (info["dtype"], tuple(info["shape"]), _decode(info["dtype"], data[s:e]))
    return meta, tensors


def _decode(dtype: str, b: bytes) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(b, "<u2").astype("<u4") << 16).view("<f4").astype(np.float64)
    if dtype == "BOOL":
        return np.frombuffer(b, "u1").astype(np.float64)
    np_type = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
               "U8": "u1", "U16": "<u2", "U32": "<u4"}[dtype]
    return np.frombuffer(b, np_type).astype(np.float64)


def _split(key: str) -> tuple[str, str]:
    for p in ("lora_up.weight", "lora_down.weight", "lora_mid.weight"):
        if key.endswith("." + p):
            return key[:-len(p) - 1], p
    module, dot, param = key.rpartition(".")
    return (module, param) if dot else (key, "")


def delta_shape(algo: str, s: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """(out, in*k) a module's factors multiply out to, from the format's shape rules; None when they do not."""
    def mat(a, b):  # a (rows, r) @ b (r, cols...) -> (rows, prod(cols...))
        if len(a) != 2 or len(b) not in (2, 4) or a[1] != b[0]:
            return None
        return (a[0], math.prod(b[1:]))

    def tucker(t, a, b):  # core (r1, r2, kh, kw), a (r1, rows), b (r2, cols)
        if len(t) != 4 or len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
            return None
        return (a[1], b[1] * t[2] * t[3])

    try:
        if algo == "loha":
            if "hada_t1" in s or "hada_t2" in s:
                d1 = tucker(s["hada_t1"], s["hada_w1_a"], s["hada_w1_b"])
                d2 = tucker(s["hada_t2"], s["hada_w2_a"], s["hada_w2_b"])
            else:
                d1, d2 = mat(s["hada_w1_a"], s["hada_w1_b"]), mat(s["hada_w2_a"], s["hada_w2_b"])
            return d1 if d1 is not None and d1 == d2 else None
        if algo == "lokr":
            w1 = s["lokr_w1"] if "lokr_w1" in s else None
            if w1 is None or len(w1) != 2 or any(n in s for n in ("lokr_w1_a", "lokr_w1_b", "lokr_t2")):
                return None
            if "lokr_w2" in s:  # 2-D, or with a kernel of 1 to 3 dims (LyCORIS conv1d/2d/3d)
                if any(n in s for n in ("lokr_w2_a", "lokr_w2_b")) or len(s["lokr_w2"]) not in (2, 3, 4, 5):
                    return None
                w2 = (s["lokr_w2"][0], math.prod(s["lokr_w2"][1:]))
            else:
                w2 = mat(s["lokr_w2_a"], s["lokr_w2_b"])
            return None if w2 is None else (w1[0] * w2[0], w1[1] * w2[1])
        up, down = s["lora_up.weight"], s["lora_down.weight"]
        if len(up) not in (2, 4) or len(down) not in (2, 4) or any(d != 1 for d in up[2:]):
            return None
        if "lora_mid.weight" in s:
            mid = s["lora_mid.weight"]
            if len(mid) != 4 or any(d != 1 for d in down[2:]) or up[1] != mid[0] or mid[1] != down[0]:
                return None
            return (up[0], down[1] * mid[2] * mid[3])
        return mat(up[:2], down)
    except KeyError:
        return None


def judge(raw: bytes) -> Verdict:
    parsed = parse(raw)
    if parsed is None:
        return Verdict("unreadable")
    meta, tensors = parsed
    modules: dict[str, dict[str, tuple]] = {}
    for key, t in tensors.items():
        module, param = _split(key)
        modules.setdefault(module, {})[param] = t
    v = Verdict("clean")
    flag = v.why.append
    dims = [int(meta["ss_network_dim"])] if "ss_network_dim" in meta else []
    for module, params in modules.items():
        algos = {a for a, names in NAMES.items() if names & params.keys()}
        unknown = [p for p in params if p not in {"alpha", "dora_scale"} and not any(p in n for n in NAMES.values())]
        if module not in LAYERS:
            flag(f"{module}: not a known layer")
        if unknown or len(algos) != 1:
            flag(f"{module}: unknown names {unknown} / algorithms {algos}")
            if len(algos) > 1 or (unknown and algos):
                v.refuse.add(module)
            continue
        algo = algos.pop()
        shapes = {p: t[1] for p, t in params.items()}
        bad = [p for p, (dt, _, _) in params.items() if dt not in (FLOATS | INTS if p == "alpha" else FLOATS)]
        delta = delta_shape(algo, shapes)
        both_full = algo == "lokr" and "lokr_w1" in params and "lokr_w2" in params
        broken = bool(bad) or delta is None
        layer = LAYERS.get(module, (None, None, None))[2]
        if "alpha" in params:
            dt, shape, val = params["alpha"]
            if math.prod(shape) != 1:
                broken = True
            elif not math.isfinite(val[0]):
                flag(f"{module}: alpha not finite")
            elif val[0] < 0 and not both_full:
                broken = True
            elif val[0] <= 0:
                flag(f"{module}: alpha {val[0]}")
            elif both_full and dims and val[0] not in dims:
                flag(f"{module}: both-full alpha {val[0]} vs dim {dims}")
        elif not both_full:
            flag(f"{module}: alpha missing")
        if "dora_scale" in params and delta is not None:
            ds = params["dora_scale"][1]
            n = math.prod(ds)
            weight = layer or delta
            if not ((ds and ds[0] == weight[0] and n == weight[0]) or n == weight[1]):
                broken = True
        if broken:
            v.refuse.add(module)
            continue
        fits = layer is not None and delta == (layer[0], math.prod(layer[1:]))
        if layer is not None and not fits:
            flag(f"{module}: delta {delta} does not fit {layer}")
            continue
        nonfinite = [p for p, (dt, _, val) in params.items()
                     if dt in FLOATS and (p != "alpha" or not both_full) and not np.isfinite(val).all()]
        if nonfinite:
            flag(f"{module}: non-finite {nonfinite}")
            continue
        if algo in ("loha", "lokr") and layer is not None:
            v.apply.add(module)
    if v.refuse:
        v.kind = "broken"
    elif v.why:
        v.kind = "flagged"
    return v


# ---------------------------------------------------------------------------------------------- the run
def cases(seed: int, n: int):
    rng = random.Random(seed)
    for i in range(n):
        case = base_case(rng)
        mutation = MUTATIONS[i % len(MUTATIONS)] if i >= 10 else None  # the first ten stay valid
        if mutation is not None:
            mutation(rng, case)
        yield i, case


def model_shapes() -> dict[tuple[str, str], tuple[int, ...]]:
    return {(part, dotted): shape for part, dotted, shape in LAYERS.values()}


def test_fuzzed_adapter_files(tmp_path, capsys):
    from hadakron.merge import combine

    outcomes = {"refused": 0, "flagged": 0, "clean": 0}
    oracle_counts = {"unreadable": 0, "broken": 0, "flagged": 0, "clean": 0}
    for i, case in cases(SEED, FILES):
        raw = pack(case)
        path = tmp_path / f"fuzz_{i:03d}.safetensors"
        path.write_bytes(raw)
        verdict = judge(raw)
        oracle_counts[verdict.kind] += 1
        label = f"file {i} ({case.what}): oracle {verdict.kind} {verdict.why[:3]}"
        try:
            report = inspect_file(path)
        except AdapterFileError as exc:
            assert verdict.kind == "unreadable", f"{label}: refused: {exc}"
            with pytest.raises(AdapterFileError):
                read_adapter(path)
            outcomes["refused"] += 1
            continue
        assert verdict.kind != "unreadable", f"{label}: read, expected a refusal"
        problems = report["problems"]
        if verdict.kind == "clean":
            assert problems == [], f"{label}: clean file has problems {problems}"
        else:
            assert problems, f"{label}: problems: [] for a {verdict.kind} file"
        outcomes["flagged" if problems else "clean"] += 1
        adapter = read_adapter(path)
        assert describe(adapter) == report, f"{label}: torch and torch-free reports differ"
        load = build_load_report(adapter.modules, adapter.metadata, "sdxl", model_shapes(), problems=adapter.problems,
                                 nonfinite=adapter.nonfinite_tensors())
        applied = {m.module_key for m in load.matched}
        assert applied == verdict.apply, f"{label}: loader applied {sorted(applied)}, oracle {sorted(verdict.apply)}"
        for u in load.unmatched:  # a broken LoHa/LoKr module of a known layer is named as refused
            if u.key in verdict.refuse and u.kind not in ("unsupported_algorithm", "unknown_module"):
                assert u.kind in ("bad_tensors", "shape_mismatch") and u.reason, f"{label}: {u}"
        if verdict.refuse:
            with pytest.raises(ValueError, match="refused"):
                combine([(adapter, 1.0)])
    print(f"\nfuzz: {FILES} files (seed {SEED}): refused {outcomes['refused']}, flagged {outcomes['flagged']}, "
          f"clean {outcomes['clean']}; oracle: {oracle_counts}")
    with capsys.disabled():
        print(f"fuzz outcome: {FILES} files, refused {outcomes['refused']} / flagged {outcomes['flagged']} / "
              f"clean {outcomes['clean']} (oracle {oracle_counts})")
    assert outcomes["refused"] and outcomes["flagged"] and outcomes["clean"]

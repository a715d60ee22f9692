"""`hadakron inspect FILE [--json]`: what an adapter file holds and everything wrong with it.

The JSON form is a stable contract: `file`, `size_bytes`, `family`, `layout`, `modules`, `parts`,
`algorithms`, `ranks`, `factors`, `tucker`, `dora`, `params`, `dtypes`, `metadata`, `problems`
(plus `unmatched_modules` and `detection`).

No torch: the header is read by hand (`io.safetensors_header`), the checks run on (dtype, shape) specs
(`io.module_specs`, the same checks `read_adapter` runs on loaded tensors), alpha values are decoded from their
bytes and the NaN/Inf scan memory-maps the file with numpy (`io.header_values`). Only a PEFT adapter whose
`adapter_config.json` (or embedded config) sets its scale goes through `read_adapter` (torch), which applies it.
"""
from __future__ import annotations

import argparse
import gc
import json
import operator
from collections import Counter
from pathlib import Path
from typing import Mapping

from hadakron.io import module_specs
from hadakron.io.module_specs import Specs, TensorSpec, algorithm_guess
from hadakron.io.safetensors_header import TORCH_NAMES
from hadakron.ops import shape_rules

PARTS = ("unet", "te1", "te2", "te")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `inspect` subcommand."""
    p = subparsers.add_parser("inspect", help="show what an adapter file holds and what is wrong with it",
                              description="Show family, layout, algorithms, module counts, ranks, factors, "
                                          "dtypes, metadata and every problem found in an adapter file.")
    p.add_argument("file", help="adapter file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (stable field names)")
    p.add_argument("--all-metadata", action="store_true", help="list every metadata key in the table")
    p.add_argument("--blocks", action="store_true",
                   help="also show where the adapter acts: ||alpha/rank * dW||_F per block as text bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Read the file, print the report; 0 when it could be read (problems are reported, not fatal)."""
    collecting = gc.isenabled()
    gc.disable()  # a short run that makes tens of thousands of small objects and little cyclic garbage
    try:
        return _run(args)
    finally:
        if collecting:
            gc.enable()


def _run(args: argparse.Namespace) -> int:
    report = inspect_file(args.file)
    blocks = None
    if args.blocks:
        from hadakron.commands import inspect_blocks
        blocks = inspect_blocks.file_cells(args.file)
    if args.json:
        if blocks is not None:
            report["blocks"] = [c.to_dict() for c in blocks[1]]
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report, all_metadata=args.all_metadata))
        if blocks is not None:
            print("\n".join(inspect_blocks.block_lines(*blocks)))
    return 0


# ------------------------------------------------------------------ reading (no torch)


def _has_peft_config(path: Path, metadata: Mapping[str, str]) -> bool:
    """A PEFT config beside the file or embedded in it (`io.peft_config` applies it, with torch)."""
    return bool(metadata.get("lora_adapter_metadata")) or (path.parent / "adapter_config.json").is_file()


def inspect_file(path: str | Path) -> dict:
    """The inspect report of a file, read without torch (the same report as `describe(read_adapter(path))`)."""
    from hadakron.io import header_values
    from hadakron.io.safetensors_header import read_header

    path = Path(path)
    header = read_header(path)
    module_specs.require_adapter_keys(path, [e.name for e in header.entries])
    if _has_peft_config(path, header.metadata):
        from hadakron.io import read_adapter
        return describe(read_adapter(path))
    scan = header_values.start_nonfinite_counts(path, header)  # numpy scans the data while the checks below run
    try:
        tensors, modules = _file_specs(path, header)
        problems: list[str] = []
        clean: set[tuple] = set()  # modules whose specs were found clean: the checks depend on the specs alone
        for module, specs in modules.items():
            kind = (*specs, *map(id, specs.values()))  # specs are shared (`_file_specs`): the same objects, the same kind
            if kind in clean:
                continue
            found = module_specs.module_problems(module, specs)
            if found:
                problems += found
            else:
                clean.add(kind)
        warning = module_specs.both_full_alpha_warning(modules, header.metadata)
        if warning:
            problems.append(warning)
        report = describe_specs(path, path.stat().st_size, tensors, modules, header.metadata, [])
    except BaseException:
        try:
            scan()  # the scan's thread and file are done with before the error goes on
        except BaseException:
            pass
        raise
    counts = scan()
    nonfinite: dict[str, dict[str, tuple[int, int]]] = {}
    for key in [k for k in tensors if k in counts] if counts else ():
        module, param = module_specs.split_key(key)
        nonfinite.setdefault(module, {})[param] = counts[key]
    # the file's problems first (NaN/Inf, module checks, alpha warning), then describe_specs' own, as describe lists them
    report["problems"] = module_specs.nonfinite_problems(modules, nonfinite) + problems + report["problems"]
    return report


def _file_specs(path: Path, header) -> tuple[dict[str, TensorSpec], dict[str, dict[str, TensorSpec]]]:
    """({key: spec}, {module: {param: spec}}) of a file's entries in key order (what `group_modules` makes of the
    specs), each key split once; tensors alike (dtype, shape, alpha value) share one frozen spec."""
    from hadakron.io import header_values

    split = module_specs.split_key
    shared: dict[tuple, TensorSpec] = {}
    tensors: dict[str, TensorSpec] = {}
    modules: dict[str, dict[str, TensorSpec]] = {}
    alphas = []
    for e in sorted(header.entries, key=_NAME):
        module, param = split(e.name)
        kind = (e.dtype, e.shape)
        spec = shared.get(kind)
        if spec is None:
            spec = shared[kind] = TensorSpec(e.dtype, e.shape, None)
        tensors[e.name] = spec
        params = modules.get(module)
        if params is None:
            modules[module] = {param: spec}
        else:
            params[param] = spec
        if param == "alpha":
            alphas.append((e, module))
    values = header_values.read_scalars(path, header, [e for e, _ in alphas])
    for e, module in alphas:
        if e.name in values:
            kind = (e.dtype, e.shape, values[e.name])
            spec = shared.get(kind)
            if spec is None:
                spec = shared[kind] = TensorSpec(*kind)
            tensors[e.name] = modules[module]["alpha"] = spec
    return tensors, modules


_NAME = operator.attrgetter("name")
_SHAPE = operator.attrgetter("shape")


def describe(adapter) -> dict:
    """The inspect report of an `AdapterFile` already read with torch (`read_adapter`, or one in memory)."""
    from hadakron.io.module_checks import spec_of

    tensors = {k: spec_of(t) for k, t in adapter.tensors.items()}
    modules = {m: {p: spec_of(t) for p, t in params.items()} for m, params in adapter.modules.items()}
    return describe_specs(adapter.path, adapter.size_bytes, tensors, modules, adapter.metadata, adapter.problems)


# ------------------------------------------------------------------ family / layout detection


def detect_layout(keys: list[str], module_keys: list[str]) -> dict:
    """{family, layout, parts: {part: count}, unmatched: [module_key], reasons: [str]} from `hadakron.arch`."""
    from hadakron.arch.detect import detect_family  # the family tables: built while the value scan runs

    result = detect_family(keys)
    parts: Counter[str] = Counter(part for part, _ in result.modules.values())
    unmatched = [mk for mk in module_keys if mk not in result.modules]
    return {"family": result.family, "layout": result.layout, "parts": dict(parts), "matched": result.modules,
            "unmatched": unmatched, "reasons": [str(r) for r in result.reasons]}


def layer_shape_problems(modules: Mapping[str, Specs], family: str | None,
                         matched: Mapping[str, tuple[str, str]]) -> list[str]:
    """Modules whose delta-W does not fit the family's layer (an adapter for another model, or a bad file)."""
    if family is None:
        return []
    from hadakron.arch.anima import MODEL_CHANNELS, anima_family
    from hadakron.arch.layouts import get_family

    fam = get_family(family)
    width = anima_file_width(modules, matched) if fam.name == "anima" else None
    if width is not None and width != MODEL_CHANNELS:  # a file for a narrower or wider DiT: checked at its width
        fam = anima_family(model_channels=width)
    problems = []
    layer_shapes = {part: fam.layer_shapes(part) for part in fam.parts}  # stacked blocks past these: fam.layer
    flats: dict[tuple, tuple[int, int] | None] = {}  # delta-W shape per kind of module (shapes alike: same result)
    for mk, (part, dotted) in matched.items():
        specs = modules.get(mk)
        layer = layer_shapes[part].get(dotted) if part in layer_shapes else fam.layer_shapes(part).get(dotted)
        if layer is None and part in fam.stacks:  # an Anima block past the default 28: block 0's shape
            known = fam.layer(part, dotted)
            layer = known.shape if known is not None else None
        if specs is None or layer is None:
            continue
        kind = (*specs, *map(_SHAPE, specs.values()))  # names, then shapes
        if kind in flats:
            flat = flats[kind]
        else:
            try:
                flat = flats[kind] = shape_rules.delta_flat(module_specs.shapes(specs))
            except ValueError:
                flat = flats[kind] = None
        if flat is None:
            continue  # already reported as a module problem
        want_cols = 1
        for d in layer[1:]:
            want_cols *= d
        if flat != (layer[0], want_cols):
            problems.append(f"{mk}: delta-W is {flat[0]}x{flat[1]} but {fam.title} {part} layer {dotted} is "
                            f"{'x'.join(map(str, layer))} ({layer[0]}x{want_cols} flattened)")
    return problems


# Layers of an Anima block whose out dim is the DiT width (attention projections, mlp.layer2).
_WIDTH_LAYERS = frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
                           "cross_attn.q_proj", "cross_attn.output_proj", "mlp.layer2"})


def anima_file_width(modules: Mapping[str, Specs], matched: Mapping[str, tuple[str, str]]) -> int | None:
    """The DiT width an Anima file was made for: the most common delta-W out dim of its block layers whose out dim is
    the width (no model is at hand to say it); None when the file has none of them."""
    from hadakron.arch.anima import ANIMA

    outs: Counter[int] = Counter()
    for mk, (part, dotted) in matched.items():
        hit = ANIMA.stack_index(part, dotted) if part == "unet" else None
        if hit is None or hit[1] not in _WIDTH_LAYERS or mk not in modules:
            continue
        try:
            outs[shape_rules.delta_flat(module_specs.shapes(modules[mk]))[0]] += 1
        except ValueError:
            continue  # reported as a module problem
    return outs.most_common(1)[0][0] if outs else None


# ------------------------------------------------------------------ per-module facts


def _module_rank(algo: str | None, specs: Specs) -> int | None:
    """The rank the scale divides by (`shape_rules.module_rank`); None for full LoKr or broken modules."""
    if algo not in ("loha", "lokr", "lora"):
        return None
    try:
        return shape_rules.module_rank(module_specs.shapes(specs))
    except (KeyError, ValueError, IndexError):
        return None  # already reported as a module problem


def _lokr_w1_shape(specs: Specs) -> str | None:
    if "lokr_w1" in specs:
        return "x".join(str(d) for d in specs["lokr_w1"].shape)
    if "lokr_w1_a" in specs and "lokr_w1_b" in specs:
        a, b = specs["lokr_w1_a"].shape, specs["lokr_w1_b"].shape
        if a and b:
            return f"{a[0]}x{b[-1]}"
    return None


def _module_facts(specs: Specs) -> tuple[str | None, int | None, str | None, bool, bool]:
    """(algorithm, rank, LoKr w1 shape, Tucker, DoRA) of one module, from its parameter names and shapes."""
    algo = algorithm_guess({p: None for p in specs if p not in ("alpha", "dora_scale")})
    return (algo, _module_rank(algo, specs), _lokr_w1_shape(specs) if algo == "lokr" else None,
            any(p in specs for p in ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2", "lora_mid.weight")),
            "dora_scale" in specs)


def _sorted_hist(counter: Counter) -> dict[str, int]:
    def order(k):
        return (0, int(k)) if str(k).isdigit() else (1, str(k))
    return {str(k): counter[k] for k in sorted(counter, key=order)}


def describe_specs(path: Path | None, size_bytes: int, tensors: Mapping[str, TensorSpec],
                   modules: Mapping[str, Specs], metadata: Mapping[str, str], file_problems: list[str]) -> dict:
    """The inspect report (the JSON contract) from the file's tensor specs, grouped modules, metadata and the
    problems the module checks found."""
    module_keys = list(modules)
    detection = detect_layout(list(tensors), module_keys)
    algorithms: Counter[str] = Counter()
    ranks: Counter = Counter()
    factors: Counter[str] = Counter()
    tucker = dora = 0
    kinds: dict[tuple, list] = {}  # kind of module (names and shapes alike: the same facts) -> [specs, modules]
    for specs in modules.values():
        kind = (*specs, *map(_SHAPE, specs.values()))  # names, then shapes
        seen = kinds.get(kind)
        if seen is None:
            kinds[kind] = [specs, 1]
        else:
            seen[1] += 1
    for specs, n in kinds.values():  # kinds in first-module order: the counters fill in the same order
        algo, rank, w1, is_tucker, has_dora = _module_facts(specs)
        algorithms[algo or "unknown"] += n
        ranks[rank if rank is not None else ("full" if algo == "lokr" else "none")] += n
        if w1:
            factors[w1] += n
        tucker += is_tucker * n
        dora += has_dora * n
    dtypes: Counter[str] = Counter()
    params = 0
    specs_by_id = dict(zip(map(id, tensors.values()), tensors.values()))
    for spec_id, n in Counter(map(id, tensors.values())).items():  # per spec object (tensors alike share one)
        spec = specs_by_id[spec_id]
        dtypes[TORCH_NAMES.get(spec.dtype, spec.dtype)] += n
        params += spec.numel * n
    problems = list(file_problems)
    problems += layer_shape_problems(modules, detection["family"], detection["matched"])
    if detection["unmatched"]:
        shown = ", ".join(detection["unmatched"][:5])
        more = f" and {len(detection['unmatched']) - 5} more" if len(detection["unmatched"]) > 5 else ""
        problems.append(f"{len(detection['unmatched'])} module keys match no known layer of "
                        f"{detection['family'] or 'any family'}: {shown}{more}")
    if detection["family"] is None:
        problems.append("model family not recognised (expected SDXL or Anima module names)")
    return {
        "file": str(path),
        "size_bytes": size_bytes,
        "family": detection["family"],
        "layout": detection["layout"],
        "modules": len(module_keys),
        "parts": {p: detection["parts"][p] for p in PARTS if detection["parts"].get(p)}
                 | {p: n for p, n in detection["parts"].items() if p not in PARTS},
        "unmatched_modules": len(detection["unmatched"]),
        "algorithms": dict(algorithms.most_common()),
        "ranks": _sorted_hist(ranks),
        "factors": _sorted_hist(factors),
        "tucker": tucker,
        "dora": dora,
        "params": params,
        "tensors": len(tensors),
        "dtypes": dict(dtypes.most_common()),
        "metadata": dict(metadata),
        "problems": problems,
        "detection": detection["reasons"],
    }


# ------------------------------------------------------------------ text form


def _counts(d: Mapping[str, int], sep: str = " ") -> str:
    return ", ".join(f"{k}{sep}{v}" for k, v in d.items()) or "-"


METADATA_SHOWN = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_output_name", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_training_finished_at",
    "modelspec.architecture", "modelspec.title", "modelspec.date", "sshs_model_hash", "sshs_legacy_hash",
)
"""Metadata keys the table shows by default (plus every `hadakron.*` key)."""


def format_report(r: Mapping, *, all_metadata: bool = False) -> str:
    """A compact two-column table of the report; only the common metadata keys unless `all_metadata`."""
    from hadakron.commands.common import human_size  # (it imports the family tables: only for the table)

    rows = [
        ("file", f"{r['file']} ({human_size(r['size_bytes'])})"),
        ("family", f"{r['family'] or 'unknown'}   layout {r['layout'] or 'unknown'}"),
        ("modules", f"{r['modules']}   " + _counts(r["parts"])),
        ("algorithms", _counts(r["algorithms"])),
        ("ranks", _counts(r["ranks"], ": ") + "   (rank: modules)"),
        ("LoKr w1", _counts(r["factors"], ": ") + ("   (shape: modules)" if r["factors"] else "")),
        ("tucker/dora", f"{r['tucker']} / {r['dora']} modules"),
        ("params", f"{r['params']:,} in {r['tensors']} tensors   " + _counts(r["dtypes"])),
    ]
    meta = r["metadata"]
    shown = [k for k in METADATA_SHOWN if k in meta] + sorted(k for k in meta if k.startswith("hadakron."))
    if all_metadata:
        shown += sorted(k for k in meta if k not in shown)
    hidden = len(meta) - len(shown)
    rows.append(("metadata", (f"{len(meta)} keys" + (f" ({hidden} not shown: --all-metadata or --json)" if hidden else ""))
                 if meta else "none"))
    for k in shown:
        v = " ".join(meta[k].split())
        rows.append(("", f"{k} = {v[:70] + '...' if len(v) > 73 else v}"))
    rows.append(("problems", str(len(r["problems"])) if r["problems"] else "none"))
    rows += [("", p) for p in r["problems"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)

"""example_workflows/*.json against the real node definitions: every node type exists, widget values line up
with the node's widget inputs, and every link joins an output to an input of the same type."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def classes(comfy_env, pack):
    import nodes as core  # ComfyUI's nodes.py (conftest put COMFYUI_PATH first)
    from comfy_extras.nodes_model_merging import CheckpointSave

    ours = importlib.import_module(pack.__name__ + ".nodes")
    return {**core.NODE_CLASS_MAPPINGS, "CheckpointSave": CheckpointSave, **ours.NODE_CLASS_MAPPINGS}


def _widget_count(cls) -> int:
    n = 0
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            typ, opts = s[0], (s[1] if len(s) > 1 else {})
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                n += 1
                if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                    n += 1
    return n


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_matches_node_definitions(path, classes):
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert any(n["type"].startswith("Hadakron") for n in wf["nodes"])
    for n in wf["nodes"]:
        assert n["type"] in classes, f"{path.name}: unknown node type {n['type']}"
        cls = classes[n["type"]]
        assert len(n["widgets_values"]) == _widget_count(cls), (path.name, n["type"], n["widgets_values"])
        assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)
        spec = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        for inp in n["inputs"]:
            assert inp["name"] in spec and spec[inp["name"]][0] == inp["type"], (n["type"], inp)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == typ
        assert by_id[dst]["inputs"][dst_slot]["type"] == typ and by_id[dst]["inputs"][dst_slot]["link"] == link_id
    required_links = [(n["type"], i["name"]) for n in wf["nodes"] for i in n["inputs"] if i["link"] is None]
    assert required_links == [], f"{path.name}: unconnected inputs {required_links}"


# ---------------------------------------------------------------- regenerating the files
# Run `COMFYUI_PATH=/work/ComfyUI /work/comfyui-venv/bin/python tests/integration/test_merge_example_workflows.py`
# after a node's inputs change: it rebuilds example_workflows/*.json from the live node definitions.
OUT_DIR = Path(__file__).resolve().parents[2] / "example_workflows"


def write_example_workflows(CLASSES: dict) -> None:
    """Build the load, train and merge workflows (UI format, version 0.4) from the node classes and write them."""
    import json


    def spec_inputs(t):
        it = CLASSES[t].INPUT_TYPES()
        out = []
        for sect in ("required", "optional"):
            for name, s in it.get(sect, {}).items():
                typ = s[0]; opts = s[1] if len(s) > 1 else {}
                widget = isinstance(typ, list) or typ in WIDGET_TYPES
                out.append((name, "COMBO" if isinstance(typ, list) else typ, widget, opts, sect == "optional"))
        return out

    class WF:
        def __init__(self): self.nodes, self.links, self.nid, self.lid = [], [], 0, 0
        def node(self, t, pos, values=None, links=None, title=None):
            """values: {widget: value} overrides (default: the spec default / first combo entry)."""
            self.nid += 1; values = values or {}
            cls = CLASSES[t]
            n = {"id": self.nid, "type": t, "pos": list(pos), "size": [320, 120], "flags": {}, "order": self.nid - 1,
                 "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": t}, "widgets_values": []}
            if title: n["title"] = title
            for name, typ, widget, opts, optional in spec_inputs(t):
                if widget:
                    if name in values: v = values[name]
                    elif "default" in opts: v = opts["default"]
                    elif typ == "COMBO":
                        choices = CLASSES[t].INPUT_TYPES()["required" if not optional else "optional"][name][0]
                        v = choices[0] if choices else ""
                    else: v = 0
                    n["widgets_values"].append(v)
                    if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                        n["widgets_values"].append("fixed")
                elif not optional or name in (links or {}):
                    n["inputs"].append({"name": name, "type": typ, "link": None})
            names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            for i, (nm, typ) in enumerate(zip(names, cls.RETURN_TYPES)):
                n["outputs"].append({"name": nm, "type": typ, "links": [], "slot_index": i})
            self.nodes.append(n)
            for name, (src, slot) in (links or {}).items():
                self.link(src, slot, n, name)
            return n
        def link(self, src, slot, dst, name):
            self.lid += 1
            typ = src["outputs"][slot]["type"]
            idx = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == name)
            dst["inputs"][idx]["link"] = self.lid
            src["outputs"][slot]["links"].append(self.lid)
            self.links.append([self.lid, src["id"], slot, dst["id"], idx, typ])
        def dump(self, path, note):
            wf = {"last_node_id": self.nid, "last_link_id": self.lid, "nodes": self.nodes, "links": self.links,
                  "groups": [], "config": {}, "extra": {"hadakron_note": note}, "version": 0.4}
            Path(path).write_text(json.dumps(wf, indent=1) + "\n")

    CKPT = "sd_xl_base_1.0.safetensors"

    # ---------------- load
    w = WF()
    ck = w.node("CheckpointLoaderSimple", (0, 200), {"ckpt_name": CKPT})
    ld = w.node("HadakronLoader", (360, 200), {"lora_name": "my_lokr.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
                {"model": (ck, 0), "clip": (ck, 1)})
    pos = w.node("CLIPTextEncode", (720, 0), {"text": "a watercolor painting of a fox in a snowy forest"}, {"clip": (ld, 1)})
    neg = w.node("CLIPTextEncode", (720, 260), {"text": "blurry, low quality"}, {"clip": (ld, 1)})
    lat = w.node("EmptyLatentImage", (720, 520), {"width": 1024, "height": 1024, "batch_size": 1})
    ks = w.node("KSampler", (1080, 200), {"seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
                {"model": (ld, 0), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0)})
    dec = w.node("VAEDecode", (1440, 200), None, {"samples": (ks, 0), "vae": (ck, 2)})
    w.node("SaveImage", (1700, 200), {"filename_prefix": "hadakron_lokr"}, {"images": (dec, 0)})
    w.dump(OUT_DIR / "hadakron_load_lokr.json",
           "Load a LoHa/LoKr file exactly with the LoHa/LoKr Loader (put it in models/loras), then sample. The report "
           "output lists every key that matched and every key that did not, with the reason.")

    # ---------------- train
    w = WF()
    ck = w.node("CheckpointLoaderSimple", (0, 200), {"ckpt_name": CKPT})
    img = w.node("LoadImage", (0, 520), {"image": "example.png"})
    enc = w.node("VAEEncode", (360, 520), None, {"pixels": (img, 0), "vae": (ck, 2)})
    cap = w.node("CLIPTextEncode", (360, 200), {"text": "photo of sks dog"}, {"clip": (ck, 1)})
    tr = w.node("HadakronLoKrTrainer", (720, 200), {"steps": 400, "batch_size": 1, "learning_rate": 1e-4, "network_dim": 8,
                "network_alpha": 1.0, "factor": 8, "seed": 0},
                {"model": (ck, 0), "latents": (enc, 0), "positive": (cap, 0)})
    w.node("HadakronSaveAdapter", (1100, 100), {"filename_prefix": "hadakron/sks_dog_lokr"}, {"adapter": (tr, 0)})
    pos = w.node("CLIPTextEncode", (1100, 300), {"text": "photo of sks dog on a beach"}, {"clip": (ck, 1)})
    neg = w.node("CLIPTextEncode", (1100, 560), {"text": "blurry"}, {"clip": (ck, 1)})
    lat = w.node("EmptyLatentImage", (1100, 800), {"width": 1024, "height": 1024, "batch_size": 1})
    ks = w.node("KSampler", (1460, 300), {"seed": 7, "steps": 25, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
                {"model": (tr, 1), "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0)})
    dec = w.node("VAEDecode", (1820, 300), None, {"samples": (ks, 0), "vae": (ck, 2)})
    w.node("PreviewImage", (2080, 300), None, {"images": (dec, 0)})
    w.dump(OUT_DIR / "hadakron_train_lokr.json",
           "Train a LoKr in the graph: VAE-encode your images, caption them with CLIP Text Encode, run LoKr Trainer "
           "(live loss chart in the node), save the adapter to output/loras and sample the trained model right away.")

    # ---------------- merge
    w = WF()
    ck = w.node("CheckpointLoaderSimple", (0, 200), {"ckpt_name": CKPT})
    mg = w.node("HadakronAdapterMerge", (360, 200), {"adapter_1": "style_lokr.safetensors", "strength_1": 0.8,
                "adapter_2": "character_loha.safetensors", "strength_2": 1.0, "adapter_3": "None", "strength_3": 1.0},
                {"model": (ck, 0), "clip": (ck, 1)})
    w.node("CheckpointSave", (760, 200), {"filename_prefix": "checkpoints/sdxl_style_character"},
           {"model": (mg, 0), "clip": (mg, 1), "vae": (ck, 2)})
    w.node("HadakronAdapterCombine", (360, 560), {"adapter_1": "style_lokr.safetensors", "strength_1": 0.8,
           "adapter_2": "character_loha.safetensors", "strength_2": 1.0, "adapter_3": "None", "rank": 64,
           "filename_prefix": "loras/style_character_rank64", "layout": "kohya", "dtype": "fp16"})
    w.dump(OUT_DIR / "hadakron_merge_adapters.json",
           "Bake two adapters into an SDXL checkpoint exactly (Adapter Merge -> CheckpointSave), and combine them into one "
           "rank-64 LoRA file with the reported approximation error (Adapter Combine).")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest

    conftest.import_comfy()
    pack = conftest._import_pack()
    import nodes as core
    from comfy_extras.nodes_model_merging import CheckpointSave

    ours = importlib.import_module(pack.__name__ + ".nodes")
    write_example_workflows({**core.NODE_CLASS_MAPPINGS, "CheckpointSave": CheckpointSave, **ours.NODE_CLASS_MAPPINGS})

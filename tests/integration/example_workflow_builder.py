"""Builds example_workflows/*.json (UI format, as comfyui-frontend-package 1.47.10 saves it) from /object_info.

Run after a node's inputs change, against a running ComfyUI that has this repo in custom_nodes:

    ~/.cache/hadakron-comfy/venv/bin/python tests/integration/example_workflow_builder.py http://127.0.0.1:8188

Node sizes are at least the frontend's own sizes for a fresh node in both of its renderers (the LiteGraph canvas
and the Vue "Nodes 2.0" mode, which lays some nodes out taller or wider), measured in 1.47.10 and rounded up; SaveImage,
PreviewImage and LoadImage get room for the picture. Nodes are stacked in columns with a GAP between them, and the
builder refuses a layout where two nodes (title bar included) overlap; tests/integration/test_frontend_layout.py
checks the frontend's computed sizes against these and that no two nodes overlap as shown, in both renderers.
"""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from workflow_api import is_widget, ordered_inputs, widget_slots

OUT_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above a node's pos
GAP = 40
NODE_SIZES = {
    "CheckpointLoaderSimple": (320, 130), "UNETLoader": (320, 90), "CLIPLoader": (320, 120), "VAELoader": (320, 90),
    "LoadImage": (320, 360), "CLIPTextEncode": (400, 340), "EmptyLatentImage": (300, 120), "KSampler": (300, 270),
    "VAEEncode": (230, 60), "VAEDecode": (230, 60), "SaveImage": (420, 460), "PreviewImage": (420, 460),
    "CheckpointSave": (320, 110), "MarkdownNote": (320, 260),
    "HadakronLoader": (340, 270), "HadakronSaveAdapter": (340, 130),
    "HadakronAdapterMerge": (340, 350), "HadakronAdapterCombine": (340, 430),
    "HadakronTrainLoKr": (340, 680), "HadakronTrainLoHa": (340, 660), "HadakronNetworkOptions": (400, 640),
    "HadakronOptimizerOptions": (320, 200), "HadakronPrecisionOptions": (370, 200),
    "HadakronLoKrTrainer": (400, 1410), "HadakronLoHaTrainer": (400, 1360),
}
TRAINER = "HadakronTrainLoKr"  # the templates' trainer: compact, its settings from the option nodes
OPTIONAL_SOCKET_SHAPE = 7  # how the frontend marks an optional input slot (hollow dot)

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
ANIMA_UNET = "anima-base-v1.0.safetensors"  # the names ComfyUI's own Anima templates use
ANIMA_TEXT_ENCODER = "qwen_3_06b_base.safetensors"
ANIMA_VAE = "qwen_image_vae.safetensors"
ANIMA_NEGATIVE = "worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia"
# Anima as in ComfyUI's "Anima Base v1.0" template: EmptyLatentImage (KSampler turns the empty 4-channel latent
# into Wan 2.1's 16-channel one), 30 steps, cfg 4, euler / simple; the flow shift 3.0 is the model's own
# (supported_models.Anima), so no ModelSampling node; CLIPLoader type stable_diffusion (Qwen3-0.6B is detected).
ANIMA_SAMPLER = {"steps": 30, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


def fetch_object_info(url: str) -> dict:
    """GET <url>/object_info."""
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        return json.loads(r.read())


class Column:
    """Stacks nodes top to bottom at one x; `right()` is where the next column starts."""

    def __init__(self, x: float, y: float = 0.0):
        self.x, self.y, self.width = x, y, 0

    def place(self, size) -> list[float]:
        pos = [self.x, self.y + TITLE_HEIGHT]
        self.y += TITLE_HEIGHT + size[1] + GAP
        self.width = max(self.width, size[0])
        return pos

    def right(self) -> float:
        return self.x + self.width + GAP


class UIWorkflow:
    """A UI-format workflow built from node definitions: nodes with their sockets, widget values and links."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, column: Column, class_type: str, values: dict | None = None, links: dict | None = None) -> dict:
        """Add a node below the others in `column`; `values` {widget: value} override the defaults and `links`
        {input: (node, output index)} connect its sockets."""
        d = self.info[class_type]
        values, links = dict(values or {}), dict(links or {})
        size = list(NODE_SIZES[class_type])
        n = {"id": len(self.nodes) + 1, "type": class_type, "pos": column.place(size), "size": size, "flags": {},
             "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
             "properties": {"Node name for S&R": class_type}, "widgets_values": []}
        for name, spec, optional in ordered_inputs(d):
            if not is_widget(spec):
                slot = {"name": name, "type": spec[0], "link": None}
                if optional:
                    slot["shape"] = OPTIONAL_SOCKET_SHAPE
                n["inputs"].append(slot)
        for slot in widget_slots(d):
            if slot.input_name is None:
                n["widgets_values"].append({"control_after_generate": "fixed", "control_filter_list": "",
                                            "upload": "image"}[slot.frontend_widget])
            else:
                n["widgets_values"].append(values.pop(slot.input_name) if slot.input_name in values
                                           else _default(d, slot.input_name))
        if values:
            raise KeyError(f"{class_type} has no widgets {sorted(values)}")
        for i, (typ, name) in enumerate(zip(d["output"], d["output_name"])):
            n["outputs"].append({"name": name, "type": typ, "links": [], "slot_index": i})
        self.nodes.append(n)
        for name, (src, index) in links.items():
            self.link(src, index, n, name)
        return n

    def note(self, column: Column, text: str) -> dict:
        """A MarkdownNote (frontend-only: never sent to the server)."""
        size = list(NODE_SIZES["MarkdownNote"])
        n = {"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": column.place(size), "size": size,
             "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
             "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(n)
        return n

    def link(self, src: dict, index: int, dst: dict, name: str) -> None:
        link_id = len(self.links) + 1
        typ = src["outputs"][index]["type"]
        slot = next((i for i, x in enumerate(dst["inputs"]) if x["name"] == name), None)
        if slot is None:
            raise KeyError(f"{dst['type']} has no socket {name!r}")
        if dst["inputs"][slot]["type"] != typ:
            raise TypeError(f"{src['type']} output {index} is {typ}, {dst['type']}.{name} takes "
                            f"{dst['inputs'][slot]['type']}")
        dst["inputs"][slot]["link"] = link_id
        src["outputs"][index]["links"].append(link_id)
        self.links.append([link_id, src["id"], index, dst["id"], slot, typ])

    def overlapping(self) -> list[tuple[int, int]]:
        """Ids of node pairs whose rectangles (title bar above pos included) intersect."""
        def rect(n):
            return n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT
        out = []
        for i, a in enumerate(self.nodes):
            for b in self.nodes[i + 1:]:
                (ax, ay, aw, ah), (bx, by, bw, bh) = rect(a), rect(b)
                if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                    out.append((a["id"], b["id"]))
        return out

    def dump(self, path: Path) -> None:
        if self.overlapping():
            raise ValueError(f"{path}: nodes overlap: {self.overlapping()}")
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
        Path(path).write_text(json.dumps(wf, indent=1) + "\n")


def _default(node_def: dict, name: str):
    spec = next(s for n, s, _ in ordered_inputs(node_def) if n == name)
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(typ, list):
        return typ[0] if typ else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[typ]


# ---------------------------------------------------------------- the templates


def _sample(w: UIWorkflow, cols: list[Column], model, clip, vae, positive: str, negative: str, sampler: dict,
            output: str, save_prefix: str = "", latent_size: int = 1024):
    """Prompt, negative and empty latent in cols[0], KSampler in cols[1], VAE Decode in cols[2], the image in cols[3]."""
    pos = w.node(cols[0], "CLIPTextEncode", {"text": positive}, {"clip": clip})
    neg = w.node(cols[0], "CLIPTextEncode", {"text": negative}, {"clip": clip})
    lat = w.node(cols[0], "EmptyLatentImage", {"width": latent_size, "height": latent_size, "batch_size": 1})
    ks = w.node(cols[1], "KSampler", sampler,
                {"model": model, "positive": (pos, 0), "negative": (neg, 0), "latent_image": (lat, 0)})
    dec = w.node(cols[2], "VAEDecode", None, {"samples": (ks, 0), "vae": vae})
    w.node(cols[3], output, {"filename_prefix": save_prefix} if save_prefix else None, {"images": (dec, 0)})


def _width(class_type: str) -> int:
    return NODE_SIZES[class_type][0]


def _columns(x: float, n: int, widths: list[float]) -> list[Column]:
    cols = []
    for i in range(n):
        cols.append(Column(x))
        x += widths[i] + GAP
    return cols


def _anima_loaders(w: UIWorkflow, col: Column):
    unet = w.node(col, "UNETLoader", {"unet_name": ANIMA_UNET})
    te = w.node(col, "CLIPLoader", {"clip_name": ANIMA_TEXT_ENCODER, "type": "stable_diffusion"})
    vae = w.node(col, "VAELoader", {"vae_name": ANIMA_VAE})
    return unet, te, vae


def _trainer_values(**kw) -> dict:
    base = {"steps": 400, "learning_rate": 1e-4, "network_dim": 8, "network_alpha": 1.0, "factor": 8, "seed": 0}
    return {**base, **kw}


def _trainer(w: UIWorkflow, options: Column, col: Column, model, latents, positive) -> dict:
    """The compact LoKr Trainer in `col` with the three option nodes (at their defaults) stacked in `options`."""
    links = {"model": model, "latents": latents, "positive": positive}
    for node_id, socket in (("HadakronNetworkOptions", "network_options"),
                            ("HadakronOptimizerOptions", "optimizer_options"),
                            ("HadakronPrecisionOptions", "precision_options")):
        links[socket] = (w.node(options, node_id), 0)
    return w.node(col, TRAINER, _trainer_values(), links)


def build_all(info: dict) -> dict[str, UIWorkflow]:
    """The five templates, by file stem."""
    out = {}

    def loader_cols(x0: float) -> list[Column]:  # loader | prompts + latent | KSampler | VAE Decode | image
        return _columns(x0, 5, [_width("HadakronLoader"), _width("CLIPTextEncode"), _width("KSampler"),
                                _width("VAEDecode"), _width("SaveImage")])

    def train_cols(x0: float) -> list[Column]:  # data | option nodes | trainer | save + prompts | KSampler | ...
        return _columns(x0, 7, [_width("CLIPTextEncode"), _width("HadakronNetworkOptions"), _width(TRAINER),
                                _width("CLIPTextEncode"), _width("KSampler"), _width("VAEDecode"),
                                _width("PreviewImage")])

    # ---- SDXL: load
    w = UIWorkflow(info)
    c0 = Column(0)
    ck = w.node(c0, "CheckpointLoaderSimple", {"ckpt_name": SDXL_CHECKPOINT})
    w.note(c0, "**LoHa/LoKr Loader** applies a LoHa or LoKr file from `models/loras` exactly (sd-scripts, "
               "LyCORIS, ComfyUI, SimpleTuner or PEFT keys).\n\nAfter a run the node shows its load report: every "
               "module that matched, and every key that did not, with the reason.")
    c1, c2, c3, c4, c5 = loader_cols(c0.right())
    ld = w.node(c1, "HadakronLoader", {"lora_name": "my_lokr.safetensors"}, {"model": (ck, 0), "clip": (ck, 1)})
    _sample(w, [c2, c3, c4, c5], (ld, 0), (ld, 1), (ck, 2), "a watercolor painting of a fox in a snowy forest",
            "blurry, low quality", {"seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "euler",
                                    "scheduler": "normal"}, "SaveImage", "hadakron_lokr")
    out["hadakron_load_lokr"] = w

    # ---- Anima: load
    w = UIWorkflow(info)
    c0 = Column(0)
    unet, te, vae = _anima_loaders(w, c0)
    w.note(c0, "**Anima + LoHa/LoKr.** The DiT, the Qwen3-0.6B text encoder and the Qwen-Image (Wan 2.1) VAE are "
               "loaded separately; the loader applies the adapter to both the DiT and the text encoder.\n\n"
               "Sampling as in ComfyUI's Anima template: 30 steps, cfg 4, euler / simple, shift 3 (the model's own).")
    c1, c2, c3, c4, c5 = loader_cols(c0.right())
    ld = w.node(c1, "HadakronLoader", {"lora_name": "my_anima_lokr.safetensors"},
                {"model": (unet, 0), "clip": (te, 0)})
    _sample(w, [c2, c3, c4, c5], (ld, 0), (ld, 1), (vae, 0),
            "masterpiece, best quality, score_7, safe, anime, a girl reading a book under a cherry tree",
            ANIMA_NEGATIVE, {"seed": 42, **ANIMA_SAMPLER}, "SaveImage", "hadakron_anima_lokr")
    out["hadakron_anima_load_lokr"] = w

    # ---- SDXL: train
    w = UIWorkflow(info)
    c0 = Column(0)
    ck = w.node(c0, "CheckpointLoaderSimple", {"ckpt_name": SDXL_CHECKPOINT})
    img = w.node(c0, "LoadImage", {"image": "example.png"})
    w.note(c0, "**Train a LoKr in the graph.** VAE-encode your images, caption them with CLIP Text Encode and run "
               "LoKr Trainer: the loss is drawn live in the node. The three option nodes hold the other sd-scripts settings "
               "(at their defaults here; a trainer without them uses the same defaults). Save Adapter writes the file to `output/loras`, "
               "and the trained model is sampled right away.")
    cols = train_cols(c0.right())
    enc = w.node(cols[0], "VAEEncode", None, {"pixels": (img, 0), "vae": (ck, 2)})
    cap = w.node(cols[0], "CLIPTextEncode", {"text": "photo of sks dog"}, {"clip": (ck, 1)})
    tr = _trainer(w, cols[1], cols[2], (ck, 0), (enc, 0), (cap, 0))
    w.node(cols[3], "HadakronSaveAdapter", {"filename_prefix": "hadakron/sks_dog_lokr"}, {"adapter": (tr, 0)})
    _sample(w, cols[3:], (tr, 1), (ck, 1), (ck, 2), "photo of sks dog on a beach", "blurry",
            {"seed": 7, "steps": 25, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal"}, "PreviewImage")
    out["hadakron_train_lokr"] = w

    # ---- Anima: train
    w = UIWorkflow(info)
    c0 = Column(0)
    unet, te, vae = _anima_loaders(w, c0)
    img = w.node(c0, "LoadImage", {"image": "example.png"})
    w.note(c0, "**Train a LoKr on Anima.** The trainer uses Anima's own flow-matching objective (shift 3). "
               "Caption with Anima's tag style; the option nodes hold the other settings (train_llm_adapter is in "
               "Network Options); the adapter is saved to `output/loras` and the trained model is "
               "sampled with Anima's settings (30 steps, cfg 4, euler / simple).")
    cols = train_cols(c0.right())
    enc = w.node(cols[0], "VAEEncode", None, {"pixels": (img, 0), "vae": (vae, 0)})
    cap = w.node(cols[0], "CLIPTextEncode", {"text": "masterpiece, best quality, anime, sks character"},
                 {"clip": (te, 0)})
    tr = _trainer(w, cols[1], cols[2], (unet, 0), (enc, 0), (cap, 0))
    w.node(cols[3], "HadakronSaveAdapter", {"filename_prefix": "hadakron/anima_sks_lokr"}, {"adapter": (tr, 0)})
    _sample(w, cols[3:], (tr, 1), (te, 0), (vae, 0),
            "masterpiece, best quality, anime, sks character on a beach", ANIMA_NEGATIVE,
            {"seed": 7, **ANIMA_SAMPLER}, "PreviewImage")
    out["hadakron_anima_train_lokr"] = w

    # ---- SDXL: merge
    w = UIWorkflow(info)
    c0 = Column(0)
    ck = w.node(c0, "CheckpointLoaderSimple", {"ckpt_name": SDXL_CHECKPOINT})
    w.note(c0, "**Adapter Merge** bakes adapters into the model exactly; CheckpointSave writes the checkpoint.\n\n"
               "**Adapter Combine** makes one file of several adapters (exact at rank 0; at a fixed rank the "
               "approximation error is reported).")
    c1 = Column(c0.right())
    mg = w.node(c1, "HadakronAdapterMerge", {"adapter_1": "style_lokr.safetensors", "strength_1": 0.8,
                "adapter_2": "character_loha.safetensors", "strength_2": 1.0}, {"model": (ck, 0), "clip": (ck, 1)})
    w.node(c1, "HadakronAdapterCombine", {"adapter_1": "style_lokr.safetensors", "strength_1": 0.8,
           "adapter_2": "character_loha.safetensors", "strength_2": 1.0, "rank": 64,
           "filename_prefix": "loras/style_character_rank64", "layout": "kohya", "dtype": "fp16"})
    c2 = Column(c1.right())
    w.node(c2, "CheckpointSave", {"filename_prefix": "checkpoints/sdxl_style_character"},
           {"model": (mg, 0), "clip": (mg, 1), "vae": (ck, 2)})
    out["hadakron_merge_adapters"] = w
    return out


def write_example_workflows(info: dict, out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every template into `out_dir`; returns the paths."""
    paths = []
    for stem, w in build_all(info).items():
        path = Path(out_dir) / f"{stem}.json"
        w.dump(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188"
    for p in write_example_workflows(fetch_object_info(url)):
        print("wrote", p)

"""What a person sees on the canvas, in the real frontend (comfyui-frontend-package 1.47.10, headless Chromium, the
session's ComfyUI server; the browser helpers and fixtures of test_frontend_browser.py):

- every example workflow, in both of the frontend's renderers (the LiteGraph canvas and the Vue "Nodes 2.0" mode),
  shows no two nodes overlapping, with the sizes the frontend itself computes for them, and each node's size in
  the file is at least the size the frontend gives a fresh node of that type;
- the trainer node's height on a 1920x1080 screen at zoom 1 with its default options: the compact LoKr Trainer
  fits on the screen, the legacy all-in-one node does not (the heights are printed);
- a workflow saved with the single-node trainer layout (every setting a widget, `resume_from` spelled "none")
  loads with each widget value where it was, the frontend queues those values, and the server runs it.

Set HADAKRON_SCREENSHOT_DIR to keep a screenshot of each measured trainer.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from example_workflow_runs import (SAMPLE_STEPS, LATENT_PIXELS, adapter_files, file_names,  # noqa: F401
                                   workflow_paths)
from test_frontend_browser import _load_template, _overlaps, _without_titles, page, server  # noqa: F401
from workflow_api import first_of, to_api, with_values

LEGACY_WORKFLOW = Path(__file__).parent / "legacy_workflows" / "train_lokr_single_node.json"
# The legacy LoKr Trainer's widgets in the order workflows saved before the option nodes hold them (written here,
# not read from the pack: the pack must keep this order for those files to load).
LEGACY_LOKR_WIDGETS = (
    "steps", "batch_size", "learning_rate", "optimizer", "scheduler", "warmup_steps", "seed", None, "network_dim",
    "network_alpha", "factor", "decompose_both", "use_tucker", "use_scalar", "conv_dim", "conv_alpha",
    "rank_dropout", "module_dropout", "exclude_patterns", "include_patterns", "network_reg_dims", "network_reg_lrs",
    "loraplus_lr_ratio", "train_llm_adapter", "gradient_checkpointing", "training_dtype", "grad_accum_steps",
    "max_grad_norm", "weight_decay", "save_every", "autosave_prefix", "resume_from", "captions", "te_learning_rate",
)
SCREEN = (1920, 1080)
RENDERERS = {"litegraph": False, "vue": True}
FRAMES_JS = "new Promise((r) => { let n = 8; const f = () => (--n ? requestAnimationFrame(f) : r(true)); f(); })"


def _set_renderer(page, vue: bool) -> None:
    page.eval("window.__hk.app.ui.settings.setSettingValueAsync('Comfy.VueNodes.Enabled', "
              f"{json.dumps(vue)}).then(() => true)")
    page.eval(FRAMES_JS)


@pytest.fixture
def screen(page):
    """The page at 1920x1080 in the LiteGraph renderer; the window size and renderer are put back after."""
    page.send("Emulation.setDeviceMetricsOverride", {"width": SCREEN[0], "height": SCREEN[1],
                                                     "deviceScaleFactor": 1, "mobile": False})
    try:
        yield page
    finally:
        _set_renderer(page, False)
        page.send("Emulation.clearDeviceMetricsOverride")


def _fresh_sizes(page, types: list[str]) -> dict[str, list[float]]:
    """{type: [w, h]} of a node of each type just added to an empty graph (the frontend's own default size)."""
    return page.eval(f"""(async (types) => {{
      const app = window.__hk.app, out = {{}};
      app.graph.clear();
      for (const t of types) {{
        const n = LiteGraph.createNode(t); n.pos = [100, 100]; app.graph.add(n);
        await {FRAMES_JS};
        out[t] = [...n.size];
        app.graph.remove(n);
      }}
      return out; }})({json.dumps(types)})""", timeout=120)


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_example_workflows_do_not_overlap_as_shown(screen, renderer):
    """Every template, each node at the size this renderer computes: no two rectangles (title bar included)
    intersect, and no node in the file is smaller than a fresh node of its type."""
    _set_renderer(screen, RENDERERS[renderer])
    types = sorted({n["type"] for p in workflow_paths() for n in json.loads(p.read_text())["nodes"]})
    fresh = _fresh_sizes(screen, [t for t in types if t != "MarkdownNote"])
    problems = {}
    for path in workflow_paths():
        _load_template(screen, path.stem)
        screen.eval(FRAMES_JS)
        time.sleep(0.5)  # Vue nodes report their measured size a frame or two after mounting
        layout = screen.eval("window.__hk.layout()")
        wf = {str(n["id"]): n for n in json.loads(path.read_text())["nodes"]}
        small = [(n["id"], n["type"], wf[n["id"]]["size"], [round(x) for x in fresh[n["type"]]]) for n in layout
                 if n["type"] in fresh and any(f > s + 0.5 for f, s in zip(fresh[n["type"]], wf[n["id"]]["size"]))]
        overlaps = _overlaps(layout)
        print(f"{renderer} {path.stem}: {len(layout)} nodes, overlaps {overlaps}, smaller than fresh {small}")
        if overlaps or small:
            problems[path.stem] = {"overlaps": overlaps, "smaller than a fresh node (id, type, file, fresh)": small}
    assert problems == {}, json.dumps(problems, indent=1)


def _shown_height(page, node_type: str) -> dict:
    """A fresh node of `node_type` alone on the canvas at zoom 1: its height on screen in CSS px (title bar
    included; the DOM element's height in the Vue renderer) and whether it fits in the canvas."""
    return page.eval(f"""(async () => {{
      const app = window.__hk.app;
      app.graph.clear();
      const n = LiteGraph.createNode({json.dumps(node_type)}); n.pos = [40, 60]; app.graph.add(n);
      // zoom 1, the node clear of the side bar and the top menu (for the screenshot)
      app.canvas.ds.scale = 1; app.canvas.ds.offset = [80, 40]; app.canvas.setDirty(true, true);
      await {FRAMES_JS};
      const el = document.querySelector(`[data-node-id="${{n.id}}"]`);
      const canvas = app.canvas.canvas.getBoundingClientRect();
      const height = el ? el.getBoundingClientRect().height : n.size[1] + LiteGraph.NODE_TITLE_HEIGHT;
      return {{ height: Math.round(height), width: Math.round(el ? el.getBoundingClientRect().width : n.size[0]),
               widgets: n.widgets.length, canvasHeight: Math.round(canvas.height), screen: [innerWidth, innerHeight] }};
    }})()""", timeout=60)


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_trainer_fits_on_a_1080p_screen(screen, renderer):
    _set_renderer(screen, RENDERERS[renderer])
    shots = os.environ.get("HADAKRON_SCREENSHOT_DIR")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    shown = {}
    for node_type in ("HadakronTrainLoKr", "HadakronLoKrTrainer", "HadakronTrainLoHa", "HadakronNetworkOptions",
                      "HadakronOptimizerOptions", "HadakronPrecisionOptions", "HadakronObjectiveOptions"):
        shown[node_type] = _shown_height(screen, node_type)
        if shots:
            screen.screenshot(Path(shots) / f"{renderer}_{node_type}.png")
        print(f"{renderer} {node_type}: {shown[node_type]}")
    compact, legacy = shown["HadakronTrainLoKr"], shown["HadakronLoKrTrainer"]
    assert compact["screen"] == list(SCREEN)
    assert compact["height"] + 60 <= compact["canvasHeight"], compact  # the whole node fits in the canvas
    assert legacy["height"] > compact["canvasHeight"], legacy  # the all-in-one layout never did
    assert compact["height"] < 0.6 * legacy["height"], (compact, legacy)
    for options in ("HadakronNetworkOptions", "HadakronOptimizerOptions", "HadakronPrecisionOptions"):
        assert shown[options]["height"] < compact["height"], shown[options]
    objective = shown["HadakronObjectiveOptions"]  # 20 sd-scripts options: taller than the trainer, still on screen
    assert objective["height"] + 60 <= objective["canvasHeight"], objective


# ---------------------------------------------------------------- a workflow saved with the single-node trainer


@pytest.fixture(scope="module")
def object_info(comfy, file_names):
    return comfy.object_info()  # after the test files are in place (the combo lists hold them)


def test_single_node_trainer_workflow_loads_and_runs(page, comfy, object_info, file_names):
    """The old file's trainer widgets keep their values by name (position i of widgets_values is the i-th widget
    of LEGACY_LOKR_WIDGETS), the frontend's prompt carries them (resume_from still "none", the old spelling), and
    the server runs that prompt: the adapter it saves was trained with those settings."""
    wf = json.loads(LEGACY_WORKFLOW.read_text())
    (old,) = [n for n in wf["nodes"] if n["type"] == "HadakronLoKrTrainer"]
    assert len(old["widgets_values"]) == len(LEGACY_LOKR_WIDGETS)
    saved = {name: v for name, v in zip(LEGACY_LOKR_WIDGETS, old["widgets_values"]) if name is not None}
    page.eval(f"(async () => {{ await window.__hk.app.loadGraphData({json.dumps(wf)}, true, true, 'legacy'); "
              f"return true; }})()", timeout=60)
    page.eval(FRAMES_JS)
    assert page.eval("window.__hk.missingTypes()") == []
    shown = page.eval(f"""(() => {{ const n = window.__hk.node({old["id"]});
      return Object.fromEntries(n.widgets.filter((w) => w.name !== 'control_after_generate' && w.serialize !== false
        && w.options?.serialize !== false).map((w) => [w.name, w.value])); }})()""")
    assert {k: shown.get(k) for k in saved} == saved, "the legacy trainer's widgets moved"
    prompt = page.eval("window.__hk.prompt()")
    trainer = first_of(prompt, ["HadakronLoKrTrainer"])
    sent = {k: v for k, v in prompt[trainer]["inputs"].items() if not isinstance(v, list)}
    assert sent == saved, "the frontend queues other values than the file holds"
    assert _without_titles(prompt) == _without_titles(json.loads(json.dumps(to_api(wf, object_info))))
    # test files and CPU-sized sampling; the trainer's own (old, CPU-sized) settings are sent as saved
    run_prompt = with_values(prompt, file_names["sdxl"], {("KSampler", "steps"): SAMPLE_STEPS,
                                                          ("EmptyLatentImage", "width"): LATENT_PIXELS,
                                                          ("EmptyLatentImage", "height"): LATENT_PIXELS},
                             strict=False)
    since = time.time() - 1
    run = comfy.run(run_prompt, timeout=900)
    assert run.succeeded, run.status
    losses = json.loads(run.outputs[trainer]["hadakron_loss"][0])["loss"]
    assert len(losses) == saved["steps"], losses
    save = first_of(prompt, ["HadakronSaveAdapter"])
    (text,) = run.outputs[save]["text"]
    assert text.startswith("saved loras/hadakron/legacy_workflow_saved_"), text
    path = comfy.output_dir / text[len("saved "):]
    assert path.stat().st_mtime >= since
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_lr_scheduler"], meta["ss_seed"], meta["ss_max_grad_norm"],
            meta["ss_mixed_precision"]) == ("2", "linear", "5", "0.5", "no"), meta  # sd-scripts: fp32 is "no"
    assert float(meta["ss_learning_rate"]) == saved["learning_rate"] and meta["ss_network_dim"] == "4"
    args = json.loads(meta["ss_network_args"])
    assert args["factor"] == "4" and args["use_scalar"] in ("True", "true", "1"), args

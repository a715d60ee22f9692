"""example_workflows/*.json against the live server's /object_info, and the UI -> API converter (workflow_api.py).

Every template: each node type exists on the server, its widget values line up with the node's widgets as the
frontend builds them, every link joins an output to a socket of the same type, every required socket is
connected, the file is what example_workflow_builder.py writes for today's node definitions, and no two nodes
overlap on the canvas. The converter is checked on a small graph with every case it handles (frontend-only
nodes, bypassed and muted nodes, reroutes, a PrimitiveNode, converted widgets, seed control values).
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from example_workflow_builder import TITLE_HEIGHT, build_all
from workflow_api import (MODE_BYPASSED, MODE_MUTED, VIRTUAL_TYPES, WorkflowError, is_widget, ordered_inputs,
                          to_api, widget_slots, with_values)

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.object_info()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_matches_node_definitions(path, object_info):
    wf = _load(path)
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert any(n["type"].startswith("Hadakron") for n in wf["nodes"]), path.name
    prompt = to_api(wf, object_info)  # raises on unknown types and widget values that do not fit
    for n in wf["nodes"]:
        if n["type"] in VIRTUAL_TYPES:
            continue
        d = object_info[n["type"]]
        assert [o["type"] for o in n["outputs"]] == d["output"], (path.name, n["type"])
        sockets = {name: (spec[0], optional) for name, spec, optional in ordered_inputs(d) if not is_widget(spec)}
        for inp in n["inputs"]:
            assert inp["name"] in sockets and sockets[inp["name"]][0] == inp["type"], (path.name, n["type"], inp)
        unconnected = [i["name"] for i in n["inputs"] if i["link"] is None and not sockets[i["name"]][1]]
        assert unconnected == [], f"{path.name}: {n['type']} required inputs without a link: {unconnected}"
        missing = [name for name, (_, optional) in sockets.items()
                   if not optional and name not in prompt[str(n["id"])]["inputs"]]
        assert missing == [], f"{path.name}: {n['type']} has no socket for {missing}"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == typ
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["type"] == typ and by_id[dst]["inputs"][dst_slot]["link"] == link_id


def test_files_are_what_the_builder_writes(object_info):
    """The committed templates match today's node definitions (else: run example_workflow_builder.py)."""
    built = build_all(object_info)
    assert sorted(built) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        w = built[path.stem]
        expected = {"nodes": w.nodes, "links": w.links}
        found = _load(path)
        assert {"nodes": found["nodes"], "links": found["links"]} == json.loads(json.dumps(expected)), (
            f"{path.name} is stale: run tests/integration/example_workflow_builder.py against a server")


def _rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, title bar (drawn above pos) included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_no_two_nodes_overlap(path):
    nodes = _load(path)["nodes"]
    overlaps = []
    for a, b in combinations(nodes, 2):
        (l1, t1, r1, b1), (l2, t2, r2, b2) = _rect(a), _rect(b)
        if l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1:
            overlaps.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    assert overlaps == [], f"{path.name}: overlapping nodes {overlaps}"


# ---------------------------------------------------------------- the converter on every case it handles


def _node(node_id, typ, widgets=(), inputs=(), outputs=(), mode=0, title=None):
    n = {"id": node_id, "type": typ, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": 0, "mode": mode,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {},
         "widgets_values": list(widgets)}
    if title:
        n["title"] = title
    return n


def _sock(name, typ, link=None, widget=False):
    s = {"name": name, "type": typ, "link": link}
    if widget:
        s["widget"] = {"name": name}
    return s


def _out(name, typ, links):
    return {"name": name, "type": typ, "links": list(links)}


def _case_workflow() -> dict:
    """Checkpoint -> (Reroute) -> bypassed LoraLoaderModelOnly -> KSampler, with a Note, a muted node whose only
    reader loses its input, a PrimitiveNode driving KSampler's steps and a text node's converted widget."""
    nodes = [
        _node(1, "CheckpointLoaderSimple", ["ckpt.safetensors"], [],
              [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [3, 4]), _out("VAE", "VAE", [9])]),
        _node(2, "Reroute", [], [_sock("", "*", 1)], [_out("", "MODEL", [2])]),
        _node(3, "LoraLoaderModelOnly", ["some.safetensors", 0.5], [_sock("model", "MODEL", 2)],
              [_out("MODEL", "MODEL", [5])], mode=MODE_BYPASSED),
        _node(4, "CLIPTextEncode", ["a cat"], [_sock("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [6])],
              title="Positive"),
        _node(5, "CLIPTextEncode", ["ignored: linked"], [_sock("clip", "CLIP", 4), _sock("text", "STRING", 11, True)],
              [_out("CONDITIONING", "CONDITIONING", [7])]),
        _node(6, "EmptyLatentImage", [64, 64, 1], [], [_out("LATENT", "LATENT", [8])]),
        _node(7, "KSampler", [123, "randomize", 20, 5.0, "euler", "simple", 1.0],
              [_sock("model", "MODEL", 5), _sock("positive", "CONDITIONING", 6), _sock("negative", "CONDITIONING", 7),
               _sock("latent_image", "LATENT", 8), _sock("steps", "INT", 10, True)], [_out("LATENT", "LATENT", [12])]),
        _node(8, "Note", ["a note"]),
        _node(9, "PrimitiveNode", [3, "fixed"], [], [_out("INT", "INT", [10])]),
        _node(10, "PrimitiveStringMultiline", ["from upstream"], [], [_out("STRING", "STRING", [11])]),
        _node(11, "VAEDecode", [], [_sock("samples", "LATENT", 12), _sock("vae", "VAE", 9)],
              [_out("IMAGE", "IMAGE", [13])]),
        _node(12, "ImageInvert", [], [_sock("image", "IMAGE", 13)], [_out("IMAGE", "IMAGE", [14])], mode=MODE_MUTED),
        _node(13, "PreviewImage", [], [_sock("images", "IMAGE", 14)], []),
        _node(14, "MarkdownNote", ["# md"]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 1, 1, 4, 0, "CLIP"], [4, 1, 1, 5, 0, "CLIP"],
             [5, 3, 0, 7, 0, "MODEL"], [6, 4, 0, 7, 1, "CONDITIONING"], [7, 5, 0, 7, 2, "CONDITIONING"],
             [8, 6, 0, 7, 3, "LATENT"], [9, 1, 2, 11, 1, "VAE"], [10, 9, 0, 7, 4, "INT"],
             [11, 10, 0, 5, 1, "STRING"], [12, 7, 0, 11, 0, "LATENT"], [13, 11, 0, 12, 0, "IMAGE"],
             [14, 12, 0, 13, 0, "IMAGE"]]
    return {"last_node_id": 14, "last_link_id": 14, "nodes": nodes, "links": links, "version": 0.4}


def test_converter_handles_every_case(object_info):
    prompt = to_api(_case_workflow(), object_info)
    assert sorted(prompt, key=int) == ["1", "4", "5", "6", "7", "10", "11", "13"]  # no Reroute/bypassed/muted/notes
    assert prompt["1"]["inputs"] == {"ckpt_name": "ckpt.safetensors"}
    assert prompt["4"] == {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]},
                           "_meta": {"title": "Positive"}}
    assert prompt["5"]["inputs"] == {"text": ["10", 0], "clip": ["1", 1]}  # the link wins over the widget value
    assert prompt["7"]["inputs"] == {
        "seed": 123, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
        "model": ["1", 0],  # through the bypassed LoRA node and the reroute
        "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0]}
    assert prompt["11"]["inputs"] == {"samples": ["7", 0], "vae": ["1", 2]}
    assert prompt["13"]["inputs"] == {}  # its only input came from the muted node
    assert prompt["6"]["_meta"]["title"] == object_info["EmptyLatentImage"]["display_name"]


def test_converter_rejects_what_does_not_fit(object_info):
    wf = _case_workflow()
    wf["nodes"][6]["widgets_values"] = [123, 20, 5.0, "euler", "simple", 1.0]  # seed's control value left out
    with pytest.raises(WorkflowError, match=r"node 7 \(KSampler\): 6 widgets_values .* 7 widgets"):
        to_api(wf, object_info)
    wf = _case_workflow()
    wf["nodes"][0]["type"] = "NoSuchLoader"
    with pytest.raises(WorkflowError, match="NoSuchLoader.*missing node"):
        to_api(wf, object_info)


def test_widget_slots_follow_the_frontend(object_info):
    """Seed-named INTs get a control value unless they say otherwise; image_upload combos an upload button."""
    ks = [(s.input_name, s.frontend_widget) for s in widget_slots(object_info["KSampler"])]
    assert ks[:2] == [("seed", ""), (None, "control_after_generate")]
    load_image = [(s.input_name, s.frontend_widget) for s in widget_slots(object_info["LoadImage"])]
    assert load_image == [("image", ""), (None, "upload")]
    trainer = widget_slots(object_info["HadakronLoKrTrainer"])
    i = [s.input_name for s in trainer].index("seed")
    assert trainer[i + 1].frontend_widget == "control_after_generate"  # no control_after_generate in its spec
    assert "model" not in [s.input_name for s in trainer]


def test_with_values_replaces_and_reports_unused(object_info):
    prompt = to_api(_case_workflow(), object_info)
    out = with_values(prompt, {"ckpt_name": "test.safetensors"}, {("EmptyLatentImage", "width"): 32})
    assert out["1"]["inputs"]["ckpt_name"] == "test.safetensors" and out["6"]["inputs"]["width"] == 32
    assert prompt["1"]["inputs"]["ckpt_name"] == "ckpt.safetensors"  # a copy
    with pytest.raises(WorkflowError, match="unet_name"):
        with_values(prompt, {"unet_name": "x"})
    with pytest.raises(WorkflowError, match="text"):  # node 5's text is a link, never replaced
        with_values({"5": prompt["5"]}, {"text": "x"})

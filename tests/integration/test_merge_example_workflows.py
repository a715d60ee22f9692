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

"""UI-format workflow JSON (`nodes`, `links`, `widgets_values`) -> the API prompt `POST /prompt` takes.

The conversion follows what ComfyUI's frontend (comfyui-frontend-package 1.47.10, `graphToPrompt`) does, using
only the node definitions the live server returns from `/object_info`, so a template is run exactly as the
browser would queue it; there are no hand-written API copies of the workflows.

- Widget values: a node's `widgets_values` hold one value per widget input (required, then optional, in the
  server's `input_order`), plus values of frontend-only widgets that are not sent: `control_after_generate` after
  an INT/FLOAT/COMBO that asks for it (and after every INT named `seed` / `noise_seed` that does not say
  otherwise), the `control_filter_list` after such a COMBO, and the `upload` button after an `image_upload` COMBO.
- Links: an input (a socket, or a widget converted to an input) with a link takes the link's origin; links are
  followed through `Reroute` nodes and through bypassed nodes (the input of the same type), take the value of a
  `PrimitiveNode`, and are dropped when they come from a muted node.
- Left out: `Note`, `MarkdownNote`, `Reroute`, `PrimitiveNode` (frontend-only nodes), muted (mode 2) and
  bypassed (mode 4) nodes, and optional socket inputs without a link.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

MODE_MUTED = 2  # LiteGraph NEVER: the node and whatever reads only from it do not run
MODE_BYPASSED = 4  # the node is skipped; its outputs pass one matching input through
VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
UNSUPPORTED_UPLOAD_FLAGS = ("audio_upload", "mesh_upload")


class WorkflowError(ValueError):
    """A workflow that does not fit the server's node definitions (the message names node, input, expected, found)."""


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's `widgets_values`: the input it sets, or None for a frontend-only widget."""

    input_name: str | None
    frontend_widget: str = ""  # "control_after_generate", "control_filter_list" or "upload" when input_name is None


def _spec_parts(spec: list) -> tuple[Any, dict]:
    return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def is_widget(spec: list) -> bool:
    """Whether an /object_info input spec is shown as a widget (combo list, COMBO, INT, FLOAT, STRING, BOOLEAN)."""
    typ, opts = _spec_parts(spec)
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def ordered_inputs(node_def: Mapping) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of a node definition's inputs, required then optional, in `input_order`."""
    inputs = node_def.get("input", {})
    order = node_def.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {}) or {}
        for name in order.get(section, list(specs)):
            out.append((name, specs[name], section == "optional"))
    return out


def widget_slots(node_def: Mapping) -> list[WidgetSlot]:
    """What each entry of a node's `widgets_values` is, in order (the frontend's widget list for the definition)."""
    slots: list[WidgetSlot] = []
    for name, spec, _ in ordered_inputs(node_def):
        if not is_widget(spec):
            continue
        typ, opts = _spec_parts(spec)
        slots.append(WidgetSlot(name))
        control = opts.get("control_after_generate")
        combo = isinstance(typ, list) or typ == "COMBO"
        if typ == "INT" and (control if control is not None else name in SEED_NAMES):
            slots.append(WidgetSlot(None, "control_after_generate"))
        elif typ == "FLOAT" and control:
            slots.append(WidgetSlot(None, "control_after_generate"))
        elif combo and control:
            slots += [WidgetSlot(None, "control_after_generate"), WidgetSlot(None, "control_filter_list")]
        if combo:
            unsupported = [f for f in UNSUPPORTED_UPLOAD_FLAGS if opts.get(f)]
            if unsupported:
                raise WorkflowError(f"input {name!r}: {unsupported[0]} widgets are not supported by this converter")
            if any(opts.get(f) for f in UPLOAD_FLAGS):
                slots.append(WidgetSlot(None, "upload"))
    return slots


def _node_label(node: Mapping) -> str:
    return f"node {node.get('id')} ({node.get('type')})"


def widget_values(node: Mapping, node_def: Mapping) -> dict[str, Any]:
    """{input name: value} of a UI node's widgets, checked against the definition's widget list."""
    slots = widget_slots(node_def)
    names = [s.input_name for s in slots if s.input_name]
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        missing = [n for n in names if n not in values]
        if missing:
            raise WorkflowError(f"{_node_label(node)}: widgets_values has no {missing}")
        return {n: values[n] for n in names}
    if len(values) != len(slots):
        expected = [s.input_name or f"<{s.frontend_widget}>" for s in slots]
        raise WorkflowError(f"{_node_label(node)}: {len(values)} widgets_values {list(values)!r} for the "
                            f"{len(slots)} widgets {expected}")
    return {s.input_name: v for s, v in zip(slots, values) if s.input_name}


class _Graph:
    """A UI workflow's nodes and links, indexed for following links."""

    def __init__(self, workflow: Mapping):
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported by this converter")
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # workflow schema 1.0 writes links as objects
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = link

    def origin(self, link_id: int, seen: frozenset = frozenset()):
        """("link", node_id, slot), ("value", v) or None (nothing runs there) for the upstream end of a link."""
        if link_id in seen:
            raise WorkflowError(f"link {link_id} is part of a cycle through reroutes or bypassed nodes")
        seen = seen | {link_id}
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"link {link_id} is used by an input but missing from the workflow's links")
        _, src_id, src_slot = link[0], link[1], link[2]
        src = self.nodes.get(src_id)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from node {src_id}, which is not in the workflow")
        if src["type"] == "Reroute":
            up = (src.get("inputs") or [{}])[0].get("link")
            return None if up is None else self.origin(up, seen)
        if src["type"] == "PrimitiveNode":
            return ("value", (src.get("widgets_values") or [None])[0])
        mode = src.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            inp = self._bypass_input(src, src_slot)
            return None if inp is None or inp.get("link") is None else self.origin(inp["link"], seen)
        return ("link", src_id, src_slot)

    @staticmethod
    def _bypass_input(node: Mapping, slot: int):
        """The input a bypassed node passes to output `slot`: the same index if its type matches, else the first
        input of that type (as the frontend does)."""
        outputs, inputs = node.get("outputs") or [], node.get("inputs") or []
        typ = outputs[slot]["type"] if slot < len(outputs) else None
        if slot < len(inputs) and inputs[slot].get("type") == typ:
            return inputs[slot]
        return next((i for i in inputs if i.get("type") == typ), None)


def to_api(workflow: Mapping, object_info: Mapping) -> dict[str, dict]:
    """The API prompt ({node id: {class_type, inputs, _meta}}) for a UI-format workflow, from /object_info."""
    graph = _Graph(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in graph.nodes.items():
        typ = node["type"]
        if typ in VIRTUAL_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        node_def = object_info.get(typ)
        if node_def is None:
            raise WorkflowError(f"{_node_label(node)}: the server has no node type {typ!r} (missing node)")
        known = {name for name, _, _ in ordered_inputs(node_def)}
        inputs: dict[str, Any] = dict(widget_values(node, node_def))
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            if name not in known:
                raise WorkflowError(f"{_node_label(node)}: input {name!r} is not an input of {typ} ({sorted(known)})")
            if inp.get("link") is None:
                continue
            up = graph.origin(inp["link"])
            if up is None:
                inputs.pop(name, None)
            elif up[0] == "value":
                inputs[name] = up[1]
            else:
                inputs[name] = [str(up[1]), int(up[2])]
        title = node.get("title") or node_def.get("display_name") or typ
        prompt[str(node_id)] = {"class_type": typ, "inputs": inputs, "_meta": {"title": title}}
    for entry in prompt.values():  # a link to a node that does not run is no input (as the frontend does)
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


# ---------------------------------------------------------------- test-run settings


def with_values(prompt: Mapping[str, dict], by_input: Mapping[str, Any] | None = None,
                by_class: Mapping[tuple[str, str], Any] | None = None, strict: bool = True) -> dict[str, dict]:
    """A copy of `prompt` with widget values replaced: `by_input` {input name: value} on every node that has that
    input as a value (file names: ckpt_name, unet_name, lora_name, image, ...), `by_class` {(class_type, input
    name): value} on nodes of that class. Linked inputs are never replaced; with `strict`, every key must match
    some node."""
    out = copy.deepcopy(dict(prompt))
    unused = set(by_input or {}) | set(by_class or {})
    for entry in out.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list):
                continue
            key = (entry["class_type"], name)
            if by_class and key in by_class:
                entry["inputs"][name] = by_class[key]
                unused.discard(key)
            elif by_input and name in by_input:
                entry["inputs"][name] = by_input[name]
                unused.discard(name)
    if unused and strict:
        raise WorkflowError(f"no node of the prompt has the inputs {sorted(map(str, unused))}")
    return out


def nodes_of(prompt: Mapping[str, dict], class_type: str) -> list[str]:
    """Ids of the prompt's nodes of one class, in node-id order."""
    return [k for k in sorted(prompt, key=int) if prompt[k]["class_type"] == class_type]


def first_of(prompt: Mapping[str, dict], types: Iterable[str]) -> str:
    """Id of the first node whose class is one of `types` (raises when there is none)."""
    wanted = set(types)
    for k in sorted(prompt, key=int):
        if prompt[k]["class_type"] in wanted:
            return k
    raise WorkflowError(f"the prompt has no node of {sorted(wanted)}")

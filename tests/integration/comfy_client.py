"""A small client for the real ComfyUI server the integration tests start (HTTP + websocket), and a graph builder.

Use it through the session fixture `comfy` (conftest.py):

    def test_x(comfy, sdxl_files):
        g = Graph()
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name=sdxl_files.checkpoint)
        pos = g.node("CLIPTextEncode", text="a cat", clip=ckpt[1])
        ...
        run = comfy.run(g)                       # POST /prompt, follow the websocket until it ends, read history
        run.outputs["7"]["images"]               # the ui dict node 7 returned
        run.events_of("progress"); run.cached_nodes; run.executed_nodes
        comfy.view(name, subfolder, "output")    # GET /view bytes

- `run(graph, timeout=600, expect_error=False) -> PromptRun`: an `execution_error` (or interruption) raises
  `PromptFailed` with the server's exception type, message and traceback plus the server log's tail, unless
  `expect_error=True` (then `run.error` holds the event's data; a run that did not fail raises AssertionError).
  A 400 from /prompt (validation) raises `PromptRejected` with the server's `error` and `node_errors`.
- `queue(graph) -> prompt_id`, `wait_event(prompt_id, "progress")` (blocks until the running prompt sends that
  event), `interrupt()`, then `wait(prompt_id, expect_error=True)` (`run.interrupted`): for tests acting mid-run.
- Folders: `comfy.base / "models" / "loras"` (also checkpoints, diffusion_models, text_encoders, vae),
  `comfy.input_dir`, `comfy.output_dir`, `comfy.models_dir(name)`.
The websocket (one per client, `clientId` fixed) is read by an aiohttp client in a background thread and is
open before any prompt is posted, so no event of a prompt is missed.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
MODEL_FOLDERS = ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae")


class PromptRejected(RuntimeError):
    """POST /prompt answered 400 (validation failed); `.error` and `.node_errors` are the server's."""

    def __init__(self, message: str, error: Any, node_errors: Any):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class PromptFailed(RuntimeError):
    """The prompt ran and failed (execution_error or execution_interrupted); `.run` is the PromptRun."""

    def __init__(self, message: str, run: "PromptRun"):
        super().__init__(message)
        self.run = run


# ---------------------------------------------------------------- graph builder


@dataclass
class NodeRef:
    """A node of a Graph; `ref[i]` is the link to its output i (`[id, i]`)."""

    id: str
    class_type: str
    inputs: dict[str, Any]

    def __getitem__(self, index: int) -> list:
        return [self.id, int(index)]

    def set(self, **inputs) -> "NodeRef":
        """Change inputs in place (for re-queueing a modified graph)."""
        self.inputs.update(inputs)
        return self


class Graph:
    """Builds an API-format prompt: `g.node(class_type, **inputs)`; a NodeRef input links to its output 0."""

    def __init__(self):
        self.nodes: dict[str, NodeRef] = {}
        self._next = 1

    def node(self, class_type: str, _id: str | int | None = None, **inputs) -> NodeRef:
        """Add a node (ids 1, 2, ... unless `_id` is given) and return its NodeRef."""
        if _id is None:
            while str(self._next) in self.nodes:
                self._next += 1
            node_id = str(self._next)
            self._next += 1
        else:
            node_id = str(_id)
        if node_id in self.nodes:
            raise ValueError(f"node id {node_id} used twice")
        ref = NodeRef(node_id, class_type, dict(inputs))
        self.nodes[node_id] = ref
        return ref

    def api(self) -> dict[str, dict]:
        """The prompt dict POST /prompt takes: {id: {"class_type", "inputs"}} with links as [id, index]."""
        out = {i: {"class_type": r.class_type, "inputs": dict(r.inputs)} for i, r in self.nodes.items()}
        return json.loads(json.dumps(out, default=_link))


def _link(v):
    if isinstance(v, NodeRef):
        return v[0]
    raise TypeError(f"not JSON: {type(v).__name__}")


# ---------------------------------------------------------------- a finished prompt


@dataclass
class PromptRun:
    """One prompt as the client saw it: websocket events in arrival order, and its /history entry."""

    prompt_id: str
    events: list[tuple[str, Any]] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def outputs(self) -> dict[str, dict]:
        """node id -> the ui dict that node returned (from /history)."""
        return self.history.get("outputs", {})

    @property
    def status(self) -> dict:
        """/history's status: {"status_str": "success"|"error", "completed", "messages"}."""
        return self.history.get("status", {})

    def events_of(self, event_type: str) -> list[Any]:
        """The data of every event of `event_type`, in arrival order."""
        return [d for t, d in self.events if t == event_type]

    @property
    def error(self) -> dict | None:
        """The execution_error (or execution_interrupted) event's data, or None."""
        for t, d in self.events:
            if t in ("execution_error", "execution_interrupted"):
                return d
        return None

    @property
    def interrupted(self) -> bool:
        return any(t == "execution_interrupted" for t, _ in self.events)

    @property
    def succeeded(self) -> bool:
        return any(t == "execution_success" for t, _ in self.events)

    @property
    def cached_nodes(self) -> list[str]:
        """Node ids the executor served from its cache (execution_cached)."""
        out: list[str] = []
        for d in self.events_of("execution_cached"):
            out += [str(n) for n in d.get("nodes", [])]
        return out

    @property
    def executed_nodes(self) -> list[str]:
        """Node ids that ran in this prompt (from `executing` events), in order."""
        return [str(d["node"]) for d in self.events_of("executing") if d.get("node") is not None]


# ---------------------------------------------------------------- websocket reader


class _Socket:
    """The server's /ws read in a background thread; every message is appended to `messages`."""

    def __init__(self, ws_url: str, timeout: float = 60.0):
        self.messages: list[tuple[str, Any]] = []
        self.cond = threading.Condition()
        self.closed: str | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, args=(ws_url,), daemon=True, name="comfy-ws")
        self._thread.start()
        with self.cond:
            ok = self.cond.wait_for(lambda: self.closed is not None or any(t == "status" for t, _ in self.messages),
                                    timeout)
        if not ok or self.closed is not None:
            raise RuntimeError(f"websocket {ws_url} did not open: {self.closed or 'timeout'}")

    def _main(self, url: str) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._read(url))
        except BaseException as exc:  # reported to waiters, never raised in the thread
            self._close(f"{type(exc).__name__}: {exc}")
        finally:
            self._loop.close()

    async def _read(self, url: str) -> None:
        import aiohttp
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, heartbeat=None, max_msg_size=0) as ws:
                stopper = asyncio.ensure_future(self._stop.wait())
                while True:
                    recv = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait({recv, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if stopper in done:
                        recv.cancel()
                        await ws.close()
                        self._close("closed by client")
                        return
                    msg = recv.result()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self._append((data.get("type"), data.get("data")))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self._append(("binary", {"bytes": len(msg.data)}))
                    else:
                        self._close(f"websocket closed ({msg.type.name})")
                        return

    def _append(self, item) -> None:
        with self.cond:
            self.messages.append(item)
            self.cond.notify_all()

    def _close(self, why: str) -> None:
        with self.cond:
            if self.closed is None:
                self.closed = why
            self.cond.notify_all()

    def close(self) -> None:
        if self._stop is not None and self.closed is None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


# ---------------------------------------------------------------- the client


class ComfyClient:
    """HTTP + websocket client of one ComfyUI server whose --base-directory is `base`."""

    def __init__(self, url: str, base: Path, log: Path):
        self.url = url.rstrip("/")
        self.base = Path(base)
        self.log = Path(log)
        self.client_id = uuid.uuid4().hex
        ws_url = self.url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self._ws = _Socket(ws_url)

    # folders
    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base / "temp"

    def models_dir(self, folder: str) -> Path:
        """base/models/<folder> (checkpoints, loras, diffusion_models, text_encoders, vae)."""
        return self.base / "models" / folder

    # HTTP
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str, timeout: float = 60.0) -> Any:
        status, raw = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {raw[:2000]!r}")
        return json.loads(raw)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (or /object_info/<node_class>)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def history(self, prompt_id: str) -> dict:
        """GET /history/<id>: this prompt's entry ({} while it has none)."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """GET /view: the bytes of a file in output/, input/ or temp/."""
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, raw = self._request("GET", f"/view?{q}")
        if status != 200:
            raise RuntimeError(f"GET /view {filename!r} ({type}/{subfolder}): HTTP {status}")
        return raw

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (the running prompt, or only `prompt_id` when given)."""
        status, raw = self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise RuntimeError(f"POST /interrupt: HTTP {status}: {raw[:500]!r}")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free (takes effect between prompts)."""
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no server log: {exc})"

    # prompts
    def queue(self, graph: Graph | dict) -> str:
        """POST /prompt with this client's id; returns the prompt id. A 400 raises PromptRejected."""
        prompt = graph.api() if isinstance(graph, Graph) else graph
        status, raw = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"error": raw.decode(errors="replace")}
        if status != 200:
            error, node_errors = body.get("error"), body.get("node_errors")
            raise PromptRejected(f"POST /prompt rejected (HTTP {status}): {json.dumps(error, indent=1)}\n"
                                 f"node_errors: {json.dumps(node_errors, indent=1)}", error, node_errors)
        return body["prompt_id"]

    def _follow(self, prompt_id: str, until, deadline: float, what: str) -> list[tuple[str, Any]]:
        """The prompt's websocket events from its execution_start up to the first one where `until(events)` holds.
        Events without a prompt id (a pack's own messages such as hadakron.loss) that arrive while it runs count
        as its own; `status` and binary preview frames do not."""
        ws = self._ws
        events: list[tuple[str, Any]] = []
        with ws.cond:
            i, started = 0, False
            while True:
                if i < len(ws.messages):
                    etype, data = ws.messages[i]
                    i += 1
                    pid = data.get("prompt_id") if isinstance(data, dict) else None
                    if not started:
                        started = etype == "execution_start" and pid == prompt_id
                        if not started:
                            continue
                    elif not (pid == prompt_id or (pid is None and etype not in ("status", "binary"))):
                        continue
                    events.append((etype, data))
                    if until(events):
                        return events
                    continue
                if ws.closed is not None:
                    raise RuntimeError(f"websocket closed while waiting for {what} of {prompt_id}: {ws.closed}\n"
                                       f"{self.log_tail()}")
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"no {what} of prompt {prompt_id} in time "
                                       f"(events so far: {[t for t, _ in events]})\n{self.log_tail()}")
                ws.cond.wait(min(left, 5.0))

    def wait_event(self, prompt_id: str, event_type: str, timeout: float = 600.0) -> Any:
        """Block until the running prompt `prompt_id` sends an `event_type` event (e.g. the first `progress`);
        returns its data. Raises TimeoutError if the prompt ends first."""
        def until(events):
            etype = events[-1][0]
            if etype in END_EVENTS and etype != event_type:
                raise TimeoutError(f"prompt {prompt_id} ended ({etype}) before any {event_type!r} event")
            return etype == event_type
        return self._follow(prompt_id, until, time.time() + timeout, repr(event_type))[-1][1]

    def wait(self, prompt_id: str, timeout: float = 600.0, expect_error: bool = False) -> PromptRun:
        """Follow the websocket until `prompt_id` ends (and the server reports it idle), then read /history."""
        t0 = time.time()
        deadline = t0 + timeout

        ended = False

        def until(events):
            nonlocal ended
            etype, data = events[-1]
            ended = ended or etype in END_EVENTS
            return ended and etype == "executing" and data.get("node") is None
        run = PromptRun(prompt_id, events=self._follow(prompt_id, until, deadline, "the end"))
        run.history = self._history_when_ready(prompt_id, deadline)
        run.seconds = time.time() - t0
        failed = run.error is not None
        if failed and not expect_error:
            raise PromptFailed(_failure_text(run, self.log_tail()), run)
        if expect_error and not failed:
            raise AssertionError(f"prompt {prompt_id} was expected to fail but succeeded "
                                 f"(executed {run.executed_nodes})")
        return run

    def _history_when_ready(self, prompt_id: str, deadline: float) -> dict:
        # the server stores the history entry before it reports itself idle; poll briefly in case
        while True:
            h = self.history(prompt_id)
            if h or time.time() > deadline:
                return h
            time.sleep(0.1)

    def run(self, graph: Graph | dict, *, timeout: float = 600.0, expect_error: bool = False) -> PromptRun:
        """Queue `graph` and wait for it (see the module docstring for errors)."""
        return self.wait(self.queue(graph), timeout=timeout, expect_error=expect_error)

    def close(self) -> None:
        self._ws.close()


def _failure_text(run: PromptRun, log_tail: str) -> str:
    e = run.error or {}
    if run.interrupted:
        head = f"prompt {run.prompt_id} was interrupted in node {e.get('node_id')} ({e.get('node_type')})"
        return f"{head}\n--- server log (tail) ---\n{log_tail}"
    tb = e.get("traceback") or []
    tb_text = "".join(tb) if isinstance(tb, list) else str(tb)
    return (f"prompt {run.prompt_id} failed in node {e.get('node_id')} ({e.get('node_type')}): "
            f"{e.get('exception_type')}: {e.get('exception_message')}\n"
            f"--- server traceback ---\n{tb_text}\n--- server log (tail) ---\n{log_tail}")


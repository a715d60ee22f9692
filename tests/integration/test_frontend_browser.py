"""Browser tests of the web/ extension on real runs: a real ComfyUI serving comfyui-frontend-package 1.47.10 (the
version pinned in pyproject's `dev` extra, ComfyUI v0.29's requirement) in Debian's headless Chromium, driven over
the DevTools protocol (pipe transport, no extra Python package), against the session's server (conftest `comfy`)
with the test model files.

Every example workflow is listed by the server's template route, loaded through the UI's own template load path
(`app.loadGraphData` of the file the route serves) with no missing node; the frontend's own `graphToPrompt` gives
the same prompt as workflow_api.py; the layout the file holds is the one shown (no node resized, none overlapping).
Then each template gets the test files and CPU-sized settings in its widgets and is queued with the real Run
button: the server accepts it (no validation error) and runs it; the trainer's loss chart is drawn from the run's
own websocket events (and survives a workflow reload), the loaders show the load report the server returned, and
the text result nodes their text. Every report is checked as a reader sees it: no word-breaking style, no line
broken inside a word or number (the rendered text measured, also in a 190 px wide report), every cut element
scrolls with a visible scrollbar, and the loader's ||dW|| heatmap has one cell per block of the report, coloured
where the block has norm. A real run interrupted through POST /interrupt and a real run whose trainer raises show
the interrupted and failed chart states (with the reason) and keep the last curve. Screenshots of each node go to
HADAKRON_SCREENSHOT_DIR (default /tmp/hadakron-screenshots). Pure JS logic is unit-tested in tests/web/
(`node --test tests/web/`).
Skipped with the reason when COMFYUI_PATH, chromium or the frontend package is missing.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from example_workflow_runs import (TRAIN_STEPS, TRAINER_TYPES, adapter_files, family_of, file_names, load_report,  # noqa: F401
                                   prompt_for_test_run, workflow_params, workflow_paths)
from workflow_api import first_of, nodes_of, to_api

PACK_DIR_NAME = "hadakron"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000", "--remote-debugging-pipe",
]


def _comfy_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    if not p or not (Path(p) / "main.py").is_file() or not (Path(p) / "comfy").is_dir():
        return None
    return Path(p)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


if _comfy_path() is None:
    pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout", allow_module_level=True)
if _chromium() is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
if importlib.util.find_spec("comfyui_frontend_package") is None:
    pytest.skip("comfyui-frontend-package is not installed in this interpreter (run with ComfyUI's venv)",
                allow_module_level=True)


# ---------------------------------------------------------------- ComfyUI server


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def server(comfy_server):
    """Base URL of the real ComfyUI started by conftest.py (this repo linked as custom_nodes/hadakron)."""
    return comfy_server["url"]


# ---------------------------------------------------------------- Chromium over the DevTools pipe


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="hadakron_chromium_")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds():
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self.session = None

    def _read_loop(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 30.0) -> dict:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no reply to {method}")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open_page(self):
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def eval(self, expression: str, timeout: float = 30.0):
        """Evaluates JS in the page (promises awaited) and returns the JSON value; page exceptions raise."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                        timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise RuntimeError(f"page exception: {d.get('exception', {}).get('description') or d.get('text')}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = ""):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.eval(expression)
                if last:
                    return last
            except RuntimeError as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what or expression}: last {last!r}")

    def console_problems(self) -> list[str]:
        """Console errors/warnings and uncaught exceptions seen so far, as text."""
        out = []
        with self._cond:
            events = list(self.events)
        for ev in events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
                           + " @ " + str(d.get("url", "")))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                frames = p.get("stackTrace", {}).get("callFrames", [])
                out.append(f"console.{p['type']}: {args} @ {frames[0]['url'] if frames else ''}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log: {e.get('text')} @ {e.get('url', '')}")
        return out

    def screenshot(self, path: Path):
        import base64
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)



# ---------------------------------------------------------------- the page


HELPERS_JS = r"""
(() => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  const hk = window.__hk = {
    app, api,
    loss: [],          // every hadakron.loss event the page's own websocket delivered
    queued: [],        // POST /prompt answers ({prompt_id, node_errors}) of the prompts the UI queued
    queueErrors: [],
    node(id) { return app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(String(id)); },
    widgetEl(node, name) { const w = node && node.widgets.find((w) => w.name === name); return w && w.element; },
    // The file the server's template route serves, loaded as the template browser does.
    async loadTemplate(module, stem) {
      const res = await api.fetchApi(`/workflow_templates/${module}/${stem}.json`);
      if (!res.ok) throw new Error(`template ${module}/${stem}: HTTP ${res.status}`);
      await app.loadGraphData(await res.json(), true, true, stem);
      return app.graph._nodes.length;
    },
    missingTypes() { return app.graph._nodes.filter((n) => !(n.type in LiteGraph.registered_node_types)).map((n) => n.type); },
    layout() {
      return app.graph._nodes.map((n) => ({ id: String(n.id), type: n.type, size: [...n.size], rect: [...n.boundingRect] }));
    },
    async prompt() { return (await app.graphToPrompt()).output; },
    // Sets widget values as a user would (value, then the widget's callback).
    setWidgets(values) {
      for (const [id, inputs] of Object.entries(values)) {
        const node = hk.node(id);
        for (const [name, value] of Object.entries(inputs)) {
          const w = node.widgets.find((w) => w.name === name);
          if (!w) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
          w.value = value;
          w.callback?.(value, app.canvas, node);
        }
      }
      app.graph.setDirtyCanvas(true, true);
      return true;
    },
    // Scrolls the canvas (zoom 1) so a node's widget is on screen: the frontend hides DOM widgets outside the view.
    async showWidget(id, name) {
      const node = hk.node(id), w = node.widgets.find((w) => w.name === name);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [40 - node.pos[0], 60 - (node.pos[1] + (w.y ?? w.last_y ?? 0))];
      app.canvas.setDirty(true, true);
      for (let i = 0; i < 6; i++) await new Promise((r) => requestAnimationFrame(r));
      return w.element.clientWidth;
    },
    runButton() { return document.querySelector('[data-testid="queue-button"]'); },
    // Pixels of a chart canvas: total, non-background, close to the smoothed-curve colour (255,165,60).
    pixels(canvas) {
      const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      let nonBg = 0, orange = 0;
      for (let i = 0; i < d.length; i += 4) {
        const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
        if (Math.abs(r - 0x1b) + Math.abs(g - 0x1b) + Math.abs(b - 0x1b) > 30) nonBg++;
        if (Math.abs(r - 255) < 40 && Math.abs(g - 165) < 40 && Math.abs(b - 60) < 50) orange++;
      }
      return { width: canvas.width, height: canvas.height, nonBg, orange };
    },
    // Where a node is on the screen (CSS pixels of the page), title bar included.
    nodeScreenRect(id) {
      const n = hk.node(id), ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
      const [x, y, w, h] = n.boundingRect;
      return { x: (x + ds.offset[0]) * ds.scale + c.left, y: (y + ds.offset[1]) * ds.scale + c.top,
               width: w * ds.scale, height: h * ds.scale };
    },
    // Line breaks inside a text node that fall between two non-space characters (a word or number cut in two);
    // `wrapped` counts every wrap of a line, also those at a <wbr> (between text nodes: the allowed punctuation
    // breaks) and at spaces.
    midWordBreaks(root) {
      const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT), bad = [], r = document.createRange();
      let lines = 0, prevTop = null, prevLine = null;
      for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        const t = n.textContent, line = n.parentElement.closest("div, summary");
        for (let i = 0; i < t.length; i++) {
          r.setStart(n, i); r.setEnd(n, i + 1);
          const rect = r.getClientRects()[0];
          if (!rect) continue;
          if (prevTop !== null && line === prevLine && rect.top > prevTop + 2) {
            lines++;
            if (i > 0 && !/\s/.test(t[i - 1]) && !/\s/.test(t[i])) bad.push(t.slice(Math.max(0, i - 14), i) + "|" + t.slice(i, i + 14));
          }
          prevTop = rect.top;
          prevLine = line;
        }
      }
      return { bad, wrapped: lines };
    },
    // Every element of the report whose content is cut (scroll size over client size) and how it can be seen.
    clipped(root) {
      return [root, ...root.querySelectorAll("*")].filter((e) => e.getClientRects().length).flatMap((e) => {
        const cs = getComputedStyle(e), out = [];
        if (e.scrollHeight > e.clientHeight + 1 && cs.overflowY !== "visible")
          out.push({ cls: e.className, axis: "y", shown: e.clientHeight, content: e.scrollHeight, overflow: cs.overflowY,
                     bar: e.offsetWidth - e.clientWidth - parseFloat(cs.borderLeftWidth) - parseFloat(cs.borderRightWidth) });
        if (e.scrollWidth > e.clientWidth + 1 && cs.overflowX !== "visible")
          out.push({ cls: e.className, axis: "x", shown: e.clientWidth, content: e.scrollWidth, overflow: cs.overflowX,
                     bar: e.offsetHeight - e.clientHeight - parseFloat(cs.borderTopWidth) - parseFloat(cs.borderBottomWidth) });
        return out;
      });
    },
    // Computed wrapping styles (word-break/overflow-wrap/white-space) of the report's elements.
    wrapStyles(root) {
      const seen = new Set();
      for (const e of [root, ...root.querySelectorAll("*")]) {
        const cs = getComputedStyle(e);
        seen.add(`${cs.wordBreak}/${cs.overflowWrap}/${cs.whiteSpace}`);
      }
      return [...seen];
    },
  };
  const queuePrompt = api.queuePrompt.bind(api);
  api.queuePrompt = async (...args) => {
    try { const r = await queuePrompt(...args); hk.queued.push(r); return r; }
    catch (e) { hk.queueErrors.push(String(e?.message ?? e)); throw e; }
  };
  api.addEventListener("hadakron.loss", (e) => hk.loss.push(e.detail));
  return true;
})()
"""


@pytest.fixture(scope="module")
def page(server):
    """The ComfyUI page, loaded, with our extension registered and the helpers installed; yields the Browser."""
    # A first start opens the template browser over the canvas; mark the tutorial done (user settings, temp dir).
    req = urllib.request.Request(server + "/settings", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"Comfy.TutorialCompleted": True}).encode())
    urllib.request.urlopen(req, timeout=5).close()
    b = Browser(_chromium())
    try:
        b.open_page()
        b.send("Page.navigate", {"url": server + "/"})
        b.wait_for("!!(window.app && window.app.graph && window.LiteGraph && window.comfyAPI && window.comfyAPI.api)",
                   timeout=120, what="the ComfyUI app")
        b.wait_for("window.app.extensions && window.app.extensions.some(e => e.name === 'hadakron.ui')",
                   timeout=60, what="the hadakron.ui extension to register")
        assert b.eval(HELPERS_JS) is True
        yield b
    finally:
        shot = os.environ.get("HADAKRON_SCREENSHOT")
        if shot:
            try:
                b.screenshot(Path(shot))
            except (OSError, RuntimeError, TimeoutError):
                pass
        b.close()


def _our_problems(browser: Browser) -> list[str]:
    return [p for p in browser.console_problems() if "hadakron" in p.lower()]


def _load_template(page: Browser, stem: str) -> None:
    page.eval(f"window.__hk.loadTemplate({json.dumps(PACK_DIR_NAME)}, {json.dumps(stem)})", timeout=60)
    page.eval("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    assert page.eval("window.__hk.missingTypes()") == [], f"{stem}: missing node types after loading"


def _without_titles(prompt: dict) -> dict:
    """A prompt without `_meta` (titles: the frontend shows translated display names; the server ignores them)."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def _overlaps(layout: list[dict]) -> list[tuple[str, str]]:
    """Pairs of nodes whose on-canvas rectangles ([x, y, w, h], title bar included) intersect."""
    out = []
    for i, a in enumerate(layout):
        for b in layout[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((f"{a['id']} {a['type']}", f"{b['id']} {b['type']}"))
    return out


# ---------------------------------------------------------------- the server side of the extension


def test_extensions_listing_has_our_modules_only(server):
    listed = _get(server + "/extensions")
    ours = sorted(p for p in listed if p.startswith(f"/extensions/{PACK_DIR_NAME}/"))
    assert f"/extensions/{PACK_DIR_NAME}/hadakron.js" in ours
    assert f"/extensions/{PACK_DIR_NAME}/lib/chart_math.js" in ours
    assert not any("test" in p for p in ours), ours
    for path in ours:  # every listed module is served as JavaScript
        with urllib.request.urlopen(server + path, timeout=5) as r:
            assert "javascript" in r.headers.get("Content-Type", ""), (path, r.headers.get("Content-Type"))


def test_templates_are_listed(server):
    """The template browser lists every file of example_workflows/ under this pack."""
    listed = _get(server + "/api/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == [p.stem for p in workflow_paths()], listed


def test_extension_loads_without_errors(page):
    assert page.eval("window.app.extensions.filter((e) => e.name === 'hadakron.ui').length") == 1
    assert _our_problems(page) == []


# ---------------------------------------------------------------- every template, loaded and run from the UI


@pytest.fixture(scope="module")
def object_info(comfy, file_names):
    return comfy.object_info()  # after the test files are in place (the combo lists hold them)


@pytest.mark.parametrize("path", workflow_paths(), ids=[p.stem for p in workflow_paths()])
def test_template_loads_as_the_converter_reads_it(page, path, object_info):
    """No missing node; the frontend keeps every node's size, none overlap, and its graphToPrompt is our prompt."""
    _load_template(page, path.stem)
    wf = json.loads(path.read_text())
    layout = page.eval("window.__hk.layout()")
    sizes = {str(n["id"]): n["size"] for n in wf["nodes"]}
    resized = [(n["id"], n["type"], n["size"], sizes[n["id"]]) for n in layout
               if [round(x) for x in n["size"]] != sizes[n["id"]]]
    assert resized == [], f"{path.name}: the frontend resized nodes (id, type, shown, file): {resized}"
    assert _overlaps(layout) == [], f"{path.name}: overlapping nodes as shown"
    assert _without_titles(page.eval("window.__hk.prompt()")) == _without_titles(
        json.loads(json.dumps(to_api(wf, object_info)))), f"{path.name}: graphToPrompt differs from workflow_api"
    assert _our_problems(page) == []


def _wait_for_history(comfy, prompt_id: str, timeout: float = 900.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = comfy.history(prompt_id)
        if h.get("status", {}).get("completed") or h.get("status", {}).get("status_str") == "error":
            return h
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} queued from the UI did not finish in {timeout:.0f} s\n{comfy.log_tail()}")


def _queue_from_button(page: Browser, prompt: dict) -> str:
    """Put the prompt's widget values into the loaded graph, check the UI would queue exactly that prompt, click
    Run; returns the prompt id the server answered (no validation error)."""
    values = {k: {n: v for n, v in e["inputs"].items() if not isinstance(v, list)} for k, e in prompt.items()}
    page.eval(f"window.__hk.setWidgets({json.dumps(values)})")
    assert _without_titles(page.eval("window.__hk.prompt()")) == _without_titles(json.loads(json.dumps(prompt)))
    queued = page.eval("window.__hk.queued.length")
    assert page.eval("(() => { const b = window.__hk.runButton(); if (!b) return false; b.click(); return true; })()"), \
        "no Run button ([data-testid=queue-button]) in the page"
    answer = page.wait_for(f"window.__hk.queued.length > {queued} ? window.__hk.queued[{queued}] : "
                           f"(window.__hk.queueErrors.length ? {{error: window.__hk.queueErrors}} : null)",
                           timeout=60, what="POST /prompt from the Run button")
    assert "error" not in answer and not answer.get("node_errors"), f"the server rejected the prompt: {answer}"
    return answer["prompt_id"]


def _finished(comfy, prompt_id: str) -> dict:
    history = _wait_for_history(comfy, prompt_id)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"], indent=1)[:4000]
    return history


def _chart(page: Browser, trainer: str, condition: str, what: str, timeout: float = 60.0) -> dict:
    """The trainer's chart (status text, run state and its badge, message, drawn point count, canvas pixels, stored
    curve) once `condition` (JS on `txt`, `points`, `state`, `msg`) holds; the canvas is scrolled into view first
    (hidden DOM widgets are not drawn)."""
    assert page.eval(f"window.__hk.showWidget({json.dumps(trainer)}, 'hadakron_loss_chart')") > 100
    expression = f"""(() => {{
      const n = window.__hk.node({json.dumps(trainer)}), el = window.__hk.widgetEl(n, 'hadakron_loss_chart');
      const txt = el && el.querySelector('.hadakron-status').textContent, points = el && Number(el.dataset.points);
      const state = el && el.dataset.state, badge = el && el.querySelector('.hadakron-state').textContent;
      const msg = el && el.querySelector('.hadakron-message').textContent;
      return {{ ok: !!(el && ({condition})), txt, points, state, badge, msg,
        px: el && window.__hk.pixels(el.querySelector('canvas')), curve: n.properties.hadakron_loss_curve ?? null,
        stored_state: n.properties.hadakron_loss_state ?? null }}; }})()"""
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = page.eval(expression)
        if state["ok"]:
            return state
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: chart {state}")


def _reload_workflow(page: Browser) -> None:
    """Save the workflow and open it again (what a tab switch does): every node is created anew."""
    page.eval("(async () => { await window.__hk.app.loadGraphData(window.__hk.app.graph.serialize()); return true; })()",
              timeout=60)


def _reload_mid_run(page: Browser, prompt: dict, live_before: int) -> None:
    """Reload the workflow after the trainer's first live step; the new chart continues the stored curve."""
    trainer = first_of(prompt, TRAINER_TYPES)
    steps = prompt[trainer]["inputs"]["steps"]
    seen = f"window.__hk.loss.slice({live_before}).filter((e) => String(e.node) === {json.dumps(trainer)}).length"
    page.wait_for(f"{seen} > 0", timeout=900, what="the trainer's first live loss event")
    _reload_workflow(page)
    at_reload = page.eval(seen)
    assert at_reload < steps, "the run ended before the workflow was reloaded"
    # before the final curve arrives, a live step after the reload is drawn with every step before it (stored
    # with the workflow): the point count equals the step number
    shown = _chart(page, trainer, f"!txt.includes('done') && points > {at_reload} && "
                   f"txt.includes(`step ${{points}} / {steps}`)", "the reloaded chart continuing the run",
                   timeout=900)
    assert shown["px"]["orange"] > 20, shown


def _check_trainer_chart(page: Browser, prompt: dict, history: dict, live_before: int) -> None:
    trainer = first_of(prompt, TRAINER_TYPES)
    steps = prompt[trainer]["inputs"]["steps"]
    live = [e for e in page.eval("window.__hk.loss")[live_before:] if str(e["node"]) == trainer]
    assert [e["step"] for e in live] == list(range(1, steps + 1)), live  # this run's own websocket events
    shown = _chart(page, trainer, "txt.includes('done') && points > 0", "the finished loss chart")
    assert f"step {steps} / {steps}" in shown["txt"] and shown["points"] == steps, shown
    assert shown["px"]["nonBg"] > 500 and shown["px"]["orange"] > 20, shown["px"]
    curve = json.loads(history["outputs"][trainer]["hadakron_loss"][0])["loss"]
    assert shown["curve"]["raw"]["xs"] == list(range(1, steps + 1)), shown["curve"]
    for drawn, event, final in zip(shown["curve"]["raw"]["ys"], live, curve):
        assert abs(drawn - event["loss"]) <= 1e-4 * max(1.0, abs(event["loss"])), (drawn, event)
        assert abs(event["loss"] - final) <= 1e-6 * max(1.0, abs(final)), (event, final)
    assert shown["state"] == "finished" and shown["badge"] == "finished", shown
    _node_screenshot(page, trainer, f"trainer-finished-{trainer}")
    # the workflow is saved and opened again: the new node instance shows the stored final curve
    _reload_workflow(page)
    restored = _chart(page, trainer, "txt.includes('done') && points > 0", "the restored chart after a reload")
    assert f"step {steps} / {steps}" in restored["txt"] and restored["points"] == steps, restored


def _expected_headline(report: dict) -> str:
    bits = [report["family"].upper(), f"{report['matched_count']}/{report['total_modules']} applied"]
    if report["unmatched_count"]:
        bits.append(f"{report['unmatched_count']} not applied")
    if report.get("problems"):
        bits.append(f"{len(report['problems'])} warning{'s' if len(report['problems']) > 1 else ''}")
    return " \u00b7 ".join(bits)


def _shown_report(page: Browser, node_id: str) -> dict:
    return page.wait_for(f"""(() => {{
      const el = window.__hk.widgetEl(window.__hk.node({json.dumps(node_id)}), 'hadakron_report_view');
      const h = el && el.querySelector('.hadakron-headline');
      return el && el.dataset.text ? {{ head: h ? h.textContent : null, text: el.dataset.text }} : null; }})()""",
                         timeout=30, what=f"the result shown on node {node_id}")


SHOT_DIR = Path(os.environ.get("HADAKRON_SCREENSHOT_DIR") or "/tmp/hadakron-screenshots")
BAD_WRAP = ("break-all", "anywhere")


def _node_screenshot(page: Browser, node_id: str, name: str) -> Path:
    """A PNG of one node as shown (title bar included) in SHOT_DIR (env HADAKRON_SCREENSHOT_DIR)."""
    import base64
    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    _show_node(page, node_id)
    r = page.eval(f"window.__hk.nodeScreenRect({json.dumps(node_id)})")
    clip = {"x": max(0.0, r["x"] - 6), "y": max(0.0, r["y"] - 6), "width": r["width"] + 12,
            "height": r["height"] + 12, "scale": 1}
    path = SHOT_DIR / f"{name}.png"
    path.write_bytes(base64.b64decode(page.send("Page.captureScreenshot", {"format": "png", "clip": clip})["data"]))
    return path


def _show_node(page: Browser, node_id: str) -> None:
    """Zoom 1, the node's top left near the page's top left, clear of the side bar and the graph menu (DOM widgets
    off screen are hidden)."""
    page.eval(f"""(async () => {{ const app = window.__hk.app, n = window.__hk.node({json.dumps(node_id)});
      app.canvas.ds.scale = 1; app.canvas.ds.offset = [140 - n.pos[0], 160 - n.pos[1]]; app.canvas.setDirty(true, true);
      for (let i = 0; i < 6; i++) await new Promise((r) => requestAnimationFrame(r)); return true; }})()""")


def _measure_report(page: Browser, node_id: str) -> dict:
    return page.eval(f"""(() => {{
      const hk = window.__hk, n = hk.node({json.dumps(node_id)}), el = hk.widgetEl(n, 'hadakron_report_view');
      const r = el.getBoundingClientRect(), node = hk.nodeScreenRect({json.dumps(node_id)});
      const hint = el.querySelector('.hadakron-more');
      return {{ shown: el.clientHeight, content: el.scrollHeight, width: el.clientWidth, clipped: hk.clipped(el),
        styles: hk.wrapStyles(el), breaks: hk.midWordBreaks(el), bottom: r.bottom, right: r.right,
        node_bottom: node.y + node.height, node_right: node.x + node.width,
        hint: !!hint && getComputedStyle(hint).display !== 'none' }}; }})()""")


def _check_readable(page: Browser, node_id: str, name: str) -> dict:
    """The report on a node: no word-breaking style, no line broken inside a word or number (rendered text
    measured), every cut element scrolls with a visible scrollbar (and the bottom hint when the report itself is
    cut), the report inside its node; again with every section opened, and with the report 190 px wide (so that long
    lines must wrap). Screenshots of each."""
    _show_node(page, node_id)
    out = {}
    report_el = f"window.__hk.widgetEl(window.__hk.node({json.dumps(node_id)}), 'hadakron_report_view')"
    for phase in ("default", "expanded", "narrow"):
        if phase == "narrow":
            page.eval(f"""(async () => {{ {report_el}.style.width = '190px';
              for (let i = 0; i < 8; i++) await new Promise((r) => requestAnimationFrame(r)); return true; }})()""")
        if phase == "expanded":
            page.eval(f"""(async () => {{ const el = window.__hk.widgetEl(window.__hk.node({json.dumps(node_id)}),
              'hadakron_report_view'); el.querySelectorAll('details').forEach((d) => {{ d.open = true; }});
              for (let i = 0; i < 6; i++) await new Promise((r) => requestAnimationFrame(r)); return true; }})()""")
            _show_node(page, node_id)
        m = _measure_report(page, node_id)
        assert not [st for st in m["styles"] if any(b in st for b in BAD_WRAP)], (name, phase, m["styles"])
        assert m["breaks"]["bad"] == [], (name, phase, "lines broken inside a word/number", m["breaks"])
        for c in m["clipped"]:
            assert c["overflow"] in ("auto", "scroll") and c["bar"] > 0, (name, phase, "cut without a scrollbar", c)
            if "hadakron-report" in str(c["cls"]) and c["axis"] == "y" and phase == "default":
                assert m["hint"], (name, "report cut without the 'more below' hint", m)
        assert m["bottom"] <= m["node_bottom"] + 1 and m["right"] <= m["node_right"] + 1, (name, phase, m)
        if phase == "narrow":
            assert m["breaks"]["wrapped"] > 0, (name, "nothing wrapped in a 190 px report", m)
        _node_screenshot(page, node_id, f"{name}-{phase}")
        out[phase] = m
        print(f"{name} report ({phase}): shown {m['shown']} of {m['content']} px, width {m['width']} px, "
              f"{m['breaks']['wrapped']} wrapped lines, cut elements {[(c['cls'], c['axis'], c['shown'], c['content']) for c in m['clipped']]}")
    page.eval(f"(() => {{ {report_el}.style.width = ''; return true; }})()")
    return out


def _check_heatmap(page: Browser, node_id: str, report: dict) -> None:
    """The loader's heatmap: one cell per block of delta_norms; where a block has norm the cell is coloured (and the
    largest norm is the brightest), where it has no module the cell is the empty grey."""
    cells = report["delta_norms"]["cells"]
    assert any(c["norm"] > 0 for c in cells), cells
    got = page.eval(f"""(() => {{
      const el = window.__hk.widgetEl(window.__hk.node({json.dumps(node_id)}), 'hadakron_report_view');
      const c = el.querySelector('canvas.hadakron-heatmap');
      if (!c || !c.dataset.rects) return null;
      const k = Number(c.dataset.scale), d = c.getContext('2d');
      return {{ cells: Number(c.dataset.cells), px: JSON.parse(c.dataset.rects).map(([x, y, w, h, b]) =>
        [b, [...d.getImageData(Math.floor((x + 2) * k), Math.floor((y + 2) * k), 1, 1).data].slice(0, 3)]) }}; }})()""")
    assert got is not None, "no heatmap canvas drawn on the loader"
    assert got["cells"] == len(cells) == len(got["px"])
    assert [b for b, _ in got["px"]] == [c["block"] for c in cells]
    grey = {(0x2c,) * 3, (0x45,) * 3, (0x1b,) * 3}
    for (block, px), c in zip(got["px"], cells):
        if c["modules"] == 0:
            assert all(abs(v - 0x2c) <= 2 for v in px), (block, px, "empty block not drawn empty")
        elif c["norm"] > 0:
            assert tuple(px) not in grey and max(px) - min(px) > 20, (block, px, "block with norm not coloured")
    top = max(range(len(cells)), key=lambda i: cells[i]["norm"])
    assert sum(got["px"][top][1]) == max(sum(p) for _, p in got["px"]), (cells[top], got["px"][top])


def _check_reports(page: Browser, prompt: dict, history: dict) -> None:
    for node_id in nodes_of(prompt, "HadakronLoader"):
        report = load_report(history["outputs"][node_id])
        assert report["matched_count"] > 0, report
        assert _shown_report(page, node_id)["head"] == _expected_headline(report)
        _check_readable(page, node_id, f"loader-{report['family']}-{node_id}")
        _check_heatmap(page, node_id, report)
    for typ, label in (("HadakronSaveAdapter", "save"), ("HadakronAdapterMerge", "merge"),
                       ("HadakronAdapterCombine", "combine")):
        for node_id in nodes_of(prompt, typ):
            text = history["outputs"][node_id]["text"][0]
            shown = _shown_report(page, node_id)
            assert shown["head"] == text.splitlines()[0], (typ, shown, text)
            assert text.splitlines()[0] in shown["text"], (typ, text)
            _check_readable(page, node_id, f"{label}-{node_id}")


# CI queues these with the Run button (one train, one load, merge); the SDXL train template runs in the full suite
# (its graph is covered in CI by test_server_trainer.py through POST /prompt).
CI_BUTTON_RUNS = {"hadakron_anima_train_lokr", "hadakron_load_lokr", "hadakron_merge_adapters"}


@pytest.mark.parametrize("path", workflow_params(CI_BUTTON_RUNS))
def test_template_runs_from_the_run_button(page, comfy, path, object_info, file_names):
    _load_template(page, path.stem)
    # one trainer step more than test_example_workflows_run.py, so the server trains again instead of answering
    # from its cache: the chart must be drawn from this run's own events
    prompt = prompt_for_test_run(json.loads(path.read_text()), object_info, file_names[family_of(path)],
                                 trainer_steps=TRAIN_STEPS + 1)
    trains = any(nodes_of(prompt, t) for t in TRAINER_TYPES)
    t0 = time.time()
    live_before = page.eval("window.__hk.loss.length")
    prompt_id = _queue_from_button(page, prompt)
    if trains:
        _reload_mid_run(page, prompt, live_before)
    history = _finished(comfy, prompt_id)
    for typ in ("HadakronLoader", "HadakronSaveAdapter", "HadakronAdapterMerge", "HadakronAdapterCombine"):
        for node_id in nodes_of(prompt, typ):
            _shown_report(page, node_id)
    assert _overlaps(page.eval("window.__hk.layout()")) == [], f"{path.name}: nodes overlap after the run's results"
    _check_reports(page, prompt, history)  # opens every report section (nodes may then grow into their neighbours)
    if trains:
        _check_trainer_chart(page, prompt, history, live_before)  # last: it reloads the workflow again
    assert _our_problems(page) == []
    print(f"{path.stem} from the Run button: {time.time() - t0:.1f} s")


def test_trainer_chart_interrupted_then_failed(page, comfy, object_info, file_names):
    """Real runs, states from ComfyUI's own events matched to the trainer's id: a long run interrupted through
    POST /interrupt after its first live steps shows 'interrupted' with its curve; then a run whose trainer raises
    (autosave_prefix leaves the output folder) shows 'failed' with the one-line reason while the interrupted run's
    curve stays drawn, also after the workflow is saved and opened again."""
    path = next(p for p in workflow_paths() if p.stem == "hadakron_anima_train_lokr")
    _load_template(page, path.stem)
    prompt = prompt_for_test_run(json.loads(path.read_text()), object_info, file_names[family_of(path)],
                                 trainer_steps=300)
    trainer = first_of(prompt, list(TRAINER_TYPES))
    live_before = page.eval("window.__hk.loss.length")
    prompt_id = _queue_from_button(page, prompt)
    seen = f"window.__hk.loss.slice({live_before}).filter((e) => String(e.node) === {json.dumps(trainer)}).length"
    page.wait_for(f"{seen} >= 6", timeout=900, what="six live loss events")
    running = _chart(page, trainer, "state === 'running' && points >= 6", "the running chart")
    assert running["badge"] == "running", running
    _node_screenshot(page, trainer, "trainer-running")
    comfy.interrupt()
    history = _wait_for_history(comfy, prompt_id)
    assert history["status"]["status_str"] == "error", history["status"]
    assert any(m[0] == "execution_interrupted" for m in history["status"]["messages"]), history["status"]
    stopped = _chart(page, trainer, "state === 'interrupted' && points >= 6", "the interrupted chart")
    steps_done = stopped["points"]
    assert stopped["badge"] == "interrupted" and "/ 300" in stopped["txt"], stopped
    assert stopped["px"]["orange"] > 20, stopped["px"]  # the run's curve is drawn
    assert stopped["stored_state"] == {"state": "interrupted", "reason": ""}, stopped
    _node_screenshot(page, trainer, "trainer-interrupted")

    failing = json.loads(json.dumps(prompt))
    holder = next(k for k, v in failing.items() if "autosave_prefix" in v["inputs"])
    failing[holder]["inputs"]["autosave_prefix"] = "../outside_output"
    failing[trainer]["inputs"]["steps"] = TRAIN_STEPS
    prompt_id = _queue_from_button(page, failing)
    history = _wait_for_history(comfy, prompt_id)
    errors = [m[1] for m in history["status"]["messages"] if m[0] == "execution_error"]
    assert errors and str(errors[0]["node_id"]) == trainer, history["status"]
    reason = errors[0]["exception_message"].strip().splitlines()[0]
    assert "autosave_prefix" in reason, reason
    failed = _chart(page, trainer, "state === 'failed'", "the failed chart")
    assert failed["badge"] == "failed" and failed["msg"] == f"failed: {reason}", (failed, reason)
    assert failed["points"] == steps_done and failed["px"]["orange"] > 20, failed  # the last good curve stays
    assert failed["stored_state"] == {"state": "failed", "reason": reason}, failed
    text = page.eval(f"""(() => {{ const el = window.__hk.widgetEl(window.__hk.node({json.dumps(trainer)}),
      'hadakron_loss_chart'); return {{ breaks: window.__hk.midWordBreaks(el), clipped: window.__hk.clipped(el) }}; }})()""")
    assert text["breaks"]["bad"] == [], text  # the reason wraps at spaces and punctuation
    assert all(c["overflow"] in ("auto", "scroll") and c["bar"] > 0 for c in text["clipped"]
               if c["cls"] != "hadakron-loss"), text
    _node_screenshot(page, trainer, "trainer-failed")
    _reload_workflow(page)
    again = _chart(page, trainer, f"state === 'failed' && points === {steps_done}", "the failed chart after a reload")
    assert again["msg"] == f"failed: {reason}", again
    assert _our_problems(page) == []


def test_loader_report_collapses_and_scrolls_a_long_list(page, comfy, object_info, file_names):
    """A real loader run on a file with 30 modules of no known layer: the headline counts them, the not-applied list
    starts collapsed with its count in the title, and opened it scrolls inside the node with a visible scrollbar
    (no text cut without one, no line broken inside a word)."""
    import safetensors.torch
    import torch

    path = next(p for p in workflow_paths() if p.stem == "hadakron_load_lokr")
    _load_template(page, path.stem)
    prompt = prompt_for_test_run(json.loads(path.read_text()), object_info, file_names["sdxl"])
    loader = nodes_of(prompt, "HadakronLoader")[0]
    loras = comfy.models_dir("loras")
    tensors = safetensors.torch.load_file(str(loras / prompt[loader]["inputs"]["lora_name"]))
    g = torch.Generator().manual_seed(9)
    for i in range(30):
        key = f"lora_unet_input_blocks_{40 + i}_1_transformer_blocks_0_attn1_to_q"
        tensors |= {f"{key}.lokr_w1": torch.randn(4, 4, generator=g), f"{key}.lokr_w2": torch.randn(8, 8, generator=g)}
    name = "hadakron_test_sdxl_lokr_unknown_names.safetensors"
    safetensors.torch.save_file(tensors, str(loras / name))
    prompt[loader]["inputs"]["lora_name"] = name
    history = _finished(comfy, _queue_from_button(page, prompt))
    report = load_report(history["outputs"][loader])
    assert report["unmatched_count"] == 30 and report["matched_count"] > 0, report
    assert _shown_report(page, loader)["head"] == _expected_headline(report)
    listed = page.eval(f"""(() => {{ const el = window.__hk.widgetEl(window.__hk.node({json.dumps(loader)}),
      'hadakron_report_view'); const d = el.querySelector('details[data-kind="unmatched"]');
      return d && {{ open: d.open, title: d.querySelector('summary').textContent,
        lines: d.querySelectorAll('.hadakron-line').length }}; }})()""")
    assert listed == {"open": False, "title": "not applied (30: unknown module 30)", "lines": 30}, listed
    shown = _check_readable(page, loader, "loader-long-list")
    lists = [c for c in shown["expanded"]["clipped"] if "hadakron-list" in str(c["cls"]) and c["axis"] == "y"]
    assert lists and all(c["bar"] > 0 for c in lists), shown["expanded"]["clipped"]  # the opened list scrolls
    assert _our_problems(page) == []

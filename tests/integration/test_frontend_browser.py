"""Browser test of the web/ extension against a real ComfyUI server and its real frontend (headless Chromium).

Uses conftest's `comfy_server` (COMFYUI_PATH; run with ComfyUI's venv, which has comfyui-frontend-package),
opens the UI in Debian's chromium driven over the DevTools protocol (pipe transport, no extra Python
package), and checks that: /extensions lists our modules; the extension registers without
console errors from our scripts; a trainer node draws a live loss chart from "hadakron.loss" WS messages and
keeps the final curve after an "executed" message and a workflow reload; a loader node shows its load report.
Skipped with the reason when COMFYUI_PATH, chromium or the frontend package is missing.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def page(server):
    """The ComfyUI page, loaded, with our extension registered; yields the Browser."""
    # A first start opens the template browser over the canvas; mark the tutorial done (user settings, temp dir).
    req = urllib.request.Request(server + "/settings", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"Comfy.TutorialCompleted": True}).encode())
    urllib.request.urlopen(req, timeout=5).close()
    b = Browser(_chromium())
    try:
        b.open_page()
        b.send("Page.navigate", {"url": server + "/"})
        b.wait_for("!!(window.app && window.app.graph && window.LiteGraph && window.comfyAPI && window.comfyAPI.api)",
                   timeout=90, what="the ComfyUI app")
        b.wait_for("window.app.extensions && window.app.extensions.some(e => e.name === 'hadakron.ui')",
                   timeout=60, what="the hadakron.ui extension to register")
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


# ---------------------------------------------------------------- page helpers (JS)

HELPERS_JS = r"""
window.__hk = {
  app: window.comfyAPI.app.app,
  api: window.comfyAPI.api.api,
  frame() { return new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))); },
  add(type, pos) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error("cannot create node " + type);
    node.pos = pos;
    this.app.graph.add(node);
    this.app.canvas.ds.offset = [0, 0];
    this.app.canvas.ds.scale = 1;
    this.app.graph.setDirtyCanvas(true, true);
    return node;
  },
  // Feeds a message through the real WebSocket 'message' handler of the api (type filtering included).
  ws(type, data) {
    this.wsRaw(JSON.stringify({ type, data }));
  },
  // The same with the exact text the server sends (Python's json.dumps of {"type", "data"}).
  wsRaw(text) {
    this.api.socket.dispatchEvent(new MessageEvent("message", { data: text }));
  },
  widgetEl(node, name) {
    const w = node.widgets.find((w) => w.name === name);
    return w && w.element;
  },
  // Pixels of the chart canvas: total, non-background, and close to the smoothed-curve colour (255,165,60).
  pixels(canvas) {
    const ctx = canvas.getContext("2d");
    const { width, height } = canvas;
    const d = ctx.getImageData(0, 0, width, height).data;
    let nonBg = 0, orange = 0;
    for (let i = 0; i < d.length; i += 4) {
      const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
      if (Math.abs(r - 0x1b) + Math.abs(g - 0x1b) + Math.abs(b - 0x1b) > 30) nonBg++;
      if (Math.abs(r - 255) < 40 && Math.abs(g - 165) < 40 && Math.abs(b - 60) < 50) orange++;
    }
    return { width, height, nonBg, orange };
  },
};
true;
"""


def test_extensions_listing_has_our_modules_only(server):
    listed = _get(server + "/extensions")
    ours = sorted(p for p in listed if p.startswith(f"/extensions/{PACK_DIR_NAME}/"))
    assert f"/extensions/{PACK_DIR_NAME}/hadakron.js" in ours
    assert f"/extensions/{PACK_DIR_NAME}/lib/chart_math.js" in ours
    assert not any("test" in p for p in ours), ours
    for path in ours:  # every listed module is served as JavaScript
        with urllib.request.urlopen(server + path, timeout=5) as r:
            assert "javascript" in r.headers.get("Content-Type", ""), (path, r.headers.get("Content-Type"))


def test_nodes_are_registered(server):
    info = _get(server + "/object_info")
    for name in ("HadakronLoKrTrainer", "HadakronLoHaTrainer", "HadakronLoader", "HadakronLoaderModelOnly",
                 "HadakronSaveAdapter", "HadakronAdapterMerge", "HadakronAdapterCombine"):
        assert name in info, f"{name} missing from /object_info"


def test_extension_loads_without_errors(page):
    assert page.eval(HELPERS_JS) is True
    assert _our_problems(page) == []
    assert page.eval("window.__hk.api._registered ? window.__hk.api._registered.has('hadakron.loss') : true") is True


def test_trainer_live_chart_final_curve_and_reload(page):
    page.eval(HELPERS_JS)
    info = page.eval("""(() => {
      const n = window.__hk.add('HadakronLoKrTrainer', [40, 40]);
      window.__hk.trainer = n;
      return { id: String(n.id), hasWidget: !!window.__hk.widgetEl(n, 'hadakron_loss_chart'),
               chartIndex: n.widgets.findIndex((w) => w.name === 'hadakron_loss_chart'),
               widgetCount: n.widgets.length, saved: (n.serialize().widgets_values || []).length };
    })()""")
    assert info["hasWidget"], "chart widget missing on the trainer node"
    node_id = info["id"]
    # the chart widget comes after the node's own widgets and is not saved with the workflow's widget values
    assert info["chartIndex"] == info["widgetCount"] - 1, info
    assert info["saved"] == info["chartIndex"], info

    # 60 live steps of a decaying noisy loss through the real WS message handler
    events = [{"node": node_id, "step": s, "total": 100, "loss": 1.0 / (1 + 0.05 * s) + 0.05 * ((s * 37) % 7) / 7,
               "lr": 1e-4} for s in range(1, 61)]
    page.eval("(() => { for (const e of %s) window.__hk.ws('hadakron.loss', e); return true; })()" % json.dumps(events))
    page.eval("window.__hk.frame().then(() => true)")
    live = page.wait_for("""(() => {
      const el = window.__hk.widgetEl(window.__hk.trainer, 'hadakron_loss_chart');
      const txt = el.querySelector('.hadakron-status').textContent;
      const px = window.__hk.pixels(el.querySelector('canvas'));
      return txt.includes('step 60 / 100') && px.orange > 20 ? { txt, px } : null;
    })()""", timeout=20, what="the live chart to draw step 60")
    assert "loss " in live["txt"] and "lr 1.00e-4" in live["txt"], live
    assert live["px"]["width"] >= 200 and live["px"]["height"] >= 80, live
    assert live["px"]["nonBg"] > 500, live

    # an event for another node id does not touch this chart
    page.eval("window.__hk.ws('hadakron.loss', {node: '999999', step: 1, total: 5, loss: 9, lr: 1}) || true")

    # the run ends: executed message with the final curve (100 steps)
    final = [1.0 / (1 + 0.05 * s) for s in range(1, 101)]
    output = {"hadakron_loss": [json.dumps({"loss": final})], "text": ["trained to step 100; final loss 0.1667"]}
    page.eval("window.__hk.ws('executed', %s) || true" % json.dumps(
        {"node": node_id, "display_node": node_id, "output": output, "prompt_id": "p1"}))
    done = page.wait_for("""(() => {
      const el = window.__hk.widgetEl(window.__hk.trainer, 'hadakron_loss_chart');
      const txt = el.querySelector('.hadakron-status').textContent;
      return txt.includes('done') ? { txt, prop: window.__hk.trainer.properties.hadakron_loss_curve,
        message: el.querySelector('.hadakron-message').textContent } : null;
    })()""", timeout=20, what="the final curve")
    assert "step 100 / 100" in done["txt"], done["txt"]
    assert done["message"] == "trained to step 100; final loss 0.1667"
    assert done["prop"]["count"] == 100 and done["prop"]["finished"] is True
    assert done["prop"]["raw"]["xs"][0] == 1 and done["prop"]["raw"]["xs"][-1] == 100

    # a new run starts (step 1): live points replace the final curve, and the stored outputs being
    # re-announced (queue panel, onNodeOutputsUpdated) must not wipe the run in progress
    page.eval("window.__hk.ws('hadakron.loss', %s) || true" % json.dumps(
        {"node": node_id, "step": 1, "total": 10, "loss": 0.5, "lr": 1e-4}))
    page.eval("(() => { window.__hk.app.nodeOutputs = {[%s]: %s}; return true; })()" % (json.dumps(node_id), json.dumps(output)))
    page.eval("window.__hk.ws('hadakron.loss', %s) || true" % json.dumps(
        {"node": node_id, "step": 2, "total": 10, "loss": 0.4, "lr": 1e-4}))
    rerun = page.wait_for("""(() => {
      const el = window.__hk.widgetEl(window.__hk.trainer, 'hadakron_loss_chart');
      const txt = el.querySelector('.hadakron-status').textContent;
      return txt.includes('step 2 / 10') ? txt : null;
    })()""", timeout=20, what="the second run's live chart")
    assert "done" not in rerun and "loss 0.4" in rerun, rerun
    assert page.eval("""window.__hk.widgetEl(window.__hk.trainer, 'hadakron_loss_chart')
      .querySelector('.hadakron-message').textContent""") == "", "a new run clears the last run's message"
    page.eval("window.__hk.ws('executed', %s) || true" % json.dumps(
        {"node": node_id, "display_node": node_id, "output": output, "prompt_id": "p1b"}))
    page.wait_for("""window.__hk.widgetEl(window.__hk.trainer, 'hadakron_loss_chart')
      .querySelector('.hadakron-status').textContent.includes('step 100 / 100')""", timeout=20, what="the final curve again")

    # save the workflow and load it again: the new node instance shows the stored curve
    page.eval("""(async () => {
      const wf = window.__hk.app.graph.serialize();
      await window.__hk.app.loadGraphData(wf);
      return true;
    })()""", timeout=60)
    restored = page.wait_for("""(() => {
      const n = window.__hk.app.graph._nodes.find((n) => n.type === 'HadakronLoKrTrainer');
      if (!n || n === window.__hk.trainer) return null;
      const el = window.__hk.widgetEl(n, 'hadakron_loss_chart');
      const txt = el.querySelector('.hadakron-status').textContent;
      const px = window.__hk.pixels(el.querySelector('canvas'));
      return txt.includes('done') && px.orange > 20 ? { txt, px } : null;
    })()""", timeout=30, what="the restored chart after reloading the workflow")
    assert "step 100 / 100" in restored["txt"]
    assert _our_problems(page) == []


def test_trainer_reloaded_mid_run_continues_its_curve(page):
    page.eval(HELPERS_JS)
    node_id = page.eval("""(() => { const n = window.__hk.add('HadakronLoHaTrainer', [40, 420]); return String(n.id); })()""")
    first = [{"node": node_id, "step": s, "total": 100, "loss": 1.0 - 0.005 * s, "lr": 5e-5} for s in range(1, 31)]
    page.eval("(() => { for (const e of %s) window.__hk.ws('hadakron.loss', e); return true; })()" % json.dumps(first))
    # the workflow is saved and opened again while training goes on (what a tab switch does)
    page.eval("""(async () => { await window.__hk.app.loadGraphData(window.__hk.app.graph.serialize()); return true; })()""",
              timeout=60)
    rest = [{"node": node_id, "step": s, "total": 100, "loss": 1.0 - 0.005 * s, "lr": 5e-5} for s in range(31, 41)]
    page.eval("(() => { for (const e of %s) window.__hk.ws('hadakron.loss', e); return true; })()" % json.dumps(rest))
    got = page.wait_for("""(() => {
      const n = window.__hk.app.graph.getNodeById(%s);
      const el = n && window.__hk.widgetEl(n, 'hadakron_loss_chart');
      if (!el) return null;
      const txt = el.querySelector('.hadakron-status').textContent;
      return txt.includes('step 40 / 100') ? { txt, points: el.dataset.points } : null;
    })()""" % json.dumps(node_id), timeout=20, what="the continued curve")
    assert got["points"] == "40", got
    assert "done" not in got["txt"]
    assert _our_problems(page) == []


REPORT = {
    "source": "style.safetensors", "family": "sdxl", "file_family": "sdxl", "layouts": ["kohya"],
    "loaded_parts": ["unet", "te1", "te2"], "total_modules": 42, "matched_count": 40, "unmatched_count": 2,
    "by_part": {"unet": 36, "te1": 4}, "by_block": {"unet": {"IN04": 10, "IN10": 6, "OUT02": 20}, "te1": {"TE": 4}},
    "by_algorithm": {"lokr": 40}, "matched": [],
    "unmatched": [
        {"key": "lora_unet_bogus_layer", "kind": "unknown_module", "reason": "not a SDXL layer name in any known key layout"},
        {"key": "lora_unet_output_blocks_0_1_proj_in", "kind": "shape_mismatch",
         "reason": "delta-W is [8, 8] but unet 'output_blocks.0.1.proj_in' weight is [1280, 1280]",
         "expected": [1280, 1280], "found": [8, 8]},
    ],
    "problems": [], "training": {"ss_network_dim": "16", "ss_network_args": {"algo": "lokr", "factor": 8}},
    "strengths": {"model": 1.0, "clip": 1.0}, "block_weights": "",
}


def test_loader_shows_report(page):
    page.eval(HELPERS_JS)
    node_id = page.eval("""(() => {
      const n = window.__hk.add('HadakronLoader', [500, 40]);
      window.__hk.loader = n;
      return String(n.id);
    })()""")
    output = {"hadakron_report": [json.dumps(REPORT)], "text": ["style.safetensors: 40/42 modules applied"]}
    page.eval("window.__hk.ws('executed', %s) || true" % json.dumps(
        {"node": node_id, "display_node": node_id, "output": output, "prompt_id": "p2"}))
    shown = page.wait_for("""(() => {
      const el = window.__hk.widgetEl(window.__hk.loader, 'hadakron_report_view');
      const head = el.querySelector('.hadakron-headline');
      return head ? { head: head.textContent, text: el.innerText, details: [...el.querySelectorAll('details')]
        .map((d) => [d.querySelector('summary').textContent, d.open]) } : null;
    })()""", timeout=20, what="the load report on the loader node")
    assert shown["head"] == "SDXL \u00b7 40/42 applied \u00b7 2 not applied"
    assert "IN10: 6" in shown["text"]
    assert "lora_unet_bogus_layer: not a SDXL layer name" in shown["text"]
    assert ["not applied (2: unknown module 1, shape mismatch 1)", True] in shown["details"]
    assert ["training metadata", False] in shown["details"]

    # a long unmatched list starts collapsed
    many = dict(REPORT, unmatched=[{"key": f"k{i}", "kind": "unknown_module", "reason": "unknown"} for i in range(30)],
                unmatched_count=30, total_modules=70)
    output = {"hadakron_report": [json.dumps(many)], "text": ["..."]}
    page.eval("window.__hk.ws('executed', %s) || true" % json.dumps(
        {"node": node_id, "display_node": node_id, "output": output, "prompt_id": "p3"}))
    collapsed = page.wait_for("""(() => {
      const el = window.__hk.widgetEl(window.__hk.loader, 'hadakron_report_view');
      const d = [...el.querySelectorAll('details')].find((d) => d.querySelector('summary').textContent.startsWith('not applied (30'));
      return d ? { open: d.open } : null;
    })()""", timeout=20, what="the collapsed unmatched list")
    assert collapsed["open"] is False

    # outputs restored from the queue/history panel reach a fresh loader node through onNodeOutputsUpdated
    other = page.eval("(() => { const n = window.__hk.add('HadakronLoaderModelOnly', [900, 40]); window.__hk.loader2 = n; return String(n.id); })()")
    page.eval("(() => { window.__hk.app.nodeOutputs = {[%s]: %s}; return true; })()" % (
        json.dumps(other), json.dumps({"hadakron_report": [json.dumps(REPORT)], "text": ["..."]})))
    page.wait_for("""(() => { const h = window.__hk.widgetEl(window.__hk.loader2, 'hadakron_report_view').querySelector('.hadakron-headline');
      return h && h.textContent.startsWith('SDXL'); })()""", timeout=20, what="the restored report")

    # text-only output (no JSON report) is shown as text
    page.eval("window.__hk.ws('executed', %s) || true" % json.dumps(
        {"node": node_id, "display_node": node_id, "output": {"text": ["plain report line"]}, "prompt_id": "p4"}))
    page.wait_for("""window.__hk.widgetEl(window.__hk.loader, 'hadakron_report_view').innerText.includes('plain report line')""",
                  timeout=20, what="the text-only report")
    assert _our_problems(page) == []


@pytest.mark.parametrize("node_type", ["HadakronSaveAdapter", "HadakronAdapterMerge", "HadakronAdapterCombine"])
def test_text_result_nodes_show_their_text(page, node_type):
    page.eval(HELPERS_JS)
    node_id = page.eval("(() => { const n = window.__hk.add(%s, [40, 700]); window.__hk.textNode = n; return String(n.id); })()"
                        % json.dumps(node_type))
    text = f"{node_type}: saved loras/hadakron/adapter_00001_.safetensors\nsecond line"
    page.eval("window.__hk.ws('executed', %s) || true" % json.dumps(
        {"node": node_id, "display_node": node_id, "output": {"text": [text]}, "prompt_id": "t"}))
    shown = page.wait_for("""(() => { const el = window.__hk.widgetEl(window.__hk.textNode, 'hadakron_report_view');
      return el && el.innerText.includes('second line') ? el.innerText : null; })()""", timeout=20, what="the text result")
    assert text.splitlines()[0] in shown
    assert _our_problems(page) == []


# ---------------------------------------------------------------- real payloads made by the Python nodes


def _server_text(msg_type: str, data) -> str:
    """What PromptServer.send_json puts on the socket (aiohttp's default dumps is json.dumps)."""
    return json.dumps({"type": msg_type, "data": data})


def test_real_loader_ui_output_renders(page, pack_nodes, small_sdxl, small_sdxl_clip, write_lora):
    """The loader node's own ui dict (a real run on a small SDXL built with ComfyUI's classes) shows as the report."""
    import torch
    from hadakron.comfy_keys import layer_shapes

    shapes = layer_shapes("sdxl", {k: v.shape for k, v in small_sdxl.model.state_dict().items()}, clip=False)
    candidates = sorted(d for (part, d), shp in shapes.items() if part == "unet" and len(shp) == 2 and ".attn1.to_" in d)
    assert len(candidates) >= 4, candidates
    linear, mismatch = candidates[:3], candidates[3]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for dotted in linear:
        out, cin = shapes[("unet", dotted)]
        key = "lora_unet_" + dotted.replace(".", "_")
        tensors[f"{key}.lokr_w1"] = torch.randn(2, 2, generator=g)
        tensors[f"{key}.lokr_w2_a"] = torch.randn(out // 2, 2, generator=g)
        tensors[f"{key}.lokr_w2_b"] = torch.randn(2, cin // 2, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    tensors["lora_unet_not_a_layer_at_all.lokr_w1"] = torch.randn(2, 2, generator=g)
    tensors["lora_unet_not_a_layer_at_all.lokr_w2"] = torch.randn(4, 4, generator=g)
    out, cin = shapes[("unet", mismatch)]
    bad = "lora_unet_" + mismatch.replace(".", "_")
    tensors[f"{bad}.lokr_w1"] = torch.randn(2, 2, generator=g)
    tensors[f"{bad}.lokr_w2"] = torch.randn(out // 2 + 1, cin // 2, generator=g)  # one row too many
    name = write_lora("frontend_report.safetensors", tensors,
                      {"ss_network_module": "lycoris.kohya", "ss_network_dim": "2", "ss_network_alpha": "2"})
    res = pack_nodes.HadakronLoader().load(small_sdxl, small_sdxl_clip, name, 1.0, 1.0, "")
    ui = res["ui"]
    report = json.loads(ui["hadakron_report"][0])
    applied, unapplied = report["matched_count"], report["unmatched_count"]
    assert applied == 3 and unapplied == 2, report

    page.eval(HELPERS_JS)
    node_id = page.eval("(() => { const n = window.__hk.add('HadakronLoader', [1200, 40]); window.__hk.realLoader = n; return String(n.id); })()")
    text = _server_text("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": "real"})
    page.eval("window.__hk.wsRaw(%s) || true" % json.dumps(text))
    shown = page.wait_for("""(() => { const el = window.__hk.widgetEl(window.__hk.realLoader, 'hadakron_report_view');
      const h = el.querySelector('.hadakron-headline');
      return h ? { head: h.textContent, text: el.innerText } : null; })()""", timeout=20, what="the real report")
    warns = len(report["problems"])
    expected = f"SDXL \u00b7 3/{applied + unapplied} applied \u00b7 {unapplied} not applied"
    expected += f" \u00b7 {warns} warning{'s' if warns > 1 else ''}" if warns else ""
    assert shown["head"] == expected, (shown["head"], report["problems"])
    for problem in report["problems"]:
        assert problem[:60] in shown["text"], problem
    assert "lora_unet_not_a_layer_at_all" in shown["text"]
    assert bad in shown["text"] and "shape mismatch 1" in shown["text"], shown["text"]
    assert "file: frontend_report.safetensors" in shown["text"]
    assert _our_problems(page) == []


def test_real_trainer_loss_messages_render(page, pack, monkeypatch):
    """The trainer's own _send_loss payloads, serialised as the server does, drive the chart."""
    import importlib
    import types

    trainer = importlib.import_module(pack.__name__ + ".nodes.trainer")
    sent = []

    class FakePromptServer:
        instance = types.SimpleNamespace(send_sync=lambda event, data, sid=None: sent.append((event, data)))

    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=FakePromptServer))
    page.eval(HELPERS_JS)
    node_id = page.eval("(() => { const n = window.__hk.add('HadakronLoKrTrainer', [1200, 500]); window.__hk.realTrainer = n; return String(n.id); })()")
    for step in range(1, 26):
        trainer._send_loss(node_id, step, 25, 0.5 / step ** 0.5, 1e-4 * (1 - step / 25))
    assert len(sent) == 25 and sent[0][0] == "hadakron.loss", sent[:1]
    texts = [_server_text(event, data) for event, data in sent]
    page.eval("(() => { for (const t of %s) window.__hk.wsRaw(t); return true; })()" % json.dumps(texts))
    got = page.wait_for("""(() => { const el = window.__hk.widgetEl(window.__hk.realTrainer, 'hadakron_loss_chart');
      const txt = el.querySelector('.hadakron-status').textContent;
      return txt.includes('step 25 / 25') ? { txt, points: el.dataset.points } : null; })()""", timeout=20,
                        what="the chart fed by the trainer's payloads")
    assert got["points"] == "25"
    assert "loss 0.1" in got["txt"], got  # 0.5 / 5 = 0.1
    assert _our_problems(page) == []

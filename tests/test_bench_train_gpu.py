"""bench/bench_train_gpu.py --quick runs on CPU and prints one table with every row; no timed assertions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS, ALGOS, METHODS, BASES = ("sdxl", "anima"), ("lokr", "loha"), ("ours", "core", "lycoris"), ("bf16", "fp8")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict]:
    """The bench's --quick stdout and its --json figures (one run for the module)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_train_gpu.py"), "--quick", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _table_rows(stdout: str) -> dict[tuple[str, ...], list[str]]:
    """{(model, algo, method, base): cells} from the markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in MODELS:
            rows[tuple(cells[:4])] = cells
    return rows


def test_quick_bench_prints_every_row_with_finite_figures(quick):
    stdout, data = quick
    rows = _table_rows(stdout)
    expected = {(m, a, me, b) for m in MODELS for a in ALGOS for me in METHODS for b in BASES}
    assert set(rows) == expected
    assert len(data["rows"]) == len(expected)
    for r in data["rows"]:
        cells = rows[(r["model"], r["algo"], r["method"], r["base"])]
        if r["s_per_step"] is None:  # a method that cannot run a configuration says why
            assert r["note"].startswith("n/a (") and cells[4] == "n/a", r
            continue
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0
        assert math.isfinite(r["peak_mib"]) and math.isfinite(r["loss"]) and r["adapter_params"] > 0
        assert math.isfinite(float(cells[4])) and math.isfinite(float(cells[5]))
    ran = {(r["model"], r["algo"], r["method"], r["base"]) for r in data["rows"] if r["s_per_step"] is not None}
    assert {k for k in expected if k[3] == "bf16" and k[2] in ("ours", "core")} <= ran  # bf16 always runs
    assert {k for k in expected if k[2] == "core"} <= ran  # the core formula upcasts fp8 per layer itself
    if any(k[2] == "lycoris" for k in ran):  # lycoris-lora installed: its bf16 rows run
        assert {k for k in expected if k[2] == "lycoris" and k[3] == "bf16"} <= ran


def test_quick_bench_same_adapter_sizes_across_methods(quick):
    _, data = quick
    sizes: dict[tuple[str, str], set[int]] = {}
    for r in data["rows"]:
        if r["adapter_params"] is not None:
            sizes.setdefault((r["model"], r["algo"]), set()).add(r["adapter_params"])
    assert sizes and all(len(v) == 1 for v in sizes.values()), sizes

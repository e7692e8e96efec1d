"""Smoke test of the serving benchmark: ``python -m benchmarks.serving --quick`` on the tiny
model.

Starts its own server through the benchmark (the path users run), with a couple of
configurations and few requests, and checks that the tables come out and that pruning lowers
the prompt tokens. The figures themselves are not checked: the tiny model's timings say nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
def test_bench_serve_quick_tiny(tmp_path: Path, tiny_qwen_dir: Path) -> None:
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.serving", "--quick",
           "--model", "tiny", "--model-dir", str(tiny_qwen_dir),
           "--methods", "lrcp", "--ratios", "0", "0.75",
           "--rounds", "2", "--wave-requests", "2", "--concurrency", "2",
           "--output-len", "4", "--no-kv", "--no-offline",
           "--json", str(out_json), "--docs", str(tmp_path / "docs"),
           "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "== Latency" in proc.stdout and "== Throughput" in proc.stdout, log
    assert "lrcp@0.75" in proc.stdout, log

    data = json.loads(out_json.read_text())
    rows = {r["config"]: r for r in data["summary"]["latency"]}
    assert rows["unpruned"]["n"] == 2 and rows["lrcp@0.75"]["n"] == 2
    assert rows["lrcp@0.75"]["prompt_tokens"] < rows["unpruned"]["prompt_tokens"]
    tp = {r["config"]: r for r in data["summary"]["throughput"]}
    assert tp["lrcp@0.75"]["requests"] == 2 and tp["lrcp@0.75"]["req_per_s"] > 0
    # the worker's scorer histogram on /metrics moved for the pruned requests only
    assert rows["lrcp@0.75"]["scorer_s"] > 0
    assert rows["unpruned"]["scorer_s"] == 0
    assert (tmp_path / "docs" / "benchmarks.md").exists()
    assert (tmp_path / "docs" / "bench_ttft.png").exists()

"""Smoke test of the serving benchmark: ``python -m benchmarks.serving --quick``.

The benchmark runs end to end (warm-up, latency and throughput phases, the scorer's time from
``/metrics``, tables, plots, JSON) against the session's TokenPrune server through
``--base-url`` (the path of a user measuring their own server): no server start of its own.
The server the benchmark starts when it has no ``--base-url`` is checked without starting it:
its command line (the launcher, the fast CPU options, the ALVTS flags where ``alvts`` is
benchmarked) and the launcher's one change to vLLM (its multimodal timing on), on vLLM's own
engine config. The figures themselves are not checked: the tiny model's timings say nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_tokenprune.testing.server import FAST_CPU_ARGS, VLLMServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
def test_bench_serve_quick_tiny(tmp_path: Path, tp_server: VLLMServer) -> None:
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.serving", "--quick",
           "--base-url", tp_server.base_url,
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


def test_bench_server_command(tmp_path: Path) -> None:
    """What ``python -m benchmarks.serving`` starts without ``--base-url``: the launcher with
    the fast CPU options, the TokenPrune architecture at ratio 0 by default, and the ALVTS flags
    only when ``alvts`` is benchmarked."""
    from benchmarks.serving.run import launch_command, parse_args, server_args

    plain = server_args(parse_args(["--quick"]), evs=False)
    cmd = launch_command(tmp_path, 8123, plain)
    assert cmd[:2] == [sys.executable, str(ROOT / "benchmarks" / "serving" / "launch.py")]
    assert cmd[2:8] == ["--model", str(tmp_path), "--port", "8123", "--host", "127.0.0.1"]
    assert cmd[8:8 + len(FAST_CPU_ARGS)] == list(FAST_CPU_ARGS)
    assert cmd[8 + len(FAST_CPU_ARGS):] == plain
    overrides = json.loads(plain[plain.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["TokenPruneQwen2_5_VLForConditionalGeneration"]
    assert overrides["token_prune"]["prune_ratio"] == 0.0
    assert "--disable-chunked-mm-input" not in plain
    alvts = server_args(parse_args(["--quick", "--methods", "lrcp", "alvts"]), evs=False)
    assert "--disable-chunked-mm-input" in alvts
    assert alvts[alvts.index("--scheduler-cls") + 1] == \
        "vllm_tokenprune.alvts.scheduler.WholeMediaScheduler"
    assert "alvts" in json.loads(alvts[alvts.index("--hf-overrides") + 1])[
        "token_prune"]["allowed_methods"]
    evs = server_args(parse_args(["--quick"]), evs=True)
    assert "--video-pruning-rate" in evs and "--hf-overrides" not in evs


@pytest.mark.slow
def test_launcher_turns_on_vllm_multimodal_timing(tiny_qwen_dir: Path) -> None:
    """``launch.py`` changes one thing: vLLM's engine config gets its multimodal processor
    timing on (vLLM's own ``EngineArgs``, the tiny model)."""
    from vllm.engine.arg_utils import EngineArgs

    def config() -> object:
        return EngineArgs(model=str(tiny_qwen_dir), enforce_eager=True, max_model_len=4096,
                          dtype="float32").create_engine_config()

    original = EngineArgs.create_engine_config
    assert not config().observability_config.enable_mm_processor_stats
    try:
        from benchmarks.serving import launch

        launch._enable_mm_stats()
        assert config().observability_config.enable_mm_processor_stats
    finally:
        EngineArgs.create_engine_config = original  # type: ignore[method-assign]

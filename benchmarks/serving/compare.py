"""Side-by-side table of ``python -m benchmarks.serving --json`` runs of different model presets.

    python -m benchmarks.serving.compare RUN_VL7B.json RUN_MID.json [--config lrcp@0.889]

For each run: the preset, its vision/LM compute ratio (``benchmarks/model_flops.py``), the vision
encoder's share of the unpruned TTFT (vLLM's own encoder timing + preprocessing), TTFT p50
unpruned and pruned, the TTFT speed-up (median and per-round range) next to the ideal one for that
floor and the one the MAC counts predict (``(r V + P0) / (r V + P)``: ``r`` vision/LM MACs per
visual token, ``V`` visual tokens, ``P0``/``P`` prompt tokens unpruned/pruned; Qwen2.5-VL-7B's
``r`` = 0.41 gives 2.54x for 588 -> 65 visual tokens in the benchmark's prompt), request
throughput speed-up at the run's concurrency, scorer time and the machine's load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _row(summary: dict[str, Any], table: str, config: str) -> dict[str, Any]:
    for r in summary[table]:
        if r["config"] == config:
            return r
    raise SystemExit(f"no {config!r} row in the {table} table")


def column(run: dict[str, Any], config: str) -> dict[str, str]:
    from benchmarks.model_flops import preset_config, ratio
    from benchmarks.serving.run import PRESETS

    res, summ = run["results"], run["summary"]
    meta = res["meta"]
    preset = (meta.get("preset") or {}).get("name") or "?"
    model = meta.get("model") or {}
    lat0, lat = _row(summ, "latency", "unpruned"), _row(summ, "latency", config)
    tp = _row(summ, "throughput", config)
    fl = summ["floor"]
    n = fl.get("prompt_tokens_unpruned")
    flops = mac_ideal = ""
    vis = (fl.get("offline") or {}).get("visual_tokens") or 588
    if preset in PRESETS:
        r = ratio(preset_config(PRESETS[preset][0]), vis)[2]
        flops = f"{r:.2f}"
        mac_ideal = f"{(r * vis + n) / (r * vis + lat['prompt_tokens']):.2f}x"
    load = f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}"
    return {
        "preset": f"`{preset}`",
        "LM / vision tower parameters": (f"{model.get('lm_params', 0) / 1e6:.0f}M / "
                                         f"{model.get('vision_params', 0) / 1e6:.1f}M"),
        "vision / LM MACs per visual token (588 tokens)": flops,
        "prompt tokens unpruned -> pruned": f"{n} -> {lat['prompt_tokens']}",
        "encoder (vLLM timing) ms": f"{fl['encoder_vllm'] * 1e3:.0f}",
        "floor (encoder + preprocessing) / unpruned TTFT": (
            f"{fl['floor_used'] / fl['ttft_unpruned']:.0%}"),
        "TTFT p50 unpruned ms": f"{lat0['ttft_p50'] * 1e3:.0f}",
        f"TTFT p50 {config} ms": f"{lat['ttft_p50'] * 1e3:.0f}",
        "TTFT speed-up (per-round range)": (f"{lat['ttft_speedup']:.2f}x "
                                            f"({lat['ttft_speedup_min']:.2f}-"
                                            f"{lat['ttft_speedup_max']:.2f}x)"),
        "ideal TTFT speed-up (measured floor + linear rest)": f"{lat['ideal_speedup']:.2f}x",
        "ideal TTFT speed-up from MAC counts (tower + LM)": mac_ideal,
        f"request throughput speed-up (c={summ['args']['concurrency']})": f"{tp['speedup']:.2f}x",
        "scorer ms / request": f"{lat['scorer_s'] * 1e3:.1f}",
        "latency rounds": f"{lat['n']}",
        "load average (1 min) start -> end": load,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="--json files of python -m benchmarks.serving")
    p.add_argument("--config", default="lrcp@0.889")
    p.add_argument("--labels", nargs="+", help="column titles after the preset (one per run)")
    args = p.parse_args(argv)
    cols = [column(json.loads(Path(f).read_text()), args.config) for f in args.runs]
    keys = list(cols[0])
    labels = args.labels or [""] * len(cols)
    titles = [f"{c['preset']} {t}".strip() for c, t in zip(cols, labels, strict=True)]
    print("| | " + " | ".join(titles) + " |")
    print("|---|" + "---|" * len(cols))
    for k in keys[1:]:
        print(f"| {k} | " + " | ".join(c[k] for c in cols) + " |")


if __name__ == "__main__":
    main()

"""Tables, verdicts, plots and ``docs/benchmarks.md`` for the serving benchmark
(``python -m benchmarks.serving``)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TARGET_METHOD = "lrcp"
TARGET_RATIO = 0.889
TTFT_TARGET = 3.0
THROUGHPUT_TARGET = 3.0
SCORER_SHARE_TARGET = 0.02
EVS_TOLERANCE = 0.05


def _pct(values: Sequence[float], q: float) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.percentile(vals, q)) if vals else math.nan


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.fmean(vals)) if vals else math.nan


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def parse_name(name: str) -> tuple[str | None, float]:
    if "@" in name:
        m, r = name.rsplit("@", 1)
        return m.split()[-1], float(r)
    return None, 0.0


# --------------------------------------------------------------------------- summary


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    lat = [r for r in results.get("latency", []) if r["ok"]]
    by_cfg: dict[str, list[dict[str, Any]]] = defaultdict(list)
    order: list[str] = []
    for r in results.get("latency", []):
        if r["config"] not in order:
            order.append(r["config"])
    for r in lat:
        by_cfg[r["config"]].append(r)
    order.sort(key=lambda n: (n == "text-only", n != "unpruned", parse_name(n)[0] or "",
                              parse_name(n)[1]))

    base = by_cfg.get("unpruned", [])
    ttft0 = _pct([r["ttft"] for r in base], 50)
    p0 = statistics.median([r["prompt_tokens"] for r in base]) if base else math.nan
    text = by_cfg.get("text-only", [])
    ttft_text = _pct([r["ttft"] for r in text], 50)
    encoder = _mean([(r["encoder_forward_s"] - r["scorer_s"])
                     if r["encoder_forward_s"] is not None else None for r in base])
    media_floor = ttft0 - ttft_text if text else math.nan
    offline = results.get("meta", {}).get("offline") or {}
    if not math.isnan(encoder):  # vLLM's own encoder timing + the HF processor's time
        floor = encoder + offline.get("preprocess_s", 0.0)
    else:
        floor = media_floor if not math.isnan(media_floor) else 0.0
    base_by_round = {r["round"]: r["ttft"] for r in base}

    latency_rows = []
    for name in order:
        rows = by_cfg.get(name, [])
        if not rows:
            latency_rows.append({"config": name, "n": 0})
            continue
        method, ratio = parse_name(name)
        ttfts = [r["ttft"] for r in rows]
        e2e = [r["latency"] for r in rows]
        ptok = statistics.median([r["prompt_tokens"] for r in rows])
        scorer = _mean([r["scorer_s"] for r in rows])
        enc = _mean([(r["encoder_forward_s"] - r["scorer_s"])
                     if r["encoder_forward_s"] is not None else None for r in rows])
        ttft = _pct(ttfts, 50)
        paired = [base_by_round[r["round"]] / r["ttft"] for r in rows
                  if r["round"] in base_by_round and r["ttft"] > 0]
        row: dict[str, Any] = {
            "config": name, "method": method, "ratio": ratio, "n": len(rows),
            "prompt_tokens": ptok,
            "ttft_p50": ttft, "ttft_p90": _pct(ttfts, 90), "ttft_p99": _pct(ttfts, 99),
            "e2e_p50": _pct(e2e, 50), "e2e_p90": _pct(e2e, 90), "e2e_p99": _pct(e2e, 99),
            "scorer_s": scorer, "encoder_s": enc,
        }
        if name != "text-only" and base:
            row["ttft_speedup"] = _div(ttft0, ttft)
            row["ttft_speedup_min"] = min(paired) if paired else math.nan
            row["ttft_speedup_max"] = max(paired) if paired else math.nan
            ideal = floor + (ttft0 - floor) * _div(ptok, p0)
            row["ideal_speedup"] = _div(ttft0, ideal)
            saved = ttft0 - ttft
            row["scorer_share"] = _div(scorer, saved) if ratio > 0 and saved > 0 else math.nan
        latency_rows.append(row)

    # throughput
    waves: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in results.get("waves", []):
        waves[w["config"]].append(w)
    tp_rows = []
    base_w = waves.get("unpruned", [])
    base_rps = _div(sum(w["ok"] for w in base_w), sum(w["duration"] for w in base_w))
    base_round_rps = {w["round"]: _div(w["ok"], w["duration"]) for w in base_w}
    for name in [n for n in order if n in waves]:
        ws = waves[name]
        dur = sum(w["duration"] for w in ws)
        ok = sum(w["ok"] for w in ws)
        method, ratio = parse_name(name)
        rps = _div(ok, dur)
        paired = [_div(w["ok"], w["duration"]) / base_round_rps[w["round"]] for w in ws
                  if w["round"] in base_round_rps]
        ttfts = [t for w in ws for t in w["ttfts"]]
        lats = [t for w in ws for t in w["latencies"]]
        tp_rows.append({
            "config": name, "method": method, "ratio": ratio, "requests": ok,
            "failed": sum(w["requests"] - w["ok"] for w in ws), "duration_s": dur,
            "req_per_s": rps, "out_tok_per_s": _div(sum(w["output_tokens"] for w in ws), dur),
            "total_tok_per_s": _div(sum(w["output_tokens"] + w["prompt_tokens"] for w in ws),
                                    dur),
            "prompt_tokens": _div(sum(w["prompt_tokens"] for w in ws), ok),
            "ttft_p50": _pct(ttfts, 50), "ttft_p90": _pct(ttfts, 90),
            "ttft_p99": _pct(ttfts, 99), "e2e_p50": _pct(lats, 50), "e2e_p90": _pct(lats, 90),
            "e2e_p99": _pct(lats, 99),
            "scorer_s_per_req": _div(sum(w["scorer_s"] for w in ws), ok),
            "speedup": _div(rps, base_rps),
            "speedup_min": min(paired) if paired else math.nan,
            "speedup_max": max(paired) if paired else math.nan,
        })

    kv_rows = _kv_rows(results.get("kv", []))
    video = _video_summary(results)
    summary = {
        "latency": latency_rows, "throughput": tp_rows, "kv": kv_rows, "video": video,
        "floor": {"ttft_unpruned": ttft0, "ttft_text_same_length": ttft_text,
                  "media_floor": media_floor, "encoder_vllm": encoder, "floor_used": floor,
                  "prompt_tokens_unpruned": p0,
                  "offline": results.get("meta", {}).get("offline")},
        "errors": results.get("errors", []),
    }
    summary["targets"] = _targets(summary, results)
    meta_args = results.get("meta", {}).get("args", {})
    summary["args"] = {k: meta_args.get(k) for k in ("concurrency", "output_len")}
    return summary


def _kv_rows(kv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    base = next((k for k in kv if k["ratio"] == 0 and k["ok"]), None)
    for k in kv:
        if not k["ok"] or not k["peak_usage"] or not k["num_blocks"]:
            rows.append({"config": k["config"], "ok": False})  # gauge never saw it running
            continue
        bs = k["block_size"] or 1
        blocks = k["peak_usage"] * (k["num_blocks"] - 1)  # usage excludes the null block
        tokens = k["prompt_tokens"] + k["output_tokens"]
        # a request holds ceil(computed tokens / block size) blocks: from ceil(P / bs) after
        # the prefill to ceil((P + out - 1) / bs) at the last decode step
        lo, hi = math.ceil(k["prompt_tokens"] / bs), math.ceil((tokens - 1) / bs)
        row = {"config": k["config"], "ratio": k["ratio"], "ok": True,
               "prompt_tokens": k["prompt_tokens"], "tokens": tokens, "block_size": bs,
               "num_blocks": k["num_blocks"], "blocks_measured": blocks,
               "blocks_expected_lo": lo, "blocks_expected": hi,
               "consistent": lo - 0.01 <= blocks <= hi + 0.01, "samples": k["samples"]}
        if base is not None and base["peak_usage"]:
            b0 = base["peak_usage"] * (base["num_blocks"] - 1)
            t0 = base["prompt_tokens"] + base["output_tokens"]
            row["blocks_saved_frac"] = 1 - blocks / b0
            row["tokens_saved_frac"] = 1 - tokens / t0
        rows.append(row)
    return rows


def _video_summary(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"blocked": results.get("video_blocked"), "rows": []}
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for v in results.get("video", []):
        if v["ok"]:
            by[(v["server"], v["config"])].append(v)
    for (server, cfg), vs in sorted(by.items()):
        out["rows"].append({
            "server": server, "config": cfg, "n": len(vs),
            "prompt_tokens": statistics.median([v["prompt_tokens"] for v in vs]),
            "ttft_p50": _pct([v["ttft"] for v in vs], 50),
            "ttft_p90": _pct([v["ttft"] for v in vs], 90),
            "e2e_p50": _pct([v["latency"] for v in vs], 50),
            "scorer_s": _mean([v["scorer_s"] for v in vs]),
            "encoder_forward_s": _mean([v["encoder_forward_s"] for v in vs]),
        })
    tp = [r for r in out["rows"] if r["server"] == "tokenprune" and "@" in r["config"]]
    evs = [r for r in out["rows"] if r["server"] == "evs" and "@" in r["config"]]
    ref = {r["server"]: r for r in out["rows"] if r["config"] == "video-ref-image"}
    if tp and evs:
        raw = _div(tp[0]["ttft_p50"], evs[0]["ttft_p50"])
        out["ratio_raw"] = raw
        if "tokenprune" in ref and "evs" in ref:
            drift = _div(ref["tokenprune"]["ttft_p50"], ref["evs"]["ttft_p50"])
            out["reference_ratio"] = drift
            out["ratio_normalized"] = _div(raw, drift)
        out["tp_prompt_tokens"] = tp[0]["prompt_tokens"]
        out["evs_prompt_tokens"] = evs[0]["prompt_tokens"]
    return out


def _targets(summary: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    lat = {r["config"]: r for r in summary["latency"]}
    tp = {r["config"]: r for r in summary["throughput"]}
    name = f"{TARGET_METHOD}@{TARGET_RATIO:g}"
    fl = summary["floor"]
    row = lat.get(name)
    if row and row.get("n"):
        sp, ideal = row["ttft_speedup"], row["ideal_speedup"]
        why = (f"floor pruning cannot touch (encoder + preprocessing, before the scorer): "
               f"{fl['floor_used'] * 1e3:.0f} ms of the unpruned "
               f"{fl['ttft_unpruned'] * 1e3:.0f} ms; with the rest linear in prompt tokens "
               f"that predicts {ideal:.2f}x (the LM's attention grows faster than linearly, so "
               "the measured figure can exceed it)")
        if sp < TTFT_TARGET:
            why += ("; the gap is per-request cost that does not scale with prompt tokens "
                    "(HTTP, chat template, scheduling, the first decode step)")
        targets.append({"target": f"TTFT {name} >= {TTFT_TARGET:g}x lower than unpruned (c=1)",
                        "measured": f"{sp:.2f}x (rounds {row['ttft_speedup_min']:.2f}-"
                                    f"{row['ttft_speedup_max']:.2f}x; ideal {ideal:.2f}x)",
                        "met": sp >= TTFT_TARGET, "why": why})
        share = row["scorer_share"]
        targets.append({"target": f"scorer < {SCORER_SHARE_TARGET:.0%} of the TTFT saved",
                        "measured": f"{share:.2%} ({row['scorer_s'] * 1e3:.1f} ms of "
                                    f"{(fl['ttft_unpruned'] - row['ttft_p50']) * 1e3:.0f} ms)",
                        "met": share < SCORER_SHARE_TARGET, "why": ""})
    trow = tp.get(name)
    if trow:
        sp = trow["speedup"]
        conc = results.get("meta", {}).get("args", {}).get("concurrency")
        outlen = results.get("meta", {}).get("args", {}).get("output_len")
        why = (f"below the TTFT speed-up: each request also decodes {outlen} tokens, and a "
               "decode step costs about the same at any prompt length")
        if sp < THROUGHPUT_TARGET:
            why += "; that, the encoder floor and the noise of a shared machine bound the gain"
        targets.append({"target": f"request throughput {name} >= {THROUGHPUT_TARGET:g}x "
                                  f"(c={conc})",
                        "measured": f"{sp:.2f}x (rounds {trow['speedup_min']:.2f}-"
                                    f"{trow['speedup_max']:.2f}x)",
                        "met": sp >= THROUGHPUT_TARGET, "why": why})
    v = summary["video"]
    if v.get("blocked"):
        targets.append({"target": "video TTFT within 5% of EVS", "measured": "not measured",
                        "met": False, "why": f"video blocked: {v['blocked']}"})
    elif "ratio_raw" in v:
        norm = v.get("ratio_normalized", math.nan)
        worst = max(x for x in (v["ratio_raw"], norm) if not math.isnan(x))
        met = worst <= 1 + EVS_TOLERANCE
        targets.append({
            "target": f"video TTFT ({TARGET_METHOD}) within {EVS_TOLERANCE:.0%} of EVS "
                      "(not slower by more)",
            "measured": f"LRCP/EVS TTFT p50 {v['ratio_raw']:.3f}x raw, {norm:.3f}x normalised "
                        "by the reference image; prompt tokens "
                        f"{v['tp_prompt_tokens']:.0f} vs {v['evs_prompt_tokens']:.0f}",
            "met": met,
            "why": "same kept tokens, same encoder; the difference is the scorer (LRCP's "
                   "low-rank subspace scores vs EVS's frame-to-frame dissimilarity) plus noise"
                   + ("" if met else "; see the video table")})
    kv = [k for k in summary["kv"] if k.get("ok")]
    if len(kv) > 1:
        ok = all(k["consistent"] for k in kv)
        bs = kv[0]["block_size"]
        first, last = kv[0], kv[-1]
        targets.append({
            "target": "KV blocks per request fall in proportion to the tokens saved",
            "measured": f"peak blocks = ceil(tokens / {bs}) for {sum(k['consistent'] for k in kv)}"
                        f" of {len(kv)} ratios; {first['config']} {first['blocks_measured']:.0f}"
                        f" blocks -> {last['config']} {last['blocks_measured']:.0f} blocks "
                        f"(tokens -{last.get('tokens_saved_frac', 0):.0%})",
            "met": ok,
            "why": f"blocks are whole {bs}-token pages (vLLM's CPU block size), so they fall in "
                   "steps of one block per 128 tokens saved" + (
                       "" if ok else "; a gauge sample below the expected range means the "
                       "API server's metrics lagged the engine (CPU contention)")})
    return targets


# --------------------------------------------------------------------------- rendering


def _f(v: Any, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v * scale)


def latency_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["config", "n", "prompt tok", "TTFT p50/p90/p99 ms", "E2E p50/p90/p99 ms",
            "TTFT speed-up (rounds)", "ideal", "encoder ms", "scorer ms", "scorer/saved"]
    rows = []
    for r in summary["latency"]:
        if not r.get("n"):
            rows.append([r["config"], "0"] + ["-"] * (len(head) - 2))
            continue
        sp = "-"
        if not math.isnan(r.get("ttft_speedup", math.nan)):
            sp = (f"{r['ttft_speedup']:.2f}x ({r['ttft_speedup_min']:.2f}-"
                  f"{r['ttft_speedup_max']:.2f})")
        rows.append([
            r["config"], str(r["n"]), _f(r["prompt_tokens"]),
            "/".join(_f(r[k], scale=1e3) for k in ("ttft_p50", "ttft_p90", "ttft_p99")),
            "/".join(_f(r[k], scale=1e3) for k in ("e2e_p50", "e2e_p90", "e2e_p99")),
            sp, _f(r.get("ideal_speedup"), "{:.2f}x"), _f(r["encoder_s"], scale=1e3),
            _f(r["scorer_s"], "{:.2f}", 1e3), _f(r.get("scorer_share"), "{:.2%}"),
        ])
    return head, rows


def throughput_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["config", "requests", "prompt tok", "req/s", "speed-up (rounds)", "out tok/s",
            "total tok/s", "TTFT p50/p90/p99 ms", "E2E p50/p90/p99 ms", "scorer ms/req"]
    rows = []
    for r in summary["throughput"]:
        rows.append([
            r["config"], f"{r['requests']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            _f(r["prompt_tokens"]), _f(r["req_per_s"], "{:.3f}"),
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
            _f(r["out_tok_per_s"], "{:.1f}"), _f(r["total_tok_per_s"], "{:.0f}"),
            "/".join(_f(r[k], scale=1e3) for k in ("ttft_p50", "ttft_p90", "ttft_p99")),
            "/".join(_f(r[k], scale=1e3) for k in ("e2e_p50", "e2e_p90", "e2e_p99")),
            _f(r["scorer_s_per_req"], "{:.2f}", 1e3),
        ])
    return head, rows


def kv_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["config", "prompt tok", "prompt+output tok", "peak blocks (gauge)",
            "expected blocks", "blocks saved", "tokens saved"]
    rows = []
    for k in summary["kv"]:
        if not k.get("ok"):
            rows.append([k["config"]] + ["-"] * (len(head) - 1))
            continue
        lo, hi = k["blocks_expected_lo"], k["blocks_expected"]
        rows.append([k["config"], str(k["prompt_tokens"]), str(k["tokens"]),
                     f"{k['blocks_measured']:.2f}", str(hi) if lo == hi else f"{lo}-{hi}",
                     _f(k.get("blocks_saved_frac"), "{:.1%}"),
                     _f(k.get("tokens_saved_frac"), "{:.1%}")])
    return head, rows


def video_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["server", "config", "n", "prompt tok", "TTFT p50/p90 ms", "E2E p50 ms",
            "encoder+prune ms (vLLM)", "scorer ms"]
    rows = []
    for r in summary["video"]["rows"]:
        rows.append([r["server"], r["config"], str(r["n"]), _f(r["prompt_tokens"]),
                     f"{_f(r['ttft_p50'], scale=1e3)}/{_f(r['ttft_p90'], scale=1e3)}",
                     _f(r["e2e_p50"], scale=1e3), _f(r["encoder_forward_s"], scale=1e3),
                     _f(r["scorer_s"], "{:.2f}", 1e3)])
    return head, rows


def targets_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "measured", "met", "why / limit"]
    rows = [[t["target"], t["measured"], "yes" if t["met"] else "NO", t["why"]]
            for t in summary["targets"]]
    return head, rows


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i])
              for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _floor_line(summary: dict[str, Any]) -> str:
    f = summary["floor"]
    parts = [f"unpruned TTFT p50 {_f(f['ttft_unpruned'], scale=1e3)} ms "
             f"({_f(f['prompt_tokens_unpruned'])} prompt tokens)"]
    if not math.isnan(f["ttft_text_same_length"]):
        parts.append(f"text-only of the same length {_f(f['ttft_text_same_length'], scale=1e3)}"
                     f" ms -> media path {_f(f['media_floor'], scale=1e3)} ms")
    parts.append(f"vision encoder (vLLM's own timing) {_f(f['encoder_vllm'], scale=1e3)} ms")
    off = f.get("offline") or {}
    if off:
        parts.append(f"offline: HF image processor {off['preprocess_s'] * 1e3:.0f} ms; "
                     f"transformers' implementation of the same vision tower "
                     f"{off['encoder_s'] * 1e3:.0f} ms ({off['patches']} patches -> "
                     f"{off['visual_tokens']} tokens; not vLLM's, not used)")
    parts.append(f"floor F for 'ideal' (encoder + preprocessing) {_f(f['floor_used'], scale=1e3)}"
                 " ms")
    return "; ".join(parts)


def render_text(summary: dict[str, Any]) -> str:
    out = ["", "== Latency (one request at a time, interleaved rounds) ==",
           _text_table(*latency_table(summary)), "", _floor_line(summary)]
    if summary["throughput"]:
        out += ["", "== Throughput (closed loop, interleaved waves) ==",
                _text_table(*throughput_table(summary))]
    if summary["kv"]:
        out += ["", "== KV cache (one long request each) ==", _text_table(*kv_table(summary))]
    v = summary["video"]
    if v["rows"] or v.get("blocked"):
        out += ["", "== Video: TokenPrune vs vLLM EVS =="]
        if v.get("blocked"):
            out.append(f"video blocked: {v['blocked']}")
        if v["rows"]:
            out.append(_text_table(*video_table(summary)))
    if summary["targets"]:
        out += ["", "== Targets ==", _text_table(*targets_table(summary))]
    if summary["errors"]:
        out += ["", f"== {len(summary['errors'])} failed requests ==", *summary["errors"][:20]]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots, docs


def plot(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    lat = summary["latency"]
    base = next((r for r in lat if r["config"] == "unpruned" and r.get("n")), None)
    methods = sorted({r["method"] for r in lat if r.get("method")})

    def save(fig: Any, ax: Any, name: str) -> None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        files.append(out_dir / name)

    def series(rows: list[dict[str, Any]], key: str, b: dict[str, Any] | None,
               m: str) -> tuple[list[float], list[float]]:
        pts = [(r["ratio"], r[key]) for r in rows if r.get("method") == m and r.get(key)]
        if b is not None:
            pts.append((0.0, b[key]))
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        x, y = series(lat, "ttft_p50", base, m)
        ax.plot(x, [v * 1e3 for v in y], marker="o", label=m)
    if base is not None:
        f = summary["floor"]
        ptok = {0.0: f["prompt_tokens_unpruned"]}
        ptok.update({r["ratio"]: r["prompt_tokens"] for r in lat if r.get("n") and r.get("method")})
        ratios = sorted(ptok)
        ideal = [f["floor_used"] + (f["ttft_unpruned"] - f["floor_used"])
                 * ptok[r] / f["prompt_tokens_unpruned"] for r in ratios]
        ax.plot(ratios, [v * 1e3 for v in ideal], ls="--", color="grey",
                label="ideal: F + (TTFT0 - F) x P/P0")
        ax.axhline(f["floor_used"] * 1e3, ls=":", color="grey",
                   label="F = encoder + preprocessing")
    ax.set_xlabel("prune_ratio")
    ax.set_ylabel("TTFT p50 (ms), one request at a time")
    ax.set_title("Time to first token vs prune ratio")
    save(fig, ax, "bench_ttft.png")

    tp = summary["throughput"]
    if tp:
        tbase = next((r for r in tp if r["config"] == "unpruned"), None)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in methods:
            x, y = series(tp, "req_per_s", tbase, m)
            ax.plot(x, y, marker="o", label=m)
        ax.set_xlabel("prune_ratio")
        ax.set_ylabel("requests / s")
        a = summary.get("args", {})
        ax.set_title(f"Request throughput vs prune ratio (concurrency {a.get('concurrency')}, "
                     f"{a.get('output_len')} output tokens)", fontsize=10)
        save(fig, ax, "bench_throughput.png")
    return files


def write_docs(results: dict[str, Any], summary: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(summary, out_dir)
    meta = results.get("meta", {})
    mach = meta.get("machine", {})
    args = meta.get("args", {})
    model = meta.get("model", {})
    ph = meta.get("phase_seconds", {})
    lines = [
        "# Serving benchmarks: does pruning pay end to end?",
        "",
        "Generated by `python -m benchmarks.serving` (issue 6). Every figure below comes from "
        "one run: a "
        "real vLLM OpenAI-compatible server with the plugin, driven by vLLM's own benchmark "
        "client, all configurations interleaved on the same running server (shuffled order "
        "each round), so machine noise hits them alike. Medians and ratios are the figures to "
        "read; absolute times depend on the machine and on what else ran on it (load average "
        f"{_load(meta.get('loadavg_start'))} at the start, {_load(meta.get('loadavg_end'))} "
        "at the end of this run).",
        "",
        "## Targets",
        "",
        md_table(*targets_table(summary)),
        "",
        *_reading(summary),
        "## Set-up",
        "",
        f"* Machine: {mach.get('Model name', '?')}, {mach.get('CPU(s)', '?')} CPUs "
        f"({mach.get('Core(s) per socket', '?')} cores/socket, "
        f"{mach.get('Thread(s) per core', '?')} thread/core), {mach.get('mem_gib', '?')} GiB, "
        f"no GPU; avx512_bf16: {mach.get('avx512_bf16')}. {mach.get('platform', '')}.",
        f"* Software: vLLM {mach.get('vllm')} (CPU build), torch {mach.get('torch')}, "
        f"transformers {mach.get('transformers')}, Python {mach.get('python')}; "
        f"client: {meta.get('client', '?')} "
        "(`vllm.benchmarks.lib.endpoint_request_func.async_request_openai_chat_completions`, "
        "the `openai-chat` backend of `vllm bench serve`, with per-request `extra_body`).",
    ]
    if model:
        lines.append(
            f"* Model: random-weight Qwen2.5-VL built by `build_qwen2_5_vl` "
            f"(preset `{args.get('model')}`): LM {model['lm_layers']} layers, hidden "
            f"{model['lm_hidden']}, MLP {model['lm_intermediate']}, {model['lm_heads']} heads "
            f"/ {model['lm_kv_heads']} KV heads = {model['lm_params'] / 1e6:.0f}M parameters "
            f"in the decoder layers; vision tower {model['vision_depth']} blocks, width "
            f"{model['vision_hidden']} = {model['vision_params'] / 1e6:.1f}M parameters; "
            "float32.")
    lines += [
        f"* Workload: one {args.get('image_w')}x{args.get('image_h')} JPEG per request (a new "
        "image for every request, and prefix caching and the multimodal processor cache off, "
        "so nothing is served from a cache), prompt \"Describe this image in detail.\", "
        f"{args.get('output_len')} generated tokens (`ignore_eos`). Latency phase: "
        f"{args.get('rounds')} rounds, one request at a time. Throughput phase: "
        f"{args.get('tp_rounds')} rounds of {args.get('wave_requests')} requests per "
        f"configuration at concurrency {args.get('concurrency')}.",
        f"* Wall time: {meta.get('wall_s', 0) / 60:.1f} min in all (phases: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in ph.items())
        + "; server start-up: "
        + ", ".join(f"{s['role']} {s['startup_s']:.0f} s" for s in meta.get("servers", []))
        + ").",
        "",
        "## Commands",
        "",
        "```bash",
        f"{meta.get('command', 'python -m benchmarks.serving')}",
        "```",
        "",
        "Servers it started (the first for everything but EVS; the second, a plain "
        "architecture, only for the EVS video comparison, after the first was stopped):",
        "",
        "```bash",
    ]
    lines += [s["command"] for s in meta.get("servers", [])]
    lines += [
        "```",
        "",
        "`python -m benchmarks.serving --quick` is the 3-minute version (LRCP at 0 and 0.889, no "
        "video); `--report-only RUN.json --docs docs` re-renders this page from a saved "
        "`--json` file; `--base-url URL` measures a server you started yourself (start it "
        "through `benchmarks/serving/launch.py` with `VLLM_SERVER_DEV_MODE=1` to get the "
        "encoder timing). `python -m benchmarks.serving --help` lists the rest.",
        "",
        "## Latency (one request at a time)",
        "",
        md_table(*latency_table(summary)),
        "",
        _floor_line(summary) + ".",
        "",
        "![TTFT vs prune ratio](bench_ttft.png)",
        "",
    ]
    if summary["throughput"]:
        lines += [
            f"## Throughput (closed loop, concurrency {args.get('concurrency')})",
            "",
            md_table(*throughput_table(summary)),
            "",
            "![Throughput vs prune ratio](bench_throughput.png)",
            "",
        ]
    if summary["kv"]:
        lines += [
            "## KV cache per request",
            "",
            f"One request at a time with {args.get('kv_output_len')} generated tokens; vLLM's "
            "`vllm:kv_cache_usage_perc` gauge sampled every 50 ms during the request; blocks = "
            "peak usage x (`num_gpu_blocks` of `vllm:cache_config_info` - 1: vLLM's usage "
            "fraction leaves out its reserved null block).",
            "",
            md_table(*kv_table(summary)),
            "",
        ]
    v = summary["video"]
    if v["rows"] or v.get("blocked"):
        lines += [
            "## Video: LRCP vs vLLM's EVS",
            "",
            f"The same kind of video ({args.get('video_w')}x{args.get('video_h')}, "
            f"{args.get('video_frames')} frames at {args.get('video_fps'):g} fps, mp4 written "
            "with OpenCV, sent as a `video_url` data URL; a new video per request) at "
            f"retained fraction {1 - args.get('video_ratio', 0):.2f}: LRCP through "
            "`video_prune_ratio` on the TokenPrune server, EVS through "
            "`--video-pruning-rate` on a plain `Qwen2_5_VLForConditionalGeneration` server "
            "(same checkpoint, run after the first server stopped). An unpruned image request "
            "is interleaved on both servers; the ratio of its TTFTs measures the drift between "
            "the two server runs and normalises the comparison.",
            "",
        ]
        if v.get("blocked"):
            lines += [f"**Video blocked:** {v['blocked']}", ""]
        if v["rows"]:
            lines += [md_table(*video_table(summary)), ""]
            if "ratio_raw" in v:
                lines += [f"TTFT LRCP / EVS: raw {v['ratio_raw']:.3f}, reference-image ratio "
                          f"{v.get('reference_ratio', math.nan):.3f}, normalised "
                          f"{v.get('ratio_normalized', math.nan):.3f}.", ""]
    lines += [
        "## How each figure is measured",
        "",
        "* **TTFT, E2E latency**: client side, streaming (`stream: true`), time to the first "
        "chunk with a token and to the last one, as vLLM's benchmark client measures them; "
        "p50/p90/p99 over the requests of the configuration (with few requests p99 is close to "
        "the maximum). *Speed-up* = p50 unpruned / p50 pruned; the range in brackets is the "
        "min-max of the same ratio computed per round (each round has one unpruned request).",
        "* **Throughput**: per configuration, completed requests / summed wave wall time "
        "(every wave: the configuration's requests, at most *concurrency* in flight); token "
        "throughput counts generated tokens, and prompt + generated tokens.",
        "* **Prompt tokens**: `usage.prompt_tokens` of the streamed responses.",
        "* **Scorer time**: the plugin's `tokenprune_scorer_seconds` histogram on `/metrics` "
        "(worker-side time of each batched scorer call), read before and after every request "
        "of the latency phase (one request in flight, so the delta is that request's) and "
        "around every throughput wave. *Scorer/saved* = scorer time / (TTFT p50 unpruned - "
        "TTFT p50 pruned).",
        "* **Encoder time**: vLLM's own per-request encoder timing "
        "(`ObservabilityConfig.enable_mm_processor_stats`, which the API server has no flag "
        "for in vLLM 0.32, so the benchmark starts the server through "
        "`benchmarks/serving/launch.py`, the stock module with that switch set; read "
        "through the dev-mode endpoint `POST /collective_rpc {\"method\": "
        "\"get_encoder_timing_stats\"}`, hence `VLLM_SERVER_DEV_MODE=1`). It times the model's "
        "`embed_multimodal`, which includes the pruning, so the scorer time is subtracted. "
        "The HF image processor (what vLLM runs in the API server before the encoder) is "
        "timed offline on the same image. Two other ways were tried and not used: timing the "
        "vision tower offline with transformers (its implementation of the same tower runs "
        "several times slower than vLLM's on this CPU, figure above, so it would overstate "
        "the floor) and the TTFT difference between the unpruned image request and a "
        "text-only prompt of the same token count (`--text-ref`; on this shared 2-core "
        "machine the difference of two ~4 s medians carries a few hundred ms of noise, more "
        "than the ~0.2 s it measures).",
        "* **Ideal speed-up**: TTFT0 / (F + (TTFT0 - F) x P/P0), F = vLLM's encoder time + "
        "the HF image processor's time (the parts before the pruning), P/P0 = prompt tokens "
        "pruned/unpruned: what pruning would give if everything after the encoder scaled "
        "linearly with the prompt length and the scorer were free. It is a model, not a "
        "bound: per-request costs that do not scale with the prompt pull the measured "
        "speed-up below it, the language model's attention (quadratic in the prompt) pushes "
        "it above, and with few rounds on a shared machine the medians land on either side.",
        "* **KV blocks**: vLLM allocates ceil(tokens / block_size) blocks per request; the "
        "gauge's peak during a single request times the number of blocks gives the blocks that "
        "request held, next to the count from its prompt + generated tokens.",
    ]
    if summary["errors"]:
        lines += ["", f"## Failed requests ({len(summary['errors'])})", ""]
        lines += [f"* `{e}`" for e in summary["errors"][:20]]
    path = out_dir / "benchmarks.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _reading(summary: dict[str, Any]) -> list[str]:
    """A few sentences computed from the tables."""
    lat = [r for r in summary["latency"] if r.get("n") and r.get("method")]
    if not lat:
        return []
    out = []
    by_ratio: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in lat:
        by_ratio[r["ratio"]].append(r)
    spreads = []
    for ratio, rows in sorted(by_ratio.items()):
        if len(rows) > 1:
            t = [r["ttft_p50"] for r in rows]
            worst = max(rows, key=lambda r: r["scorer_s"])
            spreads.append(f"{ratio:g}: {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} ms, costliest "
                           f"scorer {worst['method']} {worst['scorer_s'] * 1e3:.1f} ms")
    if spreads:
        out.append(
            "At a given ratio every method hands the language model the same number of tokens, "
            "so methods differ only by their scorer time and by noise: TTFT p50 across methods "
            "at ratio " + "; ".join(spreads) + ". Differences between methods smaller than the "
            "per-round ranges of the tables are noise, not method effects.")
    f = summary["floor"]
    if not math.isnan(f.get("encoder_vllm", math.nan)):
        out.append(
            f"The vision encoder (vLLM's timing, {f['encoder_vllm'] * 1e3:.0f} ms) plus "
            f"preprocessing is {f['floor_used'] / f['ttft_unpruned']:.0%} of the unpruned TTFT "
            "here. Pruning after the encoder cannot touch that floor, so the larger the tower "
            "relative to the LM, the smaller the gain: the `vl7b` preset's tower costs "
            "Qwen2.5-VL-7B's share of compute per visual token (0.40x the LM's at 588 tokens, "
            "`benchmarks/model_flops.py`), the `mid` preset's about 0.03x (LM-bound, an upper "
            "bound on the gain); the 'ideal' column gives the figure for this set-up.")
    return [" ".join(out), ""] if out else []


def _load(v: Any) -> str:
    if not v:
        return "?"
    return "/".join(f"{x:.1f}" for x in v)

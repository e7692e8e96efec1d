"""ALVTS selector cost against the MLP work it saves, per routed layer and item (plain torch).

For one routed decoder layer and one media item of N visual tokens at ``prune_ratio`` r, the
selector (``AlvtsRouter.route``: importance of the N rows from the fixed query set, the
consistency blend, the top-k sort) runs on all N rows, and the layer's MLP is skipped on the
``N - k`` rows that do not go through (``k`` = the keep-count rule). Printed per model, N and
ratio: the selector's FLOPs (counted analytically, :func:`selector_flops`) and the skipped MLP's
FLOPs and their ratio; the measured median time of each (measured side by side, interleaved, in
one run, single thread on CPU, float32) and their ratio. Target: selector <= 10% of the MLP
work it saves, at every N from 588 to 16,384.

Models: ``mid`` (:mod:`benchmarks.serving`'s mid/vl7b LM: hidden 1024, MLP 2816, 16 heads, 4 KV
heads) and ``qwen2.5-vl-7b`` (hidden 3584, MLP 18944, 28 heads, 4 KV heads, head_dim 128), with
random weights (cost does not depend on their values). The MLP is Qwen2's (gate/up projection,
SiLU, product, down projection). For a large N its time is measured on ``--mlp-rows`` of the
skipped rows and scaled linearly to all of them (a matmul's time is linear in its rows at these
sizes: the JSON records the time per row of every measurement); ``--mlp-rows 0`` times every
skipped row. The column "every-token selector" is the previous selector's query set (every
token of the item a query, N x N logits per head), for N up to ``--old-max``.

    taskset -c 0 python -m benchmarks.alvts_selector            # ~10 min; writes docs
    taskset -c 0 python -m benchmarks.alvts_selector --quick    # ~2 min, print only

Run from the repository root as a module (``benchmarks`` is a package).

Writes the table between markers in docs/alvts.md and the run's JSON to
docs/alvts_selector.json (``--no-doc``: print only).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vllm_tokenprune.alvts import (
    AlvtsOptions,
    AlvtsRouter,
    auto_rank,
    layer_factors,
    num_processed,
)

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- alvts-selector:begin -->", "<!-- alvts-selector:end -->"
SIZES = (588, 2352, 9408, 16384)
RATIOS = (0.5, 0.889)


@dataclass(frozen=True)
class Dims:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _mid() -> Dims:
    from benchmarks.serving.run import _MID_LM as lm

    return Dims("mid", lm["hidden"], lm["intermediate_size"], lm["num_heads"],
                lm["num_kv_heads"])


MODELS: dict[str, Callable[[], Dims]] = {
    "mid": _mid,
    "qwen2.5-vl-7b": lambda: Dims("qwen2.5-vl-7b", 3584, 18944, 28, 4),
    # LLaVA-1.5-7B's Vicuna/Llama-2 LM: no GQA (a key subspace per head), MLP/hidden 2.7
    "llava-1.5-7b": lambda: Dims("llava-1.5-7b", 4096, 11008, 32, 32),
}


def resolve_rank(d: Dims, rank: int | None) -> int:
    """The rank the selector uses on ``d`` (``rank`` None: :func:`auto_rank`)."""
    return auto_rank(d.hidden, d.kv_heads, d.head_dim) if rank is None \
        else min(rank, d.head_dim)


def matmul_flops(d: Dims, n: int, rank: int | None, queries: int | None) -> int:
    """Matmul FLOPs of one ``route`` call on N rows: key projection (2 N D G r), query
    projection (2 M D H r), logits (2 H M r N)."""
    r = resolve_rank(d, rank)
    m = n if queries is None else min(queries, n)
    return 2 * n * d.hidden * d.kv_heads * r + 2 * m * d.hidden * d.heads * r \
        + 2 * d.heads * m * r * n


def selector_flops(d: Dims, n: int, rank: int | None, queries: int | None) -> int:
    """FLOPs of one ``route`` call on N rows: :func:`matmul_flops`, plus input-norm row scales
    (3 N D), query bias (M H r), softmax (5 per element: max, subtract, exp, sum, divide), the
    sum over heads and queries (H M N), normalisation and blend (4 N), and the top-k sort
    (N log2 N compares)."""
    r = resolve_rank(d, rank)
    m = n if queries is None else min(queries, n)
    h = d.heads
    return int(matmul_flops(d, n, rank, queries) + 3 * n * d.hidden + m * h * r
               + 5 * h * m * n + h * m * n + 4 * n + n * max(1.0, math.log2(n)))


def mlp_flops(d: Dims, rows: int) -> int:
    """FLOPs of Qwen2's MLP on ``rows`` rows: gate/up (2 x 2 D I), SiLU and product (5 I),
    down (2 I D)."""
    return rows * (6 * d.hidden * d.intermediate + 5 * d.intermediate)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def measure(d: Dims, sizes: list[int], ratios: list[float], options: AlvtsOptions,
            repeats: int, mlp_cap: int, old_max: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    hd = d.head_dim
    wq = torch.randn(d.heads * hd, d.hidden, generator=g) * d.hidden ** -0.5
    wk = torch.randn(d.kv_heads * hd, d.hidden, generator=g) * d.hidden ** -0.5
    bq = torch.randn(d.heads * hd, generator=g) * 0.1
    gamma = torch.rand(d.hidden, generator=g) + 0.5
    factors = layer_factors(wq, wk, num_heads=d.heads, num_kv_heads=d.kv_heads,
                            rank=options.rank, q_bias=bq, norm_weight=gamma)
    router = AlvtsRouter({0: factors}, options)
    old = AlvtsRouter({0: factors}, AlvtsOptions(rank=options.rank,
                                                 consistency=options.consistency,
                                                 queries=1 << 30))
    w_gu = torch.randn(2 * d.intermediate, d.hidden, generator=g) * d.hidden ** -0.5
    w_down = torch.randn(d.hidden, d.intermediate, generator=g) * d.intermediate ** -0.5

    def mlp(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w_gu).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)

    out = []
    for n in sizes:
        hidden = torch.randn(n, d.hidden, generator=g)
        prev = torch.rand(n, generator=g)
        prev /= prev.sum()
        counts = {r: num_processed(n, r) for r in ratios}
        k_any = counts[ratios[-1]]
        rows_timed = {r: (n - counts[r]) if mlp_cap <= 0 else min(n - counts[r], mlp_cap)
                      for r in ratios}
        xs = {rows: torch.randn(rows, d.hidden, generator=g)
              for rows in set(rows_timed.values()) if rows > 0}

        def sel(rt: AlvtsRouter = router, hidden: torch.Tensor = hidden, k: int = k_any,
                prev: torch.Tensor = prev) -> None:
            rt.route(0, hidden, k, {"score": prev})  # the blend path of a routed layer

        sel()  # warm-up
        for x in xs.values():
            mlp(x[: min(64, len(x))])
        t_sel, t_old = [], []
        t_mlp: dict[int, list[float]] = {rows: [] for rows in xs}
        for _ in range(repeats):
            t_sel.append(_timed(sel))
            for rows, x in xs.items():
                t_mlp[rows].append(_timed(lambda x=x: mlp(x)))
            if n <= old_max:
                t_old.append(_timed(lambda: sel(old)))
        sel_s = statistics.median(t_sel)
        old_s = statistics.median(t_old) if t_old else None
        for r in ratios:
            skipped = n - counts[r]
            rows = rows_timed[r]
            mlp_s = statistics.median(t_mlp[rows]) * skipped / rows if rows else 0.0
            sf = selector_flops(d, n, options.rank, options.queries)
            mf = mlp_flops(d, skipped)
            out.append({
                "model": d.name, "rank": resolve_rank(d, options.rank), "N": n, "ratio": r,
                "k": counts[r], "skipped": skipped,
                "selector_flops": sf, "mlp_saved_flops": mf, "flop_share": sf / mf,
                "selector_s": sel_s, "mlp_saved_s": mlp_s, "time_share": sel_s / mlp_s,
                "mlp_rows_timed": rows,
                "mlp_us_per_row": 1e6 * statistics.median(t_mlp[rows]) / rows if rows else None,
                "selector_samples_s": t_sel, "mlp_samples_s": t_mlp.get(rows, []),
                "every_token_selector_s": old_s,
                "every_token_flops": selector_flops(d, n, options.rank, None),
                "every_token_time_share": None if old_s is None else old_s / mlp_s,
            })
        print("\n".join(_row(r) for r in out[-len(ratios):]), flush=True)
    return out


def _row(r: dict[str, Any]) -> str:
    old = "-" if r["every_token_selector_s"] is None else (
        f"{1e3 * r['every_token_selector_s']:.1f} ms ({r['every_token_time_share']:.2f})")
    return (f"| {r['model']} | {r['rank']} | {r['N']} | {r['ratio']} | {r['k']} | "
            f"{r['selector_flops'] / 1e6:.1f} | {r['mlp_saved_flops'] / 1e9:.2f} | "
            f"{100 * r['flop_share']:.2f}% | {1e3 * r['selector_s']:.2f} | "
            f"{1e3 * r['mlp_saved_s']:.1f} | **{100 * r['time_share']:.2f}%** | {old} |")


HEADER = ("| model | rank | N | ratio | k | selector MFLOP | MLP saved GFLOP | FLOP share | "
          "selector ms | MLP saved ms | time share | every-token selector ms (share) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 repeats, MLP timed on at most 256 rows, no every-token column; "
                        "print only")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--rank", type=int, default=AlvtsOptions().rank,
                   help="default: the option's default (automatic per model)")
    p.add_argument("--queries", type=int, default=AlvtsOptions().queries)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mlp-rows", type=int, default=1024,
                   help="time the MLP on at most this many rows, scaled linearly (0: all)")
    p.add_argument("--old-max", type=int, default=2352,
                   help="largest N for the every-token selector column")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=str(ROOT / "docs/alvts.md"))
    p.add_argument("--json", default=str(ROOT / "docs/alvts_selector.json"))
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.mlp_rows, args.old_max, args.no_doc = 2, 256, 0, True
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    options = AlvtsOptions(rank=args.rank, queries=args.queries)
    t0 = time.time()
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for name in args.models:
            rows += measure(MODELS[name](), args.sizes, args.ratios, options, args.repeats,
                            args.mlp_rows, args.old_max)
    finally:
        torch.set_num_threads(threads)
    took = time.time() - t0
    cmd = "python -m benchmarks.alvts_selector" + (" --quick" if args.quick else "")
    worst = max(rows, key=lambda r: r["time_share"])
    worst_f = max(rows, key=lambda r: r["flop_share"])
    summary = (f"Largest share: {100 * worst_f['flop_share']:.2f}% in FLOPs "
               f"({worst_f['model']}, N {worst_f['N']}, ratio {worst_f['ratio']}), "
               f"{100 * worst['time_share']:.2f}% in time ({worst['model']}, N {worst['N']}, "
               f"ratio {worst['ratio']}).")
    body = "\n".join([
        f"Selector options: rank {args.rank or 'auto'}, {args.queries} query rows, consistency "
        f"{options.consistency}. Generated by "
        f"`taskset -c 0 {cmd}` in {took:.0f} s ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread, float32, median of "
        f"{args.repeats}; MLP timed on at most {args.mlp_rows or 'all'} rows and scaled).",
        "", HEADER, *(_row(r) for r in rows), "", summary])
    print("\n" + summary)
    if not args.no_doc:
        doc = Path(args.doc)
        text = doc.read_text()
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:a] + "\n" + body + "\n" + text[b:])
        Path(args.json).write_text(json.dumps({
            "command": cmd, "argv": sys.argv[1:], "seconds": took,
            "torch": torch.__version__, "threads": args.threads,
            "machine": platform.machine(), "options": asdict(options),
            "models": {n: asdict(MODELS[n]()) for n in args.models}, "rows": rows,
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Operators per greedy step of the greedy scorers (torch profiler, top-level ops).

For each greedy method, runs ``select_tokens_batch`` under ``torch.profiler`` at two keep counts
``k`` and ``k // 2`` and reports ``(ops(k) - ops(k // 2)) / (k - k // 2)``: the top-level ATen
operators (those not called by another operator) issued per greedy step, i.e. per kept token of
an item, set-up excluded. ``launching`` leaves out view operators (``slice``, ``select``,
``view``, ...), which never start a device kernel; on a GPU every other operator is at least one
kernel launch when it runs eagerly.

``--batch B``: B items of different token counts ``N, 7N/8, 6N/8, ...`` (one padded bucket, as
``select_tokens_batch`` groups them) keeping ``round(k N_i / N)`` tokens each; a greedy step then
advances all B items. On the CPU a batch runs one ``mv`` per item per mat-vec, so its count grows
with B; on CUDA the eager loop issues the same operators as at B = 1 (``bmm`` for all items).

``--device cuda``: each configuration is run three times before it is profiled, so the loop is
replayed from its captured CUDA graph (``vllm_tokenprune/scoring/_graphs.py``; captured the
second time a shape is seen) and the per-step count is what a replay issues. ``--no-graphs``
sets ``TOKENPRUNE_GREEDY_CUDA_GRAPHS=0`` to count the eager loop on CUDA.

    python -m benchmarks.count_ops                       # N=2880, k=320, B=1 and B=4
    python -m benchmarks.count_ops --n 576 --k 64 --batch 1 2 8 --detail
    python -m benchmarks.count_ops --device cuda         # on a GPU: graph replays
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from vllm_tokenprune.scoring import select_tokens_batch

GREEDY = ["divprune", "resprune", "cdpruner"]
VIEW_OPS = {"aten::slice", "aten::select", "aten::view", "aten::unsqueeze", "aten::squeeze",
            "aten::transpose", "aten::t", "aten::expand", "aten::as_strided", "aten::alias",
            "aten::_unsafe_view", "aten::permute", "aten::unbind", "aten::detach",
            "aten::lift_fresh", "aten::reshape", "aten::numpy_T", "aten::mT", "aten::narrow"}


def top_level_ops(fn, warmup: int = 1) -> Counter:
    """Counter of the top-level ATen operator names ``fn()`` issues (after ``warmup`` calls)."""
    for _ in range(warmup):  # warm caches (Gaussian sketch matrices, CUDA graphs)
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events()
                   if e.cpu_parent is None and e.name.startswith("aten::"))


def batch_sizes(n: int, k: int, batch: int) -> tuple[list[int], list[int]]:
    """Token counts ``N, 7N/8, ...`` and keep counts ``round(k N_i / N)`` of a B-item bucket."""
    sizes = [n - i * n // 8 for i in range(batch)]
    return sizes, [max(1, round(k * s / n)) for s in sizes]


def per_step(method: str, n: int, d: int, k: int, batch: int, device: str = "cpu",
             seed: int = 0) -> tuple[float, float, Counter]:
    """(ops per step, launching ops per step, per-op counts over the counted steps)."""
    g = torch.Generator().manual_seed(seed)
    sizes, ks = batch_sizes(n, k, batch)
    feats = [torch.randn(s, d, generator=g).to(device) for s in sizes]
    text = [torch.randn(8, d, generator=g).to(device) for _ in sizes]
    warmup = 3 if device.startswith("cuda") else 1

    def run(keep: list[int]) -> Counter:
        return top_level_ops(lambda: select_tokens_batch(feats, keep, method, text_embeds=text),
                             warmup)

    hi, lo = run(ks), run([kk // 2 for kk in ks])
    diff = hi.copy()
    diff.subtract(lo)
    steps = max(ks) - max(ks) // 2
    total = sum(diff.values()) / steps
    launching = sum(v for name, v in diff.items() if name not in VIEW_OPS) / steps
    return total, launching, +diff


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2880)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--k", type=int, default=320)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--methods", nargs="+", default=GREEDY)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: count the eager loop")
    p.add_argument("--detail", action="store_true", help="also list the ops of one step")
    args = p.parse_args(argv)
    if args.no_graphs:
        os.environ["TOKENPRUNE_GREEDY_CUDA_GRAPHS"] = "0"
    torch.set_num_threads(1)
    print(f"N={args.n} D={args.d} k={args.k} ({args.device}, torch {torch.__version__})")
    print("| method | B | ops / step | launching ops / step |")
    print("|---|---|---|---|")
    for m in args.methods:
        for b in args.batch:
            total, launching, diff = per_step(m, args.n, args.d, args.k, b, args.device)
            print(f"| {m} | {b} | {total:.1f} | {launching:.1f} |", flush=True)
            if args.detail:
                steps = (lambda ks: max(ks) - max(ks) // 2)(batch_sizes(args.n, args.k, b)[1])
                print("    " + ", ".join(f"{name.removeprefix('aten::')} {v / steps:.2f}"
                                         for name, v in diff.most_common()))


if __name__ == "__main__":
    main()

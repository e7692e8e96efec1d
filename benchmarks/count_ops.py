"""Operators per greedy step of the greedy scorers (torch profiler, top-level ops).

For each greedy method, runs ``select_tokens_batch`` under ``torch.profiler`` at two keep counts
``k`` and ``k // 2`` and reports ``(ops(k) - ops(k // 2)) / (k - k // 2)``: the top-level ATen
operators (those not called by another operator) issued per greedy step, i.e. per kept token,
set-up excluded. ``launching`` leaves out view operators (``slice``, ``select``, ``view``, ...),
which never start a device kernel; on a GPU every other operator is at least one kernel launch.

    python benchmarks/count_ops.py                       # N=2880, k=320, B=1 and B=4
    python benchmarks/count_ops.py --n 576 --k 64 --batch 1 2 8
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_tokenprune.scoring import select_tokens_batch  # noqa: E402

GREEDY = ["divprune", "resprune", "cdpruner"]
VIEW_OPS = {"aten::slice", "aten::select", "aten::view", "aten::unsqueeze", "aten::squeeze",
            "aten::transpose", "aten::t", "aten::expand", "aten::as_strided", "aten::alias",
            "aten::_unsafe_view", "aten::permute", "aten::unbind", "aten::detach",
            "aten::lift_fresh", "aten::reshape", "aten::numpy_T"}


def top_level_ops(fn) -> Counter:
    """Counter of the top-level ATen operator names ``fn()`` issues."""
    fn()  # warm caches (Gaussian sketch matrices etc.)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events()
                   if e.cpu_parent is None and e.name.startswith("aten::"))


def per_step(method: str, n: int, d: int, k: int, batch: int,
             seed: int = 0) -> tuple[float, float, Counter]:
    """(ops per step, launching ops per step, per-op counts per step x (k - k//2))."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, d, generator=g) for _ in range(batch)]
    text = [torch.randn(8, d, generator=g) for _ in range(batch)]

    def run(kk: int) -> Counter:
        return top_level_ops(lambda: select_tokens_batch(feats, [kk] * batch, method,
                                                         text_embeds=text))

    hi, lo = run(k), run(k // 2)
    diff = hi.copy()
    diff.subtract(lo)
    steps = k - k // 2
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
    p.add_argument("--detail", action="store_true", help="also list the ops of one step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"N={args.n} D={args.d} k={args.k} (CPU, torch {torch.__version__})")
    print("| method | B | ops / step | launching ops / step |")
    print("|---|---|---|---|")
    for m in args.methods:
        for b in args.batch:
            total, launching, diff = per_step(m, args.n, args.d, args.k, b)
            print(f"| {m} | {b} | {total:.1f} | {launching:.1f} |", flush=True)
            if args.detail:
                steps = args.k - args.k // 2
                print("    " + ", ".join(f"{name.removeprefix('aten::')} {v / steps:.2f}"
                                         for name, v in diff.most_common()))


if __name__ == "__main__":
    main()

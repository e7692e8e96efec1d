"""Where an ALVTS-routed decoder layer's time goes, next to the plain layer (plain torch, CPU).

One Qwen2 decoder layer at a model's dimensions (random weights, float32) on one item of N
visual tokens, timed piece by piece, interleaved, median of ``--repeats``:

* the plain layer: input RMSNorm, fused q/k/v projection, causal attention (torch's fused
  ``scaled_dot_product_attention``: a stand-in for vLLM's CPU attention kernel, not the same
  kernel), ``o_proj``, post-attention RMSNorm, MLP;
* what routing adds: the selector (``AlvtsRouter.route_split`` on the item's rows, consistency
  blend included) and the row bookkeeping of ``vllm_tokenprune.alvts.model._routed_forward``
  (the item's rows gathered from the stream, the skipped rows' stream saved, ``complement``,
  the through rows gathered for the MLP and scattered back, the skipped rows' stream restored);
* what it saves: the MLP on the ``N - k`` skipped rows (``k`` = the keep-count rule).

Printed per N and ratio: each piece in ms and the routed layer against the plain one, and the
language model's prefill estimated from them (``first_layer`` plain layers, the rest routed).
It answers "is the selector, or the gathers, or the attention that routing does not touch,
why ALVTS saves little at this N" for ``python -m benchmarks.serving --methods alvts``.

    taskset -c 0 python -m benchmarks.alvts_layer                 # mid preset, 588/2352/9408
    taskset -c 0 python -m benchmarks.alvts_layer --sizes 588 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.alvts_selector import MODELS
from vllm_tokenprune.alvts import AlvtsOptions, AlvtsRouter, layer_factors, num_processed


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


@torch.no_grad()
def measure(model: str, sizes: list[int], ratios: list[float], repeats: int,
            layers: int, first_layer: int) -> list[dict[str, Any]]:
    from vllm_tokenprune.alvts.model import complement  # the routed layer's own helper

    d = MODELS[model]()
    hd, h, g_ = d.head_dim, d.heads, d.kv_heads
    gen = torch.Generator().manual_seed(0)

    def w(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, generator=gen) * i ** -0.5

    wq, wk, wv, wo = w(h * hd, d.hidden), w(g_ * hd, d.hidden), w(g_ * hd, d.hidden), \
        w(d.hidden, h * hd)
    w_qkv = torch.cat([wq, wk, wv])
    bq = torch.randn(h * hd, generator=gen) * 0.1
    gamma1, gamma2 = torch.rand(d.hidden, generator=gen) + 0.5, torch.ones(d.hidden)
    w_gu, w_down = w(2 * d.intermediate, d.hidden), w(d.hidden, d.intermediate)
    options = AlvtsOptions()
    router = AlvtsRouter({0: layer_factors(wq, wk, num_heads=h, num_kv_heads=g_,
                                           rank=options.rank, q_bias=bq, norm_weight=gamma1)},
                         options)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w_gu).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)

    def one_size(n: int) -> list[dict[str, Any]]:
        rows_out: list[dict[str, Any]] = []
        stream = torch.randn(n, d.hidden, generator=gen)
        x1 = _rms(stream, gamma1)
        rows = torch.arange(n)  # the item's rows in the step (here: the whole step)
        prev = torch.rand(n, generator=gen)
        prev /= prev.sum()

        def qkv() -> torch.Tensor:
            return F.linear(x1, w_qkv)

        qkv_out = qkv()
        q = qkv_out[:, :h * hd].view(n, h, hd).transpose(0, 1).unsqueeze(0)
        # each KV head repeated for its query heads outside the timing: torch's fused CPU
        # kernel (memory linear in N) takes no GQA; vLLM's kernel reads the KV heads directly
        k = qkv_out[:, h * hd:(h + g_) * hd].view(n, g_, hd).transpose(0, 1) \
            .repeat_interleave(h // g_, dim=0).unsqueeze(0)
        v = qkv_out[:, (h + g_) * hd:].view(n, g_, hd).transpose(0, 1) \
            .repeat_interleave(h // g_, dim=0).unsqueeze(0)

        def attn() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        a = attn().squeeze(0).transpose(0, 1).reshape(n, h * hd)
        pieces: dict[str, Callable[[], Any]] = {
            "norms": lambda: (_rms(stream, gamma1), _rms(stream, gamma2)),
            "qkv": qkv, "attention": attn, "o_proj": lambda: F.linear(a, wo),
            "mlp": lambda: mlp(x1),
        }
        counts = {r: num_processed(n, r) for r in ratios}
        splits = {r: router.route_split(0, stream, counts[r], {"score": prev})[1]
                  for r in ratios}
        for r in ratios:
            kept, skip = counts[r], splits[r]

            def selector(r: float = r) -> Any:
                return router.route_split(0, stream.index_select(0, rows), counts[r],
                                          {"score": prev})

            def gathers(skip: torch.Tensor = skip, kept: int = kept) -> Any:
                s = rows.index_select(0, skip)
                entered = stream.index_select(0, s)
                through = complement(s, n, n - int(s.shape[0]))
                o = torch.zeros_like(x1)
                o.index_copy_(0, through, x1.index_select(0, through))
                return stream.index_copy(0, s, entered)

            through_x = x1[:kept]
            pieces[f"selector@{r:g}"] = selector
            pieces[f"gathers@{r:g}"] = gathers
            pieces[f"mlp_kept@{r:g}"] = lambda t=through_x: mlp(t)
        for fn in pieces.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in pieces}
        for _ in range(repeats):
            for name, fn in pieces.items():
                times[name].append(_timed(fn))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        plain = sum(ms[p] for p in ("norms", "qkv", "attention", "o_proj", "mlp"))
        for r in ratios:
            routed = plain - ms["mlp"] + ms[f"mlp_kept@{r:g}"] + ms[f"selector@{r:g}"] \
                + ms[f"gathers@{r:g}"]
            lm_plain = layers * plain
            lm_alvts = first_layer * plain + (layers - first_layer) * routed
            rows_out.append({
                "model": model, "N": n, "ratio": r, "k": counts[r], "plain_ms": plain,
                "attention_ms": ms["attention"], "mlp_ms": ms["mlp"],
                "mlp_saved_ms": ms["mlp"] - ms[f"mlp_kept@{r:g}"],
                "selector_ms": ms[f"selector@{r:g}"], "gathers_ms": ms[f"gathers@{r:g}"],
                "routed_ms": routed, "lm_speedup": lm_plain / lm_alvts,
            })
        return rows_out

    return [row for n in sizes for row in one_size(n)]


def render(rows: list[dict[str, Any]]) -> str:
    head = ("| N | ratio | k | plain layer ms | attention ms | MLP ms | MLP saved ms | selector ms "
            "| gathers ms | routed layer ms | routed / plain | LM prefill speed-up |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['ratio']:g} | {r['k']} | {r['plain_ms']:.1f} | "
            f"{r['attention_ms']:.1f} | {r['mlp_ms']:.1f} | {r['mlp_saved_ms']:.1f} | "
            f"{r['selector_ms']:.1f} | {r['gathers_ms']:.1f} | {r['routed_ms']:.1f} | "
            f"{r['routed_ms'] / r['plain_ms']:.2f} | {r['lm_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alvts_layer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="mid")
    p.add_argument("--sizes", nargs="+", type=int, default=[588, 2352, 9408])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.889])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=20, help="decoder layers of the LM")
    p.add_argument("--first-layer", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = measure(args.model, args.sizes, args.ratios, args.repeats, args.layers,
                   args.first_layer)
    print(f"{args.model}, float32, {args.threads} thread(s), median of {args.repeats}, "
          f"{time.time() - t0:.0f} s; LM speed-up: {args.first_layer} plain + "
          f"{args.layers - args.first_layer} routed layers against {args.layers} plain")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

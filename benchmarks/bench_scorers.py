"""Scorer latency vs. the vision encoder that produced the tokens.

For every method, token count N, width D and batch size B: the median wall time of
``select_tokens_batch`` on B items of (N, D) bf16 features (random data, prune ratio 0.889 by
default), next to the time of a real-size vision encoder with random weights that outputs N tokens
per item, as a ratio ``scorer / encoder`` (for B items the encoder time is B x the one-item time;
the encoder is timed with batch 1).

Encoders (transformers, random weights, float32 on CPU / bf16 on CUDA, SDPA attention):

* N = 576: CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower; 24 layers, width 1024, 577 tokens).
* N = 2880 and 16384: the Qwen2.5-VL-7B vision tower (32 layers, width 1280, MLP 3420, window
  attention except layers 7/15/23/31, 2x2 patch merger to 3584), on a single image of
  4N patches (2880 -> 96x120 patches, 16384 -> 256x256 patches).

On a slow machine the encoders are timed with fewer layers and scaled: ``--encoder-layers L``
keeps L blocks (for Qwen2.5-VL one window-attention block and one full-attention block), times
each block with forward hooks, and reports ``embed+merger + sum over the real depth of the
per-block times`` (window blocks x 28, full-attention blocks x 4). ``--encoder-tokens-cap``
times the Qwen tower at a smaller patch count and extrapolates each block's time to 4N patches
(``t = a N + b N^2`` fitted through timings at the cap and at half the cap); the output says
which numbers are extrapolated.

Examples::

    python -m benchmarks.bench_scorers                          # the default CPU grid
    python -m benchmarks.bench_scorers --n 576 --d 4096 --batch 1 --methods lrcp norm
    python -m benchmarks.bench_scorers --device cuda --repeats 20   # on a GPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from vllm_tokenprune.scoring import list_methods, num_kept, select_tokens_batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int,
    slow_s: float = float("inf"),
) -> float:
    """Median wall time in seconds (device synchronised around every run). If a warm-up run takes
    longer than ``slow_s``, only one more (timed) run is made."""
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if time.perf_counter() - t0 > slow_s:
            repeats = 1
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- encoders


class BlockTimer:
    """Forward hooks that accumulate the wall time of each hooked module."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.times = [0.0] * len(modules)
        self._t0 = [0.0] * len(modules)
        self.device = device
        for i, m in enumerate(modules):
            m.register_forward_pre_hook(self._pre(i))
            m.register_forward_hook(self._post(i))

    def _pre(self, i: int):
        def hook(*_):
            _sync(self.device)
            self._t0[i] = time.perf_counter()

        return hook

    def _post(self, i: int):
        def hook(*_):
            _sync(self.device)
            self.times[i] += time.perf_counter() - self._t0[i]

        return hook

    def reset(self) -> None:
        self.times = [0.0] * len(self.times)


def _encoder_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def time_clip(device: torch.device, layers: int, repeats: int) -> tuple[float, str]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    depth = 24
    kept = min(layers, depth)
    cfg = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=kept,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    cfg._attn_implementation = "sdpa"
    dtype = _encoder_dtype(device)
    model = CLIPVisionModel(cfg).to(device=device, dtype=dtype).eval()
    pixels = torch.randn(1, 3, 336, 336, device=device, dtype=dtype)
    inner = getattr(model, "vision_model", model)  # transformers < 5 wraps the tower
    blocks = list(inner.encoder.layers)
    timer = BlockTimer(blocks, device)
    with torch.no_grad():
        model(pixel_values=pixels)
        timer.reset()
        total = timed(lambda: model(pixel_values=pixels), device, repeats, 0)
    per_block = sum(timer.times) / (repeats * kept)
    rest = max(total - per_block * kept, 0.0)
    est = rest + per_block * depth
    note = "measured" if kept == depth else f"{kept}/{depth} layers timed, scaled by depth"
    return est, note


def _qwen_model(device: torch.device, window_blocks: int, full_blocks: int):
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    depth = window_blocks + full_blocks
    cfg = Qwen2_5_VLVisionConfig(
        depth=depth,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=list(range(window_blocks, depth)),
        hidden_act="silu",
        in_channels=3,
    )
    cfg._attn_implementation = "sdpa"
    dtype = _encoder_dtype(device)
    model = Qwen2_5_VisionTransformerPretrainedModel(cfg).to(device=device, dtype=dtype).eval()
    return model, dtype


def _qwen_pass(model, dtype, device, h: int, w: int, repeats: int) -> tuple[float, list[float]]:
    patches = torch.randn(h * w, 3 * 2 * 14 * 14, device=device, dtype=dtype)
    grid = torch.tensor([[1, h, w]], device=device)
    timer = BlockTimer(list(model.blocks), device)
    with torch.no_grad():
        model(patches, grid_thw=grid)
        timer.reset()
        total = timed(lambda: model(patches, grid_thw=grid), device, repeats, 0)
    return total, [t / repeats for t in timer.times]


def _grid_for(n_tokens: int) -> tuple[int, int]:
    """(h, w) patch grid of 4 * n_tokens patches, both even, as square as possible."""
    merged = n_tokens
    best = (1, merged)
    for a in range(1, int(math.isqrt(merged)) + 1):
        if merged % a == 0:
            best = (a, merged // a)
    return 2 * best[0], 2 * best[1]


def time_qwen(
    device: torch.device, n_tokens: int, layers: int, repeats: int, tokens_cap: int | None
) -> tuple[float, str]:
    """Estimated Qwen2.5-VL-7B vision tower time for one image of ``n_tokens`` output tokens."""
    depth_window, depth_full = 28, 4
    full_model = layers >= 32
    w_blocks = depth_window if full_model else 1
    f_blocks = depth_full if full_model else 1
    model, dtype = _qwen_model(device, w_blocks, f_blocks)
    if tokens_cap is None or n_tokens <= tokens_cap:
        h, w = _grid_for(n_tokens)
        total, per = _qwen_pass(model, dtype, device, h, w, repeats)
        rest = max(total - sum(per), 0.0)
        win, full = per[:w_blocks], per[w_blocks:]
        est = rest + depth_window * statistics.mean(win) + depth_full * statistics.mean(full)
        note = "measured" if full_model else "1 window + 1 full-attn block timed, scaled by depth"
        return est, note
    # extrapolate from two smaller sizes: t(n) = a n + b n^2 per block kind
    n1, n2 = tokens_cap // 2, tokens_cap
    fits = []
    for n in (n1, n2):
        h, w = _grid_for(n)
        total, per = _qwen_pass(model, dtype, device, h, w, repeats)
        fits.append(
            (
                n,
                max(total - sum(per), 0.0),
                statistics.mean(per[:w_blocks]),
                statistics.mean(per[w_blocks:]),
            )
        )

    def extrap(i: int) -> float:
        (na, ta), (nb, tb) = (fits[0][0], fits[0][i]), (fits[1][0], fits[1][i])
        # solve t = a n + b n^2 through both points; clamp b >= 0 (linear if noisy)
        b = max((tb / nb - ta / na) / (nb - na), 0.0)
        a = tb / nb - b * nb
        return a * n_tokens + b * n_tokens**2

    est = extrap(1) + depth_window * extrap(2) + depth_full * extrap(3)
    note = f"extrapolated (a*N + b*N^2 per block) from N={n1},{n2}; 1+1 blocks scaled by depth"
    return est, note


# ---------------------------------------------------------------- main


def pivot(rows: list[tuple], methods: list[str]) -> str:
    """Markdown table: one row per (N, D, B), one column per method, cells "ms (ratio %)"."""
    cells: dict[tuple, dict[str, str]] = {}
    enc: dict[tuple, str] = {}
    for m, n, d, b, k, t, e, ratio in rows:
        key = (n, d, b, k)
        if t is None:
            cells.setdefault(key, {})[m] = "skipped"
            continue
        cells.setdefault(key, {})[m] = (
            f"{t * 1000:.1f} ({ratio:.2f}%)" if ratio == ratio else f"{t * 1000:.1f}"
        )
        if e == e:
            enc[key] = f"{e * 1000:.0f}"
    head = ["N", "D", "B", "k", "encoder ms", *methods]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for key in sorted(cells):
        row = [str(v) for v in key] + [enc.get(key, "-")]
        row += [cells[key].get(m, "-") for m in methods]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list_methods())
    ap.add_argument("--n", nargs="+", type=int, default=[576, 2880, 16384])
    ap.add_argument("--d", nargs="+", type=int, default=[1024, 3584, 4096])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--ratio", type=float, default=0.889, help="prune ratio (kept = N/9)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--warmup", type=int, default=None,
        help="untimed runs per configuration (default 1 on the CPU; 2 on CUDA, so that the "
             "greedy loops are timed as replays of their captured CUDA graphs)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--encoder-layers",
        type=int,
        default=2,
        help="encoder blocks actually run (>= 24/32: full depth)",
    )
    ap.add_argument("--encoder-repeats", type=int, default=1)
    ap.add_argument(
        "--encoder-tokens-cap",
        type=int,
        default=2880,
        help="largest N the Qwen tower is run at; above it, extrapolate",
    )
    ap.add_argument("--no-encoder", action="store_true")
    ap.add_argument(
        "--slow-s",
        type=float,
        default=3.0,
        help="configs whose warm-up run exceeds this many seconds are timed once",
    )
    ap.add_argument(
        "--max-work",
        type=float,
        default=2e10,
        help="skip a greedy-method config when B*N*k*width exceeds this (width = sketch or D)",
    )
    ap.add_argument(
        "--max-elems",
        type=float,
        default=5e8,
        help="skip configs whose B*N*D exceeds this (memory)",
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    print(
        f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"ratio={args.ratio} repeats={args.repeats} (median)"
    )

    def encoder_time(n: int) -> tuple[float, str]:
        t0 = time.perf_counter()
        if n == 576:
            est = time_clip(device, args.encoder_layers, args.encoder_repeats)
            name = "CLIP ViT-L/14-336"
        else:
            est = time_qwen(
                device, n, args.encoder_layers, args.encoder_repeats, args.encoder_tokens_cap
            )
            name = "Qwen2.5-VL-7B vision"
        print(
            f"# encoder N={n}: {name}: {est[0] * 1000:.0f} ms per image "
            f"({est[1]}; benchmark took {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        return est

    greedy_width = {"resprune": 256}
    rows: list[tuple] = []
    header = ["method", "N", "D", "B", "k", "scorer ms", "encoder ms", "ratio %"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in args.n:
        k = num_kept(n, args.ratio)
        # timed right before this N's scorers, so both see the same machine load
        enc = (float("nan"), "") if args.no_encoder else encoder_time(n)
        for d in args.d:
            for b in args.batch:
                if b * n * d > args.max_elems:
                    for m in args.methods:
                        print(f"| {m} | {n} | {d} | {b} | {k} | skipped (B*N*D) | | |")
                        rows.append((m, n, d, b, k, None, None, None))
                    continue
                g = torch.Generator().manual_seed(n + d + b)
                feats = [
                    torch.randn(n, d, generator=g).to(torch.bfloat16).to(device) for _ in range(b)
                ]
                for m in args.methods:
                    if m in ("resprune", "cdpruner", "divprune"):
                        width = min(d, greedy_width.get(m, d))
                        if b * n * k * width > args.max_work:
                            print(f"| {m} | {n} | {d} | {b} | {k} | skipped (greedy work) | | |")
                            rows.append((m, n, d, b, k, None, None, None))
                            continue
                    ks = [k] * b
                    t = timed(
                        lambda m=m, ks=ks, f=feats: select_tokens_batch(f, ks, m),
                        device,
                        args.repeats,
                        max(warmup, 1),
                        args.slow_s,
                    )
                    e = enc[0] * b
                    ratio = 100.0 * t / e if e == e else float("nan")
                    print(
                        f"| {m} | {n} | {d} | {b} | {k} | {t * 1000:.1f} | {e * 1000:.0f} | "
                        f"{ratio:.2f} |",
                        flush=True,
                    )
                    rows.append((m, n, d, b, k, t, e, ratio))
                del feats
    print("\nscorer ms (scorer time as % of the encoder time for the same B items)\n")
    print(pivot(rows, args.methods))


if __name__ == "__main__":
    main()

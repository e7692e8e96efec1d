"""``prune_ratio: "auto"`` on the API server's own path: what the count costs next to vLLM's call
of the HF image processor, measured through vLLM's multimodal processor of the TokenPrune
architecture (needs vLLM: the CPU build here).

``benchmarks.auto_budget`` times ``AutoCounter.count`` alone; the server calls it through
``_tp_auto_keep`` (``vllm_tokenprune/models/processor.py``), which also finds the modality's
counter (made once: the HF processor, the patch size, the options and the pixels' scale) and
turns vLLM's errors into a request's. This benchmark times that call, right after
the HF image processor run as vLLM runs it (its merged processor kwargs: Qwen-VL without rescale
or normalize, uint8 pixels; LLaVA-1.5 normalized), on the same image, interleaved rounds,
medians, one thread.

Processors: vLLM's registry builds the processor of a generated tiny checkpoint of each family
(``vllm_tokenprune/testing/tiny_model.py``: no weights are loaded, only the processor runs);
its HF image processor has the real model's class and preprocessing settings (Qwen2.5-VL: 14-pixel
patches, 2x2 merge, up to 12,845,056 pixels; LLaVA-1.5: 336 pixels, 576 tokens). The language
model's size does not enter these figures.

    taskset -c 0 python -m benchmarks.auto_server            # ~45 s; writes docs
    taskset -c 0 python -m benchmarks.auto_server --quick    # ~15 s, print only

Writes its table between markers in docs/budgets.md and the run's JSON to
docs/auto_server.json (``--quick`` or ``--no-doc``: print only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.auto_budget import (
    COST_IMAGES,
    COST_SIZES,
    ROOT,
    _pair,
    _sizes_near,
    write_doc,
    writes_doc,
)
from vllm_tokenprune.testing import content, tiny_model
from vllm_tokenprune.testing.server import token_prune_overrides

BEGIN, END = "<!-- auto-server:begin -->", "<!-- auto-server:end -->"

#: family -> (TokenPrune architecture, tiny-checkpoint builder, its keyword arguments)
MODELS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "qwen2.5-vl": ("TokenPruneQwen2_5_VLForConditionalGeneration",
                   tiny_model.build_qwen2_5_vl, {"max_pixels": 12845056}),
    "llava-1.5": ("TokenPruneLlavaForConditionalGeneration", tiny_model.build_llava,
                  {"image_size": 336}),
}


def server_processor(name: str, workdir: Path) -> Any:
    """vLLM's multimodal processor of the TokenPrune ``name`` architecture with
    ``prune_ratio: "auto"`` as the server default (built as the API server builds it)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.plugin import register

    register()
    arch, build, kwargs = MODELS[name]
    model = build(workdir / name, seed=0, **kwargs)
    overrides = json.loads(token_prune_overrides(arch, method="lrcp", prune_ratio="auto"))
    cfg = EngineArgs(model=str(model), hf_overrides=overrides, enforce_eager=True,
                     max_model_len=4096, dtype="float32").create_engine_config()
    return MULTIMODAL_REGISTRY.create_processor(cfg.model_config)


def _tokens(out: Any, qwen: bool) -> int:
    if qwen:
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        return t * h * w // 4
    return (int(out["pixel_values"].shape[-1]) // 14) ** 2


def _count(p: Any, proc: Any, merged: dict[str, Any], qwen: bool, image: Any) -> Any:
    """The server's count for ``image``, ``_tp_auto_keep`` with the image's token count (taken
    from an untimed processor run: the server has it from vLLM's prompt updates)."""
    n = _tokens(proc(images=[image], return_tensors="pt", **merged), qwen)
    return functools.partial(p._tp_auto_keep, modality="image", index=0, num_tokens=n)


def _numpy_count(p: Any, seen: Any) -> Any:
    """The same count through numpy's reader (``VLLM_TOKENPRUNE_AUTO_JIT=0``): a counter made
    with the compiled pass off keeps numpy readers (its readers are made on first use: the
    warm-up round)."""
    from vllm_tokenprune.budget import AutoCounter, kernel

    counter, min_keep = p._tp_auto_counter("image")
    real = kernel.compiled
    kernel.compiled = lambda: None  # type: ignore[assignment]
    try:
        plain = AutoCounter(counter.processor, counter.opts, counter.patch_size,
                            counter.modality, counter.scale)
    finally:
        kernel.compiled = real  # type: ignore[assignment]
    n = seen.keywords["num_tokens"]

    def count(out: Any) -> int:
        if plain._readers:  # made: a numpy reader never looks at the pass again
            return plain.count(out, 0, n, min_keep).num_keep
        kernel.compiled = lambda: None  # type: ignore[assignment]  # its first (warm-up) call
        try:
            return plain.count(out, 0, n, min_keep).num_keep
        finally:
            kernel.compiled = real  # type: ignore[assignment]

    return count if kernel.compiled() is not None else None


def server_rows(names: list[str], reps: int, quick: bool, workdir: Path,
                clock: Any = time.thread_time) -> list[dict[str, Any]]:
    """Per model, size and image: vLLM's call of the HF image processor, then the server's
    ``_tp_auto_keep`` on its output (:func:`benchmarks.auto_budget._pair`; the first round,
    which makes the processor's kept arguments and the layout's reader, warms up); for Qwen-VL
    also the first image of its size (each round another size near it: a new token grid).
    Each image's token count, which the server has from vLLM's prompt updates, is taken from
    an untimed processor run."""
    rows = []
    for name in names:
        p = server_processor(name, workdir)
        proc = p.info.get_hf_processor().image_processor
        merged = p.info.ctx.get_merged_mm_kwargs({})
        qwen = name.startswith("qwen")
        sizes = COST_SIZES[:2] if quick or not qwen else COST_SIZES
        for size in sizes:
            n = 3 if quick else (reps if size[0] * size[1] < 4e6 else max(3, reps // 3))
            near = _sizes_near(size, len(COST_IMAGES) * (n + 1)) if qwen else []
            for j, (cls, var) in enumerate(COST_IMAGES):
                image = content.render(cls, *size, var)
                others = [content.render(cls, *s, var)
                          for s in near[j * (n + 1):(j + 1) * (n + 1)]]
                seen = _count(p, proc, merged, qwen, image)
                new = [_count(p, proc, merged, qwen, o) for o in others]
                plain = _numpy_count(p, seen)
                t: dict[str, list[float]] = {k: [] for k in ("proc", "auto", "new", "first",
                                                             "plain")}
                keep = 0
                for i in range(n + 1):  # the first round warms up, not counted
                    p_t, a_t, keep = _pair(proc, image, seen, clock, **merged)
                    t["proc"].append(p_t)
                    t["auto"].append(a_t)
                    if plain is not None:  # numpy's reader, same image, same round
                        _, n_t, other = _pair(proc, image, plain, clock, **merged)
                        assert other == keep, (other, keep)
                        t["plain"].append(n_t / a_t)
                    if qwen:
                        p_t, a_t, _ = _pair(proc, others[i], new[i], clock, **merged)
                        t["new"].append(p_t)
                        t["first"].append(a_t)
                pm, am = (statistics.median(t[k][1:]) * 1e3 for k in ("proc", "auto"))
                tokens = seen.keywords["num_tokens"]
                row = {"model": name, "size": f"{size[0]}x{size[1]}", "image": f"{cls}:{var}",
                       "tokens": tokens, "keep": keep, "reps": n, "processor_ms": pm,
                       "auto_ms": am, "auto_pct": 100 * am / pm}
                if plain is not None:
                    row["numpy_over_pass"] = statistics.median(t["plain"][1:])
                if qwen:
                    shares = [f / q for f, q in zip(t["first"][1:], t["new"][1:], strict=True)]
                    row.update(first_ms=statistics.median(t["first"][1:]) * 1e3,
                               first_pct=100 * statistics.median(shares))
                rows.append(row)
                print(f"[server] {name} {size} {cls}:{var} N={tokens} vLLM's processor call "
                      f"{pm:.2f} ms, auto {am:.3f} ms ({100 * am / pm:.1f}%)" + (
                          f"; first of its size {row['first_ms']:.3f} ms "
                          f"({row['first_pct']:.1f}%)" if qwen else ""), flush=True)
    return rows


def markdown(res: dict[str, Any]) -> str:
    out = ["Auto on the API server's own path (`_tp_auto_keep` in vLLM's multimodal processor of "
           "the TokenPrune architecture, right after vLLM's call of the HF image processor on "
           "the same image: Qwen-VL uint8 pixels, no rescale or normalize; single thread, CPU "
           "time of the thread, medians of interleaved rounds; the last column: the same count "
           "through numpy's reader, `VLLM_TOKENPRUNE_AUTO_JIT=0`, in the same rounds, over the "
           "compiled pass's time, median of the rounds' ratios):\n",
           "| model | image size | image | tokens | vLLM's processor call | auto | "
           "auto / processor | first of its size | first / processor | numpy's reader / "
           "compiled pass |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        first = (f"{r['first_ms']:.3f} ms | {r['first_pct']:.1f}%" if "first_ms" in r
                 else "- | -")
        ratio = f"{r['numpy_over_pass']:.2f}x" if "numpy_over_pass" in r else "-"
        out.append(f"| {r['model']} | {r['size']} | {r['image']} | {r['tokens']} | "
                   f"{r['processor_ms']:.2f} ms | {r['auto_ms']:.3f} ms | {r['auto_pct']:.1f}% | "
                   f"{first} | {ratio} |")
    out.append(f"\nMachine: {res['machine']}; command: `{res['command']}`.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="3 rounds, no 16,384-token size; print only")
    p.add_argument("--reps", type=int, default=21, help="timed rounds per image (default 21)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--doc", default=str(ROOT / "docs" / "budgets.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "auto_server.json"))
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="auto-server-") as tmp:
        rows = server_rows(args.models, args.reps, args.quick, Path(tmp))
    res = {"machine": f"{platform.processor() or platform.machine()}, torch "
                      f"{torch.__version__}, 1 thread",
           "command": "taskset -c 0 python -m benchmarks.auto_server" + (
               " --quick" if args.quick else ""),
           "rows": rows}
    text = markdown(res)
    print(text)
    print(f"[auto_server] {time.time() - t0:.0f} s")
    if writes_doc(args):
        write_doc(Path(args.doc), text, BEGIN, END)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.doc} and {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())

"""``prune_ratio: "auto"``: what it keeps per kind of image, what it costs, and how its pixel-side
count compares with the vision tower's own features (plain torch + transformers, no vLLM).

Processors: the HF image processor classes the tiny test models save
(``vllm_tokenprune/testing/tiny_model.py``), with the real checkpoints' preprocessing settings
(nothing can be downloaded here): Qwen2.5-VL (``Qwen2VLImageProcessor``, 14-pixel patches, 2x2
merge, 3,136 to 12,845,056 pixels: up to 16,384 tokens), LLaVA-1.5 (``CLIPImageProcessor``, 336
pixels: 576 tokens) and LLaVA-NeXT (``LlavaNextImageProcessor``, 336-pixel tiles, the llava-v1.6
grid pinpoints: base image + up to 4 tiles).

Images: ``vllm_tokenprune/testing/content.py`` renders them (flat, gentle gradient, mild noise,
the scikit-image photographs, text pages at 12/16/24 px, matplotlib bar and line charts,
settings-window screenshots), all at the same size.

Sections:

* keep fractions per image and class, with the default options, the ``energy`` rule (the 90%
  spectral-energy rank, E-AdaPrune's rule, per window) and one global window (``window=0``);
* cost: the estimator (token grid + count) against the HF image processor on the same image,
  measured side by side, interleaved, medians, single thread (``torch.set_num_threads(1)``; run
  it under ``taskset -c 0`` as the other cost benchmarks), at about 588, 2,352 and 16,384
  Qwen2.5-VL tokens, and at LLaVA-1.5's and LLaVA-NeXT's sizes;
* the window lattice (``max_windows``): the count from a lattice of windows against every window;
* ``--tower``: the count against the spectrum of the vision tower's own output features, on
  ``python -m benchmarks.serving``'s ``vl7b`` model (random weights; built once and cached).

    taskset -c 0 python -m benchmarks.auto_budget --tower     # ~6 min; writes docs
    taskset -c 0 python -m benchmarks.auto_budget --quick     # ~1 min, print only

Writes the tables between markers in docs/budgets.md and the run's JSON to
docs/auto_budget.json (``--quick`` or ``--no-doc``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_tokenprune.budget import (
    AutoCounter,
    AutoOptions,
    auto_options,
    estimate_keep,
    pixel_scale,
    processor_kind,
    token_grid,
    window_ranks,
)
from vllm_tokenprune.testing import content

ROOT = Path(__file__).resolve().parents[1]

BEGIN, END = "<!-- auto-budget:begin -->", "<!-- auto-budget:end -->"
SIZE = (784, 588)  # 588 Qwen2.5-VL tokens; LLaVA-1.5 576; LLaVA-NeXT base + 2 tiles
COST_SIZES = ((784, 588), (1568, 1176), (3584, 3584))  # 588, 2,352, 16,384 Qwen tokens
COST_IMAGES = (("text", "16"), ("photo", "astronaut"), ("chart", "bar"))
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def processors() -> dict[str, Any]:
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, Qwen2VLImageProcessor

    return {
        "qwen2.5-vl": Qwen2VLImageProcessor(
            patch_size=14, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 3136, "longest_edge": 12845056}),
        "llava-1.5": CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "llava-next": LlavaNextImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=PINPOINTS),
    }


def _grid(proc: Any, image: Any, opts: AutoOptions) -> torch.Tensor:
    return token_grid(proc(images=[image], return_tensors="pt"), proc, opts)


# ------------------------------------------------------------------ keep fractions


def keep_rows(procs: dict[str, Any], size: tuple[int, int]) -> list[dict[str, Any]]:
    variants = {"auto": auto_options(), "energy": auto_options({"rule": "energy", "scale": 1.0}),
                "global": auto_options({"window": 0})}
    rows = []
    for cls, var, image in content.gallery(*size):
        row: dict[str, Any] = {"class": cls, "variant": var}
        for name, proc in procs.items():
            grid = _grid(proc, image, variants["auto"])
            for key, opts in variants.items():
                if key != "auto" and name != "qwen2.5-vl":
                    continue
                est = estimate_keep(grid, None, opts)
                row[f"{name}:{key}"] = est.num_keep / est.num_tokens
            row[f"{name}:tokens"] = est.num_tokens
        rows.append(row)
    return rows


def class_summary(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[float, float, float]]:
    out: dict[str, tuple[float, float, float]] = {}
    for cls in content.CLASSES:
        vals = [r[key] for r in rows if r["class"] == cls]
        out[cls] = (min(vals), statistics.median(vals), max(vals))
    return out


# ------------------------------------------------------------------ cost


def _median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def _sizes_near(size: tuple[int, int], count: int) -> list[tuple[int, int]]:
    """``count`` other sizes within 4 Qwen-VL tokens (28 pixels each) of ``size`` on each side,
    no larger than the processor's 12,845,056 pixels: each a token grid of its own."""
    w, h = size
    near = [(w + 28 * a, h + 28 * b) for a in range(-4, 5) for b in range(-4, 5)
            if (a, b) != (0, 0) and (w + 28 * a) * (h + 28 * b) <= 12845056]
    near.sort(key=lambda s: (s[0] // 28 * 7 + s[1] // 28 * 3) % 17)  # spread over the square
    if len(near) < count:
        raise ValueError(f"{count} sizes near {size} asked, {len(near)} exist")
    return near[:count]


def _pair(proc: Any, image: Any, count: Callable[[Any], Any], clock: Any,
          **kw: Any) -> tuple[float, float, Any]:
    """The processor's time on ``image`` (with ``kw``) and then ``count``'s on its output, and
    what ``count`` returned. The output is released before returning, so that the next timed
    processor call does not free it."""
    t0 = clock()
    out = proc(images=[image], return_tensors="pt", **kw)
    t1 = clock()
    est = count(out)
    t2 = clock()
    del out
    return t1 - t0, t2 - t1, est


def cost_rows(procs: dict[str, Any], reps: int, quick: bool,
              clock: Any = time.thread_time) -> list[dict[str, Any]]:
    """The estimator as the API server runs it (:meth:`AutoCounter.count`) right after the HF
    processor on the same image, interleaved rounds: for an image size seen before (its
    reader kept) and, Qwen-VL only, for the first image of its size (each round another size
    near it: a new token grid, :func:`_sizes_near`; its share of that image's own processor
    time; LLaVA-1.5 has one layout, LLaVA-NeXT one per grid pinpoint, each met once by a
    server). LLaVA at two input sizes: its processor resizes to 336 pixels first, so its time
    grows with the input and auto's does not. The previous round's outputs are released
    before the processor is timed (freeing a large output costs up to a millisecond: it
    belongs to neither)."""
    auto = auto_options()
    energy = auto_options({"rule": "energy", "scale": 1.0})
    cases = [("qwen2.5-vl", s) for s in (COST_SIZES[:2] if quick else COST_SIZES)]
    cases += [(m, s) for m in ("llava-1.5", "llava-next") for s in COST_SIZES[:2]]
    rows = []
    for name, size in cases:
        proc = procs[name]
        # vLLM normalizes Qwen-VL pixels on the device (mm_device_do_normalize): its API
        # server runs the processor without rescale / normalize, and auto reads raw pixels
        qwen = processor_kind(proc) == "qwen"
        raw_scale = pixel_scale(proc, do_rescale=False, do_normalize=False)
        # the server's counters (one per modality, kept for the server's life)
        count = AutoCounter(proc, auto).count
        count_energy = AutoCounter(proc, energy).count
        count_raw = AutoCounter(proc, auto, scale=raw_scale).count
        n = 3 if quick else (reps if size[0] * size[1] < 4e6 else max(3, reps // 3))
        near = _sizes_near(size, len(COST_IMAGES) * (n + 1)) if qwen else []
        for j, (cls, var) in enumerate(COST_IMAGES):
            image = content.render(cls, *size, var)
            others = [content.render(cls, *s, var) for s in near[j * (n + 1):(j + 1) * (n + 1)]]
            t: dict[str, list[float]] = {k: [] for k in (
                "proc", "auto", "energy", "raw_proc", "raw_auto", "new_proc", "first")}
            est = None
            for i in range(n + 1):  # the first round warms up, not counted
                p_t, a_t, est = _pair(proc, image, count, clock)
                t["proc"].append(p_t)
                t["auto"].append(a_t)
                t["energy"].append(_pair(proc, image, count_energy, clock)[1])
                if qwen:
                    p_t, a_t, raw_est = _pair(proc, image, count_raw, clock,
                                              do_rescale=False, do_normalize=False)
                    t["raw_proc"].append(p_t)
                    t["raw_auto"].append(a_t)
                    # the normalized pixels' channels share one factor (their std's mean): within
                    # 1% of the raw pixels' count
                    assert abs(raw_est.num_keep - est.num_keep) <= max(2, est.num_keep // 100), (
                        raw_est, est)
                    p_t, a_t, _ = _pair(proc, others[i], count, clock)
                    t["new_proc"].append(p_t)
                    t["first"].append(a_t)
            assert est is not None
            p, a, e = (_median_ms(t[k][1:]) for k in ("proc", "auto", "energy"))
            row = {"model": name, "size": f"{size[0]}x{size[1]}", "image": f"{cls}:{var}",
                   "tokens": est.num_tokens, "keep": est.num_keep, "reps": n,
                   "processor_ms": p, "auto_ms": a, "auto_pct": 100 * a / p,
                   "energy_rule_ms": e, "energy_rule_pct": 100 * e / p}
            if qwen:
                pr, ar = _median_ms(t["raw_proc"][1:]), _median_ms(t["raw_auto"][1:])
                shares = [f / q for f, q in zip(t["first"][1:], t["new_proc"][1:], strict=True)]
                row.update(raw_processor_ms=pr, raw_auto_ms=ar, raw_auto_pct=100 * ar / pr,
                           first_ms=_median_ms(t["first"][1:]),
                           first_pct=100 * statistics.median(shares))
            rows.append(row)
            print(f"[cost] {name} {size} {cls}:{var} N={est.num_tokens} proc {p:.1f} ms, "
                  f"auto {a:.2f} ms ({100 * a / p:.1f}%), energy rule {e:.2f} ms" + (
                      f"; first of its size {row['first_ms']:.2f} ms ({row['first_pct']:.1f}%)"
                      f"; vLLM's call {row['raw_processor_ms']:.1f} ms, auto "
                      f"{row['raw_auto_ms']:.2f} ms ({row['raw_auto_pct']:.1f}%)"
                      if qwen else ""), flush=True)
    return rows


# ------------------------------------------------------------------ lattice


def lattice_rows(procs: dict[str, Any], size: tuple[int, int]) -> list[dict[str, Any]]:
    proc = procs["qwen2.5-vl"]
    lat, full = auto_options(), auto_options({"max_windows": 0})
    rows = []
    for cls, var, image in content.gallery(*size):
        grid = _grid(proc, image, lat)
        r_lat, windows, computed = window_ranks(grid, lat)
        r_full, _, _ = window_ranks(grid, full)
        rows.append({"image": f"{cls}:{var}", "windows": windows, "computed": computed,
                     "keep_lattice": estimate_keep(grid, None, lat).num_keep,
                     "keep_all": estimate_keep(grid, None, full).num_keep,
                     "rel_err": (r_lat - r_full) / r_full if r_full else 0.0})
    return rows


# ------------------------------------------------------------------ vision tower


def tower_rows(size: tuple[int, int], cache_dir: Path) -> dict[str, Any]:
    """The vl7b tower's merged output features (random weights) per gallery image: the 90%
    energy rank of the whole item (E-AdaPrune's rule on features), and ``auto``'s own rule
    (windows, participation, scale) applied to the feature grid, next to auto's pixel count."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from benchmarks.serving.run import ensure_model

    model_dir = ensure_model("vl7b", cache_dir)
    cfg = AutoConfig.from_pretrained(model_dir).vision_config
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg).eval()
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for k, v in load_file(f).items():
            for prefix in ("model.visual.", "visual."):
                if k.startswith(prefix):
                    state[k[len(prefix):]] = v
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"vision tower weights missing: {missing[:5]}")
    proc = AutoProcessor.from_pretrained(model_dir).image_processor
    opts = auto_options()
    rows = []
    for cls, var, image in content.gallery(*size):
        out = proc(images=[image], return_tensors="pt")
        grid = token_grid(out, proc, opts)
        pix = estimate_keep(grid, None, opts)
        with torch.no_grad():
            res = tower(out["pixel_values"], grid_thw=out["image_grid_thw"])
        feats = getattr(res, "pooler_output", None)
        if feats is None:
            feats = res[0] if isinstance(res, tuple) else res
        feats = feats.float()
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        fgrid = feats.view(t, h // 2, w // 2, -1)
        # The tower's merged rows are in window order; the processor's are in merge blocks of
        # the same raster, so the row order is the token raster (checked by the shape only).
        fx = feats - feats.mean(dim=0)
        lam = torch.linalg.eigvalsh((fx.T @ fx if fx.shape[0] > fx.shape[1] else fx @ fx.T)
                                    .double()).flip(0).clamp_min(0)
        share = torch.cumsum(lam, 0) / lam.sum()
        erank = int((share < 0.9).sum()) + 1
        feat_auto = estimate_keep(fgrid, None, auto_options({"noise_floor": 0.0}))
        rows.append({"image": f"{cls}:{var}", "tokens": pix.num_tokens,
                     "auto_pixels": pix.num_keep, "feature_energy_rank": erank,
                     "feature_auto": feat_auto.num_keep})
        print(f"[tower] {cls}:{var} pixels {pix.num_keep} features: 90% rank {erank}, "
              f"auto rule {feat_auto.num_keep}", flush=True)
    return {"model": str(model_dir), "rows": rows}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / den if den else float("nan")


# ------------------------------------------------------------------ report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(res: dict[str, Any]) -> str:
    out: list[str] = []
    w, h = res["size"]
    rows = res["keep"]
    out.append(f"Keep fraction per image at {w}x{h} (Qwen2.5-VL {rows[0]['qwen2.5-vl:tokens']} "
               f"tokens, LLaVA-1.5 {rows[0]['llava-1.5:tokens']}, LLaVA-NeXT "
               f"{rows[0]['llava-next:tokens']} rows: base + tiles), default options; Qwen2.5-VL "
               "also with the `energy` rule (90% energy rank per window, no scale) and with one "
               "global window (`window: 0`):\n")
    out.append("| class | image | Qwen2.5-VL auto | LLaVA-1.5 auto | LLaVA-NeXT auto | "
               "Qwen energy rule | Qwen global window |")
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        out.append(f"| {r['class']} | {r['variant']} | {_pct(r['qwen2.5-vl:auto'])} | "
                   f"{_pct(r['llava-1.5:auto'])} | {_pct(r['llava-next:auto'])} | "
                   f"{_pct(r['qwen2.5-vl:energy'])} | {_pct(r['qwen2.5-vl:global'])} |")
    out.append("\nPer class (min / median / max of the keep fraction):\n")
    keys = [("qwen2.5-vl:auto", "Qwen2.5-VL auto"), ("llava-1.5:auto", "LLaVA-1.5 auto"),
            ("llava-next:auto", "LLaVA-NeXT auto"), ("qwen2.5-vl:energy", "Qwen energy rule")]
    out.append("| class | " + " | ".join(k[1] for k in keys) + " |")
    out.append("|---|" + "---:|" * len(keys))
    sums = {k: class_summary(rows, k) for k, _ in keys}
    for cls in content.CLASSES:
        cells = []
        for k, _ in keys:
            lo, med, hi = sums[k][cls]
            cells.append(f"{_pct(lo)} / {_pct(med)} / {_pct(hi)}")
        out.append(f"| {cls} | " + " | ".join(cells) + " |")
    if res.get("keep_large"):
        lw, lh = res["size_large"]
        out.append(f"\nThe same classes at {lw}x{lh} (Qwen2.5-VL, "
                   f"{res['keep_large'][0]['qwen2.5-vl:tokens']} tokens; min / median / max):\n")
        out.append("| class | auto | energy rule |")
        out.append("|---|---:|---:|")
        s_a = class_summary(res["keep_large"], "qwen2.5-vl:auto")
        s_e = class_summary(res["keep_large"], "qwen2.5-vl:energy")
        for cls in content.CLASSES:
            out.append(f"| {cls} | " + " | ".join(
                f"{_pct(s[cls][0])} / {_pct(s[cls][1])} / {_pct(s[cls][2])}"
                for s in (s_a, s_e)) + " |")
    clock = ("CPU time of the thread" if res.get("clock", "cpu") == "cpu" else "elapsed time")
    out.append(f"\nCost on the API server (single thread, {clock}, medians of interleaved "
               "rounds; auto as the server runs it, `AutoCounter.count`: for a size seen before "
               "and for the first image of its size; the `energy` rule for comparison):\n")
    out.append("| model | image size | image | tokens | HF processor | auto | auto / processor | "
               "first of its size | first / processor | energy rule | energy / processor | "
               "processor as vLLM runs it (raw) | auto on raw | auto / raw processor |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["cost"]:
        raw = (f"{r['raw_processor_ms']:.1f} ms | {r['raw_auto_ms']:.2f} ms | "
               f"{r['raw_auto_pct']:.1f}%" if "raw_processor_ms" in r else "- | - | -")
        first = (f"{r['first_ms']:.2f} ms | {r['first_pct']:.1f}%" if "first_ms" in r
                 else "- | -")
        out.append(f"| {r['model']} | {r['size']} | {r['image']} | {r['tokens']} | "
                   f"{r['processor_ms']:.1f} ms | {r['auto_ms']:.2f} ms | {r['auto_pct']:.1f}% | "
                   f"{first} | {r['energy_rule_ms']:.2f} ms | {r['energy_rule_pct']:.1f}% | "
                   f"{raw} |")
    out.append("\n" + cost_summary(res["cost"]))
    lat = res["lattice"]
    errs = [abs(r["rel_err"]) for r in lat]
    lw, lh = res["lattice_size"]
    out.append(f"\nWindow lattice at {lw}x{lh} ({lat[0]['windows']} windows, "
               f"{lat[0]['computed']} computed with the default `max_windows`): summed rank "
               f"against every window, |relative error| median {100 * statistics.median(errs):.1f}%"
               f", max {100 * max(errs):.1f}% (over {len(lat)} images); kept counts:\n")
    out.append("| image | every window | lattice |")
    out.append("|---|---:|---:|")
    for r in lat:
        out.append(f"| {r['image']} | {r['keep_all']} | {r['keep_lattice']} |")
    if res.get("tower"):
        tr = res["tower"]["rows"]
        busy = [r for r in tr if r["image"].split(":")[0] not in ("flat", "gradient", "noise")]

        def rho(rows: list[dict[str, Any]], key: str) -> float:
            return spearman([r["auto_pixels"] for r in rows], [r[key] for r in rows])

        out.append(f"\nThe vl7b tower (random weights) at {w}x{h}: auto's pixel count next to "
                   "the 90% energy rank of the tower's merged output features (whole item, "
                   "E-AdaPrune's rule) and auto's own rule run on those features (no noise "
                   "floor: it is in pixel units). Spearman rank correlation with the pixel count, "
                   f"all {len(tr)} images: {rho(tr, 'feature_energy_rank'):.2f} (energy rank), "
                   f"{rho(tr, 'feature_auto'):.2f} (auto rule); the {len(busy)} photos, text "
                   f"pages, charts and screenshots: {rho(busy, 'feature_energy_rank'):.2f} and "
                   f"{rho(busy, 'feature_auto'):.2f}.\n")
        out.append("| image | tokens | auto (pixels) | features: 90% energy rank | "
                   "features: auto rule |")
        out.append("|---|---:|---:|---:|---:|")
        for r in tr:
            out.append(f"| {r['image']} | {r['tokens']} | {r['auto_pixels']} | "
                       f"{r['feature_energy_rank']} | {r['feature_auto']} |")
    out.append(f"\nMachine: {res['machine']}; command: `{res['command']}`.")
    return "\n".join(out)


def cost_summary(cost: list[dict[str, Any]]) -> str:
    """The largest share per model and size (the issue's target: at most 5% of the HF
    processor's time on the same image)."""
    lines = ["Largest share per size (auto / HF processor with its default normalization, for a "
             "size seen before and the first image of its size; auto on raw pixels / the "
             "processor as vLLM runs it):", ""]
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in cost:
        seen.setdefault((r["model"], r["size"]), []).append(r)
    for (model, size), rows in seen.items():
        worst = max(r["auto_pct"] for r in rows)
        ms = ", ".join(f"{r['auto_ms']:.2f}" for r in rows)
        line = (f"* {model} {size} ({rows[0]['tokens']} tokens): {worst:.1f}% of the HF "
                f"processor (auto {ms} ms)")
        if all("first_pct" in r for r in rows):
            line += f"; the first image of its size {max(r['first_pct'] for r in rows):.1f}%"
        if all("raw_auto_pct" in r for r in rows):
            raw = max(r["raw_auto_pct"] for r in rows)
            line += f"; {raw:.1f}% of vLLM's call"
        lines.append(line)
    return "\n".join(lines)


def write_doc(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """``text`` between the ``begin`` and ``end`` markers of ``path``."""
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def writes_doc(args: argparse.Namespace) -> bool:
    """Whether a run writes its tables into the docs: not with ``--no-doc``, and not with
    ``--quick`` (a few rounds must not replace the published medians)."""
    return not (args.no_doc or args.quick)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds, no 16,384-token size; print only")
    p.add_argument("--reps", type=int, default=21, help="timed rounds per image (default 21)")
    p.add_argument("--tower", action="store_true", help="also the vl7b tower comparison")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu (default): this thread's CPU time, so other processes on a shared "
                   "machine do not count; wall: elapsed time")
    p.add_argument("--cache-dir",
                   default=os.path.expanduser("~/.cache/vllm-tokenprune/bench"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "budgets.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "auto_budget.json"))
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    procs = processors()
    t0 = time.time()
    res: dict[str, Any] = {
        "size": SIZE,
        "options": AutoOptions().__dict__,
        "machine": f"{platform.processor() or platform.machine()}, torch "
                   f"{torch.__version__}, 1 thread",
        "command": "taskset -c 0 python -m benchmarks.auto_budget" + (
            " --quick" if args.quick else "") + (" --tower" if args.tower else "") + (
            " --clock wall" if args.clock == "wall" else ""),
        "clock": args.clock,
    }
    res["keep"] = keep_rows(procs, SIZE)
    print(markdown_keep_preview(res["keep"]), flush=True)
    if not args.quick:
        res["size_large"] = COST_SIZES[1]
        res["keep_large"] = keep_rows({"qwen2.5-vl": procs["qwen2.5-vl"]}, COST_SIZES[1])
    res["cost"] = cost_rows(procs, args.reps, args.quick,
                            time.thread_time if args.clock == "cpu" else time.perf_counter)
    res["lattice_size"] = COST_SIZES[1] if args.quick else COST_SIZES[2]
    res["lattice"] = lattice_rows(procs, res["lattice_size"])
    if args.tower:
        res["tower"] = tower_rows(SIZE, Path(args.cache_dir))
    text = markdown(res)
    print(text)
    print(f"[auto_budget] {time.time() - t0:.0f} s")
    if writes_doc(args):
        write_doc(Path(args.doc), text)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"wrote {args.doc} and {args.json}")
    return 0


def markdown_keep_preview(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"[keep] {r['class']:9s}{r['variant']:10s} qwen {_pct(r['qwen2.5-vl:auto']):>6s} "
        f"llava {_pct(r['llava-1.5:auto']):>6s} next {_pct(r['llava-next:auto']):>6s} "
        f"(qwen energy {_pct(r['qwen2.5-vl:energy'])}, global {_pct(r['qwen2.5-vl:global'])})"
        for r in rows)


if __name__ == "__main__":
    sys.exit(main())

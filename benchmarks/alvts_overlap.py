"""ALVTS selector fidelity: does the shipped selector route what the layer's attention favours?

For each model, image prompts (scikit-image photos, "Describe this image.") run through
transformers' model *without* routing, in eager attention (exact probabilities: RoPE included,
causal, softmax over the whole sequence). At every decoder layer ``l`` two exact importances of
the item's N visual tokens are read off the layer's true attention, averaged over heads:

* ``item``: the attention they receive from the item's own tokens (the population the
  selector's queries are drawn from: what it emulates);
* ``text``: the attention they receive from the prompt tokens after the item (what the answer
  reads; not available to the selector: a prefill step may end before the text, and a prefix
  cache hit would reuse the decision for another question).

Selectors score the hidden states entering layer ``l`` (the selector of
``vllm_tokenprune.alvts``, the consistency blend starting at the first averaged layer): query
sets ``all`` (every item token), ``strided-M`` (M tokens evenly strided: what ships, M =
``queries``), ``pooled-M`` (means of M contiguous runs of tokens), ``text-q`` (the text after
the item: unusable in a server, shown to separate the query set's cost from the low rank's and
RoPE's); factorisations ``group`` (a rank-r key subspace per KV group: what ships) and
``per-head`` (a rank-r truncated SVD per query head: the previous factorisation, H/G times the
key projection's cost); baselines ``norm`` (largest hidden-state L2 norm) and ``random``
(expected overlap k / N). Overlap = |top-k(selector) & top-k(exact)| / k, k = the keep-count
rule's tokens processed at prune_ratio 0.5 and 0.889, averaged over the layers from the first
routed one and over the images.

    python -m benchmarks.alvts_overlap            # tiny Qwen2.5-VL, tiny LLaVA-1.5, mid (~15 min)
    python -m benchmarks.alvts_overlap --quick    # tiny models only (~1 min)

Run from the repository root as a module (``benchmarks`` is a package).

Writes the tables between the markers in docs/alvts.md and the numbers to
docs/alvts_overlap.json (``--no-doc``: print only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_tokenprune.alvts import (
    AlvtsOptions,
    QKFactors,
    auto_rank,
    importance,
    layer_factors,
    num_processed,
)
from vllm_tokenprune.alvts.overlap import capture, overlaps
from vllm_tokenprune.alvts.reference import decoder_layers, text_config

ROOT = Path(__file__).resolve().parents[1]

RATIOS = (0.5, 0.889)
TARGETS = ("item", "text")
WEIGHTS = (0.0, 0.25, 0.5, 0.75)
RANKS = (2, 4, 8, 16, 32, 64)
QUERY_SETS = ("all", "strided-8", "strided-16", "strided-32", "strided-64", "strided-128",
              "pooled-32", "pooled-64", "text-q")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
BEGIN, END = "<!-- alvts-overlap:begin -->", "<!-- alvts-overlap:end -->"
DEFAULTS = AlvtsOptions()


def photo(name: str, width: int, height: int) -> Any:
    import skimage.data as skdata
    from PIL import Image

    return Image.fromarray(getattr(skdata, name)()).resize((width, height), Image.BICUBIC)


def models(quick: bool, cache: Path) -> list[tuple[str, Path, tuple[int, int], int, bool]]:
    """(name, model dir, image size, first averaged layer = the chain's first_layer, whether
    to print the rank and per-layer tables too)."""
    from vllm_tokenprune.testing.tiny_model import build_llava, build_qwen2_5_vl

    out = [
        ("tiny Qwen2.5-VL (4 layers, hidden 128, 4/2 heads)",
         _cached(cache / "tiny-qwen2_5_vl-4l", lambda d: build_qwen2_5_vl(
             d, text_layers=4, rope_theta=1e6)),
         (448, 336), 1, True),
        ("tiny LLaVA-1.5 (4 layers, hidden 128, 4/2 heads, 224 px)",
         _cached(cache / "tiny-llava-4l-224",
                 lambda d: build_llava(d, text_layers=4, image_size=224)), (224, 224), 1, True),
    ]
    if not quick:
        from benchmarks.serving.run import PRESETS, ensure_model

        mid = ensure_model("mid", cache)
        name = ("mid Qwen2.5-VL (`python -m benchmarks.serving`'s `mid` preset: 20 layers, "
                "hidden 1024, 16/4 heads)")
        out.append((name, mid, PRESETS["mid"][1], DEFAULTS.first_layer, True))
        out.append((name + ", 1568x1176 images", mid, (1568, 1176), DEFAULTS.first_layer,
                    False))
    return out


def _cached(path: Path, build: Callable[[Path], Any]) -> Path:
    if not (path / "config.json").exists():
        build(path)
    return path


def pooled(h: torch.Tensor, m: int) -> torch.Tensor:
    """Means of ``m`` contiguous runs of rows (run boundaries at round(i N / m))."""
    n = h.shape[0]
    bounds = [round(i * n / m) for i in range(m + 1)]
    return torch.stack([h[a:b].mean(0) for a, b in zip(bounds, bounds[1:], strict=False)
                        if b > a])


def factors_for(model: Any, rank: int, per_head: bool) -> dict[int, QKFactors]:
    tc = text_config(model)
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        wk = attn.k_proj.weight
        if per_head:
            wk = wk.view(kv, -1, wk.shape[1]).repeat_interleave(heads // kv, 0).flatten(0, 1)
        out[i] = layer_factors(attn.q_proj.weight, wk, num_heads=heads,
                               num_kv_heads=heads if per_head else kv, rank=rank,
                               q_bias=attn.q_proj.bias, norm_weight=layer.input_layernorm.weight,
                               eps=float(getattr(tc, "rms_norm_eps", 1e-6)))
    return out


def scores(entering: dict[int, torch.Tensor], n: int, f: dict[int, QKFactors], qset: str
           ) -> dict[int, torch.Tensor]:
    out = {}
    for i, h in entering.items():
        item = h[:n]
        if qset == "all":
            out[i] = importance(item, f[i])
        elif qset.startswith("strided-"):
            out[i] = importance(item, f[i], int(qset.split("-")[1]))
        elif qset.startswith("pooled-"):
            out[i] = importance(item, f[i], query_states=pooled(item, int(qset.split("-")[1])))
        elif qset == "text-q":
            out[i] = importance(item, f[i], query_states=h[n:])
        else:
            raise ValueError(qset)
    return out


@torch.no_grad()
def measure(model_dir: Path, size: tuple[int, int], first: int, photos: list[str],
            default_q: str, all_ranks: bool) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tc = text_config(model)
    head_dim = tc.hidden_size // tc.num_attention_heads
    ranks = [r for r in RANKS if r <= head_dim]
    if head_dim not in ranks:
        ranks.append(head_dim)
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    default_rank = auto_rank(tc.hidden_size, kv, head_dim) if DEFAULTS.rank is None \
        else min(DEFAULTS.rank, head_dim)
    shown = {default_rank, head_dim}  # ranks of the query-set table
    if not all_ranks:
        ranks = sorted(shown)
    factors = {(r, ph): factors_for(model, r, ph) for r in ranks for ph in (False, True)
               if not (ph and r == head_dim)}  # at full rank both are exact
    # results[(factorisation, query set, rank, w)][target@ratio] = per-layer list (all images)
    results: dict[tuple[str, str, int, float], dict[str, list[float]]] = {}

    def add(key: tuple[str, str, int, float], ov: dict[str, list[float]]) -> None:
        slot = results.setdefault(key, {})
        for c, v in ov.items():
            slot.setdefault(c, []).extend(v)

    n = 0
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe this image."}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    for name in photos:
        cap = capture(model, proc(text=[prompt], images=[photo(name, *size)],
                                  return_tensors="pt"))
        entering, exact, n = cap.entering, cap.exact, cap.num_tokens
        for (rank, ph), f in factors.items():
            qsets = (default_q,) if ph else QUERY_SETS if rank in shown else (default_q,)
            every = None if ph or rank not in shown else scores(entering, n, f, "all")
            for q in qsets:
                imp = scores(entering, n, f, q)
                if every is not None:  # the query sample against every token, no blend
                    add(("agree", q, rank, 0.0), overlaps(
                        imp, {i: {"all": v} for i, v in every.items()}, first, 0.0, RATIOS))
                for w in WEIGHTS:
                    if q != default_q and w != DEFAULTS.consistency:
                        continue
                    add(("per-head" if ph else "group", q, rank, w),
                        overlaps(imp, exact, first, w, RATIOS))
            if not ph and rank == default_rank:  # each layer alone, from 0
                add(("alone", default_q, rank, 0.0),
                    overlaps(scores(entering, n, f, default_q), exact, 0, 0.0, RATIOS))
        norm = {i: h[:n].norm(dim=-1) for i, h in entering.items()}
        add(("-", "norm", 0, 0.0), overlaps(norm, exact, first, 0.0, RATIOS))
        del cap, entering, exact
    layers = len(decoder_layers(model))
    ks = {str(r): num_processed(n, r) for r in RATIOS}
    return {
        "N": n, "layers": layers, "first": first, "head_dim": head_dim,
        "heads": tc.num_attention_heads, "kv_heads": kv, "ranks": ranks,
        "default_rank": default_rank,
        "photos": photos, "random": {str(r): num_processed(n, r) / n for r in RATIOS}, "k": ks,
        "results": [{"factors": k[0], "queries": k[1], "rank": k[2], "w": k[3],
                     "shared": {c: [round(x * ks[c.split("@")[1]]) for x in xs]
                                for c, xs in v.items()}}
                    for k, v in results.items()],
    }


COLS = [f"{t}@{r}" for t in TARGETS for r in RATIOS]


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _find(res: dict[str, Any], factors: str, queries: str, rank: int, w: float
          ) -> dict[str, list[float]] | None:
    """Per-layer overlaps (all photos) of one configuration: shared tokens / k."""
    for r in res["results"]:
        if (r["factors"], r["queries"], r["rank"], r["w"]) == (factors, queries, rank, w):
            return {c: [x / res["k"][c.split("@")[1]] for x in xs]
                    for c, xs in r["shared"].items()}
    return None


def _line(label: str, per_layer: dict[str, list[float]]) -> str:
    return f"| {label} | " + " | ".join(f"{_mean(per_layer[c]):.3f}" for c in COLS) + " |"


def tables(name: str, res: dict[str, Any], default_q: str, w: float) -> str:
    head = " | " + " | ".join(f"vs {c.replace('@', ' @')}" for c in COLS) + " |"
    sep = "|---" * (len(COLS) + 1) + "|"
    full = res["head_dim"]
    ranks = res["ranks"]
    rank = res["default_rank"]
    agree_cols = [f"all@{r}" for r in RATIOS]
    out = [f"**{name}**: N = {res['N']} visual tokens, layers {res['first']}-"
           f"{res['layers'] - 1} of {res['layers']} averaged, {len(res['photos'])} photos "
           f"({', '.join(res['photos'])}), head_dim {full}.", "",
           f"Query sets (group factors, w {w}; the last two columns: agreement of each layer's "
           "top-k with that of every token as queries, no blend):", "",
           "| query set | rank" + head[:-1] + "| " + " | ".join(
               f"vs every-token @{r}" for r in RATIOS) + " |", "|---|---|---" + sep]
    for q in QUERY_SETS:
        for r in sorted({rank, full}):
            pl = _find(res, "group", q, r, w)
            ag = _find(res, "agree", q, r, 0.0)
            if pl:
                out.append(_line(f"{q} | {r}", pl) + (" " + " | ".join(
                    f"{_mean(ag[c]):.3f}" for c in agree_cols) + " |" if ag else " - | - |"))
    out.append(_line("norm (baseline) | -", _find(res, "-", "norm", 0, 0.0)) + " - | - |")
    out.append("| random (expected) | - | " + " | ".join(
        f"{res['random'][c.split('@')[1]]:.3f}" for c in COLS) + " | " + " | ".join(
        f"{res['random'][str(r)]:.3f}" for r in RATIOS) + " |")
    if not res.get("all_tables", True):
        return "\n".join(out)
    out += ["", f"Rank and consistency weight w (query set `{default_q}`; `per-head`: the "
            "previous factorisation, w " + f"{w}):", "", "| factors | rank | w" + head,
            "|---|---" + sep]
    for r in ranks:
        for ww in WEIGHTS:
            pl = _find(res, "group", default_q, r, ww)
            if pl:
                out.append(_line(f"group | {r} | {ww}", pl))
        pl = _find(res, "per-head", default_q, r, w)
        if pl:
            out.append(_line(f"per-head | {r} | {w}", pl))
    pl = _find(res, "alone", default_q, rank, 0.0)
    if pl:
        n_img = len(res["photos"])
        layers = res["layers"]
        out += ["", f"Per layer, each scored alone (`{default_q}`, group rank {rank}, "
                "no blend; mean over the photos):", "", "| layer" + head, sep]
        for layer in range(layers):
            vals = [sum(pl[c][layer + k * layers] for k in range(n_img)) / n_img for c in COLS]
            out.append(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models only")
    p.add_argument("--photos", nargs="+", default=list(PHOTOS))
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/vllm-tokenprune/bench"))
    p.add_argument("--doc", default=str(ROOT / "docs/alvts.md"))
    p.add_argument("--json", default=str(ROOT / "docs/alvts_overlap.json"))
    p.add_argument("--no-doc", action="store_true", help="print only")
    p.add_argument("--report-only", metavar="JSON",
                   help="re-render the tables from a saved --json file (e.g. after a default "
                        "changed), measure nothing")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    took = 0.0
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    default_q = f"strided-{DEFAULTS.queries}"
    parts: list[str] = []
    runs: dict[str, Any] = {}
    t0 = time.time()
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        cmd, runs = saved["command"], saved["models"]
        for name, res in runs.items():
            parts.append(tables(name, res, default_q, DEFAULTS.consistency))
        took = saved.get("seconds", 0.0)
    for name, d, size, first, full in [] if args.report_only else models(args.quick, cache):
        res = measure(d, size, first, args.photos, default_q, full)
        res["all_tables"] = full
        runs[name] = res
        parts.append(tables(name, res, default_q, DEFAULTS.consistency))
        print(parts[-1], "\n", flush=True)
        took = time.time() - t0
    if not args.report_only:
        cmd = "python -m benchmarks.alvts_overlap" + (" --quick" if args.quick else "")
    body = "\n\n".join(parts) + (f"\n\nGenerated by `{cmd}` in {took:.0f} s (CPU, float32; "
                                 f"tables for the defaults: `{default_q}`, rank "
                                 f"{DEFAULTS.rank or 'auto'}, w {DEFAULTS.consistency}).")
    if not args.no_doc:
        doc = Path(args.doc)
        text = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:a] + "\n" + body + "\n" + text[b:])
        if not args.report_only:
            Path(args.json).write_text(json.dumps({"command": cmd, "seconds": took,
                                                   "models": runs}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

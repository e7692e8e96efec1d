"""ALVTS selector fidelity: does it route the tokens the layer's own attention favours?

For each model, one image prompt is run through transformers' model *without* routing, in eager
attention (exact probabilities, RoPE included, softmax over the whole sequence). At every
decoder layer ``l`` two exact importances of the item's visual tokens are read off the layer's
true attention: ``item`` = attention received from the item's own tokens (the query set the
selector uses), ``text`` = attention received from the prompt tokens after the item. The
selector scores the same hidden states (those entering layer ``l``) for each rank and
consistency weight (the blend starts at the first layer of the table). Reported: overlap =
|top-k(selector) & top-k(exact)| / k, with k = the keep-count rule's tokens processed at
prune_ratio 0.5 and 0.89, averaged over the layers from ``first_layer`` on; ``random`` is the
expected overlap of a random choice (k / N).

    python benchmarks/alvts_overlap.py            # tiny Qwen2.5-VL, tiny LLaVA-1.5, mid Qwen2.5-VL
    python benchmarks/alvts_overlap.py --quick    # tiny models only

Writes the tables between the markers in docs/alvts.md (and prints them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vllm_tokenprune.alvts import (  # noqa: E402
    combine,
    importance,
    layer_factors,
    num_processed,
)
from vllm_tokenprune.alvts.reference import (  # noqa: E402
    decoder_layers,
    item_spans,
    placeholder_ids,
    text_config,
)

RATIOS = (0.5, 0.89)
VARIANTS = ("item", "item-causal", "text-q")
TARGETS = ("text",)
WEIGHTS = (0.0, 0.25, 0.5, 0.75)
BEGIN, END = "<!-- alvts-overlap:begin -->", "<!-- alvts-overlap:end -->"


def photo(width: int, height: int) -> Any:
    import skimage.data as skdata
    from PIL import Image

    return Image.fromarray(skdata.astronaut()).resize((width, height), Image.BICUBIC)


def models(quick: bool, cache: Path) -> list[tuple[str, Path, tuple[int, int], int]]:
    """(name, model dir, image size, first layer of the averages)."""
    from vllm_tokenprune.testing.tiny_model import build_llava, build_qwen2_5_vl

    out = [
        ("tiny Qwen2.5-VL (4 layers, hidden 128)",
         _cached(cache / "tiny-qwen2_5_vl-4l", lambda d: build_qwen2_5_vl(d, text_layers=4,
                                                                        rope_theta=1e6)),
         (448, 336), 1),
        ("tiny LLaVA-1.5 (4 layers, hidden 128)",
         _cached(cache / "tiny-llava-4l", lambda d: build_llava(d, text_layers=4)), (112, 112), 1),
    ]
    if not quick:
        import serve

        out.append(("mid Qwen2.5-VL (benchmarks/serve.py `mid`: 20 layers, hidden 1024, "
                    "16/4 heads)", serve.ensure_model("mid", cache), serve.PRESETS["mid"][1], 2))
    return out


def _cached(path: Path, build: Any) -> Path:
    if not (path / "config.json").exists():
        build(path)
    return path


@torch.no_grad()
def measure(model_dir: Path, size: tuple[int, int], first: int,
            ranks: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe this image."}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[photo(*size)], return_tensors="pt")
    (s, e), = item_spans(inputs["input_ids"][0], placeholder_ids(model))
    layers = decoder_layers(model)
    entering: dict[int, torch.Tensor] = {}

    def grab(i: int):  # noqa: ANN202
        def pre(_m: Any, args: tuple, kwargs: dict) -> None:
            entering[i] = (args[0] if args else kwargs["hidden_states"])[0].clone()
        return pre

    hooks = [layer.register_forward_pre_hook(grab(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    out = model(**inputs, output_attentions=True)
    for h in hooks:
        h.remove()
    tc = text_config(model)
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    n = e - s
    exact = {}
    for i, att in enumerate(out.attentions):
        p = att[0].float()
        exact[i] = {"text": p[:, e:, s:e].sum(1).mean(0)}
    rows = []
    for rank in ranks:
        imps = {}
        for i, layer in enumerate(layers):
            f = layer_factors(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                              num_heads=heads, num_kv_heads=kv, rank=rank,
                              q_bias=layer.self_attn.q_proj.bias,
                              norm_weight=layer.input_layernorm.weight,
                              eps=float(getattr(tc, "rms_norm_eps", 1e-6)))
            h = entering[i]
            imps[i] = {"item": importance(h[s:e], f),
                       "item-causal": importance(h[s:e], f, causal=True),
                       "text-q": importance(h[s:e], f, queries=h[e:])}
        for w in WEIGHTS:
            prev: dict[str, torch.Tensor | None] = dict.fromkeys(VARIANTS)
            per_layer: dict[tuple[str, str, float], list[float]] = {}
            for i in range(first, len(layers)):
                for v in VARIANTS:
                    score = combine(imps[i][v], prev[v], w)
                    prev[v] = score
                    for ratio in RATIOS:
                        k = num_processed(n, ratio)
                        ours = set(score.topk(k).indices.tolist())
                        for q in TARGETS:
                            ref = set(exact[i][q].topk(k).indices.tolist())
                            per_layer.setdefault((v, q, ratio), []).append(len(ours & ref) / k)
            rows.append({"rank": rank, "w": w, "layers": per_layer})
    info = {"N": n, "layers": len(layers), "head_dim": tc.hidden_size // heads, "first": first,
            "random": {r: num_processed(n, r) / n for r in RATIOS}}
    return rows, info


def table(name: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    cols = [(v, q, r) for v in VARIANTS for q in TARGETS for r in RATIOS]
    head = "| rank | w | " + " | ".join(f"{v} vs {q} @{r}" for v, q, r in cols) + " |"
    lines = [f"**{name}**: N = {info['N']} visual tokens, {info['layers']} layers "
             f"(averaged over layers {info['first']}-{info['layers'] - 1}), head_dim "
             f"{info['head_dim']}.", "", head, "|" + "---|" * (2 + len(cols))]
    for row in rows:
        vals = [sum(row["layers"][c]) / len(row["layers"][c]) for c in cols]
        lines.append(f"| {row['rank']} | {row['w']} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + " |")
    lines.append("| random | - | " + " | ".join(
        f"{info['random'][r]:.3f}" for _, _, r in cols) + " |")
    return "\n".join(lines)


def per_layer_table(rows: list[dict[str, Any]], info: dict[str, Any], rank: int,
                    w: float) -> str:
    row = next(r for r in rows if r["rank"] == rank and r["w"] == w)
    cols = [("item", q, r) for q in TARGETS for r in RATIOS]
    lines = [f"Per layer, selector `item`, rank {rank}, w {w}:", "",
             "| layer | " + " | ".join(f"vs {q} @{r}" for _, q, r in cols) + " |",
             "|" + "---|" * (1 + len(cols))]
    for j, layer in enumerate(range(info["first"], info["layers"])):
        lines.append(f"| {layer} | " + " | ".join(
            f"{row['layers'][c][j]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models only")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/vllm-tokenprune/bench"))
    p.add_argument("--doc", default=str(ROOT / "docs/alvts.md"))
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    t0 = time.time()
    for name, d, size, first in models(args.quick, cache):
        rows, info = measure(d, size, first, [1, 2, 4, 8, 16, 32, 64])
        ranks = sorted({r["rank"] for r in rows if r["rank"] <= info["head_dim"]})
        rows = [r for r in rows if r["rank"] in ranks]
        parts.append(table(name, rows, info))
        parts.append(per_layer_table(rows, info, 8, 0.25))
        print(parts[-2], "\n", parts[-1], "\n", flush=True)
    body = "\n\n".join(parts) + (f"\n\nGenerated by `python benchmarks/alvts_overlap.py"
                                 f"{' --quick' if args.quick else ''}` in "
                                 f"{time.time() - t0:.0f} s (CPU, float32).")
    if not args.no_doc:
        doc = Path(args.doc)
        text = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:a] + "\n" + body + "\n" + text[b:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

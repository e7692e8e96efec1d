"""ALVTS vs LRCP: language-model prefill time and FLOPs, side by side, outside vLLM.

ALVTS is served inside vLLM (:mod:`vllm_tokenprune.alvts`; end to end:
``python -m benchmarks.serving --methods lrcp alvts``, docs/benchmarks.md). This study isolates
the language model's prefill, where ALVTS saves its work, with plain transformers on the
mid-size random-weight Qwen2.5-VL of ``benchmarks.serving`` (its ``mid`` preset: 20 layers,
hidden 1024, 16/4 heads, MLP 2816; a 784x588 image = 588 visual tokens). The language model's
input (embeddings, M-RoPE positions) is captured once from transformers' own pipeline, then
timed, interleaved, under:

* ``plain``: all tokens, all layers;
* ``lrcp r``: LRCP keeps ``num_kept(588, r)`` visual tokens at the input (shorter sequence);
* ``alvts r``: every token in the sequence; at routed layers (``first_layer`` on) attention runs
  on all tokens (K/V of all, as in the reference), then post-attention norm + MLP run only on
  the text and routed visual tokens; skipped tokens keep their input hidden state. Selector time
  included. Its output is checked against :mod:`vllm_tokenprune.alvts.reference` (same routing,
  straightforward implementation) before timing.

FLOPs are counted analytically (matmuls only, 2 per multiply-add, causal attention as half of
S x S): ``ALVTS (this run)`` as implemented here, ``ALVTS (ideal)`` with the attention queries and
o_proj of skipped tokens not computed either.

    python -m benchmarks.alvts_prefill [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vllm_tokenprune import num_kept, select_tokens
from vllm_tokenprune.alvts import AlvtsOptions, num_processed
from vllm_tokenprune.alvts.reference import (
    decoder_layers,
    item_spans,
    placeholder_ids,
    routed,
    router_for,
)

ROOT = Path(__file__).resolve().parents[1]

RATIOS = (0.0, 0.5, 0.89)
BEGIN, END = "<!-- alvts-prefill:begin -->", "<!-- alvts-prefill:end -->"


def capture(model: Any, inputs: Any) -> dict[str, Any]:
    lm = model.model.language_model
    got: dict[str, Any] = {}

    def pre(_m: Any, _args: tuple, kwargs: dict) -> None:
        got["embeds"] = kwargs["inputs_embeds"].detach().clone()
        got["pos"] = kwargs["position_ids"].detach().clone()

    h = lm.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return got


def efficient_layer_forward(layer: Any, rows_fn: Any) -> Any:
    """A decoder-layer forward that runs post-norm + MLP on ``rows_fn()`` rows only."""

    def forward(hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, use_cache: bool = False,
                position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
        rows = rows_fn(hidden_states)
        if rows is None:
            return layer._orig_forward(hidden_states, attention_mask, position_ids,
                                       past_key_values, use_cache, position_embeddings, **kwargs)
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states),
                               attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache,
                               position_embeddings=position_embeddings, **kwargs)
        out = hidden_states.clone()
        sub = hidden_states[:, rows] + a[:, rows]
        out[:, rows] = sub + layer.mlp(layer.post_attention_layernorm(sub))
        return out

    return forward


class Alvts:
    """Efficient routed forward on the LM's layers, for one prompt layout."""

    def __init__(self, model: Any, span: tuple[int, int], seq: int, options: AlvtsOptions):
        self.model, self.span, self.seq = model, span, seq
        self.router = router_for(model, options)
        self.k: int | None = None
        self.selector_s = 0.0
        for i, layer in enumerate(decoder_layers(model)):
            if i in self.router.factors:
                layer._orig_forward = layer.forward
                layer.forward = efficient_layer_forward(layer, self._rows(i))

    def _rows(self, idx: int) -> Any:
        def rows(hidden: torch.Tensor) -> torch.Tensor | None:
            s, e = self.span
            if self.k is None or hidden.shape[1] != self.seq:
                return None
            if idx == self.router.routed_layers[0]:
                self.state = self.router.new_state()
            t = time.perf_counter()
            proc = self.router.route(idx, hidden[0, s:e], self.k, self.state)
            self.selector_s += time.perf_counter() - t
            return torch.cat([torch.arange(s), proc + s, torch.arange(e, self.seq)])
        return rows


def flops(cfg: Any, seq: int, vis: int, routed_vis: int | None, routed_layers: int,
          ideal: bool) -> float:
    d_model, inter = cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d_model // heads
    layers = cfg.num_hidden_layers

    def layer(s_all: int, s_q: int, s_mlp: int) -> float:
        qkv = 2 * s_all * d_model * (heads + 2 * kv) * hd
        attn = 2 * 2 * s_q * s_all * heads * hd / 2
        o = 2 * s_q * d_model * d_model
        mlp = 2 * 3 * s_mlp * d_model * inter
        return qkv + attn + o + mlp

    if routed_vis is None:
        return layers * layer(seq, seq, seq)
    routed_s = seq - vis + routed_vis
    q = routed_s if ideal else seq
    return (layers - routed_layers) * layer(seq, seq, seq) + routed_layers * layer(seq, q, routed_s)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from benchmarks.serving import run as serve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/vllm-tokenprune/bench"))
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks.md"))
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = serve.ensure_model("mid", Path(args.cache_dir))
    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    import skimage.data as skdata

    img = Image.fromarray(skdata.astronaut()).resize(serve.PRESETS["mid"][1], Image.BICUBIC)
    msgs = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": serve.PROMPT}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[img], return_tensors="pt")
    (s, e), = item_spans(inputs["input_ids"][0], placeholder_ids(model))
    seq, vis = int(inputs["input_ids"].shape[1]), e - s
    lm = model.model.language_model
    cap = capture(model, inputs)
    options = AlvtsOptions()

    # the efficient forward must equal the straightforward reference
    with routed(model, inputs["input_ids"], 0.89, options), torch.no_grad():
        ref = model(**inputs).logits[0, -1]
    alvts = Alvts(model, (s, e), seq, options)
    alvts.k = num_processed(vis, 0.89)
    with torch.no_grad():
        eff = model(**inputs).logits[0, -1]
    check = float((eff - ref).abs().max())
    assert check < 1e-3, check

    def run_plain() -> None:
        lm(inputs_embeds=cap["embeds"], position_ids=cap["pos"], use_cache=False)

    lrcp_inputs = {}
    for r in RATIOS[1:]:
        keep = select_tokens(cap["embeds"][0, s:e], num_kept(vis, r), "lrcp") + s
        cols = torch.cat([torch.arange(s), keep, torch.arange(e, seq)])
        lrcp_inputs[r] = (cap["embeds"][:, cols], cap["pos"][:, :, cols])

    configs: list[tuple[str, float, Any]] = [("plain", 0.0, run_plain)]
    for r in RATIOS[1:]:
        configs.append(("lrcp", r, lambda r=r: lm(inputs_embeds=lrcp_inputs[r][0],
                                                   position_ids=lrcp_inputs[r][1],
                                                   use_cache=False)))

        def run_alvts(r: float = r) -> None:
            alvts.k = num_processed(vis, r)
            lm(inputs_embeds=cap["embeds"], position_ids=cap["pos"], use_cache=False)
            alvts.k = None
        configs.append(("alvts", r, run_alvts))
    times: dict[tuple[str, float], list[float]] = {(n, r): [] for n, r, _ in configs}
    sel: dict[float, list[float]] = {r: [] for r in RATIOS[1:]}
    with torch.no_grad():
        for _, _, fn in configs:  # warm-up
            fn()
        for _ in range(args.reps):
            for name, r, fn in configs:
                alvts.selector_s = 0.0
                t = time.perf_counter()
                fn()
                times[(name, r)].append(time.perf_counter() - t)
                if name == "alvts":
                    sel[r].append(alvts.selector_s)
    cfg = model.config.text_config
    n_routed = len(alvts.router.routed_layers)
    base_t = statistics.median(times[("plain", 0.0)])
    base_f = flops(cfg, seq, vis, None, 0, False)
    lines = [
        f"Mid-size random-weight Qwen2.5-VL (`benchmarks/serving` `mid`: {cfg.num_hidden_layers}"
        f" layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads, MLP {cfg.intermediate_size}); one 784x588 image = "
        f"{vis} visual tokens, prompt {seq} tokens. ALVTS defaults (first_layer "
        f"{options.first_layer}: {n_routed} routed layers, rank {options.rank or 'auto'}, "
        f"consistency {options.consistency}). Language model only, float32, {args.threads} "
        f"threads, median of {args.reps} interleaved runs; the machine was shared with other "
        f"jobs (ratios are what to read). Efficient ALVTS forward vs the reference: max |logit "
        f"diff| {check:.1e}.", "",
        "| config | LM prefill ms | time vs plain | selector ms | FLOPs (G) | FLOPs vs plain |"
        " ideal ALVTS FLOPs vs plain |",
        "|---|---|---|---|---|---|---|",
        f"| plain | {base_t * 1e3:.0f} | 1.00 | - | {base_f / 1e9:.1f} | 1.00 | - |",
    ]
    for r in RATIOS[1:]:
        k = num_kept(vis, r)
        t = statistics.median(times[("lrcp", r)])
        f = flops(cfg, seq - vis + k, k, None, 0, False)
        lines.append(f"| lrcp {r} (keeps {k}) | {t * 1e3:.0f} | {t / base_t:.2f} | - | "
                     f"{f / 1e9:.1f} | {f / base_f:.2f} | - |")
        t = statistics.median(times[("alvts", r)])
        f = flops(cfg, seq, vis, k, n_routed, False)
        fi = flops(cfg, seq, vis, k, n_routed, True)
        lines.append(f"| alvts {r} (routes {k}) | {t * 1e3:.0f} | {t / base_t:.2f} | "
                     f"{statistics.median(sel[r]) * 1e3:.1f} | {f / 1e9:.1f} | "
                     f"{f / base_f:.2f} | {fi / base_f:.2f} |")
    lines.append("")
    lines.append("Generated by `python -m benchmarks.alvts_prefill` (transformers, CPU).")
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        doc = Path(args.doc)
        text = doc.read_text()
        if BEGIN not in text:
            text += ("\n## ALVTS vs LRCP: language-model prefill (transformers, CPU)\n\n"
                     f"{BEGIN}\n{END}\n")
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:a] + "\n" + body + "\n" + text[b:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

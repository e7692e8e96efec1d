"""Multiply-accumulates per LM token of a Qwen2.5-VL's vision tower and language model.

Counts the matrix products of a forward pass (the FLOPs are twice these), per language-model
token, for an image of ``n`` LM tokens (``4 n`` patches with spatial merge 2):

* vision tower, per patch: patch embedding (``3 * temporal_patch * patch^2 -> hidden``), per
  block QKV + output projections ``4 h^2``, SwiGLU MLP ``3 h I``, attention ``2 * ctx * h`` with
  ``ctx`` = the window's patches (``(window / patch)^2``) in windowed blocks and all ``4 n``
  patches in the ``fullatt_block_indexes`` blocks; the patch merger ``(4h)^2 + 4h * out`` per LM
  token;
* language model, per token: per layer ``q, o: h^2`` each, ``k, v: h * kv_heads * head_dim``
  each, SwiGLU MLP ``3 h I``, causal attention ``2 * h * n / 2`` (the image's own tokens; the
  text prompt and the LM head of the last token are left out).

Norms, biases, rotary embeddings and softmax are left out on both sides (a few percent).

    python -m benchmarks.model_flops            # Qwen2.5-VL-7B vs the serving benchmark presets
"""

from __future__ import annotations

import argparse
from typing import Any

#: Qwen2.5-VL-7B-Instruct's config.json (the fields counted here).
QWEN2_5_VL_7B: dict[str, Any] = {
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                      "fullatt_block_indexes": [7, 15, 23, 31]},
    "text_config": {"num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
                    "num_attention_heads": 28, "num_key_value_heads": 4},
}


def vision_macs_per_lm_token(vc: dict[str, Any], n: int) -> float:
    """Vision-tower MACs per LM token for an image of ``n`` LM tokens."""
    h, inter, depth = vc["hidden_size"], vc["intermediate_size"], vc["depth"]
    patch, merge = vc["patch_size"], vc["spatial_merge_size"]
    per_lm = merge * merge
    full = len(vc.get("fullatt_block_indexes", []))
    window_ctx = (vc["window_size"] // patch) ** 2
    patches = n * per_lm
    linear = depth * (4 * h * h + 3 * h * inter)
    attn = (depth - full) * 2 * min(window_ctx, patches) * h + full * 2 * patches * h
    embed = 3 * vc["temporal_patch_size"] * patch * patch * h
    merger = (per_lm * h) ** 2 + per_lm * h * vc["out_hidden_size"]
    return per_lm * (linear + attn + embed) + merger


def lm_macs_per_token(tc: dict[str, Any], n: int) -> float:
    """Language-model MACs per token of a prefill of ``n`` (image) tokens."""
    h, inter, layers = tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]
    head_dim = h // tc["num_attention_heads"]
    kv = tc["num_key_value_heads"] * head_dim
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    return linear + layers * 2 * h * n / 2


def ratio(config: dict[str, Any], n: int) -> tuple[float, float, float]:
    """(vision MACs / LM token, LM MACs / token, their ratio) at ``n`` LM tokens per image."""
    v = vision_macs_per_lm_token(config["vision_config"], n)
    t = lm_macs_per_token(config["text_config"], n)
    return v, t, v / t


def preset_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The counted fields of ``build_qwen2_5_vl(**kwargs)``'s config (its defaults filled in)."""
    hidden = kwargs.get("hidden", 128)
    heads = kwargs.get("num_heads") or hidden // 32
    depth = kwargs.get("vision_depth", 2)
    return {
        "vision_config": {"depth": depth, "hidden_size": kwargs.get("vision_hidden", 64),
                          "intermediate_size": kwargs.get("vision_intermediate", 128),
                          "num_heads": kwargs.get("vision_heads", 2), "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "out_hidden_size": hidden, "fullatt_block_indexes": [depth - 1]},
        "text_config": {"num_hidden_layers": kwargs.get("text_layers", 2), "hidden_size": hidden,
                        "intermediate_size": kwargs.get("intermediate_size") or 2 * hidden,
                        "num_attention_heads": heads,
                        "num_key_value_heads": kwargs.get("num_kv_heads") or max(1, heads // 2)},
    }


def main() -> None:
    from benchmarks.serving.run import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[588, 2880],
                   help="LM tokens per image (588: the benchmark's 784x588 image)")
    args = p.parse_args()
    rows = [("Qwen2.5-VL-7B", QWEN2_5_VL_7B)]
    rows += [(f"preset {name}", preset_config(kw)) for name, (kw, _) in PRESETS.items()]
    print("| model | N | vision MMAC / LM token | LM MMAC / token | vision / LM |")
    print("|---|---|---|---|---|")
    for name, cfg in rows:
        for n in args.tokens:
            v, t, r = ratio(cfg, n)
            print(f"| {name} | {n} | {v / 1e6:.1f} | {t / 1e6:.1f} | {r:.3f} |")


if __name__ == "__main__":
    main()

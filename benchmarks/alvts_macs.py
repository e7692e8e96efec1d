"""Prefill multiply-accumulates of the language model: unpruned, ALVTS as served (skipped rows
skip the MLP only), ALVTS also skipping skipped rows' query projection, attention output and
``o_proj``, and an input-side method (LRCP) at the same ratio. Arithmetic only (no model).

    python benchmarks/alvts_macs.py [--visual 588] [--text 32] [--ratio 0.889]

Default dimensions: Qwen2.5-VL-7B's language model (28 layers, hidden 3584, MLP 18944, 28
query / 4 KV heads of 128), ``alvts`` routing layers 2-27 (``first_layer`` 2), the image first
in the prompt and the text after it (causal attention: a query at position p reads p + 1 keys).
"""

from __future__ import annotations

import argparse

from vllm_tokenprune import num_kept


def prefill_macs(rows: list[bool], layers: int, routed_from: int, *, hidden: int = 3584,
                 mlp: int = 18944, heads: int = 28, kv_heads: int = 4, head_dim: int = 128,
                 skip_attention: bool = False) -> int:
    """MACs of one prefill: ``rows[p]`` False for a token that skips each routed layer."""
    q, kv = heads * head_dim, 2 * kv_heads * head_dim
    total = 0
    for layer in range(layers):
        routed = layer >= routed_from
        for p, through in enumerate(rows):
            go = through or not routed
            total += hidden * kv  # K/V of every token at every layer
            if go or not skip_attention:
                total += hidden * q + 2 * q * (p + 1) + q * hidden  # q, scores + AV, o_proj
            if go:
                total += 3 * hidden * mlp
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--visual", type=int, default=588)
    ap.add_argument("--text", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.889)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--first-layer", type=int, default=2)
    a = ap.parse_args()
    k = num_kept(a.visual, a.ratio)
    # the top-k positions do not matter for the count beyond causal lengths: the first k
    rows = [i < k for i in range(a.visual)] + [True] * a.text
    full = prefill_macs([True] * len(rows), a.layers, a.layers)
    served = prefill_macs(rows, a.layers, a.first_layer)
    skipping = prefill_macs(rows, a.layers, a.first_layer, skip_attention=True)
    lrcp = prefill_macs([True] * (k + a.text), a.layers, a.layers)
    print(f"N={a.visual} visual + {a.text} text tokens, ratio {a.ratio} (k={k}), layers "
          f"{a.first_layer}-{a.layers - 1} routed")
    print("| prefill | GMAC | speed-up vs unpruned |\n|---|---|---|")
    for name, macs in (("unpruned", full), ("alvts as served (MLP skipped)", served),
                       ("alvts skipping q, attention output, o_proj too", skipping),
                       ("lrcp (input-side)", lrcp)):
        print(f"| {name} | {macs / 1e9:.1f} | {full / macs:.2f}x |")


if __name__ == "__main__":
    main()

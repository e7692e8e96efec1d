"""Fidelity of the ALVTS selector: overlap of its choice with the layer's true attention.

Runs in the caller's process on transformers' own models (no vLLM), like :mod:`.reference`;
used by ``benchmarks/alvts_overlap.py`` (the table in docs/alvts.md) and by the fidelity
regression test. One unrouted forward in eager attention gives, per decoder layer, the hidden
states entering it and the attention the item's visual tokens truly receive (RoPE included,
causal, softmax over the whole sequence), averaged over heads:

* ``item``: from the item's own tokens (the population the selector's queries come from);
* ``text``: from the prompt tokens after the item (what the answer reads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vllm_tokenprune.alvts import combine, num_processed
from vllm_tokenprune.alvts.reference import decoder_layers, item_spans, placeholder_ids

__all__ = ["Capture", "capture", "overlaps", "top_set"]

TARGETS = ("item", "text")


@dataclass
class Capture:
    """One prompt's unrouted forward: ``entering[l]`` the hidden states entering layer ``l``
    from the item's first row to the prompt's end ((N + T, D): the item, then the text after
    it); ``exact[l][target]`` (N,) the true attention received per item token."""

    entering: dict[int, Tensor]
    exact: dict[int, dict[str, Tensor]]
    num_tokens: int


@torch.no_grad()
def capture(model: Any, inputs: Mapping[str, Any]) -> Capture:
    """Run ``model`` (transformers, loaded with ``attn_implementation="eager"``) once on
    ``inputs`` (one prompt with exactly one media item) and record what :class:`Capture` holds.
    """
    spans = item_spans(inputs["input_ids"][0], placeholder_ids(model))
    if len(spans) != 1:
        raise ValueError(f"expected one media item in the prompt, found {len(spans)}")
    (s, e), = spans
    layers = decoder_layers(model)
    entering: dict[int, Tensor] = {}
    exact: dict[int, dict[str, Tensor]] = {}

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            entering[i] = (args[0] if args else kwargs["hidden_states"])[0, s:].clone()
        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: Any, _args: tuple, _kwargs: dict, out: Any) -> None:
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise RuntimeError("no attention probabilities: load the model with "
                                   "attn_implementation='eager'")
            p = out[1][0].float()  # (H, S, S)
            exact[i] = {"item": p[:, s:e, s:e].sum(1).mean(0),
                        "text": p[:, e:, s:e].sum(1).mean(0)}
        return hook

    hooks = [layer.register_forward_pre_hook(pre(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks += [layer.self_attn.register_forward_hook(post(i), with_kwargs=True)
              for i, layer in enumerate(layers)]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return Capture(entering, exact, e - s)


def top_set(score: Tensor, k: int) -> set[int]:
    """Indices of the ``k`` largest scores (ties: lowest index), as the router chooses."""
    return set(torch.sort(score, descending=True, stable=True).indices[:k].tolist())


def overlaps(importance: Mapping[int, Tensor], exact: Mapping[int, Mapping[str, Tensor]],
             first_layer: int, consistency: float, ratios: tuple[float, ...] = (0.5, 0.889)
             ) -> dict[str, list[float]]:
    """Overlap ``|top-k(s_l) & top-k(exact_l)| / k`` per layer from ``first_layer`` on, with
    ``s_l`` the consistency blend of ``importance`` started at ``first_layer`` (as the router
    does) and ``k`` the tokens processed at each ratio. Keys ``"<target>@<ratio>"``."""
    out: dict[str, list[float]] = {}
    prev = None
    for i in sorted(importance):
        if i < first_layer:
            continue
        score = combine(importance[i], prev, consistency)
        prev = score
        n = int(score.shape[0])
        for ratio in ratios:
            k = num_processed(n, ratio)
            ours = top_set(score, k)
            for target, ref in exact[i].items():
                out.setdefault(f"{target}@{ratio}", []).append(len(ours & top_set(ref, k)) / k)
    return out

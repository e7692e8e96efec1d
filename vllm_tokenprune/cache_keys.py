"""What a pruned media item's cache key depends on, and the text a text-conditioned scorer sees
(runs in the API server, with the processor).

vLLM keys its processor cache, encoder cache and prefix cache on each media item's hash (the
media bytes and the request's ``mm_processor_kwargs``, which carry ``prune_ratio`` /
``prune_method``). The selection of a pruned item also depends on things in no vLLM key, so
the processor appends a salt to the hash of every item it prunes (ratio > 0):

* the plugin version (a scorer change must not reuse selections across upgrades; matters for
  caches that outlive a process or are shared: encoder-cache connectors, KV offload);
* the server's settings the selection reads: the method, its ``options`` and ``min_keep``;
* for text-conditioned methods (the registry's ``uses_text``), exactly the text the scorer sees;
* what decided the item's count (docs/budgets.md) where no vLLM key has it: the server's
  ``token_prune.auto`` options (``prune_ratio: "auto"``), the image's ``detail`` with
  ``low_detail_tokens``, and a request's cap (``max_visual_tokens``, the request's or the
  server's) with the keys of *all* the request's items, whose counts its split depends on.
  (The request's own fields, ``image_detail`` included, are in vLLM's key already: two requests
  share an item's entries when they send the same pruning fields for the same media.)

Unpruned items (ratio 0, no detail, no cap) keep vLLM's own key, so they share cache entries
with any server.

**Which text.** The scorer of an item sees the text tokens of *the item's own chat message*:
the tokens between the closest special token (not a media token) before the item's
placeholder and the closest one after it (``<|im_start|>``/``<|im_end|>`` in Qwen's template),
without media tokens, the last :data:`MAX_TEXT_TOKENS`. A message's text does not change when
later turns are appended, so an image sent in turn 1 has the same key (and the same selection)
in turn 2: the encoder cache and the prefix cache stay valid across turns. The whole prompt,
or the text after the item, would change every turn and re-encode every earlier image. A chat
template without a special token at the end of a message (LLaVA-1.5's ``USER: ... ASSISTANT:``)
has no such boundary: the segment then runs to the end of the prompt, and earlier images are
re-encoded when the conversation grows (the correct, if slower, result).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

#: Longest text (in tokens, the last ones of the item's message) a text-conditioned scorer gets.
MAX_TEXT_TOKENS = 256


def message_text_ids(
    prompt_ids: Sequence[int],
    item_token_id: int,
    num_items: int,
    media_ids: Collection[int],
    boundary_ids: Collection[int],
    max_tokens: int = MAX_TEXT_TOKENS,
) -> list[tuple[int, ...]] | None:
    """For each of ``num_items`` items (the runs of ``item_token_id`` in the prompt, in order),
    the text token ids of the message that holds it.

    ``media_ids``: every media-related token id (placeholders, vision start/end), dropped from
    the text and never a boundary; ``boundary_ids``: special tokens that delimit messages.
    None when the prompt does not hold exactly ``num_items`` runs of ``item_token_id``.
    """
    ids = [int(t) for t in prompt_ids]
    runs = [i for i, t in enumerate(ids)
            if t == item_token_id and (i == 0 or ids[i - 1] != item_token_id)]
    if len(runs) != num_items:
        return None
    out = []
    for start in runs:
        lo = start
        while lo > 0 and ids[lo - 1] not in boundary_ids:
            lo -= 1
        hi = start
        while hi < len(ids) and ids[hi] not in boundary_ids:
            hi += 1
        text = [t for t in ids[lo:hi] if t not in media_ids and t not in boundary_ids]
        out.append(tuple(text[-max_tokens:]) if max_tokens > 0 else ())
    return out


def pruned_item_salt(
    version: str,
    method: str,
    options: Mapping[str, Any],
    min_keep: int,
    text_ids: Sequence[int] | None,
    budget: Mapping[str, Any] | None = None,
) -> str:
    """The suffix a pruned item's hash gets: everything its selection depends on beyond the
    media and the request's kwargs (``text_ids`` None for methods that read no text;
    ``budget``: what decided its count beyond them, see below)."""
    payload = {
        "v": version,
        "method": method,
        "options": {k: options[k] for k in sorted(options)},
        "min_keep": int(min_keep),
        "text": None if text_ids is None else [int(t) for t in text_ids],
    }
    if budget:
        payload["budget"] = dict(budget)
    blob = json.dumps(payload, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:32]

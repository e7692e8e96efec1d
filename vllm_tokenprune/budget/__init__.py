"""Visual-token budgets chosen before the vision encoder runs (``prune_ratio: "auto"``).

Runs in the API server process, in the multimodal processor, on the HF image processor's output
and before the vision encoder (the prompt's placeholder count is fixed there). Torch and numpy; no
vLLM import.

Public API::

    auto_options(mapping) -> AutoOptions          # the validated token_prune.auto block
    qwen_token_grid(pixel_values, grid_thw, ...)  # Qwen-VL rows -> (F, H, W, D) token grid
    patch_token_grid(tiles, ...)                  # LLaVA / LLaVA-NeXT tiles -> token grid
    qwen_token_view / patch_token_view(...)       # the same, not yet read (TokenGrid)
    estimate_keep(grid, num_tokens, options, min_keep=1) -> AutoEstimate
    estimate_image(pil_image, hf_image_processor, options)  # all of the above, for one image
    AutoCounter(hf_image_processor, options, ...).count(hf_output, index)  # the server's
    auto_count(hf_output, hf_image_processor, options, index)  # the same, counter kept

``docs/budgets.md`` has the rule, its defaults and reasons, and its measured cost.
"""

from vllm_tokenprune.budget.auto import (
    AutoEstimate,
    AutoOptions,
    auto_options,
    estimate_keep,
    window_ranks,
)
from vllm_tokenprune.budget.grids import (
    TokenGrid,
    patch_token_grid,
    patch_token_view,
    per_patch,
    qwen_token_grid,
    qwen_token_view,
    sample_offsets,
)
from vllm_tokenprune.budget.hf import (
    AutoCounter,
    auto_count,
    estimate_image,
    pixel_scale,
    processor_kind,
    token_grid,
)

__all__ = [
    "AutoCounter",
    "AutoEstimate",
    "AutoOptions",
    "TokenGrid",
    "auto_count",
    "auto_options",
    "estimate_image",
    "estimate_keep",
    "patch_token_grid",
    "patch_token_view",
    "per_patch",
    "pixel_scale",
    "processor_kind",
    "qwen_token_grid",
    "qwen_token_view",
    "sample_offsets",
    "token_grid",
    "window_ranks",
]

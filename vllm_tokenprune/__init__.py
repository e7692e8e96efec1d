"""vllm-tokenprune: training-free visual token pruning for vLLM.

The public API (pure torch, no vLLM import): the scorers (:func:`select_tokens`,
:func:`select_tokens_batch`, :func:`num_kept`) and the method registry (:func:`list_methods`,
:func:`register_method`, :func:`option`, :class:`Batch`) through which a package of your own
adds a method (docs/scorers.md, "Write your own method"). Importing the package registers the
built-in methods: the input-side scorers (:mod:`vllm_tokenprune.scoring`) and the layer-stage
``alvts`` (:mod:`vllm_tokenprune.alvts`).
"""
from vllm_tokenprune import alvts as _alvts  # noqa: F401, I001  (registers "alvts")
from vllm_tokenprune.scoring import (
    Batch,
    get_method,
    list_methods,
    num_kept,
    option,
    register_method,
    select_tokens,
    select_tokens_batch,
)

__all__ = ["Batch", "get_method", "list_methods", "num_kept", "option", "register_method",
           "select_tokens", "select_tokens_batch"]
__version__ = "0.1.0"

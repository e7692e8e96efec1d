"""vllm-tokenprune: training-free visual token pruning for vLLM."""
from vllm_tokenprune.scoring import list_methods, num_kept, select_tokens, select_tokens_batch

__all__ = ["list_methods", "num_kept", "select_tokens", "select_tokens_batch"]
__version__ = "0.1.0"

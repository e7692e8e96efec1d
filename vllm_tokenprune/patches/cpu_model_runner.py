"""Patch: vLLM's CPU model runner enables the multimodal pruning switch (shared: applied at
plugin time; acts in the worker, where the runner is built).

**What.** ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model`` gets, after the
runner's own code, the assignment ``GPUModelRunner.load_model`` makes and the CPU runner's
override leaves out::

    self.is_multimodal_pruning_enabled = (supports_multimodal_pruning(model)
                                          and mm_config is not None
                                          and mm_config.is_multimodal_pruning_enabled())

**Why.** Without it the V1 runner never calls ``recompute_mrope_positions``, so on a CPU
build every model that prunes multimodal tokens (vLLM's own EVS included) gets a pruned prompt
whose kept visual tokens keep provisional positions; a TokenPrune M-RoPE model (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) refuses to start there (:func:`vllm_tokenprune._vllm_internals.
check_mrope_runner`). With it, ``pip install 'vllm-tokenprune[cpu]'`` serves them with exact
positions.

**Until when.** vLLM 0.32.x and 0.33.x (:data:`VERSIONS`), and only where the runner's
``load_model`` does not set the switch itself (its code names ``is_multimodal_pruning_enabled``:
:func:`needed`), so a vLLM release that fixes the runner is left alone. Remove when the
supported range starts at a release whose CPU runner sets it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from vllm_tokenprune._vllm_internals import code_names

NAME = "cpu_model_runner"
MODULE = "vllm.v1.worker.cpu_model_runner"
VERSIONS = ((0, 32, 0), (0, 34, 0))
SWITCH = "is_multimodal_pruning_enabled"
#: Marks the patched ``load_model`` (idempotence, and tests).
MARK = "_tokenprune_patch"


def needed(module: ModuleType) -> bool:
    """Whether the runner's ``load_model`` leaves the switch unset."""
    load_model = module.CPUModelRunner.load_model
    return not getattr(load_model, MARK, False) and SWITCH not in code_names(load_model)


def apply(module: ModuleType) -> None:
    runner_cls = module.CPUModelRunner
    original = runner_cls.load_model

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        result = original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
        return result

    # not __wrapped__: the start-up check reads the code of the method the runner will call
    load_model._tokenprune_original = original  # type: ignore[attr-defined]
    setattr(load_model, MARK, True)
    runner_cls.load_model = load_model

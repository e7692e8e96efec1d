"""A real TokenPrune model built by vLLM's own loader in the test process (no server), and vLLM's
own multimodal input machinery around it: the processor (``apply``, the dummy inputs of the
profile run), ``MultiModalBudget`` and ``group_and_batch_mm_kwargs`` (how both model runners
batch encoder inputs and place them on the device).

vLLM's CPU worker does the same set-up (a one-rank ``gloo`` process group, the model built
under ``set_current_vllm_config``); ``torch.accelerator.empty_cache``, which vLLM's loader
calls and CPU-only torch refuses, is a no-op while the fixture is active (vLLM's CPU runner
does the same, ``_set_torch_accelerator_to_noop``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_tokenprune.testing import tiny_model

#: family -> (TokenPrune architecture, tiny-model builder)
FAMILIES: dict[str, tuple[str, Callable[..., Path]]] = {
    "qwen2_vl": ("TokenPruneQwen2VLForConditionalGeneration", tiny_model.build_qwen2_vl),
    "qwen2_5_vl": ("TokenPruneQwen2_5_VLForConditionalGeneration", tiny_model.build_qwen2_5_vl),
    "qwen3_vl": ("TokenPruneQwen3VLForConditionalGeneration", tiny_model.build_qwen3_vl),
    "llava": ("TokenPruneLlavaForConditionalGeneration", tiny_model.build_llava),
    "llava_next": ("TokenPruneLlavaNextForConditionalGeneration", tiny_model.build_llava_next),
}


@dataclass
class Built:
    """One vLLM config and the TokenPrune model vLLM's loader built from it."""

    config: Any
    model: Any

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` under this config (as the worker does around model calls)."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.config), torch.inference_mode():
            return fn(*args, **kwargs)

    def budget(self) -> Any:
        """vLLM's ``MultiModalBudget`` for this config, as the V1 runner builds it."""
        from vllm.multimodal import MULTIMODAL_REGISTRY
        from vllm.multimodal.encoder_budget import MultiModalBudget

        return MultiModalBudget(self.config, MULTIMODAL_REGISTRY)

    def processor(self) -> Any:
        from vllm.multimodal import MULTIMODAL_REGISTRY

        return MULTIMODAL_REGISTRY.create_processor(self.config.model_config)


@pytest.fixture(scope="module")
def vllm_inproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Built]]:
    """``build(family, token_prune={...}, **engine_args) -> Built`` (tiny models are made
    once per family per module)."""
    dirs: dict[str, Path] = {}

    def build(family: str, token_prune: dict[str, Any] | None = None,
              **engine_args: Any) -> Built:
        from vllm.config import set_current_vllm_config
        from vllm.distributed.parallel_state import (
            ensure_model_parallel_initialized,
            init_distributed_environment,
        )
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader import get_model

        arch, builder = FAMILIES[family]
        if family not in dirs:
            dirs[family] = builder(tmp_path_factory.mktemp("inproc") / family, seed=0)
        overrides: dict[str, Any] = {"architectures": [arch]}
        if token_prune:
            overrides["token_prune"] = token_prune
        args = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096, "seed": 0,
                **engine_args}
        config = EngineArgs(model=str(dirs[family]), hf_overrides=overrides,
                            **args).create_engine_config()
        with set_current_vllm_config(config):
            if not torch.distributed.is_initialized():
                init_distributed_environment(1, 0, f"file://{tempfile.mktemp()}", 0, "gloo")
            ensure_model_parallel_initialized(1, 1)
            model = get_model(vllm_config=config)
        return Built(config, model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.accelerator, "empty_cache", lambda *a, **k: None)
        yield build


def dummy_profile_batch(built: Built) -> tuple[Any, str, int, dict[str, Any]]:
    """(budget, modality, items, batch): the batch vLLM's V1 ``profile_run`` hands
    ``embed_multimodal``, built by the runner's own ``_get_mm_dummy_batch``."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    budget = built.budget()
    modality = budget.get_modality_with_max_tokens()
    items = budget.mm_max_items_per_batch[modality]
    runner = SimpleNamespace(mm_budget=budget, device=torch.device("cpu"))
    batch = GPUModelRunner._get_mm_dummy_batch(runner, modality, items)
    return budget, modality, items, batch


def request_items(built: Built, images: list[Any], **mm_kwargs: Any) -> list[tuple[str, Any]]:
    """The ``(modality, MultiModalKwargsItem)`` list the scheduler hands the runner for one
    request with ``images``, processed by vLLM's processor with these ``mm_processor_kwargs``
    (what the endpoint puts there, e.g. ``prune_ratio``)."""
    from vllm.multimodal.processing import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    proc = built.processor()
    counts = {"image": len(images)}
    prompt = proc.info.get_tokenizer().encode(proc.dummy_inputs.get_dummy_text(counts),
                                              add_special_tokens=False)
    inputs = ProcessorInputs(prompt=prompt,
                             mm_data_items=proc.info.parse_mm_data({"image": images}),
                             hf_processor_mm_kwargs=mm_kwargs)
    out = proc.apply(inputs, timing_ctx=TimingContext(enabled=False))
    return [("image", item) for item in out["mm_kwargs"]["image"]]

"""``python benchmarks/serving/launch.py ARGS``: vLLM's OpenAI API server, same arguments, with
vLLM's own multimodal timing switched on.

vLLM 0.32 times every request's encoder forward in the model runner when
``ObservabilityConfig.enable_mm_processor_stats`` is set (``vllm bench mm-processor`` sets it for
offline runs) and returns the figures through the worker method ``get_encoder_timing_stats``
(the dev-mode endpoint ``POST /collective_rpc`` reaches it). The server has no command-line flag
for it, so this launcher sets it on the engine arguments before the config is built, then runs
``vllm.entrypoints.openai.api_server`` unchanged. Nothing else differs from the stock server.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any


def _enable_mm_stats() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.enable_mm_processor_stats = True
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


if __name__ == "__main__":  # spawned engine processes import this file as __mp_main__
    _enable_mm_stats()
    sys.argv[0] = "vllm.entrypoints.openai.api_server"
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)

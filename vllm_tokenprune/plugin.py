"""vLLM plugin entry points (every process: API server, engine core, workers).

``vllm.general_plugins`` -> :func:`register` runs in every vLLM process, possibly several
times, before vLLM validates the server's configuration. It refuses an unsupported vLLM, loads
the installed third-party methods (entry-point group ``vllm_tokenprune.methods``), applies the
plugin's patches to vLLM (:mod:`vllm_tokenprune.patches`), and registers the pruned
architectures by ``"module:Class"`` string, so no model code is imported until vLLM needs the
class. In the API server it also creates the directory workers publish metrics in and publishes
its method table for the workers' start-up check (:mod:`vllm_tokenprune.method_table`).

``vllm.endpoint_plugins`` -> :class:`vllm_tokenprune.serving.TokenPruneEndpointPlugin` adds the
request-field bridge to the API server. vLLM loads endpoint plugins only when they are named in
``VLLM_PLUGINS``, so the README's command sets ``VLLM_PLUGINS=tokenprune`` (the one name enables
both entry points, :data:`vllm_tokenprune.runtime.PLUGIN_NAME`).
"""

from __future__ import annotations

from vllm_tokenprune._vllm_internals import check_vllm_version, vllm_release
from vllm_tokenprune.method_table import publish_server_methods
from vllm_tokenprune.metrics.exchange import ensure_metrics_dir
from vllm_tokenprune.patches import apply_patches
from vllm_tokenprune.runtime import is_openai_server_process
from vllm_tokenprune.scoring import load_entry_points

#: vLLM architecture name -> "module:Class" of its pruned variant.
ARCHITECTURES: dict[str, str] = {
    "TokenPruneQwen2_5_VLForConditionalGeneration": (
        "vllm_tokenprune.models.qwen2_5_vl:TokenPruneQwen2_5_VLForConditionalGeneration"
    ),
    "TokenPruneQwen2VLForConditionalGeneration": (
        "vllm_tokenprune.models.qwen2_vl:TokenPruneQwen2VLForConditionalGeneration"
    ),
    "TokenPruneQwen3VLForConditionalGeneration": (
        "vllm_tokenprune.models.qwen3_vl:TokenPruneQwen3VLForConditionalGeneration"
    ),
    "TokenPruneLlavaForConditionalGeneration": (
        "vllm_tokenprune.models.llava:TokenPruneLlavaForConditionalGeneration"
    ),
    "TokenPruneLlavaNextForConditionalGeneration": (
        "vllm_tokenprune.models.llava_next:TokenPruneLlavaNextForConditionalGeneration"
    ),
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent, cheap).

    Refuses an unsupported vLLM first (:func:`vllm_tokenprune._vllm_internals.check_vllm_version`):
    vLLM runs general plugins in every process, so ``vllm serve`` stops before loading anything.
    A third-party method entry point that fails stops the server too, naming it.
    """
    from vllm import ModelRegistry

    check_vllm_version()
    load_entry_points(strict=True)
    apply_patches(vllm_release())

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    if is_openai_server_process():
        # Runs in the API server before it starts the engine: the engine core and workers
        # inherit the directory through which workers publish scorer timings (metrics), and
        # the API server's method table, which every worker checks at start-up.
        ensure_metrics_dir()
        publish_server_methods()

"""vLLM plugin entry points.

``vllm.general_plugins`` -> :func:`register` runs in every vLLM process (API server, engine core,
workers), possibly several times: it only registers the pruned architectures by
``"module:Class"`` string, so no model code is imported until vLLM needs the class.

``vllm.endpoint_plugins`` -> :class:`vllm_tokenprune.serving.TokenPruneEndpointPlugin` adds the
request-field bridge to the API server. vLLM loads endpoint plugins only when they are named in
``VLLM_PLUGINS``, so the README's command sets ``VLLM_PLUGINS=tokenprune`` (the one name enables
both entry points).
"""

from __future__ import annotations

import os
import sys

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

PLUGIN_NAME = "tokenprune"


def register() -> None:
    """Register the TokenPrune architectures with vLLM's model registry (idempotent, cheap).

    Refuses an unsupported vLLM first (:func:`vllm_tokenprune._vllm_internals.check_vllm_version`):
    vLLM runs general plugins in every process, so ``vllm serve`` stops before loading anything.
    """
    from vllm import ModelRegistry

    from vllm_tokenprune._vllm_internals import check_vllm_version

    check_vllm_version()

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    if is_openai_server_process():
        # Runs in the API server before it starts the engine: the engine core and workers
        # inherit the directory through which workers publish scorer timings (see metrics).
        from vllm_tokenprune.metrics import ensure_metrics_dir

        ensure_metrics_dir()


def is_openai_server_process() -> bool:
    """True in the processes of ``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server``.

    Child processes started by multiprocessing keep the parent's ``sys.argv``, so this is true
    in the engine core and workers of a server too.
    """
    argv = sys.argv
    if not argv:
        return False
    prog = os.path.basename(argv[0])
    if prog == "vllm" and len(argv) > 1 and argv[1] == "serve":
        return True
    return argv[0].replace(os.sep, "/").endswith("vllm/entrypoints/openai/api_server.py")


def endpoint_plugin_enabled() -> bool:
    """Whether vLLM will load our endpoint plugin (it must be named in ``VLLM_PLUGINS``)."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is None:
        return False
    return PLUGIN_NAME in [p.strip() for p in allowed.split(",")]


def check_request_bridge() -> None:
    """Refuse to serve a TokenPrune model over HTTP without the request-field bridge.

    Without the endpoint plugin, vLLM accepts a top-level ``prune_ratio`` with a warning and
    drops it: the request would silently be served at the server's default ratio. Rather than
    that, the server does not start. ``VLLM_TOKENPRUNE_ALLOW_NO_BRIDGE=1`` opts out.
    """
    if os.environ.get("VLLM_TOKENPRUNE_ALLOW_NO_BRIDGE") == "1":
        return
    if is_openai_server_process() and not endpoint_plugin_enabled():
        raise RuntimeError(
            "vllm-tokenprune: this server runs a TokenPrune architecture, but the endpoint "
            "plugin that reads `prune_ratio` from requests is not enabled, so requests asking "
            "for a ratio would be served at the default one. Start the server with "
            "VLLM_PLUGINS=tokenprune (comma-separate any other plugins you use), or set "
            "VLLM_TOKENPRUNE_ALLOW_NO_BRIDGE=1 to serve the configured default ratio only."
        )

"""Which vLLM process this is, and what vLLM loaded (shared: every process).

vLLM runs general plugins in the API server, the engine core and every worker; child processes
keep the parent's ``sys.argv``, so :func:`is_openai_server_process` is true in all the processes
of a server. The endpoint plugin (the request bridge) loads only when ``VLLM_PLUGINS`` names it
(:func:`endpoint_plugin_enabled`), and a TokenPrune model refuses to serve over HTTP without it
(:func:`check_request_bridge`).
"""

from __future__ import annotations

import os
import sys

#: The plugin's name in ``VLLM_PLUGINS`` (both entry points are called ``tokenprune``).
PLUGIN_NAME = "tokenprune"


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

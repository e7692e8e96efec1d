"""The serving surface of the API server: the ``vllm.endpoint_plugins`` entry point (runs in the
API server).

:class:`TokenPruneEndpointPlugin` installs, in vLLM's FastAPI app: the request-field bridge
(:mod:`.bridge`, which reads bodies by the rules of :mod:`.reading`), the guard on vLLM's
``--trust-request-mm-kwargs`` check (:mod:`.seal`), the check of client-supplied features
(:mod:`vllm_tokenprune.features`), the response field (:mod:`vllm_tokenprune.response`), the
request metrics and the workers' collectors (:mod:`vllm_tokenprune.metrics.frontend`); and adds
``GET /v1/tokenprune/config`` (read-only: the served ``token_prune`` block, the method names and
the field names; it sits behind ``--api-key`` like vLLM's own routes). vLLM loads it when
``VLLM_PLUGINS`` names ``tokenprune``; a TokenPrune model refuses to start in an API server
where it would not load (:func:`vllm_tokenprune.runtime.check_request_bridge`).

vLLM internals touched (also in :data:`vllm_tokenprune._vllm_internals.INTERNALS`):
``vllm.plugins.load_endpoint_plugins`` (``attach_router`` / ``init_state``), the order in which
``build_app`` attaches endpoint plugins and its own middleware, and
``ServingTokens._validate_mm_cache_handles`` (wrapped, :mod:`vllm_tokenprune.features`).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, Request

from vllm_tokenprune.config import REQUEST_FIELDS, config_from_hf_config
from vllm_tokenprune.features import install_features_guard
from vllm_tokenprune.metrics import frontend as metrics
from vllm_tokenprune.plugin import ARCHITECTURES
from vllm_tokenprune.response import PruneDetailsMiddleware
from vllm_tokenprune.scoring import list_methods
from vllm_tokenprune.serving.bridge import STATE_KEY, TokenPruneMiddleware, _BridgeState
from vllm_tokenprune.serving.seal import install_request_guard

__all__ = ["TokenPruneEndpointPlugin"]


#: Server flags that serve ``POST /inference/v1/generate`` with client-supplied ``features``.
FEATURE_FLAGS = ("enable_scale_out", "tokens_only")


def check_features_guard(bridge: _BridgeState, args: Namespace | None) -> None:
    """Refuse to start a TokenPrune server that takes precomputed features
    (``--enable-scale-out``, ``--tokens-only``) when their pruning rows cannot be checked."""
    flags = [f for f in FEATURE_FLAGS if getattr(args, f, False)]
    if bridge.config is None or not flags or install_features_guard():
        return
    raise RuntimeError(
        f"vllm-tokenprune: --{flags[0].replace('_', '-')} serves /inference/v1/generate with "
        "client-supplied features, whose pruning rows this vLLM version gives the plugin no "
        f"place to check ({_FEATURES_INTERNAL}); start the server without it")


_FEATURES_INTERNAL = "ServingTokens._validate_mm_cache_handles"


def _bridge_state(vllm_config: Any, args: Namespace | None) -> _BridgeState:
    model_config = vllm_config.model_config
    archs = list(getattr(model_config, "architectures", None) or [])
    pruned = any(a in ARCHITECTURES for a in archs)
    config = config_from_hf_config(model_config.hf_config) if pruned else None
    trust = bool(getattr(args, "trust_request_mm_kwargs", False))
    return _BridgeState(config, trust, archs)


class TokenPruneEndpointPlugin:
    """``vllm.endpoint_plugins`` entry point (enable with ``VLLM_PLUGINS=tokenprune``)."""

    name = "tokenprune"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        router = APIRouter()

        @router.get("/v1/tokenprune/config")
        async def tokenprune_config(request: Request) -> dict[str, Any]:
            state: _BridgeState | None = getattr(request.app.state, STATE_KEY, None)
            cfg = state.config if state is not None else None
            return {
                "enabled": cfg is not None,
                "config": cfg.model_dump() if cfg is not None else None,
                "methods": list_methods(),
                "request_fields": list(REQUEST_FIELDS),
            }

        install_request_guard()
        install_features_guard()
        app.include_router(router)
        app.add_middleware(TokenPruneMiddleware)
        app.add_middleware(PruneDetailsMiddleware)
        metrics.enable_frontend()
        metrics.register_worker_collector()

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        bridge = _bridge_state(engine_client.vllm_config, args)
        install_request_guard()
        check_features_guard(bridge, args)
        setattr(state, STATE_KEY, bridge)

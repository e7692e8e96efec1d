"""The API server's methods, checked in every worker at start-up (shared: the API server
publishes, the workers check).

Methods come from installed packages (entry points, :mod:`vllm_tokenprune.scoring`), so the API
server, which validates requests against its own registry, and a worker, which scores with its
own, can disagree when they run on different installs (nodes). A method's wire id is a hash of
its name, so a method both know means the same to both; a method the API server accepts but a
worker lacks must stop the server at start-up rather than fail its first request.

* :func:`publish_server_methods` (the plugin, in the API server, before the engine starts)
  puts the API server's method table in ``VLLM_TOKENPRUNE_SERVER_METHODS``. The engine core and
  local workers inherit it; vLLM's Ray executor copies every ``VLLM_*`` variable to its workers
  on other nodes (``vllm.ray.ray_env``).
* :func:`check_worker_methods` (the model, in each worker, when it is built) refuses to start
  when a method this server's ``token_prune`` block lets requests pick is in that table but not
  registered in the worker (or has another wire id). The methods the block names are checked
  by the block's own validation, in every process.

Engines started separately (``vllm serve --headless`` on another node) get no table: there each
node's install must provide the same methods; an unknown method id then reaches the worker as a
bad params row, served by the fallback and counted (``reason="bad_params"``).
"""

from __future__ import annotations

import json
import os

from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.scoring import LAYER, get_method, list_methods

SERVER_METHODS_ENV = "VLLM_TOKENPRUNE_SERVER_METHODS"


def method_table() -> dict[str, list[str | int]]:
    """This process's registry: ``{name: [wire id, stage]}``."""
    return {m: [get_method(m).wire_id, get_method(m).stage] for m in list_methods(None)}


def publish_server_methods() -> None:
    """Publish the API server's method table for its engine and workers (the first process
    to publish wins: its children, which load the plugin too, keep the API server's)."""
    os.environ.setdefault(SERVER_METHODS_ENV, json.dumps(method_table(), sort_keys=True))


def check_worker_methods(cfg: TokenPruneConfig, table: str | None = None) -> None:
    """Refuse (RuntimeError) a worker that lacks a method the API server accepts for ``cfg``;
    ``table``: the published table (default: the environment's; none: nothing to compare)."""
    raw = os.environ.get(SERVER_METHODS_ENV) if table is None else table
    if not raw:
        return
    server = json.loads(raw)
    here = method_table()
    allowed = set(cfg.allowed_methods or ())
    problems = []
    for name, (ident, stage) in sorted(server.items()):
        if stage == LAYER:
            enabled = name == cfg.method or name in allowed
        else:
            enabled = cfg.allowed_methods is None or name in allowed
        if not enabled:
            continue
        if name not in here:
            problems.append(f"{name!r} is not installed here")
        elif here[name][0] != ident:
            problems.append(f"{name!r} has wire id {here[name][0]} here, {ident} there")
    if problems:
        raise RuntimeError(
            "vllm-tokenprune: this worker's methods differ from the API server's: "
            f"{'; '.join(problems)}. Requests may pick them there and this worker could not "
            "score them, so the server does not start. Install the same method packages on "
            "every node (pip install the package that provides them), or leave the methods "
            "out of token_prune.allowed_methods.")

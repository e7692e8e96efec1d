"""The files workers publish their metrics in and the API server reads (shared: the API server
creates the directory at plugin time, workers write, the API server's collectors read).

One JSON file per worker process and kind (``<kind>-<pid>.json``, replaced atomically), in the
directory ``VLLM_TOKENPRUNE_METRICS_DIR``: :func:`ensure_metrics_dir` creates it in the API
server (``vllm_tokenprune.plugin.register``, before the engine starts), so the engine core and
the workers inherit the variable.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from vllm_tokenprune.log import init_logger

METRICS_DIR_ENV = "VLLM_TOKENPRUNE_METRICS_DIR"
SCORER_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0)
SCORER_HELP = "Time of one batched scorer call in the model's vision hook."
FALLBACKS_HELP = "Media items served by the fallback (uniform subset) because pruning failed."
SKIPPED_HELP = ("Visual token-layers skipped inside the language model by layer-wise routing "
                "(alvts): per routed item, (tokens - tokens routed through each layer) x routed "
                "layers, counted where the item is computed (an item served unrouted or from "
                "the prefix cache adds nothing).")
#: File kinds: the scorer histogram, the fallback counter, the skipped token-layers counter.
SCORER = "scorer"
FALLBACKS = "fallbacks"
SKIPPED = "skipped"

#: Where the worker-to-API-server directory is tried when VLLM_TOKENPRUNE_METRICS_DIR is unset:
#: the temp dir (TMPDIR), then /dev/shm (writable on most read-only-root containers).
FALLBACK_PARENTS: tuple[str | None, ...] = (None, "/dev/shm")


def publish(directory: str, kind: str, payload: dict[str, Any]) -> None:
    """Write this process's ``kind`` file (atomically); OSError if the directory is unusable."""
    path = os.path.join(directory, f"{kind}-{os.getpid()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def read_all(directory: str, kind: str) -> Iterator[dict[str, Any]]:
    """Every worker's ``kind`` file in ``directory`` (unreadable ones skipped)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    for name in names:
        if not (name.startswith(f"{kind}-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                yield json.load(f)
        except (OSError, ValueError):
            continue


# --------------------------------------------------------------------------- plugin time


def ensure_metrics_dir(parents: tuple[str | None, ...] = FALLBACK_PARENTS) -> str | None:
    """Create the worker-to-API-server directory in the API server (before the engine starts).

    ``VLLM_TOKENPRUNE_METRICS_DIR`` if set (created if missing), else a fresh directory under
    the first writable of ``parents``. Never fails the server's start: on a read-only root
    filesystem without a writable fallback it logs once and returns None (the token counters
    work; only ``tokenprune_scorer_seconds`` stays empty).
    """
    path = os.environ.get(METRICS_DIR_ENV)
    if path:
        try:
            os.makedirs(path, exist_ok=True)
            return path
        except OSError as e:
            _warn_no_dir(f"{path}: {e}")
            os.environ.pop(METRICS_DIR_ENV, None)
            return None
    errors = []
    for parent in parents:
        try:
            path = tempfile.mkdtemp(prefix="vllm-tokenprune-metrics-", dir=parent)
        except OSError as e:
            errors.append(f"{parent or tempfile.gettempdir()}: {e}")
            continue
        os.environ[METRICS_DIR_ENV] = path
        atexit.register(_remove_dir, path, os.getpid())
        return path
    _warn_no_dir("; ".join(errors))
    return None


def _remove_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in forked children
        shutil.rmtree(path, ignore_errors=True)


def _warn_no_dir(reason: str) -> None:
    init_logger(__name__).warning(
        "vllm-tokenprune: no writable directory for worker scorer timings (%s); "
        "tokenprune_scorer_seconds will stay empty. Set %s to a writable directory "
        "(e.g. an emptyDir volume) to get them.", reason, METRICS_DIR_ENV)

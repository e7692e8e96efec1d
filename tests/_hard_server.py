"""The hardened server of tests/test_hardening_server.py and tests/test_worker_safety.py: one
session server (tests/conftest.py ``hard_server``) with every option both modules need.

* Hardening (issues 11 and 18): ``vllm serve`` with ``--api-key``, ``--root-path /api`` (as
  behind a proxy that keeps the prefix; vLLM routes both ``/api/v1/...`` and ``/v1/...``),
  ``--api-server-count 2`` (two API server processes on one port, each with its own processor
  cache; Prometheus in multiprocess mode), ``--enable-scale-out`` (render routes and
  ``/inference/v1/generate`` with precomputed ``features``), ``min_keep`` 8 (above the 4
  tokens of the tiny model's smallest image), ``max_greedy_keep`` 150, at most 3 images a
  prompt and vLLM's decoded-image limit at 2048 x 1536.
* Worker safety (docs/worker-safety.md): images only (``video`` 0, so the profiled encoder
  batch is 2 of the largest, 256-token images: 512 tokens), ``--enable-prompt-tokens-details``
  (cached tokens per response), and the test-only hooks of
  :mod:`vllm_tokenprune.models.faults`: a log of every encoder batch, planned vision-tower call,
  tower input and pixel staging; NaN scorer features for items of exactly ``NAN_TOKENS``
  tokens; one failure per worker failure site (``FAULTS``), each keyed on a row count (168 to
  210) that no other request of either module produces (the hardening tests' images have at
  most 64 tokens a prompt item, 144 a prompt at ratio 0, but the 2048 x 1536 image, which is
  sent only at ratio 0.9 and 0.1, refused, and 448 x 448 images at 0.5: 128 kept rows).

Both run float32, ``--max-num-batched-tokens 512``, LRCP at 0.5 by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import QWEN25_ARCH
from vllm_tokenprune.models import fallbacks, faults
from vllm_tokenprune.models.faults import ENCODER_LOG_ENV, FAULTS_ENV, NAN_TOKENS_ENV
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

KEY = "tokenprune-test-key"
ROOT = "/api"
DEFAULT_RATIO = 0.5
MIN_KEEP = 8
#: token_prune.max_greedy_keep on this server: below the largest image's 234 tokens, above every
#: greedy selection the other tests ask for (the 448x448 CDPruner image at 0.5 keeps 128).
MAX_GREEDY_KEEP = 150
MAX_IMAGES = 3
#: vLLM's own decoded-image limit on this server: the largest image it allows is 2048 x 1536.
MAX_IMAGE_PIXELS = 2048 * 1536

#: 448x448 -> a 16x16 token grid: 256 tokens, the largest image this server's model allows (the
#: tiny model's max_pixels), so the profiled encoder batch is 512 // 256 = 2 images = 512 tokens.
BIG = (448, 448)
BIG_TOKENS = 256
PROFILED = 512
#: 280x224 -> 10x8 = 80 tokens: the size the NaN hook poisons.
NAN_SIZE = (280, 224)
NAN_TOKENS = 80
#: Worker failure sites (faults.FAULT_SITES) -> (image size, its tokens = the rows the site sees
#: at ratio 0, the fallback reason): counts between 128 and 256 that no other test's items or
#: prefill chunks on this server have.
FAULTS = {
    faults.FAULT_PARAMS: ((392, 336), 168, fallbacks.BAD_PARAMS),
    faults.FAULT_COUNT_MISMATCH: ((392, 364), 182, fallbacks.COUNT_MISMATCH),
    faults.FAULT_POSITIONS: ((392, 392), 196, fallbacks.POSITIONS),
    faults.FAULT_NO_RECOMPUTE: ((420, 392), 210, fallbacks.NO_RECOMPUTE),
}


def start_hard_server(model_dir: Path, log_dir: Path, encoder_log: Path, *,
                      wait: bool = True) -> VLLMServer:
    overrides = token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=DEFAULT_RATIO,
                                      min_keep=MIN_KEEP, max_greedy_keep=MAX_GREEDY_KEEP)
    args = ["--dtype", "float32", "--max-num-batched-tokens", "512", "--seed", "0",
            "--api-key", KEY, "--limit-mm-per-prompt",
            json.dumps({"image": MAX_IMAGES, "video": 0}), "--enable-prompt-tokens-details",
            "--root-path", ROOT, "--api-server-count", "2", "--enable-scale-out",
            "--hf-overrides", overrides]
    env = {"VLLM_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS), ENCODER_LOG_ENV: str(encoder_log),
           NAN_TOKENS_ENV: str(NAN_TOKENS),
           FAULTS_ENV: ",".join(f"{site}:{n}" for site, (_, n, _) in FAULTS.items())}
    return VLLMServer(model_dir, args, log_path=log_dir / "hardening.log", env=env, cli=True,
                      wait=wait)

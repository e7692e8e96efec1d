"""A compiled CPU server runs vLLM's profile run with a greedy default, starts and serves
(docs/worker-safety.md §1; issue 17, defect 2).

GPU workers always run ``profile_run``; vLLM's CPU worker runs it only when the model is
compiled (``CPUModelRunner.warming_up_model``), so ``--enforce-eager`` servers, all the other
server tests, never run it. Here the server is compiled the cheapest way that still runs it
(:data:`COMPILED_ARGS`), on a tiny Qwen2.5-VL whose processor allows 2048 x 2048 images: the
profiled dummy (a 5348-token video) is larger than ``max_greedy_keep`` can keep at the default
ratio, so the old code refused it and start-up failed ("resprune would keep 3744 of this
video's 5348 tokens, ...").

One start covers the three configurations of the issue (divprune 0.5, resprune 0.3, lrcp 0.889
as defaults): the default never reaches the profile run any more (vLLM's dummy inputs are
processed unpruned, whatever the default; the default only decides whether the dummy carries
scorer text, which resprune's does), and in the worker a request's ``prune_method`` /
``prune_ratio`` and the server's default produce the same params row. So the server's default
is the greedy, text-conditioned one the old code refused, and the other two are served as
request fields; ``tests/test_profile_run.py`` runs the dummy path itself with greedy and
non-greedy defaults for every family.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import _pool
from tests.conftest import QWEN25_ARCH
from vllm_tokenprune import num_kept
from vllm_tokenprune.testing.media import chat_messages, make_image
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

pytestmark = pytest.mark.server

#: The cheapest flags that still run ``profile_run`` on vLLM's CPU worker: no
#: ``--enforce-eager`` (it sets compilation mode NONE, and ``warming_up_model`` returns before
#: profiling), and a compilation mode that is not NONE. DYNAMO_TRACE_ONCE with the ``eager``
#: backend traces the LM once with dynamo and compiles nothing (what vLLM's own CPU CI uses);
#: the default (VLLM_COMPILE, turned into DYNAMO_TRACE_ONCE + inductor on CPU) also compiles.
COMPILED_ARGS = ["--compilation-config", '{"mode": 2, "backend": "eager"}']
MAX_PIXELS = 2048 * 2048
#: Room for the largest item (5348 tokens) and a prompt.
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "8192", "--max-num-seqs", "4",
               "--seed", "0", "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
DEFAULT = ("resprune", 0.3)
REQUESTS = [DEFAULT, ("divprune", 0.5), ("lrcp", 0.889)]
MAX_GREEDY_KEEP = 2048
#: 448 x 448: a 16 x 16 token grid.
IMAGE_TOKENS = 256


def _big_qwen(p: _pool.Pool) -> Path:
    from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

    return p.cached("big_qwen", lambda: build_qwen2_5_vl(
        p.tmp("big") / "qwen2_5_vl", seed=0, max_pixels=MAX_PIXELS))


@_pool.factory("profile")
def _compiled(p: _pool.Pool) -> dict[str, Any]:
    method, ratio = DEFAULT
    overrides = token_prune_overrides(QWEN25_ARCH, method=method, prune_ratio=ratio)
    return {"server": VLLMServer(
        _big_qwen(p), [*SERVER_ARGS, *COMPILED_ARGS, "--hf-overrides", overrides], fast=False,
        log_path=_pool.log_dir() / "profile_compiled.log", wait=False)}


_pool.uses("test_profile_server.py", "compiled_server", "profile")


@pytest.fixture(scope="module")
def big_qwen_dir(request: pytest.FixtureRequest) -> Path:
    return _big_qwen(_pool.pool(request.config))


@pytest.fixture(scope="module")
def compiled_server(request: pytest.FixtureRequest) -> Iterator[VLLMServer]:
    server = _pool.pool(request.config).take("profile")["server"]
    yield server
    server.stop()


def test_compiled_server_profiles_a_greedy_default_and_serves(compiled_server):
    server = compiled_server
    log = server.log_text()
    # vLLM's CPU runner ran its profile run, with the largest dummy the processor allows
    assert "Warming up model for the compilation" in log
    m = re.search(r"Encoder cache will be initialized with a budget of (\d+) tokens, and "
                  r"profiled with (\d+) (\w+) items of the maximum feature size", log)
    assert m, "vLLM's profile run did not encode its dummy batch"
    largest = int(m.group(1)) // int(m.group(2))
    method, ratio = DEFAULT
    assert num_kept(largest, ratio) > MAX_GREEDY_KEEP  # what start-up used to refuse
    print(f"start-up {server.startup_seconds:.1f} s; profiled {m.group(2)} {m.group(3)} "
          f"item(s) of {largest} tokens")

    image = make_image(448, 448, seed=3)
    tokens = {}
    for method, ratio in REQUESTS:
        extra = {} if (method, ratio) == DEFAULT else {"prune_method": method,
                                                       "prune_ratio": ratio}
        resp = server.openai().chat.completions.create(
            model=server.model, messages=chat_messages([image], "Describe this image."),
            max_tokens=2, temperature=0.0, extra_body=extra or None)
        assert resp.choices[0].message.content is not None
        tokens[method] = resp.usage.prompt_tokens
    # each request kept exactly num_kept of the image's tokens (same text around it)
    kept = {m: num_kept(IMAGE_TOKENS, r) for m, r in REQUESTS}
    for m in kept:
        assert tokens[m] - tokens["lrcp"] == kept[m] - kept["lrcp"], tokens

    metrics = requests.get(server.base_url + "/metrics", timeout=30).text
    fallbacks = [float(v) for v in re.findall(
        r"^tokenprune_scorer_fallbacks_total\{[^}]*\} (\S+)$", metrics, re.M)]
    assert sum(fallbacks) == 0, metrics
    assert "tokenprune_scorer_seconds" in metrics  # the scorers ran and were measured

"""vLLM's profile run with the max-size dummy media, for every family, in-process
(docs/worker-safety.md §1; issue 17, defect 2).

GPU workers always run ``profile_run``: vLLM's processor builds the largest dummy media with the
server's ``token_prune`` defaults, and the model encodes the whole dummy batch in one
``embed_multimodal`` call, inside vLLM's memory profiling. A greedy default whose keep-count on
that dummy exceeded ``max_greedy_keep`` used to be refused there, so the server could not start;
CPU servers with ``--enforce-eager`` skip ``profile_run``, so no server test ever saw it.

Here each family is built by vLLM's loader in the test process, once with a greedy default
that the old code refused and once with a non-greedy one, and the dummy batch goes through
vLLM's own code: ``MultiModalBudget.get_dummy_encoder_profile_inputs`` (the processor's dummy
inputs), the V1 runner's ``_get_mm_dummy_batch`` + ``embed_multimodal`` as its
``profile_run`` does, and Model Runner V2's ``EncoderRunner.profile_encoder_cache``. The
compiled CPU server test (``tests/test_profile_server.py``) runs the same path in a real
server.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests._inproc import FAMILIES, Built, dummy_profile_batch, vllm_inproc  # noqa: F401
from vllm_tokenprune import num_kept
from vllm_tokenprune.models import encoder_budget as budget_mod
from vllm_tokenprune.scoring import get_method, list_methods

#: The greedy default per family (every greedy method is someone's default).
GREEDY = {"qwen2_vl": "divprune", "qwen2_5_vl": "resprune", "qwen3_vl": "cdpruner",
          "llava": "divprune", "llava_next": "resprune"}
#: Small enough that each greedy default at 0.5 would keep more of the largest dummy item than
#: this server allows (the old refusal), at toy sizes; it also keeps the sweep's greedy loops
#: short on CPU.
MAX_GREEDY_KEEP = 8
DEFAULTS = {"greedy": 0.5, "non_greedy": 0.889}
#: A small step budget keeps the dummy batches small on CPU (vLLM profiles
#: max(max_num_batched_tokens, largest item) tokens).
ENGINE = {"max_model_len": 2048, "max_num_batched_tokens": 512, "max_num_seqs": 4}


def _spy_sweep(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], list[int]]]:
    """(method, keep-counts, item sizes) of every scorer call of the profile sweep."""
    calls: list[tuple[str, list[int], list[int]]] = []
    real = budget_mod.select_tokens_batch

    def spy(feats, keep, method, **kw):  # noqa: ANN001, ANN202, ANN003
        calls.append((method, list(keep), [int(f.shape[0]) for f in feats]))
        return real(feats, keep, method, **kw)

    monkeypatch.setattr(budget_mod, "select_tokens_batch", spy)
    return calls


def _check_sweep(calls: list[tuple[str, list[int], list[int]]], items: int) -> None:
    """Every method (allowed_methods unset: all) once, on every item, at its worst keep."""
    assert [m for m, _, _ in calls] == list_methods()
    for method, keep, sizes in calls:
        assert len(sizes) == items
        worst = [min(n - 1, MAX_GREEDY_KEEP) if get_method(method).greedy else n - 1
                 for n in sizes]
        assert keep == worst, method


@pytest.mark.parametrize("default", list(DEFAULTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_profile_run_starts_with_the_servers_default(vllm_inproc, monkeypatch, family,  # noqa: F811
                                                     default):
    """The dummy batch is built and encoded under both runners' profile paths without a
    refusal, unpruned (each item's full placeholder count: the most a request's items can
    cost in the tower and the encoder cache), and every scorer ran at its worst on it."""
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    method = GREEDY[family] if default == "greedy" else "lrcp"
    ratio = DEFAULTS[default]
    built: Built = vllm_inproc(family, {"method": method, "prune_ratio": ratio,
                                        "max_greedy_keep": MAX_GREEDY_KEEP}, **ENGINE)
    built.model._tp_sweep_enabled = True  # as on a GPU worker (the CPU rule: test below)
    calls = _spy_sweep(monkeypatch)

    # V1: profile_run's dummy batch (vLLM's processor ran here) and its embed_multimodal call
    budget, modality, items, batch = dummy_profile_batch(built)
    full = budget.mm_max_toks_per_item[modality]
    out = built.run(built.model.embed_multimodal, **batch)
    sanity_check_mm_encoder_outputs(out, expected_num_items=items)
    assert [o.shape[0] for o in out] == [full] * items
    _check_sweep(calls, items)
    scored = calls[0][2][0]  # tokens the scorer chooses from (LLaVA-NeXT: without newlines)
    if default == "greedy":  # the case start-up used to refuse
        assert num_kept(scored, ratio) > MAX_GREEDY_KEEP

    # V2: EncoderRunner.profile_encoder_cache (its own dummy inputs and batching)
    calls.clear()
    runner = EncoderRunner(built.model, max_num_tokens=16, hidden_size=8,
                           encoder_cache=EncoderCache(), dtype=torch.float32,
                           device=torch.device("cpu"))
    built.run(runner.profile_encoder_cache, budget.get_dummy_encoder_profile_inputs(), budget)
    cached = runner.encoder_cache.encoder_outputs
    assert sorted(cached) == sorted(f"tmp_{i}" for i in range(items))
    assert all(o.shape[0] == full for o in cached.values())
    _check_sweep(calls, items)


def test_profile_sweep_failure_stops_the_profile_run(vllm_inproc, monkeypatch):  # noqa: F811
    """A scorer failing at its worst in the profile run raises out of embed_multimodal (vLLM's
    profile_run then fails start-up) with the method and the cause."""
    built = vllm_inproc("qwen2_5_vl", {"method": "lrcp", "prune_ratio": 0.5,
                                       "max_greedy_keep": MAX_GREEDY_KEEP}, **ENGINE)
    built.model._tp_sweep_enabled = True
    real = budget_mod.select_tokens_batch

    def fail_cdpruner(feats, keep, method, **kw):  # noqa: ANN001, ANN202, ANN003
        if method == "cdpruner":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(feats, keep, method, **kw)

    monkeypatch.setattr(budget_mod, "select_tokens_batch", fail_cdpruner)
    _, _, _, batch = dummy_profile_batch(built)
    with pytest.raises(RuntimeError, match="could not run cdpruner at its worst.*"
                       "OutOfMemoryError: CUDA out of memory.*does not start"):
        built.run(built.model.embed_multimodal, **batch)


def test_sweep_runs_where_the_profile_sizes_memory(monkeypatch):
    """GPU workers size the KV cache from the profile: the sweep runs. vLLM's CPU worker runs
    profile_run only as a compile warm-up and measures it only when it sizes the KV cache
    itself; with VLLM_CPU_KVCACHE_SPACE (kv_cache_memory_bytes) the sweep would cost start-up
    time for nothing."""
    from vllm.platforms import current_platform

    explicit = SimpleNamespace(cache_config=SimpleNamespace(kv_cache_memory_bytes=1 << 30))
    auto = SimpleNamespace(cache_config=SimpleNamespace(kv_cache_memory_bytes=None))
    assert current_platform.is_cpu()
    assert not budget_mod._profile_sizes_memory(explicit)
    assert budget_mod._profile_sizes_memory(auto)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    assert budget_mod._profile_sizes_memory(explicit)

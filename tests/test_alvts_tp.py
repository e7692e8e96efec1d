"""ALVTS under tensor parallelism (no server: the CPU suite has no budget for a TP server):
processes in a real ``torch.distributed`` gloo group each hold part of a layer's query and KV
heads, build the factors of their own heads with the full model's rank, score the item on
their heads and all-reduce the per-token sum; every rank routes exactly as one rank holding
every head does. Twice: with the heads sliced by hand, and through vLLM's own tensor-parallel
set-up (``init_distributed_environment`` / ``initialize_model_parallel``), its
``QKVParallelLinear`` loading the full weights with its weight loader (its head slicing) and
the integration's own ``shard_factors`` and ``tensor_model_parallel_all_reduce``."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vllm_tokenprune.alvts import AlvtsOptions, AlvtsRouter, auto_rank, layer_factors

OPTIONS = AlvtsOptions(first_layer=0, consistency=0.25)

DIM, HEADS, KV, HEAD_DIM, N, LAYERS, KEEP = 64, 8, 4, 16, 200, 3, 37


def _weights(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"q": torch.randn(HEADS * HEAD_DIM, DIM, generator=g) / DIM ** 0.5,
             "k": torch.randn(KV * HEAD_DIM, DIM, generator=g) / DIM ** 0.5,
             "qb": torch.randn(HEADS * HEAD_DIM, generator=g) * 0.1,
             "norm": 1 + 0.1 * torch.randn(DIM, generator=g)} for _ in range(LAYERS)]


def _routes(rank: int, world: int, reduce=None) -> list[torch.Tensor]:  # noqa: ANN001
    """This rank's routes of one item through every layer (heads ``rank``/``world``)."""
    r = auto_rank(DIM, KV, HEAD_DIM)  # the full model's rank, on every shard
    hq, hk = HEADS // world * HEAD_DIM, KV // world * HEAD_DIM
    factors = {}
    for i, w in enumerate(_weights()):
        factors[i] = layer_factors(
            w["q"][rank * hq:(rank + 1) * hq], w["k"][rank * hk:(rank + 1) * hk],
            num_heads=HEADS // world, num_kv_heads=KV // world, rank=r,
            q_bias=w["qb"][rank * hq:(rank + 1) * hq], norm_weight=w["norm"])
    return _route(AlvtsRouter(factors, OPTIONS, reduce=reduce))


def _route(router: AlvtsRouter) -> list[torch.Tensor]:
    hidden = torch.randn(N, DIM, generator=torch.Generator().manual_seed(1))
    state = router.new_state()
    return [router.route(i, hidden + 0.1 * i, KEEP, state) for i in range(LAYERS)]


@pytest.fixture(scope="module")
def ranks() -> Iterator[str]:
    """The start method of the ranks: ``forkserver``, its server importing vLLM's distributed
    set-up and this module once, so that each rank is a fork of it (six ranks would otherwise
    import torch and vLLM six times: most of this file's time). The rank processes themselves
    forks of that server, not of the test process (whose threads a fork would inherit); the
    server's environment is the test process's when it starts, so what differs per test comes
    in the ranks' arguments. The server is stopped after the module."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "vllm.distributed", "vllm.model_executor.layers.linear", __name__])
    yield "forkserver"
    stop = getattr(forkserver._forkserver, "_stop", None)  # private; Python >= 3.9
    if stop is not None:
        stop()


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        torch.save(_routes(rank, world, all_reduce), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_route_as_one_holding_every_head(tmp_path: Path, ranks: str) -> None:
    import torch.multiprocessing as mp

    world = 2
    out = str(tmp_path / "routes")
    mp.start_processes(_worker, args=(world, f"file://{tmp_path / 'store'}", out),
                       nprocs=world, join=True, start_method=ranks)
    single = _routes(0, 1)
    got = [torch.load(f"{out}.{r}") for r in range(world)]
    for layer in range(LAYERS):
        assert torch.equal(got[0][layer], got[1][layer])  # every rank routes identically
        assert torch.equal(got[0][layer], single[layer])  # and as one rank with every head
    # the control: a rank without the reduction (its own heads only) routes differently
    alone = _routes(0, world)
    assert any(not torch.equal(alone[i], single[i]) for i in range(LAYERS))


@pytest.mark.parametrize("world", [2, 4])
def test_the_reduced_score_is_the_full_score(world: int) -> None:
    """In one process: summing each shard's unnormalised score gives the full score."""
    parts: list[torch.Tensor] = []

    def collect(t: torch.Tensor) -> torch.Tensor:
        parts.append(t.clone())
        return t

    for rank in range(world):
        _routes(rank, world, collect)
    full: list[torch.Tensor] = []
    _routes(0, 1, lambda t: full.append(t.clone()) or t)
    for layer in range(LAYERS):
        total = sum(parts[rank * LAYERS + layer] for rank in range(world))
        assert torch.allclose(total / total.sum(), full[layer] / full[layer].sum(),
                              rtol=1e-5, atol=1e-7)


def _vllm_worker(rank: int, world: int, init: str, out: str, ident: str) -> None:
    """One rank of vLLM's tensor-parallel set-up: each layer's QKVParallelLinear loads the full
    weights (vLLM slices this rank's heads), then the integration builds and routes.
    ``ident``: vLLM's CPU shared-memory group name (``VLLM_DIST_IDENT``), one per test."""
    os.environ["VLLM_DIST_IDENT"] = ident
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from vllm_tokenprune.alvts.model import shard_factors, tensor_parallel_reduce

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=world, rank=rank, distributed_init_method=init,
                                     local_rank=rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=world)
        try:
            factors = {}
            for i, w in enumerate(_weights()):
                qkv = QKVParallelLinear(DIM, HEAD_DIM, HEADS, KV, bias=True,
                                        params_dtype=torch.float32)
                zeros = torch.zeros(KV * HEAD_DIM, DIM)
                for shard, weight in (("q", w["q"]), ("k", w["k"]), ("v", zeros)):
                    qkv.weight_loader(qkv.weight, weight, shard)
                for shard, bias in (("q", w["qb"]), ("k", torch.zeros(KV * HEAD_DIM)),
                                    ("v", torch.zeros(KV * HEAD_DIM))):
                    qkv.weight_loader(qkv.bias, bias, shard)
                attn = SimpleNamespace(  # Qwen2Attention's attributes on this rank
                    qkv_proj=qkv, num_heads=qkv.num_heads, num_kv_heads=qkv.num_kv_heads,
                    q_size=qkv.num_heads * HEAD_DIM, kv_size=qkv.num_kv_heads * HEAD_DIM,
                    total_num_kv_heads=KV, head_dim=HEAD_DIM)
                norm = SimpleNamespace(weight=w["norm"], variance_epsilon=1e-6)
                factors[i] = shard_factors(attn, norm, OPTIONS)
            reduce = tensor_parallel_reduce()
            assert reduce is not None
            torch.save(_route(AlvtsRouter(factors, OPTIONS, reduce=reduce)), f"{out}.{rank}")
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


@pytest.mark.parametrize("world", [2, 4])
def test_vllm_tensor_parallel_ranks_route_as_one(tmp_path: Path, ranks: str,
                                                 world: int) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "routes")
    ident = f"alvts-tp-{uuid.uuid4().hex[:12]}"
    try:
        mp.start_processes(_vllm_worker, args=(world, f"file://{tmp_path / 'store'}", out, ident),
                           nprocs=world, join=True, start_method=ranks)
    finally:
        # vLLM's CPU communicator unlinks its shared-memory segments when the process's C++
        # objects are destroyed at exit; a forkserver's child ends with os._exit, so the
        # segments (8 MiB per rank) are unlinked here
        for segment in Path("/dev/shm").glob(f"{ident}-*"):
            segment.unlink(missing_ok=True)
    single = _routes(0, 1)
    for rank in range(world):
        got = torch.load(f"{out}.{rank}")
        for layer in range(LAYERS):
            assert torch.equal(got[layer], single[layer]), (rank, layer)

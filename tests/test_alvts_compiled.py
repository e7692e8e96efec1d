"""ALVTS under torch.compile and CUDA graphs (``alvts/compiled.py``; no server): the routed
tail as an opaque custom op that follows the step in a compiled graph, the splitting-op hook on
vLLM's own ``CompilationConfig``, and the CUDA-graph settings refused naming their flags."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from vllm_tokenprune.alvts import AlvtsOptions, AlvtsRouter, compiled, layer_factors
from vllm_tokenprune.alvts.model import AlvtsRuntime, RoutedItem, Step, _routed_tail

DIM, ROWS, NAME = 32, 30, "test.layers.0.self_attn.attn.alvts"


class _Norm(nn.Module):
    """vLLM's RMSNorm contract: ``norm(x, residual)`` -> (normed x + residual, x + residual)."""

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        s = x + residual
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6), s


class _Layer(nn.Module):
    """The attributes :func:`_routed_tail` reads on a routed decoder layer."""

    def __init__(self, runtime: AlvtsRuntime) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.post_attention_layernorm = _Norm()
        self.mlp = nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, DIM))
        for p in self.mlp.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2
        self._tp_alvts_runtime = runtime
        self._tp_alvts_layer = 0

    def _tp_alvts_tail(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return _routed_tail(self, hidden, residual)


@pytest.fixture()
def layer(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Layer]:
    g = torch.Generator().manual_seed(0)
    f = layer_factors(torch.randn(4 * 8, DIM, generator=g), torch.randn(2 * 8, DIM, generator=g),
                      num_heads=4, num_kv_heads=2, rank=4)
    opts = AlvtsOptions(first_layer=0)
    runtime = AlvtsRuntime(opts)
    runtime.router = AlvtsRouter({0: f}, opts)
    layer = _Layer(runtime)
    compiled.register_op()
    monkeypatch.setitem(compiled._LAYERS, NAME, layer)
    yield layer


def _step(layer: _Layer) -> None:
    """One item of 20 rows (rows 4-23 of 30), 5 of which go through."""
    layer._tp_alvts_runtime.step = Step([RoutedItem(torch.arange(4, 24), 5)], ROWS)


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(ROWS, DIM, generator=g), torch.randn(ROWS, DIM, generator=g)


def _plain(layer: _Layer, h: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    x, s = layer.post_attention_layernorm(h, r)
    return layer.mlp(x), s


@torch.no_grad()
def test_the_op_computes_the_routed_tail_in_place(layer: _Layer) -> None:
    """The op (through ``torch.ops``) writes exactly what the eager routed tail returns into its
    inputs: with an item, skipped rows leave with the stream they entered (output 0) and 15 of
    its 20 rows skip; without one, the plain post-attention norm and MLP."""
    op = compiled.layer_tail_op()
    h, r = _inputs()
    for routed in (True, False):
        layer._tp_alvts_runtime.step = None
        if routed:
            _step(layer)
        want = _routed_tail(layer, h.clone(), r.clone())
        got_h, got_r = h.clone(), r.clone()
        assert op(got_h, got_r, NAME) is None
        assert torch.equal(got_h, want[0]) and torch.equal(got_r, want[1])
        plain = _plain(layer, h, r)
        skipped = (got_r == r).all(-1) & (got_h == 0).all(-1)
        assert int(skipped.sum()) == (15 if routed else 0)
        if not routed:
            assert torch.equal(got_h, plain[0]) and torch.equal(got_r, plain[1])


def test_the_fake_impl_and_schema() -> None:
    """The fake impl on fake tensors under FakeTensorMode: no output, shapes kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    compiled.register_op()
    op = compiled.layer_tail_op()
    with FakeTensorMode():
        h, r = torch.empty(7, DIM), torch.empty(7, DIM)
        assert op(h, r, NAME) is None and h.shape == (7, DIM)


def test_torch_opcheck(layer: _Layer) -> None:
    """torch's own op checks (schema and declared mutation, fake tensors, AOT dispatch) with a
    layer registered and an item in the step."""
    _step(layer)
    h, r = _inputs()
    torch.library.opcheck(compiled.layer_tail_op(), (h, r, NAME),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", ["aot_eager"])
@torch.no_grad()
def test_a_compiled_graph_follows_the_step(layer: _Layer, backend: str) -> None:
    """A graph compiled once (traced with no item in the step, as vLLM's start-up run traces
    it) calls the op at every run: it routes when the step has an item, and not otherwise."""
    op = compiled.layer_tail_op()

    def tail(h: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        h, r = h * 1.0, r * 1.0  # the pieces before the op (in vLLM: attention, input norm)
        op(h, r, NAME)
        return h + 0.0, r + 0.0

    fn = torch.compile(tail, backend=backend, fullgraph=True, dynamic=False)
    h, r = _inputs()
    layer._tp_alvts_runtime.step = None
    plain = fn(h, r)
    assert torch.allclose(plain[0], _plain(layer, h, r)[0], atol=1e-6)
    _step(layer)
    routed = fn(h, r)
    want = _routed_tail(layer, h.clone(), r.clone())
    assert torch.allclose(routed[0], want[0], atol=1e-6)
    assert torch.allclose(routed[1], want[1], atol=1e-6)
    assert (routed[0] - plain[0]).abs().max() > 1e-2  # the step changed what the graph did
    layer._tp_alvts_runtime.step = None
    assert torch.allclose(fn(h, r)[0], plain[0], atol=1e-6)


# ---------------------------------------------------------------- compilation config


def _compilation(**kw: Any) -> Any:
    from vllm.config import CompilationConfig

    cc = CompilationConfig(**kw)
    cc.set_splitting_ops_for_v1("allgather_reducescatter")
    return cc


def test_piecewise_compilation_splits_at_the_routing_op() -> None:
    """vLLM's GPU default (VLLM_COMPILE, FULL_AND_PIECEWISE, attention as splitting ops) gets
    the op appended (once); a graph without pieces and the CPU build's whole-graph compile
    are left alone."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = _compilation(mode=CompilationMode.VLLM_COMPILE,
                      cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    attention = list(cc.splitting_ops)
    assert "vllm::unified_attention_with_output" in attention
    for _ in range(2):
        compiled.configure_compilation(SimpleNamespace(compilation_config=cc))
    assert cc.splitting_ops == [*attention, compiled.SPLITTING_OP]
    cc = _compilation(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.PIECEWISE)
    compiled.configure_compilation(SimpleNamespace(compilation_config=cc))
    assert cc.splitting_ops[-1] == compiled.SPLITTING_OP
    cc = _compilation(mode=CompilationMode.VLLM_COMPILE, splitting_ops=[],
                      cudagraph_mode=CUDAGraphMode.FULL_DECODE_ONLY)
    compiled.configure_compilation(SimpleNamespace(compilation_config=cc))
    assert cc.splitting_ops == []
    cc = _compilation(mode=CompilationMode.DYNAMO_TRACE_ONCE)
    compiled.configure_compilation(SimpleNamespace(compilation_config=cc))
    assert compiled.SPLITTING_OP not in (cc.splitting_ops or [])


def _vllm_config(cudagraph_mode: Any, **more: Any) -> Any:
    from tests.test_alvts_config import _vllm_config as base

    cfg = base()
    cfg.compilation_config = SimpleNamespace(mode=3, cudagraph_mode=cudagraph_mode)
    for k, v in more.items():
        setattr(cfg, k, v)
    return cfg


ARCH = "TokenPruneQwen2_5_VLForConditionalGeneration"


@pytest.mark.parametrize("mode", ["NONE", "PIECEWISE", "FULL_AND_PIECEWISE",
                                  "FULL_DECODE_ONLY"])
def test_default_compilation_and_cuda_graphs_serve_alvts(mode: str) -> None:
    from vllm.config import CUDAGraphMode

    from vllm_tokenprune.alvts.model import check_alvts_server

    check_alvts_server(_vllm_config(CUDAGraphMode[mode]), ARCH, True)


def test_cuda_graph_settings_that_freeze_routing_are_refused(monkeypatch) -> None:
    """FULL graphs on batches with prefills; FULL decode graphs with speculative decoding on
    the V1 runner (it replays them on short prefill chunks; V2 does not); breakable piecewise
    graphs (vLLM 0.33)."""
    from vllm.config import CUDAGraphMode

    from vllm_tokenprune.alvts.model import check_alvts_server

    cases = [(_vllm_config(CUDAGraphMode.FULL), "-cc.cudagraph_mode=FULL_AND_PIECEWISE"),
             (_vllm_config(CUDAGraphMode.FULL_AND_PIECEWISE, speculative_config=object()),
              "--speculative-config")]
    for cfg, flag in cases:
        with pytest.raises(ValueError, match="token_prune enables 'alvts'") as e:
            check_alvts_server(cfg, ARCH, True)
        assert flag in str(e.value)
    check_alvts_server(_vllm_config(CUDAGraphMode.PIECEWISE, speculative_config=object()),
                       ARCH, True)
    check_alvts_server(_vllm_config(CUDAGraphMode.FULL_AND_PIECEWISE, speculative_config=object(),
                                    use_v2_model_runner=True), ARCH, True)
    monkeypatch.setattr(compiled, "_breakable_cudagraphs", lambda: True)
    with pytest.raises(ValueError, match="VLLM_USE_BREAKABLE_CUDAGRAPH"):
        check_alvts_server(_vllm_config(CUDAGraphMode.FULL_AND_PIECEWISE), ARCH, True)
    check_alvts_server(_vllm_config(CUDAGraphMode.FULL_DECODE_ONLY), ARCH, True)

"""Real-CUDA checks of the plugin's pure-torch parts (marker ``gpu``: skipped without a CUDA
device; run them with ``pytest -m gpu`` on a GPU machine, docs/gpu.md). No vLLM, no server.

* every scorer selects on CUDA exactly what it selects on CPU (bf16 features, as vLLM hands
  them; one item and a padded batch of two sizes; LLaVA-1.5's 576 tokens and Qwen2.5-VL's
  2880);
* the scorer timer's CUDA-event path records a call once its kernels complete, through the
  module entry point the worker uses, and records nothing for a call that raised;
* ALVTS: each layer's query-key factors built from CUDA weights equal those built on CPU, and
  importance, the blended scores and the routing decisions over several layers match.

Written where no GPU was available: these tests have never run (docs/gpu.md lists them).
Selections are compared exactly, with TF32 off: features are random, so the score gap at the
k-th token is orders of magnitude larger than CPU/CUDA rounding differences; a failure names
the method and how many of the kept tokens differ.
"""

from __future__ import annotations

import time

import pytest
import torch

from vllm_tokenprune.alvts import AlvtsOptions, AlvtsRouter, importance, layer_factors, top_tokens
from vllm_tokenprune.metrics import worker as metrics
from vllm_tokenprune.scoring import get_method, list_methods, num_kept, select_tokens_batch

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
METHODS = list_methods()


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """CPU/CUDA equality is checked with full float32 matmuls: with TF32 on, near-ties may
    resolve differently from the CPU (docs/scorers.md)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    """bf16 features (vLLM's encoder output dtype on GPUs), made on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * (1 + torch.rand(n, 1, generator=g))).to(
        torch.bfloat16)


def _same(cpu: torch.Tensor, cuda: torch.Tensor, what: str) -> None:
    assert cuda.device.type == "cuda", what
    got = cuda.cpu()
    if not torch.equal(got, cpu):
        lost = sorted(set(cpu.tolist()) - set(got.tolist()))
        raise AssertionError(f"{what}: CUDA kept {len(lost)} of {cpu.numel()} tokens that CPU "
                             f"did not keep (first: {lost[:8]})")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "d", "ratio"), [(576, 1024, 0.75), (2880, 1280, 0.889)])
def test_scorer_selects_the_same_tokens_on_cuda_as_on_cpu(method, n, d, ratio):
    spec = get_method(method)
    feats = [_feats(n, d, seed=1), _feats(n // 2 + 7, d, seed=2)]
    keep = [num_kept(f.shape[0], ratio) for f in feats]
    text = [torch.randn(5, d, generator=torch.Generator().manual_seed(3)), None] \
        if spec.uses_text else None
    grids = [(1, 24, 24) if n == 576 else (1, 48, 60), None] if spec.uses_grid else None
    one_cpu = select_tokens_batch(feats[:1], keep[:1], method,
                                  text_embeds=None if text is None else text[:1],
                                  grids=None if grids is None else grids[:1])
    one_cuda = select_tokens_batch([feats[0].to(CUDA)], keep[:1], method,
                                   text_embeds=None if text is None else [text[0].to(CUDA)],
                                   grids=None if grids is None else grids[:1])
    _same(one_cpu[0], one_cuda[0], f"{method} N={n}")
    both_cpu = select_tokens_batch(feats, keep, method, text_embeds=text, grids=grids)
    both_cuda = select_tokens_batch(
        [f.to(CUDA) for f in feats], keep, method,
        text_embeds=None if text is None else [None if t is None else t.to(CUDA) for t in text],
        grids=grids)
    for i, (a, b) in enumerate(zip(both_cpu, both_cuda, strict=True)):
        _same(a, b, f"{method} batch item {i}")
        assert b.numel() == keep[i]
    _same(both_cpu[0], one_cuda[0], f"{method}: batched and single selections differ")


class _Sink:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def __call__(self, method: str, modality: str, seconds: float) -> None:
        self.rows.append((method, modality, seconds))


def _wait_for(sink: _Sink, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while len(sink.rows) < count and time.time() < deadline:
        time.sleep(0.02)


def test_scorer_timer_entry_point_records_a_real_scorer_call_on_cuda(monkeypatch):
    sink = _Sink()
    monkeypatch.setattr(metrics, "_timer", metrics.ScorerTimer(sink, poll_s=0.02))
    feats = [_feats(2880, 1280, seed=4).to(CUDA)]
    select_tokens_batch(feats, [320], "divprune")  # warm-up
    torch.cuda.synchronize()
    with metrics.time_scorer("divprune", "image", feats[0].device):
        kept = select_tokens_batch(feats, [320], "divprune")
    assert kept[0].device.type == "cuda"
    torch.cuda.synchronize()
    _wait_for(sink, 1)  # the poll thread records it without another timed call
    assert len(sink.rows) == 1 and sink.rows[0][:2] == ("divprune", "image")
    assert 0.0 < sink.rows[0][2] < 30.0
    assert not metrics._timer.pending


def test_scorer_timer_records_nothing_for_a_call_that_raised_on_cuda():
    sink = _Sink()
    timer = metrics.ScorerTimer(sink, poll_s=0.02)
    with pytest.raises(RuntimeError), timer.time("lrcp", "video", CUDA):
        torch.ones(4, device=CUDA).sum()
        raise RuntimeError("scorer failed")
    assert not timer.pending
    with timer.time("lrcp", "video", CUDA):
        torch.ones(4, device=CUDA).sum()
    torch.cuda.synchronize()
    _wait_for(sink, 1)
    assert [r[:2] for r in sink.rows] == [("lrcp", "video")]


H, G, DH, D = 16, 4, 64, 1024  # a Qwen2-style GQA layer, scaled down


def _layer(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "wq": (torch.randn(H * DH, D, generator=g) / D**0.5).to(torch.bfloat16),
        "wk": (torch.randn(G * DH, D, generator=g) / D**0.5).to(torch.bfloat16),
        "bq": torch.randn(H * DH, generator=g).to(torch.bfloat16),
        "gamma": (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16),
    }


def _factors(w: dict[str, torch.Tensor], device: torch.device, rank: int = 16):
    """Float32 factors (the server stores them in the model's dtype): CPU/CUDA equality of the
    decisions is checked without bf16 rounding of the projections."""
    w = {k: v.to(device) for k, v in w.items()}
    return layer_factors(w["wq"], w["wk"], num_heads=H, num_kv_heads=G, rank=rank,
                         q_bias=w["bq"], norm_weight=w["gamma"], eps=1e-6, dtype=torch.float32)


def test_alvts_factors_built_on_cuda_equal_the_cpu_ones():
    w = _layer(0)
    cpu, cuda = _factors(w, torch.device("cpu")), _factors(w, CUDA)
    assert cuda.key.device.type == "cuda" and cuda.key.dtype == torch.float32
    # eigen/QR vectors may flip sign per component; each head's logit matrix and its query
    # bias's key-side term may not
    for h in range(H):
        torch.testing.assert_close(cuda.head_logit_matrix(h).cpu(), cpu.head_logit_matrix(h),
                                   rtol=1e-4, atol=1e-7)
    r, grp = cpu.rank, H // G

    def bias_term(f):  # (H, D): each head's query bias against its group's key factor
        return torch.stack([f.key[:, (h // grp) * r:(h // grp + 1) * r].double()
                            @ f.query_bias[h * r:(h + 1) * r].double() for h in range(H)])

    torch.testing.assert_close(bias_term(cuda).cpu(), bias_term(cpu), rtol=1e-4, atol=1e-6)
    assert cuda.eps == cpu.eps


@pytest.mark.parametrize("queries", [64, None])
def test_alvts_importance_and_top_tokens_on_cuda_equal_cpu(queries):
    w = _layer(1)
    hidden = _feats(1200, D, seed=5)
    cpu = importance(hidden, _factors(w, torch.device("cpu")), queries)
    cuda = importance(hidden.to(CUDA), _factors(w, CUDA), queries)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-3, atol=1e-7)
    _same(top_tokens(cpu, 133), top_tokens(cuda, 133), f"top_tokens (queries={queries})")


def test_alvts_router_decisions_over_layers_on_cuda_equal_cpu():
    """The per-request routing (importance per layer, consistency blend, top-k) over four
    layers, each fed the previous layer's stream as the model would."""
    options = AlvtsOptions()
    weights = {layer: _layer(10 + layer) for layer in range(2, 6)}
    routers = {dev: AlvtsRouter({layer: _factors(w, torch.device(dev))
                                 for layer, w in weights.items()}, options)
               for dev in ("cpu", "cuda")}
    hidden = _feats(900, D, seed=6).float()
    states = {dev: AlvtsRouter.new_state() for dev in routers}
    for layer in weights:
        through = {dev: routers[dev].route(layer, hidden.to(dev), 300, states[dev])
                   for dev in routers}
        _same(through["cpu"], through["cuda"], f"alvts layer {layer}")
        torch.testing.assert_close(states["cuda"]["score"].cpu(), states["cpu"]["score"],
                                   rtol=1e-3, atol=1e-7)
        hidden = hidden + 0.1 * torch.tanh(hidden.roll(1, 0))  # the next layer's input

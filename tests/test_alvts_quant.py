"""ALVTS under vLLM's online FP8 (``alvts/quant.py``), in-process (no server).

vLLM quantizes an online-FP8 layer inside ``model.load_weights``, as soon as the layer's last
weight arrives, so the selector's factors must come from full-precision copies taken right
before that. The tiny TokenPrune Qwen2.5-VL is built twice by vLLM's own loader from the same
checkpoint, in bfloat16: unquantized, and with ``--quantization fp8_per_channel`` (the online
FP8 format vLLM's CPU build can run: its per-tensor/per-block paths need kernels the CPU build
lacks; all three go through the same ``process_weights_after_loading`` of the layer). The
quantized model's factors must equal the unquantized model's, its q/k weights must really be
FP8, and a routed layer must run on its FP8 projections.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests._inproc import Built, vllm_inproc  # noqa: F401
from vllm_tokenprune.alvts.model import AlvtsRuntime, RoutedItem, Step, _routed_tail

#: Builds models through vLLM's loader in the test process, as tests/conftest.py's SLOW_FILES
#: (docs/testing.md, "The fast loop").
pytestmark = pytest.mark.slow

TOKEN_PRUNE = {"method": "alvts", "prune_ratio": 0.5, "options": {"alvts": {"first_layer": 0}}}
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "max_num_batched_tokens": 2048,
          "disable_chunked_mm_input": True,
          "scheduler_cls": "vllm_tokenprune.alvts.scheduler.WholeMediaScheduler"}


@pytest.fixture(scope="module")
def models(vllm_inproc: Any) -> tuple[Built, Built]:  # noqa: F811
    """(unquantized, online FP8) TokenPrune Qwen2.5-VL models of one checkpoint."""
    plain = vllm_inproc("qwen2_5_vl", TOKEN_PRUNE, **ENGINE)
    fp8 = vllm_inproc("qwen2_5_vl", TOKEN_PRUNE, quantization="fp8_per_channel", **ENGINE)
    return plain, fp8


def _runtime(built: Built) -> AlvtsRuntime:
    runtime = built.model._tp_alvts
    assert runtime is not None and runtime.router is not None
    return runtime


def _layers(built: Built) -> Any:
    return built.model._tp_alvts_layers()


def test_online_fp8_factors_come_from_the_full_precision_weights(models: tuple[Built, Built],
                                                                 ) -> None:
    """Factors of the FP8 model == those of the unquantized one (same checkpoint, same
    dtype), while its q/k weights are FP8 (vLLM did quantize them), and the full-precision
    copies are dropped once the factors are built."""
    from vllm.model_executor.layers.quantization.online.fp8 import Fp8PtpcOnlineLinearMethod
    from vllm.platforms import current_platform

    plain, fp8 = models
    want, got = _runtime(plain), _runtime(fp8)
    assert got.online_quantized == {0, 1} and not want.online_quantized
    assert got.full_precision == {}
    for layer in _layers(fp8):
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv.quant_method, Fp8PtpcOnlineLinearMethod)
        assert qkv.weight.dtype == current_platform.fp8_dtype()
    for layer in _layers(plain):
        assert layer.self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert list(got.router.factors) == list(want.router.factors) == [0, 1]
    for i, f in got.router.factors.items():
        w = want.router.factors[i]
        assert (f.num_heads, f.rank, f.eps) == (w.num_heads, w.rank, w.eps)
        assert f.query.dtype == torch.bfloat16
        assert torch.equal(f.query, w.query) and torch.equal(f.key, w.key), i
        assert (f.query_bias is None) == (w.query_bias is None)
        if f.query_bias is not None:
            assert torch.equal(f.query_bias, w.query_bias)


def test_online_fp8_routes_as_the_unquantized_model(models: tuple[Built, Built]) -> None:
    """The same routing decisions on the same hidden states, and a routed layer of the FP8
    model runs on its FP8 projections: its query/key projection is vLLM's FP8 GEMM (close to
    the bfloat16 one), and its routed tail (FP8 MLP) runs the rows that go through and passes
    the skipped rows' stream through."""
    plain, fp8 = models
    torch.manual_seed(0)
    layers = _layers(fp8)
    hidden = torch.randn(40, layers[0].self_attn.qkv_proj.input_size, dtype=torch.bfloat16)
    keep = 12
    want_state, got_state = _runtime(plain).router.new_state(), _runtime(fp8).router.new_state()
    for i in (0, 1):
        want = _runtime(plain).router.route_split(i, hidden, keep, want_state)
        got = _runtime(fp8).router.route_split(i, hidden, keep, got_state)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), i

    layer, plain_layer = layers[0], _layers(plain)[0]
    x = layer.input_layernorm(hidden)
    q_fp8, _ = fp8.run(layer.self_attn.qkv_proj, x)
    q_bf16, _ = plain.run(plain_layer.self_attn.qkv_proj, x)
    assert q_fp8.shape == q_bf16.shape and not torch.equal(q_fp8, q_bf16)
    assert torch.allclose(q_fp8.float(), q_bf16.float(), rtol=0.1, atol=0.1)

    runtime = _runtime(fp8)
    rows = torch.arange(4, 36)  # one item of 32 scored rows; 8 rows of text around it
    attn_out = torch.randn_like(hidden)
    runtime.step = Step([RoutedItem(rows, keep)], hidden.shape[0])
    try:
        out, stream = fp8.run(_routed_tail, layer, attn_out.clone(), hidden.clone())
        _, skip = runtime.router.route_split(0, hidden[rows], keep, runtime.router.new_state())
    finally:
        runtime.step = None
    skipped = rows[skip]
    through = torch.tensor([r for r in range(hidden.shape[0]) if r not in set(skipped.tolist())])
    assert skipped.numel() == 32 - keep
    assert torch.equal(stream[skipped], hidden[skipped]) and not out[skipped].any()
    normed, summed = plain.run(layer.post_attention_layernorm, attn_out[through],
                               hidden[through].clone())
    assert torch.equal(stream[through], summed)
    assert torch.allclose(out[through].float(), fp8.run(layer.mlp, normed).float(),
                          rtol=0.02, atol=0.02)


def test_dummy_weights_build_the_factors_in_the_model_hook(vllm_inproc: Any) -> None:  # noqa: F811
    """vLLM's dummy loader never calls ``model.load_weights``: online FP8 still copies each
    layer's weights before quantizing them, and the model-level ``process_weights_after_loading``
    hook builds the factors from the copies (then drops them)."""
    built = vllm_inproc("qwen2_5_vl", TOKEN_PRUNE, quantization="fp8_per_channel",
                        load_format="dummy", **ENGINE)
    runtime = _runtime(built)
    assert list(runtime.router.factors) == [0, 1] and runtime.full_precision == {}
    assert all(f.query.dtype == torch.bfloat16 for f in runtime.router.factors.values())


def test_a_layer_quantized_otherwise_is_refused() -> None:
    """The guard on the model itself (behind the server check): a routed layer's qkv_proj
    quantized by anything but online FP8 stops the model build, naming the flags."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.fp8 import Fp8LinearMethod

    from vllm_tokenprune.alvts.quant import check_layer_quantization

    assert not check_layer_quantization(
        SimpleNamespace(quant_method=UnquantizedLinearMethod()), 3)
    offline = Fp8LinearMethod.__new__(Fp8LinearMethod)  # a pre-quantized FP8 checkpoint's
    with pytest.raises(ValueError, match="decoder layer 3's qkv_proj is quantized by "
                       "Fp8LinearMethod.*--quantization fp8_per_tensor"):
        check_layer_quantization(SimpleNamespace(quant_method=offline), 3)

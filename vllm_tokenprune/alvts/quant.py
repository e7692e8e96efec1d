"""ALVTS under quantization: which quantized servers it serves, and the full-precision query/key
weights its factors are built from (runs where the model is built: the worker; the check also
runs there, from the model's set-up).

The selector's factors come from the query/key weights (:func:`.model.shard_factors`). vLLM's
online FP8 (``--quantization fp8_per_tensor``, ``fp8_per_block``, ``fp8_per_channel``, or the
deprecated ``fp8``, on an unquantized checkpoint) loads each linear layer's weights in full
precision and quantizes the layer as soon as its last weight arrives, *inside*
``model.load_weights`` (vLLM's layer-wise online processing), so at the end of
``load_weights`` the fused ``qkv_proj`` weight is already FP8. Each routed layer's
``qkv_proj`` quantization method therefore gets :func:`capture_before_quantization`: right
before vLLM quantizes the layer, its query/key rows (and query bias) are copied, and the
factors are built from those copies once every weight (the input norm's too) is loaded; the
copies are then dropped. Any other quantization (a pre-quantized checkpoint, whose
``config.json`` carries a ``quantization_config``, or another ``--quantization`` method) is
refused, naming the flag: its query/key weights never exist in full precision here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: vLLM's online FP8 formats (``--quantization`` values, or ``--quantization online`` with a
#: ``--quantization-config`` naming them); the deprecated ``--quantization fp8`` on an
#: unquantized checkpoint is ``fp8_per_tensor``.
ONLINE_FP8 = ("fp8_per_tensor", "fp8_per_block", "fp8_per_channel")
_SERVED = ("--quantization fp8_per_tensor, fp8_per_block or fp8_per_channel (online FP8) on an "
           "unquantized checkpoint is served")


def quantization_refusal(vllm_config: Any) -> str | None:
    """Why this server's quantization cannot be served with ``alvts`` (None: unquantized, or
    vLLM's online FP8 of an unquantized checkpoint)."""
    quant = getattr(vllm_config.model_config, "quantization", None)
    quant_config = getattr(vllm_config, "quant_config", None)
    if quant is None and quant_config is None:
        return None
    if _is_online(quant_config) and _fp8_only(quant_config.args):
        return None
    return (f"builds its selector from the full-precision query/key weights, and this server is "
            f"quantized ({quant or 'a quantization config'}: set by --quantization or by the "
            f"checkpoint's quantization_config in config.json) in a way that never holds them; "
            f"{_SERVED}: serve an unquantized checkpoint, without --quantization or with online "
            f"FP8")


def _is_online(quant_config: Any) -> bool:
    """vLLM's online quantization of a full-precision checkpoint (a pre-quantized checkpoint,
    even with online quantization composed on top, is its own config class)."""
    from vllm.model_executor.layers.quantization.online.base import OnlineQuantizationConfig

    return isinstance(quant_config, OnlineQuantizationConfig)


def _fp8_only(args: Any) -> bool:
    """Every linear layer the online config quantizes is quantized to vLLM's online FP8 (a
    ``--quantization-config`` may name other formats; ``linear`` None: MoE-only formats,
    which leave the decoder's linear layers unquantized)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        kFp8Static128BlockSym,
        kFp8StaticChannelSym,
        kFp8StaticTensorSym,
    )

    if args.targets is not None:
        return all(v in ONLINE_FP8 for v in args.targets.values())
    spec = args.linear
    return spec is None or spec.weight in (None, kFp8StaticTensorSym, kFp8Static128BlockSym,
                                           kFp8StaticChannelSym)


def check_layer_quantization(qkv_proj: Any, layer: int) -> bool:
    """Whether the routed layer's ``qkv_proj`` is quantized online (True: capture its weights
    before quantization) or not at all (False); raises for anything else (the server check
    refuses those before the model is built; this is the guard on the layer itself)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.online.fp8 import (
        Fp8PerBlockOnlineLinearMethod,
        Fp8PerTensorOnlineLinearMethod,
        Fp8PtpcOnlineLinearMethod,
    )

    method = getattr(qkv_proj, "quant_method", None)
    if isinstance(method, UnquantizedLinearMethod):
        return False
    online = (Fp8PerTensorOnlineLinearMethod, Fp8PerBlockOnlineLinearMethod,
              Fp8PtpcOnlineLinearMethod)
    if isinstance(method, online) and getattr(method, "requantization_source", None) is None:
        return True
    raise ValueError(
        f"vllm-tokenprune: token_prune enables 'alvts', which builds its selector from the "
        f"full-precision query/key weights, and decoder layer {layer}'s qkv_proj is quantized "
        f"by {type(method).__name__}; {_SERVED}; or remove 'alvts' from token_prune "
        f"(docs/alvts.md).")


def capture_before_quantization(attn: Any, layer: int, store: dict[int, tuple[Tensor, ...]],
                                ) -> None:
    """Make ``attn.qkv_proj``'s quantization method copy the layer's full-precision query
    rows, key rows and query bias into ``store[layer]`` right before it quantizes them (vLLM
    calls ``process_weights_after_loading(layer)`` once the layer's weights are loaded, from
    the weight loader, the dummy loader or the loader's final pass)."""
    qkv = attn.qkv_proj
    method = qkv.quant_method
    quantize = method.process_weights_after_loading

    @torch.no_grad()
    def process_weights_after_loading(module: Any) -> None:
        weight = module.weight
        if (module is qkv and weight.device.type != "meta" and weight.is_floating_point()
                and weight.element_size() > 1):
            q, k = attn.q_size, attn.kv_size
            bias = getattr(module, "bias", None)
            store[layer] = (weight[:q].clone(), weight[q:q + k].clone(),
                            *(() if bias is None else (bias[:q].clone(),)))
        quantize(module)

    method.process_weights_after_loading = process_weights_after_loading

"""ALVTS under vLLM's compilation and CUDA graphs (runs in the worker; :func:`check_compilation`
and :func:`configure_compilation` also where the model is built).

The routed part of a routed decoder layer (the selector on the stream entering the layer, the
post-attention norm and the MLP on the rows that go through, the skipped rows' stream passed
through) depends on the step's items, which vLLM's compiled graph and CUDA graphs cannot see.
So it is one registered custom op, ``tokenprune::alvts_layer_tail`` (:data:`SPLITTING_OP`):

* torch.compile (Dynamo, Inductor) treats it as opaque: its fake implementation only declares
  that it updates its two inputs in place, and at run time the real one reads the step;
* under piecewise compilation (``VLLM_COMPILE``) it is one of vLLM's ``splitting_ops``
  (:func:`configure_compilation`), so piecewise CUDA graphs capture the pieces between the op
  calls and the op itself runs eagerly at every replay, like vLLM's attention op. It writes its
  results into its inputs (the previous piece's outputs), so the next piece reads them at the
  addresses it was captured with;
* a step without routed items (every decode step: decode steps never route) runs the plain
  computation, so a FULL CUDA graph captured for uniform decode batches, where the step has no
  items, is exact for every decode batch it replays. Configurations that would replay a
  captured graph on a batch with a prefill are refused (:func:`check_compilation`).

The op finds its layer by name (a deterministic string: the layer's attention prefix, so a
compiled graph read back from vLLM's compile cache names the same layer) in :data:`_LAYERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vllm_tokenprune._vllm_internals import _uses_v2_runner

NAMESPACE = "tokenprune"
OP = "alvts_layer_tail"
#: The op's name in vLLM's ``CompilationConfig.splitting_ops`` format.
SPLITTING_OP = f"{NAMESPACE}::{OP}"
#: Routed layers by op name (:func:`register_layer`): each has ``_tp_alvts_tail(hidden_states,
#: residual) -> (hidden_states, residual)``.
_LAYERS: dict[str, Any] = {}
_LIBRARY: Any = None


def layer_op_name(layer: Any) -> str:
    """The op's name for a routed decoder layer: its attention layer's prefix."""
    return f"{layer.self_attn.attn.layer_name}.alvts"


def register_layer(layer: Any) -> str:
    """Register a routed layer for the op (and the op itself, once); returns its op name."""
    register_op()
    name = layer_op_name(layer)
    _LAYERS[name] = layer
    return name


def _layer_tail(hidden_states: Tensor, residual: Tensor, layer_name: str) -> None:
    """The op: the layer's routed tail, written into its inputs (``hidden_states`` in: the
    attention output, out: the layer's output; ``residual`` in: the stream entering the layer,
    out: the stream part of the layer's output)."""
    out, stream = _LAYERS[layer_name]._tp_alvts_tail(hidden_states, residual)
    if out.data_ptr() != hidden_states.data_ptr():
        hidden_states.copy_(out)
    if stream.data_ptr() != residual.data_ptr():
        residual.copy_(stream)


def _layer_tail_fake(hidden_states: Tensor, residual: Tensor, layer_name: str) -> None:
    """Shapes for torch.compile: both inputs keep theirs (updated in place)."""
    return None


def register_op() -> None:
    """Register ``tokenprune::alvts_layer_tail`` with vLLM's helper (once per process)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    library = Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901 - the op's lifetime is the process
    direct_register_custom_op(OP, _layer_tail, mutates_args=["hidden_states", "residual"],
                              fake_impl=_layer_tail_fake, target_lib=library)
    _LIBRARY = library


def layer_tail_op() -> Callable[..., None]:
    """The registered op (``torch.ops.tokenprune.alvts_layer_tail``)."""
    register_op()
    return getattr(getattr(torch.ops, NAMESPACE), OP)


def check_compilation(vllm_config: Any, refuse: Callable[[str], None]) -> None:
    """Refuse, naming the flag, a CUDA-graph setting that would replay a captured graph on a
    step with routed items (its routing would be the capture's, i.e. none)."""
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode or CUDAGraphMode.NONE
    if mode.mixed_mode() == CUDAGraphMode.FULL:
        refuse("routes a prefill's rows by request data, and cudagraph_mode "
               f"{mode.name} replays FULL CUDA graphs on batches with prefills: start the "
               "server with vLLM's default -cc.cudagraph_mode=FULL_AND_PIECEWISE (or "
               "PIECEWISE, FULL_DECODE_ONLY, NONE)")
    if mode.decode_mode() == CUDAGraphMode.FULL and not _uses_v2_runner(vllm_config) and \
            getattr(vllm_config, "speculative_config", None) is not None:
        # Model Runner V2 replays a decode graph only where no request is prefilling (but
        # for a one-token prefill extension: a one-token item, nothing to skip).
        refuse("routes a prefill's rows by request data, and with speculative decoding vLLM's "
               "V1 runner replays a FULL decode CUDA graph on any batch of 1 + "
               "num_speculative_tokens tokens per request, a short prefill chunk holding a "
               "whole image included: start the server without --speculative-config, with "
               "-cc.cudagraph_mode=PIECEWISE (or NONE), or with Model Runner V2")
    if mode.mixed_mode() == CUDAGraphMode.PIECEWISE and _breakable_cudagraphs():
        refuse("runs its routing op eagerly between piecewise CUDA graphs, and vLLM's "
               "breakable CUDA graphs break only at vLLM's own ops: start the server without "
               "VLLM_USE_BREAKABLE_CUDAGRAPH=1")


def _breakable_cudagraphs() -> bool:
    """vLLM 0.33's opt-in breakable piecewise CUDA graphs (absent in 0.32)."""
    import vllm.envs as envs

    try:
        return bool(envs.VLLM_USE_BREAKABLE_CUDAGRAPH)
    except AttributeError:
        return False


def configure_compilation(vllm_config: Any) -> None:
    """Under piecewise compilation (``VLLM_COMPILE`` with splitting ops, vLLM's default on
    GPUs), add :data:`SPLITTING_OP` to ``compilation_config.splitting_ops`` so the op runs
    eagerly between the captured pieces. Runs before the model is built, hence before vLLM's
    compilation backend reads the list (at the first forward). Other modes need nothing: the
    CPU build's whole-graph compile (``DYNAMO_TRACE_ONCE``) and compiled graphs without pieces
    call the opaque op at every run, and no CUDA graph there holds a prefill (refused
    otherwise, :func:`check_compilation`)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.VLLM_COMPILE:
        return
    ops = compilation.splitting_ops
    mode = compilation.cudagraph_mode or CUDAGraphMode.NONE
    if not ops and mode.mixed_mode() != CUDAGraphMode.PIECEWISE:
        return  # splitting explicitly off (one graph): the op stays opaque inside it
    if SPLITTING_OP not in (ops or []):
        compilation.splitting_ops = [*(ops or []), SPLITTING_OP]

"""The plugin's worker-side paths run in-process as vLLM's GPU runners run them, on the emulated
device of :mod:`.gpu_emulation` (tests and benchmarks; not used by the plugin).

:func:`build_worker` builds a TokenPrune model class from a tiny checkpoint with vLLM's own
loader (``EngineArgs`` -> ``VllmConfig``, ``set_current_vllm_config``, ``get_model``, one
process with a gloo group, as vLLM's own tests do) and moves it to the emulated ``cuda:0``.
Two CPU-build-only paths are replaced by what vLLM runs on a GPU: linear layers use
``F.linear`` on their weights (the CPU build packs them for oneDNN), and attention, which here
runs without a KV cache or attention metadata, is plain causal attention over the step.

:func:`make_request` runs vLLM's multimodal processor (the plugin's processor mixin included)
on real media with the request's pruning fields. :func:`run_step` then runs one prefill step
over the given requests, every prompt whole, with the tensors where the runner named puts them:

* ``"v2"`` (Model Runner V2, the GPU default): vLLM's ``EncoderRunner`` (``prepare_mm_inputs``,
  ``execute_mm_encoder``, ``gather_mm_embeddings``: a pinned-host ``is_mm_embed``,
  ``get_inputs_embeds``), ``EncoderCache`` and ``MultiModalPruner`` with device token ids and
  device prefill positions (``RopeState``'s buffers, UVA on a GPU, are device tensors here);
* ``"v1"``: ``group_and_batch_mm_kwargs`` onto the device and ``embed_multimodal`` (as
  ``GPUModelRunner._execute_mm_encoder``), then ``GPUModelRunner._gather_mm_embeddings``
  itself (host ``is_mm_embed``, ``recompute_mrope_positions`` with the prompt as a list and
  host int64 positions), ``embed_input_ids`` with device token ids;

then the language model's forward on the device (the routed decoder layers for ``alvts``).
Per-item fields declared ``keep_on_cpu`` (the params rows, text ids, Qwen's grids) stay on the
host, as vLLM's field configs say. Syncs are labelled by phase: ``encoder``, ``recompute``,
``embed_input_ids``, ``forward``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from vllm_tokenprune.testing.gpu_emulation import CUDA, GpuEmulation, emulate_module

#: family -> (architecture, tiny_model builder name)
FAMILIES: dict[str, tuple[str, str]] = {
    "qwen2_vl": ("TokenPruneQwen2VLForConditionalGeneration", "build_qwen2_vl"),
    "qwen2_5_vl": ("TokenPruneQwen2_5_VLForConditionalGeneration", "build_qwen2_5_vl"),
    "qwen3_vl": ("TokenPruneQwen3VLForConditionalGeneration", "build_qwen3_vl"),
    "llava": ("TokenPruneLlavaForConditionalGeneration", "build_llava"),
    "llava_next": ("TokenPruneLlavaNextForConditionalGeneration", "build_llava_next"),
}
#: Families whose language model ``alvts`` routes.
ALVTS_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next")
#: Server flags ``alvts`` requires (alvts/model.py ``check_alvts_server``).
ALVTS_ENGINE_ARGS: dict[str, Any] = {
    "disable_chunked_mm_input": True,
    "scheduler_cls": "vllm_tokenprune.alvts.scheduler.WholeMediaScheduler",
}


def build_checkpoint(family: str, outdir: str | os.PathLike[str], **kwargs: Any) -> str:
    """A tiny random checkpoint of ``family`` (:mod:`.tiny_model`)."""
    from vllm_tokenprune.testing import tiny_model

    return str(getattr(tiny_model, FAMILIES[family][1])(outdir, **kwargs))


# --------------------------------------------------------------------------- process set-up

_initialised = False


def _load_plugins() -> None:
    os.environ.setdefault("VLLM_PLUGINS", "tokenprune")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    _set_torch_accelerator_to_noop()
    load_general_plugins()


def _init_process() -> None:
    """Once per process (inside ``set_current_vllm_config``): a one-rank gloo group."""
    global _initialised
    if _initialised:
        return
    from vllm.distributed import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    ensure_model_parallel_initialized(1, 1)
    _initialised = True


@contextlib.contextmanager
def _gpu_linear() -> Iterator[None]:
    """Linear layers keep their weights and run ``F.linear``, as on a GPU (the CPU build
    replaces them with packed oneDNN / SGL kernels holding host weights)."""
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def gpu_like(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    layer_utils.dispatch_cpu_unquantized_gemm = gpu_like
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


def _causal_attention(impl: Any) -> None:
    """Without attention metadata (no KV cache here) the CPU backend writes nothing; run plain
    causal attention over the step's tokens instead (one sequence)."""
    original = impl.forward

    def forward(layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: Any, attn_metadata: Any, output: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if attn_metadata is not None or output is None:
            return original(layer, query, key, value, kv_cache, attn_metadata, output=output,
                            **kwargs)
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # (heads, T, d)
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=getattr(impl, "scale", None))
        output.copy_(out.transpose(0, 1).reshape(output.shape))
        return output

    impl.forward = forward


# --------------------------------------------------------------------------- the worker


@dataclass
class Worker:
    """A TokenPrune model on the emulated device, its config and processor."""

    family: str
    vllm_config: Any
    model: Any
    processor: Any
    #: ``cuda:0`` (emulated) or ``cpu`` (``build_worker(emulate=False)``: the same paths on
    #: the host, for comparisons)
    device: torch.device = CUDA

    @property
    def hidden_size(self) -> int:
        return int(self.vllm_config.model_config.get_inputs_embeds_size())


@contextlib.contextmanager
def _private_rope_cache() -> Iterator[None]:
    """vLLM shares rotary-embedding modules between models through a process-wide cache
    (``get_rope``'s ``_ROPE_DICT``); moving an emulated model to ``cuda`` would move the shared
    module too and break every later host model in the process (a test-order failure: a
    later in-process build found its ``cos_sin_cache`` on ``cuda``). Build with a private
    cache and put the process's back afterwards."""
    from vllm.model_executor.layers import rotary_embedding

    shared = dict(rotary_embedding._ROPE_DICT)
    rotary_embedding._ROPE_DICT.clear()
    try:
        yield
    finally:
        rotary_embedding._ROPE_DICT.clear()
        rotary_embedding._ROPE_DICT.update(shared)


def build_worker(family: str, model_dir: str, token_prune: Mapping[str, Any] | None = None,
                 *, emulate: bool = True, **engine_args: Any) -> Worker:
    """Build ``family``'s TokenPrune model from ``model_dir`` with vLLM's loader (host) and
    move it to the emulated device (``emulate=False``: leave it on the host). ``token_prune``:
    the ``token_prune`` block; ``engine_args``: extra ``EngineArgs`` (``alvts`` in the block
    adds what it requires)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.model_loader import get_model
    from vllm.multimodal import MULTIMODAL_REGISTRY

    _load_plugins()
    block = dict(token_prune or {})
    overrides: dict[str, Any] = {"architectures": [FAMILIES[family][0]]}
    if block:
        overrides["token_prune"] = block
    allowed = block.get("allowed_methods") or []
    if "alvts" in (block.get("method"), *allowed):
        engine_args = {**ALVTS_ENGINE_ARGS, **engine_args}
    args = {"enforce_eager": True, "dtype": "float32", "max_model_len": 4096,
            "max_num_seqs": 16, "max_num_batched_tokens": 4096, "seed": 0, **engine_args}
    cfg = EngineArgs(model=model_dir, hf_overrides=overrides, **args).create_engine_config()
    with set_current_vllm_config(cfg), _gpu_linear(), _private_rope_cache():
        _init_process()
        model = get_model(vllm_config=cfg)
    if emulate:
        emulate_module(model)
        # where a GPU runner's model stages pixels (its vllm_config.device_config.device)
        model._tp_stage_device = CUDA
    for module in model.modules():
        if isinstance(module, Attention):
            _causal_attention(module.impl)
    if emulate and getattr(model, "_tp_alvts", None) is not None:
        with GpuEmulation():  # the factors, from the weights on the device (as on a GPU)
            model._tp_alvts_build()
    processor = MULTIMODAL_REGISTRY.create_processor(cfg.model_config)
    return Worker(family, cfg, model, processor, CUDA if emulate else torch.device("cpu"))


# --------------------------------------------------------------------------- requests


@dataclass
class Request:
    """A processed request: its prompt and media features (vLLM's ``MultiModalFeatureSpec``)."""

    req_id: str
    prompt_ids: list[int]
    features: list[Any]
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def video_input(frames: np.ndarray, fps: float = 2.0) -> tuple[np.ndarray, dict[str, Any]]:
    """A decoded video as vLLM's OpenCV loader hands it to the processor."""
    n = len(frames)
    return frames, {"total_num_frames": n, "fps": fps, "duration": n / fps,
                    "frames_indices": list(range(n)), "video_backend": "opencv",
                    "do_sample_frames": False}


def make_request(worker: Worker, req_id: str, media: Mapping[str, Sequence[Any]],
                 text: str = "Describe this.", **prune_fields: Any) -> Request:
    """Process a chat prompt with ``media`` (``{"image": [PIL...], "video": [video_input]}``)
    and the request's pruning fields (``prune_ratio``, ``prune_method``...)."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec

    proc = worker.processor
    content: list[dict[str, Any]] = [{"type": modality} for modality, items in media.items()
                                     for _ in items]
    content.append({"type": "text", "text": text})
    tok = proc.info.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                     add_generation_prompt=True)
    out = proc(prompt, proc.info.parse_mm_data(dict(media)),
               hf_processor_mm_kwargs=dict(prune_fields))
    features = []
    for modality, items in out["mm_kwargs"].items():
        for i, item in enumerate(items):
            features.append(MultiModalFeatureSpec(
                data=item, modality=modality, identifier=f"{req_id}-{modality}-{i}",
                mm_position=out["mm_placeholders"][modality][i]))
    features.sort(key=lambda f: f.mm_position.offset)
    req = Request(req_id, list(out["prompt_token_ids"]), features)
    if worker.vllm_config.model_config.uses_mrope:
        req.mrope_positions, req.mrope_delta = worker.model.get_mrope_input_positions(
            req.prompt_ids, features)
    return req


# --------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    """What one prefill step produced (device tensors) and the positions it used."""

    inputs_embeds: torch.Tensor
    hidden_states: torch.Tensor | None
    positions: torch.Tensor
    num_mm_rows: int


def run_step(worker: Worker, requests: Sequence[Request], emu: GpuEmulation,
             runner: str = "v2", forward: bool = True) -> StepResult:
    """One prefill step carrying every request's whole prompt (see the module docstring)."""
    from vllm.config import set_current_vllm_config

    if runner not in ("v1", "v2"):
        raise ValueError(f"runner must be 'v1' or 'v2', got {runner!r}")
    with set_current_vllm_config(worker.vllm_config), torch.inference_mode():
        if runner == "v2":
            embeds, positions, rows = _step_v2(worker, requests, emu)
        else:
            embeds, positions, rows = _step_v1(worker, requests, emu)
        hidden = None
        if forward:
            hidden = _forward(worker, embeds, positions, emu)
    return StepResult(embeds, hidden, positions, rows)


def _input_ids(requests: Sequence[Request], device: torch.device) -> torch.Tensor:
    ids = [t for r in requests for t in r.prompt_ids]
    return torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)


def _step_v2(worker: Worker, requests: Sequence[Request], emu: GpuEmulation
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.model_states.mm_pruning import maybe_create_mm_pruner

    cfg = worker.vllm_config
    dev = worker.device
    cache = EncoderCache()
    for r in requests:
        cache.add_request(r.req_id, r.features)
    lens = np.array([len(r.prompt_ids) for r in requests], dtype=np.int32)
    total = int(lens.sum())
    runner = EncoderRunner(worker.model, max_num_tokens=total, hidden_size=worker.hidden_size,
                           encoder_cache=cache, dtype=cfg.model_config.dtype, device=dev)
    hashes, mm_kwargs = runner.prepare_mm_inputs(
        {r.req_id: list(range(len(r.features))) for r in requests})
    with emu.phase("encoder"):
        outputs = runner.execute_mm_encoder(mm_kwargs) if mm_kwargs else []
    cache.encoder_outputs.update(zip(hashes, outputs, strict=True))
    zeros = np.zeros(len(requests), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    mm_embeds, is_mm_embed = runner.gather_mm_embeddings(
        [r.req_id for r in requests], total, lens, starts, lens, zeros)
    rope = _RopeState(len(requests), int(lens.max()), dev) if cfg.model_config.uses_mrope \
        else None
    if rope is not None:
        for i, r in enumerate(requests):
            rope.init_prefill_positions(i, worker.model, r.prompt_ids, r.features)
    pruner = maybe_create_mm_pruner(cfg.model_config, worker.model, rope, cache)
    if pruner is not None and mm_embeds:
        token_ids = torch.zeros(len(requests), int(lens.max()), dtype=torch.int32)
        for i, r in enumerate(requests):
            token_ids[i, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids, dtype=torch.int32)
        batch = SimpleNamespace(
            req_ids=[r.req_id for r in requests], idx_mapping_np=np.arange(len(requests)),
            prefill_len_np=lens, num_computed_prefill_tokens_np=zeros,
            num_scheduled_tokens=lens)
        states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=token_ids.to(dev)))
        with emu.phase("recompute"):
            mm_embeds = pruner.recompute(mm_embeds, batch, states)
    with emu.phase("embed_input_ids"):
        embeds = runner.get_inputs_embeds(_input_ids(requests, dev), mm_embeds, is_mm_embed)[:total]
    if rope is not None:
        positions = torch.cat([rope.read_prefill_positions(i, int(n)).long()
                               for i, n in enumerate(lens)], dim=1)
    else:
        positions = torch.cat([torch.arange(int(n), device=dev) for n in lens])
    return embeds, positions, sum(int(e.shape[0]) for e in mm_embeds)


class _RopeState:
    """vLLM's ``RopeState`` with its buffers on the emulated device (``prefill_positions`` is
    a UVA tensor on a GPU: device-addressable) and its own init/read/update methods."""

    def __new__(cls, num_reqs: int, max_len: int, device: torch.device) -> Any:
        from vllm.v1.worker.gpu.mm.rope import RopeState

        state = RopeState.__new__(RopeState)
        state.num_dims = 3
        buf = torch.zeros(num_reqs * 3, max_len, dtype=torch.int32, device=device)

        def stage_write(row: int, col: int, values: list[int]) -> None:
            buf[row, col:col + len(values)] = torch.tensor(values, dtype=torch.int32,
                                                           device=device)

        state.prefill_positions = SimpleNamespace(gpu=buf, stage_write=stage_write)
        state.prefill_delta = SimpleNamespace(np=np.zeros(num_reqs, dtype=np.int32))
        return state


def _step_v1(worker: Worker, requests: Sequence[Request], emu: GpuEmulation
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    from vllm.multimodal.utils import group_and_batch_mm_kwargs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    model = worker.model
    cfg = worker.vllm_config
    dev = worker.device
    items = [(f.modality, f.data) for r in requests for f in r.features]
    outputs: list[torch.Tensor] = []
    with emu.phase("encoder"):
        for _, num_items, batch in group_and_batch_mm_kwargs(items, device=dev):
            out = model.embed_multimodal(**batch)
            sanity_check_mm_encoder_outputs(out, expected_num_items=num_items)
            outputs.extend(out)
    cache = {f.identifier: o for f, o in zip(
        [f for r in requests for f in r.features], outputs, strict=True)}
    states = {r.req_id: SimpleNamespace(
        num_computed_tokens=0, mm_features=r.features, prompt_token_ids=r.prompt_ids,
        mrope_positions=None if r.mrope_positions is None else r.mrope_positions.clone(),
        mrope_position_delta=r.mrope_delta) for r in requests}
    mm_config = cfg.model_config.multimodal_config
    fake_runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=[r.req_id for r in requests]), requests=states,
        _get_encoder_output_from_cache=cache.get,
        is_multimodal_pruning_enabled=bool(mm_config and
                                           mm_config.is_multimodal_pruning_enabled()),
        uses_mrope=cfg.model_config.uses_mrope, model=model,
        _calc_mrope_positions=lambda scheduler_output: None,
        mrope_positions=SimpleNamespace(copy_to_gpu=lambda n: None))
    total = sum(len(r.prompt_ids) for r in requests)
    sched = SimpleNamespace(total_num_scheduled_tokens=total,
                            num_scheduled_tokens={r.req_id: len(r.prompt_ids) for r in requests})
    with emu.phase("recompute"):
        mm_embeds, is_mm_embed = GPUModelRunner._gather_mm_embeddings(fake_runner, sched)
    with emu.phase("embed_input_ids"):
        embeds = model.embed_input_ids(_input_ids(requests, dev), multimodal_embeddings=mm_embeds,
                                       is_multimodal=is_mm_embed)
    if cfg.model_config.uses_mrope:
        positions = torch.cat([states[r.req_id].mrope_positions for r in requests],
                              dim=1).to(dev)
    else:
        positions = torch.cat([torch.arange(len(r.prompt_ids), device=dev) for r in requests])
    return embeds, positions, sum(int(e.shape[0]) for e in mm_embeds)


def _forward(worker: Worker, embeds: torch.Tensor, positions: torch.Tensor,
             emu: GpuEmulation) -> torch.Tensor:
    from vllm.forward_context import set_forward_context

    with set_forward_context(None, worker.vllm_config, num_tokens=int(embeds.shape[0])), \
            emu.phase("forward"):
        return worker.model(input_ids=None, positions=positions, intermediate_tensors=None,
                            inputs_embeds=embeds)

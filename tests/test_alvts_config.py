"""ALVTS configuration, wire format and start-up refusals (no server)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vllm_tokenprune.alvts.model import AlvtsModelMixin, check_alvts_server
from vllm_tokenprune.alvts.scheduler import (
    WholeMediaAsyncScheduler,
    WholeMediaScheduler,
    whole_media_tokens,
)
from vllm_tokenprune.config import RequestFieldError, parse_config, parse_request_fields
from vllm_tokenprune.models.wire import METHOD_IDS, METHODS_BY_ID, decode_route, encode_route
from vllm_tokenprune.scoring import list_methods, wire_id


def test_alvts_is_enabled_only_when_named() -> None:
    assert not parse_config({}).alvts_enabled  # allowed_methods None: input-side methods only
    assert parse_config({}).is_allowed("random")
    assert parse_config({"method": "alvts"}).alvts_enabled
    cfg = parse_config({"method": "lrcp", "allowed_methods": ["lrcp", "alvts"]})
    assert cfg.alvts_enabled and not cfg.is_allowed("random")


def test_request_for_alvts_where_not_enabled_names_the_field() -> None:
    with pytest.raises(RequestFieldError, match="not enabled on this server") as e:
        parse_request_fields({"prune_method": "alvts"}, parse_config({}))
    assert e.value.field == "prune_method"
    got = parse_request_fields({"prune_method": "alvts", "prune_ratio": 0.5},
                               parse_config({"method": "alvts"}))
    assert got == {"prune_method": "alvts", "prune_ratio": 0.5}


@pytest.mark.parametrize("options,message", [
    ({"rank": 0}, "option 'rank' of method 'alvts' must be >= 1"),
    ({"queries": 0}, "option 'queries' of method 'alvts' must be >= 1"),
    ({"consistency": 1.0}, "option 'consistency' of method 'alvts'"),
    ({"first_layer": -1}, "option 'first_layer' of method 'alvts'"),
    ({"layers": 3}, "unknown option(s) 'layers' for method 'alvts'"),
])
def test_alvts_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"token_prune\.options\.alvts") as e:
        parse_config({"method": "alvts", "options": {"alvts": options}})
    assert message in str(e.value)


def test_method_ids_are_the_registry_ids_of_every_stage() -> None:
    """Each method's wire id is a hash of its name (the same in every process whatever else is
    installed, tests/test_method_plugins.py), input-side and layer-stage alike."""
    names = [*list_methods(), "alvts"]
    assert list(METHOD_IDS) == names
    assert {METHOD_IDS[m] for m in names} == {wire_id(m) for m in names}
    assert len(set(METHOD_IDS.values())) == len(names)
    assert all(METHODS_BY_ID[METHOD_IDS[m]] == m for m in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_route_channels_round_trip_exactly(dtype: torch.dtype) -> None:
    roles = torch.tensor([1] * 5000 + [2] * 3 + [1] * 700)
    ch = encode_route(roles, 1234, dtype)
    got_roles, index, k, n = decode_route(ch)
    assert torch.equal(got_roles, roles) and (k, n) == (1234, 5700)
    scored = roles == 1
    assert torch.equal(index[scored], torch.arange(5700))


def test_route_channels_refuse_huge_items() -> None:
    with pytest.raises(ValueError, match="too large"):
        encode_route(torch.ones(65536, dtype=torch.long), 1, torch.float32)


def _vllm_config(**changes: Any) -> Any:
    from vllm.config import CompilationMode, CUDAGraphMode

    cfg = SimpleNamespace(
        compilation_config=SimpleNamespace(mode=CompilationMode.NONE,
                                           cudagraph_mode=CUDAGraphMode.NONE),
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        scheduler_config=SimpleNamespace(disable_chunked_mm_input=True, async_scheduling=False,
                                         get_scheduler_cls=lambda: WholeMediaScheduler,
                                         max_num_batched_tokens=2048,
                                         long_prefill_token_threshold=0),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(quantization=None, get_total_num_kv_heads=lambda: 4),
        quant_config=None,
        kv_transfer_config=None,
    )
    for path, value in changes.items():
        section, key = path.split(".") if "." in path else (None, path)
        setattr(getattr(cfg, section) if section else cfg, key, value)
    return cfg


def test_a_server_with_the_needed_flags_starts() -> None:
    """Prefix caching on, a long-prefill threshold at the step budget: served."""
    check_alvts_server(_vllm_config(), "TokenPruneQwen2_5_VLForConditionalGeneration", True)
    check_alvts_server(_vllm_config(**{"scheduler_config.long_prefill_token_threshold": 2048}),
                       "TokenPruneQwen2_5_VLForConditionalGeneration", True)
    for tp in (2, 4):  # tensor parallelism over the KV heads (tests/test_alvts_tp.py)
        check_alvts_server(_vllm_config(**{"parallel_config.tensor_parallel_size": tp}),
                           "TokenPruneQwen2_5_VLForConditionalGeneration", True)


#: Refused quantizations: (checkpoint quantization_config, engine args, name in the message).
REFUSED_QUANT = {
    "checkpoint": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, {}, "fp8"),
    "checkpoint+flag": ({"quant_method": "fp8", "activation_scheme": "dynamic"},
                        {"quantization": "fp8"}, "fp8"),
    "mxfp8": (None, {"quantization": "mxfp8"}, "mxfp8"),
    "fp8 flag, mxfp4 linear": (None, {"quantization": "fp8_per_channel",
                                      "quantization_config": {"linear": "mxfp4"}},
                               "fp8_per_channel"),
}
#: vLLM's online FP8 of an unquantized checkpoint (served; tests/test_alvts_quant.py loads one).
SERVED_QUANT = {
    "fp8 (deprecated: fp8_per_tensor)": {"quantization": "fp8"},
    **{q: {"quantization": q} for q in ("fp8_per_tensor", "fp8_per_block", "fp8_per_channel")},
    "online fp8_per_block": {"quantization": "online",
                             "quantization_config": {"linear": "fp8_per_block"}},
}


def _quant_engine_config(model: Any, **extra: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), enforce_eager=True, max_model_len=2048,
                      disable_chunked_mm_input=True,
                      scheduler_cls="vllm_tokenprune.alvts.scheduler.WholeMediaScheduler",
                      **extra).create_engine_config()


@pytest.mark.parametrize("case", list(REFUSED_QUANT))
def test_a_quantized_server_is_refused_with_a_real_vllm_config(tiny_qwen_dir, tmp_path,
                                                               case: str) -> None:
    """vLLM's own config objects: a pre-quantized checkpoint (its config.json carries a
    quantization_config, which never passes through --quantization; with or without the
    flag) and online quantization to anything but FP8 are refused, naming the flags and the
    reason; the same checkpoint unquantized starts."""
    import json
    import shutil

    checkpoint, args, name = REFUSED_QUANT[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen_dir, model)
    if checkpoint is not None:
        config = json.loads((model / "config.json").read_text())
        config["quantization_config"] = checkpoint
        (model / "config.json").write_text(json.dumps(config))

    cfg = _quant_engine_config(model, **args)
    assert cfg.model_config.quantization == name
    with pytest.raises(ValueError, match="quantized") as e:
        check_alvts_server(cfg, "TokenPruneQwen2_5_VLForConditionalGeneration", True)
    message = str(e.value)
    assert "--quantization" in message and "quantization_config" in message
    assert f"quantized ({name}:" in message and "fp8_per_channel (online FP8)" in message
    if checkpoint is not None:  # the control: the same model, unquantized, starts
        shutil.rmtree(model)
        shutil.copytree(tiny_qwen_dir, model)
        check_alvts_server(_quant_engine_config(model),
                           "TokenPruneQwen2_5_VLForConditionalGeneration", True)


@pytest.mark.parametrize("case", list(SERVED_QUANT))
def test_online_fp8_of_an_unquantized_checkpoint_is_served(tiny_qwen_dir, case: str) -> None:
    cfg = _quant_engine_config(tiny_qwen_dir, **SERVED_QUANT[case])
    assert cfg.quant_config is not None
    check_alvts_server(cfg, "TokenPruneQwen2_5_VLForConditionalGeneration", True)


def _flags() -> list[tuple[dict[str, Any], str]]:
    from vllm.config import CUDAGraphMode

    return [
        ({"compilation_config.cudagraph_mode": CUDAGraphMode.FULL}, "-cc.cudagraph_mode"),
        ({"kv_transfer_config": object()}, "--kv-transfer-config"),
        ({"scheduler_config.long_prefill_token_threshold": 512},
         "--long-prefill-token-threshold 0"),
        ({"model_config.quantization": "fp8"}, "--quantization"),
        ({"scheduler_config.disable_chunked_mm_input": False}, "--disable-chunked-mm-input"),
        ({"parallel_config.tensor_parallel_size": 8}, "--tensor-parallel-size that divides 4"),
        ({"parallel_config.tensor_parallel_size": 3}, "--tensor-parallel-size that divides 4"),
        ({"parallel_config.pipeline_parallel_size": 2}, "--pipeline-parallel-size 1"),
        ({"quant_config": object()}, "--quantization"),
        ({"scheduler_config.get_scheduler_cls": _vllm_scheduler},
         "--scheduler-cls vllm_tokenprune.alvts.scheduler.WholeMediaScheduler"),
        ({"scheduler_config.get_scheduler_cls": _vllm_scheduler,
          "scheduler_config.async_scheduling": True},
         "--scheduler-cls vllm_tokenprune.alvts.scheduler.WholeMediaAsyncScheduler"),
        # a WholeMedia class of the other scheduling mode: refused naming the right one
        ({"scheduler_config.async_scheduling": True},
         "--scheduler-cls vllm_tokenprune.alvts.scheduler.WholeMediaAsyncScheduler"),
        ({"scheduler_config.get_scheduler_cls": lambda: WholeMediaAsyncScheduler},
         "--scheduler-cls vllm_tokenprune.alvts.scheduler.WholeMediaScheduler"),
        ({"parallel_config.enable_dbo": True}, "--enable-dbo"),
    ]


def _vllm_scheduler() -> type:
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


@pytest.mark.parametrize("case", range(len(_flags())))
def test_each_unsupported_setting_is_refused_naming_its_flag(case: int) -> None:
    changes, flag = _flags()[case]
    with pytest.raises(ValueError, match="token_prune enables 'alvts'") as e:
        check_alvts_server(_vllm_config(**changes), "TokenPruneLlavaForConditionalGeneration",
                           True)
    assert flag in str(e.value)


def test_families_without_alvts_refuse() -> None:
    from vllm_tokenprune.models.llava import TokenPruneLlavaForConditionalGeneration
    from vllm_tokenprune.models.llava_next import TokenPruneLlavaNextForConditionalGeneration
    from vllm_tokenprune.models.qwen2_5_vl import TokenPruneQwen2_5_VLForConditionalGeneration
    from vllm_tokenprune.models.qwen2_vl import TokenPruneQwen2VLForConditionalGeneration
    from vllm_tokenprune.models.qwen3_vl import TokenPruneQwen3VLForConditionalGeneration

    served = {c: issubclass(c, AlvtsModelMixin) for c in (
        TokenPruneQwen2VLForConditionalGeneration, TokenPruneQwen2_5_VLForConditionalGeneration,
        TokenPruneLlavaForConditionalGeneration, TokenPruneLlavaNextForConditionalGeneration,
        TokenPruneQwen3VLForConditionalGeneration)}
    assert [c.__name__ for c, ok in served.items() if not ok] == [
        "TokenPruneQwen3VLForConditionalGeneration"]
    with pytest.raises(ValueError, match="TokenPruneQwen3VLForConditionalGeneration does not "
                                         "support"):
        check_alvts_server(_vllm_config(), "TokenPruneQwen3VLForConditionalGeneration", False)


def _items(*spans: tuple[int, int]) -> list[Any]:
    return [SimpleNamespace(mm_position=SimpleNamespace(offset=o, length=n)) for o, n in spans]


@pytest.mark.parametrize("computed,new,expected", [
    (0, 100, 55),    # text 0-4, the item 5-52 fits, the second (55-102) would be cut: stop
    (0, 104, 104),   # both whole
    (0, 40, 5),      # the first would be cut: stop before it
    (5, 30, 0),      # a step starting exactly at an item it cannot finish schedules nothing
                     # (vLLM's own rule, num_computed < start, lets this one through)
    (5, 48, 48),     # exactly the item
    (53, 10, 2),     # text 53-54, then stop before the second item
    (20, 10, 10),    # inside an item already started (prefix-cache hit): left to vLLM
])
def test_whole_media_tokens(computed: int, new: int, expected: int) -> None:
    assert whole_media_tokens(_items((55, 48), (5, 48)), computed, new) == expected


def test_skipped_token_layers_are_counted_only_for_routed_items(monkeypatch) -> None:
    """The worker's ``_tp_alvts_items`` on one step of four items: a whole image routed at
    k < N, a whole video, a ratio-0 image (routed, every token through: adds 0) and an image
    whose rows arrived split (served unrouted, a fallback: adds nothing)."""
    from vllm_tokenprune.alvts import AlvtsOptions, AlvtsRouter, layer_factors
    from vllm_tokenprune.alvts import model as alvts_model
    from vllm_tokenprune.metrics import worker as worker_metrics

    got: list[tuple[str, str, float]] = []
    fallbacks: list[tuple[str, str]] = []

    class Counter:
        def inc(self, a: str, b: str, value: float = 1.0) -> None:
            got.append((a, b, value))

    monkeypatch.setattr(worker_metrics, "_skipped", Counter())
    monkeypatch.setattr(worker_metrics, "record_fallback", lambda m, r: fallbacks.append((m, r)))
    dim, g = 32, torch.Generator().manual_seed(0)
    f = layer_factors(torch.randn(4 * 8, dim, generator=g), torch.randn(2 * 8, dim, generator=g),
                      num_heads=4, num_kv_heads=2, rank=4)
    opts = AlvtsOptions(first_layer=0)
    runtime = alvts_model.AlvtsRuntime(opts)
    runtime.router = AlvtsRouter({0: f, 1: f}, opts)  # two routed layers

    class Stub(alvts_model.AlvtsModelMixin):
        _tp_alvts = runtime

    def item(n: int, k: int, video: bool = False, rows: slice = slice(None)) -> torch.Tensor:
        route = encode_route(torch.ones(n, dtype=torch.long), k, torch.float32, video=video)
        return torch.cat([torch.randn(n, dim), route], dim=1)[rows]

    embeds = [item(20, 5), item(12, 3, video=True), item(10, 10), item(16, 4, rows=slice(8))]
    is_mm = torch.ones(sum(e.shape[0] for e in embeds), dtype=torch.bool)
    items = Stub()._tp_alvts_items(embeds, [0, 1, 2, 3], dim, is_mm)
    assert [i.num_process for i in items] == [5, 3, 10]  # the split image is not routed
    assert got == [("alvts", "image", 30.0), ("alvts", "video", 18.0)]  # (N - k) x 2 layers
    assert fallbacks == [("alvts", "partial_item")]

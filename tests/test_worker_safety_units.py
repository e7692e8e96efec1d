"""Unit tests of the worker-safety pieces (docs/worker-safety.md), with vLLM's own classes where
they matter: encoder-call chunking, scorer fallbacks and their metric, the worst-case scorer
sweep of the profile run, the processor's refusals, the cache-key salt, and encoder CUDA
graphs switched off."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from vllm_tokenprune import select_tokens
from vllm_tokenprune.cache_keys import message_text_ids, pruned_item_salt
from vllm_tokenprune.config import TokenPruneConfig
from vllm_tokenprune.metrics import exchange, frontend
from vllm_tokenprune.metrics import worker as metrics
from vllm_tokenprune.models import encoder_budget as budget_mod
from vllm_tokenprune.models import fallbacks, staging
from vllm_tokenprune.models import model_hooks as model_mod
from vllm_tokenprune.models.wire import METHOD_IDS, ItemLayout, ItemParams

# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("charges,cap,expected", [
    ([256] * 5, 512, [[0, 1], [2, 3], [4]]),
    ([100, 300, 200, 50], 400, [[0, 1], [2, 3]]),
    ([600, 10, 10], 512, [[0], [1, 2]]),       # an item above the cap goes alone
    ([10, 600], 512, [[0], [1]]),
    ([5, 5, 5], None, [[0, 1, 2]]),
    ([], 512, []),
])
def test_plan_chunks(charges, cap, expected):
    chunks = staging.plan_chunks(charges, cap)
    assert [list(c) for c in chunks] == expected
    for c in chunks:
        assert len(c) == 1 or cap is None or sum(charges[i] for i in c) <= cap


@pytest.mark.parametrize("charges,sizes,size_cap,expected", [
    ([100] * 4, [10, 10, 10, 10], 25, [[0, 1], [2, 3]]),       # bytes bind before tokens
    ([100, 100, 100], [5, 30, 5], 20, [[0], [1], [2]]),         # an item over it goes alone
    ([300, 300, 10], [1, 1, 1], 100, [[0], [1, 2]]),            # tokens still bind
    ([100] * 3, [50] * 3, None, [[0, 1, 2]]),                    # not profiled yet: tokens only
])
def test_plan_chunks_with_pixel_bytes(charges, sizes, size_cap, expected):
    chunks = staging.plan_chunks(charges, 400, sizes, size_cap)
    assert [list(c) for c in chunks] == expected


def test_slice_items_on_vllm_qwen_pixel_inputs():
    """Sub-batches of vLLM's own Qwen2.5-VL input schema: the flat pixel rows and the
    per-item grid rows of the chosen items, nothing else changed."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLImagePixelInputs

    grids = torch.tensor([[1, 2, 2], [1, 4, 4], [1, 2, 4]])
    rows = grids.prod(-1).tolist()  # 4, 16, 8
    pixels = torch.arange(sum(rows) * 3, dtype=torch.float32).reshape(sum(rows), 3)
    mm_input = Qwen2_5_VLImagePixelInputs(type="pixel_values", pixel_values=pixels,
                                          image_grid_thw=grids)
    sub = staging.slice_items(mm_input, range(1, 3), 3, {"pixel_values": rows})
    assert sub["type"] == "pixel_values"
    assert torch.equal(sub["pixel_values"], pixels[4:28])
    assert torch.equal(sub["image_grid_thw"], grids[1:])
    assert mm_input["pixel_values"].shape[0] == 28  # the original is untouched


def test_slice_items_on_vllm_qwen_video_inputs():
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLVideoPixelInputs

    grids = torch.tensor([[2, 2, 2], [4, 2, 4]])
    rows = grids.prod(-1).tolist()  # 8, 32
    pixels = torch.randn(sum(rows), 6)
    mm_input = Qwen2_5_VLVideoPixelInputs(
        type="pixel_values_videos", pixel_values_videos=pixels, video_grid_thw=grids,
        second_per_grid_ts=torch.tensor([1.0, 0.5]), timestamps=[[0.0, 1.0], [0.0, 0.5]])
    sub = staging.slice_items(mm_input, range(1, 2), 2, {"pixel_values_videos": rows})
    assert torch.equal(sub["pixel_values_videos"], pixels[8:])
    assert sub["video_grid_thw"].tolist() == [[4, 2, 4]]
    assert sub["second_per_grid_ts"].tolist() == [0.5]
    assert sub["timestamps"] == [[0.0, 0.5]]


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("rows,keep", [(80, 40), (80, 80), (81, 7), (5, 8), (1, 1)])
def test_uniform_fallback_has_exactly_num_keep_rows(rows, keep):
    idx = fallbacks.uniform_fallback(rows, keep)
    assert idx.shape == (keep,)
    assert int(idx.min()) >= 0 and int(idx.max()) < rows
    assert torch.all(idx[1:] >= idx[:-1])
    if rows >= keep:
        assert len(set(idx.tolist())) == keep


class _Stub:
    """Just enough of a TokenPrune model for the model-side mixin methods."""

    def __init__(self, cfg: TokenPruneConfig) -> None:
        self.tp_config = cfg
        self._tp_sweep_now = False

    def _tp_text_embeds(self, ids_row, device):  # noqa: ANN001, ANN202
        ids = ids_row[ids_row >= 0]
        return torch.ones(ids.shape[0], 8, device=device)


for _name in ("_tp_select", "_tp_score", "_tp_score_or_fallback", "_tp_profile_sweep",
              "_tp_params"):
    setattr(_Stub, _name, getattr(model_mod.TokenPruneModelMixin, _name))


@pytest.fixture
def fallback_counts(monkeypatch):
    counts: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "record_fallback", lambda m, r: counts.append((m, r)))
    return counts


def test_nan_item_falls_back_alone(fallback_counts):
    """One item with NaN features in a batch: it keeps a uniform subset of exactly num_keep
    rows and is counted; the other item keeps the scorer's own selection."""
    stub = _Stub(TokenPruneConfig())
    good = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    bad = torch.randn(48, 8)
    bad[3, 2] = float("nan")
    params = [ItemParams(16, "lrcp", 64, (1, 8, 8), ()), ItemParams(12, "lrcp", 48, (1, 6, 8), ())]
    keep = stub._tp_select("image", [good, bad], params)
    assert torch.equal(keep[0], select_tokens(good, 16, "lrcp", grid=(1, 8, 8)))
    assert torch.equal(keep[1], fallbacks.uniform_fallback(48, 12))
    assert fallback_counts == [("lrcp", fallbacks.NON_FINITE)]


def test_mixed_batch_gives_each_item_its_own_method_and_keep_count():
    """One encoder batch holding items of several requests (every method, several sizes and
    keep-counts, text ids for the text-conditioned ones): each item's kept rows are what the
    same item scored alone gets, and what its own method selects (a mix-up between requests
    scored together fails here, whatever the server's scheduling does)."""
    from vllm_tokenprune import list_methods

    stub = _Stub(TokenPruneConfig())
    g = torch.Generator().manual_seed(1)
    methods = list_methods()
    feats, params, grids = [], [], []
    for i, method in enumerate(methods):
        h, w = 4 + i % 3, 6 + i % 2
        feats.append(torch.randn(h * w, 8, generator=g))
        grids.append((1, h, w))
        params.append(ItemParams(3 + i, method, h * w, grids[-1], ()))
    text_ids = torch.tensor([[5, 6, 7, -1]] * len(methods))
    together = stub._tp_select("image", feats, params, text_ids)
    for i, method in enumerate(methods):
        alone = stub._tp_select("image", [feats[i]], [params[i]], text_ids[i:i + 1])[0]
        assert torch.equal(together[i], alone), method
        text = torch.ones(3, 8) if method in ("resprune", "cdpruner") else None
        assert torch.equal(together[i], select_tokens(feats[i], 3 + i, method, grid=grids[i],
                                                      text_embeds=text)), method


def test_count_mismatch_falls_back(fallback_counts):
    """The encoder produced a different number of rows than the processor counted: no raise,
    exactly num_keep rows of what exists."""
    stub = _Stub(TokenPruneConfig())
    params = torch.tensor([[10, METHOD_IDS["cdpruner"], 40, 1, 5, 8]])
    items = stub._tp_params(params, [36])
    assert items[0].method == fallbacks.FALLBACK_METHOD and items[0].num_tokens == 36
    keep = stub._tp_select("image", [torch.randn(36, 8)], items)
    assert keep[0].shape == (10,)
    assert fallback_counts == [("cdpruner", fallbacks.COUNT_MISMATCH)]


def test_profile_sweep_runs_every_allowed_method_at_its_worst(monkeypatch):
    """In the profile run every allowed method scores every item keeping N - 1 (text-
    conditioned ones with a full-length text), so vLLM's memory profile includes it."""
    calls = []
    real = model_mod.select_tokens_batch

    def spy(feats, keep, method, **kw):  # noqa: ANN001, ANN202, ANN003
        calls.append((method, list(keep), kw.get("text_embeds") is not None))
        return real(feats, keep, method, **kw)

    monkeypatch.setattr(model_mod, "select_tokens_batch", spy)
    monkeypatch.setattr(budget_mod, "select_tokens_batch", spy)
    stub = _Stub(TokenPruneConfig(allowed_methods=("lrcp", "resprune", "divprune"),
                                  max_greedy_keep=12))
    stub._tp_sweep_now = True
    feats = [torch.randn(16, 8), torch.randn(16, 8)]
    params = [ItemParams(8, "lrcp", 16, (1, 4, 4), ())] * 2
    stub._tp_select("image", feats, params)
    sweep = calls[:3]
    assert [m for m, _, _ in sweep] == ["lrcp", "resprune", "divprune"]
    # N - 1 = 15; greedy methods at most max_greedy_keep, the most a request may keep
    assert [k for _, k, _ in sweep] == [[15, 15], [12, 12], [12, 12]]
    assert [t for _, _, t in sweep] == [False, True, False]
    assert calls[3] == ("lrcp", [8, 8], False)  # then the batch's own selection


def test_profile_sweep_failure_names_the_method_and_cause(monkeypatch):
    """A scorer that cannot run at its worst in the profile run stops start-up (raises out of
    embed_multimodal, which fails vLLM's profile run) with the method and the cause, instead of
    a warning and uniform fallbacks for every later request of that method."""
    real = budget_mod.select_tokens_batch

    def oom_for_divprune(feats, keep, method, **kw):  # noqa: ANN001, ANN202, ANN003
        if method == "divprune":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(feats, keep, method, **kw)

    monkeypatch.setattr(budget_mod, "select_tokens_batch", oom_for_divprune)
    stub = _Stub(TokenPruneConfig(allowed_methods=("lrcp", "divprune")))
    stub._tp_sweep_now = True
    params = [ItemParams(8, "lrcp", 16, (1, 4, 4), ())]
    with pytest.raises(RuntimeError, match=r"could not run divprune at its worst \(1 items of "
                       r"\[16\] tokens, keeping 15\): OutOfMemoryError: CUDA out of memory.*"
                       r"does not start.*allowed_methods"):
        stub._tp_select("image", [torch.randn(16, 8)], params)


def test_fallback_metric_reaches_the_api_server_collector(tmp_path, monkeypatch):
    monkeypatch.setenv(exchange.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    counter = metrics._WorkerCounter("m", "tokenprune_scorer_fallbacks", exchange.FALLBACKS_HELP,
                                     exchange.FALLBACKS, ("method", "reason"))
    counter.inc("divprune", "non_finite")
    counter.inc("divprune", "non_finite")
    counter.inc("lrcp", "scorer_error")
    (fam,) = frontend.WorkerCounterCollector(str(tmp_path), "tokenprune_scorer_fallbacks",
                                             exchange.FALLBACKS_HELP, exchange.FALLBACKS,
                                             ("method", "reason")).collect()
    got = {(s.labels["method"], s.labels["reason"]): s.value
           for s in fam.samples if s.name == "tokenprune_scorer_fallbacks_total"}
    assert got == {("divprune", "non_finite"): 2.0, ("lrcp", "scorer_error"): 1.0}


# --------------------------------------------------------------------------- processor


def _processor_stub(max_tokens: dict[str, int]):  # noqa: ANN202
    from vllm_tokenprune.models.processor import TokenPruneProcessorMixin

    stub = object.__new__(TokenPruneProcessorMixin)
    stub._tp_max_tokens = max_tokens
    return stub


def test_processor_refuses_items_above_the_profiled_item_size():
    stub = _processor_stub({"video": 1000, "image": 256})
    stub._tp_check_item("video", ItemLayout(1000, (10, 10, 10)), 1000)
    stub._tp_check_item("image", ItemLayout(400, (1, 20, 20)), 400)  # vLLM's bound: any modality
    with pytest.raises(ValueError, match="1001 tokens before pruning.*profiled with \\(1000\\)"):
        stub._tp_check_item("video", ItemLayout(1001, (7, 11, 13)), 1001)


def test_processor_refuses_grids_too_large_for_positions():
    stub = _processor_stub({})
    with pytest.raises(ValueError, match="too large for pruning"):
        stub._tp_check_item("image", ItemLayout(65536, (1, 1, 65536)), 65536)


# --------------------------------------------------------------------------- cache keys

IM_START, IM_END, VSTART, IMG, VEND = 1, 2, 3, 4, 5
MEDIA = {VSTART, IMG, VEND}
BOUNDARY = {IM_START, IM_END}


def _turn1() -> list[int]:
    return [IM_START, 10, 11, IM_END, IM_START, 12, VSTART, IMG, VEND, 13, 14, IM_END,
            IM_START, 15]


def test_message_text_is_the_items_own_message_and_survives_new_turns():
    t1 = _turn1()
    t2 = [*t1, 16, 17, IM_END, IM_START, 12, 18, 19, IM_END, IM_START, 15]
    assert message_text_ids(t1, IMG, 1, MEDIA, BOUNDARY) == [(12, 13, 14)]
    assert message_text_ids(t2, IMG, 1, MEDIA, BOUNDARY) == [(12, 13, 14)]
    two = [IM_START, 12, VSTART, IMG, VEND, 20, VSTART, IMG, VEND, 21, IM_END,
           IM_START, 22, VSTART, IMG, VEND, IM_END]
    assert message_text_ids(two, IMG, 3, MEDIA, BOUNDARY) == [(12, 20, 21)] * 2 + [(22,)]
    assert message_text_ids(two, IMG, 2, MEDIA, BOUNDARY) is None  # layout not understood
    long = [IM_START, *range(100, 400), VSTART, IMG, VEND, IM_END]
    assert message_text_ids(long, IMG, 1, MEDIA, BOUNDARY, max_tokens=256) == [
        tuple(range(144, 400))]


def test_pruned_item_salt_covers_what_the_selection_depends_on():
    base = pruned_item_salt("0.1.0", "resprune", {"alpha": 0.5}, 1, (1, 2, 3))
    assert base == pruned_item_salt("0.1.0", "resprune", {"alpha": 0.5}, 1, [1, 2, 3])
    variants = [
        pruned_item_salt("0.1.1", "resprune", {"alpha": 0.5}, 1, (1, 2, 3)),
        pruned_item_salt("0.1.0", "cdpruner", {"alpha": 0.5}, 1, (1, 2, 3)),
        pruned_item_salt("0.1.0", "resprune", {"alpha": 0.6}, 1, (1, 2, 3)),
        pruned_item_salt("0.1.0", "resprune", {"alpha": 0.5}, 2, (1, 2, 3)),
        pruned_item_salt("0.1.0", "resprune", {"alpha": 0.5}, 1, (1, 2)),
        pruned_item_salt("0.1.0", "resprune", {"alpha": 0.5}, 1, None),
    ]
    assert len({base, *variants}) == 7


# --------------------------------------------------------------------------- encoder graphs


def _family_classes():  # noqa: ANN202
    from vllm_tokenprune.models.llava import TokenPruneLlavaForConditionalGeneration
    from vllm_tokenprune.models.llava_next import TokenPruneLlavaNextForConditionalGeneration
    from vllm_tokenprune.models.qwen2_5_vl import TokenPruneQwen2_5_VLForConditionalGeneration
    from vllm_tokenprune.models.qwen2_vl import TokenPruneQwen2VLForConditionalGeneration
    from vllm_tokenprune.models.qwen3_vl import TokenPruneQwen3VLForConditionalGeneration

    return {
        TokenPruneQwen2VLForConditionalGeneration: True,
        TokenPruneQwen2_5_VLForConditionalGeneration: True,
        TokenPruneQwen3VLForConditionalGeneration: True,
        TokenPruneLlavaForConditionalGeneration: False,
        TokenPruneLlavaNextForConditionalGeneration: False,
    }


@pytest.mark.parametrize("cls,graphs", list(_family_classes().items()),
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_encoder_cudagraphs_switched_off_and_logged(cls, graphs, caplog):
    """vLLM's CompilationConfig with cudagraph_mm_encoder on: the flag both runners read is
    cleared; families whose vLLM class supports encoder graphs (the Qwen-VL ones) say so."""
    from vllm.config import CompilationConfig
    from vllm.model_executor.models.interfaces import supports_encoder_cudagraph

    assert supports_encoder_cudagraph(cls) == graphs
    compilation = CompilationConfig(cudagraph_mm_encoder=True)
    vllm_config = SimpleNamespace(compilation_config=compilation)
    with caplog.at_level(logging.WARNING):
        model_mod.TokenPruneModelMixin._tp_disable_encoder_cudagraphs(
            object.__new__(cls), vllm_config)
    assert compilation.cudagraph_mm_encoder is False
    logged = [r.getMessage() for r in caplog.records if "encoder CUDA graphs" in r.getMessage()]
    assert bool(logged) == graphs
    # already off: nothing to say
    caplog.clear()
    model_mod.TokenPruneModelMixin._tp_disable_encoder_cudagraphs(object.__new__(cls),
                                                                  vllm_config)
    assert not [r for r in caplog.records if "encoder CUDA graphs" in r.getMessage()]


def test_qwen2_vl_encoder_cudagraph_config_has_no_modality():
    """vLLM's own Qwen2-VL lists images and videos for encoder graphs whatever pruning does;
    the TokenPrune variant's config (built by vLLM's method) lists none."""
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    from vllm_tokenprune.models.qwen2_vl import TokenPruneQwen2VLForConditionalGeneration

    def stub(cls):  # noqa: ANN001, ANN202
        obj = object.__new__(cls)
        torch.nn.Module.__init__(obj)
        obj.visual = SimpleNamespace(out_hidden_size=32)
        obj.get_max_frames_per_video = lambda: 4
        return obj

    assert stub(Qwen2VLForConditionalGeneration).get_encoder_cudagraph_config().modalities == [
        "image", "video"]
    cfg = stub(TokenPruneQwen2VLForConditionalGeneration).get_encoder_cudagraph_config()
    assert cfg.modalities == []
    assert cfg.out_hidden_size == 32


def test_greedy_graph_budget_is_allocated_inside_the_profile(monkeypatch):
    """The greedy scorers' CUDA-graph budget (scoring/_graphs.py) is allocated once in the
    profile sweep on a CUDA device, so vLLM's memory profile leaves room for the graphs; not on
    the CPU, not without a greedy method, not when graphs are off."""
    from vllm_tokenprune.models import encoder_budget
    from vllm_tokenprune.scoring import _graphs
    from vllm_tokenprune.testing.gpu_emulation import GpuEmulation

    sizes: list[int] = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8:
            sizes.append(int(args[0]))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setenv(_graphs.GRAPH_MB_ENV, "2")
    cpu = [real_empty(4, 8)]
    encoder_budget._reserve_graph_memory(cpu, ["divprune"])
    assert sizes == []
    with GpuEmulation():
        feats = [torch.zeros(4, 8, device="cuda")]
        encoder_budget._reserve_graph_memory(feats, ["lrcp", "norm"])
        assert sizes == []
        encoder_budget._reserve_graph_memory(feats, ["lrcp", "divprune"])
        assert sizes == [2 << 20]
        monkeypatch.setenv(_graphs.GRAPHS_ENV, "0")
        encoder_budget._reserve_graph_memory(feats, ["divprune"])
        assert sizes == [2 << 20]

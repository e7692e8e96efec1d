"""The plugin's worker-side paths on the emulated CUDA device, placed as vLLM's GPU runners place
them (vllm_tokenprune/testing/emulated_worker.py): every family x method through Model Runner
V2 and V1, ALVTS's routed decoder layers included; defect 1 of issue 17 planted; device-to-host
syncs per step bounded (not growing with items or routed layers); each worker failure site
falling back instead of raising (docs/syncs.md, docs/worker-safety.md).

The real plugin model classes are built in-process from the tiny checkpoints with vLLM's own
loader; no server starts here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from vllm_tokenprune.alvts import model as alvts_mod
from vllm_tokenprune.metrics import worker as metrics
from vllm_tokenprune.models import fallbacks as reasons
from vllm_tokenprune.models import faults
from vllm_tokenprune.models.wire import METHOD_IDS, ItemParams
from vllm_tokenprune.scoring import list_methods
from vllm_tokenprune.testing import emulated_worker as ew
from vllm_tokenprune.testing.gpu_emulation import DeviceMixError, GpuEmulation, host
from vllm_tokenprune.testing.media import make_image, make_video_frames

pytestmark = pytest.mark.gpu_emulation

MRoPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_SIZE = {"llava": (112, 112), "llava_next": (150, 260)}
RATIO = 0.5


def methods(family: str) -> list[str]:
    return [*list_methods(), *(["alvts"] if family in ew.ALVTS_FAMILIES else [])]


def media(family: str, images: int = 1, video: bool = True) -> dict[str, list[Any]]:
    size = IMAGE_SIZE.get(family, (112, 84))
    out: dict[str, list[Any]] = {"image": [make_image(*size, seed=i) for i in range(images)]}
    if video and family in MRoPE:
        out["video"] = [ew.video_input(make_video_frames(56, 56, 4))]
    return out


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ew.Worker]]:
    """``worker(family, text_layers=2, emulate=True, **block)``: built once per arguments.
    Default block: every method of the family allowed, alvts from layer 1. One intra-op
    thread: these tiny kernels gain nothing from more, and on a busy 2-core machine the
    threads' spinning costs several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    checkpoints: dict[tuple[str, int], str] = {}
    built: dict[Any, ew.Worker] = {}

    def get(family: str, text_layers: int = 2, emulate: bool = True,
            **block: Any) -> ew.Worker:
        key = (family, text_layers, emulate, repr(sorted(block.items())))
        if key not in built:
            if (family, text_layers) not in checkpoints:
                out = tmp_path_factory.mktemp("tiny") / f"{family}_{text_layers}"
                checkpoints[(family, text_layers)] = ew.build_checkpoint(
                    family, out, seed=0, text_layers=text_layers)
            cfg = {"method": "lrcp", "prune_ratio": RATIO, "allowed_methods": methods(family),
                   **block}
            if family in ew.ALVTS_FAMILIES:
                cfg.setdefault("options", {"alvts": {"first_layer": 1}})
            built[key] = ew.build_worker(family, checkpoints[(family, text_layers)], cfg,
                                         emulate=emulate)
        return built[key]

    yield get
    torch.set_num_threads(threads)


@pytest.fixture
def routed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows each routed decoder layer skipped, per call that routed."""
    calls: list[int] = []
    original = alvts_mod.AlvtsRuntime.skipped_rows

    def spy(self: Any, layer: int, stream: torch.Tensor) -> Any:
        rows = original(self, layer, stream)
        if rows is not None:
            calls.append(int(rows.shape[0]))
        return rows

    monkeypatch.setattr(alvts_mod.AlvtsRuntime, "skipped_rows", spy)
    return calls


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "record_fallback", lambda m, r: seen.append((m, r)))
    return seen


def step(w: ew.Worker, requests: list[ew.Request], runner: str = "v2",
         forward: bool = True) -> tuple[ew.StepResult, GpuEmulation]:
    with GpuEmulation() as emu:
        res = ew.run_step(w, requests, emu, runner=runner, forward=forward)
    return res, emu


#: Scorers whose subspace step runs ``eigh``, which checks its info flag on the host (one
#: sync per size bucket of a call; here every call has one bucket).
SOLVER_METHODS = ("lrcp", "svd_prune")


def expected_phases(family: str, method: str, modalities: int) -> dict[str, int]:
    """The plugin's syncs per step, by phase (docs/syncs.md): per scorer call (one per
    modality here) one finite check, plus the solver's for lrcp/svd_prune; one copy of the
    route channels per step for alvts; one copy per request in the M-RoPE recompute."""
    per_call = 0 if method == "alvts" else 1 + (method in SOLVER_METHODS)
    return {"encoder": per_call * modalities,
            "recompute": 1 if family in MRoPE else 0,
            "embed_input_ids": 1 if method == "alvts" else 0,
            "forward": 0}


#: (family, method, runner) -> the plugin's syncs in that step (printed with -s)
SYNCS: dict[tuple[str, str, str], int] = {}


#: Methods that also run through V1 and the LM forward (the runners' glue does not depend on
#: the scorer; alvts's does), and with a video for the Qwen families (the video path neither).
FULL = ("lrcp", "alvts")


@pytest.mark.parametrize("family", list(ew.FAMILIES))
def test_every_method_runs_where_the_gpu_runners_place_tensors(worker, family, routed_calls):
    """Each method on an image (lrcp/alvts: and a video for Qwen, V1 too, and the LM forward)
    through V2: no operation CUDA would refuse, every media row in place, the plugin's syncs
    as documented; alvts routes."""
    w = worker(family)
    for method in methods(family):
        full = method in FULL
        req = ew.make_request(w, f"r-{method}", media(family, video=full), prune_ratio=RATIO,
                              prune_method=method)
        placeholders = sum(f.mm_position.length for f in req.features)
        results = {}
        for runner in ("v2", "v1") if full else ("v2",):
            before = len(routed_calls)
            res, emu = step(w, [req], runner, forward=full)
            assert res.num_mm_rows == placeholders, (method, runner)
            assert res.inputs_embeds.device.type == "cuda"
            assert res.inputs_embeds.shape == (len(req.prompt_ids), w.hidden_size)
            expected = expected_phases(family, method, len({f.modality for f in req.features}))
            phases = {p: emu.count("plugin", p) for p in expected}
            assert phases == expected, (method, runner, emu.by_site("plugin"))
            SYNCS[(family, method, runner)] = emu.count("plugin")
            if method == "alvts":  # the routed layer skipped rows of the item
                assert len(routed_calls) - before == 1, routed_calls
            results[runner] = res
        if full:
            torch.testing.assert_close(host(results["v1"].inputs_embeds),
                                       host(results["v2"].inputs_embeds))
            torch.testing.assert_close(host(results["v1"].hidden_states),
                                       host(results["v2"].hidden_states))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_planted_defect_1_host_rows_on_the_device_stream_is_refused(worker, family,
                                                                    monkeypatch):
    """Issue 17, defect 1: the routed items' rows built from the runners' host
    ``is_multimodal`` and used on the device residual stream. Planted back (the rows left on
    the host, as before the fix), the emulation refuses the step as CUDA would."""
    w = worker(family)
    req = ew.make_request(w, "r", media(family, video=False), prune_ratio=RATIO,
                          prune_method="alvts")
    step(w, [req])  # the fixed code runs
    original = alvts_mod.AlvtsModelMixin._tp_alvts_items

    def host_rows(self: Any, *args: Any) -> list[alvts_mod.RoutedItem]:
        return [alvts_mod.RoutedItem(host(i.rows), i.num_process)
                for i in original(self, *args)]

    monkeypatch.setattr(alvts_mod.AlvtsModelMixin, "_tp_alvts_items", host_rows)
    with pytest.raises(DeviceMixError, match="index_select"):
        step(w, [req])


def test_emulated_step_computes_what_the_host_computes(worker):
    """Values are real: the same step on the emulated device and on the host (the same
    checkpoint, not emulated) gives the same embeddings and LM hidden states."""
    dev, cpu = worker("qwen2_5_vl"), worker("qwen2_5_vl", emulate=False)
    for method in ("lrcp", "alvts"):
        reqs = [ew.make_request(w, "r", media("qwen2_5_vl"), prune_ratio=RATIO,
                                prune_method=method) for w in (dev, cpu)]
        a, _ = step(dev, [reqs[0]])
        b, _ = step(cpu, [reqs[1]])
        assert b.inputs_embeds.device.type == "cpu"
        torch.testing.assert_close(host(a.inputs_embeds), b.inputs_embeds)
        torch.testing.assert_close(host(a.hidden_states), b.hidden_states)


@pytest.mark.parametrize("family,method", [
    ("qwen2_5_vl", "lrcp"), ("qwen2_5_vl", "alvts"), ("qwen3_vl", "resprune"),
    ("llava_next", "alvts"),
])
def test_syncs_do_not_grow_with_items(worker, family, method):
    """1, 4 and 8 images in a request (and two requests of 2): the same syncs per step, but
    for the one copy per request of the M-RoPE position recompute."""
    w = worker(family)
    counts = {}
    for n in (1, 4, 8):
        req = ew.make_request(w, f"r{n}", media(family, images=n, video=False),
                              prune_ratio=RATIO, prune_method=method)
        counts[n] = step(w, [req], "v2", forward=method == "alvts")[1].by_site("plugin")
    assert counts[1] == counts[4] == counts[8], counts
    two = [ew.make_request(w, f"q{i}", media(family, images=2, video=False),
                           prune_ratio=RATIO, prune_method=method) for i in range(2)]
    _, emu = step(w, two, "v2", forward=method == "alvts")
    per_request = 1 if family in MRoPE else 0  # vLLM calls recompute once per request
    assert emu.count("plugin") == sum(counts[1].values()) + per_request, emu.by_site("plugin")


def test_syncs_do_not_grow_with_routed_layers(worker, routed_calls):
    """alvts routing both decoder layers costs the syncs that routing one costs."""
    counts = {}
    for first_layer, routed in ((0, 2), (1, 1)):
        w = worker("qwen2_5_vl", options={"alvts": {"first_layer": first_layer}})
        req = ew.make_request(w, "r", media("qwen2_5_vl", images=2, video=False),
                              prune_ratio=RATIO, prune_method="alvts")
        before = len(routed_calls)
        _, emu = step(w, [req])
        assert len(routed_calls) - before == routed
        counts[routed] = emu.by_site("plugin")
    assert counts[2] == counts[1], counts


def test_encoder_budget_sub_batches_on_the_device(worker, monkeypatch):
    """Vision-tower calls cut to the profiled budget (one image per call here) slice the
    device pixel values and the host grids/params rows; the scorer's syncs once per call."""
    w = worker("qwen2_5_vl")
    tower_calls: list[int] = []
    original = type(w.model)._process_image_input

    def spy(self: Any, image_input: Any) -> Any:
        tower_calls.append(int(image_input["image_grid_thw"].shape[0]))
        assert image_input["pixel_values"].device.type == "cuda"
        return original(self, image_input)

    monkeypatch.setattr(type(w.model), "_process_image_input", spy)
    req = ew.make_request(w, "r", media("qwen2_5_vl", images=3, video=False),
                          prune_ratio=RATIO, prune_method="lrcp")
    one_image = req.features[0].data["image_grid_thw"].data.prod().item() // 4
    monkeypatch.setattr(w.model, "_tp_encoder_cap", int(one_image))
    res, emu = step(w, [req], forward=False)
    assert tower_calls == [1, 1, 1]
    assert res.num_mm_rows == sum(f.mm_position.length for f in req.features)
    assert emu.count("plugin", "encoder") == 3 * 2  # per call: finite check + eigh (lrcp)


SITES = {  # fault site -> (family, method, fallback reason)
    faults.FAULT_PARAMS: ("qwen2_5_vl", "lrcp", reasons.BAD_PARAMS),
    faults.FAULT_COUNT_MISMATCH: ("qwen2_5_vl", "lrcp", reasons.COUNT_MISMATCH),
    faults.FAULT_POSITIONS: ("qwen2_5_vl", "lrcp", reasons.POSITIONS),
    faults.FAULT_NO_RECOMPUTE: ("qwen2_5_vl", "lrcp", reasons.NO_RECOMPUTE),
    faults.FAULT_ALVTS_TAKE: ("llava", "alvts", reasons.LAYOUT),
}


@pytest.mark.parametrize("site,runner", [
    (faults.FAULT_PARAMS, "v2"), (faults.FAULT_COUNT_MISMATCH, "v2"),
    (faults.FAULT_POSITIONS, "v2"), (faults.FAULT_POSITIONS, "v1"),
    (faults.FAULT_NO_RECOMPUTE, "v2"), (faults.FAULT_NO_RECOMPUTE, "v1"),
    (faults.FAULT_ALVTS_TAKE, "v2"),
])
def test_each_failure_site_falls_back_and_the_next_request_is_served(
        worker, site, runner, monkeypatch, fallbacks):
    """Each worker failure site a request can reach, triggered by its test hook: the step is
    served (every placeholder filled, the LM runs) with the fallback counted, and the next
    request is served without one."""
    family, method, reason = SITES[site]
    w = worker(family)
    req = ew.make_request(w, "r", media(family, video=False), prune_ratio=RATIO,
                          prune_method=method)
    placeholders = sum(f.mm_position.length for f in req.features)
    monkeypatch.setattr(faults, "_FAULTS", faults.parse_faults(f"{site}:*"))
    res, _ = step(w, [req], runner)
    assert res.num_mm_rows == placeholders and res.hidden_states is not None
    assert reason in {r for _, r in fallbacks}, fallbacks
    monkeypatch.setattr(faults, "_FAULTS", {})
    fallbacks.clear()
    res, _ = step(w, [ew.make_request(w, "r2", media(family, video=False), prune_ratio=RATIO,
                                      prune_method=method)], runner)
    assert res.hidden_states is not None and fallbacks == []


def test_count_mismatch_against_the_grid_does_not_index_past_it(worker, fallbacks):
    """Issue 17 point 4: ``_tp_prune`` with 10 rows for a (1, 2, 2) grid raised IndexError."""
    w = worker("qwen2_5_vl")
    width = w.model._tp_embed_width()
    lrcp = METHOD_IDS["lrcp"]
    with GpuEmulation(), torch.inference_mode():
        rows = torch.randn(10, width, device="cuda")
        for params, kept in ((torch.tensor([[2, lrcp, 4, 1, 2, 2]]), 2), (None, 10)):
            out, = w.model._tp_prune("image", [rows], [(1, 2, 2)], [1.0], params)
            assert out.shape == (kept, width + 6) and out.device.type == "cuda"
    assert (("lrcp", reasons.COUNT_MISMATCH) in fallbacks), fallbacks


def test_embed_input_ids_fits_rows_to_placeholders(worker, fallbacks):
    """A step whose media rows do not fill its placeholders (vLLM would raise): cut or padded,
    counted."""
    w = worker("llava")
    with GpuEmulation(), torch.inference_mode():
        ids = torch.zeros(8, dtype=torch.long, device="cuda")
        is_mm = torch.tensor([False, True, True, True, True, False, False, False])
        for rows in (3, 5):
            out = w.model.embed_input_ids(ids, [torch.ones(rows, w.hidden_size, device="cuda")],
                                          is_multimodal=is_mm)
            assert out.shape == (8, w.hidden_size)
    assert fallbacks == [("-", reasons.COUNT_MISMATCH)] * 2


@pytest.mark.parametrize("row,why", [
    ([4, 99, 8, 0, 0, 0], "unknown method id"),
    ([9, METHOD_IDS["lrcp"], 8, 0, 0, 0], "out of range"),
    ([-1, METHOD_IDS["lrcp"], 8, 0, 0, 0], "out of range"),
    ([4, METHOD_IDS["lrcp"], 0, 0, 0, 0], "out of range"),
    ([4, METHOD_IDS["lrcp"], 8, 1, 2, 3], "grid"),
    ([4, METHOD_IDS["lrcp"]], "at least"),
])
def test_params_rows_are_validated(row, why):
    with pytest.raises(ValueError, match=why):
        ItemParams.from_row(row)
    assert ItemParams.from_row([4, METHOD_IDS["lrcp"], 8, 1, 2, 4]).grid == (1, 2, 4)


def test_fault_hooks_are_inert_unless_named():
    assert faults.parse_faults("") == {}
    assert faults.parse_faults("params:12, positions:*") == {"params": 12, "positions": None}
    with pytest.raises(ValueError, match="unknown site"):
        faults.parse_faults("everything")
    assert not faults.fault_for_test(faults.FAULT_PARAMS, 12)


def test_print_sync_table(capsys):
    """With -s: the plugin's syncs per step (family x method x runner) measured above."""
    if not SYNCS:
        pytest.skip("run with the family test")
    lines = [f"{f:11s} {m:10s} {r}: {n}" for (f, m, r), n in sorted(SYNCS.items())]
    with capsys.disabled():
        print("\nplugin device-to-host syncs per prefill step:\n" + "\n".join(lines))

"""Budgets (docs/budgets.md) without a server: the count rule and the cap's split
(:mod:`vllm_tokenprune.plan`), the bridge's reading of ``image_url.detail``, and vLLM's real
TokenPrune Qwen2.5-VL processor built in-process (``MULTIMODAL_REGISTRY``, no weights): per-item
counts, placeholders, a video under the cap, ``auto`` on rendered content, the cache keys, and a
capped request partly in vLLM's processor cache.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import DEFAULT_RATIO, QWEN25_ARCH
from vllm_tokenprune import response
from vllm_tokenprune.config import DETAIL_KEY, TokenPruneConfig, parse_config
from vllm_tokenprune.plan import resolve_request, split_cap
from vllm_tokenprune.serving.bridge import _BridgeState, rewrite_body
from vllm_tokenprune.serving.seal import SEAL_KEY, check_sealed_kwargs
from vllm_tokenprune.testing import content
from vllm_tokenprune.testing.media import make_image, make_video_frames
from vllm_tokenprune.testing.server import token_prune_overrides

LOW = 4  # token_prune.low_detail_tokens of the in-process processor


# --------------------------------------------------------------------------- the rule


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=6), st.integers(1, 4),
       st.integers(0, 2000))
def test_split_cap_sums_to_the_cap_within_each_count(counts, min_keep, cap):
    floors = [min(min_keep, c) for c in counts]
    if cap < sum(floors):
        with pytest.raises(ValueError, match="max_visual_tokens"):
            split_cap(counts, cap, min_keep)
        return
    shares = split_cap(counts, cap, min_keep)
    assert shares == split_cap(counts, cap, min_keep)  # deterministic
    if sum(counts) <= cap:
        assert shares == counts
        return
    assert sum(shares) == cap
    extra, weights = cap - sum(floors), [c - f for c, f in zip(counts, floors, strict=True)]
    for s, f, c, w in zip(shares, floors, counts, weights, strict=True):
        assert f <= s <= c
        assert abs((s - f) - extra * w / sum(weights)) < 1  # proportional, largest remainders


def test_split_cap_ties_go_to_the_earlier_item():
    assert split_cap([10, 10, 10], 8, 1) == [3, 3, 2]
    assert split_cap([100, 50, 10], 60, 1) == [37, 19, 4]


def _request(**fields: Any):
    cfg = TokenPruneConfig(prune_ratio=DEFAULT_RATIO, low_detail_tokens=LOW)
    return resolve_request(cfg, fields)


def test_count_rule_stricter_wins_per_item():
    from vllm_tokenprune.plan import item_counts

    req = _request(image_detail=["low", "high", None])
    items = [("image", 0, 20, None), ("image", 1, 20, None), ("image", 2, 20, None)]
    assert item_counts(req, items, 1) == [(LOW, "detail"), (20, "detail"), (10, "ratio")]
    # low never raises a count the ratio already made smaller
    req = _request(prune_ratio=0.9, image_detail=["low"])
    assert item_counts(req, [("image", 0, 20, None)], 1) == [(2, "ratio")]
    # the cap: only where it is stricter; high keeps all unless the cap cuts it
    req = _request(image_detail=[None, "high"], max_visual_tokens=24)
    assert item_counts(req, items[:2], 1) == [(8, "cap"), (16, "cap")]
    req = _request(prune_ratio=0.9, max_visual_tokens=100)
    assert item_counts(req, items[:2], 1) == [(2, "ratio"), (2, "ratio")]
    # auto: the estimate, bounded by the item
    req = _request(prune_ratio="auto")
    assert req["image"].auto and req["image"].prunes
    assert item_counts(req, [("image", 0, 20, 7), ("image", 1, 20, 99)], 1) == \
        [(7, "auto"), (20, "auto")]


def test_server_defaults_and_their_checks():
    cfg = parse_config({"prune_ratio": "auto", "video_prune_ratio": 0.25,
                        "max_visual_tokens": 300})
    req = resolve_request(cfg, {})
    assert req["image"].auto and not req["video"].auto and req.cap == 300
    assert req.low_detail_tokens == 64  # the documented default
    assert resolve_request(cfg, {"max_visual_tokens": 7}).cap == 7
    for block, key in [({"max_visual_tokens": 0}, "max_visual_tokens"),
                       ({"low_detail_tokens": 0}, "low_detail_tokens"),
                       ({"prune_ratio": "automatic"}, "prune_ratio"),
                       ({"method": "alvts", "prune_ratio": "auto"}, "prune_ratio")]:
        with pytest.raises(ValueError, match=f"token_prune.{key}"):
            parse_config(block)


# --------------------------------------------------------------------------- the bridge

CHAT = "/v1/chat/completions"


def _state(config: TokenPruneConfig | None = TokenPruneConfig()) -> _BridgeState:  # noqa: B008
    return _BridgeState(config, False, ["TokenPruneQwen2_5_VLForConditionalGeneration"])


def _img(detail: Any = None, typed: bool = True) -> dict[str, Any]:
    url: dict[str, Any] = {"url": "data:image/png;base64,AAAA"}
    if detail is not None:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url} if typed else {"image_url": url}


def _body(*messages: list[Any], **top: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": c}
                                                  for c in messages], **top}).encode()


def test_bridge_numbers_details_as_vllms_chat_parser_numbers_images():
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    body = _body([{"type": "text", "text": "a"}, _img("low"), video, _img()],
                 "plain text message",
                 [_img("auto"), _img("high", typed=False)])
    new, err = rewrite_body(body, CHAT, _state())
    assert err is None
    kw = json.loads(new)["mm_processor_kwargs"]
    assert kw[DETAIL_KEY] == ["low", None, None, "high"]
    assert check_sealed_kwargs(kw) is None  # sealed: exempt from vLLM's trust rule
    # every image "auto" (or no detail): the body goes on unchanged
    assert rewrite_body(_body([_img("auto"), _img()]), CHAT, _state()) == (None, None)
    # a server that is not a TokenPrune architecture never reads detail
    assert rewrite_body(_body([_img("low")]), CHAT, _state(None)) == (None, None)
    # completions carry no messages
    assert rewrite_body(_body([_img("low")]), "/v1/completions", _state()) == (None, None)


@pytest.mark.parametrize("value", ["tiny", 3, 0.5, True, ["low"], {"x": 1}, "LOW", ""])
def test_bad_details_are_refused_naming_the_part(value):
    new, err = rewrite_body(_body([_img("low"), {"type": "text", "text": "x"}, _img(value)]),
                            CHAT, _state())
    assert err is not None and err[0] == 400, new
    assert json.loads(err[1])["error"]["param"] == "messages[0].content[2].image_url.detail"


_DETAIL_VALUES = st.one_of(
    st.sampled_from(["low", "high", "auto", "LOW", "tiny", "", " low", "l\u006fw"]),
    st.integers(-3, 3), st.floats(allow_nan=False), st.booleans(), st.text(max_size=6),
    st.lists(st.just("low"), max_size=2))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["image", "bare", "video", "text"]),
                          st.one_of(st.none(), _DETAIL_VALUES)), max_size=6))
def test_bridge_detail_rule(parts):
    """The documented rule, written out: image parts (typed or bare) are numbered in order,
    "low"/"high" kept, "auto"/absent None; any other value: 400 naming that part."""
    content_parts, want, bad = [], [], None
    for j, (kind, detail) in enumerate(parts):
        if kind == "video":
            content_parts.append({"type": "video_url", "video_url": {"url": "x"}})
            continue
        if kind == "text":
            content_parts.append({"type": "text", "text": "t"})
            continue
        part = _img(detail, typed=kind == "image")
        content_parts.append(part)
        if detail is None or detail == "auto":
            want.append(None)
        elif detail in ("low", "high") and type(detail) is str:
            want.append(detail)
        elif bad is None:
            bad = f"messages[0].content[{j}].image_url.detail"
    new, err = rewrite_body(_body(content_parts), CHAT, _state())
    if bad is not None:
        assert err is not None and json.loads(err[1])["error"]["param"] == bad
    elif any(w is not None for w in want):
        assert err is None and json.loads(new)["mm_processor_kwargs"][DETAIL_KEY] == want
    else:
        assert (new, err) == (None, None)


@pytest.mark.parametrize("value", [0, 1.5, "many", True, -3, 2**31, [5]])
def test_bad_caps_are_refused(value):
    new, err = rewrite_body(_body([_img()], max_visual_tokens=value), CHAT, _state())
    assert err is not None and err[0] == 400, new
    assert json.loads(err[1])["error"]["param"] == "max_visual_tokens"


def test_a_cap_below_the_items_floors_is_refused():
    cfg = TokenPruneConfig(min_keep=2)
    _, err = rewrite_body(_body([_img(), _img()], max_visual_tokens=3), CHAT, _state(cfg))
    assert err is not None and json.loads(err[1])["error"]["param"] == "max_visual_tokens"
    new, err = rewrite_body(_body([_img(), _img()], max_visual_tokens=4), CHAT, _state(cfg))
    assert err is None and json.loads(new)["mm_processor_kwargs"]["max_visual_tokens"] == 4


def test_auto_and_cap_are_sealed_and_checked_again():
    new, _ = rewrite_body(_body([_img("low")], prune_ratio="auto", max_visual_tokens=9), CHAT,
                          _state())
    kw = json.loads(new)["mm_processor_kwargs"]
    assert kw == {"prune_ratio": "auto", "max_visual_tokens": 9, DETAIL_KEY: ["low"],
                  SEAL_KEY: kw[SEAL_KEY]}
    forged = dict(kw, max_visual_tokens=10**6)
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError):
        check_sealed_kwargs(forged)
    forged = {k: v for k, v in kw.items() if k != SEAL_KEY}
    with pytest.raises(VLLMValidationError):
        check_sealed_kwargs(forged)


# --------------------------------------------------------------------------- the processor


@pytest.fixture(scope="module")
def processor(tiny_qwen_dir: Path) -> Any:
    return _processor(tiny_qwen_dir, DEFAULT_RATIO)


def _processor(tiny_qwen_dir: Path, ratio: float | str) -> Any:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_tokenprune.metrics import frontend as metrics
    from vllm_tokenprune.plugin import register

    register()
    metrics.enable_frontend()
    overrides = json.loads(token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=ratio,
                                                 low_detail_tokens=LOW))
    cfg = EngineArgs(model=str(tiny_qwen_dir), hf_overrides=overrides, enforce_eager=True,
                     max_model_len=4096, dtype="float32",
                     mm_processor_cache_gb=0.05).create_engine_config()
    return MULTIMODAL_REGISTRY.create_processor(cfg.model_config), cfg


def _video(frames: int = 4, seed: int = 3) -> tuple[Any, dict[str, Any]]:
    v = make_video_frames(112, 84, frames, seed=seed)
    return v, {"total_num_frames": frames, "fps": 2.0, "duration": frames / 2.0,
               "frames_indices": list(range(frames)), "video_backend": "opencv",
               "do_sample_frames": False}


def _inputs(p: Any, images: list[Any], videos: list[Any] = (), cache: Any = None,
            **kwargs: Any) -> Any:
    from vllm.multimodal.processing.processor import ProcessorInputs

    tok = p.info.get_tokenizer()
    text = ("<|vision_start|><|image_pad|><|vision_end|>" * len(images)
            + "<|vision_start|><|video_pad|><|vision_end|>" * len(videos) + "Describe.")
    data: dict[str, Any] = {"image": images}
    if videos:
        data["video"] = list(videos)
    return ProcessorInputs(prompt=tok.encode(text, add_special_tokens=False),
                           mm_data_items=p.info.parse_mm_data(data),
                           hf_processor_mm_kwargs=kwargs, cache=cache)


def _apply(p: Any, images: list[Any], videos: list[Any] = (), cache: Any = None,
           **kwargs: Any) -> dict[str, Any]:
    """One request through the processor; its token_prune field, checked against the prompt's
    placeholders (every count the field says is the count the prompt holds)."""
    from vllm.multimodal.processing.context import TimingContext

    details = response.RequestDetails()
    token = response._current.set(details)
    try:
        out = p.apply(_inputs(p, images, videos, cache, **kwargs), TimingContext())
    finally:
        response._current.reset(token)
    field = details.to_json()
    assert field is not None
    hf = p.info.get_hf_config()
    ids = out["prompt_token_ids"]
    for modality, tid in (("image", hf.image_token_id), ("video", hf.video_token_id)):
        kept = sum(i["kept"] for i in field["items"] if i["modality"] == modality)
        assert ids.count(tid) == kept, (modality, field)
    return field


def _kept(field: dict[str, Any]) -> list[tuple[int, str]]:
    return [(i["kept"], i["why"]) for i in field["items"]]


def test_detail_acts_per_item(processor):
    p, _ = processor
    a, b = make_image(140, 112, seed=1), make_image(140, 112, seed=2)  # 20 tokens each
    plain = _apply(p, [a, b])
    assert _kept(plain) == [(10, "ratio"), (10, "ratio")]
    mixed = _apply(p, [a, b], image_detail=["low", "high"])
    assert _kept(mixed) == [(LOW, "detail"), (20, "detail")]
    assert _apply(p, [a, b], image_detail=[None, "low"])["items"][0] == plain["items"][0]


def test_cap_over_two_images_and_a_video(processor):
    p, _ = processor
    a, b = make_image(112, 84, seed=1), make_image(140, 112, seed=2)  # 12 and 20 tokens
    v = _video()  # 24 tokens
    field = _apply(p, [a, b], [v], max_visual_tokens=14)
    assert field["kept"] == 14 and field["max_visual_tokens"] == 14
    assert _kept(field) == [(3, "cap"), (5, "cap"), (6, "cap")]  # 6:10:12 of 14
    # the stricter wins per item: a loose cap leaves the ratio's counts
    loose = _apply(p, [a, b], [v], max_visual_tokens=1000, prune_ratio=0.75,
                   video_prune_ratio=0.5)
    assert _kept(loose) == [(3, "ratio"), (5, "ratio"), (12, "ratio")]
    # with detail high on one image: that image's share grows with what it would keep
    field = _apply(p, [a, b], [v], max_visual_tokens=26, image_detail=["high", None])
    assert field["kept"] == 26 and [i["why"] for i in field["items"]] == ["cap"] * 3


def test_a_cap_below_the_floors_is_refused(processor):
    from vllm.exceptions import VLLMValidationError

    p, _ = processor
    with pytest.raises(VLLMValidationError, match="max_visual_tokens") as e:
        _apply(p, [make_image(112, 84, seed=1)] * 3, max_visual_tokens=2)
    assert e.value.parameter == "max_visual_tokens"


def test_auto_follows_content(processor):
    p, _ = processor
    s = 224  # 64 tokens
    kinds = {name: content.render(name, s, s) for name in
             ("flat", "gradient", "photo", "text", "chart")}
    got = _apply(p, list(kinds.values()), prune_ratio="auto")
    kept = dict(zip(kinds, (i["kept"] for i in got["items"]), strict=True))
    assert all(i["why"] == "auto" and i["tokens"] == 64 for i in got["items"])
    assert got["ratios"] == {"image": "auto"}
    assert kept["flat"] < kept["photo"] and kept["gradient"] < kept["photo"]
    assert kept["text"] > kept["photo"] and kept["chart"] > kept["photo"], kept
    assert _apply(p, list(kinds.values()), prune_ratio="auto") == got  # deterministic
    # video_prune_ratio auto alone: the image keeps the ratio
    field = _apply(p, [kinds["photo"]], [_video()], video_prune_ratio="auto")
    assert [i["why"] for i in field["items"]] == ["ratio", "auto"]


def test_auto_arguments_are_made_once(processor, monkeypatch):
    # The server's count: the HF processor, patch size, options, pixel scale and min_keep are
    # made once per modality (looked up on every request they cost 0.1 ms, cold after the
    # processor): a second count looks nothing up, and counts as auto_count with them made anew.
    from vllm_tokenprune.budget import auto_count, pixel_scale

    p, _ = processor
    proc = p.info.get_hf_processor().image_processor
    merged = p.info.ctx.get_merged_mm_kwargs({})
    out = proc(images=[content.render("text", 224, 224)], return_tensors="pt", **merged)
    first = p._tp_auto_keep(out, "image", 0, 64)
    scale = pixel_scale(proc, do_rescale=merged.get("do_rescale"),
                        do_normalize=merged.get("do_normalize"))
    assert first == auto_count(out, proc, p._tp_auto_options(), 0, 14, "image", scale, 64,
                               p._tp_config().min_keep).num_keep

    def looked_up(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("looked up again")

    monkeypatch.setattr(p.info, "get_hf_processor", looked_up)
    monkeypatch.setattr(p, "_tp_auto_options", looked_up)
    monkeypatch.setattr(type(p.info.ctx), "get_merged_mm_kwargs", looked_up)  # frozen
    assert p._tp_auto_keep(out, "image", 0, 64) == first


def test_the_compiled_pass_is_ready_before_the_first_request(processor, tiny_qwen_dir,
                                                           monkeypatch):
    # vLLM builds its dummy inputs at start-up (the API server's warm-up among others): where
    # the server's default is auto, auto's compiled pass is compiled or loaded there (in the API
    # server), not in the first request's count; with a default ratio nothing is
    from vllm_tokenprune.budget import kernel
    from vllm_tokenprune.models.processor import TokenPruneProcessorMixin

    warmed: list[int] = []
    monkeypatch.setattr(kernel, "warm", lambda: warmed.append(1))
    p, _ = processor
    p.get_dummy_mm_inputs({"image": 1})
    assert warmed == []
    calls: list[int] = []
    real = TokenPruneProcessorMixin._tp_warm_auto
    monkeypatch.setattr(TokenPruneProcessorMixin, "_tp_warm_auto",
                        lambda self: calls.append(1) or real(self))
    auto, _ = _processor(tiny_qwen_dir, "auto")
    auto.get_dummy_mm_inputs({"image": 1})
    assert calls and warmed == [1]
    # vLLM's engine core and workers (children of the API server) never count: not there; the
    # API servers vLLM starts for --api-server-count above 1 (also children) do
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    for name, more in (("EngineCore", 0), ("EngineCore_DP0", 0), ("VllmWorker-0", 0),
                       ("ApiServer_1", 1)):
        monkeypatch.setattr(multiprocessing, "current_process",
                            lambda name=name: types.SimpleNamespace(name=name))
        auto.get_dummy_mm_inputs({"image": 1})
        assert warmed == [1] * (1 + more), name


def _hashes(p: Any, images: list[Any], **kwargs: Any) -> list[str]:
    from vllm_tokenprune.models import processor as proc

    inputs = _inputs(p, images, **kwargs)
    token = proc._request_plan.set(p._tp_resolve_plan(kwargs))
    t2 = proc._item_text_ids.set(p._tp_item_texts(inputs))
    try:
        return p._get_mm_hashes(inputs)["image"]
    finally:
        proc._item_text_ids.reset(t2)
        proc._request_plan.reset(token)


def test_cache_keys_carry_what_decided_the_count(processor):
    p, _ = processor
    a, b, c = (make_image(112, 84, seed=i) for i in (1, 2, 3))
    variants = {
        "plain": {}, "low": {"image_detail": ["low", None]},
        "high": {"image_detail": ["high", None]}, "auto": {"prune_ratio": "auto"},
        "cap": {"max_visual_tokens": 9}, "cap2": {"max_visual_tokens": 10},
    }
    first = {k: _hashes(p, [a, b], **kw)[0] for k, kw in variants.items()}
    assert len(set(first.values())) == len(first), first
    assert first == {k: _hashes(p, [a, b], **kw)[0] for k, kw in variants.items()}
    # a capped item's key also depends on the other items (the split does)
    assert _hashes(p, [a, c], max_visual_tokens=9)[0] != first["cap"]
    # the server's options that decide a count are in the salt
    p._tp_cfg = p._tp_config().model_copy(update={"low_detail_tokens": LOW + 1})
    try:
        assert _hashes(p, [a, b], image_detail=["low", None])[0] != first["low"]
    finally:
        del p._tp_cfg
        p._tp_config()


@pytest.fixture
def lru_cache(processor: Any) -> Iterator[Any]:
    from vllm.multimodal.cache.base import MultiModalProcessorOnlyCache

    yield MultiModalProcessorOnlyCache(processor[1].model_config)


def test_a_capped_request_partly_cached_is_planned_whole(processor, lru_cache):
    p, _ = processor
    a, b = make_image(112, 84, seed=11), make_image(140, 112, seed=12)
    v = _video(seed=13)
    kw = {"max_visual_tokens": 13, "prune_ratio": "auto"}
    first = _apply(p, [a, b], [v], cache=lru_cache, **kw)
    assert _apply(p, [a, b], [v], cache=lru_cache, **kw) == first  # all cached
    # evict one item: the request is processed whole, the others come back from the cache
    key = next(iter(lru_cache._cache.keys()))
    lru_cache._cache.pop(key)
    assert _apply(p, [a, b], [v], cache=lru_cache, **kw) == first
    assert first["kept"] == 13
    assert lru_cache.make_stats().hits >= 3


# --------------------------------------------------------------------------- the preview


def test_preview_counts_as_the_processor(processor, tiny_qwen_dir, tmp_path, capsys):
    from PIL import Image

    from vllm_tokenprune.preview.__main__ import main

    p, _ = processor
    s = 224
    images = [content.render(k, s, s) for k in ("flat", "photo", "text")]
    files = []
    for i, im in enumerate(images):
        files += ["--image", str(tmp_path / f"{i}.png")]
        im.save(tmp_path / f"{i}.png")
    overrides = token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=DEFAULT_RATIO,
                                      low_detail_tokens=LOW)
    out = tmp_path / "auto.png"
    assert main(["--model", str(tiny_qwen_dir), *files, "--ratio", "auto", "--detail", "auto",
                 "--detail", "auto", "--detail", "low", "--hf-overrides", overrides,
                 "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(3)]
    served = _apply(p, loaded, prune_ratio="auto", image_detail=[None, None, "low"])
    assert [(i["kept"], i["why"]) for i in report["items"]] == _kept(served)
    assert report["ratios"] == {"image": "auto"}
    assert Image.open(out).size[0] > 0
    # --detail once: every image; with a cap
    assert main(["--model", str(tiny_qwen_dir), *files, "--detail", "high",
                 "--max-visual-tokens", "30", "--hf-overrides", overrides,
                 "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == 30 and {i["why"] for i in report["items"]} == {"cap"}

"""The preview command and API on the tiny models of every family (no server; that the kept set
is the server's is checked in tests/_suite.py), and the response field's pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._hf_reference import scored_tokens
from vllm_tokenprune import num_kept
from vllm_tokenprune.preview import PreviewError, preview, render, render_grid
from vllm_tokenprune.preview.__main__ import main
from vllm_tokenprune.preview.draw import DIM, overlay
from vllm_tokenprune.response import RequestDetails, add_field
from vllm_tokenprune.testing import tiny_model
from vllm_tokenprune.testing.media import make_image, make_video

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("preview-models")
    return {f: getattr(tiny_model, f"build_{f}")(base / f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "photo.png"
    make_image(364, 252, seed=11).save(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_and_picture_every_family(models: dict[str, Path], image_file: Path,
                                         family: str) -> None:
    ratio = 0.75
    result = preview(models[family], [image_file], "lrcp", ratio)
    (item,) = result.items
    n, always = scored_tokens(models[family], Image.open(image_file).convert("RGB"))
    assert (item.tokens, item.kept) == (n, num_kept(n, ratio))
    assert len(item.kept_indices) == item.kept
    assert len(item.kept_rows) == item.kept + always  # LLaVA-NeXT: newlines kept too
    panels = result.prepared.items[0].panels
    assert sum(p.h * p.w for p in panels) == n  # every scored token is drawn once
    if family == "llava_next":
        assert len(panels) == 2  # base image, then the stitched tiles
    picture = render(result)
    assert picture.width > 0 and picture.height > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_norm_selection_is_the_top_k_row_norms(models: dict[str, Path], image_file: Path,
                                               family: str) -> None:
    """The rows the preview (and so the server reference) keeps for ``norm``, computed
    without the plugin's selection code: the k scored rows of largest float64 L2 norm, k by
    the keep-count rule written out, plus the always-kept rows (LLaVA-NeXT's newlines)."""
    ratio = 0.75
    result = preview(models[family], [image_file], "norm", ratio)
    item = result.prepared.items[0]
    scored = item.scored.tolist()
    k = min(len(scored), max(1, round(len(scored) * (1 - ratio))))
    norms = item.feat[scored].double().norm(dim=1)
    want = {scored[j] for j in norms.topk(k).indices.tolist()}
    want |= set(range(item.feat.shape[0])) - set(scored)
    assert set(result.items[0].kept_rows) == want


def test_video_frames_drawn_as_frame_groups(models: dict[str, Path], tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(make_video(112, 84, 8, fps=2.0, seed=3))
    result = preview(models["qwen2_5_vl"], [video], "svd_prune", 0.5, video_ratio=0.8)
    (item,) = result.items
    t, h, w = item.grid
    assert t > 1 and len(result.prepared.items[0].panels) == t
    assert result.ratios == {"video": 0.8}
    assert item.kept == num_kept(t * h * w, 0.8)


def test_cli_single_and_grid(models: dict[str, Path], image_file: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kept.png"
    assert main(["--model", str(models["llava"]), "--image", str(image_file), "--method", "lrcp",
                 "--ratio", "0.889", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "lrcp" and report["ratios"] == {"image": 0.889}
    assert report["items"][0]["kept"] == num_kept(report["items"][0]["tokens"], 0.889)
    assert Image.open(out).size[0] > 0

    grid = tmp_path / "grid.png"
    assert main(["--model", str(models["qwen2_5_vl"]), "--image", str(image_file),
                 "--method", "lrcp", "--method", "random", "--ratio", "0.5", "--ratio", "0.889",
                 "-o", str(grid)]) == 0
    assert "scoring" in capsys.readouterr().err  # the progress bar
    single = render(preview(models["qwen2_5_vl"], [image_file], "lrcp", 0.5))
    assert Image.open(grid).width > 2 * single.width * 0.5  # two columns


def test_server_config_is_used(models: dict[str, Path], image_file: Path) -> None:
    """The --hf-overrides token_prune block applies: default method/ratio, min_keep,
    allowed_methods."""
    overrides = json.dumps({"token_prune": {"method": "norm", "prune_ratio": 0.9,
                                            "min_keep": 40, "allowed_methods": ["norm"]}})
    result = preview(models["llava"], [image_file], hf_overrides=overrides)
    assert result.method == "norm" and result.ratios == {"image": 0.9}
    assert result.items[0].kept == num_kept(result.items[0].tokens, 0.9, 40) == 40
    with pytest.raises(PreviewError, match="allowed_methods"):
        preview(models["llava"], [image_file], "lrcp", 0.5, hf_overrides=overrides)


def test_clear_errors(models: dict[str, Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(PreviewError, match="cannot read image"):
        preview(models["llava"], [bad], "lrcp", 0.5)
    with pytest.raises(PreviewError, match="cannot read media"):
        preview(models["llava"], [tmp_path / "missing.png"], "lrcp", 0.5)
    with pytest.raises(PreviewError, match="ratio"):
        preview(models["llava"], [make_image(64, 64)], "lrcp", 1.0)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["--model", str(other), "--image", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert "not supported by the preview" in capsys.readouterr().err
    with pytest.raises(PreviewError, match="images only"):
        preview(models["llava"], [make_video(112, 84, 4, seed=1)], "lrcp", 0.5)


def test_overlay_dims_dropped_patches() -> None:
    img = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8))
    kept = torch.tensor([True, False, False, True, False, True])  # 2 x 3 grid
    out = np.asarray(overlay(img, kept, 2, 3)).astype(float)
    assert out[0, 0, 0] == 200 and out[0, 15, 0] == round(200 * DIM)
    assert out[15, 0, 0] == 200 and out[15, 25, 0] == 200 and out[15, 15, 0] == round(200 * DIM)


def test_grid_api_runs_the_tower_once(models: dict[str, Path], image_file: Path) -> None:
    picture = render_grid(models["llava_next"], [image_file], ["lrcp", "uniform"], [0.5, 0.75])
    assert picture.height > 2 * 100


def test_response_field_helpers() -> None:
    details = RequestDetails()
    assert details.to_json() is None  # text-only: no field
    details.add("lrcp", [("image", "lrcp", 100, 25), ("video", "lrcp", 64, 8),
                         ("image", "lrcp", 50, 13)], {"image": 0.75, "video": 0.875})
    field = details.to_json()
    assert field["tokens"] == 214 and field["kept"] == 46
    assert [(i["modality"], i["index"]) for i in field["items"]] == \
        [("image", 0), ("video", 0), ("image", 1)]
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    final = json.dumps({"choices": [], "usage": usage}).encode()
    assert json.loads(add_field(final, field, stream_chunk=True))["token_prune"] == field
    content = json.dumps({"choices": [{"index": 0}], "usage": usage}).encode()
    assert add_field(content, field, stream_chunk=True) is None  # continuous usage stats
    assert add_field(json.dumps({"choices": []}).encode(), field, stream_chunk=False) is None


def test_image_from_url(image_file: Path) -> None:
    """--image takes http(s) URLs (a local HTTP server here; no outside network in tests)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from vllm_tokenprune.preview import load_media

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(image_file.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{image_file.name}"
        got = load_media(url)
        assert np.array_equal(np.asarray(got), np.asarray(Image.open(image_file).convert("RGB")))
        with pytest.raises(PreviewError, match="cannot read media"):
            load_media(url + ".missing")
    finally:
        server.shutdown()
        server.server_close()


def test_renderer_executors_carry_the_request_context() -> None:
    """vLLM's make_async (loop.run_in_executor) drops context variables; after
    propagate_context the processor thread sees the request's RequestDetails."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from vllm.utils.async_utils import make_async

    from vllm_tokenprune import response

    def processor() -> None:  # what the model's processor does in the renderer's thread
        response.note_request("lrcp", [("image", "lrcp", 10, 3)], {"image": 0.7})

    async def request(run: object) -> dict | None:
        details = response.RequestDetails()
        response._current.set(details)
        await run()
        return details.to_json()

    with ThreadPoolExecutor(max_workers=1) as pool:
        renderer = SimpleNamespace(_mm_executor=pool)
        run = make_async(processor, executor=renderer._mm_executor)
        assert asyncio.run(request(run)) is None  # vLLM's own behaviour
        assert response.propagate_context(renderer)
        assert response.propagate_context(renderer)  # idempotent
        got = asyncio.run(request(run))
        assert got is not None and got["items"][0]["kept"] == 3

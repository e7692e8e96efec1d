"""Client side of the serving benchmark (``python -m benchmarks.serving``): send chat requests,
scrape ``/metrics``, make media.

Requests go through vLLM's own benchmark client when it is importable
(``vllm.benchmarks.lib.endpoint_request_func.async_request_openai_chat_completions``: the
function ``vllm bench serve`` uses for ``--backend openai-chat``; it streams, takes TTFT at the
first chunk with ``choices`` and prompt tokens from the final ``usage`` chunk, and merges an
``extra_body`` dict into the JSON, which is how ``prune_ratio``/``prune_method`` travel per
request). ``--client openai`` uses the ``openai`` package's ``AsyncOpenAI`` the same way.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- results


@dataclass
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    ttft: float = math.nan  # seconds to the first streamed token
    latency: float = math.nan  # seconds to the last token
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    start: float = 0.0  # time.perf_counter() when sent


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    extra_body: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- clients


class Client:
    """Streams chat completions to one server with a fixed output length (``ignore_eos``)."""

    def __init__(self, base_url: str, model: str, output_len: int, kind: str = "auto") -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.output_len = output_len
        self.kind = self._resolve(kind)
        self._session: Any = None
        self._openai: Any = None

    @staticmethod
    def _resolve(kind: str) -> str:
        if kind in ("auto", "vllm"):
            try:
                from vllm.benchmarks.lib.endpoint_request_func import (  # noqa: F401
                    async_request_openai_chat_completions,
                )

                return "vllm"
            except ImportError:
                if kind == "vllm":
                    raise
        return "openai"

    async def __aenter__(self) -> Client:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=3600),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )
        if self.kind == "openai":
            from openai import AsyncOpenAI

            self._openai = AsyncOpenAI(base_url=self.base_url + "/v1", api_key="EMPTY",
                                       max_retries=0, timeout=3600)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._openai is not None:
            await self._openai.close()
        await self._session.close()

    async def chat(self, req: ChatRequest, output_len: int | None = None) -> RequestResult:
        n = output_len or self.output_len
        if self.kind == "vllm":
            return await self._chat_vllm(req, n)
        return await self._chat_openai(req, n)

    async def _chat_vllm(self, req: ChatRequest, n: int) -> RequestResult:
        from vllm.benchmarks.lib.endpoint_request_func import (
            RequestFuncInput,
            async_request_openai_chat_completions,
        )

        inp = RequestFuncInput(
            prompt="", api_url=self.base_url + "/v1/chat/completions", prompt_len=0,
            output_len=n, model=self.model, ignore_eos=True,
            extra_body=dict(req.extra_body), chat_messages=req.messages,
        )
        out = await async_request_openai_chat_completions(inp, self._session)
        return RequestResult(ok=bool(out.success), ttft=out.ttft, latency=out.latency,
                             prompt_tokens=int(out.prompt_len or 0),
                             output_tokens=int(out.output_tokens or 0),
                             error=(out.error or "")[-2000:], start=out.start_time)

    async def _chat_openai(self, req: ChatRequest, n: int) -> RequestResult:
        start = time.perf_counter()
        res = RequestResult(ok=False, start=start)
        last = start
        try:
            stream = await self._openai.chat.completions.create(
                model=self.model, messages=req.messages, max_completion_tokens=n, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, **req.extra_body},
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices:
                    if math.isnan(res.ttft):
                        res.ttft = now - start
                    last = now
                elif chunk.usage is not None:
                    res.prompt_tokens = chunk.usage.prompt_tokens
                    res.output_tokens = chunk.usage.completion_tokens
            res.ok = not math.isnan(res.ttft)
            res.latency = last - start
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            res.error = f"{type(e).__name__}: {e}"[-2000:]
        return res

    async def run_wave(self, reqs: list[ChatRequest], concurrency: int) -> list[RequestResult]:
        """Closed loop: at most ``concurrency`` requests in flight."""
        sem = asyncio.Semaphore(concurrency)

        async def one(r: ChatRequest) -> RequestResult:
            async with sem:
                return await self.chat(r)

        return list(await asyncio.gather(*(one(r) for r in reqs)))

    # -- server endpoints
    async def get_text(self, path: str) -> str:
        async with self._session.get(self.base_url + path) as resp:
            resp.raise_for_status()
            return await resp.text()

    async def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """(status, JSON body or None) of a POST to the server."""
        async with self._session.post(self.base_url + path, json=body) as resp:
            data = await resp.json() if resp.status == 200 else None
            return resp.status, data

    async def metrics(self) -> Metrics:
        return Metrics.parse(await self.get_text("/metrics"))


async def served_model(base_url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(base_url.rstrip("/") + "/v1/models") as r:
        r.raise_for_status()
        data = await r.json()
    return str(data["data"][0]["id"])


# --------------------------------------------------------------------------- /metrics


@dataclass
class Metrics:
    """The few series the benchmark reads from a Prometheus text scrape."""

    scorer_sum: dict[str, float]  # tokenprune_scorer_seconds_sum by method (all modalities)
    scorer_count: dict[str, float]
    kv_usage: float | None  # vllm:kv_cache_usage_perc (0..1)
    num_blocks: int | None  # from vllm:cache_config_info
    block_size: int | None

    @classmethod
    def parse(cls, text: str) -> Metrics:
        from prometheus_client.parser import text_string_to_metric_families

        ssum: dict[str, float] = {}
        scount: dict[str, float] = {}
        kv = None
        blocks = bsize = None
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "tokenprune_scorer_seconds_sum":
                    m = s.labels.get("method", "?")
                    ssum[m] = ssum.get(m, 0.0) + s.value
                elif s.name == "tokenprune_scorer_seconds_count":
                    m = s.labels.get("method", "?")
                    scount[m] = scount.get(m, 0.0) + s.value
                elif s.name == "vllm:kv_cache_usage_perc":
                    kv = (kv or 0.0) + s.value
                elif s.name == "vllm:cache_config_info":
                    if s.labels.get("num_gpu_blocks") not in (None, "None"):
                        blocks = int(s.labels["num_gpu_blocks"])
                    if s.labels.get("block_size") not in (None, "None"):
                        bsize = int(s.labels["block_size"])
        return cls(ssum, scount, kv, blocks, bsize)

    def scorer_total(self) -> tuple[float, float]:
        return sum(self.scorer_sum.values()), sum(self.scorer_count.values())


def scorer_delta(before: Metrics, after: Metrics) -> tuple[float, int]:
    """(seconds, calls) of scorer time between two scrapes."""
    s0, c0 = before.scorer_total()
    s1, c1 = after.scorer_total()
    return s1 - s0, int(round(c1 - c0))


async def poll_kv_usage(client: Client, stop: asyncio.Event, period: float = 0.05) -> list[float]:
    """Sample the KV-cache usage gauge until ``stop`` is set."""
    samples: list[float] = []
    while not stop.is_set():
        try:
            m = await client.metrics()
            if m.kv_usage is not None:
                samples.append(m.kv_usage)
        except Exception:  # noqa: BLE001 - a failed scrape is just a missing sample
            pass
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
        except asyncio.TimeoutError:
            pass
    return samples


# --------------------------------------------------------------------------- media


def _jpeg_url(arr: np.ndarray, quality: int = 90) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class MediaFactory:
    """Unique media per request (so that no cache of vLLM's can serve a repeated item).

    Images: a few structured base images (``testing.media.make_image``) with a per-request
    16x16 block of random pixels in one corner; JPEG data URLs. Videos: moving structured frames
    with a per-request block, written as mp4 with OpenCV.
    """

    def __init__(self, width: int, height: int, seed: int = 0, bases: int = 4) -> None:
        from vllm_tokenprune.testing.media import make_image

        self.width, self.height = width, height
        self.rng = np.random.default_rng(seed)
        self.bases = [np.asarray(make_image(width, height, seed=seed + i)) for i in range(bases)]
        self.count = 0

    def image_url(self) -> str:
        self.count += 1
        arr = self.bases[self.count % len(self.bases)].copy()
        arr[:16, :16] = self.rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        return _jpeg_url(arr)

    def video_url(self, width: int, height: int, frames: int, fps: float) -> str:
        import cv2

        self.count += 1
        base = self.bases[self.count % len(self.bases)]
        base = np.asarray(Image.fromarray(base).resize((width + 8 * frames, height)))
        mark = self.rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        fd, path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
        try:
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
            for i in range(frames):
                frame = np.ascontiguousarray(base[:, 8 * i: 8 * i + width, ::-1])  # pan right
                frame[:16, :16] = mark
                writer.write(frame)
            writer.release()
            with open(path, "rb") as f:
                data = f.read()
        finally:
            os.unlink(path)
        return "data:video/mp4;base64," + base64.b64encode(data).decode()


def image_messages(url: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def video_messages(url: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}]


def text_messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def percentiles(values: Iterable[float], qs: Iterable[float] = (50, 90, 99)) -> list[float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return [math.nan for _ in qs]
    return [float(np.percentile(arr, q)) for q in qs]

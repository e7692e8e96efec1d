"""End-to-end serving benchmark: does visual-token pruning pay inside vLLM's real engine?

Starts a vLLM OpenAI-compatible server with the plugin (or targets one with ``--base-url``),
drives it with vLLM's own benchmark client (the streaming ``openai-chat`` request function of
``vllm bench serve``; ``--client openai`` for the ``openai`` package instead) and compares
configurations side by side, interleaved, on the same running server in one run:

* images at several ``prune_ratio`` values for several ``prune_method`` values (the request
  fields travel in the request body, so one server serves them all) and the unpruned request
  (ratio 0); ``--text-ref`` adds a text-only request of the unpruned prompt's length;
* latency phase (one request at a time, every configuration once per round in a shuffled
  order): TTFT and end-to-end latency (p50/p90/p99), prompt tokens, the scorer's worker time per
  request (``tokenprune_scorer_seconds`` histogram deltas on ``/metrics``) and vLLM's own
  encoder timing (``--enable-mm-processor-stats``, read through the dev-mode
  ``/collective_rpc get_encoder_timing_stats``; it times ``embed_multimodal``, so the scorer is
  subtracted);
* throughput phase (waves of ``--wave-requests`` requests at ``--concurrency``, every
  configuration once per round in a shuffled order): request, output-token and total-token
  throughput;
* KV cache: one long request per ratio, sampling vLLM's ``vllm:kv_cache_usage_perc`` gauge;
  blocks = peak usage x ``num_gpu_blocks`` (``vllm:cache_config_info``), next to
  ``ceil(tokens / block_size)``;
* video: LRCP ``video_prune_ratio`` on the TokenPrune server, then vLLM's EVS
  (``--video-pruning-rate``) on a plain-architecture server (a TokenPrune architecture refuses
  EVS) at the same retained fraction on the same videos, with an unpruned image request
  interleaved on both servers as a drift reference.

Examples::

    python -m benchmarks.serving                         # full default run (vl7b preset)
    python -m benchmarks.serving --model mid             # the LM-bound preset
    python -m benchmarks.serving --quick                 # ~3 min: LRCP at 0 and 0.889
    python -m benchmarks.serving --docs docs             # also write docs/benchmarks.md + plots
    python -m benchmarks.serving --base-url http://127.0.0.1:8000 --no-evs   # a running server

Nothing is downloaded: the model is a random-weight Qwen2.5-VL built locally with
``vllm_tokenprune.testing.tiny_model.build_qwen2_5_vl`` and cached under ``--cache-dir``:
``--model vl7b`` (the default) a 20-layer, 225M-parameter LM with an 8-block, 19M-parameter vision
tower that costs Qwen2.5-VL-7B's share of compute per visual token (``PRESETS``,
``benchmarks/model_flops.py``); ``--model mid`` the same LM with a 4-block, 2M-parameter tower
(LM-bound: the encoder is ~4% of the unpruned TTFT); both 1024x1024 max pixels, 784x588 images of
588 visual tokens; ``--model tiny``: the tests' model.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving import client as bc
from benchmarks.serving import report

HERE = Path(__file__).resolve().parent

ARCH = "TokenPruneQwen2_5_VLForConditionalGeneration"
PROMPT = "Describe this image in detail."
VIDEO_PROMPT = "Describe this video in detail."

#: ``rope_theta`` 1e6 as in Qwen2.5-VL (the tests' tiny model uses 10, see tiny_model.py).
_MID_LM = {"text_layers": 20, "hidden": 1024, "intermediate_size": 2816, "num_heads": 16,
           "num_kv_heads": 4, "max_pixels": 1024 * 1024, "init_std": 0.02,
           "rope_theta": 1000000.0}

#: Model presets for ``build_qwen2_5_vl``: (builder kwargs, default image size).
#: ``vl7b`` (the default, the one the README quotes): the mid LM with a vision tower whose
#: multiply-accumulates per LM token are Qwen2.5-VL-7B's share of its LM's (0.40 vs 0.41 at 588
#: tokens, 0.450 vs 0.449 at 2880; ``benchmarks/model_flops.py``): 8 blocks (1 of them full
#: attention, as 4 of 32 in the 7B), width 448, MLP 1216 (the 7B's 2.67 MLP/width ratio), 4 patches
#: per LM token. ``mid``: the same LM with a 2M-parameter tower (vision = 3% of the LM's compute
#: per token): LM-bound, an upper bound on what pruning after the encoder can save.
PRESETS: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {
    "tiny": ({}, (448, 336)),
    "mid": ({**_MID_LM, "vision_depth": 4, "vision_hidden": 128, "vision_intermediate": 512,
             "vision_heads": 2}, (784, 588)),
    "vl7b": ({**_MID_LM, "vision_depth": 8, "vision_hidden": 448, "vision_intermediate": 1216,
              "vision_heads": 7}, (784, 588)),
}
PRESET_LABELS = {"tiny": "the tests' model", "mid": "LM-bound",
                 "vl7b": "Qwen2.5-VL-7B's vision/LM compute ratio"}
DEFAULT_METHODS = ["lrcp", "svd_prune", "resprune", "random", "uniform"]
DEFAULT_RATIOS = [0.0, 0.5, 0.75, 0.889, 0.944]


@dataclass(frozen=True)
class Config:
    """One benchmarked request type."""

    name: str
    kind: str  # "image" | "text" | "video"
    method: str | None = None
    ratio: float = 0.0

    def extra_body(self, tokenprune: bool = True) -> dict[str, Any]:
        if not tokenprune or self.kind == "text":
            return {}
        key = "video_prune_ratio" if self.kind == "video" else "prune_ratio"
        body: dict[str, Any] = {key: self.ratio}
        if self.method is not None and self.ratio > 0:
            body["prune_method"] = self.method
        return body


def image_configs(methods: Sequence[str], ratios: Sequence[float]) -> list[Config]:
    configs = [Config("unpruned", "image", None, 0.0)] if 0.0 in ratios else []
    for m in methods:
        configs += [Config(f"{m}@{r:g}", "image", m, r) for r in ratios if r > 0]
    return configs


# --------------------------------------------------------------------------- model, machine


def ensure_model(preset: str, cache_dir: Path) -> Path:
    from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

    kwargs = PRESETS[preset][0]
    key = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir / f"qwen2_5_vl-{preset}-{key}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[bench] building the {preset} random-weight Qwen2.5-VL in {out}", flush=True)
    build_qwen2_5_vl(tmp, seed=0, **kwargs)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                             "Socket(s)", "Flags"):
                info[k.strip()] = v.strip()
        info["avx512_bf16"] = "avx512_bf16" in info.pop("Flags", "")
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("vllm", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


# --------------------------------------------------------------------------- phases


class Bench:
    """Runs the phases against one TokenPrune server (and optionally one EVS server)."""

    def __init__(self, args: argparse.Namespace, media: bc.MediaFactory) -> None:
        self.args = args
        self.media = media
        self.rng = np.random.default_rng(args.seed)
        self.results: dict[str, Any] = {"latency": [], "waves": [], "kv": [], "video": [],
                                        "errors": []}

    # -- requests
    def request(self, cfg: Config, *, tokenprune: bool = True,
                text: str | None = None) -> bc.ChatRequest:
        a = self.args
        if cfg.kind == "text":
            return bc.ChatRequest(bc.text_messages(text or PROMPT), {})
        if cfg.kind == "video":
            url = self.media.video_url(a.video_w, a.video_h, a.video_frames, a.video_fps)
            return bc.ChatRequest(bc.video_messages(url, VIDEO_PROMPT), cfg.extra_body(tokenprune))
        return bc.ChatRequest(bc.image_messages(self.media.image_url(), PROMPT),
                              cfg.extra_body(tokenprune))

    def _error(self, where: str, cfg: Config, res: bc.RequestResult) -> None:
        msg = f"{where} {cfg.name}: {res.error.strip().splitlines()[-1] if res.error else '?'}"
        self.results["errors"].append(msg)
        print(f"[bench] request failed: {msg}", flush=True)

    async def encoder_stats(self, client: bc.Client) -> float | None:
        """Sum of vLLM's per-request ``encoder_forward_secs`` since the last call (clears)."""
        try:
            status, data = await client.post_json("/collective_rpc",
                                                  {"method": "get_encoder_timing_stats"})
        except Exception:  # noqa: BLE001 - no dev mode on a --base-url server: no figure
            return None
        if status != 200 or not isinstance(data, dict):
            return None
        total = 0.0
        for worker in data.get("results", []):
            for stats in (worker or {}).values():
                total += float(stats.get("encoder_forward_secs", 0.0))
        return total

    async def text_of_length(self, client: bc.Client, tokens: int) -> str:
        """A text prompt whose chat-templated length is ``tokens`` (+-1), via ``/tokenize``."""
        words = ("the quick brown fox jumps over the lazy dog and describes the picture in one "
                 "sentence ").split()

        async def count(n: int) -> int:
            text = " ".join(words[i % len(words)] for i in range(n))
            status, data = await client.post_json(
                "/tokenize", {"model": client.model, "messages": bc.text_messages(text),
                              "add_generation_prompt": True})
            if status != 200:
                raise RuntimeError(f"/tokenize answered HTTP {status}")
            return int(data["count"])

        lo, hi = 1, max(8, tokens)
        while await count(hi) < tokens:
            hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            if await count(mid) < tokens:
                lo = mid + 1
            else:
                hi = mid
        return " ".join(words[i % len(words)] for i in range(lo))

    # -- phase: warm-up
    async def warmup(self, client: bc.Client, configs: Sequence[Config]) -> None:
        seen: set[str | None] = set()
        for cfg in sorted(configs, key=lambda c: -c.ratio):
            if cfg.method in seen:
                continue
            seen.add(cfg.method)
            res = await client.chat(self.request(cfg), output_len=2)
            if not res.ok:
                self._error("warm-up", cfg, res)
        await self.encoder_stats(client)

    # -- phase: latency (concurrency 1)
    async def latency_phase(self, client: bc.Client, configs: Sequence[Config], rounds: int,
                            text: str | None) -> None:
        for rnd in range(rounds):
            order = [configs[i] for i in self.rng.permutation(len(configs))]
            for cfg in order:
                req = self.request(cfg, text=text)
                before = await client.metrics()
                res = await client.chat(req)
                after = await client.metrics()
                enc = await self.encoder_stats(client)
                s, calls = bc.scorer_delta(before, after)
                if not res.ok:
                    self._error("latency", cfg, res)
                self.results["latency"].append({
                    "config": cfg.name, "round": rnd, "ok": res.ok, "ttft": res.ttft,
                    "latency": res.latency, "prompt_tokens": res.prompt_tokens,
                    "output_tokens": res.output_tokens, "scorer_s": s, "scorer_calls": calls,
                    "encoder_forward_s": enc,
                })
            print(f"[bench] latency round {rnd + 1}/{rounds} done", flush=True)

    # -- phase: throughput (closed loop at --concurrency)
    async def throughput_phase(self, client: bc.Client, configs: Sequence[Config],
                               rounds: int) -> None:
        a = self.args
        for rnd in range(rounds):
            order = [configs[i] for i in self.rng.permutation(len(configs))]
            for cfg in order:
                reqs = [self.request(cfg) for _ in range(a.wave_requests)]
                before = await client.metrics()
                t0 = time.perf_counter()
                outs = await client.run_wave(reqs, a.concurrency)
                duration = time.perf_counter() - t0
                after = await client.metrics()
                await self.encoder_stats(client)
                s, calls = bc.scorer_delta(before, after)
                for res in outs:
                    if not res.ok:
                        self._error("throughput", cfg, res)
                ok = [r for r in outs if r.ok]
                self.results["waves"].append({
                    "config": cfg.name, "round": rnd, "duration": duration,
                    "requests": len(outs), "ok": len(ok),
                    "prompt_tokens": sum(r.prompt_tokens for r in ok),
                    "output_tokens": sum(r.output_tokens for r in ok),
                    "ttfts": [r.ttft for r in ok], "latencies": [r.latency for r in ok],
                    "scorer_s": s, "scorer_calls": calls,
                })
            print(f"[bench] throughput round {rnd + 1}/{rounds} done", flush=True)

    # -- phase: KV cache
    async def kv_phase(self, client: bc.Client, configs: Sequence[Config]) -> None:
        n = self.args.kv_output_len
        for cfg in configs:
            stop = asyncio.Event()
            poller = asyncio.create_task(bc.poll_kv_usage(client, stop))
            res = await client.chat(self.request(cfg), output_len=n)
            await asyncio.sleep(0.05)
            stop.set()
            samples = await poller
            m = await client.metrics()
            if not res.ok:
                self._error("kv", cfg, res)
            self.results["kv"].append({
                "config": cfg.name, "ratio": cfg.ratio, "ok": res.ok,
                "prompt_tokens": res.prompt_tokens, "output_tokens": res.output_tokens,
                "peak_usage": max(samples) if samples else None, "samples": len(samples),
                "num_blocks": m.num_blocks, "block_size": m.block_size,
            })
        print("[bench] KV-cache phase done", flush=True)

    # -- phase: video
    async def video_phase(self, client: bc.Client, server: str, configs: Sequence[Config],
                          rounds: int, tokenprune: bool) -> None:
        video = next(c for c in configs if c.kind == "video")
        probe = await client.chat(self.request(video, tokenprune=tokenprune), output_len=2)
        if not probe.ok:  # e.g. no video decoder in this build: say so, skip the phase
            self._error(f"video ({server})", video, probe)
            self.results["video_blocked"] = (
                f"{server}: {probe.error.strip().splitlines()[-1] if probe.error else '?'}")
            return
        for cfg in configs:  # warm-up
            if cfg is not video:
                await client.chat(self.request(cfg, tokenprune=tokenprune), output_len=2)
        for rnd in range(rounds):
            order = [configs[i] for i in self.rng.permutation(len(configs))]
            for cfg in order:
                before = await client.metrics()
                res = await client.chat(self.request(cfg, tokenprune=tokenprune))
                after = await client.metrics()
                enc = await self.encoder_stats(client)
                s, calls = bc.scorer_delta(before, after)
                if not res.ok:
                    self._error(f"video ({server})", cfg, res)
                self.results["video"].append({
                    "server": server, "config": cfg.name, "round": rnd, "ok": res.ok,
                    "ttft": res.ttft, "latency": res.latency,
                    "prompt_tokens": res.prompt_tokens, "scorer_s": s,
                    "encoder_forward_s": enc,
                })
        print(f"[bench] video phase on the {server} server done", flush=True)


# --------------------------------------------------------------------------- orchestration


def launch_command(model: Path, port: int, server_args: Sequence[str]) -> list[str]:
    """The command line of the benchmark's server: ``launch.py`` (vLLM's API server with its
    multimodal timing on) with the fast CPU options and ``server_args``."""
    from vllm_tokenprune.testing.server import FAST_CPU_ARGS

    return [sys.executable, str(HERE / "launch.py"), "--model", str(model), "--port", str(port),
            "--host", "127.0.0.1", *FAST_CPU_ARGS, *server_args]


def start_server(model: Path, server_args: list[str], env: dict[str, str | None],
                 log_path: Path, encoder_stats: bool) -> Any:
    """A :class:`VLLMServer`, started through ``benchmarks/serving/launch.py`` (vLLM's API server
    with its multimodal timing on) unless ``encoder_stats`` is false."""
    import subprocess

    from vllm_tokenprune.testing.server import VLLMServer, free_port, server_env

    if not encoder_stats:
        return VLLMServer(model, server_args, env=env, log_path=log_path)

    class BenchServer(VLLMServer):
        def __init__(self) -> None:  # VLLMServer.__init__ with another entry point
            self.model = str(model)
            self.port = free_port()
            self.base_url = f"http://127.0.0.1:{self.port}"
            self.log_path = log_path
            self.cmd = launch_command(model, self.port, server_args)
            self._log = open(self.log_path, "wb")  # noqa: SIM115
            self._started, self._timeout = time.monotonic(), 900.0
            self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=server_env(env), start_new_session=True)
            self.startup_seconds = None
            self.wait_ready()

    return BenchServer()


def server_args(args: argparse.Namespace, *, evs: bool) -> list[str]:
    from vllm_tokenprune.testing.server import token_prune_overrides

    common = ["--dtype", "float32", "--seed", "0", "--no-enable-prefix-caching",
              "--mm-processor-cache-gb", "0"]
    if args.max_model_len != 4096:  # FAST_CPU_ARGS already say 4096
        common += ["--max-model-len", str(args.max_model_len)]
    if args.max_pixels is not None:  # the presets' processors cap images at 1024 x 1024 pixels
        common += ["--mm-processor-kwargs", json.dumps({"max_pixels": args.max_pixels})]
    if evs:
        return [*common, "--video-pruning-rate", str(args.video_ratio)]
    if "alvts" not in args.methods:
        overrides = token_prune_overrides(ARCH, method="lrcp", prune_ratio=0.0)
        return [*common, "--hf-overrides", overrides]
    # alvts is served only where named, and keeps each item whole in one prefill step, so a
    # step must hold the largest item (the presets' largest video: 4011 tokens)
    from vllm_tokenprune import list_methods

    overrides = token_prune_overrides(ARCH, method="lrcp", prune_ratio=0.0,
                                      allowed_methods=[*list_methods(), "alvts"])
    return [*common, "--disable-chunked-mm-input", "--max-num-batched-tokens",
            str(max(4096, args.max_model_len)), "--scheduler-cls",
            "vllm_tokenprune.alvts.scheduler.WholeMediaScheduler", "--hf-overrides", overrides]


def command_line(cmd: Sequence[str], env: dict[str, str]) -> str:
    launcher = str(HERE / "launch.py")
    exe = [("python" if c == sys.executable else
            "benchmarks/serving/launch.py" if c == launcher else c) for c in cmd]
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    return f"{prefix} {shlex.join(exe)}".strip()


SERVER_ENV = {"VLLM_PLUGINS": "tokenprune", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_SERVER_DEV_MODE": "1"}


async def _tp_session(bench: Bench, base_url: str, args: argparse.Namespace,
                      configs: list[Config], video_cfgs: list[Config]) -> None:
    model = await bc.served_model(base_url)
    async with bc.Client(base_url, model, args.output_len, args.client) as client:
        bench.results["meta"]["client"] = client.kind
        print(f"[bench] client: {client.kind}; warming up", flush=True)
        await bench.warmup(client, configs)
        text = None
        lat_cfgs = list(configs)
        if args.text_ref and any(c.name == "unpruned" for c in configs):
            probe = await client.chat(bench.request(configs[0]), output_len=1)
            tokens = probe.prompt_tokens
            text = await bench.text_of_length(client, tokens)
            text_cfg = Config("text-only", "text")
            lat_cfgs.append(text_cfg)
            await client.chat(bench.request(text_cfg, text=text), output_len=2)
            await bench.encoder_stats(client)  # drop the probe's entry
        t0 = time.perf_counter()
        await bench.latency_phase(client, lat_cfgs, args.rounds, text)
        t1 = time.perf_counter()
        if args.tp_rounds > 0:
            await bench.throughput_phase(client, configs, args.tp_rounds)
        t2 = time.perf_counter()
        if args.kv:
            kv_cfgs = [c for c in configs if c.method in (None, args.kv_method)]
            await bench.kv_phase(client, kv_cfgs)
        t3 = time.perf_counter()
        if video_cfgs:
            await bench.video_phase(client, "tokenprune", video_cfgs, args.video_rounds, True)
        t4 = time.perf_counter()
        bench.results["meta"]["phase_seconds"] = {
            "latency": t1 - t0, "throughput": t2 - t1, "kv": t3 - t2, "video_tokenprune": t4 - t3}


async def _evs_session(bench: Bench, base_url: str, args: argparse.Namespace,
                       video_cfgs: list[Config]) -> None:
    model = await bc.served_model(base_url)
    async with bc.Client(base_url, model, args.output_len, args.client) as client:
        t0 = time.perf_counter()
        await bench.video_phase(client, "evs", video_cfgs, args.video_rounds, False)
        bench.results["meta"]["phase_seconds"]["video_evs"] = time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.time()
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.serving " + shlex.join(args.argv),
        "machine": machine_info(), "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "servers": [],
    }
    model_dir: Path | None = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
    elif not args.base_url:
        model_dir = ensure_model(args.model, Path(args.cache_dir))
        meta["preset"] = {"name": args.model, "label": PRESET_LABELS.get(args.model, "")}
    else:  # a running server: its model id is often a local checkpoint directory
        served = Path(asyncio.run(bc.served_model(args.base_url)))
        model_dir = served if (served / "config.json").exists() else None
    if model_dir is not None:
        from benchmarks.serving.offline import model_summary

        meta["model_dir"] = str(model_dir)
        meta["model"] = model_summary(model_dir)
    meta["image_size"] = [args.image_w, args.image_h]

    media = bc.MediaFactory(args.image_w, args.image_h, seed=args.seed)
    if model_dir is not None and args.offline:
        from benchmarks.serving.offline import image_from_data_url, time_image_path

        print("[bench] timing preprocessing and the vision tower offline (transformers)",
              flush=True)
        meta["offline"] = time_image_path(model_dir, image_from_data_url(media.image_url()))

    bench = Bench(args, media)
    bench.results["meta"] = meta
    configs = image_configs(args.methods, args.ratios)
    video_cfgs: list[Config] = []
    if args.video:
        video_cfgs = [Config("video-ref-image", "image", None, 0.0),
                      Config(f"video {args.video_method}@{args.video_ratio:g}", "video",
                             args.video_method, args.video_ratio),
                      Config("video unpruned", "video", None, 0.0)]

    if args.base_url:
        asyncio.run(_tp_session(bench, args.base_url, args, configs, video_cfgs))
    else:
        env = dict(SERVER_ENV)
        log = Path(args.log_dir) / "bench-tokenprune-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[bench] starting the TokenPrune server (log: {log})", flush=True)
        with start_server(model_dir, server_args(args, evs=False), dict(env), log,
                          args.encoder_stats) as server:
            meta["servers"].append({"role": "tokenprune", "startup_s": server.startup_seconds,
                                    "command": command_line(server.cmd, env)})
            print(f"[bench] server ready in {server.startup_seconds:.0f}s", flush=True)
            asyncio.run(_tp_session(bench, server.base_url, args, configs, video_cfgs))
    meta.setdefault("phase_seconds", {})

    evs_cfgs = [Config("video-ref-image", "image", None, 0.0),
                Config(f"video evs@{args.video_ratio:g}", "video", None, args.video_ratio)]
    if args.video and args.evs and "video_blocked" not in bench.results:
        if args.evs_base_url:
            asyncio.run(_evs_session(bench, args.evs_base_url, args, evs_cfgs))
        elif model_dir is not None:
            env = {k: v for k, v in SERVER_ENV.items() if k != "VLLM_PLUGINS"}
            log = Path(args.log_dir) / "bench-evs-server.log"
            print(f"[bench] starting the plain-architecture EVS server (log: {log})",
                  flush=True)
            with start_server(model_dir, server_args(args, evs=True),
                              {**env, "VLLM_PLUGINS": None}, log, args.encoder_stats) as server:
                meta["servers"].append({"role": "evs", "startup_s": server.startup_seconds,
                                        "command": command_line(server.cmd, env)})
                asyncio.run(_evs_session(bench, server.base_url, args, evs_cfgs))
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.time() - start
    return bench.results


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help="LRCP at ratios 0 and 0.889, fewer requests, no video (~3 min)")
    p.add_argument("--model", choices=sorted(PRESETS), default="vl7b",
                   help="model preset to build: vl7b (default; Qwen2.5-VL-7B's vision/LM compute "
                        "ratio), mid (LM-bound: a 2M-parameter vision tower), tiny")
    p.add_argument("--model-dir", help="use this Qwen2.5-VL checkpoint instead of a preset")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/vllm-tokenprune/bench"))
    p.add_argument("--base-url", help="target a running TokenPrune server instead of starting one")
    p.add_argument("--evs-base-url", help="target a running plain server with EVS for video")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--ratios", nargs="+", type=float, default=None)
    p.add_argument("--image-size", default=None, help="WxH of the images (default per preset)")
    p.add_argument("--rounds", type=int, default=None,
                   help="latency rounds (one request per configuration per round)")
    p.add_argument("--tp-rounds", type=int, default=None, help="throughput rounds")
    p.add_argument("--wave-requests", type=int, default=None,
                   help="requests per configuration per throughput round")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--output-len", type=int, default=16,
                   help="generated tokens per request (ignore_eos)")
    p.add_argument("--client", choices=["auto", "vllm", "openai"], default="auto")
    p.add_argument("--text-ref", action="store_true",
                   help="also time a text-only prompt of the unpruned prompt's length (its TTFT "
                        "difference to the unpruned image is a noisy cross-check of the "
                        "encoder + preprocessing time)")
    p.add_argument("--no-encoder-stats", dest="encoder_stats", action="store_false",
                   help="start the stock API server module (no vLLM encoder timing)")
    p.add_argument("--no-offline", dest="offline", action="store_false",
                   help="skip the offline preprocessing/encoder timing")
    p.add_argument("--no-kv", dest="kv", action="store_false")
    p.add_argument("--kv-output-len", type=int, default=48)
    p.add_argument("--kv-method", default="lrcp")
    p.add_argument("--video", dest="video", action="store_true", default=None)
    p.add_argument("--no-video", dest="video", action="store_false")
    p.add_argument("--no-evs", dest="evs", action="store_false")
    p.add_argument("--video-method", default="lrcp")
    p.add_argument("--video-ratio", type=float, default=0.75)
    p.add_argument("--video-size", default="336x252")
    p.add_argument("--video-frames", type=int, default=32)
    p.add_argument("--video-fps", type=float, default=4.0)
    p.add_argument("--video-rounds", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="the servers' image processor max_pixels (--mm-processor-kwargs): the "
                        "presets cap images at 1024x1024 pixels (1,337 visual tokens); e.g. "
                        "3136x2352 images (9,408 tokens) need 7375872 and --max-model-len 10240; "
                        "needs --no-offline (the offline timing reads the checkpoint's processor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all raw results here")
    p.add_argument("--report-only", metavar="JSON",
                   help="run nothing: print (and with --docs write) the report of a --json file")
    p.add_argument("--docs", help="write benchmarks.md and bench_*.png into this directory")
    p.add_argument("--log-dir", default="/tmp/vllm-tokenprune-bench-logs")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    if args.methods is None:
        args.methods = ["lrcp"] if q else DEFAULT_METHODS
    if args.ratios is None:
        args.ratios = [0.0, 0.889] if q else DEFAULT_RATIOS
    args.rounds = args.rounds or (3 if q else 4)
    args.tp_rounds = args.tp_rounds if args.tp_rounds is not None else (1 if q else 2)
    args.wave_requests = args.wave_requests or args.concurrency
    args.video_rounds = args.video_rounds or 5
    if args.video is None:
        args.video = not q
    size = args.image_size or "x".join(map(str, PRESETS[args.model][1]))
    args.image_w, args.image_h = (int(v) for v in size.lower().split("x"))
    args.video_w, args.video_h = (int(v) for v in args.video_size.lower().split("x"))
    for r in [*args.ratios, args.video_ratio]:
        if not 0.0 <= r < 1.0:
            p.error(f"ratios must be in [0, 1): {r}")
    if args.max_pixels is not None and args.offline and not args.report_only:
        p.error("--max-pixels needs --no-offline (the offline timing uses the checkpoint's own "
                "processor configuration, which --max-pixels does not change)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:  # re-render the tables/docs of a saved run
        results = json.loads(Path(args.report_only).read_text())["results"]
        args.json = None
    else:
        results = run(args)
    summary = report.summarize(results)
    text = report.render_text(summary)
    print(text, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary},
                                              indent=1, default=_json_default))
    if args.docs:
        report.write_docs(results, summary, Path(args.docs))
        print(f"[bench] wrote {Path(args.docs) / 'benchmarks.md'} and plots", flush=True)
    failed = sum(1 for r in results["latency"] if not r["ok"])
    return 1 if failed or not results["latency"] else 0


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())

"""A real Prometheus (Debian's ``prometheus``) scraping a real CPU vLLM server with the plugin.

One dedicated server (its counters see only this module's requests) and one Prometheus started
from the shipped ``deploy/prometheus/prometheus.yml`` (target and a 1 s scrape interval
rewritten). The module sends image requests at several prune ratios and methods, each next to
the same request at ``prune_ratio`` 0, and checks through Prometheus's HTTP API that:

* every PromQL expression of ``deploy/grafana/tokenprune-dashboard.json`` returns data, and the
  dashboard's template variables resolve to this server's model and methods;
* ``tokenprune_saved_visual_tokens_total`` equals the savings the responses imply
  (``usage.prompt_tokens`` at ratio 0 minus at the ratio), per method and in total;
* ``tokenprune_scorer_seconds``, measured in the worker process, is on the API server's
  ``/metrics`` and grows with pruned requests (and only with them).

It also renders the dashboard's panels from this Prometheus (``scripts/plot_dashboard.py``);
``TOKENPRUNE_UPDATE_DOCS=1`` writes the picture to ``docs/dashboard.png``.

The same server serves the suite's ``alvts`` video test (it has the flags ``alvts`` needs and a
step budget that holds vLLM's largest Qwen video item, which tests/test_alvts_server.py's
servers do not: docs/alvts.md): a video routed at ``video_prune_ratio`` keeps
``usage.prompt_tokens``, reports its routing in ``token_prune``, counts its skipped
token-layers with ``modality="video"`` and gives the next-token logprobs of transformers' model
routed by :mod:`vllm_tokenprune.alvts.reference`. It needs no Prometheus (the ``served``
fixture); its requests are booked in the module's ledger like every other.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from scripts import plot_dashboard as pd
from tests import _pool
from tests._suite import record_error
from tests.conftest import QWEN25_ARCH, tiny_qwen
from vllm_tokenprune import num_kept
from vllm_tokenprune.response import FIELD
from vllm_tokenprune.testing.media import (
    chat_messages,
    make_image,
    make_video,
    media_messages,
    qwen_image_tokens,
)
from vllm_tokenprune.testing.server import VLLMServer, free_port, token_prune_overrides

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.server

MODEL_NAME = "tiny-qwen"
METHODS = ("lrcp", "svd_prune", "divprune", "uniform")
#: The layer-wise method: drops nothing at the input, counts skipped visual token-layers.
LAYERWISE = "alvts"
#: The tiny Qwen2.5-VL's decoder layers, all routed (first_layer 0).
ROUTED_LAYERS = 2
#: The stack's server: the shared Qwen server options, with what alvts needs (whole items per
#: step, so the step budget holds the largest item, 1792 tokens; no prefix caching).
SERVER_ARGS = ["--dtype", "float32", "--max-num-batched-tokens", "2048", "--seed", "0",
               "--no-enable-prefix-caching", "--disable-chunked-mm-input",
               "--scheduler-cls", "vllm_tokenprune.alvts.scheduler.WholeMediaScheduler"]
RATIOS = (0.5, 0.75, 0.889)
SIZES = ((224, 224), (280, 196), (336, 252), (252, 336))
PROMPT = "Describe this image."
SCRAPE_S = 1.0
ROUNDS = 3
SHIPPED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
#: The alvts video test: the ratio its video is routed at (the request's image ratio is 0).
VIDEO_RATIO = 0.75
#: Both sides float32 on CPU (tests/test_alvts_server.py's tolerance, measured ~1e-6).
LOGPROB_TOL = 1e-4
#: The unrouted reference (the control) must differ from the server by more than this many
#: tolerances on the compared token ids.
CONTROL_FACTOR = 10


# --------------------------------------------------------------------------- Prometheus


def prometheus_binaries() -> tuple[str, str]:
    """``prometheus`` and ``promtool`` from ``PATH``: ``scripts/setup-cpu.sh`` installs them
    (Debian's ``prometheus``); the tests install nothing, and skip saying so without them."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        pytest.skip("Prometheus is not installed: `prometheus` and `promtool` are not on PATH "
                    "(scripts/setup-cpu.sh installs them as root: `apt-get install "
                    "prometheus`)")
    return prom, tool


def scrape_config_for(vllm_port: int) -> dict[str, Any]:
    """The shipped config with the vLLM job pointed at the test server, scraped every second."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    interval = f"{SCRAPE_S:g}s"
    config["global"].update(scrape_interval=interval, scrape_timeout=interval,
                            evaluation_interval=interval)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vllm"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{vllm_port}"]
    config["scrape_configs"] = [job]
    return config


class PrometheusProcess:
    def __init__(self, binary: str, config: Path, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")  # noqa: SIM115
        self.log_path = log
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"prometheus not ready: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- the stack


@dataclass
class Ledger:
    """What the responses imply, for every request this module sent to its server."""

    requests: int = 0
    saved_by_usage: Counter = field(default_factory=Counter)  # method -> tokens
    saved_by_count: Counter = field(default_factory=Counter)  # method -> tokens
    skipped_layers: int = 0  # visual token-layers alvts skipped
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Served:
    """The module's vLLM server and the ledger of every request sent to it."""

    server: VLLMServer
    model_dir: Path
    metrics_dir: Path
    ledger: Ledger = field(default_factory=Ledger)


@dataclass(kw_only=True)
class Stack(Served):
    """The server with the Prometheus that scrapes it."""

    prom: pd.Prometheus
    prom_process: PrometheusProcess
    promtool: str
    started: float


@_pool.factory("prometheus")
def _prometheus_server(p: _pool.Pool) -> dict[str, Any]:
    metrics_dir = p.tmp("worker-metrics")
    overrides = token_prune_overrides(QWEN25_ARCH, method="lrcp", prune_ratio=0.5,
                                      allowed_methods=[*METHODS, LAYERWISE],
                                      options={LAYERWISE: {"first_layer": 0}})
    server = VLLMServer(
        tiny_qwen(p),
        [*SERVER_ARGS, "--served-model-name", MODEL_NAME, "--hf-overrides", overrides],
        log_path=_pool.log_dir() / "prometheus_qwen.log",
        env={"VLLM_TOKENPRUNE_METRICS_DIR": str(metrics_dir)}, wait=False,
    )
    return {"server": server, "metrics_dir": metrics_dir}


_pool.uses("test_prometheus.py", "served", "prometheus")


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    p = _pool.pool(request.config)
    started = p.take("prometheus")
    try:
        yield Served(started["server"], tiny_qwen(p), started["metrics_dir"])
    finally:
        started["server"].stop()


@pytest.fixture(scope="module")
def stack(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Prometheus scraping :func:`served`'s server (its counters are cumulative: what the
    server counted before Prometheus started is in its first scrape)."""
    prom_bin, promtool = prometheus_binaries()
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for(served.server.port), sort_keys=False))
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prom = PrometheusProcess(prom_bin, config, work / "data", _pool.log_dir() / "prometheus.log")
    try:
        yield Stack(server=served.server, model_dir=served.model_dir,
                    metrics_dir=served.metrics_dir, ledger=served.ledger,
                    prom=pd.Prometheus(prom.url), prom_process=prom, promtool=promtool,
                    started=time.time())
    finally:
        prom.stop()


def chat(st: Served, image: Any, ratio: float, method: str) -> int:
    """One chat request; returns usage.prompt_tokens."""
    r = requests.post(st.server.base_url + "/v1/chat/completions", timeout=300, json={
        "model": MODEL_NAME, "messages": chat_messages([image], PROMPT), "max_tokens": 4,
        "ignore_eos": True, "temperature": 0.0, "prune_ratio": ratio, "prune_method": method,
    })
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def send_pair(st: Served, image: Any, method: str, ratios: tuple[float, ...]) -> None:
    """The request at ratio 0, then the same request at each ratio; book the savings."""
    tokens = qwen_image_tokens(st.model_dir, image)
    unpruned = chat(st, image, 0.0, method)
    with st.ledger.lock:
        st.ledger.requests += 1
        st.ledger.saved_by_usage[method] += 0  # the method's series exists from now on
        st.ledger.saved_by_count[method] += 0
    for ratio in ratios:
        pruned = chat(st, image, ratio, method)
        by_count = tokens - num_kept(tokens, ratio)
        assert unpruned - pruned == by_count, (method, ratio)  # keeps the ledger honest
        with st.ledger.lock:
            st.ledger.requests += 1
            st.ledger.saved_by_usage[method] += unpruned - pruned
            st.ledger.saved_by_count[method] += by_count


def send_routed(st: Served, image: Any, ratio: float) -> None:
    """One alvts request: the prompt keeps every visual token; book the skipped layers."""
    tokens = qwen_image_tokens(st.model_dir, image)
    unpruned = chat(st, image, 0.0, "lrcp")
    assert chat(st, image, ratio, LAYERWISE) == unpruned
    with st.ledger.lock:
        st.ledger.requests += 2
        st.ledger.saved_by_usage[LAYERWISE] += 0
        st.ledger.saved_by_count[LAYERWISE] += 0
        st.ledger.saved_by_usage["lrcp"] += 0
        st.ledger.saved_by_count["lrcp"] += 0
        st.ledger.skipped_layers += (tokens - num_kept(tokens, ratio)) * ROUTED_LAYERS


def scrape(st: Served) -> dict[str, list[Any]]:
    """The API server's /metrics, parsed by prometheus_client's own parser: name -> samples."""
    text = requests.get(st.server.base_url + "/metrics", timeout=30).text
    samples: dict[str, list[Any]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append(s)
    return samples


def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


def prom_scalar(st: Stack, expr: str) -> float:
    result = st.prom.query(expr)
    return float(result[0]["value"][1]) if result else float("nan")


def wait_scraped(st: Stack, timeout: float = 20.0) -> None:
    """Until Prometheus has scraped the server's current counters (no request in flight)."""
    want = total(scrape(st), "tokenprune_requests_total")
    expr = f'sum(tokenprune_requests_total{{model_name="{MODEL_NAME}"}})'
    deadline = time.monotonic() + timeout
    while prom_scalar(st, expr) != want:
        assert time.monotonic() < deadline, (
            f"Prometheus did not scrape the server in {timeout}s: {prom_scalar(st, expr)} "
            f"vs {want} on /metrics; targets: {requests.get(st.prom.url + '/api/v1/targets').text}"
        )
        time.sleep(SCRAPE_S / 2)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> tuple[float, float]:
    """Rounds of traffic a few scrapes apart (so every counter series that a request creates
    is also seen increasing, as rate() needs). Returns the (start, end) window."""
    for rnd in range(ROUNDS):
        def one(i: int, rnd: int = rnd) -> None:
            w, h = SIZES[i % len(SIZES)]
            image = make_image(w, h, seed=100 * rnd + i)
            if i < len(METHODS):
                send_pair(stack, image, METHODS[i], RATIOS)
            else:
                send_routed(stack, image, RATIOS[rnd % len(RATIOS)])

        with ThreadPoolExecutor(len(METHODS) + 1) as pool:
            list(pool.map(one, range(len(METHODS) + 1)))
        time.sleep(4 * SCRAPE_S)
    wait_scraped(stack)
    return stack.started, time.time()


def dashboard_variables(st: Stack, window: float, **overrides: str) -> dict[str, str]:
    values = {"model_name": MODEL_NAME, "method": ".*", "datasource": "prometheus",
              "__rate_interval": pd.duration(window), "__interval": "1s",
              "__range": pd.duration(window)}
    values.update(overrides)
    return values


# --------------------------------------------------------------------------- tests


def test_scorer_seconds_from_the_worker_reach_the_api_server_metrics(served: Served):
    """The scorer runs in the worker process; its histogram is on the API server's /metrics,
    grows by one call per pruned image and not at all for unpruned requests."""
    stack = served
    name = "tokenprune_scorer_seconds_count"
    before = total(scrape(stack), name, model_name=MODEL_NAME)
    send_pair(stack, make_image(308, 224, seed=900), "lrcp", ())  # ratio 0 only
    after_unpruned = total(scrape(stack), name, model_name=MODEL_NAME)
    assert after_unpruned == before
    send_pair(stack, make_image(308, 224, seed=901), "svd_prune", (0.75,))
    samples = scrape(stack)
    assert total(samples, name, model_name=MODEL_NAME) == before + 1
    assert total(samples, name, model_name=MODEL_NAME, method="svd_prune") >= 1
    assert total(samples, "tokenprune_scorer_seconds_sum", method="svd_prune") > 0
    # ... and it was measured in another process of this server: the worker's published file
    files = sorted(stack.metrics_dir.glob("scorer-*.json"))
    assert files, "the worker published no scorer timings"
    pids = {int(re.fullmatch(r"scorer-(\d+)\.json", f.name).group(1)) for f in files}
    api_server = stack.server.proc.pid
    assert api_server not in pids
    for pid in pids:  # a live process of the server's session (VLLMServer starts one)
        assert os.getsid(pid) == api_server


def video_chat(st: Served, video: bytes, **extra: Any) -> dict[str, Any]:
    """One chat request with a video and the top-5 next-token logprobs; returns the body."""
    r = requests.post(st.server.base_url + "/v1/chat/completions", timeout=300, json={
        "model": MODEL_NAME, "messages": media_messages([video], "Describe this video."),
        "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": 5,
        "return_tokens_as_token_ids": True, **extra,
    })
    assert r.status_code == 200, r.text
    with st.ledger.lock:
        st.ledger.requests += 1
        st.ledger.saved_by_usage[extra["prune_method"]] += 0  # nothing dropped (below)
        st.ledger.saved_by_count[extra["prune_method"]] += 0
    return r.json()


def top5(body: dict[str, Any]) -> dict[int, float]:
    entries = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return {int(e["token"].removeprefix("token_id:")): e["logprob"] for e in entries}


def test_alvts_routes_a_video_as_the_reference_does(served: Served):
    """``alvts`` on a video item, served: every token stays in the prompt, the response and
    the skipped-token-layers counter (``modality="video"``) say the item was routed at the
    request's ``video_prune_ratio`` (its ``prune_ratio``, for images, is 0), and the next-token
    logprobs are transformers' model routed by the reference at that ratio (on the reference's
    top 5), where the unrouted model differs by far more than the tolerance."""
    import torch

    from vllm_tokenprune.alvts import AlvtsOptions
    from vllm_tokenprune.alvts.reference import routed
    from vllm_tokenprune.preview._extract import prepare

    video = make_video(168, 112, 6, fps=2.0, seed=5)  # 3 frame groups of 4 x 6 merged patches
    # transformers' model routed by the reference (same selector, layers and skipped tokens)
    # and unrouted (the control)
    prep = prepare(str(served.model_dir), [video], "Describe this video.")
    ids = prep.inputs["input_ids"]
    with torch.no_grad():
        with routed(prep.model, ids, VIDEO_RATIO, AlvtsOptions(first_layer=0)) as log:
            ref = prep.model(**prep.inputs).logits[0, -1].float().log_softmax(-1)
        unrouted = prep.model(**prep.inputs).logits[0, -1].float().log_softmax(-1)
    (n,) = [e - s for s, e in log.spans]  # the video is the reference's one item
    k = num_kept(n, VIDEO_RATIO)
    skipped = (n - k) * ROUTED_LAYERS
    assert (n, k) == (72, 18) and log.skipped_token_layers() == skipped
    metric = "tokenprune_skipped_visual_token_layers_total"
    before = scrape(served)
    unpruned = video_chat(served, video, prune_method="lrcp", prune_ratio=0.0)
    body = video_chat(served, video, prune_method=LAYERWISE, prune_ratio=0.0,
                      video_prune_ratio=VIDEO_RATIO)
    with served.ledger.lock:
        served.ledger.skipped_layers += skipped
    after = scrape(served)
    # nothing dropped at the input; the response says the video was routed at its ratio
    assert body["usage"]["prompt_tokens"] == unpruned["usage"]["prompt_tokens"] == ids.shape[1]
    details = body[FIELD]
    assert details["items"] == [{"modality": "video", "index": 0, "tokens": n, "kept": n,
                                 "why": "ratio", "routed_per_layer": k,
                                 "routed_layers": ROUTED_LAYERS}]
    assert details["skipped_token_layers"] == skipped
    # the worker counted the video's skipped token-layers, as a video's, and nothing else
    for modality, want in (("video", skipped), ("image", 0)):
        labels = {"model_name": MODEL_NAME, "method": LAYERWISE, "modality": modality}
        assert total(after, metric, **labels) - total(before, metric, **labels) == want
    # the server's next-token logprobs are the routed reference's
    got = top5(body)
    ref_ids = [int(t) for t in ref.topk(5).indices]
    assert sorted(got) == sorted(ref_ids)
    err = max(abs(lp - float(ref[t])) for t, lp in got.items())
    assert err <= LOGPROB_TOL, err
    control = max(abs(got[t] - float(unrouted[t])) for t in ref_ids)
    record_error(f"alvts qwen video\t{VIDEO_RATIO}\t{err:.3g}\tunrouted={control:.3g}")
    assert control > CONTROL_FACTOR * LOGPROB_TOL, control


def test_every_dashboard_expression_returns_data(stack: Stack, traffic: tuple[float, float]):
    start, end = traffic
    dashboard = pd.load_dashboard()
    values = dashboard_variables(stack, end - start)
    checked, empty = 0, []
    for panel, target in pd.iter_exprs(dashboard):
        expr = pd.expand(target["expr"], values)
        result = stack.prom.query(expr, end)
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite:
            empty.append(f"{panel['title']} [{target['refId']}]: {expr} -> {result}")
        checked += 1
    assert checked >= 20, checked
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def test_dashboard_filters_by_model_and_method(stack: Stack, traffic: tuple[float, float]):
    """The template variables resolve (label_values queries) and filter the panels."""
    start, end = traffic
    dashboard = pd.load_dashboard()
    resolved = {}
    for var in pd.template_variables(dashboard):
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
        assert m, var["query"]
        match = pd.expand(m.group(1), {"model_name": MODEL_NAME})
        resolved[var["name"]] = set(stack.prom.label_values(m.group(2), match))
    assert resolved["model_name"] == {MODEL_NAME}
    assert resolved["method"] == {*METHODS, LAYERWISE}
    # one method selected: the by-method panels show that method only
    values = dashboard_variables(stack, end - start, method="divprune")
    (panel,) = [p for p in pd.iter_panels(dashboard)
                if p["title"] == "Visual tokens saved per second by method"]
    result = stack.prom.query(pd.expand(panel["targets"][0]["expr"], values), end)
    assert [r["metric"].get("method") for r in result] == ["divprune"]
    # another model selected: no data
    values = dashboard_variables(stack, end - start, model_name="some-other-model")
    assert stack.prom.query(pd.expand(panel["targets"][0]["expr"], values), end) == []


def test_saved_token_counter_equals_savings_implied_by_responses(
        stack: Stack, traffic: tuple[float, float]):
    wait_scraped(stack)
    ledger = stack.ledger
    sel = f'model_name="{MODEL_NAME}"'
    by_method = {r["metric"]["method"]: float(r["value"][1]) for r in stack.prom.query(
        f"sum by (method) (tokenprune_saved_visual_tokens_total{{{sel}}})")}
    implied = {m: float(v) for m, v in ledger.saved_by_usage.items()}
    assert by_method == implied
    assert sum(by_method.values()) == sum(ledger.saved_by_count.values()) > 0
    assert prom_scalar(stack, f"sum(tokenprune_saved_visual_tokens_total{{{sel}}})") == sum(
        implied.values())
    # the siblings agree: input - kept == saved; one request counted per request sent
    assert prom_scalar(stack, f"sum(tokenprune_input_visual_tokens_total{{{sel}}}) - "
                              f"sum(tokenprune_kept_visual_tokens_total{{{sel}}})"
                       ) == sum(implied.values())
    assert prom_scalar(stack, f"sum(tokenprune_requests_total{{{sel}}})") == ledger.requests
    # alvts: nothing saved at the input, every skipped visual token-layer counted
    assert by_method[LAYERWISE] == 0
    assert prom_scalar(stack, f"sum(tokenprune_skipped_visual_token_layers_total{{{sel}}})"
                       ) == ledger.skipped_layers > 0


def test_dashboard_picture_from_prometheus_data(stack: Stack, traffic: tuple[float, float],
                                                tmp_path: Path):
    start, end = traffic
    dashboard = pd.load_dashboard()
    out = tmp_path / "dashboard.png"
    drawn = pd.render(dashboard, stack.prom.url, start, end, out,
                      {"model_name": MODEL_NAME, "method": ".*", "datasource": "prometheus"},
                      step=1.0, scrape_interval=2.5,
                      subtitle="rendered from Prometheus by tests/test_prometheus.py "
                               "(tiny random Qwen2.5-VL on CPU)",
                      xlabel="seconds since the server was ready")
    panels = [p["title"] for p in pd.iter_panels(dashboard)]
    assert set(drawn) == set(panels)
    assert all(n >= 1 for n in drawn.values()), drawn
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    if os.environ.get("TOKENPRUNE_UPDATE_DOCS") == "1":
        shutil.copyfile(out, ROOT / "docs" / "dashboard.png")

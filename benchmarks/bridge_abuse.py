"""What an unauthenticated, unroutable upload costs a server with the request bridge.

Starts a CPU server on the tiny generated Qwen2.5-VL (``--api-key``, one API server process, as
in issue 18's measurement), then times ``GET /health`` and a one-image chat request (with the
key, ``prune_ratio`` 0.5) back to back: first idle, then while ``--uploads`` clients each send a
``--mb`` MB JSON body of ``[{},{},...]`` (the shape whose parse costs most per byte) to ``POST
/nope`` without the key, each spread over ``--seconds``. Reports median and worst latency per
phase and the API server process's resident memory (before, and the peak sampled during the
uploads).

    python -m benchmarks.bridge_abuse                  # 1 upload of 30 MB
    python -m benchmarks.bridge_abuse --uploads 4

Figures and the commands that made them: docs/reliability.md ("Request bodies the bridge does
not read").
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from vllm_tokenprune.testing.media import data_url, make_image
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides

ROOT = Path(__file__).resolve().parents[1]

KEY = "bench-key"
ARCH = "TokenPruneQwen2_5_VLForConditionalGeneration"


def upload(port: int, path: str, body: bytes, seconds: float) -> str:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    pieces = 20
    step = -(-len(body) // pieces)
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        try:
            s.sendall(head)
            for i in range(pieces):
                s.sendall(body[i * step:(i + 1) * step])
                time.sleep(seconds / pieces)
        except OSError:
            pass
        try:
            return s.recv(200).split(b"\r\n", 1)[0].decode()
        except OSError:
            return "closed"


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def probe(server: VLLMServer, chat: dict[str, Any]) -> tuple[float, float]:
    t = time.monotonic()
    assert requests.get(server.base_url + "/health", timeout=600).status_code == 200
    health = time.monotonic() - t
    t = time.monotonic()
    r = requests.post(server.base_url + "/v1/chat/completions", data=json.dumps(chat),
                      headers={"Authorization": f"Bearer {KEY}",
                               "Content-Type": "application/json"}, timeout=600)
    assert r.status_code == 200, r.text
    return health, time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=1)
    ap.add_argument("--mb", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=3.0, help="time to send each upload")
    ap.add_argument("--path", default="/nope")
    ap.add_argument("--probes", type=int, default=30, help="idle probes")
    ap.add_argument("--label", default="this tree")
    args = ap.parse_args()

    from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

    work = Path(tempfile.mkdtemp(prefix="bridge-abuse-"))
    model = build_qwen2_5_vl(work / "qwen2_5_vl", seed=0)
    overrides = token_prune_overrides(ARCH, method="lrcp", prune_ratio=0.5)
    server = VLLMServer(model, ["--dtype", "float32", "--api-key", KEY, "--hf-overrides",
                                overrides], log_path=work / "server.log")
    try:
        image = make_image(112, 84, seed=1)
        chat = {"model": server.model, "max_tokens": 1, "prune_ratio": 0.5,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": "Describe this image."}]}]}
        for _ in range(3):
            probe(server, chat)
        pid = server.proc.pid
        n = max(1, int(args.mb * 1e6 / 3))
        body = ("[" + ",".join(["{}"] * n) + "]").encode()
        idle = [probe(server, chat) for _ in range(args.probes)]
        base = rss_mb(pid)
        peak = base
        busy = []
        start = time.monotonic()
        with ThreadPoolExecutor(args.uploads) as pool:
            futures = [pool.submit(upload, server.port, args.path, body, args.seconds)
                       for _ in range(args.uploads)]
            while not all(f.done() for f in futures):
                busy.append(probe(server, chat))
                peak = max(peak, rss_mb(pid))
            statuses = [f.result() for f in futures]
        took = time.monotonic() - start
        after = rss_mb(pid)
    finally:
        server.stop()

    def row(name: str, xs: list[tuple[float, float]]) -> str:
        h = [x[0] * 1000 for x in xs]
        c = [x[1] * 1000 for x in xs]
        return (f"| {args.label} | {name} | {len(xs)} | {statistics.median(h):.0f} | "
                f"{max(h):.0f} | {statistics.median(c):.0f} | {max(c):.0f} |")

    print(f"\n{args.uploads} x {len(body) / 1e6:.1f} MB to POST {args.path} without the key, "
          f"each sent over {args.seconds:.0f} s; answered {statuses} after {took:.1f} s")
    print("| bridge | phase | probes | /health median ms | /health max ms | chat median ms | "
          "chat max ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(row("idle", idle))
    print(row("during the uploads", busy))
    print(f"\nAPI server RSS: {base:.0f} MB before, {peak:.0f} MB peak during, {after:.0f} MB "
          f"after (+{peak - base:.0f} MB)")


if __name__ == "__main__":
    main()

"""The README's main job: serve a tiny Qwen2.5-VL with LRCP pruning on CPU, ask about an image
(a tool, not used by the plugin).

    python -m vllm_tokenprune.demo [--ratio 0.75] [--method lrcp] [--model-dir DIR]

Builds a tiny random-weight Qwen2.5-VL (nothing is downloaded), starts a real vLLM server with
the TokenPrune architecture, sends one chat request with ``prune_ratio`` through the ``openai``
client, and prints the answer (gibberish: the weights are random) and the tokens saved.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from vllm_tokenprune import num_kept
from vllm_tokenprune.testing.media import chat_messages, make_image, qwen_image_tokens
from vllm_tokenprune.testing.server import VLLMServer, token_prune_overrides
from vllm_tokenprune.testing.tiny_model import build_qwen2_5_vl

ARCH = "TokenPruneQwen2_5_VLForConditionalGeneration"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.75, help="server default prune_ratio")
    parser.add_argument("--request-ratio", type=float, default=0.889,
                        help="prune_ratio sent with the request")
    parser.add_argument("--method", default="lrcp")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="tokenprune-demo-")) / "qwen2_5_vl"
    if not (model_dir / "config.json").exists():
        print(f"[demo] building a tiny random-weight Qwen2.5-VL in {model_dir}", flush=True)
        build_qwen2_5_vl(model_dir)
    overrides = token_prune_overrides(ARCH, method=args.method, prune_ratio=args.ratio)
    server_args = ["--dtype", "float32", "--hf-overrides", overrides]
    print("[demo] starting: VLLM_PLUGINS=tokenprune python -m vllm.entrypoints.openai.api_server "
          f"--model {model_dir} {' '.join(shlex.quote(a) for a in server_args)}", flush=True)
    image = make_image(448, 336, seed=0)
    with VLLMServer(model_dir, server_args) as server:
        print(f"[demo] server ready in {server.startup_seconds:.0f}s at {server.base_url}",
              flush=True)
        client = server.openai()
        reply = client.chat.completions.create(
            model=server.model,
            messages=chat_messages([image], "Describe this image in one sentence."),
            max_tokens=16,
            temperature=0.0,
            extra_body={"prune_ratio": args.request_ratio},
        )
        full = client.chat.completions.create(
            model=server.model,
            messages=chat_messages([image], "Describe this image in one sentence."),
            max_tokens=1,
            extra_body={"prune_ratio": 0.0},
        )
    n = qwen_image_tokens(model_dir, image)
    kept = num_kept(n, args.request_ratio)
    saved = full.usage.prompt_tokens - reply.usage.prompt_tokens
    print(f"[demo] answer (random weights, so gibberish): {reply.choices[0].message.content!r}")
    print(f"[demo] image: {n} visual tokens; prune_ratio={args.request_ratio} ({args.method}) "
          f"kept {kept}, saved {n - kept}")
    print(f"[demo] prompt tokens: {reply.usage.prompt_tokens} pruned vs "
          f"{full.usage.prompt_tokens} unpruned -> {saved} tokens saved")
    return 0 if saved == n - kept else 1


if __name__ == "__main__":
    sys.exit(main())

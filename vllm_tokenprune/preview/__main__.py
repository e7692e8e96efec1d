"""``python -m vllm_tokenprune.preview``: draw the visual tokens a served model keeps (offline,
outside a server).

One method and one ratio draw the kept tokens of each item; several ``--method`` or
``--ratio`` values draw a grid of methods (rows) x ratios (columns). The kept counts and
indices go to stdout as JSON (the shape of the server's ``token_prune`` response field).
"""

from __future__ import annotations

import argparse
import json
import sys

from vllm_tokenprune.preview import (
    DEFAULT_PROMPT,
    PreviewError,
    preview,
    render,
    render_grid,
)
from vllm_tokenprune.scoring import list_methods


def _ratio(text: str) -> float | str:
    """A ``--ratio`` value: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_tokenprune.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or hub id (as served)")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeat)")
    p.add_argument("--video", action="append", default=[],
                   help="video path or URL (Qwen families; repeat)")
    p.add_argument("--method", action="append", choices=list_methods(),
                   help="scorer (repeat for a grid; default: the server's)")
    p.add_argument("--ratio", action="append", type=_ratio,
                   help="prune ratio or 'auto' (repeat for a grid; default: the server's)")
    p.add_argument("--video-ratio", type=_ratio, default=None, help="ratio for videos")
    p.add_argument("--detail", action="append", choices=["low", "high", "auto"],
                   help="each image's image_url.detail, in order (once: every image)")
    p.add_argument("--max-visual-tokens", type=int, default=None,
                   help="the request's max_visual_tokens (default: the server's)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="the request's text (text-conditioned methods depend on it)")
    p.add_argument("--hf-overrides", default=None,
                   help="the JSON given to `vllm serve --hf-overrides` (its token_prune block)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("-o", "--output", required=True, help="picture to write (PNG, JPEG, ...)")
    args = p.parse_args(argv)
    media = [*args.image, *args.video]
    if not media:
        p.error("give at least one --image or --video")
    methods = args.method or [None]
    ratios = args.ratio or [None]
    common = dict(prompt=args.prompt, hf_overrides=args.hf_overrides, dtype=args.dtype,
                  device=args.device)
    detail = args.detail
    if detail and len(detail) == 1:
        detail = detail * len(args.image)
    try:
        if len(methods) == 1 and len(ratios) == 1:
            result = preview(args.model, media, methods[0], ratios[0],
                             video_ratio=args.video_ratio, detail=detail,
                             max_visual_tokens=args.max_visual_tokens, **common)
            render(result).save(args.output)
            print(json.dumps(result.to_json()))
        else:
            from vllm_tokenprune.preview import server_config

            cfg = server_config(args.model, args.hf_overrides)
            grid = render_grid(args.model, media, [m or cfg.method for m in methods],
                               [cfg.prune_ratio if r is None else r for r in ratios],
                               progress=True, **common)
            grid.save(args.output)
    except PreviewError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/kept_photos.jpg: which patches each method keeps on real photographs.

The scikit-image photographs, every registered method at ratios 0.75 and 0.889, kept patches
bright and dropped ones dimmed (drawn with ``vllm_tokenprune.preview.draw``). No model weights
can be fetched here, so the tokens are built as the scorer tests build them
(``vllm_tokenprune.testing.photos.patch_tokens``: 14 px patches, CLIP-normalised pixels, a fixed
random projection to 256 features). Text-conditioned methods (ResPrune, CDPruner) run without
text, as in ``benchmarks/fidelity.py``. With real weights, ``python -m vllm_tokenprune.preview``
draws the real thing.

    python -m benchmarks.kept_photos [-o docs/kept_photos.jpg]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from vllm_tokenprune.preview.draw import grid, overlay
from vllm_tokenprune.scoring import list_methods, num_kept, select_tokens
from vllm_tokenprune.testing.photos import patch_tokens

PHOTOS = ("astronaut", "camera", "coffee", "chelsea")
RATIOS = (0.75, 0.889)
PATCH = 14
CAPTION = (
    "Tokens: scikit-image photographs cut into 14 px patches, CLIP-normalised, randomly projected "
    "to 256 features (vllm_tokenprune/testing/photos.py), not a model's vision tower.\n"
    "ResPrune and CDPruner run without prompt text. With real weights, "
    "python -m vllm_tokenprune.preview draws what a served model keeps."
)


def photo(name: str, h: int, w: int) -> Image.Image:
    import skimage.data as skdata

    img = np.asarray(getattr(skdata, name)())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return Image.fromarray(img[: h * PATCH, : w * PATCH, :3].astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default="docs/kept_photos.jpg")
    args = p.parse_args()
    torch.manual_seed(0)
    methods = list_methods()
    cells: list[list[Image.Image]] = [[] for _ in methods]
    labels = []
    for name in PHOTOS:
        x, _, (h, w) = patch_tokens(name, patch=PATCH)
        img = photo(name, h, w)
        for ratio in RATIOS:
            labels.append(f"{name} @ {ratio:g}")
            k = num_kept(x.shape[0], ratio)
            for r, method in enumerate(methods):
                idx = select_tokens(x, k, method, grid=(1, h, w))
                kept = torch.zeros(x.shape[0], dtype=torch.bool)
                kept[idx] = True
                cells[r].append(overlay(img, kept, h, w))
    picture = grid(cells, methods, labels, cell_height=150,
                   title="Kept patches bright, dropped dimmed: every method at prune ratio "
                         "0.75 (keeps 25%) and 0.889 (keeps 11%)",
                   caption=CAPTION)
    picture.save(args.output, quality=85, optimize=True)
    print(f"wrote {args.output} ({picture.width}x{picture.height})")


if __name__ == "__main__":
    main()

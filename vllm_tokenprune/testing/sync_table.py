"""Print the plugin's device-to-host syncs per prefill step, family x method x runner, measured
on the emulated CUDA device (:mod:`.emulated_worker`); the table in ``docs/syncs.md``::

    python -m vllm_tokenprune.testing.sync_table [--images 1 8] [--families qwen2_5_vl llava]

Each cell is the number of syncs in plugin code (``vllm_tokenprune/``, the test harness
excluded) during one prefill step of one request with the given images (one small image per
item), under Model Runner V2 and V1; the last column lists where they happen. A tool for the
docs (not used by the plugin).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import torch

from vllm_tokenprune.scoring import list_methods
from vllm_tokenprune.testing import emulated_worker as ew
from vllm_tokenprune.testing.gpu_emulation import GpuEmulation
from vllm_tokenprune.testing.media import make_image

SIZES = {"llava": (112, 112), "llava_next": (150, 260)}


def measure(families: list[str], images: list[int], ratio: float = 0.5
            ) -> list[tuple[str, str, dict[str, int], Counter[tuple[str, str]]]]:
    """(family, method, {"<RUNNER>, <n> image(s)": syncs}, sites) per family and method."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            methods = [*list_methods(), *(["alvts"] if family in ew.ALVTS_FAMILIES else [])]
            block = {"method": "lrcp", "prune_ratio": ratio, "allowed_methods": methods}
            if "alvts" in methods:
                block["options"] = {"alvts": {"first_layer": 1}}
            ckpt = ew.build_checkpoint(family, Path(tmp) / family, seed=0)
            worker = ew.build_worker(family, ckpt, block)
            size = SIZES.get(family, (112, 84))
            for method in methods:
                counts: dict[str, int] = {}
                sites: Counter[tuple[str, str]] = Counter()
                for n in images:
                    media = {"image": [make_image(*size, seed=i) for i in range(n)]}
                    req = ew.make_request(worker, "r", media, prune_ratio=ratio,
                                          prune_method=method)
                    for runner in ("v2", "v1"):
                        with GpuEmulation() as emu:
                            ew.run_step(worker, [req], emu, runner=runner,
                                        forward=method == "alvts")
                        counts[f"{runner.upper()}, {n} image{'s' if n > 1 else ''}"] = \
                            emu.count("plugin")
                        if n == images[0] and runner == "v2":
                            sites = Counter()
                            for (kind, where), c in emu.by_site("plugin").items():
                                sites[(kind, where.split(":")[0])] += c
                rows.append((family, method, counts, sites))
    return rows


def markdown(rows: list[tuple[str, str, dict[str, int], Counter[tuple[str, str]]]]) -> str:
    cols = list(rows[0][2]) if rows else []
    out = ["| family | method | " + " | ".join(cols) + " | where (V2, first column) |",
           "|---|---|" + "---|" * len(cols) + "---|"]
    for family, method, counts, sites in rows:
        where = "; ".join(f"{n} x {kind} ({path})" for (kind, path), n in sorted(sites.items()))
        out.append(f"| {family} | {method} | " + " | ".join(str(counts[c]) for c in cols)
                   + f" | {where} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(ew.FAMILIES),
                        choices=list(ew.FAMILIES))
    parser.add_argument("--images", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(markdown(measure(args.families, args.images)))


if __name__ == "__main__":
    main()

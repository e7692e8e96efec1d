"""Fidelity of every scorer's kept set, on real-image patch tokens and on planted data.

Metrics, for each method and prune ratio (kept k = num_kept(N, ratio)), float64:

(a) reconstruction error ``||X - X P||_F / ||X||_F`` with ``P`` the orthogonal projector onto
    the row span of the kept tokens (how much of all tokens the kept ones can express);
(b) attention-readout error ``||A(X) - A(X_kept)||_F / ||A(X)||_F`` where
    ``A(Y) = softmax(Q Y^T / sqrt(D)) Y`` for 64 random Gaussian queries ``Q`` scaled so the logits
    over all tokens have standard deviation 2 (a readout a language model's attention could do).

Data:

* ``skimage``: photographs bundled with scikit-image (astronaut, camera, coffee, chelsea) cut into
  14x14 RGB patches, CLIP-normalised, fixed seeded Gaussian projection to D = 256 (as in
  ``tests/test_scoring_skimage.py``); mean over the four images.
* ``planted``: N = 400, D = 64, rank-4 background + 0.01 noise + 6 tokens with energy outside the
  background subspace (as in ``tests/test_scoring_properties.py``); mean over 3 seeds.

Text-conditioned methods run without text (ResPrune = pure residual greedy, CDPruner = plain
DPP). ``random`` is averaged over 5 seeds. Also prints the LRCP premise table (subspace stability
under random token dropping, detail vs. flat patches) recorded in docs/scorers.md.

Usage::

    python -m benchmarks.fidelity                 # tables + docs/fidelity.png
    python -m benchmarks.fidelity --no-plot
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vllm_tokenprune.scoring import list_methods, num_kept, select_tokens
from vllm_tokenprune.testing.photos import patch_tokens as photo_patch_tokens

ROOT = Path(__file__).resolve().parents[1]

RATIOS = (0.5, 0.75, 0.889, 0.944)
IMAGES = ("astronaut", "camera", "coffee", "chelsea")
def patch_tokens(name: str, patch: int = 14, dim: int = 256, seed: int = 0):
    """(N, dim) float32 tokens and per-patch grey-level variance of a scikit-image photo."""
    tokens, variance, _ = photo_patch_tokens(name, patch, dim, seed)
    return tokens, variance


def planted(seed: int, n: int = 400, d: int = 64, rank: int = 4, n_planted: int = 6):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.tensor([4.0, 3.0, 2.0, 1.5], dtype=torch.float64)
    x = (torch.randn(n, rank, generator=g, dtype=torch.float64) * scales) @ basis[:, :rank].T
    x += 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    idx = torch.randperm(n, generator=g)[:n_planted]
    scale = 0.5 * x.norm(dim=1).median()
    for m, i in enumerate(idx.tolist()):
        x[i] += scale * basis[:, rank + m]
    return x.float()


def recon_error(x: torch.Tensor, kept: torch.Tensor) -> float:
    xd = x.double()
    u, s, vh = torch.linalg.svd(xd[kept], full_matrices=False)
    r = int((s > s[0] * 1e-10).sum()) if s.numel() and s[0] > 0 else 0
    v = vh[:r].T
    return float((xd - xd @ v @ v.T).norm() / xd.norm())


def attention_error(x: torch.Tensor, kept: torch.Tensor, n_queries: int = 64) -> float:
    xd = x.double()
    d = xd.shape[1]
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(n_queries, d, generator=g, dtype=torch.float64)
    logits = q @ xd.T / d**0.5
    q = q * (2.0 / logits.std().clamp_min(1e-12))  # logits std 2
    full = torch.softmax(q @ xd.T / d**0.5, dim=-1) @ xd
    part = torch.softmax(q @ xd[kept].T / d**0.5, dim=-1) @ xd[kept]
    return float((full - part).norm() / full.norm())


def evaluate(datasets: dict[str, list[torch.Tensor]], methods: list[str]):
    """results[dataset][metric][method] = list over RATIOS (mean over the dataset's items)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for dname, items in datasets.items():
        out[dname] = {"recon": {}, "attn": {}}
        for m in methods:
            rec_row, att_row = [], []
            for ratio in RATIOS:
                recs, atts = [], []
                for x in items:
                    k = num_kept(x.shape[0], ratio)
                    seeds = range(5) if m == "random" else [None]
                    for s in seeds:
                        opts = {} if s is None else {"seed": s}
                        kept = select_tokens(x, k, m, **opts)
                        recs.append(recon_error(x, kept))
                        atts.append(attention_error(x, kept))
                rec_row.append(float(np.mean(recs)))
                att_row.append(float(np.mean(atts)))
            out[dname]["recon"][m] = rec_row
            out[dname]["attn"][m] = att_row
    return out


def print_tables(results) -> None:
    titles = {
        "recon": "(a) reconstruction error ||X - X P_kept||_F / ||X||_F",
        "attn": "(b) attention-readout error (64 random queries)",
    }
    for dname, metrics in results.items():
        for metric, rows in metrics.items():
            print(f"\n{dname}: {titles[metric]}\n")
            print("| method | " + " | ".join(f"ratio {r}" for r in RATIOS) + " |")
            print("|---|" + "---:|" * len(RATIOS))
            for m, vals in rows.items():
                print(f"| {m} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    labels = {"recon": "reconstruction error", "attn": "attention-readout error"}
    for col, (dname, metrics) in enumerate(results.items()):
        for row, metric in enumerate(("recon", "attn")):
            ax = axes[row][col]
            for m, vals in metrics[metric].items():
                style = "-o" if m in ("lrcp", "svd_prune", "resprune") else "--."
                ax.plot(RATIOS, vals, style, label=m)
            if metric == "attn":
                ax.set_yscale("log")
            ax.set_xlabel("prune ratio")
            ax.set_ylabel(labels[metric])
            ax.set_title(f"{dname}: {labels[metric]}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def premise_table() -> None:
    """LRCP premise on the photos: subspace stability under 25% subsampling; detail vs flat."""
    print("\nLRCP premise on scikit-image patch tokens (r = 16, 25% random subsample, 5 seeds)\n")
    print(
        "| image | N | angles 1-4 (worst) | angle 8 (worst) | angle 16 (median) | "
        "energy ratio (worst) | kept/dropped patch var. | kept in flattest 25% |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in IMAGES:
        x, var = patch_tokens(name)
        n = x.shape[0]
        xc = x.double() - x.double().mean(0)
        cov = xc.T @ xc
        full = torch.linalg.eigh(cov).eigenvectors[:, -16:]
        best = float(torch.trace(full.T @ cov @ full))
        a4, a8, a16, ratio = [], [], [], []
        for seed in range(5):
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 4]
            xs = x[rows].double() - x[rows].double().mean(0)
            sub = torch.linalg.eigh(xs.T @ xs).eigenvectors[:, -16:]
            ang = np.sort(
                np.degrees(np.arccos(torch.linalg.svdvals(full.T @ sub).clamp(max=1).numpy()))
            )
            a4.append(ang[3])
            a8.append(ang[7])
            a16.append(ang[15])
            ratio.append(float(torch.trace(sub.T @ cov @ sub)) / best)
        k = num_kept(n, 0.889)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[select_tokens(x, k, "lrcp")] = True
        flat = var <= var.quantile(0.25)
        print(
            f"| {name} | {n} | {max(a4):.1f} deg | {max(a8):.1f} deg | "
            f"{np.median(a16):.1f} deg | {min(ratio):.4f} | "
            f"{float(var[kept].mean() / var[~kept].mean()):.2f}x | "
            f"{float(flat[kept].float().mean()):.1%} |"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list_methods())
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "fidelity.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    datasets = {
        "skimage": [patch_tokens(name)[0] for name in IMAGES],
        "planted": [planted(s) for s in range(3)],
    }
    results = evaluate(datasets, args.methods)
    print_tables(results)
    premise_table()
    if not args.no_plot:
        plot(results, Path(args.out))


if __name__ == "__main__":
    main()

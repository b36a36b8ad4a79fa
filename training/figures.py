"""Evaluation figures (matplotlib, Agg): expert-token usage per dataset (paper Fig. 6a) and
routing heat maps (paper Fig. 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = ["usage_fractions", "expert_usage_figure", "routing_figure"]


def usage_fractions(rows: pd.DataFrame, column: str, n: int) -> pd.DataFrame:
    """Fraction of masks per dataset that selected each index of ``column`` (token/expert).

    Returns a (datasets x n) frame whose rows sum to 1 (datasets without routing are dropped).
    """
    rows = rows[rows[column] >= 0]
    counts = pd.crosstab(rows["dataset"], rows[column]).reindex(columns=range(n), fill_value=0)
    return counts.div(counts.sum(axis=1).clip(lower=1), axis=0)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def expert_usage_figure(rows: pd.DataFrame, num_tokens: int, num_experts: int,
                        path: str | Path) -> Path:
    """Grouped bars: per dataset, how often each expert token (left) and expert (right) was
    selected, over all prompt modes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, column, n, label in ((axes[0], "token", num_tokens, "expert token t*"),
                                 (axes[1], "expert", num_experts, "expert e*")):
        frac = usage_fractions(rows, column, n)
        width = 0.8 / max(len(frac), 1)
        for i, (name, values) in enumerate(frac.iterrows()):
            ax.bar(np.arange(n) + i * width - 0.4 + width / 2, values.to_numpy(), width,
                   label=str(name))
        ax.set_xticks(range(n))
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of masks")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Expert-token selection per dataset")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def routing_figure(examples: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per example: image with the ground truth and prediction outlines, then each
    expert's routing heat map over the image (the selected expert's title is marked)."""
    plt = _plt()
    n_exp = max(len(e["heatmaps"]) for e in examples)
    fig, axes = plt.subplots(len(examples), n_exp + 1, figsize=(2.2 * (n_exp + 1),
                                                               2.3 * len(examples)),
                             squeeze=False)
    for r, ex in enumerate(examples):
        img = ex["image"].astype(np.float32) / 255.0
        ax = axes[r, 0]
        ax.imshow(img)
        ax.contour(ex["mask"], levels=[0.5], colors="lime", linewidths=0.8)
        ax.contour(ex["pred"], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{ex['dataset']}: {ex['category']}\n{ex['mode']} Dice {ex['dice']:.3f}",
                     fontsize=7)
        for e in range(n_exp):
            ax = axes[r, e + 1]
            ax.imshow(img.mean(-1), cmap="gray")
            if e < len(ex["heatmaps"]):
                ax.imshow(ex["heatmaps"][e], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            mark = " (selected)" if e == ex["expert"] else ""
            ax.set_title(f"expert {e}{mark}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("MoTE routing heat maps (green: ground truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

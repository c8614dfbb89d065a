"""Figures drawn from results JSON (never from numbers typed by hand)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402
from .units import format_length  # noqa: E402  (re-exported: figures and tables label lengths alike)

__all__ = ["passkey_heatmap", "passkey_comparison", "format_length", "save_figure"]


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating folders, atomically) and close a figure."""
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:  # an interrupted run leaves the previous figure whole
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def _grid(results: dict) -> tuple[list[int], list[float], list[list[float]]]:
    lengths = sorted({c["length"] for c in results["cells"]})
    depths = sorted({c["depth"] for c in results["cells"]})
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"]}
    return lengths, depths, [[acc.get((n, d), float("nan")) for d in depths] for n in lengths]


def passkey_heatmap(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Accuracy heatmap of one design: lengths (rows) x needle depths (columns)."""
    lengths, depths, grid = _grid(results)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 0.8 + 0.5 * len(lengths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("prompt length (tokens)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title or f"passkey accuracy: {results['design']} ({results['n_keys']} keys/cell)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(fig, path)


def passkey_comparison(all_results: Sequence[dict], path: str | Path) -> Path:
    """Accuracy (mean over depths) against prompt length, one line per design."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for results in sorted(all_results, key=lambda r: r["design"]):
        lengths, _, grid = _grid(results)
        means = [sum(v for v in row if v == v) / max(1, sum(v == v for v in row)) for row in grid]
        ax.plot(lengths, means, marker="o", label=results["design"])
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ticks = sorted({c["length"] for r in all_results for c in r["cells"]})
    ax.set_xticks(ticks, [format_length(n) for n in ticks])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (mean over depths)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)

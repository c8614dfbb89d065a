"""Figures drawn from results JSON (never from numbers typed by hand)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402
from .units import format_length  # noqa: E402  (re-exported: figures and tables label lengths alike)

__all__ = [
    "passkey_heatmap", "passkey_comparison", "recall_comparison", "recall_state", "booksum_events", "book_length", "family_of",
    "format_length", "save_figure", "PALETTE", "MARKERS", "FAMILIES",
]  # fmt: skip


def save_figure(fig, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out (inside ``rect`` of the figure, if given: room for a figure legend), write (creating
    folders, atomically) and close a figure."""
    fig.tight_layout(rect=rect)
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


#: colour-blind-safe colours (Okabe & Ito) and markers: every line of a panel differs in both
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

#: the families a comparison figure draws as separate panels, by registry-name prefix
FAMILIES = (("KV eviction", ("full", "window", "sinks", "h2o", "l2", "namm")), ("compressive", ("infini",)), ("neural memory", ("titans",)))


def family_of(design: str) -> str:
    """The family panel of a registry name (``other`` for a design outside the three)."""
    return next((name for name, prefixes in FAMILIES if design.startswith(prefixes)), "other")


def passkey_heatmap(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Accuracy heatmap of one design: lengths (rows) x needle depths (columns), colour-blind-safe (cividis)."""
    lengths, depths, grid = _grid(results)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 0.8 + 0.5 * len(lengths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="cividis", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_xlabel("needle depth (1 = right before the question: local context)")
    ax.set_ylabel("prompt length (tokens)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="black" if value > 0.6 else "white")
    ax.set_title(title or f"passkey accuracy: {results['design']} ({results['n_keys']} keys/cell)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(fig, path)


def _far_accuracy(results: dict) -> tuple[list[int], list[float]]:
    """Per length, the mean accuracy over depths < 1 (the needle outside the local window)."""
    cells = [c for c in results["cells"] if c["depth"] < 1] or results["cells"]
    lengths = sorted({c["length"] for c in cells})
    means = [sum(c["accuracy"] for c in cells if c["length"] == n) / sum(1 for c in cells if c["length"] == n) for n in lengths]
    return lengths, means


def passkey_comparison(all_results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Accuracy with the needle far back (depths < 1) against prompt length: one panel per family,
    one line per design (colour and marker), its memory-off control dashed beside it.

    Args:
        all_results: passkey results; those with ``memory_off`` true are controls, drawn with the
            result of the same label.
        path: the PNG to write.
        labels: one per result (default: its ``design``); tells apart two checkpoints of one design.
    """
    labels = list(labels) if labels is not None else [r["design"] for r in all_results]
    mains = {label: r for label, r in zip(labels, all_results) if not r.get("memory_off")}
    controls = {label: r for label, r in zip(labels, all_results) if r.get("memory_off")}
    panels = [name for name, _ in FAMILIES if any(family_of(r["design"]) == name for r in mains.values())]
    panels += ["other"] if any(family_of(r["design"]) == "other" for r in mains.values()) else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 5), sharey=True, squeeze=False)
    ticks = sorted({c["length"] for r in all_results for c in r["cells"]})
    for ax, panel in zip(axes[0], panels):
        mine = sorted(label for label, r in mains.items() if family_of(r["design"]) == panel)
        for i, label in enumerate(mine):
            style = dict(color=PALETTE[i % len(PALETTE)], marker=MARKERS[i % len(MARKERS)])
            ax.plot(*_far_accuracy(mains[label]), label=label, **style)
            if label in controls:
                ax.plot(*_far_accuracy(controls[label]), linestyle="--", alpha=0.6, markerfacecolor="none", **style)
        if any(label in controls for label in mine):
            ax.plot([], [], linestyle="--", color="grey", label="memory off (dashed)")
        ax.set_title(panel, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [format_length(n) for n in ticks], fontsize=7)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    axes[0][0].set_ylabel("accuracy, needle at depths < 1")
    return save_figure(fig, path)


def _recall_curve(results: dict, k: int, variant: str = "standard") -> tuple[list[int], list[float]]:
    cells = sorted((c for c in results["cells"] if c["k"] == k and c["variant"] == variant), key=lambda c: c["gap"])
    return [c["gap"] for c in cells], [c["accuracy"] for c in cells]


def recall_comparison(all_results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None,
                      variant: str = "standard") -> Path:  # fmt: skip
    """Recall accuracy against the gap: one panel per number of pairs k, one line per design (colour
    and marker), its memory-off control dashed beside it.

    Args:
        all_results: recall results (:func:`memzoo.tasks.recall.evaluate_recall`); those with
            ``memory_off`` true are controls, drawn with the result of the same label.
        path: the PNG to write.
        labels: one per result (default: its ``design``).
        variant: ``standard`` or ``overwrite``.
    """
    labels = list(labels) if labels is not None else [r["design"] for r in all_results]
    mains = {label: r for label, r in zip(labels, all_results) if not r.get("memory_off")}
    controls = {label: r for label, r in zip(labels, all_results) if r.get("memory_off")}
    ks = sorted({c["k"] for r in all_results for c in r["cells"]})
    ticks = sorted({c["gap"] for r in all_results for c in r["cells"]})
    fig, axes = plt.subplots(1, max(1, len(ks)), figsize=(3.6 * max(1, len(ks)), 4.8), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for i, label in enumerate(sorted(mains)):
            style = dict(color=PALETTE[i % len(PALETTE)], marker=MARKERS[(i // len(PALETTE) + i) % len(MARKERS)])
            ax.plot(*_recall_curve(mains[label], k, variant), label=label, **style)
            if label in controls:
                ax.plot(*_recall_curve(controls[label], k, variant), linestyle="--", alpha=0.6, markerfacecolor="none", **style)
        ax.set_title(f"{k} pair{'s' if k > 1 else ''} ({variant})", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [format_length(n) for n in ticks], fontsize=7)
        ax.set_xlabel("gap between pairs and queries (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("query accuracy (exact value)")
    handles, names = axes[0][0].get_legend_handles_labels()
    if controls:
        handles.append(plt.Line2D([], [], linestyle="--", color="grey"))
        names.append("memory off (dashed)")
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(7, len(names)), frameon=False)
    return save_figure(fig, path, rect=(0, 0.12, 1, 1))


def recall_state(all_results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None, *, gap: int, k: int) -> Path:
    """Accuracy at one gap and k against the state's bytes per sequence: filled markers the designs,
    hollow ones their memory-off controls."""
    labels = list(labels) if labels is not None else [r["design"] for r in all_results]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    names = sorted({label for label in labels})
    for label, r in zip(labels, all_results):
        cell = next((c for c in r["cells"] if c["gap"] == gap and c["k"] == k and c["variant"] == "standard"), None)
        if cell is None:
            continue
        i = names.index(label)
        off = bool(r.get("memory_off"))
        ax.scatter(cell["state_bytes"] / 2**20, cell["accuracy"], color=PALETTE[i % len(PALETTE)], marker=MARKERS[i % len(MARKERS)],
                   facecolors="none" if off else PALETTE[i % len(PALETTE)], s=50, label=None if off else label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("state per sequence (MiB, log scale)")
    ax.set_ylabel(f"query accuracy, {k} pairs, gap {format_length(gap)}")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="hollow: memory off", title_fontsize=7)
    return save_figure(fig, path)


def book_length(book_id: str) -> int | None:
    """The length a synthetic book was asked for, from its id (``synthetic-<seed>-<n_tokens>``); None for other books."""
    parts = str(book_id).split("-")
    return int(parts[-1]) if len(parts) == 3 and parts[0] == "synthetic" and parts[-1].isdigit() else None


def booksum_events(all_results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Event recall (mean over books) against the synthetic book's length: one line per design (colour
    and marker); ROUGE overall in a second panel, where a summary with every fact wrong still scores.

    Args:
        all_results: book summarization results (:func:`memzoo.tasks.booksum_eval.evaluate_booksum`) on
            synthetic books; books without an event recall are left out.
        path: the PNG to write.
        labels: one per result (default: its ``model``).
    """
    labels = list(labels) if labels is not None else [r["model"] for r in all_results]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4), sharex=True)
    ticks: set[int] = set()
    for i, (label, r) in enumerate(sorted(zip(labels, all_results), key=lambda pair: pair[0])):
        by_length: dict[int, list[dict]] = {}
        for book in r["books"]:
            n = book_length(book["id"])
            if n is not None and book.get("event_recall") is not None:
                by_length.setdefault(n, []).append(book)
        lengths = sorted(by_length)
        ticks |= set(lengths)
        style = dict(color=PALETTE[i % len(PALETTE)], marker=MARKERS[(i // len(PALETTE) + i) % len(MARKERS)], label=label)
        for ax, key in zip(axes, ("event_recall", "overall")):
            ax.plot(lengths, [sum(b[key] for b in by_length[n]) / len(by_length[n]) for n in lengths], **style)
    for ax, name, top in zip(axes, ("event recall (share of events repeated whole)", "ROUGE overall (x100)"), (1.03, 103)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [format_length(n) for n in sorted(ticks)], fontsize=7)
        ax.set_xlabel("book length (tokens)")
        ax.set_ylabel(name)
        ax.set_ylim(-0.03 * top, top)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(6, len(names)), frameon=False)
    return save_figure(fig, path, rect=(0, 0.1, 1, 1))

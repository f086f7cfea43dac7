"""Pictures of a run: ``curves.png`` (loss and kNN accuracy per epoch) and the
retrieval grid (queries and their nearest training images, framed green when
the neighbour has the query's class and red otherwise, as in the paper's figure).

Uses matplotlib's object API with the Agg canvas (no display, no pyplot state).
"""
from __future__ import annotations

import os

import numpy as np

GREEN, RED, QUERY = "#1a9641", "#d7191c", "#2b83ba"


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi=100):
    """Write the png through a temp file and rename, so readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-" + os.path.basename(path))
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)


def plot_curves(history, path, title=None):
    """Two panels over epochs: training loss; kNN top-1 and top-5 (percent)."""
    ep = [h["epoch"] for h in history]
    fig = _figure(10, 4)
    a1, a2 = fig.subplots(1, 2)
    a1.plot(ep, [h["loss"] for h in history], "o-", color="#404040", ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a1.grid(alpha=0.3)
    a2.plot(ep, [h["knn_top1"] for h in history], "o-", ms=3, label="kNN top-1 (memory bank)")
    a2.plot(ep, [h["knn_top5"] for h in history], "s--", ms=3, label="kNN top-5 (memory bank)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test accuracy (%)")
    a2.grid(alpha=0.3)
    a2.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _show(ax, img, color, width):
    img = np.asarray(img)
    if img.ndim == 2:
        ax.imshow(img, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(img, 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(color)
        s.set_linewidth(width)


def plot_retrieval(query_images, query_labels, neighbour_images, neighbour_labels, path, class_names=None,
                   title=None):
    """One row per query: the query, then its neighbours left to right (nearest first).

    query_images: Q images (HxW or HxWx3 in [0, 1]); neighbour_images: Q lists of k images;
    labels are ints. Neighbours with the query's label are framed green, others red.
    """
    q = len(query_images)
    k = max(len(r) for r in neighbour_images) if q else 0
    if q == 0 or k == 0:
        raise ValueError("plot_retrieval needs at least one query and one neighbour")
    fig = _figure(1.1 * (k + 1) + 0.4, 1.15 * q + 0.5)
    axes = np.asarray(fig.subplots(q, k + 1, squeeze=False))

    def name(c):
        return str(class_names[c]) if class_names is not None else str(c)

    for r in range(q):
        _show(axes[r, 0], query_images[r], QUERY, 3)
        axes[r, 0].set_title(f"query: {name(query_labels[r])}", fontsize=7)
        for j in range(k):
            ax = axes[r, j + 1]
            if j >= len(neighbour_images[r]):
                ax.axis("off")
                continue
            ok = int(neighbour_labels[r][j]) == int(query_labels[r])
            _show(ax, neighbour_images[r][j], GREEN if ok else RED, 3)
            if r == 0:
                ax.set_title(f"#{j + 1}", fontsize=7)
    fig.suptitle(title or "queries (left, blue) and their nearest training images: green = same class, red = other")
    fig.tight_layout()
    _save(fig, path)

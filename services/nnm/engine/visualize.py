"""Pictures: the confusion matrix and the cluster prototypes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write_bytes


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    side = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted class (matched cluster)")
    ax.set_ylabel("true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                if v >= 0.005:
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black"
                    )
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def prototypes_png(
    images: np.ndarray,
    rows: Sequence[Sequence[int]],
    captions: Sequence[str],
    path: Path,
    cell: int = 64,
) -> None:
    """A grid: one row per cluster with its caption and its most representative images.

    `images` is uint8 (N, C, H, W); `rows[k]` lists image indices for cluster k (may be empty).
    """
    per_row = max([len(r) for r in rows] + [1])
    label_w = 150
    pad = 4
    width = label_w + per_row * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (members, caption) in enumerate(zip(rows, captions, strict=True)):
        y = pad + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 12), caption, fill="black", font=font)
        if not members:
            draw.text((label_w, y + cell // 2 - 6), "(empty cluster)", fill="gray", font=font)
        for c, idx in enumerate(members):
            arr = images[idx]
            arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
            tile = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
            tile = tile.resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (cell + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def criterion_curve_png(
    curve: dict[int, float], chosen: int, criterion: str, path: Path, title: str = "", accept_above: float | None = None
) -> None:
    """The estimate's criterion over the candidate numbers of clusters, the chosen one marked, and the level
    a K had to reach to be chosen over the highest-scoring one (`accept_above`) as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(curve)
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(ks, [curve[k] for k in ks], marker="o", markersize=3, color="#1f5f9f")
    ax.axvline(chosen, color="#c0392b", linestyle="--", linewidth=1)
    if accept_above is not None:
        ax.axhline(accept_above, color="#7f8c8d", linestyle=":", linewidth=1)
        ax.annotate("smallest K above this line is chosen", (ks[-1], accept_above), textcoords="offset points",
                    xytext=(0, -11), ha="right", fontsize=7, color="#7f8c8d")
    ax.annotate(f"K = {chosen}", (chosen, curve[chosen]), textcoords="offset points", xytext=(6, 6), color="#c0392b")
    ax.margins(y=0.12)  # room above the highest point for the K label
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel({"eigengap": "gap after K (normalised Laplacian)", "silhouette": "mean silhouette",
                   "modularity": "modularity on the mined graph"}.get(criterion, criterion))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

"""What the report's tables and figures share: Markdown tables, percentages, and small PNGs."""

from __future__ import annotations

import numpy as np


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An image [H, W, C] as imshow shows it: a grayscale one ([H, W, 1]) as gray RGB;
    other channel counts than 1, 3 and 4 by their first channel."""
    if image.shape[-1] in (3, 4):
        return image
    return np.repeat(image[..., :1], 3, axis=-1)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save(fig, path: str) -> None:
    """Saves a figure as a small PNG: 256 adaptive colours are plenty for charts and
    32x32 images, and about a third of the size."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    plt.close(fig)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)

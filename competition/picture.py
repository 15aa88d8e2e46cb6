"""A retrieval picture: queries and their top references, correct ones framed green."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from competition.data import try_load_image
from competition.fileio import atomic_path

GREEN, RED, GREY = (40, 170, 60), (210, 40, 40), (150, 150, 150)


def _tile(path: str | os.PathLike, size: int, frame: tuple[int, int, int] | None, border: int) -> Image.Image:
    img = try_load_image(path)
    if img is None:
        img = Image.new("RGB", (size, size), (60, 60, 60))
    img = img.copy()
    img.thumbnail((size - 2 * border, size - 2 * border))
    tile = Image.new("RGB", (size, size), frame or (255, 255, 255))
    inner = Image.new("RGB", (size - 2 * border, size - 2 * border), (255, 255, 255))
    inner.paste(img, ((inner.width - img.width) // 2, (inner.height - img.height) // 2))
    tile.paste(inner, (border, border))
    return tile


def retrieval_picture(
    query_paths: Sequence[str | os.PathLike],
    ranked_paths: Sequence[Sequence[str | os.PathLike]],
    correct: Sequence[Sequence[bool]] | None,
    out_path: str | os.PathLike,
    tile: int = 112,
    border: int = 5,
) -> Path:
    """Save a PNG with one row per query: the query (grey frame), then its ranked
    references framed green (correct) or red (wrong); unframed when ``correct`` is None.
    Returns the path written."""
    if len(query_paths) != len(ranked_paths):
        raise ValueError(f"{len(query_paths)} queries but {len(ranked_paths)} ranked lists")
    n_cols = 1 + max((len(r) for r in ranked_paths), default=0)
    gap = tile // 6
    canvas = Image.new("RGB", (n_cols * tile + gap, max(1, len(query_paths)) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (query, ranked) in enumerate(zip(query_paths, ranked_paths)):
        y = row * tile
        canvas.paste(_tile(query, tile, GREY, border), (0, y))
        for col, ref in enumerate(ranked):
            frame = None if correct is None else (GREEN if correct[row][col] else RED)
            x = gap + (col + 1) * tile
            canvas.paste(_tile(ref, tile, frame, border), (x, y))
            draw.text((x + border + 2, y + border + 1), str(col + 1), fill=(0, 0, 0))
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")
    return out_path

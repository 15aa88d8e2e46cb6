"""A retrieval picture: queries and their top references, correct ones framed green.

Layout (``retrieval_picture``): a legend on top, then per query a caption line
(query name and its AP) above a row of tiles: the query (grey frame), a wider
gap, then its ranked references framed green (same class) or red (other class),
each tile separated from the next by ``spacing`` background pixels.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from competition.data import try_load_image
from competition.fileio import atomic_path

GREEN, RED, GREY = (40, 170, 60), (210, 40, 40), (150, 150, 150)
BACKGROUND, INK, MISSING = (255, 255, 255), (20, 20, 20), (60, 60, 60)
MARGIN = 10


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):  # an old Pillow or one without FreeType: the bitmap font
        return ImageFont.load_default()


def _tile(path: str | os.PathLike, size: int, frame: tuple[int, int, int] | None, border: int) -> Image.Image:
    """A ``size`` x ``size`` tile: the image scaled to fit inside a ``border``-wide frame
    (background colour when ``frame`` is None); a dark square for an unreadable image."""
    inner_size = size - 2 * border
    img = try_load_image(path)
    if img is None:
        img = Image.new("RGB", (inner_size, inner_size), MISSING)
    img = ImageOps.contain(img, (inner_size, inner_size))
    tile = Image.new("RGB", (size, size), frame or BACKGROUND)
    inner = Image.new("RGB", (inner_size, inner_size), BACKGROUND)
    inner.paste(img, ((inner_size - img.width) // 2, (inner_size - img.height) // 2))
    tile.paste(inner, (border, border))
    return tile


def _legend(draw: ImageDraw.ImageDraw, y: int, with_correct: bool, font) -> None:
    """Colour swatches and what they mean, in one line starting at (MARGIN, y)."""
    items = [(GREY, "query")]
    if with_correct:
        items += [(GREEN, "same class as the query"), (RED, "another class")]
    x, box = MARGIN, int(font.size if hasattr(font, "size") else 11)
    for colour, text in items:
        draw.rectangle([x, y, x + box, y + box], fill=BACKGROUND, outline=colour, width=max(2, box // 4))
        x += box + 6
        draw.text((x, y), text, fill=INK, font=font)
        x += int(draw.textlength(text, font=font)) + 20
    draw.text((x, y), "top-left number: rank", fill=INK, font=font)


def retrieval_picture(
    query_paths: Sequence[str | os.PathLike],
    ranked_paths: Sequence[Sequence[str | os.PathLike]],
    correct: Sequence[Sequence[bool]] | None,
    out_path: str | os.PathLike,
    query_names: Sequence[str] | None = None,
    query_ap: Sequence[float] | None = None,
    ap_name: str = "AP",
    tile: int = 112,
    border: int = 5,
    spacing: int = 8,
) -> Path:
    """Save a PNG with one row per query: the query (grey frame), then its ranked
    references framed green (correct) or red (wrong); unframed when ``correct`` is None.
    Each row is captioned with its query's name (``query_names``, default the file name)
    and, when given, ``query_ap`` (e.g. ``ap_name="AP@1000"``). Returns the path written."""
    if len(query_paths) != len(ranked_paths):
        raise ValueError(f"{len(query_paths)} queries but {len(ranked_paths)} ranked lists")
    for name, extra in (("query_names", query_names), ("query_ap", query_ap), ("correct", correct)):
        if extra is not None and len(extra) != len(query_paths):
            raise ValueError(f"{len(query_paths)} queries but {len(extra)} entries in {name}")
    names = list(query_names) if query_names is not None else [Path(p).name for p in query_paths]
    font, small = _font(14), _font(12)
    line = 14 + 8                        # caption height above each row
    row_h = line + tile + spacing * 2    # caption, tiles, gap to the next row
    n_refs = max((len(r) for r in ranked_paths), default=0)
    query_gap = 3 * spacing
    width = 2 * MARGIN + tile + (query_gap + n_refs * tile + (n_refs - 1) * spacing if n_refs else 0)
    top = MARGIN + line + spacing        # below the legend
    canvas = Image.new("RGB", (max(width, 520), top + max(1, len(query_paths)) * row_h + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _legend(draw, MARGIN, correct is not None, small)
    for row, (query, ranked) in enumerate(zip(query_paths, ranked_paths)):
        y = top + row * row_h
        caption = f"query {names[row]}" + (f"    {ap_name} {query_ap[row]:.4f}" if query_ap is not None else "")
        draw.text((MARGIN, y), caption, fill=INK, font=font)
        y += line
        canvas.paste(_tile(query, tile, GREY, border), (MARGIN, y))
        for col, ref in enumerate(ranked):
            frame = None if correct is None else (GREEN if correct[row][col] else RED)
            x = MARGIN + tile + query_gap + col * (tile + spacing)
            canvas.paste(_tile(ref, tile, frame, border), (x, y))
            label = str(col + 1)
            box = draw.textbbox((x + border + 3, y + border + 2), label, font=small)
            draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=BACKGROUND)
            draw.text((x + border + 3, y + border + 2), label, fill=INK, font=small)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")
    return out_path

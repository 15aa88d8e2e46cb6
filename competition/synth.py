"""Procedural product-retrieval dataset in the NAVER AI Vision hackathon layout.

Each class is a drawn "product" with a fixed identity (body shape, base colour from
a small shared palette, a texture pattern, printed glyphs, a logo and a barcode
band) photographed under random pose, lighting, clutter, occlusion, blur and JPEG
noise. Base colours are deliberately shared between classes, so colour alone does
not solve retrieval. Fully seeded: the same config gives byte-identical files.

    python -m competition.synth --out DIR [--seed 0] [--train-classes 24] ...
"""
from __future__ import annotations

import csv
import functools
import io
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from competition.cli import ArgumentParser, UserError, number, run_command

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 45), "blue": (40, 90, 200), "green": (40, 150, 70),
    "yellow": (235, 200, 40), "orange": (240, 130, 30), "purple": (130, 60, 170),
    "brown": (140, 95, 55), "teal": (30, 160, 160),
}
INKS: list[tuple[int, int, int]] = [(20, 20, 25), (250, 250, 245), (200, 30, 30), (25, 40, 120)]
SHAPES = ("box", "bottle", "can", "pouch", "jar", "carton")
PATTERNS = ("stripes", "dots", "checks", "waves", "diagonal", "zigzag")
LOGOS = ("circle", "triangle", "diamond", "ring", "bars", "cross")
ASPECT = {"box": 0.72, "bottle": 0.48, "can": 0.55, "pouch": 0.70, "jar": 0.68, "carton": 0.56}
GLYPHS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"


class SynthConfigError(UserError, ValueError):
    """A dataset configuration that cannot be generated."""


@dataclass
class SynthConfig:
    """What to generate; the defaults give ~320 images of 96 px in a few seconds."""

    seed: int = 0
    train_classes: int = 24
    test_classes: int = 8
    images_per_class: int = 10  # train images per train class
    queries_per_class: int = 3
    references_per_class: int = 7
    size: int = 96  # output side in pixels (square images)
    workers: int = 1
    overwrite: bool = False


@dataclass(frozen=True)
class ProductSpec:
    """The fixed visual identity of one product class."""

    shape: str
    colour: str
    pattern: str
    pattern_ink: tuple[int, int, int]
    pattern_period: float  # fraction of product height
    pattern_vertical: bool
    label: tuple[int, int, int]
    band: tuple[float, float]  # label band, fraction of height
    glyphs: str
    glyph_ink: tuple[int, int, int]
    logo: str
    logo_ink: tuple[int, int, int]
    barcode: tuple[int, ...]  # bar widths, alternating black/white
    barcode_right: bool

    def describe(self) -> str:
        return f"{self.colour}-{self.shape}-{self.pattern}-{self.logo}-{self.glyphs}"


def make_specs(n: int, n_colours: int, rng: np.random.Generator) -> list[ProductSpec]:
    """n product identities; colour i % n_colours, so classes share base colours."""
    names = list(PALETTE)
    colours = [names[j] for j in rng.permutation(len(names))[:n_colours]]
    grid = [(s, p, lg) for s in SHAPES for p in PATTERNS for lg in LOGOS]
    order = rng.permutation(len(grid))
    specs = []
    for i in range(n):
        shape, pattern, logo = grid[order[i % len(grid)]]
        colour = colours[i % n_colours]
        others = [c for c in names if c != colour]
        a = float(rng.uniform(0.15, 0.55))
        specs.append(ProductSpec(
            shape=shape, colour=colour, pattern=pattern,
            pattern_ink=INKS[rng.integers(2)] if rng.random() < 0.5 else PALETTE[others[rng.integers(len(others))]],
            pattern_period=float(rng.uniform(0.12, 0.3)), pattern_vertical=bool(rng.random() < 0.5),
            label=INKS[rng.integers(2)] if rng.random() < 0.6 else PALETTE[others[rng.integers(len(others))]],
            band=(a, a + float(rng.uniform(0.18, 0.3))),
            glyphs="".join(GLYPHS[k] for k in rng.integers(len(GLYPHS), size=int(rng.integers(2, 4)))),
            glyph_ink=INKS[rng.integers(len(INKS))], logo=logo, logo_ink=INKS[rng.integers(len(INKS))],
            barcode=tuple(int(w) for w in rng.integers(1, 4, size=12)), barcode_right=bool(rng.random() < 0.5),
        ))
    return specs


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, px))


def _pattern(d: ImageDraw.ImageDraw, s: ProductSpec, w: int, h: int) -> None:
    """Draw the class texture over the whole w x h canvas."""
    p = max(4, int(s.pattern_period * h))
    ink, t = s.pattern_ink, max(1, p // 4)
    if s.pattern == "stripes":
        for k in range(0, w + h, p):
            d.rectangle((k, 0, k + p // 2, h) if s.pattern_vertical else (0, k, w, k + p // 2), fill=ink)
    elif s.pattern == "dots":
        for row, y in enumerate(range(0, h + p, p)):
            for x in range((row % 2) * p // 2, w + p, p):
                d.ellipse((x - p // 4, y - p // 4, x + p // 4, y + p // 4), fill=ink)
    elif s.pattern == "checks":
        for y in range(0, h, p // 2 + 1):
            for x in range(0, w, p // 2 + 1):
                if (x // (p // 2 + 1) + y // (p // 2 + 1)) % 2:
                    d.rectangle((x, y, x + p // 2, y + p // 2), fill=ink)
    elif s.pattern == "waves":
        xs = np.arange(0, w + 2, 2)
        for y0 in range(0, h + p, p):
            ys = y0 + 0.3 * p * np.sin(xs * 2 * np.pi / p)
            d.line(list(zip(xs.tolist(), ys.tolist())), fill=ink, width=t)
    elif s.pattern == "diagonal":
        sign = 1 if s.pattern_vertical else -1
        for k in range(-h, w + h, p):
            d.line((k, 0, k + sign * h, h), fill=ink, width=t + 1)
    else:  # zigzag
        for y0 in range(0, h + p, p):
            pts = [(x, y0 + (p // 3 if (x // (p // 2)) % 2 else 0)) for x in range(0, w + p, p // 2)]
            d.line(pts, fill=ink, width=t)


def _logo(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, ink: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=ink)
    elif kind == "ring":
        d.ellipse(box, outline=ink, width=max(1, int(r / 3)))
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=ink)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=ink)
    elif kind == "bars":
        for k in range(3):
            d.rectangle((cx - r + k * 0.7 * r, cy - r + k * 0.5 * r, cx - r + k * 0.7 * r + 0.45 * r, cy + r), fill=ink)
    else:  # cross
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=ink)
        d.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=ink)


def render_product(s: ProductSpec, h: int) -> Image.Image:
    """Canonical upright RGBA picture of a product, h pixels tall."""
    w = max(8, int(ASPECT[s.shape] * h))
    img = Image.new("RGB", (w, h), PALETTE[s.colour])
    d = ImageDraw.Draw(img)
    _pattern(d, s, w, h)
    y0, y1 = int(s.band[0] * h), int(s.band[1] * h)
    d.rectangle((0, y0, w, y1), fill=s.label)
    bh = y1 - y0
    r = min(bh * 0.32, w * 0.16)
    _logo(d, s.logo, w * 0.2, (y0 + y1) / 2, r, s.logo_ink)
    d.text((w * 0.62, (y0 + y1) / 2), s.glyphs, fill=s.glyph_ink, font=_font(int(bh * 0.5)), anchor="mm")
    # barcode-like band under the label
    unit = max(1, w // 40)
    bx = int(w * (0.5 if s.barcode_right else 0.1))
    by0, by1 = min(h - 2, y1 + h // 40), min(h - 1, y1 + h // 40 + h // 10)
    d.rectangle((bx - unit, by0, bx + sum(s.barcode) * unit + unit, by1), fill=(250, 250, 250))
    for k, bw in enumerate(s.barcode):
        if k % 2 == 0 and by1 - by0 > 2:
            d.rectangle((bx, by0 + 1, bx + bw * unit - 1, by1 - 1), fill=(10, 10, 10))
        bx += bw * unit
    arr = np.asarray(img, dtype=np.float32)
    if s.shape in ("can", "bottle", "jar"):  # cylindrical shading
        arr *= (0.6 + 0.45 * np.sin(np.linspace(0.15, np.pi - 0.15, w)))[None, :, None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    m = ImageDraw.Draw(mask)
    d = ImageDraw.Draw(img)
    if s.shape == "box":
        m.rounded_rectangle((0, 0, w - 1, h - 1), radius=w // 20, fill=255)
    elif s.shape == "carton":
        m.polygon([(0, h * 0.14), (w / 2, 0), (w - 1, h * 0.14), (w - 1, h - 1), (0, h - 1)], fill=255)
        d.polygon([(0, h * 0.14), (w / 2, 0), (w - 1, h * 0.14)], fill=(235, 235, 230))
    elif s.shape == "bottle":
        m.rounded_rectangle((0, h * 0.35, w - 1, h - 1), radius=w // 6, fill=255)
        m.polygon([(0, h * 0.4), (w * 0.3, h * 0.2), (w * 0.7, h * 0.2), (w - 1, h * 0.4)], fill=255)
        m.rectangle((w * 0.3, 0, w * 0.7, h * 0.25), fill=255)
        d.rectangle((w * 0.28, 0, w * 0.72, h * 0.07), fill=(60, 60, 60))
    elif s.shape == "can":
        m.rectangle((0, h * 0.05, w - 1, h * 0.95), fill=255)
        m.ellipse((0, 0, w - 1, h * 0.1), fill=255)
        m.ellipse((0, h * 0.9, w - 1, h - 1), fill=255)
        d.ellipse((0, 0, w - 1, h * 0.1), fill=(190, 190, 195))
    elif s.shape == "pouch":
        teeth = [(x, (h * 0.03 if (k % 2) else 0)) for k, x in enumerate(np.linspace(w * 0.05, w * 0.95, 11))]
        m.polygon(teeth + [(w - 1, h * 0.9), (w * 0.5, h - 1), (0, h * 0.9)], fill=255)
    else:  # jar
        m.rounded_rectangle((0, h * 0.14, w - 1, h - 1), radius=w // 5, fill=255)
        m.rectangle((w * 0.08, 0, w * 0.92, h * 0.16), fill=255)
        d.rectangle((w * 0.08, 0, w * 0.92, h * 0.16), fill=(70, 70, 75))
    img.putalpha(mask)
    return img


def _pose(prod: Image.Image, height: float, rng: np.random.Generator) -> Image.Image:
    """Random scale, yaw-like squeeze, shear and rotation of an RGBA product."""
    w0, h0 = prod.size
    sx = rng.uniform(0.8, 1.1)
    prod = prod.resize((max(4, int(w0 * height / h0 * sx)), max(4, int(height))), Image.BILINEAR)
    w, h = prod.size
    sh = rng.uniform(-0.25, 0.25)
    ew = w + int(abs(sh) * h)
    off = -sh * h if sh > 0 else 0.0
    prod = prod.transform((ew, h), Image.AFFINE, (1, sh, -off, 0, 1, 0), Image.BILINEAR)
    angle = rng.uniform(-30, 30) + (90 * rng.choice([-1, 1]) if rng.random() < 0.1 else 0)
    return prod.rotate(float(angle), Image.BILINEAR, expand=True)


def render_scene(s: ProductSpec, canon: Image.Image, distractors: list[Image.Image],
                 size: int, rng: np.random.Generator) -> bytes:
    """One JPEG photo of the product with random pose, clutter, lighting and noise."""
    S = 2 * size  # supersampled canvas
    c0, c1 = (np.clip(rng.uniform(70, 220) + rng.normal(0, 25, 3), 0, 255) for _ in range(2))  # muted
    t = np.linspace(0, 1, S)[:, None] * np.cos(a := rng.uniform(0, np.pi)) + np.linspace(0, 1, S)[None, :] * np.sin(a)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    bg = (c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(12, 30))):
        x, y = rng.integers(-S // 4, S, 2)
        bw, bh = rng.integers(S // 16, S // 4, 2)
        rgb = rng.integers(0, 256, 3) if rng.random() < 0.3 else rng.uniform(30, 230) + rng.normal(0, 20, 3)
        fill = tuple(int(v) for v in np.clip(rgb, 0, 255)) + (int(rng.integers(120, 256)),)
        kind = rng.integers(3)
        if kind == 0:
            d.rectangle((x, y, x + bw, y + bh), fill=fill)
        elif kind == 1:
            d.ellipse((x, y, x + bw, y + bh), fill=fill)
        else:
            d.line((x, y, x + bw, y + bh), fill=fill, width=int(rng.integers(2, S // 12)))
    if distractors and rng.random() < 0.25:  # a partial other product at the edge
        other = _pose(distractors[rng.integers(len(distractors))], rng.uniform(0.5, 0.9) * S, rng)
        ox = int(rng.choice([-other.width * 0.6, S - other.width * 0.4]))
        img.paste(other, (ox, int(rng.uniform(-0.3, 0.6) * S)), other)
    prod = _pose(canon, rng.uniform(0.9, 1.2) * S, rng)
    px = int(S / 2 - prod.width / 2 + rng.uniform(-0.12, 0.12) * S)
    py = int(S / 2 - prod.height / 2 + rng.uniform(-0.12, 0.12) * S)
    img.paste(prod, (px, py), prod)
    if rng.random() < 0.3:  # occluder over part of the product
        d = ImageDraw.Draw(img)
        ow, oh = prod.width * rng.uniform(0.2, 0.5), prod.height * rng.uniform(0.2, 0.4)
        ox, oy = px + rng.uniform(0, prod.width - ow), py + rng.uniform(0, prod.height - oh)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((ox, oy, ox + ow, oy + oh), fill=fill)
    img = img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr * rng.uniform(0.9, 1.1, 3)[None, None, :]  # colour cast
    arr = (arr - arr.mean()) * rng.uniform(0.8, 1.2) + arr.mean() + rng.uniform(-0.08, 0.08)
    arr = np.clip(arr, 0, 1) ** rng.uniform(0.8, 1.25)
    arr = arr * 255 + rng.normal(0, rng.uniform(0, 4), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(55, 96)))
    return buf.getvalue()


def _render_class(job: tuple) -> list[tuple[str, bytes]]:
    """Render every image of one class: job = (spec, distractor specs, [(path, seed seq)], size)."""
    spec, dspecs, items, size = job
    canon = render_product(spec, 2 * size)
    dis = [render_product(ds, 2 * size) for ds in dspecs]
    return [(path, render_scene(spec, canon, dis, size, np.random.default_rng(ss))) for path, ss in items]


def generate(out_dir: str | Path, config: SynthConfig | None = None) -> dict:
    """Write the dataset under out_dir and return a summary dict."""
    cfg = config or SynthConfig()
    if cfg.train_classes < 1 or cfg.test_classes < 1 or cfg.queries_per_class < 1 or cfg.references_per_class < 1:
        raise SynthConfigError("need >= 1 train class, test class, query and reference per class")
    if cfg.size < 24 or cfg.images_per_class < 1 or cfg.workers < 1:
        raise SynthConfigError("need size >= 24 px, >= 1 image per train class and >= 1 worker")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite (overwrite=True) to replace it")
        for sub in ("train", "test", "classes.csv"):
            p = out / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 0])
    n = cfg.train_classes + cfg.test_classes
    n_colours = max(2, min(len(PALETTE), cfg.test_classes // 2))
    specs = make_specs(n, n_colours, rng)  # test classes first: they pair up on colours
    dspecs = make_specs(4, len(PALETTE), np.random.default_rng([cfg.seed, 1]))
    width = max(4, len(str(n)))
    ids = [f"c{k + 1:0{width}d}" for k in rng.permutation(n)]
    split = ["test"] * cfg.test_classes + ["train"] * cfg.train_classes
    used: set[str] = set()

    def hexname() -> str:
        while (h := rng.bytes(6).hex()) in used:
            pass
        used.add(h)
        return h

    jobs, labels = [], []
    for ci in range(n):
        if split[ci] == "train":
            items = [(f"train/train_data/{ids[ci]}/s{k}.jpg", [cfg.seed, 2, ci, k])
                     for k in range(cfg.images_per_class)]
        else:
            items = []
            for k in range(cfg.queries_per_class + cfg.references_per_class):
                kind = "query" if k < cfg.queries_per_class else "reference"
                name = hexname()
                labels.append((kind, name, ids[ci]))
                items.append((f"test/test_data/{kind}/{name}.jpg", [cfg.seed, 2, ci, k]))
        jobs.append((specs[ci], dspecs, items, cfg.size))
    for sub in ["test/test_data/query", "test/test_data/reference"] + [
            f"train/train_data/{ids[ci]}" for ci in range(n) if split[ci] == "train"]:
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_files = 0
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as ex:
            results = ex.map(_render_class, jobs, chunksize=max(1, len(jobs) // (4 * cfg.workers)))
            for res in results:
                for path, data in res:
                    (out / path).write_bytes(data)
                    n_files += 1
    else:
        for job in jobs:
            for path, data in _render_class(job):
                (out / path).write_bytes(data)
                n_files += 1
    # metadata last: a dataset with labels.csv is a finished one
    with open(out / "classes.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["class", "description", "in"])
        w.writerows(sorted((ids[ci], specs[ci].describe(), split[ci]) for ci in range(n)))
    with open(out / "test" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["split", "name", "class"])
        w.writerows(sorted(labels))
    return {
        "out_dir": str(out), "seed": cfg.seed, "size": cfg.size,
        "train_classes": cfg.train_classes, "test_classes": cfg.test_classes, "colours": n_colours,
        "train_images": cfg.train_classes * cfg.images_per_class,
        "queries": cfg.test_classes * cfg.queries_per_class,
        "references": cfg.test_classes * cfg.references_per_class,
        "images": n_files, "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: parse flags, generate, print a one-line summary."""
    d = SynthConfig()
    ap = ArgumentParser(prog="python -m competition.synth", description=__doc__)
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    ap.add_argument("--seed", type=number(int, 0), default=d.seed, metavar="N", help="seed of everything drawn")
    ap.add_argument("--train-classes", type=number(int, 1), default=d.train_classes, metavar="N",
                    help="product classes in train/")
    ap.add_argument("--test-classes", type=number(int, 1), default=d.test_classes, metavar="N",
                    help="unseen product classes in test/")
    ap.add_argument("--images-per-class", type=number(int, 1), default=d.images_per_class, metavar="N",
                    help="images of each train class")
    ap.add_argument("--queries-per-class", type=number(int, 1), default=d.queries_per_class, metavar="N",
                    help="queries of each test class")
    ap.add_argument("--references-per-class", type=number(int, 1), default=d.references_per_class, metavar="N",
                    help="references of each test class")
    ap.add_argument("--size", type=number(int, 24, 1024), default=d.size, metavar="PX", help="image side in pixels")
    ap.add_argument("--workers", type=number(int, 1, 256), default=d.workers, metavar="N",
                    help="processes (the output is identical for any number)")
    ap.add_argument("--overwrite", action="store_true", help="replace train/, test/, classes.csv in a non-empty DIR")
    a = ap.parse_args(argv)
    cfg = SynthConfig(seed=a.seed, train_classes=a.train_classes, test_classes=a.test_classes,
                      images_per_class=a.images_per_class, queries_per_class=a.queries_per_class,
                      references_per_class=a.references_per_class, size=a.size, workers=a.workers,
                      overwrite=a.overwrite)
    s = generate(a.out, cfg)
    print(f"wrote {s['images']} images to {s['out_dir']}: {s['train_classes']} train classes x "
          f"{cfg.images_per_class}, {s['test_classes']} test classes ({s['queries']} queries, "
          f"{s['references']} references), {s['size']}px, seed {s['seed']}, {s['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))

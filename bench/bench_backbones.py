"""Training and extraction throughput (images/s) of a retrieval backbone.

    python bench/bench_backbones.py                              # efficientnet_b0, 224 px, CPU: fp32 and channels_last
    python bench/bench_backbones.py --device cuda --amp bf16 --channels-last --batch-size 64 --workers 8 --images 2000

Training: forward + backward + AdamW step of RetrievalNet + ArcFace (+ triplet) on
synthetic tensors (no data loading). Extraction: forward in inference mode on
synthetic tensors and, with --images N, the full ``extract_descriptors`` pipeline
(JPEG decode, resize, DataLoader workers) over N generated images. Random init,
``pretrained=False``: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.extract import autocast_dtype, extract_descriptors, torch_device  # noqa: E402
from backbones.heads import MetricLoss, make_head  # noqa: E402
from backbones.model import build_model  # noqa: E402


@dataclass
class Variant:
    """One measured configuration."""

    name: str
    channels_last: bool
    amp: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_s(step: Callable[[], None], bs: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of ``steps`` timed calls of ``step`` (``bs`` images each) after ``warmup`` untimed ones;
    the device is synchronised at both ends of the clock."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return bs * steps / (time.perf_counter() - t0)


def bench_train(arch: str, size: int, bs: int, steps: int, warmup: int, v: Variant, device: torch.device) -> float:
    """Return training images/s (fwd + bwd + optimizer step) on synthetic tensors."""
    torch.manual_seed(0)
    model = build_model(arch, 512, announce=False).to(device)
    loss_fn = MetricLoss(make_head("arcface", 512, 1000), triplet_weight=0.5).to(device)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-4)
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.arange(bs, device=device) // 4
    dtype = autocast_dtype(v.amp, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return images_per_s(step, bs, steps, warmup, device)


def bench_extract(arch: str, size: int, bs: int, steps: int, warmup: int, v: Variant, device: torch.device) -> float:
    """Return inference images/s on synthetic tensors."""
    model = build_model(arch, 512, announce=False).to(device).eval()
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=fmt)
    dtype = autocast_dtype(v.amp, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)

    with torch.inference_mode():
        return images_per_s(step, bs, steps, warmup, device)


def bench_pipeline(arch: str, size: int, bs: int, n: int, workers: int, v: Variant, device: torch.device) -> float:
    """Return images/s of extract_descriptors over n generated 320x256 JPEGs (decode + resize included)."""
    model = build_model(arch, 512, announce=False).to(device).eval()
    if v.channels_last:   # extraction feeds channels-last batches to channels-last weights
        model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            p = Path(tmp) / f"{i:05d}.jpg"
            Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(p, quality=85)
            paths.append(p)
        t0 = time.perf_counter()
        extract_descriptors(model, paths, config={"image_size": size}, batch_size=bs, device=str(device),
                            workers=workers, amp=v.amp, progress=False)
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="efficientnet_b0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true", help="only the channels_last variant")
    ap.add_argument("--both-layouts", action="store_true", help="measure fp32 NCHW and channels_last (CPU default)")
    ap.add_argument("--images", type=int, default=0, help="also time extract_descriptors on N generated JPEGs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch_device(a.device)
    if a.both_layouts or (device.type == "cpu" and not a.channels_last):
        variants = [Variant(f"{a.amp} NCHW", False, a.amp), Variant(f"{a.amp} channels_last", True, a.amp)]
    else:
        variants = [Variant(f"{a.amp} {'channels_last' if a.channels_last else 'NCHW'}", a.channels_last, a.amp)]
    print(f"# {a.arch} {a.image_size}px, batch {a.batch_size}, {a.steps} timed steps after {a.warmup} warm-up, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print("| variant | train img/s | extract img/s (tensors) |" + (" extract_descriptors img/s |" if a.images else ""))
    print("|---|---|---|" + ("---|" if a.images else ""))
    for v in variants:
        tr = bench_train(a.arch, a.image_size, a.batch_size, a.steps, a.warmup, v, device)
        ex = bench_extract(a.arch, a.image_size, a.batch_size * 2, a.steps, a.warmup, v, device)
        row = f"| {v.name} | {tr:.1f} | {ex:.1f} |"
        if a.images:
            row += f" {bench_pipeline(a.arch, a.image_size, a.batch_size * 2, a.images, a.workers, v, device):.1f} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

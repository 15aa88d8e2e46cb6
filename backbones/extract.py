"""Descriptor extraction from a trained run (library + CLI).

    python -m backbones.extract --run RUN_DIR --images DIR_OR_LIST --out FILE.npy [--flip] [--scales 1 0.75]

Saves FILE.npy (n_ok, d) float32 L2-normalised, and FILE.txt with the image name of
each row (unreadable images are skipped and named in a warning).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones.checkpoint import load_run
from backbones.model import RetrievalNet, input_memory_format
from backbones.transforms import PathDataset, eval_transform, path_collate
from competition.cli import ArgumentParser, UserError, number, run_command, show_progress
from competition.data import LoadReport, UnreadableImage, image_name, is_image_file, list_images
from competition.fileio import atomic_path, atomic_write_text
from competition.metrics import retrieval_scores
from rerank import resolve_device, search
from rerank.device import faiss_gpu_count


def torch_device(device: str = "auto") -> torch.device:
    """``rerank.resolve_device`` as a ``torch.device`` (auto | cpu | cuda | cuda:N)."""
    return torch.device(resolve_device(device))


BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 tensor cores


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Map --amp none|bf16|fp16|auto to an autocast dtype (None: full precision).

    auto: bf16 on a GPU of compute capability >= 8.0, fp16 on older GPUs (training pairs it
    with a GradScaler), none on the CPU. bf16 on an older GPU, or fp16 on the CPU, is a UserError.
    """
    if amp == "none":
        return None
    if device.type != "cuda":
        if amp == "fp16":
            raise UserError("--amp fp16 needs a CUDA device; use bf16 or none on CPU")
        return torch.bfloat16 if amp == "bf16" else None
    capability = tuple(torch.cuda.get_device_capability(device))
    has_bf16 = capability >= BF16_CAPABILITY
    if amp == "auto":
        amp = "bf16" if has_bf16 else "fp16"
    if amp == "bf16" and not has_bf16:
        raise UserError(f"--amp bf16: {device} has compute capability {capability[0]}.{capability[1]}, "
                        f"bf16 needs {BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]}; use --amp fp16 or auto")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def dtype_name(dtype: torch.dtype | None) -> str:
    """``"float32"`` for full precision (None), else the autocast dtype's name (``"bfloat16"``, ``"float16"``)."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def extraction_precision(device: str = "auto", amp: str = "auto") -> dict[str, str]:
    """``{"device": "cpu" | "cuda", "amp": dtype_name}``: what ``extract_descriptors`` computes in
    for these arguments (descriptor caches key on it)."""
    dev = torch_device(device)
    return {"device": dev.type, "amp": dtype_name(autocast_dtype(amp, dev))}


def runtime_line(device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """One line for a run's log: the device (GPU name, compute capability), the AMP dtype, faiss's GPUs."""
    where = str(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where += f" ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    n_faiss = faiss_gpu_count()
    note = " (faiss searches on the CPU: no GPU build of faiss)" if device.type == "cuda" and n_faiss == 0 else ""
    return f"device {where}, amp {dtype_name(amp_dtype)}, faiss GPUs {n_faiss}{note}"


def default_workers(device: torch.device) -> int:
    """Image-decoding workers when none are asked for: min(8, CPU cores) feeding a GPU; on the CPU a
    quarter of the cores (at most 8), as the forward pass keeps the others busy."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores if device.type == "cuda" else cores // 4)


def workers_arg(text: str) -> int | None:
    """argparse type of ``--workers``: ``auto`` (None: ``default_workers`` of the device) or a count >= 0."""
    return None if text.strip().lower() == "auto" else number(int, 0)(text)


WORKERS_HELP = "image-decoding worker processes (auto: min(8, CPU cores) on a GPU, a quarter of the cores on the CPU)"


def extract_descriptors(
    model_or_run_dir: RetrievalNet | str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    config: dict | None = None,
    batch_size: int = 64,
    device: str = "auto",
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    workers: int | None = None,
    amp: str = "auto",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (descriptors (n_ok, d) float32 unit rows in input order, ok (n,) bool mask over ``paths``).

    Unreadable images are skipped with one warning naming each. TTA (flip, scales)
    averages the unit descriptors of each view and re-normalises. ``config`` gives
    image_size / crop_pct / model mean+std (a run's config.json). device "auto": the
    model's own device (a run dir loads onto CUDA when available); amp: see ``autocast_dtype``;
    workers None: ``default_workers`` of the device.
    """
    if isinstance(model_or_run_dir, (str, os.PathLike)):
        model, run_cfg = load_run(model_or_run_dir, device)
        config = config or run_cfg
    else:
        model = model_or_run_dir
    config = config or {}
    spec = config.get("model", {})
    mean = spec.get("mean", model.spec.mean)
    std = spec.get("std", model.spec.std)
    image_size = int(config.get("image_size", 224))
    crop_pct = float(config.get("crop_pct", 1.0))
    dev = next(model.parameters()).device if device == "auto" else torch_device(device)
    model_dev = next(model.parameters()).device
    if model_dev != dev:
        model.to(dev)
    dtype = autocast_dtype(amp, dev)
    workers = default_workers(dev) if workers is None else workers
    memory_format = input_memory_format(model)   # channels-last weights take channels-last batches
    tfms = [eval_transform(image_size, mean, std, crop_pct, s) for s in scales]
    loader = DataLoader(PathDataset(paths, tfms), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=path_collate, pin_memory=dev.type == "cuda",
                        persistent_workers=False)
    n = len(paths)
    out = np.zeros((n, model.embedding_dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    report = LoadReport()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = tqdm(loader, desc="extract", unit="batch", disable=not show_progress(progress), file=sys.stderr)
            for idx, views, failed in batches:
                for i, reason in failed:
                    report.record_failure(UnreadableImage(os.fspath(paths[i]), reason))
                if len(idx) == 0:
                    continue
                acc = None
                for x in views:
                    x = x.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
                    for xv in ([x, torch.flip(x, dims=[3])] if flip else [x]):
                        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            d = model(xv).float()
                        acc = d if acc is None else acc + d
                acc = torch.nn.functional.normalize(acc, dim=1)
                rows = idx.numpy()
                out[rows] = acc.cpu().numpy()
                ok[rows] = True
    finally:
        model.train(was_training)
        if model_dev != dev:
            model.to(model_dev)
    report.loaded = int(ok.sum())
    return (out if ok.all() else out[ok]), ok


def search_scores(queries: np.ndarray, q_labels: Sequence, references: np.ndarray,
                  r_labels: Sequence, k: int = 1000) -> dict:
    """Return ``{"map_at_k", "recall_at_1", "n_query", "n_reference"}`` of an exact cosine search."""
    _, ranks = search(queries, references, min(k, len(references)))
    return {**retrieval_scores(ranks, q_labels, r_labels, k=k),
            "n_query": int(len(queries)), "n_reference": int(len(references))}


def evaluate_test(run_dir: str | os.PathLike, dataset: str | os.PathLike, **kw) -> dict:
    """Score a run on a dataset's test query/reference with test/labels.csv: mAP@1000, Recall@1.

    ``kw`` goes to ``extract_descriptors`` (batch_size, flip, scales, workers, ...).
    """
    from competition.data import labels_for, read_labels, scan_test

    model, config = load_run(run_dir, kw.pop("device", "auto"))
    test, labels = scan_test(dataset), read_labels(dataset)
    parts = {}
    for part, paths in (("query", test.query_paths), ("reference", test.reference_paths)):
        desc, ok = extract_descriptors(model, paths, config=config, **kw)
        names = [image_name(p) for p, good in zip(paths, ok) if good]
        parts[part] = (desc, labels_for(names, labels[part], f"{dataset} {part}"))
    return search_scores(parts["query"][0], parts["query"][1], parts["reference"][0], parts["reference"][1])


def _read_paths(images: str) -> list[Path]:
    """A folder (its images, sorted) or a text file with one path per line."""
    p = Path(images)
    if p.is_dir():
        return list_images(p)
    if p.is_file() and not is_image_file(p):
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        return [Path(ln) if os.path.isabs(ln) else p.parent / ln for ln in lines]
    raise FileNotFoundError(f"--images {images}: neither a folder nor a list file")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m backbones.extract", description=__doc__)
    ap.add_argument("--run", required=True, metavar="DIR", help="a training run folder")
    ap.add_argument("--images", metavar="DIR_OR_LIST", help="an image folder, or a text file with one path per line")
    ap.add_argument("--out", metavar="FILE.npy", help="output descriptors (a .txt of names is written beside it)")
    ap.add_argument("--evaluate", metavar="DATASET",
                    help="instead: score the run on DATASET's test split with test/labels.csv")
    ap.add_argument("--batch-size", type=number(int, 1), default=64, metavar="N", help="images per batch")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                    help="mixed precision (auto: bf16 on GPUs of compute capability >= 8.0, fp16 on older "
                         "GPUs, none on CPU)")
    ap.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    ap.add_argument("--scales", type=number(float, 0.1, 4.0), nargs="+", default=[1.0], metavar="S",
                    help="multi-scale test-time augmentation: image size factors averaged")
    ap.add_argument("--workers", type=workers_arg, default="auto", metavar="N|auto", help=WORKERS_HELP)
    a = ap.parse_args(argv)
    if a.evaluate:
        scores = evaluate_test(a.run, a.evaluate, batch_size=a.batch_size, device=a.device, flip=a.flip,
                               scales=a.scales, workers=a.workers, amp=a.amp)
        print(json.dumps(scores))
        return 0
    if not (a.images and a.out):
        ap.error("--images and --out are required (or --evaluate DATASET)")
    paths = _read_paths(a.images)
    desc, ok = extract_descriptors(a.run, paths, batch_size=a.batch_size, device=a.device, flip=a.flip,
                                   scales=a.scales, workers=a.workers, amp=a.amp)
    out = Path(a.out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, desc)
    names = [image_name(p) for p, good in zip(paths, ok) if good]
    atomic_write_text(out.with_suffix(".txt"), "".join(n + "\n" for n in names))
    print(f"{out}: {desc.shape[0]} descriptors of dim {desc.shape[1]} "
          f"({int((~ok).sum())} unreadable skipped); names in {out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))

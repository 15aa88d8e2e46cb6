"""Metric-learning training of a retrieval backbone on the train classes of a held-out split.

    python -m backbones.train --arch efficientnet --data DATASET --out RUN_DIR [options]
    torchrun --nproc_per_node=N -m backbones.train ...      (DistributedDataParallel)

Batches are P classes x K images (``--classes-per-batch``, ``--images-per-class``, or
``--batch-size`` with K: P = batch size // K, a batch size below K is refused). ``--freeze-bn``
keeps the body's BatchNorm statistics (needed for weights with fused/identity BN statistics).

A run goes through phases that share one ``TrainRun`` (backbones/run_state.py): set-up (the
data listing, split, model, optimizer, schedule, sampler; cheap, and every check that can fail
on the options fails there), resume or warm start, epoch 0 (the initial weights scored), then
per epoch: train, validate, save. Every epoch is a deterministic function of (seed, epoch,
rank), and resumable state is saved at each epoch's end, so ``--resume`` after a kill ends
with the weights of an uninterrupted run. See backbones/checkpoint.py and
backbones/run_state.py for the run-folder files, backbones/board.py for ``--tensorboard``.

Under torchrun, ranks draw different augmentations (the rank is part of the epoch's
seed); backbones/distributed.py holds the rest of what several GPUs need.

A pretrained member starts at its off-the-shelf descriptor (backbones/warm_start.py) and
the initial weights are scored as epoch 0, so the best checkpoint is never worse than the
start; ``--probe-epochs`` and ``--layer-decay`` shape the fine-tuning (backbones/optim.py).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones import checkpoint as ckpt
from backbones.board import Board, part_learning_rates, require_tensorboard
from backbones.config import ConfigError, TrainConfig, parse_args
from backbones.distributed import EpochMeter, barrier, dist_setup, wrap_ddp
from backbones.extract import autocast_dtype, extract_descriptors, runtime_line, search_scores
from backbones.heads import MetricLoss, make_head
from backbones.model import RetrievalNet, build_model
from backbones.optim import param_groups, schedules
from backbones.preflight import preflight
from backbones.run_state import TrainRun, resume, save_last
from backbones.sampler import PKSampler
from backbones.transforms import AugmentConfig, TrainDataset, train_collate, train_transform
from backbones.warm_start import gem_features, init_neck_from_features
from competition.cli import run_command, show_progress
from competition.data import TrainIndex, UnreadableImage, scan_train
from competition.metrics import file_keys
from competition.runlock import RunLock
from competition.split import HeldoutSplit, make_split, split_labels

LOG_EVERY = 20  # optimizer steps between progress-bar updates (each reads the loss: one device sync)


class TrainNet(nn.Module):
    """The retrieval model and its loss in one module, so DDP syncs the head too."""

    def __init__(self, model: RetrievalNet, loss: MetricLoss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(x), y)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**62


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one rank's epoch (augmentation, dropout): ranks differ, rank 0 is the single-process seed."""
    return (_epoch_seed(seed, epoch) + rank * 0x9E3779B97F4A7C15) % 2**62


NECK_PCA_IMAGES = 1024   # train images whose body features initialise a pretrained member's neck


def _get_split(cfg: TrainConfig, index: TrainIndex, run_dir: Path) -> HeldoutSplit:
    """--split file, else the run's own split on resume, else a fresh seeded split (checked, not saved)."""
    own = ckpt.split_path(run_dir)
    if cfg.split:
        split = HeldoutSplit.load(cfg.split)
    elif cfg.resume and own.is_file():
        split = HeldoutSplit.load(own)
    else:
        split = make_split(index, cfg.heldout_fraction, seed=cfg.seed)
    split.check_against(index)
    return split


def _val_line(val: dict, k: int) -> str:
    return f"mAP@{k} {val['map_at_k']:.4f} R@1 {val['recall_at_1']:.4f}"


def validate(model: RetrievalNet, run_cfg: dict, split: HeldoutSplit, id_to_path: dict, cfg: TrainConfig,
             device: torch.device) -> dict:
    """Held-out ``{"map_at_k", "recall_at_1", "n_query", "n_reference"}`` of ``model`` (exact cosine search)."""
    out = {}
    for part, ids in (("query", split.query_ids), ("reference", split.reference_ids)):
        desc, ok = extract_descriptors(model, [id_to_path[i] for i in ids], config=run_cfg, device=str(device),
                                       batch_size=cfg.val_batch_size, workers=cfg.workers, amp=cfg.amp,
                                       progress=False)
        out[part] = (desc, [lab for lab, good in zip(split_labels(ids), ok) if good])
    return search_scores(out["query"][0], out["query"][1], out["reference"][0], out["reference"][1], k=cfg.k)


def train(cfg: TrainConfig) -> dict:
    """Train; returns {"epoch", "best" (metrics), "bad_images", "images_per_s", "run_dir"}.

    Every problem that would stop the run (architecture, weights, device, data) is reported at once
    before any work (``backbones.preflight``); rank 0 holds ``--out``'s lock (competition.runlock)
    for the whole run, so a second run into the same folder is refused."""
    cfg.check()
    preflight(cfg)
    rank, world, device = dist_setup(cfg.device)
    try:
        with RunLock(cfg.out) if rank == 0 else contextlib.nullcontext():
            return _train(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    """The phases: set-up (cheap, checks everything it can), resume or warm start, wrap DDP, score the
    initial weights (epoch 0), then per epoch train, validate and save."""
    run = _set_up(cfg, rank, world, device)
    if not (cfg.resume and resume(run)):
        _warm_start(run)
    run.ddp = wrap_ddp(run.net, device, cfg.image_size, cfg.channels_last) if world > 1 else run.net
    spec = run.model.spec
    run.say(f"{spec.arch}: {len(run.train_index)} images of {len(run.train_index.classes)} train classes, "
            f"held-out {len(run.split.heldout_classes)} classes (split {run.split.hash}); P={run.sampler.p} "
            f"K={run.sampler.k} x {world} rank(s), {run.steps_per_epoch} steps/epoch; "
            f"{runtime_line(device, run.amp_dtype)}")
    score_start = run.progress.epoch == 0 and (cfg.scores_start or cfg.epochs == 0)
    board = Board(cfg.tensorboard, run.run_dir, 0 if score_start else run.progress.epoch + 1) \
        if cfg.tensorboard and run.is_main else None
    try:
        if score_start and run.is_main:
            _score_start(run, board)
        for epoch in range(run.progress.epoch + 1, cfg.epochs + 1):
            row, stopped = _train_epoch(run, epoch)
            last = stopped or (cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch)
            if run.is_main:
                _end_epoch(run, row, last, board)
            if world > 1:
                barrier(device)
            if last:
                break
    finally:
        if board is not None:
            board.close()
    return _finish(run)


def _set_up(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> TrainRun:
    """Build what a run needs without expensive work: everything that can fail on the options, the data
    listing, the split or the weights fails here, before any extraction or training (a failure before
    the model is built leaves no --out behind)."""
    if cfg.tensorboard:
        require_tensorboard()
    amp_dtype = autocast_dtype(cfg.amp, device)
    run_dir = Path(cfg.out)
    index = scan_train(cfg.data)   # a wrong --data fails before --out is created
    if not cfg.resume and (ckpt.is_run(run_dir) or ckpt.can_resume(run_dir)):
        raise ConfigError(f"--out {run_dir} already holds a run: pass --resume to continue it, or choose "
                          "another --out (or delete it)")
    split = _get_split(cfg, index, run_dir)
    train_index = index.subset(split.train_classes)
    class_idx = {c: i for i, c in enumerate(train_index.classes)}
    labels = [class_idx[c] for c in train_index.labels]

    _seed_all(cfg.seed)
    model = build_model(cfg.arch, cfg.embedding_dim, cfg.pretrained, announce=rank == 0)
    run_dir.mkdir(parents=True, exist_ok=True)   # only now: bad weights or data leave no --out behind
    if rank == 0:
        split.save(ckpt.split_path(run_dir))
    loss = MetricLoss(make_head(cfg.head, model.embedding_dim, len(train_index.classes), cfg.scale, cfg.margin),
                      cfg.triplet_weight, cfg.triplet_margin)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = TrainNet(model, loss).to(device, memory_format=memory_format)
    # the EMA starts as a copy of the model (a warm start sets it again); a constant decay, no warm-up
    ema = ModelEmaV3(model, decay=cfg.ema) if cfg.ema > 0 else None
    groups = param_groups(model, loss, cfg.lr, cfg.body_lr_mult, cfg.weight_decay, cfg.layer_decay)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:  # sgd (TrainConfig.check allows no other)
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    sampler = PKSampler(labels, cfg.batch_classes, cfg.images_per_class, seed=cfg.seed, rank=rank, world_size=world)
    steps_per_epoch = max(1, len(sampler) // cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules(
        groups, int(cfg.warmup_epochs * steps_per_epoch), steps_per_epoch * cfg.epochs,
        cfg.probe_epochs * steps_per_epoch))
    aug = AugmentConfig(tuple(cfg.crop_scale), cfg.hflip, cfg.color_jitter)
    dataset = TrainDataset(train_index.paths, labels, train_transform(cfg.image_size, aug, model.spec.mean,
                                                                      model.spec.std))
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=train_collate,
                        generator=generator, pin_memory=device.type == "cuda")
    return TrainRun(cfg=cfg, rank=rank, world=world, device=device, amp_dtype=amp_dtype, memory_format=memory_format,
                    run_dir=run_dir, split=split, train_index=train_index, id_to_path=dict(zip(index.ids, index.paths)),
                    model=model, net=net, ema=ema, optimizer=optimizer, scheduler=scheduler,
                    scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), sampler=sampler,
                    loader=loader, generator=generator, steps_per_epoch=steps_per_epoch,
                    run_cfg=_run_config(cfg, model, split, train_index))


def _run_config(cfg: TrainConfig, model: RetrievalNet, split: HeldoutSplit, train_index: TrainIndex) -> dict:
    """RUN/config.json but its "epoch" and "metrics": how to rebuild and feed the model, what it learnt on."""
    spec = model.spec.to_dict()
    classes = list(train_index.classes)
    return {"format": 1, "arch": spec["arch"], "arch_requested": cfg.arch, "image_size": cfg.image_size,
            "crop_pct": cfg.crop_pct, "embedding_dim": model.embedding_dim, "mean": spec["mean"], "std": spec["std"],
            "model": spec, "head": cfg.head, "scale": cfg.scale, "margin": cfg.margin, "split_hash": split.hash,
            "split_file": ckpt.SPLIT_FILE, "train_classes": classes, "classes": list(classes),
            "n_train_images": len(train_index), "pretrained": cfg.pretrained, "ema": cfg.ema,
            "timm_version": timm.__version__, "train_config": asdict(cfg)}


def _warm_start(run: TrainRun) -> None:
    """--neck-init pca on a fresh run: the neck from a PCA of the body's GeM features on train images."""
    cfg, model = run.cfg, run.model
    if not (model.has_neck and cfg.neck_init == "pca"):
        return
    sample = np.random.default_rng(cfg.seed).permutation(len(run.train_index))[:NECK_PCA_IMAGES]
    feats = gem_features(model, [run.train_index.paths[i] for i in sorted(sample)], cfg.image_size, run.device,
                         cfg.val_batch_size, cfg.workers)
    run.say(init_neck_from_features(model, feats))
    if run.ema is not None:
        run.ema.set(model)


def _save_best(run: TrainRun, epoch: int, metrics: dict | None) -> None:
    """RUN/model.safetensors and RUN/config.json: the weights kept, from ``epoch`` with ``metrics``."""
    ckpt.save_weights(run.run_dir / ckpt.WEIGHTS_FILE, run.eval_model.state_dict())
    ckpt.write_config(run.run_dir, {**run.run_cfg, "epoch": epoch, "metrics": metrics})


def _score_start(run: TrainRun, board: Board | None) -> None:
    """Epoch 0 (rank 0): the initial weights are the run's checkpoint, scored when there are held-out classes."""
    cfg = run.cfg
    val = validate(run.eval_model, run.run_cfg, run.split, run.id_to_path, cfg, run.device) if run.has_val \
        else None
    if val is not None:
        run.say(f"epoch 0 (initial weights): held-out {_val_line(val, cfg.k)}")
        run.progress.best = val["map_at_k"]
    metrics = None if val is None else file_keys(val, cfg.k)
    _save_best(run, 0, metrics)
    run.progress.rows = [{"epoch": 0, "step": 0, "loss": None, "lr": None, "img_per_s": None, "val": metrics}]
    ckpt.write_log(run.run_dir, run.progress.rows, cfg.k)
    if board is not None:
        board.epoch(run.progress.rows[0])


def _set_train_mode(run: TrainRun, epoch: int) -> None:
    """Train mode, except a body frozen by --probe-epochs and BatchNorm statistics kept by --freeze-bn."""
    run.ddp.train()
    probing = epoch <= run.cfg.probe_epochs
    if probing:   # a linear probe: the body is frozen, BatchNorm statistics included
        run.model.body.eval()
    if run.world == 1:   # (DDP keeps every parameter trainable; the body's lr is 0 while probing)
        run.model.body.requires_grad_(not probing)
    if run.cfg.freeze_bn:
        for m in run.model.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _train_epoch(run: TrainRun, epoch: int) -> tuple[dict, bool]:
    """Train one epoch; returns (its log row, "val" None) and whether --max-steps ended it."""
    cfg, progress = run.cfg, run.progress
    _seed_all(_rank_seed(cfg.seed, epoch, run.rank))
    run.generator.manual_seed(_rank_seed(cfg.seed, epoch, run.rank))
    run.sampler.set_epoch(epoch)
    _set_train_mode(run, epoch)
    meter = EpochMeter(run.device)
    t0, n_batches, stopped = time.perf_counter(), run.steps_per_epoch * cfg.grad_accum, False
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
               disable=not show_progress(run.is_main and cfg.progress), file=sys.stderr, dynamic_ncols=True)
    for i, (x, y, bad_batch) in enumerate(run.loader):
        if i >= n_batches:
            break
        for path, reason in bad_batch:
            progress.unreadable.record_failure(UnreadableImage(path, reason))
        if x is None:
            continue
        last_micro = (i + 1) % cfg.grad_accum == 0
        meter.add(_forward_backward(run, x, y, last_micro), len(x))
        if not last_micro:
            continue
        _optimizer_step(run)
        if not bar.disable and ((progress.step - 1) % LOG_EVERY == 0 or i + 1 == n_batches):
            ips = meter.images * run.world / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{meter.loss_now():.4f}", lr=f"{run.scheduler.get_last_lr()[-1]:.2e}",
                            img_s=f"{ips:.1f}")
        bar.update(1)
        if cfg.max_steps and progress.step >= cfg.max_steps:
            stopped = True
            break
    bar.close()
    loss_sum, batches, images = meter.totals(run.world)
    progress.epoch, progress.images_per_s = epoch, images / max(1e-9, time.perf_counter() - t0)
    row = {"epoch": epoch, "step": progress.step, "loss": loss_sum / max(1, batches),
           "lr": run.scheduler.get_last_lr()[-1], "img_per_s": progress.images_per_s, "val": None}
    return row, stopped


def _forward_backward(run: TrainRun, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
    """Loss of one micro-batch, its gradients accumulated (DDP syncs them on the last micro-batch only)."""
    x = x.to(run.device, non_blocking=True).contiguous(memory_format=run.memory_format)
    y = y.to(run.device, non_blocking=True)
    dtype = run.amp_dtype
    with run.ddp.no_sync() if run.world > 1 and not last_micro else contextlib.nullcontext():
        with torch.autocast(run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = run.ddp(x, y)
        run.scaler.scale(loss / run.cfg.grad_accum).backward()
    return loss


def _optimizer_step(run: TrainRun) -> None:
    """One optimizer step with the accumulated gradients, then the schedule and the EMA."""
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.progress.step += 1
    if run.ema is not None:
        run.ema.update(run.model)   # no step: a constant decay --ema (ModelEmaV3's warm-up stays off)


def _end_epoch(run: TrainRun, row: dict, last: bool, board: Board | None) -> None:
    """Rank 0 after an epoch: validate when due, keep the best weights, log the row, save RUN/last."""
    cfg, progress, epoch = run.cfg, run.progress, row["epoch"]
    val = None
    if not run.has_val:
        _save_best(run, epoch, None)
    elif epoch % cfg.val_every == 0 or epoch == cfg.epochs or last:
        val = validate(run.eval_model, run.run_cfg, run.split, run.id_to_path, cfg, run.device)
        row["val"] = file_keys(val, cfg.k)
        if val["map_at_k"] > progress.best:
            progress.best = val["map_at_k"]
            _save_best(run, epoch, row["val"])
    progress.rows.append(row)
    ckpt.write_log(run.run_dir, progress.rows, cfg.k)   # before RUN/last: a resume rewrites this epoch's row
    if board is not None:
        board.epoch(row, part_learning_rates(run.optimizer.param_groups))
    save_last(run)
    run.say(f"epoch {epoch}: loss {row['loss']:.4f} lr {row['lr']:.2e} {row['img_per_s']:.1f} img/s"
            + (f" | held-out {_val_line(val, cfg.k)}" if val else ""), every_epoch=True)


def _finish(run: TrainRun) -> dict:
    """Gather the unreadable images of every rank, say how the run ended; ``train``'s result."""
    skipped = run.progress.unreadable.skipped
    if run.world > 1:
        gathered: list = [None] * run.world
        dist.all_gather_object(gathered, skipped)
        skipped = {path: reason for g in gathered for path, reason in g.items()}
    bad = list(skipped)
    if bad:
        run.say(f"{len(bad)} unreadable training images skipped, e.g. {bad[:3]}")
    best = run.progress.best if run.has_val else None
    run.say(f"done: epoch {run.progress.epoch}, " + (f"best held-out mAP@{run.cfg.k} {best:.4f}" if run.has_val
                                                     else "no held-out classes: the last epoch's weights")
            + f"; weights in {run.run_dir / ckpt.WEIGHTS_FILE}")
    return {"run_dir": str(run.run_dir), "epoch": run.progress.epoch, "best": best, "bad_images": len(bad),
            "images_per_s": run.progress.images_per_s}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, description=__doc__)
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))

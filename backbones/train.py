"""Metric-learning training of a retrieval backbone on the train classes of a held-out split.

    python -m backbones.train --arch efficientnet --data DATASET --out RUN_DIR [options]
    torchrun --nproc_per_node=N -m backbones.train ...      (DistributedDataParallel)

Batches are P classes x K images (``--classes-per-batch``, ``--images-per-class``, or
``--batch-size`` with K). ``--freeze-bn`` keeps the body's BatchNorm statistics (needed
for weights with fused/identity BN statistics).

Every epoch is a deterministic function of (seed, epoch, rank), and resumable state is
saved at each epoch's end, so ``--resume`` after a kill ends with the weights of
an uninterrupted run. See backbones/checkpoint.py for the run-folder files.

Under torchrun, ranks draw different augmentations (the rank is part of the epoch's
seed); backbones/distributed.py holds the rest of what several GPUs need.

A pretrained member starts at its off-the-shelf descriptor (backbones/warm_start.py) and
the initial weights are scored as epoch 0, so the best checkpoint is never worse than the
start; ``--probe-epochs`` and ``--layer-decay`` shape the fine-tuning (backbones/optim.py).
"""
from __future__ import annotations

import contextlib
import copy
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
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones import checkpoint as ckpt
from backbones.config import ConfigError, TrainConfig, parse_args
from backbones.distributed import EpochMeter, barrier, dist_setup, wrap_ddp
from backbones.extract import autocast_dtype, extract_descriptors, runtime_line, search_scores
from backbones.heads import MetricLoss, make_head
from backbones.model import RetrievalNet, build_model
from backbones.preflight import preflight
from backbones.optim import param_groups, schedules
from backbones.sampler import PKSampler
from backbones.transforms import AugmentConfig, TrainDataset, train_collate, train_transform
from backbones.warm_start import gem_features, init_neck_from_features
from competition.cli import run_command, show_progress
from competition.data import LoadReport, UnreadableImage, scan_train
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


def _neck_from_pca(cfg: TrainConfig, model: RetrievalNet) -> bool:
    return model.has_neck and cfg.neck_init == "pca"


def _changed_options(saved: dict | None, now: dict) -> list[str]:
    """``name saved -> now`` for the learning options a resumed run would change (older states: none)."""
    if saved is None:
        return []
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def _get_split(cfg: TrainConfig, index, run_dir: Path) -> HeldoutSplit:
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
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    say_epoch = say if not cfg.quiet else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    k = cfg.images_per_class
    p = cfg.batch_size // k if cfg.batch_size else cfg.classes_per_batch
    amp_dtype = autocast_dtype(cfg.amp, device)
    index = scan_train(cfg.data)   # a wrong --data fails before --out is created
    if not cfg.resume and (ckpt.is_run(run_dir) or ckpt.can_resume(run_dir)):
        raise ConfigError(f"--out {run_dir} already holds a run: pass --resume to continue it, or choose "
                          "another --out (or delete it)")
    split = _get_split(cfg, index, run_dir)
    train_index = index.subset(split.train_classes)
    classes = train_index.classes
    class_idx = {c: i for i, c in enumerate(classes)}
    labels = [class_idx[c] for c in train_index.labels]
    id_to_path = dict(zip(index.ids, index.paths))

    has_val = bool(split.query_ids)   # no held-out classes (a final refit): keep the last epoch

    _seed_all(cfg.seed)
    model = build_model(cfg.arch, cfg.embedding_dim, cfg.pretrained, announce=is_main)
    run_dir.mkdir(parents=True, exist_ok=True)   # only now: bad weights or data leave no --out behind
    if is_main:
        split.save(ckpt.split_path(run_dir))
    loss = MetricLoss(make_head(cfg.head, model.embedding_dim, len(classes), cfg.scale, cfg.margin),
                      cfg.triplet_weight, cfg.triplet_margin)
    net = TrainNet(model, loss).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
        model._channels_last = True
    if _neck_from_pca(cfg, model) and not (cfg.resume and ckpt.can_resume(run_dir)):
        sample = np.random.default_rng(cfg.seed).permutation(len(train_index))[:NECK_PCA_IMAGES]
        feats = gem_features(model, [train_index.paths[i] for i in sorted(sample)], cfg.image_size, device,
                             cfg.val_batch_size, cfg.workers)
        say(init_neck_from_features(model, feats))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
    groups = param_groups(model, loss, cfg.lr, cfg.body_lr_mult, cfg.weight_decay, cfg.layer_decay)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:  # sgd (TrainConfig.check allows no other)
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    sampler = PKSampler(labels, p, k, seed=cfg.seed, rank=rank, world_size=world)
    steps_per_epoch = max(1, len(sampler) // cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules(
        groups, int(cfg.warmup_epochs * steps_per_epoch), total, cfg.probe_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    spec = model.spec.to_dict()
    run_cfg = {"format": 1, "arch": spec["arch"], "arch_requested": cfg.arch, "image_size": cfg.image_size,
               "crop_pct": cfg.crop_pct, "embedding_dim": model.embedding_dim, "mean": spec["mean"],
               "std": spec["std"], "model": spec, "head": cfg.head, "scale": cfg.scale, "margin": cfg.margin,
               "split_hash": split.hash, "split_file": ckpt.SPLIT_FILE, "train_classes": list(classes),
               "classes": list(classes),
               "n_train_images": len(train_index), "pretrained": cfg.pretrained, "ema": cfg.ema,
               "timm_version": timm.__version__, "train_config": asdict(cfg)}

    start_epoch, best, step, rows = 0, -1.0, 0, []
    unreadable = LoadReport()   # unreadable training images met, each named in a warning when first met
    if cfg.resume:
        got = ckpt.load_last(run_dir)
        if got is None:
            say(f"--resume: nothing in {run_dir / 'last'}; starting from epoch 1")
        else:
            net_state, st = got
            if st["split_hash"] != split.hash or st["arch"] != spec["arch"]:
                raise ConfigError(f"--resume: {run_dir} holds a run of {st['arch']} on split {st['split_hash']}, "
                                  f"not {spec['arch']} on split {split.hash}")
            changed = _changed_options(st.get("options"), cfg.result_options())
            if changed:
                raise ConfigError(f"--resume: {run_dir} was trained with other options ({'; '.join(changed)}): "
                                  "resume with the same ones, or train into another --out")
            net.load_state_dict(net_state)
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            scaler.load_state_dict(st["scaler"])
            sampler.load_state_dict(st["sampler"])
            if ema is not None and st.get("ema") is not None:
                ema.load_state_dict(st["ema"])
            ckpt.set_rng_state(st["rng"])
            start_epoch, best, step = st["epoch"], st["best"], st["step"]
            unreadable.skipped.update(st["bad_images"])
            rows = [r for r in ckpt.read_log(run_dir) if r["epoch"] <= start_epoch]
            say(f"resuming {run_dir} after epoch {start_epoch} (step {step}"
                + (f", best mAP@{cfg.k} {best:.4f})" if best is not None and best >= 0 else ")"))

    ddp = wrap_ddp(net, device, cfg.image_size, cfg.channels_last) if world > 1 else net
    aug = AugmentConfig(tuple(cfg.crop_scale), cfg.hflip, cfg.color_jitter)
    dataset = TrainDataset(train_index.paths, labels, train_transform(cfg.image_size, aug, spec["mean"], spec["std"]))
    gen = torch.Generator()
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=train_collate,
                        generator=gen, pin_memory=device.type == "cuda")
    if ema is not None:
        ema_pairs = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values())]
    say(f"{spec['arch']}: {len(train_index)} images of {len(classes)} train classes, "
        f"held-out {len(split.heldout_classes)} classes (split {split.hash}); P={p} K={k} x {world} rank(s), "
        f"{steps_per_epoch} steps/epoch; {runtime_line(device, amp_dtype)}")
    speed, epoch, stopped = 0.0, start_epoch, False
    if start_epoch == 0 and is_main and (cfg.scores_start or cfg.epochs == 0):
        val0 = validate(ema if ema is not None else model, run_cfg, split, id_to_path, cfg, device) if has_val \
            else None
        if val0 is not None:
            say(f"epoch 0 (initial weights): held-out {_val_line(val0, cfg.k)}")
            best = val0["map_at_k"]
        ckpt.save_weights(run_dir / ckpt.WEIGHTS_FILE, (ema if ema is not None else model).state_dict())
        metrics = None if val0 is None else file_keys(val0, cfg.k)
        ckpt.write_config(run_dir, {**run_cfg, "epoch": 0, "metrics": metrics})
        rows = [{"epoch": 0, "step": 0, "loss": None, "lr": None, "img_per_s": None, "val": metrics}]
        ckpt.write_log(run_dir, rows, cfg.k)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        _seed_all(_rank_seed(cfg.seed, epoch, rank))
        gen.manual_seed(_rank_seed(cfg.seed, epoch, rank))
        sampler.set_epoch(epoch)
        ddp.train()
        probing = epoch <= cfg.probe_epochs
        if probing:   # a linear probe: the body is frozen, BatchNorm statistics included
            model.body.eval()
        if world == 1:   # (DDP keeps every parameter trainable; the body's lr is 0 while probing)
            model.body.requires_grad_(not probing)
        if cfg.freeze_bn:
            for m in model.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        meter = EpochMeter(device)
        t0, n_batches = time.perf_counter(), steps_per_epoch * cfg.grad_accum
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not show_progress(is_main and cfg.progress),
                   file=sys.stderr, dynamic_ncols=True)
        for i, (x, y, bad_b) in enumerate(loader):
            if i >= n_batches:
                break
            for path, reason in bad_b:
                unreadable.record_failure(UnreadableImage(path, reason))
            if x is None:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (i + 1) % cfg.grad_accum == 0
            sync = ddp.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss_v = ddp(x, y)
                scaler.scale(loss_v / cfg.grad_accum).backward()
            meter.add(loss_v, len(x))
            if not last_micro:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if ema is not None:
                with torch.no_grad():
                    for e, m in ema_pairs:
                        if e.dtype.is_floating_point:
                            e.mul_(cfg.ema).add_(m.detach(), alpha=1.0 - cfg.ema)
                        else:
                            e.copy_(m)
            if not bar.disable and ((step - 1) % LOG_EVERY == 0 or i + 1 == n_batches):
                ips = meter.images * world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{meter.loss_now():.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}",
                                img_s=f"{ips:.1f}")
            bar.update(1)
            if cfg.max_steps and step >= cfg.max_steps:
                stopped = True
                break
        bar.close()
        loss_sum, batches, images = meter.totals(world)
        speed = images / max(1e-9, time.perf_counter() - t0)
        stop_now = stopped or (cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch)
        row = {"epoch": epoch, "step": step, "loss": loss_sum / max(1, batches),
               "lr": scheduler.get_last_lr()[-1], "img_per_s": speed, "val": None}
        if is_main:
            eval_model = ema if ema is not None else model
            if not has_val:
                ckpt.save_weights(run_dir / ckpt.WEIGHTS_FILE, eval_model.state_dict())
                ckpt.write_config(run_dir, {**run_cfg, "epoch": epoch, "metrics": None})
            elif epoch % cfg.val_every == 0 or epoch == cfg.epochs or stop_now:
                val = validate(eval_model, run_cfg, split, id_to_path, cfg, device)
                row["val"] = file_keys(val, cfg.k)
                if val["map_at_k"] > best:
                    best = val["map_at_k"]
                    ckpt.save_weights(run_dir / ckpt.WEIGHTS_FILE, eval_model.state_dict())
                    ckpt.write_config(run_dir, {**run_cfg, "epoch": epoch, "metrics": row["val"]})
            ckpt.save_last(run_dir, net.state_dict(), {
                "epoch": epoch, "step": step, "best": best, "arch": spec["arch"], "split_hash": split.hash,
                "options": cfg.result_options(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "sampler": sampler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": ckpt.rng_state(),
                "bad_images": sorted(unreadable.skipped.items())})
            rows.append(row)
            ckpt.write_log(run_dir, rows, cfg.k)
            say_epoch(f"epoch {epoch}: loss {row['loss']:.4f} lr {row['lr']:.2e} {speed:.1f} img/s"
                + (f" | held-out {_val_line(val, cfg.k)}" if row["val"] else ""))
        if world > 1:
            barrier(device)
        if stop_now:
            break
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, unreadable.skipped)
        unreadable.skipped = {kk: v for g in gathered for kk, v in g.items()}
    bad = list(unreadable.skipped)
    if bad:
        say(f"{len(bad)} unreadable training images skipped, e.g. {bad[:3]}")
    say(f"done: epoch {epoch}, " + (f"best held-out mAP@{cfg.k} {best:.4f}" if has_val else
                                    "no held-out classes: the last epoch's weights")
        + f"; weights in {run_dir / ckpt.WEIGHTS_FILE}")
    return {"run_dir": str(run_dir), "epoch": epoch, "best": best if has_val else None, "bad_images": len(bad),
            "images_per_s": speed}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, description=__doc__)
    if cfg.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))

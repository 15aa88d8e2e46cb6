"""A training run's state in memory (``TrainRun``, ``Progress``) and on disk for --resume.

    RUN_DIR/last/model.safetensors   the network and its loss head (TrainNet's state dict)
    RUN_DIR/last/train_state.pt      written last (it marks the epoch done), read with weights_only=True:
        epoch, step, best          Progress: the last finished epoch, optimizer steps, best held-out mAP@k
        arch, split_hash, options  what the run is: a resume with another one is refused, naming it
        optimizer, scheduler, scaler, sampler   their state dicts
        ema                        the EMA model's state dict (None without --ema)
        rng                        torch / numpy / python generators (backbones.checkpoint.rng_state)
        bad_images                 [(path, reason), ...] of unreadable training images met so far

A resumed run restores all of it and replays the epochs left exactly as an uninterrupted run
(every epoch reseeds from (seed, epoch, rank)), so it ends with the same weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from backbones import checkpoint as ckpt
from backbones.config import ConfigError, TrainConfig
from backbones.model import RetrievalNet
from backbones.sampler import PKSampler
from competition.data import LoadReport, TrainIndex
from competition.split import HeldoutSplit

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run stands; saved at every epoch's end (RUN/last), restored by --resume."""

    epoch: int = 0                 # the last finished epoch (0: none yet)
    step: int = 0                  # optimizer steps so far
    best: float = -1.0             # best held-out mAP@k so far (-1: none scored)
    rows: list[dict] = field(default_factory=list)                # log.jsonl, one row per epoch
    unreadable: LoadReport = field(default_factory=LoadReport)    # training images met that cannot be read
    images_per_s: float = 0.0      # the last epoch's speed (all ranks)


@dataclass
class TrainRun:
    """Everything set-up builds for one invocation on one rank, shared by the phases of training."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None       # autocast dtype (None: float32)
    memory_format: torch.memory_format  # of the training batches (channels-last with --channels-last)
    run_dir: Path
    split: HeldoutSplit
    train_index: TrainIndex             # the split's train classes
    id_to_path: dict[str, str]          # every image id of --data -> its path (held-out ones for validation)
    model: RetrievalNet
    net: nn.Module                      # backbones.train.TrainNet: model + loss (what DDP wraps)
    ema: ModelEmaV3 | None              # --ema: the averaged model, validated and saved instead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: PKSampler
    loader: DataLoader
    generator: torch.Generator          # the loader's, reseeded every epoch
    steps_per_epoch: int
    run_cfg: dict                       # RUN/config.json without "epoch" and "metrics"
    progress: Progress = field(default_factory=Progress)
    ddp: nn.Module | None = None        # net, or DistributedDataParallel around it (after resume)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def has_val(self) -> bool:
        """False without held-out classes (a final refit): the last epoch is kept."""
        return bool(self.split.query_ids)

    @property
    def eval_model(self) -> RetrievalNet:
        """The model validated and saved: the EMA one with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def say(self, text: str, every_epoch: bool = False) -> None:
        """A notice of rank 0 (a per-epoch line not with --quiet)."""
        if self.is_main and not (every_epoch and self.cfg.quiet):
            log.info("%s", text)


def changed_options(saved: dict | None, now: dict) -> list[str]:
    """``--name saved -> now`` for the learning options a resumed run would change (older states: none)."""
    if saved is None:
        return []
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def save_last(run: TrainRun) -> None:
    """Write RUN/last (the module docstring's files) at the end of ``run.progress.epoch``."""
    p = run.progress
    ckpt.save_last(run.run_dir, run.net.state_dict(), {
        "epoch": p.epoch, "step": p.step, "best": p.best, "arch": run.model.spec.arch, "split_hash": run.split.hash,
        "options": run.cfg.result_options(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
        "sampler": run.sampler.state_dict(), "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "rng": ckpt.rng_state(), "bad_images": sorted(p.unreadable.skipped.items())})


def resume(run: TrainRun) -> bool:
    """Restore RUN/last into ``run``; False when there is none. Raises ConfigError when it is a run of
    another architecture, split or learning options (naming them)."""
    got = ckpt.load_last(run.run_dir)
    if got is None:
        run.say(f"--resume: nothing in {run.run_dir / ckpt.LAST_DIR}; starting from epoch 1")
        return False
    net_state, st = got
    arch, split_hash = run.model.spec.arch, run.split.hash
    if st["split_hash"] != split_hash or st["arch"] != arch:
        raise ConfigError(f"--resume: {run.run_dir} holds a run of {st['arch']} on split {st['split_hash']}, "
                          f"not {arch} on split {split_hash}")
    changed = changed_options(st.get("options"), run.cfg.result_options())
    if changed:
        raise ConfigError(f"--resume: {run.run_dir} was trained with other options ({'; '.join(changed)}): "
                          "resume with the same ones, or train into another --out")
    run.net.load_state_dict(net_state)
    run.optimizer.load_state_dict(st["optimizer"])
    run.scheduler.load_state_dict(st["scheduler"])
    run.scaler.load_state_dict(st["scaler"])
    run.sampler.load_state_dict(st["sampler"])
    if run.ema is not None and st.get("ema") is not None:
        run.ema.module.load_state_dict(st["ema"])
    ckpt.set_rng_state(st["rng"])
    run.progress = Progress(epoch=st["epoch"], step=st["step"], best=st["best"],
                            rows=[r for r in ckpt.read_log(run.run_dir) if r["epoch"] <= st["epoch"]])
    run.progress.unreadable.skipped.update(st["bad_images"])
    best = st["best"]
    run.say(f"resuming {run.run_dir} after epoch {st['epoch']} (step {st['step']}"
            + (f", best mAP@{run.cfg.k} {best:.4f})" if best is not None and best >= 0 else ")"))
    return True

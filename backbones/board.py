"""``--tensorboard DIR``: a run's curves for TensorBoard, one TensorBoard run per run folder.

    DIR/<run folder name>/events.out.tfevents.*    written by torch.utils.tensorboard.SummaryWriter

Scalars per epoch (the x-axis is the epoch; the values are those of the run's log.jsonl row):

    train/loss           mean training loss of the epoch's batches          (log.jsonl "loss")
    train/images_per_s   training throughput                                (log.jsonl "img_per_s")
    lr/neck, lr/body     each part's highest learning rate at the epoch's end (lr/neck is log.jsonl "lr";
                         the body's top block under --layer-decay)
    heldout/mAP@k, heldout/Recall@1   held-out scores of validated epochs, epoch 0 included (log.jsonl "val")

Several members trained with one DIR show as separate runs. Each invocation hides what earlier
ones wrote from its first epoch on (TensorBoard's purge step): a resumed run's curves are those
of an uninterrupted run, and a run retrained from scratch under the same name replaces the old
curves (both TensorBoard loaders honour it: the Python one and the fast Rust data server).
Only rank 0 writes (``train`` opens no board on other ranks).
"""
from __future__ import annotations

import os
from pathlib import Path

from competition.cli import UserError

SCORE_KEYS = ("mAP@", "Recall@1")   # the log row's "val" keys drawn (counts such as n_query are not)


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; UserError (one line, what to install) when the
    ``tensorboard`` package is missing. The one check of every ``--tensorboard`` (training and tuning)."""
    try:
        import tensorboard  # noqa: F401 - torch's writer needs it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError(f"--tensorboard needs the tensorboard package ({exc}): pip install tensorboard, or "
                        f"leave --tensorboard out") from None
    return SummaryWriter


class Board:
    """A run's TensorBoard writer: ``epoch(row, lrs)`` draws one log.jsonl row; ``close()`` ends it."""

    def __init__(self, root: str | os.PathLike, run_dir: str | os.PathLike, first_epoch: int):
        """Write into ``root/<run_dir's name>``; events of epochs >= ``first_epoch`` (the first this
        invocation draws) that earlier invocations left there are hidden."""
        writer_class = require_tensorboard()
        self.folder = Path(root) / Path(run_dir).resolve().name
        self.writer = writer_class(log_dir=str(self.folder), purge_step=first_epoch)

    def epoch(self, row: dict, lrs: dict[str, float] | None = None) -> None:
        """Write the scalars of one log.jsonl ``row`` (``lrs``: ``{part: learning rate}``) and flush them."""
        epoch, add = row["epoch"], self.writer.add_scalar
        if row.get("loss") is not None:
            add("train/loss", row["loss"], epoch)
        if row.get("img_per_s") is not None:
            add("train/images_per_s", row["img_per_s"], epoch)
        for part, lr in sorted((lrs or {}).items()):
            add(f"lr/{part}", lr, epoch)
        for key, value in (row.get("val") or {}).items():
            if key.startswith(SCORE_KEYS):
                add(f"heldout/{key}", value, epoch)
        self.writer.flush()   # a killed run keeps every epoch it saved

    def close(self) -> None:
        self.writer.close()


def part_learning_rates(param_groups: list[dict]) -> dict[str, float]:
    """``{part: highest learning rate}`` over optimizer groups that carry a ``part`` (backbones.optim)."""
    lrs: dict[str, float] = {}
    for group in param_groups:
        part = group.get("part", "all")
        lrs[part] = max(lrs.get(part, 0.0), float(group["lr"]))
    return lrs

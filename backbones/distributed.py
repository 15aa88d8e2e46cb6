"""DistributedDataParallel plumbing: the process group, barriers, epoch sums and DDP itself.

Under torchrun every rank trains on its own slice of the batches. What would break on GPUs
and is handled here: NCCL reduces CUDA tensors only (the epoch sums stay on the training
device), NCCL cannot guess a rank's GPU for a barrier (it is named), other ranks wait in a
barrier while rank 0 validates (a long ``DIST_TIMEOUT``), and DDP looks for parameters
without gradients only for models that have some (``unused_parameters``).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from backbones.extract import torch_device

# Ranks other than 0 wait in a barrier while rank 0 validates and writes; NCCL's default
# (10 minutes) would kill a job whose validation takes longer.
DIST_TIMEOUT = timedelta(hours=2)


def dist_setup(device: str) -> tuple[int, int, torch.device]:
    """Return (rank, world_size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch_device(device)
    if world <= 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    return dist.get_rank(), world, dev


def barrier(device: torch.device) -> None:
    """``dist.barrier`` naming this rank's GPU to NCCL (it cannot guess it)."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


class EpochMeter:
    """Loss sum, batch and image counts of one epoch. The loss sum stays on the training device,
    so no step waits for the GPU; ``loss_now`` and ``totals`` read it (one sync each)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = 0
        self.images = 0

    def add(self, loss: torch.Tensor, n_images: int) -> None:
        self.loss_sum += loss.detach()
        self.batches += 1
        self.images += n_images

    def loss_now(self) -> float:
        """Mean loss of this rank's batches so far."""
        return self.loss_sum.item() / max(1, self.batches)

    def totals(self, world: int) -> tuple[float, int, int]:
        """(loss sum, batches, images) over all ranks; the reduced tensor lives on the training device."""
        t = torch.stack([self.loss_sum, self.loss_sum.new_tensor(self.batches), self.loss_sum.new_tensor(self.images)])
        if world > 1:
            dist.all_reduce(t)
        loss_sum, batches, images = t.tolist()
        return loss_sum, int(batches), int(images)


def unused_parameters(net: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of trainable parameters that get no gradient from ``net(*example).backward()``.

    One forward/backward in eval mode (no BatchNorm statistics move, no dropout); the
    parameters' gradients are restored afterwards. DDP needs ``find_unused_parameters``
    exactly when this is not empty (e.g. timm bodies whose head layers ``forward_features``
    skips: convnext_tiny's head norm, mobilenetv3's conv_head).
    """
    params = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in params]
    was_training = net.training
    for _, p in params:
        p.grad = None
    net.eval()
    try:
        with torch.enable_grad():
            net(*example).backward()
        return [name for name, p in params if p.grad is None]
    finally:
        for (_, p), g in zip(params, saved):
            p.grad = g
        net.train(was_training)


def wrap_ddp(net: nn.Module, device: torch.device, image_size: int, channels_last: bool) -> nn.Module:
    """DistributedDataParallel around ``net``, finding unused parameters only when the model has some."""
    x = torch.zeros(2, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    unused = unused_parameters(net, (x, torch.zeros(2, dtype=torch.long, device=device)))
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=bool(unused))

"""GPU paths of backbones/ on a CPU: what CUDA, NCCL and torchrun would do is mocked.

A two-rank job is played by one process as rank 0 or rank 1 with ``torch.distributed``
replaced by a recorder (``FakeDist``) and DDP by a pass-through (``FakeDDP``); compute
capabilities, GPU counts and CUDA RNG calls are monkeypatched.
"""
from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import checkpoint as ckpt
from backbones import distributed as dist_mod
from backbones import extract as extract_mod
from backbones import train as train_mod
from backbones.extract import autocast_dtype
from backbones.heads import HEADS, MetricLoss, batch_hard_triplet_loss, make_head
from backbones.model import build_model
from backbones.train import TrainConfig, TrainNet
from competition.cli import UserError
from competition.console import console
from rerank import device as device_mod

NO_UNUSED = "test_efficientnet"   # tiny timm test models: every parameter reaches the loss ...
WITH_UNUSED = "test_convnext"     # ... or not (forward_features skips the head's norm)


# -- a two-rank job in one process ------------------------------------------------------------------
class FakeDist:
    """``torch.distributed`` as rank ``rank`` of ``world`` sees it; records every call. Peers are
    mirrors of this rank: all_reduce multiplies by ``world``, all_gather_object repeats."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.calls: list[tuple] = []

    def init_process_group(self, backend, **kw):
        self.calls.append(("init_process_group", backend, kw))

    def get_rank(self) -> int:
        return self.rank

    def all_reduce(self, tensor, *args, **kw):
        self.calls.append(("all_reduce", tensor.device, tensor.dtype))
        tensor.mul_(self.world)

    def barrier(self, **kw):
        self.calls.append(("barrier", kw))

    def all_gather_object(self, out, obj):
        self.calls.append(("all_gather_object",))
        out[:] = [obj] * len(out)

    def destroy_process_group(self):
        self.calls.append(("destroy_process_group",))


class FakeDDP(nn.Module):
    """DistributedDataParallel without peers; records its keyword arguments in ``made``."""

    made: ClassVar[list[dict]] = []

    def __init__(self, module: nn.Module, **kw):
        super().__init__()
        self.module = module
        FakeDDP.made.append(kw)

    def forward(self, *args):
        return self.module(*args)

    @contextlib.contextmanager
    def no_sync(self):
        yield


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch=NO_UNUSED, image_size=32, classes_per_batch=2, images_per_class=2,
                epochs=1, embedding_dim=8, workers=0, progress=False, warmup_epochs=0.0, device="cpu")
    return TrainConfig(**{**base, **kw})


def _fake_rank(monkeypatch, rank: int, world: int = 2) -> tuple[FakeDist, dict]:
    """Make ``train`` run as ``rank`` of ``world``; return the recorder and what the first
    training image's transform saw (global torch RNG state, DataLoader generator state)."""
    fake = FakeDist(rank, world)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(train_mod, "dist", fake)
    monkeypatch.setattr(dist_mod, "dist", fake)
    monkeypatch.setattr(dist_mod, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)  # wherever train.py looks it up
    monkeypatch.setattr(FakeDDP, "made", [])
    monkeypatch.setattr(train_mod, "validate", lambda *a, **k: {"map_at_k": 0.5, "recall_at_1": 0.5,
                                                                 "n_query": 1, "n_reference": 1})
    seen: dict = {}
    loaders = []
    real_loader, real_transform = train_mod.DataLoader, train_mod.train_transform

    def loader(*args, **kw):
        loaders.append(real_loader(*args, **kw))
        return loaders[-1]

    def transform(*args, **kw):
        inner = real_transform(*args, **kw)

        def first_call_spy(img):
            if "torch" not in seen:
                seen["torch"] = torch.get_rng_state()
                seen["loader"] = loaders[-1].generator.get_state()
            return inner(img)
        return first_call_spy

    monkeypatch.setattr(train_mod, "DataLoader", loader)
    monkeypatch.setattr(train_mod, "train_transform", transform)
    return fake, seen


def _count_syncs_in(module_files: tuple[str, ...], monkeypatch) -> list[int]:
    """Count Tensor.item / Tensor.tolist calls made from ``module_files`` themselves (each waits for the GPU)."""
    count = [0]
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            import sys
            if sys._getframe(1).f_code.co_filename in module_files:
                count[0] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return count


def test_two_rank_run_keeps_collectives_on_device_with_a_long_timeout(image_dataset, tmp_path, monkeypatch, capsys):
    fake, _ = _fake_rank(monkeypatch, rank=0)
    syncs = _count_syncs_in((train_mod.__file__, dist_mod.__file__), monkeypatch)
    with console():   # training logs its lines; a command's console shows them on stdout
        result = train_mod.train(_cfg(image_dataset, tmp_path / "run"))
    assert result["epoch"] == 1
    init = [c for c in fake.calls if c[0] == "init_process_group"]
    assert len(init) == 1 and init[0][1] == "gloo" and init[0][2]["timeout"] >= timedelta(hours=1)
    reduces = [c for c in fake.calls if c[0] == "all_reduce"]
    assert reduces and all(dev == torch.device("cpu") for _, dev, _ in reduces)  # the training device
    assert ("barrier", {}) in fake.calls
    # every parameter of NO_UNUSED gets a gradient: DDP need not search for unused ones
    assert FakeDDP.made == [{"device_ids": None, "find_unused_parameters": False}]
    # train.py read the device once (the epoch totals), not once or more per step
    steps = train_mod.ckpt.read_log(tmp_path / "run")[0]["step"]
    assert steps >= 3 and syncs[0] == 1
    out = capsys.readouterr().out
    assert "amp float32, faiss GPUs" in out  # the run log names the precision and faiss's GPUs


def test_ranks_draw_different_augmentations(image_dataset, tmp_path, monkeypatch):
    states = []
    for rank in (0, 1):
        with monkeypatch.context() as m:
            _, seen = _fake_rank(m, rank=rank)
            train_mod.train(_cfg(image_dataset, tmp_path / f"rank{rank}", color_jitter=0.3))
        states.append(seen)
    assert not torch.equal(states[0]["torch"], states[1]["torch"])     # workers=0: the global generator
    assert not torch.equal(states[0]["loader"], states[1]["loader"])   # workers>0: seeded from this one
    assert train_mod._rank_seed(7, 3, 0) == train_mod._epoch_seed(7, 3)  # rank 0 = a single-process run


def test_epoch_totals_are_reduced_on_the_training_device(monkeypatch):
    class Stop(Exception):
        pass

    seen = []

    def all_reduce(tensor, *a, **k):
        seen.append(tensor.device)
        raise Stop  # a meta tensor has no values to read back

    monkeypatch.setattr(dist_mod.dist, "all_reduce", all_reduce)
    meter = dist_mod.EpochMeter(torch.device("meta"))  # a device that is not the CPU, as a GPU would be
    meter.add(torch.ones((), device="meta"), 4)
    with pytest.raises(Stop):
        meter.totals(world=2)
    assert seen == [torch.device("meta")]


def test_epoch_meter_sums_over_ranks(monkeypatch):
    fake = FakeDist(0, 3)
    monkeypatch.setattr(dist_mod, "dist", fake)
    meter = dist_mod.EpochMeter(torch.device("cpu"))
    for loss, n in ((1.5, 4), (0.5, 2)):
        meter.add(torch.tensor(loss, requires_grad=True), n)
    assert meter.totals(world=1) == (2.0, 2, 6)
    assert meter.totals(world=3) == (6.0, 6, 18)
    assert meter.loss_now() == 1.0


def test_dist_setup_on_gpus_uses_nccl_with_a_long_timeout(monkeypatch):
    fake = FakeDist(1, 2)
    chosen = []
    monkeypatch.setattr(dist_mod, "dist", fake)
    monkeypatch.setattr(device_mod, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank, world, dev = dist_mod.dist_setup("cuda")
    assert (rank, world, dev) == (1, 2, torch.device("cuda", 1)) and chosen == [torch.device("cuda", 1)]
    (_, backend, kw), = fake.calls
    assert backend == "nccl" and kw["timeout"] >= timedelta(hours=1)
    dist_mod.barrier(dev)
    assert fake.calls[-1] == ("barrier", {"device_ids": [1]})


# -- which parameters DDP must look for --------------------------------------------------------------
class _TwoBranches(nn.Module):
    def __init__(self, use_b: bool):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(4, 3), nn.Linear(4, 3), nn.BatchNorm1d(4)
        self.use_b = use_b

    def forward(self, x, y):
        x = self.bn(x)
        out = self.a(x) + (self.b(x) if self.use_b else 0.0)
        return F.cross_entropy(out, y)


def test_unused_parameters_finds_what_gets_no_gradient_and_leaves_no_trace():
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert dist_mod.unused_parameters(_TwoBranches(use_b=True), (x, y)) == []
    net = _TwoBranches(use_b=False).train()
    net.a.weight.grad = torch.ones_like(net.a.weight)
    stats = net.bn.running_mean.clone()
    assert dist_mod.unused_parameters(net, (x, y)) == ["b.weight", "b.bias"]
    assert torch.equal(net.a.weight.grad, torch.ones_like(net.a.weight)) and net.b.weight.grad is None
    assert net.training and torch.equal(net.bn.running_mean, stats)


@pytest.mark.parametrize("arch, expected", [(NO_UNUSED, []), (WITH_UNUSED, ["model.body.head.norm.weight",
                                                                             "model.body.head.norm.bias"])])
def test_unused_parameters_of_timm_bodies(arch, expected):
    net = TrainNet(build_model(arch, 8, announce=False), MetricLoss(make_head("arcface", 8, 5)))
    example = (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert dist_mod.unused_parameters(net, example) == expected


# -- precision ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, amp, expected", [
    ((7, 0), "auto", torch.float16), ((7, 5), "auto", torch.float16), ((8, 0), "auto", torch.bfloat16),
    ((9, 0), "auto", torch.bfloat16), ((7, 5), "fp16", torch.float16), ((8, 6), "fp16", torch.float16),
    ((8, 6), "bf16", torch.bfloat16), ((7, 5), "none", None)])
def test_amp_follows_the_compute_capability(monkeypatch, capability, amp, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(amp, torch.device("cuda", 0)) == expected


def test_bf16_on_a_gpu_without_it_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(UserError, match=r"--amp bf16: cuda:0 has compute capability 7\.5"):
        autocast_dtype("bf16", torch.device("cuda", 0))
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)


def test_runtime_line_names_gpu_precision_and_faiss(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(extract_mod, "faiss_gpu_count", lambda: 0)
    dev = torch.device("cuda", 0)
    line = extract_mod.runtime_line(dev, autocast_dtype("auto", dev))
    assert line.startswith("device cuda:0 (Tesla T4, compute capability 7.5), amp float16, faiss GPUs 0")
    assert "faiss searches on the CPU" in line
    monkeypatch.setattr(extract_mod, "faiss_gpu_count", lambda: 1)
    assert extract_mod.runtime_line(dev, torch.bfloat16).endswith("amp bfloat16, faiss GPUs 1")


def _reference_head_loss(kind: str, head: nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> float:
    """The head's loss in float64, one sample at a time."""
    total = 0.0
    for e, y in zip(emb.double(), labels.tolist()):
        if kind == "softmax":
            logits = [float(w.double() @ e + b) for w, b in zip(head.fc.weight.detach(), head.fc.bias.detach())]
        else:
            e = e / e.norm()
            cos = [float(w.double() @ e / w.double().norm()) for w in head.weight.detach()]
            s, m = head.scale, head.margin
            logits = [s * c for c in cos]
            if kind == "cosface":
                logits[y] = s * (cos[y] - m)
            elif cos[y] > math.cos(math.pi - m):
                logits[y] = s * math.cos(math.acos(cos[y]) + m)
            else:
                logits[y] = s * (cos[y] - math.sin(math.pi - m) * m)
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[y]
    return total / len(labels)


def _reference_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    e = F.normalize(emb.double(), dim=1)
    losses = []
    for i in range(len(labels)):
        d = [float((e[i] - e[j]).norm()) for j in range(len(labels))]
        pos = [d[j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [d[j] for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", HEADS)
def test_heads_compute_in_float32_under_bf16_autocast(kind):
    torch.manual_seed(0)
    head = make_head(kind, 16, 10, scale=30.0, margin=0.3)
    emb = F.normalize(torch.randn(24, 16), dim=1)
    labels = torch.arange(24) % 10
    logits = []
    if kind == "softmax":
        head.fc.register_forward_hook(lambda module, args, out: logits.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(emb, labels)
        if kind != "softmax":
            logits.append(head.cosine(emb).dtype)
    assert loss.dtype == torch.float32 and logits == [torch.float32]
    assert loss.item() == pytest.approx(_reference_head_loss(kind, head, emb, labels), rel=1e-5, abs=1e-5)


def test_triplet_loss_computes_in_float32_under_bf16_autocast():
    torch.manual_seed(1)
    emb = torch.randn(16, 12)
    labels = torch.arange(16) % 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_hard_triplet_loss(emb, labels, margin=0.3)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_reference_triplet(emb, labels, 0.3), rel=1e-5, abs=1e-5)


# -- resumable state ----------------------------------------------------------------------------------
def test_resume_on_fewer_gpus_than_saved(monkeypatch):
    """A state saved by rank 0 of a 4-GPU job, restored where one GPU is visible."""
    torch.manual_seed(5)
    state = ckpt.rng_state()
    expected = torch.rand(4)
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(4)]  # what older runs saved
    restored = []

    def set_rng_state(new_state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= torch.cuda.device_count():
            raise IndexError(f"no CUDA device {index}")  # what CUDA does for a GPU that is not there
        restored.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    torch.manual_seed(99)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4), expected)


def test_rng_state_leaves_cuda_generators_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * 4)
    assert set(ckpt.rng_state()) == {"torch", "numpy", "python"}


# -- workers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, gpu, cpu", [(2, 2, 0), (16, 8, 4), (64, 8, 8)])
def test_default_workers(monkeypatch, cores, gpu, cpu):
    monkeypatch.setattr(extract_mod.os, "sched_getaffinity", lambda pid: set(range(cores)))
    workers = extract_mod.default_workers
    assert workers(torch.device("cuda", 0)) == gpu and workers(torch.device("cpu")) == cpu
    assert extract_mod.workers_arg("auto") is None and extract_mod.workers_arg("3") == 3


def test_extraction_resolves_auto_workers(monkeypatch, image_dataset):
    class Stop(Exception):
        pass

    made = []

    def loader(dataset, **kw):
        made.append(kw)
        raise Stop

    monkeypatch.setattr(extract_mod, "DataLoader", loader)
    monkeypatch.setattr(extract_mod.os, "sched_getaffinity", lambda pid: set(range(16)))
    model = build_model(NO_UNUSED, 8, announce=False)
    paths = sorted((image_dataset / "train" / "train_data").rglob("*.jpg"))[:2]
    with pytest.raises(Stop):
        extract_mod.extract_descriptors(model, paths, device="cpu")
    with pytest.raises(Stop):
        extract_mod.extract_descriptors(model, paths, device="cpu", workers=0)
    assert [(kw["num_workers"], kw["pin_memory"]) for kw in made] == [(4, False), (0, False)]


def test_ranks_other_than_0_write_no_tensorboard_curves(image_dataset, tmp_path, monkeypatch):
    _fake_rank(monkeypatch, rank=1)   # rank 0's curves: tests/test_backbones_train.py
    assert train_mod.train(_cfg(image_dataset, tmp_path / "run", tensorboard=str(tmp_path / "tb")))["epoch"] == 1
    assert not (tmp_path / "tb").exists()

"""backbones.train: loss goes down, exact resume, 2-process gloo DDP, CLI + extraction CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from backbones.checkpoint import load_weights
from backbones.heads import MetricLoss, make_head
from backbones.model import build_model
from backbones.train import TrainConfig, parse_args, train
from backbones.transforms import eval_transform
from competition.data import scan_train
from competition.split import make_split

TINY = "mobilenetv3_small_050"
REPO = Path(__file__).resolve().parents[1]


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch=TINY, image_size=32, classes_per_batch=4, images_per_class=2, epochs=3, lr=5e-3,
                embedding_dim=16, workers=0, progress=False, warmup_epochs=0.5, scale=16.0)
    return TrainConfig(**{**base, **kw})


def test_few_steps_lower_the_loss(image_dataset):
    torch.manual_seed(0)
    index = scan_train(image_dataset)
    tf = eval_transform(32, (0.5,) * 3, (0.25,) * 3)
    from competition.data import load_image
    picks = list(range(0, len(index), 4))[:12]
    x = torch.stack([tf(load_image(index.paths[i])) for i in picks])
    classes = sorted(set(index.labels))
    y = torch.tensor([classes.index(index.labels[i]) for i in picks])
    model = build_model(TINY, embedding_dim=16, announce=False)
    loss_fn = MetricLoss(make_head("arcface", 16, len(classes), scale=16, margin=0.2), triplet_weight=0.5)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _break_images(root: Path) -> tuple[str, str]:
    """Add one unreadable file to a train class and one to a held-out class; return their ids."""
    split = make_split(scan_train(root), 0.3, seed=0)
    train_c, held_c = split.train_classes[0], split.heldout_classes[0]
    for c in (train_c, held_c):
        (root / "train" / "train_data" / c / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return f"{train_c}/zz_broken.jpg", f"{held_c}/zz_broken.jpg"


def test_resume_matches_uninterrupted_run(image_dataset, tmp_path):
    _break_images(image_dataset)
    kw = dict(ema=0.5, triplet_weight=0.5, color_jitter=0.3, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = train(_cfg(image_dataset, tmp_path / "full", **kw))
        part = train(_cfg(image_dataset, tmp_path / "part", stop_after_epoch=1, **kw))
        assert part["epoch"] == 1
        resumed = train(_cfg(image_dataset, tmp_path / "part", resume=True, **kw))
    assert full["epoch"] == resumed["epoch"] == 2
    assert full["bad_images"] == 1
    for name in ("last/model.safetensors", "model.safetensors"):
        a, b = load_weights(tmp_path / "full" / name), load_weights(tmp_path / "part" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (name, k)
    log = [json.loads(ln) for ln in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["val"] for r in log)
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["arch"] == TINY and len(cfg["split_hash"]) == 16 and cfg["image_size"] == 32
    assert (tmp_path / "full" / "split.json").is_file() and (tmp_path / "full" / "loss.png").stat().st_size > 0


def test_ddp_two_process_gloo_writes_one_checkpoint(image_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "backbones.train", "--arch", TINY, "--data", str(image_dataset), "--out", str(out),
           "--image-size", "32", "--batch-size", "6", "--images-per-class", "2", "--epochs", "1", "--embedding-dim", "16",
           "--workers", "0", "--device", "cpu", "--no-progress", "--head", "cosface"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("from random initialisation") == 1
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert found == ["last/model.safetensors", "model.safetensors"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_cli_softmax_sgd_accum_then_extract_cli(image_dataset, tmp_path):
    from backbones.extract import main as extract_main

    cfg = parse_args(["--data", str(image_dataset), "--out", str(tmp_path / "run"), "--arch", TINY,
                      "--image-size", "32", "--batch-size", "8", "--images-per-class", "2", "--epochs", "1", "--head", "softmax",
                      "--optimizer", "sgd", "--grad-accum", "2", "--max-steps", "1", "--embedding-dim", "8",
                      "--workers", "0", "--no-progress", "--crop-scale", "0.5", "1.0", "--val-at-start", "--freeze-bn"])
    assert cfg.classes_per_batch == 4 and cfg.crop_scale == (0.5, 1.0) and cfg.max_steps == 1
    assert train(cfg)["epoch"] == 1
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[0]["loss"] is None and log[0]["val"]
    query = image_dataset / "test" / "test_data" / "query"
    out = tmp_path / "q.npy"
    assert extract_main(["--run", str(tmp_path / "run"), "--images", str(query), "--out", str(out),
                         "--workers", "0", "--flip"]) == 0
    desc = np.load(out)
    names = (tmp_path / "q.txt").read_text().split()
    assert desc.shape == (6, 8) and names == sorted(p.stem for p in query.iterdir())
    assert np.allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)

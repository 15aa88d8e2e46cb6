"""backbones.train: loss goes down, exact resume, 2-process gloo DDP, CLI + extraction CLI, the P x K rule,
the EMA, TensorBoard curves."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
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
    base = dict(data=str(data), out=str(out), arch=TINY, image_size=32, classes_per_batch=4, images_per_class=2,
                epochs=3, lr=5e-3, embedding_dim=16, workers=0, progress=False, warmup_epochs=0.5, scale=16.0)
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
           "--image-size", "32", "--batch-size", "6", "--images-per-class", "2", "--epochs", "1",
           "--embedding-dim", "16", "--workers", "0", "--device", "cpu", "--no-progress", "--head", "cosface"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("from random initialisation") == 1
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert found == ["last/model.safetensors", "model.safetensors"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_cli_softmax_sgd_accum_then_extract_cli(image_dataset, tmp_path):
    from backbones.extract import main as extract_main

    cfg = parse_args(["--data", str(image_dataset), "--out", str(tmp_path / "run"), "--arch", TINY,
                      "--image-size", "32", "--batch-size", "8", "--images-per-class", "2", "--epochs", "1",
                      "--head", "softmax", "--optimizer", "sgd", "--grad-accum", "2", "--max-steps", "1",
                      "--embedding-dim", "8",
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


def test_p_from_the_batch_size_is_one_rule_and_a_batch_below_k_is_refused(image_dataset, tmp_path, monkeypatch,
                                                                             capsys):
    from backbones import train as train_mod
    from backbones.config import ConfigError
    from competition.cli import run_command

    assert TrainConfig(data="d", out="o", batch_size=10, images_per_class=4).batch_classes == 2
    assert TrainConfig(data="d", out="o", classes_per_batch=5, images_per_class=4).batch_classes == 5
    assert TrainConfig.from_dict({"data": "d", "out": "o", "batch_size": 10, "images_per_class": 4}).batch_classes == 2
    with pytest.raises(ConfigError, match=r"--batch-size 3 is smaller than --images-per-class 4"):
        TrainConfig(data="d", out="o", batch_size=3, images_per_class=4).check()
    argv = ["--data", str(image_dataset), "--out", str(tmp_path / "run"), "--batch-size", "3",
            "--images-per-class", "4"]
    assert run_command(train_mod.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --batch-size 3 is smaller than --images-per-class 4") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()

    class Stop(Exception):
        pass

    def sampler(labels, p, k, **kw):   # what training hands the P x K sampler, from either entry
        raise Stop(p, k)
    monkeypatch.setattr(train_mod, "PKSampler", sampler)
    for cfg in (parse_args(argv[:4] + ["--batch-size", "7", "--images-per-class", "3", "--arch", TINY]),
                _cfg(image_dataset, tmp_path / "run2", batch_size=7, images_per_class=3, classes_per_batch=16)):
        with pytest.raises(Stop) as stop:
            train(cfg)
        assert stop.value.args == (2, 3)


def test_ema_weights_are_the_average_of_the_initial_and_the_trained_ones(image_dataset, tmp_path):
    from backbones.train import _seed_all
    cfg = _cfg(image_dataset, tmp_path / "run", epochs=1, max_steps=1, ema=0.25)
    _seed_all(cfg.seed)                                  # what training builds before its first step
    initial = build_model(TINY, 16, announce=False).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    trained = {k[len("model."):]: v for k, v in load_weights(tmp_path / "run" / "last" / "model.safetensors").items()
               if k.startswith("model.")}
    ema = load_weights(tmp_path / "run" / "model.safetensors")
    assert ema.keys() == initial.keys() == trained.keys()
    moved = 0
    for k, start in initial.items():
        if start.is_floating_point():   # one update with decay 0.25: 0.25 * initial + 0.75 * trained
            expected = 0.25 * start.double() + 0.75 * trained[k].double()
            assert torch.allclose(ema[k].double(), expected, atol=1e-6), k
            moved += not torch.equal(start, trained[k])
        else:                           # counters (BatchNorm's num_batches_tracked) are copied
            assert torch.equal(ema[k], trained[k]), k
    assert moved > 10


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` that TensorBoard shows for the event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_curves_are_the_log_and_a_resume_leaves_no_duplicate(image_dataset, tmp_path, monkeypatch):
    from backbones import train as train_mod
    tb = tmp_path / "tb"
    cfg = _cfg(image_dataset, tmp_path / "member-a", epochs=2, val_at_start=True, tensorboard=str(tb))
    real_save_last = train_mod.save_last

    class Killed(Exception):
        pass

    def killed_at_epoch_2(run):   # the kill lands after epoch 2's curves are written, before it is saved
        if run.progress.epoch == 2:
            raise Killed
        real_save_last(run)
    monkeypatch.setattr(train_mod, "save_last", killed_at_epoch_2)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(train_mod, "save_last", real_save_last)
    assert train(TrainConfig(**{**cfg.to_dict(), "crop_scale": tuple(cfg.crop_scale), "resume": True}))["epoch"] == 2

    curves = _scalars(tb / "member-a")
    assert set(curves) == {"train/loss", "train/images_per_s", "lr/neck", "lr/body", "heldout/mAP@1000",
                           "heldout/Recall@1"}
    log = [json.loads(ln) for ln in (tmp_path / "member-a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    trained = [r for r in log if r["loss"] is not None]
    for tag, key in (("train/loss", "loss"), ("train/images_per_s", "img_per_s"), ("lr/neck", "lr")):
        assert [s for s, _ in curves[tag]] == [1, 2], tag      # each epoch once: the killed one's point is gone
        assert [v for _, v in curves[tag]] == pytest.approx([r[key] for r in trained], rel=1e-6), tag
    for tag, key in (("heldout/mAP@1000", "mAP@1000"), ("heldout/Recall@1", "Recall@1")):
        assert [s for s, _ in curves[tag]] == [0, 1, 2], tag
        assert [v for _, v in curves[tag]] == pytest.approx([r["val"][key] for r in log], rel=1e-6), tag
    # no --layer-decay: the body learns at --body-lr-mult (0.1) times the neck's rate
    assert [v for _, v in curves["lr/body"]] == pytest.approx([0.1 * r["lr"] for r in trained], rel=1e-6)


def test_a_missing_tensorboard_is_one_line_before_any_work(image_dataset, tmp_path, monkeypatch, capsys):
    from backbones.train import main as train_main
    from competition.cli import run_command
    monkeypatch.setitem(sys.modules, "tensorboard", None)               # as if it were not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    argv = ["--data", str(image_dataset), "--out", str(tmp_path / "run"), "--arch", TINY,
            "--tensorboard", str(tmp_path / "tb")]
    assert run_command(train_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package") and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
    # a runtime option: a resume (or a recipe's member) may change it without retraining
    assert "tensorboard" not in TrainConfig(data="d", out="o", tensorboard="tb").result_options()

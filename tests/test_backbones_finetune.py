"""Fine-tuning that never loses to its starting point: epoch 0 scored and kept, the PCA neck,
the network off the shelf as a member, a linear probe, layer-wise learning rates, the final
refit on every class, and runs that refuse to overwrite or resume with other options."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones import checkpoint as ckpt
from backbones import train as train_mod
from backbones.baselines import pretrained_gem
from backbones.config import ConfigError, TrainConfig
from backbones.model import build_model
from backbones.optim import body_layers, param_groups, warmup_cosine
from backbones.transforms import eval_transform
from backbones.warm_start import gem_features
from competition.data import load_image, scan_train

TINY = "mobilenetv3_small_050"


@pytest.fixture
def weights(tmp_path):
    """A "pretrained" body file (random weights: the mechanics, not the quality, are under test)."""
    from safetensors.torch import save_file
    torch.manual_seed(1)
    path = tmp_path / f"{TINY}.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(TINY, 8, announce=False).body.state_dict().items()},
              str(path))
    return path


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), arch=TINY, image_size=32, classes_per_batch=4, images_per_class=2,
                epochs=1, lr=5e-3, embedding_dim=16, workers=0, progress=False, warmup_epochs=0.0)
    return TrainConfig(**{**base, **kw})


def _descriptors(model, paths):
    tf = eval_transform(32, model.spec.mean, model.spec.std)
    with torch.inference_mode():
        return model.eval()(torch.stack([tf(load_image(p)) for p in paths])).numpy()


def test_epoch_zero_descriptor_is_the_centred_pca_of_the_pretrained_features(image_dataset, weights, tmp_path):
    train_mod.train(_cfg(image_dataset, tmp_path / "run", pretrained=str(weights), epochs=0, neck_init="pca"))
    model, config = ckpt.load_run(tmp_path / "run", device="cpu")
    assert config["epoch"] == 0 and config["metrics"]["mAP@1000"] > 0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    index = scan_train(image_dataset).subset(split["train_classes"])
    feats = gem_features(model, index.paths, 32, torch.device("cpu"))    # what the neck was fitted on
    mu = feats.mean(axis=0)
    lam, vec = np.linalg.eigh(np.cov(feats - mu, rowvar=False))
    top = vec[:, np.argsort(lam)[::-1][:16]]
    expected = (feats - mu) @ top
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = _descriptors(model, index.paths)
    assert np.allclose(np.abs(np.sum(got * expected, axis=1)), 1.0, atol=1e-3)   # each row: the same direction


def test_the_network_off_the_shelf_is_a_member(image_dataset, weights, tmp_path):
    train_mod.train(_cfg(image_dataset, tmp_path / "shelf", pretrained=str(weights), epochs=0, embedding_dim=0))
    model, config = ckpt.load_run(tmp_path / "shelf", device="cpu")
    assert not model.has_neck and config["embedding_dim"] == model.in_features == model.embedding_dim
    paths = sorted((image_dataset / "test" / "test_data" / "query").iterdir())
    ours = _descriptors(model, paths)
    theirs, ok = pretrained_gem(TINY, weights, paths, image_size=32, progress=False, device="cpu")
    assert ok.all() and np.allclose(ours, theirs, atol=1e-5)
    from competition.split import HeldoutSplit
    from ensemble.build import BuildOptions, build_bundle
    from ensemble.members import open_member
    split = HeldoutSplit.load(tmp_path / "shelf" / "split.json")
    bundle, _ = build_bundle([open_member(tmp_path / "shelf")], image_dataset, split, tmp_path / "B",
                             BuildOptions(progress=False))
    assert bundle.member_names == ["shelf"] and bundle.ensemble(device="cpu").rank(
        [str(p) for p in paths], [str(p) for p in paths], top_k=1).indices[:, 0].tolist() == list(range(len(paths)))
    with pytest.raises(ConfigError, match="--epochs 0.*--pretrained"):
        _cfg(image_dataset, tmp_path / "x", epochs=0).check()


def test_epoch_zero_is_kept_when_training_makes_it_worse(image_dataset, weights, tmp_path, monkeypatch):
    scores = iter([0.9, 0.5, 0.4])
    monkeypatch.setattr(train_mod, "validate", lambda *a, **k: {"map_at_k": next(scores), "recall_at_1": 0.5,
                                                                "n_query": 1, "n_reference": 1})
    initial = {}
    real_save = ckpt.save_weights

    def spy(path, state):
        initial.setdefault(str(path), {k: v.clone() for k, v in state.items()})
        real_save(path, state)
    monkeypatch.setattr(train_mod.ckpt, "save_weights", spy)
    result = train_mod.train(_cfg(image_dataset, tmp_path / "run", pretrained=str(weights), epochs=2))
    assert result["best"] == 0.9
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    kept = ckpt.load_weights(tmp_path / "run" / "model.safetensors")
    first = initial[str(tmp_path / "run" / "model.safetensors")]
    assert config["epoch"] == 0 and all(torch.equal(kept[k], first[k]) for k in kept)
    log = ckpt.read_log(tmp_path / "run")
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[0]["val"]["mAP@1000"] == 0.9


def test_a_linear_probe_leaves_the_body_alone_then_fine_tunes(image_dataset, weights, tmp_path):
    body_file = {k: v for k, v in ckpt.load_weights(weights).items()}
    cfg = _cfg(image_dataset, tmp_path / "run", pretrained=str(weights), epochs=2, probe_epochs=1,
               stop_after_epoch=1, val_at_start=False)
    train_mod.train(cfg)
    state = ckpt.load_weights(tmp_path / "run" / "last" / "model.safetensors")
    body = {k[len("model.body."):]: v for k, v in state.items() if k.startswith("model.body.")}
    assert all(torch.equal(body[k], body_file[k]) for k in body_file)               # frozen, BN stats too
    neck_before = build_model(TINY, 16, str(weights), announce=False).fc.weight
    assert not torch.equal(state["model.fc.weight"], neck_before)
    train_mod.train(TrainConfig(**{**cfg.to_dict(), "crop_scale": tuple(cfg.crop_scale), "resume": True,
                                   "stop_after_epoch": None}))
    state = ckpt.load_weights(tmp_path / "run" / "last" / "model.safetensors")
    assert any(not torch.equal(state["model.body." + k], body_file[k]) for k in body_file)


def test_layer_decay_gives_the_stem_the_smallest_rate():
    model = build_model("resnet10t", 8, announce=False)
    loss = torch.nn.Linear(8, 2)
    groups = param_groups(model, loss, lr=1.0, body_lr_mult=0.1, weight_decay=1e-4, layer_decay=0.5)
    layers = body_layers(model.body)
    top = max(layers.values())
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.body.named_parameters():
        assert by_param[id(p)] == pytest.approx(0.1 * 0.5 ** (top - layers[name]))
    assert all(by_param[id(p)] == 1.0 for p in list(model.fc.parameters()) + list(loss.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim < 2 for p in g["params"]))
    probe = warmup_cosine(warmup=2, total=10, start=4)
    assert [probe(s) for s in (0, 3, 4, 5)] == [0.0, 0.0, 0.5, 1.0] and probe(10) == pytest.approx(0.0)


def test_refit_on_every_class_keeps_the_last_epoch(image_dataset, tmp_path):
    result = train_mod.train(_cfg(image_dataset, tmp_path / "refit", heldout_fraction=0.0, epochs=2))
    config = json.loads((tmp_path / "refit" / "config.json").read_text())
    split = json.loads((tmp_path / "refit" / "split.json").read_text())
    assert result["best"] is None and config["epoch"] == 2 and config["metrics"] is None
    assert split["heldout_classes"] == [] and config["train_classes"] == scan_train(image_dataset).classes
    assert all(r["val"] is None for r in ckpt.read_log(tmp_path / "refit"))


def test_a_run_is_never_overwritten_nor_resumed_with_other_options(image_dataset, tmp_path):
    cfg = _cfg(image_dataset, tmp_path / "run", epochs=2, stop_after_epoch=1)
    train_mod.train(cfg)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train_mod.train(cfg)
    with pytest.raises(ConfigError, match=r"--lr 0.005 -> 0.01"):
        train_mod.train(TrainConfig(**{**cfg.to_dict(), "crop_scale": tuple(cfg.crop_scale), "lr": 0.01,
                                       "resume": True}))
    # runtime options may change on resume
    done = train_mod.train(TrainConfig(**{**cfg.to_dict(), "crop_scale": tuple(cfg.crop_scale), "resume": True,
                                          "stop_after_epoch": None, "val_batch_size": 7}))
    assert done["epoch"] == 2


def test_no_neck_features_are_unit_length(weights):
    model = build_model(TINY, 0, str(weights), announce=False).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, model.in_features)
    assert torch.allclose(out, F.normalize(model.gem(model.features(x)).float(), dim=1))

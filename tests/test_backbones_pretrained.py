"""--pretrained sources (local file, timm, hf-hub:ORG/NAME), fully offline.

The Hugging Face hub is stood in for by a cache folder in the exact layout huggingface_hub reads
(models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}), filled with a tiny
timm model's random weights written by timm's own ``save_for_hf``; HF_HOME points at it. Every
socket connect is recorded and refused, so no test can reach a network.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from backbones.model import (
    ArchError,
    PretrainedMismatch,
    PretrainedUnavailable,
    build_model,
    model_from_spec,
    resolve_arch,
)
from competition.cli import run_command
from competition.console import console

TINY = "mobilenetv3_small_050"
TAG = "lamb_in1k"          # timm's default weights for TINY: hf_hub_id timm/mobilenetv3_small_050.lamb_in1k
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as huggingface_hub caches repo ``repo`` at revision main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    for name, src in files.items():
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)


def timm_repo(folder: Path, arch: str = TINY, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), **model_args) -> Path:
    """A timm model repo (config.json + model.safetensors) of random ``arch`` weights, written by timm."""
    torch.manual_seed(7)
    model = timm.create_model(arch, pretrained=False)
    timm.models.save_for_hf(model, str(folder), safe_serialization=True, data_config={"mean": mean, "std": std})
    if model_args:
        config = json.loads((folder / "config.json").read_text())
        config.setdefault("model_args", {}).update(model_args)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_body_holds(model, weights: Path) -> None:
    """Every body tensor equals the file's tensor of that name (classifier keys aside)."""
    ref = load_file(str(weights))
    own = model.body.state_dict()
    assert set(own) <= set(ref)
    for k, v in own.items():
        assert torch.equal(v, ref[k]), k


def test_hub_repo_loads_from_the_cache_with_its_config(hub, tmp_path, connects):
    repo = timm_repo(tmp_path / "repo", drop_rate=0.25)
    put_in_cache(hub, "acme/tiny-retrieval", {"config.json": repo / "config.json",
                                              "model.safetensors": repo / "model.safetensors"})
    model = build_model(TINY, embedding_dim=8, pretrained="hf-hub:acme/tiny-retrieval",
                        announce=False)
    assert_body_holds(model, repo / "model.safetensors")
    assert model.spec.arch == TINY
    assert model.spec.mean == pytest.approx((0.1, 0.2, 0.3)) and model.spec.std == pytest.approx((0.3, 0.2, 0.1))
    assert model.body.drop_rate == 0.25 and model.spec.model_args == {"in_chans": 3, "drop_rate": 0.25}
    again = model_from_spec(json.loads(json.dumps(model.spec.to_dict())))
    assert again.body.drop_rate == 0.25
    # a family name takes the member the repo declares; an other model is refused, naming the --arch to use
    assert build_model("mobilenet", 8, pretrained="hf-hub:acme/tiny-retrieval", announce=False).spec.arch == TINY
    with pytest.raises(PretrainedMismatch, match=rf"acme/tiny-retrieval holds {TINY} weights, not resnet10t.*"
                                                 rf"--arch {TINY}"):
        build_model("resnet10t", 8, pretrained="hf-hub:acme/tiny-retrieval", announce=False)
    # the same repo as a local folder (hf download --local-dir)
    assert_body_holds(build_model(TINY, 8, pretrained=str(repo), announce=False), repo / "model.safetensors")
    assert connects == []


def test_timm_source_fetches_the_tagged_weights_from_the_cache(hub, tmp_path, connects, capsys):
    repo = timm_repo(tmp_path / "repo")
    assert timm.get_pretrained_cfg(f"{TINY}.{TAG}").hf_hub_id == f"timm/{TINY}.{TAG}"
    put_in_cache(hub, f"timm/{TINY}.{TAG}", {"model.safetensors": repo / "model.safetensors"})
    with console():   # build_model logs what it loaded; a command's console shows it on stdout
        model = build_model(f"{TINY}.{TAG}", embedding_dim=8, pretrained="timm")
    assert_body_holds(model, repo / "model.safetensors")
    registry = timm.get_pretrained_cfg(f"{TINY}.{TAG}")
    assert model.spec.mean == tuple(registry.mean) and model.spec.std == tuple(registry.std)
    out = capsys.readouterr()
    assert f"from timm ({TINY}.{TAG}, hf-hub:timm/{TINY}.{TAG}) into" in out.out and out.err == ""
    # no tag: timm's default weights for the model, the same repo
    assert_body_holds(build_model(TINY, 8, pretrained="timm", announce=False), repo / "model.safetensors")
    assert connects == []


def test_uncached_offline_is_one_line_with_the_way_out(hub, connects, capsys):
    for source, arch, repo in (("hf-hub:acme/not-cached", TINY, "acme/not-cached"),
                               ("timm", "resnet10t.c3_in1k", "timm/resnet10t.c3_in1k")):
        with pytest.raises(PretrainedUnavailable) as err:
            build_model(arch, 8, pretrained=source, announce=False)
        text = str(err.value)
        assert f"cannot fetch {repo}/" in text and "HF_HUB_OFFLINE is set" in text and str(hub) in text
        assert "--pretrained /path/to/file.safetensors" in text and "HF_HUB_OFFLINE=1" in text
    assert run_command(lambda argv: build_model(TINY, 8, pretrained="hf-hub:acme/not-cached"), []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --pretrained hf-hub:acme/not-cached: cannot fetch") and err.count("\n") == 1
    assert connects == []


def test_weights_that_cannot_be_had_leave_no_run_folder(hub, connects, image_dataset, tmp_path, capsys):
    from backbones.train import main as train_main
    out = tmp_path / "run"
    argv = ["--data", str(image_dataset), "--out", str(out), "--arch", TINY, "--pretrained", "hf-hub:acme/not-cached"]
    assert run_command(train_main, argv) == 2
    assert "cannot fetch acme/not-cached" in capsys.readouterr().err and not out.exists()
    assert run_command(train_main, argv) == 2 and not out.exists()   # the same answer again, not "already a run"


def test_unreachable_hub_fails_after_one_probe(hub, monkeypatch, connects):
    from huggingface_hub.utils import _http
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(_http.time, "sleep", lambda s: pytest.fail(f"huggingface_hub backed off {s}s to retry"))
    with pytest.raises(PretrainedUnavailable, match=r"cannot fetch acme/tiny-retrieval/config\.json from the "
                                                    r"Hugging Face hub \(ConnectError"):
        build_model(TINY, 8, pretrained="hf-hub:acme/tiny-retrieval", announce=False)
    assert len(connects) == 1


def test_tagged_arch_without_pretrained_warns_once(capsys):
    with console():   # the warning is logged: a command's console prints it on stderr
        build_model(f"{TINY}.{TAG}", embedding_dim=8)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"warning: --arch {TINY}.{TAG} names timm's {TAG} weights")
        assert "random weights" in err and "--pretrained timm" in err
        build_model(TINY, embedding_dim=8)
        assert capsys.readouterr().err == ""
    with pytest.raises(ArchError, match=rf"no pretrained tag 'nosuch' for {TINY}; its tags: .*{TAG}"):
        resolve_arch(f"{TINY}.nosuch")


def test_wrong_guesses_get_a_hint(tmp_path):
    with pytest.raises(PretrainedUnavailable, match=r"--pretrained imagenet: no such file; did you mean "
                                                    r"--pretrained timm"):
        build_model(TINY, 8, pretrained="imagenet", announce=False)
    with pytest.raises(PretrainedUnavailable, match=r"write --pretrained hf-hub:timm/resnet10t\.c3_in1k"):
        build_model(TINY, 8, pretrained="timm/resnet10t.c3_in1k", announce=False)
    with pytest.raises(PretrainedUnavailable, match="expected hf-hub:ORG/NAME"):
        build_model(TINY, 8, pretrained="hf-hub:resnet10t", announce=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedUnavailable, match="without config.json"):
        build_model(TINY, 8, pretrained=tmp_path / "empty", announce=False)


def test_local_file_named_after_a_family_member(tmp_path):
    assert resolve_arch("efficientnet-lite") == resolve_arch("EfficientNet_Lite") == "tf_efficientnet_lite0"
    src = build_model(TINY, embedding_dim=8, announce=False)
    named = tmp_path / f"{TINY}.safetensors"
    save_file(src.body.state_dict(), str(named))
    model = build_model("mobilenet", 8, pretrained=named, announce=False)   # the family's default does not fit
    assert model.spec.arch == TINY and resolve_arch("mobilenet") != TINY
    assert_body_holds(model, named)
    with pytest.raises(PretrainedMismatch, match=rf"{TINY}\.safetensors does not fit resnet10t: .*the file's name "
                                                 rf"says {TINY}: try --arch {TINY}"):
        build_model("resnet10t", 8, pretrained=named, announce=False)
    anonymous = tmp_path / "weights.pth"
    torch.save(src.body.state_dict(), anonymous)
    with pytest.raises(PretrainedMismatch, match=r"weights\.pth does not fit mobilenetv3_large_100: [^;]*$"):
        build_model("mobilenet", 8, pretrained=anonymous, announce=False)


ROOT = Path(__file__).resolve().parents[1]
SHARED = [folder / "shared" / "pretrained" for folder in (ROOT.parent, ROOT.parent.parent)]  # checkout, worktree


@pytest.mark.parametrize("family, arch, mean", [("efficientnet", "tf_efficientnet_lite0", 0.5),
                                                ("efficientnet-lite", "tf_efficientnet_lite2", 0.5),
                                                ("mobilenetv2", "mobilenetv2_100", 0.485)])
def test_shared_imagenet_weights_load_under_a_family_name(family, arch, mean):
    path = next((p for p in (f / f"{arch}.safetensors" for f in SHARED) if p.is_file()), None)
    if path is None:
        pytest.skip("shared pretrained weights not on this machine")
    model = build_model(family, embedding_dim=8, pretrained=path, announce=False)
    assert model.spec.arch == arch and model.spec.mean[0] == mean
    assert_body_holds(model, path)


def test_the_repo_config_reader_reads_what_the_installed_timm_writes(tmp_path):
    """timm has no public reader of a local repo's config.json: ours must read what timm's public
    writer (``timm.models.save_for_hf``) writes. A failure here means timm changed the format."""
    from backbones.pretrained import read_repo_config

    repo = timm_repo(tmp_path / "repo", drop_rate=0.25)
    arch, model_args, cfg = read_repo_config(repo / "config.json", "test")
    got = (arch, model_args.get("drop_rate"), tuple(cfg.get("mean", ())), tuple(cfg.get("std", ())))
    assert got == (TINY, 0.25, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)), (
        f"timm {timm.__version__} writes config.json in a form backbones.pretrained.read_repo_config no longer "
        f"reads: {(repo / 'config.json').read_text()[:400]}")
    legacy = tmp_path / "legacy.json"   # older repos: one flat dict
    legacy.write_text(json.dumps({"architecture": TINY, "num_classes": 1000, "mean": [0.5] * 3, "std": [0.5] * 3}))
    arch, model_args, cfg = read_repo_config(legacy, "old")
    assert (arch, model_args, cfg["mean"]) == (TINY, {}, [0.5] * 3)
    for text, why in (("{not json", "JSONDecodeError"), ('{"pretrained_cfg": {}}', "no \"architecture\""),
                      ('{"architecture": "x", "model_args": [1]}', "must be objects")):
        legacy.write_text(text)
        with pytest.raises(PretrainedMismatch, match=rf"--pretrained old: legacy\.json is not a timm model config "
                                                     rf".*{why}"):
            read_repo_config(legacy, "old")

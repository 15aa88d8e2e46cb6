"""Every problem of a recipe (and of a training run) found before any work, all at once: unknown
architectures, weights that are missing, unreadable or not fetchable (never a download), bad devices,
an unusable storage, a missing data folder. Each is one line naming where its value was set."""
from __future__ import annotations

import time

import pytest
from test_backbones_pretrained import TAG, TINY, put_in_cache

from backbones.config import TrainConfig
from backbones.preflight import pretrained_problem, train_problems
from competition.cli import run_command
from tuning.recipe import main
from tuning.recipe_config import load_recipe
from tuning.recipe_preflight import recipe_problems, storage_problem

MEMBER = '[[members]]\nname = "{name}"\narch = "resnet10t"\n'


def _must_not_run(cfg):
    raise AssertionError("a recipe with problems began to run")


def test_every_problem_of_every_member_is_reported_at_once_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("tuning.recipe._run_recipe", _must_not_run)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "r.toml").write_text(
        'storage = "mysql://user@nope/db"\n' + MEMBER.format(name="a")
        + MEMBER.format(name="b") + 'pretrained = "missing.safetensors"\ndevice = "gpu"\n'
        + MEMBER.format(name="c") + 'pretrained = "junk.safetensors"\n'
        + '[[members]]\nname = "d"\narch = "resnet10tt"\n')
    t0 = time.monotonic()
    assert run_command(main, ["--config", "r.toml", "--out", "out", "--data", "nowhere"]) == 2
    seconds = time.monotonic() - t0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["--data", "r.toml:8", "r.toml:9", "r.toml:13", "r.toml:16",
                                                      "r.toml:1"], lines
    assert "missing.safetensors: no such file" in lines[1] and "members.b.device: device must be" in lines[2]
    assert "junk.safetensors: cannot read its header" in lines[3] and "unknown architecture 'resnet10tt'" in lines[4]
    assert "storage: mysql://user@nope/db: its driver (mysql) does not load" in lines[5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "r.toml"]
    assert seconds < 60   # (bench: the time to this error is measured, not asserted)


def test_training_reports_every_problem_at_once_and_creates_nothing(tmp_path, capsys):
    from backbones.train import main as train_main
    argv = ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--arch", "resnet10tt",
            "--device", "cuda:x", "--split", str(tmp_path / "split.json")]
    assert run_command(train_main, argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["--arch", "--device", "--data", "--split"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_hub_weights_are_found_in_the_cache_or_probed_once_never_downloaded(hub, connects, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("preflight downloaded"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    put_in_cache(hub, "acme/cached", {"config.json": tmp_path / "config.json",
                                      "model.safetensors": tmp_path / "model.safetensors"})
    put_in_cache(hub, f"timm/{TINY}.{TAG}", {"model.safetensors": tmp_path / "model.safetensors"})
    assert pretrained_problem("hf-hub:acme/cached", TINY) is None
    assert pretrained_problem("timm", f"{TINY}.{TAG}") is None and pretrained_problem("timm", TINY) is None
    assert "HF_HUB_OFFLINE is set" in pretrained_problem("hf-hub:acme/absent", TINY)
    wrong_tag = TrainConfig(data="", out="", arch="resnet10t.nope", pretrained="timm", device="cpu")
    assert [(option, why.split(":")[0]) for option, why in train_problems(wrong_tag, data=False)] == [
        ("arch", "unknown architecture 'resnet10t.nope'")]
    assert connects == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    why = pretrained_problem("hf-hub:acme/absent", TINY)
    assert "cannot fetch acme/absent/config.json from the Hugging Face hub" in why and len(connects) == 1


def test_local_weights_are_checked_by_their_header(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pth")
    (tmp_path / "bad.pth").write_bytes(b"<html>not weights</html>")
    assert pretrained_problem(str(tmp_path / "ok.safetensors"), "resnet10t") is None
    assert pretrained_problem(str(tmp_path / "ok.pth"), "resnet10t") is None
    assert "bad.pth: cannot read its header" in pretrained_problem(str(tmp_path / "bad.pth"), "resnet10t")
    assert "no such file" in pretrained_problem(str(tmp_path / "none.pth"), "resnet10t")
    cfg = TrainConfig(data="", out="", arch="resnet10t", pretrained=str(tmp_path / "ok.pth"), device="cpu")
    assert train_problems(cfg, data=False) == []


def test_storages(tmp_path):
    assert storage_problem("") is None
    assert storage_problem(f"journal:{tmp_path / 'new' / 'j.log'}") is None
    assert storage_problem(f"sqlite:///{tmp_path / 'study.db'}") is None and not (tmp_path / "study.db").exists()
    assert "its driver (mysql) does not load" in storage_problem("mysql://nope/db")
    assert "is not a storage" in storage_problem("nonsense")
    assert "cannot write into" in storage_problem("journal:/proc/1/j.log")


def test_a_problem_set_from_the_command_line_names_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(MEMBER.format(name="a"))
    from tuning.recipe import parse_args, resolve
    cfg = resolve(parse_args(["--config", "r.toml", "--devices", "tpu", "--set", "members.a.arch=nope_net"]))
    assert recipe_problems(cfg) == [f"--set members.a.arch: unknown architecture 'nope_net': {_arch_tail('nope_net')}",
                                    "--devices: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"]
    assert load_recipe(tmp_path / "r.toml").members[0].arch == "resnet10t"


def _arch_tail(name: str) -> str:
    from backbones.model import ArchError, resolve_arch
    with pytest.raises(ArchError) as info:
        resolve_arch(name)
    return str(info.value).split(": ", 1)[1]


def test_a_gpu_that_is_not_there_is_a_problem_one_without_any_gpu_runs_on_the_cpu(monkeypatch):
    from backbones.preflight import device_problem
    monkeypatch.setattr("rerank.device._visible_gpus", lambda: 2)   # a machine with two GPUs, mocked
    assert device_problem("cuda:1") is None and device_problem("auto") is None
    assert "only 2 GPU(s) visible" in device_problem("cuda:2")
    monkeypatch.setattr("rerank.device._visible_gpus", lambda: 0)
    assert device_problem("cuda:3") is None   # the documented fallback: the CPU, with a warning at training

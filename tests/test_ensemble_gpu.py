"""GPU paths of ensemble/ and main.py on a CPU: the descriptor cache keys on device and
precision; every extracting command takes --workers and hands it to the members."""
from __future__ import annotations

import json

import pytest
import torch
from _ensemble_data import FakeExtractor

import main as main_mod
from competition.console import console
from competition.data import TRAIN_DIR
from ensemble import build as build_mod
from ensemble.members import open_member
from rerank import device as device_mod


def _manifest_settings(cache_dir) -> list[dict]:
    return [json.loads(p.read_text())["settings"] for p in sorted(cache_dir.rglob("manifest.json"))]


def test_descriptor_cache_keys_on_device_and_precision(ens_env, monkeypatch):
    run = ens_env.make_run("alpha")
    cache = ens_env.root / "cache"
    paths = sorted((ens_env.data / TRAIN_DIR).glob("*/*.jpg"))[:6]
    extract = FakeExtractor()

    def describe(device: str) -> int:
        """Describe ``paths`` on ``device`` through the shared cache; return the images extracted."""
        before = len(extract.images)
        open_member(run, extractor=extract, cache_dir=cache, device=device).describe(paths)
        return len(extract.images) - before

    assert describe("cpu") == 6 and describe("cpu") == 0
    assert _manifest_settings(cache) == [{"flip": False, "scales": [1.0], "device": "cpu", "amp": "float32"}]
    monkeypatch.setattr(device_mod, "_visible_gpus", lambda: 1)        # the same cache on a GPU machine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert describe("cuda") == 6 and describe("cuda") == 0             # bf16 rows never mix with fp32 ones
    assert _manifest_settings(cache)[0]["amp"] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert describe("cuda") == 6                                       # an older GPU computes in fp16
    assert _manifest_settings(cache)[0] == {"flip": False, "scales": [1.0], "device": "cuda", "amp": "float16"}


def test_extracting_commands_take_workers():
    build = ["--members", "r", "--data", "d", "--out", "o"]
    assert build_mod.parse_args(build).workers is None                  # auto: resolved per device
    assert build_mod.parse_args(build + ["--workers", "0"]).workers == 0
    assert build_mod.BuildConfig().workers is None
    assert main_mod.parse_args(["--data", "d"]).workers is None
    assert main_mod.parse_args(["--data", "d", "--workers", "6"]).workers == 6
    with pytest.raises(SystemExit):
        main_mod.parse_args(["--data", "d", "--workers", "-1"])


def test_main_hands_workers_to_build_and_inference(image_dataset, monkeypatch, capsys):
    class Stop(Exception):
        pass

    seen = {}

    def build_from_paths(members, data, out, config):
        seen["build"] = config.workers
        raise Stop

    class Bundle:
        def ensemble(self, **kw):
            seen["inference"] = kw
            raise Stop

    monkeypatch.setattr(build_mod, "build_from_paths", build_from_paths)
    with pytest.raises(Stop), console():   # main logs its runtime line; a command's console shows it on stdout
        main_mod.main(["--mode", "train", "--data", str(image_dataset), "--members", "run", "--workers", "3",
                       "--device", "cpu"])
    assert seen["build"] == 3
    assert capsys.readouterr().out.startswith("runtime: device cpu, amp float32, faiss GPUs ")
    state = main_mod.SessionState(str(image_dataset), 1000, "cpu", None, workers=5)
    state.bundle = Bundle()
    with pytest.raises(Stop):
        main_mod.run_inference(state, [])
    assert seen["inference"]["workers"] == 5

"""main.py as NSML would drive it: train mode writes a checkpoint, test mode with
--pause 1 loads it and infer returns the exact format; the local score is the
metrics module's score of the same ranking."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backbones.train import TrainConfig, train
from competition.data import QUERY_DIR, REFERENCE_DIR, image_name, list_images, read_labels
from competition.metrics import mean_average_precision, recall_at_k
from competition.submission import rankings_from_names
from competition.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nsml_world(tmp_path_factory):
    """A tiny generated dataset, one tiny trained member, and a train-mode run of main.py."""
    root = tmp_path_factory.mktemp("nsml")
    data = root / "data"
    generate(data, SynthConfig(seed=3, train_classes=8, images_per_class=5, test_classes=3,
                               queries_per_class=2, references_per_class=3, size=32))
    run = root / "run"
    train(TrainConfig(data=str(data), out=str(run), arch="mobilenetv3_small_050", image_size=32, classes_per_batch=4,
                      images_per_class=2, epochs=1, embedding_dim=16, workers=0, progress=False, heldout_fraction=0.4))
    env = {**os.environ, "KIT_CHECKPOINTS": str(root / "checkpoints"), "KIT_SESSION": "demo"}
    proc = subprocess.run([sys.executable, "main.py", "--mode", "train", "--data", str(data),
                           "--members", str(run), "--trials", "3", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"root": root, "data": data, "env": env, "checkpoint": root / "checkpoints" / "demo" / "final"}


def test_train_mode_writes_an_ensemble_checkpoint(nsml_world):
    bundle = nsml_world["checkpoint"] / "bundle"
    assert (bundle / "manifest.json").is_file()
    report = nsml_world["root"] / "checkpoints" / "demo" / "report.jsonl"
    assert any("heldout_map" in json.loads(line) for line in report.read_text().splitlines())


def test_test_mode_submission_is_valid_and_scored_like_the_metrics_module(nsml_world):
    data, out = nsml_world["data"], nsml_world["root"] / "submission"
    proc = subprocess.run([sys.executable, "main.py", "--mode", "test", "--pause", "1", "--data", str(data),
                           "--checkpoint", str(nsml_world["checkpoint"]), "--out", str(out), "--device", "cpu"],
                          cwd=REPO, env=nsml_world["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local leaderboard: mAP@1000" in proc.stdout
    submission = json.loads((out / "submission.json").read_text())
    queries = [image_name(p) for p in list_images(data / QUERY_DIR)]
    refs = [image_name(p) for p in list_images(data / REFERENCE_DIR)]
    assert sorted(submission) == sorted(queries)
    for ranked in submission.values():  # every reference once (fewer than 1000 exist)
        assert sorted(ranked) == sorted(refs)
    labels = read_labels(data)
    rankings = rankings_from_names(submission, queries, refs)
    q_labels = [labels["query"][q] for q in queries]
    r_labels = [labels["reference"][r] for r in refs]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["mAP@1000"] == pytest.approx(mean_average_precision(rankings, q_labels, r_labels, k=1000))
    assert scores["Recall@1"] == pytest.approx(recall_at_k(rankings, q_labels, r_labels, 1))
    assert (out / "retrieval.png").is_file() and (out / "submission.csv").is_file()


def test_infer_returns_the_exact_nsml_format_and_never_a_duplicate(nsml_world, monkeypatch):
    import main
    from competition import nsml_local
    from ensemble.model import Ensemble, Ranking
    data = nsml_world["data"]
    state = main.SessionState(str(data), top_k=1000, device="cpu")
    main.bind_model(state)
    nsml_local.load_path(nsml_world["checkpoint"])
    query_paths = [str(p) for p in list_images(data / QUERY_DIR)]
    result = nsml_local.infer(query_paths)
    n_refs = len(list_images(data / REFERENCE_DIR))
    assert [i for i, _ in result] == list(range(len(query_paths)))
    for (i, (name, ranked)), path in zip(result, query_paths):
        assert isinstance(name, str) and name == image_name(path) and isinstance(ranked, list)
        assert len(ranked) == n_refs == len(set(ranked))
    # a ranker gone wrong (duplicates, out-of-range ids) still cannot produce an invalid list
    broken = np.tile(np.array([0, 0, 99, -1]), (len(query_paths), 1))
    monkeypatch.setattr(Ensemble, "rank", lambda self, q, r, top_k=1000, **kw: Ranking(broken, broken * 0.0))
    for _, (_, ranked) in nsml_local.infer(query_paths):
        assert len(ranked) == n_refs == len(set(ranked))


def test_the_inference_path_does_each_thing_once(nsml_world, monkeypatch, tmp_path):
    """Two local submissions in one process: the reference folder is listed once per run, the member's
    config.json read once per run, each bundle file hashed once in all, the rankings checked once per run
    (and never as names), and the cached tuning descriptors never read."""
    from collections import Counter

    import main
    from backbones import checkpoint
    from competition import data as data_mod
    from competition import submission as submission_mod
    from ensemble import bundle as bundle_mod
    from ensemble import sealed
    counts: Counter = Counter()

    def count(module, attr, key):
        real = getattr(module, attr)

        def counted(*args, **kwargs):
            counts[key(*args, **kwargs)] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attr, counted)

    reference_dir = nsml_world["data"] / REFERENCE_DIR
    count(data_mod, "_sort_entries", lambda folder: "reference listing" if folder == reference_dir else "other")
    count(checkpoint, "read_config", lambda run_dir: "config read")
    count(sealed, "sha256_file", lambda path, *a: ("hash", str(path)))
    count(submission_mod, "check_rankings", lambda *a: "rankings check")
    count(main, "validate_submission", lambda *a, **kw: "names check")
    count(bundle_mod, "_read_arrays", lambda root, rel, full=True: ("array read", rel.split("/")[0], full))
    monkeypatch.setattr(sealed, "_DIGESTS", {})  # as if this process had never hashed the bundle
    for run in (1, 2):
        assert main.main(["--mode", "test", "--pause", "1", "--data", str(nsml_world["data"]), "--checkpoint",
                          str(nsml_world["checkpoint"]), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
        assert (counts["reference listing"], counts["config read"], counts["rankings check"]) == (run, run, run)
    bundle = nsml_world["checkpoint"] / "bundle"
    listed = json.loads((bundle / "manifest.json").read_text())["files"]
    assert {key[1] for key in counts if key[0] == "hash"} == {str(bundle / rel) for rel in listed}
    assert all(n == 1 for key, n in counts.items() if key[0] == "hash")
    assert counts["names check"] == 0 and counts[("array read", "descriptors", True)] == 0
    assert counts[("array read", "descriptors", False)] == 2  # parsed at each load (header only): no pickle


def test_a_loaded_checkpoint_answers_after_its_folder_is_deleted(nsml_world, tmp_path):
    """NSML may delete the folder it handed to load(): the network is in memory by then, and nothing was copied."""
    import shutil

    import main
    from competition import nsml_local
    copy = tmp_path / "served"
    shutil.copytree(nsml_world["checkpoint"], copy)
    state = main.SessionState(str(nsml_world["data"]), top_k=1000, device="cpu")
    main.bind_model(state)
    nsml_local.load_path(copy)
    assert state.bundle.path == copy / "bundle" and state._workdir is None   # read in place: no private copy
    shutil.rmtree(copy)
    query_paths = [str(p) for p in list_images(nsml_world["data"] / QUERY_DIR)]
    result = nsml_local.infer(query_paths)
    n_refs = len(list_images(nsml_world["data"] / REFERENCE_DIR))
    assert [q for _, (q, _) in result] == [image_name(p) for p in query_paths]
    assert all(len(set(ranked)) == len(ranked) == n_refs for _, (_, ranked) in result)

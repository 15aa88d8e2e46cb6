"""Recipes as files: the demo file is the default, unknown keys are refused by file and line,
the command line overrides the file, and --print-config reads back to the same recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from competition.cli import run_command
from tuning.recipe import main, parse_args, resolve
from tuning.recipe_config import RecipeError, apply_overrides, demo_recipe, load_recipe, to_toml

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_file_is_the_built_in_default():
    cfg = load_recipe(REPO / "recipes" / "demo.toml")
    cfg.out = demo_recipe().out
    assert cfg == demo_recipe()


@pytest.mark.parametrize("name", ["demo", "grocery-cpu", "grocery-gpu"])
def test_shipped_recipes_load_and_round_trip(name, tmp_path):
    cfg = load_recipe(REPO / "recipes" / f"{name}.toml")
    copy = tmp_path / "resolved.toml"
    copy.write_text(to_toml(cfg))
    again = load_recipe(copy)
    again.out = cfg.out
    assert again == cfg


@pytest.mark.parametrize("text,line,needle", [
    ('trials = 5\ntrails = 6\n', 2, "trails: unknown key .did you mean trials"),
    ('[defaults]\nlr = 0.1\nlearning_rate = 0.1\n', 3, "defaults.learning_rate: unknown key"),
    ('[[members]]\nname = "a"\narch = "resnet10t"\n\n[[members]]\nname = "b"\narch = "resnet10t"\nepoch = 3\n',
     8, "members.b.epoch: unknown key .did you mean epochs"),
    ('[[members]]\nname = "a"\narch = "resnet10t"\nout = "x"\n', 4, "members.a.out: set by the recipe"),
    ('[synth]\ntest_classes = 4\ncolours = 3\n', 3, "synth.colours: unknown key"),
])
def test_unknown_keys_are_refused_with_file_and_line(text, line, needle, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"r.toml:{line}: {needle}"):
        load_recipe(path)


def _must_not_run(cfg):
    raise AssertionError("a bad recipe began to run")


MEMBERS = '[[members]]\nname = "a"\narch = "resnet10t"\n'

# (recipe text, the line and message of its one problem): every wrong type a user met, and their kin
BAD_RECIPES = [
    ('trials = "15"\n' + MEMBERS, "r.toml:1: trials: expected an integer >= 0, got '15'"),
    ('trials = 15.5\n' + MEMBERS, "r.toml:1: trials: expected an integer >= 0, got 15.5"),
    ('heldout = "0.4"\n' + MEMBERS, "r.toml:1: heldout: expected a number in [0.0, 0.99], got '0.4'"),
    ('heldout = 1.5\n' + MEMBERS, "r.toml:1: heldout: expected a number in [0.0, 0.99], got 1.5"),
    ('k = 10.5\n' + MEMBERS, "r.toml:1: k: expected an integer >= 1, got 10.5"),
    ('devices = "cpu"\n' + MEMBERS, "r.toml:1: devices: expected a non-empty list of strings, got 'cpu'"),
    ('devices = []\n' + MEMBERS, "r.toml:1: devices: expected a non-empty list of strings, got []"),
    ('refit = "yes"\n' + MEMBERS, "r.toml:1: refit: expected true or false, got 'yes'"),
    ('distractors = "some"\n' + MEMBERS, "r.toml:1: distractors: expected a count >= 0, \"references\" or"),
    ('parallel = 0\n' + MEMBERS, "r.toml:1: parallel: expected an integer in [1, 64], got 0"),
    ('synth = 3\n' + MEMBERS, "r.toml:1: synth: expected a table [synth]"),
    ('[synth]\ntrain_classes = "many"\n' + MEMBERS, "r.toml:2: synth.train_classes: expected an integer >= 1"),
    ('[synth]\nsize = 8\n' + MEMBERS, "r.toml:2: synth.size: expected an integer in [24, 1024], got 8"),
    ('[defaults]\nbatch_size = 16.0\n' + MEMBERS, "r.toml:2: defaults.batch_size: expected an integer in [2, "),
    ('[defaults]\nseed = 1\n' + MEMBERS, "r.toml:2: defaults.seed: set by the recipe for every member"),
    (MEMBERS + 'epochs = 2.5\n', "r.toml:4: members.a.epochs: expected an integer in [0, 100000], got 2.5"),
    (MEMBERS + 'freeze_bn = 1\n', "r.toml:4: members.a.freeze_bn: expected true or false, got 1"),
    (MEMBERS + 'flip = "yes"\n', "r.toml:4: members.a.flip: expected true or false, got 'yes'"),
    (MEMBERS + 'head = "nope"\n', "r.toml:4: members.a.head: expected one of 'arcface', "),
    (MEMBERS + 'crop_scale = [\n  0.5,\n  "x",\n]\n', "r.toml:4: members.a.crop_scale: expected a list of 2 numbers"),
    (MEMBERS + 'epochs = 0\n', "r.toml:1: members.a: --epochs 0 saves the initial weights"),
    ('[[members]]\nname = 7\narch = "resnet10t"\n', "r.toml:2: members.#1.name: expected a non-empty string, got 7"),
    ('[[members]]\nname = "a"\n', "r.toml:1: members.a: no arch (every member needs a name and an arch)"),
    (MEMBERS + MEMBERS, "r.toml:5: members.a: the name 'a' is taken by an earlier member"),
    ('trials = 3\n', "r.toml: no [[members]]"),
    ('trials = = 3\n', "r.toml:1: not valid TOML"),
]


@pytest.mark.parametrize("text,said", BAD_RECIPES, ids=[t.split("\n")[0] + ("..." + t[-24:] if "[[" in t else "")
                                                       for t, _ in BAD_RECIPES])
def test_a_bad_recipe_is_one_line_exit_2_and_creates_nothing(text, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tuning.recipe._run_recipe", _must_not_run)
    (tmp_path / "r.toml").write_text(text)
    assert run_command(main, ["--config", "r.toml", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {said}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


@pytest.mark.parametrize("item,said", [
    ("trials=abc", "--set trials: expected an integer >= 0, got 'abc'"),
    ("trials=15.5", "--set trials: expected an integer >= 0, got 15.5"),
    ("refit=maybe", "--set refit: expected true or false, got 'maybe'"),
    ("devices=cpu", "--set devices: expected a non-empty list of strings, got 'cpu'"),
    ("synth.bogus=3", "--set synth.bogus: unknown key"),
    ("members.nope.lr=0.1", "--set members.nope.lr: no member named 'nope'"),
    ("members.vgg11.batch_size=16.0", "--set members.vgg11.batch_size: expected an integer in [2, 65536], got 16.0"),
    ("synth=3", "--set synth: synth is a table: set its keys (synth.KEY)"),
    ("trials", "--set 'trials': expected KEY=VALUE"),
])
def test_a_bad_set_is_refused_even_with_print_config(item, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tuning.recipe._run_recipe", _must_not_run)
    assert run_command(main, ["--set", item, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {said}"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,value", [("trials", "15.5"), ("heldout", '"0.4"'), ("refit", '"yes"'),
                                       ("devices", '"cpu"'), ("synth.size", "8"), ("defaults.epochs", "2.5"),
                                       ("members.a.flip", "1"), ("members.a.head", '"nope"')])
def test_file_and_set_values_go_through_the_same_check(key, value, tmp_path):
    parts = key.split(".")
    table = {"synth": "[synth]\n", "defaults": "[defaults]\n"}.get(parts[0], "")
    line = f"{parts[-1]} = {value}\n"
    text = (MEMBERS + line) if parts[0] == "members" else (table + line + MEMBERS if table else line + MEMBERS)
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(RecipeError) as from_file:
        load_recipe(tmp_path / "r.toml")
    (tmp_path / "r.toml").write_text(MEMBERS)
    with pytest.raises(RecipeError) as from_set:
        apply_overrides(load_recipe(tmp_path / "r.toml"), {}, [f"{key}={value}"])
    assert str(from_file.value).split(f"{key}: ", 1)[1] == str(from_set.value).split(f"{key}: ", 1)[1]


def test_every_problem_is_reported_at_once_each_on_its_line(tmp_path):
    (tmp_path / "r.toml").write_text('trials = "15"\ndevices = [\n  "cpu",\n]\nrefit = "yes"\n[synth]\nsize = 8\n'
                                     + MEMBERS + "epochs = 2.5\nepoch = 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.toml")
    lines = [p.split(": ")[0].rsplit(":", 1)[1] + " " + p.split(": ")[1] for p in info.value.problems]
    assert lines == ["1 trials", "5 refit", "7 synth.size", "11 members.a.epochs", "12 members.a.epoch"]


def test_a_multi_line_array_and_a_dotted_key_are_read_and_located(tmp_path):
    (tmp_path / "r.toml").write_text('devices = [\n  "cpu",\n  "cpu",\n]\nsynth.size = 32\n' + MEMBERS
                                     + 'crop_scale = [\n  0.5,\n  1.0,\n]\n')
    cfg = load_recipe(tmp_path / "r.toml")
    assert cfg.devices == ["cpu", "cpu"] and cfg.synth == {"size": 32}
    assert cfg.members[0].options["crop_scale"] == (0.5, 1.0)
    assert cfg.where("synth.size").endswith("r.toml:5: synth.size")


def test_bad_values_are_refused_naming_member_and_option(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('trials = -1\n[[members]]\nname = "a"\narch = "resnet10t"\nepochs = -2\n')
    with pytest.raises(RecipeError, match=r"r.toml:1: trials: expected an integer >= 0, got -1\n.*r.toml:5: "
                                          r"members.a.epochs: expected an integer in \[0, 100000\], got -2"):
        load_recipe(path)


def test_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.toml"
    path.write_text('data = "../data"\nstorage = "journal:j.log"\n[[members]]\nname = "a"\narch = "resnet10t"\n'
                    'pretrained = "w.safetensors"\n')
    cfg = load_recipe(path)
    assert cfg.data == str(tmp_path / "data") and cfg.storage == f"journal:{tmp_path / 'sub' / 'j.log'}"
    assert cfg.members[0].options["pretrained"] == str(tmp_path / "sub" / "w.safetensors")
    assert cfg.out == "runs/r"


def test_command_line_overrides_the_file():
    args = parse_args(["--config", str(REPO / "recipes" / "demo.toml"), "--epochs", "2", "--trials", "7",
                       "--members", "resnet10t", "vgg11", "--set", "members.vgg11.lr=0.01",
                       "--set", "synth.test_classes=20", "--devices", "cpu", "cpu", "--refit", "--k", "100"])
    cfg = resolve(args)
    assert [m.name for m in cfg.members] == ["vgg11", "resnet10t"]  # the file's order: it fixes the concatenation
    assert all(m.options["epochs"] == 2 for m in cfg.members) and cfg.members[0].options["lr"] == 0.01
    assert (cfg.trials, cfg.k, cfg.refit, cfg.parallel, cfg.synth["test_classes"]) == (7, 100, True, 2, 20)
    with pytest.raises(RecipeError, match="no member named.*'nope'"):
        resolve(parse_args(["--members", "nope"]))
    with pytest.raises(RecipeError, match="--set colour: unknown key"):
        resolve(parse_args(["--set", "colour=3"]))
    cfg = resolve(parse_args(["--set", "members.vgg11.flip=true", "--set", "members.vgg11.pretrained=w.pth",
                              "--set", "storage=journal:j.log"]))
    assert cfg.members[0].flip and cfg.members[0].options["pretrained"] == str(Path.cwd() / "w.pth")
    assert cfg.storage == f"journal:{Path.cwd() / 'j.log'}"


@pytest.mark.parametrize("name", ["demo", "grocery-gpu"])
def test_shipped_recipes_read_nothing_outside_the_checkout(name):
    """Only the CPU benchmark recipe reads the shared folder beside the checkout; the others fetch what
    they need (timm's tagged weights) or take it on the command line."""
    cfg = load_recipe(REPO / "recipes" / f"{name}.toml")
    paths = [cfg.data, cfg.storage] + [m.train_options(cfg.defaults).get("pretrained") or "" for m in cfg.members]
    local = [p for p in paths if p and p != "timm" and not p.startswith("hf-hub:")]
    assert all(Path(p).resolve().is_relative_to(REPO) for p in local), local


def test_member_keys_are_every_training_option_as_declared_there():
    """A new TrainConfig option is a member key at once, typed as training types it; training itself
    refuses the same values (batch_size = 16.0) when they reach it some other way."""
    from dataclasses import fields

    from backbones.config import ConfigError, TrainConfig
    from tuning.recipe_config import RECIPE_ONLY, train_settings
    assert set(train_settings()) == {f.name for f in fields(TrainConfig)} - set(RECIPE_ONLY)
    assert train_settings()["batch_size"].optional and train_settings()["crop_scale"].length == 2
    with pytest.raises(ConfigError, match=r"--batch-size: expected an integer in \[2, 65536\], got 16.0"):
        TrainConfig.from_dict({"data": "d", "out": "o", "batch_size": 16.0})
    with pytest.raises(ConfigError, match=r"--freeze-bn: expected true or false, got 'yes'"):
        TrainConfig.from_dict({"data": "d", "out": "o", "freeze_bn": "yes"})

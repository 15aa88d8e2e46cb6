"""Recipes as files: the demo file is the default, unknown keys are refused by file and line,
the command line overrides the file, and --print-config reads back to the same recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from tuning.recipe import parse_args, resolve
from tuning.recipe_config import RecipeError, demo_recipe, load_recipe, to_toml

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
    ('trials = 5\ntrails = 6\n', 2, "'trails'"),
    ('[defaults]\nlr = 0.1\nlearning_rate = 0.1\n', 3, "'learning_rate'"),
    ('[[members]]\nname = "a"\narch = "resnet10t"\n\n[[members]]\nname = "b"\narch = "resnet10t"\nepoch = 3\n',
     8, "member 'b'.*'epoch'"),
    ('[[members]]\nname = "a"\narch = "resnet10t"\nout = "x"\n', 4, "recipe-set training option 'out'"),
    ('[synth]\ntest_classes = 4\ncolours = 3\n', 3, "'colours'"),
])
def test_unknown_keys_are_refused_with_file_and_line(text, line, needle, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"r.toml:{line}: .*{needle}"):
        load_recipe(path)


def test_bad_values_are_refused_naming_member_and_option(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('trials = -1\n[[members]]\nname = "a"\narch = "resnet10t"\nepochs = 0\n')
    with pytest.raises(RecipeError, match=r"trials must be >= 0.*member a.*--epochs"):
        load_recipe(path)
    path.write_text("not toml = = 3\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
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
    with pytest.raises(RecipeError, match="--set 'colour=3'"):
        resolve(parse_args(["--set", "colour=3"]))

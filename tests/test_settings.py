"""Declared settings: each kind refuses what it should, says what it expected, and a dataclass's fields
are read as settings (types from the annotations, ranges from the metadata)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from competition.settings import Setting, SettingError, declared, known_keys, setting


@pytest.mark.parametrize("declared_as,value,expected", [
    (Setting(int, low=0), 15.5, "an integer >= 0"),
    (Setting(int, low=0), "15", "an integer >= 0"),
    (Setting(int, low=0), True, "an integer >= 0"),
    (Setting(int, low=0), -1, "an integer >= 0"),
    (Setting(float, low=0.0, high=0.99), "0.4", "a number in [0.0, 0.99]"),
    (Setting(float, low=0.0, high=0.99), float("nan"), "a number"),
    (Setting(bool), "yes", "true or false"),
    (Setting(bool), 1, "true or false"),
    (Setting(str), 7, "a string"),
    (Setting(str, choices=("a", "b")), "c", "one of 'a', 'b'"),
    (Setting(list, item=str, low=1), "cpu", "a non-empty list of strings"),
    (Setting(list, item=str, low=1), [], "a non-empty list of strings"),
    (Setting(list, item=str), ["cpu", 0], "a list of strings"),
    (Setting(tuple, item=float, length=2, low=0.0, high=1.0), [0.5], "a list of 2 numbers"),
    (Setting(tuple, item=float, length=2, low=0.0, high=1.0), [0.5, 2.0], "each in [0.0, 1.0]"),
])
def test_a_value_that_does_not_fit_is_refused_saying_what_was_expected(declared_as, value, expected):
    with pytest.raises(SettingError, match=r"^expected .*got ") as info:
        declared_as.check(value)
    assert expected in str(info.value)


def test_values_that_fit_are_normalised():
    assert Setting(float).check(1) == 1.0 and isinstance(Setting(float).check(1), float)
    assert Setting(tuple, item=float, length=2).check([0, 1]) == (0.0, 1.0)
    assert Setting(int, optional=True).check(None) is None
    assert Setting(list, item=str).check(["a"]) == ["a"]
    with pytest.raises(SettingError):
        Setting(int).check(None)


def test_command_line_text_is_read_as_toml_and_strings_as_written():
    assert Setting(int).parse_text("15") == 15 and Setting(int).parse_text("abc") == "abc"
    assert Setting(bool).parse_text("true") is True and Setting(bool).parse_text("maybe") == "maybe"
    assert Setting(str).parse_text("2024") == "2024" and Setting(str).parse_text('"a b"') == "a b"
    assert Setting(list, item=str).parse_text('["cpu", "cuda:0"]') == ["cpu", "cuda:0"]


def test_a_dataclass_declares_its_settings():
    @dataclass
    class Options:
        count: int = setting(3, "how many", 1, 10)
        rate: float | None = setting(None, "a rate", 0.0)
        names: list[str] = setting(["a"], "names", low=1)
        pair: tuple[float, float] = setting((0.1, 0.2), "a pair", 0.0, 1.0)
        mode: str = setting("x", "mode", choices=("x", "y"))
        table: dict = setting({}, "not a setting")

    found = declared(Options)
    assert set(found) == {"count", "rate", "names", "pair", "mode"}
    count = found["count"]
    assert (count.kind, count.low, count.high, count.help) == (int, 1, 10, "how many")
    assert found["rate"].optional and found["rate"].kind is float
    assert (found["pair"].kind, found["pair"].item, found["pair"].length) == (tuple, float, 2)
    assert found["names"].check(["b"]) == ["b"] and Options().names is not Options().names
    with pytest.raises(SettingError):
        found["mode"].check("z")


def test_every_from_dict_refuses_unknown_keys_by_one_rule():
    from backbones.config import ConfigError, TrainConfig
    from ensemble.postprocess import PostProcessing

    @dataclass
    class Two:
        alpha: int = 0
        beta: int = 1

    assert known_keys({"beta": 3}, Two, "Two keys") == {"beta": 3}
    with pytest.raises(SettingError, match=r"^unknown Two keys: \['gamma', 'zeta'\]$"):
        known_keys({"zeta": 1, "alpha": 2, "gamma": 3}, Two, "Two keys")
    with pytest.raises(KeyError, match=r"recipe\.toml: unknown Two keys: \['gamma'\]"):
        known_keys({"gamma": 3}, Two, "Two keys", where="recipe.toml", error=KeyError)
    post = PostProcessing(whiten=True).to_dict()
    assert PostProcessing.from_dict(post) == PostProcessing(whiten=True)
    with pytest.raises(ValueError, match=r"unknown PostProcessing keys: \['whitening'\]"):
        PostProcessing.from_dict({**post, "whitening": True})
    with pytest.raises(ValueError, match=r"unknown RerankParams keys: \['k3'\]"):   # the nested table too
        PostProcessing.from_dict({**post, "rerank": {**post["rerank"], "k3": 1}})
    with pytest.raises(ConfigError, match=r"^run/config\.json: unknown training option\(s\): \['colour'\]$"):
        TrainConfig.from_dict({"data": "d", "out": "o", "colour": 1}, where="run/config.json")

"""The TOML key locator against tomllib (every key, table and array item found, on its own line, whatever
the layout), its errors with FILE:LINE, and the writer that leaves out None."""
from __future__ import annotations

import tomllib

import pytest

from competition.tomlfile import TomlError, dumps, key_lines, read_toml

LAYOUTS = [
    'trials = 5\nname = "x"\n',
    '# a comment [not a table]\na = 1 # b = 2\n\n[t]\nk = "v # not a comment"\n',
    'devices = [\n  "cpu",   # "x" = 1\n  \'cuda:0\',\n]\nafter = 1\n',
    's = """multi\n[fake]\nx = 1"""\nreal = 2\n',
    "lit = '''a\n\\n[b]'''\nnext = 3\n",
    'q = """ends with quotes"""""\nz = 1\n',
    '"quoted.key" = 1\n\'lit key\' = 2\na.b . c = 3\n',
    't = {x = 1, y = [1, {z = 2}]}\nd = 1979-05-27 07:32:00Z\nn = -1.5e3\n',
    '[[members]]\nname = "a"\n[members.sub]\nk = 1\n[[members]]\nname = "b"\n[[members.parts]]\np = 1\n',
    '[a.b]\nc = 1\n[a]\nd = 2\n[ x . "y z" ]\nw = [[1, 2], [3]]\n',
    'e = "esc \\" [x] = 1"\nf = \'back\\\'\ng = []\n',
]


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@pytest.mark.parametrize("text", LAYOUTS)
def test_every_path_tomllib_reads_has_its_line(text):
    lines, source = key_lines(text), text.splitlines()
    for path in _paths(tomllib.loads(text)):
        assert path in lines, (path, lines)
        key = next((p for p in reversed(path) if isinstance(p, str)), None)
        if isinstance(path[-1], str):   # a key or table: its name is on that line (quoted or bare)
            assert key.split(" ")[0].split(".")[0] in source[lines[path] - 1], (path, lines[path])


def test_lines_of_a_recipe_like_document():
    text = ("trials = 5\ndevices = [\n  \"cpu\",\n  \"cpu\",\n]\n[synth]\nsize = 30\n\n[[members]]\nname = \"a\"\n"
            "crop_scale = [\n 0.5,\n 1.0,\n]\n\n[[members]]  # second\nname = \"b\"\nepochs = 2\nsynth.x = 1\n")
    lines = key_lines(text)
    assert lines[("trials",)] == 1 and lines[("devices",)] == 2 and lines[("devices", 1)] == 4
    assert lines[("synth", "size")] == 7 and lines[("members", 0)] == 9 and lines[("members", 0, "crop_scale")] == 11
    assert lines[("members", 1)] == 16 and lines[("members", 1, "epochs")] == 18
    assert lines[("members", 1, "synth", "x")] == 19   # a dotted key inside the member's table


def test_invalid_toml_is_named_with_its_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("a = 1\nb = = 2\n")
    with pytest.raises(TomlError, match=r"r.toml:2: not valid TOML \(Invalid value\)"):
        read_toml(path)


def test_dumps_leaves_out_none_and_reads_back():
    data = {"a": 1, "none": None, "l": ["x", "y"], "t": {"k": 1.5, "gone": None, "tup": (0.5, 1.0)},
            "members": [{"name": "a", "p": None}, {"name": "b", "flip": True}]}
    back = tomllib.loads(dumps(data))
    assert back == {"a": 1, "l": ["x", "y"], "t": {"k": 1.5, "tup": [0.5, 1.0]},
                    "members": [{"name": "a"}, {"name": "b", "flip": True}]}

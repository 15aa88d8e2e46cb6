"""TOML files as the kit reads and writes them: the data with the line of every key (so a message can
name ``FILE:LINE``), and a writer that leaves out what TOML cannot hold (None).

    key_lines(text) -> {("trials",): 3, ("synth",): 10, ("synth", "size"): 11, ("members", 0): 20,
                        ("members", 0, "name"): 21, ("devices", 1): 5, ...}

A path is the keys from the document's root, with the index of an array-of-tables element (or of an
array item) where the data holds a list: the paths of ``tomllib``'s data. A table maps to its header's
line, a key to the line where the key starts, an array item to the line where it starts. The locator
scans TOML's lexical structure (comments, the four kinds of strings, multi-line arrays, inline tables,
dotted and quoted keys, tables that extend an array-of-tables element); it is only given documents that
``tomllib`` accepted.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from competition.cli import UserError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}#\n]")


class TomlError(UserError, ValueError):
    """A file that is not valid TOML; the message names the file and line."""


def read_toml(path: str | os.PathLike) -> tuple[dict, dict[tuple, int]]:
    """Return (the data, ``key_lines`` of the text) of a TOML file; TomlError names FILE:LINE when invalid."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{found.group(1)}" if found else str(path)
        reason = str(exc).replace(found.group(0), "").strip() if found else str(exc)
        raise TomlError(f"{where}: not valid TOML ({reason})") from None
    return data, key_lines(text)


def key_lines(text: str) -> dict[tuple, int]:
    """1-based line of every key, table and array item of a valid TOML document (see the module docstring)."""
    return _Scanner(text).document()


def dumps(data: dict) -> str:
    """``data`` as TOML (``tomli_w``), None values left out at every depth (TOML has no null)."""
    return tomli_w.dumps(_without_none(data))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value


class _Scanner:
    """One pass over a TOML text, recording where each path starts."""

    def __init__(self, text: str):
        self.s, self.i, self.line = text, 0, 1
        self.lines: dict[tuple, int] = {}
        self.arrays: dict[tuple, int] = {}    # array-of-tables path -> index of its last element

    def document(self) -> dict[tuple, int]:
        current: tuple = ()
        while True:
            self._space(newlines=True)
            if self.i >= len(self.s):
                return self.lines
            if self.s.startswith("[[", self.i):
                self._take(2)
                current = self._header(array=True)
                self._take(2)   # ]]
            elif self.s[self.i] == "[":
                self._take(1)
                current = self._header(array=False)
                self._take(1)   # ]
            else:
                self._pair(current)

    def _header(self, array: bool) -> tuple:
        line = self.line
        self._space()
        keys = self._key()
        self._space()
        path: tuple = ()
        for j, k in enumerate(keys):
            path += (k,)
            self.lines.setdefault(path, line)
            if array and j == len(keys) - 1:
                self.arrays[path] = self.arrays.get(path, -1) + 1
                path += (self.arrays[path],)
            elif path in self.arrays:
                path += (self.arrays[path],)
        self.lines.setdefault(path, line)
        return path

    def _pair(self, table: tuple) -> None:
        line = self.line
        keys = self._key()
        for j in range(1, len(keys) + 1):
            self.lines.setdefault(table + tuple(keys[:j]), line)
        self._space()
        self._take(1)   # =
        self._space()
        self._value(table + tuple(keys))

    def _key(self) -> list[str]:
        keys = []
        while True:
            self._space()
            c = self.s[self.i]
            if c in "\"'":
                start = self.i
                self._string()
                keys.append(tomllib.loads(f"k = {self.s[start:self.i]}")["k"])
            else:
                m = _BARE_KEY.match(self.s, self.i)
                keys.append(m.group(0))
                self._take(len(m.group(0)))
            self._space()
            if self.i < len(self.s) and self.s[self.i] == ".":
                self._take(1)
                continue
            return keys

    def _value(self, path: tuple) -> None:
        self.lines.setdefault(path, self.line)
        c = self.s[self.i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._take(1)
            index = 0
            while True:
                self._space(newlines=True)
                if self.s[self.i] == "]":
                    self._take(1)
                    return
                self._value(path + (index,))
                index += 1
                self._space(newlines=True)
                if self.s[self.i] == ",":
                    self._take(1)
        elif c == "{":
            self._take(1)
            while True:
                self._space(newlines=True)
                if self.s[self.i] == "}":
                    self._take(1)
                    return
                self._pair(path)
                self._space(newlines=True)
                if self.s[self.i] == ",":
                    self._take(1)
        else:   # number, bool, date-time (which may hold a space): up to the next delimiter
            m = _SCALAR_END.search(self.s, self.i)
            end = m.start() if m else len(self.s)
            self._take(len(self.s[self.i:end].rstrip()))

    def _string(self) -> None:
        quote = self.s[self.i]
        if self.s.startswith(quote * 3, self.i):
            self._take(3)
            while not self.s.startswith(quote * 3, self.i):
                self._take(2 if quote == '"' and self.s[self.i] == "\\" else 1)
            while self.s.startswith(quote * 4, self.i):   # up to two quotes may end the content
                self._take(1)
            self._take(3)
            return
        self._take(1)
        while self.s[self.i] != quote:
            self._take(2 if quote == '"' and self.s[self.i] == "\\" else 1)
        self._take(1)

    def _space(self, newlines: bool = False) -> None:
        """Skip spaces and tabs (and, with ``newlines``, line ends and comments)."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self._take(1)
            elif c == "#" and newlines:
                end = self.s.find("\n", self.i)
                self._take((end if end >= 0 else len(self.s)) - self.i)
            else:
                return

    def _take(self, n: int) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

"""Declared settings: one declaration per key (kind, range, choices, default, help), and one check
that every value goes through, whatever it came from (a TOML file, ``--set KEY=VALUE``, a dataclass).

    Setting(kind=int, low=0)            an integer >= 0: refuses 15.5, "15", true
    Setting(kind=float, low=0, high=1)  a number in [0, 1]: an integer is taken as a float
    Setting(kind=bool)                  true or false, nothing else
    Setting(kind=str, choices=(...))    a string (one of the choices)
    Setting(kind=list, item=str, low=1) a list of at least one string: a bare string is refused
    Setting(kind=tuple, item=float, length=2)   two numbers (a list is taken as a tuple)

``declared(cls)`` reads the settings of a dataclass from its fields' types and metadata
(``low``, ``high``, ``choices``, ``help``, optionally ``convert`` and ``expected`` for a value of
its own shape), so a new field is picked up without a second declaration. ``Setting.check(value)``
returns the value normalised (int -> float, list -> tuple) or raises ``SettingError`` whose
message reads ``expected <what>, got <value>``; ``Setting.parse_text`` reads a command-line value.
``known_keys(data, cls, what)`` is the one rule of every ``from_dict``: a key that names no field of
the dataclass is refused (``unknown <what>: [...]``), never ignored.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from competition.cli import UserError, range_text

KINDS = (bool, int, float, str, list, tuple)
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


class SettingError(UserError, ValueError):
    """A value of the wrong type or out of range (the message reads ``expected ..., got ...``), or a key
    that names no setting."""


def shown(value: Any) -> str:
    """A value as a message shows it: strings quoted, floats as written, others in TOML spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


@dataclass(frozen=True)
class Setting:
    """How one key's value must look (see the module docstring)."""

    kind: type = str
    item: type | None = None          # list / tuple items
    length: int | None = None         # tuple length
    optional: bool = False            # None allowed (a TOML file cannot write it: the key is left out)
    low: float | None = None          # numbers: bounds; lists: fewest items
    high: float | None = None
    choices: tuple | None = None
    help: str = ""
    convert: Callable[[Any], Any] | None = None   # a value of its own shape: returns it or raises UserError
    expected_text: str = ""                        # what ``convert`` accepts, in words

    def expected(self) -> str:
        """What the value must be, in words ("an integer >= 0", "a list of strings", ...)."""
        if self.expected_text:
            return self.expected_text
        if self.choices:
            return "one of " + ", ".join(shown(c) for c in self.choices)
        if self.kind in (list, tuple):
            items = _PLURAL.get(self.item or str, "values")
            if self.kind is tuple and self.length:
                return f"a list of {self.length} {items}" + (f", each {range_text(self.low, self.high)}"
                                                             if self._bounded() else "")
            if self.low:
                return f"a non-empty list of {items}" if self.low == 1 else f"a list of {int(self.low)}+ {items}"
            return f"a list of {items}"
        text = _NAMES[self.kind]
        return f"{text} {range_text(self.low, self.high)}" if self._bounded() else text

    def _bounded(self) -> bool:
        return self.kind in (int, float, tuple) and (self.low is not None or self.high is not None)

    def check(self, value: Any) -> Any:
        """Return ``value`` normalised; raise SettingError ``expected ..., got ...`` when it does not fit."""
        if value is None and self.optional:
            return None
        if self.convert is not None:
            try:
                return self.convert(value)
            except (UserError, TypeError, ValueError):
                raise SettingError(f"expected {self.expected()}, got {shown(value)}") from None
        if self.kind in (list, tuple):
            return self._check_items(value)
        if not self._fits(value, self.kind):
            raise SettingError(f"expected {self.expected()}, got {shown(value)}")
        value = float(value) if self.kind is float else value
        if self.choices and value not in self.choices:
            raise SettingError(f"expected {self.expected()}, got {shown(value)}")
        if self._bounded() and not _within(value, self.low, self.high):
            raise SettingError(f"expected {self.expected()}, got {shown(value)}")
        return value

    def _check_items(self, value: Any) -> list | tuple:
        item = self.item or str
        bad = not isinstance(value, (list, tuple)) or not all(self._fits(v, item) for v in value)
        if not bad and self.kind is tuple and self.length is not None:
            bad = len(value) != self.length
        if not bad and self.kind is list and self.low is not None:
            bad = len(value) < self.low
        if not bad and self.kind is tuple and self._bounded():
            bad = not all(_within(v, self.low, self.high) for v in value)
        if bad:
            hint = " (a bare string is not a list)" if isinstance(value, str) else ""
            raise SettingError(f"expected {self.expected()}, got {shown(value)}{hint}")
        items = [float(v) if item is float else v for v in value]
        return tuple(items) if self.kind is tuple else items

    @staticmethod
    def _fits(value: Any, kind: type) -> bool:
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, kind)

    def parse_text(self, text: str) -> Any:
        """A command-line value: TOML syntax (``3``, ``0.5``, ``true``, ``["a", "b"]``); a string setting
        takes the text as written (quotes optional). The result still has to pass ``check``."""
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
        if self.kind is str and self.convert is None and not isinstance(value, str):
            return text
        return value


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def known_keys(data: Mapping[str, Any], cls: type, what: str, where: str = "",
               error: Callable[[str], Exception] = SettingError) -> dict[str, Any]:
    """``data`` as a new dict when every key names a field of the dataclass ``cls``; else raise
    ``error("[where: ]unknown <what>: [keys]")`` naming every unknown key, sorted."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error((f"{where}: " if where else "") + f"unknown {what}: {unknown}")
    return dict(data)


def setting(default: Any = dataclasses.MISSING, help: str = "", low: float | None = None,  # noqa: A002
            high: float | None = None, choices: tuple | None = None, **meta: Any):
    """A dataclass field carrying its declaration (a list default is copied for every instance)."""
    metadata = {"help": help, "low": low, "high": high, "choices": choices, **meta}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls: type) -> dict[str, Setting]:
    """``{field name: Setting}`` of a dataclass, from its type hints and field metadata.

    Fields whose type is no setting (a dict, a list of records) are left out."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind, item, length, optional = _kind_of(hints[f.name])
        meta = f.metadata
        if kind is None and not meta.get("convert"):
            continue
        out[f.name] = Setting(kind=kind or str, item=item, length=length, optional=optional,
                              low=meta.get("low"), high=meta.get("high"), choices=meta.get("choices"),
                              help=meta.get("help", ""), convert=meta.get("convert"),
                              expected_text=meta.get("expected", ""))
    return out


def _kind_of(hint: Any) -> tuple[type | None, type | None, int | None, bool]:
    """(kind, item kind, tuple length, optional) of a type hint; kind None: not a setting."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return None, None, None, optional
        hint = args[0]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and args and args[0] in KINDS:
        return origin, args[0], len(args) if origin is tuple and Ellipsis not in args else None, optional
    return (hint if hint in KINDS and hint not in (list, tuple) else None), None, None, optional

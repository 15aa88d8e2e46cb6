"""Recipe steps that remember what they ran, so a recipe never reuses a stale result.

    OUT/steps/<step>.json    {"config": {...}, "done": true|false, "info": {...}}

A step is current when its record is done and its configuration equals the one asked
for now; a configuration that changed makes the step run again (and the steps after
it, whose configurations include the identities of what they build on: the split's
hash, the members' weights, the bundle's step). ``differences`` names what changed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from competition.fileio import atomic_write_json


def config_hash(config: dict) -> str:
    """First 12 hex digits of the sha256 of a configuration's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """Human-readable ``key old -> new`` for every leaf that differs (nested dicts flattened)."""
    if old is None:
        return [f"{prefix or 'config'}: nothing recorded"]
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name} {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class StepRecord:
    """The record of one step in ``OUT/steps``."""

    path: Path

    @classmethod
    def of(cls, out: str | Path, name: str) -> "StepRecord":
        return cls(Path(out) / "steps" / f"{name}.json")

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def changes(self, config: dict) -> list[str]:
        """[] when the step ran to the end with ``config``; else what differs (or why it must run)."""
        rec = self.read()
        if rec is None:
            return ["not run yet"]
        diff = differences(rec.get("config"), json.loads(json.dumps(config, default=str)))
        if diff:
            return diff
        return [] if rec.get("done") else ["interrupted"]

    def started_with(self, config: dict) -> bool:
        """True when an unfinished run of this step had exactly ``config`` (so it may resume)."""
        rec = self.read()
        return rec is not None and not differences(rec.get("config"), json.loads(json.dumps(config, default=str)))

    def forget(self, *keys: str) -> None:
        """Drop the recorded config's ``keys`` (a path into nested dicts), when present: a record made
        before that key left the configuration stays current."""
        rec = self.read()
        node = (rec or {}).get("config")
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            del node[keys[-1]]
            atomic_write_json(self.path, rec)

    def start(self, config: dict) -> None:
        atomic_write_json(self.path, {"config": config, "done": False})

    def finish(self, config: dict, **info: Any) -> None:
        atomic_write_json(self.path, {"config": config, "done": True, "info": info})

    def info(self) -> dict:
        return (self.read() or {}).get("info", {})

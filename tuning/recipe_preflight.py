"""Everything a recipe needs, checked before any work, every problem at once.

    recipe_problems(cfg) -> ["FILE:LINE: KEY: why", ...]     # [] when the recipe can run

* every member, as ``backbones.train`` checks itself at its start (``backbones.preflight``): its
  architecture, its pretrained weights (present, or fetchable with one quick probe: never a
  download), its device;
* the data folder (readable, in the hackathon layout), when the recipe names one;
* the Optuna storage: its driver imports and, for a database server, it opens (``storage_problem``).

Each line names where the value was set (the file and line, or the command-line option).
"""
from __future__ import annotations

import os
from pathlib import Path

from competition.cli import UserError, one_line
from tuning.recipe_config import RecipeConfig, RecipeError

CONNECT_TIMEOUT_S = 5   # seconds a database server may take to answer the check


def recipe_problems(cfg: RecipeConfig) -> list[str]:
    """One line per reason the recipe cannot run (see the module docstring)."""
    from backbones.config import TrainConfig
    from backbones.preflight import train_problems
    from competition.data import scan_train
    problems = []
    if cfg.data:
        try:
            scan_train(cfg.data)
        except (UserError, OSError) as exc:
            problems.append(f"{cfg.where('data')}: {one_line(exc)}")
    for i, m in enumerate(cfg.members):
        options = {"data": "", "out": "", "device": cfg.devices[i % len(cfg.devices)], **m.train_options(cfg.defaults)}
        for option, why in train_problems(TrainConfig.from_dict(options), data=False):
            keys = [f"members.{m.name}.{option}", f"defaults.{option}"] + (["devices"] if option == "device" else [])
            line = f"{cfg.where(*keys)}: {why}"
            if line not in problems:   # a default or a device shared by several members: said once
                problems.append(line)
    why = storage_problem(cfg.storage)
    if why:
        problems.append(f"{cfg.where('storage')}: {why}")
    return problems


def check_recipe(cfg: RecipeConfig) -> RecipeConfig:
    """``cfg`` when it can run; else RecipeError listing every problem."""
    problems = recipe_problems(cfg)
    if problems:
        raise RecipeError(problems)
    return cfg


def storage_problem(url: str) -> str | None:
    """Why an Optuna storage ("" = the default SQLite, ``journal:PATH``, an RDB URL) cannot be used, else None.

    An RDB URL's driver must import; a database server must accept a connection within
    ``CONNECT_TIMEOUT_S``; a file (journal, SQLite) needs a writable folder. Nothing is created."""
    if not url:
        return None
    if url.startswith("journal:"):
        return _folder_problem(Path(url[len("journal:"):]), url)
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"{url!r} is not a storage: journal:PATH, or a database URL such as sqlite:///FILE.db or " \
               "postgresql://USER@HOST/DB"
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        return None if database in ("", ":memory:") else _folder_problem(Path(database), url)
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} \
        if parsed.get_backend_name() in ("mysql", "mariadb", "postgresql") else {}
    try:
        engine = create_engine(parsed, connect_args=connect_args)   # imports the dialect and its driver
    except Exception as exc:  # noqa: BLE001 - an unknown dialect, a driver not installed
        return f"{parsed.render_as_string(hide_password=True)}: its driver ({parsed.drivername}) does not load " \
               f"({type(exc).__name__}: {one_line(exc)[:160]}); install it, or use journal:PATH"
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - refused, unknown host, wrong credentials, timeout
        return f"{parsed.render_as_string(hide_password=True)}: cannot connect " \
               f"({type(exc).__name__}: {one_line(exc).splitlines()[0][:160]})"
    finally:
        engine.dispose()
    return None


def _folder_problem(path: Path, url: str) -> str | None:
    """Why the storage file ``path`` could not be written (its nearest existing folder is not writable)."""
    folder = path.expanduser().absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"{url}: cannot write into {folder}"
    return None

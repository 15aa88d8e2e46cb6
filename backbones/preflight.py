"""Whether a training run can start, decided before any work: every problem found at once.

    train_problems(cfg) -> [(option, why), ...]      # [] when training can start

It checks, without building a model and without fetching anything:

* ``arch``: a family name or a timm model (timm's public registry, with its tag);
* ``pretrained``: a local file is present and its header parses (a safetensors header, a torch zip
  archive), a folder holds a timm repo; ``timm`` / ``hf-hub:`` weights are in the Hugging Face cache,
  or, when not offline, the hub answers one short probe for them (``PROBE_TIMEOUT_S``, no retries);
* ``device``: parses and exists (``rerank.device.resolve_device``);
* ``data``: a readable dataset in the hackathon layout (``data=False`` leaves it to the caller);
* ``split``: a readable split file, when one is given.

``backbones.train`` runs it at its start (``preflight``), and the recipe for every member before the
first one trains.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from competition.cli import UserError, UserErrors, one_line

if TYPE_CHECKING:   # annotations only: device_problem serves ensemble.build's --device without torch
    from backbones.config import TrainConfig

__all__ = ["PreflightError", "preflight", "pretrained_problem", "train_problems"]


class PreflightError(UserErrors):
    """Training that cannot start: one line per problem."""


def train_problems(cfg: TrainConfig, data: bool = True) -> list[tuple[str, str]]:
    """``(option, why)`` for every reason ``cfg`` cannot start training; [] when it can."""
    from backbones.model import resolve_arch
    from competition.data import scan_train
    from competition.split import HeldoutSplit
    problems = []
    try:
        arch = resolve_arch(cfg.arch)
    except UserError as exc:
        problems.append(("arch", str(exc)))
    else:
        why = pretrained_problem(cfg.pretrained, arch) if cfg.pretrained else None
        if why:
            problems.append(("pretrained", why))
    why = device_problem(cfg.device)
    if why:
        problems.append(("device", why))
    checks = ([("data", lambda: scan_train(cfg.data))] if data else []) + \
        ([("split", lambda: HeldoutSplit.load(cfg.split))] if cfg.split else [])
    for option, check in checks:
        try:
            check()
        except (UserError, OSError, ValueError) as exc:
            problems.append((option, one_line(exc)))
    return problems


def preflight(cfg: TrainConfig) -> None:
    """Raise PreflightError listing every problem ``train_problems`` finds (``--option: why`` each)."""
    problems = train_problems(cfg)
    if problems:
        raise PreflightError([why if why.startswith("--") else f"--{option.replace('_', '-')}: {why}"
                              for option, why in problems])


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used (not auto/cpu/cuda/cuda:N, or no such GPU), else None.

    A CUDA device asked for where no GPU is visible is no problem: it runs on the CPU, with a warning."""
    from rerank.device import resolve_device
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # training says it once, where it runs
            resolve_device(device)
    except ValueError as exc:
        return str(exc)
    return None


def pretrained_problem(source: str, arch: str) -> str | None:
    """Why the ``--pretrained`` weights for the timm model ``arch`` cannot be had, else None (never fetches)."""
    from backbones.pretrained import HUB_PREFIX, TIMM_SOURCE, find_weights
    text = str(source).strip()
    if text == TIMM_SOURCE or text.startswith(HUB_PREFIX):
        return _hub_problem(text, arch)
    try:
        weights = find_weights(text, arch)   # a local file or folder: no network
    except UserError as exc:
        return str(exc)
    return _header_problem(weights.path, weights.label)


def _header_problem(path: Path, label: str) -> str | None:
    """Why a local weights file's header does not parse (read as ``backbones.model`` reads it), else None."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    raise ValueError("a zip archive that torch.save did not write (no data.pkl)")
        else:
            with open(path, "rb") as fh:
                if fh.read(1) != b"\x80":
                    raise ValueError("neither a torch archive nor a pickled state dict")
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a weights file"
        return f"--pretrained {label}: cannot read its header ({type(exc).__name__}: {one_line(exc)[:200]})"
    return None


def _hub_problem(text: str, arch: str) -> str | None:
    """Why ``timm`` / ``hf-hub:`` weights are neither cached nor fetchable now, else None."""
    import timm
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from backbones.pretrained import (
        HUB_PREFIX,
        HUB_WEIGHT_FILES,
        PROBE_TIMEOUT_S,
        _unavailable,  # the one wording of "cannot be had" (same package)
        find_weights,
        hub_cache_dir,
        hub_offline,
    )
    if text.startswith(HUB_PREFIX):
        repo, _, revision = text[len(HUB_PREFIX):].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            return f"--pretrained {text}: expected {HUB_PREFIX}ORG/NAME, a timm model repo on the Hugging Face hub"
        needed = [("config.json",), HUB_WEIGHT_FILES]
    else:
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is None or not cfg.hf_hub_id:
            try:   # no weights on the hub: find_weights raises before any fetch, saying what there is
                find_weights(text, arch)
            except UserError as exc:
                return str(exc)
        repo, _, revision = cfg.hf_hub_id.partition("@")
        needed = [(cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES]
    cache, revision = hub_cache_dir(), revision or None
    if all(any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision), str)
               for name in names) for names in needed):
        return None
    if hub_offline():
        return str(_unavailable(text, repo, needed[0][0], "HF_HUB_OFFLINE is set", cache))
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    url = hf_hub_url(repo, needed[0][0], revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        get_hf_file_metadata(url, timeout=timeout)
    except RemoteEntryNotFoundError:
        return None if len(needed[0]) > 1 else f"--pretrained {text}: {repo} has no {needed[0][0]}"
    except RevisionNotFoundError:
        return f"--pretrained {text}: {repo} has no revision {revision!r}"
    except RepositoryNotFoundError:
        return f"--pretrained {text}: no repository {repo} on the Hugging Face hub, or it is private or gated"
    except Exception as exc:  # noqa: BLE001 - network, proxy, server: all mean "cannot fetch now"
        return str(_unavailable(text, repo, needed[0][0], f"{type(exc).__name__}: {one_line(exc)[:160]}", cache))
    return None

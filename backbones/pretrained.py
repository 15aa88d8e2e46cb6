"""Where a body's initial weights come from (``--pretrained SOURCE``); nothing is fetched unless asked.

    /path/to/file.safetensors   a local safetensors file, or a torch state dict (read with weights_only=True)
    /path/to/folder             a timm model repo on disk (config.json + model.safetensors, as
                                `hf download ORG/NAME --local-dir DIR` writes it)
    timm                        the weights timm's registry names for --arch (a tag picks them:
                                convnext_tiny.fb_in22k; no tag: timm's default weights for the model;
                                a local file named timm is ./timm)
    hf-hub:ORG/NAME[@REV]       a timm model repo on the Hugging Face hub (config.json + model.safetensors)

Fetching goes through huggingface_hub and its cache, as the environment says when asked (HF_HUB_CACHE,
else HF_HOME/hub; HF_HUB_OFFLINE; HF_ENDPOINT). A file already in the cache is used without touching the
network; with HF_HUB_OFFLINE=1 the network is never touched; otherwise one short probe (no retries)
decides, so a closed network fails in seconds. Whatever cannot be had raises ``PretrainedUnavailable``:
one line saying what could not be fetched and how to point at a local file or a filled cache.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm

from competition.cli import UserError

TIMM_SOURCE = "timm"
HUB_PREFIX = "hf-hub:"
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: the safe file first
PROBE_TIMEOUT_S = 5.0   # seconds the one probe of the hub may take (HF_HUB_ETAG_TIMEOUT overrides)
SOURCES = "a local .safetensors/.pth file, timm, or hf-hub:ORG/NAME"
_KEYWORD_GUESSES = {"imagenet", "imagenet1k", "imagenet-1k", "in1k", "in22k", "true", "yes", "1", "default",
                    "pretrained", "timm-imagenet", "torchvision"}


class PretrainedMismatch(UserError, ValueError):
    """A --pretrained file that does not fit the chosen architecture."""


class PretrainedUnavailable(UserError, FileNotFoundError):
    """--pretrained weights that are not on disk and cannot be fetched; the message says how to provide them."""


@dataclass
class Weights:
    """Weights found for a --pretrained source, on local disk."""

    path: Path                  # the file (inside the hub cache for fetched weights)
    label: str                  # how messages name them (the --pretrained value)
    arch: str | None = None     # the timm model they declare (hub config, timm registry); None: a plain file
    mean: tuple[float, ...] | None = None   # their normalisation, where their config gives it
    std: tuple[float, ...] | None = None
    model_args: dict = field(default_factory=dict)   # timm.create_model arguments from the hub config


def find_weights(source: str | os.PathLike, arch: str) -> Weights:
    """Return the local weights ``--pretrained source`` means for the timm model ``arch`` (tag allowed).

    Raises PretrainedUnavailable (no such file, not cached while offline, hub unreachable, no weights in
    timm's registry) or PretrainedMismatch (a hub repo that is not a timm model).
    """
    text = str(source).strip()
    if text == TIMM_SOURCE:
        return _timm_weights(arch)
    if text.startswith(HUB_PREFIX):
        return _hub_repo_weights(text)
    path = Path(text).expanduser()
    if path.is_file():
        return Weights(path, str(path))
    if path.is_dir():
        return _repo_weights(path / "config.json", lambda names: _file_in(path, names, text), text)
    raise PretrainedUnavailable(f"--pretrained {text}: no such file; {_source_hint(text)}")


def _source_hint(text: str) -> str:
    """A guess at what a --pretrained value that is no file meant."""
    if text.lower() in _KEYWORD_GUESSES:
        return f"did you mean --pretrained {TIMM_SOURCE} (the ImageNet weights timm names for --arch)?"
    for prefix in ("hf_hub:", "hf:", "hub:", "huggingface:", "hf-hub/"):
        if text.lower().startswith(prefix):
            return f"did you mean --pretrained {HUB_PREFIX}{text[len(prefix):]}?"
    weight_suffixes = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.lower().endswith(weight_suffixes):
        return f"if {text} is a Hugging Face hub repo, write --pretrained {HUB_PREFIX}{text}"
    return f"--pretrained takes {SOURCES}"


def _timm_weights(arch: str) -> Weights:
    """The weights timm's registry names for ``arch`` (its tag, or timm's default tag), fetched from the hub."""
    base, _ = timm.models.split_model_name_tag(arch)
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tagged = timm.list_pretrained(f"{base}.*")
        hint = f"tags with weights: {', '.join(tagged[:12])}" if tagged else "pick an --arch that has weights"
        raise PretrainedUnavailable(f"--pretrained {TIMM_SOURCE}: timm {timm.__version__} names no pretrained "
                                    f"weights for {arch}; {hint}")
    name = f"{base}.{cfg.tag}" if cfg.tag else base
    if not cfg.hf_hub_id:
        raise PretrainedUnavailable(f"--pretrained {TIMM_SOURCE}: timm has {name}'s weights only at {cfg.url}, not on "
                                    f"the Hugging Face hub; download them and pass --pretrained /path/to/file")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    label = f"{TIMM_SOURCE} ({name}, {HUB_PREFIX}{cfg.hf_hub_id})"
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
    path = hub_file(repo, files, revision or None, label)
    return Weights(path, label, arch=arch, mean=tuple(cfg.mean), std=tuple(cfg.std))


def _hub_repo_weights(text: str) -> Weights:
    """The weights and config of the timm model repo ``hf-hub:ORG/NAME[@REV]``."""
    repo, _, revision = text[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PretrainedUnavailable(f"--pretrained {text}: expected {HUB_PREFIX}ORG/NAME, a timm model repo on the "
                                    f"Hugging Face hub (e.g. {HUB_PREFIX}timm/resnet50.a1_in1k)")
    config = hub_file(repo, ("config.json",), revision or None, text)
    return _repo_weights(config, lambda files: hub_file(repo, files, revision or None, text), text)


def _file_in(folder: Path, names: tuple[str, ...], label: str) -> Path:
    """The first of ``names`` in a local repo folder; PretrainedUnavailable when none is there."""
    found = [folder / name for name in names if (folder / name).is_file()]
    if not found:
        raise PretrainedUnavailable(f"--pretrained {label}: a folder without {' or '.join(names)}; a timm model "
                                    f"repo holds config.json and its weights")
    return found[0]


def _repo_weights(config: Path, weights_file: Callable[[tuple[str, ...]], Path], label: str) -> Weights:
    """Weights of a timm model repo from its ``config.json``; ``weights_file(names)`` finds the first of names."""
    if not config.is_file():
        raise PretrainedUnavailable(f"--pretrained {label}: a folder without config.json; a timm model repo holds "
                                    f"config.json and {' or '.join(HUB_WEIGHT_FILES)}")
    architecture, model_args, cfg = read_repo_config(config, label)
    if not timm.is_model(architecture):
        raise PretrainedMismatch(f"--pretrained {label} holds {architecture!r}, a model timm {timm.__version__} "
                                 f"does not know (a newer timm?)")
    weights = weights_file((cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HUB_WEIGHT_FILES)
    model_args = {k: v for k, v in model_args.items() if k not in ("num_classes", "global_pool")}
    registry = timm.get_pretrained_cfg(architecture)
    mean = cfg.get("mean") or (registry.mean if registry else None)
    std = cfg.get("std") or (registry.std if registry else None)
    return Weights(weights, label, arch=architecture, mean=tuple(mean) if mean else None,
                   std=tuple(std) if std else None, model_args=model_args)


def read_repo_config(path: Path, label: str) -> tuple[str, dict, dict]:
    """(architecture, model_args, pretrained_cfg) of a timm model repo's ``config.json``.

    timm has no public reader of a local repo's config, so this one reads the file timm's
    ``timm.models.save_for_hf`` writes: ``{"architecture", "num_classes", "num_features", "model_args"
    (optional), "pretrained_cfg": {"mean", "std", "hf_hub_filename", ...}}``; older repos hold one flat
    dict (the pretrained config with its "architecture"). tests/test_backbones_pretrained.py checks it
    against the installed timm's writer.
    Raises PretrainedMismatch naming the file when it is not such a config.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:   # ValueError: bad JSON or bad UTF-8
        raise PretrainedMismatch(f"--pretrained {label}: {path.name} is not a timm model config "
                                 f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise PretrainedMismatch(f"--pretrained {label}: {path.name} is not a timm model config (no \"architecture\" "
                                 f"name)")
    pretrained_cfg = config.get("pretrained_cfg", config)
    model_args = config.get("model_args") or {}
    if not isinstance(pretrained_cfg, dict) or not isinstance(model_args, dict):
        raise PretrainedMismatch(f"--pretrained {label}: {path.name} is not a timm model config (\"pretrained_cfg\" "
                                 f"and \"model_args\" must be objects)")
    return config["architecture"], dict(model_args), pretrained_cfg


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or (
        os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None)
    return os.path.expanduser(os.path.expandvars(folder)) if folder else constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks huggingface_hub never to touch the network."""
    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


def hub_file(repo: str, filenames: tuple[str, ...], revision: str | None, label: str) -> Path:
    """Return the local path of the first of ``filenames`` the hub repo has: from the cache, else fetched.

    Raises PretrainedUnavailable when offline and uncached, when the hub cannot be reached (one probe,
    no retries), when the repo does not exist, or when it holds none of ``filenames``.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    cache, endpoint = hub_cache_dir(), os.environ.get("HF_ENDPOINT") or None
    for name in filenames:  # the cache first: no network at all when the files are there
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache, local_files_only=True))
        except Exception:  # noqa: BLE001 - not (fully) cached: fetch below
            pass
    if hub_offline():
        raise _unavailable(label, repo, filenames[0], "HF_HUB_OFFLINE is set", cache)
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    for name in filenames:
        try:
            get_hf_file_metadata(hf_hub_url(repo, name, revision=revision, endpoint=endpoint), timeout=timeout)
        except RemoteEntryNotFoundError:
            continue
        except RevisionNotFoundError as exc:
            raise PretrainedUnavailable(f"--pretrained {label}: {repo} has no revision {revision!r}") from exc
        except RepositoryNotFoundError as exc:
            raise PretrainedUnavailable(f"--pretrained {label}: no repository {repo} on the Hugging Face hub, or it "
                                        f"is private or gated (log in with `hf auth login`)") from exc
        except Exception as exc:  # noqa: BLE001 - network, proxy, server: all mean "cannot fetch now"
            raise _unavailable(label, repo, name, _reason(exc), cache) from exc
        try:
            with _progress_only_on_terminal():
                return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache, endpoint=endpoint,
                                            etag_timeout=timeout))
        except Exception as exc:  # noqa: BLE001
            raise _unavailable(label, repo, name, _reason(exc), cache) from exc
    raise PretrainedUnavailable(f"--pretrained {label}: {repo} holds none of {', '.join(filenames)}; "
                                f"not a timm model repo?")


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def _unavailable(label: str, repo: str, filename: str, reason: str, cache: str) -> PretrainedUnavailable:
    return PretrainedUnavailable(
        f"--pretrained {label}: cannot fetch {repo}/{filename} from the Hugging Face hub ({reason}) and it is not "
        f"in the cache {cache}; offline, pass a local file (--pretrained /path/to/file.safetensors), or fill a "
        f"cache where there is a network (HF_HOME=DIR hf download {repo}), copy DIR here and set HF_HOME=DIR "
        f"HF_HUB_OFFLINE=1")


@contextmanager
def _progress_only_on_terminal():
    """huggingface_hub's download bars while stderr is a terminal; none when piped."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    if sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()

"""Run-folder files: weights, config, resumable training state, the JSON-lines log and loss plot.

    RUN_DIR/model.safetensors    best weights by held-out mAP@k (EMA weights when EMA is on)
    RUN_DIR/config.json          how to rebuild the model + split hash, classes, epoch, metrics
    RUN_DIR/split.json           the held-out split used
    RUN_DIR/last/model.safetensors, RUN_DIR/last/train_state.pt   resumable state (end of last epoch;
                                 what train_state.pt holds: backbones/run_state.py)
    RUN_DIR/log.jsonl, RUN_DIR/loss.png
All writes are atomic (competition.fileio).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from backbones.model import RetrievalNet, model_from_spec
from competition.cli import UserError
from competition.fileio import atomic_path, atomic_write_json, atomic_write_text
from rerank import resolve_device

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
LOG_FILE = "log.jsonl"
LAST_DIR = "last"


def is_run(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds a run's config and weights (not verified further)."""
    run_dir = Path(run_dir)
    return (run_dir / CONFIG_FILE).is_file() and (run_dir / WEIGHTS_FILE).is_file()


def run_files(run_dir: str | os.PathLike) -> dict[str, Path]:
    """``{file name: path}`` of what a run hands on to an ensemble (weights and config)."""
    run_dir = Path(run_dir)
    return {WEIGHTS_FILE: run_dir / WEIGHTS_FILE, CONFIG_FILE: run_dir / CONFIG_FILE}


def split_path(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps the held-out split it trained on."""
    return Path(run_dir) / SPLIT_FILE


def read_config(run_dir: str | os.PathLike) -> dict:
    """Return RUN_DIR/config.json; ``FileNotFoundError`` / ``ValueError`` name the run and the file."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir}: not a training run ({name} missing)")
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{run_dir / CONFIG_FILE}: not valid JSON ({exc})") from exc


def load_run(run_dir: str | os.PathLike, device: str = "auto") -> tuple[RetrievalNet, dict]:
    """Rebuild a run's model from its config and weights; returns (model in eval mode, config).

    The weights are channels-last (convnets run faster so on the CPU and with AMP on GPUs); extraction
    reads the layout off them (``backbones.model.input_memory_format``)."""
    config = read_config(run_dir)
    model = model_from_spec(config["model"])
    model.load_state_dict(load_weights(Path(run_dir) / WEIGHTS_FILE), strict=True)
    return model.to(resolve_device(device), memory_format=torch.channels_last).eval(), config


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors, atomically (tensors copied to contiguous CPU memory)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def rng_state() -> dict:
    """torch (CPU) / numpy / python RNG states as tensors and plain types (weights_only-loadable).

    CUDA generators are left out: training reseeds them at every epoch's start (``torch.manual_seed``),
    and a run may resume on fewer GPUs than it was saved on.
    """
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s generators; CUDA states that older runs saved (``"cuda"``) are ignored."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_last(run_dir: Path, net_state: dict[str, torch.Tensor], train_state: dict) -> None:
    """Write RUN_DIR/last/{model.safetensors,train_state.pt}; train_state last, so it marks completion."""
    last = run_dir / LAST_DIR
    save_weights(last / "model.safetensors", net_state)
    with atomic_path(last / "train_state.pt") as tmp:
        torch.save(train_state, tmp)


def can_resume(run_dir: str | os.PathLike) -> bool:
    """True when RUN_DIR/last holds a completed end-of-epoch state."""
    return (Path(run_dir) / LAST_DIR / "train_state.pt").is_file()


def load_last(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Return (network state, train state) from RUN_DIR/last, or None when there is none."""
    last = run_dir / LAST_DIR
    if not can_resume(run_dir):
        return None
    state = torch.load(last / "train_state.pt", map_location="cpu", weights_only=True)
    return load_weights(last / "model.safetensors"), state


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def write_log(run_dir: Path, rows: list[dict], k: int = 1000, title: str | None = None) -> None:
    """Rewrite RUN_DIR/log.jsonl (one JSON object per epoch) and RUN_DIR/loss.png, titled ``title``
    (default: the run folder's name, with the config's arch when it differs)."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    plot_loss(run_dir / "loss.png", rows, k, title or _run_title(run_dir))


def _run_title(run_dir: Path) -> str:
    """The run folder's name, plus ``(arch)`` from its config.json when readable and different."""
    try:
        arch = json.loads((run_dir / CONFIG_FILE).read_text()).get("arch")
    except (OSError, ValueError, AttributeError):
        arch = None
    return f"{run_dir.name} ({arch})" if arch and arch != run_dir.name else run_dir.name


def plot_loss(path: Path, rows: list[dict], k: int = 1000, title: str | None = None) -> None:
    """Save ``loss_figure(rows, k, title)`` as a PNG at ``path``."""
    fig = loss_figure(rows, k, title)
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)


def loss_figure(rows: list[dict], k: int = 1000, title: str | None = None):
    """Matplotlib figure of a run's log ``rows``: training loss per epoch on its own axis (from 0),
    and, when any row holds ``val``, held-out mAP@k (and Recall@1) per epoch in a second panel
    beside it on a fixed 0-1 axis, so that noise does not look like learning. ``title``: the member."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trained = [(r["epoch"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["epoch"], r["val"]) for r in rows if r.get("val")]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10.5 if val else 5.5, 3.8), squeeze=False,
                             sharex=True, layout="constrained")
    ax = axes[0, 0]
    if trained:
        ax.plot(*zip(*trained), "o-", color="tab:blue")
        ax.set_ylim(bottom=min(0.0, min(loss for _, loss in trained)))
    else:
        ax.text(0.5, 0.5, "no training epoch yet", transform=ax.transAxes, ha="center", va="center")
    ax.set(title="training loss (mean per batch)", xlabel="epoch", ylabel="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if val:
        ax2 = axes[0, 1]
        epochs = [e for e, _ in val]
        maps = [v[f"mAP@{k}"] for _, v in val]
        ax2.plot(epochs, maps, "s-", color="tab:green", label=f"mAP@{k}")
        if all("Recall@1" in v for _, v in val):
            ax2.plot(epochs, [v["Recall@1"] for _, v in val], "^--", color="tab:orange", label="Recall@1")
        best = max(range(len(maps)), key=maps.__getitem__)
        ax2.annotate(f"best {maps[best]:.4f}", (epochs[best], maps[best]), textcoords="offset points",
                     xytext=(0, 8), ha="center", fontsize=8, color="tab:green")
        ax2.set(title="held-out retrieval", xlabel="epoch", ylabel="score", ylim=(0.0, 1.0))
        ax2.grid(alpha=0.3)
        ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    epochs_all = [e for e, _ in trained + val] or [0]
    ax.set_xlim(min(epochs_all) - 0.5, max(max(epochs_all), min(epochs_all) + 1) + 0.5)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def write_config(run_dir: Path, config: dict) -> None:
    atomic_write_json(run_dir / CONFIG_FILE, config)

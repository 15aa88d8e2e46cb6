"""The retrieval network: a timm body, GeM pooling, a neck, L2-normalised output.

    body (timm feature map, B x C x H x W) -> GeM (learnable p) -> Linear -> BatchNorm1d -> L2 norm

``resolve_arch`` maps short family names (``efficientnet``, ``resnet``, ...) to timm
names; ``load_pretrained`` reads a local safetensors / .pth file into the body.
Nothing is ever downloaded: bodies are always created with ``pretrained=False``.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from competition.cli import UserError

# Short family names -> a representative timm model. Full timm names pass through.
ARCH_ALIASES: dict[str, str] = {
    "efficientnet": "efficientnet_b0",
    "efficientnetv2": "efficientnetv2_rw_s",
    "resnet": "resnet50",
    "resnext": "resnext50_32x4d",
    "seresnext": "seresnext50_32x4d",
    "convnext": "convnext_tiny",
    "regnet": "regnety_008",
    "mobilenet": "mobilenetv3_large_100",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv2": "mobilenetv2_100",
    "densenet": "densenet121",
    "inception": "inception_v3",
    "vit": "vit_small_patch16_224",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedMismatch(UserError, ValueError):
    """A --pretrained file that does not fit the chosen architecture."""


class ArchError(UserError, ValueError):
    """An --arch that is neither a family name nor a timm model."""


def resolve_arch(name: str) -> str:
    """Return the timm model name for ``name`` (an alias or a timm name).

    Raises ValueError listing close timm names when ``name`` is unknown.
    """
    key = name.strip()
    if key.lower() in ARCH_ALIASES:
        return ARCH_ALIASES[key.lower()]
    if timm.is_model(key):
        return key
    close = timm.list_models(f"*{key.lower()}*")
    if not close:
        close = difflib.get_close_matches(key.lower(), timm.list_models(), n=10, cutoff=0.6)
    hint = ", ".join(close[:20]) + (" ..." if len(close) > 20 else "") if close else "none"
    raise ArchError(f"unknown architecture {name!r}: not a family name ({', '.join(sorted(ARCH_ALIASES))}) "
                     f"nor a timm model; close timm names: {hint}")


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p: (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0).to(torch.float32)
        x = x.float().clamp(min=self.eps).pow(p)
        return x.mean(dim=(-2, -1)).pow(1.0 / p)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a RetrievalNet (stored in a run's config.json)."""

    arch: str                      # resolved timm name
    embedding_dim: int = 512
    gem_p: float = 3.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class RetrievalNet(nn.Module):
    """timm body + GeM + Linear/BatchNorm1d neck; ``forward`` returns (B, embedding_dim) unit vectors."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.body = timm.create_model(spec.arch, pretrained=False, num_classes=0, global_pool="")
        self.in_features = int(self.body.num_features)
        self.gem = GeM(spec.gem_p)
        self.fc = nn.Linear(self.in_features, spec.embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(spec.embedding_dim)
        self.embedding_dim = spec.embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Body feature map (B, C, H, W); token outputs (B, N, C) become (B, C, N, 1)."""
        f = self.body.forward_features(x)
        if f.ndim == 3:
            f = f.transpose(1, 2).unsqueeze(-1)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised embeddings, shape (B, embedding_dim), float32."""
        pooled = self.gem(self.features(x))
        emb = self.bn(self.fc(pooled).float())
        return F.normalize(emb, dim=1)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return (body parameters, neck parameters incl. GeM p)."""
        body = list(self.body.parameters())
        ids = {id(p) for p in body}
        return body, [p for p in self.parameters() if id(p) not in ids]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch (.pth/.pt) state dict; unwrap common containers."""
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a weights file"
        raise PretrainedMismatch(f"--pretrained {path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedMismatch(f"--pretrained {path}: not a state dict of tensors")
    for prefix in ("module.", "body."):
        if sd and all(k.startswith(prefix) for k in sd if not k.startswith(("gem.", "fc.", "bn."))):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_pretrained(model: RetrievalNet, path: str | os.PathLike) -> str:
    """Load local weights into ``model.body``; classifier keys are dropped.

    Returns a one-line report (tensors loaded, missing/unexpected counts).
    Raises PretrainedMismatch naming the file when shapes disagree or too little matches.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    clf = model.body.pretrained_cfg.get("classifier", "classifier")
    clf_prefixes = tuple({f"{c}." for c in ([clf] if isinstance(clf, str) else list(clf))} | {"classifier."})
    dropped = [k for k in sd if k.startswith(clf_prefixes)]
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    own = model.body.state_dict()
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    matched = [k for k in sd if k in own and own[k].shape == sd[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    arch = model.spec.arch
    if bad_shapes or not matched or len(missing) > 0.1 * len(own):
        detail = (f"{len(bad_shapes)} shape mismatches (e.g. {bad_shapes[:2]}), " if bad_shapes else "") + \
            f"{len(matched)} of {len(own)} tensors match, {len(missing)} missing (e.g. {missing[:3]}), " \
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        raise PretrainedMismatch(f"--pretrained {path} does not fit {arch}: {detail}")
    model.body.load_state_dict({k: sd[k] for k in matched}, strict=False)
    return (f"loaded {len(matched)} tensors from {path} into {arch} body "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(dropped)} classifier keys dropped)")


def build_model(arch: str, embedding_dim: int = 512, pretrained: str | os.PathLike | None = None,
                gem_p: float = 3.0, announce: bool = True) -> RetrievalNet:
    """Create a RetrievalNet for ``arch`` (alias or timm name), optionally loading local weights."""
    name = resolve_arch(arch)
    probe_cfg = timm.get_pretrained_cfg(name)
    mean = tuple(getattr(probe_cfg, "mean", IMAGENET_MEAN) or IMAGENET_MEAN) if probe_cfg else IMAGENET_MEAN
    std = tuple(getattr(probe_cfg, "std", IMAGENET_STD) or IMAGENET_STD) if probe_cfg else IMAGENET_STD
    model = RetrievalNet(ModelSpec(arch=name, embedding_dim=embedding_dim, gem_p=gem_p, mean=mean, std=std))
    if pretrained:
        msg = load_pretrained(model, pretrained)
    else:
        msg = f"no --pretrained weights: training {name} from random initialisation"
    if announce:
        print(msg, flush=True)
    return model


def model_from_spec(spec: dict) -> RetrievalNet:
    """Rebuild an (untrained) RetrievalNet from ``ModelSpec.to_dict()`` output."""
    return RetrievalNet(ModelSpec(arch=spec["arch"], embedding_dim=int(spec["embedding_dim"]),
                                  gem_p=float(spec.get("gem_p", 3.0)),
                                  mean=tuple(spec.get("mean", IMAGENET_MEAN)),
                                  std=tuple(spec.get("std", IMAGENET_STD))))

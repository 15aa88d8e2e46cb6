"""The retrieval network: a timm body, GeM pooling, a neck, L2-normalised output.

    body (timm feature map, B x C x H x W) -> GeM (learnable p) -> Linear -> BatchNorm1d -> L2 norm

``resolve_arch`` maps short family names (``efficientnet``, ``efficientnet-lite``, ``resnet``, ...) to
timm names; ``build_model`` creates the net and loads ``--pretrained`` weights (a local file, ``timm``
or ``hf-hub:ORG/NAME``: see ``backbones.pretrained``) into the body with ``load_pretrained``, which
checks that they fit. Bodies are created with ``pretrained=False``: nothing is fetched unless asked.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.pretrained import PretrainedMismatch, PretrainedUnavailable, Weights, find_weights
from competition.cli import UserError

log = logging.getLogger(__name__)

__all__ = ["ARCH_ALIASES", "ArchError", "GeM", "ModelSpec", "PretrainedMismatch", "PretrainedUnavailable",
           "RetrievalNet", "build_model", "input_memory_format", "load_pretrained", "model_from_spec", "resolve_arch"]

# Short family names -> a representative timm model ("-" reads as "_"). Full timm names pass through;
# a family name also accepts weights that name another member of the family (see ``build_model``).
ARCH_ALIASES: dict[str, str] = {
    "efficientnet": "efficientnet_b0",
    "efficientnet_lite": "tf_efficientnet_lite0",
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


class ArchError(UserError, ValueError):
    """An --arch that is neither a family name nor a timm model."""


def _family(name: str) -> str | None:
    """The ARCH_ALIASES key ``name`` spells (case and "-" ignored), or None for any other name."""
    key = name.strip().lower().replace("-", "_")
    return key if key in ARCH_ALIASES else None


def resolve_arch(name: str) -> str:
    """Return the timm model name for ``name`` (an alias, or a timm name with an optional pretrained tag).

    Raises ArchError listing close timm names when ``name`` is unknown, or timm's tags for a wrong tag.
    """
    key = name.strip()
    if _family(key):
        return ARCH_ALIASES[_family(key)]
    if timm.is_model(key):
        base, tag = timm.models.split_model_name_tag(key)
        try:
            timm.get_pretrained_cfg(key)
        except RuntimeError:
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*")]
            raise ArchError(f"unknown architecture {name!r}: timm has no pretrained tag {tag!r} for {base}; "
                            f"its tags: {', '.join(tags) or 'none'}") from None
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
    mean: tuple[float, float, float] = IMAGENET_MEAN   # the normalisation of the initial weights
    std: tuple[float, float, float] = IMAGENET_STD
    model_args: dict = field(default_factory=dict)     # extra timm.create_model arguments (hub configs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class RetrievalNet(nn.Module):
    """timm body + GeM + Linear/BatchNorm1d neck; ``forward`` returns (B, embedding_dim) unit vectors.

    ``spec.embedding_dim`` 0 means no neck: the descriptor is the GeM-pooled body feature itself
    (the network off the shelf), and ``embedding_dim`` is the body's feature width.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.body = timm.create_model(spec.arch, pretrained=False, **{**spec.model_args, "num_classes": 0,
                                                                      "global_pool": ""})
        self.in_features = int(self.body.num_features)
        self.gem = GeM(spec.gem_p)
        if spec.embedding_dim:
            self.fc = nn.Linear(self.in_features, spec.embedding_dim, bias=False)
            self.bn = nn.BatchNorm1d(spec.embedding_dim)
        else:
            self.fc, self.bn = nn.Identity(), nn.Identity()
        self.embedding_dim = spec.embedding_dim or self.in_features

    @property
    def has_neck(self) -> bool:
        return isinstance(self.fc, nn.Linear)

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


def input_memory_format(model: nn.Module) -> torch.memory_format:
    """The layout image batches for ``model`` should have: ``torch.channels_last`` when its convolution
    weights are stored channels-last (``model.to(memory_format=torch.channels_last)``), else
    ``torch.contiguous_format``.

    The first 4-d weight with several input channels and a spatial extent decides: for the others (1 x 1
    or depthwise kernels) both layouts are the same strides.
    """
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            channels_last = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def _read_state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch (.pth/.pt/.bin) state dict; unwrap common containers."""
    if not path.is_file():
        raise PretrainedUnavailable(f"--pretrained {label}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a weights file"
        raise PretrainedMismatch(f"--pretrained {label}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedMismatch(f"--pretrained {label}: not a state dict of tensors")
    for prefix in ("module.", "body."):
        if sd and all(k.startswith(prefix) for k in sd if not k.startswith(("gem.", "fc.", "bn."))):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_pretrained(model: RetrievalNet, path: str | os.PathLike, label: str | None = None) -> str:
    """Load a local weights file into ``model.body``; classifier keys are dropped.

    ``label`` names the weights in messages (default: the path). Returns a one-line report (tensors
    loaded, missing/unexpected counts). Raises PretrainedMismatch naming them when shapes disagree or
    too little matches.
    """
    path = Path(path)
    label = label or str(path)
    sd = _read_state_dict(path, label)
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
        raise PretrainedMismatch(f"--pretrained {label} does not fit {arch}: {detail}")
    model.body.load_state_dict({k: sd[k] for k in matched}, strict=False)
    return (f"loaded {len(matched)} tensors from {label} into {arch} body "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(dropped)} classifier keys dropped)")


def build_model(arch: str, embedding_dim: int = 512, pretrained: str | os.PathLike | None = None,
                gem_p: float = 3.0, announce: bool = True) -> RetrievalNet:
    """Create a RetrievalNet for ``arch`` (family or timm name, tag allowed), its body from ``pretrained``.

    ``pretrained``: None (random weights), a local file, ``"timm"`` or ``"hf-hub:ORG/NAME"`` (see
    ``backbones.pretrained``); the spec's mean/std are those of the weights loaded. A family name
    (``efficientnet``) takes the member the weights declare or are named after. With ``announce``,
    logs one line saying what was loaded (and a warning when a tagged ``arch`` gets no weights).
    Raises ArchError, PretrainedUnavailable or PretrainedMismatch.
    """
    name = resolve_arch(arch)
    if pretrained:
        model, msg = _model_with_weights(arch, name, find_weights(pretrained, name), embedding_dim, gem_p)
    else:
        model = _new_model(name, embedding_dim, gem_p)
        msg = f"no --pretrained weights: training {name} from random initialisation"
        tag = timm.models.split_model_name_tag(name)[1]
        if tag and announce:
            log.warning("--arch %s names timm's %s weights, but without --pretrained %s trains from random weights; "
                        "add --pretrained timm to start from them", arch, tag, name)
    if announce:
        log.info("%s", msg)
    return model


def _new_model(name: str, embedding_dim: int, gem_p: float, weights: Weights | None = None) -> RetrievalNet:
    """An untrained RetrievalNet; mean/std from the weights' config, else timm's config for ``name``."""
    cfg = timm.get_pretrained_cfg(name)
    mean = (weights and weights.mean) or (cfg and cfg.mean) or IMAGENET_MEAN
    std = (weights and weights.std) or (cfg and cfg.std) or IMAGENET_STD
    return RetrievalNet(ModelSpec(arch=name, embedding_dim=embedding_dim, gem_p=gem_p, mean=tuple(mean),
                                  std=tuple(std), model_args=dict(weights.model_args) if weights else {}))


def _model_with_weights(arch: str, name: str, weights: Weights, embedding_dim: int,
                        gem_p: float) -> tuple[RetrievalNet, str]:
    """Return (a RetrievalNet with ``weights`` in its body, the report line).

    Weights that declare their model (hub, timm) must be of ``name``'s model, or of its family when
    ``arch`` is a family name; a local file that does not fit but is named after a family member
    (``tf_efficientnet_lite0.safetensors`` for ``efficientnet``) goes into that member.
    """
    declared = weights.arch or _model_named_by(weights.path)
    member = declared if declared and _family(arch) and _family(arch) in declared.lower() else None
    if weights.arch:
        if _untagged(weights.arch) != _untagged(name) and member is None:
            raise PretrainedMismatch(f"--pretrained {weights.label} holds {weights.arch} weights, not {name} "
                                     f"(--arch {arch}): use --arch {weights.arch}")
        name = weights.arch
    model = _new_model(name, embedding_dim, gem_p, weights)
    try:
        return model, load_pretrained(model, weights.path, weights.label)
    except PretrainedMismatch as exc:
        if weights.arch or declared is None or _untagged(declared) == _untagged(name):
            raise
        if member is None:
            raise PretrainedMismatch(f"{exc}; the file's name says {declared}: try --arch {declared}") from None
        model = _new_model(member, embedding_dim, gem_p, weights)
        try:
            msg = load_pretrained(model, weights.path, weights.label)
        except PretrainedMismatch:
            raise exc from None
        return model, f"{msg} (--arch {arch} is a family: {member} is the member the file is named after)"


def _untagged(name: str) -> str:
    return timm.models.split_model_name_tag(name)[0]


def _model_named_by(path: Path) -> str | None:
    """The timm model (tag allowed) a weights file is named after (``resnet10t.c3_in1k.pth``), or None."""
    stem = path.name
    while Path(stem).suffix.lower() in (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt"):
        stem = Path(stem).stem
    if _family(stem) or not timm.is_model(stem):
        return None
    try:
        return resolve_arch(stem)
    except ArchError:
        return None


def model_from_spec(spec: dict) -> RetrievalNet:
    """Rebuild an (untrained) RetrievalNet from ``ModelSpec.to_dict()`` output.

    The architecture must be a plain timm model name: a run or bundle from a stranger cannot
    make timm reach the network (``hf-hub:``) or read another folder (``local-dir:``).
    """
    arch = str(spec.get("arch", ""))
    if ":" in arch or not timm.is_model(arch):
        raise ArchError(f"model spec names architecture {arch!r}, which is not a timm model name")
    return RetrievalNet(ModelSpec(arch=spec["arch"], embedding_dim=int(spec["embedding_dim"]),
                                  gem_p=float(spec.get("gem_p", 3.0)),
                                  mean=tuple(spec.get("mean", IMAGENET_MEAN)),
                                  std=tuple(spec.get("std", IMAGENET_STD)),
                                  model_args=dict(spec.get("model_args") or {})))

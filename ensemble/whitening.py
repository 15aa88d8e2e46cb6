"""PCA-whitening learned on train-class descriptors.

x -> L2norm( diag((lambda + shrinkage * mean(lambda)) ** (-power / 2)) · U^T (x - mu) )
with U, lambda the top ``dim`` eigenvectors and eigenvalues of the training covariance.
power = 0 is a plain PCA rotation/projection, power = 1 full whitening; the shrinkage
keeps tiny eigenvalues from blowing up noise directions.

The fit needs only the train descriptors' mean and covariance (``train_moments``, then
``whitening_from_moments``): a tuner that tries many member weights keeps the moments of the
unweighted concatenation and scales them, since weighting member m by sqrt(w_m) scales its
rows and columns of the covariance by sqrt(w_m).

The fit (``Whitening``: mean, components, eigenvalues, shrinkage) is what a bundle stores; the
power and the kept dimension are applied at ``apply`` time (``PostProcessing.whiten_power`` and
``whiten_dim`` say which), so a tuner tries several without refitting. Bundles written when the
fit also stored a power still load: that stored value is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ensemble.combine import l2_normalize


def _check_power(power: float) -> float:
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must be in [0, 1], got {power}")
    return float(power)


@dataclass
class Whitening:
    """A fitted PCA: ``mean`` (d,), ``components`` (d, dim), ``eigenvalues`` (dim,), ``shrinkage``."""

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    shrinkage: float = 0.0

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    def projection(self, power: float = 1.0, dim: int | None = None) -> np.ndarray:
        """Return the (d, dim) float32 matrix that maps centred descriptors to whitened ones."""
        dim = self.dim if dim is None else min(dim, self.dim)
        lam = self.eigenvalues[:dim] + self.shrinkage * float(self.eigenvalues.mean())
        scale = np.power(np.maximum(lam, 1e-12), -_check_power(power) / 2.0)
        return (self.components[:, :dim] * scale[None, :]).astype(np.float32)

    def apply(self, desc: np.ndarray, normalize: bool = True, power: float = 1.0,
              dim: int | None = None) -> np.ndarray:
        """Return whitened (n, dim) float32 descriptors (unit rows unless ``normalize=False``).

        ``power`` in [0, 1] (1: full whitening); ``dim`` keeps the leading components (at most
        the fitted ones). Computed as x P - mu P: no centred copy of ``desc``.
        """
        desc = np.asarray(desc, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[1] != self.mean.shape[0]:
            raise ValueError(f"whitening fitted on d={self.mean.shape[0]}, got descriptors of shape {desc.shape}")
        proj = self.projection(power, dim)
        out = desc @ proj
        out -= self.mean.astype(np.float32) @ proj
        return l2_normalize(out, copy=False) if normalize else out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "eigenvalues": self.eigenvalues.astype(np.float64),
            "shrinkage": np.array(self.shrinkage, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Whitening":
        """Inverse of :meth:`to_arrays` (a ``power`` array of older bundles is ignored)."""
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float32),
            components=np.asarray(arrays["components"], dtype=np.float32),
            eigenvalues=np.asarray(arrays["eigenvalues"], dtype=np.float64),
            shrinkage=float(arrays["shrinkage"]),
        )


def train_moments(parts: Sequence[np.ndarray], chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean (d,), covariance (d, d), n), float64, of the rows of ``parts`` laid side by side: (n, d_m)
    arrays whose columns concatenate to d. Two passes in row chunks: no float64 copy of every row."""
    n = len(parts[0])
    if any(len(p) != n for p in parts):
        raise ValueError(f"parts describe different numbers of rows: {[len(p) for p in parts]}")
    if n < 2:
        raise ValueError(f"need at least 2 training descriptors, got {n}")

    def rows(s: int) -> np.ndarray:
        x = np.concatenate([np.asarray(p[s:s + chunk], dtype=np.float64) for p in parts], axis=1)
        if not np.isfinite(x).all():
            raise ValueError("training descriptors contain NaN or inf")
        return x

    starts = range(0, n, chunk)
    mean = sum(rows(s).sum(axis=0) for s in starts) / n
    cov = np.zeros((len(mean), len(mean)))
    for s in starts:
        x = rows(s) - mean
        cov += x.T @ x
    return mean, cov / (n - 1), n


def whitening_from_moments(mean: np.ndarray, cov: np.ndarray, n: int, dim: int | None = None,
                           shrinkage: float = 0.0) -> Whitening:
    """The PCA-whitening of train-class descriptors with this mean (d,), covariance (d, d) and count n;
    ``dim`` defaults to min(n - 1, d)."""
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    d = len(mean)
    max_dim = min(n - 1, d)
    dim = max_dim if dim is None else int(dim)
    if not 1 <= dim <= max_dim:
        raise ValueError(f"dim must be in [1, {max_dim}] for {n} descriptors of d={d}, got {dim}")
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1][:dim]
    eigenvalues = np.maximum(eigenvalues[order], 0.0)
    components = eigenvectors[:, order]
    # fix the sign so a refit on the same data gives the same arrays
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(dim)])
    components = components * np.where(signs == 0, 1.0, signs)[None, :]
    return Whitening(np.asarray(mean, np.float32), components.astype(np.float32), eigenvalues, shrinkage)


def fit_whitening(train_desc: np.ndarray, dim: int | None = None, shrinkage: float = 0.0) -> Whitening:
    """Fit PCA-whitening on (n, d) train-class descriptors; ``dim`` defaults to min(n - 1, d)."""
    x = np.asarray(train_desc)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 training descriptors of shape (n, d), got {x.shape}")
    return whitening_from_moments(*train_moments([x]), dim=dim, shrinkage=shrinkage)

"""Out-of-distribution distance of scored items from a reward model's training data.

The statistic is the Mahalanobis distance of an item's pooled representation (the masked mean of
the reward model's last hidden layer) under a probabilistic PCA model of the training set's pooled
representations (Tipping and Bishop, 1999). With mean μ, the top k principal directions u_i with
variances λ_i, and σ² the mean variance of the remaining H − k directions, the covariance is
modelled as C = Σ_i λ_i u_i u_iᵀ + σ² (I − Σ_i u_i u_iᵀ) and

    d(x)² = Σ_i (u_i · (x − μ))² / λ_i + ‖r‖² / σ²,   r = (x − μ) − Σ_i (u_i · (x − μ)) u_i.

Storing k directions instead of the full H × H covariance keeps the summary small enough for the
model's metadata file (k × H float32 values). The σ² term still catches items that move in
directions the top components miss. For Gaussian data d² follows a χ² law with H degrees of
freedom, so in-distribution distances sit near √H (about 20 for a 384-wide encoder).

The flag threshold is a percentile (99th by default) of the distances of held-out in-distribution
items, so about 1 % of in-distribution items are flagged by design.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Hidden-state layer whose masked mean is the pooled representation (-1 is the last layer).
OOD_LAYER = -1
# 64 directions of a 768-wide model take 196 KB of float32 in the metadata file.
DEFAULT_COMPONENTS = 64
DEFAULT_PERCENTILE = 99.0
# Training sequences summarised; a random sample of this size keeps the extra pass over the
# training set to a few seconds for MiniLM-sized models.
MAX_REFERENCE_SEQUENCES = 512
# Variances below this share of the mean variance per dimension are raised to it, so a direction
# the reference sample does not vary in (a sample has rank at most n − 1) cannot divide by ~0.
VARIANCE_FLOOR = 1e-3
STATISTIC = "ppca_mahalanobis"


def _encode_array(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(data.shape), "base64": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode_array(value: dict[str, Any]) -> np.ndarray:
    if value.get("dtype") != "float32":
        raise ValueError(f"OOD summary array has dtype {value.get('dtype')!r}; expected 'float32'")
    raw = base64.b64decode(value["base64"])
    return np.frombuffer(raw, dtype="<f4").reshape(value["shape"]).astype(np.float64)


@dataclass
class OodSummary:
    """Probabilistic PCA summary of reference representations and the distance threshold of the flag."""

    mean: np.ndarray  # [H]
    components: np.ndarray  # [k, H], orthonormal rows
    variances: np.ndarray  # [k]
    residual_variance: float
    threshold: float
    percentile: float
    layer: int
    n_reference: int
    n_heldout: int

    @property
    def hidden_size(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        """Return the distance d(x) of each row of `pooled` [N, H]."""
        pooled = np.asarray(pooled, dtype=np.float64)
        if pooled.ndim != 2 or pooled.shape[1] != self.hidden_size:
            raise ValueError(
                f"pooled representations have shape {pooled.shape}; expected [N, {self.hidden_size}] for this OOD summary"
            )
        centered = pooled - self.mean
        projected = centered @ self.components.T
        explained = (projected**2 / self.variances).sum(axis=1)
        residual = np.maximum((centered**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        return np.sqrt(explained + residual / self.residual_variance)

    def to_dict(self) -> dict[str, Any]:
        """Render the summary for the metadata file; arrays are base64-encoded little-endian float32."""
        return {
            "statistic": STATISTIC,
            "layer": self.layer,
            "threshold": self.threshold,
            "percentile": self.percentile,
            "n_reference": self.n_reference,
            "n_heldout": self.n_heldout,
            "hidden_size": self.hidden_size,
            "components": int(self.components.shape[0]),
            "residual_variance": self.residual_variance,
            "mean": _encode_array(self.mean),
            "directions": _encode_array(self.components),
            "variances": _encode_array(self.variances),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OodSummary":
        if data.get("statistic") != STATISTIC:
            raise ValueError(f"unknown OOD statistic {data.get('statistic')!r}; this version reads {STATISTIC!r}")
        return cls(
            mean=_decode_array(data["mean"]),
            components=_decode_array(data["directions"]),
            variances=_decode_array(data["variances"]),
            residual_variance=float(data["residual_variance"]),
            threshold=float(data["threshold"]),
            percentile=float(data["percentile"]),
            layer=int(data["layer"]),
            n_reference=int(data["n_reference"]),
            n_heldout=int(data["n_heldout"]),
        )


def fit_ood_summary(
    reference: np.ndarray,
    heldout: np.ndarray,
    components: int = DEFAULT_COMPONENTS,
    percentile: float = DEFAULT_PERCENTILE,
    layer: int = OOD_LAYER,
) -> OodSummary:
    """Fit the PCA summary on `reference` [N, H] and set the threshold on `heldout` [M, H].

    k is `components`, lowered to N − 1 and H − 1 when the sample is smaller.
    """
    reference = np.asarray(reference, dtype=np.float64)
    heldout = np.asarray(heldout, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[0] < 2:
        raise ValueError(f"need at least 2 reference representations of shape [N, H]; got shape {reference.shape}")
    if heldout.ndim != 2 or heldout.shape[0] < 1 or heldout.shape[1] != reference.shape[1]:
        raise ValueError(f"held-out representations have shape {heldout.shape}; expected [M >= 1, {reference.shape[1]}]")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile}")

    n, hidden = reference.shape
    mean = reference.mean(axis=0)
    centered = reference - mean
    # Right singular vectors of the centred sample are the covariance's eigenvectors, and s²/(n−1)
    # its eigenvalues, without forming the H × H matrix.
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)
    eigenvalues = singular**2 / (n - 1)
    k = max(1, min(components, n - 1, hidden - 1))
    total = float((centered**2).sum() / (n - 1))
    floor = VARIANCE_FLOOR * max(total / hidden, np.finfo(np.float64).tiny)
    variances = np.maximum(eigenvalues[:k], floor)
    residual_variance = max((total - float(eigenvalues[:k].sum())) / (hidden - k), floor)

    summary = OodSummary(
        mean=mean,
        components=vt[:k],
        variances=variances,
        residual_variance=residual_variance,
        threshold=0.0,
        percentile=percentile,
        layer=layer,
        n_reference=n,
        n_heldout=int(heldout.shape[0]),
    )
    summary.threshold = float(np.percentile(summary.distances(heldout), percentile))
    return summary


def summarize_training_set(
    rm: Any,
    train_pairs: Sequence[Any],
    heldout_pairs: Sequence[Any],
    max_length: int,
    precision: str,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Score pooled representations of training and held-out pairs and return the summary as a dict.

    Uses the chosen and rejected responses of up to `MAX_REFERENCE_SEQUENCES / 2` random training
    pairs as the reference, and every held-out pair for the threshold. Returns None, with a warning,
    when either set is too small to fit.
    """
    from ml.scoring import score_pairs

    if len(train_pairs) < 2 or not heldout_pairs:
        logger.warning(
            "OOD summary skipped: %d training and %d held-out pairs; it needs at least 2 and 1",
            len(train_pairs),
            len(heldout_pairs),
        )
        return None
    rng = np.random.default_rng(seed)
    keep = min(len(train_pairs), MAX_REFERENCE_SEQUENCES // 2)
    sample = [train_pairs[i] for i in sorted(rng.choice(len(train_pairs), size=keep, replace=False))]

    def pooled(pairs: Sequence[Any], desc: str) -> np.ndarray:
        scores = score_pairs(rm, list(pairs), max_length=max_length, precision=precision, layers=[OOD_LAYER], desc=desc)
        return np.concatenate([scores.pooled_chosen[0], scores.pooled_rejected[0]])

    summary = fit_ood_summary(pooled(sample, "ood reference"), pooled(heldout_pairs, "ood threshold"))
    logger.info(
        "OOD summary: %d reference and %d held-out sequences, %d components, threshold %.3f at the %gth percentile",
        summary.n_reference,
        summary.n_heldout,
        summary.components.shape[0],
        summary.threshold,
        summary.percentile,
    )
    return summary.to_dict()


def load_ood_summary(metadata: dict[str, Any]) -> OodSummary | None:
    """Read the summary stored under "ood" in a model's metadata; None when the model has none."""
    data = metadata.get("ood")
    return OodSummary.from_dict(data) if data else None

"""Importance-scaled quantisation noise: the cost eta of the paper's Eq. 4.

    eta(l, t) = (alpha_tilde / alpha_l)^gamma * noise(l, t)

with two noise models:

* ``"paper"``: noise(l, t) = Var(W_l) * 2^(-2 b(t)), b the nominal bits of the written type
  (App. A.6: uniform quantiser, step ~ 2^-b, noise variance ~ step^2).
* ``"measured"``: noise(l, t) = mean squared error of W_l after ggml's real quantiser for type t and
  gguf-py's dequantiser -- still calibration-free (weights only; the imatrix is all-ones exactly
  where llama.cpp demands one, see `alphaq.gguf.ggml.quantize`).

alpha_tilde is the median alpha over the target matrices (Sec. 3.3; App. A.7 says "mean" in one
sentence, the main text and Eq. 4 say median -- we follow the main text). The default gamma is
App. A.7 Eq. 27: alpha_min (alpha_max - alpha_min) / v_alpha with v_alpha the population variance.
Matrices without a spectral signal (MatrixStats.signal False, alpha NaN) get weight 1, i.e. they
are treated as if alpha_l = alpha_tilde.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from alphaq.errors import AlphaQError
from alphaq.records import MatrixStats

logger = logging.getLogger(__name__)

NOISE_MODELS = ("paper", "measured", "damage")  # "damage": KL measured on the model's own text (alphaq.damage)


def default_gamma(alphas: Sequence[float]) -> float:
    """App. A.7 Eq. 27: gamma = alpha_min (alpha_max - alpha_min) / v_alpha.

    NaNs (no signal) are ignored. With fewer than two distinct alphas every weight is 1 whatever
    gamma is, and 0 is returned.
    """
    a = np.asarray([x for x in alphas if np.isfinite(x)], dtype=np.float64)
    if a.size < 2:
        return 0.0
    v = float(a.var())  # population variance
    if v <= 0.0:
        return 0.0
    return float(a.min() * (a.max() - a.min()) / v)


# Beyond this |log weight| a large gamma would overflow float64 (e^709); the weights are then all
# divided by e^max(log w), which leaves the optimum unchanged (Eq. 5 is invariant to scaling eta).
_MAX_LOG_WEIGHT = 600.0


@dataclass(frozen=True)
class Importance:
    alpha_tilde: float  # median alpha over target matrices with a signal (NaN if none)
    gamma: float  # exponent used
    gamma_is_default: bool  # True when gamma came from App. A.7, False when given
    weights: np.ndarray  # (n_stats,) (alpha_tilde / alpha_l)^gamma * e^-log_scale; e^-log_scale without signal
    log_scale: float = 0.0  # weights were divided by e^log_scale to stay finite (0 unless gamma is huge)


def importance_weights(stats: Sequence[MatrixStats], gamma: float | None = None) -> Importance:
    """Alpha-based importance (alpha_tilde / alpha_l)^gamma for each of `stats` (the targets)."""
    alphas = np.array([s.alpha if s.signal else np.nan for s in stats], dtype=np.float64)
    has = np.isfinite(alphas)
    for s, a in zip(stats, alphas):
        if s.signal and not (np.isfinite(a) and a > 0):
            raise AlphaQError(
                f"{s.tensor} expert {s.expert}: alpha {s.alpha} must be a positive finite number when signal=True"
            )
    if gamma is not None and not np.isfinite(gamma):
        raise AlphaQError(f"gamma {gamma} must be a finite number")
    if not has.any():
        logger.warning("no target matrix has a spectral signal: every importance weight is 1")
        return Importance(float("nan"), 0.0 if gamma is None else float(gamma), gamma is None, np.ones(len(stats)))
    alpha_tilde = float(np.median(alphas[has]))
    g = default_gamma(alphas[has].tolist()) if gamma is None else float(gamma)
    log_w = np.zeros(len(stats), dtype=np.float64)
    log_w[has] = g * (np.log(alpha_tilde) - np.log(alphas[has]))
    log_scale = 0.0
    if np.abs(log_w).max() > _MAX_LOG_WEIGHT:
        log_scale = float(log_w.max())
        logger.warning(
            "gamma %.4g makes importance weights span e^%.4g; all costs are divided by e^%.4g (optimum unchanged)",
            g,
            float(log_w.max() - log_w.min()),
            log_scale,
        )
    w = np.exp(log_w - log_scale)
    n_neutral = int((~has).sum())
    if n_neutral:
        logger.info("%d target matrices have no spectral signal; importance weight 1 (neutral)", n_neutral)
    return Importance(alpha_tilde, g, gamma is None, w, log_scale)


def paper_noise(variance: float, bits: int | np.ndarray) -> float | np.ndarray:
    """Eq. 4 without the importance factor: Var(W) * 2^(-2 b)."""
    return variance * np.exp2(-2.0 * np.asarray(bits, dtype=np.float64))


def sample_rows(n_rows: int, max_rows: int | None) -> np.ndarray:
    """Deterministic row subsample: `max_rows` evenly spaced rows (all rows when None or enough)."""
    if max_rows is None or n_rows <= max_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, max_rows).round().astype(np.int64))


def measured_mse(
    weights: np.ndarray, types: Iterable[GGMLQuantizationType], max_rows: int | None = None,
    col_weights: np.ndarray | None = None,
) -> dict[GGMLQuantizationType, float]:
    """Mean squared error of `weights` (rows, cols) after quantise (ggml) -> dequantise (gguf-py).

    Rows are subsampled deterministically (`sample_rows`); every type must already be the type
    written for this row length (see qtypes.effective_type). ``col_weights`` (cols,), e.g. an
    imatrix's mean squared input activations, weight each column's error: the mean of
    c_j * err_ij^2 / mean(c), the expected squared output error under those activations (the
    calibrated baselines' loss; AlphaQ itself never passes it).
    """
    from alphaq.gguf import ggml  # needs llama-cpp-python; only the measured noise model does

    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise AlphaQError(f"measured noise expects a (rows, cols) matrix, got shape {w.shape}")
    x = np.ascontiguousarray(w[sample_rows(w.shape[0], max_rows)])
    out: dict[GGMLQuantizationType, float] = {}
    for t in types:
        q = ggml.quantize(x, t)
        try:
            y = dequantize(q, t)
        except NotImplementedError as exc:
            raise AlphaQError(f"gguf-py cannot dequantise {t.name}, so its noise cannot be measured: {exc}") from exc
        y = np.asarray(y, dtype=np.float64).reshape(x.shape)
        err = (y - x.astype(np.float64)) ** 2
        if col_weights is not None:
            c = np.asarray(col_weights, dtype=np.float64)
            err = err * (c / c.mean() if c.mean() > 0 else 1.0)
        out[t] = float(np.mean(err))
    return out


class _Matrix(Protocol):  # alphaq.model.weights.WeightMatrix, structurally
    tensor: str
    expert: int | None

    def load(self) -> np.ndarray: ...


def measure_noise(
    matrices: Iterable[_Matrix],
    wanted: Mapping[tuple[str, int | None], Sequence[GGMLQuantizationType]],
    *,
    max_rows: int | None = 128,
    progress: bool = True,
    col_weights: Mapping[tuple[str, int | None], np.ndarray] | None = None,
) -> dict[tuple[str, int | None], dict[GGMLQuantizationType, float]]:
    """Measured MSE for each (tensor, expert) in `wanted`, for the written types listed there
    (column-weighted by ``col_weights[key]`` where given, see `measured_mse`).

    `matrices` yields objects with .tensor, .expert and .load() -> (rows, cols) float32 (the
    spectral stage's WeightMatrix). Matrices not in `wanted` are skipped without loading.
    """
    from tqdm import tqdm

    result: dict[tuple[str, int | None], dict[GGMLQuantizationType, float]] = {}
    bar = tqdm(total=len(wanted), desc="measure noise", unit="matrix", disable=not progress)
    try:
        for m in matrices:
            key = (m.tensor, m.expert)
            if key not in wanted or key in result:
                continue
            cw = col_weights.get(key) if col_weights else None
            result[key] = measured_mse(m.load(), wanted[key], max_rows, cw)
            bar.update(1)
    finally:
        bar.close()
    missing = [k for k in wanted if k not in result]
    if missing:
        raise AlphaQError(f"weights for {len(missing)} matrices were not found, e.g. {missing[0]}")
    return result

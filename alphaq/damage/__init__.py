"""Stage 3 of the default path: how much each tensor's quantisation damages the model's output.

The damage of quantising tensor i to type t is KL(float model || the model with only tensor i
quantised to t), per token, on the model's own text (alphaq.selftext). The costs of the
allocation are these damages, summed over tensors (assumed additive), and an exact knapsack on
bytes picks the types.

Measuring runs llama.cpp itself: the float model is loaded once (alphaq.forward.Session), a tensor
is overwritten in llama.cpp's own buffer with its fake-quantised values (ggml's quantiser with the
importance vector, gguf-py's dequantiser, rounded back to the buffer's float type), the windows
are run, and the original bytes are put back. No file is re-quantised or re-loaded.

Two ways to fill the table (`DamageConfig.method`):

* ``"estimate"`` (default): one KL measurement per tensor, at a reference type (Q4_K), scaled to
  every other type by the ratio of importance-weighted squared errors (each column's error
  weighted by its mean squared activation, experts by their routed tokens):

      damage(i, t) = KL(i, Q4_K) * E_w(i, t) / E_w(i, Q4_K)

  One forward pass set per tensor instead of one per tensor and type.
* ``"direct"``: one KL measurement per tensor and type (the slow reference the estimate is
  checked against).

Under expert granularity every expert slice is an item: an expert's share of its tensor's
damage is its share of the tensor's weighted error (routed tokens x weighted error), since the
damage of a tensor is the sum of its experts' output errors on the tokens they see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from alphaq.errors import AlphaQError
from alphaq.forward import GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, Session, WeightBuffer
from alphaq.qtypes import resolve_type

log = logging.getLogger(__name__)

METHODS = ("estimate", "direct")


@dataclass(frozen=True)
class DamageConfig:
    method: str = "estimate"
    reference_type: str = "Q4_K"  # the one type measured per tensor under "estimate"
    n_windows: int = 16  # windows of self text the KL is measured on
    mse_rows: int | None = 128  # rows per matrix for the weighted error (evenly spaced); None = all
    # experts per merged tensor for a tensor's error ratio (evenly spaced; all under expert
    # granularity, where each expert is an item); None = all
    max_experts: int | None = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AlphaQError(f"damage method {self.method!r} is not one of: {', '.join(METHODS)}")
        resolve_type(self.reference_type)
        if self.n_windows < 1:
            raise AlphaQError(f"damage windows {self.n_windows} must be >= 1")


@dataclass
class DamageTable:
    """Costs per item and written type (KL nats per token), and how they were obtained."""

    costs: dict[tuple[str, int | None], dict[str, float]]  # (tensor, expert or None) -> type -> damage
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> type -> measured KL
    weighted_error: dict[tuple[str, int | None], dict[str, float]] = field(default_factory=dict)
    method: str = "estimate"
    seconds: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "method": self.method, "n_tokens": self.n_tokens, "seconds": self.seconds,
            "measured": self.measured,
            "costs": [{"tensor": k[0], "expert": k[1], "costs": v} for k, v in self.costs.items()],
            "weighted_error": [{"tensor": k[0], "expert": k[1], "error": v} for k, v in self.weighted_error.items()],
        }

    @classmethod
    def from_json(cls, d: dict) -> DamageTable:
        return cls(costs={(c["tensor"], c["expert"]): c["costs"] for c in d["costs"]},
                   measured=d["measured"],
                   weighted_error={(c["tensor"], c["expert"]): c["error"] for c in d["weighted_error"]},
                   method=d["method"], seconds=d["seconds"], n_tokens=d["n_tokens"])


# -- KL on the model's own text -------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_per_token(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(ref || model) at each position: sum_v p_ref(v) (log p_ref(v) - log p_model(v))."""
    return (np.exp(ref_logprobs) * (ref_logprobs - logprobs)).sum(axis=1)


class Reference:
    """The float model's log-probabilities on fixed windows, computed once."""

    def __init__(self, session: Session, windows: np.ndarray):
        self.windows = [[int(t) for t in w] for w in windows]
        self.logprobs = [log_softmax(session.logits(w)).astype(np.float32) for w in self.windows]

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def kl(self, session: Session) -> float:
        """Mean KL(reference || session's model as it is now) per token over all windows."""
        total = 0.0
        for w, ref in zip(self.windows, self.logprobs):
            total += float(kl_per_token(ref.astype(np.float64), log_softmax(session.logits(w))).sum())
        return total / self.n_tokens


# -- fake quantisation in llama.cpp's buffer --------------------------------------------------------


def to_float32(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == GGML_TYPE_BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def from_float32(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 -> the buffer's element type; BF16 rounded to nearest even, as ggml's converter does."""
    if ggml_type == GGML_TYPE_BF16:
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if ggml_type == GGML_TYPE_F16:
        return x.astype(np.float16)
    if ggml_type == GGML_TYPE_F32:
        return x.astype(np.float32)
    raise AlphaQError(f"cannot write ggml type {ggml_type} back into a weight buffer")


def quant_dequant(w: np.ndarray, t: GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    """(rows, cols) float32 through ggml's quantiser (with the importance vector) and back."""
    from alphaq.ggml import needs_imatrix, quantize

    imat = imatrix if imatrix is not None else ("ones" if needs_imatrix(t) else None)
    q = quantize(np.ascontiguousarray(w, dtype=np.float32), t, imat)
    return np.asarray(dequantize(q, t), dtype=np.float32).reshape(w.shape)


def matrices(buf: WeightBuffer) -> int:
    return buf.shape[0] if len(buf.shape) == 3 else 1


class Swap:
    """Overwrite one weight (or one expert slice of it) with fake-quantised values, then restore."""

    def __init__(self, buf: WeightBuffer, t: GGMLQuantizationType, means: np.ndarray | None,
                 expert: int | None = None):
        self.buf, self.t, self.means, self.expert = buf, t, means, expert

    def __enter__(self) -> Swap:
        view = self.buf.view()
        self.saved = view.copy()
        experts = range(matrices(self.buf)) if self.expert is None else [self.expert]
        for e in experts:
            target = view[e] if len(self.buf.shape) == 3 else view.reshape(-1, self.buf.shape[-1])
            w = to_float32(target, self.buf.ggml_type)
            imat = None if self.means is None else self.means[e]
            target[...] = from_float32(quant_dequant(w, self.t, imat), self.buf.ggml_type).reshape(target.shape)
        return self

    def __exit__(self, *exc) -> None:
        self.buf.view()[...] = self.saved

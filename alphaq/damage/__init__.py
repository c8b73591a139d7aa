"""Stage 3 of the default path: how much each tensor's quantisation damages the model's output.

The damage of quantising tensor i to type t is KL(float model || the model with only tensor i
quantised to t), per token, on the model's own text (alphaq.selftext). The costs of the
allocation are these damages, summed over tensors (assumed additive), and an exact knapsack on
bytes picks the types.

Measuring runs llama.cpp itself: the float model is loaded once (alphaq.runtime.forward.Session), a tensor
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
import time
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from alphaq.errors import AlphaQError
from alphaq.runtime.forward import GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0, Session, WeightBuffer
from alphaq.gguf.qtypes import resolve_type

log = logging.getLogger(__name__)

METHODS = ("estimate", "direct")


# Windows of own text per measurement when the configuration leaves it open: 16 where every block
# is measured (small models: minutes), 2 where depth anchors stand in for most blocks (deep models,
# where each measurement is a forward pass over the whole model, so the stage is linear in them).
# Measured (bench/SELFCAL.md): on the zoo, every tensor measured, 2 windows against 4 median KL
# ratio 1.004 (14 of 20 cells within 2 SE) and 4 against 16 1.000; on the 8-block trained model
# with 4 anchors per kind, 2 windows against 4 median 0.868 (lower in 6 of 7 sizes at 2 SE, the
# 7th a tie). The window count is not what drives plan quality there; halving it halves the
# forward passes of the default's most expensive stage at real depth.
FULL_WINDOWS, ANCHORED_WINDOWS = 16, 2


@dataclass(frozen=True)
class DamageConfig:
    method: str = "estimate"
    reference_type: str = "Q4_K"  # the one type measured per tensor under "estimate"
    n_windows: int | None = None  # windows of self text the KL is measured on; None: see windows()
    mse_rows: int | None = 128  # rows per matrix for the weighted error (evenly spaced); None = all
    # experts per merged tensor for a tensor's error ratio (evenly spaced; all under expert
    # granularity, where each expert is an item); None = all
    max_experts: int | None = 16
    # at most this many weights per tensor for its weighted errors (fewer rows per sampled expert,
    # never fewer than 16; not under expert granularity): every candidate type is quantised on the
    # sample, and at Qwen3-30B-A3B's 2048-wide experts 16 x 128 rows took 36 s of 2 cores per tensor
    # (30 min at 48 blocks). 2^19 leaves every bench-zoo tensor's sample as it was and gives real
    # shapes' expert tensors 16 rows per sampled expert (Qwen3-30B-A3B, Mixtral-8x7B). Even 2^16 tied
    # 2^20 on the zoo (18 of 20 files byte-identical) and on the 8-block model (6 ties, 1 worse at
    # 2 SE, median 1.000; bench/SELFCAL.md).
    max_sampled_weights: int | None = 1 << 19
    # blocks measured per tensor kind, the others interpolated over depth (alphaq.damage.anchors);
    # None = every block. 8, not 4, by measurement on a 24-block trained model (bench/SELFCAL.md,
    # "Depth anchors on a 24-block model"; 7 sizes): against every block measured on 16 windows, 4
    # anchors on 2 windows had median KL ratio 1.205 (5 of 7 sizes worse at 2 SE, 2 ties), 8 anchors
    # 0.992 (6 ties, 1 worse); 8 against 4: lower at 5 sizes, 2 ties. 4 anchors spaced 2.3 blocks
    # apart had tied every block on the 8-block model, 4 spaced 7.7 apart did not. The measurement
    # count stays bounded (8 per tensor kind whatever the depth), at twice 4's cost (docs/ALLOCATION.md).
    anchors: int | None = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AlphaQError(f"damage method {self.method!r} is not one of: {', '.join(METHODS)}")
        resolve_type(self.reference_type)
        if self.n_windows is not None and self.n_windows < 1:
            raise AlphaQError(f"damage windows {self.n_windows} must be >= 1")
        if self.anchors is not None and self.anchors < 1:
            raise AlphaQError(f"damage anchors {self.anchors} must be >= 1 (or all blocks)")

    def windows(self, names) -> int:
        """Windows per measurement for the weights ``names``: the configured number, else 16 when
        every block is measured and 2 when anchors stand in for some."""
        from alphaq.damage.anchors import depth_anchors

        return self.windows_when(len(depth_anchors(names, self.anchors).measured) == len(names))

    def windows_when(self, every_block_measured: bool) -> int:
        """The configured windows, else 16 when every block is measured and 2 otherwise."""
        if self.n_windows is not None:
            return self.n_windows
        return FULL_WINDOWS if every_block_measured else ANCHORED_WINDOWS


@dataclass
class DamageTable:
    """Costs per item and written type (KL nats per token), and how they were obtained."""

    costs: dict[tuple[str, int | None], dict[str, float]]  # (tensor, expert or None) -> type -> damage
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> type -> measured KL
    interpolated: dict[str, list[str]] = field(default_factory=dict)  # tensor -> the anchors it is interpolated from
    weighted_error: dict[tuple[str, int | None], dict[str, float]] = field(default_factory=dict)
    method: str = "estimate"
    seconds: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0
    passes: int = 0  # measurements run (each a forward pass over every window)
    resumed: int = 0  # tensors whose results a stopped run had recorded (alphaq.damage.journal); not cached

    def describe(self) -> str:
        """One line for the convert summary: what was measured, what was interpolated, the seconds."""
        line = f"{len(self.measured)} tensor(s) measured ({self.method}) on {self.n_tokens:,} tokens of own text"
        if self.interpolated:
            n_anchor = len({a for anchors in self.interpolated.values() for a in anchors})
            line += (f"; {len(self.interpolated)} interpolated over depth from {n_anchor} anchor tensor(s) "
                     "(--damage-anchors all measures every one)")
        if self.seconds:
            order = ("weighted_error", "fake_quantise", "forward", "reference")  # a cached table's keys are sorted
            parts = sorted(self.seconds.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
            line += "; " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in parts)
        if self.passes:
            line += f" ({self.passes} measurements)"
        if self.resumed:
            n_tensors = len(self.measured) + len(self.interpolated)
            line += f"; {self.resumed} of the {n_tensors} tensors' results resumed from a stopped run"
        return line

    def to_json(self) -> dict:
        return {
            "method": self.method, "n_tokens": self.n_tokens, "seconds": self.seconds, "passes": self.passes,
            "measured": self.measured, "interpolated": self.interpolated,
            "costs": [{"tensor": k[0], "expert": k[1], "costs": v} for k, v in self.costs.items()],
            "weighted_error": [{"tensor": k[0], "expert": k[1], "error": v} for k, v in self.weighted_error.items()],
        }

    @classmethod
    def from_json(cls, d: dict) -> DamageTable:
        return cls(costs={(c["tensor"], c["expert"]): c["costs"] for c in d["costs"]},
                   measured=d["measured"], interpolated=d.get("interpolated", {}),
                   weighted_error={(c["tensor"], c["expert"]): c["error"] for c in d["weighted_error"]},
                   method=d["method"], seconds=d["seconds"], n_tokens=d["n_tokens"], passes=d.get("passes", 0))


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
        self.seconds = 0.0  # spent in kl(): the measurements' forward passes
        self.passes = 0  # kl() calls

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def kl(self, session: Session) -> float:
        """Mean KL(reference || session's model as it is now) per token over all windows."""
        t0 = time.perf_counter()
        total = 0.0
        for w, ref in zip(self.windows, self.logprobs):
            total += float(kl_per_token(ref.astype(np.float64), log_softmax(session.logits(w))).sum())
        self.seconds += time.perf_counter() - t0
        self.passes += 1
        return total / self.n_tokens


# -- fake quantisation in llama.cpp's buffer --------------------------------------------------------


def to_float32(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """A buffer's rows as float32 (a Q8_0 working copy's through gguf-py's dequantiser)."""
    if ggml_type == GGML_TYPE_BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if ggml_type == GGML_TYPE_Q8_0:
        return np.asarray(dequantize(raw, GGMLQuantizationType.Q8_0), dtype=np.float32)
    return raw.astype(np.float32)


def from_float32(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 -> the buffer's element type; BF16 rounded to nearest even, as ggml's converter does;
    Q8_0 by ggml's quantiser (a fake-quantised weight in a Q8_0 working copy is its Q8_0 rounding)."""
    if ggml_type == GGML_TYPE_Q8_0:
        from alphaq.gguf.ggml import quantize

        return quantize(x.reshape(-1, x.shape[-1]), GGMLQuantizationType.Q8_0, None)
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
    from alphaq.gguf.ggml import needs_imatrix, quantize

    imat = imatrix if imatrix is not None else ("ones" if needs_imatrix(t) else None)
    q = quantize(np.ascontiguousarray(w, dtype=np.float32), t, imat)
    return np.asarray(dequantize(q, t), dtype=np.float32).reshape(w.shape)


def matrices(buf: WeightBuffer) -> int:
    return buf.shape[0] if len(buf.shape) == 3 else 1


class Swap:
    """Overwrite one weight (or one expert slice of it) with fake-quantised values, then restore.

    The slices are quantised on a thread per core (ggml's quantiser releases the GIL); every row
    is quantised on its own, so the values do not depend on how the rows are shared out."""

    # every weight in row blocks of at most this many weights (16 MB of float32; gguf-py's
    # dequantiser makes temporaries several times that): a whole Mixtral-8x7B expert at once
    # (14336 x 4096) held 2 GB per thread, 4 GiB over the mapped model on 2 threads; blocks of
    # 2048 rows still took 3.12 GiB of private memory in the damage stage at 1 Mixtral-8x7B block,
    # because a 14336-wide down projection made each block 29M weights; the real vocabulary's
    # embedding is 1.2 GB of float32
    WEIGHTS_PER_JOB = 4 << 20

    def __init__(self, buf: WeightBuffer, t: GGMLQuantizationType, means: np.ndarray | None,
                 expert: int | None = None):
        self.buf, self.t, self.means, self.expert = buf, t, means, expert

    def _jobs(self, view: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(row block of the buffer, its importance vector) for every piece quantised on its own."""
        if len(self.buf.shape) == 3:  # each expert with its own importance vector
            experts = range(matrices(self.buf)) if self.expert is None else [self.expert]
            slabs = [(view[e], None if self.means is None else self.means[e]) for e in experts]
        else:  # rows of elements, or a Q8_0 copy's bytes per row
            slabs = [(view.reshape(-1, view.shape[-1]), None if self.means is None else self.means[0])]
        step = max(1, self.WEIGHTS_PER_JOB // view.shape[-1])
        return [(rows[i:i + step], imat) for rows, imat in slabs for i in range(0, rows.shape[0], step)]

    def _fake_quantise(self, job: tuple[np.ndarray, np.ndarray | None]) -> None:
        target, imat = job
        w = to_float32(target, self.buf.ggml_type)
        target[...] = from_float32(quant_dequant(w, self.t, imat), self.buf.ggml_type).reshape(target.shape)

    def __enter__(self) -> Swap:
        from concurrent.futures import ThreadPoolExecutor

        from alphaq.runtime.forward import _default_threads

        mapper = self.buf.mapper
        if mapper is not None:  # copy-on-write pages; the file's bytes come back on revert
            mapper.private(self.buf.address, self.buf.n_bytes)
        view = self.buf.view(writable=True)
        self.saved = view.copy() if mapper is None else None
        with ThreadPoolExecutor(max_workers=_default_threads()) as pool:
            list(pool.map(self._fake_quantise, self._jobs(view)))
        return self

    def __exit__(self, *exc) -> None:
        if self.buf.mapper is not None:
            self.buf.mapper.revert(self.buf.address, self.buf.n_bytes)
        else:
            self.buf.view(writable=True)[...] = self.saved

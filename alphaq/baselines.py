"""Baselines for the evaluation (issue 6), every one written by llama.cpp's own quantiser.

From a BF16/F16/F32 GGUF:

* ``uniform``: every routed-expert tensor in one type (Q2_K / Q3_K / Q4_K), the rest on AlphaQ's
  default non-expert policy; a plan whose only candidate is that type, so it differs from AlphaQ
  only in the expert allocation.
* ``stock``: llama.cpp's own mixes (Q2_K, Q3_K_S, …, Q4_K_M) with their heuristics, optionally
  with an importance matrix (``alphaq.imatrix``): the *calibrated* stock baseline.
* ``random importance``: the AlphaQ knapsack with the same candidates and the same budget, but with
  each tensor's importance drawn at random (log-normal, seeded) instead of from α. Same size,
  same noise model (Var-free 2^-2b), no information.
* ``frequency × measured loss`` (PMQ-style, calibrated): cost of a tensor = Σ_e f_e · MSE_e(type),
  f_e the fraction of calibration tokens routed to expert e, MSE the ggml quantisation error of
  that expert's slice; solved per block (scope="block"), as PMQ allocates within each layer.

Plans are solved with ``alphaq.plan.make_plan``; the random and frequency baselines feed their
costs in through its ``noise_table`` (measured-noise mode with γ = 0, so the cost is exactly the
table), which keeps budgets, fallbacks and sizes identical to AlphaQ's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from alphaq.errors import AlphaQError
from alphaq.plan import (
    Plan,
    PlanConfig,
    gguf_output_header_bytes,
    gguf_tensor_infos,
    make_plan,
    measurement_requests,
)
from alphaq.qtypes import nominal_bits
from alphaq.quantize import quantize_gguf, quantize_stock
from alphaq.records import MatrixStats

log = logging.getLogger(__name__)

UNIFORM_TYPES = ("Q2_K", "Q3_K", "Q4_K")


@dataclass(frozen=True)
class FloatModel:
    """A float GGUF and what planning needs from it."""

    path: Path
    tensors: list  # alphaq.plan.TensorInfo, in file order
    header: int  # exact header bytes of a llama_model_quantize output of this file

    @classmethod
    def open(cls, path: Path, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> FloatModel:
        reader = gguf.GGUFReader(path)
        return cls(Path(path), gguf_tensor_infos(reader), gguf_output_header_bytes(reader, alignment))


def solve(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, noise_table=None) -> Plan:
    return make_plan(stats, model.tensors, cfg, fixed_bytes=model.header, noise_table=noise_table)


def write_plan(model: FloatModel, plan: Plan, out: Path, *, nthread: int = 0) -> int:
    """Quantise ``model`` with exactly the plan's types; returns the file size in bytes."""
    quantize_gguf(model.path, out, plan.tensor_types(), nthread=nthread)
    return out.stat().st_size


def uniform_plan(model: FloatModel, stats: list[MatrixStats], qtype: str, base: PlanConfig | None = None) -> Plan:
    """Every allocated (routed-expert) tensor in ``qtype`` (after llama.cpp's shape fallback)."""
    cfg = dataclasses.replace(base or PlanConfig(), types=(qtype,), budget_mode="bits", budget=64.0, gamma=0.0, noise="paper")
    return solve(model, stats, cfg)


def random_noise_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, seed: int,
                       sigma: float = 2.0) -> dict:
    """Costs r_tensor · 2^(-2 b) with r_tensor ~ LogNormal(0, sigma) drawn per GGUF tensor
    (tensor granularity) or per slice (expert granularity), seeded."""
    rng = np.random.default_rng(seed)
    requests = measurement_requests(stats, model.tensors, cfg)
    per_unit: dict = {}
    table = {}
    for key, written in requests.items():
        unit = key if cfg.granularity == "expert" else key[0]
        if unit not in per_unit:
            per_unit[unit] = float(rng.lognormal(0.0, sigma))
        table[key] = {t: per_unit[unit] * 2.0 ** (-2 * nominal_bits(t)) for t in written}
    return table


def random_plan(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, seed: int) -> Plan:
    """The AlphaQ knapsack (same candidates, budget, scope) with random importance."""
    rcfg = dataclasses.replace(cfg, noise="measured", gamma=0.0)
    return solve(model, stats, rcfg, random_noise_table(model, stats, rcfg, seed))


def frequency_noise_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig,
                          expert_tokens: dict[str, np.ndarray], measured: dict) -> dict:
    """PMQ-style cost: f_e (routing frequency on calibration text) x measured MSE of slice e."""
    requests = measurement_requests(stats, model.tensors, cfg)
    table = {}
    for key, written in requests.items():
        name, expert = key
        if expert is None or name not in expert_tokens:
            f = 1.0
        else:
            counts = expert_tokens[name]
            f = float(counts[expert]) / max(1, int(counts.sum()))
        table[key] = {t: f * measured[key][t] for t in written}
    return table


def frequency_plan(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig,
                   expert_tokens: dict[str, np.ndarray], measured: dict) -> Plan:
    fcfg = dataclasses.replace(cfg, noise="measured", gamma=0.0, scope="block")
    return solve(model, stats, fcfg, frequency_noise_table(model, stats, fcfg, expert_tokens, measured))


def measure_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, progress: bool = False) -> dict:
    """Measured ggml quantisation MSE for every allocated slice (the 'measured' noise model)."""
    from alphaq.costs import measure_noise
    from alphaq.weights import open_model

    requests = measurement_requests(stats, model.tensors, cfg)
    with open_model(model.path) as weights:
        return measure_noise(weights.matrices(), requests, max_rows=cfg.mse_rows, progress=progress)


def stock(model: FloatModel, out: Path, mix: str, *, imatrix: dict[str, np.ndarray] | None = None,
          nthread: int = 0) -> int:
    """llama.cpp's stock mix (optionally calibrated); returns the file size in bytes."""
    quantize_stock(model.path, out, mix, nthread=nthread, imatrix=imatrix)
    return out.stat().st_size


def file_types(path: Path) -> dict[str, GGMLQuantizationType]:
    """Written type of every tensor of a GGUF."""
    return {t.name: GGMLQuantizationType(int(t.tensor_type)) for t in gguf.GGUFReader(path).tensors}


def check_imatrix(model: FloatModel, imatrix: dict[str, np.ndarray]) -> None:
    """Names exist, sizes are ne0 * n_expert, entries finite and non-negative."""
    shapes = {t.name: t.shape for t in model.tensors}
    for name, vec in imatrix.items():
        if name not in shapes:
            raise AlphaQError(f"imatrix names {name}, which is not in {model.path.name}")
        shape = shapes[name]  # numpy order: (n_expert, rows, cols) or (rows, cols)
        want = shape[-1] * (shape[0] if len(shape) >= 3 else 1)
        if vec.shape != (want,):
            raise AlphaQError(f"imatrix {name} has {vec.shape} entries, expected ({want},)")
        if not np.all(np.isfinite(vec)) or (vec < 0).any():
            raise AlphaQError(f"imatrix {name} has negative or non-finite entries")

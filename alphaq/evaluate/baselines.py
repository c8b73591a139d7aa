"""Baselines for the evaluation (issue 6), every one written by llama.cpp's own quantiser.

From a BF16/F16/F32 GGUF:

* ``uniform``: every routed-expert tensor in one type (Q2_K / Q3_K / Q4_K), the rest on AlphaQ's
  default non-expert policy; a plan whose only candidate is that type, so it differs from AlphaQ
  only in the expert allocation.
* ``stock``: llama.cpp's own mixes (Q2_K, Q3_K_S, …, Q4_K_M) with their heuristics, optionally
  with an importance matrix (``alphaq.importance.real_text``): the *calibrated* stock baseline.
* ``random importance``: the AlphaQ knapsack with the same candidates and the same budget, but with
  each tensor's importance drawn at random (log-normal, seeded) instead of from α. Same size,
  same noise model (Var-free 2^-2b), no information.
* ``frequency × measured loss`` (PMQ-style, calibrated): cost of a tensor = Σ_e f_e · MSE_e(type),
  f_e the fraction of calibration tokens routed to expert e, MSE the ggml quantisation error of
  that expert's slice; solved per block (scope="block"), as PMQ allocates within each layer.
* ``router norm`` (paper 004, "Efficient Quantization of Mixture-of-Experts with Theoretical
  Generalization Guarantees"; calibration-free, but needs the router at initialisation): experts
  whose router row changed its l2 norm *least* during training, and experts with a large maximum
  intra-neuron (row) variance, get more bits. Only the abstract is available; the rule below is our
  reading of it (see ``RouterNormConfig`` and ``router_norm_importance``).

Plans are solved with ``alphaq.allocate.plan.make_plan``; the random and frequency baselines feed their
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
from alphaq.allocate.plan import (
    Plan,
    PlanConfig,
    gguf_model_infos,
    make_plan,
    measurement_requests,
)
from alphaq.gguf.qtypes import nominal_bits, padded
from alphaq.gguf.quantize import quantize_gguf, quantize_stock
from alphaq.records import MatrixStats

log = logging.getLogger(__name__)

UNIFORM_TYPES = ("Q2_K", "Q3_K", "Q4_K")


@dataclass(frozen=True)
class FloatModel:
    """A float GGUF and what planning needs from it."""

    path: Path
    tensors: list  # alphaq.allocate.plan.TensorInfo, in file order
    header: int  # exact header bytes of a llama_model_quantize output of this file

    @classmethod
    def open(cls, path: Path, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> FloatModel:
        """``path``: a float GGUF, or any part of a split one (then ``path`` becomes its first part,
        the file llama.cpp's quantiser is given)."""
        from alphaq.gguf.io import first_shard

        path = first_shard(Path(path))
        return cls(path, *gguf_model_infos(path, alignment))


def solve(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, noise_table=None,
          fixed_bytes: int | None = None) -> Plan:
    """The knapsack on ``model``; ``fixed_bytes`` defaults to its stock header (expert-granular
    files pass `expert_header_bytes`)."""
    return make_plan(stats, model.tensors, cfg, fixed_bytes=model.header if fixed_bytes is None else fixed_bytes,
                     noise_table=noise_table)


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


def alpha_only_noise_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, gamma: float) -> dict:
    """Ablation "α only": AlphaQ's importance (α̃/α)^γ times 2^(-2 b), without the Var(W) factor
    of the noise model."""
    from alphaq.allocate.costs import importance_weights

    requests = measurement_requests(stats, model.tensors, cfg)
    targets = [s for s in stats if (s.tensor, s.expert) in requests]
    weights = importance_weights(targets, gamma).weights
    return {(s.tensor, s.expert): {t: float(w) * 2.0 ** (-2 * nominal_bits(t)) for t in requests[(s.tensor, s.expert)]}
            for s, w in zip(targets, weights)}


def alpha_only_plan(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, gamma: float = 1.0) -> Plan:
    acfg = dataclasses.replace(cfg, noise="measured", gamma=0.0)
    return solve(model, stats, acfg, alpha_only_noise_table(model, stats, acfg, gamma))


def random_plan(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, seed: int) -> Plan:
    """The AlphaQ knapsack (same candidates, budget, scope) with random importance."""
    rcfg = dataclasses.replace(cfg, noise="measured", gamma=0.0)
    return solve(model, stats, rcfg, random_noise_table(model, stats, rcfg, seed))


def frequency_noise_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig,
                          expert_tokens: dict[str, np.ndarray], measured: dict) -> dict:
    """PMQ-style cost: f_e (routing frequency on calibration text) x the measured loss of slice e
    (`measure_table`, activation-weighted by the calibration imatrix in bench_eval)."""
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
                   expert_tokens: dict[str, np.ndarray], measured: dict, fixed_bytes: int | None = None) -> Plan:
    """PMQ-style: per-block knapsack (at cfg's granularity) on frequency x calibration loss."""
    fcfg = dataclasses.replace(cfg, noise="measured", gamma=0.0, scope="block")
    return solve(model, stats, fcfg, frequency_noise_table(model, stats, fcfg, expert_tokens, measured), fixed_bytes)


def measure_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, progress: bool = False,
                  imatrix: dict[str, np.ndarray] | None = None) -> dict:
    """Measured ggml quantisation MSE for every allocated slice (the 'measured' noise model); with
    an ``imatrix`` (calibration), each column's error weighted by its mean squared activation, i.e.
    the quantisation loss on the calibration text (PMQ-style)."""
    from alphaq.allocate.costs import measure_noise
    from alphaq.model.weights import open_model

    requests = measurement_requests(stats, model.tensors, cfg)
    col_weights = None
    if imatrix is not None:
        cols = {s.tensor: s.cols for s in stats}
        col_weights = {}
        for name, expert in requests:
            vec = imatrix.get(name)
            if vec is not None:
                e, n = expert or 0, cols[name]
                col_weights[(name, expert)] = vec[e * n:(e + 1) * n]  # expert-major (alphaq.importance.real_text)
    with open_model(model.path) as weights:
        return measure_noise(weights.matrices(), requests, max_rows=cfg.mse_rows, progress=progress,
                             col_weights=col_weights)


def stock(model: FloatModel, out: Path, mix: str, *, imatrix: dict[str, np.ndarray] | None = None,
          nthread: int = 0) -> int:
    """llama.cpp's stock mix (optionally calibrated); returns the file size in bytes."""
    quantize_stock(model.path, out, mix, nthread=nthread, imatrix=imatrix)
    return out.stat().st_size


def file_types(path: Path) -> dict[str, GGMLQuantizationType]:
    """Written type of every tensor of a GGUF."""
    from alphaq.gguf.io import read_tensors

    return {t.name: t.type for t in read_tensors(path)}  # every part of a split GGUF


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


# ---- router-norm change (paper 004) -------------------------------------------------------------
#
# The abstract says: bits per expert "primarily based on their change in routers l2 norm during
# training"; "experts with smaller changes ... [are] more sensitive ... thus requiring higher
# precision"; and "experts with large maximum intra-neuron variance are also allocated higher
# precision". The paper's exact allocation rule is not available, so this is our reading, made to fit
# the same knapsack and noise model as every other baseline here:
#
#   Δ_e   = | ‖r_e,trained‖₂ − ‖r_e,init‖₂ |       r_e = row e of the block's router (ffn_gate_inp)
#   v_e   = max over rows i of Var_j(W_e[i, j])      per expert tensor (projection), rows = output neurons
#   q_e   = rank of Δ_e among the experts of its block, scaled to [0, 1] (0 = smallest change)
#   imp_e = 4^(spread_bits · (1 − q_e)) · 4^(promote_bits · [v_e > quantile_var_quantile(v)])
#   cost_e(t) = imp_e · Var(W_e) · 2^(−2 b(t))        (AlphaQ's paper noise model)
#
# A factor 4 on the cost is what one bit changes in the noise model (2^(−2b)): with the defaults the
# noise of the smallest-Δ expert of a block counts 4x that of the largest-Δ one (as if it had one bit
# less), and the top quarter of a projection's experts by v_e count another 4x. Ranks (not 1/Δ
# itself) keep an expert whose norm barely moved from getting an unbounded weight. Δ is compared
# only inside a block (one router), v_e only inside one expert tensor; across blocks the knapsack
# trades on the noise model, exactly as AlphaQ at γ=0 does. With spread_bits = promote_bits = 0
# the costs, and so the plan, are AlphaQ's at γ=0.


@dataclass(frozen=True)
class RouterNormConfig:
    # bits of noise-model weight between the smallest- and the largest-Δ expert of a block
    # ("primarily based on" Δ: the main term)
    spread_bits: float = 1.0
    # experts whose v_e is above this quantile of their expert tensor's v are promoted
    # (top quarter; "experts with large maximum intra-neuron variance")
    var_quantile: float = 0.75
    # bits of noise-model weight a promoted expert gains ("also allocated higher precision")
    promote_bits: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.var_quantile <= 1.0):
            raise AlphaQError(f"var_quantile {self.var_quantile} must be in [0, 1]")
        if self.spread_bits < 0 or self.promote_bits < 0:
            raise AlphaQError(f"spread_bits {self.spread_bits} and promote_bits {self.promote_bits} must be >= 0")


def router_norm_change(trained: np.ndarray, init: np.ndarray) -> np.ndarray:
    """Δ_e = | ‖r_e,trained‖₂ − ‖r_e,init‖₂ | per router row; trained, init: (n_expert, hidden)."""
    trained, init = np.asarray(trained, np.float64), np.asarray(init, np.float64)
    if trained.shape != init.shape or trained.ndim != 2:
        raise AlphaQError(f"router shapes {trained.shape} (trained) and {init.shape} (init) differ or are not 2-D")
    return np.abs(np.linalg.norm(trained, axis=1) - np.linalg.norm(init, axis=1))


def max_row_variance(w: np.ndarray) -> float:
    """v = max over output neurons (rows) of the variance of that row; w: (rows, cols)."""
    return float(np.asarray(w, np.float64).var(axis=1).max())


def rank_fraction(x: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to [0, 1] (0 = smallest), ties get their average rank."""
    from scipy.stats import rankdata

    x = np.asarray(x, np.float64)
    if x.size < 2:
        return np.zeros(x.size)
    return (rankdata(x, method="average") - 1.0) / (x.size - 1)


def router_norm_importance(delta: np.ndarray, max_var: np.ndarray, cfg: RouterNormConfig = RouterNormConfig()) -> np.ndarray:
    """imp_e for the experts of one expert tensor: delta = Δ of its block's router rows,
    max_var = v_e of its expert slices, both (n_expert,)."""
    delta, max_var = np.asarray(delta, np.float64), np.asarray(max_var, np.float64)
    if delta.shape != max_var.shape or delta.ndim != 1:
        raise AlphaQError(f"Δ {delta.shape} and v {max_var.shape} must be (n_expert,) each")
    by_delta = 4.0 ** (cfg.spread_bits * (1.0 - rank_fraction(delta)))
    promoted = max_var > np.quantile(max_var, cfg.var_quantile)
    return by_delta * 4.0 ** (cfg.promote_bits * promoted)


def _safetensors(paths: list[Path]) -> dict[str, np.ndarray]:
    """2-D '*.gate.weight' tensors of safetensors files, as float32 (trained checkpoints are BF16)."""
    from safetensors import safe_open

    out = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if k.endswith(".gate.weight"):
                    out[k] = f.get_tensor(k).float().numpy()
    return out


def router_changes(hf_dir: Path, float_gguf: Path) -> dict[int, np.ndarray]:
    """Δ per block: {block: (n_expert,)}, from the HF checkpoint's trained router and its
    router_init.safetensors (scripts/train_tiny_moe.py). Both are matched to GGUF blocks by gguf-py's
    TensorNameMap ('...gate.weight' -> 'blk.N.ffn_gate_inp.weight'), because the two files may use
    different HF spellings (Mixtral: saved 'block_sparse_moe.gate', in-memory 'mlp.gate')."""
    from alphaq.importance.real_text import _arch_of

    init_path = Path(hf_dir) / "router_init.safetensors"
    if not init_path.exists():
        raise AlphaQError(f"{init_path} does not exist: the router-norm baseline needs the router at initialisation")
    arch, n_blocks = _arch_of(float_gguf)
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    block_of = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].format(bid=b) + ".weight": b for b in range(n_blocks)}

    def by_block(tensors: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
        out = {}
        for name, w in tensors.items():
            block = block_of.get(tmap.get_name(name, try_suffixes=(".weight",)) or "")
            if block is not None:
                out[block] = w
        return out

    init = by_block(_safetensors([init_path]))
    trained = by_block(_safetensors(sorted(p for p in Path(hf_dir).glob("*.safetensors") if p != init_path)))
    if not init:
        raise AlphaQError(f"{init_path} holds no router that maps to a block's ffn_gate_inp")
    if set(init) != set(trained):
        raise AlphaQError(f"routers at initialisation (blocks {sorted(init)}) and trained (blocks {sorted(trained)}) differ")
    return {b: router_norm_change(trained[b], init[b]) for b in sorted(init)}


@dataclass(frozen=True)
class RouterNormItem:
    """What decided one expert slice's importance (for the report)."""

    delta: float  # Δ_e of its block's router row
    max_var: float  # v_e of this slice
    importance: float  # imp_e


def router_norm_table(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, hf_dir: Path,
                      rcfg: RouterNormConfig = RouterNormConfig()) -> tuple[dict, dict[tuple[str, int], RouterNormItem]]:
    """Costs imp_e · Var(W_e) · 2^(−2b) for every allocated expert slice, and what made imp_e."""
    from alphaq.model.weights import open_model

    requests = measurement_requests(stats, model.tensors, cfg)
    by_key = {(s.tensor, s.expert): s for s in stats}
    if any(e is None for _, e in requests):
        raise AlphaQError("the router-norm baseline allocates routed experts only (cfg.allocate='experts')")
    deltas = router_changes(hf_dir, model.path)
    max_var: dict[tuple[str, int], float] = {}
    with open_model(model.path) as weights:
        for m in weights.matrices():
            if (m.tensor, m.expert) in requests:
                max_var[(m.tensor, m.expert)] = max_row_variance(m.load())
    table, items = {}, {}
    for tensor in dict.fromkeys(t for t, _ in requests):
        experts = sorted(e for t, e in requests if t == tensor)
        block = by_key[(tensor, experts[0])].block
        if block not in deltas or len(deltas[block]) != len(experts):
            raise AlphaQError(f"{tensor}: no router with {len(experts)} rows for block {block}")
        delta = deltas[block][experts]
        v = np.array([max_var[(tensor, e)] for e in experts])
        imp = router_norm_importance(delta, v, rcfg)
        for e, d, ve, w in zip(experts, delta, v, imp):
            var = by_key[(tensor, e)].variance
            table[(tensor, e)] = {t: float(w) * var * 2.0 ** (-2 * nominal_bits(t)) for t in requests[(tensor, e)]}
            items[(tensor, e)] = RouterNormItem(float(d), float(ve), float(w))
    return table, items


def router_norm_plan(model: FloatModel, stats: list[MatrixStats], cfg: PlanConfig, hf_dir: Path,
                     rcfg: RouterNormConfig = RouterNormConfig(), fixed_bytes: int | None = None) -> Plan:
    """The AlphaQ knapsack (same candidates, budget, scope, granularity) with router-norm costs."""
    rcfg_plan = dataclasses.replace(cfg, noise="measured", gamma=0.0)
    table, _ = router_norm_table(model, stats, rcfg_plan, hf_dir, rcfg)
    return solve(model, stats, rcfg_plan, table, fixed_bytes)


# ---- expert-granular files (patched runtime) ---------------------------------------------------


def expert_header_bytes(model: FloatModel) -> int:
    """Header bytes of an expert-granular file written by ``write_expert_plan``: llama.cpp's own
    header plus the expert-groups format keys (the grouped tensors' infos the plan adds itself)."""
    from alphaq.pipeline.convert import metadata_bytes
    from alphaq.gguf.expert import FORMAT_KEYS

    return padded(model.header + metadata_bytes(FORMAT_KEYS), gguf.GGUF_DEFAULT_ALIGNMENT)


def write_expert_plan(model: FloatModel, plan: Plan, out: Path, *, nthread: int = 0,
                      imatrix: dict[str, np.ndarray] | None = None) -> int:
    """Write an expert- (or tensor-) granular plan the way ``alphaq convert`` does, without the
    alphaq.* plan keys (so every baseline carries the same metadata); returns the file size.
    imatrix: flat importance vectors by tensor name, for llama.cpp's quantiser and the
    expert-groups writer alike (None: llama.cpp's default)."""
    import tempfile

    from alphaq.gguf.expert import group_layouts, write_expert_gguf

    types = plan.tensor_types(mixed="skip")
    layouts = group_layouts(plan.expert_types(), {t.name: t.shape for t in model.tensors})
    # grouped projections are re-quantised per expert by the expert-groups writer; llama.cpp only
    # copies them (as in alphaq.pipeline.convert.run_convert)
    to_llama = {**types, **{t.name: GGMLQuantizationType[t.dtype] for t in model.tensors if t.name in layouts}}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        quantised = Path(tmp) / "quantised.gguf"
        quantize_gguf(model.path, quantised, to_llama, nthread=nthread, file_type_from=types, imatrix=imatrix)
        if layouts:
            final = Path(tmp) / "final.gguf"
            write_expert_gguf(quantised, model.path, layouts, {}, final, imatrix=imatrix)
            final.replace(out)
        else:  # every projection got one type: a stock file as llama.cpp wrote it
            quantised.replace(out)
    return out.stat().st_size

"""Filling the damage table: weighted errors per type, KL measurements per tensor (see __init__)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType

from alphaq.allocate.costs import sample_rows
from alphaq.damage import DamageConfig, DamageTable, Reference, Swap, matrices, quant_dequant, to_float32
from alphaq.damage.anchors import depth_anchors
from alphaq.damage.journal import Journal, TensorRecord
from alphaq.errors import AlphaQError
from alphaq.runtime.forward import Session, WeightBuffer
from alphaq.gguf.qtypes import effective_type, resolve_type
from alphaq.model.weights import sampled_experts
from alphaq.pipeline.resume import pause_for_test

log = logging.getLogger(__name__)


def split_means(means: np.ndarray | None, buf: WeightBuffer) -> np.ndarray | None:
    """A flat importance vector (n_mat * cols,) as (n_mat, cols), checked against the weight."""
    if means is None:
        return None
    n_mat, cols = matrices(buf), buf.shape[-1]
    if means.size != n_mat * cols:
        raise AlphaQError(f"importance vector of {buf.name} has {means.size} values, the weight needs {n_mat} x {cols}")
    return np.asarray(means, dtype=np.float32).reshape(n_mat, cols)


def weighted_errors(buf: WeightBuffer, types: Sequence[GGMLQuantizationType], means: np.ndarray | None,
                    tokens: np.ndarray | None, max_rows: int | None,
                    experts: Sequence[int] | None = None) -> dict[int | None, dict[str, float]]:
    """Expected squared output error per token of each matrix under each type.

    For matrix e: rows x mean over sampled rows of sum_j c_j (w_ij - q(w)_ij)^2, with c the mean
    squared input activation of column j (ones without an importance vector), times the fraction
    of tokens that reach the matrix (routed experts). Keys: the expert index for a merged expert
    tensor, else None (the sum over its matrices). ``experts``: measure only these matrices of a
    3-D tensor (the others are left out of the sums). The (matrix, type) quantisations run on a
    thread per core: ggml's quantiser releases the GIL and runs one row batch per call."""
    view = buf.view()
    n_mat = matrices(buf)
    # token share per matrix; a legacy .dat imatrix keeps one count per tensor: experts weigh alike
    usable = tokens is not None and np.size(tokens) == n_mat and np.sum(tokens) > 0
    share = np.asarray(tokens, dtype=np.float64) / np.max(tokens) if usable else np.ones(n_mat)
    chosen = range(n_mat) if experts is None else experts
    samples = {}
    for e in chosen:
        raw = view[e] if len(buf.shape) == 3 else view.reshape(-1, view.shape[-1])
        samples[e] = (raw.shape[0], to_float32(raw[sample_rows(raw.shape[0], max_rows)], buf.ggml_type))

    def one(e: int, t: GGMLQuantizationType) -> float:
        n_rows, w = samples[e]
        c = np.ones(w.shape[1]) if means is None else means[e].astype(np.float64)
        d = quant_dequant(w, t, None if means is None else means[e]).astype(np.float64) - w
        return float(share[e] * n_rows * ((d * d) @ c).mean())

    jobs = [(e, t) for e in samples for t in types]
    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        values = list(pool.map(lambda job: one(*job), jobs))
    out: dict[int | None, dict[str, float]] = {}
    for (e, t), v in zip(jobs, values):  # a 2-D weight's row blocks sum into one entry
        errs = out.setdefault(e if len(buf.shape) == 3 else None, {})
        errs[t.name] = errs.get(t.name, 0.0) + v
    return out


def _threads() -> int:
    from alphaq.runtime.forward import _default_threads

    return _default_threads()


def sample_size(buf: WeightBuffer, experts: Sequence[int] | None, cfg: DamageConfig) -> int | None:
    """Rows per sampled matrix for a tensor's weighted errors: cfg.mse_rows, fewer when the sample
    would hold more than cfg.max_sampled_weights weights (never fewer than 16 rows)."""
    if cfg.max_sampled_weights is None:
        return cfg.mse_rows
    n_mat = len(experts) if experts is not None else matrices(buf)
    fits = max(16, cfg.max_sampled_weights // (n_mat * buf.shape[-1]))
    return fits if cfg.mse_rows is None else min(cfg.mse_rows, fits)


def _tensor_damage(session: Session, ref: Reference, buf: WeightBuffer, written, ref_t, means, errors,
                   cfg: DamageConfig) -> dict[str, float]:
    """Damage of the whole tensor per written type: measured directly, or one measurement scaled."""
    if cfg.method == "direct":
        out = {}
        for t in written:
            with Swap(buf, t, means):
                out[t.name] = max(ref.kl(session), 0.0)
        return out
    with Swap(buf, ref_t, means):
        kl_ref = max(ref.kl(session), 0.0)
    e_ref = sum(err[ref_t.name] for err in errors.values())
    return {t.name: kl_ref * (sum(err[t.name] for err in errors.values()) / e_ref if e_ref > 0 else 1.0)
            for t in written}


def measure(session: Session, ref: Reference, names: Sequence[str], candidates: Sequence[GGMLQuantizationType],
            cfg: DamageConfig, *, imatrix: Mapping[str, np.ndarray] | None = None,
            tokens: Mapping[str, np.ndarray] | None = None, per_expert: bool = False,
            progress: bool = False, journal: Journal | None = None) -> DamageTable:
    """The damage table for the tensors ``names`` (GGUF weight names) over ``candidates``.

    imatrix: flat mean squared activations per weight (the quantiser's importance vectors);
    tokens: tokens per matrix (per expert for merged expert tensors); per_expert: one item per
    expert slice of a merged expert tensor (expert granularity). Under ``cfg.anchors`` only the
    anchor blocks' tensors are run through the model; the others get their kind's damage per unit
    of weighted error, interpolated over depth (see `depth_anchors`). journal: each tensor's
    results are taken from it when there, else recorded in it (a stopped run resumes)."""
    from tqdm import tqdm

    missing = [n for n in names if n not in session.weights]
    if missing:
        raise AlphaQError(f"llama.cpp never reads {missing[0]} when it runs {session.path.name}; cannot measure it")
    anchors = depth_anchors(names, cfg.anchors)
    table = DamageTable(costs={}, method=cfg.method, n_tokens=ref.n_tokens)
    spent = {"weighted_error": 0.0, "fake_quantise": 0.0, "forward": 0.0}
    per_error: dict[str, dict[str, float]] = {}  # measured tensor -> type -> damage / weighted error
    later = []  # tensors whose damage comes from their kind's anchors, once every anchor is measured
    # a resumed run's bar starts at its recorded tensors, so that its rate and ETA are this run's
    recorded = sum(journal.get(n) is not None for n in names) if journal is not None else 0
    bar = tqdm(total=len(names), initial=recorded, desc="damage", unit="tensor", disable=not progress,
               dynamic_ncols=True)
    for name in names:
        buf = session.weights[name]
        written = list(dict.fromkeys(effective_type(c, buf.shape[-1]) for c in candidates))
        split = per_expert and len(buf.shape) == 3 and "_exps" in name
        rec = journal.get(name) if journal is not None else None
        if rec is not None and (rec.damage is not None) != (name in anchors.measured):
            rec = None  # (recorded under other anchors: the key should have told; measured again)
        if rec is None:
            rec = _measure_tensor(session, ref, buf, written, split, name in anchors.measured, cfg,
                                  imatrix, tokens)
            bar.update(1)
            if journal is not None:
                journal.add(rec)
                if len(table.measured) + len(later) == table.resumed:  # the run's first new record
                    pause_for_test("damage tensor")
        else:
            table.resumed += 1
        for k, v in rec.seconds.items():
            spent[k] += v
        table.passes += rec.passes
        if rec.damage is None:
            later.append((name, rec.errors, written, split))
            continue
        ref_t = effective_type(resolve_type(cfg.reference_type), buf.shape[-1])
        table.measured[name] = (dict(rec.damage) if cfg.method == "direct"
                                else {ref_t.name: _measured_ref(rec.damage, rec.errors, ref_t)})
        per_error[name] = {t: d / e if (e := _total(rec.errors, t)) > 0 else 0.0 for t, d in rec.damage.items()}
        _fill(table, name, rec.damage, rec.errors, written, split)
    bar.close()
    for name, errors, written, split in later:
        damage = anchors.damage(name, per_error, {t.name: _total(errors, t.name) for t in written})
        table.interpolated[name] = anchors.of(name)
        _fill(table, name, damage, errors, written, split)
    table.seconds = {k: round(v, 3) for k, v in spent.items()}
    return table


def _measure_tensor(session: Session, ref: Reference, buf: WeightBuffer, written, split: bool, measured: bool,
                    cfg: DamageConfig, imatrix, tokens) -> TensorRecord:
    """One tensor's weighted errors at every written type (and the reference type), and, when it
    is ``measured`` (an anchor), its damage: the KL through the model."""
    name = buf.name
    ref_t = effective_type(resolve_type(cfg.reference_type), buf.shape[-1])
    types = written if ref_t in written else [*written, ref_t]
    means = split_means(None if imatrix is None else imatrix.get(name), buf)
    t0 = time.perf_counter()
    experts = None if split else sampled_experts(matrices(buf), cfg.max_experts)
    errors = weighted_errors(buf, types, means, None if tokens is None else tokens.get(name),
                             cfg.mse_rows if split else sample_size(buf, experts, cfg), experts)
    seconds = {"weighted_error": time.perf_counter() - t0}
    if not measured:
        return TensorRecord(name, errors, None, seconds)
    t1, fwd0, passes0 = time.perf_counter(), ref.seconds, ref.passes
    damage = _tensor_damage(session, ref, buf, written, ref_t, means, errors, cfg)
    seconds["forward"] = ref.seconds - fwd0
    seconds["fake_quantise"] = time.perf_counter() - t1 - seconds["forward"]
    return TensorRecord(name, errors, damage, seconds, ref.passes - passes0)


def _total(errors: Mapping, type_name: str) -> float:
    """A tensor's weighted error at one type: the sum over its (sampled) matrices."""
    return sum(err[type_name] for err in errors.values())


def _measured_ref(damage, errors, ref_t) -> float:
    # the one KL measured under "estimate": damage at any written type t times E(ref)/E(t); when the
    # reference type is itself a candidate it is simply damage[ref]
    if ref_t.name in damage:
        return damage[ref_t.name]
    t, d = next(iter(damage.items()))
    e_t = sum(err[t] for err in errors.values())
    return d * sum(err[ref_t.name] for err in errors.values()) / e_t if e_t > 0 else d


def _fill(table: DamageTable, name: str, damage: dict[str, float], errors, written, per_expert: bool) -> None:
    """Items of the table: the tensor, or each expert slice with its share of the tensor's error."""
    if not per_expert:
        table.costs[(name, None)] = damage
        table.weighted_error[(name, None)] = {t.name: sum(err[t.name] for err in errors.values()) for t in written}
        return
    for e, err in errors.items():
        costs = {}
        for t in written:
            total = sum(x[t.name] for x in errors.values())
            costs[t.name] = damage[t.name] * (err[t.name] / total if total > 0 else 1.0 / len(errors))
        table.costs[(name, e)] = costs
        table.weighted_error[(name, e)] = {t.name: err[t.name] for t in written}

"""Allocation stage: spectral statistics -> one GGUF quant type per tensor (or per expert slice).

Input: the spectral stage's `MatrixStats` (one per analysed matrix / expert slice) and a
`TensorInfo` for *every* tensor of the model. Output: a `Plan` holding, for every allocation item,
its cost per candidate type (Eq. 4), the chosen type (the exact optimum of Eq. 5 as a
multiple-choice knapsack, see alphaq.allocate.solver) and its bytes; the policy types of the tensors that
are not allocated; and the predicted file size. See docs/ALLOCATION.md for every rule used here.

Types are always the type *written*: a candidate whose block does not divide a tensor's row
length is replaced by llama.cpp's fallback (qtypes.effective_type) before costs and sizes are
computed, and the plan records which items fell back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from alphaq import __version__
from alphaq.allocate.costs import NOISE_MODELS, Importance, importance_weights, paper_noise
from alphaq.errors import AlphaQError, BudgetError, InputError
from alphaq.files import atomic_write_text
from alphaq.allocate.overrides import Pins, compile_pattern, parse_tensor_type, pin_type, resolve_pins
from alphaq.gguf.qtypes import (
    DEFAULT_CANDIDATES,
    FULL_LADDER,
    effective_type,
    llama_quantizes,
    nominal_bits,
    padded,
    resolve_type,
    resolve_types,
    tensor_bytes,
)
from alphaq.model.weights import sampled_experts
from alphaq.records import MatrixStats
from alphaq.allocate.solver import SOLVERS, solve_mckp
from alphaq.allocate.time_cap import solve_time_capped
from alphaq.gguf.speed import mean_quantise_ns, quantise_ns

if TYPE_CHECKING:  # (imported where needed: it brings torch)
    from alphaq.spectral.alpha import SpectralConfig

logger = logging.getLogger(__name__)

BUDGET_MODES = ("bits", "bpw", "size")  # --budget, --bpw, --target-size
GRANULARITIES = ("tensor", "expert")
SCOPES = ("global", "block")
# "experts": routed experts only; "all": every analysed in-block weight; "every": every tensor
# llama.cpp quantises, token embeddings and output head included (the damage cost's default)
ALLOCATE = ("experts", "all", "every")

TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"

# The three ways to allocate (docs/ALLOCATION.md):
#   damage: KL damage measured on the model's own text, every tensor, the whole type ladder (default:
#           it measured best at every size, bench/RESULTS.md); runs the model through llama.cpp
#   fast:   AlphaQ with gamma 1 over the routed experts, the paper's noise model and its 1-4 bit
#           types; no forward pass at all (the previous default)
#   paper:  the same with the paper's App. A.7 gamma formula: the method as published
MODES: dict[str, dict] = {
    "damage": dict(noise="damage", allocate="every", types=FULL_LADDER, gamma=0.0),
    "fast": dict(noise="paper", allocate="experts", types=DEFAULT_CANDIDATES, gamma=1.0),
    "paper": dict(noise="paper", allocate="experts", types=DEFAULT_CANDIDATES, gamma=None),
}

# --fast analyses the spectra of this many evenly spaced experts of each merged expert tensor and
# scales the tensor's cost up to all of them (a tensor has one type at tensor granularity, so its
# cost is a sum over experts that a sample estimates). At Qwen3-30B-A3B's 128 experts the spectral
# stage was most of the time --fast adds to the stock pipeline (bench/SELFCAL.md, "Sampled experts
# in --fast"). The paper mode and expert granularity read every expert.
FAST_ALPHA_EXPERTS = 16

# --fast pools the eigenvalues of at most this many evenly spaced FARMS blocks per matrix: the
# reference code's FARMS_MAX_BLOCKS (it draws them at random). A Mixtral-8x7B expert has 896
# blocks of 256 x 256, so this is 3.5x less spectral work there; no zoo matrix has more than 256
# (bench/farms-blocks.json measures what the cap moves on matrices that large). The paper mode,
# the damage mode and `alphaq analyze` pool every block.
FAST_FARMS_BLOCKS = 256


def is_fast(cfg: "PlanConfig") -> bool:
    """Whether ``cfg`` allocates as the fast mode does (its candidate types may differ)."""
    return all(getattr(cfg, k) == v for k, v in MODES["fast"].items() if k != "types")


def _spectral_count(given: int | str | None, cfg: "PlanConfig", *, option: str, what: str, minimum: int,
                    auto: int | None) -> int | None:
    """A spectral sampling option (``option``, as the Python front door spells it) resolved for the
    plan ``cfg``: a count of at least ``minimum`` ``what``, None ('all': every one) or "auto" (``auto``).
    A count is refused where no alpha is read (the damage mode without --gamma)."""
    if given == "all":
        given = None
    if given == "auto":
        return auto
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < minimum):
        raise AlphaQError(f"{option} {given!r} is not a number of {what} >= {minimum}, 'all' or 'auto'")
    if given is not None and cfg.noise == "damage" and cfg.gamma == 0:
        raise AlphaQError(f"--{option.replace('_', '-')} {given} has no effect: the default (damage) mode reads no "
                          "alpha unless --gamma is set")
    return given


def alpha_experts(given: int | str | None, cfg: "PlanConfig") -> int | None:
    """--alpha-experts resolved for the plan ``cfg``: how many evenly spaced experts of each merged
    tensor the spectral stage analyses (None: all). ``given``: a count, None ('all') or "auto"
    (FAST_ALPHA_EXPERTS in the fast mode at tensor granularity, else all)."""
    n = _spectral_count(given, cfg, option="alpha_experts", what="experts", minimum=2,
                        auto=FAST_ALPHA_EXPERTS if is_fast(cfg) and cfg.granularity == "tensor" else None)
    if n is not None and cfg.granularity == "expert":  # (auto is None there)
        raise AlphaQError(f"--alpha-experts {n} samples experts; --granularity expert needs every expert's alpha "
                          "(--alpha-experts all)")
    return n


def farms_max_blocks(given: int | str | None, cfg: "PlanConfig") -> int | None:
    """--farms-max-blocks resolved for the plan ``cfg``: how many evenly spaced FARMS blocks of a
    matrix the spectral stage pools (None: all). ``given``: a count, None ('all') or "auto"
    (FAST_FARMS_BLOCKS in the fast mode, else all)."""
    return _spectral_count(given, cfg, option="farms_max_blocks", what="blocks", minimum=1,
                           auto=FAST_FARMS_BLOCKS if is_fast(cfg) else None)


def spectral_config(cfg: "PlanConfig", alpha_experts_given: int | str | None = "auto",
                    farms_blocks_given: int | str | None = "auto", **fields) -> "SpectralConfig":
    """The spectral stage's settings for the plan ``cfg``: --alpha-experts and --farms-max-blocks
    resolved, other SpectralConfig ``fields`` as given."""
    from alphaq.spectral.alpha import SpectralConfig

    return SpectralConfig(max_experts=alpha_experts(alpha_experts_given, cfg),
                          max_blocks=farms_max_blocks(farms_blocks_given, cfg), **fields)


# KV metadata allowance when the caller gives no header size: typical tokenizer metadata
# (tokens, scores/types, BPE merges) of a 32k-150k vocabulary is 1-6 MB.
DEFAULT_KV_METADATA_BYTES = 4 * 1024 * 1024



# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF tensor name, e.g. "blk.0.ffn_down_exps.weight"
    shape: tuple[int, ...]  # numpy order: (n_expert, rows, cols), (rows, cols) or (n,); GGUF ne reversed
    dtype: str  # GGML type name of the source tensor: "F32", "F16", "BF16", ...

    @property
    def cols(self) -> int:  # row length = ggml ne0
        return int(self.shape[-1])

    @property
    def n_elements(self) -> int:
        return math.prod(int(s) for s in self.shape)


@dataclass(frozen=True)
class PlanConfig:
    # what the budget counts: "bits" = parameter-weighted average NOMINAL bits of the allocated
    # weights (the paper's "bits per layer", --budget); "bpw" = their average TRUE bits per weight
    # after fallback (--bpw); "size" = the whole output file in bytes (--target-size)
    budget_mode: str = "bits"
    budget: float = 3.0  # in the mode's unit: bits, bits per weight, or bytes
    types: tuple[str, ...] = DEFAULT_CANDIDATES  # candidate quant types (paper: 1/2/3/4 bits)
    # importance exponent. 1.0 by default because it measured better than the paper's App. A.7
    # formula on every benchmark model (bench/RESULTS.md, docs/DESIGN.md); None = that formula
    gamma: float | None = 1.0
    granularity: str = "tensor"  # "tensor": one type per GGUF tensor (stock llama.cpp); "expert": per slice
    scope: str = "global"  # "global": one budget; "block": the same budget inside every block (Table 4)
    allocate: str = "experts"  # "experts": routed experts only; "all": every analysed in-block weight
    noise: str = "paper"  # "paper": Var * 2^-2b; "measured": ggml quantise/dequantise MSE
    mse_rows: int | None = 128  # measured noise: rows sampled per matrix (evenly spaced); None = all
    weight_by_params: bool = False  # multiply eta by the matrix's parameter count (total noise energy)
    solver: str = "dp"  # "dp" (exact, fast), "highs" (scipy.optimize.milp), "cbc" (PuLP, as the paper)
    # the types of what the allocation leaves out (POLICY_DEFAULTS when None): attention, shared
    # experts and dense FFN (paper: 4-bit); token embeddings; the output head (llama.cpp's choice,
    # also token_embd when tied). Refused where the allocation leaves nothing of the kind out.
    non_expert_type: str | None = None
    token_embd_type: str | None = None
    output_type: str | None = None
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT  # GGUF tensor-data alignment (bytes)
    # pins, llama-quantize's --output-tensor-type / --token-embedding-type / --tensor-type
    # (alphaq.allocate.overrides): fixed items whose bytes count against the budget; the knapsack
    # allocates the rest. tensor_types: (pattern, type) pairs, first match wins; a "PATTERN=TYPE"
    # string is read as llama-quantize reads it (pattern lower-cased)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()
    # llama-quantize's --leave-output-tensor: output.weight keeps its source type (a pin to it)
    leave_output_tensor: bool = False
    # a cap on llama.cpp's quantiser time for the whole file, as the mean ns per quantised weight
    # of its types (one thread, alphaq.gguf.speed's table); None: no cap (alphaq.allocate.time_cap)
    max_quantise_ns: float | None = None

    def __post_init__(self) -> None:
        def one_of(name, value, allowed):
            if value not in allowed:
                raise AlphaQError(f"{name} {value!r} is not one of: {', '.join(allowed)}")

        one_of("budget mode", self.budget_mode, BUDGET_MODES)
        one_of("granularity", self.granularity, GRANULARITIES)
        one_of("scope", self.scope, SCOPES)
        one_of("allocate", self.allocate, ALLOCATE)
        one_of("noise model", self.noise, NOISE_MODELS)
        one_of("solver", self.solver, SOLVERS)
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and self.budget > 0):
            raise BudgetError(f"budget {self.budget} must be a positive finite number")
        resolve_types(self.types)
        check_policy_types(self)
        if self.gamma is not None and not math.isfinite(self.gamma):
            raise AlphaQError(f"gamma {self.gamma} must be finite")
        if self.mse_rows is not None and self.mse_rows < 1:
            raise AlphaQError(f"mse_rows {self.mse_rows} must be >= 1 (or None for all rows)")
        if self.max_quantise_ns is not None and not (math.isfinite(self.max_quantise_ns) and self.max_quantise_ns > 0):
            raise BudgetError(f"max_quantise_ns {self.max_quantise_ns} must be a positive number of ns per weight")
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise AlphaQError(f"alignment {self.alignment} must be a power of two")
        if self.leave_output_tensor and self.output_tensor_type is not None:
            raise AlphaQError("--leave-output-tensor keeps output.weight's type and --output-tensor-type sets it; "
                              "give one")
        for name, flag in (("output_tensor_type", "--output-tensor-type"),
                           ("token_embedding_type", "--token-embedding-type")):
            if getattr(self, name) is not None:  # kept as the canonical type name
                object.__setattr__(self, name, pin_type(getattr(self, name), flag))
        object.__setattr__(self, "tensor_types", tuple(_pin_entry(e) for e in self.tensor_types))

    @property
    def candidates(self) -> tuple[GGMLQuantizationType, ...]:
        return resolve_types(self.types)


def _pin_entry(entry) -> tuple[str, str]:
    if isinstance(entry, str):
        return parse_tensor_type(entry)
    pattern, type_name = entry
    return compile_pattern(pattern).pattern, pin_type(type_name, f"--tensor-type {pattern}={type_name}")


_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """"12GiB" -> bytes. Units B, KB/KiB, MB/MiB, GB/GiB, TB/TiB (case-insensitive); none = bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in ("", *_SIZE_UNITS):
        raise AlphaQError(f"size {text!r} is not a number with an optional unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)")
    value = Fraction(m.group(1)) * _SIZE_UNITS.get(m.group(2).lower(), 1)
    if value <= 0:
        raise AlphaQError(f"size {text!r} must be positive")
    return math.floor(value)


def format_size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.3f} {unit} ({int(n_bytes)} B)"
    return f"{int(n_bytes)} B"


def estimate_header_bytes(
    tensors: Sequence[TensorInfo], kv_bytes: int = DEFAULT_KV_METADATA_BYTES, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
) -> int:
    """GGUF bytes before the tensor data: header, KV metadata (estimated), tensor-info table (exact).

    GGUF v3: magic, version, n_tensors, n_kv (24 B); per tensor: name (u64 length + bytes), n_dims
    (u32), ne (u64 each), type (u32), offset (u64); then padding to `alignment`.
    """
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    return padded(24 + kv_bytes + infos, alignment)


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceStats:
    expert: int | None
    alpha: float  # NaN without signal
    variance: float
    signal: bool
    importance: float  # (alpha_tilde / alpha)^gamma, 1 without signal


@dataclass(frozen=True)
class PlanItem:
    tensor: str
    expert: int | None  # None: the whole tensor (tensor granularity, or a 2-D tensor)
    block: int | None
    kind: str
    shape: tuple[int, ...]  # numpy order of what this item covers
    params: int
    slices: tuple[SliceStats, ...]  # the analysed matrices summed into this item's cost
    costs: dict[str, float]  # candidate name -> eta of the type written for it
    written: dict[str, str]  # candidate name -> type written for it (differs on fallback)
    type: GGMLQuantizationType  # chosen, as written
    bytes: int  # bytes of this item in the chosen type (no padding)

    @property
    def fell_back(self) -> list[str]:
        """Candidates whose type could not be used for this item's row length."""
        return [c for c, w in self.written.items() if c != w]

    @property
    def is_fallback(self) -> bool:
        """The chosen type is not a candidate itself but some candidate's fallback."""
        return self.written.get(self.type.name) != self.type.name

    @property
    def alpha(self) -> float:
        a = [s.alpha for s in self.slices if s.signal]
        return float(np.median(a)) if a else float("nan")

    @property
    def variance(self) -> float:
        return float(np.mean([s.variance for s in self.slices])) if self.slices else float("nan")


@dataclass(frozen=True)
class FixedTensor:
    tensor: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType  # as written
    bytes: int  # no padding
    quantised: bool  # False: llama.cpp copies it in its source type
    reason: str  # why it has this type
    requested: GGMLQuantizationType | None = None  # policy type before fallback


@dataclass(frozen=True)
class PlanTotals:
    n_items: int
    allocated_params: int
    nominal_bits: float  # parameter-weighted average nominal bits over allocated weights
    true_bpw: float  # average stored bits per allocated weight (after fallback, no padding)
    allocated_bytes: int  # allocated tensors, padded to the alignment
    fixed_tensor_bytes: int  # every other tensor, padded
    header_bytes: int  # everything before the tensor data
    header_estimated: bool  # True when header_bytes is an estimate (no fixed_bytes given)
    predicted_file_bytes: int
    model_params: int  # all tensors
    file_bpw: float  # predicted_file_bytes * 8 / model_params
    objective: float  # sum of eta over the chosen types
    lower_bound: float  # LP bound (certificate): objective - lower_bound >= suboptimality
    proven_optimal: bool
    n_fallback_items: int  # items whose chosen type is a fallback
    n_pinned: int = 0  # tensors pinned by --output-tensor-type/--leave-output-tensor/--token-embedding-type/--tensor-type
    pinned_bytes: int = 0  # their bytes, padded (part of fixed_tensor_bytes)
    # llama.cpp's quantiser time for the file's types, mean ns per quantised weight, one thread
    # (alphaq.gguf.speed's table: an estimate, not a timing)
    quantise_ns_per_weight: float = math.nan


@dataclass(frozen=True)
class Plan:
    settings: dict
    items: tuple[PlanItem, ...]
    fixed: tuple[FixedTensor, ...]
    totals: PlanTotals
    tensor_order: tuple[str, ...] = field(repr=False, default=())

    # -- types ---------------------------------------------------------------------------------

    def tensor_types(self, *, mixed: str = "error") -> dict[str, GGMLQuantizationType]:
        """Final written type of every tensor llama.cpp quantises, in model order.

        For expert granularity a merged expert tensor whose slices got different types has no
        single type: mixed="error" raises, mixed="skip" leaves it out (use expert_types()).
        """
        per_tensor: dict[str, set[GGMLQuantizationType]] = defaultdict(set)
        for it in self.items:
            per_tensor[it.tensor].add(it.type)
        for f in self.fixed:
            if f.quantised:
                per_tensor[f.tensor].add(f.type)
        out: dict[str, GGMLQuantizationType] = {}
        for name in self.tensor_order or sorted(per_tensor):
            types = per_tensor.get(name)
            if not types:
                continue
            if len(types) > 1:
                if mixed == "skip":
                    continue
                raise AlphaQError(
                    f"{name} has {len(types)} types across its experts (expert granularity); use expert_types()"
                )
            out[name] = next(iter(types))
        return out

    def expert_types(self) -> dict[tuple[str, int], GGMLQuantizationType]:
        """Written type of every allocated expert slice (both granularities)."""
        out: dict[tuple[str, int], GGMLQuantizationType] = {}
        for it in self.items:
            if it.expert is not None:  # one expert slice (expert granularity; damage items carry no stats)
                out[(it.tensor, it.expert)] = it.type
            for s in it.slices:
                if s.expert is not None:
                    out[(it.tensor, s.expert)] = it.type
        return out

    # -- output --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "items": [_item_json(it) for it in self.items],
            "fixed": [_fixed_json(f) for f in self.fixed],
            "totals": _clean(self.totals.__dict__),
        }

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, items in model order, NaN written as null."""
        return json.dumps(_clean(self.to_dict()), sort_keys=True, indent=1, allow_nan=False) + "\n"

    def write_json(self, path: str | os.PathLike, force: bool = False) -> None:
        _atomic_write(Path(path), self.to_json(), force)

    def tensor_type_lines(self) -> list[str]:
        """`pattern=type` lines for llama-quantize --tensor-type-file (tools/quantize/quantize.cpp
        parses whitespace-separated entries, splits at the first '='; llama-quant.cpp matches with
        std::regex_search and the first match wins), one anchored exact-name pattern per tensor."""
        if self.settings["granularity"] != "tensor":
            raise AlphaQError(
                "a tensor-type file needs tensor granularity: stock llama.cpp has one type per tensor, "
                f"this plan is {self.settings['granularity']}-granular"
            )
        return [f"^{_regex_escape(name)}$={t.name.lower()}" for name, t in self.tensor_types().items()]

    def write_tensor_type_file(self, path: str | os.PathLike, force: bool = False) -> None:
        _atomic_write(Path(path), "\n".join(self.tensor_type_lines()) + "\n", force)


def _regex_escape(name: str) -> str:
    # escape ECMAScript regex metacharacters only (std::regex rejects some of re.escape's escapes)
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", name)


def _clean(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, GGMLQuantizationType):
        return obj.name
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def _item_json(it: PlanItem) -> dict:
    d = {
        "tensor": it.tensor,
        "expert": it.expert,
        "block": it.block,
        "kind": it.kind,
        "shape": list(it.shape),
        "params": it.params,
        "alpha": it.alpha,
        "variance": it.variance,
        "costs": it.costs,
        "type": it.type.name,
        "bytes": it.bytes,
        "fallback": {c: it.written[c] for c in it.fell_back},
    }
    if len(it.slices) == 1:
        d["importance"] = it.slices[0].importance
        d["signal"] = it.slices[0].signal
    else:
        d["slices"] = [s.__dict__ for s in it.slices]
    return d


def _fixed_json(f: FixedTensor) -> dict:
    return {
        "tensor": f.tensor,
        "shape": list(f.shape),
        "type": f.type.name,
        "bytes": f.bytes,
        "quantised": f.quantised,
        "reason": f.reason,
        "fallback_from": f.requested.name if f.requested is not None and f.requested != f.type else None,
    }


def _atomic_write(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise AlphaQError(f"{path} exists; pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------
# making a plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One allocation item before solving."""

    tensor: TensorInfo
    stats: tuple[MatrixStats, ...]  # slices it covers (one for expert granularity / 2-D tensors)
    expert: int | None
    shape: tuple[int, ...]
    scale: float = 1.0  # experts per analysed slice: the cost of a sampled tensor is its slices' x this


def _block_of(name: str, stats: Sequence[MatrixStats]) -> int | None:
    for s in stats:
        if s.block is not None:
            return s.block
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _index(stats: Sequence[MatrixStats], tensors: Sequence[TensorInfo]):
    by_name: dict[str, TensorInfo] = {}
    for t in tensors:
        if t.name in by_name:
            raise AlphaQError(f"tensor {t.name} listed twice")
        by_name[t.name] = t
    by_tensor: dict[str, list[MatrixStats]] = defaultdict(list)
    for s in stats:
        t = by_name.get(s.tensor)
        if t is None:
            raise AlphaQError(f"statistics for {s.tensor}, which is not a tensor of this model")
        if s.expert is not None:  # one slice of a merged (n_expert, rows, cols) tensor
            if not (len(t.shape) == 3 and 0 <= s.expert < t.shape[0] and (s.rows, s.cols) == tuple(t.shape[1:])):
                raise AlphaQError(f"{s.tensor}: expert {s.expert} of {s.rows}x{s.cols} does not fit the tensor {t.shape}")
        elif len(t.shape) < 2 or (s.rows, s.cols) != (math.prod(t.shape[:-1]), t.shape[-1]):
            # a whole tensor; one with more dims (DeepSeek-V2 attn_k_b: (n_head, rows, cols)) is
            # analysed as its (prod of leading dims, cols) matrix
            raise AlphaQError(f"{s.tensor}: stats say {s.rows}x{s.cols}, the tensor is {t.shape}")
        by_tensor[s.tensor].append(s)
    for name, ss in by_tensor.items():
        keys = [s.expert for s in ss]
        if len(set(keys)) != len(keys):
            raise AlphaQError(f"{name}: duplicate statistics for the same expert")
        ss.sort(key=lambda s: -1 if s.expert is None else s.expert)
    return by_name, by_tensor


def _select(by_name, by_tensor, cfg: PlanConfig, pinned: Mapping[str, object]) -> tuple[list[str], list[str], str]:
    """(names of the allocated tensors, pinned tensors the allocation would otherwise hold, the
    effective policy); model order is kept by the caller. A pinned tensor needs no statistics:
    one is in the allocation's set by its name and shape as an analysed one would be."""
    quantised = {n for n, t in by_name.items() if llama_quantizes(n, t.shape)}
    unanalysed_pins = [n for n in by_name if n in quantised and n in pinned and n not in by_tensor]
    if cfg.allocate == "every":
        in_set = [n for n in by_name if n in quantised]
        chosen = [n for n in in_set if n not in pinned]
        missing = [n for n in chosen if n not in by_tensor]
        if missing and cfg.noise != "damage":
            raise AlphaQError(f"--allocate every with the {cfg.noise} noise model needs statistics for every "
                              f"quantised tensor; there are none for {missing[0]}")
        return chosen, [n for n in in_set if n in pinned], "every"
    experts = [n for n, ss in by_tensor.items() if n in quantised and any(s.expert is not None for s in ss)]
    experts += [n for n in unanalysed_pins if len(by_name[n].shape) == 3 and "_exps" in n]
    allocate = cfg.allocate
    if allocate == "experts" and not experts:
        logger.info("no routed-expert statistics: dense model, allocating over all analysed linear layers (App. A.4)")
        allocate = "all"
    if allocate == "experts":
        in_set = experts
    else:
        in_set = [n for n, ss in by_tensor.items() if n in quantised and _block_of(n, ss) is not None]
        in_set += [n for n in unanalysed_pins if _block_of(n, ()) is not None]
    chosen = [n for n in in_set if n not in pinned]
    for n in chosen:
        t, ss = by_name[n], by_tensor[n]
        if any(s.expert is None for s in ss) and len(ss) > 1:
            raise AlphaQError(f"{n}: whole-tensor and per-expert statistics mixed")
        if ss[-1].expert is not None and len(ss) != t.shape[0]:
            _check_sample(n, [s.expert for s in ss], t.shape[0], cfg)
    skipped = [n for n in by_tensor if n not in quantised]
    if skipped:
        logger.debug("statistics for tensors llama.cpp does not quantise are ignored: %s", skipped)
    return chosen, [n for n in in_set if n in pinned], allocate


def _check_sample(name: str, experts: list[int], n_experts: int, cfg: PlanConfig) -> None:
    """Statistics for some of a merged tensor's experts stand for all of them only when they are
    the spectral stage's evenly spaced sample (SpectralConfig.max_experts) and the tensor is one
    item; anything else is missing statistics."""
    if len(experts) >= 2 and experts == sampled_experts(n_experts, len(experts)):
        if cfg.granularity == "expert":
            raise AlphaQError(f"{name}: alpha of {len(experts)} of its {n_experts} experts (a sample); --granularity "
                              "expert needs every expert's (--alpha-experts all)")
        return
    missing = sorted(set(range(n_experts)) - set(experts))
    raise AlphaQError(f"{name}: statistics missing for experts {missing[:8]}{'...' if len(missing) > 8 else ''}")


def _units(chosen, by_name, by_tensor, cfg: PlanConfig) -> list[_Unit]:
    units = []
    for n in chosen:
        t, ss = by_name[n], by_tensor.get(n, [])
        per_expert = cfg.granularity == "expert" and len(t.shape) == 3 and (
            (ss and ss[0].expert is not None) or (not ss and "_exps" in n))
        if per_expert:
            by_expert = {s.expert: s for s in ss}
            units.extend(_Unit(t, (by_expert[e],) if e in by_expert else (), e, tuple(t.shape[1:]))
                         for e in range(t.shape[0]))
        else:  # a sample of the experts stands for all of them (_check_sample)
            sampled = bool(ss) and ss[0].expert is not None and len(ss) < t.shape[0]
            units.append(_Unit(t, tuple(ss), None, tuple(t.shape), t.shape[0] / len(ss) if sampled else 1.0))
    return units


# the policy types' defaults, and the flags that name them and that pin the same tensors
POLICY_DEFAULTS = {"non_expert_type": "Q4_K", "token_embd_type": "Q4_K", "output_type": "Q6_K"}
_POLICY_FLAGS = {"non_expert_type": ("--non-expert-type", "--tensor-type PATTERN=TYPE"),
                 "token_embd_type": ("--token-embd-type", "--token-embedding-type"),
                 "output_type": ("--output-type", "--output-tensor-type")}


def policy_type(cfg: "PlanConfig", name: str) -> GGMLQuantizationType:
    """The type ``cfg`` gives the tensors of policy ``name`` (a PlanConfig field) that it leaves out."""
    return resolve_type(getattr(cfg, name) or POLICY_DEFAULTS[name])


def check_policy_types(cfg: "PlanConfig") -> None:
    """A policy type given where the allocation holds every tensor of its kind would be silently
    unused: refused, naming the pin flag that does set that tensor's type."""
    allocated = {"every": set(POLICY_DEFAULTS), "all": {"non_expert_type"}}.get(cfg.allocate, set())
    for name, (flag, pin) in _POLICY_FLAGS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        resolve_type(value)
        if name in allocated:
            raise AlphaQError(f"{flag} ({name}={value!r}) sets the type of tensors the allocation leaves out, and "
                              f"--allocate {cfg.allocate} leaves none of them out (the default mode allocates every "
                              f"tensor); pin it with {pin} instead")


def measurement_requests(
    stats: Sequence[MatrixStats], tensors: Sequence[TensorInfo], cfg: PlanConfig
) -> dict[tuple[str, int | None], tuple[GGMLQuantizationType, ...]]:
    """For the measured noise model: which written types to measure for which (tensor, expert)."""
    by_name, by_tensor = _index(stats, tensors)
    chosen, _, _ = _select(by_name, by_tensor, cfg, plan_pins(tensors, cfg).types)
    out = {}
    for n in chosen:
        written = tuple(dict.fromkeys(effective_type(c, by_name[n].cols) for c in cfg.candidates))
        for s in by_tensor[n]:
            out[(n, s.expert)] = written
    return out


def _policy_type(name: str, cfg: PlanConfig, tied: bool) -> tuple[GGMLQuantizationType, str]:
    if name == OUTPUT:
        return policy_type(cfg, "output_type"), "policy: output"
    if name == TOKEN_EMBD:
        if tied:  # llama.cpp gives tied embeddings the output tensor's treatment
            return policy_type(cfg, "output_type"), "policy: token_embd (tied to output)"
        return policy_type(cfg, "token_embd_type"), "policy: token_embd"
    return policy_type(cfg, "non_expert_type"), "policy: non-expert"


def make_plan(
    stats: Sequence[MatrixStats],
    tensors: Sequence[TensorInfo],
    cfg: PlanConfig,
    *,
    fixed_bytes: int | None = None,
    noise_table: Mapping[tuple[str, int | None], Mapping[GGMLQuantizationType, float]] | None = None,
    damage: Mapping[tuple[str, int | None], Mapping[str, float]] | None = None,
    kv_bytes: int = DEFAULT_KV_METADATA_BYTES,
) -> Plan:
    """Solve the allocation.

    stats: spectral statistics (one per analysed matrix / expert slice); may be empty with
      cfg.noise == "damage" and gamma 0, which needs no spectral stage.
    tensors: every tensor of the model (TensorInfo), in model order.
    fixed_bytes: bytes of the output file that are not tensor data (GGUF header, KV metadata,
      tensor-info table, padding before the data section). None: estimated (estimate_header_bytes,
      with ``kv_bytes`` of metadata: e.g. feasibility.tokenizer_kv_bytes of an HF checkpoint).
      The bytes of non-allocated tensors are computed here from `tensors`, not passed in.
    noise_table: for cfg.noise == "measured": MSE per (tensor, expert) per written type, as
      returned by alphaq.allocate.costs.measure_noise for measurement_requests(...).
    damage: for cfg.noise == "damage": KL damage per (tensor, expert or None) per written type
      name, as alphaq.damage measures it (alphaq.damage.DamageTable.costs).
    """
    setup = _setup(stats, tensors, cfg, fixed_bytes, kv_bytes)
    imp, weight = _importance(setup.chosen, setup.by_tensor, cfg)
    options = _options(setup.units, cfg, _cost_function(cfg, weight, noise_table, damage))
    groups = _budget_groups(setup, options, cfg)
    choice, objective, lower, proven = _solve(options, cfg, groups, _time_cap(options, setup.fixed, cfg))
    items = _items(setup.units, options, choice, weight, cfg)
    totals = _totals(items, setup.fixed, tensors, cfg, setup.header, fixed_bytes is None, objective, lower, proven)
    settings = {**_settings(cfg, imp, setup.allocate, setup.pins), "alpha_sample": _alpha_sample(setup.units)}
    return Plan(settings, tuple(items), tuple(setup.fixed), totals, tuple(t.name for t in tensors))


def _alpha_sample(units: Sequence[_Unit]) -> dict | None:
    """The tensors whose cost comes from a sample of their experts' alpha (SpectralConfig.max_experts)."""
    sampled = [u for u in units if u.scale != 1.0]
    if not sampled:
        return None
    return {"tensors": len(sampled), "experts_analysed": sorted({len(u.stats) for u in sampled}),
            "experts": sorted({int(u.tensor.shape[0]) for u in sampled})}


def check_budget(stats: Sequence[MatrixStats], tensors: Sequence[TensorInfo], cfg: PlanConfig, *,
                 fixed_bytes: int = 0, reachable: BudgetRange | None = None, source: str = "",
                 size_flag: str = "--target-size") -> Pins:
    """The one budget check before a run's expensive stages (alphaq.allocate.feasibility.check_budget
    derives its inputs from shapes): make_plan's own refusals without costs or solving (pins
    alone over the budget, or no choice of types under it), and, when no tensor is pinned, the
    ``reachable`` range (budget_range; refuses a budget above it too, which make_plan accepts as
    not binding; pins move both ends of it, so with pins only make_plan's checks apply).
    ``tensors`` may be the quantised tensors only and ``fixed_bytes`` 0: a size budget is then
    checked against a lower bound of the file. ``source`` names the model in the range's message,
    ``size_flag`` what set a size budget. Returns the pins."""
    setup = _setup(stats, tensors, cfg, fixed_bytes)
    if reachable is not None and not setup.pins.types:
        check_budget_range(cfg, reachable, source=source, size_flag=size_flag)
    _budget_groups(setup, _options(setup.units, cfg, lambda u, wt: 0.0), cfg)
    return setup.pins


def plan_pins(tensors: Sequence[TensorInfo], cfg: PlanConfig) -> Pins:
    """The pinned type of each tensor a pin takes (alphaq.allocate.overrides.resolve_pins)."""
    output_type, output_flag = cfg.output_tensor_type, "--output-tensor-type"
    if cfg.leave_output_tensor:  # its source type (a model without output.weight: any type; only named unused)
        output_type = next((t.dtype for t in tensors if t.name == OUTPUT), "BF16")
        output_flag = "--leave-output-tensor"
    return resolve_pins(((t.name, t.shape) for t in tensors), output_type, cfg.token_embedding_type,
                        cfg.tensor_types, output_flag=output_flag)


@dataclass
class _Setup:
    """Everything make_plan decides before the costs: what is allocated, what is fixed, and what
    the fixed part takes of the budget."""

    by_tensor: dict[str, list[MatrixStats]]
    pins: Pins
    chosen: list[str]
    allocate: str
    units: list[_Unit]
    fixed: list[FixedTensor]
    header: int
    alloc_cap: int  # bytes of a size budget not available to the items (header, fixed, reserve)
    pinned_load: dict[int | None, tuple[int, int]]  # budget group -> (params, budget units) of its pins
    pinned_bytes: int  # padded bytes of every pinned tensor


def _setup(stats, tensors, cfg: PlanConfig, fixed_bytes: int | None,
           kv_bytes: int = DEFAULT_KV_METADATA_BYTES) -> _Setup:
    by_name, by_tensor = _index(stats, tensors)
    pins = plan_pins(tensors, cfg)
    chosen, pinned_in_set, allocate = _select(by_name, by_tensor, cfg, pins.types)
    if not chosen and not pinned_in_set:
        raise AlphaQError("nothing to allocate: no analysed tensor that llama.cpp quantises")
    units = _units(chosen, by_name, by_tensor, cfg)
    order = {t.name: i for i, t in enumerate(tensors)}
    units.sort(key=lambda u: (order[u.tensor.name], -1 if u.expert is None else u.expert))
    fixed = _fixed_tensors(tensors, set(chosen), by_name, by_tensor, cfg, pins.types)
    header = (estimate_header_bytes(tensors, kv_bytes, cfg.alignment) if fixed_bytes is None
              else int(fixed_bytes))
    if header < 0:
        raise AlphaQError(f"fixed_bytes {fixed_bytes} must be >= 0")
    reserve = _expert_layout_reserve(units, len(cfg.candidates), cfg.alignment)
    alloc_cap = header + sum(padded(f.bytes, cfg.alignment) for f in fixed) + reserve
    by_fixed = {f.tensor: f for f in fixed}
    load: dict[int | None, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for n in pinned_in_set:  # a bits/bpw budget averages over the pins too (size: in alloc_cap)
        f, params = by_fixed[n], by_name[n].n_elements
        size = params * nominal_bits(f.type) if cfg.budget_mode == "bits" else 8 * f.bytes
        g = _block_of(n, ()) if cfg.scope == "block" else None
        load[g] = (load[g][0] + params, load[g][1] + (size if cfg.budget_mode != "size" else 0))
    pinned_bytes = sum(padded(f.bytes, cfg.alignment) for f in fixed if f.tensor in pins.types)
    return _Setup(by_tensor, pins, chosen, allocate, units, fixed, header, alloc_cap, dict(load), pinned_bytes)


@dataclass
class _Options:
    """Every item's candidates: cost, budget size and bytes per candidate (duplicate written types
    have infinite cost, so one written type is one option)."""

    costs: np.ndarray  # (n, m) eta; inf for a duplicate written type
    sizes: np.ndarray  # (n, m) what the budget counts
    times: np.ndarray  # (n, m) llama.cpp's quantiser time for the item in each written type, ns (estimate)
    unit_bytes: np.ndarray  # (n, m) bytes of the item in each candidate's written type
    params: np.ndarray  # (n,)
    written: list[list[GGMLQuantizationType]]
    cand_costs: list[dict[str, float]]


def _importance(chosen, by_tensor, cfg: PlanConfig):
    """alpha importance over the target matrices (every slice of every allocated tensor)."""
    targets = [s for n in chosen for s in by_tensor.get(n, ())]
    if not targets:  # damage costs without a spectral stage: alpha plays no part
        return Importance(float("nan"), 0.0 if cfg.gamma is None else float(cfg.gamma), False, np.ones(0)), {}
    imp = importance_weights(targets, cfg.gamma)
    return imp, {(s.tensor, s.expert): w for s, w in zip(targets, imp.weights)}


def _cost_function(cfg: PlanConfig, weight, noise_table, damage):
    """eta(unit, written type): importance x noise, summed over the unit's slices, or the
    unit's measured damage x its mean importance."""
    if cfg.noise == "damage":
        if damage is None:
            raise AlphaQError("the damage cost needs a damage table (alphaq.damage)")

        def eta(u, wt):
            try:
                d = float(damage[(u.tensor.name, u.expert)][wt.name])
            except KeyError:
                raise AlphaQError(f"no damage measured for {u.tensor.name} expert {u.expert} type {wt.name}") from None
            w = [weight[(s.tensor, s.expert)] for s in u.stats if (s.tensor, s.expert) in weight]
            return d * (float(np.mean(w)) if w else 1.0)

        return eta

    def eta(u, wt):
        total = 0.0
        for s in u.stats:
            if cfg.noise == "paper":
                noise = float(paper_noise(s.variance, nominal_bits(wt)))
            else:
                noise = _lookup_noise(noise_table, s, wt)
            total += weight[(s.tensor, s.expert)] * noise * (s.params if cfg.weight_by_params else 1)
        return total * u.scale

    return eta


def _options(units, cfg: PlanConfig, eta) -> _Options:
    cands = cfg.candidates
    n, m = len(units), len(cands)
    opt = _Options(np.full((n, m), np.inf), np.zeros((n, m), dtype=np.int64), np.zeros((n, m)),
                   np.zeros((n, m), dtype=np.int64), np.array([math.prod(u.shape) for u in units], dtype=np.int64), [], [])
    for i, u in enumerate(units):
        w_types = [effective_type(c, u.tensor.cols) for c in cands]
        opt.written.append(w_types)
        cc: dict[str, float] = {}
        seen: set[GGMLQuantizationType] = set()
        for j, (c, wt) in enumerate(zip(cands, w_types)):
            cc[c.name] = eta(u, wt)
            b = tensor_bytes(wt, u.shape)
            opt.unit_bytes[i, j] = b
            opt.times[i, j] = opt.params[i] * quantise_ns(wt, with_imatrix(cfg))
            if wt in seen:
                continue  # same written type as an earlier candidate: one option
            seen.add(wt)
            opt.costs[i, j] = cc[c.name]
            opt.sizes[i, j] = _budget_size(u, wt, b, cfg)
        if is_fast(cfg):  # the speed mode; the paper mode keeps the candidates' order, as published before
            _drop_slower_twins(opt, i)
        opt.cand_costs.append(cc)
    return opt


def _drop_slower_twins(opt: _Options, i: int) -> None:
    """Of item ``i``'s options with the same cost and the same budget size keep the one llama.cpp's
    quantiser writes fastest (the first of equal times). Such twins are fallbacks that the cost
    cannot tell apart: the fast mode's noise model sees only nominal bits, and on a 1408-wide
    tensor IQ1_S falls back to IQ4_NL while Q2_K and Q3_K fall back to Q4_0, both 4 bits in 4.5
    bpw; IQ4_NL takes about 250 ns a weight to write, Q4_0 about 2 (quantise_speed.json), which
    made --fast's quantise stage 3.7x the stock one at DeepSeek-V2-Lite's shapes. IQ4_NL is the
    better of the two in fact: on the zoo's fixtures whose experts fall back this cost up to 6 %
    in KL (bench/SELFCAL.md, "The fast mode's fallback twins"). The damage mode measures the two
    apart."""
    live = [j for j in range(opt.costs.shape[1]) if np.isfinite(opt.costs[i, j])]
    for j in live:
        twins = [k for k in live if opt.costs[i, k] == opt.costs[i, j] and opt.sizes[i, k] == opt.sizes[i, j]]
        fastest = min(twins, key=lambda k: (opt.times[i, k], k))
        if fastest != j:
            opt.costs[i, j] = np.inf


def _budget_size(u: _Unit, wt: GGMLQuantizationType, n_bytes: int, cfg: PlanConfig) -> int:
    """What the budget counts for unit ``u`` written as ``wt`` (``n_bytes`` unpadded): nominal
    bits x weights, stored bits, or bytes in the file (an expert slice shares its tensor's padding)."""
    if cfg.budget_mode == "bits":
        return math.prod(u.shape) * nominal_bits(wt)
    if cfg.budget_mode == "bpw":
        return 8 * n_bytes
    return padded(n_bytes, cfg.alignment) if cfg.granularity == "tensor" or u.expert is None else n_bytes


def _fixed_tensors(tensors, allocated_names, by_name, by_tensor, cfg: PlanConfig, pinned) -> list[FixedTensor]:
    """Every tensor outside the allocation: copied in its source type, pinned, or a policy type."""
    tied = OUTPUT not in by_name
    fixed: list[FixedTensor] = []
    for t in tensors:
        if t.name in allocated_names:
            continue
        if not llama_quantizes(t.name, t.shape):
            src = _source_type(t)
            fixed.append(FixedTensor(t.name, t.shape, src, tensor_bytes(src, t.shape), False, "not quantised by llama.cpp"))
            continue
        if t.name in pinned:
            req, reason = resolve_type(pinned[t.name][0]), pinned[t.name][1]
        else:
            req, reason = _policy_type(t.name, cfg, tied)
        if t.name not in by_tensor and reason == "policy: non-expert":
            reason = "policy: non-expert (not analysed)"
        wt = effective_type(req, t.cols)
        fixed.append(FixedTensor(t.name, t.shape, wt, tensor_bytes(wt, t.shape), True, reason, req))
    return fixed


def _budget_groups(setup: _Setup, opt: _Options, cfg: PlanConfig) -> list[tuple[int | None, np.ndarray, int]]:
    """(group, its items, its capacity) per budget group (one, or one per block with scope=block),
    after the one-line refusals: the pins alone over the budget, or no choice under it."""
    groups: dict[int | None, list[int]] = defaultdict(list)
    for i, u in enumerate(setup.units):
        groups[_block_of(u.tensor.name, u.stats) if cfg.scope == "block" else None].append(i)
    for g in setup.pinned_load:
        groups.setdefault(g, [])
    if not groups:  # every quantised tensor pinned: a size budget still bounds the file
        groups[None] = []
    _check_pins_alone(setup, cfg, int(opt.params.sum()))
    total_params = int(opt.params.sum())
    budget = Fraction(repr(float(cfg.budget)))  # the decimal the user typed, exactly
    out = []
    for g, idx in sorted(groups.items(), key=lambda kv: (-1 if kv[0] is None else kv[0])):
        idx = np.array(idx, dtype=np.int64)
        g_params = int(opt.params[idx].sum())
        p_params, p_size = setup.pinned_load.get(g, (0, 0))
        if cfg.budget_mode == "size":
            share = Fraction(g_params, total_params) if total_params else Fraction(1)
            cap = math.floor((math.floor(budget) - setup.alloc_cap) * share)
        else:
            cap = math.floor(budget * (g_params + p_params)) - p_size
        sub_c, sub_s = opt.costs[idx], opt.sizes[idx]
        lo = int(np.where(np.isfinite(sub_c), sub_s, np.iinfo(np.int64).max).min(axis=1).sum()) if len(idx) else 0
        hi = int(np.where(np.isfinite(sub_c), sub_s, 0).max(axis=1).sum()) if len(idx) else 0
        if cap < lo:
            raise BudgetError(_infeasible_message(cfg, g, lo, hi, g_params, setup.alloc_cap, total_params,
                                                  (p_params, p_size)))
        if cap >= hi and len(idx):
            where = "" if g is None else f" in block {g}"
            if cfg.budget_mode == "size":  # the file will be smaller than asked: said, not silent
                logger.warning("the size budget is not binding%s: every allocated tensor gets its lowest-noise "
                               "candidate and the file stays below the target (larger types: --types)", where)
            else:
                logger.info("budget is not binding%s: every item gets its lowest-noise type", where)
        out.append((g, idx, cap))
    return out


def _check_pins_alone(setup: _Setup, cfg: PlanConfig, free_params: int) -> None:
    """A one-line refusal when the pinned tensors alone take more than the budget."""
    flags = "--output-tensor-type/--leave-output-tensor/--token-embedding-type/--tensor-type"
    if cfg.budget_mode == "size":
        if setup.pinned_bytes > math.floor(cfg.budget):
            raise BudgetError(f"the pinned tensors ({flags}) alone take {format_size(setup.pinned_bytes)}, more "
                              f"than the target size {format_size(int(cfg.budget))}")
        return
    p_params = sum(p for p, _ in setup.pinned_load.values())
    p_size = sum(s for _, s in setup.pinned_load.values())
    covered = p_params + free_params
    if p_params and p_size > cfg.budget * covered:
        unit = "nominal bits" if cfg.budget_mode == "bits" else "bits per weight"
        raise BudgetError(f"the pinned tensors ({flags}) alone exceed the budget: {p_params:,} of the {covered:,} "
                          f"weights it covers, at {p_size / p_params:.4f} {unit} each, make {p_size / covered:.4f} "
                          f"{unit} on average, above {cfg.budget:g}")


def _time_cap(opt: _Options, fixed: Sequence[FixedTensor], cfg: PlanConfig) -> float | None:
    """The items' share of cfg.max_quantise_ns, in ns: the cap over every quantised weight of the
    file minus what the fixed tensors' types take."""
    if cfg.max_quantise_ns is None:
        return None
    quantised = [f for f in fixed if f.quantised]
    weights = int(opt.params.sum()) + sum(math.prod(f.shape) for f in quantised)
    fixed_ns = sum(math.prod(f.shape) * quantise_ns(f.type, with_imatrix(cfg)) for f in quantised)
    if fixed_ns > cfg.max_quantise_ns * weights:
        raise BudgetError(f"--max-quantise-ns {cfg.max_quantise_ns:g}: the tensors outside the allocation alone take "
                          f"{fixed_ns / weights:.0f} ns per weight of the file")
    return cfg.max_quantise_ns * weights - fixed_ns


def _solve(opt: _Options, cfg: PlanConfig, groups, time_cap: float | None):
    """The exact knapsack per budget group, under the quantiser time cap when there is one:
    choice per unit, summed objective and lower bound, and whether the result is proven optimal."""
    if time_cap is None:
        choice, objective, lower, proven = _solve_groups(opt.costs, opt, cfg, groups, logger.info)
        if not proven:
            logger.warning("the solver could not prove optimality; see totals.lower_bound for the gap")
        return choice, objective, lower, proven
    weights = int(opt.params.sum())  # the cap's own unit in the error: ns per allocated weight
    res = solve_time_capped(lambda costs: _solve_groups(costs, opt, cfg, groups, logger.debug), opt.costs, opt.times,
                            time_cap, sizes=opt.sizes, groups=[(idx, cap) for _, idx, cap in groups],
                            describe=lambda ns: f"{ns / weights:.0f} ns per allocated weight")
    return res.choice, res.objective, res.lower_bound, res.proven_optimal


def _solve_groups(costs: np.ndarray, opt: _Options, cfg: PlanConfig, groups, log):
    choice = np.zeros(costs.shape[0], dtype=np.int64)
    objective = lower = 0.0
    proven = True
    for g, idx, cap in groups:
        if not len(idx):
            continue
        sub_c, sub_s = costs[idx], opt.sizes[idx]
        res = solve_mckp(sub_c, sub_s, cap, solver=cfg.solver)
        log("solved %s%d items x %d types in %.3fs (%s, gap %.3g, core %d)", "" if g is None else f"block {g}: ",
            len(idx), sub_c.shape[1], res.seconds, res.solver, res.gap, res.core_items)
        choice[idx] = res.choice
        objective += res.objective
        lower += res.lower_bound
        proven &= res.proven_optimal
    return choice, objective, lower, proven


def _kind_of(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def _items(units, opt: _Options, choice, weight, cfg: PlanConfig) -> list[PlanItem]:
    items = []
    for i, u in enumerate(units):
        j = int(choice[i])
        slices = tuple(
            SliceStats(s.expert, s.alpha if s.signal else float("nan"), s.variance, s.signal, weight[(s.tensor, s.expert)])
            for s in u.stats
        )
        items.append(PlanItem(
            tensor=u.tensor.name, expert=u.expert, block=_block_of(u.tensor.name, u.stats),
            kind=u.stats[0].kind if u.stats else _kind_of(u.tensor.name), shape=u.shape, params=int(opt.params[i]),
            slices=slices, costs=opt.cand_costs[i], written={c.name: wt.name for c, wt in zip(cfg.candidates, opt.written[i])},
            type=opt.written[i][j], bytes=int(opt.unit_bytes[i, j])))
    return items


def _settings(cfg: PlanConfig, imp: Importance, allocate: str, pins: Pins) -> dict:
    return {
        "alphaq_version": __version__,
        "budget_mode": cfg.budget_mode,
        "budget": cfg.budget,
        "types": [c.name for c in cfg.candidates],
        "gamma": imp.gamma,
        "gamma_source": "App. A.7 formula" if imp.gamma_is_default else "fixed",
        "alpha_tilde": imp.alpha_tilde,
        "importance_log_scale": imp.log_scale,  # eta in this plan = true eta * e^-importance_log_scale
        "granularity": cfg.granularity,
        "scope": cfg.scope,
        "allocate": cfg.allocate,
        "allocate_effective": allocate,
        "noise": cfg.noise,
        "mse_rows": cfg.mse_rows if cfg.noise == "measured" else None,
        "weight_by_params": cfg.weight_by_params,
        "solver": cfg.solver,
        "max_quantise_ns": cfg.max_quantise_ns,
        "policy": {
            "non_expert": policy_type(cfg, "non_expert_type").name,
            "token_embd": policy_type(cfg, "token_embd_type").name,
            "output": policy_type(cfg, "output_type").name,
        },
        "alignment": cfg.alignment,
        "pins": {
            "output_tensor_type": cfg.output_tensor_type,
            "leave_output_tensor": cfg.leave_output_tensor,
            "token_embedding_type": cfg.token_embedding_type,
            "tensor_types": [list(e) for e in cfg.tensor_types],
            "unused": list(pins.unused),  # flags and entries that pin no tensor (warnings)
        },
    }


def _lookup_noise(table, s: MatrixStats, t: GGMLQuantizationType) -> float:
    if table is None:
        raise AlphaQError("the measured noise model needs a noise table (alphaq.allocate.costs.measure_noise)")
    try:
        return float(table[(s.tensor, s.expert)][t])
    except KeyError:
        raise AlphaQError(f"no measured noise for {s.tensor} expert {s.expert} type {t.name}") from None


def _source_type(t: TensorInfo) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[t.dtype.upper()]
    except KeyError:
        raise AlphaQError(f"{t.name}: unknown source dtype {t.dtype!r}") from None


def _infeasible_message(cfg, g, lo, hi, g_params, alloc_cap, total_params, pinned=(0, 0)) -> str:
    where = "" if g is None else f" in block {g} (scope=block)"
    p_params, p_size = pinned
    if cfg.budget_mode in ("bits", "bpw"):
        n = g_params + p_params
        lo_a, hi_a = (lo + p_size) / n, (hi + p_size) / n
        name, unit = ("budget", "nominal bits") if cfg.budget_mode == "bits" else ("bpw", "bits per weight")
        with_pins = f" with the pinned tensors ({p_params:,} of these {n:,} weights)" if p_params else ""
        return (
            f"{name} {cfg.budget} {'nominal bits ' if cfg.budget_mode == 'bits' else ''}is below the smallest "
            f"achievable {lo_a:.4f}{where}{with_pins}; achievable range for these types: "
            f"{lo_a:.4f} .. {hi_a:.4f} {unit}"
        )
    if g is None or not g_params:
        lo_f, hi_f = lo + alloc_cap, hi + alloc_cap
    else:  # the block's share scaled back to a whole file
        lo_f = alloc_cap + lo * total_params / g_params
        hi_f = alloc_cap + hi * total_params / g_params
    return (
        f"target size {format_size(int(cfg.budget))} is below the smallest achievable "
        f"{format_size(lo_f)}{where}; achievable range for this model and these types: "
        f"{format_size(lo_f)} .. {format_size(hi_f)}"
    )


def _expert_layout_reserve(units, n_candidates: int, alignment: int) -> int:
    """Bytes a size budget keeps free for expert granularity: per merged expert tensor, the
    worst case of the expert-groups layout (one padded tensor per type, the map, their tensor
    infos), since the grouping is only known after solving."""
    from alphaq.gguf.expert import ExpertGroups, layout_bytes, layout_info_bytes

    reserve = 0
    for name, shape in sorted({(u.tensor.name, u.tensor.shape) for u in units if u.expert is not None}):
        worst = ExpertGroups(name, shape, (GGMLQuantizationType.F32,) * n_candidates, ((),) * n_candidates)
        reserve += n_candidates * (alignment - 1) + layout_bytes(worst, alignment) + max(0, layout_info_bytes(worst))
    return reserve


def _allocated_layout_bytes(items, tensors, cfg) -> tuple[int, int]:
    """(tensor-data bytes, extra header bytes) of the allocated tensors as they will be written:
    one padded tensor each, or for a merged expert tensor with several types, its type groups."""
    per_tensor: dict[str, list[PlanItem]] = defaultdict(list)
    for it in items:
        per_tensor[it.tensor].append(it)
    if cfg.granularity != "expert":
        return sum(padded(sum(it.bytes for it in its), cfg.alignment) for its in per_tensor.values()), 0
    from alphaq.gguf.expert import group_layouts, layout_bytes, layout_info_bytes

    shapes = {t.name: t.shape for t in tensors}
    types = {(it.tensor, it.expert): it.type for it in items if it.expert is not None}
    layouts = group_layouts(types, shapes)
    data = sum(layout_bytes(layouts[n], cfg.alignment) if n in layouts else padded(sum(it.bytes for it in its), cfg.alignment)
               for n, its in per_tensor.items())
    return data, sum(layout_info_bytes(lay) for lay in layouts.values())


def _totals(items, fixed, tensors, cfg, header, estimated, objective, lower, proven) -> PlanTotals:
    a_params = sum(it.params for it in items)
    per_weight = a_params or math.nan  # every tensor pinned: nothing allocated, averages undefined
    nominal = sum(it.params * nominal_bits(it.type) for it in items) / per_weight
    true_bits = sum(8 * it.bytes for it in items) / per_weight
    allocated_bytes, layout_header = _allocated_layout_bytes(items, tensors, cfg)
    if layout_header:
        header = padded(header + layout_header, cfg.alignment)
    fixed_bytes = sum(padded(f.bytes, cfg.alignment) for f in fixed)
    file_bytes = header + allocated_bytes + fixed_bytes
    model_params = sum(t.n_elements for t in tensors)
    return PlanTotals(
        n_items=len(items),
        allocated_params=a_params,
        nominal_bits=nominal,
        true_bpw=true_bits,
        allocated_bytes=allocated_bytes,
        fixed_tensor_bytes=fixed_bytes,
        header_bytes=header,
        header_estimated=estimated,
        predicted_file_bytes=file_bytes,
        model_params=model_params,
        file_bpw=file_bytes * 8 / model_params,
        objective=objective,
        lower_bound=lower,
        proven_optimal=proven,
        n_fallback_items=sum(1 for it in items if it.is_fallback),
        n_pinned=sum(1 for f in fixed if f.reason.startswith("pinned")),
        pinned_bytes=sum(padded(f.bytes, cfg.alignment) for f in fixed if f.reason.startswith("pinned")),
        quantise_ns_per_weight=_quantise_ns_per_weight(items, fixed, with_imatrix(cfg)),
    )


def with_imatrix(cfg: PlanConfig) -> bool:
    """Whether the file's tensors are quantised with an importance matrix, which makes llama.cpp's
    k-quants 2-3x slower to write (alphaq.gguf.speed): the damage mode always passes one; the
    fast and paper modes pass none (all-ones only for the types llama.cpp refuses without one,
    whose speed is measured only that way)."""
    return cfg.noise == "damage"


def _quantise_ns_per_weight(items, fixed, imatrix: bool) -> float:
    """Mean quantiser ns per quantised weight of the file's types (alphaq.gguf.speed)."""
    return mean_quantise_ns([(it.params, it.type) for it in items]
                            + [(math.prod(f.shape), f.type) for f in fixed if f.quantised], imatrix)


# ----------------------------------------------------------------------------------------------
# budget feasibility from shapes alone (before the float model is written or anything analysed)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetRange:
    """The budgets a model can take with the candidate types, in the budget's own unit (nominal
    bits, bits per weight, or file bytes), from tensor shapes and llama.cpp's shape fallbacks."""

    low: float  # the smallest achievable (every allocated item at its smallest candidate)
    high: float  # the largest the candidates can use (every item at its largest)
    approximate: bool = False  # file bytes with an estimated header: a safe outer bound


def allocated_names(tensors: Sequence[TensorInfo], cfg: PlanConfig, expert_tensors: set[str]) -> list[str]:
    """The tensors the plan will allocate, in model order (the rule of `_select`, from names and
    shapes: ``expert_tensors`` are the merged routed-expert tensors)."""
    quantised = [t.name for t in tensors if llama_quantizes(t.name, t.shape)]
    if cfg.allocate == "every":
        return quantised
    experts = [n for n in quantised if n in expert_tensors]
    if cfg.allocate == "experts" and experts:
        return experts
    return [n for n in quantised if _block_of(n, ()) is not None]


def budget_range(tensors: Sequence[TensorInfo], cfg: PlanConfig, expert_tensors: set[str], *,
                 header: int = 0, extra_high: int = 0) -> BudgetRange:
    """Smallest and largest budget for ``cfg``'s candidates on this model (the tightest block for
    scope "block" in bits / bpw). File bytes add ``header`` to both ends and ``extra_high`` (what
    is not known yet: estimated metadata, tensors of unknown type) to the high end."""
    by_name = {t.name: t for t in tensors}
    chosen = allocated_names(tensors, cfg, expert_tensors)
    if not chosen:
        raise AlphaQError("nothing to allocate: no tensor that llama.cpp quantises")
    units = _units(chosen, by_name, {}, cfg)
    lo: dict[int | None, int] = defaultdict(int)
    hi: dict[int | None, int] = defaultdict(int)
    params: dict[int | None, int] = defaultdict(int)
    for u in units:
        sizes = [_budget_size(u, wt, tensor_bytes(wt, u.shape), cfg)
                 for wt in {effective_type(c, u.tensor.cols) for c in cfg.candidates}]
        g = _block_of(u.tensor.name, ()) if cfg.scope == "block" and cfg.budget_mode != "size" else None
        lo[g] += min(sizes)
        hi[g] += max(sizes)
        params[g] += math.prod(u.shape)
    if cfg.budget_mode != "size":
        return BudgetRange(max(lo[g] / params[g] for g in lo), max(hi[g] / params[g] for g in hi))
    fixed = sum(padded(f.bytes, cfg.alignment) for f in _fixed_tensors(tensors, set(chosen), by_name, {}, cfg, {}))
    base = header + fixed + _expert_layout_reserve(units, len(cfg.candidates), cfg.alignment)
    return BudgetRange(base + lo[None], base + hi[None] + extra_high, approximate=extra_high > 0)


def check_budget_range(cfg: PlanConfig, rng: BudgetRange, *, source: str = "", size_flag: str = "--target-size") -> None:
    """BudgetError when ``cfg.budget`` lies outside ``rng``: the message gives the range. A size
    range that is approximate is a safe outer bound (the exact check runs when the plan is solved)."""
    if rng.low * (1 - 1e-12) <= cfg.budget <= rng.high * (1 + 1e-12):  # rounding of low / high only
        return
    side = "below the smallest" if cfg.budget < rng.low else "above the largest"
    names = [t.name for t in cfg.candidates]
    types = ",".join(names) if len(names) <= 4 else f"{len(names)} from {names[0]} to {names[-1]}"
    where = f" for {source}" if source else ""
    if cfg.budget_mode == "size":
        about = "about " if rng.approximate else ""
        raise BudgetError(
            f"{size_flag} {format_size(cfg.budget)} is {side} file these types ({types}) can give{where}; "
            f"achievable range {about}{format_size(rng.low)} .. {format_size(rng.high)}")
    flag, unit = ("--budget", "nominal bits") if cfg.budget_mode == "bits" else ("--bpw", "bits per weight")
    raise BudgetError(
        f"{flag} {cfg.budget:g} is {side} achievable with these types ({types}){where}; "
        f"achievable range {rng.low:.4f} .. {rng.high:.4f} {unit}"
        + (" (the tightest block, scope=block)" if cfg.scope == "block" else ""))


# ----------------------------------------------------------------------------------------------
# reading a GGUF input (what the `plan` command needs besides the statistics)
# ----------------------------------------------------------------------------------------------


def gguf_tensor_infos(reader: gguf.GGUFReader) -> list[TensorInfo]:
    """TensorInfo of every tensor in a GGUF file, in file order (GGUF ne reversed to numpy order)."""
    return [
        TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors
    ]


def gguf_model_infos(path: Path, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> tuple[list[TensorInfo], int]:
    """(TensorInfo of every tensor, `gguf_output_header_bytes`) of the float GGUF model ``path``,
    from the headers alone; a split GGUF (any part) counts every part's tensors and is quantised
    into one file: the first part's key/values without the split keys, which llama-quant.cpp
    removes."""
    from alphaq.gguf.io import file_header, shard_paths

    heads = [file_header(p) for p in shard_paths(Path(path))]
    tensors = [TensorInfo(r.name, r.shape, r.type.name) for h in heads for r in h.records]
    if not tensors:
        raise InputError(f"{path} has no tensors")
    first = heads[0]
    added = sum(8 + len(key.encode()) + 4 + 4 for key in (gguf.Keys.General.QUANTIZATION_VERSION,
                                                           gguf.Keys.General.FILE_TYPE) if key not in first.keys)
    return tensors, padded(first.kv_end - first.split_kv_bytes + added + sum(h.info_bytes for h in heads), alignment)


def gguf_output_header_bytes(reader: gguf.GGUFReader, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    """Bytes before the tensor data of the file llama_model_quantize writes from this input.

    llama-quant.cpp copies every KV pair and sets general.quantization_version and
    general.file_type (u32 each, added when absent); the tensor-info table keeps its names and
    dimensions. Exact unless the input has split keys (which are removed: then an overestimate).
    """
    if not reader.tensors:
        raise AlphaQError("the GGUF file has no tensors")
    kv_end = min(t.field.offset for t in reader.tensors)  # tensor infos follow the KV section
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in reader.tensors)
    added = 0
    for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
        if key not in reader.fields:
            added += 8 + len(key.encode()) + 4 + 4  # key string, value type, u32 value
    return padded(kv_end + added + infos, alignment)

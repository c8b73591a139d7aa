"""Is the budget possible at all? Decided from tensor shapes and the candidate types alone.

`check_budget` runs before any expensive stage (llama.cpp's converter, the spectral analysis, the
model's own text): it reads only the safetensors headers of an HF checkpoint (alphaq.model.weights) or
the header of a GGUF, and hands what they tell to the budget check (alphaq.allocate.plan.check_budget),
which refuses with a BudgetError that gives the achievable range. The solver
checks the exact size again later (alphaq.allocate.plan); this check never refuses a budget that one
would accept, because every unknown is bounded from the safe side:

* bits and bpw count the allocated weights only, so they are exact from the shapes and the
  shape fallbacks (alphaq.gguf.qtypes.effective_type);
* file bytes of an HF checkpoint: the low end leaves out the GGUF metadata (the tokenizer is only
  written by the converter) and the tensors llama.cpp copies unquantised (norms, routers); the
  high end counts those tensors as F32 and allows for the metadata (DEFAULT_KV_METADATA_BYTES
  plus the tokenizer files' size) and for alphaq's own keys (the plan JSON).
"""

from __future__ import annotations

from pathlib import Path

from alphaq.allocate.overrides import Pins
from alphaq.allocate.plan import (
    DEFAULT_KV_METADATA_BYTES,
    PlanConfig,
    TensorInfo,
    budget_range,
    estimate_header_bytes,
)
from alphaq.allocate.plan import check_budget as plan_check_budget
from alphaq.gguf.qtypes import llama_quantizes
from alphaq.records import MatrixStats
from alphaq.model.weights import ModelWeights, WeightMatrix, open_model

# alphaq's own keys in the output (the alphaq.plan key holds the plan JSON): at most this much per matrix
# or expert slice of the model, plus a fixed part. Measured: ~0.3-0.7 KiB per item with 14 types.
PLAN_KEYS_PER_MATRIX = 4096
PLAN_KEYS_FIXED = 64 * 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")


def tokenizer_kv_bytes(model: Path) -> int:
    """About the metadata bytes of the GGUF llama.cpp's converter makes of the HF checkpoint
    ``model``: the tokenizer dominates it (a token list, scores, types, merges), stored about as
    compactly as its largest vocabulary file holds it (tokenizer.json, or tokenizer.model, or
    vocab.json + merges.txt), plus tokenizer_config.json (the chat template) and 16 KiB of other
    keys. Instead of a flat DEFAULT_KV_METADATA_BYTES, which a small vocabulary is far below."""
    def size(*names: str) -> int:
        return sum((model / n).stat().st_size for n in names if (model / n).is_file())

    vocab = max(size("tokenizer.json"), size("tokenizer.model"), size("vocab.json", "merges.txt"))
    return vocab + size("tokenizer_config.json") + 16 * 1024


def matrix_tensors(mats: list[WeightMatrix]) -> list[TensorInfo]:
    """One TensorInfo per quantisable tensor, in model order: (n_expert, rows, cols) for a merged
    expert tensor, (rows, cols) otherwise (what ggml quantises)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for m in mats:
        if m.expert is None:
            shapes[m.tensor] = (m.rows, m.cols)
        else:
            n = max(shapes.get(m.tensor, (0,))[0], m.expert + 1)
            shapes[m.tensor] = (n, m.rows, m.cols)
    dtype = {m.tensor: m.dtype or "F32" for m in mats}
    return [TensorInfo(n, shp, dtype[n]) for n, shp in shapes.items()]


def quantised_tensors(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """Of an HF checkpoint's ``matrix_tensors``, those llama.cpp will quantise, as the BF16
    intermediate will hold them."""
    return [TensorInfo(t.name, t.shape, "BF16") for t in tensors if llama_quantizes(t.name, t.shape)]


def check_budget(model: Path, cfg: PlanConfig, opened: ModelWeights | None = None,
                 size_flag: str = "--target-size", fixed_bytes: int | None = None) -> Pins:
    """The budget check before any expensive stage (alphaq.allocate.plan.check_budget, with what the
    shapes tell): BudgetError unless ``cfg.budget`` is within what ``cfg``'s candidates can reach
    on ``model`` (HF checkpoint directory or float GGUF) and what the pins leave; reads headers
    only. ``opened``: ``model`` as the caller already opened it (only its list of matrices and
    their shapes is read); ``size_flag``: what set a size budget, for the message; ``fixed_bytes``:
    the output's non-tensor bytes when the caller states them (`alphaq plan --fixed-bytes`). Returns
    the pins (alphaq.allocate.overrides.Pins)."""
    if opened is None:
        with open_model(model) as opened:
            pass
    mats = opened.matrices()
    tensors, header, quantised, known_header = _shapes(model, opened.source, mats, cfg)
    if fixed_bytes is not None:
        header = known_header = fixed_bytes
    rng = budget_range(tensors, cfg, {m.tensor for m in mats if m.expert is not None}, header=header,
                       extra_high=_unknown_bytes(model, opened, tensors, len(mats)))
    names = {t.name for t in quantised}
    stats = [MatrixStats(m.tensor, m.block, m.expert, m.kind, m.rows, m.cols, m.params, float("nan"), float("nan"),
                         0, 0, signal=False) for m in mats if m.tensor in names]
    return plan_check_budget(stats, quantised, cfg, fixed_bytes=known_header, reachable=rng, source=model.name,
                             size_flag=size_flag)


def _shapes(model: Path, source: str, mats: list[WeightMatrix], cfg: PlanConfig):
    """(tensors and header bytes for the reachable range; tensors and header bytes for the plan's
    own checks). A GGUF's are its own, both times. An HF checkpoint's GGUF tensors are known only
    by the matrices it will become: the range estimates the header; the plan's checks take the
    quantised tensors and no header, a lower bound of the file."""
    from alphaq.gguf.io import header_bytes, read_tensors

    if source == "gguf":
        tensors = [TensorInfo(t.name, t.shape, t.type.name) for t in read_tensors(model)]
        header = header_bytes(model)
        return tensors, header, tensors, header
    tensors = matrix_tensors(mats)
    return tensors, estimate_header_bytes(tensors, kv_bytes=0, alignment=cfg.alignment), quantised_tensors(tensors), 0


def _unknown_bytes(model: Path, opened: ModelWeights, tensors: list[TensorInfo], n_matrices: int) -> int:
    """What the high end of a size range allows for the bytes not known from the shapes: alphaq's
    own keys; for an HF checkpoint also the tensors llama.cpp copies unquantised (as F32) and the
    metadata (tokenizer included)."""
    plan_keys = PLAN_KEYS_FIXED + PLAN_KEYS_PER_MATRIX * n_matrices
    if opened.source == "gguf":
        return plan_keys
    unquantised = max(0, opened.n_elements - sum(t.n_elements for t in tensors))
    tokenizer = sum((model / f).stat().st_size for f in TOKENIZER_FILES if (model / f).is_file())
    return 4 * unquantised + DEFAULT_KV_METADATA_BYTES + tokenizer + plan_keys

"""Is the budget possible at all? Decided from tensor shapes and the candidate types alone.

`check_budget` runs before any expensive stage (llama.cpp's converter, the spectral analysis, the
model's own text): it reads only the safetensors headers of an HF checkpoint (alphaq.weights) or
the header of a GGUF, and refuses with a BudgetError that gives the achievable range. The solver
checks the exact size again later (alphaq.plan); this check never refuses a budget that one
would accept, because every unknown is bounded from the safe side:

* bits and bpw count the allocated weights only, so they are exact from the shapes and the
  shape fallbacks (alphaq.qtypes.effective_type);
* file bytes of an HF checkpoint: the low end leaves out the GGUF metadata (the tokenizer is only
  written by the converter) and the tensors llama.cpp copies unquantised (norms, routers); the
  high end counts those tensors as F32 and allows for the metadata (DEFAULT_KV_METADATA_BYTES
  plus the tokenizer files' size) and for alphaq's own keys (the plan JSON).
"""

from __future__ import annotations

from pathlib import Path

from alphaq.plan import (
    DEFAULT_KV_METADATA_BYTES,
    PlanConfig,
    TensorInfo,
    budget_range,
    check_budget_range,
    estimate_header_bytes,
)
from alphaq.weights import ModelWeights, WeightMatrix, open_model

# alphaq's own keys in the output (alphaq.plan holds the plan JSON): at most this much per matrix
# or expert slice of the model, plus a fixed part. Measured: ~0.3-0.7 KiB per item with 14 types.
PLAN_KEYS_PER_MATRIX = 4096
PLAN_KEYS_FIXED = 64 * 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")


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


def check_budget(model: Path, cfg: PlanConfig, opened: ModelWeights | None = None) -> None:
    """BudgetError unless ``cfg.budget`` is within what ``cfg``'s candidates can reach on ``model``
    (HF checkpoint directory or float GGUF); reads headers only. ``opened``: ``model`` as the
    caller already opened it (only its list of matrices and their shapes is read)."""
    from alphaq.gguf_io import header_bytes, read_tensors

    if opened is None:
        with open_model(model) as opened:
            pass
    mats, source, n_elements = opened.matrices(), opened.source, opened.n_elements
    experts = {m.tensor for m in mats if m.expert is not None}
    plan_keys = PLAN_KEYS_FIXED + PLAN_KEYS_PER_MATRIX * len(mats)
    if source == "gguf":
        tensors = [TensorInfo(t.name, t.shape, t.type.name) for t in read_tensors(model)]
        header, extra = header_bytes(model), plan_keys
    else:
        tensors = matrix_tensors(mats)
        header = estimate_header_bytes(tensors, kv_bytes=0, alignment=cfg.alignment)
        unquantised = max(0, n_elements - sum(t.n_elements for t in tensors))
        tokenizer = sum((model / f).stat().st_size for f in TOKENIZER_FILES if (model / f).is_file())
        extra = 4 * unquantised + DEFAULT_KV_METADATA_BYTES + tokenizer + plan_keys
    rng = budget_range(tensors, cfg, experts, header=header, extra_high=extra)
    check_budget_range(cfg, rng, source=model.name)

"""GGML quantisation types as the allocation stage sees them: names, nominal bits, true sizes.

Every storage fact (block size, bytes per block) comes from gguf-py's ``GGML_QUANT_SIZES``;
nothing here retypes a size. The two things that cannot be imported are mirrored from the
llama.cpp that llama-cpp-python 0.3.36 vendors, and tests/test_qtypes.py pins them to it:

* the *nominal* bit width of a type, i.e. the "b" of the paper's Eq. 4-5 (IQ1_S is a 1-bit type,
  Q3_K a 3-bit type, although they store 1.5625 and 3.4375 bits per weight);
* the shape fallback of ``src/llama-quant.cpp`` ``tensor_type_fallback``: a row length (ggml ne0)
  that the type's block size does not divide is written with another type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from alphaq.errors import AlphaQError

# Nominal bits per type: the paper's bit width b for that type (Eq. 4-5: noise 2^(-2b), budget
# N_l * b). Keyed by name so that a gguf-py without a type (Q1_0/Q2_0 are recent) still imports.
# Ternary TQ1_0/TQ2_0 (for ternary-trained models only) and NVFP4 are deliberately left out.
_NOMINAL_BITS_BY_NAME: dict[str, int] = {
    "IQ1_S": 1,
    "IQ1_M": 1,
    "Q1_0": 1,
    "IQ2_XXS": 2,
    "IQ2_XS": 2,
    "IQ2_S": 2,
    "Q2_K": 2,
    "Q2_0": 2,
    "IQ3_XXS": 3,
    "IQ3_S": 3,
    "Q3_K": 3,
    "IQ4_NL": 4,
    "IQ4_XS": 4,
    "Q4_0": 4,
    "Q4_1": 4,
    "Q4_K": 4,
    "MXFP4": 4,
    "Q5_0": 5,
    "Q5_1": 5,
    "Q5_K": 5,
    "Q6_K": 6,
    "Q8_0": 8,
    "F16": 16,
    "BF16": 16,
    "F32": 32,
}

NOMINAL_BITS: dict[GGMLQuantizationType, int] = {
    GGMLQuantizationType[name]: bits
    for name, bits in _NOMINAL_BITS_BY_NAME.items()
    if name in GGMLQuantizationType.__members__ and GGMLQuantizationType[name] in GGML_QUANT_SIZES
}

# Same fallback as llama-quant.cpp `tensor_type_fallback` (the switch on target_type). A type
# that is absent here and has block size <= 32 keeps itself (and then becomes F16 if even that
# does not divide); one absent with a larger block makes llama.cpp throw.
_FALLBACK_BY_NAME: dict[str, str] = {
    # block 256 -> IQ4_NL (block 32)
    "IQ1_S": "IQ4_NL",
    "IQ1_M": "IQ4_NL",
    "IQ2_XXS": "IQ4_NL",
    "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL",
    "IQ3_S": "IQ4_NL",
    "IQ4_XS": "IQ4_NL",
    # -> Q4_0 (block 32)
    "Q2_0": "Q4_0",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    GGMLQuantizationType[src]: GGMLQuantizationType[dst]
    for src, dst in _FALLBACK_BY_NAME.items()
    if src in GGMLQuantizationType.__members__
}

# What llama.cpp writes when even the fallback's block does not divide the row ("must use F16
# due to unusual shape" in tensor_type_fallback).
LAST_RESORT = GGMLQuantizationType.F16

DEFAULT_CANDIDATES: tuple[str, ...] = ("IQ1_S", "Q2_K", "Q3_K", "Q4_K")  # the paper's 1/2/3/4 bits
# every weight type llama.cpp's quantiser writes from 1.56 to 8.5 bits per weight: the default
# path's candidates, so that every size from below IQ1_S's mix to above Q6_K's can be reached
FULL_LADDER: tuple[str, ...] = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q2_K",
                                "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def allowed_type_names() -> list[str]:
    """Type names accepted by `resolve_type`, ordered by nominal bits then true size."""
    return [t.name for t in sorted(NOMINAL_BITS, key=lambda t: (NOMINAL_BITS[t], true_bpw(t), t.name))]


def resolve_type(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    """Parse a type name ("q3_k", "Q3_K", "IQ1_S") into gguf-py's enum."""
    if isinstance(name, GGMLQuantizationType):
        if name not in NOMINAL_BITS:
            raise AlphaQError(
                f"type {name.name} has no nominal bit width here; allowed: {', '.join(allowed_type_names())}"
            )
        return name
    key = str(name).strip().upper()
    t = GGMLQuantizationType.__members__.get(key)
    if t is None or t not in NOMINAL_BITS:
        raise AlphaQError(f"unknown quant type {name!r}; allowed: {', '.join(allowed_type_names())}")
    return t


def resolve_types(names: Sequence[str | GGMLQuantizationType]) -> tuple[GGMLQuantizationType, ...]:
    """Parse a candidate list: at least one type, no duplicates, sorted by nominal bits."""
    if len(names) == 0:
        raise AlphaQError("empty list of quant types; give at least one, e.g. IQ1_S,Q2_K,Q3_K,Q4_K")
    types = [resolve_type(n) for n in names]
    if len(set(types)) != len(types):
        raise AlphaQError(f"duplicate quant types in {[t.name for t in types]}")
    return tuple(sorted(types, key=lambda t: (NOMINAL_BITS[t], true_bpw(t), t.value)))


def nominal_bits(t: GGMLQuantizationType) -> int:
    """The paper's bit width b of a type (1 for IQ1_S, 2 for Q2_K, ...)."""
    return NOMINAL_BITS[resolve_type(t)]


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def true_bpw(t: GGMLQuantizationType) -> float:
    """Stored bits per weight: type_size * 8 / block_size (IQ1_S 1.5625, Q4_K 4.5, ...)."""
    blck, type_size = GGML_QUANT_SIZES[t]
    return type_size * 8 / blck


def effective_type(t: GGMLQuantizationType, row_len: int) -> GGMLQuantizationType:
    """The type llama.cpp actually writes for rows of `row_len` (= ne0 = cols) elements.

    Same rule as llama-quant.cpp `tensor_type_fallback`: keep `t` when its block divides the row;
    otherwise take the fixed fallback, and F16 when the fallback's block does not divide either.
    """
    t = GGMLQuantizationType(t)
    if row_len <= 0:
        raise AlphaQError(f"row length {row_len} must be positive")
    blck = block_size(t)
    if row_len % blck == 0:
        return t
    fb = FALLBACK.get(t)
    if fb is None:
        if blck > 32:
            # llama.cpp throws "no tensor type fallback is defined for type ..."
            raise AlphaQError(
                f"type {t.name} (block {blck}) cannot store rows of {row_len} and llama.cpp defines no fallback for it"
            )
        fb = t
    if row_len % block_size(fb) != 0:
        return LAST_RESORT
    return fb


def row_bytes(t: GGMLQuantizationType, row_len: int) -> int:
    """Bytes of one row of `row_len` elements stored as `t` (ggml_row_size)."""
    blck, type_size = GGML_QUANT_SIZES[t]
    if row_len % blck != 0:
        raise AlphaQError(f"type {t.name} (block {blck}) cannot store rows of {row_len}; see effective_type()")
    return row_len // blck * type_size


def tensor_bytes(t: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy-order `shape` (..., rows, cols) stored as `t`, without padding.

    `t` must already be the written type (pass it through `effective_type` first).
    """
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise AlphaQError("tensor shape is empty")
    n_rows = math.prod(shape[:-1])
    return n_rows * row_bytes(GGMLQuantizationType(t), shape[-1])


def padded(n_bytes: int, alignment: int) -> int:
    """Bytes a tensor occupies in a GGUF data section: its size rounded up to `alignment`."""
    return -(-n_bytes // alignment) * alignment


# llama-quant.cpp `tensor_allows_quantization`: name substrings / exact names never quantised
# (norms, the MoE router, small special tensors). Mirrored literally because llama.cpp matches
# these substrings, not tensor roles; the arch-specific GLM5_NEXT list is left out.
_NEVER_QUANTISED_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTISED_NAMES = (
    gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight",
    gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_TYPES] + ".weight",
)


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims for a numpy-order shape: trailing (ggml-order) dims of size 1 do not count."""
    ne = list(reversed([int(s) for s in shape]))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def quantisable_name(name: str) -> bool:
    """The name part of llama-quant.cpp's rule: ends with 'weight', not excluded by substring."""
    if not name.endswith("weight") or name in _NEVER_QUANTISED_NAMES:
        return False
    return not any(s in name for s in _NEVER_QUANTISED_SUBSTRINGS)


def llama_quantizes(name: str, shape: Sequence[int]) -> bool:
    """Whether llama_model_quantize re-types this tensor (llama-quant.cpp tensor_allows_quantization,
    with quantize_output_tensor on). Everything else is copied in its source type.
    tests/test_convert.py pins this to llama.cpp's own dry-run decisions on every fixture."""
    return ggml_n_dims(shape) >= 2 and quantisable_name(name)

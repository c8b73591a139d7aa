"""Byte layouts the kernels read: ggml blocks, and the expert-granular grouped MoE format.

Block and byte sizes come from gguf-py's ``GGML_QUANT_SIZES``. Where the fields sit inside a
block is not exported by gguf-py (it is implicit in the ``np.hsplit`` calls of
``gguf/quants.py``), so ``BLOCK_FIELDS`` states it once, in the order of the C structs of
ggml/src/ggml-common.h (``block_q4_K`` etc.). The Triton kernels (``kernels/dequant.py``) take
their byte offsets from this table; tests/test_kernels.py checks that it tiles every block exactly
and, through the bit-exact dequantisation tests, that it matches gguf-py.

No Triton here: this module, like ``torch_ref``, must import on a machine without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import IQ1_S, IQ4_NL

from alphaq.errors import AlphaQError

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Field:
    """One field of a ggml block: `size` bytes starting at byte `offset` of the block."""

    name: str
    offset: int
    size: int


def _packed(*named_sizes: tuple[str, int]) -> tuple[Field, ...]:
    """Fields laid out back to back, as in the packed C structs."""
    fields, offset = [], 0
    for name, size in named_sizes:
        fields.append(Field(name, offset, size))
        offset += size
    return tuple(fields)


_QK4_0 = GGML_QUANT_SIZES[Q.Q4_0][0]  # 32 weights per block for all the "legacy" types below
_F16 = 2  # bytes of the ggml_half scales

# Every type a converted AlphaQ file can hold: the candidates (IQ1_S, Q2_K, Q3_K, Q4_K), their
# llama.cpp shape fallbacks (Q4_0, Q5_0, IQ4_NL; alphaq/gguf/qtypes.py FALLBACK), the non-expert types
# (Q6_K, Q8_0) and unquantised tensors (F16, BF16, F32).
BLOCK_FIELDS: dict[GGMLQuantizationType, tuple[Field, ...]] = {
    # superblock of 256 = 8 groups of 32; per group a 3-bit scale, a sign for the +-1/8 shift and
    # 4 grid indices of 11 bits (8 low bits in qs, 3 high bits in qh)
    Q.IQ1_S: _packed(("d", _F16), ("qs", QK_K // 8), ("qh", QK_K // 16)),
    # 16 sub-blocks of 16: 4-bit scale | 4-bit min per sub-block, 2-bit quants
    Q.Q2_K: _packed(("scales", QK_K // 16), ("qs", QK_K // 4), ("d", _F16), ("dmin", _F16)),
    # 16 sub-blocks of 16: 6-bit signed scales packed in 12 bytes; quants = 2 low bits + 1 high bit
    Q.Q3_K: _packed(("hmask", QK_K // 8), ("qs", QK_K // 4), ("scales", 12), ("d", _F16)),
    # 8 sub-blocks of 32: 6-bit scale and 6-bit min packed in 12 bytes, 4-bit quants
    Q.Q4_K: _packed(("d", _F16), ("dmin", _F16), ("scales", 12), ("qs", QK_K // 2)),
    # 16 sub-blocks of 16: int8 scales; quants = 4 low bits + 2 high bits, offset by 32
    Q.Q6_K: _packed(("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", _F16)),
    Q.Q4_0: _packed(("d", _F16), ("qs", _QK4_0 // 2)),
    Q.Q5_0: _packed(("d", _F16), ("qh", _QK4_0 // 8), ("qs", _QK4_0 // 2)),
    Q.IQ4_NL: _packed(("d", _F16), ("qs", _QK4_0 // 2)),
    Q.Q8_0: _packed(("d", _F16), ("qs", _QK4_0)),
    # unquantised: a "block" is one little-endian value
    Q.F16: _packed(("value", 2)),
    Q.BF16: _packed(("value", 2)),
    Q.F32: _packed(("value", 4)),
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(BLOCK_FIELDS)

# The shift IQ1_S adds to every grid value (ggml's IQ1S_DELTA), as gguf-py applies it.
IQ1_S_DELTA = float(IQ1_S.delta)


def check_type(qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """`qtype` as a GGMLQuantizationType, or an AlphaQError naming the supported types."""
    qtype = Q(qtype)
    if qtype not in BLOCK_FIELDS:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise AlphaQError(f"the kernels do not read {qtype.name}; supported types: {names}")
    return qtype


def block_size(qtype: GGMLQuantizationType) -> int:
    """Weights per block."""
    return GGML_QUANT_SIZES[check_type(qtype)][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[check_type(qtype)][1]


def field_offset(qtype: GGMLQuantizationType, name: str) -> int:
    """Byte offset of field `name` inside a block of `qtype`."""
    for field in BLOCK_FIELDS[check_type(qtype)]:
        if field.name == name:
            return field.offset
    raise KeyError(f"{Q(qtype).name} blocks have no field {name!r}")


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes of one row of `n_cols` weights."""
    blck = block_size(qtype)
    if n_cols % blck != 0:
        raise AlphaQError(f"row length {n_cols} is not a multiple of {Q(qtype).name}'s block size {blck}")
    return n_cols // blck * type_size(qtype)


def row_length(qtype: GGMLQuantizationType, bytes_per_row: int) -> int:
    """Weights in a row of `bytes_per_row` bytes."""
    tsize = type_size(qtype)
    if bytes_per_row % tsize != 0:
        raise AlphaQError(f"{bytes_per_row} bytes per row is not a whole number of {Q(qtype).name} blocks ({tsize} B)")
    return bytes_per_row // tsize * block_size(qtype)


def check_weight(data: torch.Tensor, qtype: GGMLQuantizationType, n_dims: int | None = 2) -> int:
    """Validate raw GGUF bytes of shape (..., bytes_per_row); return the row length in weights.

    n_dims: the number of dims `data` must have, or None for any number >= 1.
    """
    qtype = check_type(qtype)
    if data.dtype != torch.uint8:
        raise AlphaQError(f"{qtype.name} weight bytes must be a uint8 tensor, got {data.dtype}")
    if data.dim() != n_dims if n_dims is not None else data.dim() < 1:
        raise AlphaQError(f"{qtype.name} weight bytes must have {n_dims or '>= 1'} dims, got shape {tuple(data.shape)}")
    return row_length(qtype, data.shape[-1])


def lookup_table(qtype: GGMLQuantizationType) -> np.ndarray | None:
    """The float32 value table a type decodes through, flat, or None for types without one.

    IQ1_S: ggml's iq1s_grid (2048 entries of 8 values in {-1, 0, 1}), entry i at [8*i, 8*i+8),
    unpacked by gguf-py's own ``IQ1_S.init_grid`` from its packed copy of the table.
    IQ4_NL: the 16 non-linear levels ``kvalues_iq4nl``.
    """
    qtype = check_type(qtype)
    if qtype == Q.IQ1_S:
        IQ1_S.init_grid()
        return np.ascontiguousarray(IQ1_S.grid, dtype=np.float32).reshape(-1)
    if qtype == Q.IQ4_NL:
        return np.asarray(IQ4_NL.kvalues, dtype=np.float32)
    return None


@dataclass(frozen=True)
class GroupedExperts:
    """One projection (e.g. ffn_up) of one MoE block in the expert-granular format.

    The n_expert experts are split into G type groups. Group g holds its experts, in ascending
    expert order, as raw GGUF blocks of one type:
        qtypes[g]    ggml type t_g
        weights[g]   (n_g, rows, bytes_per_row(t_g)) uint8     # GGUF ne = (cols, rows, n_g)
        slot_map     (G, n_expert) int32: slot of expert e in group g, or -1 if e is not in g
    Every expert is in exactly one group; all groups share rows and cols. G = 1 is a uniformly
    typed projection.
    """

    qtypes: tuple[GGMLQuantizationType, ...]
    weights: tuple[torch.Tensor, ...]
    slot_map: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.qtypes) != len(self.weights) or not self.qtypes:
            raise AlphaQError(f"need one weight tensor per type group, got {len(self.qtypes)} types "
                              f"and {len(self.weights)} tensors")
        shapes = set()
        for t, w in zip(self.qtypes, self.weights):
            shapes.add((w.shape[1], check_weight(w, t, n_dims=3)))
        if len(shapes) != 1:
            raise AlphaQError(f"type groups disagree on (rows, cols): {sorted(shapes)}")
        slots = self.slot_map
        if slots.dtype != torch.int32 or slots.dim() != 2 or slots.shape[0] != len(self.qtypes):
            raise AlphaQError(f"slot_map must be int32 of shape (G={len(self.qtypes)}, n_expert), "
                              f"got {slots.dtype} {tuple(slots.shape)}")
        slots = slots.cpu()
        in_group = slots >= 0
        if not torch.equal(in_group.sum(0), torch.ones(slots.shape[1], dtype=torch.long)):
            raise AlphaQError("every expert must be in exactly one type group (one slot >= 0 per slot_map column)")
        for g, w in enumerate(self.weights):
            # slots of group g must be 0..n_g-1 in ascending expert order
            if not torch.equal(slots[g][in_group[g]], torch.arange(w.shape[0], dtype=torch.int32)):
                raise AlphaQError(f"group {g} ({Q(self.qtypes[g]).name}) has {w.shape[0]} experts but slots "
                                  f"{slots[g][in_group[g]].tolist()}; expected 0..{w.shape[0] - 1} in expert order")

    @property
    def n_expert(self) -> int:
        return self.slot_map.shape[1]

    @property
    def rows(self) -> int:
        return self.weights[0].shape[1]

    @property
    def cols(self) -> int:
        return row_length(self.qtypes[0], self.weights[0].shape[2])

    def expert(self, e: int) -> tuple[GGMLQuantizationType, torch.Tensor]:
        """(type, (rows, bytes_per_row) bytes) of expert `e`."""
        slots = self.slot_map[:, e].tolist()
        g = next(g for g, s in enumerate(slots) if s >= 0)
        return Q(self.qtypes[g]), self.weights[g][slots[g]]

    @classmethod
    def uniform(cls, qtype: GGMLQuantizationType, weight: torch.Tensor) -> GroupedExperts:
        """G = 1: all experts of `weight` (n_expert, rows, bytes_per_row) have type `qtype`."""
        n_expert = weight.shape[0]
        slot_map = torch.arange(n_expert, dtype=torch.int32, device=weight.device).reshape(1, n_expert)
        return cls((Q(qtype),), (weight,), slot_map)

    @classmethod
    def from_experts(cls, qtypes: Sequence[GGMLQuantizationType], experts: Sequence[torch.Tensor]) -> GroupedExperts:
        """Group per-expert (rows, bytes_per_row) bytes by type; groups in order of first appearance."""
        if len(qtypes) != len(experts) or not experts:
            raise AlphaQError(f"need one type per expert, got {len(qtypes)} types for {len(experts)} experts")
        group_types = list(dict.fromkeys(Q(t) for t in qtypes))
        slot_map = torch.full((len(group_types), len(experts)), -1, dtype=torch.int32)
        members: list[list[torch.Tensor]] = [[] for _ in group_types]
        for e, (t, w) in enumerate(zip(qtypes, experts)):
            g = group_types.index(Q(t))
            slot_map[g, e] = len(members[g])
            members[g].append(w)
        device = experts[0].device
        return cls(tuple(group_types), tuple(torch.stack(m) for m in members), slot_map.to(device))

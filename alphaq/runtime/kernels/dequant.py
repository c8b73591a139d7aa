"""Triton dequantisation of raw GGUF blocks, bit-exact with gguf-py's ``gguf.quants.dequantize``.

Every decoder below turns (pointer to a block, index j of a weight inside that block) into the
weight as float32, elementwise over whole tensors of (block, j) pairs, so the same code serves
the dequantisation kernel here and the fused matmuls in ``kernels/matmul.py`` and
``kernels/moe.py``. Bytes are read one at a time: rows are not aligned for wider loads (a Q5_0
block is 22 bytes, its 32-bit qh sits at byte 2).

Bit-exactness: each decoder performs the same float32 operations, in the same order, as the
numpy code of gguf-py 0.19.0 ``gguf/quants.py`` (e.g. Q4_K: (d*sc)*q - (dmin*m), two roundings,
never an FMA). On a GPU every kernel is therefore compiled with ``enable_fp_fusion=False``
(``LAUNCH_OPTIONS``: no mul+add contraction). Byte offsets come from
``alphaq.runtime.kernels.layouts.BLOCK_FIELDS``; change a decoder together with that table.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from alphaq.errors import AlphaQError
from alphaq.runtime.kernels import layouts
from alphaq.runtime.kernels.layouts import Q

# ggml type ids, as compile-time constants for the type dispatch in `dequant_elements`
_IQ1_S = tl.constexpr(int(Q.IQ1_S))
_Q2_K = tl.constexpr(int(Q.Q2_K))
_Q3_K = tl.constexpr(int(Q.Q3_K))
_Q4_K = tl.constexpr(int(Q.Q4_K))
_Q6_K = tl.constexpr(int(Q.Q6_K))
_Q4_0 = tl.constexpr(int(Q.Q4_0))
_Q5_0 = tl.constexpr(int(Q.Q5_0))
_IQ4_NL = tl.constexpr(int(Q.IQ4_NL))
_Q8_0 = tl.constexpr(int(Q.Q8_0))
_F16 = tl.constexpr(int(Q.F16))
_BF16 = tl.constexpr(int(Q.BF16))
_F32 = tl.constexpr(int(Q.F32))


def _at(qtype: Q, field: str) -> tl.constexpr:
    return tl.constexpr(layouts.field_offset(qtype, field))


_IQ1_S_D, _IQ1_S_QS, _IQ1_S_QH = _at(Q.IQ1_S, "d"), _at(Q.IQ1_S, "qs"), _at(Q.IQ1_S, "qh")
_IQ1_S_DELTA = tl.constexpr(layouts.IQ1_S_DELTA)
_Q2_K_SCALES, _Q2_K_QS = _at(Q.Q2_K, "scales"), _at(Q.Q2_K, "qs")
_Q2_K_D, _Q2_K_DMIN = _at(Q.Q2_K, "d"), _at(Q.Q2_K, "dmin")
_Q3_K_HMASK, _Q3_K_QS = _at(Q.Q3_K, "hmask"), _at(Q.Q3_K, "qs")
_Q3_K_SCALES, _Q3_K_D = _at(Q.Q3_K, "scales"), _at(Q.Q3_K, "d")
_Q4_K_D, _Q4_K_DMIN = _at(Q.Q4_K, "d"), _at(Q.Q4_K, "dmin")
_Q4_K_SCALES, _Q4_K_QS = _at(Q.Q4_K, "scales"), _at(Q.Q4_K, "qs")
_Q6_K_QL, _Q6_K_QH = _at(Q.Q6_K, "ql"), _at(Q.Q6_K, "qh")
_Q6_K_SCALES, _Q6_K_D = _at(Q.Q6_K, "scales"), _at(Q.Q6_K, "d")
_Q4_0_D, _Q4_0_QS = _at(Q.Q4_0, "d"), _at(Q.Q4_0, "qs")
_Q5_0_D, _Q5_0_QH, _Q5_0_QS = _at(Q.Q5_0, "d"), _at(Q.Q5_0, "qh"), _at(Q.Q5_0, "qs")
_IQ4_NL_D, _IQ4_NL_QS = _at(Q.IQ4_NL, "d"), _at(Q.IQ4_NL, "qs")
_Q8_0_D, _Q8_0_QS = _at(Q.Q8_0, "d"), _at(Q.Q8_0, "qs")


# ---------------------------------------------------------------------------------------------
# byte and scalar readers


@triton.jit
def _byte(ptr, mask):
    """The unsigned byte at `ptr` as int32 (0 where masked off)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _u16(ptr, mask):
    """Little-endian uint16 at `ptr`, as int32."""
    return _byte(ptr, mask) | (_byte(ptr + 1, mask) << 8)


@triton.jit
def _f16(ptr, mask):
    """Little-endian IEEE half at `ptr`, widened (exactly) to float32."""
    return _u16(ptr, mask).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _signed_byte(ptr, mask):
    """The int8 at `ptr`, as int32."""
    b = _byte(ptr, mask)
    return b - ((b >> 7) << 8)


@triton.jit
def _nibble(qs_ptr, j, HALF: tl.constexpr, mask):
    """4-bit quant j of a block whose low nibbles hold 0..HALF-1 and high nibbles HALF..2*HALF-1."""
    return (_byte(qs_ptr + j % HALF, mask) >> ((j // HALF) * 4)) & 0xF


# ---------------------------------------------------------------------------------------------
# one decoder per type: (block pointers, in-block indices j, mask) -> float32 weights


@triton.jit
def _iq1_s(blk, j, mask, grid_ptr):
    # 8 groups of 32; group ib has a uint16 qh: bits 0-11 the high 3 bits of its 4 grid indices,
    # bits 12-14 the scale s (multiplier 2s+1), bit 15 the sign of the delta
    ib = j // 32
    qh = _u16(blk + _IQ1_S_QH + 2 * ib, mask)
    k = (j % 32) // 8  # which of the 4 grid entries of 8 values
    index = _byte(blk + _IQ1_S_QS + 4 * ib + k, mask) | (((qh >> (3 * k)) & 7) << 8)
    grid = tl.load(grid_ptr + index * 8 + j % 8, mask=mask, other=0.0)
    dl = _f16(blk + _IQ1_S_D, mask) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
    delta = tl.where((qh & 0x8000) != 0, -_IQ1_S_DELTA, _IQ1_S_DELTA)
    return dl * (grid + delta)


@triton.jit
def _q2_k(blk, j, mask):
    # 16 sub-blocks of 16; qs: two halves of 128 weights, each 32 bytes x 4 two-bit planes
    sc = _byte(blk + _Q2_K_SCALES + j // 16, mask)
    dl = _f16(blk + _Q2_K_D, mask) * (sc & 0xF).to(tl.float32)
    ml = _f16(blk + _Q2_K_DMIN, mask) * (sc >> 4).to(tl.float32)
    plane = (j % 128) // 32
    q = (_byte(blk + _Q2_K_QS + (j // 128) * 32 + j % 32, mask) >> (2 * plane)) & 3
    return dl * q.to(tl.float32) - ml


@triton.jit
def _q3_k(blk, j, mask):
    # scale s (16 of them, 6 bits, biased by 32): low 4 bits in nibble s//8 of byte s%8, high 2
    # bits in bit pair s//4 of byte 8 + s%4
    s = j // 16
    low = (_byte(blk + _Q3_K_SCALES + s % 8, mask) >> ((s // 8) * 4)) & 0xF
    high = (_byte(blk + _Q3_K_SCALES + 8 + s % 4, mask) >> ((s // 4) * 2)) & 3
    dl = _f16(blk + _Q3_K_D, mask) * ((low | (high << 4)) - 32).to(tl.float32)
    # 2 low bits as in Q2_K; the high bit is bit j//32 of hmask byte j%32, and subtracts 4 when clear
    plane = (j % 128) // 32
    q_low = (_byte(blk + _Q3_K_QS + (j // 128) * 32 + j % 32, mask) >> (2 * plane)) & 3
    q_high = (_byte(blk + _Q3_K_HMASK + j % 32, mask) >> (j // 32)) & 1
    return dl * (q_low - ((q_high ^ 1) << 2)).to(tl.float32)


@triton.jit
def _q4_k(blk, j, mask):
    # 8 sub-blocks of 32 with a 6-bit scale and min each, packed in 12 bytes (a, b, c = bytes
    # s%4, 4 + s%4, 8 + s%4): s < 4 -> scale a & 63, min b & 63; s >= 4 -> low 4 bits from c,
    # high 2 bits from the top of a (scale) and b (min)
    s = j // 32
    a = _byte(blk + _Q4_K_SCALES + s % 4, mask)
    b = _byte(blk + _Q4_K_SCALES + 4 + s % 4, mask)
    c = _byte(blk + _Q4_K_SCALES + 8 + s % 4, mask)
    first = s < 4
    sc = tl.where(first, a & 63, (c & 0xF) | ((a >> 6) << 4))
    m = tl.where(first, b & 63, (c >> 4) | ((b >> 6) << 4))
    d = _f16(blk + _Q4_K_D, mask) * sc.to(tl.float32)
    dm = _f16(blk + _Q4_K_DMIN, mask) * m.to(tl.float32)
    # qs: 4 chunks of 64 weights, each 32 bytes: low nibbles first, then high nibbles
    q = (_byte(blk + _Q4_K_QS + (j // 64) * 32 + j % 32, mask) >> (((j % 64) // 32) * 4)) & 0xF
    return d * q.to(tl.float32) - dm


@triton.jit
def _q6_k(blk, j, mask):
    # two halves of 128; per half, ql is 64 bytes (low nibbles: weights 0-63, high: 64-127) and
    # qh is 32 bytes of 4 two-bit planes; q is 6 bits biased by 32; int8 scale per 16 weights
    half = j // 128
    r = j % 128
    q_low = (_byte(blk + _Q6_K_QL + half * 64 + r % 64, mask) >> ((r // 64) * 4)) & 0xF
    q_high = (_byte(blk + _Q6_K_QH + half * 32 + r % 32, mask) >> ((r // 32) * 2)) & 3
    q = (q_low | (q_high << 4)) - 32
    dl = _f16(blk + _Q6_K_D, mask) * _signed_byte(blk + _Q6_K_SCALES + j // 16, mask).to(tl.float32)
    return dl * q.to(tl.float32)


@triton.jit
def _q4_0(blk, j, mask):
    q = _nibble(blk + _Q4_0_QS, j, 16, mask) - 8
    return _f16(blk + _Q4_0_D, mask) * q.to(tl.float32)


@triton.jit
def _q5_0(blk, j, mask):
    # the fifth bit of weight j is bit j of the little-endian uint32 qh
    q_high = (_byte(blk + _Q5_0_QH + j // 8, mask) >> (j % 8)) & 1
    q = (_nibble(blk + _Q5_0_QS, j, 16, mask) | (q_high << 4)) - 16
    return _f16(blk + _Q5_0_D, mask) * q.to(tl.float32)


@triton.jit
def _iq4_nl(blk, j, mask, levels_ptr):
    level = tl.load(levels_ptr + _nibble(blk + _IQ4_NL_QS, j, 16, mask), mask=mask, other=0.0)
    return _f16(blk + _IQ4_NL_D, mask) * level


@triton.jit
def _q8_0(blk, j, mask):
    q = _signed_byte(blk + _Q8_0_QS + j, mask)
    return q.to(tl.float32) * _f16(blk + _Q8_0_D, mask)


@triton.jit
def _bf16(blk, mask):
    # bfloat16 is the top half of a float32
    return (_u16(blk, mask) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32(blk, mask):
    bits = _u16(blk, mask).to(tl.uint32) | (_u16(blk + 2, mask).to(tl.uint32) << 16)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dequant_elements(row_ptr, cols, mask, table_ptr, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     TYPE_SIZE: tl.constexpr):
    """Weights at columns `cols` of the rows starting at byte pointers `row_ptr` (broadcast), fp32.

    table_ptr: the type's lookup table (alphaq.runtime.kernels.layouts.lookup_table), ignored by other types.
    """
    blk = row_ptr + (cols // BLOCK_SIZE) * TYPE_SIZE
    j = cols % BLOCK_SIZE
    if QTYPE == _IQ1_S:
        w = _iq1_s(blk, j, mask, table_ptr)
    elif QTYPE == _Q2_K:
        w = _q2_k(blk, j, mask)
    elif QTYPE == _Q3_K:
        w = _q3_k(blk, j, mask)
    elif QTYPE == _Q4_K:
        w = _q4_k(blk, j, mask)
    elif QTYPE == _Q6_K:
        w = _q6_k(blk, j, mask)
    elif QTYPE == _Q4_0:
        w = _q4_0(blk, j, mask)
    elif QTYPE == _Q5_0:
        w = _q5_0(blk, j, mask)
    elif QTYPE == _IQ4_NL:
        w = _iq4_nl(blk, j, mask, table_ptr)
    elif QTYPE == _Q8_0:
        w = _q8_0(blk, j, mask)
    elif QTYPE == _F16:
        w = _f16(blk, mask)
    elif QTYPE == _BF16:
        w = _bf16(blk, mask)
    else:
        tl.static_assert(QTYPE == _F32, "unsupported ggml type")
        w = _f32(blk, mask)
    return w


@triton.jit
def to_output(v, OUT_DTYPE: tl.constexpr):
    """fp32 -> OUT_DTYPE with round-to-nearest-even, identical under the interpreter and on GPU.

    bf16 is rounded with integer ops because the Triton interpreter truncates fp32 -> bf16; this
    way the CPU tests check exactly what a GPU computes: torch's .to(bfloat16) for every non-NaN
    value (NaN stays a quiet NaN; its bits are implementation-defined anyway).
    """
    if OUT_DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        quiet_nan = ((bits >> 16) | 0x40).to(tl.uint16)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000  # rounding could carry a NaN's payload into inf
        out = tl.where(is_nan, quiet_nan, rounded).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(OUT_DTYPE)
    return out


# ---------------------------------------------------------------------------------------------
# host side


# Compile options of every kernel in this package. No mul+add -> FMA contraction (it is on by
# default on GPUs; the interpreter ignores the option): gguf-py rounds products and sums
# separately, and the fused matmuls must decode the very weights `dequantize` returns.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a float torch dtype the kernels accept."""
    if dtype not in _TORCH_TO_TL:
        raise AlphaQError(f"kernels take and return float32, float16 or bfloat16, not {dtype}")
    return _TORCH_TO_TL[dtype]


@functools.cache
def _table_on(qtype: Q, device: torch.device) -> torch.Tensor:
    table = layouts.lookup_table(qtype)
    if table is None:
        return torch.zeros(1, dtype=torch.float32, device=device)  # a valid pointer, never read
    return torch.from_numpy(table).to(device)


def lookup_table_on(qtype: Q, device: torch.device) -> torch.Tensor:
    """The type's lookup table as a float32 tensor on `device`, uploaded once per device."""
    return _table_on(layouts.check_type(qtype), torch.device(device))


@triton.jit
def _dequant_kernel(data_ptr, out_ptr, table_ptr, n_cols, bytes_per_row,
                    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr,
                    OUT_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # grid: (rows, cdiv(n_cols, BLOCK_COLS)); one program writes BLOCK_COLS weights of one row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = cols < n_cols
    w = dequant_elements(data_ptr + row * bytes_per_row, cols, mask, table_ptr, QTYPE, BLOCK_SIZE, TYPE_SIZE)
    tl.store(out_ptr + row * n_cols + cols, to_output(w, OUT_DTYPE), mask=mask)


def dequantize(data: torch.Tensor, qtype: Q, out_dtype: torch.dtype = torch.float32,
               block_cols: int = 256) -> torch.Tensor:
    """(..., bytes_per_row) uint8 GGUF bytes -> (..., cols) weights in `out_dtype`, on data's device."""
    qtype = layouts.check_type(qtype)
    n_cols = layouts.check_weight(data, qtype, n_dims=max(data.dim(), 1))
    rows = data.reshape(-1, data.shape[-1]).contiguous()  # (rows, bytes_per_row)
    out = torch.empty((rows.shape[0], n_cols), dtype=out_dtype, device=data.device)
    if out.numel():
        grid = (rows.shape[0], triton.cdiv(n_cols, block_cols))
        _dequant_kernel[grid](
            rows, out, lookup_table_on(qtype, data.device), n_cols, rows.shape[1],
            QTYPE=int(qtype), BLOCK_SIZE=layouts.block_size(qtype), TYPE_SIZE=layouts.type_size(qtype),
            OUT_DTYPE=triton_dtype(out_dtype), BLOCK_COLS=block_cols, **LAUNCH_OPTIONS,
        )
    return out.reshape(*data.shape[:-1], n_cols)

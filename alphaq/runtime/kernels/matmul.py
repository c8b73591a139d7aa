"""Fused dequantise + matmul on raw GGUF blocks: a GEMV for decode and a GEMM for prefill.

Both dequantise a weight tile into registers with ``alphaq.runtime.kernels.dequant.dequant_elements`` and never
write the dense weight to global memory. Inputs are widened to float32 and accumulation is float32;
the decoded weights are bit for bit those of ``alphaq.runtime.kernels.dequant.dequantize`` (same launch options),
so results differ from ``alphaq.runtime.kernels.torch_ref.linear`` only by float32 summation order
(tests/test_kernels.py states the bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alphaq.errors import AlphaQError
from alphaq.runtime.kernels import layouts
from alphaq.runtime.kernels.dequant import (
    LAUNCH_OPTIONS,
    dequant_elements,
    lookup_table_on,
    to_output,
    triton_dtype,
)
from alphaq.runtime.kernels.layouts import Q


@triton.jit
def row_dots(row_ptr, row_mask, x_ptr, n_cols, table_ptr, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             TYPE_SIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """sum_c W[r, c] * x[c] for the BLOCK_ROWS rows starting at byte pointers `row_ptr`, fp32.

    The column loop runs to `n_cols`; a caller passes 0 to skip the work entirely.
    """
    acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_COLS):
        cols = c0 + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_COLS,)
        w = dequant_elements(row_ptr[:, None], cols[None, :], row_mask[:, None] & col_mask[None, :],
                             table_ptr, QTYPE, BLOCK_SIZE, TYPE_SIZE)  # (BLOCK_ROWS, BLOCK_COLS)
        acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.jit
def _gemv_kernel(w_ptr, x_ptr, out_ptr, table_ptr, n_rows, n_cols, bytes_per_row,
                 QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr,
                 OUT_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # grid: (cdiv(n_rows, BLOCK_ROWS), tokens); w (n_rows, bytes_per_row), x (tokens, n_cols)
    token = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    acc = row_dots(w_ptr + rows.to(tl.int64) * bytes_per_row, row_mask, x_ptr + token * n_cols, n_cols,
                   table_ptr, QTYPE, BLOCK_SIZE, TYPE_SIZE, BLOCK_ROWS, BLOCK_COLS)
    tl.store(out_ptr + token * n_rows + rows, to_output(acc, OUT_DTYPE), mask=row_mask)


@triton.jit
def _gemm_kernel(w_ptr, x_ptr, out_ptr, table_ptr, n_tokens, n_rows, n_cols, bytes_per_row,
                 QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr,
                 OUT_DTYPE: tl.constexpr,
                 BLOCK_TOKENS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # grid: (cdiv(n_tokens, BLOCK_TOKENS), cdiv(n_rows, BLOCK_ROWS)); out = x @ W.T
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    token_mask = tokens < n_tokens
    row_mask = rows < n_rows
    row_ptr = w_ptr + rows.to(tl.int64) * bytes_per_row  # (BLOCK_ROWS,)
    x_row_ptr = x_ptr + tokens.to(tl.int64) * n_cols  # (BLOCK_TOKENS,)
    acc = tl.zeros([BLOCK_TOKENS, BLOCK_ROWS], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_COLS):
        cols = c0 + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        x = tl.load(x_row_ptr[:, None] + cols[None, :], mask=token_mask[:, None] & col_mask[None, :], other=0.0)
        # decoded straight into W.T's layout (BLOCK_COLS, BLOCK_ROWS), so no transpose is needed
        w_t = dequant_elements(row_ptr[None, :], cols[:, None], col_mask[:, None] & row_mask[None, :],
                               table_ptr, QTYPE, BLOCK_SIZE, TYPE_SIZE)
        # fp32 operands, "ieee": true fp32 products (the default tf32 would keep 10 mantissa bits)
        acc = tl.dot(x.to(tl.float32), w_t, acc, input_precision="ieee")
    out = out_ptr + tokens.to(tl.int64)[:, None] * n_rows + rows[None, :]
    tl.store(out, to_output(acc, OUT_DTYPE), mask=token_mask[:, None] & row_mask[None, :])


def _check(x: torch.Tensor, data: torch.Tensor, qtype: Q) -> tuple[Q, int]:
    qtype = layouts.check_type(qtype)
    n_cols = layouts.check_weight(data, qtype)
    triton_dtype(x.dtype)
    if x.shape[-1] != n_cols:
        raise AlphaQError(f"x has {x.shape[-1]} features but the {qtype.name} weight has {n_cols} columns")
    if x.device != data.device:
        raise AlphaQError(f"x is on {x.device} but the weight is on {data.device}")
    return qtype, n_cols


def gemv(x: torch.Tensor, data: torch.Tensor, qtype: Q, block_rows: int = 16, block_cols: int = 256) -> torch.Tensor:
    """W x for each token: x (cols,) or (T, cols), data (rows, bytes_per_row) -> (rows,) or (T, rows).

    Meant for decode (T = 1): each token re-reads the whole weight.
    """
    qtype, n_cols = _check(x, data, qtype)
    xs = x.reshape(-1, n_cols).contiguous()  # (T, cols)
    data = data.contiguous()
    n_rows = data.shape[0]
    out = torch.empty((xs.shape[0], n_rows), dtype=x.dtype, device=x.device)
    if out.numel():
        grid = (triton.cdiv(n_rows, block_rows), xs.shape[0])
        _gemv_kernel[grid](
            data, xs, out, lookup_table_on(qtype, data.device), n_rows, n_cols, data.shape[1],
            QTYPE=int(qtype), BLOCK_SIZE=layouts.block_size(qtype), TYPE_SIZE=layouts.type_size(qtype),
            OUT_DTYPE=triton_dtype(x.dtype), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, **LAUNCH_OPTIONS,
        )
    return out.reshape(*x.shape[:-1], n_rows)


def gemm(x: torch.Tensor, data: torch.Tensor, qtype: Q, block_tokens: int = 16, block_rows: int = 32,
         block_cols: int = 64) -> torch.Tensor:
    """x @ W.T: x (T, cols), data (rows, bytes_per_row) -> (T, rows), for prefill.

    The dot takes fp32 operands with IEEE fp32 products and accumulation, whatever x's dtype, so
    the weights are exactly those of ``dequantize``. A bf16 tensor-core dot would be faster but
    cannot be tested on CPU: the Triton interpreter multiplies bf16 bit patterns in ``tl.dot``
    (triton-lang/triton#11584, 3.6.0 and 3.8.0). Tile sizes must be >= 16 (tl.dot's minimum).
    """
    qtype, n_cols = _check(x, data, qtype)
    if x.dim() != 2:
        raise AlphaQError(f"gemm takes x of shape (T, {n_cols}), got {tuple(x.shape)}")
    x = x.contiguous()
    data = data.contiguous()
    n_tokens, n_rows = x.shape[0], data.shape[0]
    out = torch.empty((n_tokens, n_rows), dtype=x.dtype, device=x.device)
    if out.numel():
        grid = (triton.cdiv(n_tokens, block_tokens), triton.cdiv(n_rows, block_rows))
        _gemm_kernel[grid](
            data, x, out, lookup_table_on(qtype, data.device), n_tokens, n_rows, n_cols, data.shape[1],
            QTYPE=int(qtype), BLOCK_SIZE=layouts.block_size(qtype), TYPE_SIZE=layouts.type_size(qtype),
            OUT_DTYPE=triton_dtype(x.dtype), BLOCK_TOKENS=block_tokens, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            **LAUNCH_OPTIONS,
        )
    return out


def linear(x: torch.Tensor, data: torch.Tensor, qtype: Q) -> torch.Tensor:
    """x (..., cols) @ W.T -> (..., rows): the GEMV for a single token, the GEMM otherwise."""
    n_tokens = x.numel() // max(x.shape[-1], 1)
    if n_tokens == 1:
        return gemv(x, data, qtype)
    flat = x.reshape(-1, x.shape[-1])
    return gemm(flat, data, qtype).reshape(*x.shape[:-1], data.shape[0])

"""Grouped MoE projection over the expert-granular format (``alphaq.runtime.kernels.layouts.GroupedExperts``).

One kernel launch per type group (the type is a compile-time constant). Each launch covers all
T*k (token, chosen expert) pairs; a pair whose expert lives in another group does no work (its
column loop is empty and it stores nothing), so only the selected experts of each group are read
and every pair is written by exactly one launch. No host synchronisation happens between launches.

Each pair is a GEMV (``alphaq.runtime.kernels.matmul.row_dots``): an expert chosen by several tokens is read once
per token. That is the right shape for decode; a prefill path would sort pairs by expert and run a
GEMM per expert (not done here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alphaq.errors import AlphaQError
from alphaq.runtime.kernels import layouts, torch_ref
from alphaq.runtime.kernels.dequant import LAUNCH_OPTIONS, lookup_table_on, to_output, triton_dtype
from alphaq.runtime.kernels.layouts import GroupedExperts
from alphaq.runtime.kernels.matmul import row_dots


@triton.jit
def _group_gemv_kernel(w_ptr, x_ptr, ids_ptr, slots_ptr, out_ptr, table_ptr, top_k, n_rows, n_cols,
                       bytes_per_row, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr,
                       OUT_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # grid: (T*k pairs, cdiv(n_rows, BLOCK_ROWS))
    # w (n_g, n_rows, bytes_per_row) of this group; x (T, n_cols); ids (T*k,); slots (n_expert,)
    # is this group's slot_map row; out (T*k, n_rows)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(slots_ptr + expert)
    in_group = slot >= 0
    token = pair // top_k
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = (rows < n_rows) & in_group
    expert_ptr = w_ptr + tl.maximum(slot, 0).to(tl.int64) * n_rows * bytes_per_row
    cols_to_run = tl.where(in_group, n_cols, 0)  # an expert of another group: empty loop
    acc = row_dots(expert_ptr + rows.to(tl.int64) * bytes_per_row, row_mask, x_ptr + token * n_cols, cols_to_run,
                   table_ptr, QTYPE, BLOCK_SIZE, TYPE_SIZE, BLOCK_ROWS, BLOCK_COLS)
    tl.store(out_ptr + pair * n_rows + rows, to_output(acc, OUT_DTYPE), mask=row_mask)


def expert_outputs(x: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts, block_rows: int = 16,
                   block_cols: int = 256) -> torch.Tensor:
    """out[t, j] = W_{ids[t, j]} x[t]: x (T, cols), ids (T, k) -> (T, k, rows) in x's dtype."""
    torch_ref.check_routing(x, ids, experts)  # one host sync: out-of-range ids would read out of bounds
    if any(w.device != x.device for w in experts.weights) or ids.device != x.device:
        raise AlphaQError(f"x is on {x.device}; ids and every group's weights must be there too")
    out_dtype = triton_dtype(x.dtype)
    x = x.contiguous()
    flat_ids = ids.reshape(-1).contiguous()  # (T*k,) pair p = t*k + j
    slot_map = experts.slot_map.to(x.device).contiguous()
    out = torch.empty((*ids.shape, experts.rows), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (flat_ids.shape[0], triton.cdiv(experts.rows, block_rows))
    for g, (qtype, weight) in enumerate(zip(experts.qtypes, experts.weights)):
        weight = weight.contiguous()
        _group_gemv_kernel[grid](
            weight, x, flat_ids, slot_map[g], out, lookup_table_on(qtype, weight.device), ids.shape[1],
            experts.rows, experts.cols, weight.shape[2],
            QTYPE=int(qtype), BLOCK_SIZE=layouts.block_size(qtype), TYPE_SIZE=layouts.type_size(qtype),
            OUT_DTYPE=out_dtype, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, **LAUNCH_OPTIONS,
        )
    return out


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """One MoE projection with router weights applied and summed over the top-k: (T, rows).

    The weighted sum has nothing to dequantise, so it is the reference's plain torch ``combine``.
    """
    return torch_ref.combine(expert_outputs(x, ids, experts), weights)

"""Plain torch reference path: gguf-py dequantises (numpy, CPU), torch multiplies in fp32.

This is the CPU runtime path and the oracle the Triton kernels are tested against. It mirrors
their API (``dequantize``, ``linear``, ``expert_outputs``, ``moe``) and needs no Triton.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from alphaq.errors import AlphaQError
from alphaq.runtime.kernels import layouts
from alphaq.runtime.kernels.layouts import GroupedExperts


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """(..., bytes_per_row) uint8 GGUF bytes -> (..., cols) float32, on `data`'s device."""
    qtype = layouts.check_type(qtype)
    layouts.check_weight(data, qtype, n_dims=None)
    raw = np.ascontiguousarray(data.detach().cpu().numpy())
    dense = gguf_dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).to(data.device)


def linear(x: torch.Tensor, data: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """x (..., cols) @ W.T for W = the (rows, cols) dequantised weight; fp32 math, x's dtype out."""
    w = dequantize(data, qtype)
    if x.shape[-1] != w.shape[1]:
        raise AlphaQError(f"x has {x.shape[-1]} features but the {layouts.Q(qtype).name} weight has {w.shape[1]} columns")
    return (x.float() @ w.T).to(x.dtype)


def check_routing(x: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts) -> None:
    """x (T, cols), ids (T, k) integer expert ids in [0, n_expert); shared by the Triton path."""
    if x.dim() != 2 or x.shape[1] != experts.cols:
        raise AlphaQError(f"x must be (T, {experts.cols}), got {tuple(x.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.dtype not in (torch.int32, torch.int64):
        raise AlphaQError(f"ids must be int32/int64 of shape (T={x.shape[0]}, k), got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= experts.n_expert):
        raise AlphaQError(f"expert ids must lie in [0, {experts.n_expert}), got [{int(ids.min())}, {int(ids.max())}]")


def expert_outputs(x: torch.Tensor, ids: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """out[t, j] = W_{ids[t, j]} x[t]: (T, k, rows) in x's dtype; dequantises only the chosen experts."""
    check_routing(x, ids, experts)
    out = torch.empty((*ids.shape, experts.rows), dtype=x.dtype, device=x.device)
    for e in torch.unique(ids).tolist():
        qtype, data = experts.expert(e)
        chosen = ids == e  # (T, k)
        tokens = chosen.nonzero()[:, 0]
        out[chosen] = linear(x[tokens], data, qtype)
    return out


def combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * outputs[t, j]: (T, k, rows), (T, k) -> (T, rows), fp32 math, outputs' dtype."""
    if weights.shape != outputs.shape[:2]:
        raise AlphaQError(f"router weights {tuple(weights.shape)} do not match expert outputs {tuple(outputs.shape[:2])}")
    return torch.einsum("tkr,tk->tr", outputs.float(), weights.float()).to(outputs.dtype)


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """One projection of a MoE block, router weights applied and summed over the top-k: (T, rows)."""
    return combine(expert_outputs(x, ids, experts), weights)

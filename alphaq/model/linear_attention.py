"""Gated-DeltaNet (linear attention) projections of Qwen3-Next and Qwen3.5, as llama.cpp's
converter writes them (conversion/qwen.py: `Qwen3NextModel`, `_LinearAttentionVReorderBase`).

The converter does not copy these HF weights as they are:

- Qwen3-Next stores q, k, v and the output gate z in one ``in_proj_qkvz`` whose rows are grouped
  per key head (``[q, k, v, z]`` per head); the GGUF has ``attn_qkv`` (all q heads, then all k,
  then all v) and ``attn_gate`` (all z) instead.
- Qwen3.5 stores them apart, but where there are more value heads than key heads the converter
  reorders the value heads from grouped by key head to tiled order (so that ggml can broadcast
  the key heads): the v rows of ``in_proj_qkv``, the rows of ``in_proj_z``, ``in_proj_a`` and
  ``in_proj_b``, and the columns of ``out_proj``.

A reorder leaves a matrix's singular values, hence alpha, unchanged, but the reader promises the
matrices llama.cpp's converter writes, value for value, so it does the same (tests compare).
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from alphaq.errors import InputError

# architectures whose converter rearranges these projections; QWEN35MOE also reorders value heads
LINEAR_ATTENTION_ARCHS = frozenset({MODEL_ARCH.QWEN3NEXT, MODEL_ARCH.QWEN35MOE})

# one matrix: (GGUF tensor name, rows, cols, float32 loader)
Matrix = tuple[str, int, int, Callable[[], np.ndarray]]


def _heads(cfg: dict) -> tuple[int, int, int, int]:
    """(key heads, value heads per key head, key head dim, value head dim)."""
    try:
        n_k, n_v = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
        return n_k, n_v // n_k, int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise InputError("config.json lacks the linear_num_key_heads, linear_num_value_heads, "
                         "linear_key_head_dim and linear_value_head_dim a linear-attention model needs") from None


def tiled_v_order(n_k: int, per_k: int, head_dim: int) -> np.ndarray:
    """Index that takes value-head rows grouped by key head ``[k0: v0..v(r-1), k1: ...]`` to tiled
    order ``[v0 of k0, v0 of k1, ..., v1 of k0, ...]`` (`_reorder_v_heads`)."""
    return np.arange(n_k * per_k * head_dim).reshape(n_k, per_k, head_dim).transpose(1, 0, 2).reshape(-1)


def qkvz_split(n_k: int, per_k: int, hk: int, hv: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of ``in_proj_qkvz`` that make ``attn_qkv`` and ``attn_gate`` (Qwen3-Next)."""
    group = 2 * hk + 2 * per_k * hv
    rows = np.arange(n_k * group).reshape(n_k, group)
    q, k = rows[:, :hk], rows[:, hk:2 * hk]
    v, z = rows[:, 2 * hk:2 * hk + per_k * hv], rows[:, 2 * hk + per_k * hv:]
    return np.concatenate([q.ravel(), k.ravel(), v.ravel()]), z.ravel()


def block_tensor_name(kind: MODEL_TENSOR, key: str) -> str:
    """The GGUF name of tensor ``kind`` in the block of the HF weight ``key`` (``...layers.N...``),
    for weights the converter renames itself rather than through gguf-py's tensor map."""
    bid = int(key.split(".layers.", 1)[1].split(".", 1)[0])
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def _rows(load: Callable[[], np.ndarray], index: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: load()[index]


def _cols(load: Callable[[], np.ndarray], index: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(load()[:, index])


def linear_attention_matrices(arch: MODEL_ARCH, key: str, shape: tuple[int, ...], cfg: dict, gguf_name: str | None,
                              load: Callable[[], np.ndarray]) -> list[Matrix] | None:
    """The GGUF matrices the HF linear-attention weight ``key`` (no ``.weight``) becomes, or None
    when the converter copies it unchanged (the caller maps it as any other weight)."""
    proj = key.rsplit(".", 1)[-1]
    if arch not in LINEAR_ATTENTION_ARCHS or ".linear_attn." not in key or len(shape) != 2:
        return None
    rows, cols = shape
    if proj == "in_proj_qkvz":  # Qwen3-Next
        qkv, z = qkvz_split(*_heads(cfg))
        if len(qkv) + len(z) != rows:
            raise InputError(f"{key}: {rows} rows do not match the linear-attention heads in config.json")
        return [(block_tensor_name(MODEL_TENSOR.ATTN_QKV, key), len(qkv), cols, _rows(load, qkv)),
                (block_tensor_name(MODEL_TENSOR.ATTN_GATE, key), len(z), cols, _rows(load, z))]
    if arch != MODEL_ARCH.QWEN35MOE or gguf_name is None:
        return None
    n_k, per_k, hk, hv = _heads(cfg)
    if per_k == 1:
        return None  # as many value heads as key heads: nothing to reorder
    if proj == "in_proj_qkv":
        index = np.concatenate([np.arange(2 * n_k * hk), 2 * n_k * hk + tiled_v_order(n_k, per_k, hv)])
    elif proj == "in_proj_z":
        index = tiled_v_order(n_k, per_k, hv)
    elif proj in ("in_proj_a", "in_proj_b"):
        index = tiled_v_order(n_k, per_k, 1)
    elif proj == "out_proj":
        return [(gguf_name, rows, cols, _cols(load, tiled_v_order(n_k, per_k, hv)))]
    else:
        return None
    return [(gguf_name, rows, cols, _rows(load, index))]

"""Torch modules that compute with a GGUF's raw quantised blocks through the Triton kernels.

``install(model, gguf_path)`` swaps, in an HF model already holding that GGUF's weights
(``alphaq.runtime.torch_run``), every ``nn.Linear`` for a ``QuantLinear`` (``alphaq.runtime.kernels.matmul.linear`` on the
tensor's ggml blocks) and every transformers-5 fused experts module for a ``QuantExperts``
(``alphaq.runtime.kernels.moe`` over the type groups of the expert-granular format, ``alphaq.runtime.kernels.layouts.GroupedExperts``).
Embeddings, norms and routers stay dense: they are not matmuls over quantised rows.

Layouts, per HF experts module (transformers 5 ``MixtralExperts`` etc.):
    gate_up_proj (n_expert, 2*inter, hidden)  <- ffn_gate_exps (rows [0, inter)), ffn_up_exps (rows [inter, 2*inter))
    down_proj    (n_expert, hidden, inter)    <- ffn_down_exps
each GGUF projection kept as GroupedExperts: per group (n_g, rows, bytes_per_row) uint8.

Raw rows can be reordered but not re-cut: every ggml type quantises each row on its own, so
llama-style Q/K rows are un-permuted as whole rows (``alphaq.model.weights.unpermute_qk``), while a tensor
whose HF layout cuts across GGUF rows (DeepSeek-2's kv_b_proj, stored per head transposed as
attn_k_b) stays a dense, dequantised ``nn.Linear``.

The kernel modules import Triton on first use; on CPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set before Python imports Triton).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from alphaq.errors import AlphaQError
from alphaq.gguf.expert import group_name, read_layouts
from alphaq.importance.real_text import _arch_of
from alphaq.runtime.torch_ref import head_counts, hf_targets
from alphaq.model.weights import QK_PERMUTED_ARCHS, unpermute_qk
from alphaq.runtime.kernels import torch_ref as kernels_ref
from alphaq.runtime.kernels.layouts import GroupedExperts, check_type, row_length

log = logging.getLogger(__name__)

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Tiles:
    """Launch tiles. For the GEMV and MoE kernels the row block only spreads rows over programs:
    every row is still summed over the same 256-column tiles, so results do not depend on it."""

    rows: int = 16  # GEMV and MoE row block (the kernels' defaults)
    gemm: tuple[int, int, int] = (16, 32, 64)  # GEMM (tokens, rows, cols)


GPU_TILES = Tiles()
# Triton's interpreter runs every program as a sequence of numpy calls, so its cost is per program:
# on CPU, few large programs.
INTERPRETER_TILES = Tiles(rows=256, gemm=(16, 256, 64))


def tiles_for(x: torch.Tensor) -> Tiles:
    return INTERPRETER_TILES if x.device.type == "cpu" else GPU_TILES


class QuantLinear(nn.Module):
    """y = x W^T + b with W kept as its GGUF blocks: (out_features, bytes_per_row) uint8."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, bias: torch.Tensor | None):
        super().__init__()
        self.qtype = check_type(qtype)
        self.out_features = data.shape[0]
        self.in_features = row_length(self.qtype, data.shape[1])
        self.register_buffer("data", data, persistent=False)  # (out_features, bytes_per_row)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from alphaq.runtime.kernels import matmul

        tiles = tiles_for(x)
        flat = x.reshape(-1, self.in_features)  # (T, in_features)
        if flat.shape[0] == 1:  # decode: the GEMV, as alphaq.runtime.kernels.matmul.linear dispatches
            y = matmul.gemv(flat, self.data, self.qtype, block_rows=tiles.rows)
        else:
            y = matmul.gemm(flat, self.data, self.qtype, *tiles.gemm)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


_PROJECTIONS = ("gate", "up", "down")


class QuantExperts(nn.Module):
    """Drop-in for a transformers-5 fused experts module, forward(x (T, hidden), ids (T, k),
    weights (T, k)) -> (T, hidden): sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)), e = ids[t, j].

    Each projection is a GroupedExperts; its tensors are buffers (so ``.to(device)`` moves them)
    and the GroupedExperts views are rebuilt after every move (``_apply``).
    """

    def __init__(self, gate: GroupedExperts, up: GroupedExperts, down: GroupedExperts, act_fn: nn.Module):
        super().__init__()
        if not (gate.n_expert == up.n_expert == down.n_expert and gate.rows == up.rows == down.cols
                and gate.cols == up.cols == down.rows):
            raise AlphaQError(f"expert projections disagree: gate {gate.n_expert}x{gate.rows}x{gate.cols}, "
                              f"up {up.n_expert}x{up.rows}x{up.cols}, down {down.n_expert}x{down.rows}x{down.cols}")
        self.act_fn = act_fn
        self.qtypes: dict[str, tuple[GGMLQuantizationType, ...]] = {}  # projection -> type of each group
        for name, proj in zip(_PROJECTIONS, (gate, up, down)):
            self.qtypes[name] = proj.qtypes
            for g, w in enumerate(proj.weights):
                self.register_buffer(f"{name}_g{g}", w, persistent=False)  # (n_g, rows, bytes_per_row)
            self.register_buffer(f"{name}_map", proj.slot_map, persistent=False)  # (G, n_expert)
        self._views()

    def _views(self) -> None:
        self.projections = {
            name: GroupedExperts(qtypes, tuple(getattr(self, f"{name}_g{g}") for g in range(len(qtypes))),
                                 getattr(self, f"{name}_map"))
            for name, qtypes in self.qtypes.items()}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._views()
        return self

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        from alphaq.runtime.kernels import moe

        p, rows = self.projections, tiles_for(x).rows
        gate = moe.expert_outputs(x, top_k_index, p["gate"], block_rows=rows)  # (T, k, inter)
        up = moe.expert_outputs(x, top_k_index, p["up"], block_rows=rows)  # (T, k, inter)
        h = self.act_fn(gate) * up
        n_tok, k, inter = h.shape
        # down: every (token, slot) pair has its own input row, so run it as T*k "tokens" with k = 1
        down = moe.expert_outputs(h.reshape(n_tok * k, inter), top_k_index.reshape(n_tok * k, 1), p["down"],
                                  block_rows=rows)
        return kernels_ref.combine(down.reshape(n_tok, k, -1), top_k_weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}=[{'/'.join(Q(t).name for t in ts)}]" for name, ts in self.qtypes.items())


def raw_blocks(tensor: gguf.ReaderTensor) -> tuple[GGMLQuantizationType, torch.Tensor]:
    """A GGUF tensor as (type, uint8 bytes of shape (*outer dims, rows, bytes_per_row)), numpy order."""
    qtype = check_type(Q(int(tensor.tensor_type)))
    data = np.asarray(tensor.data)
    if data.dtype != np.uint8:  # F32 / F16 come back typed; their bytes are the row
        data = data.view(np.uint8)
    dims = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF ne = (cols, rows, ...) -> (..., rows, cols)
    return qtype, torch.from_numpy(np.array(data).reshape(*dims[:-1], -1))


def _check_fused_experts(name: str, mod: nn.Module) -> None:
    """The kernel path computes act(gate) * up -> down on concatenated, untransposed, bias-free
    weights; refuse any other experts layout rather than computing something else."""
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False}
    wrong = {k: getattr(mod, k) for k, v in layout.items() if getattr(mod, k, v) != v}
    if wrong:
        raise AlphaQError(f"{name} ({type(mod).__name__}) has an experts layout the kernel path does not run: {wrong}")


def install(model: nn.Module, gguf_path: Path) -> list[str]:
    """Swap the quantised matmuls of ``model`` (holding ``gguf_path``'s weights) for kernel modules.

    Returns the names of the nn.Linear modules that stay dense (no raw rows in the GGUF for them).
    """
    arch, n_blocks = _arch_of(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    n_head, n_head_kv = head_counts(reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    layouts = read_layouts(gguf_path)
    targets = hf_targets(model, set(tensors) | set(layouts), arch, n_blocks)

    def projection(name: str) -> GroupedExperts:
        if name in layouts:  # expert-granular: one tensor per type group plus the slot map
            lay = layouts[name]
            weights = tuple(raw_blocks(tensors[group_name(name, g)])[1] for g in range(len(lay.types)))
            return GroupedExperts(lay.types, weights, torch.from_numpy(lay.map()))
        qtype, data = raw_blocks(tensors[name])
        return GroupedExperts.uniform(qtype, data)

    modules = dict(model.named_modules())
    experts: dict[str, dict[str, str]] = {}  # experts module -> projection -> GGUF name
    for name, tgt in targets.items():
        mod_name, _, param = tgt.param.rpartition(".")
        mod = modules[mod_name]
        if isinstance(mod, nn.Linear):
            qtype, data = raw_blocks(tensors[name])
            data = data.reshape(mod.out_features, -1)  # a 1-D GGUF vector for a 1-row Linear
            if arch in QK_PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
                data = torch.from_numpy(np.ascontiguousarray(
                    unpermute_qk(data.numpy(), n_head if "attn_q" in name else n_head_kv)))
            if row_length(qtype, data.shape[1]) != mod.in_features:
                raise AlphaQError(f"{name}: {row_length(qtype, data.shape[1])} columns for {mod_name} "
                                  f"with in_features {mod.in_features}")
            _set_module(model, mod_name, QuantLinear(data, qtype, mod.bias))
        elif tgt.expert is not None:
            proj = "down" if param == "down_proj" else ("gate" if tgt.rows.start == 0 else "up")
            experts.setdefault(mod_name, {})[proj] = name
    for mod_name, names in experts.items():
        mod = modules[mod_name]
        _check_fused_experts(mod_name, mod)
        missing = [p for p in _PROJECTIONS if p not in names]
        if missing:
            raise AlphaQError(f"{mod_name}: the GGUF has no {missing} expert tensors")
        _set_module(model, mod_name, QuantExperts(*(projection(names[p]) for p in _PROJECTIONS), mod.act_fn))
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if dense:
        log.info("kept dense (no GGUF rows to compute from): %s", ", ".join(dense))
    return dense


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)

"""Importance matrix from calibration text, for the *calibrated* baselines (never used by AlphaQ).

llama.cpp's ``llama-imatrix`` stores, for every quantised weight, the mean of the squared input
activation of each input column (``ne0``). For a merged expert tensor (GGUF ne = (cols, rows,
n_expert)) the vector has ``ne0 * n_expert`` entries, expert-major, and only tokens routed to an
expert count towards that expert's slice (llama.cpp ``imatrix.cpp`` collect for MUL_MAT_ID).
We compute the same statistic with torch forward hooks on the HF model:

* ``nn.Linear`` modules: their input, mapped to GGUF names with gguf-py's ``TensorNameMap``;
* the fused expert modules of transformers 5 (``gate_up_proj`` (n_expert, 2·inter, hidden),
  ``down_proj`` (n_expert, hidden, inter)), whose ``forward(hidden, top_k_index, top_k_weights)``
  we intercept with a pre-hook: gate/up see the routed hidden states, down sees act(gate)·up.

An expert that no calibration token reached gets an all-ones slice (as if uncalibrated) and is
logged. The routing counts per expert are returned too (``ImatrixResult.expert_tokens``) for
frequency-based baselines.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from alphaq.errors import AlphaQError

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ImatrixConfig:
    n_ctx: int = 256  # tokens per calibration window (first token replaced by BOS)
    max_windows: int = 64  # calibration windows (64 x 256 = 16k tokens)
    batch: int = 8  # windows per forward pass


@dataclass(frozen=True)
class ImatrixResult:
    data: dict[str, np.ndarray]  # GGUF tensor name -> float32 (ne0 * n_expert,), mean squared activation
    expert_tokens: dict[str, np.ndarray]  # GGUF expert tensor name -> (n_expert,) routed-token counts
    n_tokens: int


def _arch_of(gguf_path: Path) -> tuple[gguf.MODEL_ARCH, int]:
    from alphaq.gguf.io import first_shard

    reader = gguf.GGUFReader(first_shard(gguf_path))  # the model's keys are in the first part
    arch_name = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise AlphaQError(f"unknown GGUF architecture {arch_name!r} in {gguf_path}")
    n_blocks = int(reader.get_field(f"{arch_name}.block_count").contents())
    return arch, n_blocks


def _expert_name(kind: gguf.MODEL_TENSOR, block: int) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight"


class _Accumulator:
    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}  # per expert (or a single entry)

    def add(self, name: str, x, n_expert: int = 1, expert: int = 0) -> None:
        # x: (tokens, cols) activations entering the matmul
        import torch

        with torch.no_grad():
            sq = x.detach().float().pow(2).sum(0).cpu().numpy().astype(np.float64)
        cols = sq.shape[0]
        if name not in self.sums:
            self.sums[name] = np.zeros(cols * n_expert)
            self.counts[name] = np.zeros(n_expert, dtype=np.int64)
        self.sums[name][expert * cols:(expert + 1) * cols] += sq
        self.counts[name][expert] += x.shape[0]


def compute_imatrix(hf_dir: Path, gguf_path: Path, text: str | None, cfg: ImatrixConfig = ImatrixConfig(),
                    *, progress: bool = False, windows=None) -> ImatrixResult:
    """Mean squared input activation per column of every quantisable GGUF tensor of ``gguf_path``
    (the model converted from ``hf_dir``), measured on ``text`` (or on token ``windows``,
    (n, n_ctx) ids used as they are)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    arch, n_blocks = _arch_of(gguf_path)
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    from alphaq.gguf.io import read_tensors

    gguf_shapes = {t.name: list(reversed(t.shape)) for t in read_tensors(gguf_path)}  # ggml order; every part

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    if windows is not None:
        windows = torch.as_tensor(np.asarray(windows, dtype=np.int64))
        n_win = windows.shape[0]
    else:
        windows, n_win = _text_windows(hf_dir, text, cfg)

    acc = _Accumulator()
    hooks = _register_hooks(model, tmap, gguf_shapes, acc)
    try:
        with torch.no_grad():
            for i in tqdm(range(0, n_win, cfg.batch), desc="imatrix", unit="batch", disable=not progress):
                model(input_ids=windows[i:i + cfg.batch])
    finally:
        for h in hooks:
            h.remove()
    data, expert_tokens = _means(acc, gguf_shapes)
    return ImatrixResult(data, expert_tokens, int(windows.numel()))


def _register_hooks(model, tmap, gguf_shapes: dict, acc: _Accumulator) -> list:
    """Forward hooks that feed ``acc`` the inputs of every GGUF weight: one per nn.Linear, and one
    per fused expert module (transformers' gate_up_proj / down_proj parameters)."""
    from torch import nn

    hooks = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mapped = tmap.get_name(mod_name)
            if mapped is None or mapped + ".weight" not in gguf_shapes:
                continue
            gname = mapped + ".weight"

            def hook(m, args, gname=gname):
                x = args[0]
                acc.add(gname, x.reshape(-1, x.shape[-1]))

            hooks.append(mod.register_forward_pre_hook(hook))
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and isinstance(mod.down_proj, nn.Parameter):
            hooks.append(mod.register_forward_pre_hook(_expert_hook(mod_name, gguf_shapes, acc), with_kwargs=True))
    return hooks


def _expert_hook(mod_name: str, gguf_shapes: dict, acc: _Accumulator):
    """The hook of one fused expert module: each expert's routed tokens, per gate/up/down weight."""
    import torch
    from torch import nn

    m = _LAYER.search(mod_name + ".")
    if m is None:
        raise AlphaQError(f"expert module {mod_name} has no layer index")
    block = int(m.group(1))
    names = tuple(_expert_name(k, block) for k in (gguf.MODEL_TENSOR.FFN_GATE_EXP,
                                                    gguf.MODEL_TENSOR.FFN_UP_EXP,
                                                    gguf.MODEL_TENSOR.FFN_DOWN_EXP))
    missing = [n for n in names if n not in gguf_shapes]
    if missing:
        raise AlphaQError(f"{mod_name}: GGUF has no {missing[0]}")

    def ehook(m, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        top_k_index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        n_expert = m.gate_up_proj.shape[0]  # (n_expert, 2*inter, hidden)
        with torch.no_grad():
            for e in range(n_expert):
                tok_idx = (top_k_index == e).any(dim=-1).nonzero().flatten()
                if tok_idx.numel() == 0:
                    continue
                x = hidden[tok_idx]  # (tokens, hidden)
                gate, up = nn.functional.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
                h = m.act_fn(gate) * up  # (tokens, inter)
                acc.add(names[0], x, n_expert, e)
                acc.add(names[1], x, n_expert, e)
                acc.add(names[2], h, n_expert, e)

    return ehook


def _means(acc: _Accumulator, gguf_shapes: dict) -> tuple[dict, dict]:
    """Mean squared activations per weight (all-ones for an expert no token reached) and token
    counts per expert, checked against the GGUF shapes."""
    data, expert_tokens = {}, {}
    for name, sums in acc.sums.items():
        counts = acc.counts[name]
        n_expert = counts.shape[0]
        cols = sums.shape[0] // n_expert
        ne = gguf_shapes[name]
        if ne[0] != cols or (n_expert > 1 and ne[2] != n_expert):
            raise AlphaQError(f"imatrix for {name} has {n_expert} x {cols} entries, GGUF shape is {ne}")
        vec = np.ones(sums.shape[0], dtype=np.float64)
        for e in range(n_expert):
            if counts[e] > 0:
                vec[e * cols:(e + 1) * cols] = sums[e * cols:(e + 1) * cols] / counts[e]
            else:
                log.info("%s expert %d saw no calibration token: all-ones slice", name, e)
        data[name] = vec.astype(np.float32)
        if n_expert > 1:
            expert_tokens[name] = counts.copy()
    return data, expert_tokens


def _text_windows(hf_dir: Path, text: str, cfg: ImatrixConfig):
    """Non-overlapping windows of ``cfg.n_ctx`` tokens of ``text``, each starting with BOS."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_win = min(len(ids) // cfg.n_ctx, cfg.max_windows)
    if n_win < 1:
        raise AlphaQError(f"calibration text has {len(ids)} tokens, fewer than one window of {cfg.n_ctx}")
    windows = torch.tensor(ids[: n_win * cfg.n_ctx]).view(n_win, cfg.n_ctx)
    if tok.bos_token_id is not None:
        windows[:, 0] = tok.bos_token_id
    return windows, n_win

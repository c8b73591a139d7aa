"""Torch reference forward for quantised plans, including expert-granular ones no stock runtime runs.

The HF model (transformers) is loaded and each quantisable weight is replaced by its dequantised
GGUF counterpart. Two sources for those weights:

* ``from_gguf``: the tensors of a quantised GGUF (gguf-py ``dequantize``), mapped back to HF
  names (type groups of an expert-granular file back to their experts); Q/K rows of llama-style models are un-permuted (``alphaq.model.weights.unpermute_qk``, the
  inverse of the converter's ``LlamaModel.permute``).
* ``from_types``: per (GGUF tensor, expert) types, quantised here with ggml's own quantiser
  (``alphaq.gguf.ggml.quantize``) and dequantised with gguf-py. Because k-quants and legacy quants
  quantise every row independently, quantising the HF layout gives the same values as the GGUF
  (Q/K permutation only reorders rows), so a tensor-granular plan gives the same weights through
  both paths (tested); an expert-granular plan just uses a different type per slice.

Activations stay float32 here, while llama.cpp quantises activations to Q8_K / Q8_0 for its
quantised dot products, so perplexities agree only to a tolerance (see tests/test_torch_ref.py).
HF parameter ↔ GGUF name mapping: nn.Linear via gguf-py's ``TensorNameMap``; transformers-5 fused
experts ``gate_up_proj`` (n_expert, 2·inter, hidden) → ffn_gate_exps rows [0, inter) and
ffn_up_exps rows [inter, 2·inter); ``down_proj`` (n_expert, hidden, inter) → ffn_down_exps.
DeepSeek-2's ``kv_b_proj`` is stored split as attn_k_b / attn_v_b and merged back (``merge_kv_b``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from alphaq.errors import AlphaQError
from alphaq.gguf.expert import group_name, map_name, read_layouts
from alphaq.importance.real_text import _arch_of, _expert_name
from alphaq.model.weights import QK_PERMUTED_ARCHS  # Mixtral is arch 'llama' in GGUF

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where a GGUF matrix lives in the HF model: parameter, expert index, row range."""

    param: str  # HF parameter name
    expert: int | None  # index into a fused (n_expert, rows, cols) parameter
    rows: slice  # row range inside that parameter (or its expert slice)


def hf_targets(model, gguf_names: set[str], arch: gguf.MODEL_ARCH, n_blocks: int) -> dict[str, Target]:
    """GGUF tensor name -> HF location, for every quantisable matrix of ``model``."""
    from torch import nn

    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    out: dict[str, Target] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            mapped = tmap.get_name(mod_name)
            if mapped is not None and mapped + ".weight" in gguf_names:
                out[mapped + ".weight"] = Target(mod_name + ".weight", None, slice(None))
        elif hasattr(mod, "gate_up_proj") and isinstance(getattr(mod, "down_proj", None), nn.Parameter):
            block = int(_LAYER.search(mod_name + ".").group(1))
            inter = mod.gate_up_proj.shape[1] // 2  # (n_expert, 2*inter, hidden)
            out[_expert_name(gguf.MODEL_TENSOR.FFN_GATE_EXP, block)] = Target(mod_name + ".gate_up_proj", -1, slice(0, inter))
            out[_expert_name(gguf.MODEL_TENSOR.FFN_UP_EXP, block)] = Target(mod_name + ".gate_up_proj", -1, slice(inter, 2 * inter))
            out[_expert_name(gguf.MODEL_TENSOR.FFN_DOWN_EXP, block)] = Target(mod_name + ".down_proj", -1, slice(None))
    return out


def load_hf(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    return model


def _assign(params: dict, tgt: Target, expert: int | None, w: np.ndarray) -> None:
    import torch

    p = params[tgt.param]
    with torch.no_grad():
        view = p[expert] if expert is not None else p
        view = view[tgt.rows]
        if tuple(view.shape) != w.shape and view.numel() == w.size:
            w = w.reshape(tuple(view.shape))  # e.g. a (1, n) HF gate stored as a 1-D GGUF vector
        if tuple(view.shape) != w.shape:
            raise AlphaQError(f"{tgt.param}[{expert}] rows {tgt.rows}: shape {tuple(view.shape)} != {w.shape}")
        view.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))


def from_gguf(hf_dir: Path, quantised: Path):
    """HF model with every quantisable weight replaced by the dequantised tensor of ``quantised``."""
    model = load_hf(hf_dir)
    assign_gguf(model, quantised)
    return model


# DeepSeek-2's converter stores kv_b_proj as two tensors for llama.cpp's MLA absorption:
# attn_k_b (per head, transposed) and attn_v_b (conversion/deepseek.py, DeepseekV2Model.modify_tensors).
_KV_B_PARTS = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_K_B]: "k", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_V_B]: "v"}
_KV_B = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_KV_B]


def _kv_b_part(name: str) -> tuple[str, str] | None:
    """("blk.N.attn_kv_b.weight", "k" or "v") for a split DeepSeek-2 kv_b tensor, else None."""
    m = re.fullmatch(r"blk\.(\d+)\..+\.weight", name)
    if m is None:
        return None
    bid = int(m.group(1))
    for fmt, part in _KV_B_PARTS.items():
        if fmt.format(bid=bid) == name.removesuffix(".weight"):
            return _KV_B.format(bid=bid) + ".weight", part
    return None


def merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """Inverse of the converter's split of kv_b_proj (n_head*(qk_nope+v_head), rank):
    k_b (n_head, rank, qk_nope), the per-head transpose of the k rows; v_b (n_head, v_head, rank)."""
    k = k_b.transpose(0, 2, 1)  # (n_head, qk_nope, rank)
    return np.concatenate([k, v_b], axis=1).reshape(-1, k.shape[2])


def head_counts(reader: gguf.GGUFReader, arch: gguf.MODEL_ARCH) -> tuple[int, int]:
    """(query heads, key/value heads) of a GGUF: the head counts its Q/K row permutation used."""
    n_head = int(reader.get_field(f"{gguf.MODEL_ARCH_NAMES[arch]}.attention.head_count").contents())
    kv = reader.get_field(f"{gguf.MODEL_ARCH_NAMES[arch]}.attention.head_count_kv")
    return n_head, int(kv.contents()) if kv is not None else n_head


_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def check_unmapped(reader: gguf.GGUFReader, used: set[str], quantised: Path) -> None:
    """Every tensor llama.cpp quantises (by its rule) or that is stored quantised must have found
    its HF parameter: one left out would keep its float HF weight, so the reference model would
    be partly unquantised without a sign. Tensors llama.cpp copies unchanged (norms, routers,
    biases) stay as loaded from the HF checkpoint: the same values; they are listed at DEBUG."""
    from alphaq.gguf.qtypes import llama_quantizes

    left = [t for t in reader.tensors if t.name not in used]
    bad = [t.name for t in left
           if t.tensor_type not in _FLOAT_TYPES or llama_quantizes(t.name, tuple(reversed([int(d) for d in t.shape])))]
    if bad:
        raise AlphaQError(f"{quantised.name}: {len(bad)} quantisable tensor(s) have no HF parameter to replace, e.g. "
                          f"{', '.join(bad[:3])}; the reference would keep their float weights (is the HF checkpoint "
                          "the one this GGUF was converted from?)")
    if left:
        log.debug("%s: kept from the HF checkpoint (llama.cpp copies them unquantised): %s",
                  quantised.name, ", ".join(t.name for t in left))


def assign_gguf(model, quantised: Path, *, strict: bool = True) -> set[str]:
    """Replace every quantisable weight of ``model`` by the dequantised tensor of ``quantised``;
    returns the names of the GGUF tensors it used. ``strict``: an unmapped quantisable tensor is
    an error (check_unmapped); alphaq.runtime.torch_run, which places the rest itself, passes False."""
    from gguf.quants import dequantize

    arch, n_blocks = _arch_of(quantised)
    reader = gguf.GGUFReader(quantised)
    n_head, n_head_kv = head_counts(reader, arch)
    # expert-granular files: each type group holds some experts of one stock tensor
    groups = {group_name(lay.tensor, g): (lay.tensor, lay.experts[g])
              for lay in read_layouts(quantised).values() for g in range(len(lay.types))}
    names = {t.name for t in reader.tensors} | {stock for stock, _ in groups.values()}
    names |= {part[0] for n in names if (part := _kv_b_part(n)) is not None}
    params = dict(model.named_parameters())
    # a tied parameter (lm_head = embed_tokens) is listed once, under the embedding; a GGUF tensor
    # for the other name is left unused rather than overwriting the shared one (strict: an error)
    targets = {n: t for n, t in hf_targets(model, names, arch, n_blocks).items() if t.param in params}
    from alphaq.model.weights import unpermute_qk

    used: set[str] = set()
    kv_b_parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        stock, experts = groups.get(t.name, (t.name, None))
        kv_b = _kv_b_part(t.name)
        tgt = targets.get(kv_b[0] if kv_b else stock)
        if tgt is None:
            continue
        used.add(t.name)
        w = dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.tensor_type))).astype(np.float32)
        ne = [int(x) for x in t.shape]
        w = w.reshape(tuple(reversed(ne)))  # numpy order (n_expert, rows, cols) / (rows, cols)
        if arch in QK_PERMUTED_ARCHS and (t.name.endswith("attn_q.weight") or t.name.endswith("attn_k.weight")):
            w = unpermute_qk(w, n_head if "attn_q" in t.name else n_head_kv)
        if kv_b is not None:
            parts = kv_b_parts.setdefault(kv_b[0], {})
            parts[kv_b[1]] = w
            if len(parts) < 2:
                continue
            w = merge_kv_b(parts["k"], parts["v"])
        if tgt.expert is None:
            _assign(params, tgt, None, w)
        else:
            for slot in range(w.shape[0]):
                _assign(params, tgt, experts[slot] if experts is not None else slot, w[slot])
    if strict:
        # an expert-granular file's type-group maps are indices, not weights (read_layouts read them)
        maps = {map_name(lay.tensor) for lay in read_layouts(quantised).values()}
        check_unmapped(reader, used | maps, quantised)
    return used


def quant_dequant(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """(rows, cols) float32 -> quantised by ggml (no imatrix; all-ones where ggml requires one,
    as alphaq.gguf.quantize does) -> dequantised by gguf-py."""
    from gguf.quants import dequantize

    from alphaq.gguf import ggml

    if qtype == GGMLQuantizationType.F32:
        return w.astype(np.float32)
    data = ggml.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)  # imatrix "auto": as alphaq.gguf.quantize
    return dequantize(data, qtype).reshape(w.shape).astype(np.float32)


def from_types(hf_dir: Path, float_gguf: Path, types: dict[tuple[str, int | None], GGMLQuantizationType]):
    """HF model with each (GGUF tensor, expert) in ``types`` quantised to its type (the written
    type, after any shape fallback) with ggml and dequantised; expert None = the whole tensor."""
    import torch

    model = load_hf(hf_dir)
    arch, n_blocks = _arch_of(float_gguf)
    names = {n for n, _ in types}
    targets = hf_targets(model, names, arch, n_blocks)
    missing = sorted(names - set(targets))
    if missing:
        raise AlphaQError(f"no HF parameter for {missing[0]} (and {len(missing) - 1} more)")
    params = dict(model.named_parameters())
    for (name, expert), qt in types.items():
        tgt = targets[name]
        p = params[tgt.param]
        experts = [expert] if expert is not None else ([None] if tgt.expert is None else range(p.shape[0]))
        for e in experts:
            with torch.no_grad():
                cur = (p[e] if e is not None else p)[tgt.rows].detach().numpy()
            rows = math.prod(cur.shape[:-1])
            _assign(params, tgt, e, quant_dequant(cur.reshape(rows, -1), qt).reshape(cur.shape))
    return model


def perplexity(model, tokens: list[int], n_ctx: int, max_windows: int | None, bos: int | None) -> float:
    """Same windows and scoring as alphaq.evaluate.perplexity (BOS first, second half of each window scored)."""
    import torch

    n = len(tokens) // n_ctx
    if max_windows is not None:
        n = min(n, max_windows)
    x = torch.tensor(tokens[: n * n_ctx]).view(n, n_ctx)
    if bos is not None and bos >= 0:
        x[:, 0] = bos
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            logits = model(input_ids=x[i:i + 1]).logits[0].double()
            lp = torch.log_softmax(logits, -1)[first - 1:n_ctx - 1]
            tgt = x[i, first:]
            nll -= float(lp[torch.arange(len(tgt)), tgt].sum())
            count += len(tgt)
    return math.exp(nll / count)

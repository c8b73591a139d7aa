"""Weights stage input: the quantisable matrices of an HF checkpoint or a float GGUF file.

`open_model(path)` returns a `ModelWeights` whose `.matrices()` lists one `WeightMatrix` per
2-D weight and per expert slice of a merged expert tensor, named with GGUF tensor names
(gguf-py's `TensorNameMap`), in a deterministic order: token_embd, then blocks ascending
(tensors by name, experts ascending), then output. Nothing is read until `WeightMatrix.load()`,
which returns one float32 ``(rows, cols)`` array: read with ``pread`` from a safetensors shard, or
copied from a memory-mapped GGUF (whose pages are then released).

Both sources present the *same* matrices, as llama.cpp's converter would write them
(vendor/llama.cpp/convert_hf_to_gguf.py + conversion/*.py of llama-cpp-python 0.3.36):

- HF per-expert tensors ``...experts.E.<proj>.weight`` are slices ``expert=E`` of the merged
  GGUF tensor (``blk.N.ffn_gate_exps.weight``); fused 3-D ``...experts.gate_up_proj`` is split
  in two halves along the rows as ``conversion/qwen.py`` does.
- DeepSeek-V2 ``kv_b_proj`` becomes ``attn_k_b`` and ``attn_v_b`` (``conversion/deepseek.py``;
  Kimi-Linear's MLA blocks alike, ``conversion/kimi_linear.py``).
- Qwen3-Next's and Qwen3.5's linear-attention projections are split and reordered as the
  converter does (`alphaq.model.linear_attention`).
- Qwen3-VL-MoE's and Llama 4's input-major fused experts are transposed; Granite's merged
  ``input_linear`` is split into gate and up.
- DBRX's experts, fused in 2-D ``ffn.experts.mlp.w1/v1/w2`` of (n_expert * n_ff, n_embd), are
  cut into one slice per expert, ``w2`` (down) transposed, as ``conversion/dbrx.py`` does.
- A multimodal checkpoint is read as its text model (`text_model_name`): the converter's own
  filter drops the vision, audio and projector tensors, which go to llama.cpp's mmproj file.
- llama-style converters (Llama, Mixtral, Granite) permute Q/K rows for RoPE
  (``LlamaModel.permute``); the GGUF reader undoes it, so HF and GGUF input give identical
  matrices, hence identical alpha.
- A non-expert tensor with more than two dims (attn_k_b, attn_v_b) is analysed as the
  matrix ggml quantises: ``(prod(outer dims), ne0)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType, MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR

from alphaq.errors import InputError
from alphaq.files import read_json
from alphaq.gguf.io import release_pages, shard_paths
from alphaq.gguf.qtypes import ggml_n_dims, quantisable_name
from alphaq.model.linear_attention import block_tensor_name, linear_attention_matrices

logger = logging.getLogger(__name__)

# HF `architectures[0]` -> gguf-py architecture: the one place that lists what we support.
SUPPORTED_ARCHITECTURES: dict[str, MODEL_ARCH] = {
    "MixtralForCausalLM": MODEL_ARCH.LLAMA,  # llama.cpp converts Mixtral as LLAMA
    "Qwen2MoeForCausalLM": MODEL_ARCH.QWEN2MOE,
    "Qwen3MoeForCausalLM": MODEL_ARCH.QWEN3MOE,
    "OlmoeForCausalLM": MODEL_ARCH.OLMOE,
    "DeepseekV2ForCausalLM": MODEL_ARCH.DEEPSEEK2,
    "DeepseekV3ForCausalLM": MODEL_ARCH.DEEPSEEK2,  # llama.cpp converts V3 (and R1, Kimi K2) as DEEPSEEK2
    "Glm4MoeForCausalLM": MODEL_ARCH.GLM4_MOE,  # GLM-4.5 / 4.6
    "Glm4MoeLiteForCausalLM": MODEL_ARCH.DEEPSEEK2,  # GLM-4.7-Flash: llama.cpp converts it as deepseek2
    # GLM-4.5V / 4.6V: the text model, GLM-4.5's (conversion/glm.py Glm4MoeModel); the vision tower
    # goes to llama.cpp's mmproj file
    "Glm4vMoeForConditionalGeneration": MODEL_ARCH.GLM4_MOE,
    # Solar Open (Solar-Open-100B): GLM-4.5's MoE, written as glm4moe (conversion/glm.py SolarOpenModel)
    "SolarOpenForCausalLM": MODEL_ARCH.GLM4_MOE,
    "MiniMaxM2ForCausalLM": MODEL_ARCH.MINIMAXM2,  # MiniMax-M2 / M2.1
    "Ernie4_5_MoeForCausalLM": MODEL_ARCH.ERNIE4_5_MOE,  # ERNIE-4.5-21B-A3B / 300B-A47B
    "Dots1ForCausalLM": MODEL_ARCH.DOTS1,  # dots.llm1
    "AfmoeForCausalLM": MODEL_ARCH.AFMOE,  # Arcee's Trinity
    "Qwen3NextForCausalLM": MODEL_ARCH.QWEN3NEXT,  # Qwen3-Next-80B-A3B: linear attention, 3 layers in 4
    "Qwen3_5MoeForCausalLM": MODEL_ARCH.QWEN35MOE,  # Qwen3.5 MoE, text only
    "Qwen3_5MoeForConditionalGeneration": MODEL_ARCH.QWEN35MOE,  # Qwen3.5 MoE as published (the text model)
    "Qwen3VLMoeForConditionalGeneration": MODEL_ARCH.QWEN3VLMOE,  # Qwen3-VL-30B-A3B / 235B-A22B (the text model)
    # Qwen3-Omni-30B-A3B: its thinker's text model, which llama.cpp converts as Qwen3-VL-MoE's
    # (conversion/qwen3vl.py Qwen3OmniMoeTextModel); per-expert tensors under "thinker."
    "Qwen3OmniMoeForConditionalGeneration": MODEL_ARCH.QWEN3VLMOE,
    "Llama4ForConditionalGeneration": MODEL_ARCH.LLAMA4,  # Llama 4 Scout / Maverick (the text model)
    "PhiMoEForCausalLM": MODEL_ARCH.PHIMOE,  # Phi-3.5-MoE, as its config.json names it (transformers: Phimoe)
    "GraniteMoeForCausalLM": MODEL_ARCH.GRANITE_MOE,  # Granite 3.x MoE
    "GraniteMoeSharedForCausalLM": MODEL_ARCH.GRANITE_MOE,
    "GraniteMoeHybridForCausalLM": MODEL_ARCH.GRANITE_HYBRID,  # Granite 4.0-H: Mamba-2 and attention blocks, MoE
    "Lfm2MoeForCausalLM": MODEL_ARCH.LFM2MOE,  # LFM2-8B-A1B: gated short convolutions and attention, MoE
    "JambaForCausalLM": MODEL_ARCH.JAMBA,
    "ExaoneMoeForCausalLM": MODEL_ARCH.EXAONE_MOE,
    "Cohere2MoeForCausalLM": MODEL_ARCH.COHERE2MOE,
    # Nemotron 3 Nano: Mamba-2, attention and MoE blocks (the dense Nemotron-H: _check_variant)
    "NemotronHForCausalLM": MODEL_ARCH.NEMOTRON_H_MOE,
    "DbrxForCausalLM": MODEL_ARCH.DBRX,  # DBRX: fused QKV, experts fused in 2-D w1/v1/w2 (_dbrx_experts)
    "HunYuanMoEV1ForCausalLM": MODEL_ARCH.HUNYUAN_MOE,  # Hunyuan-A13B: per-expert tensors, a shared expert
    # Kimi-Linear-48B-A3B: KDA (linear attention) blocks and MLA blocks, DeepSeek-style MoE
    "KimiLinearForCausalLM": MODEL_ARCH.KIMI_LINEAR,
    "LlamaForCausalLM": MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": MODEL_ARCH.QWEN3,
}
SUPPORTED_GGUF_ARCHS: frozenset[MODEL_ARCH] = frozenset(SUPPORTED_ARCHITECTURES.values())


def _check_variant(hf_arch: str, text_cfg: dict, cfg_path: Path) -> None:
    """Refuse the variants of a supported class that llama.cpp's converter cannot convert here."""
    blocks = text_cfg.get("layers_block_type") or text_cfg.get("hybrid_override_pattern") or ()
    if hf_arch == "SolarOpenForCausalLM" and (text_cfg.get("num_nextn_predict_layers") or 0) > 0:
        # its converter keeps NextN layers and refuses --no-mtp (SolarOpenModel.supports_mtp_export
        # is False), so the file would hold a block llama.cpp's main graph never runs
        raise InputError(f"{cfg_path}: a Solar Open checkpoint with NextN (multi-token prediction) layers is not "
                         "supported: llama.cpp's converter keeps them and cannot leave them out (--no-mtp)")
    if hf_arch == "NemotronHForCausalLM" and not ("moe" in blocks or "E" in blocks):
        # its converter reads the config through transformers, whose NemotronHConfig adds the MoE
        # defaults (num_experts_per_tok), so it writes a dense one as nemotron_h_moe, which
        # llama.cpp then cannot load (checked with transformers 5.24)
        raise InputError(f"{cfg_path}: a Nemotron-H without MoE blocks (Nemotron-H, Nemotron Nano 2) is not "
                         "supported: llama.cpp's converter writes it as nemotron_h_moe, which llama.cpp cannot load")

# Architectures whose llama.cpp converter keeps the checkpoint's NextN (multi-token prediction)
# layers unless told --no-mtp (DeepSeek-V3's and ERNIE-4.5's always drop them). llama.cpp's main
# graph never reads them (only an MTP draft context does), so the damage mode could not measure
# them; alphaq converts without them, as llama.cpp's `--no-mtp` target file, whose `--mtp` run
# writes the draft apart. (Qwen3-Next's converter even stops on a checkpoint without them unless
# told --no-mtp.)
CONVERTER_KEEPS_MTP: frozenset[str] = frozenset({
    "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration", "NemotronHForCausalLM", "Glm4vMoeForConditionalGeneration",
})
# Qwen3-Next's, Qwen3.5's and Nemotron-H's MTP weights: mtp.layers.N.* and mtp.fc / mtp.norm / ...
# (conversion/qwen.py, conversion/nemotron.py)
_MTP_WEIGHTS = re.compile(r"^(model\.)?mtp\.")


def mtp_layers_left_out(path: Path) -> int | None:
    """How many NextN (MTP) layers of the HF checkpoint ``path`` the conversion leaves out by
    passing llama.cpp's converter --no-mtp; None where its converter needs no --no-mtp (it
    drops them itself, or the architecture has none)."""
    c = _read_hf_config(path)
    if c.hf_arch not in CONVERTER_KEEPS_MTP:
        return None
    n = c.text_cfg.get("num_nextn_predict_layers") or c.text_cfg.get("mtp_num_hidden_layers") or 0
    if not n:  # Qwen3-Next's config does not say; its converter counts the checkpoint's layers too
        n = len({m[1] for name in _hf_shards(path) if (m := re.match(r"^(?:model\.)?mtp\.layers\.(\d+)\.", name))})
    return n if isinstance(n, int) and n > 0 else 0


def converter_mtp_args(path: Path) -> tuple[str, ...]:
    """The converter option that makes the file alphaq works from: ``--no-mtp`` where llama.cpp's
    converter would keep NextN layers (whether or not this checkpoint has them), else none."""
    return ("--no-mtp",) if mtp_layers_left_out(path) is not None else ()


def mtp_blocks(tensor_names: Iterable[str]) -> list[int]:
    """The blocks of a GGUF that are NextN (MTP) layers: those holding a ``blk.N.nextn.*`` tensor."""
    return sorted({int(m[1]) for n in tensor_names if (m := re.match(r"^blk\.(\d+)\.nextn\.", n))})

# Architectures with recurrent blocks (gated DeltaNet, Kimi's KDA, Mamba-2) beside attention:
# llama.cpp keeps a recurrent state per sequence for them; the time estimate's rates are an
# attention model's, and what the recurrent blocks do to them is unmeasured (on tiny random models
# the estimate is as far off for them as for attention models: fixed costs dominate there)
RECURRENT_ARCHS: frozenset[MODEL_ARCH] = frozenset({MODEL_ARCH.QWEN3NEXT, MODEL_ARCH.QWEN35MOE,
                                                     MODEL_ARCH.GRANITE_HYBRID, MODEL_ARCH.JAMBA, MODEL_ARCH.LFM2MOE,
                                                     MODEL_ARCH.NEMOTRON_H_MOE, MODEL_ARCH.KIMI_LINEAR})

# Granite-MoE (3.x) and Granite 4 (hybrid Mamba-2): gate and up merged in one input_linear
GRANITE_MOE_ARCHS: frozenset[MODEL_ARCH] = frozenset({MODEL_ARCH.GRANITE_MOE, MODEL_ARCH.GRANITE_HYBRID})

# Architectures whose checkpoints store fused experts input-major (n_expert, n_in, n_out)
TRANSPOSED_FUSED_EXPERTS: frozenset[MODEL_ARCH] = frozenset({MODEL_ARCH.QWEN3VLMOE, MODEL_ARCH.LLAMA4})

# Converters that permute Q/K rows for RoPE: conversion/llama.py `LlamaModel` (undo_permute).
QK_PERMUTED_ARCHS: frozenset[MODEL_ARCH] = frozenset({MODEL_ARCH.LLAMA, MODEL_ARCH.GRANITE_MOE, MODEL_ARCH.GRANITE_HYBRID,
                                                  MODEL_ARCH.NEMOTRON_H_MOE})  # (a GraniteHybridModel)

# Converters that split MLA's kv_b_proj into attn_k_b (transposed) and attn_v_b: conversion/deepseek.py
# DeepseekV2Model and conversion/kimi_linear.py KimiLinearModel.modify_tensors, the same split
MLA_KV_B_SPLIT_ARCHS: frozenset[MODEL_ARCH] = frozenset({MODEL_ARCH.DEEPSEEK2, MODEL_ARCH.KIMI_LINEAR})

# GGUF float types we can read as weights; anything else is already quantised.
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# The one quantised type read as weights (dequantised): llama.cpp's converter writes it
# (--outtype q8_0) and it is what people keep of a model too large for them in BF16. Its rounding
# is small beside any type alphaq writes; a lower type's would be part of every measurement.
# `convert` takes it only with --allow-requantize, as llama-quantize does.
REQUANTISABLE_TYPES = (GGMLQuantizationType.Q8_0,)
_HF_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
HF_FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
# why an FP8 matrix's values are not read from the checkpoint (the scales live in other tensors)
FP8_VALUES_FROM_GGUF = ("alphaq reads FP8 weights from the BF16 GGUF llama.cpp's converter makes of them "
                        "(convert_alphaq.py converts first; for `alphaq analyze`, give it that GGUF)")

# Merged expert tensors are the gguf-py tensors named "..._exps".
EXPERT_TENSORS: frozenset[MODEL_TENSOR] = frozenset(
    t for t, name in gguf.TENSOR_NAMES.items() if name.endswith("_exps")
)

# transformers-5 fused expert parameters carry no ".weight" suffix
_FUSED_EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj", "experts.gate_proj", "experts.up_proj")
# nor do DBRX's, fused in 2-D (n_expert * n_ff, n_embd) tensors (conversion/dbrx.py)
_DBRX_EXPERTS = re.compile(r"\.ffn\.experts\.mlp\.(w1|v1|w2)$")
_HF_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<rest>[^.]+)$")
_GGUF_BLOCK = re.compile(r"^blk\.(?P<bid>\d+)\.(?P<kind>.+)\.weight$")


def llama_quantizes(name: str, n_dims: int) -> bool:
    """Would llama.cpp quantise a GGUF tensor of this name and ggml_n_dims? (rule in alphaq.gguf.qtypes)"""
    return n_dims >= 2 and quantisable_name(name)


def sampled_experts(n_experts: int, max_experts: int | None) -> list[int] | None:
    """Evenly spaced experts of a merged expert tensor, first and last included (None: all of
    them, also when there are no more than ``max_experts``). The spectral stage of ``--fast`` and
    the damage stage's error ratios read a tensor through these."""
    if max_experts is None or n_experts <= max_experts:
        return None
    return sorted(set(np.linspace(0, n_experts - 1, max_experts).round().astype(int).tolist()))


def _kind(tensor: str) -> tuple[int | None, str]:
    m = _GGUF_BLOCK.match(tensor)
    if m:
        return int(m["bid"]), m["kind"]
    return None, tensor.removesuffix(".weight")


@dataclass(frozen=True)
class WeightMatrix:
    tensor: str  # GGUF tensor name, e.g. "blk.0.ffn_down_exps.weight"
    block: int | None  # None for token_embd / output
    expert: int | None  # slice of a merged expert tensor, None otherwise
    kind: str  # GGUF name without "blk.N." and ".weight": "ffn_down_exps", "attn_q", ...
    rows: int  # numpy rows (GGUF ne1)
    cols: int  # row length seen by ggml (GGUF ne0)
    _loader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    dtype: str = field(default="", compare=False)  # stored type: safetensors dtype or GGUF type name

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def label(self) -> str:
        return self.tensor if self.expert is None else f"{self.tensor}[expert {self.expert}]"

    def load(self) -> np.ndarray:
        """The matrix as a new float32 array (rows, cols)."""
        w = self._loader()
        if w.shape != (self.rows, self.cols):
            raise InputError(f"{self.label}: loaded shape {w.shape} != ({self.rows}, {self.cols})")
        return np.ascontiguousarray(w, dtype=np.float32)


def _order(m: WeightMatrix) -> tuple:
    group = 1 if m.block is not None else (0 if m.kind == "token_embd" else 2)
    return (group, m.block if m.block is not None else -1, m.tensor, -1 if m.expert is None else m.expert)


@dataclass
class ModelWeights:
    path: Path
    source: str  # "hf" | "gguf"
    arch: str  # gguf architecture name as in general.architecture, e.g. "qwen2moe"
    model_arch: MODEL_ARCH
    n_blocks: int
    _matrices: list[WeightMatrix] = field(repr=False)
    _close: Callable[[], None] = field(repr=False, default=lambda: None)
    n_elements: int = 0  # every stored tensor's elements (norms, routers, biases too)
    experts_used: int | None = None  # routed experts per token (config / GGUF metadata); None: not said

    def matrices(self) -> list[WeightMatrix]:
        """Every analysable matrix / expert slice, in deterministic order (lazy loads)."""
        return list(self._matrices)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ModelWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_model(path: str | Path) -> ModelWeights:
    """Open an HF checkpoint directory or a float (F32/F16/BF16) or Q8_0 GGUF file (any part of a
    split GGUF opens all of it)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model path {path} does not exist")
    if path.is_dir():
        return _open_hf(path)
    if path.suffix.lower() == ".gguf":
        return _open_gguf(path)
    raise InputError(f"{path} is neither an HF checkpoint directory nor a .gguf file")


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


# --------------------------------------------------------------------------------------
# HF checkpoints (safetensors)
# --------------------------------------------------------------------------------------


def _hf_shards(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json or model.safetensors.

    Other *.safetensors files in the directory (e.g. a saved router init) are not weights.
    """
    index = path / "model.safetensors.index.json"
    if index.exists():
        doc = read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} has no 'weight_map' object")
        missing = sorted({s for s in weight_map.values() if not (path / s).exists()})
        if missing:
            raise InputError(f"{index} names missing shard(s): {', '.join(missing)}")
        return {name: path / shard for name, shard in sorted(weight_map.items())}
    single = path / "model.safetensors"
    if not single.exists():
        raise InputError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    with _safe_open(single) as f:
        return {name: single for name in sorted(f.keys())}


def _safe_open(path: Path):
    """safe_open with a one-line AlphaQError for truncated or corrupt files. Used to validate and
    list tensors (framework "np" does not import torch); data is read by `_HFFiles.read`."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="np")
    except SafetensorError as exc:
        raise InputError(f"cannot read safetensors file {path}: {exc} (truncated or corrupt?)") from None


# safetensors dtype -> little-endian numpy dtype of the stored values (BF16 as raw uint16)
_ST_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


class _HFFiles:
    """safetensors shards: handles (validation, listing) opened on first use, and plain reads of
    tensor data with ``pread`` into fresh buffers. Unlike a memory map, that leaves nothing of the
    file resident in this process (peak RSS stays ~one matrix, see docs/DESIGN.md "Memory"), and
    it needs no torch."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def get(self, shard: Path):
        if shard not in self._open:
            self._open[shard] = _safe_open(shard)
        return self._open[shard]

    def _header(self, shard: Path) -> tuple[int, dict, int]:
        with self._lock:
            if shard not in self._headers:
                self.get(shard)  # validated by safetensors first
                fd = os.open(shard, os.O_RDONLY)
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                self._headers[shard] = (8 + n, json.loads(os.pread(fd, n, 8)))
                self._fds[shard] = fd
            start, meta = self._headers[shard]
            return start, meta, self._fds[shard]

    def read(self, shard: Path, name: str, index: int | None = None, rows: slice = slice(None)) -> np.ndarray:
        """float32 copy of tensor ``name`` (or of ``[index]`` of it), rows ``rows`` of that."""
        start, meta, fd = self._header(shard)
        info = meta[name]
        if info["dtype"] not in _ST_DTYPES:  # an FP8 weight (see _is_weight_matrix): its scales live apart
            raise InputError(f"{shard}: tensor {name} is stored as {info['dtype']}; {FP8_VALUES_FROM_GGUF}")
        dt = _ST_DTYPES[info["dtype"]]
        shape = list(info["shape"])
        offset = start + int(info["data_offsets"][0])
        if index is not None:
            offset += index * math.prod(shape[1:]) * dt.itemsize
            shape = shape[1:]
        r0, r1, step = rows.indices(shape[0])
        if step != 1:
            raise ValueError("row slices must be contiguous")
        offset += r0 * math.prod(shape[1:]) * dt.itemsize
        shape[0] = max(0, r1 - r0)
        raw = np.empty(math.prod(shape), dtype=dt)
        buf, done = memoryview(raw).cast("B"), 0
        while done < raw.nbytes:
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise InputError(f"{shard}: tensor {name} is truncated")
            done += n
        if info["dtype"] == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)  # exact, as torch widens BF16
        else:
            out = raw.astype(np.float32)  # F16 exact; F32 copy; F64 rounded to nearest, as torch
        return out.reshape(shape)

    def close(self) -> None:
        self._open.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._headers.clear()


@dataclass(frozen=True)
class _HFConfig:
    """What config.json says about the model's tensors."""

    hf_arch: str  # architectures[0]
    model_arch: MODEL_ARCH
    n_blocks: int
    text_cfg: dict  # config.json, or its text_config part (multimodal checkpoints)
    fp8: bool = False  # block-scaled FP8 weights (quantization_config fp8), which llama.cpp's converter dequantises


# one matrix of an HF tensor: (GGUF tensor name, expert or None, rows, cols, float32 loader)
_HFMatrix = tuple[str, int | None, int, int, Callable[[], np.ndarray]]


def _open_hf(path: Path) -> ModelWeights:
    c = _read_hf_config(path)
    tmap = gguf.get_tensor_name_map(c.model_arch, c.n_blocks)
    files = _HFFiles()
    mats: list[WeightMatrix] = []
    n_elements = 0
    for stored, shard in _hf_shards(path).items():
        name = text_model_name(stored, c.hf_arch)
        if name is None:
            continue
        sl = files.get(shard).get_slice(stored)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        n_elements += math.prod(shape)
        if not _is_weight_matrix(path, name, shape, dtype, c):
            continue
        for tensor, expert, rows, cols, load in _hf_matrices(path, c, tmap, name, shape,
                                                             _slice_loader(files, shard, stored)):
            block, kind = _kind(tensor)
            mats.append(WeightMatrix(tensor, block, expert, kind, rows, cols, load, dtype))
    mats.sort(key=_order)
    _check_unique(mats, path)
    logger.debug(  # (DEBUG: a refused input then prints its one error line only)
        "%s: %s (%s), %d blocks, %d matrices", path, c.hf_arch, MODEL_ARCH_NAMES[c.model_arch], c.n_blocks, len(mats)
    )
    used = _experts_used(c.text_cfg)
    return ModelWeights(path, "hf", MODEL_ARCH_NAMES[c.model_arch], c.model_arch, c.n_blocks, mats, files.close,
                        n_elements, used if isinstance(used, int) and used > 0 else None)


def _experts_used(cfg: dict):
    """Routed experts per token as config.json says, under the keys llama.cpp's converter reads
    (conversion/base.py find_hparam: num_experts_per_tok, Kimi-Linear's num_experts_per_token,
    top_k_experts), DBRX's ffn_config.moe_top_k, HunYuan's moe_topk (a list, one per layer: its
    converter writes the first, conversion/hunyuan.py)."""
    used = next((v for k in ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")
                 if (v := cfg.get(k)) is not None), None)
    used = used or (cfg.get("ffn_config") or {}).get("moe_top_k") or cfg.get("moe_topk")
    return used[0] if isinstance(used, list) and used else used


# The vision, audio and projector tensors of a multimodal checkpoint, which llama.cpp's converter
# leaves to the separate mmproj file (conversion/base.py TextModel.filter_tensors, verbatim)
_MULTIMODAL_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                        "sound_projection.", "speech_embeddings.")
_MULTIMODAL_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                     "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                     "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")


# Architectures whose converter drops "thinker." from every tensor name before the common filter
# (conversion/qwen3vl.py Qwen3VLMoeTextModel.filter_tensors: name.replace("thinker.", "")), which
# Qwen3-Omni's checkpoint needs: thinker.model.layers.0... -> model.layers.0...
_THINKER_STRIPPED = frozenset({"Qwen3OmniMoeForConditionalGeneration"})


def text_model_name(name: str, hf_arch: str = "") -> str | None:
    """The name llama.cpp's converter gives the HF tensor ``name`` in the text model's GGUF, before
    its tensor map: None for a multimodal checkpoint's vision, audio and projector tensors, and
    the language model's own without their ``language_model.`` part (conversion/base.py
    ``ModelBase.filter_tensors``): ``model.language_model.layers.0...`` -> ``model.layers.0...``;
    for Qwen3-Omni (``hf_arch``) also without ``thinker.`` (`_THINKER_STRIPPED`)."""
    if hf_arch in _THINKER_STRIPPED:
        name = name.replace("thinker.", "")
    if name.startswith(_MULTIMODAL_PREFIXES) or any(part in name for part in _MULTIMODAL_PARTS):
        return None
    return name.replace("language_model.", "")


def _read_hf_config(path: Path) -> _HFConfig:
    """config.json: the architecture (one llama.cpp converts) and the block count."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{path} is a directory without config.json, not an HF checkpoint")
    config = read_json(cfg_path)
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path} is not a JSON object")
    archs = config.get("architectures") or []
    if not archs:
        raise InputError(f"{cfg_path} has no 'architectures'; supported: {supported_list()}")
    hf_arch = archs[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"unsupported architecture {hf_arch}; supported: {supported_list()}")
    text_cfg = config.get("text_config", config)
    if isinstance(config.get("thinker_config"), dict):  # Qwen3-Omni: the text model is the thinker's (as
        # conversion/base.py load_hparams renames it: config["text_config"] = thinker_config["text_config"])
        text_cfg = config["thinker_config"].get("text_config", text_cfg)
    n_blocks = text_cfg.get("num_hidden_layers") if isinstance(text_cfg, dict) else None
    if hf_arch == "NemotronHForCausalLM" and isinstance(text_cfg.get("layers_block_type"), list):
        n_blocks = len(text_cfg["layers_block_type"])  # what its converter counts (conversion/nemotron.py)
    if n_blocks is None and isinstance(text_cfg, dict):
        n_blocks = text_cfg.get("n_layers")  # DBRX's name for it (conversion/base.py find_hparam reads both)
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise InputError(f"{cfg_path}: 'num_hidden_layers' is {n_blocks!r}; expected a positive integer")
    quant = config.get("quantization_config") or text_cfg.get("quantization_config")
    fp8 = isinstance(quant, dict) and quant.get("quant_method") == "fp8"
    _check_variant(hf_arch, text_cfg, cfg_path)
    return _HFConfig(hf_arch, SUPPORTED_ARCHITECTURES[hf_arch], n_blocks, text_cfg, fp8)


# HF tensors llama.cpp's converter leaves out of the GGUF although their names look like weights:
# ERNIE-4.5's multi-token-prediction block and its projections (conversion/ernie.py filter_tensors)
_CONVERTER_DROPS = re.compile(r"^model\.mtp_(block|emb_norm|hidden_norm|linear_proj)\.\d+\.")


def _is_weight_matrix(path: Path, name: str, shape: tuple[int, ...], dtype: str, c: _HFConfig) -> bool:
    """Whether the HF tensor ``name`` is a weight matrix of the model's blocks (or outside them);
    such a tensor in a dtype other than float is an InputError, except the FP8 weights of a
    block-scaled FP8 checkpoint (DeepSeek-V3's and R1's as published): llama.cpp's converter
    dequantises them, they have the dequantised shape, and their values are read from its output."""
    if len(shape) < 2:
        return False
    layer = re.match(r"^model\.layers\.(\d+)\.", name)
    if layer and int(layer[1]) >= c.n_blocks:
        return False  # multi-token-prediction layers; the converter skips them too
    if _CONVERTER_DROPS.match(name) or (c.hf_arch in CONVERTER_KEEPS_MTP and _MTP_WEIGHTS.match(name)):
        return False  # (the MTP weights: alphaq converts with --no-mtp)
    if name == "lm_head.weight" and c.model_arch == MODEL_ARCH.HUNYUAN_MOE and c.text_cfg.get("tie_word_embeddings"):
        return False  # a tied checkpoint's copy: HunYuan's converter skips it (conversion/hunyuan.py modify_tensors)
    key = name.removesuffix(".weight")
    if not name.endswith(".weight") and not key.endswith(_FUSED_EXPERT_SUFFIXES) and not _DBRX_EXPERTS.search(name):
        return False  # biases, scales, buffers
    if dtype in HF_FP8_DTYPES and c.fp8:
        return True
    if dtype not in _HF_FLOAT_DTYPES:
        raise InputError(f"{path}: tensor {name} has dtype {dtype}; expected BF16/F16/F32 (or the FP8 of a "
                         "checkpoint whose quantization_config says fp8)")
    return True


def _slice_loader(files: _HFFiles, shard: Path, name: str):
    """make(index=None, rows_sl=slice(None)): a loader of tensor ``name`` (or of ``[index]`` of it,
    rows ``rows_sl`` of that), read when called."""
    def make(index: int | None = None, rows_sl: slice = slice(None)) -> Callable[[], np.ndarray]:
        def load():
            return files.read(shard, name, index, rows_sl)
        return load
    return make


_NEMOTRON_H_EXPERTS = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.experts\.")


def _quantised_tensor(path: Path, tmap, keys: Sequence[str], n_dims: int) -> str | None:
    """The GGUF tensor name of the first of the HF ``keys`` gguf-py maps, when llama.cpp quantises
    it; None otherwise (a key with no GGUF name at all is logged, as the converter would fail on it)."""
    gname = next((g for g in map(tmap.get_name, keys) if g is not None), None)
    if gname is None:
        logger.warning("%s: no GGUF name for %s in gguf-py; skipped", path, keys[0])
        return None
    tensor = gname + ".weight"
    return tensor if llama_quantizes(tensor, n_dims) else None


def _hf_matrices(path: Path, c: _HFConfig, tmap, name: str, shape: tuple[int, ...], slice_loader) -> list[_HFMatrix]:
    """The matrices llama.cpp quantises that the HF weight ``name`` becomes (none when its GGUF
    tensor is not quantised or has no GGUF name, the latter logged)."""
    key = name.removesuffix(".weight")
    m = _HF_EXPERT.match(key)
    if m:  # legacy per-expert 2-D tensor: one slice of the merged GGUF tensor
        merged = f"{m['prefix']}.{m['rest']}"
        # (LFM2-MoE's converter names the merged tensor without the "model." prefix, Nemotron-H's
        # as model.layers.N.mlp.experts.*: conversion/nemotron.py)
        tensor = _quantised_tensor(path, tmap, (merged, merged.removeprefix("model."),
                                                _NEMOTRON_H_EXPERTS.sub(r"model.layers.\1.mlp.experts.", merged)), 3)
        return [(tensor, int(m["expert"]), shape[0], shape[1], slice_loader())] if tensor else []
    if c.model_arch in TRANSPOSED_FUSED_EXPERTS and len(shape) == 3 and key.endswith(_FUSED_EXPERT_SUFFIXES):
        return _fused_experts(path, tmap, key, shape, slice_loader, input_major=True)
    if key.endswith("experts.gate_up_proj") and len(shape) == 3:
        return _fused_experts(path, tmap, key, shape, slice_loader)
    if c.model_arch == MODEL_ARCH.DBRX and _DBRX_EXPERTS.search(key):
        return _dbrx_experts(path, tmap, key, shape, c.text_cfg, slice_loader)
    if c.model_arch in GRANITE_MOE_ARCHS and key.endswith((".block_sparse_moe.input_linear", ".shared_mlp.input_linear")):
        return _granite_input_linear(key, shape, c, slice_loader)
    if c.model_arch in MLA_KV_B_SPLIT_ARCHS and key.endswith("kv_b_proj"):
        return [(tensor, None, rows, cols, loader)
                for tensor, rows, cols, loader in _deepseek2_kv_b(tmap, key, shape, c.text_cfg, slice_loader())
                if llama_quantizes(tensor, 3)]
    gname = tmap.get_name(key)
    rearranged = linear_attention_matrices(c.model_arch, key, shape, c.text_cfg, gname and gname + ".weight",
                                           slice_loader())
    if rearranged is not None:
        return [(tensor, None, rows, cols, loader) for tensor, rows, cols, loader in rearranged
                if llama_quantizes(tensor, 2)]
    if gname is None:
        logger.warning("%s: no GGUF name for %s in gguf-py; skipped", path, name)
        return []
    tensor = gname + ".weight"
    if not llama_quantizes(tensor, ggml_n_dims(shape)):
        return []
    if len(shape) == 3 and tmap.get_type(key) in EXPERT_TENSORS:  # fused (n_expert, rows, cols)
        return [(tensor, e, shape[1], shape[2], slice_loader(index=e)) for e in range(shape[0])]
    rows = math.prod(shape[:-1])
    base_loader = slice_loader()
    return [(tensor, None, rows, shape[-1], lambda f=base_loader, r=rows: f().reshape(r, -1))]


def _fused_experts(path: Path, tmap, key: str, shape: tuple[int, ...], slice_loader,
                   input_major: bool = False) -> list[_HFMatrix]:
    """Fused 3-D experts. Output-major (n_expert, n_out, n_in), as transformers 5 stores
    ``gate_up_proj``: gate the first half of the rows (conversion/qwen.py Qwen2MoeModel). Input-major
    (n_expert, n_in, n_out), as Qwen3-VL-MoE and Llama 4 publish ``gate_up_proj`` and ``down_proj``:
    gate the first half of the columns, each expert transposed (conversion/qwen3vl.py
    Qwen3VLMoeTextModel, conversion/llama.py Llama4Model)."""
    n_expert, n_in, n_out = (shape[0], shape[1], shape[2]) if input_major else (shape[0], shape[2], shape[1])
    base, proj = key.rsplit(".", 1)
    parts = {"gate_proj": slice(0, n_out // 2), "up_proj": slice(n_out // 2, n_out)} if proj == "gate_up_proj" \
        else {proj: slice(0, n_out)}
    out: list[_HFMatrix] = []
    for name, part in parts.items():
        tensor = _quantised_tensor(path, tmap, (f"{base}.{name}",), 3)
        if tensor is None:
            continue
        for e in range(n_expert):
            load = (lambda f=slice_loader(index=e), p=part: np.ascontiguousarray(f()[:, p].T)) if input_major \
                else slice_loader(index=e, rows_sl=part)
            out.append((tensor, e, part.stop - part.start, n_in, load))
    return out


def _granite_input_linear(key: str, shape: tuple[int, ...], c: _HFConfig, slice_loader) -> list[_HFMatrix]:
    """Granite-MoE's merged gate and up projections (JetMoE's parallel experts): routed experts
    (n_expert, 2*n_ff, n_embd), the shared expert (2*n_ff, n_embd); gate the first half of the
    rows (conversion/granite.py GraniteMoeModel.modify_tensors). Without routed experts the shared
    one is the block's dense FFN."""
    if len(shape) == 3:
        kinds, experts = (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP), range(shape[0])
    else:
        routed = bool(c.text_cfg.get("num_local_experts"))
        kinds = (MODEL_TENSOR.FFN_GATE_SHEXP, MODEL_TENSOR.FFN_UP_SHEXP) if routed else \
            (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP)
        experts = [None]
    n_ff, n_embd = shape[-2] // 2, shape[-1]
    out: list[_HFMatrix] = []
    for kind, rows in zip(kinds, (slice(0, n_ff), slice(n_ff, 2 * n_ff))):
        tensor = block_tensor_name(kind, key)
        if llama_quantizes(tensor, 3 if len(shape) == 3 else 2):
            out += [(tensor, e, n_ff, n_embd, slice_loader(index=e, rows_sl=rows)) for e in experts]
    return out


def _dbrx_experts(path: Path, tmap, key: str, shape: tuple[int, ...], cfg: dict, slice_loader) -> list[_HFMatrix]:
    """DBRX's experts, each projection fused in one 2-D (n_expert * n_ff, n_embd) tensor without a
    ".weight" suffix: conversion/dbrx.py DbrxModel.modify_tensors views it as (n_expert, n_ff, n_embd),
    w1 (gate) and v1 (up) as they are, w2 (down) permuted (0, 2, 1): expert e is rows e*n_ff.. of
    the tensor, transposed for w2."""
    n_expert, n_ff = int(cfg["ffn_config"]["moe_num_experts"]), int(cfg["ffn_config"]["ffn_hidden_size"])
    if shape != (n_expert * n_ff, shape[1]):
        raise InputError(f"{path}: {key} has shape {shape}; expected ({n_expert} experts x {n_ff}, n_embd)")
    tensor = _quantised_tensor(path, tmap, (key,), 3)
    if tensor is None:
        return []
    down = key.endswith(".w2")
    out: list[_HFMatrix] = []
    for e in range(n_expert):
        load = slice_loader(rows_sl=slice(e * n_ff, (e + 1) * n_ff))
        if down:
            out.append((tensor, e, shape[1], n_ff, lambda f=load: np.ascontiguousarray(f().T)))
        else:
            out.append((tensor, e, n_ff, shape[1], load))
    return out


def _deepseek2_kv_b(tmap, key: str, shape, cfg: dict, load_kv_b):
    """conversion/deepseek.py DeepseekV2Model.modify_tensors (and conversion/kimi_linear.py
    KimiLinearModel.modify_tensors, the same code): kv_b_proj -> k_b (transposed), v_b."""
    n_head_kv = int(cfg["num_key_value_heads"])
    v_dim = int(cfg["v_head_dim"])
    nope = int(cfg["qk_nope_head_dim"])
    rank = shape[1]
    if shape[0] != n_head_kv * (v_dim + nope):
        raise InputError(f"{key}: shape {shape} does not match {n_head_kv} heads x ({nope}+{v_dim})")

    def heads() -> np.ndarray:
        return load_kv_b().reshape(n_head_kv, nope + v_dim, rank)

    def k_b() -> np.ndarray:  # (n_head, rank, nope) -> ggml rows (n_head*rank, nope)
        return heads()[:, :nope, :].transpose(0, 2, 1).reshape(n_head_kv * rank, nope)

    def v_b() -> np.ndarray:  # (n_head, v_dim, rank) -> (n_head*v_dim, rank)
        return heads()[:, nope:, :].reshape(n_head_kv * v_dim, rank)

    out = []
    parts = (("k_b_proj", n_head_kv * rank, nope, k_b), ("v_b_proj", n_head_kv * v_dim, rank, v_b))
    for proj, rows, cols, loader in parts:
        gname = tmap.get_name(key.replace("kv_b_proj", proj))
        if gname is None:
            raise InputError(f"gguf-py has no tensor name for {key.replace('kv_b_proj', proj)}")
        out.append((gname + ".weight", rows, cols, loader))
    return out


def _check_unique(mats: list[WeightMatrix], path: Path) -> None:
    seen: set[tuple[str, int | None]] = set()
    for m in mats:
        k = (m.tensor, m.expert)
        if k in seen:
            raise InputError(f"{path}: {m.label} appears twice (conflicting tensor names)")
        seen.add(k)


# --------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_to_f32(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGUF tensor data (as GGUFReader exposes it) -> float32, the tensor's numpy shape (a Q8_0
    tensor's rows of bytes become rows of weights: gguf-py's dequantiser)."""
    if qtype in REQUANTISABLE_TYPES:
        return gguf.quants.dequantize(np.asarray(data), qtype)
    if qtype == GGMLQuantizationType.BF16:
        # the reader exposes BF16 as raw bytes (uint8, last axis 2x) or uint16
        u16 = data.view(np.uint16) if data.dtype == np.uint8 else data.astype(np.uint16, copy=False)
        return (u16.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(data, dtype=np.float32)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of conversion/llama.py ``LlamaModel.permute`` for a (rows, cols) matrix."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_released(reader: gguf.GGUFReader, view: np.ndarray, qtype) -> np.ndarray:
    """float32 copy of a memory-mapped tensor, then drop its pages from this process (without
    this, analysing a model keeps all of it resident: peak RSS ~ model size)."""
    out = np.array(gguf_to_f32(np.asarray(view), qtype), dtype=np.float32, copy=True)
    release_pages(reader, view)
    return out


def _gguf_readers(path: Path) -> list[gguf.GGUFReader]:
    """One reader per part of the GGUF model ``path`` (gguf_io.shard_paths: any part of a split
    GGUF opens the whole model; the first part holds its key/values)."""
    try:
        return [gguf.GGUFReader(p) for p in shard_paths(path)]
    except (ValueError, OSError, struct.error) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({exc})") from exc


def _open_gguf(path: Path) -> ModelWeights:
    readers = _gguf_readers(path)
    reader = readers[0]
    tensors = [(r, t) for r in readers for t in r.tensors]
    arch_name = _field(reader, gguf.Keys.General.ARCHITECTURE)
    names_to_arch = {MODEL_ARCH_NAMES[a]: a for a in SUPPORTED_GGUF_ARCHS}
    if arch_name not in names_to_arch:
        raise InputError(
            f"{path}: unsupported GGUF architecture {arch_name!r}; supported: {sorted(names_to_arch)}"
        )
    model_arch = names_to_arch[arch_name]
    n_blocks = _field(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch_name))
    if n_blocks is None:
        raise InputError(f"{path}: missing {gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch_name)}")
    n_blocks = int(n_blocks)
    n_head = _field(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch_name))
    n_head_kv = _field(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch_name), n_head)
    tmap = gguf.get_tensor_name_map(model_arch, n_blocks)

    for _, t in tensors:
        n_dims = ggml_n_dims(tuple(reversed([int(d) for d in t.shape])))
        if n_dims >= 2 and t.tensor_type not in FLOAT_TYPES + REQUANTISABLE_TYPES:
            raise InputError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}; only F32/F16/BF16 or Q8_0 GGUF weights can be "
                "read (a lower type's rounding would be measured as the model's; give the HF checkpoint or a "
                "BF16/Q8_0 GGUF)"
            )

    mats: list[WeightMatrix] = []
    for reader, t in tensors:
        ne = [int(d) for d in t.shape]  # GGUF ne = (cols, rows[, n_expert])
        np_shape = tuple(reversed(ne))
        if not llama_quantizes(t.name, ggml_n_dims(np_shape)):
            continue
        block, kind = _kind(t.name)
        qtype = t.tensor_type
        is_expert = len(ne) == 3 and tmap.get_type(t.name.removesuffix(".weight")) in EXPERT_TENSORS
        perm_heads = None
        if model_arch in QK_PERMUTED_ARCHS and kind in ("attn_q", "attn_k"):
            # (hybrid models give head counts per block, 0 in their recurrent blocks)
            heads = n_head if kind == "attn_q" else n_head_kv
            perm_heads = int(heads[block] if isinstance(heads, list) else heads)
        if is_expert:
            for e in range(ne[2]):
                def load(t=t, e=e, qtype=qtype, reader=reader):
                    return _load_released(reader, t.data[e], qtype)  # (rows, cols) of expert e
                mats.append(WeightMatrix(t.name, block, e, kind, ne[1], ne[0], load, qtype.name))
        else:
            rows = math.prod(np_shape[:-1])

            def load(t=t, qtype=qtype, rows=rows, heads=perm_heads, reader=reader):
                w = _load_released(reader, t.data, qtype).reshape(rows, -1)
                return unpermute_qk(w, heads) if heads else w

            mats.append(WeightMatrix(t.name, block, None, kind, rows, ne[0], load, qtype.name))

    mats.sort(key=_order)
    _check_unique(mats, path)
    logger.debug("%s: GGUF %s, %d blocks, %d matrices", path, arch_name, n_blocks, len(mats))
    n_elements = sum(math.prod(int(d) for d in t.shape) for _, t in tensors)  # every part
    used = _field(reader, gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=arch_name))
    return ModelWeights(path, "gguf", arch_name, model_arch, n_blocks, mats, n_elements=n_elements,
                        experts_used=int(used) if used else None)

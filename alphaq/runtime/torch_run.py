"""Run an AlphaQ GGUF in torch: the architecture from an HF checkpoint, every weight from the GGUF.

    model = torch_run.load("model-aq.gguf", "hf-checkpoint/", device="cpu")
    tokenizer = torch_run.load_tokenizer("hf-checkpoint/")
    out = torch_run.generate(model, tokenizer("The module")["input_ids"], 32, Sampling(greedy=True),
                             stop_ids=[tokenizer.eos_token_id])

HF_DIR (the checkpoint the GGUF was converted from) supplies only config.json and the tokenizer:
the model is built from the config with every parameter set to NaN, then every parameter is written
from the GGUF. A parameter left NaN (no tensor for it) is an error, and so is a GGUF tensor with no
place in the model, so a wrong HF_DIR fails instead of silently mixing weights.

Two compute paths, same weights:

* plain (default on CPU): gguf-py dequantises every tensor into the HF model (``alphaq.runtime.torch_ref``),
  torch computes in fp32. Runs expert-granular files, which stock llama.cpp cannot.
* kernels (default on CUDA; on CPU only under TRITON_INTERPRET=1, for testing): linear layers and
  experts compute from the raw GGUF blocks with the Triton kernels (``alphaq.runtime.kernel_modules``).

Architectures: those checked token for token against llama.cpp (tests/test_torch_run.py), see
``SUPPORTED_ARCHS``. Any other is refused: the converter may transform weights for it in ways the
loader does not invert (as it does for Mixtral's Q/K rows and DeepSeek-2's kv_b_proj).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH

from alphaq.runtime import torch_ref
from alphaq.errors import AlphaQError
from alphaq.gguf.expert import map_name, read_layouts
from alphaq.model.weights import QK_PERMUTED_ARCHS, unpermute_qk

log = logging.getLogger(__name__)

# GGUF architectures verified against llama.cpp on the committed fixtures, with the one HF class
# each runs as (another class, e.g. a dense LlamaForCausalLM for a llama file, is refused).
SUPPORTED_ARCHS: dict[MODEL_ARCH, str] = {
    MODEL_ARCH.LLAMA: "MixtralForCausalLM",
    MODEL_ARCH.QWEN2MOE: "Qwen2MoeForCausalLM",
    MODEL_ARCH.QWEN3MOE: "Qwen3MoeForCausalLM",
    MODEL_ARCH.DEEPSEEK2: "DeepseekV2ForCausalLM",
}

# GGUF hyperparameters that live in no tensor, against the HF config attributes that hold them
# (first one present). A mismatch means HF_DIR is not the checkpoint the GGUF was made from.
_HPARAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("block_count", ("num_hidden_layers",)),
    ("embedding_length", ("hidden_size",)),
    ("attention.head_count", ("num_attention_heads",)),
    ("expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
    ("expert_used_count", ("num_experts_per_tok",)),
    ("attention.layer_norm_rms_epsilon", ("rms_norm_eps",)),
    ("rope.freq_base", ("rope_theta",)),
)


# Whether llama.cpp renormalises the chosen experts' router weights to sum to 1: fixed per graph
# (build_moe_ffn's norm_w in src/models/llama.cpp, qwen2moe.cpp, qwen3moe.cpp), while deepseek2.cpp
# reads the GGUF key expert_weights_norm. transformers follows the config's norm_topk_prob where the
# router has that switch, so a checkpoint whose config disagrees with llama.cpp runs differently
# there (the qwen3moe fixture: norm_topk_prob false; tests/test_torch_run.py shows the difference).
_LLAMA_CPP_NORM_TOPK: dict[MODEL_ARCH, bool] = {
    MODEL_ARCH.LLAMA: True,
    MODEL_ARCH.QWEN2MOE: False,
    MODEL_ARCH.QWEN3MOE: True,
}


def llama_cpp_norm_topk(arch: MODEL_ARCH, reader: gguf.GGUFReader) -> bool:
    """Whether llama.cpp renormalises the top-k router weights of this file."""
    if arch in _LLAMA_CPP_NORM_TOPK:
        return _LLAMA_CPP_NORM_TOPK[arch]
    field = reader.get_field(f"{gguf.MODEL_ARCH_NAMES[arch]}.expert_weights_norm")
    return bool(field.contents()) if field is not None else False


def norm_topk_switches(model) -> list[torch.nn.Module]:
    """The router modules whose top-k renormalisation follows a ``norm_topk_prob`` attribute."""
    return [m for m in model.modules() if isinstance(getattr(m, "norm_topk_prob", None), bool)]


def gguf_arch(path: Path) -> tuple[MODEL_ARCH, gguf.GGUFReader]:
    """The GGUF's architecture (must be in SUPPORTED_ARCHS) and its reader."""
    if not Path(path).is_file():
        raise AlphaQError(f"model {path} does not exist" if not Path(path).exists() else
                          f"model {path} is a directory; give the GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise AlphaQError(f"{path} is not a readable GGUF file: {exc}") from exc
    if reader.get_field(gguf.Keys.Split.LLM_KV_SPLIT_COUNT) is not None and \
            int(reader.get_field(gguf.Keys.Split.LLM_KV_SPLIT_COUNT).contents()) > 1:
        raise AlphaQError(f"{path} is part of a split GGUF; the torch runtime reads single files "
                          "(merge the parts with llama-gguf-split --merge, or run it with llama.cpp)")
    name = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name), None)
    if arch not in SUPPORTED_ARCHS:
        known = ", ".join(f"{gguf.MODEL_ARCH_NAMES[a]} ({cls})" for a, cls in SUPPORTED_ARCHS.items())
        raise AlphaQError(f"{path} is architecture {name!r}; the torch runtime supports {known} "
                          f"(run other architectures with llama.cpp)")
    return arch, reader


def source_hint(reader: gguf.GGUFReader) -> str:
    """What the GGUF says about the checkpoint it came from, for error messages ('' if nothing)."""
    keys = ("general.source.huggingface.repository", "general.source.url", "general.base_model.0.repo_url",
            "general.name")
    found = [f"{k.removeprefix('general.')} = {f.contents()}" for k in keys if (f := reader.get_field(k)) is not None]
    return f" (the file says: {'; '.join(found)})" if found else ""


def check_hf_dir(hf_dir: Path | None, gguf_path: Path, reader: gguf.GGUFReader) -> Path:
    if hf_dir is None:
        raise AlphaQError(
            f"{gguf_path} needs --hf HF_DIR: the Hugging Face checkpoint it was converted from{source_hint(reader)}; "
            "only its config.json and tokenizer files are read (weights come from the GGUF)")
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise AlphaQError(f"--hf {hf_dir} has no config.json; it must be the Hugging Face checkpoint "
                          f"{gguf_path.name} was converted from{source_hint(reader)}")
    return hf_dir


def _config_value(config, attrs: Sequence[str]):
    for a in attrs:
        if a == "rope_theta" and isinstance(getattr(config, "rope_parameters", None), dict):
            value = config.rope_parameters.get("rope_theta")  # transformers 5 keeps it there
        else:
            value = getattr(config, a, None)
        if value is not None:
            return a, value
    return None, None


def check_config(config, reader: gguf.GGUFReader, arch: MODEL_ARCH, gguf_path: Path) -> None:
    """Hyperparameters no tensor carries must agree between HF_DIR's config and the GGUF."""
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    wrong = []
    for key, attrs in _HPARAMS:
        field = reader.get_field(f"{arch_name}.{key}")
        attr, value = _config_value(config, attrs)
        if field is None or attr is None:
            continue
        stored = field.contents()
        if not math.isclose(float(stored), float(value), rel_tol=1e-6):  # f32 in the GGUF
            wrong.append(f"{attr} {value} vs {arch_name}.{key} {stored}")
    if wrong:
        raise AlphaQError(f"the HF config does not match {gguf_path.name}: {'; '.join(wrong)}; "
                          f"pass the checkpoint the GGUF was converted from{source_hint(reader)}")


def build_model(hf_dir: Path):
    """The HF model from config.json alone, fp32, every parameter NaN until the GGUF fills it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, OSError) as exc:
        raise AlphaQError(f"transformers has no causal LM for the config in {hf_dir}: {exc}") from exc
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.fill_(float("nan"))
    return model


def _float_tensors(model, reader: gguf.GGUFReader, arch: MODEL_ARCH, n_blocks: int, done: set[str]) -> set[str]:
    """Write the parameters torch_ref.assign_gguf does not (norms, routers, biases) from the GGUF's
    tensors of the same gguf-py name; returns the GGUF names used."""
    from gguf.quants import dequantize

    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    tensors = {t.name: t for t in reader.tensors if t.name not in done}
    n_head, n_head_kv = torch_ref.head_counts(reader, arch)
    used = set()
    for name, p in model.named_parameters():
        if not torch.isnan(p).any():
            continue
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        t = tensors.get(gguf_name)
        if t is None:
            continue  # reported by the caller with every other unfilled parameter
        w = dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.tensor_type))).astype(np.float32)
        if arch in QK_PERMUTED_ARCHS and gguf_name.endswith(("attn_q.bias", "attn_k.bias")):
            w = unpermute_qk(w.reshape(-1), n_head if "attn_q" in gguf_name else n_head_kv)
        if w.size != p.numel():
            raise AlphaQError(f"{gguf_name} has {w.size} values for {name} of shape {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(w).reshape(tuple(p.shape))))
        used.add(gguf_name)
    return used


def load_weights(model, gguf_path: Path, arch: MODEL_ARCH, reader: gguf.GGUFReader) -> None:
    """Every parameter of ``model`` from ``gguf_path``, and every GGUF tensor into ``model``."""
    n_blocks = int(reader.get_field(f"{gguf.MODEL_ARCH_NAMES[arch]}.block_count").contents())
    used = torch_ref.assign_gguf(model, gguf_path, strict=False)  # the rest is placed and checked below
    used |= _float_tensors(model, reader, arch, n_blocks, used)
    used |= {map_name(name) for name in read_layouts(gguf_path)}  # consumed with their groups
    unused = sorted(t.name for t in reader.tensors if t.name not in used)
    unset = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    if unset:
        raise AlphaQError(f"{gguf_path.name} has no tensor for {len(unset)} parameter(s) of the HF model, "
                          f"e.g. {unset[0]}: the HF checkpoint is not the one this GGUF was converted from")
    if unused:
        raise AlphaQError(f"{gguf_path.name} has {len(unused)} tensor(s) the HF model has no place for, "
                          f"e.g. {unused[0]}; the torch runtime cannot run this file")


def check_device(device: torch.device, use_kernels: bool) -> None:
    if device.type not in ("cpu", "cuda"):
        raise AlphaQError(f"device {device} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlphaQError(f"no CUDA device visible to torch {torch.__version__} "
                          f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
    if use_kernels:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise AlphaQError("the kernel path needs Triton, the optional extra: pip install '.[gpu]'") from exc
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise AlphaQError("the Triton kernels run on CPU only in Triton's interpreter: "
                              "start Python with TRITON_INTERPRET=1")


def load(gguf_path: Path, hf_dir: Path | None, device: str | torch.device = "cpu", use_kernels: bool | None = None,
         llama_cpp_routing: bool = False):
    """The HF causal LM of ``hf_dir``'s config holding ``gguf_path``'s weights, on ``device``, in eval mode.

    use_kernels: compute linear layers and experts from raw GGUF blocks with the Triton kernels
    (default: on CUDA yes, on CPU no).
    llama_cpp_routing: renormalise the top-k router weights as llama.cpp does for this file, where
    the HF config says otherwise (default: as the config says, with a warning when they differ).
    """
    gguf_path = Path(gguf_path)
    device = torch.device(device)
    use_kernels = device.type == "cuda" if use_kernels is None else use_kernels
    arch, reader = gguf_arch(gguf_path)
    hf_dir = check_hf_dir(hf_dir, gguf_path, reader)
    check_device(device, use_kernels)
    model = build_model(hf_dir)
    if type(model).__name__ != SUPPORTED_ARCHS[arch]:
        raise AlphaQError(f"{hf_dir} builds a {type(model).__name__}, but {gguf.MODEL_ARCH_NAMES[arch]} files run "
                          f"here as {SUPPORTED_ARCHS[arch]}: pass the checkpoint {gguf_path.name} was converted "
                          f"from{source_hint(reader)}")
    check_config(model.config, reader, arch, gguf_path)
    load_weights(model, gguf_path, arch, reader)
    norm = llama_cpp_norm_topk(arch, reader)
    switches = [m for m in norm_topk_switches(model) if m.norm_topk_prob != norm]
    if switches and llama_cpp_routing:
        for m in switches:
            m.norm_topk_prob = norm
    elif switches:
        log.warning("llama.cpp %s the top-k router weights of %s files but this config has norm_topk_prob=%s; "
                    "following the config, so outputs differ from llama.cpp's "
                    "(--llama-cpp-routing / llama_cpp_routing=True does what llama.cpp does)",
                    "renormalises" if norm else "does not renormalise", gguf.MODEL_ARCH_NAMES[arch], not norm)
    if use_kernels:
        from alphaq.runtime import kernel_modules

        kernel_modules.install(model, gguf_path)
    return model.to(device)


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as exc:
        raise AlphaQError(f"no tokenizer in {hf_dir}: {exc}") from exc


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    greedy: bool = False  # argmax; the rest is ignored
    temperature: float = 0.8  # logits are divided by it before the softmax
    top_k: int = 40  # sample among the k most likely tokens (0: all)
    seed: int = 0  # of a local torch.Generator, so a run is reproducible

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:  # (torch.Generator's seed is a 64-bit integer)
            raise AlphaQError(f"seed {self.seed} must be between 0 and 2^63 - 1")
        if not self.greedy and not self.temperature > 0:
            raise AlphaQError(f"temperature {self.temperature} must be > 0 (or use greedy decoding)")
        if self.top_k < 0:
            raise AlphaQError(f"top-k {self.top_k} must be >= 0")


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    tokens: list[int]  # generated, including a final stop token if one was hit
    logits: torch.Tensor  # (len(tokens), n_vocab) float32 on the CPU: the logits each token was chosen from


def _pick(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    scaled = logits.double() / sampling.temperature
    if 0 < sampling.top_k < scaled.numel():
        cutoff = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    return int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=rng))


def hf_context_length(hf_dir: Path | None) -> int | None:
    """max_position_embeddings of a checkpoint's config.json (its text model's, for multimodal ones),
    read without loading anything; None when it is not there."""
    import json

    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return None
    n = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
    return n if isinstance(n, int) and n > 0 else None


def context_length(model) -> int | None:
    """The positions the model was trained for (its HF config's max_position_embeddings), if known."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], n_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = (), progress: bool = False) -> Generation:
    """Up to ``n_tokens`` tokens after ``prompt_ids``: one prefill, then one decode step per token
    with the KV cache (the GEMM, then the GEMV paths of the kernels). Prompt and tokens together stay
    within the model's trained context (llama.cpp's -n beyond it would need a context shift)."""
    from tqdm import tqdm

    if n_tokens < 1:
        raise AlphaQError(f"number of tokens {n_tokens} must be at least 1")
    if not prompt_ids:
        raise AlphaQError("the prompt has no tokens")
    n_ctx = context_length(model)
    if n_ctx is not None and len(prompt_ids) + n_tokens > n_ctx:
        raise AlphaQError(f"-n {n_tokens} after a prompt of {len(prompt_ids)} tokens exceeds the model's context of "
                          f"{n_ctx} tokens (max_position_embeddings); at most {max(0, n_ctx - len(prompt_ids))}")
    device = model.device
    rng = torch.Generator().manual_seed(sampling.seed)
    out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True, logits_to_keep=1)
    tokens, logits = [], []
    for i in tqdm(range(n_tokens), desc="generate", unit="tok", disable=not progress, dynamic_ncols=True):
        step = out.logits[0, -1].float().cpu()
        logits.append(step)
        tokens.append(_pick(step, sampling, rng))
        if tokens[-1] in stop_ids or i == n_tokens - 1:
            break
        # (transformers 5.24, pinned: the KV cache is `cache`; `past_key_values` is a deprecated alias)
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), cache=out.cache, use_cache=True)
    return Generation(list(prompt_ids), tokens, torch.stack(logits))

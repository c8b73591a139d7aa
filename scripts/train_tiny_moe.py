#!/usr/bin/env python3
"""Train the project's zoo of tiny MoE causal LMs on real offline text.

No pretrained MoE weights can be downloaded here, so AlphaQ's fixtures and benchmark models are
trained from scratch with the real Hugging Face ``transformers`` classes and saved as ordinary HF
checkpoints (config.json, BF16 safetensors, SentencePiece tokenizer files), which llama.cpp's own
converter reads.

    python scripts/train_tiny_moe.py --zoo fixtures --out tests/fixtures      # committed, ~8 MB each
    python scripts/train_tiny_moe.py --zoo bench --out .cache/zoo             # >= 15M params, cached
    python scripts/train_tiny_moe.py --zoo bench --only mixtral --steps 2000 --device cuda
    python scripts/train_tiny_moe.py --zoo unseen --out /tmp/unseen-zoo --tokenizer-dir DIR  # a DeepSeek-V3, CPU ~11 min

Each model directory also gets
  * ``router_init.safetensors``: the router (expert gate) weights at initialisation, for the
    router-norm-change baseline (paper 004);
  * ``train_log.json``: seed, steps, final training loss, and held-out perplexity per domain next to
    a unigram model's, all measured at the end of training.

Everything is seeded: the same command on the same machine and torch version gives the same model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphaq.evaluate import corpus  # noqa: E402

log = logging.getLogger("train_tiny_moe")

VOCAB_SIZE = 1024
SEQ_LEN = 256
TOKENIZER_CHARS_PER_DOMAIN = 3_000_000  # enough text for a stable 1k-piece BPE vocabulary
HELDOUT_CHARS = 120_000  # per domain; also written to tests/fixtures/heldout/<domain>.txt


# --------------------------------------------------------------------------------------------
# Model specs: architectures differ by data (a transformers config), not by code.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_class: str  # transformers config class name
    config: dict  # kwargs for it (vocab size and special ids are added)
    steps: int  # default training steps on CPU; GPU runs may pass --steps
    batch: int = 16
    lr: float = 3e-3
    note: str = ""
    architecture: str | None = None  # config.json's architectures[0], when not the config class's name


_ATTN = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
# DeepSeek's multi-head latent attention (llama.cpp needs q_lora_rank unless the model has V2-Lite's 26/27 layers)
_MLA = dict(q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, head_dim=32)

FIXTURES = [
    ModelSpec(
        "mixtral",
        "MixtralConfig",
        dict(_ATTN, num_hidden_layers=2, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
        steps=1000,
        note="Mixtral: 8 experts, top-2, expert width 256",
    ),
    ModelSpec(
        "qwen2moe",
        "Qwen2MoeConfig",
        dict(
            _ATTN,
            num_hidden_layers=2,
            intermediate_size=256,
            moe_intermediate_size=96,  # not a multiple of 256, like Qwen1.5-MoE's 1408: exercises type fallbacks
            shared_expert_intermediate_size=256,
            num_experts=16,
            num_experts_per_tok=4,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        steps=1000,
        note="Qwen2-MoE: shared expert + 16 routed experts of width 96 (not a multiple of 256), top-4",
    ),
    ModelSpec(
        "qwen3moe",
        "Qwen3MoeConfig",
        dict(
            _ATTN,
            num_hidden_layers=2,
            intermediate_size=256,
            moe_intermediate_size=128,
            num_experts=16,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        steps=1000,
        note="Qwen3-MoE: 16 experts of width 128, top-8, QK-norm",
    ),
    ModelSpec(
        "deepseek2",
        "DeepseekV2Config",
        dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            intermediate_size=512,
            moe_intermediate_size=256,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            **_MLA,
        ),
        steps=1000,
        note="DeepSeek-V2: MLA attention (q and kv LoRA rank 256), 8 routed experts top-2 + 1 shared expert",
    ),
]

_BENCH_ATTN = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64)
BENCH = [
    ModelSpec(
        "mixtral-bench",
        "MixtralConfig",
        dict(_BENCH_ATTN, num_hidden_layers=8, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
        steps=2000,
        batch=32,
        lr=2e-3,
        note="Mixtral-style, 8 blocks, 8 experts of width 256, top-2",
    ),
    ModelSpec(
        "qwen2moe-bench",
        "Qwen2MoeConfig",
        dict(
            _BENCH_ATTN,
            num_hidden_layers=8,
            intermediate_size=512,
            moe_intermediate_size=160,  # 5 x 32, like 1408 = 44 x 32: k-quants fall back on ffn_down
            shared_expert_intermediate_size=512,
            num_experts=16,
            num_experts_per_tok=4,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        steps=2000,
        batch=32,
        lr=2e-3,
        note="Qwen2-MoE-style, 8 blocks, shared expert + 16 experts of width 160, top-4",
    ),
    ModelSpec(
        "qwen3moe-bench",
        "Qwen3MoeConfig",
        dict(
            _BENCH_ATTN,
            num_hidden_layers=8,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_experts=16,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        steps=2000,
        batch=32,
        lr=2e-3,
        note="Qwen3-MoE-style, 8 blocks, 16 experts of width 128, top-8",
    ),
]

# Architectures the product supports but the fixtures and bench zoo do not hold: trained only to check
# the default on a model whose kind no setting was ever tuned on (bench/SELFCAL.md, "Unseen architectures").
UNSEEN = [
    ModelSpec(
        "deepseek3",
        "DeepseekV3Config",
        dict(
            hidden_size=256,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=3,
            first_k_dense_replace=1,  # a dense first block, as DeepSeek-V3's first three
            intermediate_size=512,
            moe_intermediate_size=128,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,  # grouped top-k routing with sigmoid scores and a correction bias
            topk_group=2,
            n_shared_experts=1,
            **_MLA,
        ),
        steps=1000,
        note="DeepSeek-V3: MLA, a dense first block, 16 routed experts (4 groups, top-2 groups) top-4 + 1 shared",
    ),
    ModelSpec(
        "glm45",
        "Glm4MoeConfig",
        dict(
            _ATTN,  # grouped KV heads, as GLM-4.5's 96 / 8
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=512,
            moe_intermediate_size=128,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            partial_rotary_factor=0.5,
        ),
        steps=1000,
        note="GLM-4.5: grouped KV heads, half-rotary, a dense first block, 16 routed experts top-4 (sigmoid) + 1 shared",
    ),
    ModelSpec(
        "qwen35moe",
        "Qwen3_5MoeTextConfig",
        dict(
            _ATTN,  # the full-attention block's gated attention, grouped KV heads
            num_hidden_layers=4,  # gated DeltaNet (linear attention) in blocks 0-2, full attention in block 3
            full_attention_interval=4,
            linear_num_key_heads=2,  # 2 value heads per key head, as Qwen3.5's 16 / 32: the converter reorders them
            linear_num_value_heads=4,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_conv_kernel_dim=4,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            num_experts=16,
            num_experts_per_tok=4,
            # transformers 5 reads this tokenizer as Qwen3.5's, which adds one token past the 1,024
            vocab_size=VOCAB_SIZE + 16,
        ),
        steps=1000,
        architecture="Qwen3_5MoeForCausalLM",
        note="Qwen3.5-MoE: gated DeltaNet in 3 blocks of 4, gated attention in the 4th, 16 experts top-4 + 1 shared",
    ),
]

# Depth: the damage stage measures at most DamageConfig.anchors blocks per tensor kind (8; 4 until
# the 24-block study) and interpolates the rest (alphaq.damage.anchors); real MoE models have 24-94
# blocks. The bench zoo's Mixtral at 24 and at 48 blocks checks that interpolation (bench/SELFCAL.md,
# "Depth anchors on a 24-block model", "Anchor spacing", "Depth anchors on a 48-block model").
DEEP = [
    ModelSpec(
        "mixtral-deep24",
        "MixtralConfig",
        dict(_BENCH_ATTN, num_hidden_layers=24, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
        steps=500,  # 4 s a step on 2 cores: half the bench model's tokens, in about 35 min
        batch=16,
        lr=2e-3,
        note="Mixtral-style, 24 blocks, 8 experts of width 256, top-2 (mixtral-bench three times as deep)",
    ),
    # Qwen3-30B-A3B's depth, where the default's 8 anchors stand 6.7 blocks apart; half the width
    # (a quarter of the work per block) so that it trains on 2 cores in about 26 min. At 128 wide
    # llama.cpp falls back from every k-quant and IQ type to IQ4_NL/Q4_0/Q5_0/Q5_1/Q8_0, so it
    # checks the interpolation on that ladder only
    ModelSpec(
        "mixtral-deep48",
        "MixtralConfig",
        dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64, num_hidden_layers=48,
             intermediate_size=128, num_local_experts=8, num_experts_per_tok=2),
        steps=500,
        batch=16,
        lr=2e-3,
        note="Mixtral-style, 48 blocks of width 128, 8 experts of width 128, top-2",
    ),
]

ZOOS = {"fixtures": FIXTURES, "bench": BENCH, "unseen": UNSEEN, "deep": DEEP}


# --------------------------------------------------------------------------------------------
# Tokenizer and data
# --------------------------------------------------------------------------------------------


def train_tokenizer(out_dir: Path) -> Path:
    """A 1k-piece SentencePiece BPE on both domains' training split (byte fallback, identity
    normalisation so that newlines and indentation survive for code)."""
    import sentencepiece as spm

    model_path = out_dir / "tokenizer.model"
    if model_path.exists():
        return model_path
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for domain in corpus.DOMAINS:
        text = corpus.read_text(domain, "train", max_chars=TOKENIZER_CHARS_PER_DOMAIN)
        lines.extend(line for line in text.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,
        num_threads=1,  # deterministic merges
        minloglevel=2,
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}, indent=2) + "\n")
    return model_path


def encode_split(sp, domain: str, split: str, max_chars: int | None = None,
                 cache_dir: Path | None = None) -> np.ndarray:
    """Token ids of a split: each file is BOS + its pieces, files concatenated in sorted order.

    Cached as .npy keyed by the tokenizer's bytes, so that a machine without the corpus (a lent
    GPU machine) can train from a carried cache."""
    if cache_dir is not None:
        key = hashlib.sha1(sp.serialized_model_proto()).hexdigest()[:12]
        path = cache_dir / f"{domain}-{split}-{max_chars or 'all'}-{key}.npy"
        if path.exists():
            return np.load(path)
        ids = encode_split(sp, domain, split, max_chars)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, ids)
        return ids
    ids: list[int] = []
    total = 0
    for f in corpus.list_files(domain, split):
        text = f.path.read_text(encoding="utf-8", errors="replace")
        if max_chars is not None:
            text = text[: max_chars - total]
        ids.append(sp.bos_id())
        ids.extend(sp.encode(text))
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return np.asarray(ids, dtype=np.uint16)  # vocab < 65536; halves the carried cache


def heldout_text(domain: str) -> str:
    return corpus.read_text(domain, "test", max_chars=HELDOUT_CHARS)


def unigram_ppl(train_ids: np.ndarray, test_ids: np.ndarray) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on the training tokens."""
    counts = np.bincount(train_ids, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[test_ids].mean()))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_config(spec: ModelSpec):
    import transformers

    cls = getattr(transformers, spec.config_class)
    cfg = cls(**{
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "output_router_logits": True,  # include the load-balancing loss, as real MoE training does
        "router_aux_loss_coef": 0.01,
        **spec.config,
    })
    cfg.architectures = [spec.architecture or spec.config_class.replace("Config", "ForCausalLM")]
    return cfg


def router_tensors(state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Expert-gate (router) weights: 2-D tensors named '*.gate.weight' with one row per expert."""
    return {
        k: v.detach().to(torch.float32).cpu().contiguous()
        for k, v in state.items()
        if k.endswith(".gate.weight") and v.ndim == 2 and v.shape[0] == n_experts
    }


def saved_state(model) -> dict[str, torch.Tensor]:
    """The state dict under the names save_pretrained writes (transformers 5 renames MoE weights
    on save, e.g. Mixtral's in-memory mlp.gate becomes block_sparse_moe.gate on disk)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state = {}
        for shard in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(shard))
    return state


def n_experts_of(cfg) -> int:
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError("config has no expert count")


@torch.no_grad()
def heldout_ppl(model, ids: np.ndarray, device: torch.device, seq_len: int = SEQ_LEN) -> float:
    """Non-overlapping windows of seq_len; every token after the first of a window is scored."""
    model.eval()
    n_win = len(ids) // seq_len
    x = torch.from_numpy(ids[: n_win * seq_len].astype(np.int64)).view(n_win, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n_win, 16):
        batch = x[i : i + 16].to(device)
        logits = model(input_ids=batch).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = batch[:, 1:]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += tgt.numel()
    model.train()
    return math.exp(nll / count)


def train_one(spec: ModelSpec, out_root: Path, tok_dir: Path, steps: int, device: torch.device, seed: int,
              token_cache: Path | None = None) -> dict:
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    train = {d: encode_split(sp, d, "train", cache_dir=token_cache) for d in corpus.DOMAINS}
    test = {d: encode_split(sp, d, "test", HELDOUT_CHARS, cache_dir=token_cache) for d in corpus.DOMAINS}

    cfg = build_config(spec)
    torch.manual_seed(seed)  # the model init is the one place transformers uses the global RNG
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    router_init = router_tensors(saved_state(model), n_experts_of(cfg))
    t0 = time.time()
    losses = train_steps(model, spec, cfg, train, steps, device, seed)
    model = model.to(torch.bfloat16)
    result = {
        "name": spec.name,
        "architecture": cfg.architectures[0],
        "note": spec.note,
        "params": n_params,
        "seed": seed,
        "steps": steps,
        "batch": spec.batch,
        "seq_len": SEQ_LEN,
        "lr": spec.lr,
        "device": device.type,
        "train_seconds": round(time.time() - t0, 1),
        "initial_loss": round(float(np.mean(losses[:10])), 4),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "heldout": {d: {"tokens": int(len(test[d])),
                        "ppl_bf16": round(heldout_ppl(model, test[d], device), 3),
                        "ppl_unigram": round(unigram_ppl(train[d], test[d]), 3)} for d in corpus.DOMAINS},
    }
    save_model(model, out_root / spec.name, tok_dir, router_init, result)
    log.info("%s: %d params, loss %.3f -> %.3f, held-out ppl %s", spec.name, n_params,
             result["initial_loss"], result["final_loss"],
             {d: result["heldout"][d]["ppl_bf16"] for d in corpus.DOMAINS})
    return result


def train_steps(model, spec: ModelSpec, cfg, train: dict[str, np.ndarray], steps: int, device: torch.device,
                seed: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay; every batch half prose, half code, windows drawn
    by a seeded generator. Returns the language-model loss of each step (router aux loss removed)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    use_amp = device.type == "cuda"
    streams = [torch.from_numpy(train[d].astype(np.int64)) for d in corpus.DOMAINS]
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"train {spec.name}", unit="step", mininterval=2.0)
    for step in bar:
        rows = []
        for b in range(spec.batch):
            s = streams[b % len(streams)]  # half prose, half code in every batch
            start = int(torch.randint(0, len(s) - SEQ_LEN - 1, (1,), generator=gen))
            rows.append(s[start : start + SEQ_LEN])
        x = torch.stack(rows).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outp = model(input_ids=x, labels=x)
        loss = outp.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        aux = getattr(outp, "aux_loss", None)
        lm_loss = float(loss.detach()) - (float(aux.detach()) * cfg.router_aux_loss_coef if aux is not None else 0.0)
        losses.append(lm_loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return losses


def save_model(model, out: Path, tok_dir: Path, router_init: dict, result: dict) -> None:
    """The HF checkpoint, its tokenizer files, the router at initialisation and the training log."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)  # converts tokenizer.model (needs protobuf)
    tok.save_pretrained(out)
    (out / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    save_file(router_init, str(out / "router_init.safetensors"))
    (out / "train_log.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", choices=sorted(ZOOS), default="fixtures")
    p.add_argument("--out", type=Path, required=True, help="directory that receives one folder per model")
    p.add_argument("--only", nargs="*", help="train only these model names")
    p.add_argument("--steps", type=int, help="override each spec's step count")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-dir", type=Path, help="reuse/write the tokenizer here (default OUT/tokenizer)")
    p.add_argument("--heldout-dir", type=Path, help="also write the held-out texts here")
    p.add_argument("--token-cache", type=Path, default=Path(".cache/tokens"),
                   help="cache of the tokenised corpus (carry it to machines without the corpus)")
    p.add_argument("--prepare-only", action="store_true", help="build tokenizer and token cache, train nothing")
    p.add_argument("--retrain", action="store_true", help="train even models whose train_log.json exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    specs = ZOOS[args.zoo]
    if args.only:
        unknown = set(args.only) - {s.name for s in specs}
        if unknown:
            p.error(f"unknown model(s) {sorted(unknown)}; zoo {args.zoo!r} has {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in args.only]
    tok_dir = args.tokenizer_dir or (args.out / "tokenizer")
    train_tokenizer(tok_dir)
    if args.heldout_dir:
        args.heldout_dir.mkdir(parents=True, exist_ok=True)
        for d in corpus.DOMAINS:
            (args.heldout_dir / f"{d}.txt").write_text(heldout_text(d))
    if args.prepare_only:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        for d in corpus.DOMAINS:
            encode_split(sp, d, "train", cache_dir=args.token_cache)
            encode_split(sp, d, "test", HELDOUT_CHARS, cache_dir=args.token_cache)
        return 0
    for spec in specs:
        if (args.out / spec.name / "train_log.json").exists() and not args.retrain:
            log.info("%s: already trained in %s (pass --retrain to train again)", spec.name, args.out)
            continue
        train_one(spec, args.out, tok_dir, args.steps or spec.steps, device, args.seed, args.token_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A large, randomly initialised Mixtral-architecture checkpoint, for memory and speed benchmarks only.

Trained weights are irrelevant to how much memory conversion takes or how long it runs, and
training a >1 GB model is out of reach here; so the streaming benchmark (peak RSS / BF16 size)
uses this seeded random model. Never use it for quality claims.

    python scripts/make_large_random_moe.py .cache/large-random-mixtral [--hidden 1024 --ffn 3072 --layers 8]
    python scripts/make_large_random_moe.py .cache/qwen3-30b-a3b-4blk --arch qwen3moe --layers 4

``--arch qwen3moe`` has Qwen3-30B-A3B's real block shapes (hidden 2048, 32 query / 4 KV heads of
128, 128 experts of width 768, top-8, QK-norm) with this project's 1,024-piece vocabulary; the
checkpoint is sharded with an index and per-expert tensor names, as published models are.

``--arch deepseek2-lite`` has DeepSeek-V2-Lite's shapes: hidden 2048, MLA (16 heads, kv_lora_rank
512, qk_nope 128 + qk_rope 64, v_head 128), block 0 a dense MLP of width 10944
(first_k_dense_replace=1, so --layers N gives N-1 MoE blocks), then 64 routed experts of width
1408 (not a multiple of 256) plus 2 shared, top-6. V2-Lite has no query LoRA (q_lora_rank None);
llama.cpp reads a DeepSeek-2 file without attention.q_lora_rank only when it has 26 or 27 layers
(src/models/deepseek2.cpp, ``is_lite``), so at any other --layers the query gets DeepSeek-V2's
LoRA of rank 1536 instead (+1.6M weights a block against 554M of experts: 0.3%).

``--arch mixtral-8x7b`` has Mixtral-8x7B's shapes: hidden 4096, 32 query / 8 KV heads of 128,
8 experts of width 14336, top-2 (2.8 GB of BF16 a block).
"""

import argparse
import sys
from pathlib import Path

import torch


def model_config(args):
    """(config, model class, fixture whose tokenizer it takes) for --arch."""
    import transformers as tf

    if args.arch == "qwen3moe":
        cfg = tf.Qwen3MoeConfig(vocab_size=1024, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                                head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                                mlp_only_layers=[], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        return cfg, tf.Qwen3MoeForCausalLM, "qwen3moe"
    if args.arch == "deepseek2-lite":
        if args.layers < 2:
            raise SystemExit(f"--layers {args.layers}: deepseek2-lite needs at least 2 (block 0 is dense)")
        cfg = tf.DeepseekV2Config(vocab_size=1024, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                                  num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                                  q_lora_rank=None if args.layers in (26, 27) else 1536, kv_lora_rank=512,
                                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, head_dim=64,
                                  n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                  first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
                                  routed_scaling_factor=1.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        return cfg, tf.DeepseekV2ForCausalLM, "deepseek2"
    big = args.arch == "mixtral-8x7b"
    hidden = 4096 if big else args.hidden
    cfg = tf.MixtralConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=14336 if big else args.ffn,
                           num_hidden_layers=args.layers, num_attention_heads=hidden // 128 if big else hidden // 64,
                           num_key_value_heads=8 if big else max(1, hidden // 256),
                           num_local_experts=8 if big else args.experts, num_experts_per_tok=2,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return cfg, tf.MixtralForCausalLM, "mixtral"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=("mixtral", "qwen3moe", "deepseek2-lite", "mixtral-8x7b"), default="mixtral")
    args = p.parse_args()
    if (args.out / "config.json").exists():
        print(f"{args.out} exists")
        return 0
    from transformers import AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    cfg, cls, fixture = model_config(args)
    cfg.architectures = [cls.__name__]
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)  # allocate BF16 directly: no float32 copy of the whole model
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():  # N(0, 0.02) like transformers' init; norms at 1
            if prm.ndim == 1:
                prm.fill_(1.0)
            else:  # one expert (first axis) at a time: a float32 copy of a fused 8x7B expert tensor is 3.8 GB
                for part in prm.view(-1, *prm.shape[-2:]):
                    part.copy_(torch.randn(part.shape, generator=gen) * 0.02)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="500MB")
    AutoTokenizer.from_pretrained(root / "tests" / "fixtures" / fixture).save_pretrained(args.out)
    (args.out / "tokenizer.model").write_bytes((root / "tests" / "fixtures" / fixture / "tokenizer.model").read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.0f}M parameters (random, benchmark only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
"""

import argparse
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=("mixtral", "qwen3moe"), default="mixtral")
    args = p.parse_args()
    if (args.out / "config.json").exists():
        print(f"{args.out} exists")
        return 0
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = Path(__file__).resolve().parents[1]
    if args.arch == "qwen3moe":
        cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                             num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                             head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                             mlp_only_layers=[], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        cls, fixture = Qwen3MoeForCausalLM, "qwen3moe"
    else:
        cfg = MixtralConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.ffn,
                            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                            num_key_value_heads=max(1, args.hidden // 256), num_local_experts=args.experts,
                            num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        cls, fixture = MixtralForCausalLM, "mixtral"
    cfg.architectures = [cls.__name__]
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():  # N(0, 0.02) like transformers' init; norms at 1
            if prm.ndim == 1:
                prm.fill_(1.0)
            else:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.02)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="500MB")
    AutoTokenizer.from_pretrained(root / "tests" / "fixtures" / fixture).save_pretrained(args.out)
    (args.out / "tokenizer.model").write_bytes((root / "tests" / "fixtures" / fixture / "tokenizer.model").read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.0f}M parameters (random, benchmark only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`alphaq run MODEL.gguf --hf HF_DIR --prompt TEXT [-n 32] [--device cpu|cuda] [--greedy]`.

Generates text from a GGUF (expert-granular files included) in torch (alphaq.runtime.torch_run): the
architecture and tokenizer come from HF_DIR, the checkpoint the GGUF was converted from; every
weight comes from the GGUF. On CPU the weights are dequantised once; on CUDA linear layers and
experts run the Triton kernels on the raw GGUF blocks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from alphaq.errors import AlphaQError


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="generate text from a GGUF in torch (expert-granular files too)",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, metavar="MODEL.gguf")
    # required, but checked in run(): its error names the checkpoint the GGUF says it came from
    p.add_argument("--hf", type=Path, metavar="HF_DIR",
                   help="required: the Hugging Face checkpoint MODEL.gguf was converted from (only its config.json "
                        "and tokenizer are read)")
    # llama-cli's spellings beside ours: -p, --n-predict, --temp, -s
    p.add_argument("--prompt", "-p", required=True, help="text to continue")
    p.add_argument("-n", "--n-tokens", "--n-predict", type=int, default=32,
                   help="tokens to generate, within the model's context (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", "--temp", type=float, default=0.8,
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (default: %(default)s)")
    p.add_argument("--seed", "-s", type=int, default=0, help="sampling seed, 0 to 2^63 - 1 (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while generating")
    p.add_argument("--llama-cpp-routing", action="store_true",
                   help="renormalise the top-k router weights as llama.cpp does where the HF config differs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alphaq.runtime import torch_run

    sampling = torch_run.Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if args.n_tokens < 1:
        raise AlphaQError(f"-n {args.n_tokens} must be at least 1")
    n_ctx = torch_run.hf_context_length(args.hf)
    if n_ctx is not None and args.n_tokens >= n_ctx:  # before the load (the prompt's share is checked after)
        raise AlphaQError(f"-n {args.n_tokens} is not below the model's context of {n_ctx} tokens "
                          "(max_position_embeddings)")
    t0 = time.perf_counter()
    model = torch_run.load(args.model, args.hf, device=args.device, llama_cpp_routing=args.llama_cpp_routing)
    tokenizer = torch_run.load_tokenizer(args.hf)
    prompt_ids = tokenizer(args.prompt)["input_ids"]
    t1 = time.perf_counter()
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = torch_run.generate(model, prompt_ids, args.n_tokens, sampling, stop_ids=stop, progress=not args.no_progress)
    t2 = time.perf_counter()
    print(tokenizer.decode(out.prompt_ids + out.tokens, skip_special_tokens=True))
    path = "Triton kernels on GGUF blocks" if args.device == "cuda" else "dequantised weights"
    print(f"{len(out.tokens)} tokens in {t2 - t1:.2f} s ({len(out.tokens) / (t2 - t1):.1f} tok/s; "
          f"load {t1 - t0:.1f} s; {args.device}, {path})", file=sys.stderr)
    return 0

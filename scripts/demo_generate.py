#!/usr/bin/env python3
"""Load an AlphaQ GGUF in llama-cpp-python, show its allocation and generate a few tokens.

    python scripts/demo_generate.py out/mixtral-alphaq-b3.gguf [--prompt "def "]
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--prompt", default="def read_config(path):\n")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()

    from alphaq.pipeline.convert import load_plan_from_gguf

    plan = load_plan_from_gguf(args.gguf)
    per_type = Counter()
    for item in plan["items"]:
        per_type[item["type"]] += item["params"]
    total = sum(per_type.values())
    st = plan["settings"]
    print(f"{args.gguf}: alphaq plan, budget {st['budget']} ({st['budget_mode']}), cost {st['noise']}, "
          f"allocated: {st['allocate_effective']}")
    for t, n in sorted(per_type.items()):
        print(f"  {t:7s} {n:>10,} allocated weights ({n / total:.0%})")
    print(f"  true bpw over the allocated weights {plan['totals']['true_bpw']:.3f}")

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(args.gguf), n_ctx=256, seed=0, verbose=False)
    out = llm(args.prompt, max_tokens=args.tokens, temperature=0.0)
    print(f"\nllama-cpp-python {llama_cpp.__version__}, greedy, {args.tokens} tokens:")
    print(json.dumps(args.prompt + out["choices"][0]["text"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

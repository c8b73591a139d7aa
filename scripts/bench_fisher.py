#!/usr/bin/env python3
"""Why the damage is measured, not derived from gradients: MoE routing changes.

    python scripts/bench_fisher.py [--models mixtral qwen2moe qwen3moe deepseek2] [--draws 4]

A gradient (Fisher) estimate of KL(float || one tensor quantised) would cost one backward pass
for every tensor at once, linear in depth, against one forward pass set per tensor for the
measurement the default path makes. It is a second-order expansion of a smooth function, and an
MoE model is not smooth: a perturbed hidden state can change which experts the routers pick
downstream, a jump that no gradient sees. This script measures how much of the damage that is.

For each fixture model (tests/fixtures/NAME, trained on real text), on its own text (16 x 256
tokens, alphaq.selftext), and each quantised tensor at Q4_K (ggml's quantiser with the self
importance matrix, the default path's reference type):

  measured    KL through llama.cpp, the tensor fake-quantised in its buffer (alphaq.damage)
  torch       the same KL in the HF model (transformers, float32)
  frozen      the same, with every router's output replaced by the float model's (same experts
              and weights on every token): the damage without routing changes
  fisher      the unbiased Fisher estimate 0.5 * E[<dW, grad log p(v)>^2] / tokens with labels
              v sampled from the float model (``--draws`` per sequence): no diagonal approximation

and writes bench/fisher-routing.json. If fisher ~ frozen < torch ~ measured, the gap is routing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_pieces(name: str, work: Path):
    """BF16 GGUF, own text, importance means, measured KL at Q4_K per tensor (llama.cpp)."""
    from alphaq.evaluate import baselines
    from alphaq.damage import DamageConfig, Reference
    from alphaq.damage.measure import measure
    from alphaq.runtime.forward import Session
    from alphaq.importance.collect import collect_imatrix
    from alphaq.gguf.qtypes import llama_quantizes, resolve_types
    from alphaq.selftext import SelfTextConfig, cached_sample
    from convert.hf_to_gguf import convert_hf

    work.mkdir(parents=True, exist_ok=True)
    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        convert_hf(ROOT / "tests" / "fixtures" / name, bf16)
    fm = baselines.FloatModel.open(bf16)
    names = [t.name for t in fm.tensors if llama_quantizes(t.name, t.shape)]
    tokens = cached_sample(bf16, SelfTextConfig())
    with Session(bf16, tokens.shape[1]) as s:
        im = collect_imatrix(s, tokens)
        table = measure(s, Reference(s, tokens), names, resolve_types(["Q4_K"]), DamageConfig(method="direct"),
                        imatrix=im.means(), tokens=im.counts)
    # one type per tensor: Q4_K, or its shape fallback (rows not a multiple of 256)
    measured = {n: next(iter(table.costs[(n, None)].values())) for n in names}
    return bf16, names, tokens, im.means(), measured


class TorchModel:
    """The HF model, its GGUF-name targets, and the float run's logits and router outputs."""

    def __init__(self, name: str, bf16: Path, names, tokens):
        import torch

        from alphaq.importance.real_text import _arch_of
        from alphaq.runtime.torch_ref import hf_targets, load_hf

        self.model = load_hf(ROOT / "tests" / "fixtures" / name)
        arch, n_blocks = _arch_of(bf16)
        self.targets = hf_targets(self.model, set(names), arch, n_blocks)
        self.params = dict(self.model.named_parameters())
        self.x = torch.tensor(np.asarray(tokens, dtype=np.int64))
        self.routers = [m for k, m in self.model.named_modules() if k.endswith("mlp.gate") and "Router" in type(m).__name__]
        self.frozen: list[list] = [[] for _ in range(len(self.x))]
        self.ref = []
        with torch.no_grad():
            for i in range(len(self.x)):
                hooks = [r.register_forward_hook(self._recorder(i)) for r in self.routers]
                self.ref.append(torch.log_softmax(self.model(input_ids=self.x[i:i + 1]).logits[0].double(), -1))
                for h in hooks:
                    h.remove()

    def _recorder(self, i):
        def hook(_m, _inp, out):  # copies: the MoE block may change its router's outputs in place
            self.frozen[i].append(tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone())
        return hook

    def _replayer(self, i):
        it = iter(self.frozen[i])

        def hook(_m, _inp, _out):
            out = next(it)
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return hook

    def kl(self, frozen: bool) -> float:
        import torch

        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(len(self.x)):
                replay = self._replayer(i)  # one iterator: the routers run in order
                hooks = [r.register_forward_hook(replay) for r in self.routers] if frozen else []
                lp = torch.log_softmax(self.model(input_ids=self.x[i:i + 1]).logits[0].double(), -1)
                for h in hooks:
                    h.remove()
                total += float((self.ref[i].exp() * (self.ref[i] - lp)).sum())
                n += lp.shape[0]
        return total / n

    def slices(self, name):
        tgt = self.targets[name]
        p = self.params[tgt.param]
        return [(p[e] if e is not None else p)[tgt.rows] for e in ([None] if tgt.expert is None else range(p.shape[0]))]


def quant_error(tm: TorchModel, name: str, means) -> list:
    """Q4_K quantisation error of each matrix of ``name`` (HF layout: rows quantise alike)."""
    import torch

    from gguf import GGMLQuantizationType

    from alphaq.damage import quant_dequant
    from alphaq.gguf.qtypes import effective_type

    m = means.get(name)
    out = []
    for e, w in enumerate(tm.slices(name)):
        w2 = w.detach().numpy().reshape(-1, w.shape[-1])
        me = None if m is None else m.reshape(-1, w.shape[-1])[e]
        t = effective_type(GGMLQuantizationType.Q4_K, w2.shape[1])  # as llama.cpp writes it
        out.append(torch.from_numpy(quant_dequant(w2, t, me) - w2).reshape(w.shape))
    return out


def torch_kls(tm: TorchModel, names, errors) -> dict[str, tuple[float, float]]:
    import torch

    out = {}
    for n in names:
        with torch.no_grad():
            for s, d in zip(tm.slices(n), errors[n]):
                s += d
        out[n] = (tm.kl(frozen=False), tm.kl(frozen=True))
        with torch.no_grad():
            for s, d in zip(tm.slices(n), errors[n]):
                s -= d
    return out


def fisher(tm: TorchModel, names, errors, draws: int) -> dict[str, float]:
    """0.5 E[<dW, grad_W sum_t log p(v_t)>^2] / tokens: unbiased for the Fisher quadratic form,
    since the per-position scores are independent and zero-mean given the text."""
    import torch

    for k, p in tm.params.items():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    acc = dict.fromkeys(names, 0.0)
    n_tok = 0
    for i in range(len(tm.x)):
        lp = torch.log_softmax(tm.model(input_ids=tm.x[i:i + 1]).logits[0].float(), -1)
        for d in range(draws):
            v = torch.multinomial(lp.detach().exp(), 1, generator=gen)[:, 0]
            tm.model.zero_grad(set_to_none=True)
            (-lp[torch.arange(len(v)), v].sum()).backward(retain_graph=d < draws - 1)
            for n in names:
                tgt = tm.targets[n]
                g = tm.params[tgt.param].grad
                gs = [(g[e] if e is not None else g)[tgt.rows] for e in ([None] if tgt.expert is None else range(g.shape[0]))]
                acc[n] += float(sum((gi.double() * di.double()).sum() for gi, di in zip(gs, errors[n]))) ** 2
        n_tok += lp.shape[0]
    for p in tm.params.values():
        p.requires_grad_(False)
    return {n: 0.5 * acc[n] / draws / n_tok for n in names}


def _upstream(name: str, n_blocks: int) -> bool:
    """Does a router read what this tensor changes? Everything before the last block's experts."""
    import re

    m = re.match(r"blk\.(\d+)\.", name)
    if m is None:
        return name.startswith("token_embd")
    last = int(m.group(1)) == n_blocks - 1
    return not (last and ("_exps" in name or "_shexp" in name or "ffn_" in name))


def report(data: dict) -> str:
    """A markdown table: per model, medians over the tensors a router reads downstream."""
    import re

    rows = ["| model | tensors upstream of a router | measured / torch | frozen / torch (no routing change) "
            "| fisher / frozen | fisher / measured, upstream | fisher / measured, the rest |",
            "|---|---|---|---|---|---|---|"]
    for model, res in data["models"].items():
        n_blocks = 1 + max(int(m.group(1)) for n in res if (m := re.match(r"blk\.(\d+)\.", n)))
        up = [r for n, r in res.items() if _upstream(n, n_blocks)]
        rest = [r for n, r in res.items() if not _upstream(n, n_blocks)]

        def med(rs, a, b):
            return f"{np.median([r[a] / r[b] for r in rs]):.2f} ({min(r[a] / r[b] for r in rs):.2f}–{max(r[a] / r[b] for r in rs):.2f})"
        rows.append(f"| {model} | {len(up)} of {len(res)} | {med(list(res.values()), 'measured', 'torch')} | "
                    f"{med(up, 'frozen', 'torch')} | {med(list(res.values()), 'fisher', 'frozen')} | "
                    f"{med(up, 'fisher', 'measured')} | {med(rest, 'fisher', 'measured')} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral", "qwen2moe", "qwen3moe", "deepseek2"])
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "fisher-routing.json")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-fisher")
    ap.add_argument("--report-only", action="store_true", help="print the table of an existing --out")
    args = ap.parse_args()
    if args.report_only:
        print(report(json.loads(args.out.read_text())))
        return 0
    results = {}
    for name in args.models:
        t0 = time.perf_counter()
        bf16, names, tokens, means, measured = model_pieces(name, args.work / name)
        tm = TorchModel(name, bf16, names, tokens)
        # DeepSeek-2's attn_k_b / attn_v_b are one HF matrix (kv_b_proj) split by the converter: left out
        names = [n for n in names if n in tm.targets]
        errors = {n: quant_error(tm, n, means) for n in names}
        kls = torch_kls(tm, names, errors)
        fis = fisher(tm, names, errors, args.draws)
        results[name] = {n: {"measured": measured[n], "torch": kls[n][0], "frozen": kls[n][1], "fisher": fis[n]}
                         for n in names}
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
        for n, r in results[name].items():
            print(f"  {n:30s} " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
    data = {"draws": args.draws, "type": "Q4_K", "models": results}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

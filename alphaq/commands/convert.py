"""`alphaq convert MODEL --budget 3 [-o OUT.gguf]`: the main job (also `python convert_alphaq.py`).

HF checkpoint or F32/F16/BF16 GGUF in; a mixed-type GGUF out, with its plan JSON (and, for
tensor granularity, llama-quantize's --tensor-type-file) next to it. Tensor granularity (default)
runs on stock llama.cpp; --granularity expert writes per-expert types (docs/FORMAT.md), which need
the patched runtime (scripts/build_patched.sh).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alphaq.commands import plan as _plan_cmd
from alphaq.errors import AlphaQError
from alphaq.plan import format_size
from alphaq.spectral import XMIN_WINDOWS, SpectralConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="HF checkpoint / float GGUF -> AlphaQ mixed-type GGUF",
                              description=__doc__.splitlines()[0])
    add_convert_arguments(p)
    p.set_defaults(func=run)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help="HF checkpoint directory or F32/F16/BF16 GGUF")
    p.add_argument("-o", "--output", type=Path,
                   help="output .gguf (default: ./<model>-alphaq-<budget>.gguf); plan JSON and tensor-type file go beside it")
    _plan_cmd.add_plan_arguments(p, budget_required=False)
    p.add_argument("--xmin-window", choices=XMIN_WINDOWS, default=SpectralConfig.xmin_window,
                   help="PL_Alpha_Hill tail window (default: %(default)s, the reference code's effective one)")
    p.add_argument("--threads", type=int, default=0, help="quantiser threads (default: all cores)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the alpha cache")
    p.add_argument("--cache-dir", type=Path, help="alpha cache (default ~/.cache/alphaq/spectral)")
    p.add_argument("--no-stock-compare", action="store_true", help="skip the stock-mix size comparison")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def default_output(model: Path, args: argparse.Namespace) -> Path:
    stem = model.name[:-5] if model.name.endswith(".gguf") else model.name
    if args.bpw is not None:
        tag = f"bpw{args.bpw:g}"
    elif args.target_size is not None:
        tag = f"size{args.target_size}"
    else:
        tag = f"b{(args.budget if args.budget is not None else 3.0):g}"
    return Path.cwd() / f"{stem}-alphaq-{tag}.gguf"


def run(args: argparse.Namespace) -> int:
    from alphaq.convert import ConvertConfig, run_convert

    if args.budget is None and args.bpw is None and args.target_size is None:
        args.budget = 3.0
    if args.threads < 0:
        raise AlphaQError(f"--threads {args.threads} must be >= 0 (0 = all cores)")
    output = args.output or default_output(args.model, args)
    cfg = ConvertConfig(
        model=args.model, output=output, plan=_plan_cmd.config_from_args(args),
        spectral=SpectralConfig(xmin_window=args.xmin_window), force=args.force, nthread=args.threads,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, compare_stock=not args.no_stock_compare,
        progress=not args.no_progress,
    )
    result = run_convert(cfg)
    print(summary(result))
    return 0


def summary(r) -> str:
    t, s = r.plan.totals, r.plan.settings
    mode = {"bits": "nominal bits over expert weights", "bpw": "true bits per allocated weight",
            "size": "bytes, whole file"}[s["budget_mode"]]
    lines = [
        f"wrote {r.output}  ({format_size(r.file_bytes)})",
        f"  budget      {s['budget']:g} {mode}; gamma {s['gamma']:.4g} ({s['gamma_source']});"
        f" granularity {s['granularity']},"
        f" scope {s['scope']}, noise {s['noise']}",
        f"  allocated   {t.allocated_params:,} weights: {t.nominal_bits:.3f} nominal bits, {t.true_bpw:.3f} true bpw"
        + (f"; {t.n_fallback_items} item(s) on llama.cpp's shape fallback" if t.n_fallback_items else ""),
        f"  whole file  {t.model_params:,} weights, {r.file_bytes * 8 / t.model_params:.3f} bpw",
        "  types       " + ", ".join(f"{n} x{c}" for n, c in r.tensor_counts.items()) + " (quantised tensors)",
    ]
    if r.stock_sizes:
        mix, size = min(r.stock_sizes.items(), key=lambda kv: abs(kv[1] - r.file_bytes))
        lines.append(f"  stock mix   nearest is llama.cpp {mix}: {format_size(size)} "
                     f"({(r.file_bytes - size) / size:+.1%} for AlphaQ)")
    if r.tokenizer_fallback:
        lines.append(f"  tokenizer   fallback: {r.tokenizer_fallback}")
    lines.append(f"  runtime     {r.runtime}" + (f" ({r.n_grouped} expert tensor(s) stored as type groups)"
                                                    if r.n_grouped else ""))
    lines.append(f"  plan        {r.plan_json}" + (f", {r.tensor_type_file}" if r.tensor_type_file else ""))
    return "\n".join(lines)

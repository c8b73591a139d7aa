"""`alphaq convert MODEL --budget 3 [-o OUT.gguf]`: the main job (also `python convert_alphaq.py`).

HF checkpoint or F32/F16/BF16 GGUF in; a mixed-type GGUF out, with its plan JSON (and, for
tensor granularity, llama-quantize's --tensor-type-file) next to it. Tensor granularity (default)
runs on stock llama.cpp; --granularity expert writes per-expert types (docs/FORMAT.md), which need
the patched runtime (`make install-patched`).

Modes (docs/ALLOCATION.md): the default measures each tensor's damage on text the model samples
itself (no calibration data) and saves the importance matrix beside the output; --fast and
--paper run no forward pass at all.

llama-quantize's --output-tensor-type, --leave-output-tensor, --token-embedding-type, --tensor-type,
--tensor-type-file, --override-kv, --include-weights, --exclude-weights, --keep-split,
--max-buffer-size and --allow-requantize keep its spelling and meaning; pinned tensors are fixed
items whose bytes count against the budget (docs/ALLOCATION.md, "Pins"). --pure and --prune-layers
are refused with what to do instead.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from alphaq.commands import plan as _plan_cmd
from alphaq.damage import METHODS as DAMAGE_METHODS
from alphaq.damage import ANCHORED_WINDOWS, FULL_WINDOWS, DamageConfig
from alphaq.errors import AlphaQError
from alphaq.pipeline.preflight import WORKING_COPY_CHOICES
from alphaq.allocate.overrides import kv_overrides
from alphaq.allocate.plan import MODES, format_size, spectral_config
from alphaq.selftext import SelfTextConfig
from alphaq.spectral.alpha import XMIN_WINDOWS, SpectralConfig, describe_farms_cap


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="HF checkpoint / float GGUF -> AlphaQ mixed-type GGUF",
                              description=__doc__.splitlines()[0])
    add_convert_arguments(p)
    p.set_defaults(func=run)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help="HF checkpoint directory or F32/F16/BF16 GGUF "
                   "(a Q8_0 one with --allow-requantize)")
    p.add_argument("llama_positionals", nargs="*", metavar="[OUT.gguf] TYPE [NTHREADS]",
                   help="llama-quantize's order: OUT as -o, TYPE (a mix name or its number) as --like TYPE, "
                        "NTHREADS as --threads")
    p.add_argument("-o", "--output", "--outfile", dest="output", type=Path,
                   help="output .gguf (default: ./<model>-alphaq-<budget>.gguf); plan JSON and tensor-type file go beside it")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--mode", choices=tuple(MODES), default="damage",
                      help="damage: measured on the model's own text (default); fast: AlphaQ gamma 1, no forward "
                           "pass; paper: the published method (App. A.7 gamma)")
    mode.add_argument("--fast", dest="mode", action="store_const", const="fast", help="same as --mode fast")
    mode.add_argument("--paper", dest="mode", action="store_const", const="paper", help="same as --mode paper")
    _plan_cmd.add_plan_arguments(p, budget_required=False, cap_default="auto")
    p.add_argument("--like", metavar="MIX", help="budget = the size of llama.cpp's own MIX (e.g. Q4_K_M, IQ2_XXS) "
                   "for this model, from llama.cpp's dry run; instead of --budget/--bpw/--target-size")
    p.add_argument("--imatrix", type=Path, help="a llama.cpp importance matrix (GGUF or legacy .dat) to use "
                   "instead of the one computed from the model's own text")
    p.add_argument("--damage", choices=DAMAGE_METHODS, default=DamageConfig.method,
                   help="estimate: KL measured once per tensor, scaled per type (default); direct: per tensor and type")
    p.add_argument("--damage-windows", type=int, default=DamageConfig.n_windows,
                   help="sequences of own text each damage measurement runs (default: %d when every block is "
                        "measured, %d when depth anchors are used; fewer is proportionally faster and noisier)"
                        % (FULL_WINDOWS, ANCHORED_WINDOWS))
    p.add_argument("--damage-anchors", type=_anchors, default=DamageConfig.anchors, metavar="N|all",
                   help="blocks measured per tensor kind, the others interpolated over depth (default: "
                        "%(default)s; 'all' measures every block: quadratic in depth)")
    p.add_argument("--working-copy", choices=WORKING_COPY_CHOICES, default="auto",
                   help="what the forward stages run: the float model (memory-mapped), or a Q8_0 copy of it "
                        "written beside the output, half the bytes, as llama-imatrix users do (default: auto, "
                        "the copy only when the float model does not fit in available RAM)")
    p.add_argument("--self-samples", type=int, default=SelfTextConfig.n_seq,
                   help="sequences of its own text the model writes (default: %(default)s)")
    p.add_argument("--self-ctx", type=int, default=SelfTextConfig.n_ctx, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SelfTextConfig.seed, help="sampling seed (default: %(default)s)")
    p.add_argument("--xmin-window", choices=XMIN_WINDOWS, default=SpectralConfig.xmin_window,
                   help="PL_Alpha_Hill tail window (default: %(default)s, the reference code's effective one)")
    p.add_argument("--threads", type=int, default=0, help="quantiser threads (default: all cores)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the caches (alpha, own text, importance, damage)")
    p.add_argument("--cache-dir", type=Path, help="alpha cache (default ~/.cache/alphaq/spectral)")
    p.add_argument("--no-stock-compare", action="store_true", help="skip the stock-mix size comparison")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split-max-size", metavar="N(M|G)", help="write the output in parts of at most this much "
                       "tensor data each, as llama-gguf-split: OUT-00001-of-0000N.gguf, ... (M = 10^6 B, G = 10^9 B)")
    split.add_argument("--split-max-tensors", type=int, metavar="N", help="write the output in parts of at most N "
                       "tensors each, as llama-gguf-split")
    p.add_argument("--keep-bf16", type=Path, metavar="PATH", help="keep the BF16 GGUF converted from an HF checkpoint "
                   "at PATH (default: deleted as soon as it has been quantised)")
    p.add_argument("--no-resume", action="store_true", help="convert the HF checkpoint afresh: delete the BF16 "
                   "intermediate an interrupted run of this command kept (default: reuse it when it is complete)")
    p.add_argument("--dry-run", action="store_true", help="print the disk and time needed, run the (cached) analysis "
                   "stages and print the plan; write nothing (not with --keep-bf16 or --plots)")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="also write PNG figures of where the bits went into DIR (created): the type of every tensor "
                        "(and expert) block by block, bytes per type, and the damage (default mode) or alpha "
                        "(--fast/--paper) the allocation read")
    p.add_argument("--allow-requantize", action="store_true",
                   help="as llama-quantize: take a Q8_0 GGUF as MODEL (the output inherits Q8_0's rounding; the "
                        "forward stages run on it; lower types are refused)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (figures included)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_llama_quantize_arguments(p)


def add_llama_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """llama-quantize's override flags, same spelling and meaning: the pins (shared with `alphaq plan`)
    and --override-kv."""
    g = _plan_cmd.add_pin_arguments(p)
    g.add_argument("--override-kv", metavar="KEY=TYPE:VALUE", action="append", default=[],
                   help="write metadata KEY into the output (TYPE int, float, bool or str); repeatable")
    g.add_argument("--include-weights", metavar="NAME", action="append", default=[],
                   help="use the importance matrix only for tensors whose name contains NAME (the quantiser and "
                        "the damage costs); repeatable")
    g.add_argument("--exclude-weights", metavar="NAME", action="append", default=[],
                   help="do not use the importance matrix for tensors whose name contains NAME; repeatable")
    g.add_argument("--keep-split", action="store_true",
                   help="write the output in the parts of the split GGUF MODEL, each tensor in the part that holds "
                        "it there (OUT-00001-of-0000N.gguf, ...)")
    g.add_argument("--max-buffer-size", type=int, metavar="MiB",
                   help="rows of one tensor llama.cpp's quantiser holds at once (default: 512)")
    # refused with the reason, rather than argparse's "unrecognized arguments"
    g.add_argument("--pure", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--prune-layers", metavar="L0,L1,...", help=argparse.SUPPRESS)


def check_refused_llama_flags(args: argparse.Namespace) -> None:
    """llama-quantize flags that have no meaning in alphaq: one line saying what to do instead."""
    if args.pure:
        raise AlphaQError("--pure quantises every tensor to one type; alphaq chooses a type per tensor, so it has "
                          "no pure mode (llama-quantize --pure MODEL OUT TYPE writes one)")
    if args.prune_layers is not None:
        raise AlphaQError(f"--prune-layers {args.prune_layers}: alphaq does not prune blocks; prune first with "
                          f"`llama-quantize --prune-layers {args.prune_layers} MODEL.gguf PRUNED.gguf COPY`, "
                          "then convert PRUNED.gguf")


def default_output(model: Path, args: argparse.Namespace) -> Path:
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", model.name[:-5]) if model.name.endswith(".gguf") else model.name
    if args.like is not None:
        tag = args.like.upper()
    elif args.bpw is not None:
        tag = f"bpw{args.bpw:g}"
    elif args.target_size is not None:
        tag = f"size{args.target_size}"
    else:
        tag = f"b{(args.budget if args.budget is not None else 3.0):g}"
    return Path.cwd() / f"{stem}-alphaq-{tag}.gguf"


def mix_name(text: str) -> str | None:
    """llama-quantize's try_parse_ftype for the mixes alphaq sizes a budget by: a name (any case) or
    its llama_ftype number -> the name; None for anything else."""
    from alphaq.gguf.quantize import ALL_MIXES, mix_ftype

    if text.upper() in ALL_MIXES:
        return text.upper()
    if text.isdigit():
        return next((m for m in ALL_MIXES if mix_ftype(m) == int(text)), None)
    return None


def apply_llama_positionals(args: argparse.Namespace) -> None:
    """``MODEL [OUT] TYPE [NTHREADS]`` as llama-quantize reads it (tools/quantize/quantize.cpp: the
    argument after the input is TYPE when it parses as one, else OUT, then TYPE), into -o, --like
    and --threads; each beside its own flag is refused."""
    rest = list(args.llama_positionals)
    if not rest:
        return
    form = "llama-quantize's order is MODEL [OUT.gguf] TYPE [NTHREADS]"
    from alphaq.gguf.quantize import ALL_MIXES

    out = None if mix_name(rest[0]) else rest.pop(0)
    if not rest and not out.lower().endswith(".gguf"):  # (more likely a mistyped TYPE than an output)
        raise AlphaQError(f"TYPE {out!r} is not a llama.cpp mix alphaq can size; allowed: {', '.join(ALL_MIXES)} "
                          f"({form})")
    if not rest:
        raise AlphaQError(f"{out}: no TYPE after it ({form}, e.g. Q4_K_M)")

    mix = mix_name(rest.pop(0))
    if mix is None:
        raise AlphaQError(f"TYPE {args.llama_positionals[1 if out else 0]!r} is not a llama.cpp mix alphaq can size; "
                          f"allowed: {', '.join(ALL_MIXES)} ({form})")
    if len(rest) > 1 or (rest and not (rest[0].isdigit() and int(rest[0]) > 0)):
        raise AlphaQError(f"{' '.join(rest)!r} after TYPE: only NTHREADS, a whole number above 0, may follow ({form})")
    budget = ("--like", args.like), ("--budget", args.budget), ("--bpw", args.bpw), ("--target-size", args.target_size)
    for value, name, flags in ((out, "OUT", [("-o", args.output)]), (mix, "TYPE", budget),
                               (rest, "NTHREADS", [("--threads", args.threads)])):
        flag = next((f for f, given in flags if given), None)
        if value and flag:
            raise AlphaQError(f"{flag} and the positional {name} {value if isinstance(value, str) else value[0]} "
                              f"both set {'the budget' if name == 'TYPE' else 'it'}; give one")
    args.output = Path(out) if out else args.output
    args.like = mix
    args.threads = int(rest[0]) if rest else args.threads


def run(args: argparse.Namespace) -> int:
    from alphaq.pipeline.convert import ConvertConfig, run_convert

    apply_llama_positionals(args)
    given = [f for f, v in (("--budget", args.budget), ("--bpw", args.bpw), ("--target-size", args.target_size),
                            ("--like", args.like)) if v is not None]
    if len(given) > 1:
        raise AlphaQError(f"{' and '.join(given)} both set the budget; give one")
    if not given:
        args.budget = 3.0
    elif args.like is not None:
        args.target_size = "1"  # placeholder: replaced by the mix's size once the float model exists
    check_refused_llama_flags(args)
    if args.threads < 0:
        raise AlphaQError(f"--threads {args.threads} must be >= 0 (0 = all cores)")
    output = args.output or default_output(args.model, args)
    split_size = None
    if args.split_max_size is not None:
        from alphaq.gguf.split import parse_split_size

        split_size = parse_split_size(args.split_max_size)
    plan = _plan_cmd.with_pins(_plan_cmd.config_from_args(args, args.mode), args)
    cfg = ConvertConfig(
        model=args.model, output=output, plan=plan,
        spectral=spectral_config(plan, args.alpha_experts, args.farms_max_blocks, xmin_window=args.xmin_window),
        force=args.force, nthread=args.threads,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, compare_stock=not args.no_stock_compare,
        progress=not args.no_progress, like=args.like, imatrix=args.imatrix,
        selftext=SelfTextConfig(n_seq=args.self_samples, n_ctx=args.self_ctx, seed=args.seed),
        damage=DamageConfig(method=args.damage, anchors=args.damage_anchors,
                            n_windows=None if args.damage_windows is None else min(args.damage_windows, args.self_samples)),
        split_max_size=split_size, split_max_tensors=args.split_max_tensors, keep_bf16=args.keep_bf16,
        dry_run=args.dry_run, plots=args.plots, working_copy=args.working_copy, kv_overrides=kv_overrides(args.override_kv), resume=not args.no_resume,
        auto_quantise_cap=args.max_quantise_ns == "auto", allow_requantize=args.allow_requantize,
        pin_files=tuple(_plan_cmd.pin_files(args)), keep_split=args.keep_split, max_buffer_size=args.max_buffer_size,
        include_weights=tuple(args.include_weights), exclude_weights=tuple(args.exclude_weights),
    )
    result = run_convert(cfg, announce=lambda text: print(text, flush=True))
    print(summary(result))
    return 0


_anchors = _plan_cmd.count_or_all(1, "blocks")  # --damage-anchors


def _sample_note(sample: dict | None) -> str:
    """The budget line's tail when alpha came from a sample of each expert tensor's experts."""
    if not sample:
        return ""
    k, n = (" or ".join(str(x) for x in sample[key]) for key in ("experts_analysed", "experts"))
    return f"; alpha of {k} of {n} experts per expert tensor (--alpha-experts all: every one)"


def _farms_note(cap: dict | None) -> str:
    """The budget line's tail when --farms-max-blocks pooled fewer FARMS blocks than a matrix has."""
    return "; " + describe_farms_cap(cap) if cap else ""


def _runtime_line(r) -> str:
    """What runs the file; to a user of the damage default at tensor granularity whose environment
    has the patched runtime, also that expert granularity measured better (bench/SELFCAL.md)."""
    from alphaq.gguf.expert import STOCK_RUNTIME
    from alphaq.runtime.isolated import patched_loaded

    line = f"  runtime     {r.runtime}"
    if r.n_grouped:
        line += f" ({r.n_grouped} expert tensor(s) stored as type groups)"
    elif r.runtime == STOCK_RUNTIME and r.damage_note and patched_loaded():
        line += ("; this environment has the patched runtime, and on it --granularity expert gave lower KL "
                 "than tensor granularity on the zoo (bench/SELFCAL.md)")
    return line


def _cap_note(r) -> str:
    """The quantiser line's tail: the auto cap and what it cost, or the user's cap."""
    if r.quantise_cap is not None:
        return "; " + r.quantise_cap.describe(r.plan.totals.objective)
    cap = r.plan.settings.get("max_quantise_ns")
    return f"; capped at {cap:g} (--max-quantise-ns)" if cap else ""


def summary(r) -> str:
    t, s = r.plan.totals, r.plan.settings
    over = "expert weights" if s["allocate_effective"] == "experts" else "allocated weights"
    mode = {"bits": f"nominal bits over {over}", "bpw": "true bits per allocated weight",
            "size": "bytes, whole file"}[s["budget_mode"]]
    budget = (f"{r.like[0]}'s size for this model, {format_size(r.like[1])}" if r.like
              else f"{format_size(s['budget'])}, whole file" if s["budget_mode"] == "size"
              else f"{s['budget']:g} {mode}")
    lines = [
        (f"dry run: nothing written; {r.output} would be about {format_size(r.file_bytes)} (the plan's prediction)"
         if r.dry_run else f"wrote {r.output}  ({format_size(r.file_bytes)}"
         + (f" in {len(r.parts)} part{'s' if len(r.parts) > 1 else ''}, the first given to llama.cpp"
            if r.parts else "") + ")"),
        f"  budget      {budget}; gamma {s['gamma']:.4g} ({s['gamma_source']});"
        f" granularity {s['granularity']}, scope {s['scope']}, cost {s['noise']}, allocate {s['allocate_effective']}"
        + _sample_note(s.get("alpha_sample")) + _farms_note(s.get("farms_cap")),
        (f"  allocated   {t.allocated_params:,} weights: {t.nominal_bits:.3f} nominal bits, {t.true_bpw:.3f} true bpw"
         + (f"; {t.n_fallback_items} item(s) on llama.cpp's shape fallback" if t.n_fallback_items else ""))
        if t.n_items else "  allocated   nothing: every tensor the allocation would hold is pinned",
        f"  whole file  {t.model_params:,} weights, {r.file_bytes * 8 / t.model_params:.3f} bpw",
        "  types       " + ", ".join(f"{n} x{c}" for n, c in r.tensor_counts.items()) + " (quantised tensors)",
        f"  quantiser   about {t.quantise_ns_per_weight:.0f} ns per weight for these types (one thread, "
        "alphaq/gguf/quantise_speed.json)" + _cap_note(r),
    ]
    pinned, unused_pins = _plan_cmd.pin_report(r.plan)
    lines += [f"  pinned      {pinned}"] if pinned else []
    lines += [f"  WARNING     {w}" for w in unused_pins]  # beside the pins (not again under warnings)
    if r.stock_sizes:
        mix, size = min(r.stock_sizes.items(), key=lambda kv: abs(kv[1] - r.file_bytes))
        lines.append(f"  stock mix   nearest is llama.cpp {mix}: {format_size(size)} "
                     f"({(r.file_bytes - size) / size:+.1%} for AlphaQ)")
    lines += _data_lines(r) + _cost_lines(r)
    if r.parts:
        lines.append("  parts       " + ", ".join(f"{p.name} ({format_size(p.stat().st_size)})" for p in r.parts))
    if r.kept_float:
        lines.append(f"  bf16        {r.kept_float} (the float model the stages read)")
    if r.tokenizer_fallback:
        lines.append(f"  tokenizer   fallback: {r.tokenizer_fallback}")
    lines.append(_runtime_line(r))
    if r.dry_run:
        lines.append("  plan        not written (--dry-run); the analysis stages' results are cached for the real run")
    else:
        lines.append(f"  plan        {r.plan_json}" + (f", {r.tensor_type_file}" if r.tensor_type_file else ""))
    if r.plots:
        lines.append(f"  plots       {r.plots[0].parent}/: " + ", ".join(p.name for p in r.plots))
    warnings = [w for w in r.warnings if w not in unused_pins]
    shown = warnings[:_MAX_WARNINGS]
    for i, w in enumerate(shown):
        lines.append(("  warnings    " if i == 0 else "              ") + w)
    if len(warnings) > len(shown):
        lines.append(f"              ... and {len(warnings) - len(shown)} more (in the log above)")
    return "\n".join(lines)


_MAX_WARNINGS = 5  # in the summary; all of them are in the log


def _data_lines(r) -> list[str]:
    """The summary's lines on what the default mode read and measured (none for --fast/--paper)."""
    lines = []
    if r.imatrix_source is not None:
        read = ("the model's own text only (no calibration data)" if r.imatrix_source == "self"
                else f"the model's own text; importance from {r.imatrix_source}")
        lines.append(f"  data read   {read}")
        if r.imatrix_file is not None:
            lines.append(f"  importance  {r.imatrix_file} (llama.cpp imatrix format)")
        if r.imatrix_used is not None:
            lines.append(f"  importance  used for {r.imatrix_used[0]} of its {r.imatrix_used[1]} weights "
                         "(--include-weights/--exclude-weights); the others quantised without it")
    if r.damage_note:
        lines.append(f"  damage      {r.damage_note}")
    if r.reused:
        lines.append("  reused      " + ", ".join(r.reused) + " (from an earlier run of this model; "
                     "--no-resume converts afresh, --no-cache recomputes the rest)")
    return lines


def _cost_lines(r) -> list[str]:
    """The summary's time and memory lines (stage keys as the result and the benches spell them,
    e.g. self_text, in the words of the pre-flight)."""
    lines = []
    if r.seconds:
        lines.append("  time        " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in r.seconds.items()))
    if r.peak_private:  # what the OS cannot drop, per stage (RSS also counts the mapped model's pages)
        lines.append("  private     peak memory of this process per stage: "
                     + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f} GiB" for k, v in r.peak_private.items()))
    if r.imatrix_source is not None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # with importance and damage both reused from the cache, llama.cpp never loaded the model
        loaded = not {"importance", "damage"} <= set(r.reused)
        lines.append(f"  memory      {_forward_memory(r.float_bytes, loaded, r.working_copy, r.source_type)}; "
                     f"peak RSS of this process {format_size(peak)}")
    return lines


def _forward_memory(float_bytes: int, loaded: bool, working_copy: str | None, source_type: str | None) -> str:
    """What the forward stages cost in memory (see alphaq.runtime.mapped)."""
    from alphaq.pipeline.preflight import forward_model
    from alphaq.runtime import mapped

    if not loaded:
        return "the forward stages were reused: the float model was not loaded"
    what, size = forward_model(float_bytes, working_copy, source_type)
    if mapped.available():
        return (f"the forward stages memory-map {what} (about {format_size(size)} of page cache the OS can drop; "
                "smaller than RAM it runs at full speed, larger it pages from disk on every pass)")
    return f"the forward stages hold {what} in RAM (about {format_size(size)})"

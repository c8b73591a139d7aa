"""`alphaq plan MODEL --budget 3 --json plan.json [--tensor-types-out tt.txt]`.

Analyses MODEL (alphaq.spectral.analyze), solves the allocation (alphaq.allocate.plan) and writes the plan JSON and,
for tensor granularity, a llama-quantize --tensor-type-file. MODEL is best the F16/BF16/F32 GGUF
that llama-quantize will read: then every tensor and the output header size are known exactly.
llama-quantize's pins (--output-tensor-type, --leave-output-tensor, --token-embedding-type, --tensor-type,
--tensor-type-file) fix tensors' types as in `alphaq convert`; their bytes count against the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from alphaq.allocate.costs import NOISE_MODELS, measure_noise
from alphaq.allocate.overrides import parse_tensor_type, read_tensor_type_file
from alphaq.errors import AlphaQError
from alphaq.files import check_output_files, input_files
from alphaq.allocate.plan import (
    ALLOCATE,
    DEFAULT_KV_METADATA_BYTES,
    FAST_ALPHA_EXPERTS,
    FAST_FARMS_BLOCKS,
    MODES,
    POLICY_DEFAULTS,
    GRANULARITIES,
    SCOPES,
    Plan,
    PlanConfig,
    TensorInfo,
    spectral_config,
    format_size,
    gguf_model_infos,
    make_plan,
    measurement_requests,
    parse_size,
)
from alphaq.gguf.io import note_requantised
from alphaq.gguf.qtypes import DEFAULT_CANDIDATES, FULL_LADDER
from alphaq.records import MatrixStats
from alphaq.allocate.solver import DEFAULT_SOLVER, SOLVERS

if TYPE_CHECKING:
    from alphaq.spectral.alpha import SpectralConfig

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose a GGUF quant type per tensor (or expert) under a bit budget",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("model", help="model to plan for (a GGUF file, or anything `alphaq analyze` reads)")
    add_plan_arguments(p)
    p.add_argument("--fixed-bytes", type=int, help="exact non-tensor bytes of the output file (default: from the GGUF)")
    p.add_argument("--alphas", type=Path, help="statistics from `alphaq analyze --csv` instead of analysing again")
    p.add_argument("--cache-dir", type=Path, help="spectral statistics cache")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the spectral cache")
    p.add_argument("--json", dest="json_path", type=Path, required=True, help="plan JSON to write")
    p.add_argument("--tensor-types-out", dest="tensor_type_file", type=Path, metavar="FILE",
                   help="also write the plan's types as lines for llama-quantize --tensor-type-file (or alphaq "
                        "convert's)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_pin_arguments(p)
    p.set_defaults(func=run)


def add_pin_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """llama-quantize's pins, same spelling and meaning (alphaq.allocate.overrides); `with_pins` reads
    them back. A pinned tensor keeps its type; its bytes count against the budget and the knapsack
    allocates the rest. Returns the group, for a caller's further llama-quantize flags."""
    g = p.add_argument_group("llama-quantize's overrides", "same spelling and meaning as llama-quantize's; "
                             "a pinned tensor's bytes count against the budget (docs/ALLOCATION.md)")
    g.add_argument("--output-tensor-type", metavar="TYPE", help="pin output.weight to TYPE")
    g.add_argument("--leave-output-tensor", action="store_true",
                   help="pin output.weight to the type it has in the model (BF16 from an HF checkpoint)")
    g.add_argument("--token-embedding-type", metavar="TYPE", help="pin token_embd.weight to TYPE")
    # one list for both, in command-line order: the first matching entry wins (llama-quantize)
    g.add_argument("--tensor-type", metavar="PATTERN=TYPE", dest="tensor_type_entries", action="append",
                   type=lambda s: ("entry", s), default=[],
                   help="pin every tensor whose name the regex PATTERN matches (unanchored) to TYPE; repeatable")
    g.add_argument("--tensor-type-file", metavar="FILE", dest="tensor_type_entries", action="append",
                   type=lambda s: ("file", s),
                   help="PATTERN=TYPE entries separated by whitespace, e.g. the .tensor-types.txt of a plan")
    return g


def with_pins(cfg: PlanConfig, args: argparse.Namespace) -> PlanConfig:
    """``cfg`` with the pins of the command line, in its order."""
    entries = []
    for kind, value in args.tensor_type_entries:
        entries += [parse_tensor_type(value)] if kind == "entry" else read_tensor_type_file(value)
    return dataclasses.replace(cfg, output_tensor_type=args.output_tensor_type,
                               leave_output_tensor=args.leave_output_tensor,
                               token_embedding_type=args.token_embedding_type, tensor_types=tuple(entries))


def pin_report(plan: Plan) -> tuple[str | None, tuple[str, ...]]:
    """What the pins did, for a summary: the pinned tensors' line (None without pins) and one
    warning per flag or entry that pinned nothing (llama-quantize ignores those silently)."""
    t = plan.totals
    line = (f"{t.n_pinned} tensor(s), {format_size(t.pinned_bytes)} (--output-tensor-type/--leave-output-tensor/"
            "--token-embedding-type/--tensor-type; counted in the budget)") if t.n_pinned else None
    return line, tuple(plan.settings.get("pins", {}).get("unused", ()))


def pin_files(args: argparse.Namespace) -> list[Path]:
    """The --tensor-type-file inputs (never to be written over by an output)."""
    return [Path(value) for kind, value in args.tensor_type_entries if kind == "file"]


def add_plan_arguments(p: argparse.ArgumentParser, *, budget_required: bool = True,
                       cap_default: str = "none") -> None:
    """The allocation options (shared with `alphaq convert`); `config_from_args` reads them back.
    cap_default: --max-quantise-ns when not given ("auto" only where the caller resolves it: convert,
    the one command that runs the damage mode; `alphaq plan` offers and describes the others only)."""
    damage = cap_default == "auto"
    modes_types = (f"damage {','.join(FULL_LADDER)}; " if damage else "") + f"fast/paper {','.join(DEFAULT_CANDIDATES)}"
    budget = p.add_mutually_exclusive_group(required=budget_required)
    budget.add_argument("--budget", type=float, help="average NOMINAL bits over the allocated weights (paper)")
    budget.add_argument("--bpw", type=float, help="average TRUE bits per weight over the allocated tensors")
    budget.add_argument("--target-size", help="whole output file, e.g. 12GiB (B, KB/KiB, MB/MiB, GB/GiB)")
    p.add_argument("--types", default=argparse.SUPPRESS,
                   help=f"candidate types, comma-separated (default: the mode's: {modes_types})")
    p.add_argument("--gamma", type=_gamma, default=argparse.SUPPRESS,
                   help="importance exponent (alpha_tilde/alpha)^gamma, or 'paper' for the App. A.7 formula "
                        "(default: the mode's: damage 0, fast 1, paper the formula; see docs/DESIGN.md)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="tensor", help="default: %(default)s")
    p.add_argument("--scope", choices=SCOPES, default="global", help="default: %(default)s")
    p.add_argument("--allocate", choices=ALLOCATE, default=argparse.SUPPRESS,
                   help="what the knapsack allocates (default: the mode's: "
                        f"{'damage every, ' if damage else ''}fast/paper experts)")
    p.add_argument("--noise", choices=NOISE_MODELS if damage else tuple(n for n in NOISE_MODELS if n != "damage"),
                   default=argparse.SUPPRESS,
                   help=f"cost model (default: the mode's: {'damage damage, ' if damage else ''}fast/paper paper)")
    p.add_argument("--mse-rows", type=int, default=128, help="measured noise: rows per matrix, 0 = all (default: %(default)s)")
    p.add_argument("--weight-by-params", action="store_true", help="scale each matrix's cost by its parameter count")
    p.add_argument("--solver", choices=SOLVERS, default=DEFAULT_SOLVER, help="default: %(default)s")
    auto_help = ("auto: in the default (damage) mode the larger of 150 and what llama.cpp's own mix at this size "
                 "takes with an importance matrix (alphaq/allocate/quantise_cap.py), no cap in --fast/--paper; "
                 if damage else "")
    p.add_argument("--max-quantise-ns", type=quantise_cap_arg, metavar="NS|auto|none" if damage else "NS|none",
                   default=cap_default,
                   help="cap llama.cpp's quantiser time: the file's types at most NS ns per weight on average "
                        "(one thread, alphaq/gguf/quantise_speed.json; the IQ types take 160-800, the k-quants "
                        f"14-170); {auto_help}none: no cap (default: %(default)s)")
    p.add_argument("--alpha-experts", type=count_or_all(2, "experts", auto=True), default="auto", metavar="N|all|auto",
                   help="analyse the spectra of N evenly spaced experts of each merged expert tensor and scale its "
                        "cost up to all of them (default: auto: %d in the fast mode at tensor granularity, else all, "
                        "as the paper does)" % FAST_ALPHA_EXPERTS)
    p.add_argument("--farms-max-blocks", type=count_or_all(1, "blocks", auto=True), default="auto",
                   metavar="N|all|auto",
                   help="pool the eigenvalues of at most N evenly spaced 256x256 FARMS blocks per matrix, as the "
                        "reference code's FARMS_MAX_BLOCKS does (default: auto: %d in the fast mode, else all)"
                        % FAST_FARMS_BLOCKS)
    p.add_argument("--non-expert-type", help="attention / shared experts / dense FFN, where the allocation leaves "
                   "them out: --allocate experts, the fast and paper modes (default: %s)" % POLICY_DEFAULTS["non_expert_type"])
    p.add_argument("--token-embd-type", help="token embeddings, where the allocation leaves them out: --allocate "
                   "experts or all (default: %s)" % POLICY_DEFAULTS["token_embd_type"])
    p.add_argument("--output-type", help="output head, where the allocation leaves it out: --allocate experts or "
                   "all (default: %s)" % POLICY_DEFAULTS["output_type"])


def count_or_all(minimum: int, what: str, auto: bool = False):
    """An argparse type: a count of at least ``minimum`` ``what``, 'all' (None), or with ``auto`` 'auto'."""
    def parse(text: str) -> int | str | None:
        if text == "all":
            return None
        if auto and text == "auto":
            return text
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < minimum:
            count = f"a positive number of {what}" if minimum == 1 else f"a number of {what} >= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {count}{', all or auto' if auto else ' or all'}")
        return n

    return parse


def int_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n} must be at least {minimum}")
        return n

    return parse


def quantise_cap_arg(text: str) -> float | str:
    """--max-quantise-ns: a number of ns per weight, "auto" or "none" (the number is checked by PlanConfig)."""
    if text in ("auto", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ns per weight, auto or none") from None


def _gamma(text: str) -> float | None:
    if text.strip().lower() == "paper":
        return None  # PlanConfig: None = App. A.7 formula
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma {text!r} is neither a number nor 'paper'") from None


def config_from_args(args: argparse.Namespace, mode: str = "fast") -> PlanConfig:
    """The PlanConfig of the parsed options; options not given take ``mode``'s value (plan.MODES)."""
    defaults = MODES[mode]
    if args.budget is not None:
        mode, value = "bits", args.budget
    elif args.bpw is not None:
        mode, value = "bpw", args.bpw
    elif args.target_size is not None:
        mode, value = "size", parse_size(args.target_size)
    else:
        raise AlphaQError("give one of --budget, --bpw or --target-size")
    if mode != "size" and not 0 < value < float("inf"):
        raise AlphaQError(f"--{'budget' if mode == 'bits' else 'bpw'} {value:g} must be a positive number of bits")
    cap = args.max_quantise_ns
    if cap not in ("auto", "none") and not 0 < cap < float("inf"):
        raise AlphaQError(f"--max-quantise-ns {cap:g} must be a positive number of ns per weight (none: no cap)")
    if args.mse_rows < 0:
        raise AlphaQError(f"--mse-rows {args.mse_rows} must be >= 0 (0 = all rows)")
    return PlanConfig(
        budget_mode=mode,
        budget=value,
        types=tuple(t for t in args.types.split(",") if t.strip()) if hasattr(args, "types") else defaults["types"],
        gamma=getattr(args, "gamma", defaults["gamma"]),
        granularity=args.granularity,
        scope=args.scope,
        allocate=getattr(args, "allocate", defaults["allocate"]),
        noise=getattr(args, "noise", defaults["noise"]),
        mse_rows=args.mse_rows or None,
        weight_by_params=args.weight_by_params,
        solver=args.solver,
        max_quantise_ns=None if args.max_quantise_ns in ("auto", "none") else args.max_quantise_ns,
        non_expert_type=args.non_expert_type,
        token_embd_type=args.token_embd_type,
        output_type=args.output_type,
    )


def _analyze(model: Path, cache_dir: Path | None, use_cache: bool, cfg: "SpectralConfig",
             progress: bool) -> list[MatrixStats]:
    """The spectral stage (alphaq.spectral.analyze) under ``cfg``."""
    from alphaq.spectral import analyze

    return analyze.analyze_model(model, cfg, cache_dir=cache_dir, use_cache=use_cache, progress=progress)


def _read_alphas(path: Path) -> list[MatrixStats]:
    from alphaq.spectral import analyze

    return analyze.read_csv(path)


def _measure(model: Path, requests, max_rows, progress: bool):
    from alphaq.model.weights import open_model

    with open_model(model) as weights:  # the matrices load lazily from the open files
        return measure_noise(weights.matrices(), requests, max_rows=max_rows, progress=progress)


def _tensors_from_stats(stats: list[MatrixStats]) -> list[TensorInfo]:
    """Fallback when MODEL is not a GGUF: the analysed matrices only (no norms, no router), in BF16,
    the type `alphaq convert` has llama.cpp's converter write them in (so a pin such as
    --leave-output-tensor names the type convert would keep)."""
    shapes: dict[str, tuple[int, ...]] = {}
    n_expert: dict[str, int] = {}
    for s in stats:
        if s.expert is None:
            shapes[s.tensor] = (s.rows, s.cols)
        else:
            n_expert[s.tensor] = max(n_expert.get(s.tensor, 0), s.expert + 1)
            shapes[s.tensor] = (s.rows, s.cols)
    return [TensorInfo(n, ((n_expert[n],) if n in n_expert else ()) + shp, "BF16") for n, shp in shapes.items()]


def plan_model(model: Path, cfg: PlanConfig, spectral: "SpectralConfig", *, alphas: Path | None = None,
               fixed_bytes: int | None = None, cache_dir: Path | None = None, use_cache: bool = True,
               progress: bool = True) -> Plan:
    """The fast/paper plan of ``model`` (a float GGUF, any part of a split one, or anything `alphaq
    analyze` reads: then sizes cover the analysed matrices and the header is estimated): the budget
    checked from shapes first, then the spectral stage (or ``alphas``, `alphaq analyze --csv`'s
    statistics), then the solver. ``fixed_bytes``: the output's non-tensor bytes, if known."""
    from alphaq.allocate.feasibility import check_budget

    is_gguf = model.is_file() and model.suffix.lower() == ".gguf"
    note_requantised(model)  # a Q8_0 GGUF is analysed dequantised: said, not silent
    if cfg.budget_mode == "size" and not is_gguf:
        raise AlphaQError("--target-size needs a GGUF model (every tensor must be known); use --budget or --bpw")
    check_budget(model, cfg, fixed_bytes=fixed_bytes)  # before the analysis
    tensors: list[TensorInfo] | None = None
    header = fixed_bytes
    if is_gguf:
        tensors, gguf_header = gguf_model_infos(model, cfg.alignment)  # a split GGUF: every part
        header = gguf_header if header is None else header
    stats = _read_alphas(alphas) if alphas is not None else _analyze(model, cache_dir, use_cache, spectral, progress)
    if tensors is None:
        logger.warning("%s is not a GGUF: sizes cover the analysed matrices only", model)
        tensors = _tensors_from_stats(stats)
    noise_table = None
    if cfg.noise == "measured":
        noise_table = _measure(model, measurement_requests(stats, tensors, cfg), cfg.mse_rows, progress)
    kv = DEFAULT_KV_METADATA_BYTES
    if not is_gguf and header is None and model.is_dir():  # the tokenizer files tell the metadata's size
        from alphaq.allocate.feasibility import tokenizer_kv_bytes

        kv = tokenizer_kv_bytes(model)
    plan = make_plan(stats, tensors, cfg, fixed_bytes=header, noise_table=noise_table, kv_bytes=kv)
    if alphas is None:
        from alphaq.spectral.alpha import farms_cap

        plan.settings["farms_cap"] = farms_cap(stats, spectral)
    return plan


def run(args: argparse.Namespace) -> int:
    if args.max_quantise_ns == "auto":
        raise AlphaQError("--max-quantise-ns auto is the cap of `alphaq convert`'s default mode; "
                          "`alphaq plan` takes a number or none")
    cfg = config_from_args(args)
    if cfg.noise == "damage":
        raise AlphaQError("the damage cost runs the model on its own text; use `alphaq convert` for it "
                          "(`alphaq plan` takes --noise paper or measured)")
    if args.alphas is not None and (args.alpha_experts != "auto" or args.farms_max_blocks != "auto"):
        raise AlphaQError("--alpha-experts and --farms-max-blocks choose what the spectral stage analyses; with "
                          "--alphas the statistics come from the CSV")
    cfg = with_pins(cfg, args)  # before the (long) analysis: a bad pin is one line now
    model = Path(args.model)
    if not model.exists():
        raise AlphaQError(f"model {model} does not exist")
    if args.alphas is not None and not args.alphas.is_file():
        raise AlphaQError(f"--alphas {args.alphas} is not a file (`alphaq analyze --csv` writes one)")
    if args.fixed_bytes is not None and args.fixed_bytes < 0:
        raise AlphaQError(f"--fixed-bytes {args.fixed_bytes} must be >= 0")
    check_output_files({"--json": args.json_path, "--tensor-types-out": args.tensor_type_file}, args.force,
                       input_files(model, args.alphas, *pin_files(args)))
    if args.tensor_type_file is not None and cfg.granularity != "tensor":
        raise AlphaQError("--tensor-types-out needs --granularity tensor (stock llama.cpp: one type per tensor)")
    plan = plan_model(model, cfg, spectral_config(cfg, args.alpha_experts, args.farms_max_blocks),
                      alphas=args.alphas, fixed_bytes=args.fixed_bytes, cache_dir=args.cache_dir,
                      use_cache=not args.no_cache, progress=not args.no_progress)
    plan.write_json(args.json_path, force=args.force)
    if args.tensor_type_file is not None:
        plan.write_tensor_type_file(args.tensor_type_file, force=args.force)

    t = plan.totals
    print(
        f"{t.n_items} items ({plan.settings['granularity']}), {t.allocated_params} allocated weights: "
        f"{t.nominal_bits:.4f} nominal bits, {t.true_bpw:.4f} true bpw; "
        f"{t.n_fallback_items} items on a fallback type"
    )
    print(
        f"predicted file {format_size(t.predicted_file_bytes)}"
        f"{' (header estimated)' if t.header_estimated else ''}, {t.file_bpw:.4f} bpw over the whole model; "
        f"objective {t.objective:.6g} (lower bound {t.lower_bound:.6g}{'' if t.proven_optimal else ', NOT proven optimal'})"
    )
    pinned, unused = pin_report(plan)
    if pinned:
        print(f"pinned {pinned}")
    for w in unused:
        print(f"WARNING {w}")
    if plan.settings.get("farms_cap"):
        from alphaq.spectral.alpha import describe_farms_cap

        print(describe_farms_cap(plan.settings["farms_cap"]))
    print(f"wrote {args.json_path}" + (f" and {args.tensor_type_file}" if args.tensor_type_file else ""))
    return 0

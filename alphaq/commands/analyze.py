"""`alphaq analyze MODEL --csv alphas.csv [--plots DIR]`: PL_Alpha_Hill of every matrix."""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from alphaq.commands.plan import count_or_all, int_at_least
from alphaq.errors import AlphaQError
from alphaq.spectral.alpha import DEVICES, XMIN_WINDOWS, SpectralConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="PL_Alpha_Hill of every quantisable matrix / expert slice (spectral stage)",
        description=__doc__,
    )
    p.add_argument("model", metavar="MODEL", help="HF checkpoint directory or F32/F16/BF16 GGUF file")
    p.add_argument("--csv", required=True, type=Path, help="output CSV, one row per matrix")
    p.add_argument("--plots", type=Path, metavar="DIR", help="also write box plots and heatmaps here")
    p.add_argument("--force", action="store_true", help="overwrite an existing CSV and existing figures in --plots")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the alpha cache")
    p.add_argument("--cache-dir", type=Path, help="alpha cache (default ~/.cache/alphaq/spectral)")
    p.add_argument("--block-size", type=int_at_least(2), default=SpectralConfig.block_size,
                   help="FARMS block side (default: %(default)s)")
    p.add_argument("--farms-max-blocks", type=count_or_all(1, "blocks"), default=None, metavar="N|all",
                   help="pool at most N evenly spaced FARMS blocks per matrix (the reference code draws 256 at "
                        "random; default: all)")
    p.add_argument("--bins", type=int_at_least(1), default=SpectralConfig.bins,
                   help="log10 histogram bins (default: %(default)s)")
    p.add_argument(
        "--xmin-window",
        choices=XMIN_WINDOWS,
        default=SpectralConfig.xmin_window,
        help="'reference' keeps the reference code's effective window; 'corrected' uses "
        "0.95*peak <= xmin <= 1.5*peak",
    )
    p.add_argument("--device", choices=DEVICES, default=SpectralConfig.device,
                   help="where the eigenvalues are computed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alphaq.gguf.io import note_requantised
    from alphaq.spectral.analyze import analyze_model, write_csv

    from alphaq.files import check_output_files, input_files

    if not Path(args.model).exists():
        raise AlphaQError(f"model {args.model} does not exist")
    check_output_files({"--csv": args.csv}, args.force, input_files(Path(args.model)))  # before the long part
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise AlphaQError(f"--cache-dir {args.cache_dir} is a file; give a directory")
    if args.plots:
        from alphaq.files import check_plots_dir
        from alphaq.plots import ANALYZE_PLOT_NAMES

        check_plots_dir(args.plots, args.force, ANALYZE_PLOT_NAMES)  # the rule of convert --plots
    cfg = SpectralConfig(
        block_size=args.block_size, bins=args.bins, xmin_window=args.xmin_window, device=args.device,
        max_blocks=args.farms_max_blocks,
    )
    note_requantised(args.model)  # a Q8_0 GGUF is analysed dequantised: said, not silent
    stats = analyze_model(
        args.model,
        cfg,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        progress=not args.no_progress,
    )
    write_csv(stats, args.csv, force=args.force)
    alphas = [s.alpha for s in stats if s.signal and math.isfinite(s.alpha)]
    summary = f"{len(stats)} matrices -> {args.csv}"
    if alphas:
        summary += (
            f"; alpha min {min(alphas):.3f} median {statistics.median(alphas):.3f} "
            f"max {max(alphas):.3f}"
        )
    n_bad = len(stats) - len(alphas)
    if n_bad:
        summary += f"; {n_bad} without spectral signal"
    print(summary)
    if args.plots:
        from alphaq.plots import write_plots

        for p in write_plots(stats, args.plots, title=f"PL_Alpha_Hill per block: {args.model}"):
            print(f"plot: {p}")
    return 0

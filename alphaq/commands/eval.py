"""`alphaq eval MODEL.gguf --text FILE [--text FILE ...] [--ref REF.gguf] [--json OUT] [--patched]`.

Perplexity through llama.cpp (llama-perplexity style: non-overlapping n_ctx windows, second half
scored) and, against a reference GGUF, mean KL divergence and top-1 token agreement.
``--patched`` runs the evaluation under the patched llama.cpp (ggml-patches/), which expert-granular
files need, without installing it: the cached wheel of `convert.patched` (built on first use) is
put first on the path of a child process; a stock reference runs there unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

from alphaq.errors import AlphaQError
from alphaq.files import atomic_write_text, check_output_files, input_files

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity / KL / top-1 of a GGUF through llama.cpp",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, metavar="MODEL.gguf")
    # llama-perplexity's spellings beside ours: -f/--file, -c/--ctx-size, --chunks, --kl-divergence-base
    p.add_argument("--text", "-f", "--file", type=Path, action="append", required=True,
                   help="held-out text file (repeatable)")
    p.add_argument("--ref", "--kl-divergence-base", type=Path,
                   help="reference GGUF of the same model (e.g. its BF16) for KL and top-1")
    p.add_argument("--n-ctx", "-c", "--ctx-size", type=int, default=256, help="window length (default: %(default)s)")
    p.add_argument("--max-windows", "--chunks", type=int, help="at most this many windows per text")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: llama.cpp's)")
    p.add_argument("--json", dest="json_path", type=Path, help="write the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--patched", action="store_true",
                   help="run under the patched llama.cpp (needed for expert-granular files; built once, "
                        "~10 min, then cached)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alphaq.evaluate.perplexity import (check_same_vocabulary, evaluate_text, load_llama, split_windows,
                                            trained_context)
    from alphaq.runtime.isolated import patched_loaded

    from alphaq.gguf.io import check_gguf

    for path in [args.model, *([args.ref] if args.ref else [])]:
        check_gguf(path)  # a missing, truncated or foreign file: one line, before llama.cpp loads it
    for t in args.text:
        if t.is_dir():
            raise AlphaQError(f"--text {t} is a directory; give a text file")
        if not t.is_file():
            raise AlphaQError(f"--text {t} does not exist")
    if args.n_ctx < 8:
        raise AlphaQError(f"--n-ctx {args.n_ctx} must be at least 8")
    if args.max_windows is not None and args.max_windows < 1:
        raise AlphaQError(f"--max-windows {args.max_windows} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise AlphaQError(f"--threads {args.threads} must be at least 1")
    check_output_files({"--json": args.json_path}, args.force, input_files(args.model, args.ref, *args.text))
    if args.patched and not patched_loaded():
        return _rerun_patched(args)
    llm = load_llama(args.model, args.n_ctx, n_threads=args.threads)
    ref = load_llama(args.ref, args.n_ctx, n_threads=args.threads) if args.ref else None
    trained = trained_context(llm)
    if trained and args.n_ctx > trained:
        log.warning("--n-ctx %d is beyond the %d tokens %s was trained on: its perplexity there says little",
                    args.n_ctx, trained, args.model)
    texts = []
    for t in args.text:  # every text long enough, and the reference comparable, before any scoring
        text, scorer = t.read_text(errors="replace"), ref or llm
        tokens = scorer.tokenize(text.encode(), add_bos=False)  # once (a large text takes seconds)
        chunks = split_windows(tokens, scorer.token_bos(), args.n_ctx, args.max_windows, name=f"--text {t}")
        if ref is not None:
            check_same_vocabulary(llm, ref, str(args.model), str(args.ref), text, ref_tokens=tokens)
        texts.append((t, text, chunks))
    reports = []
    for t, text, chunks in texts:
        r = evaluate_text(llm, text, name=t.name, n_ctx=args.n_ctx, max_windows=args.max_windows, ref=ref,
                          progress=not args.no_progress, chunks=chunks)
        reports.append(r)
        line = f"{t.name}: ppl {r.ppl:.4f} over {r.n_scored} tokens"
        if ref is not None:
            line += f"; ref ppl {r.ref_ppl:.4f}, KL {r.kl:.5f} nats/token, top-1 agreement {r.top1:.2%}"
        print(line)
    if args.json_path:
        doc = {"model": str(args.model), "ref": str(args.ref) if args.ref else None, "n_ctx": args.n_ctx,
               "texts": [dataclasses.asdict(r) for r in reports]}
        atomic_write_text(args.json_path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


def _rerun_patched(args: argparse.Namespace) -> int:
    """This command again, in a child whose llama_cpp is the patched one."""
    from alphaq.runtime.isolated import child_env
    from convert.patched import patched_site

    argv = ["eval", str(args.model), "--n-ctx", str(args.n_ctx)]
    for t in args.text:
        argv += ["--text", str(t)]
    for flag, value in (("--ref", args.ref), ("--max-windows", args.max_windows), ("--json", args.json_path),
                        ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--force"] * args.force + ["--no-progress"] * args.no_progress
    argv += ["--debug"] * getattr(args, "debug", False)
    return subprocess.run([sys.executable, "-c", "import sys; from alphaq.cli import main; sys.exit(main())", *argv],
                          env=child_env(patched_site())).returncode

"""Perplexity through llama.cpp itself (llama-cpp-python), llama-perplexity style.

The text is tokenised by the model's own GGUF vocabulary and cut into non-overlapping windows of
``n_ctx`` tokens; each window starts with BOS (replacing its first token, as llama-perplexity does)
and only its second half is scored, so every scored token sees at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alphaq.errors import AlphaQError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_scored: int
    n_windows: int


def load_llama(path: Path, n_ctx: int, *, logits_all: bool = True, n_threads: int | None = None,
               n_gpu_layers: int = 0):
    """llama-cpp-python's Llama for ``path`` (any part of a split GGUF: llama.cpp is given the first)."""
    import llama_cpp

    from alphaq.gguf.expert import PATCHED_RUNTIME, read_layouts
    from alphaq.gguf.io import first_shard
    from alphaq.runtime.isolated import patched_loaded

    path = first_shard(Path(path))  # a missing part is one line here, not llama.cpp's load failure

    if not patched_loaded() and read_layouts(path):
        raise AlphaQError(f"{path} is expert-granular and needs the {PATCHED_RUNTIME}; this environment has "
                          f"stock llama-cpp-python {llama_cpp.__version__} (alphaq eval --patched, or install it: "
                          f"make install-patched)")

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                           seed=0, verbose=False, n_threads=n_threads, n_gpu_layers=n_gpu_layers)


def trained_context(llm) -> int:
    """The context length the loaded model was trained on (its GGUF's context_length)."""
    import llama_cpp

    return int(llama_cpp.llama_model_n_ctx_train(llm.model))


def window_logprobs(llm, tokens: list[int]) -> np.ndarray:
    """log-softmax of the logits at every position of one window, shape (len(tokens), n_vocab)."""
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def windows(llm, text: str, n_ctx: int, max_windows: int | None, name: str = "text") -> list[list[int]]:
    return split_windows(llm.tokenize(text.encode(), add_bos=False), llm.token_bos(), n_ctx, max_windows, name)


def split_windows(tokens: list[int], bos: int, n_ctx: int, max_windows: int | None,
                  name: str = "text") -> list[list[int]]:
    """``tokens`` (a text's, without BOS) cut into windows of ``n_ctx``, each starting with BOS."""
    n_windows = len(tokens) // n_ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise AlphaQError(f"{name} has {len(tokens)} tokens, fewer than one window of n_ctx={n_ctx}")
    out = []
    for w in range(n_windows):
        chunk = list(tokens[w * n_ctx:(w + 1) * n_ctx])
        if bos >= 0:
            chunk[0] = bos
        out.append(chunk)
    return out


def perplexity(path: Path, text: str, *, n_ctx: int = 256, max_windows: int | None = None,
               llm=None) -> Perplexity:
    llm = llm or load_llama(path, n_ctx)
    first = n_ctx // 2
    nll, count = 0.0, 0
    chunks = windows(llm, text, n_ctx, max_windows)
    for chunk in chunks:
        lp = window_logprobs(llm, chunk)
        targets = np.asarray(chunk[first:], dtype=np.int64)
        nll -= float(lp[np.arange(first - 1, n_ctx - 1), targets].sum())
        count += len(targets)
    mean = nll / count
    return Perplexity(math.exp(mean), mean, count, len(chunks))


@dataclass(frozen=True)
class TextReport:
    text: str  # file name
    ppl: float
    n_scored: int
    n_windows: int
    ref_ppl: float | None = None
    kl: float | None = None  # mean KL(ref || model) per scored token, nats
    top1: float | None = None  # fraction of scored positions where both argmax tokens agree


def check_same_vocabulary(llm, ref, model: str, ref_name: str, text: str, ref_tokens: list[int] | None = None) -> None:
    """KL and top-1 compare distributions token by token: the reference must share the model's
    vocabulary (its size, and the same tokens for ``text``; ``ref_tokens``: the reference's, when
    already made). Another model of the same vocabulary is allowed (a KL between two models), a
    different architecture is said."""
    if ref_tokens is None:
        ref_tokens = ref.tokenize(text.encode(), add_bos=False)
    if llm.n_vocab() != ref.n_vocab() or llm.tokenize(text.encode(), add_bos=False) != ref_tokens:
        raise AlphaQError(f"--ref {ref_name} has another vocabulary than {model} ({ref.n_vocab()} against "
                          f"{llm.n_vocab()} tokens, or another tokenisation): KL needs the reference of this model")
    arch, ref_arch = (m.metadata.get("general.architecture") for m in (llm, ref))
    if arch != ref_arch:
        log.warning("--ref %s is a %s model, %s a %s one: the KL compares two different models", ref_name, ref_arch,
                    model, arch)


def evaluate_text(llm, text: str, *, name: str, n_ctx: int, max_windows: int | None = None,
                  ref=None, progress: bool = False, chunks: list[list[int]] | None = None) -> TextReport:
    """Perplexity of ``llm`` on ``text``; with ``ref`` also KL divergence and top-1 agreement
    against the reference model's logits on the very same token windows (``chunks``: those
    windows, when already made)."""
    from tqdm import tqdm

    first = n_ctx // 2
    chunks = chunks or windows(ref or llm, text, n_ctx, max_windows, name)
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for chunk in tqdm(chunks, desc=f"eval {name}", unit="window", disable=not progress, dynamic_ncols=True):
        targets = np.asarray(chunk[first:], dtype=np.int64)
        pos = np.arange(first - 1, n_ctx - 1)
        lp = window_logprobs(llm, chunk)[pos]
        nll -= float(lp[np.arange(len(targets)), targets].sum())
        if ref is not None:
            lq = window_logprobs(ref, chunk)[pos]
            ref_nll -= float(lq[np.arange(len(targets)), targets].sum())
            kl += float((np.exp(lq) * (lq - lp)).sum())
            agree += int((lq.argmax(1) == lp.argmax(1)).sum())
        count += len(targets)
    return TextReport(
        text=name, ppl=math.exp(nll / count), n_scored=count, n_windows=len(chunks),
        ref_ppl=math.exp(ref_nll / count) if ref is not None else None,
        kl=kl / count if ref is not None else None,
        top1=agree / count if ref is not None else None)


@dataclass(frozen=True)
class ReferenceRun:
    """A reference model's log-probabilities on fixed windows, computed once and reused for
    every quantised model (the reference forward dominates a sweep's runtime otherwise)."""

    name: str  # text name
    n_ctx: int
    chunks: tuple[tuple[int, ...], ...]  # the token windows (BOS first)
    logprobs: tuple[np.ndarray, ...]  # per window: (n_ctx - n_ctx//2, n_vocab) log-softmax at scored positions


def reference_run(ref, text: str, *, name: str, n_ctx: int, max_windows: int | None = None,
                  progress: bool = False) -> ReferenceRun:
    from tqdm import tqdm

    first = n_ctx // 2
    pos = np.arange(first - 1, n_ctx - 1)
    chunks = windows(ref, text, n_ctx, max_windows)
    lps = tuple(window_logprobs(ref, c)[pos] for c in tqdm(chunks, desc=f"ref {name}", unit="window",
                                                              disable=not progress, dynamic_ncols=True))
    return ReferenceRun(name, n_ctx, tuple(tuple(c) for c in chunks), lps)


def evaluate_vs_reference(llm, run: ReferenceRun, *, progress: bool = False) -> TextReport:
    """Same numbers as ``evaluate_text(llm, ..., ref=...)`` with the reference precomputed."""
    from tqdm import tqdm

    n_ctx = run.n_ctx
    first = n_ctx // 2
    pos = np.arange(first - 1, n_ctx - 1)
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for chunk, lq in tqdm(list(zip(run.chunks, run.logprobs)), desc=f"eval {run.name}", unit="window",
                          disable=not progress, dynamic_ncols=True):
        targets = np.asarray(chunk[first:], dtype=np.int64)
        lp = window_logprobs(llm, list(chunk))[pos]
        rows = np.arange(len(targets))
        nll -= float(lp[rows, targets].sum())
        ref_nll -= float(lq[rows, targets].sum())
        kl += float((np.exp(lq) * (lq - lp)).sum())
        agree += int((lq.argmax(1) == lp.argmax(1)).sum())
        count += len(targets)
    return TextReport(text=run.name, ppl=math.exp(nll / count), n_scored=count, n_windows=len(run.chunks),
                      ref_ppl=math.exp(ref_nll / count), kl=kl / count, top1=agree / count)

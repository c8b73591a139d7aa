"""Perplexity through llama.cpp itself (llama-cpp-python), llama-perplexity style.

The text is tokenised by the model's own GGUF vocabulary and cut into non-overlapping windows of
``n_ctx`` tokens; each window starts with BOS (replacing its first token, as llama-perplexity does)
and only its second half is scored, so every scored token sees at least n_ctx/2 tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alphaq.errors import AlphaQError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_scored: int
    n_windows: int


def load_llama(path: Path, n_ctx: int, *, logits_all: bool = True, n_threads: int | None = None):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                           seed=0, verbose=False, n_threads=n_threads)


def window_logprobs(llm, tokens: list[int]) -> np.ndarray:
    """log-softmax of the logits at every position of one window, shape (len(tokens), n_vocab)."""
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def perplexity(path: Path, text: str, *, n_ctx: int = 256, max_windows: int | None = None,
               llm=None) -> Perplexity:
    llm = llm or load_llama(path, n_ctx)
    tokens = llm.tokenize(text.encode(), add_bos=False)
    n_windows = len(tokens) // n_ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise AlphaQError(f"text has {len(tokens)} tokens, fewer than one window of n_ctx={n_ctx}")
    bos = llm.token_bos()
    first = n_ctx // 2
    nll, count = 0.0, 0
    for w in range(n_windows):
        chunk = list(tokens[w * n_ctx:(w + 1) * n_ctx])
        if bos >= 0:
            chunk[0] = bos
        lp = window_logprobs(llm, chunk)
        targets = np.asarray(chunk[first:], dtype=np.int64)
        nll -= float(lp[np.arange(first - 1, n_ctx - 1), targets].sum())
        count += len(targets)
    mean = nll / count
    return Perplexity(math.exp(mean), mean, count, n_windows)

"""Evaluation through llama.cpp: KL / top-1 against a reference, and the cached-reference path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alphaq.evaluate.perplexity import (
    evaluate_text,
    evaluate_vs_reference,
    load_llama,
    reference_run,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, float_ggufs):
    from alphaq.gguf.quantize import quantize_stock

    out = tmp_path_factory.mktemp("evaluate")
    bf16 = float_ggufs["mixtral"]
    q2 = out / "q2k.gguf"
    quantize_stock(bf16, q2, "Q2_K", nthread=1)
    return bf16, q2


@pytest.fixture(scope="module")
def text():
    return (FIXTURES / "heldout" / "prose.txt").read_text(errors="replace")


def test_model_against_itself_has_zero_kl_and_full_agreement(ggufs, text):
    llm = load_llama(ggufs[0], 64, n_threads=1)
    r = evaluate_text(llm, text, name="prose", n_ctx=64, max_windows=2, ref=llm)
    assert r.kl == pytest.approx(0.0, abs=1e-9)
    assert r.top1 == 1.0
    assert r.ppl == pytest.approx(r.ref_ppl, rel=1e-12)
    run = reference_run(llm, text, name="prose", n_ctx=64, max_windows=2)
    c = evaluate_vs_reference(llm, run)
    assert c.kl == pytest.approx(0.0, abs=1e-9) and c.top1 == 1.0


def test_cached_reference_equals_live_reference(ggufs, text):
    ref = load_llama(ggufs[0], 64, n_threads=1)
    llm = load_llama(ggufs[1], 64, n_threads=1)
    live = evaluate_text(llm, text, name="prose", n_ctx=64, max_windows=2, ref=ref)
    cached = evaluate_vs_reference(llm, reference_run(ref, text, name="prose", n_ctx=64, max_windows=2))
    for f in ("ppl", "ref_ppl", "kl", "top1", "n_scored"):
        assert getattr(cached, f) == pytest.approx(getattr(live, f), rel=1e-9), f
    # a Q2_K model really differs from its BF16 source
    assert live.kl > 1e-4 and live.top1 < 1.0 and live.ppl > live.ref_ppl


# ----------------------------------------------------------------------------------------------
# the KL's direction, against plain numpy on logits where KL(p||q) and KL(q||p) differ widely
# ----------------------------------------------------------------------------------------------

N_CTX, VOCAB = 16, 6


def asymmetric_logits(seed: int) -> tuple:
    """Reference logits (one sharp token per position) and model logits (nearly flat): the
    reference's tail is tiny where the model's is not, so KL(model||ref) is far above KL(ref||model)."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((N_CTX, VOCAB)) * 0.1
    ref[np.arange(N_CTX), rng.integers(0, VOCAB, N_CTX)] += 9.0
    model = rng.standard_normal((N_CTX, VOCAB)) * 0.3
    return ref, model


def numpy_kl(p_logits, q_logits) -> np.ndarray:
    """KL(p || q) per row, from the definition: sum_v p(v) log(p(v) / q(v))."""
    p = np.exp(p_logits) / np.exp(p_logits).sum(axis=1, keepdims=True)
    q = np.exp(q_logits) / np.exp(q_logits).sum(axis=1, keepdims=True)
    return (p * np.log(p / q)).sum(axis=1)


class FixedLogits:
    """Stands in for llama_cpp.Llama in alphaq.evaluate.perplexity: the same logits for any window."""

    def __init__(self, logits):
        self.logits, self.scores = logits, None

    def tokenize(self, text, add_bos=False):
        return [b % VOCAB for b in text]

    def token_bos(self):
        return -1  # no BOS: windows are used as tokenised

    def reset(self):
        self.scores = None

    def eval(self, tokens):
        self.scores = self.logits[: len(tokens)]


def test_kl_is_reference_to_model_against_numpy():
    ref_logits, model_logits = asymmetric_logits(0)
    scored = np.arange(N_CTX // 2 - 1, N_CTX - 1)  # positions whose next token is scored
    want = numpy_kl(ref_logits[scored], model_logits[scored]).mean()
    wrong_way = numpy_kl(model_logits[scored], ref_logits[scored]).mean()
    assert wrong_way > 3 * want > 0  # the two directions are far apart on these logits

    ref, llm = FixedLogits(ref_logits), FixedLogits(model_logits)
    text = "x" * (2 * N_CTX)  # two windows
    live = evaluate_text(llm, text, name="t", n_ctx=N_CTX, ref=ref)
    cached = evaluate_vs_reference(llm, reference_run(ref, text, name="t", n_ctx=N_CTX))
    assert live.kl == pytest.approx(want, rel=1e-9)
    assert cached.kl == pytest.approx(want, rel=1e-9)

    # the damage stage's KL (alphaq.damage): per token, and averaged by its Reference
    from alphaq.damage import Reference, kl_per_token, log_softmax

    np.testing.assert_allclose(kl_per_token(log_softmax(ref_logits), log_softmax(model_logits)),
                               numpy_kl(ref_logits, model_logits), rtol=1e-9)

    class Session:  # alphaq.runtime.forward.Session's one method Reference uses
        def __init__(self, logits):
            self.out = logits

        def logits(self, window):
            return self.out[: len(window)]

    windows = np.zeros((2, N_CTX), dtype=np.int64)
    reference = Reference(Session(ref_logits), windows)
    assert reference.kl(Session(model_logits)) == pytest.approx(numpy_kl(ref_logits, model_logits).mean(), rel=1e-6)

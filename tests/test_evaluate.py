"""Evaluation through llama.cpp: KL / top-1 against a reference, and the cached-reference path."""

from __future__ import annotations

from pathlib import Path

import pytest

from alphaq.evaluate import (
    evaluate_text,
    evaluate_vs_reference,
    load_llama,
    reference_run,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, float_ggufs):
    from alphaq.quantize import quantize_stock

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

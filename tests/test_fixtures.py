"""The committed tiny MoE fixtures are real trained models (issue: foundation)."""

import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import FIXTURES, MODEL_FIXTURES

EXPECTED = {"mixtral", "qwen2moe", "qwen3moe", "deepseek2"}


def test_every_architecture_is_committed():
    assert EXPECTED <= set(MODEL_FIXTURES)


def _heldout_ids(model_dir, domain):
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    text = (FIXTURES / "heldout" / f"{domain}.txt").read_text()
    return np.asarray([sp.bos_id()] + sp.encode(text), dtype=np.int64)


def _oracle_unigram_ppl(ids: np.ndarray, vocab: int) -> float:
    """The best any unigram model can do on this text: frequencies fit on the text itself."""
    counts = np.bincount(ids[1:], minlength=vocab).astype(np.float64)
    p = counts / counts.sum()
    return float(np.exp(-(np.log(p[ids[1:]])).mean()))


@torch.no_grad()
def _model_ppl(model, ids: np.ndarray, window: int = 256) -> tuple[float, bool]:
    """Same protocol as the trainer's held-out figure: non-overlapping windows, all but the
    first token of each window scored."""
    n = len(ids) // window
    x = torch.from_numpy(ids[: n * window]).view(n, window)
    nll, count, finite = 0.0, 0, True
    for batch in x.split(32):
        logits = model(input_ids=batch).logits.float()
        finite &= bool(torch.isfinite(logits).all())
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch[:, 1:, None])
        nll -= lp.sum().item()
        count += lp.numel()
    return math.exp(nll / count), finite


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_fixture_loads_and_beats_unigram(name):
    from transformers import AutoModelForCausalLM

    model_dir = FIXTURES / name
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    log = json.loads((model_dir / "train_log.json").read_text())
    assert log["final_loss"] < log["initial_loss"] - 2.0, "loss must have clearly dropped"
    for domain in ("prose", "code"):
        ids = _heldout_ids(model_dir, domain)
        ppl, finite = _model_ppl(model, ids)
        assert finite
        unigram = _oracle_unigram_ppl(ids, model.config.vocab_size)
        # "well below": under a third of the best possible unigram model on the same text
        assert ppl < unigram / 3, (domain, ppl, unigram)
        # the figure recorded at training time (and quoted in the README) is honest: same text
        # and protocol, but bf16 on a GPU there and f32 on this CPU here, so agree within 3 %
        recorded = log["heldout"][domain]["ppl_bf16"]
        assert abs(ppl - recorded) / recorded < 0.03, (domain, ppl, recorded)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_hf_tokenizer_matches_sentencepiece(name):
    from transformers import AutoTokenizer

    model_dir = FIXTURES / name
    tok = AutoTokenizer.from_pretrained(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    text = (FIXTURES / "heldout" / "code.txt").read_text()[:2000]
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_router_init_saved(name):
    from safetensors import safe_open

    model_dir = FIXTURES / name
    cfg = json.loads((model_dir / "config.json").read_text())
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    with safe_open(model_dir / "router_init.safetensors", "pt") as init, \
         safe_open(model_dir / "model.safetensors", "pt") as trained:
        keys = list(init.keys())
        assert len(keys) == cfg["num_hidden_layers"]
        for k in keys:
            a, b = init.get_tensor(k), trained.get_tensor(k).float()
            assert a.shape == b.shape == (n_exp, cfg["hidden_size"])
            assert not torch.allclose(a, b), "router must have moved during training"

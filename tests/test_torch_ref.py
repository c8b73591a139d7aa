"""Torch reference forward: dequantised GGUF weights in the HF model vs llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from alphaq.evaluate import baselines

from alphaq.runtime import torch_ref

FIXTURES = Path(__file__).parent / "fixtures"
Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def q3(tmp_path_factory, float_ggufs):
    out = tmp_path_factory.mktemp("torch_ref")
    bf16 = float_ggufs["mixtral"]
    fm = baselines.FloatModel.open(bf16)
    types = {t.name: (Q.Q3_K if "_exps" in t.name else Q.Q4_K)
             for t in fm.tensors if len(t.shape) >= 2 and "ffn_gate_inp" not in t.name}
    q = out / "q.gguf"
    from alphaq.gguf.quantize import quantize_gguf

    quantize_gguf(bf16, q, types, nthread=1)
    return bf16, q, types


@pytest.fixture(scope="module")
def from_gguf(q3):
    return torch_ref.from_gguf(FIXTURES / "mixtral", q3[1])


def test_gguf_path_and_ggml_path_give_the_same_weights(q3, from_gguf):
    """Dequantised GGUF (with Mixtral's Q/K un-permuted) == quantising HF weights with ggml."""
    bf16, _, types = q3
    a = from_gguf
    block0 = {(n, None): t for n, t in types.items() if n.startswith("blk.0.")}  # attention (permuted Q/K) + experts
    b = torch_ref.from_types(FIXTURES / "mixtral", bf16, block0)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    plain = dict(torch_ref.load_hf(FIXTURES / "mixtral").named_parameters())
    compared = [n for n in pa if n.startswith("model.layers.0.") and not torch.equal(pb[n], plain[n])]
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} <= set(compared)
    for name in compared:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0, msg=name)
    # and a weight the GGUF path replaced but not the block-0 ggml path
    assert not torch.equal(pa["model.layers.1.self_attn.q_proj.weight"], pb["model.layers.1.self_attn.q_proj.weight"])


def test_torch_perplexity_matches_llama_cpp(q3, from_gguf):
    """Same windows through llama.cpp and through torch with the same dequantised weights.
    llama.cpp quantises activations (Q8_K) in its k-quant dot products; tolerance 1 %."""

    from alphaq.evaluate.perplexity import load_llama, perplexity

    _, q, _ = q3
    text = (FIXTURES / "heldout" / "prose.txt").read_text(errors="replace")
    ll = perplexity(q, text, n_ctx=128, max_windows=2, llm=load_llama(q, 128, n_threads=1)).ppl
    llm = load_llama(q, 128, n_threads=1)
    tokens = llm.tokenize(text.encode(), add_bos=False)
    model = from_gguf
    tp = torch_ref.perplexity(model, list(tokens), 128, 2, llm.token_bos())
    assert tp == pytest.approx(ll, rel=0.01)
    # and the quantisation is visible: the BF16 model scores differently
    bf = torch_ref.perplexity(torch_ref.load_hf(FIXTURES / "mixtral"), list(tokens), 128, 2, llm.token_bos())
    assert abs(bf - tp) > 1e-3 * bf


def test_a_quantised_tensor_without_an_hf_parameter_is_an_error(q3, monkeypatch):
    """The reference must not silently keep a float HF weight where the GGUF has a quantised one:
    with one mapping missing (as for an unknown module layout), loading fails and names it."""
    from alphaq.errors import AlphaQError

    real = torch_ref.hf_targets

    def without_q(model, names, arch, n_blocks):
        out = real(model, names, arch, n_blocks)
        out.pop("blk.1.attn_q.weight")
        return out

    monkeypatch.setattr(torch_ref, "hf_targets", without_q)
    with pytest.raises(AlphaQError, match=r"1 quantisable tensor\(s\) have no HF parameter.*blk\.1\.attn_q\.weight"):
        torch_ref.from_gguf(FIXTURES / "mixtral", q3[1])
    # routers and norms, which llama.cpp copies unquantised, are no reason to refuse (same values)
    model = torch_ref.load_hf(FIXTURES / "mixtral")
    monkeypatch.setattr(torch_ref, "hf_targets", real)
    used = torch_ref.assign_gguf(model, q3[1])
    assert "blk.0.ffn_gate_inp.weight" not in used

"""kernels/: Triton dequantisation, fused matmuls and grouped MoE against gguf-py and torch.

References: gguf-py 0.19.0's ``gguf.quants.dequantize`` (bit for bit) and ``alphaq.runtime.kernels.torch_ref``
(gguf-py dequantisation + an fp32 torch matmul), itself checked against a dense einsum here.
Weights are quantised by libggml's own quantiser (``alphaq.gguf.ggml``; all-ones imatrix for IQ1_S).

The Triton tests run on CPU under TRITON_INTERPRET=1 (set below unless already set); with
TRITON_INTERPRET=0 on a CUDA machine they run on the GPU. Without Triton (an optional extra) they
skip; the layout and reference tests run everywhere.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from alphaq.gguf import ggml
from alphaq.errors import AlphaQError
from alphaq.runtime.kernels import layouts, torch_ref
from alphaq.runtime.kernels.layouts import GroupedExperts

# Triton reads TRITON_INTERPRET when it is first imported (its own @jit helpers such as tl.zeros),
# when each kernel module is imported and at every launch, so it is set before anything imports
# Triton and stays set. Run with TRITON_INTERPRET=0 on a CUDA machine to test on the GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

Q = GGMLQuantizationType
TYPES = layouts.SUPPORTED_TYPES
BLOCK_TYPES = tuple(t for t in TYPES if layouts.block_size(t) > 1)
U32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def ids_of(t: Q) -> str:
    return Q(t).name


@pytest.fixture(scope="module")
def tk(triton_device) -> SimpleNamespace:
    """The Triton kernel modules and the device they run on."""
    from alphaq.runtime.kernels import dequant, matmul, moe

    return SimpleNamespace(dequant=dequant, matmul=matmul, moe=moe, device=triton_device)


# ---------------------------------------------------------------------------------------------
# inputs


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Heavy-ish tailed rows with per-row scales, an outlier and an all-zero block (a quantiser input)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=5, size=(rows, cols)) * 0.02
    x *= rng.uniform(0.5, 2.0, size=(rows, 1))
    x[0, 7] = 0.5
    x[-1, :256] = 0.0
    return x.astype(np.float32)


def _quantised(t: Q, rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, bytes_per_row) uint8 written by libggml's quantiser, as llama.cpp writes them."""
    return torch.from_numpy(ggml.quantize(_weights(rows, cols, seed), t, imatrix="auto"))


def _random_blocks(t: Q, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Uniformly random block bytes (every bit pattern of quants and scales), finite f16 d/dmin."""
    rng = np.random.default_rng(seed)
    n_blocks = rows * cols // layouts.block_size(t)
    blocks = rng.integers(0, 256, size=(n_blocks, layouts.type_size(t)), dtype=np.uint8)
    for field in layouts.BLOCK_FIELDS[t]:
        if field.name in ("d", "dmin"):
            scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
            blocks[:, field.offset:field.offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return torch.from_numpy(blocks.reshape(rows, -1))


def _activations(tokens: int, cols: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((tokens, cols)).astype(np.float32))


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): an fp32 sum of n products, in any order and with or without FMA,
    is within gamma_n * sum |products| of the exact value (Higham, Accuracy and Stability of
    Numerical Algorithms, 2002, eq. 3.5)."""
    return n * U32 / (1 - n * U32)


def _summation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far two fp32 evaluations of x @ w.T that differ only in summation order can be apart:
    twice gamma_cols * |x| @ |w|.T. For 512 columns that is 6.1e-5 of sum |x w|, so a mis-decoded
    weight (an error of the order of |x w| itself) lands far outside it."""
    return 2 * _gamma(w.shape[1]) * (x.double().abs() @ w.double().abs().T)


def _assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - want.double()).abs()
    bad = ~(err <= bound)  # also catches NaN
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside the bound; worst error {err.max():.3g}, " \
                          f"bound there {bound.flatten()[err.flatten().argmax()]:.3g}"


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    int_dtype = {4: torch.int32, 2: torch.int16}[a.element_size()]
    differ = a.contiguous().view(int_dtype) != b.contiguous().view(int_dtype)
    assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} values differ in their bits"


# ---------------------------------------------------------------------------------------------
# layouts and the reference (no Triton needed)


@pytest.mark.parametrize("t", TYPES, ids=ids_of)
def test_block_fields_tile_each_block_exactly(t):
    fields = layouts.BLOCK_FIELDS[t]
    end = 0
    for field in fields:
        assert field.offset == end and field.size > 0
        end += field.size
    assert end == layouts.type_size(t)  # GGML_QUANT_SIZES, i.e. sizeof(block_*) in ggml-common.h


def test_lookup_tables_come_from_gguf_py():
    grid = layouts.lookup_table(Q.IQ1_S)
    assert grid.shape == (2048 * 8,) and set(np.unique(grid)) == {-1.0, 0.0, 1.0}
    levels = layouts.lookup_table(Q.IQ4_NL)
    assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
    assert layouts.lookup_table(Q.Q4_K) is None


def test_unsupported_type_is_a_user_error():
    with pytest.raises(AlphaQError, match="supported types: IQ1_S"):
        layouts.check_type(Q.Q5_K)
    with pytest.raises(AlphaQError, match="not a multiple"):
        layouts.row_bytes(Q.Q4_K, 100)


def _experts(types: list[Q], rows: int, cols: int, seed: int) -> GroupedExperts:
    return GroupedExperts.from_experts(types, [_quantised(t, rows, cols, seed + e) for e, t in enumerate(types)])


def test_grouped_experts_format():
    experts = _experts([Q.Q4_K, Q.IQ1_S, Q.Q4_0, Q.Q4_K, Q.IQ1_S], rows=3, cols=256, seed=0)
    assert experts.qtypes == (Q.Q4_K, Q.IQ1_S, Q.Q4_0)
    assert experts.slot_map.tolist() == [[0, -1, -1, 1, -1], [-1, 0, -1, -1, 1], [-1, -1, 0, -1, -1]]
    assert [tuple(w.shape) for w in experts.weights] == [(2, 3, 144), (2, 3, 50), (1, 3, 144)]
    assert (experts.n_expert, experts.rows, experts.cols) == (5, 3, 256)
    t, data = experts.expert(3)
    assert t == Q.Q4_K and torch.equal(data, experts.weights[0][1])
    two_groups = experts.slot_map.clone()
    two_groups[1, 0] = 2
    with pytest.raises(AlphaQError, match="exactly one type group"):
        GroupedExperts(experts.qtypes, experts.weights, two_groups)
    uniform = _experts([Q.Q6_K] * 3, rows=3, cols=256, seed=0)
    same = GroupedExperts.uniform(Q.Q6_K, uniform.weights[0])
    assert same.qtypes == (Q.Q6_K,) and torch.equal(same.slot_map, uniform.slot_map)
    assert uniform.slot_map.tolist() == [[0, 1, 2]]
    swapped = experts.slot_map.clone()
    swapped[0, 0], swapped[0, 3] = 1, 0
    with pytest.raises(AlphaQError, match="expert order"):
        GroupedExperts(experts.qtypes, experts.weights, swapped)


def test_torch_ref_moe_is_the_dense_mixture():
    """The oracle itself: torch_ref.moe == sum_j weight * (dense dequantised expert) @ x, in float64."""
    types = [Q.Q2_K, Q.Q6_K, Q.Q2_K, Q.Q8_0]
    experts = _experts(types, rows=6, cols=256, seed=1)
    dense = torch.stack([torch.from_numpy(gguf_dequantize(experts.expert(e)[1].numpy(), t)) for e, t in enumerate(types)])
    x = _activations(3, 256, seed=2)
    ids = torch.tensor([[0, 3], [1, 2], [3, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    want = torch.einsum("tkrc,tc,tk->tr", dense[ids].double(), x.double(), weights.double())
    got = torch_ref.moe(x, ids, weights, experts)
    # each expert output is within gamma_256 * |W||x| of exact; the weighted sum of k=2 adds gamma_2
    per_pair = torch.einsum("tkrc,tc->tkr", dense[ids].double().abs(), x.double().abs())
    outputs = torch.einsum("tkrc,tc->tkr", dense[ids].double(), x.double()).abs()
    bound = torch.einsum("tkr,tk->tr", _gamma(256) * per_pair + _gamma(2) * (outputs + per_pair * _gamma(256)),
                         weights.double().abs())
    assert got.shape == (3, 6) and got.dtype == torch.float32
    _assert_within(got, want, bound)
    with pytest.raises(AlphaQError, match=r"expert ids must lie in \[0, 4\)"):
        torch_ref.moe(x, ids + 1, weights, experts)


# ---------------------------------------------------------------------------------------------
# Triton dequantisation: bit for bit gguf-py


@pytest.mark.parametrize("t", TYPES, ids=ids_of)
def test_dequantize_quantised_weights_bit_exact(tk, t):
    data = _quantised(t, rows=4, cols=512, seed=3)
    want = torch.from_numpy(gguf_dequantize(data.numpy(), t))
    _bit_equal(tk.dequant.dequantize(data.to(tk.device), t).cpu(), want)


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=ids_of)
def test_dequantize_random_blocks_bit_exact(tk, t):
    """Random bytes reach every quant, scale and grid index, not only what a quantiser writes."""
    data = _random_blocks(t, rows=3, cols=512, seed=4)
    want = torch.from_numpy(gguf_dequantize(data.numpy(), t))
    _bit_equal(tk.dequant.dequantize(data.to(tk.device), t).cpu(), want)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t", [Q.IQ1_S, Q.Q4_K, Q.Q8_0, Q.BF16], ids=ids_of)
def test_dequantize_to_half_rounds_like_torch(tk, t, out_dtype):
    """fp16/bf16 outputs are gguf-py's fp32 values rounded to nearest even, as torch's .to() does."""
    data = _random_blocks(t, rows=2, cols=512, seed=5) if t != Q.BF16 else _quantised(t, rows=2, cols=512, seed=5)
    want = torch.from_numpy(gguf_dequantize(data.numpy(), t)).to(out_dtype)
    _bit_equal(tk.dequant.dequantize(data.to(tk.device), t, out_dtype=out_dtype).cpu(), want)


def test_bf16_output_rounds_ties_to_even_and_keeps_specials(tk):
    """The integer rounding in alphaq.runtime.kernels.dequant.to_output on the cases that tell rounding modes apart."""
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 3.3961e38, -3.3961e38, np.inf,
                       -np.inf, 0.0, -0.0, 1e-40, -1e-40, np.nan, -np.nan] * 4, dtype=np.float32)
    data = torch.from_numpy(values.view(np.uint8).reshape(4, -1))
    got = tk.dequant.dequantize(data.to(tk.device), Q.F32, out_dtype=torch.bfloat16).cpu().flatten()
    want = torch.from_numpy(values).to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)  # NaN bit patterns are implementation-defined
    _bit_equal(got[~nan], want[~nan])


def test_dequantize_keeps_leading_dims(tk):
    data = torch.stack([_quantised(Q.Q3_K, rows=2, cols=256, seed=s) for s in (6, 7)])  # (2 experts, 2 rows, 110)
    got = tk.dequant.dequantize(data.to(tk.device), Q.Q3_K).cpu()
    assert got.shape == (2, 2, 256)
    _bit_equal(got, torch.from_numpy(gguf_dequantize(data.numpy(), Q.Q3_K)))


# ---------------------------------------------------------------------------------------------
# fused GEMV / GEMM: the reference up to fp32 summation order


@pytest.mark.parametrize("t", TYPES, ids=ids_of)
def test_gemv_matches_reference(tk, t):
    data = _quantised(t, rows=20, cols=512, seed=8)
    x = _activations(1, 512, seed=9)[0]
    # two row tiles (the second partial) and four column tiles
    got = tk.matmul.gemv(x.to(tk.device), data.to(tk.device), t, block_rows=16, block_cols=128).cpu()
    assert got.shape == (20,) and got.dtype == torch.float32
    w = torch_ref.dequantize(data, t)
    _assert_within(got, torch_ref.linear(x, data, t), _summation_bound(x[None], w)[0])


@pytest.mark.parametrize("t", TYPES, ids=ids_of)
def test_gemm_matches_reference(tk, t):
    data = _quantised(t, rows=20, cols=512, seed=10)
    x = _activations(3, 512, seed=11)
    got = tk.matmul.gemm(x.to(tk.device), data.to(tk.device), t, block_tokens=16, block_rows=16, block_cols=64).cpu()
    assert got.shape == (3, 20) and got.dtype == torch.float32
    w = torch_ref.dequantize(data, t)
    _assert_within(got, torch_ref.linear(x, data, t), _summation_bound(x, w))


@pytest.mark.parametrize("op", ["gemv", "gemm"])
def test_bf16_activations(tk, op):
    """bf16 in and out: fp32 inside, so the only extra error is rounding each result to bf16."""
    t = Q.Q4_K
    data = _quantised(t, rows=20, cols=512, seed=12)
    x = _activations(3, 512, seed=13).bfloat16()
    got = getattr(tk.matmul, op)(x.to(tk.device), data.to(tk.device), t).cpu()
    want = torch_ref.linear(x, data, t)
    assert got.dtype == torch.bfloat16
    bound = _summation_bound(x.float(), torch_ref.dequantize(data, t)) + U_BF16 * (got.double().abs() + want.double().abs())
    _assert_within(got, want, bound)


def test_linear_picks_gemv_for_one_token_and_gemm_otherwise(tk):
    t = Q.Q6_K
    data = _quantised(t, rows=8, cols=256, seed=14).to(tk.device)
    x = _activations(4, 256, seed=15).to(tk.device)
    torch.testing.assert_close(tk.matmul.linear(x[:1], data, t), tk.matmul.gemv(x[:1], data, t), rtol=0, atol=0)
    batched = tk.matmul.linear(x.reshape(2, 2, 256), data, t)
    assert batched.shape == (2, 2, 8)
    torch.testing.assert_close(batched.reshape(4, 8), tk.matmul.gemm(x, data, t), rtol=0, atol=0)
    with pytest.raises(AlphaQError, match="256 columns"):
        tk.matmul.gemv(x[0, :128], data, t)


# ---------------------------------------------------------------------------------------------
# grouped MoE


def _poison(experts: GroupedExperts, unused: list[int]) -> None:
    """Make every block of the `unused` experts decode to NaN (f16 NaN scale), in place.

    A kernel that read an expert no token chose, or the wrong slot of a group, returns NaN."""
    for e in unused:
        t, data = experts.expert(e)
        off = layouts.field_offset(t, "d")
        blocks = data.view(data.shape[0], -1, layouts.type_size(t))
        blocks[:, :, off:off + 2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # 0x7E00: f16 quiet NaN


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("types", [
    [Q.Q3_K] * 4,  # G = 1: a uniform projection
    [Q.Q4_K, Q.IQ1_S, Q.Q4_0, Q.Q4_K, Q.IQ1_S, Q.Q4_0, Q.Q4_K, Q.IQ1_S],  # G = 3, block sizes 256 and 32
], ids=["G1", "G3"])
def test_grouped_moe_matches_a_loop_over_experts(tk, types, ids_dtype):
    n_expert, n_tokens, top_k, rows, cols = len(types), 5, 2, 6, 512
    experts = _experts(types, rows=rows, cols=cols, seed=16)
    assert len(experts.qtypes) == len(set(types))
    rng = np.random.default_rng(17)
    chosen_from = n_expert - 2  # the last two experts are never chosen, and poisoned
    ids = torch.from_numpy(np.stack([rng.choice(chosen_from, top_k, replace=False) for _ in range(n_tokens)]))
    ids = ids.to(ids_dtype)
    _poison(experts, list(range(chosen_from, n_expert)))
    x = _activations(n_tokens, cols, seed=18)
    router = torch.from_numpy(rng.dirichlet(np.ones(top_k), size=n_tokens).astype(np.float32))

    on_device = GroupedExperts(experts.qtypes, tuple(w.to(tk.device) for w in experts.weights),
                               experts.slot_map.to(tk.device))
    got = tk.moe.expert_outputs(x.to(tk.device), ids.to(tk.device), on_device).cpu()
    want = torch_ref.expert_outputs(x, ids, experts)  # loops over the chosen experts
    assert got.shape == (n_tokens, top_k, rows)
    dense = {e: torch_ref.dequantize(experts.expert(e)[1], experts.expert(e)[0]) for e in torch.unique(ids).tolist()}
    per_pair = torch.stack([torch.stack([_summation_bound(x[t:t + 1], dense[int(e)])[0] for e in ids[t]])
                            for t in range(n_tokens)])  # (T, k, rows)
    _assert_within(got, want, per_pair)

    mixed = tk.moe.moe(x.to(tk.device), ids.to(tk.device), router.to(tk.device), on_device).cpu()
    want_mixed = torch_ref.moe(x, ids, router, experts)
    # the per-pair bound carried through the weighted sum, plus that sum's own fp32 rounding in each
    # (gamma_k of sum |router * output|, with |got| <= |want| + per_pair)
    slack = per_pair * (1 + _gamma(top_k)) + 2 * _gamma(top_k) * want.double().abs()
    mixed_bound = torch.einsum("tkr,tk->tr", slack, router.double())
    _assert_within(mixed, want_mixed, mixed_bound)


def test_grouped_moe_rejects_bad_routing(tk):
    experts = _experts([Q.Q2_K, Q.Q8_0], rows=2, cols=256, seed=19)
    x = _activations(2, 256, seed=20)
    with pytest.raises(AlphaQError, match="expert ids"):
        tk.moe.expert_outputs(x, torch.tensor([[0], [2]]), experts)
    with pytest.raises(AlphaQError, match="x must be"):
        tk.moe.expert_outputs(x[:, :128], torch.tensor([[0], [1]]), experts)

"""alphaq.gguf.qtypes against the real references: ggml's own sizes (ctypes) and llama.cpp's quantiser."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from alphaq.gguf import ggml

from alphaq.gguf import qtypes
from alphaq.errors import AlphaQError


def test_resolve_type_accepts_any_case_and_enum():
    assert qtypes.resolve_type("q3_k") is T.Q3_K
    assert qtypes.resolve_type("IQ1_S") is T.IQ1_S
    assert qtypes.resolve_type(" Q4_K ") is T.Q4_K
    assert qtypes.resolve_type(T.Q6_K) is T.Q6_K


def test_unknown_type_lists_allowed_names():
    with pytest.raises(AlphaQError) as e:
        qtypes.resolve_type("Q3_KM")
    msg = str(e.value)
    assert "'Q3_KM'" in msg
    for name in ("IQ1_S", "Q2_K", "Q3_K", "Q4_K", "Q8_0"):
        assert name in msg
    with pytest.raises(AlphaQError):
        qtypes.resolve_type("Q8_K")  # exists in ggml, but only as a dot-product helper type


def test_resolve_types_sorts_and_rejects_duplicates():
    assert qtypes.resolve_types(["Q4_K", "iq1_s", "Q2_K"]) == (T.IQ1_S, T.Q2_K, T.Q4_K)
    with pytest.raises(AlphaQError):
        qtypes.resolve_types(["Q4_K", "q4_k"])
    with pytest.raises(AlphaQError):
        qtypes.resolve_types([])


def test_default_candidates_have_the_paper_bits():
    assert [qtypes.nominal_bits(qtypes.resolve_type(n)) for n in qtypes.DEFAULT_CANDIDATES] == [1, 2, 3, 4]
    assert qtypes.nominal_bits(T.IQ2_XXS) == 2
    assert qtypes.nominal_bits(T.Q5_K) == 5
    assert qtypes.nominal_bits(T.Q6_K) == 6
    assert qtypes.nominal_bits(T.Q8_0) == 8


@pytest.mark.parametrize("t", sorted(qtypes.NOMINAL_BITS, key=lambda t: t.value), ids=lambda t: t.name)
def test_true_bpw_matches_ggml_and_nominal_bits_are_its_floor(t):
    lib = ggml.libggml()
    assert qtypes.true_bpw(t) == lib.ggml_type_size(int(t)) * 8 / lib.ggml_blck_size(int(t))
    blck, size = GGML_QUANT_SIZES[t]
    assert qtypes.true_bpw(t) == size * 8 / blck
    # the nominal width is what the type stores per weight before scales/metadata
    assert qtypes.nominal_bits(t) <= qtypes.true_bpw(t) <= qtypes.nominal_bits(t) + 1


@pytest.mark.parametrize("t", sorted(qtypes.NOMINAL_BITS, key=lambda t: t.value), ids=lambda t: t.name)
def test_tensor_bytes_match_ggml_row_size(t):
    blck = GGML_QUANT_SIZES[t][0]
    for cols in (blck, 3 * blck, 2048 if 2048 % blck == 0 else 8 * blck):
        for shape in ((cols,), (7, cols), (3, 5, cols)):
            rows = int(np.prod(shape[:-1]))
            assert qtypes.tensor_bytes(t, shape) == rows * ggml.row_size(t, cols)


def test_tensor_bytes_refuses_a_row_the_block_does_not_divide():
    with pytest.raises(AlphaQError):
        qtypes.tensor_bytes(T.Q4_K, (4, 160))
    assert qtypes.tensor_bytes(qtypes.effective_type(T.Q4_K, 160), (4, 160)) == 4 * ggml.row_size(T.Q5_0, 160)


def test_padded():
    assert qtypes.padded(0, 32) == 0
    assert qtypes.padded(1, 32) == 32
    assert qtypes.padded(64, 32) == 64
    assert qtypes.padded(65, 32) == 96


def test_effective_type_rules():
    # divisible rows keep the type
    assert qtypes.effective_type(T.Q3_K, 2048) is T.Q3_K
    # the documented table
    assert qtypes.effective_type(T.IQ1_S, 1408 + 32) is T.IQ4_NL
    assert qtypes.effective_type(T.Q2_K, 160) is T.Q4_0
    assert qtypes.effective_type(T.Q3_K, 160) is T.Q4_0
    assert qtypes.effective_type(T.Q4_K, 160) is T.Q5_0
    assert qtypes.effective_type(T.Q5_K, 160) is T.Q5_1
    assert qtypes.effective_type(T.Q6_K, 160) is T.Q8_0
    # when even the block-32 fallback does not divide: F16
    assert qtypes.effective_type(T.Q4_K, 48) is T.F16
    assert qtypes.effective_type(T.Q8_0, 48) is T.F16
    assert qtypes.effective_type(T.F16, 7) is T.F16


# ---------------------------------------------------------------------------------------------
# pin the fallback table to llama.cpp itself: quantise a GGUF whose tensors have awkward row
# lengths with a per-tensor override to every type, and read back what llama.cpp wrote
# ---------------------------------------------------------------------------------------------

ROW_LENGTHS = (160, 48, 512)  # not /256 but /32; not /32; divisible by everything
PINNED = [
    t
    for t in sorted(qtypes.NOMINAL_BITS, key=lambda t: t.value)
    if t not in (T.F32, T.F16, T.BF16) and t.name != "Q1_0"  # Q1_0: llama.cpp throws (no fallback)
]


def _write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(160)
    w.add_block_count(1)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_quantize(src, dst, overrides: dict[str, T], imatrix: dict[str, int]) -> None:
    """llama_model_quantize with exact-name overrides and all-ones imatrix entries (name -> size)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q4_K_M
    params.nthread = 1
    ov = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    keep = []
    for i, (name, t) in enumerate(overrides.items()):
        pat = ("^" + name.replace(".", r"\.") + "$").encode()
        keep.append(pat)
        ov[i].pattern = pat
        ov[i].type = int(t)
    ov[len(overrides)].pattern = None
    params.tt_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, size) in enumerate(imatrix.items()):
        ones = np.ones(size, dtype=np.float32)
        keep.append(ones)
        im[i].name = name.encode()
        keep.append(im[i].name)
        im[i].data = ones.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        im[i].size = size
    im[len(imatrix)].name = None
    params.imatrix = ctypes.cast(im, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, "llama_model_quantize failed"


def test_fallback_and_sizes_match_llama_cpp(tmp_path):
    rng = np.random.default_rng(0)
    tensors, overrides, imatrix, expect = {}, {}, {}, {}
    for t in PINNED:
        for cols in ROW_LENGTHS:
            name = f"blk.0.pin_{t.name.lower()}_{cols}.weight"
            tensors[name] = (rng.standard_normal((8, cols)) * 0.02).astype(np.float32)
            overrides[name] = t
            eff = qtypes.effective_type(t, cols)
            expect[name] = (eff, qtypes.tensor_bytes(eff, (8, cols)))
            if ggml.needs_imatrix(eff):
                imatrix[name] = cols
    src, dst = tmp_path / "pin.gguf", tmp_path / "pin-q.gguf"
    _write_gguf(src, tensors)
    _llama_quantize(src, dst, overrides, imatrix)
    got = {t.name: (T(t.tensor_type), int(t.n_bytes)) for t in gguf.GGUFReader(dst).tensors}
    assert got == expect
    # and the interesting cases really happened
    assert got["blk.0.pin_q3_k_160.weight"][0] is T.Q4_0
    assert got["blk.0.pin_iq1_s_160.weight"][0] is T.IQ4_NL
    assert got["blk.0.pin_q6_k_48.weight"][0] is T.F16

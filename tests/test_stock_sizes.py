"""The stock-mix sizes (llama.cpp's dry run + our byte accounting, the summary's and --like's)
against the files llama.cpp's quantiser really writes for those mixes."""

from __future__ import annotations

import pytest

from alphaq.cli import main as cli_main
from alphaq.gguf.stock import stock_size
from alphaq.gguf.io import file_header, quantised_header_bytes, read_field, read_tensors
from alphaq.gguf.quantize import IMATRIX_MIXES, ones_imatrix, quantize_stock

_ALIGNMENT = 32  # the tensor data's alignment in both files
MODEL = "qwen2moe"  # its (1, n) shared-expert routers lose a dimension in llama.cpp's header


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ2_XXS"])
def test_predicted_stock_size_equals_the_written_file(mix, float_ggufs, tmp_path):
    model = float_ggufs[MODEL]
    out = tmp_path / f"{mix}.gguf"
    imatrix = ones_imatrix(model, [t.name for t in read_tensors(model) if len(t.shape) >= 2]) \
        if mix in IMATRIX_MIXES else None
    quantize_stock(model, out, mix, imatrix=imatrix)
    assert quantised_header_bytes(model) == file_header(out).data_start
    assert stock_size(model, mix, _ALIGNMENT) == out.stat().st_size


def test_like_is_no_larger_than_llama_cpps_own_file(float_ggufs, tmp_path):
    """--like MIX: the budget is the size of the file llama.cpp writes for MIX, and what alphaq
    adds to its own file (its keys, --override-kv) comes out of it, never on top."""
    model = float_ggufs[MODEL]
    stock, out = tmp_path / "stock.gguf", tmp_path / "alphaq.gguf"
    quantize_stock(model, stock, "Q4_K_M")
    name = "x" * 127  # the longest --override-kv string
    assert cli_main(["convert", str(model), "-o", str(out), "--like", "Q4_K_M", "--fast", "--no-progress",
                     "--override-kv", f"general.description=str:{name}"]) == 0
    assert read_field(out, "alphaq.budget") == stock.stat().st_size
    assert read_field(out, "general.description") == name
    assert out.stat().st_size <= stock.stat().st_size

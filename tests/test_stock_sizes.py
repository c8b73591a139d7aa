"""The summary's stock-mix sizes (llama.cpp's dry run + our byte accounting) against the files
llama.cpp's quantiser really writes for those mixes."""

from __future__ import annotations

import pytest

from alphaq.convert import stock_size
from alphaq.gguf_io import header_bytes, read_tensors
from alphaq.quantize import IMATRIX_MIXES, ones_imatrix, quantize_stock

# the prediction counts the float model's header; the written header differs by llama.cpp's
# quantisation keys, and the tensor data starts at the next multiple of the alignment (32)
_ALIGNMENT = 32


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ2_XXS"])
def test_predicted_stock_size_equals_the_written_file(mix, float_ggufs, tmp_path):
    model = float_ggufs["qwen2moe"]
    out = tmp_path / f"{mix}.gguf"
    imatrix = ones_imatrix(model, [t.name for t in read_tensors(model) if len(t.shape) >= 2]) \
        if mix in IMATRIX_MIXES else None
    quantize_stock(model, out, mix, imatrix=imatrix)
    predicted = stock_size(model, mix, header_bytes(model), _ALIGNMENT)
    written = out.stat().st_size
    assert written <= predicted <= written + _ALIGNMENT, (mix, predicted, written)  # measured: 32 B over

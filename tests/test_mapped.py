"""The forward stages' memory-mapped model (alphaq.runtime.mapped): the same numbers as llama.cpp's malloc'd
copy, weights written copy-on-write and reverted to the file, and no private copy of the model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from alphaq.runtime import mapped
from alphaq.damage import Swap
from alphaq.runtime.forward import Session

pytestmark = pytest.mark.skipif(not mapped.available(), reason="copy-on-write mapping needs Linux /proc/self/maps")

WINDOW = list(range(1, 60))


def _run(model, is_mapped: bool) -> tuple[list[np.ndarray], list[str]]:
    """Logits before, during and after two swaps (an expert tensor, the embedding), and the page
    permissions of the expert tensor at those moments."""
    logits, perms = [], []
    with Session(model, 64, mapped=is_mapped) as s:
        experts, embd = s.weights["blk.0.ffn_down_exps.weight"], s.weights["token_embd.weight"]
        assert all((b.mapper is not None) == is_mapped for b in s.weights.values())
        # a mapped weight's pages are read-only outside a Swap: numpy refuses the write
        # instead of the process dying on it
        assert experts.view().flags.writeable == (not is_mapped)
        logits.append(s.logits(WINDOW))
        perms.append(mapped.permissions(experts.address))
        with Swap(experts, GGMLQuantizationType.Q2_K, None):
            logits.append(s.logits(WINDOW))
            perms.append(mapped.permissions(experts.address))
        logits.append(s.logits(WINDOW))
        perms.append(mapped.permissions(experts.address))
        with Swap(embd, GGMLQuantizationType.IQ2_XXS, None):
            logits.append(s.logits(WINDOW))
        logits.append(s.logits(WINDOW))
    return logits, perms


def test_mapped_session_matches_the_copy_and_never_writes_the_file(float_ggufs):
    model = float_ggufs["mixtral"]
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    copied, perms_copied = _run(model, False)
    mapped_, perms = _run(model, True)
    for a, b in zip(copied, mapped_):
        assert np.array_equal(a, b)  # bit-identical: the same bytes are computed with
    assert not np.array_equal(mapped_[0], mapped_[1]) and not np.array_equal(mapped_[0], mapped_[3])
    assert np.array_equal(mapped_[0], mapped_[2]) and np.array_equal(mapped_[0], mapped_[4])  # reverted
    assert perms == ["r--s", "rw-p", "r--s"]  # shared file pages, private while written, shared again
    assert perms_copied == [None] * 3  # the copy lives in anonymous memory
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest


def _anonymous_bytes(lo: int, hi: int) -> int:
    """Anonymous (private, not file) bytes of this process's mappings that overlap [lo, hi), from
    the kernel's /proc/self/smaps."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                overlaps = start < hi and lo < end
            elif overlaps and head == "Anonymous:":
                total += int(line.split()[1]) * 1024
    return total


def test_mapped_weights_cost_no_private_memory_except_while_written(float_ggufs):
    with Session(float_ggufs["qwen3moe"], 64, mapped=True) as s:
        bufs = list(s.weights.values())
        lo, hi = min(b.address for b in bufs), max(b.address + b.n_bytes for b in bufs)
        assert sum(b.n_bytes for b in bufs) > 0.9 * (hi - lo)  # the span is the weights
        before = _anonymous_bytes(lo, hi)
        experts = s.weights["blk.1.ffn_gate_exps.weight"]
        with Swap(experts, GGMLQuantizationType.Q3_K, None):
            written = _anonymous_bytes(lo, hi)
        after = _anonymous_bytes(lo, hi)
    assert before == 0 and after == 0
    assert experts.n_bytes <= written <= experts.n_bytes + 2 * mapped.PAGE  # one weight's pages, copied on write

    with Session(float_ggufs["qwen3moe"], 64, mapped=False) as s:
        bufs = list(s.weights.values())
        lo, hi = min(b.address for b in bufs), max(b.address + b.n_bytes for b in bufs)
        assert _anonymous_bytes(lo, hi) >= sum(b.n_bytes for b in bufs)  # llama.cpp's malloc'd copy


def test_a_model_llama_cpp_cannot_load_is_refused_with_its_reason(tmp_path):
    """llama.cpp logs why a load failed and only returns NULL; the one-line error carries its reason."""
    import gguf

    from alphaq.errors import AlphaQError

    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(path, arch="llama")  # no hyperparameters, no vocabulary
    w.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(AlphaQError) as err:
        Session(path, 16)
    msg = str(err.value)
    assert msg.startswith(f"llama.cpp cannot load {path}: ") and "\n" not in msg
    assert "key not found" in msg and "gave no reason" not in msg

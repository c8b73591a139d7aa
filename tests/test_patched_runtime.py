"""Expert granularity on llama.cpp itself: the patched ggml op, the patched model loader, and
stock llama.cpp's refusal of expert-granular files.

The patched llama-cpp-python wheel is built once per patch series (convert/patched.py, cached in
~/.cache/alphaq/patched) and run in child processes (alphaq/runtime/isolated.py), next to the stock one.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from alphaq.gguf import ggml

from alphaq.runtime import isolated as runtime

from alphaq.runtime import torch_ref
from alphaq.pipeline.convert import ConvertConfig, run_convert
from alphaq.gguf.expert import ExpertGroups, read_layouts, write_expert_gguf
from alphaq.allocate.plan import PlanConfig
from alphaq.gguf.quantize import quantize_gguf

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
PROSE = FIXTURES / "heldout" / "prose.txt"
Q = GGMLQuantizationType
EXIT_SKIP = 77  # tests/c/harness.h: the backend is missing or does not support the op

# every type a plan can write for an expert: candidates, their shape fallbacks, and Q8_0
OP_TYPES = [Q.IQ1_S, Q.IQ1_M, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q5_0, Q.IQ4_NL, Q.Q8_0]


def _build_c(name: str, patched_site: Path, tmp_path_factory) -> Path:
    """tests/c/NAME.c linked against the patched libggml, with the patched ggml.h."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (needed to build llama-cpp-python anyway)")
    lib = patched_site / "llama_cpp" / "lib"
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run([cc, "-O1", "-o", str(exe), str(Path(__file__).parent / "c" / f"{name}.c"),
                    f"-I{patched_site / 'include'}", f"-L{lib}", f"-Wl,-rpath,{lib}",
                    "-lggml", "-lggml-base", "-lggml-cpu", "-lm"], check=True)
    return exe


@pytest.fixture(scope="session")
def mmid_binary(patched_site, tmp_path_factory) -> Path:
    """tests/c/mul_mat_id_masked.c linked against the patched libggml."""
    return _build_c("mul_mat_id_masked", patched_site, tmp_path_factory)


def _run_op(exe: Path, tmp: Path, head: bytes, weights: list[np.ndarray], b: np.ndarray, ids: np.ndarray,
            ne01: int, backend: str = "CPU") -> np.ndarray:
    """Write an op program's input (header fields, weights, b, ids; tests/c/*.c), run it on a ggml
    backend, read dst (n_tokens, n_used, ne01). A backend the build lacks skips the test."""
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        f.write(head)
        for w in weights:
            f.write(np.ascontiguousarray(w).tobytes())
        f.write(np.ascontiguousarray(b, dtype=np.float32).tobytes())
        f.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    proc = subprocess.run([str(exe), str(src), str(dst), backend], capture_output=True, text=True)
    if proc.returncode == EXIT_SKIP:
        pytest.skip(f"{proc.stderr.strip()} (a CUDA machine builds one: python -m convert.patched --cuda)")
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(dst, dtype=np.float32).reshape(b.shape[0], ids.shape[1], ne01)


def _mul_mat_id(exe: Path, tmp: Path, wq: np.ndarray, qtype, shape, b: np.ndarray, ids: np.ndarray,
                backend: str = "CPU") -> np.ndarray:
    n_as, ne01, ne00 = shape
    n_tokens, ne11, _ = b.shape
    head = struct.pack("8i", int(qtype), ne00, ne01, n_as, ne11, ids.shape[1], n_tokens, 2)
    return _run_op(exe, tmp, head, [wq], b, ids, ne01, backend)


# CUDA0 runs where the patched build has CUDA (python -m convert.patched --cuda) and skips elsewhere
@pytest.mark.parametrize("backend", ["CPU", "CUDA0"])
@pytest.mark.parametrize("n_tokens", [7, 40], ids=["decode-batch", "prefill-batch"])
@pytest.mark.parametrize("ne11", [1, 2], ids=["broadcast-input", "per-slot-input"])
@pytest.mark.parametrize("qtype", OP_TYPES, ids=lambda t: t.name)
def test_masked_mul_mat_id_matches_numpy(qtype, ne11, n_tokens, backend, mmid_binary, tmp_path):
    """Patched ggml mul_mat_id with random ids including -1, against a numpy reference on gguf-py's
    dequantised weights. Both runs, with and without masks, must be close to the float reference:
    ggml quantises the activations (Q8_K / Q8_0 on the CPU, Q8_1 on CUDA) for its dot products,
    which costs < 2 % relative error on these shapes. Masked slots must be exactly 0 (dst starts as
    NaN). Unmasked slots must equal the unmasked run (same dot products, fewer of them):
    bit-identical on the CPU at 7 tokens; otherwise within 2e-3 of the largest output (measured: at
    40 tokens the CPU differs in the last bits for IQ1_M and Q6_K, up to 8e-5 relative on single
    outputs, because it picks its tiled kernels per expert by the rows routed to it
    (ggml-cpu/tiled, ggml_tiled_min_batch) and masking lowers that count; on an H200, IQ1_M's
    batched path, which rounds to fp16, by 1.1e-3 of the largest).
    Token 1 has every slot masked: a token with several masked slots broke CUDA's batched path for
    broadcast input (ggml-patches/0002). 7 tokens take CUDA's vector kernel (mmvq), 40 its batched
    ones (mmq, or dequantisation and cuBLAS)."""
    rng = np.random.default_rng(int(qtype) * 10 + ne11 + 1000 * (n_tokens != 7))
    n_as, ne01, ne00, n_used = 4, 16, 256, 2
    w = rng.standard_normal((n_as, ne01, ne00)).astype(np.float32)
    wq = np.stack([ggml.quantize(w[e], qtype) for e in range(n_as)])
    wd = dequantize(wq.reshape(n_as * ne01, -1), qtype).reshape(n_as, ne01, ne00)
    b = rng.standard_normal((n_tokens, ne11, ne00)).astype(np.float32)
    ids = np.stack([rng.permutation(n_as)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    masked = ids.copy()
    mask = rng.random(ids.shape) < 0.4
    mask[0, 0], mask[0, 1] = True, False  # at least one of each
    mask[1, :] = True  # a token with every slot masked
    masked[mask] = -1

    full = _mul_mat_id(mmid_binary, tmp_path, wq, qtype, w.shape, b, ids, backend)
    out = _mul_mat_id(mmid_binary, tmp_path, wq, qtype, w.shape, b, masked, backend)

    ref = np.einsum("tjnk,tjk->tjn", wd[ids], b[:, np.arange(n_used) % ne11])
    for name, got, keep in (("unmasked", full, ~np.zeros_like(mask)), ("masked", out, ~mask)):
        err = np.linalg.norm(got[keep] - ref[keep]) / np.linalg.norm(ref[keep])
        assert err < 0.02, f"{qtype.name}, {name} run: relative error {err:.4f}"
    assert np.all(out[mask] == 0.0)
    if backend == "CPU" and n_tokens == 7:
        np.testing.assert_array_equal(out[~mask], full[~mask])
    else:
        assert np.abs(out[~mask] - full[~mask]).max() <= 2e-3 * np.abs(full).max()


@pytest.fixture(scope="session")
def groups_binary(patched_site, tmp_path_factory) -> Path:
    """tests/c/mul_mat_id_groups.c linked against the patched libggml."""
    return _build_c("mul_mat_id_groups", patched_site, tmp_path_factory)


def _mul_mat_id_groups(exe: Path, tmp: Path, groups: list, expert_map: np.ndarray, shape,
                       b: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """groups: [(qtype, quantised weights (n_slots, rows, bytes))]; expert_map: (n_groups, n_expert)."""
    n_expert, ne01, ne00 = shape
    n_tokens, ne11, _ = b.shape
    n = len(groups)
    head = (struct.pack("8i", n, ne00, ne01, n_expert, ne11, ids.shape[1], n_tokens, 2)
            + struct.pack(f"{n}i", *(int(t) for t, _ in groups))
            + struct.pack(f"{n}i", *(w.shape[0] for _, w in groups))
            + np.ascontiguousarray(expert_map, dtype=np.int32).tobytes())
    return _run_op(exe, tmp, head, [w for _, w in groups], b, ids, ne01)


GROUP_TYPES = [(Q.Q3_K, Q.Q4_K), (Q.IQ1_S, Q.Q2_K, Q.Q4_0), (Q.Q2_K, Q.IQ4_NL, Q.Q5_K, Q.Q8_0)]


@pytest.mark.parametrize("n_tokens", [1, 9, 128], ids=["decode", "batch", "prefill"])
@pytest.mark.parametrize("ne11", [1, 2], ids=["broadcast-input", "per-slot-input"])
@pytest.mark.parametrize("types", GROUP_TYPES, ids=lambda ts: "+".join(t.name for t in ts))
def test_mul_mat_id_groups_matches_masked_sum(types, ne11, n_tokens, mmid_binary, groups_binary, tmp_path):
    """The fused op (ggml_mul_mat_id_groups, one node per projection on the CPU) against the
    decomposed form the other backends run: a sum over groups of masked mul_mat_id on the slot ids.
    Every output must be bit-identical (same dot products, and the sum adds exact zeros), every
    slot written (dst starts as NaN; a -1 id gives zeros), and close to a numpy reference on
    gguf-py's dequantised weights."""
    rng = np.random.default_rng(len(types) * 100 + ne11 * 10 + n_tokens)
    n_expert, ne01, ne00, n_used = 8, 16, 256, 2
    w = rng.standard_normal((n_expert, ne01, ne00)).astype(np.float32)
    owner = np.concatenate([np.arange(len(types)), rng.integers(0, len(types), n_expert - len(types))])
    rng.shuffle(owner)
    expert_map = np.full((len(types), n_expert), -1, dtype=np.int32)
    groups, wd = [], np.empty_like(w)
    for g, qtype in enumerate(types):
        members = np.flatnonzero(owner == g)
        expert_map[g, members] = np.arange(members.size)
        wq = np.stack([ggml.quantize(w[e], qtype) for e in members])
        groups.append((qtype, wq))
        wd[members] = dequantize(wq.reshape(members.size * ne01, -1), qtype).reshape(members.size, ne01, ne00)
    b = rng.standard_normal((n_tokens, ne11, ne00)).astype(np.float32)
    ids = np.stack([rng.permutation(n_expert)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    if n_tokens > 1:
        ids[1, 0] = -1  # a masked slot of the merged tensor

    fused = _mul_mat_id_groups(groups_binary, tmp_path, groups, expert_map, w.shape, b, ids)
    summed = np.zeros_like(fused)
    for g, (qtype, wq) in enumerate(groups):
        slots = np.where(ids >= 0, expert_map[g][ids], -1)
        summed += _mul_mat_id(mmid_binary, tmp_path, wq, qtype, wq.shape[:2] + (ne00,), b, slots)

    assert not np.isnan(fused).any()
    np.testing.assert_array_equal(fused, summed)
    live = ids >= 0
    assert np.all(fused[~live] == 0.0)
    ref = np.einsum("tjnk,tjk->tjn", wd[np.maximum(ids, 0)], b[:, np.arange(n_used) % ne11])
    err = np.linalg.norm(fused[live] - ref[live]) / np.linalg.norm(ref[live])
    assert err < 0.05, f"{types}: relative error {err:.4f}"


# -- model level ---------------------------------------------------------------------------------

ARCHS = ["mixtral", "qwen2moe", "qwen3moe", "deepseek2"]
BUDGETS = [2.5, 3.0, 3.5]


@pytest.fixture(scope="module")
def expert_files(float_ggufs, tmp_path_factory) -> dict[tuple[str, float], Path]:
    out = tmp_path_factory.mktemp("expert")
    files = {}
    for arch in ARCHS:
        for budget in BUDGETS:
            path = out / f"{arch}-{budget}.gguf"
            run_convert(ConvertConfig(model=float_ggufs[arch], output=path,
                                      plan=PlanConfig(budget=budget, granularity="expert"),
                                      nthread=2, compare_stock=False, progress=False))
            files[(arch, budget)] = path
    return files


def test_every_architecture_gets_grouped_tensors(expert_files):
    """The model-level checks below are not vacuous: each architecture has at least one budget
    whose plan mixes types inside an expert tensor."""
    for arch in ARCHS:
        grouped = [b for b in BUDGETS if read_layouts(expert_files[(arch, b)])]
        assert grouped, f"{arch}: no budget produced a grouped projection"


def test_file_layout_matches_the_plan(expert_files):
    """Every expert is stored in the type its plan gave it: grouped projections through their
    groups and map, uniform ones as the stock 3-D tensor; and the map is what the format says."""
    from alphaq.pipeline.convert import load_plan_from_gguf
    from alphaq.gguf.io import read_tensors

    for path in expert_files.values():
        planned = {(it["tensor"], it["expert"]): it["type"] for it in load_plan_from_gguf(path)["items"]}
        layouts = read_layouts(path)
        written = {t.name: t for t in read_tensors(path)}
        for (tensor, expert), qtype in planned.items():
            if tensor in layouts:
                assert tensor not in written
                assert layouts[tensor].type_of(expert).name == qtype
            else:
                assert written[tensor].type.name == qtype
        for lay in layouts.values():
            m = lay.map()
            assert sorted(m.max(axis=0) >= 0) == [True] * lay.n_expert  # each expert somewhere
            assert ((m >= 0).sum(axis=0) == 1).all()  # ... and only once
            assert [sorted(int(s) for s in row[row >= 0]) for row in m] == [list(range(len(e))) for e in lay.experts]
            assert list(lay.types) == sorted(lay.types, key=int) and len(set(lay.types)) == len(lay.types)


def test_stock_environment_explains_what_an_expert_file_needs(expert_files):
    """alphaq eval & co. on the stock runtime: a one-line error naming the patched runtime."""
    from alphaq.errors import AlphaQError
    from alphaq.evaluate.perplexity import load_llama

    path = next(p for p in expert_files.values() if read_layouts(p))
    with pytest.raises(AlphaQError, match="expert-granular and needs the patched llama.cpp"):
        load_llama(path, 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_llama_cpp_refuses_expert_files(arch, expert_files):
    """Unpatched llama.cpp must fail loudly (missing tensor), never load garbage."""
    path = next(p for (a, _), p in expert_files.items() if a == arch and read_layouts(p))
    proc = runtime.run(None, "load", path, check=False)
    assert proc.returncode != 0
    assert "ffn_" in proc.stderr and "not found" in proc.stderr, proc.stderr[-800:]


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_logits_match_torch_reference(arch, expert_files, float_ggufs, patched_site, tmp_path):
    """Patched llama.cpp on an expert-granular file vs the HF model holding the same dequantised
    weights (alphaq.runtime.torch_ref). Tolerance as for tensor granularity (tests/test_torch_ref.py):
    perplexity within 1 %, since llama.cpp quantises activations; plus ≥ 90 % top-1 agreement."""
    import torch

    for budget in BUDGETS:
        path = expert_files[(arch, budget)]
        lp = runtime.logprobs(patched_site, path, PROSE, 128, 2, tmp_path / "lp.npy")
        model = torch_ref.from_gguf(FIXTURES / arch, path)
        tokens = _window_tokens(float_ggufs[arch], 128, 2)
        first = 64
        nll_ll, nll_t, agree, n = 0.0, 0.0, 0, 0
        with torch.no_grad():
            for w, toks in enumerate(tokens):
                logits = model(input_ids=torch.tensor([toks])).logits[0].double()
                tl = torch.log_softmax(logits, -1).numpy()
                tgt = np.array(toks[first:])
                pos = np.arange(first - 1, len(toks) - 1)
                nll_ll -= lp[w][pos, tgt].sum()
                nll_t -= tl[pos, tgt].sum()
                agree += int((lp[w][pos].argmax(-1) == tl[pos].argmax(-1)).sum())
                n += len(pos)
        ppl_ll, ppl_t = np.exp(nll_ll / n), np.exp(nll_t / n)
        assert ppl_ll == pytest.approx(ppl_t, rel=0.01), (arch, budget)
        assert agree / n >= 0.9, (arch, budget, agree / n)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_files_on_cuda_match_the_cpu(arch, expert_files, float_ggufs, patched_site, tmp_path):
    """Every layer offloaded to CUDA (the masked mul_mat_id sum, patch 0002) against the same build
    on the CPU (the fused op, 0004), on every budget's expert-granular file: perplexity within 1 %
    and top-1 agreement >= 95 % on 2 x 128 held-out tokens. The two backends round activations
    differently (Q8_1 blocks of 32 on CUDA, Q8_K on the CPU), so the logits are close, not equal.
    Needs a CUDA build of the patched runtime and a GPU (skipped elsewhere)."""
    import torch

    from convert.patched import has_cuda

    if not has_cuda(patched_site):
        pytest.skip("the patched build has no CUDA backend (python -m convert.patched --cuda)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for budget in BUDGETS:
        path = expert_files[(arch, budget)]
        cpu = runtime.logprobs(patched_site, path, PROSE, 128, 2, tmp_path / "cpu.npy")
        gpu = runtime.logprobs(patched_site, path, PROSE, 128, 2, tmp_path / "gpu.npy", gpu_layers=-1)
        tokens = np.array(_window_tokens(float_ggufs[arch], 128, 2))
        first = 64
        nll = {k: -np.take_along_axis(lp[:, first - 1:-1], tokens[:, first:, None], -1).mean()
               for k, lp in (("cpu", cpu), ("gpu", gpu))}
        top1 = float((cpu[:, first - 1:-1].argmax(-1) == gpu[:, first - 1:-1].argmax(-1)).mean())
        print(f"{arch} {budget}: ppl cpu {np.exp(nll['cpu']):.4f} cuda {np.exp(nll['gpu']):.4f}, top-1 {top1:.3f}, "
              f"max |dlogp| {np.abs(cpu - gpu).max():.4f}")
        assert np.exp(nll["gpu"]) == pytest.approx(np.exp(nll["cpu"]), rel=0.01), (arch, budget)
        assert top1 >= 0.95, (arch, budget, top1)


def _window_tokens(float_gguf: Path, n_ctx: int, n_windows: int) -> list[list[int]]:
    """The token windows alphaq.evaluate.perplexity scores (BOS first); the float file has the same vocabulary."""
    import llama_cpp

    from alphaq.evaluate.perplexity import windows

    llm = llama_cpp.Llama(model_path=str(float_gguf), vocab_only=True, verbose=False)
    return windows(llm, PROSE.read_text(errors="replace"), n_ctx, n_windows)


# Q3_K runs on ggml's generic CPU path; Q4_K on x86 with AVX2 (and ARM) through the repacked
# ("extra" buffer) path, which the fused op calls per group as well
@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "masked-sum"])
@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.Q4_K], ids=lambda t: t.name)
def test_split_uniform_projection_gives_stock_logits(qtype, fused, float_ggufs, patched_site, tmp_path, monkeypatch):
    """A projection split into two groups of the *same* type must give exactly the stock file's
    logits, both through the fused op the CPU runs and through the sum of masked mul_mat_id the
    other backends run (LLAMA_EXPERT_GROUPS_NO_FUSE; masked slots add exact zeros); and the
    patched runtime must run the stock file exactly as the stock runtime does."""
    if fused:
        monkeypatch.delenv("LLAMA_EXPERT_GROUPS_NO_FUSE", raising=False)
    else:
        monkeypatch.setenv("LLAMA_EXPERT_GROUPS_NO_FUSE", "1")
    bf16 = float_ggufs["mixtral"]
    from alphaq.evaluate.baselines import FloatModel

    tensors = FloatModel.open(bf16).tensors
    types = {t.name: qtype for t in tensors if len(t.shape) >= 2 and "ffn_gate_inp" not in t.name}
    stock = tmp_path / "stock.gguf"
    quantize_gguf(bf16, stock, types, nthread=2)
    shape = next(t.shape for t in tensors if t.name == "blk.0.ffn_up_exps.weight")
    split = {n: ExpertGroups(n, shape, (qtype, qtype), ((0, 2, 5, 7), (1, 3, 4, 6)))
             for n in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight")}
    grouped = tmp_path / "split.gguf"
    write_expert_gguf(stock, bf16, split, {}, grouped)
    assert set(read_layouts(grouped)) == set(split)

    a = runtime.logprobs(patched_site, stock, PROSE, 128, 2, tmp_path / "a.npy")
    b = runtime.logprobs(patched_site, grouped, PROSE, 128, 2, tmp_path / "b.npy")
    c = runtime.logprobs(None, stock, PROSE, 128, 2, tmp_path / "c.npy")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_patched_generation(expert_files, patched_site):
    """Greedy generation from an expert-granular file through the patched llama-cpp-python."""
    path = next(p for p in expert_files.values() if read_layouts(p))
    first = runtime.generate(patched_site, path, "The module", 16)
    again = runtime.generate(patched_site, path, "The module", 16)
    assert "+alphaq." in first["version"]
    assert first["n_tokens"] >= 8 and first["text"].strip()
    assert first["text"] == again["text"]


def test_interleaved_speed_times_every_file_every_round(expert_files, float_ggufs, patched_site):
    """The benchmark child (scripts/bench_expert.py): a grouped and a stock file in one patched
    process, every round timing both; speeds are positive and finite."""
    grouped = next(p for p in expert_files.values() if read_layouts(p))
    arch = next(a for (a, _), p in expert_files.items() if p == grouped)
    r = runtime.interleaved_speed(patched_site, [grouped, float_ggufs[arch]], 16, 4, 3, 2)
    assert "+alphaq." in r["version"]
    for phase in ("prefill", "decode"):
        tps = np.array(r[phase])
        assert tps.shape == (2, 3) and np.all(np.isfinite(tps)) and np.all(tps > 0), (phase, tps)


def test_alphaq_eval_patched_runs_expert_files(expert_files, float_ggufs, patched_site, tmp_path, monkeypatch):
    """`alphaq eval --patched` evaluates an expert-granular file from the stock environment (the
    patched runtime in a child), against a stock reference; the perplexity is the one the patched
    runtime's own log-probabilities give. Without --patched: the one-line error, exit 2."""
    import json
    import sys

    from alphaq.evaluate.perplexity import windows

    (arch, _), path = next(((k, p) for k, p in expert_files.items() if read_layouts(p)))
    monkeypatch.setenv("ALPHAQ_PATCHED_SITE", str(patched_site))
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-c", "import sys; from alphaq.cli import main; sys.exit(main())", "eval", str(path),
           "--text", str(PROSE), "--ref", str(float_ggufs[arch]), "--n-ctx", "64", "--max-windows", "2",
           "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd + ["--patched"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())["texts"][0]
    assert report["n_windows"] == 2 and report["kl"] >= 0 and 0 <= report["top1"] <= 1

    lp = runtime.logprobs(patched_site, path, PROSE, 64, 2, tmp_path / "lp.npy")  # (windows, n_ctx, vocab)
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(float_ggufs[arch]), vocab_only=True, verbose=False)
    toks = np.array(windows(vocab, PROSE.read_text(errors="replace"), 64, 2))
    first = 32
    nll = -np.take_along_axis(lp[:, first - 1:63], toks[:, first:, None], -1).mean()
    assert report["ppl"] == pytest.approx(float(np.exp(nll)), rel=1e-4)

    bad = subprocess.run(cmd + ["--force"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "alphaq eval --patched" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_cuda_sources_of_the_series_compile():
    """No GPU in CI, but the CUDA half of the series must at least compile: nvcc on every CUDA
    source the patches change (sm_90), with the series applied. Skips where nvcc is absent."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed (a CUDA toolkit, or pip install nvidia-cuda-nvcc-cu12)")
    from convert.patched import cuda_compile_check

    results = cuda_compile_check("90")
    assert {r for r, _, _ in results} >= {"ggml/src/ggml-cuda/mmvq.cu", "ggml/src/ggml-cuda/mmid.cu"}
    failed = [f"{r}:\n{tail}" for r, ok, tail in results if not ok]
    assert not failed, "\n".join(failed)


def test_isolated_child_imports_llama_cpp_before_numpy():
    """A runtime child (python -m alphaq.runtime.isolated) imports llama_cpp before numpy: on an
    H200 the CUDA build crashed at model load whenever numpy came first (bench/GPU.md)."""
    code = """
import builtins, runpy, sys
order, real = [], builtins.__import__
def record(name, *args, **kwargs):
    top = name.split(".")[0]
    if top in ("numpy", "llama_cpp") and top not in order:
        order.append(top)
    return real(name, *args, **kwargs)
builtins.__import__ = record
sys.argv = ["isolated", "no-such-command"]
try:
    runpy.run_module("alphaq.runtime.isolated", run_name="__main__")
except KeyError:
    pass
print(",".join(order))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=runtime.child_env(None))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1].startswith("llama_cpp,"), proc.stdout

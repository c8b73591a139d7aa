"""llama-quantize's flags in `alphaq convert`: --output-tensor-type, --leave-output-tensor,
--token-embedding-type, --tensor-type, --tensor-type-file (pins), --override-kv,
--include-weights / --exclude-weights and --keep-split, checked against llama.cpp's own quantiser
(its dry run, and the llama-quantize binary) and against the files written (gguf-py)."""

from __future__ import annotations

import ctypes
import json
import itertools
import math
import subprocess
from fractions import Fraction
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import alphaq
from alphaq.cli import build_parser
from alphaq.cli import main as cli_main
from alphaq.commands.plan import with_pins
from alphaq.pipeline.convert import ConvertConfig, run_convert
from alphaq.errors import AlphaQError
from alphaq.gguf.io import read_tensors
from alphaq.allocate.plan import PlanConfig, TensorInfo, make_plan, plan_pins
from alphaq.gguf.qtypes import effective_type, llama_quantizes, nominal_bits
from conftest import FIXTURES
from test_plan import moe_model

MODEL = "qwen2moe"  # the smallest fixture; its ffn_down_exps rows (96) take llama.cpp's shape fallback


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory) -> Path:
    from convert.hf_to_gguf import convert_hf

    return convert_hf(FIXTURES / MODEL, tmp_path_factory.mktemp("bf16") / f"{MODEL}.gguf").path


def _types(path: Path) -> dict[str, T]:
    return {t.name: t.type for t in read_tensors(path)}


def _infos(path: Path) -> list[TensorInfo]:
    return [TensorInfo(t.name, t.shape, t.type.name) for t in read_tensors(path)]


def _expected_types(path: Path, cfg: PlanConfig, default: T) -> dict[str, T]:
    """What alphaq pins, and the default type elsewhere, for every tensor llama.cpp quantises."""
    pins = plan_pins(_infos(path), cfg).types
    return {t.name: effective_type(T[pins[t.name][0]] if t.name in pins else default, t.shape[-1])
            for t in read_tensors(path) if llama_quantizes(t.name, t.shape)}


def _dry_run_types(lines) -> dict[str, T]:
    from alphaq.gguf.quantize import _DRY_RUN_LINE

    out = {}
    for line in lines:
        m = _DRY_RUN_LINE.search(line.rstrip("\n"))
        if m:
            out[m.group(1)] = T[(m.group(3) or m.group(2)).upper()]
    return out


# ----------------------------------------------------------------------------------------------
# which tensor each pin takes: llama.cpp's own decisions
# ----------------------------------------------------------------------------------------------

PATTERNS = (
    ("blk\\.1\\.", "Q4_0"),  # unanchored: every blk.1 tensor
    ("ffn_down", "Q4_K"),  # ffn_down_exps (rows of 96: falls back to Q5_0) and ffn_down_shexp
    ("ffn_down_shexp", "Q6_K"),  # every match taken by the entry before: pins nothing
    ("attn_[qk]\\.weight$", "Q5_1"),
    ("token_embd", "Q2_K"),  # --token-embedding-type comes first
    ("gate_exps", "IQ4_NL"),
    ("^nothing", "Q4_0"),  # matches no tensor
)


def test_pins_take_the_tensors_llama_quantiser_gives_them(model_gguf):
    """llama_model_quantize's dry run with the same raw patterns (pure Q8_0 elsewhere): the type
    of every tensor equals alphaq's resolution, shape fallback included."""
    import llama_cpp

    from alphaq.gguf.quantize import _captured_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure, params.dry_run = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 1, True, True
    params.output_tensor_type, params.token_embedding_type = int(T.Q5_K), int(T.Q6_K)
    arr = (llama_cpp.llama_model_tensor_override * (len(PATTERNS) + 1))()
    keep = [p.encode() for p, _ in PATTERNS]
    for i, ((_, t), b) in enumerate(zip(PATTERNS, keep)):
        arr[i].pattern, arr[i].type = b, int(T[t])
    arr[len(PATTERNS)].pattern = None
    params.tt_overrides = arr
    lines: list[str] = []
    with _captured_log(lines.append):
        assert llama_cpp.llama_model_quantize(str(model_gguf).encode(), b"/dev/null", ctypes.byref(params)) == 0
    cfg = PlanConfig(output_tensor_type="q5_k", token_embedding_type="q6_k", tensor_types=PATTERNS)
    expected = _expected_types(model_gguf, cfg, T.Q8_0)
    llama = _dry_run_types(lines)
    assert {n: llama[n] for n in expected} == expected
    assert expected["blk.0.ffn_down_exps.weight"] == T.Q5_0 and expected["blk.0.ffn_down_shexp.weight"] == T.Q4_K
    unused = plan_pins(_infos(model_gguf), cfg).unused
    assert len(unused) == 3 and "ffn_down_shexp=q6_k pins nothing: every tensor it matches is taken" in unused[0]
    assert "token_embd=q2_k pins nothing: every tensor it matches is taken" in unused[1]
    assert "^nothing=q4_0 pins nothing: it matches no tensor" in unused[2]


@pytest.mark.slow  # builds llama-quantize once (minutes) when it is not there yet
def test_command_line_and_file_are_read_as_llama_quantize_reads_them(model_gguf, tmp_path):
    """The llama-quantize binary's dry run with --tensor-type before --tensor-type-file (whose
    entries are separated by spaces, tabs and newlines, patterns in upper case): alphaq's
    parser gives every tensor the same type."""
    from convert.tools import llama_quantize

    tt = tmp_path / "tt.txt"
    tt.write_text("FFN_UP_EXPS=Q5_K\tBLK\\.0\\.ATTN_V=q6_k \n\n ffn_up=q4_0\nattn=Q5_0\n")
    flags = ["--output-tensor-type", "q5_k", "--token-embedding-type", "Q6_K", "--tensor-type", "attn_output=q4_1",
             "--tensor-type-file", str(tt), "--tensor-type", "blk\\.1\\.attn_v=q8_0"]
    res = subprocess.run([str(llama_quantize()), "--dry-run", "--pure", *flags, str(model_gguf), "Q8_0"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    args = build_parser().parse_args(["convert", str(model_gguf), *flags])
    expected = _expected_types(model_gguf, with_pins(PlanConfig(), args), T.Q8_0)
    llama = _dry_run_types((res.stdout + res.stderr).splitlines())
    assert {n: llama[n] for n in expected} == expected
    assert expected["blk.1.ffn_up_exps.weight"] == T.Q5_K and expected["blk.1.attn_v.weight"] == T.Q5_0


# ----------------------------------------------------------------------------------------------
# the allocation around the pins
# ----------------------------------------------------------------------------------------------


def test_pinned_tensors_are_fixed_and_the_knapsack_is_exact_over_the_rest():
    """Brute force over every choice for the unpinned items: the plan's objective is the best one
    whose nominal bits, the pinned tensor's included, stay within the budget."""
    tensors, stats = moe_model(n_blocks=1, n_expert=2)
    pinned = "blk.0.ffn_up_exps.weight"
    cfg = PlanConfig(budget=3.0, tensor_types=(("ffn_up_exps", "Q4_K"),))
    plan = make_plan(stats, tensors, cfg, fixed_bytes=0)
    assert pinned not in {it.tensor for it in plan.items}
    fixed = {f.tensor: f for f in plan.fixed}[pinned]
    assert (fixed.type, fixed.reason) == (T.Q4_K, "pinned: --tensor-type ffn_up_exps=q4_k")
    pinned_params = math.prod(fixed.shape)
    pinned_bits = pinned_params * nominal_bits(T.Q4_K)
    cap = math.floor(Fraction(3) * (sum(it.params for it in plan.items) + pinned_params))
    best = math.inf
    for combo in itertools.product(*(list(it.costs) for it in plan.items)):
        bits = pinned_bits + sum(it.params * nominal_bits(T[it.written[c]]) for it, c in zip(plan.items, combo))
        if bits <= cap:
            best = min(best, sum(it.costs[c] for it, c in zip(plan.items, combo)))
    assert plan.totals.objective == pytest.approx(best, rel=1e-12)
    assert plan.totals.n_pinned == 1 and plan.settings["pins"]["tensor_types"] == [["ffn_up_exps", "Q4_K"]]


def test_pins_count_in_each_block_and_in_a_size_budget():
    tensors, stats = moe_model(n_blocks=2, n_expert=4)
    cfg = dict(tensor_types=(("blk\\.1\\.ffn_down_exps", "Q8_0"),))
    with pytest.raises(AlphaQError, match="in block 1 .*with the pinned tensors"):
        make_plan(stats, tensors, PlanConfig(budget=3.0, scope="block", **cfg), fixed_bytes=0)
    plan = make_plan(stats, tensors, PlanConfig(budget=3.0, **cfg), fixed_bytes=0)  # global: feasible
    assert {f.tensor: f.type for f in plan.fixed}["blk.1.ffn_down_exps.weight"] == T.Q8_0
    size = plan.totals.predicted_file_bytes
    sized = make_plan(stats, tensors, PlanConfig(budget_mode="size", budget=size, **cfg), fixed_bytes=0)
    assert sized.totals.predicted_file_bytes <= size
    assert sized.totals.pinned_bytes == plan.totals.pinned_bytes > 0
    with pytest.raises(AlphaQError, match="alone take"):
        make_plan(stats, tensors, PlanConfig(budget_mode="size", budget=plan.totals.pinned_bytes - 1, **cfg))


# ----------------------------------------------------------------------------------------------
# end to end (--fast: no forward pass)
# ----------------------------------------------------------------------------------------------


def test_pins_and_metadata_from_python_are_in_the_written_file(model_gguf, tmp_path):
    out = tmp_path / "pinned.gguf"
    r = alphaq.convert(model_gguf, out, mode="fast", budget=3, compare_stock=False, cache_dir=tmp_path / "cache",
                       output_tensor_type="q8_0", token_embedding_type="Q6_K",
                       tensor_type=["blk\\.0\\.ffn_down_exps=q4_k", "attn_v=f16"],
                       override_kv=["general.name=str:pinned test", "qwen2moe.expert_used_count=int:2",
                                    "test.scale=float:0.25", "test.flag=bool:false"])
    types = _types(out)
    assert types["output.weight"] == T.Q8_0 and types["token_embd.weight"] == T.Q6_K
    assert types["blk.0.ffn_down_exps.weight"] == T.Q5_0  # Q4_K's shape fallback for rows of 96
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == T.F16
    assert {f.tensor for f in r.plan.fixed if f.reason.startswith("pinned")} == {
        "output.weight", "token_embd.weight", "blk.0.ffn_down_exps.weight", "blk.0.attn_v.weight",
        "blk.1.attn_v.weight"}
    # the budget (3 nominal bits over the routed experts) holds with the pinned expert tensor in it
    experts = [t for t in read_tensors(out) if t.name.endswith("_exps.weight")]
    assert sum(t.n_elements * nominal_bits(t.type) for t in experts) <= 3 * sum(t.n_elements for t in experts)
    fields = gguf.GGUFReader(out).fields
    for key, vtype, value in (("general.name", gguf.GGUFValueType.STRING, "pinned test"),
                              ("qwen2moe.expert_used_count", gguf.GGUFValueType.UINT32, 2),
                              ("test.scale", gguf.GGUFValueType.FLOAT32, 0.25),
                              ("test.flag", gguf.GGUFValueType.BOOL, False)):
        assert (fields[key].types[0], fields[key].contents()) == (vtype, value), key


def test_tensor_type_file_of_a_plan_reproduces_its_file(model_gguf, tmp_path, capsys):
    """convert --fast writes llama-quantize's tensor-type file beside its output; read back as
    --tensor-type-file it pins every tensor: same types and bytes, nothing left to allocate. An
    entry that pins nothing is a warning in the summary."""
    first, again = tmp_path / "first.gguf", tmp_path / "again.gguf"
    common = ["--fast", "--budget", "3", "--no-progress", "--no-stock-compare", "--cache-dir", str(tmp_path / "c")]
    assert cli_main(["convert", str(model_gguf), "-o", str(first), *common]) == 0
    tt_file = tmp_path / "first.tensor-types.txt"
    capsys.readouterr()
    assert cli_main(["convert", str(model_gguf), "-o", str(again), *common, "--tensor-type-file", str(tt_file),
                     "--tensor-type", "no_such_tensor=q8_0"]) == 0
    summary = capsys.readouterr().out
    assert "allocated   nothing" in summary
    assert "WARNING     --tensor-type no_such_tensor=q8_0 pins nothing" in summary
    assert summary.count("no_such_tensor=q8_0 pins nothing") == 1, summary  # not again under warnings
    a = {t.name: t for t in gguf.GGUFReader(first).tensors}
    b = {t.name: t for t in gguf.GGUFReader(again).tensors}
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
    for name, t in a.items():
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b[name].data), err_msg=name)
    assert (tmp_path / "again.tensor-types.txt").read_text() == tt_file.read_text()


def test_damage_is_measured_only_for_unpinned_tensors(model_gguf, tmp_path, monkeypatch):
    """The default mode measures no damage for a pinned tensor (its type is fixed)."""
    import alphaq.damage.run as damage_run

    class Reached(Exception):
        pass

    seen = {}

    def record(model, names, *args, **kwargs):
        seen["names"] = list(names)
        raise Reached

    monkeypatch.setattr(damage_run, "self_calibrate", record)
    cfg = ConvertConfig(model=model_gguf, output=tmp_path / "d.gguf", progress=False, compare_stock=False,
                        plan=PlanConfig(noise="damage", allocate="every", gamma=0.0, output_tensor_type="q8_0",
                                        tensor_types=(("ffn_down_exps", "q4_k"),)))
    with pytest.raises(Reached):
        run_convert(cfg)
    quantised = [t.name for t in read_tensors(model_gguf) if llama_quantizes(t.name, t.shape)]
    pinned = {"output.weight", "blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"}
    assert seen["names"] == [n for n in quantised if n not in pinned]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# mistakes: one line, before any expensive stage, nothing written
# ----------------------------------------------------------------------------------------------


def _file(tp: Path, text: str) -> str:
    (tp / "tt.txt").write_text(text)
    return str(tp / "tt.txt")


BAD = {
    "invalid regex": (lambda tp: ["--tensor-type", "exps(=q4_k"], "not a valid regular expression"),
    "python-only regex": (lambda tp: ["--tensor-type", "(?P<x>exps)=q4_k"], "Python-only"),
    "unknown pin type": (lambda tp: ["--tensor-type", "exps=q9_k"], "'q9_k'"),
    "unknown output type": (lambda tp: ["--output-tensor-type", "q3"], "--output-tensor-type: unknown quant type"),
    "entry without =": (lambda tp: ["--tensor-type", "exps"], "PATTERN=TYPE"),
    "bad file entry": (lambda tp: ["--tensor-type-file", _file(tp, "attn_v=q8_0\njunk\n")], "'junk' has no '='"),
    "missing file": (lambda tp: ["--tensor-type-file", str(tp / "none.txt")], "cannot read it"),
    "pins over the bits": (lambda tp: ["--fast", "--tensor-type", "exps=f16"], "alone exceed the budget"),
    "pins over the size": (lambda tp: ["--target-size", "2MiB", "--tensor-type", "exps=q8_0"], "alone take"),
    "pins leave too little": (lambda tp: ["--fast", "--budget", "2", "--tensor-type", "blk\\.0\\.ffn_(up|gate)=q4_k"],
                              "with the pinned tensors"),
    "kv without =": (lambda tp: ["--override-kv", "general.name"], "KEY=TYPE:VALUE"),
    "kv unknown type": (lambda tp: ["--override-kv", "a.b=i32:3"], "unknown type 'i32'"),
    "kv bad bool": (lambda tp: ["--override-kv", "a.b=bool:yes"], "true or false"),
    "kv bad int": (lambda tp: ["--override-kv", "a.b=int:3x"], "'3x' is not an int"),
    "kv negative int": (lambda tp: ["--override-kv", "a.b=int:-1"], "uint32"),
    "kv long str": (lambda tp: ["--override-kv", "a.b=str:" + "x" * 128], "127 bytes"),
    "kv alphaq key": (lambda tp: ["--override-kv", "alphaq.plan=str:{}"], "cannot be overridden"),
    "kv split key": (lambda tp: ["--override-kv", "split.count=int:3"], "is a split key"),
    # the fast mode's policy types, which the default mode (every tensor allocated) would not use
    "output type unused": (lambda tp: ["--output-type", "q8_0"], "pin it with --output-tensor-type"),
    "embd type unused": (lambda tp: ["--token-embd-type", "q8_0"], "pin it with --token-embedding-type"),
    "non-expert type unused": (lambda tp: ["--non-expert-type", "q8_0"], "pin it with --tensor-type"),
    "non-expert under allocate all": (lambda tp: ["--fast", "--allocate", "all", "--non-expert-type", "q8_0"],
                                      "--allocate all leaves none of them out"),
    "negative seed": (lambda tp: ["--seed", "-1"], "--seed -1"),
    # llama-quantize flags without a meaning here, and the checks of the ones that have one
    "pure": (lambda tp: ["--pure"], "no pure mode"),
    "prune layers": (lambda tp: ["--prune-layers", "1"], "llama-quantize --prune-layers 1 MODEL.gguf PRUNED.gguf COPY"),
    "keep-split of a checkpoint": (lambda tp: ["--keep-split"], "is an HF checkpoint"),
    "keep-split and a new split": (lambda tp: ["--keep-split", "--split-max-tensors", "3"], "give one"),
    "buffer of 0 MiB": (lambda tp: ["--max-buffer-size", "0"], "positive whole number of MiB"),
    "include and exclude": (lambda tp: ["--include-weights", "a", "--exclude-weights", "b"], "used together"),
    "exclude without importance": (lambda tp: ["--fast", "--exclude-weights", "attn"], "only the default (damage)"),
    "include nothing": (lambda tp: ["--include-weights", ""], "give part of a tensor name"),
    "leave and set the output": (lambda tp: ["--leave-output-tensor", "--output-tensor-type", "q8_0"], "give one"),
    # llama-quantize's positional order, MODEL [OUT] TYPE [NTHREADS]
    "positional bad type": (lambda tp: ["Q9_K"], "'Q9_K' is not a llama.cpp mix"),
    "positional out and -o": (lambda tp: ["x.gguf", "Q4_K_M"], "-o and the positional OUT x.gguf"),
    "positional junk after type": (lambda tp: ["Q4_K_M", "x"], "only NTHREADS"),
    "positional type and budget": (lambda tp: ["Q4_K_M", "--budget", "3"], "--budget and the positional TYPE Q4_K_M"),
    "positional threads twice": (lambda tp: ["Q4_K_M", "2", "--threads", "1"], "--threads and the positional NTHREADS"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_are_one_line_before_any_work(case, tmp_path, capsys, monkeypatch):
    import alphaq.pipeline.convert as convert_mod

    def expensive(*a, **k):
        raise AssertionError("reached the float model stage")

    monkeypatch.setattr(convert_mod, "_float_model", expensive)
    work = tmp_path / "work"
    work.mkdir()
    args, needle = BAD[case]
    code = cli_main(["convert", str(FIXTURES / MODEL), "-o", str(work / "o.gguf"), "--no-progress", *args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("alphaq convert: error: ") and needle in err[-1], err[-1]
    assert list(work.iterdir()) == []


def test_policy_types_apply_where_the_allocation_leaves_tensors_out(model_gguf):
    from alphaq.allocate.plan import MODES, policy_type

    fast = PlanConfig(**MODES["fast"], output_type="q8_0")
    assert policy_type(fast, "output_type").name == "Q8_0" and policy_type(fast, "token_embd_type").name == "Q4_K"
    PlanConfig(allocate="all", output_type="q8_0", token_embd_type="q6_k")  # left out under "all": fine
    with pytest.raises(AlphaQError, match="--output-tensor-type"):
        PlanConfig(**MODES["damage"], output_type="q8_0")


@pytest.mark.parametrize("name, out", [("m.gguf", "m.gguf"), ("o.imatrix.gguf", "o.gguf")])
def test_the_input_model_is_never_an_output(name, out, model_gguf, tmp_path, capsys):
    src = tmp_path / name  # the output itself, or a file written beside it (the importance matrix)
    src.write_bytes(model_gguf.read_bytes())
    before = src.read_bytes()
    argv = ["convert", str(src), "--like", "Q4_K_M", "--no-progress", "--force", "-o", str(tmp_path / out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the input model" in err[0], err
    assert src.read_bytes() == before


def _user_imatrix(model: Path, path: Path) -> None:
    """A llama.cpp importance file that fits ``model`` (every quantised weight, ones)."""
    from alphaq.importance.imatrix_file import Imatrix, write_imatrix

    sums = {t.name: np.ones((t.shape[0] if len(t.shape) == 3 else 1, t.shape[-1]), dtype=np.float32)
            for t in read_tensors(model) if llama_quantizes(t.name, t.shape) and t.name != "token_embd.weight"}
    write_imatrix(path, Imatrix(sums, {n: np.ones(v.shape[0]) for n, v in sums.items()}, ["user text"], 1, 1))


@pytest.mark.parametrize("kind", ["imatrix", "tensor-type-file", "keep-bf16"])
def test_no_output_is_a_file_the_run_reads(kind, model_gguf, tmp_path, capsys, monkeypatch):
    """The user's --imatrix or --tensor-type-file where convert writes a side file (OUT.imatrix.gguf,
    OUT.tensor-types.txt), or --keep-bf16 naming the --imatrix: refused before any work, even with
    --force, the file untouched; the same through the Python front door."""
    import alphaq.pipeline.convert as convert_mod

    monkeypatch.setattr(convert_mod, "_float_model", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "o.gguf"
    read = {"imatrix": out.with_name("o.imatrix.gguf"), "tensor-type-file": out.with_name("o.tensor-types.txt"),
            "keep-bf16": tmp_path / "user.imatrix.gguf"}[kind]
    if kind == "tensor-type-file":
        read.write_text("attn_v=q8_0\n")
    else:
        _user_imatrix(model_gguf, read)
    before = read.read_bytes()
    flags = {"imatrix": ["--imatrix", str(read)], "tensor-type-file": ["--tensor-type-file", str(read)],
             "keep-bf16": ["--imatrix", str(read), "--keep-bf16", str(read)]}[kind]
    src = FIXTURES / MODEL if kind == "keep-bf16" else model_gguf  # --keep-bf16 needs an HF checkpoint
    assert cli_main(["convert", str(src), "-o", str(out), "--like", "Q4_K_M", "--no-progress", "--force",
                     *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    what = {"imatrix": "the --imatrix input", "tensor-type-file": "a --tensor-type-file input",
            "keep-bf16": "the --imatrix input"}[kind]
    assert len(err) == 1 and f"{read} is {what}" in err[0] and "Traceback" not in err[0], err
    assert read.read_bytes() == before and not out.exists()
    if kind == "tensor-type-file":
        with pytest.raises(AlphaQError, match="is a tensor_type_file input.*force=True"):
            alphaq.convert(model_gguf, out, like="Q4_K_M", force=True, tensor_type_file=read)
        assert read.read_bytes() == before


# ----------------------------------------------------------------------------------------------
# --leave-output-tensor, --include-weights / --exclude-weights, --keep-split
# ----------------------------------------------------------------------------------------------


def test_leave_output_tensor_keeps_the_type_llama_quantize_keeps(model_gguf):
    """llama_model_quantize's dry run with quantize_output_tensor = false (--leave-output-tensor)
    leaves output.weight in its source type; alphaq pins it to that same type."""
    import llama_cpp

    from alphaq.gguf.quantize import _captured_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.dry_run = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1, True
    params.quantize_output_tensor = False
    lines: list[str] = []
    with _captured_log(lines.append):
        assert llama_cpp.llama_model_quantize(str(model_gguf).encode(), b"/dev/null", ctypes.byref(params)) == 0
    llama = {}
    for line in lines:  # a tensor left as it is is logged "size = ..." without a type change
        if "output.weight" in line and "type =" in line:
            llama["output.weight"] = T[line.split("type =")[1].split(",")[0].strip().upper()]
    pins = plan_pins(_infos(model_gguf), PlanConfig(leave_output_tensor=True))
    assert llama["output.weight"] == T.BF16 == T[pins.types["output.weight"][0]]
    assert pins.types["output.weight"][1] == "pinned: --leave-output-tensor" and len(pins.types) == 1
    tied = [i for i in _infos(model_gguf) if i.name != "output.weight"]
    assert plan_pins(tied, PlanConfig(leave_output_tensor=True)).unused == (
        "--leave-output-tensor: the model has no output.weight (tied embeddings); nothing pinned",)


@pytest.mark.slow  # builds llama-quantize once (minutes) when it is not there yet
@pytest.mark.parametrize("flag, names", [("--exclude-weights", ["ffn_down", "attn_q"]),
                                         ("--include-weights", ["blk.1.", "output"])])
def test_weight_filters_keep_the_vectors_llama_quantize_keeps(flag, names, model_gguf, tmp_path):
    """The llama-quantize binary with an importance file and the flag: the number of vectors it
    keeps, and its file byte for byte against llama.cpp's quantiser given the vectors alphaq keeps."""
    from convert.tools import llama_quantize

    from alphaq.gguf.quantize import quantize_stock
    from alphaq.importance.imatrix_file import read_imatrix, select_weights, write_imatrix

    path = tmp_path / "u.imatrix.gguf"
    _user_imatrix(model_gguf, path)
    im = read_imatrix(path)
    rng = np.random.default_rng(0)  # vectors that change the bytes, so a wrong selection shows
    im.sums.update({n: rng.uniform(0.1, 10, v.shape).astype(np.float32) for n, v in im.sums.items()})
    path.unlink()
    write_imatrix(path, im)
    by_tool = tmp_path / "tool.gguf"
    args = [a for n in names for a in (flag, n)]
    res = subprocess.run([str(llama_quantize()), "--imatrix", str(path), *args, str(model_gguf), str(by_tool), "Q4_K_M"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    include, exclude = (names, ()) if flag == "--include-weights" else ((), names)
    kept, unused = select_weights(im.sums, include, exclude)
    assert f"have {len(kept)} importance matrix entries" in res.stdout + res.stderr and not unused
    assert 0 < len(kept) < len(im.sums)
    by_us = tmp_path / "us.gguf"
    quantize_stock(model_gguf, by_us, "Q4_K_M", imatrix=read_imatrix(path).only(kept).means())
    theirs = {t.name: t for t in gguf.GGUFReader(by_tool).tensors}
    for t in gguf.GGUFReader(by_us).tensors:
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data), err_msg=t.name)


def test_excluded_weights_are_quantised_without_their_vectors(model_gguf, tmp_path, capsys):
    """The default mode with --exclude-weights: the file is llama.cpp's quantiser with the saved
    importance matrix less the excluded weights' vectors (which do change those tensors' bytes),
    and the summary says so."""
    from alphaq.gguf.quantize import quantize_gguf
    from alphaq.importance.imatrix_file import read_imatrix

    out = tmp_path / "x.gguf"
    assert cli_main(["convert", str(model_gguf), "-o", str(out), "--like", "Q4_K_M", "--no-progress",
                     "--exclude-weights", "ffn_down", "--exclude-weights", "no_such_weight"]) == 0
    text = capsys.readouterr().out
    im = read_imatrix(out.with_name("x.imatrix.gguf"))
    kept = [n for n in im.sums if "ffn_down" not in n]
    assert f"used for {len(kept)} of its {len(im.sums)} weights" in text
    assert "--exclude-weights no_such_weight matches no weight" in text
    recorded = json.loads(out.with_name("x.plan.json").read_text())["llama_quantize"]
    assert recorded["exclude_weights"] == ["ffn_down", "no_such_weight"] and recorded["keep_split"] is False
    types = _types(out)
    quantised = {n: t for n, t in types.items() if n in {i.name for i in _infos(model_gguf)}
                 and t not in (T.F32, T.BF16, T.F16)}
    again, full = tmp_path / "again.gguf", tmp_path / "full.gguf"
    quantize_gguf(model_gguf, again, quantised, imatrix=im.only(kept).means())
    quantize_gguf(model_gguf, full, quantised, imatrix=im.means())
    ours, filtered, unfiltered = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(p).tensors}
                                  for p in (out, again, full))
    for name in quantised:
        np.testing.assert_array_equal(ours[name], filtered[name], err_msg=name)
    down = [n for n in quantised if "ffn_down" in n]
    assert down and any(not np.array_equal(filtered[n], unfiltered[n]) for n in down)


@pytest.mark.slow  # builds llama-quantize and llama-gguf-split once (minutes) when they are not there yet
def test_keep_split_writes_the_parts_llama_quantize_writes(model_gguf, tmp_path):
    """A split input (llama-gguf-split --split-max-tensors 7): convert --keep-split puts every
    tensor in the part llama-quantize --keep-split puts it (same part count and names, same order),
    with the same types and bytes (--fast, the plan's tensor-type file given to llama-quantize),
    and llama.cpp loads the parts."""
    from convert.tools import llama_tool

    from alphaq.gguf.split import part_names

    src = tmp_path / "in"
    res = subprocess.run([str(llama_tool("llama-gguf-split")), "--split", "--split-max-tensors", "7", str(model_gguf),
                          str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    first = sorted(tmp_path.glob("in-*.gguf"))[0]
    n = len(list(tmp_path.glob("in-*.gguf")))
    assert n >= 3
    out = tmp_path / "o.gguf"
    assert cli_main(["convert", str(first), "-o", str(out), "--fast", "--budget", "4", "--keep-split",
                     "--no-progress"]) == 0
    ours = tmp_path / f"o-00001-of-{n:05d}.gguf"
    assert not out.exists() and ours.exists()
    res = subprocess.run([str(llama_tool("llama-quantize")), "--keep-split", "--tensor-type-file",
                          str(tmp_path / "o.tensor-types.txt"), str(first), str(tmp_path / "t.gguf"), "Q4_K_M"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = tmp_path / f"t-00001-of-{n:05d}.gguf"
    assert part_names(ours) == part_names(theirs) == part_names(first)
    assert json.loads((tmp_path / "o.plan.json").read_text())["llama_quantize"]["keep_split"] is True
    assert _types(ours) == _types(theirs)
    data = [{t.name: np.asarray(t.data) for p in sorted(tmp_path.glob(f"{x}-*-of-{n:05d}.gguf"))
             for t in gguf.GGUFReader(p).tensors} for x in ("o", "t")]
    for name, d in data[1].items():
        np.testing.assert_array_equal(data[0][name], d, err_msg=name)
    from llama_cpp import Llama

    Llama(str(ours), n_ctx=32, verbose=False).close()


def test_llama_quantize_positional_order_means_its_flags(model_gguf, tmp_path, monkeypatch, capsys):
    """``MODEL OUT TYPE NTHREADS`` (llama-quantize's order; TYPE by name in any case or by its
    llama_ftype number) is ``-o OUT --like TYPE --threads NTHREADS``; ``MODEL TYPE`` is ``--like
    TYPE`` with the default output; OUT without a TYPE after it is refused."""
    import llama_cpp

    import alphaq.pipeline.convert as convert_mod

    seen = []
    monkeypatch.setattr(convert_mod, "run_convert", lambda cfg, announce=None: seen.append(cfg) or 1 / 0)
    out = str(tmp_path / "o.gguf")
    number = str(int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M))
    for argv in (["-o", out, "--like", "Q3_K_M", "--threads", "3"], [out, "q3_k_m", "3"], [out, number, "3"],
                 ["--like", "Q3_K_M"], ["Q3_K_M"]):
        cli_main(["convert", str(model_gguf), "--fast", "--no-progress", *argv])
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4]
    assert (seen[0].like, seen[0].nthread, seen[0].output, seen[4].like) == ("Q3_K_M", 3, Path(out), "Q3_K_M")
    assert seen[4].output.name == f"{model_gguf.stem}-alphaq-Q3_K_M.gguf"
    capsys.readouterr()
    assert cli_main(["convert", str(model_gguf), out]) == 2
    assert "no TYPE after it" in capsys.readouterr().err and len(seen) == 5


def test_max_buffer_size_reaches_llama_quantiser_and_changes_no_byte(model_gguf, tmp_path, monkeypatch):
    """--max-buffer-size MiB is the quantiser's max_buf_size in bytes (llama-quantize's unit), and
    a slab of 1 MiB (several per expert tensor here) writes the same tensors as alphaq's 512 MiB."""
    from alphaq.gguf import quantize as quantize_mod

    seen: list[int] = []
    build = quantize_mod._build_params

    def record(*a, **k):
        params, keep = build(*a, **k)
        seen.append(params.max_buf_size)
        return params, keep

    monkeypatch.setattr(quantize_mod, "_build_params", record)
    outs = {}
    for mib in (1, None):
        outs[mib] = tmp_path / f"buf{mib}.gguf"
        alphaq.convert(model_gguf, outs[mib], mode="fast", budget=3, compare_stock=False,
                       cache_dir=tmp_path / "cache", max_buffer_size=mib)
    assert seen == [1 << 20, quantize_mod.QUANTISER_BUFFER_BYTES]
    small, default = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(p).tensors} for p in outs.values())
    assert small.keys() == default.keys()
    for name in small:
        np.testing.assert_array_equal(small[name], default[name], err_msg=name)


def test_plan_of_a_checkpoint_pins_the_type_convert_keeps(model_gguf):
    """`alphaq plan` on an HF checkpoint knows its matrices from the analysis only; it takes them in
    the type `alphaq convert` has llama.cpp's converter write (BF16), so --leave-output-tensor pins
    the type the written file keeps."""
    from alphaq.commands.plan import _tensors_from_stats
    from alphaq.model.weights import open_model

    with open_model(FIXTURES / MODEL) as weights:
        tensors = _tensors_from_stats(weights.matrices())
    written = {t.name: t for t in _infos(model_gguf)}
    assert tensors and {t.name: (t.shape, t.dtype) for t in tensors} == {
        t.name: (written[t.name].shape, written[t.name].dtype) for t in tensors}
    pinned = plan_pins(tensors, PlanConfig(leave_output_tensor=True)).types["output.weight"][0]
    assert pinned == written["output.weight"].dtype == "BF16"

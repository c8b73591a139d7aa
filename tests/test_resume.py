"""Interrupted conversions resume (issue 17, point 3; alphaq/pipeline/resume.py).

`alphaq convert` on an HF fixture is stopped by SIGINT or SIGKILL inside each stage (the HF->BF16
conversion, the self text, the importance matrix, the damage measurements, before the first tensor and after it, quantising) and then run
again with the same command. The re-run must succeed with outputs byte-identical to an uninterrupted
run's, the killed run must have left no output file (only the documented resumable directory), and
the stages that had finished must be reused (the summary's "reused" line).

Synchronisation is by the test hook `alphaq.pipeline.resume.pause_for_test` (ALPHAQ_TEST_PAUSE_AT=STAGE:DIR):
the run writes STAGE into the named pipe DIR/ready when it reaches STAGE and then blocks on DIR/go,
so the signal always lands in that stage, whatever the machine's speed. Each run has its own cache
directory (XDG_CACHE_HOME), so no test sees another's cached stages. Three cases run by default; the
other nine are marked slow (each case costs about one small conversion).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mixtral"
SETTINGS = ("--self-samples", "2", "--self-ctx", "16", "--damage-windows", "1", "--types", "Q4_K,Q8_0",
            "--budget", "5", "--no-stock-compare", "--no-progress", "--threads", "1")
OUTPUTS = ("o.gguf", "o.imatrix.gguf", "o.plan.json", "o.tensor-types.txt")
PARTIAL = ".o.gguf.alphaq-partial"  # alphaq.pipeline.resume.partial_dir of o.gguf
STAGES = ("convert", "self text", "importance", "damage", "damage tensor", "quantise")
# what a re-run reuses after a stop in each stage: every stage that had finished
REUSED = {"convert": [], "self text": ["bf16 intermediate"], "importance": ["bf16 intermediate", "self text"],
          "damage": ["bf16 intermediate", "self text", "importance"],
          # stopped after the damage stage recorded its first tensor: the re-run measures the rest
          "damage tensor": ["bf16 intermediate", "self text", "importance"],
          "quantise": ["bf16 intermediate", "self text", "importance", "damage"]}
SAFETY_TIMEOUT = 900  # seconds; only so that a hung run fails instead of blocking CI (not a synchronisation)


def command(out: Path, *extra: str, settings=SETTINGS) -> list[str]:
    return [sys.executable, "-m", "alphaq.cli", "convert", str(FIXTURES / MODEL), "-o", str(out), *settings, *extra]


def environment(cache: Path, pause: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ALPHAQ_TEST_PAUSE_AT"}
    env["XDG_CACHE_HOME"] = str(cache)
    if pause is not None:
        env["ALPHAQ_TEST_PAUSE_AT"] = pause
    return env


def convert(out: Path, cache: Path, *extra: str, settings=SETTINGS) -> subprocess.CompletedProcess:
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command(out, *extra, settings=settings), env=environment(cache), cwd=ROOT,
                          capture_output=True, text=True, timeout=SAFETY_TIMEOUT)


def reused(summary: str) -> list[str]:
    line = next((ln for ln in summary.splitlines() if ln.startswith("  reused      ")), None)
    return [] if line is None else line.removeprefix("  reused      ").split(" (")[0].split(", ")


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 256)
        assert chunk, "the pipe closed"
        data += chunk
    return data.decode().strip()


def stop_in(stage: str, sig: signal.Signals, out: Path, cache: Path, fifos: Path, settings=SETTINGS) -> tuple[int, str]:
    """Run the command, send ``sig`` once it is inside ``stage``; (exit status, stderr)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fifos.mkdir()
    os.mkfifo(fifos / "ready")
    os.mkfifo(fifos / "go")
    # read-write ends: opening a FIFO this way never blocks (Linux), and while the test holds a
    # writer of "go" the paused run's read of it waits for as long as the test wants
    ready, go = os.open(fifos / "ready", os.O_RDWR), os.open(fifos / "go", os.O_RDWR)
    err = (fifos / "stderr").open("w+")
    try:
        # SIGINT at its default in the child: a shell's background job (how CI may start the suite)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(command(out, settings=settings), env=environment(cache, f"{stage}:{fifos}"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

        def on_exit() -> None:  # a run that ends before the stage must not leave the test waiting
            proc.wait()
            os.write(ready, b"exited\n")

        watcher = threading.Thread(target=on_exit, daemon=True)
        watcher.start()
        reached = _read_line(ready)
        if reached != stage:
            err.seek(0)
            pytest.fail(f"the run ended before the stage {stage!r}: {err.read()[-3000:]}")
        proc.send_signal(sig)
        code = proc.wait(timeout=SAFETY_TIMEOUT)
        watcher.join()
        err.seek(0)
        return code, err.read()
    finally:
        err.close()
        os.close(ready)
        os.close(go)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted run of the command: its directory (out/, cache/)."""
    d = tmp_path_factory.mktemp("reference")
    proc = convert(d / "out" / "o.gguf", d / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reused(proc.stdout) == []  # a fresh cache: nothing to reuse
    assert cached_in_preflight(proc.stdout) == []
    assert sorted(p.name for p in (d / "out").iterdir()) == sorted(OUTPUTS)
    return d


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[str, bytes]:
    """The uninterrupted run's outputs."""
    return {name: (reference_run / "out" / name).read_bytes() for name in OUTPUTS}


def cached_in_preflight(stdout: str) -> list[str]:
    """What the pre-flight says earlier runs cached (and leaves out of its time)."""
    prefix = "            left out, as an earlier run cached it: "
    line = next((ln for ln in stdout.splitlines() if ln.startswith(prefix)), None)
    return [] if line is None else line.removeprefix(prefix).split(", ")


SLOW = pytest.mark.slow
DEFAULT_CASES = {("self text", signal.SIGINT), ("damage tensor", signal.SIGKILL),
                 ("quantise", signal.SIGKILL)}  # the others are slow
CASES = [pytest.param(stage, sig, id=f"{sig.name}-{stage.replace(' ', '-')}",
                      marks=() if (stage, sig) in DEFAULT_CASES else SLOW)
         for stage in STAGES for sig in (signal.SIGINT, signal.SIGKILL)]


@pytest.mark.parametrize("stage, sig", CASES)
def test_a_stopped_run_resumes_with_the_same_command(stage, sig, reference, tmp_path):
    out, cache = tmp_path / "out" / "o.gguf", tmp_path / "cache"
    code, err = stop_in(stage, sig, out, cache, tmp_path / "fifos")
    partial = out.parent / PARTIAL
    left = sorted(p.name for p in out.parent.iterdir())
    if sig == signal.SIGINT:
        assert code == 130, err[-3000:]
        last = err.strip().splitlines()[-1]
        if stage == "convert":  # the converter had not finished: nothing is kept
            assert last == "alphaq convert: interrupted" and left == []
        else:
            assert last == (f"alphaq convert: interrupted; the BF16 intermediate is kept in {partial / 'bf16.gguf'}: "
                            "re-running the same command reuses it (--no-resume deletes it)")
            assert left == [PARTIAL] and sorted(p.name for p in partial.iterdir()) == ["bf16.gguf", "bf16.json"]
    else:
        assert code == -signal.SIGKILL
        assert left == [PARTIAL]  # no output, partial or whole: only the run's own directory
        assert {p.name for p in partial.iterdir()} <= {"bf16.gguf", "bf16.json"}

    proc = convert(out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reused(proc.stdout) == REUSED[stage]
    # the pre-flight knew it: the stages it said were cached are the ones reused (the kept
    # intermediate gives it the model's fingerprint), and the stopped damage stage's one tensor
    cached = cached_in_preflight(proc.stdout)
    assert [c for c in cached if not c.startswith("damage of")] == REUSED[stage][1:], proc.stdout
    partly = [c for c in cached if c.startswith("damage of")]
    assert len(partly) == (stage == "damage tensor") and all(
        re.fullmatch(r"damage of 1 of \d+ measured tensors \(a stopped run's\)", c) for c in partly), cached
    resumed = "tensors' results resumed from a stopped run" in proc.stdout
    assert resumed == (stage == "damage tensor"), proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(OUTPUTS)  # the directory is gone
    for name in OUTPUTS:
        assert (out.parent / name).read_bytes() == reference[name], name


def test_the_preflight_of_a_converted_checkpoint_knows_its_cached_stages(reference_run, tmp_path):
    """A second run of a checkpoint converted here before (no intermediate kept): the pre-flight
    finds the forward stages in the cache through the note of the first conversion, and leaves
    their time out; the run then reuses them."""
    proc = convert(tmp_path / "again" / "o.gguf", reference_run / "cache", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cached_in_preflight(proc.stdout) == ["self text", "importance", "damage"], proc.stdout
    time_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("  time      about"))
    assert all(f"{stage} 0 s" in time_line for stage in ("self text", "importance", "damage")), time_line
    assert reused(proc.stdout) == ["self text", "importance", "damage"]
    other = convert(tmp_path / "other" / "o.gguf", reference_run / "cache", "--dry-run", "--self-samples", "3")
    assert other.returncode == 0 and cached_in_preflight(other.stdout) == [], other.stdout


@SLOW
def test_no_resume_deletes_the_kept_intermediate_and_converts_again(reference, tmp_path):
    out, cache = tmp_path / "out" / "o.gguf", tmp_path / "cache"
    code, err = stop_in("damage", signal.SIGINT, out, cache, tmp_path / "fifos")
    assert code == 130 and (out.parent / PARTIAL / "bf16.json").is_file(), err[-3000:]
    proc = convert(out, cache, "--no-resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--no-resume: deleting the kept BF16 intermediate" in proc.stderr
    assert reused(proc.stdout) == ["self text", "importance"]  # (cached by content: the same BF16 file)
    for name in OUTPUTS:
        assert (out.parent / name).read_bytes() == reference[name], name


@SLOW
def test_fast_mode_resumes_from_the_kept_intermediate(tmp_path):
    """--fast analyses the checkpoint beside the converter; resumed, it analyses the kept BF16 file
    (same alphas by construction), so the output is the same."""
    fast = ("--fast", "--budget", "3", "--no-stock-compare", "--no-progress", "--threads", "1")
    ref = convert(tmp_path / "ref" / "o.gguf", tmp_path / "ref-cache", settings=fast)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out, cache = tmp_path / "out" / "o.gguf", tmp_path / "cache"
    code, err = stop_in("quantise", signal.SIGINT, out, cache, tmp_path / "fifos", settings=fast)
    assert code == 130 and (out.parent / PARTIAL / "bf16.json").is_file(), err[-3000:]
    proc = convert(out, cache, settings=fast)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reused(proc.stdout) == ["bf16 intermediate"]
    for name in ("o.gguf", "o.plan.json", "o.tensor-types.txt"):
        assert (out.parent / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


# ---- the pieces, without a conversion --------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "mixtral"}')
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors").write_bytes(bytes(64))
    return d


def _gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("a.weight", np.arange(96, dtype=np.float32).reshape(3, 32))
    w.add_tensor("b.weight", np.ones((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_kept_intermediate_is_reused_only_while_its_record_holds(tmp_path, monkeypatch):
    from alphaq.pipeline import resume

    ckpt = _checkpoint(tmp_path)
    f, rec = _gguf(tmp_path / "bf16.gguf"), tmp_path / "bf16.json"
    assert resume.verified(f, rec, ckpt) == (None, "no record (the converter had not finished)")
    resume.write_record(f, rec, ckpt, "a fallback")
    found, why = resume.verified(f, rec, ckpt)
    assert found == resume.Intermediate(f, "a fallback") and why == ""
    assert json.loads(rec.read_text())["file"]["tensors"] == 2

    def rejected(needle: str) -> None:
        got, why = resume.verified(f, rec, ckpt)
        assert got is None and needle in why, why

    data, st = f.read_bytes(), f.stat()

    def put_back(path: Path, stat, shift_ns: int = 0) -> None:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + shift_ns))

    for changed in (data[:-1], data + b"\0"):  # truncated, grown (mtime put back: the size tells)
        f.write_bytes(changed)
        put_back(f, st)
        rejected("differs from its record")
    f.write_bytes(data)
    put_back(f, st, 10**9)  # same bytes, another mtime
    rejected("differs from its record")
    put_back(f, st)
    assert resume.verified(f, rec, ckpt)[0] is not None
    cfg, cst = ckpt / "config.json", (ckpt / "config.json").stat()
    cfg.write_text('{"model_type": "qwen3x"}')  # same size, mtime put back: the content hash tells
    put_back(cfg, cst)
    rejected("its source differs")
    cfg.write_text('{"model_type": "mixtral"}')
    put_back(cfg, cst)
    assert resume.verified(f, rec, ckpt)[0] is not None
    weights, wst = ckpt / "model.safetensors", (ckpt / "model.safetensors").stat()
    put_back(weights, wst, 10**9)  # the weights are known by size and mtime
    rejected("its source differs")
    put_back(weights, wst)
    assert resume.verified(f, rec, ckpt)[0] is not None
    resume.write_record(f, rec, ckpt, None, finite=True)
    assert resume.verified(f, rec, ckpt)[0] == resume.Intermediate(f, None, finite=True)
    monkeypatch.setattr(resume, "converter_settings", lambda: {"outtype": "f16"})
    rejected("its converter differs")
    monkeypatch.undo()
    rec.write_text("{not json")
    rejected("unreadable")


def test_the_workspace_locks_clears_and_keeps_only_a_complete_intermediate(tmp_path):
    from alphaq.errors import InputError
    from alphaq.pipeline.resume import Workspace

    ckpt, out = _checkpoint(tmp_path), tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    w = Workspace(out)
    w.open(ckpt, resume=True)
    assert w.dir == out.parent / PARTIAL and w.found is None
    with pytest.raises(InputError, match="another alphaq convert is writing"):
        Workspace(out).open(ckpt, resume=True)  # a second run of the same output
    _gguf(w.float_path)
    (w.dir / "quantised.gguf").write_bytes(b"partial")
    assert w.close(keep_float=True) is None  # no record: the converter had not finished
    assert list(out.parent.iterdir()) == []

    w = Workspace(out)
    w.open(ckpt, resume=True)
    _gguf(w.float_path)
    w.complete("fb", ckpt)
    (w.dir / "quantised.gguf").write_bytes(b"partial")
    note = w.close(keep_float=True)
    assert note is not None and str(w.float_path) in note and "re-running the same command reuses it" in note
    assert sorted(p.name for p in w.dir.iterdir()) == ["bf16.gguf", "bf16.json"]

    (w.dir / "final.gguf").write_bytes(b"left by a killed run")
    w = Workspace(out)
    assert w.peek(ckpt) is not None
    w.open(ckpt, resume=True)
    assert w.found is not None and w.found.tokenizer_fallback == "fb"
    assert sorted(p.name for p in w.dir.iterdir()) == ["bf16.gguf", "bf16.json"]  # the killed run's file is gone
    w.close(keep_float=True)
    w = Workspace(out)
    w.open(ckpt, resume=False)  # --no-resume
    assert w.found is None and list(w.dir.iterdir()) == []
    assert w.close(keep_float=True) is None and list(out.parent.iterdir()) == []


def test_keep_bf16_makes_the_intermediate_beside_its_path(tmp_path):
    from alphaq.pipeline.resume import Workspace

    ckpt, out, keep = _checkpoint(tmp_path), tmp_path / "out" / "o.gguf", tmp_path / "kept" / "m.gguf"
    out.parent.mkdir()
    keep.parent.mkdir()
    w = Workspace(out, keep)
    w.open(ckpt, resume=True)
    assert w.float_path == keep.parent / ".m.gguf.alphaq-partial" / "bf16.gguf"
    _gguf(w.float_path)
    w.complete(None, ckpt)
    w.publish_float(keep)
    assert w.close(keep_float=False) is None
    assert sorted(p.name for p in keep.parent.iterdir()) == ["m.gguf"] and list(out.parent.iterdir()) == []


def test_the_importance_cache_round_trips_exactly(tmp_path):
    from alphaq.damage.run import _imatrix_key, _load_imatrix, _save_imatrix
    from alphaq.importance.imatrix_file import Imatrix

    rng = np.random.default_rng(0)
    im = Imatrix(sums={"blk.0.ffn_up_exps.weight": rng.random((4, 32), dtype=np.float32),
                       "output.weight": rng.random((1, 32), dtype=np.float32)},
                 counts={"blk.0.ffn_up_exps.weight": np.array([3.0, 0.0, 5.5, 1e9]), "output.weight": np.array([7.0])},
                 datasets=["alphaq self text 2x16 seed 0"], chunk_count=2, chunk_size=16)
    _save_imatrix(tmp_path / "i.npz", im)
    back = _load_imatrix(tmp_path / "i.npz")
    assert _imatrix_key(back) == _imatrix_key(im) and list(back.sums) == list(im.sums)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)
    for n in im.sums:
        assert back.sums[n].dtype == im.sums[n].dtype and np.array_equal(back.sums[n], im.sums[n])
        assert back.counts[n].dtype == im.counts[n].dtype and np.array_equal(back.counts[n], im.counts[n])
    assert [p.name for p in tmp_path.iterdir()] == ["i.npz"]


def test_an_error_line_carries_its_notes():
    from alphaq.cli import _one_line
    from alphaq.errors import InputError

    exc = InputError("budget\nout of range")
    exc.add_note("the BF16 intermediate is kept in /x/bf16.gguf: re-running the same command reuses it")
    assert _one_line(exc) == ("budget out of range; the BF16 intermediate is kept in /x/bf16.gguf: "
                              "re-running the same command reuses it")


def test_the_preflight_counts_a_reused_intermediate_as_on_disk(tmp_path):
    from alphaq.pipeline.convert import ConvertConfig
    from alphaq.allocate.plan import MODES, PlanConfig
    from alphaq.pipeline.preflight import preflight
    from alphaq.model.weights import open_model

    cfg = ConvertConfig(model=FIXTURES / MODEL, output=tmp_path / "o.gguf", plan=PlanConfig(**MODES["damage"]))
    kept = _gguf(tmp_path / "bf16.gguf")
    with open_model(cfg.model) as model:
        fresh, again = preflight(cfg, model), preflight(cfg, model, reused=kept)
    size = kept.stat().st_size
    assert again.float_bytes == size and again.reused == kept
    assert again.needs[tmp_path] == max(0, max(size + fresh.output_bytes, 2 * fresh.output_bytes) - size)
    assert "float model" in fresh.stage_seconds and "float model" not in again.stage_seconds
    assert f"kept by an interrupted run and reused: {kept}" in again.format(None)

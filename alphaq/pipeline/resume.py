"""Resuming an interrupted conversion: the run's own directory and the BF16 intermediate it keeps.

Every `alphaq convert` works in one directory beside its output, ``.<output name>.alphaq-partial/``,
held under an exclusive lock (flock) for the whole run: a second run of the same output is refused
in one line. A run starts by deleting whatever an earlier, killed run left there, and removes the
directory when it ends, so the final outputs are only ever the renamed, complete files.

The exception is the BF16 intermediate converted from an HF checkpoint (``bf16.gguf``): when the run
fails or is interrupted after llama.cpp's converter finished, it is kept, and re-running the same
command reuses it instead of converting again (``--no-resume`` deletes it first). It counts as
complete only with its record ``bf16.json``, written atomically after the converter exited and its
output was checked. The record holds the checkpoint's identity (every top-level file's name, size
and mtime, and a hash of the small files: config.json, the safetensors index, the tokenizer), the
converter's settings, and the file's size, mtime, tensor count and tensor data extent. A re-run
reuses the file only when all of that still holds; otherwise it is deleted and converted again.
With ``--keep-bf16 PATH`` the intermediate is made beside PATH instead
(``.<PATH name>.alphaq-partial/``: PATH's filesystem, so keeping it at the end is a rename).

The later stages' results are cached under ~/.cache/alphaq (spectral, selftext, importance,
damage), keyed by the float model's content and their settings, so a resumed run reuses every
stage that had finished. llama.cpp's converter is deterministic (a reconverted intermediate is
byte-identical: tests/test_resume.py), so the caches hold across a reconversion too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from alphaq.errors import InputError
from alphaq.files import atomic_write_text

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".alphaq-partial"
FLOAT_NAME, RECORD_NAME = "bf16.gguf", "bf16.json"
RECORD_VERSION = 1
# the checkpoint's weights are identified by name, size and mtime; every other file also by content
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"}
_HASH_LIMIT = 64 << 20


def partial_dir(path: Path) -> Path:
    """The hidden working directory beside ``path``."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def source_identity(model_dir: Path) -> dict:
    """The HF checkpoint as llama.cpp's converter reads it (its top-level files)."""
    files, h = [], hashlib.blake2b(digest_size=16)
    for p in sorted(model_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        st = p.stat()
        files.append([p.name, st.st_size, st.st_mtime_ns])
        if p.suffix not in _WEIGHT_SUFFIXES and st.st_size <= _HASH_LIMIT:
            h.update(f"{p.name}\0{st.st_size}\0".encode())
            h.update(p.read_bytes())
    return {"dir": str(model_dir.resolve()), "files": files, "small_files_blake2b": h.hexdigest()}


def converter_settings() -> dict:
    from alphaq import __version__
    from convert.vendor import LLAMA_CPP_PYTHON_VERSION

    return {"outtype": "bf16", "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "alphaq": __version__}


def file_facts(path: Path) -> dict:
    """Size, mtime, tensor count and where the tensor data ends (header + every padded tensor)."""
    from alphaq.gguf.io import file_header
    from alphaq.gguf.qtypes import padded

    st = path.stat()
    head = file_header(path)
    end = head.data_start + sum(padded(r.n_bytes, head.alignment) for r in head.records)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "tensors": len(head.records), "data_end": end}


@dataclass(frozen=True)
class Intermediate:
    path: Path  # the complete BF16 GGUF
    tokenizer_fallback: str | None  # the converter's fallback warning, as when it ran
    finite: bool = False  # its values were checked to be finite (alphaq.gguf.io.check_finite)


def _expected(model_dir: Path) -> dict:
    return {"version": RECORD_VERSION, "source": source_identity(model_dir), "converter": converter_settings()}


def verified(float_path: Path, record_path: Path, model_dir: Path) -> tuple[Intermediate | None, str]:
    """The kept intermediate if its record matches the checkpoint, the settings and the file;
    else (None, why)."""
    if not record_path.is_file():
        return None, "no record (the converter had not finished)" if float_path.exists() else "none kept"
    try:
        record = json.loads(record_path.read_text())
        facts = file_facts(float_path)
    except FileNotFoundError:
        return None, f"{float_path.name} is missing"
    except (OSError, ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as exc:
        return None, f"unreadable ({' '.join(str(exc).split())})"
    if not isinstance(record, dict):
        return None, "unreadable record"
    for key, want in _expected(model_dir).items():
        if record.get(key) != want:
            return None, f"its {key} differs from this run's"
    if record.get("file") != facts or facts["data_end"] > facts["bytes"]:
        return None, f"{float_path.name} differs from its record (size, mtime, tensors or data extent)"
    return Intermediate(float_path, record.get("tokenizer_fallback"), record.get("finite") is True), ""


def write_record(float_path: Path, record_path: Path, model_dir: Path, tokenizer_fallback: str | None,
                 finite: bool = False) -> None:
    """Mark the intermediate complete (after the converter exited and its output was checked)."""
    facts = file_facts(float_path)
    if facts["data_end"] > facts["bytes"]:
        from alphaq.errors import InternalError

        raise InternalError(f"{float_path}: the converter's tensors end at byte {facts['data_end']}, "
                            f"past the end of the file ({facts['bytes']})")
    record = {**_expected(model_dir), "file": facts, "tokenizer_fallback": tokenizer_fallback, "finite": finite}
    atomic_write_text(record_path, json.dumps(record, indent=1, sort_keys=True) + "\n")


# The float model's fingerprint, which keys the forward stages' caches, is known only once llama.cpp's
# converter has written it. So that the pre-flight of a later run of the same checkpoint can tell
# what is cached before converting, each conversion notes the fingerprint and tensors its converter
# wrote under ~/.cache/alphaq/float, keyed by the checkpoint (as a kept intermediate is) and the
# converter's settings. The converter is deterministic, so the note holds while both do; it only
# informs the estimate, never what a run reuses (that is keyed by the file itself).
def _float_note_path(model_dir: Path, extra: tuple[str, ...]) -> Path:
    from alphaq.files import cache_root

    blob = json.dumps({**_expected(model_dir), "args": list(extra)}, sort_keys=True)
    return cache_root() / "float" / f"{hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()}.json"


def note_float(model_dir: Path, extra: tuple[str, ...], float_path: Path, tensors) -> None:
    """After a conversion: the fingerprint of ``float_path`` and its tensors (TensorInfo)."""
    from alphaq.files import fingerprint

    note = {"fingerprint": fingerprint(float_path), "tensors": [[t.name, list(t.shape), t.dtype] for t in tensors]}
    path = _float_note_path(model_dir, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(note) + "\n")


def noted_float(model_dir: Path, extra: tuple[str, ...]) -> tuple[str, list[tuple[str, tuple[int, ...], str]]] | None:
    """(fingerprint, tensors as (name, shape, dtype)) of an earlier conversion, or None."""
    try:
        note = json.loads(_float_note_path(model_dir, extra).read_text())
        return note["fingerprint"], [(n, tuple(shape), dtype) for n, shape, dtype in note["tensors"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kept_note(float_path: Path) -> str:
    return (f"the BF16 intermediate is kept in {float_path}: re-running the same command reuses it "
            "(--no-resume deletes it)")


class Workspace:
    """A run's directory beside ``output`` (module docstring). ``open`` locks and clears it and finds a
    reusable intermediate; ``close`` removes it, keeping a complete intermediate when asked."""

    def __init__(self, output: Path, keep_bf16: Path | None = None):
        self.output = output
        self.dir = partial_dir(output)
        self.float_dir = partial_dir(keep_bf16) if keep_bf16 is not None else self.dir
        self.float_path = self.float_dir / FLOAT_NAME
        self.record_path = self.float_dir / RECORD_NAME
        self.found: Intermediate | None = None  # reused from an earlier run
        self._fd: int | None = None

    def peek(self, model_dir: Path) -> Intermediate | None:
        """The reusable intermediate, read only (for the pre-flight, before the lock is taken)."""
        return verified(self.float_path, self.record_path, model_dir)[0]

    def open(self, model_dir: Path | None, resume: bool) -> None:
        """Lock, delete an earlier run's leftovers, and keep (``found``) a verified intermediate of
        the HF checkpoint ``model_dir`` unless ``resume`` is False (None: a GGUF input, none to reuse)."""
        self._fd = _lock(self.dir, self.output)
        keep = {FLOAT_NAME, RECORD_NAME} if self.float_dir == self.dir else set()
        _clear(self.dir, keep)
        if self.float_dir != self.dir and self.float_dir.is_dir():
            _clear(self.float_dir, {FLOAT_NAME, RECORD_NAME})
        if model_dir is not None and resume:
            self.found, why = verified(self.float_path, self.record_path, model_dir)
            if self.found is not None:
                log.info("reusing the BF16 intermediate %s (kept by an interrupted run)", self.float_path)
            elif why != "none kept":
                log.info("not reusing %s: %s; converting again", self.float_path, why)
        elif self.float_path.exists() and not resume:
            log.info("--no-resume: deleting the kept BF16 intermediate %s", self.float_path)
        if self.found is None:
            self.discard_float()
        self.float_dir.mkdir(exist_ok=True)

    def complete(self, tokenizer_fallback: str | None, model_dir: Path, finite: bool = False) -> None:
        write_record(self.float_path, self.record_path, model_dir, tokenizer_fallback, finite)

    def discard_float(self) -> None:
        """Delete the intermediate, its record first (a file without a record is never reused)."""
        self.record_path.unlink(missing_ok=True)
        self.float_path.unlink(missing_ok=True)

    def publish_float(self, dest: Path) -> None:
        """--keep-bf16: the intermediate becomes ``dest`` (a rename: same filesystem)."""
        self.record_path.unlink(missing_ok=True)
        os.replace(self.float_path, dest)

    def close(self, keep_float: bool) -> str | None:
        """Remove the run's files and directories and release the lock. With ``keep_float`` a
        complete intermediate stays (returns the note saying where); an incomplete one never does."""
        kept = keep_float and self.record_path.is_file() and self.float_path.is_file()
        if not kept:
            self.discard_float()
        try:
            for d in dict.fromkeys((self.float_dir, self.dir)):
                if d.is_dir():
                    _clear(d, {FLOAT_NAME, RECORD_NAME} if kept and d == self.float_dir else set())
                    if not any(d.iterdir()):
                        d.rmdir()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return kept_note(self.float_path) if kept else None


def _lock(d: Path, output: Path) -> int:
    """An exclusive flock on directory ``d`` (created); retried when a run that just ended removed it."""
    import fcntl

    while True:
        d.mkdir(exist_ok=True)
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"another alphaq convert is writing {output} (it holds {d}); "
                             "wait for it to finish or stop it") from None
        try:
            same = os.stat(d).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _clear(d: Path, keep: set[str]) -> None:
    for p in d.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def pause_for_test(stage: str) -> None:
    """Test hook (tests/test_resume.py), inert unless ALPHAQ_TEST_PAUSE_AT=STAGE:DIR is set: a run
    that reaches STAGE writes "STAGE\\n" into the named pipe DIR/ready, then blocks reading the pipe
    DIR/go, so that the test can signal the process in that stage without any timing."""
    want, _, fifos = os.environ.get("ALPHAQ_TEST_PAUSE_AT", "").partition(":")
    if want != stage:
        return
    with open(Path(fifos) / "ready", "w") as f:
        f.write(stage + "\n")
    with open(Path(fifos) / "go") as f:
        f.read()

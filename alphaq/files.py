"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to a temp file beside ``path``, then rename.
    The file gets the mode a plain ``open(path, "w")`` would give (mkstemp's own is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def input_files(*paths: Path | None) -> set[Path]:
    """Every file a command reads from ``paths`` (resolved): a file, all parts of a split GGUF, the
    files directly inside a checkpoint directory. None and missing paths add nothing."""
    from alphaq.gguf.io import shard_paths

    found: set[Path] = set()
    for p in paths:
        if p is None or not Path(p).exists():
            continue
        p = Path(p)
        if p.is_dir():
            found.update(f.resolve() for f in p.iterdir() if f.is_file())
        elif p.suffix.lower() == ".gguf":
            found.update(f.resolve() for f in shard_paths(p))
        else:
            found.add(p.resolve())
    return found


def check_output_files(outputs: dict[str, Path | None], force: bool, inputs: set[Path] = frozenset()) -> None:
    """Before any work: each output file (``outputs``: the flag that names it -> path) is not a
    directory, has an existing directory, is none of the command's ``inputs`` (even with --force:
    it replaces outputs, never what they are made from), is not named by two flags, and does not
    exist unless ``force``."""
    from alphaq.errors import InputError

    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{flag} {path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise InputError(f"{flag} {path}: directory {path.parent} does not exist")
        if path.resolve() in inputs:
            raise InputError(f"{flag} {path} is an input of this command; write it elsewhere (--force replaces "
                             "outputs, never an input)")
        if path.resolve() in seen:
            raise InputError(f"{flag} and {seen[path.resolve()]} both name {path}; give each its own file")
        seen[path.resolve()] = flag
        if path.exists() and not force:
            raise InputError(f"{path} exists; pass --force to overwrite it")


def read_json(path: Path) -> object:
    """The JSON in ``path``; a file that is not valid JSON is an InputError naming the file and
    where parsing stopped (line, column)."""
    import json

    from alphaq.errors import InputError

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}): not a JSON file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def fingerprint(path: Path, samples_per_tensor: int = 8, sample_bytes: int = 1 << 16) -> str:
    """A content key for a GGUF file without reading all of it: the header (every key/value and
    tensor info) plus ``samples_per_tensor`` evenly spaced chunks of every tensor's data. A split
    GGUF (any of its parts) is keyed by the keys of all its parts, in order.

    Stages that cache work on a model (self-generated text, importance, damage) key on this, so
    a re-converted or edited model never reuses them, while a 60 GB file costs a few MB of reads."""
    import hashlib

    from alphaq.gguf.io import shard_paths

    parts = shard_paths(path)
    if len(parts) == 1:
        return _file_fingerprint(parts[0], samples_per_tensor, sample_bytes)
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        h.update(_file_fingerprint(part, samples_per_tensor, sample_bytes).encode())
    return h.hexdigest()


def _file_fingerprint(path: Path, samples_per_tensor: int, sample_bytes: int) -> str:
    import hashlib

    from alphaq.gguf.io import file_header

    h = hashlib.blake2b(digest_size=20)
    head = file_header(path)
    start = head.data_start
    with open(path, "rb") as f:
        h.update(f.read(start))
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        span = size - start
        step = max(sample_bytes, span // max(1, samples_per_tensor * max(1, len(head.records))))
        for off in range(start, size, step):
            f.seek(off)
            h.update(f.read(sample_bytes))
    return h.hexdigest()


def cache_root() -> Path:
    """~/.cache/alphaq (or $XDG_CACHE_HOME/alphaq), read at call time."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alphaq"


def check_plots_dir(plots: Path | None, force: bool, names: tuple[str, ...] | None = None) -> None:
    """--plots DIR: a directory (or creatable as one) holding none of the figures' names, unless
    ``force``. ``names``: globs of every figure the command may write (default: convert's,
    alphaq.plots.CONVERT_PLOT_NAMES); the alpha heatmaps' names depend on the model, so any
    ``heatmap_*.png`` counts."""
    if plots is None:
        return
    from alphaq.errors import InputError

    if names is None:
        from alphaq.plots import CONVERT_PLOT_NAMES as names
    existing_ancestor = next(p for p in (plots, *plots.absolute().parents) if p.exists())
    if not existing_ancestor.is_dir():
        raise InputError(f"--plots {plots}: {existing_ancestor} is not a directory")
    if not plots.exists():  # creatable? (a read-only or virtual file system says so only on mkdir)
        try:
            plots.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"--plots {plots}: cannot create it ({exc.strerror or exc})") from None
        target, kept = plots.absolute(), existing_ancestor.absolute()
        for made in (target, *target.parents):  # leave nothing behind: the figures come last
            if made == kept:
                break
            made.rmdir()
    if plots.is_dir() and not force:
        existing = sorted(str(p) for pattern in names for p in plots.glob(pattern))
        if existing:
            raise InputError(f"{', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} already exist(s); "
                              "pass --force to overwrite")

"""The damage stage's per-tensor results as they are made, so that a stopped run resumes there.

At real sizes the damage stage is the longest one (about 34 min of Qwen3-30B-A3B's 1.4 h on 2
cores, 2.1 h of Mixtral-8x7B's 3.7 h; README, "Conversion"), and its finished table is cached only
at the end. Each tensor's results (its weighted errors and, for a measured tensor, its damage, with
the seconds and passes they took) are appended to ``<damage key>.partial.jsonl`` beside that cache
entry as soon as they exist; a re-run with the same key (same model, text, settings, tensors,
types and importance) takes them from there and measures only the rest. A tensor's results do not
depend on the others' (every fake-quantised weight is restored before the next), and JSON keeps a
float's every bit, so the resumed table is the uninterrupted run's (tested).

A line cut short by a kill is ignored (that tensor is measured again); the file goes once the
whole table is cached.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1


@dataclass
class TensorRecord:
    """One tensor's part of the damage table, as `alphaq.damage.measure` made it."""

    name: str
    errors: dict[int | None, dict[str, float]]  # matrix (expert) or None -> type -> weighted error
    damage: dict[str, float] | None  # type -> KL (a measured tensor), None (interpolated later)
    seconds: dict[str, float] = field(default_factory=dict)  # weighted_error, fake_quantise, forward
    passes: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "errors": [[k, v] for k, v in self.errors.items()], "damage": self.damage,
                "seconds": self.seconds, "passes": self.passes}

    @classmethod
    def from_json(cls, d: dict) -> TensorRecord:
        return cls(d["name"], {k: v for k, v in d["errors"]}, d["damage"], d["seconds"], d["passes"])


class Journal:
    """Append-only per-tensor records of one damage table (``path``, keyed like its cache entry)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.done: dict[str, TensorRecord] = {}
        self._file = None
        self._read()

    def _read(self) -> None:
        done = read_records(self.path, self.key)
        if done is None:
            log.warning("damage: ignoring %s (written for other settings)", self.path)
            self.path.unlink(missing_ok=True)
            return
        self.done = done
        if self.done:
            log.info("damage: resuming: %d tensor(s) from %s", len(self.done), self.path)

    def get(self, name: str) -> TensorRecord | None:
        return self.done.get(name)

    def add(self, rec: TensorRecord) -> None:
        """Append one record, on disk before this returns (a kill right after it keeps it)."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            size = self.path.stat().st_size if self.path.exists() else 0
            torn = size > 0 and _last_byte(self.path) != b"\n"  # a killed run's last line, cut short
            self._file = self.path.open("a")
            if size == 0:
                self._file.write(json.dumps({"key": self.key, "v": VERSION}) + "\n")
            elif torn:
                self._file.write("\n")  # (so that the next record starts a line of its own)
        self._file.write(json.dumps(rec.to_json()) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """The whole table is cached: the records are no longer needed."""
        self.close()
        self.path.unlink(missing_ok=True)


def read_records(path: Path, key: str) -> dict[str, TensorRecord] | None:
    """The records at ``path`` (none when there is no file); None when it was written under another
    key. Reads only (the pre-flight counts them too)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    if not lines or _parse(lines[0]) != {"key": key, "v": VERSION}:
        return None
    done = {}
    for line in lines[1:]:
        try:
            rec = TensorRecord.from_json(_parse(line))
        except (KeyError, TypeError, ValueError):  # the last line of a killed run may be cut short
            continue
        done[rec.name] = rec
    return done


def _parse(line: str) -> dict | None:
    try:
        d = json.loads(line)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)

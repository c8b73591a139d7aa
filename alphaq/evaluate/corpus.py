"""Offline training/evaluation text: two domains of real text that exist on a fresh machine.

* ``prose``: the reST sources of the Python documentation (Debian package python3.11-doc).
* ``code``: the Python standard library's own source (tests and idlelib left out).

Each file goes to exactly one split by a hash of its path relative to its domain root, so the
splits are disjoint and stable across machines that have the same files:
``train`` (90 %), ``val`` (5 %), ``test`` (5 %).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from alphaq.errors import AlphaQError

PROSE_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
SPLITS = ("train", "val", "test")
DOMAINS = ("prose", "code")
# stdlib directories that are mostly data or test scaffolding, not representative code
_CODE_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


@dataclass(frozen=True)
class CorpusFile:
    domain: str  # "prose" | "code"
    relpath: str  # path relative to the domain root, '/'-separated
    path: Path


def domain_root(domain: str) -> Path:
    if domain == "prose":
        return PROSE_ROOT
    if domain == "code":
        return Path(sysconfig.get_paths()["stdlib"])
    raise AlphaQError(f"unknown corpus domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def split_of(relpath: str) -> str:
    """90/5/5 split by the first byte of sha1(relpath): deterministic, disjoint."""
    bucket = hashlib.sha1(relpath.encode()).digest()[0] * 100 // 256
    return "train" if bucket < 90 else ("val" if bucket < 95 else "test")


def list_files(domain: str, split: str) -> list[CorpusFile]:
    if split not in SPLITS:
        raise AlphaQError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    root = domain_root(domain)
    if not root.is_dir():
        hint = " (apt-get install python3.11-doc)" if domain == "prose" else ""
        raise AlphaQError(f"corpus directory {root} for domain {domain!r} is missing{hint}")
    pattern = "*.txt" if domain == "prose" else "*.py"
    out = []
    for path in sorted(root.rglob(pattern)):
        rel = path.relative_to(root).as_posix()
        if domain == "code" and _CODE_SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        if split_of(rel) == split:
            out.append(CorpusFile(domain, rel, path))
    return out


def read_text(domain: str, split: str, max_chars: int | None = None) -> str:
    """Concatenate a split's files in sorted order, separated by blank lines."""
    parts, total = [], 0
    for f in list_files(domain, split):
        text = f.path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 2
        if max_chars is not None and total >= max_chars:
            break
    joined = "\n\n".join(parts)
    return joined if max_chars is None else joined[:max_chars]

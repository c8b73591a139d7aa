"""Copy-on-write windows over the model file that llama.cpp memory-maps.

llama.cpp maps a GGUF read-only and shared (PROT_READ, MAP_SHARED) and computes straight from the
mapped pages, so its float weights cost no private memory: the kernel may drop those pages and read
them again, and a model larger than RAM still runs (slowly, paging). The forward stages therefore
load the model mapped, and the damage stage fake-quantises one weight at a time like this:

* `Mapper.private(buf)` maps the pages that hold the weight again over the same file range,
  copy-on-write (MAP_PRIVATE | MAP_FIXED, writable): writes go to private copies of those pages only,
  the file is never written;
* `Mapper.revert(buf)` maps the range shared and read-only again, which drops the copies and shows
  the file's bytes, so no copy of the original weight is kept.

A weight's pages may hold the ends of its neighbours: they are copied with the file's bytes and
reverted to them, which is harmless because one weight is written at a time.

Linux only: /proc/self/maps gives the file and offset of an address. `available()` says whether this
process can use it; elsewhere the Session falls back to llama.cpp's malloc'd copy of the model.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from dataclasses import dataclass

from alphaq.errors import AlphaQError

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same value on every Linux architecture


@dataclass(frozen=True)
class FileRange:
    """Whole pages of a mapped file: where they sit in memory and in the file."""

    path: str
    address: int
    offset: int
    length: int


def available() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/maps")


def _mappings() -> list[tuple[int, int, int, str, str]]:
    """(start, end, file offset, permissions, path) of every file-backed mapping of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), parts[1], parts[5].rstrip("\n")))
    return out


def permissions(address: int) -> str | None:
    """The /proc/self/maps permissions ("r--s", "rw-p", ...) of the page holding ``address``."""
    return next((perm for start, end, _, perm, _ in _mappings() if start <= address < end), None)


def in_mapped_file(spans: list[tuple[int, int]]) -> list[bool]:
    """For each [address, address + n_bytes) span: whether it lies in one file-backed mapping
    (/proc/self/maps read once for all of them)."""
    maps = _mappings()
    return [any(start <= a and a + n <= end for start, end, *_ in maps) for a, n in spans]


def file_range(address: int, n_bytes: int) -> FileRange:
    """The whole pages of the mapped file that hold [address, address + n_bytes)."""
    first = address - address % PAGE
    last = -(-(address + n_bytes) // PAGE) * PAGE
    for start, end, offset, _, path in _mappings():
        if start <= first < end:
            file_size = os.path.getsize(path)
            range_offset = offset + first - start
            if range_offset + (address + n_bytes - first) > file_size:
                break
            return FileRange(path, first, range_offset, last - first)
    raise AlphaQError(f"address {address:#x} is not in a mapped file; load the model with mmap")


class Mapper:
    """Makes weights of a memory-mapped model privately writable and reverts them to the file."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mmap.restype = ctypes.c_void_p
        self._libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_long)
        self._fds: dict[str, int] = {}
        self._ranges: dict[tuple[int, int], FileRange] = {}

    def _range(self, address: int, n_bytes: int) -> FileRange:
        key = (address, n_bytes)
        if key not in self._ranges:  # looked up while the pages are still the shared file mapping
            self._ranges[key] = file_range(address, n_bytes)
        return self._ranges[key]

    def _map(self, r: FileRange, prot: int, flags: int) -> None:
        fd = self._fds.get(r.path)
        if fd is None:
            fd = self._fds[r.path] = os.open(r.path, os.O_RDONLY)
        got = self._libc.mmap(r.address, r.length, prot, flags | _MAP_FIXED, fd, r.offset)
        if got != r.address:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap over {r.path} at offset {r.offset}: {os.strerror(err)}")

    def private(self, address: int, n_bytes: int) -> None:
        """Make [address, address + n_bytes) writable; writes stay in this process."""
        self._map(self._range(address, n_bytes), mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE)

    def revert(self, address: int, n_bytes: int) -> None:
        """Drop this process's writes to the range: it shows the file's bytes again, read-only."""
        self._map(self._range(address, n_bytes), mmap.PROT_READ, mmap.MAP_SHARED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

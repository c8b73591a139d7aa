"""Peak private memory of this process per pipeline stage, for the summary.

Private memory is RssAnon + RssShmem (/proc/self/status): what the OS cannot drop. RSS as `top`
shows it also counts the pages of the memory-mapped float model that the forward stages read,
which are page cache (docs/DESIGN.md, "Memory"), so the summary reports private memory.

A daemon thread samples it every ``interval`` seconds, and every stage boundary samples it too, so
a stage shorter than the interval still gets a value. Linux only: elsewhere nothing is recorded.
Child processes (llama.cpp's converter in the float-model stage) are not counted.

Stages mark themselves with ``stage(name)``, which records into the monitor that is running (the
one ``run_convert`` starts), and does nothing when none is: library callers pay nothing.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_active: StageMemory | None = None


def private_bytes() -> int | None:
    """RssAnon + RssShmem of this process in bytes, or None where /proc does not say."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem")) * 1024
    except (KeyError, ValueError, IndexError):
        return None


class StageMemory:
    """Peak private bytes per stage name while it runs (a context manager)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._current: list[str] = []  # nested stages: the innermost is charged, and so are its parents
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        value = private_bytes()
        if value is None:
            return
        with self._lock:
            for name in self._current:
                self.peaks[name] = max(self.peaks.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> StageMemory:
        global _active
        if private_bytes() is not None:
            self._thread = threading.Thread(target=self._run, name="alphaq-memory", daemon=True)
            self._thread.start()
        self._previous, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = self._previous
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def stage(self, name: str):
        with self._lock:
            self._current.append(name)
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self._current.remove(name)


@contextlib.contextmanager
def stage(name: str):
    """Charge the private memory used meanwhile to ``name`` in the running monitor, if any."""
    monitor = _active
    if monitor is None:
        yield
        return
    with monitor.stage(name):
        yield

"""The per-stage peak private memory that the convert summary reports (alphaq.memory)."""

from __future__ import annotations

import mmap

import pytest

from alphaq import memory

MiB = 2**20


def _touched(n_bytes: int) -> mmap.mmap:
    """Fresh anonymous pages, written: resident and private whatever malloc holds already (a heap
    left large by earlier tests would serve a numpy array from pages it already counts)."""
    buf = mmap.mmap(-1, n_bytes)
    buf.write(b"\1" * n_bytes)
    return buf


linux_only = pytest.mark.skipif(memory.private_bytes() is None, reason="no /proc/self/status here")


@linux_only
def test_private_bytes_grows_with_touched_anonymous_memory():
    before = memory.private_bytes()
    block = _touched(64 * MiB)
    after = memory.private_bytes()
    assert after - before >= 60 * MiB
    block.close()


@linux_only
def test_a_stage_is_charged_what_it_allocates_and_its_parent_too():
    with memory.StageMemory(interval=0.01) as monitor:
        with memory.stage("small"):
            pass
        with memory.stage("outer"):
            with memory.stage("big"):
                block = _touched(96 * MiB)
            block.close()  # after the stage: its closing sample sees the block whatever the thread did
    peaks = monitor.peaks
    assert set(peaks) == {"small", "outer", "big"}
    assert peaks["big"] - peaks["small"] >= 80 * MiB
    assert peaks["outer"] >= peaks["big"]


def test_without_a_running_monitor_stages_record_nothing():
    monitor = memory.StageMemory()
    with memory.stage("anything"):
        pass
    assert monitor.peaks == {}

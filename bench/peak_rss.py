"""The peak-RSS rise of one call, shared by the benchmarks that measure memory (Linux only)."""

from __future__ import annotations

from typing import Callable


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def peak_rss_rise_kb(fn: Callable[[], object]) -> int:
    """KiB by which the process's peak RSS during ``fn()`` exceeds its RSS just before: the call's
    own working memory, whatever the interpreter, libraries and weights already hold."""
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    fn()
    return _status_kb("VmHWM") - before

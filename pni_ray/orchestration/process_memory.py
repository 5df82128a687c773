"""A process's own peak resident memory, without torch or Ray (benchmark workers import it too).

Linux VmHWM is the high-water mark of the process's own memory map: it starts afresh at exec and
can be reset (`reset_peak_rss`). ru_maxrss, the fallback elsewhere, is carried across fork + exec,
so a child reports at least its parent's peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def reset_peak_rss() -> str:
    """Reset this process's VmHWM so the next reading is this task's peak; returns the method."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def vm_hwm_bytes(pid: str = "self") -> int | None:
    """A process's VmHWM (peak RSS so far, kept by the kernel) in bytes; None where /proc has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_mb(source: str = "VmHWM") -> float:
    """Peak RSS in MB by `source` ("VmHWM", falling back to "ru_maxrss" where /proc has none)."""
    hwm = vm_hwm_bytes() if source == "VmHWM" else None
    if hwm is not None:
        return hwm / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0
